"""LoKr, LoHa, LoCon Tucker, full differences and DoRA (formats/adapters.py): each module read as
the dW its own library applies (lycoris-lora's forward, peft's DoRA layer), transferred as a LoRA
whose compression error stays within the bound, and what loaders make of the output."""
from __future__ import annotations

import math

import pytest
import torch

import prolora
from prolora.errors import InvalidLoraError, UnsupportedFormatError
from prolora.families import open_model
from prolora.formats import read_lora
from prolora.formats.adapters import realize_dora
from prolora.formats.lowrank import Conversion, from_dense, kron_lowrank
from prolora.synthetic import write_pair

pytest.importorskip("lycoris")
from adapter_files import unet_of, write_lycoris, write_peft_dora  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
EXACT = Conversion(max_error=0.0)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    src, tgt = write_pair(d / "source", d / "target", "sdxl:tiny", seed=5)
    return {"dir": d, "source": src, "target": tgt}


@pytest.fixture(scope="module")
def files(pair):
    d, src = pair["dir"], pair["source"]
    out = {}
    for name, algo, kw in [("lokr", "lokr", dict(factor=4)), ("loha", "loha", {}),
                           ("lokr_dora", "lokr", dict(factor=4, dora_wd=True))]:
        out[name] = (d / f"{name}.safetensors", write_lycoris(src, d / f"{name}.safetensors", algo, **kw))
    out["peft_dora"] = write_peft_dora(src, d / "peft_dora")
    return out


def _dense(m) -> torch.Tensor:
    return m.scale * (m.up.double().flatten(1) @ m.down.double().flatten(1))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().flatten(1) - b.double().flatten(1)).norm() / b.double().norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------- reading


@pytest.mark.parametrize("algo,kw", [
    ("lokr", dict(factor=4)), ("lokr", dict(factor=8, decompose_both=True)), ("lokr", dict(full_matrix=True)),
    ("loha", {}), ("locon", dict(use_tucker=True, preset="unet-convblock-only")),
    ("lokr", dict(use_tucker=True, factor=4, preset="unet-convblock-only")),
    ("loha", dict(use_tucker=True, preset="unet-convblock-only")), ("loha", dict(preset="unet-convblock-only")),
    ("full", {}), ("locon", dict(dora_wd=True)), ("lokr", dict(factor=4, dora_wd=True, wd_on_output=False)),
], ids=lambda x: x if isinstance(x, str) else ",".join(f"{k}={v}" for k, v in x.items()))
def test_lycoris_modules_read_as_the_library_applies_them(pair, tmp_path, algo, kw):
    refs = write_lycoris(pair["source"], tmp_path / "a.safetensors", algo, **kw)
    lf = read_lora(tmp_path / "a.safetensors", EXACT)
    assert lf.format == "kohya" and set(lf.modules) == set(refs)
    for name, (dW, W) in refs.items():
        m = lf.modules[name]
        if m.needs_base:
            m = realize_dora(m, W, EXACT)
        assert _rel(_dense(m), dW) < 1e-6, (name, m.kind)


