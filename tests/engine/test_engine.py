"""The streaming engine, the basis cache and batch transfers."""
from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

import prolora
from prolora.api import transfer_many
from prolora.cache import BasisCache
from prolora.cli import main
from prolora.engine import lora_passes
from prolora.families import open_model
from prolora.formats import read_lora
from prolora.ops import truncated_svd
from prolora.spill import Spill

gram = truncated_svd.backends["gram"].fn


def merged(lm):
    r = lm.rank
    return lm.scale * lm.up.double().reshape(lm.up.shape[0], r) @ lm.down.double().reshape(r, -1)


def test_fast_path_meets_the_end_to_end_contract(sdxl_pair, tmp_path):
    """Merged dW of the fast path within 1e-3 relative Frobenius error of the float64 reference."""
    args = (sdxl_pair["source"], sdxl_pair["target"], sdxl_pair["conv"])
    fast = prolora.transfer(*args, tmp_path / "fast.safetensors", cache=False)
    ref = prolora.transfer(*args, tmp_path / "ref.safetensors", cache=False, backends={"*": "reference"})
    assert fast.report.info["engine"]["backends"]["truncated_svd"] == "gram"
    assert ref.report.info["engine"]["backends"]["truncated_svd"] == "reference"
    a, b = read_lora(fast.output).modules, read_lora(ref.output).modules
    assert set(a) == set(b)
    num = sum(float((merged(a[k]) - merged(b[k])).norm() ** 2) for k in a)
    den = sum(float(merged(b[k]).norm() ** 2) for k in b)
    assert (num / den) ** 0.5 < 1e-3


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


def _tensors(path):
    lf = read_lora(path)
    return {k: (m.up.tolist(), m.down.tolist(), m.alpha) for k, m in lf.modules.items()}


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


def test_batch_matches_single_transfers_and_survives_a_bad_lora(sdxl_pair, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    loras = [sdxl_pair["kohya"], sdxl_pair["peft"], bad, sdxl_pair["conv"]]
    out = tmp_path / "out"
    out.mkdir()
    seen = []
    batch = transfer_many(sdxl_pair["source"], sdxl_pair["target"], loras, out, cache=False,
                          max_memory="600MB", on_result=seen.append)
    assert len(batch.results) == 3 and [f.lora for f in batch.failures] == [str(bad)]
    assert "not a valid safetensors" in batch.failures[0].error
    assert len(seen) == 4 and batch.stats.chunks > 1
    for lora in (sdxl_pair["kohya"], sdxl_pair["peft"], sdxl_pair["conv"]):
        single = prolora.transfer(sdxl_pair["source"], sdxl_pair["target"], lora, tmp_path / f"s_{lora.name}",
                                  cache=False)
        assert _tensors(single.output) == _tensors(out / lora.name)


def test_batch_under_a_small_budget_runs_in_passes_with_the_same_bytes(sdxl_pair, tmp_path):
    """A budget too small for the batch's LoRAs splits it into passes over the models (the later
    ones served by the basis cache); every output has the bytes it has from a one-pass batch."""
    loras = [sdxl_pair["kohya"], sdxl_pair["peft"], sdxl_pair["conv"]]
    outs = {}
    for budget in ("1MB", "64GB"):
        out = tmp_path / budget
        out.mkdir()
        batch = transfer_many(sdxl_pair["source"], sdxl_pair["target"], loras, out,
                              cache_dir=str(tmp_path / "cache"), max_memory=budget)
        assert not batch.failures and all(r.lora is None and r.output.exists() for r in batch.results)
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in loras)  # the spill left nothing
        outs[budget] = (batch.stats, {p.name: _tensors(out / p.name) for p in loras})
    (small, a), (big, b) = outs["1MB"], outs["64GB"]
    assert small.passes == 3 and big.passes == 1 and a == b
    assert small.cache_hits > 0 and small.modules == big.modules


