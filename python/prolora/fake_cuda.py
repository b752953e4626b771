"""Run the CUDA code path on a machine without a GPU, strictly: tensors that say they live on
`cuda:0` but compute on the host, with the checks a real device would make and the accounting
a real device would need.

Inside `FakeCuda()`:
- `torch.cuda.is_available()` is True and `.to("cuda")`, `.cuda()`, `device="cuda"` factories and
  `.pin_memory()` work (pinning is a no-op, in every thread; the rest holds in the thread that
  entered the context, where the engine computes);
- every op on a fake CUDA tensor runs on its host copy and returns fake CUDA tensors;
- an op that mixes a fake CUDA tensor with a host tensor of one or more dimensions raises
  `DeviceMismatch`, as CUDA would (0-d host scalars are allowed, as on CUDA; copies between
  devices are allowed and counted);
- live device bytes (distinct storages of live fake CUDA tensors, as torch.cuda.memory_allocated
  counts them) and their peak are tracked, and so are host-to-device and device-to-host bytes;
- linear algebra on host tensors larger than `heavy_bytes` is recorded in `host_compute`: on a
  CUDA run the bases, similarity and projection must run on the device, so a test asserts that
  list is empty.

torch's own FakeTensorMode is as strict about devices but holds no data, and a transfer reads
data (the energy rule picks k from the spectrum; the gate reads phi), so this mode keeps real
values. It is a test and dry-run instrument, not a device: one thread, host speed.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

DEVICE = torch.device("cuda", 0)
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


def _is_cuda_device(d) -> bool:
    return d is not None and torch.device(d).type == "cuda"


@dataclass
class Ledger:
    """What a fake device saw."""

    live_bytes: int = 0
    peak_bytes: int = 0
    h2d_bytes: int = 0
    d2h_bytes: int = 0
    host_compute: list[str] = field(default_factory=list)  # heavy host linear algebra: "op shapes"
    marks: list[tuple[str, int]] = field(default_factory=list)  # (label, peak since the last mark)
    _storages: dict[int, list[int]] = field(default_factory=dict)  # data_ptr -> [nbytes, wrappers]
    _since_mark: int = 0

    def mark(self, label: str) -> None:
        """Close a phase (e.g. a chunk): record the peak of live bytes since the last mark."""
        self.marks.append((label, self._since_mark))
        self._since_mark = self.live_bytes


class FakeCuda(contextlib.AbstractContextManager):
    """Context manager: the fake device (see the module docstring). `ledger` holds its figures."""

    def __init__(self, heavy_bytes: int = 1 << 16):
        self.heavy_bytes = heavy_bytes
        self.ledger = Ledger()
        self._lock = threading.Lock()
        self._stack = contextlib.ExitStack()

    # -- accounting -------------------------------------------------------------------------------
    def _track(self, t: FakeCudaTensor) -> None:
        st = t.elem.untyped_storage()
        key, nbytes = st.data_ptr(), st.nbytes()
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

    def wrap(self, t: torch.Tensor) -> FakeCudaTensor:
        out = FakeCudaTensor(t)
        self._track(out)
        return out

    # -- entering and leaving ---------------------------------------------------------------------
    def __enter__(self) -> "FakeCuda":
        s = self._stack
        patches = {"is_available": lambda: True, "device_count": lambda: 1, "current_device": lambda: 0,
                   "get_device_name": lambda *a: NAME, "synchronize": lambda *a: None,
                   "device": lambda *a: contextlib.nullcontext()}
        for name, fn in patches.items():
            old = getattr(torch.cuda, name)
            setattr(torch.cuda, name, fn)
            s.callback(setattr, torch.cuda, name, old)
        # pinning happens in loader threads too, which the (thread-local) modes do not see
        for name, fn in {"pin_memory": lambda self, *a, **k: self, "is_pinned": lambda self, *a, **k: True}.items():
            old = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, fn)
            s.callback(setattr, torch.Tensor, name, old)
        old_init = torch.cuda._initialized
        torch.cuda._initialized = True  # no lazy CUDA init from factories with device="cuda"
        s.callback(setattr, torch.cuda, "_initialized", old_init)
        s.enter_context(_Functions(self))
        s.enter_context(_Dispatch(self))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        return None


class _Functions(TorchFunctionMode):
    """The Python-level entry points that never reach the dispatcher on a CPU-only torch."""

    def __init__(self, fake: FakeCuda):
        super().__init__()
        self.fake = fake

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.to, torch.Tensor.cuda) and args:
            dev = kwargs.get("device")
            rest = list(args[1:])
            if dev is None and rest and isinstance(rest[0], (str, torch.device)):
                dev = rest.pop(0)
            to_cuda = func is torch.Tensor.cuda or _is_cuda_device(dev)
            dtype = kwargs.get("dtype") or next((a for a in rest if isinstance(a, torch.dtype)), None)
            if to_cuda and isinstance(args[0], FakeCudaTensor):
                # already on the device (a model's weights held there): as torch, the tensor itself
                # or a dtype copy on the device, no transfer
                return args[0] if dtype in (None, args[0].dtype) else args[0].to(dtype)
            if to_cuda:
                src = args[0]
                host = src.to(dtype) if dtype is not None else src
                led = self.fake.ledger
                led.h2d_bytes += src.numel() * src.element_size()
                return self.fake.wrap(host.clone(memory_format=torch.preserve_format))
        if func in (torch.Tensor.tolist, torch.Tensor.numpy) and isinstance(args[0], FakeCudaTensor):
            if func is torch.Tensor.numpy:
                raise TypeError("can't convert cuda:0 device type tensor to numpy; copy it to the host first")
            return args[0].elem.tolist()
        return func(*args, **kwargs)


class _Dispatch(TorchDispatchMode):
    def __init__(self, fake: FakeCuda):
        super().__init__()
        self.fake = fake

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = func.overloadpacket.__name__
        on_device = False
        host_big: list[torch.Tensor] = []

        def unwrap(t):
            nonlocal on_device
            if isinstance(t, FakeCudaTensor):
                on_device = True
                return t.elem
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                host_big.append(t)
            return t

        args2, kwargs2 = tree_map(unwrap, args), tree_map(unwrap, kwargs)
        led = self.fake.ledger
        to_device = _is_cuda_device(kwargs.get("device"))
        if to_device:
            kwargs2["device"] = torch.device("cpu")
        if name in _COPIES:
            to_host = name == "_to_copy" and kwargs.get("device") is not None and not to_device
            if on_device and to_host:
                led.d2h_bytes += sum(t.elem.numel() * t.elem.element_size() for t in args
                                     if isinstance(t, FakeCudaTensor))
            elif on_device and host_big:
                led.h2d_bytes += sum(t.numel() * t.element_size() for t in host_big)
            out = func(*args2, **kwargs2)
            if name == "copy_" and isinstance(args[0], FakeCudaTensor):
                return args[0]
            wrap = (on_device and not to_host) or to_device
            if name == "copy_" and not isinstance(args[0], FakeCudaTensor):
                wrap = False
            return tree_map(lambda t: self.fake.wrap(t) if wrap and isinstance(t, torch.Tensor) else t, out)
        if on_device and host_big:
            shapes = ", ".join(str(tuple(t.shape)) for t in host_big)
            raise DeviceMismatch(f"{func}: expected all tensors on cuda:0, found host tensors of shape {shapes}")
        if not on_device and not to_device and name in _LINALG:
            big = [t for t in host_big if t.numel() * t.element_size() > self.fake.heavy_bytes]
            if big:
                led.host_compute.append(f"{name} " + " ".join(str(tuple(t.shape)) for t in big))
        out = func(*args2, **kwargs2)
        if not (on_device or to_device):
            return out
        # in-place and out= ops return their (already wrapped) first argument
        if isinstance(out, torch.Tensor) and args and isinstance(args[0], FakeCudaTensor) and out is args[0].elem:
            return args[0]
        return tree_map(lambda t: self.fake.wrap(t) if isinstance(t, torch.Tensor) else t, out)
