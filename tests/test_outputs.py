"""Reliability and safety (issue 6): hostile or wrong inputs, odd paths, interrupts, full disks,
concurrent cache writers and failing LoRAs in a batch.

Every bad input must give ONE line on stderr (`prolora: error: ...`) that names the file (and the
key, where there is one), a non-zero exit, no Python traceback and no output file. Most cases run
`prolora.cli.main` in process (the same code path as the command, and much faster); the cases
that need a real process (signals, concurrency, exit status of a batch, tracebacks) run
`python -m prolora.cli` as a subprocess.

Header-level corruptions are unit-tested in test_safetensors_io.py and LoRA tensor checks in
test_formats.py; here the same kinds of damage go through the command line, as a LoRA and as a
base model.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from prolora.cache import BasisCache
from prolora.cli import main
from prolora.formats import read_lora, write_lora
from prolora.lora import LoraFile
from prolora.safetensors_io import SafetensorsFile, read_header

PYTHON_DIR = str(Path(__file__).resolve().parents[1] / "python")


# ----------------------------------------------------------------------------- helpers


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


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def small(sdxl_pair, tmp_path_factory):
    """The SDXL pair and a 12-module kohya LoRA (fast to transfer), plus its reference output."""
    d = tmp_path_factory.mktemp("reliability")
    lf = read_lora(sdxl_pair["kohya"])
    mods = dict(list(lf.modules.items())[:12])
    lora = d / "small.safetensors"
    write_lora(lora, LoraFile(lf.format, mods, lf.metadata, lf.dtype))
    ref = d / "reference.safetensors"
    assert main(["transfer", str(sdxl_pair["source"]), str(sdxl_pair["target"]), str(lora), "-o", str(ref),
                 "--no-cache", "-q"]) == 0
    return {"source": sdxl_pair["source"], "target": sdxl_pair["target"], "lora": lora, "reference": ref,
            "dir": d, "modules": mods}


def lora_with(small, path: Path, change) -> Path:
    """A copy of the small LoRA's tensors edited by `change(tensors)` (raw: no validation)."""
    from safetensors.torch import load_file

    t = load_file(small["lora"])
    change(t)
    save_file(t, path)
    return path


# ============================================================================ bad input: files

CORRUPTIONS = ["truncated", "header_beyond_file", "absurd_header", "not_json", "overlap", "out_of_range",
               "hole", "unknown_dtype", "shape_mismatch", "dtype_mismatch", "trailing_bytes", "bad_metadata"]


