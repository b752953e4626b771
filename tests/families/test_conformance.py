"""The conformance suite: the same checks for every registered family, driven by the family's own
synthetic part (its `CONFORMANCE` record, prolora.synthetic.conformance). A family added to the
registry gets these tests without writing them; one without a record fails the first test.

Per (source, target) pair of the record (tiny presets; the target is written from the source):

- layouts: source and target written in every layout the family reads (diffusers folder, single
  file, ComfyUI-prefixed single file, ...) open as the same member with the same canonical
  weights (ids, shapes, stored dtypes, values) and the same identity();
- in memory: diffusers' own model class, `from_pretrained` on the folder's denoiser component,
  read through prolora.families.in_memory_model, has the component folder's weights, values and
  identity, which are the single file's weights of that component;
- LoRA spellings: every spelling the family's trainers write (prolora.synthetic.write_lora) is
  read, is not taken for another family's, resolves key by key to canonical modules (plain or
  fused slices) whose spelling gives the key back, and written again in its format re-reads to the
  same modules; written once more, the file is the same (both ways);
- transfer and diffusers: each spelling transferred onto the target (prolora.transfer,
  prolora-full), the output loaded by diffusers' own pipeline of the target's member
  (`<Pipeline>(<component>=denoiser, everything else None).load_lora_weights`), with no warning
  of unexpected or missing keys, and fused: every weight diffusers changed must equal target + dW
  as the output file defines it (read below with a minimal parser of its own: the down/up pairs of
  tests/zoo.py, `.alpha` entries and peft's lora_adapter_metadata rules) within 1e-3 relative,
  every nonzero row of every dW in the file must land in some weight (none ignored), and every
  other weight must stay bit-identical. Which file row lands in which weight is found by value,
  not by a key map, so the check knows no family.

What diffusers cannot load for a known reason is named in the record's `loader_gaps`: there the
test checks that diffusers still fails on the output (raises, or loads none or not all of it) and
reports xfail with the reason; once diffusers loads it, the test fails and the entry goes. A format
the target member has no layout for (Family.member_formats) is skipped saying so.
"""
from __future__ import annotations

import copy
import inspect
import json
import logging
import math
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import prolora  # noqa: E402
from prolora import families  # noqa: E402
from prolora.families import in_memory_model, open_model  # noqa: E402
from prolora.formats import read_lora  # noqa: E402
from prolora.formats import write_lora as write_lora_file  # noqa: E402
from prolora.lora import LoraFile  # noqa: E402
from prolora.safetensors_io import SafetensorsFile  # noqa: E402
from prolora.synthetic import write_lora, write_model  # noqa: E402
from zoo import lora_pairs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
ADAPTER = "conformance"
RANK = 4
TOLERANCE = 1e-3  # fused weight vs target + the file's dW, relative (Frobenius) per weight
# what diffusers / peft say when keys of a LoRA file go unused
COMPLAINT = re.compile(r"unexpected keys|missing keys|not (?:be )?(?:used|loaded)|ignored", re.I)


@dataclass(frozen=True)
class Case:
    """One (source, target) pair of a family's conformance record."""

    family: str
    source: str
    target: str

    @property
    def conf(self):
        return families.get(self.family).part("synthetic").CONFORMANCE

    @property
    def id(self) -> str:
        return f"{self.source.partition(':')[0]}->{self.target.partition(':')[0]}"


def _records():
    """(family, its conformance record or None) for every family that is not a refusal."""
    out = []
    for fam in families.families():
        if fam.refuses:
            continue
        part = fam.part("synthetic") if fam.has("synthetic") else None
        out.append((fam, getattr(part, "CONFORMANCE", None)))
    return out


CASES = [Case(fam.name, s, t) for fam, conf in _records() if conf is not None for s, t in conf.pairs]
SPELLINGS = [pytest.param(c, name, id=f"{c.id}-{name}") for c in CASES for name in c.conf.loras]


