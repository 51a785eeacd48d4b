"""Load fatbins and launch kernels through pycuda or cuda-python, behind one interface.

``KernelLauncher`` is the whole contract: load a module image, launch a kernel by
name with ``grid``/``block``/arguments, allocate/copy/free raw device memory,
synchronise and time. Device buffers are plain integer device pointers, so a
TensorRT runner can hand its input binding address straight to a kernel.

Two bindings, imported lazily (nothing CUDA is imported by this module itself):
- ``PycudaLauncher``: ``pycuda.driver``, ``module_from_buffer`` on the fatbin.
- ``CudaPythonLauncher``: ``cuda.bindings.driver`` (cuda-python >= 12.6.1, or the
  older ``cuda.cuda`` module), ``cuModuleLoadData`` + ``cuLaunchKernel``.
Both use the device's *primary* context, the one the CUDA runtime (TensorRT,
torch, ONNX Runtime) uses, so pointers from those libraries are valid here.

Kernel arguments are ``(value, ctypes type)`` pairs made with ``ptr``, ``i32``,
``size_t`` and ``f32``, in the kernel's parameter order.
"""

from __future__ import annotations

import ctypes
import importlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from roadshield.errors import BackendUnavailableError, RoadshieldError

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


def _dim3(value: Sequence[int], what: str) -> Dim3:
    dims = tuple(int(v) for v in value) + (1,) * (3 - len(value))
    if len(dims) != 3 or min(dims) < 1:
        raise CudaCallError(f"{what} {tuple(value)!r} must be 1 to 3 positive sizes",
                            "pass e.g. (blocks_x, blocks_y, blocks_z)")
    return dims  # type: ignore[return-value]


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
        """Launch ``kernel`` of a loaded ``module`` (asynchronous on ``stream``; None = default)."""
        if module not in self._modules:
            raise CudaCallError(f"module {module!r} is not loaded",
                                "call load(name, fatbin_bytes) first")
        key = (module, kernel)
        if key not in self._functions:
            self._functions[key] = self._get_function(self._modules[module], kernel)
        self._launch(self._functions[key], _dim3(grid, "grid"), _dim3(block, "block"), args,
                     int(shared_bytes), stream)

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


class PycudaLauncher(KernelLauncher):
    """``pycuda.driver`` on the device's retained primary context."""

    binding = "pycuda"

    def __init__(self, device: int = 0) -> None:
        super().__init__()
        try:
            self._drv = _import("pycuda.driver")
            self._drv.init()
            self._context = self._drv.Device(device).retain_primary_context()
            self._context.push()
        except Exception as err:  # ImportError, or pycuda's LogicError/RuntimeError
            raise _unavailable(self.binding, err) from err
        self._allocations: dict[int, Any] = {}

    def _load_image(self, image: bytes) -> Any:
        return self._drv.module_from_buffer(bytes(image))

    def _get_function(self, module: Any, kernel: str) -> Any:
        return module.get_function(kernel)

    def _launch(self, function: Any, grid: Dim3, block: Dim3, args: Sequence[KernelArg],
                shared_bytes: int, stream: Any) -> None:
        function(*as_numpy_scalars(args), grid=grid, block=block, shared=shared_bytes,
                 stream=stream)

    def alloc(self, nbytes: int) -> int:
        allocation = self._drv.mem_alloc(int(nbytes))
        self._allocations[int(allocation)] = allocation
        return int(allocation)

    def free(self, address: int) -> None:
        allocation = self._allocations.pop(int(address), None)
        if allocation is not None:
            allocation.free()

    def copy_htod(self, dst: int, src: np.ndarray) -> None:
        self._drv.memcpy_htod(int(dst), np.ascontiguousarray(src))

    def copy_dtoh(self, dst: np.ndarray, src: int) -> None:
        self._drv.memcpy_dtoh(dst, int(src))

    def copy_dtod(self, dst: int, src: int, nbytes: int) -> None:
        self._drv.memcpy_dtod(int(dst), int(src), int(nbytes))

    def synchronize(self) -> None:
        self._drv.Context.synchronize()

    def time_ms(self, fn: Callable[[], None], repeats: int = 10) -> float:
        start, end = self._drv.Event(), self._drv.Event()
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        end.synchronize()
        return float(end.time_since(start)) / repeats

    def close(self) -> None:
        for address in list(self._allocations):
            self.free(address)
        self._modules.clear()
        self._functions.clear()
        if self._context is not None:
            self._context.pop()
            self._context = None