@pytest.mark.parametrize("conv", [False, True])
def test_peft_dora_layers_read_as_peft_applies_them(conv):
    """peft's DoraLinearLayer / DoraConv2dLayer (magnitude [out] / [1, out, 1, 1], norm per output row)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    from prolora.formats.readwrite import lora_from_tensors

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3, padding=1) if conv else torch.nn.Linear(8, 6))
    net = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["0"],
                                             init_lora_weights="gaussian"), net)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
            elif "magnitude" in n:
                p.mul_(1 + 0.05 * torch.randn_like(p))
    state = {"unet.x." + k: v for k, v in get_peft_model_state_dict(net).items()}
    lf = lora_from_tensors(state, {"lora_adapter_metadata": '{"unet.r": 2, "unet.lora_alpha": 4}'})
    m = realize_dora(lf.modules["unet.x.0"], net[0].base_layer.weight.detach().double(), EXACT)
    x = torch.randn(2, 4, 5, 5) if conv else torch.randn(3, 8)
    with torch.no_grad():
        want = (net(x) - net[0].base_layer(x)).double()
    W = _dense(m).reshape(net[0].base_layer.weight.shape)
    got = torch.nn.functional.conv2d(x.double(), W, padding=1) if conv else x.double() @ W.T
    assert _rel(got, want) < 1e-5


def test_rank_is_chosen_by_the_bound_or_fixed():
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(4, 4, generator=g), torch.randn(32, 48, generator=g) * torch.logspace(0, -3, 48)
    exact = torch.kron(w1, w2).double() * 0.5
    for bound in (0.1, 0.01, 1e-3):
        up, down, err = kron_lowrank(w1, w2, 0.5, Conversion(bound))
        assert err <= bound and abs(_rel(up.double() @ down.double(), exact) - err) < 1e-5
        up2, down2, err2 = from_dense(exact, Conversion(bound))
        assert up2.shape[1] == up.shape[1]  # the same rank as the dense SVD's
    up, down, err = kron_lowrank(w1, w2, 0.5, Conversion(0.01, rank=7))
    assert up.shape[1] == 7 and err > 0.01


def test_refusals_name_the_kind(tmp_path):
    from safetensors.torch import save_file

    cases = {"IA3": {"lora_unet_a_b.weight": torch.ones(4), "lora_unet_a_b.on_input": torch.ones(1)},
             "OFT/BOFT": {"lora_unet_a_b.oft_blocks": torch.ones(2, 4, 4)},
             "GLoRA": {"lora_unet_a_b.a1.weight": torch.ones(2, 4), "lora_unet_a_b.a2.weight": torch.ones(4, 2)},
             "LyCORIS norm": {"lora_unet_a_norm.w_norm": torch.ones(4)},
             "norm": {"lora_unet_a_norm1.diff": torch.ones(4)}}
    for kind, tensors in cases.items():
        save_file(tensors, tmp_path / "x.safetensors")
        with pytest.raises(UnsupportedFormatError, match=kind) as e:
            read_lora(tmp_path / "x.safetensors")
        assert "\n" not in str(e.value)


def test_hostile_adapter_shapes_are_one_line_errors(tmp_path):
    from safetensors.torch import save_file

    bad = {
        "lokr_w2 missing": {"lora_unet_a.lokr_w1": torch.ones(2, 2), "lora_unet_a.lokr_w2_a": torch.ones(3, 2)},
        "huge kron": {"lora_unet_a.lokr_w1": torch.ones(4096, 4096)[:1, :1].expand(1, 1).clone(),
                      "lora_unet_a.lokr_w2_a": torch.ones(200000, 1), "lora_unet_a.lokr_w2_b": torch.ones(1, 200000)},
        "loha ranks": {f"lora_unet_a.hada_w{i}_{s}": torch.ones(*sh) for i, s, sh in
                       [(1, "a", (4, 2)), (1, "b", (3, 4)), (2, "a", (4, 2)), (2, "b", (2, 4))]},
        "mixed": {"lora_unet_a.hada_w1_a": torch.ones(4, 2), "lora_unet_a.lokr_w1": torch.ones(2, 2)},
        "nan": {"lora_unet_a.diff": torch.full((4, 4), float("nan"))},
        "dora shape": {"lora_unet_a.lora_down.weight": torch.ones(2, 4), "lora_unet_a.lora_up.weight": torch.ones(4, 2),
                       "lora_unet_a.dora_scale": torch.ones(3, 3)},
        "mid": {"lora_unet_a.lora_down.weight": torch.ones(2, 4, 1, 1), "lora_unet_a.lora_up.weight": torch.ones(4, 2, 1, 1),
                "lora_unet_a.lora_mid.weight": torch.ones(3, 2, 3, 3)},
    }
    for what, tensors in bad.items():
        save_file(tensors, tmp_path / "x.safetensors")
        with pytest.raises((InvalidLoraError, UnsupportedFormatError)) as e:
            read_lora(tmp_path / "x.safetensors")
        assert "\n" not in str(e.value) and "x.safetensors" in str(e.value), what


# ----------------------------------------------------------------------------- transfers


def _basis(W: torch.Tensor, k: int):
    U, S, Vh = torch.linalg.svd(W.double().flatten(1), full_matrices=False)
    return U[:, :k], Vh[:k].T


def _project(dW: torch.Tensor, Ws: torch.Tensor, Wt: torch.Tensor, k: int) -> torch.Tensor:
    """The float64 prolora-full projection of a dense dW (docs/method.md): L dW R^T with
    L = Ut Ut^T Us Us^T + (I - Ut Ut^T)(I - Us Us^T), R likewise on the right."""
    (Us, Vs), (Ut, Vt) = _basis(Ws, k), _basis(Wt, k)

    def side(X, Bs, Bt):  # rows of X mapped: X Ps Pt + X Qs Qt
        XP = (X @ Bs) @ Bs.T
        XQ = X - XP
        return (XP @ Bt) @ Bt.T + XQ - (XQ @ Bt) @ Bt.T

    return side(side(dW.double().flatten(1), Vs, Vt).T, Us, Ut).T


def _check_transfer(pair, tmp_path, lora, refs, canonical, **opts):
    out = tmp_path / "out.safetensors"
    res = prolora.transfer(pair["source"], pair["target"], lora, out, method="prolora-full", cache=False, **opts)
    written = read_lora(out)
    errs, num, den = [], 0.0, 0.0
    with open_model(pair["source"]) as src, open_model(pair["target"]) as tgt:
        for r in res.report.layers:
            if not r.transferred:
                continue
            assert r.adapter is not None and r.compression_error <= 0.01 + 1e-9, r
            dW = refs[r.source_key]
            want = _project(dW[0] if isinstance(dW, tuple) else dW, src.load(r.module), tgt.load(r.module), r.k)
            got = _dense(written.modules[r.target_key])
            e = _rel(got, want)
            errs.append(e)
            num += e ** 2 * float(want.norm()) ** 2
            den += float(want.norm()) ** 2
            assert tgt.resolve(r.target_key)[0] == r.module == canonical(r.source_key)
    share = sum(e <= 5e-2 for e in errs) / len(errs)
    assert len(errs) >= 0.5 * len(res.report.layers) and share >= 0.9 and math.sqrt(num / den) <= 2e-2, (
        share, max(errs), math.sqrt(num / den))
    return res


@pytest.mark.parametrize("name", ["lokr", "loha", "lokr_dora", "peft_dora"])
def test_transfer_equals_the_float64_projection_of_the_effective_dw(pair, files, tmp_path, name):
    path, refs = files[name]
    with open_model(pair["source"]) as src:
        if name == "peft_dora":
            refs = {"unet." + k: v for k, v in refs.items()}
        canonical = lambda key: src.resolve(key)[0]  # noqa: E731
        res = _check_transfer(pair, tmp_path, path, refs, canonical)
    s = res.report.summary()
    assert s["adapters"] and s["max_compression_error"] <= 0.01
    assert "adapters written as LoRA" in res.report.table()


def test_fixed_rank_wins_over_the_bound(pair, files, tmp_path):
    res = prolora.transfer(pair["source"], pair["target"], files["loha"][0], tmp_path / "o.safetensors",
                           rank=3, cache=False)
    assert {r.rank_in for r in res.report.layers} == {3}
    assert {m.rank for m in read_lora(tmp_path / "o.safetensors").modules.values()} == {3}


def test_dora_with_cached_source_bases_reads_the_source_weight(pair, files, tmp_path):
    """The second run finds every basis cached; the DoRA modules still need the source weight."""
    cache = tmp_path / "cache"
    outs = []
    for i in range(2):
        res = prolora.transfer(pair["source"], pair["target"], files["peft_dora"][0], tmp_path / f"o{i}.safetensors",
                               cache_dir=str(cache))
        outs.append((tmp_path / f"o{i}.safetensors").read_bytes())
    assert res.report.info["engine"]["cache_hits"] > 0 and outs[0] == outs[1]


def test_commands_without_a_base_refuse_dora(files, tmp_path):
    from prolora.jobs.resize import resize

    dora = files["peft_dora"][0]
    with pytest.raises(UnsupportedFormatError, match="DoRA module .* depends on the base weight"):
        resize(dora, tmp_path / "r.safetensors", 2)
    with pytest.raises(UnsupportedFormatError, match="compare"):
        prolora.compare(dora, dora)
    assert prolora.inspect(files["lokr"][0])["adapters"] == {"lokr": len(files["lokr"][1])}


# ----------------------------------------------------------------------------- clients


@pytest.mark.parametrize("name,fmt", [("lokr", "same"), ("lokr", "peft"), ("peft_dora", "same")])
def test_outputs_load_in_diffusers_with_no_unexpected_keys(pair, files, tmp_path, name, fmt, caplog):
    from diffusers import StableDiffusionXLPipeline  # noqa: F401  (the SDXL LoRA loader)
    from diffusers.loaders.lora_pipeline import StableDiffusionXLLoraLoaderMixin

    out = tmp_path / "o.safetensors"
    prolora.transfer(pair["source"], pair["target"], files[name][0], out, format=fmt, cache=False)
    unet = unet_of(pair["target"])
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    state, alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict(str(out))
    with caplog.at_level("WARNING"):
        StableDiffusionXLLoraLoaderMixin.load_lora_into_unet(state, alphas, unet, adapter_name="x")
    assert not [r for r in caplog.records if "unexpected" in r.getMessage().lower()]
    unet.fuse_lora()
    unet.unload_lora()
    after = unet.state_dict()
    written = read_lora(out)
    with open_model(pair["target"]) as tgt:
        for key, m in written.modules.items():
            module = tgt.resolve(key)[0].removeprefix("unet.")
            dw = after[module + ".weight"].double() - before[module + ".weight"].double()
            assert _rel(dw, _dense(m).reshape(dw.shape)) < 1e-3, key


def test_peft_output_has_scale_one_so_comfyui_reads_it_right(pair, files, tmp_path):
    """ComfyUI ignores lora_adapter_metadata: every module is written with its scale folded into
    up and alpha = its rank, so the factors alone are the dW."""
    from safetensors import safe_open

    out = tmp_path / "o.safetensors"
    prolora.transfer(pair["source"], pair["target"], files["lokr"][0], out, format="peft", cache=False)
    ref = read_lora(out)
    with safe_open(out, "pt") as f:
        for key, m in ref.modules.items():
            up, down = f.get_tensor(key + ".lora_B.weight"), f.get_tensor(key + ".lora_A.weight")
            assert m.scale == 1.0 and _rel(up.double() @ down.double(), _dense(m)) < 1e-6