def corrupt(src: Path, dst: Path, how: str, sparse: bool) -> tuple[Path, str, str | None]:
    """A damaged copy of safetensors file `src`: (path, expected message part, key it must name).
    `sparse`: write the data section as zeros without I/O (base models; only headers matter)."""
    header, data = header_and_data(src)
    entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"])
    data_out: bytes | int = len(data) if sparse else data
    first, (last_key, last) = entries[0], entries[-1]
    key = None
    if how == "truncated":
        size = 8 + len(json.dumps(header, separators=(",", ":"))) + len(data) // 2
        write_raw(dst, header, data_out)
        os.truncate(dst, size)
        return dst, "truncated", None  # names the first tensor past the cut
    if how == "header_beyond_file":
        n = len(json.dumps(header, separators=(",", ":")).encode())
        return write_raw(dst, header, 0, length=n + 1000), "runs past the end", None
    if how == "absurd_header":
        return write_raw(dst, header, data_out, length=2**62), "exceeds the", None
    if how == "not_json":
        raw = json.dumps(header, separators=(",", ":")).encode()
        return write_raw(dst, b"{\x00" + raw[2:], data_out), "not JSON", None
    if how == "overlap":  # the last tensor claims the bytes of the first (either may be named)
        last["data_offsets"] = [first[1]["data_offsets"][0], first[1]["data_offsets"][0] + last["data_offsets"][1]
                                - last["data_offsets"][0]]
        expect = "overlaps the data of another tensor"
    elif how == "out_of_range":
        key = last_key
        size = last["data_offsets"][1] - last["data_offsets"][0]
        last["data_offsets"] = [len(data) + 8, len(data) + 8 + size]
        expect = "data ends at byte"
    elif how == "hole":  # a tensor removed from the header: its bytes become a hole
        del header[entries[len(entries) // 2][0]]
        key = entries[len(entries) // 2 + 1][0]
        expect = "hole"
    elif how == "unknown_dtype":
        key, expect = first[0], "unknown dtype"
        first[1]["dtype"] = "F12"
    elif how == "shape_mismatch":
        key, expect = first[0], "needs"
        first[1]["shape"] = [first[1]["shape"][0] + 1, *first[1]["shape"][1:]] if first[1]["shape"] else [2]
    elif how == "dtype_mismatch":
        key, expect = first[0], "needs"
        first[1]["dtype"] = {"F16": "F32", "BF16": "F32", "F32": "F64"}[first[1]["dtype"]]
    elif how == "trailing_bytes":
        write_raw(dst, header, data + b"\0" * 16 if not sparse else len(data) + 16)
        return dst, "tensors cover", None
    elif how == "bad_metadata":
        header["__metadata__"] = {"a": 1}
        expect = "__metadata__"
    else:
        raise AssertionError(how)
    return write_raw(dst, header, data_out), expect, key


@pytest.mark.parametrize("how", CORRUPTIONS)
@pytest.mark.parametrize("role", ["lora", "source"])
def test_corrupt_safetensors_one_line_error_no_output(small, tmp_path, capsys, role, how):
    src, tgt, lora = small["source"], small["target"], small["lora"]
    victim = lora if role == "lora" else src
    bad, expect, key = corrupt(Path(victim), tmp_path / f"bad {how}.safetensors", how, sparse=role != "lora")
    if role == "lora":
        lora = bad
    else:
        src = bad
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = cli(capsys, "transfer", src, tgt, lora, "-o", out / "o.safetensors", "-q", "--no-cache")
    assert code == 2
    line = one_line_error(err, str(bad), expect)
    if key is not None:
        assert f"'{key}'" in line
    assert files_in(out) == []


def test_header_size_is_bounded_before_reading(tmp_path):
    """What is read before the header is trusted is bounded: a header length past the limit is
    refused without reading it even when the file really is that long (a sparse 4 GiB file), and
    a header just under the limit costs at most about the limit in memory."""
    import tracemalloc

    from prolora.errors import CorruptFileError
    from prolora.safetensors_io import MAX_HEADER_BYTES

    def sparse(name: str, length: int, size: int) -> Path:
        p = tmp_path / name
        with open(p, "wb") as f:
            f.write(struct.pack("<Q", length))
            f.truncate(size)  # sparse: no disk space used
        return p

    cases = [(sparse("huge.safetensors", 4 * 2**30, 4 * 2**30 + 8), "exceeds", 1 << 20),
             (sparse("big.safetensors", MAX_HEADER_BYTES, MAX_HEADER_BYTES + 8), "not JSON", 2.5 * MAX_HEADER_BYTES)]
    for path, expect, bound in cases:
        tracemalloc.start()
        try:
            with pytest.raises(CorruptFileError, match=expect):
                read_header(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < bound, (path.name, peak)


# ============================================================================ bad input: LoRA content

K0 = "lora_unet_input_blocks_4_1_proj_in"  # a linear weight (64, 64) of the tiny SDXL source


def _set(key, value):
    def change(t):
        t[key] = value
    return change


def _nan(t):
    up = t[f"{K0}.lora_up.weight"].clone()
    up[3, 1] = float("nan")
    t[f"{K0}.lora_up.weight"] = up


def _inf(t):
    down = t[f"{K0}.lora_down.weight"].clone()
    down[0, 5] = float("-inf")
    t[f"{K0}.lora_down.weight"] = down


def _zero_rank(t):
    t[f"{K0}.lora_down.weight"] = torch.zeros(0, 64, dtype=torch.float16)
    t[f"{K0}.lora_up.weight"] = torch.zeros(64, 0, dtype=torch.float16)


def _te_twice(t):  # the same SDXL text-encoder-1 module as lora_te_ and lora_te1_
    for prefix in ("lora_te_", "lora_te1_"):
        m = prefix + "text_model_encoder_layers_0_self_attn_q_proj"
        t[f"{m}.lora_down.weight"] = torch.randn(4, 32).half()
        t[f"{m}.lora_up.weight"] = torch.randn(32, 4).half()
        t[f"{m}.alpha"] = torch.tensor(2.0)


def _unet_twice(t):  # proj_in also in the kohya diffusers-style spelling
    m = "lora_unet_down_blocks_1_attentions_0_proj_in"
    for role in ("lora_down.weight", "lora_up.weight", "alpha"):
        t[f"{m}.{role}"] = t[f"{K0}.{role}"].clone()


def _nothing_matches(t):
    for k in list(t):
        t[k.replace("lora_unet_input_blocks_4_1", "lora_unet_nowhere_9")] = t.pop(k)


def _conv_for_linear(t):
    t[f"{K0}.lora_down.weight"] = torch.randn(4, 64, 3, 3).half()
    t[f"{K0}.lora_up.weight"] = torch.randn(64, 4, 1, 1).half()


LORA_CASES = {
    # name: (edit, expected message part, key the message must name)
    "ranks_disagree": (_set(f"{K0}.lora_up.weight", torch.randn(64, 3).half()), "rank", f"{K0}.lora_up.weight"),
    "in_features_mismatch": (_set(f"{K0}.lora_down.weight", torch.randn(4, 65).half()), "does not fit", K0),
    "conv_geometry_for_linear": (_conv_for_linear, "is conv but the weight", K0),
    "conv_up_not_1x1": (_set(f"{K0}.lora_up.weight", torch.randn(64, 4, 3, 3).half()), "", f"{K0}.lora_up.weight"),
    "three_d": (_set(f"{K0}.lora_down.weight", torch.randn(4, 64, 1).half()), "2-D", f"{K0}.lora_down.weight"),
    "nan": (_nan, "NaN or Inf", f"{K0}.lora_up.weight"),
    "inf": (_inf, "NaN or Inf", f"{K0}.lora_down.weight"),
    "zero_rank": (_zero_rank, "rank 0", f"{K0}.lora_down.weight"),
    "alpha_vector": (_set(f"{K0}.alpha", torch.tensor([2.0, 2.0])), "single number", f"{K0}.alpha"),
    "alpha_matrix": (_set(f"{K0}.alpha", torch.ones(1, 2)), "single number", f"{K0}.alpha"),
    "alpha_nan": (_set(f"{K0}.alpha", torch.tensor(float("nan"))), "finite", f"{K0}.alpha"),
    "alpha_bool": (_set(f"{K0}.alpha", torch.tensor(True)), "real number", f"{K0}.alpha"),
    "alpha_orphan": (_set("lora_unet_nowhere.alpha", torch.tensor(1.0)), "belongs to no module", "lora_unet_nowhere.alpha"),
    "integer_weights": (_set(f"{K0}.lora_down.weight", torch.ones(4, 64, dtype=torch.int32)), "floating point",
                        f"{K0}.lora_down.weight"),
    "up_missing": (lambda t: t.pop(f"{K0}.lora_up.weight"), "no matching up", f"{K0}.lora_down.weight"),
    "te_two_spellings": (_te_twice, "both adapt", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"),
    "unet_two_spellings": (_unet_twice, "both adapt", "lora_unet_down_blocks_1_attentions_0_proj_in"),
    "nothing_matches_source": (_nothing_matches, "only 0 of 12 modules exist", "lora_unet_nowhere_9"),
    "unknown_keys": (_set("model.some_weight", torch.ones(2)), "no known LoRA format", "model.some_weight"),
    "dora": (_set(f"{K0}.dora_scale", torch.ones(1, 64).half()), "DoRA", f"{K0}.dora_scale"),
}


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_invalid_lora_content_one_line_error_no_output(small, tmp_path, capsys, case):
    edit, expect, key = LORA_CASES[case]
    bad = lora_with(small, tmp_path / f"{case}.safetensors", edit)
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = cli(capsys, "transfer", small["source"], small["target"], bad, "-o", out, "--no-cache", "-q")
    assert code == 2
    one_line_error(err, str(bad), expect, key)
    assert files_in(out) == []


def test_empty_safetensors_is_no_lora(small, tmp_path, capsys):
    bad = tmp_path / "empty.safetensors"
    save_file({}, bad)
    code, _, err = cli(capsys, "transfer", small["source"], small["target"], bad, "-o", tmp_path / "o.safetensors")
    assert code == 2
    one_line_error(err, str(bad), "holds no tensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_missing_alpha_means_scale_one_as_in_kohya(small, tmp_path, capsys):
    """A kohya module without `.alpha` is not an error: kohya/diffusers read it as alpha = rank."""
    lora = lora_with(small, tmp_path / "noalpha.safetensors", lambda t: t.pop(f"{K0}.alpha"))
    out = tmp_path / "o.safetensors"
    code, _, err = cli(capsys, "transfer", small["source"], small["target"], lora, "-o", out, "--no-cache", "-q",
                       "--method", "copy")
    assert code == 0, err
    m = read_lora(out).modules[K0]
    assert m.alpha == m.rank == 4  # scale 1, the same dW as the input's
    assert read_lora(lora).modules[K0].alpha is None


def test_some_keys_matching_nothing_are_skipped_and_reported(small, tmp_path, capsys):
    """Under half of the modules unknown to the source: those are skipped with a reason."""
    def rename_one(t):
        for role in ("lora_down.weight", "lora_up.weight", "alpha"):
            t[f"lora_unet_nowhere_0.{role}"] = t.pop(f"{K0}.{role}")

    lora = lora_with(small, tmp_path / "partly.safetensors", rename_one)
    out, rep = tmp_path / "o.safetensors", tmp_path / "r.json"
    code, _, err = cli(capsys, "transfer", small["source"], small["target"], lora, "-o", out, "--report", rep,
                       "--no-cache", "-q")
    assert code == 0, err
    layers = json.loads(rep.read_text())["layers"]
    skipped = [r for r in layers if r["source_key"] == "lora_unet_nowhere_0"]
    assert len(layers) == 12 and skipped and skipped[0]["reason"] == "no such module in the source model"
    assert "lora_unet_nowhere_0" not in read_lora(out).modules


# ============================================================================ bad input: base models


def test_lora_for_another_family(sdxl_pair, sd15_pair, tmp_path, capsys):
    """An SDXL LoRA given with an SD1.5 pair (the reverse case is in test_cli.py)."""
    code, _, err = cli(capsys, "transfer", sd15_pair["source"], sd15_pair["target"], sdxl_pair["kohya"], "-o",
                       tmp_path / "o.safetensors", "--no-cache")
    assert code == 2
    one_line_error(err, str(sdxl_pair["kohya"]), "modules exist in source model", "another model")
    assert files_in(tmp_path) == []


def test_sd15_given_where_sdxl_expected(small, sd15_pair, tmp_path, capsys):
    """An SD1.5 checkpoint passed as the target of an SDXL transfer."""
    code, _, err = cli(capsys, "transfer", small["source"], sd15_pair["target"], small["lora"], "-o",
                       tmp_path / "o.safetensors", "--no-cache")
    assert code == 2
    one_line_error(err, "is sdxl but target", "is sd1", "cross-family transfer is not supported")
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("what", ["lora_as_base", "empty_folder", "folder_of_text", "vae_like"])
def test_base_that_is_not_a_base_model(small, tmp_path, capsys, what):
    if what == "lora_as_base":
        base, expect = small["lora"], "no UNet keys"
    elif what == "empty_folder":
        base, expect = tmp_path / "empty", "without model weights"
        base.mkdir()
    elif what == "folder_of_text":
        base, expect = tmp_path / "pipe", "no weights"
        (base / "unet").mkdir(parents=True)
        (base / "model_index.json").write_text("{}")
        (base / "unet" / "README.txt").write_text("hello")
    else:
        base, expect = tmp_path / "vae.safetensors", "no UNet keys"
        save_file({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)}, base)
    code, _, err = cli(capsys, "transfer", base, small["target"], small["lora"], "-o", tmp_path / "o.safetensors")
    assert code == 2
    one_line_error(err, str(base), expect)
    assert not (tmp_path / "o.safetensors").exists()


# ----------------------------------------------------------------------------- pickles


class _Payload:
    """Unpickling this creates the folder `marker`: proof of code execution at load time."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_pickled_files_are_refused_and_never_unpickled(small, tmp_path, capsys):
    marker = tmp_path / "UNPICKLED"
    payload = pickle.dumps(_Payload(str(marker)), protocol=2)
    # the payload is live: loading it (here, on purpose) runs code
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(str(probe)), protocol=2))
    assert probe.is_dir()

    pickles = tmp_path / "pickles"
    pickles.mkdir()
    files = {}
    for name in ("model.ckpt", "model.pt", "model.bin", "model.pth", "lora.pt"):
        files[name] = pickles / name
        files[name].write_bytes(payload)
    torch.save({"w": _Payload(str(marker))}, pickles / "zip.safetensors")  # zip container, wrong suffix
    files["zip.safetensors"] = pickles / "zip.safetensors"
    files["raw.safetensors"] = pickles / "raw.safetensors"  # raw pickle, wrong suffix
    files["raw.safetensors"].write_bytes(payload)
    pipe = tmp_path / "pickled_pipeline"  # a diffusers folder with .bin weights only
    (pipe / "unet").mkdir(parents=True)
    (pipe / "model_index.json").write_text("{}")
    (pipe / "unet" / "config.json").write_text("{}")
    (pipe / "unet" / "diffusion_pytorch_model.bin").write_bytes(payload)

    out = tmp_path / "out"
    out.mkdir()
    runs = [("source", p) for p in files.values()] + [("lora", p) for p in files.values()] + [("source", pipe)]
    for role, p in runs:
        src, lora = (p, small["lora"]) if role == "source" else (small["source"], p)
        code, _, err = cli(capsys, "transfer", src, small["target"], lora, "-o", out / "o.safetensors", "--no-cache")
        assert code == 2, (role, p)
        one_line_error(err, str(p if p != pipe else pipe / "unet"), "never unpickles")
    for p in files.values():
        code, _, err = cli(capsys, "inspect", p)
        assert code == 2
        one_line_error(err, str(p), "never unpickles")
    assert not marker.exists() and files_in(out) == []


# ============================================================================ bad input: paths


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


def _try_mount(*args: str) -> bool:
    try:
        return subprocess.run(["mount", *args], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder on a read-only bind mount (root ignores permission bits, not a read-only mount)."""
    d = tmp_path / "ro"
    d.mkdir()
    (d / "existing.txt").write_text("x")
    if not (_try_mount("--bind", str(d), str(d)) and _try_mount("-o", "remount,ro,bind", str(d))):
        _umount(d)
        pytest.skip("cannot make a read-only bind mount here (needs root / CAP_SYS_ADMIN)")
    yield d
    _umount(d)


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


def test_odd_names_in_errors_stay_one_line(small, tmp_path, capsys):
    """A file name with a newline still gives a one-line error; one with bytes that are not UTF-8
    gives one from a real process (no UnicodeEncodeError on the way out)."""
    bad = tmp_path / "two\nlines.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    code, _, err = cli(capsys, "inspect", bad)
    assert code == 2
    one_line_error(err, "two lines.safetensors", "not JSON")
    raw = os.fsencode(tmp_path) + b"/caf\xe9 \xff.safetensors"  # latin-1 bytes in a UTF-8 world
    with open(raw, "wb") as f:
        f.write(b"\x80\x02junk")
    r = subprocess.run([sys.executable, "-m", "prolora.cli", "inspect", raw], capture_output=True, env=env(),
                       timeout=300)
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 2 and "Traceback" not in err and "never unpickles" in err
    assert len(err.strip().splitlines()) == 1


# ============================================================================ faults: interrupts

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
    ("compute", 5, signal.SIGINT, 12),  # first target shape group: the 12 source bases are cached
    ("cache-write", 3, signal.SIGTERM, 2),  # in the middle of writing the 3rd cache entry
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
    assert files_in(out_dir) == []  # neither the output nor its temporary file
    assert check_cache_complete(cache) == cached

    rep = tmp_path / "r.json"
    code, _, err = cli(capsys, *args, "--report", rep)
    assert code == 0, err
    engine = json.loads(rep.read_text())["info"]["engine"]
    assert engine["cache_hits"] == cached  # every complete entry is reused
    assert tensors_of(out) == tensors_of(small["reference"])
    assert check_cache_complete(cache) == 24


# ============================================================================ faults: disk full


class _FullDisk:
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
    def __init__(self, f, disk: _FullDisk):
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


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_disk_full_while_writing_the_output(small, tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    disk = _FullDisk(out_dir, room=small["reference"].stat().st_size // 2)
    monkeypatch.setattr(os, "fdopen", disk)
    code, stdout, err = cli(capsys, "transfer", small["source"], small["target"], small["lora"], "-o",
                            out_dir / "o.safetensors", "--cache-dir", tmp_path / "cache", "-q")
    assert code == 2 and disk.failures == 1
    one_line_error(err, str(out_dir / "o.safetensors"), "No space left on device")
    assert files_in(out_dir) == [] and "wrote" not in stdout
    check_cache_complete(tmp_path / "cache")


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_disk_full_while_writing_the_cache(small, tmp_path, capsys, monkeypatch):
    """The cache is an optimisation: a full disk there costs the entries, not the run."""
    cache = tmp_path / "cache"
    disk = _FullDisk(cache, room=60_000)  # room for a few of the 24 entries
    monkeypatch.setattr(os, "fdopen", disk)
    out = tmp_path / "o.safetensors"
    code, stdout, err = cli(capsys, "transfer", small["source"], small["target"], small["lora"], "-o", out,
                            "--cache-dir", cache, "-q")
    assert code == 0 and disk.failures > 0
    assert err.strip().splitlines() == [f"prolora: warning: basis cache {cache}: cannot write (No space left on "
                                        "device); continuing without caching"]
    assert tensors_of(out) == tensors_of(small["reference"])
    assert 0 < check_cache_complete(cache) < 24  # what fitted is complete; the rest is absent


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 1 MiB tmpfs (a full disk without any patching); skipped where mount is refused."""
    d = tmp_path / "tmpfs"
    d.mkdir()
    if not _try_mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)):
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN)")
    yield d
    _umount(d)


def fill(fs: Path, leave: int) -> None:
    """Fill file system `fs` until about `leave` bytes are free."""
    st = os.statvfs(fs)
    free = st.f_bavail * st.f_frsize
    with open(fs / "filler", "wb") as f:
        f.write(b"\1" * max(free - leave, 0))


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


def test_batch_output_folder_that_cannot_be_created(small, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = cli(capsys, "transfer", small["source"], small["target"], small["lora"], small["lora"], "-o",
                       blocker / "out", "--no-cache", "-q")
    assert code == 2
    one_line_error(err, str(blocker / "out"), "Not a directory")


# ============================================================================ faults: concurrency


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


# ============================================================================ faults: batch


def test_batch_reports_failing_loras_and_completes_the_rest(small, tmp_path):
    d = tmp_path / "loras"
    d.mkdir()
    good_a, good_b = d / "a.safetensors", d / "c.safetensors"
    good_a.write_bytes(small["lora"].read_bytes())
    good_b.write_bytes(small["lora"].read_bytes())
    truncated = d / "b_truncated.safetensors"
    truncated.write_bytes(small["lora"].read_bytes()[:5000])
    nan = lora_with(small, d / "b_nan.safetensors", _nan)
    other = d / "b_mismatch.safetensors"
    lora_with(small, other, _nothing_matches)
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
