"""LoRA factors hooked into a diffusers denoiser, switched on and off without touching its weights.

One denoiser serves both sides of a difference: S and S+L are the same model with the adapter
off and on, T and T+L' likewise, so only the two base models are resident.

The trained parameters are the LoRA file's own factors (one `down` and one `up` per file module,
float32), not a re-factorisation: a module that adapts a fused weight (Flux's kohya/ComfyUI
`img_attn_qkv`, `linear1`) feeds several diffusers modules (to_q, to_k, to_v, proj_mlp), each with
its rows of `up` and the columns of `up` that are non-zero there, against the shared `down`.
Entries outside those blocks get no gradient and stay exactly as they were (zero in kohya's
block-diagonal split_qkv form), so the refined file has the transfer's keys, shapes and ranks by
construction. peft's adapters cannot share one `down` across modules, hence forward hooks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import BaseModel
from ..errors import LoraMismatchError
from ..formats.parts import _take
from ..lora import LoraFile, LoraModule

Rows = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Placement:
    """Where one file module acts in the denoiser: the module path, the rows of `up` that are
    that module's output rows (None: all) and the columns of `up` used there (None: all)."""

    module: str
    rows: Rows | None = None
    cols: tuple[int, ...] | None = None


def _rows(t: torch.Tensor, rows: Rows | None) -> torch.Tensor:
    """The rows `rows` of t (None: all), as formats.parts cuts a fused module's up."""
    return t if rows is None else _take(t, rows)


def place(lf: LoraFile, base: BaseModel, component: str, role: str) -> tuple[dict[str, list[Placement]], list[str]]:
    """({file module key: placements in the denoiser}, keys of other components (text encoders),
    which the refinement leaves as they are). A key the model does not know is refused, naming
    it: `role` says which model ("source", "target") the LoRA was expected to fit."""
    out: dict[str, list[Placement]] = {}
    others: list[str] = []
    prefix = component + "."
    for key, m in lf.modules.items():
        if m.bias is not None:
            raise LoraMismatchError(f"{lf.path or 'LoRA'}: module '{key}' carries a lora_B bias, which refinement "
                                    "does not train; refine a LoRA without biases")
        hit = base.resolve(key)
        if hit is not None:
            if hit[0].startswith(prefix):
                out[key] = [Placement(hit[0][len(prefix):])]
            else:
                others.append(key)
            continue
        fused = base.resolve_fused(key)
        if fused is None or m.out_features != fused.rows:
            raise LoraMismatchError(f"{lf.path or 'LoRA'}: module '{key}' has no counterpart in the {role} model "
                                    f"{base.name}; is the LoRA for this model?")
        parts = []
        for s in fused.slices:
            up = _rows(m.up.reshape(m.up.shape[0], m.rank), s.rows)
            used = (up != 0).any(dim=0)
            if not bool(used.any()):
                continue  # this slice is zero: nothing acts there
            cols = None if bool(used.all()) else tuple(int(i) for i in torch.nonzero(used).flatten())
            if not s.module.startswith(prefix):
                raise LoraMismatchError(f"{lf.path or 'LoRA'}: fused module '{key}' reaches outside the {component}")
            parts.append(Placement(s.module[len(prefix):], s.rows, cols))
        out[key] = parts
    return out, others


class Adapter(nn.Module):
    """LoRA factors attached to a denoiser by forward hooks; `enabled` switches them on and off."""

    def __init__(self, model: nn.Module, modules: dict[str, LoraModule], placements: dict[str, list[Placement]],
                 device: torch.device | str, trainable: bool) -> None:
        super().__init__()
        self.enabled = False
        self.keys = list(placements)
        self.scales = {k: modules[k].scale for k in self.keys}
        self.down = nn.ParameterList([nn.Parameter(modules[k].down.detach().to(device, torch.float32).clone(),
                                                   requires_grad=trainable) for k in self.keys])
        self.up = nn.ParameterList([nn.Parameter(modules[k].up.detach().to(device, torch.float32).clone(),
                                                 requires_grad=trainable) for k in self.keys])
        self._handles = []
        by_module: dict[str, list[tuple[int, Placement]]] = {}
        for i, k in enumerate(self.keys):
            for p in placements[k]:
                by_module.setdefault(p.module, []).append((i, p))
        for path, items in by_module.items():
            try:
                target = model.get_submodule(path)
            except AttributeError:
                raise LoraMismatchError(f"the denoiser has no module '{path}'") from None
            if not isinstance(target, (nn.Linear, nn.Conv2d)):
                raise LoraMismatchError(f"'{path}' is a {type(target).__name__}, not a linear or conv layer")
            self._handles.append(target.register_forward_hook(self._hook(target, items)))

    def _hook(self, layer: nn.Module, items: list[tuple[int, Placement]]):
        conv = isinstance(layer, nn.Conv2d)

        def hook(_mod, args, out):
            if not self.enabled:
                return out
            x = args[0].to(torch.float32)
            delta = None
            for i, p in items:
                down, up = self.down[i], self.up[i]
                r = down.shape[0]
                up = _rows(up.reshape(up.shape[0], r), p.rows)
                down = down.reshape(r, -1)
                if p.cols is not None:
                    idx = torch.tensor(p.cols, device=down.device)
                    up, down = up[:, idx], down[idx]
                if conv:
                    h = F.conv2d(x, down.reshape(len(down), *layer.weight.shape[1:]), None, layer.stride, layer.padding,
                                 layer.dilation)
                    d = F.conv2d(h, up.reshape(*up.shape, 1, 1))
                else:
                    d = F.linear(F.linear(x, down), up)
                d = d * self.scales[self.keys[i]]
                delta = d if delta is None else delta + d
            return out + delta.to(out.dtype)
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{file module key: (down, up)} as float32 CPU tensors, in the file's shapes."""
        return {k: (d.detach().cpu(), u.detach().cpu()) for k, d, u in zip(self.keys, self.down, self.up)}
