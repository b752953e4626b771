"""What diffusers itself does with an SD1.5 / SDXL LoRA file: the client check of the SD tests.

`load_and_fuse(entry, path)` loads `path` with diffusers' own `load_lora_weights` on a pipeline of
the target's saved components (`entry["target"]`, a diffusers folder of zoo models), fuses it, and
compares every weight: the modules diffusers adapted must hold target + dW, with dW computed from
the file alone (its tensors, kohya `.alpha` keys or `lora_adapter_metadata`); every other weight
must be untouched. `check_with_diffusers` also fails when a module of the file was ignored.
Used by tests/clients/ and tests/families/ (`from client_sd import check_with_diffusers, ...`).
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
from zoo import canon, module_name, peft_value, read_tensors

from prolora.families import open_model

ADAPTER = "prolora_out"


def quiet():
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()


def perturbed(st: dict[str, dict[str, torch.Tensor]], size: float = 0.07, seed: int = 11):
    """A fine-tune-like target: every weight matrix/kernel W + size * ||W|| * unit(low-rank drift
    (80% of the energy) + dense noise (20%)); biases and norms get a small relative jitter."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for comp, sd in st.items():
        new = {}
        for k, w in sd.items():
            if w.dim() >= 2:
                m, n = w.shape[0], w[0].numel()
                r = max(1, min(m, n) // 16)
                drift = torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g)
                noise = torch.randn(m, n, generator=g)
                d = math.sqrt(0.8) * drift / drift.norm() + math.sqrt(0.2) * noise / noise.norm()
                new[k] = w + (size * w.norm() * d / d.norm()).reshape(w.shape)
            elif w.is_floating_point() and w.numel() > 0:
                new[k] = w + 0.02 * w.abs().mean() * torch.randn(w.shape, generator=g)
            else:
                new[k] = w.clone()
        out[comp] = new
    return out


def pipeline(entry):
    """A real pipeline of the target's saved components (loaded back from its folder), without
    tokenizers (none are needed to load or fuse LoRAs) and with a tiny VAE."""
    import transformers
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

    folder = entry["target"]
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True)
    te = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4, sample_size=32)
    scheduler = EulerDiscreteScheduler(steps_offset=1)
    if entry["kind"] == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        te2 = transformers.CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2",
                                                                       local_files_only=True)
        return StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=None,
                                         tokenizer_2=None, unet=unet, scheduler=scheduler, add_watermarker=False)
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=None, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


# ----------------------------------------------------------------------------- our output, read independently


