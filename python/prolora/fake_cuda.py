"""Run the CUDA code path on a machine without a GPU, strictly: tensors that say they live on
`cuda:0` but compute on the host, with the checks a real device would make and the accounting
a real device would need.

Inside `FakeCuda()`:
- `torch.cuda.is_available()` is True; `.to("cuda")`, `.cuda()`, `device="cuda"` factories,
  streams, events and CUDA generators work (streams and events in `prolora.fake_streams`);
- every op on a fake CUDA tensor runs on its host copy and returns fake CUDA tensors;
- an op that mixes a fake CUDA tensor with a host tensor of one or more dimensions raises
  `DeviceMismatch`, as CUDA would (0-d host scalars are allowed, as on CUDA);
- copies between the devices are counted (bytes each way). A non-blocking copy needs pinned
  host memory (`UnpinnedCopy` otherwise); a blocking one is a host synchronization;
- host synchronizations are counted (`Ledger.syncs`: scalar reads such as `float(t)`, `.tolist()`,
  data-dependent shapes, the error checks of eigh and svd, blocking copies, synchronize calls),
  in the thread that entered the context (the engine's compute thread) apart from worker threads;
- stream order is enforced (`StreamRace`, `HostRace`: see prolora.fake_streams);
- live device bytes (distinct storages of live fake CUDA tensors, as torch.cuda.memory_allocated
  counts them) and their peak are tracked;
- linear algebra on host tensors larger than `heavy_bytes` (default 0: any) is recorded in
  `host_compute`: on a CUDA run the bases, similarity and projection run on the device, so a test
  asserts that list is empty.

Worker threads see the device too when they run through `prolora.engine.device.in_worker` (the
modes are thread-local; this context registers itself there). torch's own FakeTensorMode is as
strict about devices but holds no data, and a transfer reads data (the energy rule picks k from
the spectrum; the gate reads phi), so this mode keeps real values. It is a test and dry-run
instrument, not a device: host speed.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from . import fake_streams as fs
from .fake_streams import DEVICE, HostRace, StreamRace, UnpinnedCopy  # noqa: F401  (re-exported)

NAME = "Fake CUDA (host tensors)"


class DeviceMismatch(RuntimeError):
    """An op mixed device and host tensors, which CUDA refuses."""


class FakeCudaTensor(torch.Tensor):
    """A tensor that reports cuda:0 and holds its values in `elem`, a host tensor. Its C++ side
    is on the meta device, so no kernel can run on it by accident: every op goes through the
    mode."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        t = torch.Tensor._make_wrapper_subclass(cls, elem.size(), strides=elem.stride(),
                                                storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                device="meta", requires_grad=elem.requires_grad)
        t.elem = elem
        return t

    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def device(self) -> torch.device:  # noqa: D401
        return DEVICE

    @property
    def is_cuda(self) -> bool:
        return True

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func}: a fake CUDA tensor used outside FakeCuda()")

    def __repr__(self) -> str:
        return f"FakeCudaTensor({self.elem!r})"


_LINALG = {"mm", "addmm", "bmm", "baddbmm", "matmul", "_linalg_eigh", "linalg_eigh", "linalg_qr", "_linalg_svd",
           "linalg_svd", "linalg_eigvalsh", "dot", "mv", "addmv", "linalg_solve", "_linalg_solve_ex"}
_COPIES = {"copy_", "_to_copy", "copy", "_copy_from", "_copy_from_and_resize"}
# ops whose CUDA implementation waits for the device: scalar reads, data-dependent output
# shapes, and the solvers' error checks (info read back to the host)
_SYNCS = {"_local_scalar_dense", "nonzero", "masked_select", "equal", "unique", "_unique", "_unique2",
          "unique_consecutive", "unique_dim", "_linalg_eigh", "_linalg_svd", "_linalg_check_errors",
          "linalg_cholesky_ex", "linalg_inv_ex", "linalg_lu_factor_ex", "_linalg_solve_ex"}


