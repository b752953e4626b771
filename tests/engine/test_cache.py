"""The basis cache (cache.py): a warm transfer reads no weight and writes the same bytes; entries keep
the largest k and serve smaller ones; writes are atomic (an interrupted write leaves no entry,
concurrent writers and processes leave complete ones); and the cache is optional: a write that
fails (a full disk, a read-only or impossible folder) costs the entries, never the run."""
from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from faults import FullDisk, check_cache_complete, cli, env, fill, tensors_of

import prolora
from prolora.cache import BasisCache
from prolora.cli import main
from prolora.formats import read_lora
from prolora.ops import truncated_svd
from prolora.safetensors_io import SafetensorsFile

gram = truncated_svd.backends["gram"].fn


def _tensors(path):
    lf = read_lora(path)
    return {k: (m.up.tolist(), m.down.tolist(), m.alpha) for k, m in lf.modules.items()}


def test_cache_reuse_gives_identical_output(sdxl_pair, tmp_path):
    cache_dir = str(tmp_path / "cache")
    args = (sdxl_pair["source"], sdxl_pair["target"], sdxl_pair["kohya"])
    first = prolora.transfer(*args, tmp_path / "a.safetensors", cache_dir=cache_dir)
    second = prolora.transfer(*args, tmp_path / "b.safetensors", cache_dir=cache_dir)
    e1, e2 = first.report.info["engine"], second.report.info["engine"]
    assert e1["cache_hits"] == 0 and e2["cache_misses"] == 0 and e2["cache_hits"] > 0
    assert e2["bytes_read"] == 0  # no weight was read: every basis came from the cache
    assert first.report.summary()["transferred"] > 0 and _tensors(first.output) == _tensors(second.output)
    models = BasisCache(cache_dir).models()
    assert len(models) == 2 and {m.family for m in models} == {"sdxl"}


def test_cache_keeps_largest_k_and_serves_smaller(tmp_path):
    cache = BasisCache(tmp_path)
    W = torch.randn(40, 30)
    b10, b5 = gram(W, 10), gram(W, 5)
    cache.put("m" * 64, "unet.x", b10, (40, 30), "gram")
    cache.put("m" * 64, "unet.x", b5, (40, 30), "gram")  # smaller: ignored
    assert cache.stored_k("m" * 64, "unet.x", torch.float32) == 10
    got = cache.get("m" * 64, "unet.x", (40, 30), 3, torch.float32)
    assert got.k == 3 and torch.equal(got.U, b10.U[:, :3]) and torch.equal(got.V, b10.V[:, :3])
    assert cache.get("m" * 64, "unet.x", (40, 30), 11, torch.float32) is None
    assert cache.get("m" * 64, "unet.x", (40, 30), lambda S, e: 4, torch.float32).k == 4
    assert cache.get("m" * 64, "unet.x", (40, 30), 3, torch.float64) is None  # precision is part of the key
    assert cache.get("m" * 64, "unet.x", (30, 40), 3, torch.float32) is None  # shape mismatch
    # a corrupt entry is a miss, never an error
    path = next((tmp_path / "bases").glob("*/unet.x.f32.safetensors"))
    path.write_bytes(b"\x00" * 20)
    assert cache.get("m" * 64, "unet.x", (40, 30), 3, torch.float32) is None
    cache.put("m" * 64, "unet.x", b10, (40, 30), "gram")
    assert cache.get("m" * 64, "unet.x", (40, 30), 3, torch.float32) is not None


def test_interrupted_cache_write_leaves_no_entry(tmp_path, monkeypatch):
    import prolora.safetensors_io as sio

    cache = BasisCache(tmp_path)
    b = gram(torch.randn(20, 20), 5)
    real = sio._tensor_bytes
    calls = {"n": 0}

    def boom(t):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(t)

    monkeypatch.setattr(sio, "_tensor_bytes", boom)
    with pytest.raises(KeyboardInterrupt):
        cache.put("z" * 64, "unet.y", b, (20, 20), "gram")
    monkeypatch.setattr(sio, "_tensor_bytes", real)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    assert cache.get("z" * 64, "unet.y", (20, 20), 5, torch.float32) is None


def _writer(root, seed):
    torch.manual_seed(0)
    W = torch.randn(64, 48)
    cache = BasisCache(root)
    for k in range(1, 25):  # every put replaces the entry: both processes race on it
        cache.put("c" * 64, "unet.z", gram(W, k), (64, 48), "gram")
        got = cache.get("c" * 64, "unet.z", (64, 48), 1, torch.float32)
        assert got is not None and got.k == 1  # a reader always sees a complete entry


