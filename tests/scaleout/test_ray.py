"""`prolora migrate` on a local Ray cluster started here (2 CPUs), with injected failures: a batch
that raises for one LoRA, a worker process killed right after writing an output, a corrupt LoRA,
and a rerun after an interrupted run. Every LoRA must end written exactly once (bytes identical to
the single-machine batch mode, transfer_many) or reported failed.

Tests that need Ray skip when it is not installed; the no-Ray behaviour is checked either way."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from prolora.api import transfer_many
from prolora.cli import main
from prolora.formats import read_lora, write_lora as write_lora_file
from prolora.lora import LoraFile
from prolora.scaleout.manifest import MANIFEST_NAME, REPORT_NAME, file_sha256
from prolora.synthetic import write_lora

N = 6


def _small_lora(source: Path, path: Path, fmt: str, seed: int, offset: int, n: int = 8) -> Path:
    """A synthetic LoRA on `n` attention modules only (keeps the test fast)."""
    full = path.with_suffix(".full")
    write_lora(source, full, format=fmt, rank=2, seed=seed, targets="attn")
    lf = read_lora(full)
    full.unlink()
    keys = sorted(lf.modules)[offset:offset + n]
    write_lora_file(path, LoraFile(lf.format, {k: lf.modules[k] for k in keys}, lf.metadata, lf.dtype), lf.format)
    return path


@pytest.fixture(scope="module")
def loras(sdxl_pair, tmp_path_factory):
    """N small LoRAs (kohya and PEFT, four key sets) and their outputs from transfer_many."""
    root = tmp_path_factory.mktemp("ray_loras")
    lora_dir = root / "loras"
    lora_dir.mkdir()
    paths = [_small_lora(sdxl_pair["source"], lora_dir / f"lora{i}.safetensors", "kohya" if i % 2 else "peft",
                         seed=10 + i, offset=(i // 2 % 2) * 4) for i in range(N)]
    ref = root / "ref"
    ref.mkdir()
    batch = transfer_many(sdxl_pair["source"], sdxl_pair["target"], paths, ref, cache_dir=str(root / "ref-cache"))
    assert not batch.failures
    # one driver-side basis cache for the migrations of this module (built by the first one)
    return {"dir": lora_dir, "paths": paths, "ref": {p.name: (ref / p.name).read_bytes() for p in paths},
            "cache": str(root / "cache")}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray cluster for this module; workers see the fault-injection folder it yields."""
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'prolora[ray]'")
    faults = tmp_path_factory.mktemp("faults")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
             runtime_env={"env_vars": {"PROLORA_FAULT_DIR": str(faults)}})
    yield faults
    ray.shutdown()


def _outputs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.glob("*.safetensors")}


def _no_temporaries(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def _manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST_NAME).read_text())["loras"]


