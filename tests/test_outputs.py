"""Outputs (outputs.py and the atomic writers): the rules an output path must meet, checked before
any work (never an input, a folder that exists and is writable, odd characters kept), and what a
failure while writing leaves behind: nothing. An interrupt at any moment of a run (a weight read,
a basis computation, a cache write, the output write) and a full disk (the output, the report)
leave no partial file, and a rerun reuses every complete cache entry.

Most cases run `prolora.cli.main` in process, the interrupts run `python -m prolora.cli` as a
real process (tests/faults.py has the helpers; `small` is conftest's SDXL pair with a 12-module
LoRA). Damaged inputs are tested with their readers (tests/formats/), the cache's own faults in
tests/engine/test_cache.py.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faults import (FullDisk, check_cache_complete, cli, env, files_in, fill, one_line_error, snapshot,
                    tensors_of)

import prolora
from prolora.errors import OutputPathError


# ============================================================================ output paths


def test_output_path_rules(sdxl_pair, tmp_path):
    args = (sdxl_pair["source"], sdxl_pair["target"], sdxl_pair["kohya"])
    with pytest.raises(OutputPathError, match="input"):
        prolora.transfer(*args, sdxl_pair["kohya"], overwrite=True)
    with pytest.raises(OutputPathError, match="input"):
        prolora.transfer(*args, sdxl_pair["source"], overwrite=True)
    with pytest.raises(OutputPathError, match=".safetensors"):
        prolora.transfer(*args, tmp_path / "out.ckpt")
    with pytest.raises(OutputPathError, match="does not exist"):
        prolora.transfer(*args, tmp_path / "missing" / "o.safetensors")
    res = prolora.transfer(*args, tmp_path)  # a folder: keeps the LoRA's name
    assert res.output == tmp_path / "kohya.safetensors"
    with pytest.raises(OutputPathError, match="--overwrite"):
        prolora.transfer(*args, tmp_path)
    prolora.transfer(*args, tmp_path, overwrite=True)


def test_output_never_overwrites_an_input(small, tmp_path, capsys):
    work = tmp_path / "w"
    work.mkdir()
    lora = work / "lora.safetensors"
    lora.write_bytes(small["lora"].read_bytes())
    link = work / "link.safetensors"
    link.symlink_to(lora)
    hard = work / "hard.safetensors"
    os.link(lora, hard)
    target_file = next(Path(small["target"]).glob("unet/*.safetensors"))
    before = snapshot(work, Path(small["source"]), Path(small["target"]))
    cases = [
        (lora, []), (lora, ["--overwrite"]), (link, ["--overwrite"]), (hard, ["--overwrite"]),
        (work, ["--overwrite"]),  # a folder: the LoRA's own name inside it is the LoRA itself
        (small["source"], ["--overwrite"]), (target_file, ["--overwrite"]),
    ]
    for out, extra in cases:
        code, _, err = cli(capsys, "transfer", small["source"], small["target"], lora, "-o", out, "--no-cache",
                           *extra)
        assert code == 2, out
        one_line_error(err, "overwrite")
    code, _, err = cli(capsys, "transfer", small["source"], small["target"], lora, "-o", work / "new.safetensors",
                       "--report", lora)
    assert code == 2
    one_line_error(err, "overwrite an input")
    # a batch whose output folder holds its inputs: each LoRA refused, nothing replaced
    code, out_, err = cli(capsys, "transfer", small["source"], small["target"], "--lora-dir", work, "-o", work,
                          "--overwrite", "--no-cache", "-q")
    assert code == 2 and "0 written" in out_
    assert snapshot(work, Path(small["source"]), Path(small["target"])) == before


def test_output_folder_not_writable_read_only_mount(small, readonly_dir, tmp_path, capsys):
    assert not os.access(readonly_dir, os.W_OK)
    code, _, err = cli(capsys, "transfer", small["source"], small["target"], small["lora"], "-o",
                       readonly_dir / "o.safetensors", "--no-cache")
    assert code == 2
    one_line_error(err, str(readonly_dir), "not writable")
    # the check happens before any work; the folder is still as it was
    assert files_in(readonly_dir) == ["existing.txt"]


def test_output_folder_not_writable_permission_bits(small, tmp_path, capsys, monkeypatch):
    """chmod 555 stops a normal user; root ignores it, so os.access is simulated where we are root."""
    d = tmp_path / "locked"
    d.mkdir()
    d.chmod(0o555)
    if os.geteuid() == 0:
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == d and mode & os.W_OK
                            else real(p, mode, **k))
    code, _, err = cli(capsys, "transfer", small["source"], small["target"], small["lora"], "-o",
                       d / "o.safetensors", "--no-cache")
    d.chmod(0o755)
    assert code == 2
    one_line_error(err, str(d), "not writable")
    assert files_in(d) == []


def test_output_folder_missing(small, tmp_path, capsys):
    code, _, err = cli(capsys, "transfer", small["source"], small["target"], small["lora"], "-o",
                       tmp_path / "nope" / "o.safetensors", "--no-cache")
    assert code == 2
    one_line_error(err, str(tmp_path / "nope"), "does not exist")


ODD = ["with space ünïcødé", "-leading dash", "tab\tand 'quote\"", "emoji 🎨 [x]"]


def test_odd_characters_in_input_and_output_names(small, tmp_path, capsys):
    d = tmp_path / "dir with spaces ü"
    d.mkdir()
    src = d / "-source model ü.safetensors"
    src.symlink_to(small["source"])
    loras = []
    for name in ODD:
        p = d / f"{name}.safetensors"
        p.write_bytes(small["lora"].read_bytes())
        loras.append(p)
    # single transfer: an output name starting with a dash, inputs after `--`
    out = d / "-out ünï.safetensors"
    code, stdout, err = cli(capsys, "transfer", f"--output={out}", "--method", "copy", "--no-cache", "-q", "--",
                            src, small["target"], loras[1])
    assert code == 0, err
    assert stdout.strip() == f"wrote {out}" and tensors_of(out) == tensors_of(loras[1])
    # batch: outputs keep the odd names
    outdir = tmp_path / "out [ü] -x"
    code, stdout, err = cli(capsys, "transfer", src, small["target"], *loras, "-o", outdir, "--method", "copy",
                            "--no-cache", "-q")
    assert code == 0, err
    assert files_in(outdir) == sorted(f"{n}.safetensors" for n in ODD)


# ============================================================================ interrupts

# Runs `prolora` (cli.main) with one hook that marks a chosen moment of the run (a marker file) and
# then waits there, so that the test can deliver a signal at exactly that moment. Nothing else
# about the run changes.
DRIVER = r'''
import signal, sys, threading, time

# a run started in the background by a non-interactive shell (nohup ... &) inherits SIGINT ignored,
# and Python then installs no KeyboardInterrupt handler: give the interrupt its usual meaning
signal.signal(signal.SIGINT, signal.default_int_handler)
stage, marker, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
argv = sys.argv[4:]
state = {"n": 0}
lock = threading.Lock()


def reached(note=""):
    with lock:
        state["n"] += 1
        hit = state["n"] == nth
    if hit:
        with open(marker + ".part", "w") as f:
            f.write(note)
        import os
        os.replace(marker + ".part", marker)
        # the main thread is interrupted inside this sleep; a loader thread just slows down
        time.sleep(120 if threading.current_thread() is threading.main_thread() else 2)


if stage == "read":  # a base-model weight read (in the engine's loader thread)
    from prolora.checkpoints.model import BaseModel
    real_load = BaseModel.load

    def load(self, *a, **k):
        reached(threading.current_thread().name)
        return real_load(self, *a, **k)
    BaseModel.load = load
elif stage == "compute":  # a batched basis computation (main thread)
    from prolora.ops import truncated_svd

    def wrap(fn):
        def f(*a, **k):
            reached()
            return fn(*a, **k)
        return f
    for b in truncated_svd.backends.values():
        b.fn = wrap(b.fn)
else:  # "cache-write" / "output": after the 2nd tensor of a file under the given folder
    from prolora import safetensors_io
    real_write = safetensors_io.StreamingWriter.write
    where = argv[argv.index("--cache-dir" if stage == "cache-write" else "-o") + 1]

    def write(self, name, tensor):
        real_write(self, name, tensor)
        if str(self.path).startswith(where) and self._next == 2:
            self._f.flush()
            reached(str(self._tmp))
    safetensors_io.StreamingWriter.write = write

from prolora.cli import main
sys.exit(main(argv))
'''


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before the moment: {proc.communicate()}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError("the run never reached the moment")
        time.sleep(0.05)


# (moment, which call of the hook, signal, cache entries complete at that moment)
INTERRUPTS = [
    ("read", 1, signal.SIGTERM, 0),  # first weight read: nothing cached yet
    # a basis computation: a cold CPU chunk computes each module's source and target bases as one
    # task and writes the chunk's entries after it, so nothing is cached yet
    ("compute", 5, signal.SIGINT, 0),
    # in the middle of writing the 3rd cache entry: the background writer finishes the chunk it
    # is writing before the run exits (bounded: one chunk; this pair is one chunk of 24 bases)
    ("cache-write", 3, signal.SIGTERM, 24),
    ("output", 1, signal.SIGINT, 24),  # in the middle of writing the output file
]


@pytest.mark.parametrize("stage,nth,sig,cached", INTERRUPTS,
                         ids=[f"{s}-{signal.Signals(g).name}" for s, _, g, _ in INTERRUPTS])
def test_interrupt_leaves_no_partial_output_and_a_rerun_reuses_the_cache(small, tmp_path, capsys, stage, nth, sig,
                                                                         cached):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out_dir, cache = tmp_path / "out", tmp_path / "cache"
    out_dir.mkdir()
    out, marker = out_dir / "o.safetensors", tmp_path / "marker"
    args = ["transfer", str(small["source"]), str(small["target"]), str(small["lora"]), "-o", str(out),
            "--cache-dir", str(cache), "-q"]
    proc = subprocess.Popen([sys.executable, str(driver), stage, str(marker), str(nth), *args], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(marker, proc)
        note = marker.read_text()
        if stage == "read":
            assert note.startswith("prolora-load")  # the loader thread, while main waits for it
        if stage in ("cache-write", "output"):
            assert Path(note).exists() and Path(note).name.endswith(".tmp")  # a half-written temp file
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["prolora: interrupted; no partial output was left behind"]
    assert "wrote" not in stdout
    if stage == "cache-write":  # cache entries are written in the background: the output may be
        # complete by the time the signal arrives; never a partial one or its temporary file
        assert files_in(out_dir) in ([], ["o.safetensors"])
        if files_in(out_dir):
            assert tensors_of(out) == tensors_of(small["reference"])
            out.unlink()  # the rerun below writes it again
    else:
        assert files_in(out_dir) == []  # neither the output nor its temporary file
    assert check_cache_complete(cache) == cached

    rep = tmp_path / "r.json"
    code, _, err = cli(capsys, *args, "--report", rep)
    assert code == 0, err
    engine = json.loads(rep.read_text())["info"]["engine"]
    assert engine["cache_hits"] == cached  # every complete entry is reused
    assert tensors_of(out) == tensors_of(small["reference"])
    assert check_cache_complete(cache) == 24


# ============================================================================ full disks


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_disk_full_while_writing_the_output(small, tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    disk = FullDisk(out_dir, room=small["reference"].stat().st_size // 2)
    monkeypatch.setattr(os, "fdopen", disk)
    code, stdout, err = cli(capsys, "transfer", small["source"], small["target"], small["lora"], "-o",
                            out_dir / "o.safetensors", "--cache-dir", tmp_path / "cache", "-q")
    assert code == 2 and disk.failures == 1
    one_line_error(err, str(out_dir / "o.safetensors"), "No space left on device")
    assert files_in(out_dir) == [] and "wrote" not in stdout
    check_cache_complete(tmp_path / "cache")


def test_real_full_tmpfs_output_and_report(small, small_tmpfs, tmp_path, capsys):
    out_dir = small_tmpfs / "out"
    out_dir.mkdir()
    fill(small_tmpfs, leave=12 * 1024)
    assert small["reference"].stat().st_size > 12 * 1024  # the output cannot fit
    code, stdout, err = cli(capsys, "transfer", small["source"], small["target"], small["lora"], "-o",
                            out_dir / "o.safetensors", "--cache-dir", tmp_path / "cache", "-q")
    assert code == 2
    one_line_error(err, str(out_dir / "o.safetensors"), "No space left on device")
    assert files_in(out_dir) == []
    # the output fits elsewhere, the report does not: a clean error, no partial report
    (small_tmpfs / "filler").unlink()
    fill(small_tmpfs, leave=0)
    code, stdout, err = cli(capsys, "transfer", small["source"], small["target"], small["lora"], "-o",
                            tmp_path / "o.safetensors", "--report", out_dir / "r.json", "--cache-dir",
                            tmp_path / "cache", "-q")
    assert code == 2
    one_line_error(err, str(out_dir / "r.json"), "cannot write: No space left on device")
    assert files_in(out_dir) == []  # no partial report
    assert tensors_of(tmp_path / "o.safetensors") == tensors_of(small["reference"])  # written before, complete


def test_batch_output_folder_that_cannot_be_created(small, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = cli(capsys, "transfer", small["source"], small["target"], small["lora"], small["lora"], "-o",
                       blocker / "out", "--no-cache", "-q")
    assert code == 2
    one_line_error(err, str(blocker / "out"), "Not a directory")
