"""Smoke test of the quality benchmark's pieces (benchmarks/quality), in seconds: data, model
surgery, LoRA files, scoring and tables. The benchmark's training itself is not run here."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import prolora  # noqa: E402
from benchmarks.quality import config, data, models, pipeline, report, sweep, train  # noqa: E402
from benchmarks.quality.stages import save_lora  # noqa: E402
from prolora.formats import read_lora  # noqa: E402


def test_images_are_deterministic_and_balanced():
    a, la = data.dataset("style", 16, seed=3)
    b, lb = data.dataset("style", 16, seed=3)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert a.shape == (16, 3, data.SIZE, data.SIZE) and a.min() >= -1 and a.max() <= 1
    assert torch.bincount(la).tolist() == [4, 4, 4, 4]
    assert not torch.equal(data.dataset("base", 16, seed=3)[0], data.dataset("shift", 16, seed=3)[0])


def test_pruned_model_keeps_the_named_source_blocks():
    torch.set_num_threads(1)
    src = models.new_model(models.SOURCE_UNET, seed=0)
    pruned = models.prune(src)
    s, p = src.unet.state_dict(), pruned.unet.state_dict()
    assert len(p) < len(s)
    for attn, keep in models.PRUNED_KEEP.items():
        name = f"{attn}.transformer_blocks.0.attn1.to_q.weight"
        assert torch.equal(p[name], s[f"{attn}.transformer_blocks.{keep}.attn1.to_q.weight"])
        assert f"{attn}.transformer_blocks.1.attn1.to_q.weight" not in p
    x = torch.randn(2, 3, data.SIZE, data.SIZE)
    assert pruned.eps(x, torch.tensor([5, 500]), torch.tensor([0, models.NULL])).shape == x.shape


def test_lora_file_round_trip_merge_and_transfer(tmp_path):
    torch.set_num_threads(1)
    base = models.new_model(models.SOURCE_UNET, seed=0)
    lora, log = train.train_lora(base, steps=2, seed=0, rank=2)
    assert len(lora) == 124 and all(up.shape[1] == 2 for _, up in lora.values())  # 11 blocks x 10 + 7 x 2
    save_lora(tmp_path / "l.safetensors", lora, 2)
    lf = read_lora(tmp_path / "l.safetensors")
    assert lf.format == "peft" and len(lf.modules) == 124
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    assert models.merge_lora(base.unet, lf.modules) == 124
    models.merge_lora(base.unet, lf.modules, sign=-1.0)
    after = base.unet.state_dict()
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)
    models.save_model(base, tmp_path / "m")
    res = prolora.transfer(tmp_path / "m" / "unet", tmp_path / "m" / "unet", lf, cache=False)
    ag = prolora.compare(res.lora, lf, base=tmp_path / "m" / "unet").agreement.summary()
    assert ag["cosine"] > 0.999  # prolora-full on the same model gives the LoRA back


def test_sampler_shapes():
    torch.set_num_threads(1)
    m = models.new_model(models.SOURCE_UNET, seed=0).eval()
    out = models.sample(m, torch.tensor([0, 1, 2]), seed=1, steps=2)
    assert out.shape == (3, 3, data.SIZE, data.SIZE) and out.abs().max() <= 1


def test_stage_keys_follow_settings_and_inputs():
    a = pipeline.stage_keys(config.Config(), "lib1")
    b = pipeline.stage_keys(config.Config(source_steps=7), "lib1")
    c = pipeline.stage_keys(config.Config(), "lib2")
    assert a["source"] != b["source"] and a["eval-finetune"] != b["eval-finetune"]  # downstream follows
    assert a["classifiers"] == b["classifiers"]
    assert a["source"] == c["source"] and a["eval-pruned"] != c["eval-pruned"]  # library: evals only


def test_tables_from_rows(tmp_path):
    def row(group, label, **kw):
        s = {"cosine": 0.5, "rel_error": 0.9, "gap_closed": 0.8, "loss": 0.1, "loss_closed": 0.7,
             "style": 0.5, "content": 0.9, "extra": {}}
        return {"group": group, "label": label, "layers": 110, "transferred": 100, "min_phi": 0.7,
                "mean_phi": 0.9, "k_min": 3, "k_max": 40, "scores": s, **kw}
    for t in config.TARGETS:
        rows = [row("main", c.label) for c in sweep.candidates(t) if c.group == "main"]
        rows += [row(c.group, c.label, **c.extra) for c in sweep.candidates(t) if c.group != "main"]
        (tmp_path / f"eval-{t}").mkdir()
        (tmp_path / f"eval-{t}" / "rows.json").write_text(json.dumps(rows))
    (tmp_path / "eval-source").mkdir()
    (tmp_path / "eval-source" / "rows.json").write_text(json.dumps([row("main", "no LoRA")]))
    (tmp_path / "classifiers").mkdir()
    (tmp_path / "classifiers" / "stage.json").write_text(json.dumps({"held_out_accuracy": {"content_base": 1.0}}))
    block = report.tables(tmp_path)
    assert "| prolora-full | 100/110 |" in block and "| energy:0.9 |" in block and "--match" in block
    md = tmp_path / "R.md"
    md.write_text(f"intro\n{report.MARK_BEGIN}\nold\n{report.MARK_END}\nend\n")
    assert report.update_results(md, block)
    assert md.read_text().startswith("intro\n") and "old" not in md.read_text() and md.read_text().endswith("end\n")


def test_refine_builds_the_benchmark_unet(tmp_path):
    """The benchmark's UNet is of no known SD size (its model reads as member "unknown"): refinement
    still finds the SD part that builds it, and the denoiser is diffusers' class with its weights."""
    from prolora.families import open_model
    from prolora.refine.denoisers import build_denoiser

    torch.set_num_threads(1)
    models.save_model(models.new_model(models.SOURCE_UNET, seed=0), tmp_path / "m")
    with open_model(tmp_path / "m" / "unet") as m:
        assert m.family == "unknown"
        net = build_denoiser(m)
    want = models.load_model(tmp_path / "m").unet.state_dict()
    got = dict(net.named_parameters())
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert torch.equal(got[name].detach().float(), want[name].float())