def test_every_family_has_a_conformance_record():
    missing = [fam.name for fam, conf in _records() if conf is None]
    assert not missing, f"families without a synthetic part with CONFORMANCE: {missing}"
    assert CASES


# ----------------------------------------------------------------------------- inputs, built once


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """case -> {"source" / "target": {layout: path}, "loras": {spelling: path}, "dir": folder},
    written on first use and kept for the module."""
    cache: dict[Case, dict] = {}

    def get(case: Case) -> dict:
        if case not in cache:
            cache[case] = _build(case, tmp_path_factory.mktemp(f"{case.family}-{case.id.replace('>', '')}"))
        return cache[case]

    return get


def _file_layout(conf) -> str:
    return next(layout for layout in conf.layouts if layout != "diffusers")


def _build(case: Case, d: Path) -> dict:
    conf = case.conf
    dtype = getattr(torch, conf.dtype)
    paths: dict = {"dir": d, "source": {}, "target": {}}
    for layout in conf.layouts:
        name = "source" if layout == "diffusers" else f"source-{layout}.safetensors"
        paths["source"][layout] = write_model(d / name, case.source, layout=layout, dtype=dtype, seed=0)
    base = paths["source"][conf.layouts[0]]
    for layout in conf.layouts:
        name = "target" if layout == "diffusers" else f"target-{layout}.safetensors"
        paths["target"][layout] = write_model(d / name, case.target, layout=layout, dtype=dtype, seed=0, base=base)
    source = paths["source"][_file_layout(conf)]
    paths["loras"] = {name: write_lora(source, d / f"lora-{name}.safetensors", rank=RANK, seed=i, **kw)
                      for i, (name, kw) in enumerate(conf.loras.items())}
    return paths


def _same_weights(a, b, what: str, upcast: tuple[str, ...] = ()) -> None:
    """The same canonical weights (ids, shapes, stored dtypes, values) and identity; except that
    `b`'s weights under a module named in `upcast` may be stored in float32 (b then has another
    identity, which covers stored dtypes)."""
    assert {m: r.shape for m, r in a.weights.items()} == {m: r.shape for m, r in b.weights.items()}, what
    raised = set()
    for module, ref in a.weights.items():
        if b.weights[module].dtype != ref.dtype:
            assert b.weights[module].dtype == "F32" and any(f".{u}." in f".{module}." for u in upcast), \
                f"{what}: {module} is {b.weights[module].dtype}, not {ref.dtype}"
            raised.add(module)
        assert torch.equal(a.load(module), b.load(module)), f"{what}: {module}"
    if not raised:
        assert a.identity() == b.identity(), what


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_every_layout_reads_the_same_model(case, built):
    conf, paths = case.conf, built(case)
    fam = families.get(case.family)
    members = {}
    for role in ("source", "target"):
        ref_layout = conf.layouts[0]
        with open_model(paths[role][ref_layout]) as ref:
            assert families.of(ref) is fam, (role, ref.family)
            members[role] = ref.family
            for layout in conf.layouts[1:]:
                with open_model(paths[role][layout]) as m:
                    assert m.family == ref.family, (role, layout)
                    _same_weights(ref, m, f"{role}: {layout} vs {ref_layout}")
    assert families.related(members["source"], members["target"]), members


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_in_memory_module_reads_as_its_folder(case, built):
    diffusers = pytest.importorskip("diffusers")
    conf, paths = case.conf, built(case)
    for role in ("source", "target"):
        folder = paths[role]["diffusers"] / conf.component
        with open_model(folder) as comp, open_model(paths[role][_file_layout(conf)]) as whole:
            cls = getattr(diffusers, conf.model_classes[comp.family])
            module = cls.from_pretrained(folder, torch_dtype=getattr(torch, conf.dtype), local_files_only=True)
            mem = in_memory_model(module)
            assert mem.family == comp.family, role
            # diffusers keeps some modules of some classes in float32 whatever torch_dtype says
            # (`_keep_in_fp32_modules`, e.g. Wan's time_embedder): those may differ in dtype only
            _same_weights(comp, mem, f"{role}: in memory vs {folder.name}/",
                          upcast=tuple(getattr(cls, "_keep_in_fp32_modules", None) or ()))
            mine = {m for m in whole.weights if m.startswith(conf.component + ".")}
            assert set(comp.weights) == mine, role
            for m in mine:
                assert torch.equal(whole.load(m, None), comp.load(m, None)), (role, m)


