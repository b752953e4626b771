"""The CUDA path of the real engine, run on this CPU-only machine with fake CUDA tensors
(prolora.fake_cuda): cold and warm transfers of SDXL- and Flux-shaped pairs with --device cuda
and the basis cache on must mix no device and host tensors, do their linear algebra on the
device, stay within --max-gpu-memory, bring back exactly the finished factors, the spectra and
the cache entries, wait on the host no more than the engine's bound, and give what the CPU path
gives. Each check is shown to catch the regression it is for."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import prolora
from prolora.engine.device import host_waits
from prolora.fake_cuda import DeviceMismatch, FakeCuda, HostRace, StreamRace, UnpinnedCopy
from prolora.formats import read_lora
from prolora.ops import project_lora
from prolora.safetensors_io import SafetensorsFile
from prolora.synthetic import write_lora, write_model, write_pair

pytestmark = pytest.mark.usefixtures("one_thread")

BUDGET = 4 << 20  # small enough that the tiny models go through in several chunks
SYNCS_PER_MODULE = 4  # what these runs may wait per module at most (host_waits is the exact bound)


def _merged(path) -> dict[str, torch.Tensor]:
    lf = read_lora(path)
    return {k: (m.up.double().flatten(1) @ m.down.double().flatten(1)) * m.scale for k, m in lf.modules.items()}


def _close(a: dict, b: dict, rel: float) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        err = float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30))
        assert err < rel, f"{k}: relative error {err:.2e}"


def check_on_device(res, led, budget: int = BUDGET) -> None:
    """What a --device cuda run must satisfy: no host linear algebra, the peak of live device
    bytes within the budget, host waits within the engine's bound and SYNCS_PER_MODULE."""
    eng = res.report.info["engine"]
    compressed = sum(1 for r in res.report.layers if r.retained_energy is not None)
    assert led.host_compute == [], f"linear algebra ran on the host: {led.host_compute[:3]}"
    assert 0 < led.peak_bytes <= budget, f"peak device bytes {led.peak_bytes} > budget {budget}"
    bound = host_waits(eng["chunks"], eng["basis_batches"], compressed)
    assert led.syncs <= bound, f"{led.syncs} host waits > the bound {bound}: {dict(led.sync_reasons)}"
    assert led.syncs <= SYNCS_PER_MODULE * eng["modules"], f"{led.syncs} host waits for {eng['modules']} modules"


def _factor_bytes(output) -> int:
    """The finished factors as they come back: float32 up and down of every written module."""
    return sum(4 * (m.up.numel() + m.down.numel()) for m in read_lora(output).modules.values())


def _spectra_bytes(lora_path, models: int) -> int:
    """Spectra and energies of every computed basis (float64, d + 1 per layer) for `models`."""
    d = [min(m.up.shape[0], math.prod(m.down.shape[1:])) for m in read_lora(lora_path).modules.values()]
    return models * sum(8 * (x + 1) for x in d)


def _entry_bytes(cache_dir) -> int:
    """The vectors (Ut, Vt) of every cache entry: what a cold run copies back for the cache."""
    total = 0
    for p in Path(cache_dir).glob("bases/*/*.safetensors"):
        with SafetensorsFile(p) as f:
            total += f.info("Ut").nbytes + f.info("Vt").nbytes
    return total


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    d = tmp_path_factory.mktemp("fake_cuda")
    out = {}
    for kind, cfg, fmt in (("sdxl", "sdxl:tiny", "kohya"), ("flux", "flux-dev:tiny", "peft")):
        src, tgt = write_pair(d / f"{kind}_source.safetensors", d / f"{kind}_target", cfg, seed=5)
        out[kind] = (src, tgt, write_lora(src, d / f"{kind}_lora.safetensors", format=fmt, rank=4,
                                          targets="transformer" if kind == "sdxl" else "all", seed=6))
    return out


@pytest.fixture(scope="module")
def runs(pairs, tmp_path_factory):
    """Per kind, computed on first use: the CPU transfer, and cold and warm --device cuda
    transfers with the cache on (res, ledger), and the cache folder."""
    done: dict[str, dict] = {}

    def get(kind: str) -> dict:
        if kind not in done:
            src, tgt, lora = pairs[kind]
            d = tmp_path_factory.mktemp(f"runs_{kind}")
            out = {"cpu": prolora.transfer(src, tgt, lora, d / "cpu.safetensors", cache=False), "cache": d / "cache"}
            for label in ("cold", "warm"):
                with FakeCuda() as fc:
                    res = prolora.transfer(src, tgt, lora, d / f"{label}.safetensors", device="cuda",
                                           max_gpu_memory=BUDGET, cache_dir=str(out["cache"]))
                out[label] = (res, fc.ledger)
            done[kind] = out
        return done[kind]
    return get


