"""Autotune that finishes: the Triton kernels' autotune keys hold shape classes, not sizes, so a
full-size transfer forced onto the Triton projection tunes a handful of times, not once per
layer's k (138 distinct k on SDXL's 1280-wide layers alone, about a second of tuning each).

The keys are counted as Triton's autotuner forms them (kernels._config.recording_keys), with the
kernels not launched: every layer shape of a full-size SDXL transfer (the bench's LoRA on all 700
transformer-block linears) at every k the energy rule could choose."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from prolora.bench import BenchConfig, _lora_pattern, _model_config
from prolora.kernels._config import CLASS_BOUNDS, recording_keys, shape_class
from prolora.kernels.projection import project_batched
from prolora.synthetic import model_params

pytestmark = pytest.mark.interpreter


def lora_shapes(family: str) -> Counter:
    """(m, n) of every layer the bench's LoRA adapts in a full-size model of `family`."""
    cfg = BenchConfig(family=family)
    shapes = {f"{comp}.{name[:-len('.weight')]}": s for comp, params in model_params(_model_config(cfg)).items()
              for name, s in params if name.endswith(".weight")}
    pattern = _lora_pattern(cfg)
    return Counter((s[0], math.prod(s[1:])) for m, s in shapes.items() if pattern.match(m))


def keys_met(shapes, method: str, r: int = 16, step: int = 1) -> set:
    """The autotune keys the Triton projection meets on `shapes` at every k (1, 1 + step, ...,
    and the edges of the classes)."""
    with recording_keys(launch=False) as keys:
        for m, n in shapes:
            d = min(m, n)
            bases = [torch.empty(1, x, d) for x in (m, n, m, n)]
            B, A = torch.empty(1, m, r), torch.empty(1, r, n)
            edges = {b + e for b in CLASS_BOUNDS for e in (0, 1)} | {d}
            for k in sorted({*range(1, d + 1, step), *(e for e in edges if e <= d)}):
                Us, Vs, Ut, Vt = (t[:, :, :k] for t in bases)
                project_batched(B, A, Us, Vs, Ut, Vt, method)
    return keys


@pytest.mark.parametrize("method", ["prolora-full", "prolora"])
def test_a_full_sdxl_transfer_meets_at_most_16_autotune_keys(method):
    shapes = lora_shapes("sdxl")
    assert sum(shapes.values()) == 700 and len(shapes) == 8
    keys = keys_met(shapes, method)
    assert len(keys) <= 16, sorted(keys)
    # the classes of k are what varies: every one of them is met, each with tn and expand
    assert {key[1][0] for key in keys if key[0] == "tn"} == {0, 1, 2, 3}


def test_flux_shapes_meet_as_few_keys():
    keys = keys_met(lora_shapes("flux"), "prolora-full", step=61)
    assert len(keys) <= 16, sorted(keys)


def test_keys_are_classes_and_a_launch_records_what_it_runs():
    assert [shape_class(n) for n in (1, 64, 65, 256, 257, 1024, 1025, 3072)] == [0, 0, 1, 1, 2, 2, 3, 3]
    g = torch.Generator().manual_seed(0)
    m, n, k, r = 40, 24, 5, 3
    Us, Ut = torch.linalg.qr(torch.randn(m, k, generator=g))[0], torch.linalg.qr(torch.randn(m, k, generator=g))[0]
    Vs, Vt = torch.linalg.qr(torch.randn(n, k, generator=g))[0], torch.linalg.qr(torch.randn(n, k, generator=g))[0]
    B, A = torch.randn(1, m, r, generator=g), torch.randn(1, r, n, generator=g)
    args = (B, A, Us[None], Vs[None], Ut[None], Vt[None], "prolora")
    with recording_keys(launch=True) as ran:
        up, down = project_batched(*args)
    with recording_keys(launch=False) as dry:
        project_batched(*args)
    assert ran == dry and {key[0] for key in ran} == {"tn", "expand"}
    ref = torch.cat([Ut @ Ut.T @ Us @ Us.T @ B[0], B[0] - Us @ Us.T @ B[0] - Ut @ Ut.T @ (B[0] - Us @ Us.T @ B[0])], 1)
    assert torch.allclose(up[0], ref, atol=1e-5)


def test_an_older_triton_leaves_out_the_configuration_it_spills_in(monkeypatch):
    """Pinned to the GPU machines' Triton 3.6: there the 64 x 64 x 16 FMA tile spills registers
    for a float16 x bfloat16 pair (AOT check for sm_90), so such launches leave it out; 3.9 keeps
    it, and no other pair or tile changes."""
    from prolora.kernels import tn

    fp16, bf16 = torch.empty(1, dtype=torch.float16), torch.empty(1, dtype=torch.bfloat16)
    f32 = torch.empty(1)
    tile = tn._SPILLS_BEFORE_3_9
    mixed = {"UPCAST": True, "a_ptr": fp16, "x_ptr": bf16}
    for before, kept in ((False, True), (True, False)):
        monkeypatch.setattr(tn, "_triton_before_3_9", lambda before=before: before)
        assert tn.tn_keeps(tile, mixed) is kept
        assert tn.tn_keeps(tile, {"UPCAST": True, "a_ptr": f32, "x_ptr": bf16})
        assert tn.tn_keeps(tile, {"UPCAST": True, "a_ptr": "*bf16", "x_ptr": "*fp16"}) is kept
        assert all(tn.tn_keeps(c, mixed) for c in tn._TN_FMA if c != tile)