def _is_cuda_device(d) -> bool:
    return d is not None and torch.device(d).type == "cuda"


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@dataclass
class Ledger:
    """What a fake device saw."""

    live_bytes: int = 0
    peak_bytes: int = 0
    h2d_bytes: int = 0
    d2h_bytes: int = 0
    syncs: int = 0  # host synchronizations in the compute thread (the one that entered FakeCuda)
    worker_syncs: int = 0  # in worker threads (loader, cache writer): off the compute path
    sync_reasons: Counter = field(default_factory=Counter)  # compute thread, by reason
    async_copies: int = 0  # non-blocking copies between host and device
    host_compute: list[str] = field(default_factory=list)  # heavy host linear algebra: "op shapes"
    host_compute_bytes: list[int] = field(default_factory=list)  # each one's largest host operand
    marks: list[tuple[str, int]] = field(default_factory=list)  # (label, peak since the last mark)
    _storages: dict[int, list[int]] = field(default_factory=dict)  # data_ptr -> [nbytes, wrappers]
    _since_mark: int = 0

    def mark(self, label: str) -> None:
        """Close a phase (e.g. a chunk): record the peak of live bytes since the last mark."""
        self.marks.append((label, self._since_mark))
        self._since_mark = self.live_bytes


class FakeCuda(contextlib.AbstractContextManager):
    """Context manager: the fake device (see the module docstring). `ledger` holds its figures."""

    def __init__(self, heavy_bytes: int = 0):
        self.heavy_bytes = heavy_bytes
        self.ledger = Ledger()
        self.pinned = fs.Pinned()
        self.clocks = fs.Clocks(self._synced)
        self._lock = threading.Lock()
        self._stack = contextlib.ExitStack()
        self._main = threading.get_ident()

    # -- accounting -------------------------------------------------------------------------------
    def _synced(self, reason: str) -> None:
        led = self.ledger
        with self._lock:
            if threading.get_ident() == self._main:
                led.syncs += 1
                led.sync_reasons[reason] += 1
            else:
                led.worker_syncs += 1

    def sync(self, reason: str) -> None:
        self._synced(reason)

    def _track(self, t: FakeCudaTensor) -> None:
        key, nbytes = _key(t.elem), t.elem.untyped_storage().nbytes()
        led = self.ledger
        with self._lock:
            entry = led._storages.get(key)
            if entry is None:
                led._storages[key] = [nbytes, 1]
                led.live_bytes += nbytes
                led.peak_bytes = max(led.peak_bytes, led.live_bytes)
                led._since_mark = max(led._since_mark, led.live_bytes)
            else:
                entry[1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        led = self.ledger
        with self._lock:
            entry = led._storages.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] == 0:
                led.live_bytes -= entry[0]
                del led._storages[key]
                self.clocks.forget(key)

    def wrap(self, t: torch.Tensor, stream: fs.FakeStream | None = None) -> FakeCudaTensor:
        """A fake CUDA tensor over host tensor `t`, written by the current op on `stream` when
        its storage is new (a view keeps the writer of the storage it views)."""
        out = FakeCudaTensor(t)
        key = _key(t)
        if stream is not None and key not in self.ledger._storages:
            self.clocks.wrote(key, stream)
        self._track(out)
        return out

    def pin(self, t: torch.Tensor) -> torch.Tensor:
        return self.pinned.add(t)

    # -- entering and leaving ---------------------------------------------------------------------
    def thread_modes(self) -> contextlib.ExitStack:
        """The modes of this device for a worker thread (they are thread-local)."""
        s = contextlib.ExitStack()
        s.enter_context(_Functions(self))
        s.enter_context(_Dispatch(self))
        return s

    def __enter__(self) -> "FakeCuda":
        from .engine import device as engine_device

        s = self._stack
        self._main = threading.get_ident()
        patches = {"is_available": lambda: True, "device_count": lambda: 1, "current_device": lambda: 0,
                   "get_device_name": lambda *a: NAME, "device": lambda *a: contextlib.nullcontext(),
                   **fs.patches(self.clocks)}
        s.callback(fs.release)
        for name, fn in patches.items():
            old = getattr(torch.cuda, name)
            setattr(torch.cuda, name, fn)
            s.callback(setattr, torch.cuda, name, old)
        fake = self
        tensor_patches = {
            "pin_memory": lambda self, *a, **k: fake.pin(self.clone()),
            "is_pinned": lambda self, *a, **k: fake.pinned.has(self),
            "record_stream": lambda self, stream: None,
        }
        for name, fn in tensor_patches.items():
            old = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, fn)
            s.callback(setattr, torch.Tensor, name, old)
        old_gen = torch.Generator
        torch.Generator = fs.FakeGenerator
        s.callback(setattr, torch, "Generator", old_gen)
        old_init = torch.cuda._initialized
        torch.cuda._initialized = True  # no lazy CUDA init from factories with device="cuda"
        s.callback(setattr, torch.cuda, "_initialized", old_init)
        engine_device.WORKER_CONTEXTS.append(self.thread_modes)
        s.callback(engine_device.WORKER_CONTEXTS.remove, self.thread_modes)
        s.enter_context(_Functions(self))
        s.enter_context(_Dispatch(self))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        return None


