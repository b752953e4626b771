"""Shared fixtures: small synthetic base-model pairs and LoRAs, built once per session."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Without a GPU the Triton kernels run under the interpreter. Triton reads this when it is
# imported (its own @jit helpers such as tl.cdiv become interpretable only then), and diffusers,
# peft or hypothesis may import it during collection, so it is set here, before any test module.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
except ImportError:
    pass
# the tests never touch the user's basis cache, and leave no cache behind
os.environ["PROLORA_CACHE_DIR"] = tempfile.mkdtemp(prefix="prolora-test-cache-")
atexit.register(shutil.rmtree, os.environ["PROLORA_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one torch thread is faster, and 20-30x faster than two on a busy 2-core box.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def sdxl_pair(tmp_path_factory):
    """A tiny SDXL-shaped source (single file) and target (diffusers folder), plus LoRAs."""
    from prolora.synthetic import write_lora, write_pair

    d = tmp_path_factory.mktemp("sdxl_pair")
    source, target = write_pair(d / "source.safetensors", d / "target", "sdxl:tiny", seed=0)
    return {
        "dir": d, "source": source, "target": target,
        "kohya": write_lora(source, d / "kohya.safetensors", format="kohya", rank=4, targets="transformer"),
        "peft": write_lora(source, d / "peft.safetensors", format="peft", rank=4, targets="attn", seed=1),
        "conv": write_lora(source, d / "conv.safetensors", format="kohya", rank=4, targets="all", conv=True, seed=2),
    }


@pytest.fixture(scope="session")
def sd15_pair(tmp_path_factory):
    """A tiny SD1.5-shaped source (diffusers folder) and target (single file), plus a kohya LoRA."""
    from prolora.synthetic import write_lora, write_pair

    d = tmp_path_factory.mktemp("sd15_pair")
    source, target = write_pair(d / "source", d / "target.safetensors", "sd15:tiny", seed=3)
    return {"dir": d, "source": source, "target": target,
            "kohya": write_lora(source, d / "kohya.safetensors", format="kohya", rank=4, targets="transformer")}


@pytest.fixture
def diffusers_warnings():
    """The unexpected-keys checks read diffusers' warnings: whatever verbosity an earlier test module
    left (the client tests silence diffusers), warnings are on for the test, and restored after.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("diffusers_warnings")`."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_warning()
    yield
    dlog.set_verbosity(level)
