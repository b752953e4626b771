"""The command line (cli/): normal runs in process (demo, transfer, a batch, similarity, inspect,
cache, backends, bench), error cases as real subprocesses (one line, exit 2, no traceback, no
output file), odd file names in errors, --debug."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from faults import cli, env, one_line_error, run_cli

from prolora.cache import BasisCache
from prolora.cli import main
from prolora.families import open_model
from prolora.formats import read_lora, write_lora
from prolora.lora import LoraFile, LoraModule


def test_demo(tmp_path, capsys):
    assert main(["demo", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "transferred" in out and "mean phi" in out
    assert (tmp_path / "lora_on_target.safetensors").exists()
    assert read_lora(tmp_path / "lora_on_target.safetensors").modules


def test_transfer_with_report(sdxl_pair, tmp_path, capsys):
    out, rep = tmp_path / "o.safetensors", tmp_path / "r.json"
    code = main(["transfer", str(sdxl_pair["source"]), str(sdxl_pair["target"]), str(sdxl_pair["kohya"]),
                 "-o", str(out), "--report", str(rep), "--method", "prolora", "--rank", "2r", "-q"])
    assert code == 0 and out.exists()
    data = json.loads(rep.read_text())
    assert data["info"]["method"] == "prolora" and data["summary"]["transferred"] > 0
    assert {m.rank for m in read_lora(out).modules.values()} == {8}
    assert capsys.readouterr().out.strip().endswith(f"wrote {out}")


def test_transfer_table_and_format(sdxl_pair, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    assert main(["transfer", str(sdxl_pair["source"]), str(sdxl_pair["target"]), str(sdxl_pair["kohya"]),
                 "-o", str(out), "--format", "peft", "--subspace", "rank:16"]) == 0
    text = capsys.readouterr().out
    assert "phi_L" in text and "transferred" in text
    assert read_lora(out).format == "peft"


def test_similarity_json_and_plot(sdxl_pair, tmp_path):
    pytest.importorskip("matplotlib")
    j, p = tmp_path / "s.json", tmp_path / "s.png"
    assert main(["similarity", str(sdxl_pair["source"]), str(sdxl_pair["target"]), "--layers", "attn2",
                 "--json", str(j), "--plot", str(p), "-q"]) == 0
    data = json.loads(j.read_text())
    assert data["layers"] and all("attn2" in r["module"] for r in data["layers"])
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect(sdxl_pair, capsys):
    assert main(["inspect", str(sdxl_pair["kohya"])]) == 0
    text = capsys.readouterr().out
    assert "format: kohya" in text and "family: sdxl" in text
    assert main(["inspect", "--json", str(sdxl_pair["target"])]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["kind"] == "model" and facts["family"] == "sdxl"


def _bad_loras(d: Path, good: Path) -> dict[str, Path]:
    lf = read_lora(good)
    key, m = next(iter(lf.modules.items()))
    bad = {}
    raw = good.read_bytes()
    (d / "truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    bad["truncated"] = d / "truncated.safetensors"
    nan_up = m.up.clone()
    nan_up[0, 0] = float("nan")
    write_lora(d / "nan.safetensors", LoraFile(lf.format, {key: LoraModule(key, m.down, m.up, m.alpha)}, {}))
    # write_lora refuses NaN, so corrupt the bytes of a valid file in place of the up weight
    from safetensors.torch import load_file, save_file

    t = load_file(d / "nan.safetensors")
    t[f"{key}.lora_up.weight"] = nan_up
    save_file(t, d / "nan.safetensors")
    bad["nan"] = d / "nan.safetensors"
    t = load_file(good)
    t["lora_unet_x.hada_w1_a"] = torch.zeros(2, 2)
    save_file(t, d / "loha.safetensors")
    bad["loha"] = d / "loha.safetensors"
    (d / "model.ckpt").write_bytes(b"\x80\x02anything")
    bad["pickle"] = d / "model.ckpt"
    return bad


@pytest.mark.parametrize("case,expect", [
    ("missing", "no such file"), ("truncated", "not a valid safetensors"), ("nan", "NaN"),
    ("loha", "lacks its hada_w1_b"), ("pickle_base", "never unpickles"), ("out_is_input", "overwrite an input"),
    ("bad_option", "subspace mode"), ("wrong_family", "another model"),
])
def test_errors_are_one_line(sdxl_pair, sd15_pair, tmp_path, case, expect):
    bad = _bad_loras(tmp_path, sdxl_pair["kohya"])
    src, tgt, lora = sdxl_pair["source"], sdxl_pair["target"], sdxl_pair["kohya"]
    out = tmp_path / "out" / "o.safetensors"
    out.parent.mkdir()
    extra: list[str] = []
    if case == "missing":
        lora = tmp_path / "nope.safetensors"
    elif case in ("truncated", "nan", "loha"):
        lora = bad[case]
    elif case == "pickle_base":
        src = bad["pickle"]
    elif case == "out_is_input":
        out = lora
    elif case == "bad_option":
        extra = ["--subspace", "energy:2"]
    elif case == "wrong_family":
        lora = sd15_pair["kohya"]
    before = {p: p.stat().st_mtime_ns for p in (Path(src), Path(lora)) if p.exists() and p.is_file()}
    r = run_cli("transfer", src, tgt, lora, "-o", out, *extra)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prolora: error:") and expect in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    if case != "out_is_input":
        assert list(out.parent.iterdir()) == []
    assert before == {p: p.stat().st_mtime_ns for p in before}  # inputs untouched


def test_debug_shows_traceback(tmp_path):
    r = run_cli("--debug", "inspect", tmp_path / "nope.safetensors")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_bench_without_cache_runs_cold_only(tmp_path, capsys):
    """`prolora bench --no-cache` (for models whose bases would outgrow the disk): one cold run
    that stores no bases, the per-shape rows and the accuracy against the float64 reference."""
    out = tmp_path / "bench.json"
    assert main(["bench", "--width", "0.05", "--depth", "0.1", "--dir", str(tmp_path / "b"), "--loras", "1",
                 "--repeats", "1", "--skip-reference", "--no-cache", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["run"] for r in res["end_to_end"]] == ["fast, cold, no cache written"]
    assert res["end_to_end"][0]["cache_hits"] == 0 and not (tmp_path / "b" / "cache").exists()
    assert res["accuracy"]["rel_error_merged_dw"] < 1e-3 and res["accuracy"]["same_gate_decisions"]
    assert res["targets"]["cold_over_floor"] > 0 and all(r["phi_left_vs_f64"] > 0.999 for r in res["shapes"])
    assert "fast, cold, no cache written" in capsys.readouterr().out


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
