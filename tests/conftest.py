"""Shared fixtures, for every folder of tests/: small synthetic base-model pairs and LoRAs built once
per session (sdxl_pair, sd15_pair, and `small`, the fault tests' 12-module LoRA with its reference
output), read-only and tmpfs folders for the fault tests, one_thread and diffusers_warnings.

Helpers shared by test modules live in modules of their own beside this file (zoo, faults,
lora_samples, client_sd, client_flux, inmemory_common); no test module imports another."""
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


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Every test runs with one torch thread unless it asks for more: the tests' matrices are tiny,
    where one thread is faster, and two threads per process on a 2-core machine shared with other
    work stall each other (test_api's slowest tests took 10-25x longer with torch's default)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


@pytest.fixture(scope="session")
def small(sdxl_pair, tmp_path_factory):
    """The SDXL pair and a 12-module kohya LoRA (fast to transfer), plus its reference output: the
    fault tests' inputs (tests/faults.py)."""
    from prolora.cli import main
    from prolora.formats import read_lora, write_lora
    from prolora.lora import LoraFile

    d = tmp_path_factory.mktemp("small")
    lf = read_lora(sdxl_pair["kohya"])
    mods = dict(list(lf.modules.items())[:12])
    lora = d / "small.safetensors"
    write_lora(lora, LoraFile(lf.format, mods, lf.metadata, lf.dtype))
    ref = d / "reference.safetensors"
    assert main(["transfer", str(sdxl_pair["source"]), str(sdxl_pair["target"]), str(lora), "-o", str(ref),
                 "--no-cache", "-q"]) == 0
    return {"source": sdxl_pair["source"], "target": sdxl_pair["target"], "lora": lora, "reference": ref,
            "dir": d, "modules": mods}


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder on a read-only bind mount (root ignores permission bits, not a read-only mount)."""
    from faults import try_mount, umount

    d = tmp_path / "ro"
    d.mkdir()
    (d / "existing.txt").write_text("x")
    if not (try_mount("--bind", str(d), str(d)) and try_mount("-o", "remount,ro,bind", str(d))):
        umount(d)
        pytest.skip("cannot make a read-only bind mount here (needs root / CAP_SYS_ADMIN)")
    yield d
    umount(d)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 1 MiB tmpfs (a full disk without any patching); skipped where mount is refused."""
    from faults import try_mount, umount

    d = tmp_path / "tmpfs"
    d.mkdir()
    if not try_mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)):
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN)")
    yield d
    umount(d)


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
