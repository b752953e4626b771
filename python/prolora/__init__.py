"""prolora: zero-shot transfer of LoRA adapters between diffusion base models (ProLoRA).

Public API: transfer(), transfer_many(), similarity(), compare(), inspect(), TransferOptions, and
the error classes in prolora.errors.
"""
from __future__ import annotations

from .errors import ProloraError

from .version import __version__

_API = {"transfer", "transfer_many", "similarity", "inspect", "compare", "TransferOptions", "TransferResult",
        "SimilarityResult", "BatchResult", "CompareResult"}


def __getattr__(name: str):  # keep `import prolora` light: torch-heavy modules load on first use
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'prolora' has no attribute {name!r}")


__all__ = sorted(_API | {"ProloraError", "__version__"})
