"""Options of a transfer, validated once, shared by the API, the engine and the CLI."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import OptionError
from .formats.lowrank import DEFAULT_MAX_ERROR as DEFAULT_CONVERT_ERROR, Conversion
from .lora import FORMATS
from .method import KMode, RankSpec
from .ops import ALL_OPS, METHODS
from .ops.registry import check_overrides

# Defaults set from the quality benchmark (benchmarks/quality/RESULTS.md; README, "Defaults and the
# evidence"): prolora-full is exact when the two models share their subspaces and keeps the LoRA's
# rank; no k mode scored better than energy:0.9 (the CASA rule); tau 0.8 is the paper's.
DEFAULT_METHOD = "prolora-full"
DEFAULT_SUBSPACE = "energy:0.9"
DEFAULT_TAU = 0.8


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
          "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}


def parse_size(text: str) -> int:
    """'2GB', '1.5GiB', '800M', '123456' -> bytes."""
    s = str(text).strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    try:
        value = float(num) * _UNITS[unit]
    except (ValueError, KeyError):
        raise OptionError(f"size {text!r}: expected a number with an optional unit (e.g. 2GB, 512MiB)") from None
    if value <= 0:
        raise OptionError(f"size {text!r} must be positive")
    return int(value)


@dataclass
class TransferOptions:
    """Everything that decides a transfer's result (besides the three input files)."""

    method: str = DEFAULT_METHOD
    subspace: KMode | str = DEFAULT_SUBSPACE
    tau: float = DEFAULT_TAU
    rank: RankSpec | str | int = "same"
    format: str = "same"  # output file format, or "same" as the input
    alpha: str = "keep"  # keep: the input's alpha/r convention; rank: alpha = output rank (scale 1)
    skipped: str = "drop"  # what a layer below tau gets: drop (no adapter) or copy (the input's)
    match: str = "auto"  # layer matching: name, similarity, or auto (similarity where depths differ)
    widths: str = "refuse"  # a target weight of another shape: refuse (skip it) or lstsq (LoRA-X's map)
    device: str = "cpu"
    backends: dict[str, str] = field(default_factory=dict)  # op name -> backend override
    max_memory: int | None = None  # host memory budget in bytes (None: 2 GiB or half the available memory)
    max_gpu_memory: int | None = None
    cache: bool = True  # reuse and store bases in the on-disk basis cache
    cache_dir: str | None = None  # default: $PROLORA_CACHE_DIR or ~/.cache/prolora
    # --refine: RefineOptions, a dict of its fields or a step count (None / 0: off; prolora.refine)
    refine: object = None
    # adapters that are not a low-rank pair (LoKr, LoHa, full differences, DoRA) are written as the
    # LoRA of the smallest rank whose relative Frobenius error is within this bound (--rank N wins)
    convert_error: float = DEFAULT_CONVERT_ERROR

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise OptionError(f"method {self.method!r}: choose from {', '.join(METHODS)}")
        self.subspace = KMode.parse(self.subspace)
        self.rank = RankSpec.parse(self.rank)
        if not 0.0 <= float(self.tau) <= 1.0:
            raise OptionError(f"tau {self.tau!r}: must be in [0, 1]")
        self.tau = float(self.tau)
        if self.format != "same" and self.format not in FORMATS:
            raise OptionError(f"format {self.format!r}: choose from same, {', '.join(FORMATS)}")
        if self.alpha not in ("keep", "rank"):
            raise OptionError(f"alpha {self.alpha!r}: choose keep or rank")
        if self.match not in ("name", "similarity", "auto"):
            raise OptionError(f"match {self.match!r}: choose name, similarity or auto")
        if self.widths not in ("refuse", "lstsq"):
            raise OptionError(f"widths {self.widths!r}: choose refuse or lstsq")
        if self.skipped not in ("drop", "copy"):
            raise OptionError(f"skipped {self.skipped!r}: choose drop or copy")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise OptionError(f"device {self.device!r}: no CUDA device is available here")
        for name in ("max_memory", "max_gpu_memory"):
            v = getattr(self, name)
            if isinstance(v, str):
                setattr(self, name, parse_size(v))
            elif v is not None and v <= 0:
                raise OptionError(f"{name} must be positive")
        self.conversion()  # validates convert_error
        check_overrides(ALL_OPS, self.backends, self.device)
        from .refine.loop import RefineOptions

        self.refine = RefineOptions.of(self.refine)

    def conversion(self) -> Conversion:
        """How adapters that are not a low-rank pair become a LoRA: the bound, or --rank N."""
        try:
            err = float(self.convert_error)
        except (TypeError, ValueError):
            raise OptionError(f"convert error {self.convert_error!r}: expected a number in [0, 1)") from None
        return Conversion(err, self.rank.value if self.rank.kind == "fixed" else None)

    def describe(self) -> dict[str, str]:
        """The options as strings, for reports and file metadata."""
        return {"method": self.method, "subspace": str(self.subspace), "tau": f"{self.tau:g}",
                "rank": str(self.rank), "alpha": self.alpha, "skipped": self.skipped, "match": self.match,
                **({"widths": self.widths} if self.widths != "refuse" else {}),
                **({"refine": str(self.refine.steps)} if self.refine is not None else {})}
