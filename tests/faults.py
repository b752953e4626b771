"""Helpers of the fault tests (bad inputs, odd paths, interrupts, full disks, concurrent writers):
run the command line in this process (`cli`) or as a real one (`run_cli`), check its one-line
errors, damage files and LoRAs, snapshot folders, mount read-only / tmpfs folders and fill disks.

Every bad input must give ONE line on stderr (`prolora: error: ...`) that names the file (and the
key, where there is one), a non-zero exit, no Python traceback and no output file. Most cases run
`prolora.cli.main` in process (the same code path as the command, and much faster); the cases
that need a real process (signals, concurrency, exit status of a batch, tracebacks) run
`python -m prolora.cli` as a subprocess. The `small` fixture (conftest.py) is the SDXL pair with a
12-module LoRA they share.
"""
from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from prolora.cli import main
from prolora.formats import read_lora
from prolora.safetensors_io import SafetensorsFile

PYTHON_DIR = str(Path(__file__).resolve().parents[1] / "python")


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = PYTHON_DIR + os.pathsep + e.get("PYTHONPATH", "")
    return e


def run_cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prolora.cli", *map(str, args)], capture_output=True, text=True,
                          env=env(), timeout=timeout)


def cli(capsys, *args) -> tuple[int, str, str]:
    """`prolora ARGS` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str, *expect: str) -> str:
    """The single `prolora: error:` line of stderr, checked to contain every `expect`."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("prolora: error:") and "Traceback" not in err and "internal error" not in err, err
    for e in expect:
        assert e in line, (e, line)
    return line


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def snapshot(*paths: Path) -> dict[Path, tuple]:
    """mtime, size and the first and last 4 KiB of every file under `paths`."""
    out = {}
    for p in paths:
        for f in ([p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())):
            data = f.read_bytes()
            out[f] = (f.stat().st_mtime_ns, data[:4096] + data[-4096:], len(data))
    return out


def header_and_data(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_raw(path: Path, header: dict | bytes, data: bytes | int, length: int | None = None) -> Path:
    """A safetensors-like file: 8-byte length, header, data (bytes, or a size: sparse zeros, no I/O)."""
    h = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h) if length is None else length) + h)
        if isinstance(data, int):
            f.truncate(8 + len(h) + data)
        else:
            f.write(data)
    return path


def tensors_of(path: Path) -> dict[str, tuple]:
    lf = read_lora(path)
    return {k: (m.down.tolist(), m.up.tolist(), m.alpha) for k, m in lf.modules.items()}


def check_cache_complete(root: Path) -> int:
    """Every cache entry opens, is complete and self-consistent; no temporary file is left.
    Returns the number of basis entries."""
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")], files_in(root)
    n = 0
    for p in root.rglob("*.safetensors"):
        with SafetensorsFile(p) as f:
            md = f.metadata
            k = int(md["k"])
            rows, cols = map(int, md["shape"].split("x"))
            assert md["version"] == "1" and set(f.keys()) == {"S", "Ut", "Vt"}
            assert f.info("Ut").shape == (k, rows) and f.info("Vt").shape == (k, cols)
            assert torch.isfinite(f.get("Ut")).all() and torch.isfinite(f.get("S")).all()
        n += 1
    for p in root.rglob("model.json"):
        assert {"id", "name", "family"} <= set(json.loads(p.read_text()))
    return n


def lora_with(small, path: Path, change) -> Path:
    """A copy of the small LoRA's tensors edited by `change(tensors)` (raw: no validation)."""
    from safetensors.torch import load_file

    t = load_file(small["lora"])
    change(t)
    save_file(t, path)
    return path


K0 = "lora_unet_input_blocks_4_1_proj_in"  # a linear weight (64, 64) of the tiny SDXL source


def nan_in_up(t):
    """Edit for lora_with: a NaN in K0's up weight."""
    up = t[f"{K0}.lora_up.weight"].clone()
    up[3, 1] = float("nan")
    t[f"{K0}.lora_up.weight"] = up


def nothing_matches(t):
    """Edit for lora_with: every module renamed to one the source model lacks."""
    for k in list(t):
        t[k.replace("lora_unet_input_blocks_4_1", "lora_unet_nowhere_9")] = t.pop(k)


def try_mount(*args: str) -> bool:
    try:
        return subprocess.run(["mount", *args], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


class FullDisk:
    """File objects for files under `root` whose writes fail with ENOSPC past `room` bytes (in all),
    as a full file system does. Installed over os.fdopen, which the safetensors writer uses."""

    def __init__(self, root: Path, room: int):
        self.root, self.room, self.failures = str(root), room, 0
        self.real = os.fdopen

    def __call__(self, fd, *a, **k):
        f = self.real(fd, *a, **k)
        target = os.readlink(f"/proc/self/fd/{fd}")
        return _Limited(f, self) if target.startswith(self.root) else f


class _Limited:
    def __init__(self, f, disk: FullDisk):
        self._f, self._disk = f, disk

    def write(self, b) -> int:
        n = memoryview(b).nbytes
        if n > self._disk.room:
            self._disk.failures += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._disk.room -= n
        return self._f.write(b)

    def __getattr__(self, name):
        return getattr(self._f, name)


def fill(fs: Path, leave: int) -> None:
    """Fill file system `fs` until about `leave` bytes are free."""
    st = os.statvfs(fs)
    free = st.f_bavail * st.f_frsize
    with open(fs / "filler", "wb") as f:
        f.write(b"\1" * max(free - leave, 0))