def test_fake_cuda_refuses_what_cuda_refuses():
    """Negative controls: the mode raises where CUDA would (or where it would give garbage), and
    counts what a GPU waits for, so the engine tests can fail."""
    with FakeCuda() as fc:
        x = torch.randn(8, 8).to("cuda")
        assert x.is_cuda and x.device.type == "cuda" and fc.ledger.syncs == 1  # a blocking upload waits
        with pytest.raises(DeviceMismatch):
            x @ torch.randn(8, 2)
        y = (x @ x).cpu()
        assert not y.is_cuda and fc.ledger.d2h_bytes == y.numel() * 4 and fc.ledger.syncs == 2
        float(x.sum())
        assert fc.ledger.sync_reasons["_local_scalar_dense"] == 1
        torch.randn(8, 8) @ torch.randn(8, 8)  # any host product counts, however small
        assert fc.ledger.host_compute == ["mm (8, 8) (8, 8)"]
        with pytest.raises(UnpinnedCopy):
            torch.randn(4).to("cuda", non_blocking=True)
        with pytest.raises(UnpinnedCopy):
            torch.randn(4).to(x, non_blocking=True)  # .to(a device tensor) alike
        z = torch.randn(4).pin_memory().to("cuda", non_blocking=True)
        assert z.is_cuda and fc.ledger.async_copies == 1 and fc.ledger.syncs == 3
        with pytest.raises(UnpinnedCopy):
            torch.empty(4).copy_(z, non_blocking=True)
        # stream order: an upload on a side stream is read only after the compute stream waits
        side = torch.cuda.Stream()
        host = torch.randn(4).pin_memory()
        with torch.cuda.stream(side):
            w = torch.empty(4, device="cuda")
            w.copy_(host, non_blocking=True)
        with pytest.raises(StreamRace):
            w + 1
        ev = torch.cuda.Event()
        ev.record(side)
        torch.cuda.current_stream().wait_event(ev)
        assert torch.equal((w + 1).cpu(), host + 1)
        # a non-blocking download is read only after an event (or a synchronize) covers it
        back = torch.empty(4, pin_memory=True)
        back.copy_(w, non_blocking=True)
        with pytest.raises(HostRace):
            back + 1
        done = torch.cuda.Event()
        done.record()
        done.synchronize()
        assert torch.equal(back, host)


@pytest.mark.parametrize("kind", ["sdxl", "flux"])
def test_fake_cuda_cache_on_transfers_stay_on_the_device(kind, runs):
    """Cold and warm transfers with the cache on (the CLI default): on the device within the
    budget and the wait bound, the CPU path's result; the warm one reads no weight."""
    r = runs(kind)
    cpu = r["cpu"]
    for label in ("cold", "warm"):
        res, led = r[label]
        check_on_device(res, led)
        eng = res.report.info["engine"]
        assert eng["chunks"] > 1
        # every upload and every download of factors or cache entries is asynchronous (pinned
        # memory, side streams); the only blocking copies are the spectra, one per basis batch
        assert led.async_copies > 0 and led.sync_reasons["blocking host-to-device copy"] == 0
        assert led.sync_reasons["blocking device-to-host copy"] == eng["basis_batches"]
        _close(_merged(res.output), _merged(cpu.output), 1e-4)
        assert [x.transferred for x in res.report.layers] == [x.transferred for x in cpu.report.layers]
    warm = r["warm"][0].report.info["engine"]
    assert warm["bytes_read"] == 0 and warm["basis_batches"] == 0  # every basis came from the cache


@pytest.mark.parametrize("kind", ["sdxl", "flux"])
def test_fake_cuda_cache_flux_sdxl_byte_counts_are_exact(kind, runs, pairs):
    """What comes back to the host, to the byte: a cold run with the cache on brings back the
    finished factors, every basis' spectrum (the host chooses k) and the cache entries' vectors,
    all of the latter on the side stream; a warm run the factors alone. No round trip between
    bases, similarity and projection."""
    r = runs(kind)
    lora = pairs[kind][2]
    cold, led = r["cold"]
    factors = _factor_bytes(cold.output)
    assert led.d2h_bytes == factors + _spectra_bytes(lora, 2) + _entry_bytes(r["cache"])
    warm, led = r["warm"]
    assert led.d2h_bytes == _factor_bytes(warm.output) == factors