# ----------------------------------------------------------------------------- LoRA spellings


def _tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with SafetensorsFile(path) as f:
        return {k: f.get(k) for k in f.keys()}, dict(f.metadata or {})


def _same_modules(a: LoraFile, b: LoraFile, what: str) -> None:
    assert a.format == b.format and set(a.modules) == set(b.modules), what
    for key, m in a.modules.items():
        n = b.modules[key]
        assert torch.equal(m.down, n.down) and torch.equal(m.up, n.up), (what, key)
        assert m.scale == n.scale, (what, key, m.alpha, n.alpha)


@pytest.mark.parametrize("case, spelling", SPELLINGS)
def test_lora_spelling_reads_resolves_and_writes_back(case, spelling, built, tmp_path):
    conf, paths = case.conf, built(case)
    fam = families.get(case.family)
    lf = read_lora(paths["loras"][spelling])
    assert lf.modules
    member, how = families.guess_lora(lf)
    assert member == "unknown" or member in fam.members, (member, how)
    with open_model(paths["source"][_file_layout(conf)]) as src:
        for key, mod in lf.modules.items():
            hit = src.resolve(key)
            if hit is not None:
                module, spelled = hit
                if spelling in conf.rewritten:  # read as another spelling's key, written back as that one
                    assert src.resolve(src.spell(module, spelled)) == hit, key
                else:
                    assert src.spell(module, spelled) == key, key
                shape = src.weights[module].shape
                assert (mod.out_features, mod.in_features) == (shape[0], math.prod(shape[1:])), key
                continue
            fused = src.resolve_fused(key)
            assert fused is not None, f"{key}: no canonical module"
            assert mod.out_features == fused.rows, key
            for piece in fused.slices:
                assert src.spell_fused(piece.module, fused.spelling)[0] == key, (key, piece.module)
    again = tmp_path / "again.safetensors"
    write_lora_file(again, lf, lf.format)
    lf2 = read_lora(again)
    _same_modules(lf, lf2, "read, written, read again")
    once_more = tmp_path / "once_more.safetensors"
    write_lora_file(once_more, lf2, lf2.format)
    t1, meta1 = _tensors(again)
    t2, meta2 = _tensors(once_more)
    assert set(t1) == set(t2) and all(torch.equal(t1[k], t2[k]) for k in t1) and meta1 == meta2


# ----------------------------------------------------------------------------- transfer -> diffusers


def _denoiser_only(path: Path, conf, model, out: Path) -> Path:
    """The LoRA without modules outside the denoiser (text encoders: the pipeline here holds the
    denoiser alone); the file as is when it has none."""
    lf = read_lora(path)

    def inside(key: str) -> bool:
        hit = model.resolve(key)
        modules = [hit[0]] if hit else [s.module for s in model.resolve_fused(key).slices]
        return all(m.startswith(conf.component + ".") for m in modules)

    keep = {k: m for k, m in lf.modules.items() if inside(k)}
    if len(keep) == len(lf.modules):
        return path
    write_lora_file(out, LoraFile(lf.format, keep, dict(lf.metadata)), lf.format)
    return out


