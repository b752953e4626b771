"""End-to-end transfer benchmarks on a small SDXL-shaped pair: the reference path (full SVD per
layer) vs the fast path, cold and warm cache. `prolora bench` runs the full-size version."""
import pytest

import prolora
from prolora.synthetic import write_lora, write_pair


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench_pair")
    src, tgt = write_pair(d / "src.safetensors", d / "tgt.safetensors", "sdxl:small", seed=0)
    return src, tgt, write_lora(src, d / "lora.safetensors", rank=16, targets="attn")


@pytest.mark.parametrize("backend,cache", [("svd", False), ("gram", False), ("gram", True)],
                         ids=["reference-full-svd", "fast-cold", "fast-warm"])
def test_transfer(benchmark, pair, tmp_path, backend, cache):
    src, tgt, lora = pair
    benchmark.group = "transfer sdxl:small"
    if cache:  # warm the cache once, outside the timing
        prolora.transfer(src, tgt, lora, backends={"truncated_svd": backend})
    res = benchmark.pedantic(prolora.transfer, args=(src, tgt, lora),
                             kwargs={"backends": {"truncated_svd": backend}, "cache": cache}, rounds=3)
    assert res.report.summary()["transferred"] > 0
