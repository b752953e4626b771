"""Ready-made inputs: a source and its TARGET in one call (the fixtures' and benchmarks' pairs),
and the demo folder `prolora demo` transfers."""
from __future__ import annotations

import os
from pathlib import Path

from .configs import ConfigLike, default_preset
from .loras import write_lora
from .models import write_model


def write_pair(source: str | os.PathLike, target: str | os.PathLike, cfg: ConfigLike | None = None, seed: int = 0,
               **kw) -> tuple[Path, Path]:
    """Write a source model and a TARGET made from it (same config and seed, each weight plus a
    fine-tune-like perturbation); returns (source, target). `cfg` None: the default preset
    ("sdxl:tiny").

    The layout follows each path: a name ending in `.safetensors` is one single file, anything
    else a diffusers pipeline folder. `kw` (dtype, perturbation, threads, shard_bytes) goes to
    both write_model calls, perturbation only matters for the target.
    """
    src = write_model(source, cfg, layout=_layout(source), seed=seed, **kw)
    tgt = write_model(target, cfg, layout=_layout(target), seed=seed, base=src, **kw)
    return src, tgt


def _layout(path: str | os.PathLike) -> str:
    return "single-file" if str(path).endswith(".safetensors") else "diffusers"


def make_demo(folder: str | os.PathLike) -> dict[str, Path]:
    """The default preset's pair (a tiny SDXL-shaped source as one single file and its target, the
    source plus a fine-tune-like perturbation, as a diffusers folder) and a kohya LoRA on all
    transformer linears of the source."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = default_preset()
    tag = cfg.replace(":", "_")
    source, target = write_pair(folder / f"source_{tag}.safetensors", folder / f"target_{tag}", cfg)
    lora = write_lora(source, folder / "lora_kohya.safetensors", format="kohya", rank=4, targets="transformer")
    return {"source": source, "target": target, "lora": lora}