class CudaPythonLauncher(KernelLauncher):
    """cuda-python's driver API on the device's retained primary context."""

    binding = "cuda-python"

    def __init__(self, device: int = 0) -> None:
        super().__init__()
        try:
            try:
                self._cu = _import("cuda.bindings.driver")
            except ImportError:
                self._cu = _import("cuda.cuda")  # cuda-python < 12.6.1
            self._check(self._cu.cuInit(0), "cuInit")
            self._device = self._check(self._cu.cuDeviceGet(device), "cuDeviceGet")
            self._context = self._check(self._cu.cuDevicePrimaryCtxRetain(self._device),
                                        "cuDevicePrimaryCtxRetain")
            self._check(self._cu.cuCtxSetCurrent(self._context), "cuCtxSetCurrent")
        except Exception as err:  # ImportError, a missing driver library, or a CUDA error
            raise _unavailable(self.binding, err) from err
        self._images: list[np.ndarray] = []

    def _check(self, result: Any, call: str) -> Any:
        """Unpack ``(CUresult, *values)``; raise ``CudaCallError`` unless CUDA_SUCCESS."""
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self._cu.CUresult.CUDA_SUCCESS:
            _, name = self._cu.cuGetErrorName(err)
            raise CudaCallError(f"{call} failed: {name.decode() if name else err}",
                                "check the launch sizes and pointers; run with "
                                "CUDA_LAUNCH_BLOCKING=1 to find the failing kernel")
        return values[0] if len(values) == 1 else (tuple(values) or None)

    def _load_image(self, image: bytes) -> Any:
        data = np.frombuffer(bytes(image), np.uint8).copy()
        self._images.append(data)  # the driver reads it during the call; keep it alive
        return self._check(self._cu.cuModuleLoadData(data.ctypes.data), "cuModuleLoadData")

    def _get_function(self, module: Any, kernel: str) -> Any:
        return self._check(self._cu.cuModuleGetFunction(module, kernel.encode()),
                           f"cuModuleGetFunction({kernel})")

    def _launch(self, function: Any, grid: Dim3, block: Dim3, args: Sequence[KernelArg],
                shared_bytes: int, stream: Any) -> None:
        handle = stream if stream is not None else self._cu.CUstream(0)
        self._check(self._cu.cuLaunchKernel(function, *grid, *block, shared_bytes, handle,
                                            as_ctypes_tuple(args), 0), "cuLaunchKernel")

    def alloc(self, nbytes: int) -> int:
        return int(self._check(self._cu.cuMemAlloc(int(nbytes)), "cuMemAlloc"))

    def free(self, address: int) -> None:
        self._check(self._cu.cuMemFree(self._cu.CUdeviceptr(int(address))), "cuMemFree")

    def copy_htod(self, dst: int, src: np.ndarray) -> None:
        host = np.ascontiguousarray(src)
        self._check(self._cu.cuMemcpyHtoD(self._cu.CUdeviceptr(int(dst)), host.ctypes.data,
                                          host.nbytes), "cuMemcpyHtoD")

    def copy_dtoh(self, dst: np.ndarray, src: int) -> None:
        self._check(self._cu.cuMemcpyDtoH(dst.ctypes.data, self._cu.CUdeviceptr(int(src)),
                                          dst.nbytes), "cuMemcpyDtoH")

    def copy_dtod(self, dst: int, src: int, nbytes: int) -> None:
        self._check(self._cu.cuMemcpyDtoD(self._cu.CUdeviceptr(int(dst)),
                                          self._cu.CUdeviceptr(int(src)), int(nbytes)),
                    "cuMemcpyDtoD")

    def synchronize(self) -> None:
        self._check(self._cu.cuCtxSynchronize(), "cuCtxSynchronize")

    def time_ms(self, fn: Callable[[], None], repeats: int = 10) -> float:
        start = self._check(self._cu.cuEventCreate(0), "cuEventCreate")  # CU_EVENT_DEFAULT
        end = self._check(self._cu.cuEventCreate(0), "cuEventCreate")
        try:
            self._check(self._cu.cuEventRecord(start, self._cu.CUstream(0)), "cuEventRecord")
            for _ in range(repeats):
                fn()
            self._check(self._cu.cuEventRecord(end, self._cu.CUstream(0)), "cuEventRecord")
            self._check(self._cu.cuEventSynchronize(end), "cuEventSynchronize")
            elapsed = self._check(self._cu.cuEventElapsedTime(start, end), "cuEventElapsedTime")
        finally:
            self._cu.cuEventDestroy(start)
            self._cu.cuEventDestroy(end)
        return float(elapsed) / repeats

    def close(self) -> None:
        for module in self._modules.values():
            self._cu.cuModuleUnload(module)
        self._modules.clear()
        self._functions.clear()
        self._images.clear()
        if self._context is not None:
            self._cu.cuDevicePrimaryCtxRelease(self._device)
            self._context = None


def _import(name: str) -> Any:
    return importlib.import_module(name)


def _unavailable(binding: str, err: BaseException) -> BackendUnavailableError:
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
    classes = {"pycuda": PycudaLauncher, "cuda-python": CudaPythonLauncher}
    errors = []
    for name in [choice] if choice else list(BINDINGS):
        try:
            return classes[name](device)
        except BackendUnavailableError as err:
            errors.append(str(err).splitlines()[0])
    raise BackendUnavailableError("no CUDA binding could be used: " + "; ".join(errors),
                                  "install pycuda or cuda-python and run on a machine with "
                                  "an NVIDIA GPU; the CPU sanitizers work without one")
