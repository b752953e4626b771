"""The client test: what diffusers itself does with the LoRAs prolora writes.

For tiny REAL SD1.5- and SDXL-shaped models (diffusers UNet2DConditionModel + transformers CLIP
text encoders, random weights) a SOURCE and a TARGET (the source plus a fine-tune-like change)
are saved as diffusers pipeline folders (and the SDXL source also as a single SGM file). LoRAs on
the source, in kohya and PEFT format, are transferred to the target with prolora.transfer; the
OUTPUT is loaded with diffusers' own `load_lora_weights` on a pipeline built from the target's
components and fused with `fuse_lora`. For every module of our output, diffusers' fused weight
must equal the target weight + dW, with dW = scale * up @ down computed here from the output file
alone; every other weight must be untouched, and no module of the output may be ignored.

The other tests pin down diffusers' (0.42) handling of text-encoder LoRAs with incomplete attention
sets (kohya: no out_proj in an encoder; peft: only MLP modules in an encoder), and check that a
transfer whose similarity gate drops those modules still loads completely (prolora adds a
zero-delta module), and that alpha="rank" on a mixed-rank kohya LoRA is applied exactly.
The check itself (load, fuse, compare) is tests/client_sd.py's. Run time ~25 s on 2 busy cores (the
transfers run single-threaded, see `one_thread`).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from client_sd import ADAPTER, check_with_diffusers, load_and_fuse, perturbed, pipeline, quiet  # noqa: E402
from zoo import build, canon, load_state, read_tensors, save_pipeline, state, write_single_file  # noqa: E402

import prolora  # noqa: E402
from prolora.synthetic import write_lora as write_synthetic_lora  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# ----------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """{kind: {"source": folder, "target": folder, "target_state": state dicts, and the SDXL source /
    the SD1.5 target also as a single file ("source_single" / "target_single")}}."""
    quiet()
    root = tmp_path_factory.mktemp("client")
    out = {}
    for kind, seed in (("sdxl", 5), ("sd15", 6)):
        d = root / kind
        src_mods = build(kind, seed)
        src = state(src_mods)
        tgt = perturbed(src, seed=seed + 100)
        entry = {"kind": kind, "dir": d, "source": save_pipeline(src_mods, d / "source"),
                 "target": save_pipeline(load_state(kind, tgt), d / "target"), "target_state": tgt}
        if kind == "sdxl":  # SGM single file, OpenCLIP text_encoder_2
            entry["source_single"] = write_single_file(src, d / "source.safetensors")
        else:  # LDM single file
            entry["target_single"] = write_single_file(tgt, d / "target.safetensors")
        out[kind] = entry
    return out


# ----------------------------------------------------------------------------- LoRAs and transfers


def _loras(entry) -> dict[str, Path]:
    d, src = entry["dir"], entry["source"]
    if "loras" not in entry:
        entry["loras"] = {
            # kohya (SDXL: SGM names + lora_te1_/lora_te2_; SD1.5: diffusers names + lora_te_) on every
            # transformer linear (SD1.5: proj_in/proj_out are 1x1 convs) and text-encoder q,k,v,out,fc1,fc2
            "kohya": write_synthetic_lora(src, d / "kohya.safetensors", format="kohya", rank=4,
                                          targets="transformer", seed=1),
            "peft": write_synthetic_lora(src, d / "peft.safetensors", format="peft", rank=4,
                                         targets="transformer", seed=2),
        }
        if entry["kind"] == "sdxl":
            # also resnets (3x3 convs, time_emb_proj, shortcuts), samplers, conv_in/out, time/label embeddings
            entry["loras"]["kohya_conv"] = write_synthetic_lora(src, d / "kohya_conv.safetensors", format="kohya",
                                                                rank=4, targets="all", conv=True, seed=3)
    return entry["loras"]


# (family, LoRA, transfer options, which inputs are single files)
CASES = [
    ("sdxl", "kohya", {}, "source"),
    ("sdxl", "kohya", {"method": "prolora", "rank": "2r"}, "source"),
    ("sdxl", "peft", {}, ""),
    ("sdxl", "peft", {"method": "prolora", "rank": "2r"}, ""),
    ("sdxl", "kohya_conv", {}, ""),
    ("sd15", "kohya", {}, "target"),
    ("sd15", "kohya", {"method": "prolora", "rank": "2r"}, ""),
    ("sd15", "peft", {"method": "prolora", "rank": "2r"}, "target"),
    ("sd15", "peft", {}, ""),
]


@pytest.mark.parametrize("kind,fmt,options,single", CASES,
                         ids=[f"{k}-{f}-{o.get('method', 'default')}{'-single-' + s if s else ''}"
                              for k, f, o, s in CASES])
def test_diffusers_fuses_exactly_our_transferred_lora(pairs, tmp_path, kind, fmt, options, single):
    entry = pairs[kind]
    lora = _loras(entry)[fmt]
    source = entry[f"{single}_single"] if single == "source" else entry["source"]
    target = entry[f"{single}_single"] if single == "target" else entry["target"]
    out = tmp_path / f"{kind}_{fmt}.safetensors"
    res = prolora.transfer(source, target, lora, out, **options)
    s = res.report.summary()
    assert s["transferred"] == s["layers"] > 100  # the gate keeps every layer of this close pair
    if options.get("rank") == "2r":
        assert {r.rank_out for r in res.report.layers} == {8}  # a real rank change, alpha kept at 2
    got = check_with_diffusers(entry, out)
    assert got["modules"] == s["transferred"]
    assert got["worst_rel_err"] < 1e-5


# ----------------------------------------------------------------------------- incomplete text-encoder sets
#
# diffusers 0.42, `_load_lora_into_text_encoder` (loaders/lora_base.py), for each text encoder
# separately: its keys, as `lora_state_dict` left them (kohya, via `_convert_text_encoder_lora_key`:
# q/k/v/out_proj -> `self_attn.to_{q,k,v,out}_lora.{down,up}.weight`, fc1/fc2 ->
# `mlp.fcN.lora_linear_layer.{down,up}.weight`; peft: unchanged `.lora_A/.lora_B`), pass through two
# converters of utils/state_dict_utils.py that each choose ONE mapping for the whole encoder:
#   `convert_state_dict_to_diffusers`: any `to_out_lora` key -> old-diffusers mapping; else any
#       `.lora_A.weight` -> peft mapping (q/k/v/out_proj -> `lora_linear_layer`, fc1/fc2 unchanged);
#       else any `lora_linear_layer` -> unchanged; else ValueError("Could not automatically infer
#       state dict type");
#   `convert_state_dict_to_peft`: any `to_out_lora` -> old-diffusers mapping (converts everything);
#       else any `lora_linear_layer` -> new-diffusers mapping, which has no entry for `to_q_lora`...:
#       those keys stay as they are, transformers' `load_adapter` lists them as UNEXPECTED in its load
#       report (a log message among many MISSING lines) and drops them; else the same ValueError.
# So a kohya encoder needs one out_proj module somewhere for its q/k/v to load, and a peft encoder
# needs one attention projection somewhere for its fc1/fc2 to load. The UNet path is not affected.

_T1, _T2 = "lora_te1_text_model_encoder_layers", "lora_te2_text_model_encoder_layers"
_UNET_Q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"  # a UNet attention without to_out
_DIMS = {"q": (0, 0), "k": (0, 0), "v": (0, 0), "out": (0, 0), "fc1": (1, 0), "fc2": (0, 1)}


def _te_key(prefix: str, layer: int, part: str) -> str:
    return f"{prefix}_{layer}_{'mlp_' + part if part.startswith('fc') else 'self_attn_' + part + '_proj'}"


def _write_kohya(path: Path, modules: list[tuple[str, int, int]], seed: int = 0) -> Path:
    """A kohya file built by hand: (key, out, in) per module, rank 4, alpha 2 everywhere."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, out, inp in modules:
        tensors[f"{key}.lora_down.weight"] = torch.randn(4, inp, generator=g) / inp ** 0.5
        tensors[f"{key}.lora_up.weight"] = 0.1 * torch.randn(out, 4, generator=g)
        tensors[f"{key}.alpha"] = torch.tensor(2.0)
    save_file(tensors, str(path))
    return path