def output_deltas(path: Path, target: Path, models: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """{canonical module id: dW (float64, the weight's shape)} of an output file, from its tensors,
    its kohya `.alpha` keys or its `lora_adapter_metadata` (peft's pattern rule), nothing else of
    prolora's but the key -> module lookup of the target (which diffusers then cross-checks)."""
    tensors, meta = read_tensors(path)
    configs: dict[str, dict] = {}
    for k, v in json.loads(meta.get("lora_adapter_metadata", "{}")).items():
        comp, _, field = k.rpartition(".")
        configs.setdefault(comp, {})[field] = v
    deltas = {}
    with open_model(target) as tm:
        for key in tensors:
            if key.endswith(".lora_down.weight"):
                stem, down, up = key[: -len(".lora_down.weight")], tensors[key], tensors[key.replace("_down.", "_up.")]
                alpha = tensors.get(stem + ".alpha")
                scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
            elif key.endswith(".lora_A.weight"):
                stem, down, up = key[: -len(".lora_A.weight")], tensors[key], tensors[key.replace("lora_A", "lora_B")]
                comp, _, rel = stem.partition(".")
                name = module_name(models[comp], rel)
                cfg = configs[comp]
                r = peft_value(cfg, "r", "rank_pattern", name)
                assert r == down.shape[0], stem
                scale = peft_value(cfg, "lora_alpha", "alpha_pattern", name) / r
            else:
                continue
            module = tm.resolve(stem)[0]
            shape = tm.weights[module].shape
            dw = scale * (up.double().flatten(1) @ down.double().flatten(1))
            deltas[module] = dw.reshape(shape)
    return deltas


# ----------------------------------------------------------------------------- the check


class IgnoredByDiffusers(AssertionError):
    """diffusers loaded without error but attached no LoRA to some modules of the file."""


class MisappliedByDiffusers(AssertionError):
    """diffusers attached a LoRA whose delta (scaling * B @ A) is not the file's scale * up @ down."""


class RefusedByDiffusers(AssertionError):
    """diffusers raised while loading the file."""


def load_and_fuse(entry, path: Path) -> dict:
    """Load `path` with diffusers on the target's pipeline, fuse, unload the wrappers, and compare
    every weight: modules diffusers adapted must hold target + dW (dW from the file), all other
    weights must be bit-identical to the target. Returns what was adapted and what was ignored."""
    pipe = pipeline(entry)
    models = {c: getattr(pipe, c) for c in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, c, None)}
    before = {c: {k: v.detach().clone() for k, v in m.state_dict().items()} for c, m in models.items()}
    deltas = output_deltas(path, entry["target"], models)
    assert deltas, path

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        pipe.load_lora_weights(str(path), adapter_name=ADAPTER)

    adapted = {}
    for comp, m in models.items():
        for name, layer in m.named_modules():
            if hasattr(layer, "lora_A") and ADAPTER in layer.lora_A:
                adapted[f"{comp}.{canon(name) if comp != 'unet' else name}"] = layer
    assert set(adapted) <= set(deltas), sorted(set(adapted) - set(deltas))[:5]  # nothing we did not write
    # the live peft layers hold the delta we meant (scaling * B @ A)
    for module, layer in adapted.items():
        a, b = layer.lora_A[ADAPTER].weight.detach(), layer.lora_B[ADAPTER].weight.detach()
        live = layer.scaling[ADAPTER] * (b.double().flatten(1) @ a.double().flatten(1))
        want = deltas[module].flatten(1)
        if not torch.allclose(live, want, rtol=0, atol=1e-6 * float(want.abs().max())):
            raise MisappliedByDiffusers(f"{module}: diffusers' delta is {float(live.norm() / want.norm()):.4g} "
                                        "times the file's")

    pipe.fuse_lora(components=list(models), lora_scale=1.0)
    pipe.unload_lora_weights()  # fused weights stay; the peft wrappers go

    worst, changed = 0.0, set()
    for comp, m in models.items():
        after = m.state_dict()
        assert set(after) == set(before[comp]), comp
        for k, w0 in before[comp].items():
            w1 = after[k]
            assert w1.dtype == w0.dtype and w1.shape == w0.shape, k
            module = f"{comp}.{canon(k)[: -len('.weight')]}" if k.endswith(".weight") else None
            if module in adapted:
                dw = deltas[module]
                # fused (float32) vs target + dW (float64): W + dW rounds at ~1e-7 * |W|;
                # a zero-delta module (added for diffusers' key mapping) must leave W as it was
                scale = dw.norm() if dw.norm() > 0 else w0.double().norm()
                err = float((w1.double() - (w0.double() + dw)).norm() / scale)
                worst = max(worst, err)
                assert err < 1e-5, (module, err)
                changed.add(module)
            else:
                assert torch.equal(w1, w0), k
    assert changed == set(adapted)
    return {"modules": len(deltas), "adapted": set(adapted), "ignored": set(deltas) - set(adapted),
            "worst_rel_err": worst}


def check_with_diffusers(entry, path: Path) -> dict:
    """load_and_fuse, and no module of the file may be ignored."""
    got = load_and_fuse(entry, path)
    if got["ignored"]:
        raise IgnoredByDiffusers(f"diffusers ignored {len(got['ignored'])} of {got['modules']} modules, "
                                 f"e.g. {sorted(got['ignored'])[:3]}")
    return got
