"""extract / resize / merge, each checked against a float64 dense reference computed here
(torch.linalg.svd of the dense matrix), with relative-error criteria (the randomized SVD extract
uses is tests/ops/test_svd_randomized.py's, method.factor_svd tests/test_method.py's):

- resize / merge: the output's dense dW equals the dense reference (the input's dW, or the
  weighted sum) to 1e-5 relative where nothing is truncated, and equals the best rank-N
  approximation of the dense reference to 1e-5 where it is.
- extract: every layer's error within 1.01x of the optimal rank-r error of the dense difference
  read from the two files; identical layers skipped and reported; bad inputs one line, exit 2,
  nothing written.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prolora.errors import LoraMismatchError, ModelError, NothingTransferredError, OptionError
from prolora.families import open_model
from prolora.formats import read_lora, write_lora
from prolora.formats.parts import canonical_modules
from prolora.jobs import RankRule
from prolora.jobs.bench import write_tuned
from prolora.jobs.extract import ExtractOptions, extract, extract_many
from prolora.jobs.merge import merge
from prolora.jobs.resize import resize
from prolora.lora import LoraFile, LoraModule

pytestmark = pytest.mark.usefixtures("one_thread")


def dense(m: LoraModule) -> torch.Tensor:
    return m.scale * (m.up.double().flatten(1) @ m.down.double().flatten(1))


def best_rank(D: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(D.double(), full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- rank rules


def test_rank_rules_follow_sd_scripts_meanings():
    S = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5])
    assert RankRule.parse("sv_ratio:4").choose(S) == 2  # keep S >= 2.5
    assert RankRule.parse("sv_ratio:5").choose(S) == 3  # keep S >= 2
    # Frobenius fractions sqrt(cumsum S^2)/||S||: 0.876, 0.980, ...
    assert RankRule.parse("sv_fro:0.9").choose(S) == 2
    assert RankRule.parse("sv_fro:0.87").choose(S) == 1
    # cumulative sums / 18.5: 0.541, 0.811, 0.919, ...
    assert RankRule.parse("sv_cumulative:0.9").choose(S) == 3
    assert RankRule.parse("sv_cumulative:0.9", max_rank=2).choose(S) == 2
    assert RankRule.parse("rank:8").choose(S) == 5
    for bad in ("sv_fro:1.5", "sv_ratio:0.5", "nope:1", "sv_fro"):
        with pytest.raises(OptionError):
            RankRule.parse(bad)


# ----------------------------------------------------------------------------- resize


def _lora(path: Path, seed: int, rank: int = 6, alpha: float | None = 3.0, fmt: str = "kohya") -> Path:
    """A float32 LoRA with linear and conv modules (kohya names)."""
    g = torch.Generator().manual_seed(seed)
    mods = {
        "lora_unet_a_to_q": LoraModule("lora_unet_a_to_q", torch.randn(rank, 40, generator=g),
                                       torch.randn(48, rank, generator=g), alpha),
        "lora_unet_b_conv": LoraModule("lora_unet_b_conv", torch.randn(rank, 8, 3, 3, generator=g),
                                       torch.randn(16, rank, 1, 1, generator=g), alpha),
    }
    write_lora(path, LoraFile(fmt, mods, {"ss_network_dim": str(rank)}, torch.float32))
    return path


def test_resize_exact_without_truncation_and_optimal_with_it(tmp_path):
    src = _lora(tmp_path / "in.safetensors", seed=5)
    lf = read_lora(src)
    same = resize(src, tmp_path / "same.safetensors", 6)
    for key, m in read_lora(same.output).modules.items():
        assert rel(dense(m), dense(lf.modules[key])) < 1e-5
    res = resize(src, tmp_path / "r3.safetensors", "rank:3", report=tmp_path / "r3.json")
    out = read_lora(res.output)
    for key, m in out.modules.items():
        ref = best_rank(dense(lf.modules[key]), 3)
        assert m.rank == 3 and rel(dense(m), ref) < 1e-5
        assert m.scale == pytest.approx(lf.modules[key].scale)  # alpha / rank convention kept
        assert m.is_conv == lf.modules[key].is_conv
    rep = json.loads((tmp_path / "r3.json").read_text())
    line = next(x for x in rep["modules"] if x["key"] == "lora_unet_a_to_q")
    S = torch.linalg.svdvals(dense(lf.modules["lora_unet_a_to_q"]))
    assert line["retained_energy"] == pytest.approx(float((S[:3] ** 2).sum() / (S ** 2).sum()), rel=1e-9)
    assert read_lora(res.output).metadata["prolora.resize"] == "rank:3"


def test_resize_dynamic_rules_against_dense_spectrum(tmp_path):
    src = _lora(tmp_path / "in.safetensors", seed=6, rank=8)
    lf = read_lora(src)
    for spec in ("sv_fro:0.8", "sv_cumulative:0.7", "sv_ratio:3"):
        res = resize(src, tmp_path / "dyn.safetensors", spec)
        out = read_lora(res.output)
        for key, m in lf.modules.items():
            S = torch.linalg.svdvals(dense(m))[:8]
            f = float(spec.split(":")[1])
            if spec.startswith("sv_fro"):
                want = int(((S ** 2).cumsum(0).sqrt() / (S ** 2).sum().sqrt() < f).sum()) + 1
            elif spec.startswith("sv_cumulative"):
                want = int((S.cumsum(0) / S.sum() < f).sum()) + 1
            else:
                want = int((S >= S[0] / f).sum())
            assert out.modules[key].rank == want, (spec, key)


# ----------------------------------------------------------------------------- merge


def test_merge_exact_sum_and_best_rank(tmp_path):
    a, b = _lora(tmp_path / "a.safetensors", seed=7), _lora(tmp_path / "b.safetensors", seed=8, rank=4, alpha=None)
    la, lb = read_lora(a), read_lora(b)
    res = merge([a, b], tmp_path / "m.safetensors", [0.7, -0.3])
    out = read_lora(res.output)
    for key, m in out.modules.items():
        want = 0.7 * dense(la.modules[key]) - 0.3 * dense(lb.modules[key])
        assert m.rank == 10 and rel(dense(m), want) < 1e-5
    res = merge([a, b], tmp_path / "m4.safetensors", [0.7, -0.3], rank=4)
    for key, m in read_lora(res.output).modules.items():
        want = best_rank(0.7 * dense(la.modules[key]) - 0.3 * dense(lb.modules[key]), 4)
        assert m.rank == 4 and rel(dense(m), want) < 1e-5


def test_merge_across_formats_through_the_base(sdxl_pair, tmp_path):
    src = sdxl_pair["source"]
    kohya, peft = read_lora(sdxl_pair["kohya"]), read_lora(sdxl_pair["peft"])  # transformer / attn modules
    res = merge([sdxl_pair["kohya"], sdxl_pair["peft"]], tmp_path / "m.safetensors", [0.5, 2.0], base=src)
    out = read_lora(res.output)
    assert out.format == "kohya"
    with open_model(src) as model:
        ck, cp, co = (canonical_modules(x.modules, model) for x in (kohya, peft, out))
    assert set(co) == set(ck) | set(cp) and set(cp) <= set(ck)
    for module, m in co.items():
        want = 0.5 * dense(ck[module]) + (2.0 * dense(cp[module]) if module in cp else 0)
        assert rel(dense(m), want) < 2e-3  # float16 output factors
    with pytest.raises(OptionError, match="--base"):
        merge([sdxl_pair["kohya"], sdxl_pair["peft"]], tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# ----------------------------------------------------------------------------- extract


def _dense_diff(base, tuned, module: str) -> torch.Tensor:
    D = tuned.load(module, torch.float64) - base.load(module, torch.float64)
    return D.reshape(D.shape[0], -1)


@pytest.mark.parametrize("backend", ["auto", "randomized", "exact"])
def test_extract_error_within_one_percent_of_optimal(sdxl_pair, tmp_path, backend):
    out = tmp_path / "x.safetensors"
    res = extract(sdxl_pair["source"], sdxl_pair["target"], out, rank=4, backend=backend, save_dtype=torch.float32,
                  layers=r"attn|ff\.net")
    lf = read_lora(out)
    ext = [x for x in res.layers if x.status == "extracted"]
    assert len(ext) == len(lf.modules) >= 20
    with open_model(sdxl_pair["source"]) as b, open_model(sdxl_pair["target"]) as t:
        for x in ext:
            D = _dense_diff(b, t, x.module)
            S = torch.linalg.svdvals(D)
            opt = float((S[4:] ** 2).sum().sqrt())
            err = float((D - dense(lf.modules[x.key])).norm())
            assert err <= 1.01 * opt, (x.module, err / opt)
            assert x.error == pytest.approx(err / float(D.norm()), rel=1e-3)
            assert x.backend == ("randomized" if backend == "randomized" else "svd")
    md = lf.metadata
    assert md["ss_network_dim"] == "4" and md["ss_base_model_version"] == "sdxl_base_v1-0"
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora" and md["prolora.job"] == "extract"
    assert json.loads(md["prolora.extract"])["rank"] == 4


def test_extract_skips_identical_layers_and_chooses_energy_ranks(sdxl_pair, tmp_path):
    tuned = tmp_path / "tuned.safetensors"
    changed = write_tuned(sdxl_pair["source"], tuned, layers=r"attn1\.to_q$")
    assert changed >= 2
    res = extract(sdxl_pair["source"], tuned, tmp_path / "e.safetensors", energy=0.6, save_dtype=torch.float32)
    ext = [x for x in res.layers if x.status == "extracted"]
    assert len(ext) == changed and all(x.module.endswith("attn1.to_q") for x in ext)
    assert sum(x.status == "identical" for x in res.layers) == len(res.layers) - changed - res.summary()["conv_skipped"]
    with open_model(sdxl_pair["source"]) as b, open_model(tuned) as t:
        for x in ext:
            S2 = torch.linalg.svdvals(_dense_diff(b, t, x.module)) ** 2
            want = int((S2.cumsum(0) / S2.sum() < 0.6 - 1e-9).sum()) + 1
            assert x.rank == want


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_difference_blockwise_equals_the_dense_float32_difference(dtype, monkeypatch):
    from prolora.jobs import difference as ex

    monkeypatch.setattr(ex, "_BLOCK_ELEMENTS", 3 * 50)  # blocks of 3 rows: 37 rows end mid-block
    g = torch.Generator().manual_seed(5)
    wb = torch.randn(37, 50, generator=g).to(dtype)
    wt = (wb.float() + 1e-3 * torch.randn(37, 50, generator=g)).to(dtype)
    out = torch.empty(37, 50)
    top = ex._difference(wt, wb, out)
    want = wt.float() - wb.float()
    assert torch.equal(out, want)
    assert top == float(want.abs().max())
    for bad in (math.nan, math.inf):
        wt2 = wt.clone()
        wt2[36, 49] = bad
        got = ex._difference(wt2, wb, out)
        assert (math.isnan(got) if math.isnan(bad) else got == math.inf)


def test_extract_min_diff_clamp_and_conv_rank(sdxl_pair, tmp_path):
    with pytest.raises(NothingTransferredError):
        extract(sdxl_pair["source"], sdxl_pair["target"], tmp_path / "none.safetensors", rank=4, min_diff=1e9)
    assert not (tmp_path / "none.safetensors").exists()
    res = extract(sdxl_pair["source"], sdxl_pair["target"], tmp_path / "c.safetensors", rank=4, conv_rank=2,
                  clamp_quantile=0.9, layers=r"resnets\.0\.conv1|attn2\.to_k")
    lf = read_lora(tmp_path / "c.safetensors")
    convs = [m for m in lf.modules.values() if m.is_conv]
    assert convs and all(m.rank == 2 and m.down.shape[2:] == (3, 3) for m in convs)
    for m in lf.modules.values():
        if m.alpha != m.rank:  # conv modules' up carries r / alpha (one alpha per file)
            continue
        vals = torch.cat([m.up.flatten(), m.down.flatten()]).float().abs()
        # at most ~10% of the values sit at the clamp bound, none above it
        top = float(vals.max())
        assert float((vals >= top * (1 - 1e-3)).float().mean()) >= 0.05
    assert json.loads(lf.metadata["ss_network_args"])["conv_dim"] == "2"
    assert res.summary()["extracted"] == len(lf.modules)


def test_extract_flux_fused_layers_as_kohya_writes_them(tmp_path):
    from prolora.synthetic import write_model

    base = write_model(tmp_path / "base.safetensors", "flux-dev:tiny", layout="single-file", seed=0)
    tuned = write_model(tmp_path / "tuned", "flux-dev:tiny", layout="diffusers", seed=0, base=base)
    out = tmp_path / "flux.safetensors"
    extract(base, tuned, out, rank=3, save_dtype=torch.float32, layers=r"transformer_blocks\.0\.")
    lf = read_lora(out)
    qkv = lf.modules["lora_unet_double_blocks_0_img_attn_qkv"]
    assert qkv.rank == 9  # q, k, v slices block-diagonal (kohya split_qkv form)
    with open_model(base) as b, open_model(tuned) as t:
        canon = canonical_modules(lf.modules, b)
        assert {"transformer.transformer_blocks.0.attn.to_q", "transformer.single_transformer_blocks.0.attn.to_q",
                "transformer.single_transformer_blocks.0.proj_mlp"} <= set(canon)
        for module, m in canon.items():
            D = _dense_diff(b, t, module)
            S = torch.linalg.svdvals(D)
            assert float((D - dense(m)).norm()) <= 1.01 * float((S[3:] ** 2).sum().sqrt()), module


def test_extract_many_reads_each_base_layer_once(sdxl_pair, sd15_pair, tmp_path, monkeypatch):
    from prolora.checkpoints.model import BaseModel

    d = tmp_path / "tuned"
    d.mkdir()
    write_tuned(sdxl_pair["source"], d / "one.safetensors", seed=1, layers="attn1")
    write_tuned(sdxl_pair["source"], d / "two.safetensors", seed=2, layers="attn2")
    (d / "other.safetensors").symlink_to(sd15_pair["target"])  # another family: fails alone
    loads: dict[tuple[str, str], int] = {}
    orig = BaseModel.load

    def counting(self, module, dtype=torch.float32):
        loads[(self.path.name, module)] = loads.get((self.path.name, module), 0) + 1
        return orig(self, module, dtype)

    monkeypatch.setattr(BaseModel, "load", counting)
    res = extract_many(sdxl_pair["source"], d, tmp_path / "out", rank=2, layers="attn")
    assert sorted(r.output.name for r in res.results) == ["one-lora.safetensors", "two-lora.safetensors"]
    assert list(res.failed) == [str(d / "other.safetensors")] and "sd1" in res.failed[str(d / "other.safetensors")]
    base_loads = [n for (f, _), n in loads.items() if f == Path(sdxl_pair["source"]).name]
    assert base_loads and max(base_loads) == 1
    for r in res.results:
        mods = {x.module for x in r.layers if x.status == "extracted"}
        assert mods and all(("attn1" in m) == (r.output.name.startswith("one")) for m in mods)


def test_extract_refuses_mismatched_inputs_before_writing(sdxl_pair, sd15_pair, tmp_path):
    out = tmp_path / "x.safetensors"
    with pytest.raises(ModelError, match="sd1"):
        extract(sdxl_pair["source"], sd15_pair["target"], out, rank=4)
    with pytest.raises(OptionError):
        ExtractOptions(rank=4, energy=0.5)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- CLI


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prolora.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_cli_jobs(sdxl_pair, tmp_path):
    r = run_cli("resize", sdxl_pair["kohya"], "-o", tmp_path / "r.safetensors", "--dynamic", "sv_fro:0.9", "--rank", "3",
                "-q", "--report", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    assert max(m.rank for m in read_lora(tmp_path / "r.safetensors").modules.values()) <= 3
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["rule"] == "sv_fro:0.9,max_rank:3"
    r = run_cli("merge", sdxl_pair["kohya"], sdxl_pair["peft"], "--base", sdxl_pair["source"], "--ratios", "1,0.5",
                "--rank", "4", "--format", "peft", "-o", tmp_path / "m.safetensors")
    assert r.returncode == 0, r.stderr
    assert read_lora(tmp_path / "m.safetensors").format == "peft"
    r = run_cli("extract", sdxl_pair["source"], sdxl_pair["target"], "-o", tmp_path / "e.safetensors", "--rank", "2",
                "--layers", "attn2", "--format", "peft", "-q")
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and read_lora(tmp_path / "e.safetensors").format == "peft"


BAD = [
    ("extract of another family", lambda p, s: ["extract", p["source"], s["target"], "-o", "{out}", "--rank", "4"], "sd1"),
    ("extract of a LoRA", lambda p, s: ["extract", p["source"], p["kohya"], "-o", "{out}", "--rank", "4"], ""),
    ("resize of a checkpoint", lambda p, s: ["resize", p["source"], "-o", "{out}", "--rank", "2"], "LoRA"),
    ("merge of a checkpoint", lambda p, s: ["merge", p["kohya"], p["source"], "-o", "{out}"], ""),
    ("extract without a rank", lambda p, s: ["extract", p["source"], p["target"], "-o", "{out}"], "--rank"),
    ("resize onto its input", lambda p, s: ["resize", p["kohya"], "-o", p["kohya"], "--rank", "2"], "input"),
]


@pytest.mark.parametrize("case,args,expect", BAD, ids=[c for c, _, _ in BAD])
def test_cli_bad_inputs_one_line_exit_2_nothing_written(sdxl_pair, sd15_pair, tmp_path, case, args, expect):
    out = tmp_path / "out" / "x.safetensors"
    out.parent.mkdir()
    before = Path(sdxl_pair["kohya"]).read_bytes()
    r = run_cli(*[str(a).replace("{out}", str(out)) for a in args(sdxl_pair, sd15_pair)])
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prolora: error: ") and expect in lines[0], r.stderr
    assert list(out.parent.iterdir()) == []
    assert Path(sdxl_pair["kohya"]).read_bytes() == before


def test_merge_into_a_checkpoint_adds_the_weighted_sum(sdxl_pair, tmp_path):
    from prolora.jobs.merge import merge_into
    from prolora.safetensors_io import SafetensorsFile

    src = sdxl_pair["source"]
    out = tmp_path / "merged.safetensors"
    res = merge_into([sdxl_pair["kohya"], sdxl_pair["peft"]], src, out, [0.5, 2.0])
    kohya, peft = read_lora(sdxl_pair["kohya"]), read_lora(sdxl_pair["peft"])
    with open_model(src) as b, open_model(out) as m:
        ck, cp = canonical_modules(kohya.modules, b), canonical_modules(peft.modules, b)
        assert set(res.changed) == set(ck) | set(cp)
        for module in list(res.changed)[:40]:
            want = 0.5 * dense(ck[module]) + (2.0 * dense(cp[module]) if module in cp else 0)
            got = (m.load(module, torch.float64) - b.load(module, torch.float64)).flatten(1)
            # float16 checkpoint: W + dW rounds at 2^-11 |W|
            assert float((got - want).norm()) <= 2e-3 * float(b.load(module, torch.float64).norm()), module
    with SafetensorsFile(src) as f, SafetensorsFile(out) as g:
        assert f.keys() == g.keys()
        untouched = next(k for k in f.keys() if "norm" in k)
        assert torch.equal(f.get(untouched), g.get(untouched))
