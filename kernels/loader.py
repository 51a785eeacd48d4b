"""Load fatbins and launch kernels through pycuda or cuda-python, behind one interface.

``KernelLauncher`` is the whole contract: load a module image, launch a kernel by
name with ``grid``/``block``/arguments, allocate/copy/free raw device memory,
synchronise and time. Device buffers are plain integer device pointers, so a
TensorRT runner can hand its input binding address straight to a kernel.

Two bindings, imported lazily (nothing CUDA is imported by this module itself), in
``kernels.cuda_bindings``:
- ``PycudaLauncher``: ``pycuda.driver``, ``module_from_buffer`` on the fatbin.
- ``CudaPythonLauncher``: ``cuda.bindings.driver`` (cuda-python >= 12.6.1, or the
  older ``cuda.cuda`` module), ``cuModuleLoadData`` + ``cuLaunchKernel``.
Both use the device's *primary* context, the one the CUDA runtime (TensorRT,
torch, ONNX Runtime) uses, so pointers from those libraries are valid here.

Streams: ``create_stream()`` returns a ``CudaStream`` whose ``handle`` is the raw
``CUstream`` integer (what TensorRT's ``execute_async_v3`` takes); launches and the
``*_async`` copies accept it, so kernels, copies and an engine queue on one stream.
``DeviceArray`` names a typed region of device memory (address, shape, dtype): the
form in which a device buffer travels between the sanitizers and a runner.

Kernel arguments are ``(value, ctypes type)`` pairs made with ``ptr``, ``i32``,
``size_t`` and ``f32``, in the kernel's parameter order.
"""

from __future__ import annotations

import ctypes
import importlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from roadshield_base.errors import BackendUnavailableError, RoadshieldError

KernelArg = tuple[int | float, type]
Dim3 = tuple[int, int, int]
BINDINGS = ("pycuda", "cuda-python")


class CudaCallError(RoadshieldError):
    """A CUDA driver call failed (bad launch, out of memory, invalid pointer)."""


def ptr(address: int) -> KernelArg:
    """A device pointer argument (``T*`` in the kernel)."""
    return int(address), ctypes.c_void_p


def i32(value: int) -> KernelArg:
    """An ``int`` argument."""
    return int(value), ctypes.c_int32


def size_t(value: int) -> KernelArg:
    """A ``size_t`` argument."""
    return int(value), ctypes.c_uint64


def f32(value: float) -> KernelArg:
    """A ``float`` argument."""
    return float(value), ctypes.c_float


_NUMPY_SCALARS: dict[type, type] = {ctypes.c_void_p: np.uint64, ctypes.c_uint64: np.uint64,
                                    ctypes.c_int32: np.int32, ctypes.c_float: np.float32}


def as_numpy_scalars(args: Sequence[KernelArg]) -> list[np.generic]:
    """Arguments as NumPy scalars (pycuda packs them with the C ABI's sizes)."""
    out = []
    for value, ctype in args:
        if ctype not in _NUMPY_SCALARS:
            raise CudaCallError(f"kernel argument type {ctype.__name__} is not supported",
                                "build arguments with ptr(), i32(), size_t() or f32()")
        out.append(_NUMPY_SCALARS[ctype](value))
    return out


def as_ctypes_tuple(args: Sequence[KernelArg]) -> tuple[tuple[Any, ...], tuple[type, ...]]:
    """Arguments as cuda-python's ``kernelParams`` form: ``(values, ctypes types)``."""
    as_numpy_scalars(args)  # same validation for both bindings
    return tuple(v for v, _ in args), tuple(t for _, t in args)


@dataclass(frozen=True)
class CudaStream:
    """A stream made by ``KernelLauncher.create_stream``.

    handle: the ``CUstream`` as an integer (TensorRT's ``execute_async_v3`` argument).
    native: the binding's own object (``pycuda.driver.Stream`` / ``CUstream``).
    """

    handle: int
    native: Any