def test_migrate_matches_batch_mode_and_rerun_skips(cluster, loras, sdxl_pair, tmp_path, capsys):
    from prolora.scaleout import migrate

    out, cache = tmp_path / "out", loras["cache"]
    rc = main(["migrate", str(sdxl_pair["source"]), str(sdxl_pair["target"]), "--lora-dir", str(loras["dir"]),
               "-o", str(out), "--workers", "2", "--batch-size", "2", "--cache-dir", cache, "-q"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert f"{N} written, 0 already done, 0 failed; 2 workers" in text
    assert _outputs(out) == loras["ref"]  # byte-identical to the single-machine batch mode
    _no_temporaries(out)
    entries = _manifest(out)
    assert set(entries) == set(loras["ref"])
    for name, e in entries.items():
        assert e["status"] == "done" and e["attempts"] == 1 and e["error"] is None
        assert e["input_sha256"] == file_sha256(loras["dir"] / name)
        assert e["output_sha256"] == file_sha256(out / name)
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["failures"] == [] and report["warnings"] == []
    assert report["workers"]["bytes_read"] == 0  # the workers only read the bases built on the driver
    assert report["bases"]["modules"] > 0 and report["bases"]["key_sets"] == 4

    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    again = migrate(sdxl_pair["source"], sdxl_pair["target"], loras["paths"], out, cache_dir=cache)
    assert again.written == [] and sorted(again.skipped) == sorted(loras["ref"]) and again.failed == {}
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")} == stamps


def test_injected_failures_and_shipped_cache(cluster, loras, sdxl_pair, tmp_path):
    """A batch that raises for lora1, a worker killed after writing lora3, a corrupt file: the
    others are written once and identical; the bases reach the workers through the object store."""
    from prolora.scaleout import migrate

    (cluster / "raise-lora1.safetensors").touch()
    (cluster / "kill-lora3.safetensors").touch()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    out = tmp_path / "out"
    try:
        res = migrate(sdxl_pair["source"], sdxl_pair["target"], [*loras["paths"], broken], out,
                      cache_dir=loras["cache"], ship_cache=True,
                      worker_cache_dir=str(tmp_path / "worker-cache"), workers=2, batch_size=3, max_attempts=2)
    finally:
        (cluster / "raise-lora1.safetensors").unlink()
    assert not (cluster / "kill-lora3.safetensors").exists()  # a worker did die for it
    assert set(res.failed) == {"lora1.safetensors", "broken.safetensors"}
    assert "injected failure for lora1.safetensors" in res.failed["lora1.safetensors"]
    assert "broken.safetensors" in res.failed["broken.safetensors"]
    expected = {k: v for k, v in loras["ref"].items() if k != "lora1.safetensors"}
    assert sorted(res.written) == sorted(expected)
    assert _outputs(out) == expected
    _no_temporaries(out)
    entries = _manifest(out)
    assert entries["lora1.safetensors"]["status"] == "failed" and entries["lora1.safetensors"]["attempts"] == 2
    assert entries["lora3.safetensors"]["status"] == "done"
    report = json.loads(res.report_path.read_text())
    assert any("died" in r["reason"] and "lora3.safetensors" in r["loras"] for r in report["retries"])
    assert {f["lora"] for f in report["failures"]} == set(res.failed)
    assert report["workers"]["bytes_read"] == 0
    assert list((tmp_path / "worker-cache" / "bases").glob("*/*.safetensors"))


def test_rerun_after_interruption(cluster, loras, sdxl_pair, tmp_path):
    """Interrupted after two LoRAs; a stale temporary file and a damaged output are left behind.
    The rerun redoes only what is not complete and ends with every output exactly as transfer_many's."""
    from prolora.scaleout import migrate

    out, cache = tmp_path / "out", loras["cache"]
    seen: list[str] = []

    def stop_after_two(name, entry):
        seen.append(name)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        migrate(sdxl_pair["source"], sdxl_pair["target"], loras["paths"], out, cache_dir=cache, workers=1,
                batch_size=1, on_result=stop_after_two)
    entries = _manifest(out)
    done = sorted(n for n, e in entries.items() if e["status"] == "done")
    assert done == sorted(seen) and all(e["status"] in ("done", "pending") for e in entries.values())
    damaged, kept = done
    (out / damaged).write_bytes((out / damaged).read_bytes()[:100])
    (out / f".{loras['paths'][-1].name}.x1y2z3.tmp").write_bytes(b"partial")
    kept_stamp = (out / kept).stat().st_mtime_ns

    res = migrate(sdxl_pair["source"], sdxl_pair["target"], loras["paths"], out, cache_dir=cache, workers=2,
                  batch_size=2)
    assert res.skipped == [kept] and sorted(res.written) == sorted(set(loras["ref"]) - {kept}) and not res.failed
    assert (out / kept).stat().st_mtime_ns == kept_stamp
    assert _outputs(out) == loras["ref"]
    _no_temporaries(out)
    assert all(e["status"] == "done" for e in _manifest(out).values())


def test_outputs_not_in_manifest_are_refused(cluster, loras, sdxl_pair, tmp_path):
    from prolora.scaleout import migrate

    out = tmp_path / "out"
    out.mkdir()
    (out / "lora0.safetensors").write_bytes(b"someone else's file")
    res = migrate(sdxl_pair["source"], sdxl_pair["target"], loras["paths"][:1], out)
    assert "pass --overwrite" in res.failed["lora0.safetensors"] and res.written == []
    assert (out / "lora0.safetensors").read_bytes() == b"someone else's file"


def test_without_ray_one_line_error(monkeypatch, tmp_path, capsys, sdxl_pair):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    out = tmp_path / "out"
    rc = main(["migrate", str(sdxl_pair["source"]), str(sdxl_pair["target"]), "--lora-dir", str(tmp_path),
               "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "pip install 'prolora[ray]'" in err and "prolora transfer" in err and "--lora-dir" in err
    assert not out.exists()
    from prolora.scaleout import RayUnavailableError, migrate

    with pytest.raises(RayUnavailableError):
        migrate(sdxl_pair["source"], sdxl_pair["target"], [sdxl_pair["kohya"]], out)
    assert not out.exists()


def test_package_never_imports_ray():
    code = ("import sys, prolora, prolora.api, prolora.cli, prolora.scaleout, prolora.scaleout.worker, "
            "prolora.scaleout.prepare; prolora.cli.build_parser(); print('ray' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"


def test_workers_that_cannot_start_fail_the_job_cleanly(cluster, loras, sdxl_pair, tmp_path, monkeypatch):
    """Every worker's constructor fails: the LoRAs are reported failed (no hang, no output)."""
    from prolora.scaleout import driver, migrate

    monkeypatch.setattr(driver, "RESTART_PATIENCE", 1.0)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    out = tmp_path / "out"
    res = migrate(sdxl_pair["source"], sdxl_pair["target"], loras["paths"][:2], out, cache_dir=loras["cache"],
                  ship_cache=True, worker_cache_dir=str(blocker / "cache"), workers=1, batch_size=2)
    assert res.written == [] and set(res.failed) == {p.name for p in loras["paths"][:2]}
    assert all("no worker left" in e for e in res.failed.values()), res.failed
    assert _outputs(out) == {}
    assert all(e["status"] == "failed" for e in _manifest(out).values())


def test_changed_options_redo_the_output(cluster, loras, sdxl_pair, tmp_path):
    from prolora.scaleout import migrate

    out, one = tmp_path / "out", loras["paths"][:1]
    first = migrate(sdxl_pair["source"], sdxl_pair["target"], one, out, cache_dir=loras["cache"], workers=1)
    key = _manifest(out)[one[0].name]["options_key"]
    again = migrate(sdxl_pair["source"], sdxl_pair["target"], one, out, cache_dir=loras["cache"], workers=1,
                    format="kohya")
    assert first.written == again.written == [one[0].name]
    assert _manifest(out)[one[0].name]["options_key"] != key
    assert read_lora(out / one[0].name).format == "kohya"
    assert migrate(sdxl_pair["source"], sdxl_pair["target"], one, out, cache_dir=loras["cache"],
                   format="kohya").skipped == [one[0].name]
