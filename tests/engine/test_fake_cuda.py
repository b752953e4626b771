"""The CUDA path of the real engine, run on this CPU-only machine with fake CUDA tensors
(prolora.fake_cuda): cold and warm transfers of SDXL- and Flux-shaped pairs with --device cuda
must mix no device and host tensors, do their linear algebra on the device, stay within
--max-gpu-memory, and give what the CPU path gives."""
from __future__ import annotations

import pytest
import torch

import prolora
from prolora.fake_cuda import DeviceMismatch, FakeCuda
from prolora.formats import read_lora
from prolora.synthetic import write_lora, write_pair

pytestmark = pytest.mark.usefixtures("one_thread")


def _merged(path) -> dict[str, torch.Tensor]:
    lf = read_lora(path)
    return {k: (m.up.double().flatten(1) @ m.down.double().flatten(1)) * m.scale for k, m in lf.modules.items()}


def _close(a: dict, b: dict, rel: float) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        err = float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30))
        assert err < rel, f"{k}: relative error {err:.2e}"


def test_the_fake_device_refuses_what_cuda_refuses():
    """A negative control: the mode raises where CUDA would, so the engine tests can fail."""
    with FakeCuda() as fc:
        x = torch.randn(8, 8).to("cuda")
        assert x.is_cuda and x.device.type == "cuda"
        with pytest.raises(DeviceMismatch):
            x @ torch.randn(8, 2)
        y = (x @ x).cpu()  # copies are allowed, and counted
        assert not y.is_cuda and fc.ledger.d2h_bytes == y.numel() * 4
        torch.randn(300, 300) @ torch.randn(300, 300)
        assert fc.ledger.host_compute and fc.ledger.host_compute[0].startswith("mm")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    d = tmp_path_factory.mktemp("fake_cuda")
    out = {}
    for kind, cfg, fmt in (("sdxl", "sdxl:tiny", "kohya"), ("flux", "flux-dev:tiny", "peft")):
        src, tgt = write_pair(d / f"{kind}_source.safetensors", d / f"{kind}_target", cfg, seed=5)
        out[kind] = (src, tgt, write_lora(src, d / f"{kind}_lora.safetensors", format=fmt, rank=4,
                                          targets="transformer" if kind == "sdxl" else "all", seed=6))
    return out


@pytest.mark.parametrize("kind", ["sdxl", "flux"])
def test_cuda_transfer_stays_on_the_device_within_its_budget(kind, pairs, tmp_path):
    src, tgt, lora = pairs[kind]
    cpu = prolora.transfer(src, tgt, lora, tmp_path / "cpu.safetensors", cache=False)
    budget = 4 << 20  # small enough that the models go through in several chunks
    cache = str(tmp_path / "cache")
    runs = []
    for label in ("cold", "warm"):
        with FakeCuda() as fc:
            res = prolora.transfer(src, tgt, lora, tmp_path / f"{label}.safetensors", device="cuda",
                                   max_gpu_memory=budget, cache_dir=cache)
        led = fc.ledger
        runs.append((label, res, led))
        assert led.host_compute == [], f"{label}: linear algebra ran on the host: {led.host_compute[:3]}"
        assert 0 < led.peak_bytes <= budget, f"{label}: peak device bytes {led.peak_bytes} > budget {budget}"
        assert res.report.info["engine"]["chunks"] > 1
        _close(_merged(res.output), _merged(cpu.output), 1e-4)
    warm = runs[1][1]
    assert warm.report.info["engine"]["bytes_read"] == 0  # every basis came from the cache
    assert [r.transferred for r in warm.report.layers] == [r.transferred for r in cpu.report.layers]


def test_only_finished_factors_come_back_to_the_host(pairs, tmp_path):
    """Without a cache, the only device-to-host copies of a cuda transfer are the finished
    factors (float32, one up and one down per transferred layer): no round trip between the
    bases, the similarity and the projection."""
    src, tgt, lora = pairs["sdxl"]
    with FakeCuda() as fc:
        res = prolora.transfer(src, tgt, lora, tmp_path / "o.safetensors", device="cuda", cache=False)
    done = [m for m in read_lora(res.output).modules.values()]
    assert res.report.summary()["transferred"] == len(done) > 0
    assert fc.ledger.d2h_bytes == sum(4 * (m.up.numel() + m.down.numel()) for m in done)