def test_concurrent_writers_leave_one_complete_entry(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), s)) for s in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    cache = BasisCache(tmp_path)
    assert cache.stored_k("c" * 64, "unet.z", torch.float32) == 24
    got = cache.get("c" * 64, "unet.z", (64, 48), 24, torch.float32)
    assert got is not None and got.k == 24
    assert not list(tmp_path.rglob(".*.tmp"))


def test_cache_write_failure_does_not_stop_a_transfer(tmp_path, monkeypatch):
    import prolora.cache as cache_mod

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_mod, "save", full)
    cache = BasisCache(tmp_path)
    with pytest.warns(RuntimeWarning, match="No space"):
        cache.put("d" * 64, "unet.q", gram(torch.randn(10, 10), 3), (10, 10), "gram")
    assert cache.write_errors == 1 and cache.stored_k("d" * 64, "unet.q", torch.float32) == 0


# ----------------------------------------------------------------------------- faults


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_disk_full_while_writing_the_cache(small, tmp_path, capsys, monkeypatch):
    """The cache is an optimisation: a full disk there costs the entries, not the run."""
    cache = tmp_path / "cache"
    disk = FullDisk(cache, room=60_000)  # room for a few of the 24 entries
    monkeypatch.setattr(os, "fdopen", disk)
    out = tmp_path / "o.safetensors"
    code, stdout, err = cli(capsys, "transfer", small["source"], small["target"], small["lora"], "-o", out,
                            "--cache-dir", cache, "-q")
    assert code == 0 and disk.failures > 0
    assert err.strip().splitlines() == [f"prolora: warning: basis cache {cache}: cannot write (No space left on "
                                        "device); continuing without caching"]
    assert tensors_of(out) == tensors_of(small["reference"])
    assert 0 < check_cache_complete(cache) < 24  # what fitted is complete; the rest is absent


def test_real_full_tmpfs_cache(small, small_tmpfs, tmp_path, capsys):
    cache = small_tmpfs / "cache"
    fill(small_tmpfs, leave=64 * 1024)
    out = tmp_path / "o.safetensors"
    code, _, err = cli(capsys, "transfer", small["source"], small["target"], small["lora"], "-o", out,
                       "--cache-dir", cache, "-q")
    assert code == 0
    assert err.strip().splitlines() == [f"prolora: warning: basis cache {cache}: cannot write (No space left on "
                                        "device); continuing without caching"]
    assert tensors_of(out) == tensors_of(small["reference"])
    assert 0 < check_cache_complete(cache) < 24


@pytest.mark.parametrize("where", ["read-only mount", "under a file"])
def test_unwritable_cache_does_not_stop_a_run(small, tmp_path, capsys, request, where):
    """The cache is optional: a cache folder that cannot be created or written gives one warning
    line and the transfer completes (before the fix: 'internal error: OSError')."""
    if where == "read-only mount":
        cache = request.getfixturevalue("readonly_dir") / "cache"
    else:
        cache = small["lora"] / "cache"  # a path below a regular file
    out = tmp_path / "o.safetensors"
    code, stdout, err = cli(capsys, "transfer", small["source"], small["target"], small["lora"], "-o", out,
                            "--cache-dir", cache, "-q")
    assert code == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"prolora: warning: basis cache {cache}: cannot write ("), err
    assert tensors_of(out) == tensors_of(small["reference"]) and not cache.exists()


def test_two_processes_build_the_same_cache_entries(small, tmp_path):
    """`prolora cache build` twice at once into one cache: both succeed, one complete entry per
    layer, no temporary file, and the bases equal those a single process builds."""
    shared, alone = tmp_path / "shared", tmp_path / "alone"
    layers = r"down_blocks\.1\.attentions\.0\."  # the 12 layers of the small LoRA
    cmd = [sys.executable, "-m", "prolora.cli", "cache", "build", str(small["source"]), "--layers", layers,
           "--cache-dir", str(shared), "-q"]
    procs = [subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert all(not err.strip() and "cached bases of 12 layers" in out for out, err in results)
    assert main(["cache", "build", str(small["source"]), "--layers", layers, "--cache-dir", str(alone), "-q"]) == 0
    assert check_cache_complete(shared) == check_cache_complete(alone) == 12
    names = sorted(p.relative_to(shared) for p in shared.rglob("*.safetensors"))
    assert names == sorted(p.relative_to(alone) for p in alone.rglob("*.safetensors"))
    for name in names:
        with SafetensorsFile(shared / name) as a, SafetensorsFile(alone / name) as b:
            assert a.metadata == b.metadata
            assert torch.allclose(a.get("S"), b.get("S"), rtol=1e-5)
            for key in ("Ut", "Vt"):  # the same subspaces (signs of vectors may differ)
                cos = torch.linalg.svdvals(a.get(key).double() @ b.get(key).double().T)
                assert torch.allclose(cos, torch.ones_like(cos), atol=1e-4)
    assert len(BasisCache(shared).models()) == 1
