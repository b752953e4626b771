"""One exception hierarchy. Every message is a single line that says what, where and what to do;
the CLI prints it as is and exits non-zero (tracebacks only with --debug)."""
from __future__ import annotations


class ProloraError(Exception):
    """Base class of every error the library raises on purpose."""

    exit_code = 2

    def __str__(self) -> str:  # keep messages to one line whatever the caller passed
        return " ".join(super().__str__().split())


class OptionError(ProloraError):
    """An option value the library cannot use (bad --subspace spec, unknown method, ...)."""


class InputFileError(ProloraError):
    """An input path that is missing, unreadable or of the wrong kind."""


class CorruptFileError(InputFileError):
    """A file whose bytes do not form a valid safetensors file (truncated, bad header, ...)."""


class PickleRefusedError(InputFileError):
    """A pickled checkpoint (.ckpt/.pt/.bin/.pth): refused, never unpickled."""


class UnsupportedFormatError(ProloraError):
    """An adapter kind or key layout that cannot be transferred (DoRA, LoHa, LoKr, unknown keys)."""


class InvalidLoraError(ProloraError):
    """A LoRA whose tensors are inconsistent (ranks disagree, NaN/Inf, bad alpha, duplicates)."""


class ModelError(ProloraError):
    """A base model that cannot be read or is not what it was expected to be."""


class LoraMismatchError(ProloraError):
    """A LoRA that does not fit the source model (no matching modules, shape mismatch)."""


class NothingTransferredError(ProloraError):
    """No layer passed the similarity gate, so there is no LoRA to write."""


class OutputPathError(ProloraError):
    """An output path that would overwrite an input or cannot be written."""


class NativeUnavailableError(ProloraError):
    """The compiled extension was asked for explicitly but is not available."""
