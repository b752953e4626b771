"""The migration manifest: one JSON file in the output folder that records, for every LoRA, the
content hash of its input, the options key, its output and the output's content hash.

The driver is its only writer and rewrites it atomically (temporary file + rename), so a crash
leaves either the previous or the next complete version. A LoRA whose entry matches (same input
hash, same options key, output present with the recorded hash) is complete and skipped on a rerun.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..version import __version__
from ..errors import CorruptFileError
from ..safetensors_io import atomic_path

MANIFEST_NAME = "prolora-manifest.json"
REPORT_NAME = "prolora-migrate-report.json"
MANIFEST_VERSION = 1

PENDING, DONE, FAILED = "pending", "done", "failed"


def file_sha256(path: str | os.PathLike, block: int = 1 << 22) -> str:
    """sha256 hex of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def hash_files(paths: Iterable[Path], threads: int = 8) -> dict[Path, str | None]:
    """sha256 of many files in parallel threads (None for a file that cannot be read)."""
    def one(p: Path) -> str | None:
        try:
            return file_sha256(p)
        except OSError:
            return None

    paths = list(paths)
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(paths)))) as pool:
        return dict(zip(paths, pool.map(one, paths)))


def options_key(described: dict[str, Any]) -> str:
    """A short stable hash of everything that decides an output's bytes."""
    blob = json.dumps(described, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


@dataclass
class Entry:
    """One LoRA of the migration, keyed in the manifest by its output file name."""

    input: str
    status: str = PENDING
    options_key: str = ""
    input_sha256: str | None = None
    output: str | None = None  # file name inside the output folder
    output_sha256: str | None = None
    error: str | None = None
    attempts: int = 0
    worker: str | None = None
    updated: float = field(default_factory=time.time)


@dataclass
class Manifest:
    path: Path
    header: dict[str, Any] = field(default_factory=dict)
    entries: dict[str, Entry] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> "Manifest":
        """The manifest at `path`, or an empty one when there is none yet."""
        if not path.exists():
            return cls(path)
        try:
            data = json.loads(path.read_text())
            entries = {name: Entry(**e) for name, e in data.get("loras", {}).items()}
        except (ValueError, TypeError) as e:
            raise CorruptFileError(f"{path}: not a prolora manifest ({e}); move it away to start afresh") from None
        return cls(path, {k: v for k, v in data.items() if k != "loras"}, entries)

    def save(self) -> None:
        data = {**self.header, "version": MANIFEST_VERSION, "prolora": __version__, "updated": time.time(),
                "loras": {name: asdict(e) for name, e in sorted(self.entries.items())}}
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(data, indent=1) + "\n")

    def complete(self, name: str, input_sha: str | None, key: str, output_sha: str | None) -> bool:
        """Whether `name` is done for this input and these options, with its output intact
        (`output_sha`: the hash of the output file now there, None when there is none)."""
        e = self.entries.get(name)
        return (e is not None and e.status == DONE and e.options_key == key and input_sha is not None
                and e.input_sha256 == input_sha and output_sha is not None and e.output_sha256 == output_sha)