def _peft_value(cfg: dict, field: str, pattern_field: str, name: str):
    """peft's rule: the first `pattern_field` key matching `(.*\\.)?(KEY)$`, else `field`."""
    for key, value in (cfg.get(pattern_field) or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return cfg[field]


def file_deltas(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module stem: (dW (out, in*kh*kw) in float64, an orthonormal basis of its row space)} as
    the file defines it: each down/up pair (zoo.lora_pairs), scaled by its `.alpha` entry / rank,
    else by peft's lora_adapter_metadata (alpha / r per module, patterns first), else 1."""
    tensors, meta = _tensors(path)
    configs: dict[str, dict] = {}
    for k, v in json.loads(meta.get("lora_adapter_metadata", "{}")).items():
        comp, _, field = k.rpartition(".")
        configs.setdefault(comp, {})[field] = v
    out = {}
    for stem, down, up in lora_pairs(tensors):
        rank = down.shape[0]
        alpha = tensors.get(stem + ".alpha")
        if alpha is not None:
            scale = float(alpha) / rank
        elif configs:
            comp = max((c for c in configs if not c or stem.startswith(c + ".")), key=len, default=None)
            assert comp is not None, f"{stem}: no lora_adapter_metadata for its component"
            name = stem[len(comp) + 1:] if comp else stem
            r = _peft_value(configs[comp], "r", "rank_pattern", name)
            assert r == rank, stem
            scale = _peft_value(configs[comp], "lora_alpha", "alpha_pattern", name) / r
        else:
            scale = 1.0
        down = down.flatten(1)
        basis = torch.linalg.qr(down.T).Q.T  # the row space of dW is the down's (up has full rank)
        out[stem] = (scale * (up.flatten(1) @ down), basis)
    return out


@contextmanager
def _diffusers_says():
    """Warnings diffusers logs (its logger does not propagate) or raises as Python warnings."""
    said: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())

    handler = Keep(level=logging.WARNING)
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield said
        said.extend(str(w.message) for w in caught)
    finally:
        logger.removeHandler(handler)


def _pipeline(conf, member: str, denoiser):
    import diffusers

    cls = getattr(diffusers, conf.pipelines[member])
    required = [p.name for p in list(inspect.signature(cls.__init__).parameters.values())[1:]
                if p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD]
    return cls(**{**{name: None for name in required}, conf.component: denoiser})


def target_denoiser(paths: dict, conf, member: str):
    """A fresh copy of the target's denoiser as diffusers loads it, in float32 (so that fused
    weights are exact to ~1e-7); loaded once per pair."""
    if "denoiser" not in paths:
        import diffusers

        cls = getattr(diffusers, conf.model_classes[member])
        paths["denoiser"] = cls.from_pretrained(paths["target"]["diffusers"] / conf.component,
                                                torch_dtype=torch.float32, local_files_only=True).eval()
    return copy.deepcopy(paths["denoiser"])