def _non_blocking(args, kwargs, position: int) -> bool:
    if "non_blocking" in kwargs:
        return bool(kwargs["non_blocking"])
    return len(args) > position and isinstance(args[position], bool) and args[position]


class _Functions(TorchFunctionMode):
    """The Python-level entry points that never reach the dispatcher on a CPU-only torch."""

    def __init__(self, fake: FakeCuda):
        super().__init__()
        self.fake = fake

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        fake = self.fake
        if func in (torch.Tensor.to, torch.Tensor.cuda) and args:
            dev = kwargs.get("device")
            rest = list(args[1:])
            if dev is None and rest and isinstance(rest[0], (str, torch.device)):
                dev = rest.pop(0)
            elif dev is None and rest and isinstance(rest[0], torch.Tensor):  # .to(other): its device and dtype
                other = rest.pop(0)
                dev, rest = other.device, [other.dtype, *rest]
            to_cuda = func is torch.Tensor.cuda or _is_cuda_device(dev)
            dtype = kwargs.get("dtype") or next((a for a in rest if isinstance(a, torch.dtype)), None)
            if to_cuda and isinstance(args[0], FakeCudaTensor):
                # already on the device (a model's weights held there): as torch, the tensor itself
                # or a dtype copy on the device, no transfer
                return args[0] if dtype in (None, args[0].dtype) else args[0].to(dtype)
            if to_cuda:
                src = args[0]
                nb = kwargs.get("non_blocking", False) or any(isinstance(a, bool) and a for a in rest)
                _upload_check(fake, src, nb, "Tensor.to(cuda)")
                host = src.to(dtype) if dtype is not None else src
                fake.ledger.h2d_bytes += src.numel() * src.element_size()
                stream = fake.clocks.tick()
                return fake.wrap(host.clone(memory_format=torch.preserve_format), stream)
        if func in (torch.Tensor.tolist, torch.Tensor.numpy) and isinstance(args[0], FakeCudaTensor):
            if func is torch.Tensor.numpy:
                raise TypeError("can't convert cuda:0 device type tensor to numpy; copy it to the host first")
            fake.clocks.check_read(_key(args[0].elem), "tolist")
            fake.sync("tolist")
            return args[0].elem.tolist()
        if func in (torch.Tensor.tolist, torch.Tensor.numpy) and args and isinstance(args[0], torch.Tensor):
            fake.clocks.check_host(_key(args[0]), func.__name__)
        return func(*args, **kwargs)


def _upload_check(fake: FakeCuda, src: torch.Tensor, non_blocking: bool, what: str) -> None:
    """A host -> device copy: a non-blocking one needs pinned memory; a blocking one waits."""
    fake.clocks.check_host(_key(src), what)
    if non_blocking:
        if not fake.pinned.has(src):
            raise UnpinnedCopy(f"{what}: non_blocking copy from unpinned host memory of shape {tuple(src.shape)} "
                               f"(pin it, or copy blocking)")
        fake.ledger.async_copies += 1
    else:
        fake.sync("blocking host-to-device copy")