def test_fake_cuda_flux_without_cache_brings_back_only_factors_and_spectra(pairs, tmp_path):
    src, tgt, lora = pairs["flux"]
    with FakeCuda() as fc:
        res = prolora.transfer(src, tgt, lora, tmp_path / "o.safetensors", device="cuda", cache=False,
                               max_gpu_memory=BUDGET)
    check_on_device(res, fc.ledger)
    assert res.report.summary()["transferred"] == len(read_lora(res.output).modules) > 0
    assert fc.ledger.d2h_bytes == _factor_bytes(res.output) + _spectra_bytes(lora, 2)


def _projection_on_the_host(monkeypatch) -> None:
    """The regression: the bases copied to the host and the projection multiplied there."""
    backend = project_lora.backends["torch"]
    original = backend.batched

    def on_host(items, *args, **kwargs):
        host = lambda t: t.cpu() if isinstance(t, torch.Tensor) else t  # noqa: E731
        items = [tuple(host(t) for t in item) for item in items]
        args = [host(a) for a in args]
        kwargs = {k: tuple(host(t) for t in v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
        return [tuple(t.to("cuda") for t in pair) for pair in original(items, *args, **kwargs)]

    monkeypatch.setattr(backend, "batched", on_host)


def test_fake_cuda_flux_catches_an_injected_host_copy(pairs, tmp_path, monkeypatch):
    """Copying the bases to the host and multiplying there passed the Flux test before (its
    operands are under the old 64 KiB threshold and its bytes were not counted): now the
    host products and the extra bytes both fail the checks."""
    src, tgt, lora = pairs["flux"]
    _projection_on_the_host(monkeypatch)
    with FakeCuda() as fc:
        res = prolora.transfer(src, tgt, lora, tmp_path / "o.safetensors", device="cuda", cache=False,
                               max_gpu_memory=BUDGET)
    led = fc.ledger
    assert led.host_compute and max(led.host_compute_bytes) < 1 << 16  # missed by the old threshold
    with pytest.raises(AssertionError, match="linear algebra ran on the host"):
        check_on_device(res, led)
    assert led.d2h_bytes > _factor_bytes(res.output) + _spectra_bytes(lora, 2)


def test_fake_cuda_sync_bound_per_module_holds_and_catches_a_scalar_read(pairs, tmp_path, monkeypatch):
    """The compute thread's host waits stay within the engine's bound with compression on
    (--method prolora: two more per layer), and one extra scalar read per module breaks it."""
    src, tgt, lora = pairs["flux"]
    opts = dict(device="cuda", cache=False, max_gpu_memory=16 << 20, method="prolora")
    with FakeCuda() as fc:
        res = prolora.transfer(src, tgt, lora, tmp_path / "a.safetensors", **opts)
    check_on_device(res, fc.ledger, 16 << 20)
    assert sum(1 for r in res.report.layers if r.retained_energy is not None) > 0
    import prolora.engine.runner as runner

    plain = runner.run_job

    def reads_a_scalar(job, src, *a, **k):
        if src is not None:
            float(src.U[0, 0])  # e.g. a log line reading a device value
        return plain(job, src, *a, **k)

    monkeypatch.setattr(runner, "run_job", reads_a_scalar)
    with FakeCuda() as fc:
        res = prolora.transfer(src, tgt, lora, tmp_path / "b.safetensors", **opts)
    with pytest.raises(AssertionError, match="host waits"):
        check_on_device(res, fc.ledger, 16 << 20)


def test_fake_cuda_runs_the_gpu_model_generator(tmp_path):
    """synthetic.write_model(device="cuda") (how gpu_check builds full-size pairs) runs on the
    fake device: its products on the device, no host/device mix, and, since the fake device
    draws with the host's generator, the same bytes as the CPU generator."""
    with FakeCuda() as fc:
        gpu = write_model(tmp_path / "gpu.safetensors", "sd15:tiny", layout="single-file", seed=3, device="cuda")
    cpu = write_model(tmp_path / "cpu.safetensors", "sd15:tiny", layout="single-file", seed=3)
    led = fc.ledger
    assert led.host_compute == [] and led.h2d_bytes > 0 and led.d2h_bytes > 0
    assert gpu.read_bytes() == cpu.read_bytes()
