"""What decides an extraction (ExtractOptions, validated on construction) and what it reports:
one line per layer (LayerExtract), one result per output (ExtractResult, its JSON report), and a
batch's results and failures (BatchExtractResult)."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import OptionError
from ..lora import FORMATS, LoraFile
from ..ops.svd_randomized import NAME as RANDOMIZED

BACKENDS = ("auto", "randomized", "exact")


@dataclass
class ExtractOptions:
    """What decides an extraction's result.

    rank: the rank of every linear / 1x1-conv layer; or energy: the smallest rank keeping that
    fraction of each layer's ||dW||_F^2 (one of the two). conv_rank: 3x3 convs are extracted at
    this rank (None: skipped). clamp_quantile: None (the exact approximation) or Q in (0, 1].
    min_diff: layers whose largest |dW| is below it are skipped. layers: a regex searched in the
    canonical module names. text_encoders: also the text encoders' attention and MLP linears. backend: auto (randomized where
    eligible, else exact), randomized, or exact. max_memory: bytes or '2GB' (None: the engine's
    default budget).
    """

    rank: int | None = None
    energy: float | None = None
    conv_rank: int | None = None
    clamp_quantile: float | None = None
    min_diff: float = 0.0
    layers: str | None = None
    text_encoders: bool = False
    format: str = "kohya"
    save_dtype: torch.dtype = torch.float16
    backend: str = "auto"
    max_memory: int | str | None = None

    def __post_init__(self) -> None:
        if (self.rank is None) == (self.energy is None):
            raise OptionError("extract needs one of --rank N and --energy F")
        if self.rank is not None and self.rank < 1:
            raise OptionError(f"--rank {self.rank}: expected a positive integer")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise OptionError(f"--energy {self.energy}: expected a fraction in (0, 1]")
        if self.conv_rank is not None and self.conv_rank < 1:
            raise OptionError(f"--conv-rank {self.conv_rank}: expected a positive integer")
        if self.clamp_quantile is not None and not 0 < self.clamp_quantile <= 1:
            raise OptionError(f"--clamp-quantile {self.clamp_quantile}: expected a number in (0, 1]")
        if not self.min_diff >= 0:
            raise OptionError(f"--min-diff {self.min_diff}: expected a number >= 0")
        if self.format not in FORMATS:
            raise OptionError(f"unknown LoRA format '{self.format}'; choose one of {', '.join(FORMATS)}")
        if self.backend not in BACKENDS:
            raise OptionError(f"unknown extract backend '{self.backend}'; choose one of {', '.join(BACKENDS)}")
        if self.backend == RANDOMIZED and self.energy is not None:
            raise OptionError("--energy needs each layer's whole spectrum: use --backend exact or auto")
        if self.layers is not None:
            try:
                re.compile(self.layers)
            except re.error as e:
                raise OptionError(f"--layers {self.layers!r}: not a regular expression ({e})") from None
        if isinstance(self.max_memory, str):
            from ..options import parse_size

            self.max_memory = parse_size(self.max_memory)

    def spec(self) -> dict:
        d = asdict(self)
        d["save_dtype"] = str(self.save_dtype).removeprefix("torch.")
        return d


@dataclass
class LayerExtract:
    """One layer's outcome. status: extracted, identical, below-min-diff, conv-skipped, unspellable.
    error: ||dW - written||_F / ||dW||_F (for extracted layers)."""

    module: str
    key: str | None
    shape: tuple[int, ...]
    status: str
    rank: int = 0
    max_abs_diff: float = 0.0
    retained_energy: float = 0.0
    error: float = 0.0
    backend: str = ""
    reason: str = ""


@dataclass
class ExtractResult:
    """One extracted LoRA: where it went, the LoRA itself and the per-layer report."""

    output: Path
    lora: LoraFile | None
    base: str
    tuned: str
    options: ExtractOptions
    layers: list[LayerExtract] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss: int = 0

    def summary(self) -> dict:
        ext = [x for x in self.layers if x.status == "extracted"]
        count = {s: sum(1 for x in self.layers if x.status == s)
                 for s in ("identical", "below-min-diff", "conv-skipped", "unspellable")}
        return {"extracted": len(ext), "identical": count["identical"], "below_min_diff": count["below-min-diff"],
                "conv_skipped": count["conv-skipped"], "unspellable": count["unspellable"],
                "rank_min": min((x.rank for x in ext), default=0), "rank_max": max((x.rank for x in ext), default=0),
                "mean_retained_energy": sum(x.retained_energy for x in ext) / max(1, len(ext)),
                "max_error": max((x.error for x in ext), default=0.0),
                "backends": sorted({x.backend for x in ext}), "seconds": self.seconds, "peak_rss": self.peak_rss}

    def report(self) -> dict:
        return {"job": "extract", "output": str(self.output), "base": self.base, "tuned": self.tuned,
                "options": self.options.spec(), "summary": self.summary(),
                "layers": [asdict(x) for x in self.layers]}


@dataclass
class BatchExtractResult:
    results: list[ExtractResult]
    failed: dict[str, str]  # tuned path -> one-line error
