"""Adapter files written by the adapters' own libraries (lycoris-lora, peft) on a tiny SDXL-shaped
UNet, and each module's effective dW as that library applies it in its forward pass (the
reference the tests hold prolora's reading to)."""
from __future__ import annotations

from pathlib import Path

import torch


def unet_of(folder: Path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(Path(folder) / "unet", local_files_only=True)


def _captured_delta(module, x: torch.Tensor) -> torch.Tensor:
    """The delta weight a LyCORIS module's forward hands to its op (F.linear / F.conv2d)."""
    seen: list[torch.Tensor] = []
    op = module.op

    def spy(inp, weight, bias=None, **kw):
        seen.append(weight.detach().clone())
        return op(inp, weight, bias, **kw)

    module.op = spy
    try:
        with torch.no_grad():
            module(x)
    finally:
        module.op = op
    return seen[-1].double()


def _transformer_preset(where: Path) -> str:
    """A LyCORIS preset file: the UNet's transformer blocks only (attention and MLP linears)."""
    p = where / "transformer-preset.toml"
    p.write_text('enable_conv = false\nunet_target_module = ["Transformer2DModel"]\nunet_target_name = []\n'
                 'text_encoder_target_module = []\ntext_encoder_target_name = []\n')
    return str(p)


def write_lycoris(folder: Path, path: Path, algo: str, *, preset: str = "transformer", dim: int = 8, alpha: float = 4.0,
                  seed: int = 0, size: float = 0.05, **kw) -> dict[str, torch.Tensor]:
    """Write a LyCORIS (kohya network module) file of `algo` on the source UNet in `folder`, with
    trained-like random factors; returns {lora_name: (effective dW, the source weight), float64}."""
    from lycoris import kohya

    unet = unet_of(folder)
    if preset == "transformer":
        preset = _transformer_preset(Path(path).parent)
    net = kohya.create_network(1.0, dim, alpha, None, [], unet, algo=algo, preset=preset,
                               conv_dim=max(dim // 2, 2), conv_alpha=alpha / 2, **kw)
    net.apply_to([], unet, apply_text_encoder=False, apply_unet=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("dora_scale"):  # a trained magnitude: the initial norms, moved a little
                p.mul_(1 + size * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if p.dim() == 2 and p.shape[0] <= 16 else 0.2))
            p.copy_(p.half().float())  # what the fp16 file holds, so the reference matches it exactly
    refs = {}
    for lm in net.unet_loras:
        if algo == "full":  # the module holds the whole new weight; its file holds weight - original
            W = lm._org_weight[0].double()
            refs[lm.lora_name] = ((lm.weight.detach().double() - W).half().double(), W)  # as saved (fp16)
            continue
        org = lm.org_module[0]
        if isinstance(org, torch.nn.Linear):
            x = torch.zeros(1, org.in_features)
        else:
            x = torch.zeros(1, org.in_channels, 4, 4)
        refs[lm.lora_name] = (_captured_delta(lm, x), org.weight.detach().double())
    net.save_weights(str(path), torch.float16, {"ss_network_module": "lycoris.kohya"})
    return refs


def write_peft_dora(folder: Path, out_dir: Path, *, rank: int = 4, alpha: float = 8.0, seed: int = 0,
                    size: float = 0.05) -> tuple[Path, dict[str, torch.Tensor]]:
    """A DoRA LoRA made and saved by peft (through diffusers' save_lora_weights) on the source
    UNet's attention projections; returns (file, {peft module name: effective dW float64})."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = unet_of(folder)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, use_dora=True, init_lora_weights="gaussian",
                     target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    unet.add_adapter(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + size * torch.randn(p.shape, generator=g))
            else:
                continue
            p.copy_(p.half().float())
        for name, p in unet.named_parameters():
            if "lora_A" in name:
                p.copy_(p.half().float())
    refs = {}
    unet.eval()
    for name, mod in unet.named_modules():
        if hasattr(mod, "lora_magnitude_vector") and hasattr(mod, "base_layer") and mod.lora_magnitude_vector:
            base = mod.base_layer
            x = torch.eye(base.in_features)
            with torch.no_grad():
                refs[name] = (mod(x) - base(x)).T.double()
    state = get_peft_model_state_dict(unet)
    out_dir.mkdir(parents=True, exist_ok=True)
    StableDiffusionXLPipeline.save_lora_weights(out_dir, unet_lora_layers=state, unet_lora_adapter_metadata=cfg.to_dict())
    return out_dir / "pytorch_lora_weights.safetensors", refs


