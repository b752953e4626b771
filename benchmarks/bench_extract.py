"""pytest-benchmark rows of extraction's truncated SVD: rank-64 top singular triplets of a
difference with a decaying spectrum (jobs.bench.spectrum), by the randomized backend and by a
full float32 SVD (what sd-scripts runs per layer), per SDXL/Flux layer shape. Each row also
checks the randomized answer's Frobenius error against the full SVD's (within 1%).

Run with `python -m pytest benchmarks/bench_extract.py --benchmark-enable`; the end-to-end
comparison on a whole checkpoint pair is `prolora bench --job extract`."""
import pytest
import torch

from prolora.jobs.bench import spectrum
from prolora.ops import truncated_svd

SHAPES = [(640, 640), (1280, 1280), (1280, 2048), (10240, 1280), (3072, 3072)]
K = 64


def difference(shape):
    m, n = shape
    d = min(m, n)
    g = torch.Generator().manual_seed(m * 7 + n)
    U = torch.linalg.qr(torch.randn(m, d, generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, d, generator=g)).Q
    return (U * spectrum(d).float()) @ V.T


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("backend", ["randomized", "svd"])
def test_extract_svd(benchmark, shape, backend):
    D = difference(shape)
    benchmark.group = f"extract rank {K} {shape[0]}x{shape[1]}"
    b = benchmark(truncated_svd.backends[backend].fn, D, K)
    approx = (b.U.double() * b.S[:K].double()) @ b.V.double().T
    S = torch.linalg.svdvals(D.double())
    assert float((D.double() - approx).norm()) <= 1.01 * float((S[K:] ** 2).sum().sqrt())