@dataclass(frozen=True)
class DeviceArray:
    """A typed view of device memory: ``shape`` elements of ``dtype`` at ``address``.

    It does not own the memory. ``shape``/``dtype`` mirror an ndarray's, so code that
    checks a batch's shape and dtype accepts either.
    """

    address: int
    shape: tuple[int, ...]
    dtype: np.dtype[Any]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        if self.address <= 0 or min(self.shape, default=1) < 0:
            raise CudaCallError(f"device array at {self.address:#x} of shape {self.shape} "
                                "is not valid", "pass a device pointer from alloc() and a "
                                "non-negative shape")

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _native(stream: CudaStream | None) -> Any:
    return stream.native if isinstance(stream, CudaStream) else stream


def _dim3(value: Sequence[int], what: str) -> Dim3:
    dims = tuple(int(v) for v in value) + (1,) * (3 - len(value))
    if len(dims) != 3 or min(dims) < 1:
        raise CudaCallError(f"{what} {tuple(value)!r} must be 1 to 3 positive sizes",
                            "pass e.g. (blocks_x, blocks_y, blocks_z)")
    return dims


class KernelLauncher(ABC):
    """Load CUDA module images and launch their kernels on one device."""

    binding = ""

    def __init__(self) -> None:
        self._modules: dict[str, Any] = {}
        self._functions: dict[tuple[str, str], Any] = {}

    # -- binding-specific primitives
    @abstractmethod
    def _load_image(self, image: bytes) -> Any: ...

    @abstractmethod
    def _get_function(self, module: Any, kernel: str) -> Any: ...

    @abstractmethod
    def _launch(self, function: Any, grid: Dim3, block: Dim3, args: Sequence[KernelArg],
                shared_bytes: int, stream: Any) -> None: ...

    @abstractmethod
    def alloc(self, nbytes: int) -> int:
        """Allocate ``nbytes`` of device memory; returns the device pointer."""

    @abstractmethod
    def free(self, address: int) -> None:
        """Free memory returned by ``alloc``."""

    @abstractmethod
    def copy_htod(self, dst: int, src: np.ndarray) -> None:
        """Copy a C-contiguous host array to device memory at ``dst``."""

    @abstractmethod
    def copy_dtoh(self, dst: np.ndarray, src: int) -> None:
        """Fill a C-contiguous host array from device memory at ``src``."""

    @abstractmethod
    def copy_dtod(self, dst: int, src: int, nbytes: int) -> None:
        """Device-to-device copy of ``nbytes``."""

    @abstractmethod
    def synchronize(self) -> None:
        """Wait for all work on the device."""

    @abstractmethod
    def create_stream(self) -> CudaStream:
        """A new non-blocking stream (does not synchronise with the legacy stream 0)."""

    @abstractmethod
    def destroy_stream(self, stream: CudaStream) -> None:
        """Release a stream made by ``create_stream`` (after its work is done)."""

    @abstractmethod
    def synchronize_stream(self, stream: CudaStream) -> None:
        """Wait for the work queued on ``stream``."""

    @abstractmethod
    def copy_htod_async(self, dst: int, src: np.ndarray, stream: CudaStream) -> None:
        """Queue a host-to-device copy of a C-contiguous array on ``stream``.

        Pageable ``src`` is staged by the driver before the call returns; page-locked
        memory would let the copy overlap other work.
        """

    @abstractmethod
    def copy_dtoh_async(self, dst: np.ndarray, src: int, stream: CudaStream) -> None:
        """Queue a device-to-host copy into a C-contiguous array; valid after
        ``synchronize_stream(stream)``."""

    @abstractmethod
    def device_name(self) -> str:
        """The GPU's name as the driver reports it, e.g. "Orin" or "NVIDIA H200"."""

    @abstractmethod
    def compute_capability(self) -> tuple[int, int]:
        """(major, minor), e.g. (8, 7) on a Jetson Orin."""

    @abstractmethod
    def time_ms(self, fn: Callable[[], None], repeats: int = 10) -> float:
        """Mean GPU time of ``fn()`` in milliseconds, measured with CUDA events."""

    @abstractmethod
    def close(self) -> None:
        """Release the context; the launcher is unusable afterwards."""

    # -- shared behaviour
    def load(self, name: str, image: bytes) -> None:
        """Load a fatbin/cubin/PTX ``image`` as module ``name`` (again: replaced)."""
        self._modules[name] = self._load_image(image)
        self._functions = {k: f for k, f in self._functions.items() if k[0] != name}

    def has_module(self, name: str) -> bool:
        return name in self._modules

    def launch(self, module: str, kernel: str, grid: Sequence[int], block: Sequence[int],
               args: Sequence[KernelArg], shared_bytes: int = 0, stream: Any = None) -> None:
        """Launch ``kernel`` of a loaded ``module``, asynchronous on ``stream`` (a
        ``CudaStream``, the binding's own stream object, or None for the default stream)."""
        if module not in self._modules:
            raise CudaCallError(f"module {module!r} is not loaded",
                                "call load(name, fatbin_bytes) first")
        key = (module, kernel)
        if key not in self._functions:
            self._functions[key] = self._get_function(self._modules[module], kernel)
        self._launch(self._functions[key], _dim3(grid, "grid"), _dim3(block, "block"), args,
                     int(shared_bytes), _native(stream))

    def to_device(self, array: np.ndarray) -> int:
        """Allocate and upload ``array``; returns the device pointer (free it yourself)."""
        host = np.ascontiguousarray(array)
        address = self.alloc(max(host.nbytes, 1))
        if host.nbytes:
            self.copy_htod(address, host)
        return address

    def from_device(self, address: int, shape: Sequence[int], dtype: Any) -> np.ndarray:
        """Download ``shape``/``dtype`` worth of device memory at ``address``."""
        out = np.empty(tuple(shape), dtype)
        if out.nbytes:
            self.copy_dtoh(out, address)
        return out

    def __enter__(self) -> KernelLauncher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _import(name: str) -> Any:
    return importlib.import_module(name)


