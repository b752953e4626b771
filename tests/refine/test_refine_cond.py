"""`--refine`'s conditioning as users have it (issue 27): the models' own text encoders from the
files they hold, or a one-line refusal; stated random context reported as stated.

- no text encoder anywhere: `--refine N` alone refuses in one line (exit 2, nothing written),
  naming what it looked for and the three ways to give one; `--refine-cond random` without a token
  count likewise; stated random context runs and the report gives its token count and scale, and
  the held-out check at the family's token count too (the stated count cannot be verified);
- an SDXL single-file pair whose files embed CLIP-L and OpenCLIP-G (as users have them) refines
  with those encoders by default and the report names them; the context is the embedded weights'
  output: equal to transformers' own encoders built from a pipeline folder holding the same
  weights, on the same token ids;
- `--text-encoder FILE` gives encoders to models that carry none.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("diffusers")

import prolora  # noqa: E402
from prolora.cli import main  # noqa: E402
from prolora.families import open_model  # noqa: E402
from prolora.formats import read_lora  # noqa: E402
from prolora.refine import RefineOptions  # noqa: E402
from prolora.refine.conditioning import pools, resolve  # noqa: E402
from prolora.refine.tokens import random_ids  # noqa: E402
from prolora.synthetic import PRESETS, shrink, write_lora, write_model, write_pair  # noqa: E402

SDXL = shrink(PRESETS["sdxl"], 0.05, 0.1)
FAST = ["--refine-batch", "2", "--refine-resolution", "8", "--refine-holdout", "2"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """An SDXL pair as single files with their encoders embedded, the source also as a folder
    (same seed: the same weights), a LoRA and its plain transfer."""
    d = tmp_path_factory.mktemp("single")
    kw = dict(dtype=torch.float32)
    src = write_model(d / "src.safetensors", SDXL, layout="single-file", seed=1, **kw)
    folder = write_model(d / "src_folder", SDXL, layout="diffusers", seed=1, **kw)
    tgt = write_model(d / "tgt.safetensors", SDXL, layout="single-file", seed=1, base=src, perturbation=0.03, **kw)
    lora = write_lora(src, d / "style.safetensors", format="kohya", rank=4, targets="transformer")
    plain = prolora.transfer(src, tgt, lora, d / "plain.safetensors", cache=False)
    return {"dir": d, "src": src, "folder": folder, "tgt": tgt, "lora": lora, "plain": plain.output}


def _fails(capsys, argv: list[str], out: Path, *words: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("prolora: error:"), err
    assert all(w in err for w in words), err
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]
    return err


def test_no_encoder_refuses_or_runs_as_stated(single, capsys):
    """Bare UNet folders (no encoder, no tokenizer): the default refuses; stated random context runs."""
    d = single["dir"]
    src, tgt = d / "bare_src", d / "bare_tgt"
    if not src.exists():
        write_pair(src / "x", tgt / "x", SDXL, seed=1, dtype=torch.float32, perturbation=0.03)
    s_unet, t_unet = src / "x" / "unet", tgt / "x" / "unet"
    lora = write_lora(s_unet, d / "bare_lora.safetensors", format="peft", rank=4, targets="transformer")
    plain = prolora.transfer(s_unet, t_unet, lora, d / "bare_plain.safetensors", cache=False).output
    out = d / "bare_out.safetensors"
    base = ["transfer", str(s_unet), str(t_unet), str(lora), "-o", str(out), "--no-cache", "--refine", "150"]
    _fails(capsys, base, out, "no text encoder", "--text-encoder FILE", "pipeline folder",
           "--refine-cond random --refine-tokens N", "looked for")
    _fails(capsys, base + ["--refine-cond", "random"], out, "without --refine-tokens")
    _fails(capsys, base + ["--refine-cond", "prompts"], out, "no text encoder")
    rc = main(["refine", str(s_unet), str(t_unet), str(lora), str(plain), "-o", str(out), "--refine", "2",
               "--refine-cond", "random", "--refine-tokens", "1", *FAST, "--report", str(d / "bare.json")])
    text = capsys.readouterr().out
    assert rc == 0 and out.exists(), text
    c = json.loads((d / "bare.json").read_text())["refine"]["conditioning"]
    assert c["kind"] == "random" and "1 tokens, unit scale" in c["context"] and c["source"] == "none"
    assert "cannot reveal a wrong --refine-tokens" in c["held_out"]
    assert "refine: conditioning random: random Gaussian context, 1 tokens, unit scale" in text
    probes = json.loads((d / "bare.json").read_text())["refine"]["probes"]
    assert list(probes) == ["77 tokens"] and len(probes["77 tokens"]) == 2  # the family's count, as a probe
    assert "the same check at other token counts" in text


def test_single_file_pair_refines_with_its_embedded_encoders(single, capsys):
    d = single["dir"]
    out = d / "refined.safetensors"
    rc = main(["transfer", str(single["src"]), str(single["tgt"]), str(single["lora"]), "-o", str(out),
               "--no-cache", "--refine", "2", *FAST, "--report", str(d / "report.json")])
    text = capsys.readouterr().out
    assert rc == 0, text
    c = json.loads((d / "report.json").read_text())["info"]["refine"]["conditioning"]
    assert c["kind"] == "prompts" and "random token ids" in c["context"]  # the tiny encoders' vocabulary is not CLIP's
    for side, name in (("source", "src.safetensors"), ("target", "tgt.safetensors")):
        assert f"text_encoder embedded in {name}, keys conditioner.embedders.0.transformer.*" in c[side], c
        assert f"text_encoder_2 embedded in {name}, keys conditioner.embedders.1.model.*" in c[side], c
    assert "embedded in src.safetensors" in text and "embedded in tgt.safetensors" in text
    meta = json.loads(read_lora(out).metadata["prolora.refine"])
    assert "embedded in src.safetensors" in meta["encoders"]


def test_the_context_is_the_embedded_encoders_output(single):
    """The training pool equals transformers' CLIPTextModel / CLIPTextModelWithProjection built by
    from_pretrained from the folder holding the same weights, on the same token ids: penultimate
    states of both, concatenated, and the second's projected pooled output."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    opts = RefineOptions(steps=1)
    with open_model(single["src"]) as s:
        plan = resolve(opts, read_lora(single["lora"]), (s, s))
        encs = plan.encoders[0]
        assert [e.role for e in encs] == ["clip", "clip2"] and [e.kind for e in encs] == ["clip", "openclip"]
        (train, _), (held, _) = pools(plan, (s, s), 77, "cpu", None, seed=0, holdout=2)
        ids = random_ids(encs[0], 32, 77, seed=11)
        assert torch.equal(ids, random_ids(encs[1], 32, 77, seed=11))  # one vocabulary: the same prompts
    f = single["folder"]
    te1 = CLIPTextModel.from_pretrained(f / "text_encoder", local_files_only=True).eval()
    te2 = CLIPTextModelWithProjection.from_pretrained(f / "text_encoder_2", local_files_only=True).eval()
    with torch.no_grad():
        a, b = te1(ids, output_hidden_states=True), te2(ids, output_hidden_states=True)
        # the pooled output at each prompt's end token (the folder's config names CLIP's 49407, outside
        # this shrunken 1000-token vocabulary, so transformers' own pooling cannot find it)
        end = (ids == te2.config.vocab_size - 1).int().argmax(-1)
        pooled = te2.text_projection(b.last_hidden_state[torch.arange(len(ids)), end])
    want = torch.cat([a.hidden_states[-2], b.hidden_states[-2]], -1)
    assert train.hidden.shape == want.shape == (32, 77, want.shape[-1])
    assert torch.allclose(train.hidden, want, atol=1e-5, rtol=1e-4)
    assert torch.allclose(train.pooled, pooled, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(held.hidden[:16], train.hidden[:16])  # the held-out pool is other prompts


def test_text_encoder_files_for_models_without_encoders(single, capsys):
    """Bare UNet folders plus --text-encoder: the folder's CLIP-L and CLIP-G (transformers names,
    as HF and ComfyUI files have them) give the context; one of the two is refused in one line."""
    d = single["dir"]
    f = single["folder"]
    te1 = f / "text_encoder" / "model.safetensors"
    te2 = f / "text_encoder_2" / "model.safetensors"
    s_unet = f / "unet"
    lora = write_lora(s_unet, d / "te_lora.safetensors", format="peft", rank=4, targets="transformer")
    plain = prolora.transfer(s_unet, s_unet, lora, d / "te_plain.safetensors", cache=False).output
    out = d / "te_out.safetensors"
    base = ["refine", str(s_unet), str(s_unet), str(lora), str(plain), "-o", str(out), "--refine", "1", *FAST]
    _fails(capsys, base + ["--text-encoder", str(te2)], out, "--text-encoder", "context")
    rc = main(base + ["--text-encoder", str(te2), "--text-encoder", str(te1), "--report", str(d / "te.json")])
    assert rc == 0, capsys.readouterr()
    c = json.loads((d / "te.json").read_text())["refine"]["conditioning"]
    assert f"--text-encoder {te1}" in c["source"] and f"--text-encoder {te2}" in c["source"]
    assert c["source"].index(str(te1)) < c["source"].index(str(te2))  # CLIP-L first: the narrower one