def test_finished_layers_are_parked_until_their_lora_is_complete(sdxl_pair, tmp_path, monkeypatch):
    """Every transferred layer but the one completing its LoRA goes to the spill file in the
    output dtype (memory does not grow with the batch), and the outputs are those of a run
    that keeps them in memory (alpha=rank waits for every layer, so it parks float32)."""
    parked = []
    real_put = Spill.put
    monkeypatch.setattr(Spill, "put", lambda self, t: parked.append(t.dtype) or real_put(self, t))
    args = (sdxl_pair["source"], sdxl_pair["target"], sdxl_pair["kohya"])
    res = prolora.transfer(*args, tmp_path / "a.safetensors", cache=False)
    made = sum(r.transferred for r in res.report.layers)
    assert made > 2 and len(parked) == 2 * (made - 1) and set(parked) == {torch.float16}
    parked.clear()
    rank = prolora.transfer(*args, tmp_path / "b.safetensors", cache=False, alpha="rank")
    assert len(parked) == 2 * (made - 1) and set(parked) == {torch.float32}
    monkeypatch.setattr(Spill, "put", lambda self, t: pytest.fail("parked"))
    monkeypatch.setattr("prolora.engine.results.JobResult.park", lambda self, *a: None)
    held = prolora.transfer(*args, tmp_path / "c.safetensors", cache=False)
    assert _tensors(res.output) == _tensors(held.output)
    assert rank.lora.modules.keys() == res.lora.modules.keys()


def test_lora_passes_fill_two_thirds_of_the_spare_memory():
    assert lora_passes([10, 10, 10, 10, 10], 60) == [[0, 1, 2, 3], [4]]
    assert lora_passes([50, 10, 10], 60) == [[0], [1, 2]]
    assert lora_passes([10, 10], -5) == [[0], [1]]  # at least one LoRA per pass
    assert lora_passes([], 60) == []


def test_spill_round_trips_tensors(tmp_path):
    spill = Spill(str(tmp_path))
    ts = [torch.randn(7, 3), torch.randn(0, 4), torch.randn(5).to(torch.bfloat16), torch.arange(6).reshape(2, 3)]
    parked = [spill.put(t) for t in ts]
    assert [p.shape for p in parked] == [tuple(t.shape) for t in ts]
    assert all(torch.equal(spill.get(p), t) and spill.get(p).dtype == t.dtype for p, t in zip(parked, ts))
    assert list(tmp_path.iterdir()) == []  # unlinked: nothing is left behind, however the run ends
    spill.close()


def test_budget_changes_chunks_not_results(sdxl_pair, tmp_path):
    args = (sdxl_pair["source"], sdxl_pair["target"], sdxl_pair["kohya"])
    small = prolora.transfer(*args, tmp_path / "a.safetensors", cache=False, max_memory="1MB")
    big = prolora.transfer(*args, tmp_path / "b.safetensors", cache=False, max_memory="64GB")
    assert small.report.info["engine"]["chunks"] == small.report.info["engine"]["modules"]  # one per chunk
    assert big.report.info["engine"]["chunks"] == 1
    assert _tensors(small.output) == _tensors(big.output)


def test_cli_batch_cache_and_backends(sdxl_pair, tmp_path, capsys):
    cache_dir = str(tmp_path / "c")
    assert main(["cache", "build", str(sdxl_pair["source"]), "--layers", "attn1", "--cache-dir", cache_dir, "-q"]) == 0
    assert main(["cache", "ls", "--cache-dir", cache_dir]) == 0
    listing = capsys.readouterr().out
    with open_model(sdxl_pair["source"]) as m:
        assert m.identity()[:16] in listing and "source" in listing
    out = tmp_path / "o"
    assert main(["transfer", str(sdxl_pair["source"]), str(sdxl_pair["target"]), str(sdxl_pair["kohya"]),
                 str(sdxl_pair["peft"]), "-o", str(out), "--cache-dir", cache_dir, "--report",
                 str(tmp_path / "r.json"), "-q"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["kohya.safetensors", "peft.safetensors"]
    assert "2 written, 0 failed" in capsys.readouterr().out
    assert main(["cache", "rm", "--cache-dir", cache_dir]) == 0
    assert BasisCache(cache_dir).models() == []
    assert main(["backends"]) == 0
    text = capsys.readouterr().out
    assert "gram" in text and "reference" in text
    assert torch.cuda.is_available() or "no CUDA device" in text
