"""Opening a model (families/opening.py): a path no family can read as a base model (a LoRA, an empty
folder, a pipeline folder without weights, a VAE) is refused in one line that names it and says
why, before any work. `small` is conftest's SDXL pair; tests/faults.py has the helpers."""
from __future__ import annotations

import pytest
import torch
from faults import cli, one_line_error
from safetensors.torch import save_file


@pytest.mark.parametrize("what", ["lora_as_base", "empty_folder", "folder_of_text", "vae_like"])
def test_base_that_is_not_a_base_model(small, tmp_path, capsys, what):
    if what == "lora_as_base":
        base, expect = small["lora"], "a LoRA, not a base model"
    elif what == "empty_folder":
        base, expect = tmp_path / "empty", "without model weights"
        base.mkdir()
    elif what == "folder_of_text":
        base, expect = tmp_path / "pipe", "no weights"
        (base / "unet").mkdir(parents=True)
        (base / "model_index.json").write_text("{}")
        (base / "unet" / "README.txt").write_text("hello")
    else:
        base, expect = tmp_path / "vae.safetensors", "a VAE, not a diffusion model"
        save_file({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)}, base)
    code, _, err = cli(capsys, "transfer", base, small["target"], small["lora"], "-o", tmp_path / "o.safetensors")
    assert code == 2
    one_line_error(err, str(base), expect)
    assert not (tmp_path / "o.safetensors").exists()