def unavailable(binding: str, err: BaseException) -> BackendUnavailableError:
    """The error a binding raises when it cannot start (not installed, no driver/GPU)."""
    return BackendUnavailableError(
        f"CUDA binding {binding!r} is unusable here: {err}",
        "install pycuda (pip install '.[jetson]') or cuda-python (pip install '.[gpu]') "
        "on a machine with an NVIDIA driver and GPU")


def create_launcher(binding: str | None = None, device: int = 0) -> KernelLauncher:
    """A launcher on CUDA device ``device``: ``binding`` "pycuda", "cuda-python" or None
    (``$ROADSHIELD_CUDA_BINDING``, else the first that imports and finds a GPU).

    Raises ``BackendUnavailableError`` when no binding is importable or no GPU answers.
    """
    choice = binding or os.environ.get("ROADSHIELD_CUDA_BINDING") or None
    if choice is not None and choice not in BINDINGS:
        raise BackendUnavailableError(f"unknown CUDA binding {choice!r}",
                                      f"choose one of {', '.join(BINDINGS)}")
    from kernels.cuda_bindings import CudaPythonLauncher, PycudaLauncher

    classes: dict[str, Callable[[int], KernelLauncher]] = {"pycuda": PycudaLauncher,
                                                           "cuda-python": CudaPythonLauncher}
    errors = []
    for name in [choice] if choice else list(BINDINGS):
        try:
            return classes[name](device)
        except BackendUnavailableError as err:
            errors.append(str(err).splitlines()[0])
    raise BackendUnavailableError("no CUDA binding could be used: " + "; ".join(errors),
                                  "install pycuda or cuda-python and run on a machine with "
                                  "an NVIDIA GPU; the CPU sanitizers work without one")
