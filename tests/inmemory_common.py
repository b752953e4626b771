"""Pipelines held in memory (diffusers pipelines and their modules): helpers of the in-memory tests
(tests/clients/test_inmemory.py, test_inmemory_families.py): their weights, what changed, whether
the in-memory model is the file reader's, and one-line errors.
"""
from __future__ import annotations

import pytest
import torch

from prolora.errors import ProloraError


def quiet() -> None:
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()


def pipeline_models(pipe) -> dict[str, torch.nn.Module]:
    return {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}


def pipeline_weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.detach().clone() for c, m in pipeline_models(pipe).items() for k, v in m.state_dict().items()}


def assert_same_weights(got: dict, want: dict, rel: float) -> None:
    assert got.keys() == want.keys() and got
    for k in want:
        a, b = got[k].double(), want[k].double()
        err = float((a - b).norm() / b.norm().clamp_min(1e-30))
        assert err <= rel, f"{k}: relative difference {err:.2e}"


def changed_keys(after: dict, before: dict) -> list[str]:
    assert after.keys() == before.keys()
    return [k for k in before if not torch.equal(after[k], before[k])]


def same_model(memory, files) -> None:
    """The in-memory model is the file reader's: weights (ids, shapes, dtypes), family, the LoRA
    key spellings it resolves, BFL places (Flux), the identity, and every weight's values."""
    assert [(m, r.shape, r.dtype) for m, r in memory.weights.items()] == \
        [(m, r.shape, r.dtype) for m, r in files.weights.items()]
    assert memory.family == files.family
    assert getattr(memory, "ldm_names", None) == getattr(files, "ldm_names", None)  # SD models only
    assert memory._alias_table() == files._alias_table()
    assert getattr(memory, "bfl", None) == getattr(files, "bfl", None)
    assert memory.identity() == files.identity()
    for m in files.weights:
        assert torch.equal(memory.load(m, None), files.load(m, None)), m


def one_line(e: pytest.ExceptionInfo) -> None:
    assert isinstance(e.value, ProloraError) and "\n" not in str(e.value)
