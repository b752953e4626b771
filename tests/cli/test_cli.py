"""The command line: normal runs in process, error cases as real subprocesses (one line, exit 2,
no traceback, no output file)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prolora.cli import main
from prolora.formats import read_lora, write_lora
from prolora.lora import LoraFile, LoraModule


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2] / "python")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "prolora.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


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
    ("loha", "LoHa"), ("pickle_base", "never unpickles"), ("out_is_input", "overwrite an input"),
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