class _Dispatch(TorchDispatchMode):
    def __init__(self, fake: FakeCuda):
        super().__init__()
        self.fake = fake

    def _copy(self, func, name, args, kwargs, args2, kwargs2, on_device, host_big, to_device):
        fake, led = self.fake, self.fake.ledger
        to_host = name == "_to_copy" and kwargs.get("device") is not None and not to_device
        dst_dev = name == "copy_" and isinstance(args[0], FakeCudaTensor)
        src_dev = name == "copy_" and len(args) > 1 and isinstance(args[1], FakeCudaTensor)
        nb = _non_blocking(args, kwargs, 2)
        pending = None
        if on_device and (to_host or (name == "copy_" and src_dev and not dst_dev)):  # device -> host
            led.d2h_bytes += sum(t.elem.numel() * t.elem.element_size() for t in args
                                 if isinstance(t, FakeCudaTensor))
            if nb:
                if name == "copy_" and not fake.pinned.has(args[0]):
                    raise UnpinnedCopy(f"copy_: non_blocking copy into unpinned host memory of shape "
                                       f"{tuple(args[0].shape)}")
                led.async_copies += 1
                pending = fake.clocks.tick()
            else:
                fake.sync("blocking device-to-host copy")
        elif (on_device or to_device) and host_big:  # host -> device
            for t in host_big:
                _upload_check(fake, t, nb, name)
            led.h2d_bytes += sum(t.numel() * t.element_size() for t in host_big)
        out = func(*args2, **kwargs2)
        if name == "copy_" and isinstance(args[0], FakeCudaTensor):
            fake.clocks.wrote(_key(args[0].elem), fake.clocks.tick())
            return args[0]
        wrap = (on_device and not to_host) or to_device
        if name == "copy_" and not isinstance(args[0], FakeCudaTensor):
            wrap = False
        if pending is not None:  # the host memory a non-blocking download fills
            dst = args[0] if name == "copy_" else out
            if name != "copy_":
                fake.pin(dst)  # torch pins the result of a non-blocking copy to the host
            fake.clocks.download(_key(dst), pending)
            return args[0] if name == "copy_" else out
        stream = fake.clocks.tick() if wrap else None
        return tree_map(lambda t: fake.wrap(t, stream) if wrap and isinstance(t, torch.Tensor) else t, out)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = func.overloadpacket.__name__
        fake, led = self.fake, self.fake.ledger
        on_device = False
        host_big: list[torch.Tensor] = []
        reads: list[torch.Tensor] = []

        def unwrap(t):
            nonlocal on_device
            if isinstance(t, FakeCudaTensor):
                on_device = True
                reads.append(t.elem)
                return t.elem
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                host_big.append(t)
            return t

        args2, kwargs2 = tree_map(unwrap, args), tree_map(unwrap, kwargs)
        if not getattr(func, "is_view", False):  # a view reads nothing (no kernel runs)
            for t in reads:
                fake.clocks.check_read(_key(t), name)
            for t in host_big:
                fake.clocks.check_host(_key(t), name)
        to_device = _is_cuda_device(kwargs.get("device"))
        if to_device:
            kwargs2["device"] = torch.device("cpu")
        pin = kwargs2.pop("pin_memory", None)
        if name in _COPIES:
            return self._copy(func, name, args, kwargs, args2, kwargs2, on_device, host_big, to_device)
        if on_device and host_big:
            shapes = ", ".join(str(tuple(t.shape)) for t in host_big)
            raise DeviceMismatch(f"{func}: expected all tensors on cuda:0, found host tensors of shape {shapes}")
        if not on_device and not to_device and name in _LINALG:
            big = [t for t in host_big if t.numel() * t.element_size() > fake.heavy_bytes]
            if big:
                led.host_compute.append(f"{name} " + " ".join(str(tuple(t.shape)) for t in big))
                led.host_compute_bytes.append(max(t.numel() * t.element_size() for t in big))
        if on_device and name in _SYNCS:
            fake.sync(name)
        out = func(*args2, **kwargs2)
        if pin and isinstance(out, torch.Tensor) and not to_device:
            return fake.pin(out)
        if not (on_device or to_device):
            return out
        stream = fake.clocks.tick()
        # in-place and out= ops return their (already wrapped) first argument
        if isinstance(out, torch.Tensor) and args and isinstance(args[0], FakeCudaTensor) and out is args[0].elem:
            fake.clocks.wrote(_key(out), stream)
            return args[0]
        return tree_map(lambda t: fake.wrap(t, stream) if isinstance(t, torch.Tensor) else t, out)
