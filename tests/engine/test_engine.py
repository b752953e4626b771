"""The streaming engine (engine/): the fast path meets the end-to-end contract, batches give what
single transfers give (in passes under a small budget, past a bad LoRA, with failing LoRAs reported
and the rest written), finished layers are parked until their LoRA is complete, and the memory
budget changes the chunks, not the results. The basis cache is tests/engine/test_cache.py's."""
from __future__ import annotations

import json

import pytest
import torch
from faults import files_in, lora_with, nan_in_up, nothing_matches, run_cli, tensors_of

import prolora
from prolora.api import transfer_many
from prolora.engine import lora_passes
from prolora.formats import read_lora
from prolora.spill import Spill


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


def _tensors(path):
    lf = read_lora(path)
    return {k: (m.up.tolist(), m.down.tolist(), m.alpha) for k, m in lf.modules.items()}


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


def test_batch_reports_failing_loras_and_completes_the_rest(small, tmp_path):
    d = tmp_path / "loras"
    d.mkdir()
    good_a, good_b = d / "a.safetensors", d / "c.safetensors"
    good_a.write_bytes(small["lora"].read_bytes())
    good_b.write_bytes(small["lora"].read_bytes())
    truncated = d / "b_truncated.safetensors"
    truncated.write_bytes(small["lora"].read_bytes()[:5000])
    nan = lora_with(small, d / "b_nan.safetensors", nan_in_up)
    other = d / "b_mismatch.safetensors"
    lora_with(small, other, nothing_matches)
    out = tmp_path / "out"
    r = run_cli("transfer", small["source"], small["target"], "--lora-dir", d, "-o", out, "--no-cache", "-q",
                "--method", "copy", "--report", tmp_path / "r.json")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    failed = r.stderr.strip().splitlines()
    assert len(failed) == 3 and all(line.startswith("FAILED ") for line in failed), r.stderr
    assert any(str(truncated) in x and "not a valid safetensors" in x for x in failed)
    assert any(str(nan) in x and "NaN or Inf" in x for x in failed)
    assert any(str(other) in x and "only 0 of 12" in x for x in failed)
    assert "2 written, 3 failed" in r.stdout
    assert files_in(out) == ["a.safetensors", "c.safetensors"]
    assert tensors_of(out / "a.safetensors") == tensors_of(small["lora"])
    rep = json.loads((tmp_path / "r.json").read_text())
    assert len(rep["results"]) == 2 and len(rep["failures"]) == 3
