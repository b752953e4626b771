"""Per-op benchmarks: the reference (full SVD, as existing tools do it) vs the fast basis vs the
bare Gram GEMM floor, on weights with realistic spectra, and the projection."""
import pytest
import torch

from prolora.method import KMode
from prolora.ops import project_group, project_lora, truncated_svd
from prolora.synthetic import generator, spectral_weight

SHAPES = [(320, 320), (640, 640), (1280, 1280), (1280, 2048), (5120, 1280)]
MODE = KMode.parse("energy:0.9")


def weight(shape):
    return spectral_weight(shape, generator("bench", 0, str(shape))).half()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("backend", ["svd", "gram"])
def test_truncated_svd(benchmark, shape, backend):
    W = weight(shape)
    d = min(shape)
    fn = truncated_svd.backends[backend].fn
    benchmark.group = f"truncated_svd {shape[0]}x{shape[1]}"
    b = benchmark(fn, W, lambda S, e: MODE.choose(d, S, e))
    assert 0 < b.k <= d


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_gram_floor(benchmark, shape):
    W = weight(shape).float()
    benchmark.group = f"truncated_svd {shape[0]}x{shape[1]}"
    benchmark(lambda: W @ W.T if shape[0] <= shape[1] else W.T @ W)


def bases(g: torch.Generator, m: int, n: int, k: int) -> tuple[torch.Tensor, ...]:
    """Orthonormal bases (Us, Vs, Ut, Vt) of one m x n module in source and target, k columns
    each (drawn from g as Us, Ut, then Vs, Vt)."""
    Us, Ut = (torch.linalg.qr(torch.randn(m, k, generator=g))[0] for _ in range(2))
    Vs, Vt = (torch.linalg.qr(torch.randn(n, k, generator=g))[0] for _ in range(2))
    return Us, Vs, Ut, Vt


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("method", ["prolora", "prolora-full"])
def test_project_lora(benchmark, backend, method):
    g = torch.Generator().manual_seed(0)
    m = n = 1280
    k, r = 640, 16
    Us, Vs, Ut, Vt = bases(g, m, n, k)
    B, A = torch.randn(m, r, generator=g), torch.randn(r, n, generator=g)
    benchmark.group = f"project_lora {method} 1280x1280 k640 r16"
    up, down = benchmark(project_lora.backends[backend].fn, B, A, Us, Vs, Ut, Vt, method)
    assert up.shape[0] == m and down.shape[1] == n


@pytest.mark.parametrize("loras", [1, 4, 8])
def test_project_group(benchmark, loras):
    """The batch path: LoRAs of one module stacked four to a product. Per LoRA, compare with
    test_project_lora's torch backend (one LoRA, padded to a stack of four)."""
    g = torch.Generator().manual_seed(0)
    m = n = 1280
    k, r = 640, 16
    Us, Vs, Ut, Vt = bases(g, m, n, k)
    cross = (Ut.T @ Us, Vt.T @ Vs)
    factors = [(torch.randn(m, r, generator=g), torch.randn(r, n, generator=g)) for _ in range(loras)]
    benchmark.group = "project_group prolora-full 1280x1280 k640 r16"
    out = benchmark(project_group, factors, Us, Vs, Ut, Vt, "prolora-full", cross=cross)
    assert len(out) == loras