def _te_modules(prefix: str, hidden: int, layers: dict[int, str]) -> list[tuple[str, int, int]]:
    """{layer: 'q k v out fc1 fc2' subset} -> kohya (key, out, in) for a CLIP of this width."""
    sizes = {0: hidden, 1: 2 * hidden}  # zoo's CLIPs: intermediate = 2 * hidden
    return [(_te_key(prefix, i, p), sizes[_DIMS[p][0]], sizes[_DIMS[p][1]]) for i, parts in layers.items()
            for p in parts.split()]


def _names(prefix: str, layers: dict[int, str]) -> set[str]:
    comp = {_T1: "text_encoder", _T2: "text_encoder_2"}[prefix]
    out = set()
    for i, parts in layers.items():
        for p in parts.split():
            where = f"mlp.{p}" if p.startswith("fc") else f"self_attn.{p}_proj"
            out.add(f"{comp}.text_model.encoder.layers.{i}.{where}")
    return out


def test_diffusers_kohya_te_attention_needs_an_out_proj_somewhere_in_the_encoder(pairs, tmp_path):
    """A layer without out_proj is fine as long as ANOTHER layer of the same encoder has one."""
    te1 = {0: "q k v", 1: "q k v out fc1"}
    te2 = {0: "q v", 2: "k out"}
    path = _write_kohya(tmp_path / "partial.safetensors",
                        [(_UNET_Q, 64, 64)] + _te_modules(_T1, 32, te1) + _te_modules(_T2, 64, te2))
    got = check_with_diffusers(pairs["sdxl"], path)
    assert got["adapted"] == _names(_T1, te1) | _names(_T2, te2) | {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"}


def test_diffusers_silently_drops_kohya_te_qkv_when_the_encoder_has_no_out_proj(pairs, tmp_path):
    """No out_proj anywhere in text_encoder but an MLP module: every q/k/v of that encoder is dropped
    without an error; its MLP modules, the other encoder and the UNet load normally."""
    te1 = {0: "q k v fc1", 1: "q k v fc2"}
    te2 = {0: "q k v out"}
    path = _write_kohya(tmp_path / "no_out.safetensors",
                        [(_UNET_Q, 64, 64)] + _te_modules(_T1, 32, te1) + _te_modules(_T2, 64, te2))
    got = load_and_fuse(pairs["sdxl"], path)  # no exception
    assert got["ignored"] == _names(_T1, {0: "q k v", 1: "q k v"})
    assert got["adapted"] == _names(_T1, {0: "fc1", 1: "fc2"}) | _names(_T2, te2) | {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"}
    # the same modules with one out_proj added anywhere in that encoder load completely
    fixed = _write_kohya(tmp_path / "with_out.safetensors",
                         [(_UNET_Q, 64, 64)] + _te_modules(_T1, 32, {**te1, 1: "q k v fc2 out"})
                         + _te_modules(_T2, 64, te2))
    assert not load_and_fuse(pairs["sdxl"], fixed)["ignored"]


def test_diffusers_refuses_kohya_te_qkv_without_out_proj_and_mlp_after_loading_the_unet(pairs, tmp_path):
    """q/k/v only (no out_proj, no MLP) in one encoder: load_lora_weights raises (from
    convert_state_dict_to_diffusers) after the UNet, loaded first, got its adapter: the pipeline is
    left half-loaded."""
    path = _write_kohya(tmp_path / "qkv.safetensors", [(_UNET_Q, 64, 64)] + _te_modules(_T1, 32, {0: "q k v"}))
    pipe = pipeline(pairs["sdxl"])
    with pytest.raises(ValueError, match="Could not automatically infer state dict type"):
        pipe.load_lora_weights(str(path), adapter_name=ADAPTER)
    q = pipe.unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    assert ADAPTER in q.lora_A
    assert not any(hasattr(m, "lora_A") for m in pipe.text_encoder.modules())


def test_diffusers_refuses_peft_text_encoder_with_only_mlp_modules(pairs, tmp_path):
    """The peft analogue: an encoder whose LoRA has fc1/fc2 but no q/k/v/out_proj cannot load
    (ValueError from convert_state_dict_to_peft); one attention module anywhere in it fixes that."""
    from safetensors.torch import save_file

    def write(path, te_modules):
        g = torch.Generator().manual_seed(0)
        tensors = {}
        for name, out, inp in te_modules:
            tensors[f"text_encoder.{name}.lora_A.weight"] = torch.randn(4, inp, generator=g) / inp ** 0.5
            tensors[f"text_encoder.{name}.lora_B.weight"] = 0.1 * torch.randn(out, 4, generator=g)
        meta = {"text_encoder.r": 4, "text_encoder.lora_alpha": 2,
                "text_encoder.target_modules": sorted(n.removeprefix("text_model.") for n, _, _ in te_modules)}
        save_file(tensors, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
        return path

    mlp = [("text_model.encoder.layers.0.mlp.fc1", 64, 32), ("text_model.encoder.layers.1.mlp.fc2", 32, 64)]
    with pytest.raises(ValueError, match="Could not automatically infer state dict type"):
        load_and_fuse(pairs["sd15"], write(tmp_path / "mlp_only.safetensors", mlp))
    both = write(tmp_path / "mlp_q.safetensors", mlp + [("text_model.encoder.layers.1.self_attn.q_proj", 32, 32)])
    assert not load_and_fuse(pairs["sd15"], both)["ignored"]


# ----------------------------------------------------------------------------- the gate produces such files


def _reverse_spectra(st, pattern: str):
    """A copy of a state where the weights matching `pattern` keep their singular vectors but get
    their spectrum reversed: the top-k subspaces swap with the bottom ones (phi <= max(0, 2k-m)/k)."""
    out = {c: dict(sd) for c, sd in st.items()}
    for comp, sd in out.items():
        for k, w in sd.items():
            if re.search(pattern, f"{comp}.{canon(k)}"):
                U, S, Vh = torch.linalg.svd(w.double(), full_matrices=False)
                sd[k] = (U @ torch.diag(S.flip(0)) @ Vh).float()
    return out


@pytest.mark.parametrize("fmt,pattern", [
    ("kohya", r"^text_encoder\.text_model\.encoder\.layers\.\d+\.self_attn\.out_proj\.weight$"),
    ("peft", r"^text_encoder\.text_model\.encoder\.layers\.\d+\.self_attn\.(q|k|v|out)_proj\.weight$"),
], ids=["kohya-all-te1-out_proj-gated", "peft-all-te1-attention-gated"])
def test_gate_output_loads_completely_in_diffusers(pairs, tmp_path, fmt, pattern):
    """A target whose text_encoder out_proj (kohya case) or q/k/v/out_proj (peft case) weights were
    reshaped, so that the default gate (tau 0.8) drops exactly those modules, every layer of them.
    Without help diffusers would drop the encoder's q/k/v (kohya) or refuse the file (peft); the
    transfer adds one zero-delta module so that it loads everything, and says so."""
    entry = pairs["sdxl"]
    tgt = _reverse_spectra(entry["target_state"], pattern)
    variant = dict(entry, target=save_pipeline(load_state("sdxl", tgt), tmp_path / "target"))
    out = tmp_path / "out.safetensors"
    res = prolora.transfer(entry["source"], variant["target"], _loras(entry)[fmt], out)
    by_module = {r.module: r for r in res.report.layers}
    gated = {m for m, r in by_module.items() if not r.transferred}
    # precondition: the gate dropped exactly the reshaped modules, and kept the rest of that encoder
    assert gated == {m for m in by_module if re.search(pattern, m + ".weight")} and gated
    kept_te1 = {m for m, r in by_module.items() if m.startswith("text_encoder.") and r.transferred}
    assert kept_te1
    assert any("zero-delta" in w for w in res.report.warnings)
    got = load_and_fuse(variant, out)
    assert not got["ignored"]


# ----------------------------------------------------------------------------- alpha="rank" and mixed ranks


# peft says why: "alpha_pattern keys did not match any targeted module and were ignored:
# ['down_blocks.1...attn1.processor.to_q_lora...', 'text_model.encoder.layers.0.self_attn']"
@pytest.mark.filterwarnings("ignore:The following alpha_pattern keys did not match:RuntimeWarning")
def test_alpha_rank_output_of_a_mixed_rank_kohya_lora_is_applied_exactly(pairs, tmp_path):
    """A kohya LoRA with mixed ranks (4 and 8) and one alpha loads exactly in diffusers (checked
    first). Written naively with alpha = rank per module, its alphas would be 4 and 8 within a component, and
    diffusers' `_create_lora_config` (most common alpha as lora_alpha + an alpha_pattern whose keys
    miss attention modules) would give the rank-4 modules alpha 8: twice the delta. So alpha="rank"
    writes one alpha (the largest output rank) and folds each module's scale into its up."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    a = "lora_unet_input_blocks_4_1_transformer_blocks_0"
    mods = [(f"{a}_attn1_to_q", 64, 64, 4), (f"{a}_attn1_to_k", 64, 64, 8), (f"{a}_attn1_to_v", 64, 64, 8),
            (f"{a}_ff_net_2", 64, 256, 8), (_te_key(_T1, 0, "q"), 32, 32, 4), (_te_key(_T1, 0, "out"), 32, 32, 8),
            (_te_key(_T1, 0, "fc1"), 64, 32, 8)]
    tensors = {}
    for key, out, inp, r in mods:
        tensors[f"{key}.lora_down.weight"] = torch.randn(r, inp, generator=g) / inp ** 0.5
        tensors[f"{key}.lora_up.weight"] = 0.1 * torch.randn(out, r, generator=g)
        tensors[f"{key}.alpha"] = torch.tensor(2.0)
    lora = tmp_path / "mixed.safetensors"
    save_file(tensors, str(lora))
    entry = pairs["sdxl"]
    check_with_diffusers(entry, lora)  # the input is fine

    out = tmp_path / "out.safetensors"
    prolora.transfer(entry["source"], entry["target"], lora, out, alpha="rank")
    written, _ = read_tensors(out)
    assert {float(v) for k, v in written.items() if k.endswith(".alpha")} == {8.0}
    check_with_diffusers(entry, out)
