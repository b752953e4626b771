"""What the benchmark builds and how long it trains: the targets and the run's sizes (Config)."""
from __future__ import annotations

from dataclasses import dataclass

# target model -> what it is
TARGETS = {
    "finetune": "target 1: full fine-tune of the source on shifted data (another palette)",
    "finetune-mix": "target 1b: full fine-tune of the source on half shifted, half source-like data",
    "pruned": "target 2: fewer transformer blocks (pruned from the source, distilled)",
}


@dataclass(frozen=True)
class Config:
    """Training lengths and evaluation sizes (the full run's defaults; `quick` shrinks them)."""

    source_steps: int = 1500
    finetune_steps: int = 500
    distill_steps: int = 400
    lora_steps: int = 400
    lora_rank: int = 8
    classifier_steps: int = 400
    n_func: int = 256
    n_samples: int = 96
    sample_steps: int = 20

    @classmethod
    def quick(cls) -> "Config":
        return cls(source_steps=20, finetune_steps=10, distill_steps=10, lora_steps=10, classifier_steps=10,
                   n_func=32, n_samples=8, sample_steps=4)