def load_fuse_and_compare(conf, member: str, denoiser, output: Path) -> dict:
    """Load `output` with diffusers' pipeline of `member` on `denoiser`, fuse, and check every
    weight against the file (see the module doc)."""
    pipe = _pipeline(conf, member, denoiser)
    before = {k: v.detach().clone() for k, v in denoiser.state_dict().items()}
    with _diffusers_says() as said:
        pipe.load_lora_weights(str(output), adapter_name=ADAPTER)
    complaints = [s for s in said if COMPLAINT.search(s)]
    assert not complaints, complaints[:3]
    adapted = {name for name, layer in denoiser.named_modules()
               if hasattr(layer, "lora_A") and ADAPTER in layer.lora_A}
    assert adapted, "diffusers adapted no module"
    pipe.fuse_lora(components=[conf.component], lora_scale=1.0)
    pipe.unload_lora_weights()
    after = denoiser.state_dict()
    assert set(after) == set(before)
    fused = {}
    for k, w0 in before.items():
        module = k[: -len(".weight")] if k.endswith(".weight") else None
        if module in adapted:
            fused[module] = (after[k].double() - w0.double()).flatten(1)
        else:
            assert torch.equal(after[k], w0), f"{k}: changed, but no LoRA module adapts it"
    # each fused delta is found in the file by value: its rows lie in the row space of the one dW
    # they come from (a few batched projections per weight), and are rows of that dW
    deltas = file_deltas(output)
    spaces: dict[int, tuple[list[str], torch.Tensor]] = {}
    for stem, (want, basis) in deltas.items():
        names, bases = spaces.get(want.shape[1], ([], []))
        spaces[want.shape[1]] = (names + [stem], bases + [basis])
    spaces = {w: (names, torch.nn.utils.rnn.pad_sequence(bases, batch_first=True))
              for w, (names, bases) in spaces.items()}
    covered: set[tuple[str, int]] = set()
    worst = 0.0
    for module, dw in fused.items():
        if dw.norm() == 0:  # a zero-delta module (loader padding): nothing to find in the file
            continue
        assert dw.shape[1] in spaces, f"{module}: no dW of its input width in the file"
        names, bases = spaces[dw.shape[1]]
        probe = dw[dw.norm(dim=1).argmax()]
        residual = probe - torch.einsum("sr,sri->si", torch.einsum("sri,i->sr", bases, probe), bases)
        stem = names[int(residual.norm(dim=1).argmin())]
        want = deltas[stem][0]
        idx = torch.cdist(dw, want).argmin(dim=1).tolist()
        err = float((dw - want[idx]).norm() / want[idx].norm())
        assert err < TOLERANCE, f"{module}: diffusers' fused delta is not rows of a dW of the file " \
                                f"(nearest: {stem}, relative error {err:.3g})"
        worst = max(worst, err)
        covered.update((stem, r) for r in idx)
    ignored = sorted({stem for stem, (want, _) in deltas.items()
                      for r in range(want.shape[0]) if (stem, r) not in covered and want[r].norm() > 0})
    assert not ignored, f"dW rows of the file that no weight received (diffusers ignored them): {ignored[:5]}"
    return {"adapted": adapted, "worst": worst}


@pytest.mark.parametrize("case, spelling", SPELLINGS)
def test_transferred_lora_loads_in_diffusers(case, spelling, built, tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    conf, paths = case.conf, built(case)
    fam = families.get(case.family)
    source, target = paths["source"][_file_layout(conf)], paths["target"]["diffusers"]
    with open_model(target) as tm, open_model(source) as sm:
        member, same_member = tm.family, sm.family == tm.family
        fmt = read_lora(paths["loras"][spelling]).format
        if not fam.supports_format(fmt, member):
            pytest.skip(f"the {fmt} format has no layout for {member} models (its Family.member_formats)")
        lora = _denoiser_only(paths["loras"][spelling], conf, sm, tmp_path / f"{spelling}-denoiser.safetensors")
    out = tmp_path / f"{spelling}-on-target.safetensors"
    res = prolora.transfer(source, target, lora, out, method="prolora-full")
    # every layer moves, but the slices of a fused weight the LoRA leaves at zero and, for a target
    # of a derived member, the modules it lacks (Chroma's pruned modulation); each says why
    allowed = ("the LoRA is zero on this slice",) + (() if same_member else ("no counterpart in the target",))
    missing = [r for r in res.report.layers if not r.transferred]
    assert all((r.reason or "").startswith(allowed) for r in missing), res.report.table()
    assert len(missing) < len(res.report.layers)
    assert read_lora(out).format == fmt
    denoiser = target_denoiser(paths, conf, member)
    gap = conf.loader_gaps.get(f"{spelling}@{member}", conf.loader_gaps.get(spelling))
    if gap is None:
        got = load_fuse_and_compare(conf, member, denoiser, out)
        assert got["worst"] < TOLERANCE
        return
    # a gap the record names: diffusers must still fail on it (raise, or load none / not all of it);
    # once it loads the output, this fails and the record's entry goes
    with pytest.raises(Exception) as failed:  # noqa: B017 (whatever diffusers raises, or our checks)
        load_fuse_and_compare(conf, member, denoiser, out)
    pytest.xfail(f"diffusers cannot load it: {gap} ({failed.typename})")
