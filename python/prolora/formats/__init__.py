"""LoRA file formats: read any supported file into one canonical LoraFile, write it back in any
format, and summarize it. Formats: kohya, peft (diffusers), diffusers-old, comfy, xlabs (Flux)."""
from __future__ import annotations

from .detect import classify, detect_format
from .readwrite import read_lora, write_lora
from .summary import component_of, guess_family, summarize

__all__ = ["read_lora", "write_lora", "summarize", "detect_format", "classify", "component_of", "guess_family"]
