"""Model families: one package each (`sd`, `flux`, `qwen_image`, `wan`, ...), one registry.

Each package holds all prolora knows of its family: detection, key maps both ways, fused-slice
maps, the block layout matching reads, loader quirks, experts, the synthetic writer and the refine
denoiser builder. Its `FAMILY` record (record.Family) is what the rest of prolora reads; no code
outside this folder names a family. See docs/architecture.md, "Adding a family".
"""
from __future__ import annotations

from .opening import in_memory_model, is_in_memory, looks_like, model_of, open_model
from .record import Family
from .registry import PACKAGES, families, get, members, of, register
from .rules import check_pair, guess_lora, pad_output, related

__all__ = ["Family", "PACKAGES", "check_pair", "families", "get", "guess_lora", "in_memory_model", "is_in_memory",
           "looks_like", "members", "model_of", "of", "open_model", "pad_output", "register", "related"]
