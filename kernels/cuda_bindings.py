"""The two ``KernelLauncher`` bindings: pycuda and cuda-python (``cuda.bindings``).

Each is thin: one driver call per launcher method, on the device's *primary*
context (the one the CUDA runtime, TensorRT and torch use), so device pointers and
streams are interchangeable with those libraries. Both modules are imported when a
launcher is built (``loader._import``, which tests replace), never at import time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from kernels import loader
from kernels.loader import (
    CudaCallError,
    CudaStream,
    Dim3,
    KernelArg,
    KernelLauncher,
    as_ctypes_tuple,
    as_numpy_scalars,
    unavailable,
)

#: CU_STREAM_NON_BLOCKING: no implicit synchronisation with the legacy stream 0
STREAM_NON_BLOCKING = 1


class PycudaLauncher(KernelLauncher):
    """``pycuda.driver`` on the device's retained primary context."""

    binding = "pycuda"

    def __init__(self, device: int = 0) -> None:
        super().__init__()
        try:
            self._drv = loader._import("pycuda.driver")
            self._drv.init()
            self._device = self._drv.Device(device)
            self._context = self._device.retain_primary_context()
            self._context.push()
        except Exception as err:  # ImportError, or pycuda's LogicError/RuntimeError
            raise unavailable(self.binding, err) from err
        self._allocations: dict[int, Any] = {}
        self._streams: dict[int, Any] = {}

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

    def create_stream(self) -> CudaStream:
        native = self._drv.Stream(STREAM_NON_BLOCKING)
        stream = CudaStream(int(native.handle), native)
        self._streams[stream.handle] = native
        return stream

    def destroy_stream(self, stream: CudaStream) -> None:
        # pycuda destroys the CUstream when the last reference to the Stream goes
        self._streams.pop(stream.handle, None)

    def synchronize_stream(self, stream: CudaStream) -> None:
        stream.native.synchronize()

    def copy_htod_async(self, dst: int, src: np.ndarray, stream: CudaStream) -> None:
        self._drv.memcpy_htod_async(int(dst), np.ascontiguousarray(src), stream.native)

    def copy_dtoh_async(self, dst: np.ndarray, src: int, stream: CudaStream) -> None:
        self._drv.memcpy_dtoh_async(dst, int(src), stream.native)

    def device_name(self) -> str:
        return str(self._device.name())

    def compute_capability(self) -> tuple[int, int]:
        major, minor = self._device.compute_capability()
        return int(major), int(minor)

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
        self._streams.clear()
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
                self._cu = loader._import("cuda.bindings.driver")
            except ImportError:
                self._cu = loader._import("cuda.cuda")  # cuda-python < 12.6.1
            self._check(self._cu.cuInit(0), "cuInit")
            self._device = self._check(self._cu.cuDeviceGet(device), "cuDeviceGet")
            self._context = self._check(self._cu.cuDevicePrimaryCtxRetain(self._device),
                                        "cuDevicePrimaryCtxRetain")
            self._check(self._cu.cuCtxSetCurrent(self._context), "cuCtxSetCurrent")
        except Exception as err:  # ImportError, a missing driver library, or a CUDA error
            raise unavailable(self.binding, err) from err
        self._images: list[np.ndarray] = []
        self._streams: dict[int, Any] = {}

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

    def _ptr(self, address: int) -> Any:
        return self._cu.CUdeviceptr(int(address))

    def alloc(self, nbytes: int) -> int:
        return int(self._check(self._cu.cuMemAlloc(int(nbytes)), "cuMemAlloc"))

    def free(self, address: int) -> None:
        self._check(self._cu.cuMemFree(self._ptr(address)), "cuMemFree")

    def copy_htod(self, dst: int, src: np.ndarray) -> None:
        host = np.ascontiguousarray(src)
        self._check(self._cu.cuMemcpyHtoD(self._ptr(dst), host.ctypes.data, host.nbytes),
                    "cuMemcpyHtoD")

    def copy_dtoh(self, dst: np.ndarray, src: int) -> None:
        self._check(self._cu.cuMemcpyDtoH(dst.ctypes.data, self._ptr(src), dst.nbytes),
                    "cuMemcpyDtoH")

    def copy_dtod(self, dst: int, src: int, nbytes: int) -> None:
        self._check(self._cu.cuMemcpyDtoD(self._ptr(dst), self._ptr(src), int(nbytes)),
                    "cuMemcpyDtoD")

    def synchronize(self) -> None:
        self._check(self._cu.cuCtxSynchronize(), "cuCtxSynchronize")

    def create_stream(self) -> CudaStream:
        native = self._check(self._cu.cuStreamCreate(STREAM_NON_BLOCKING), "cuStreamCreate")
        stream = CudaStream(int(native), native)
        self._streams[stream.handle] = native
        return stream

    def destroy_stream(self, stream: CudaStream) -> None:
        if self._streams.pop(stream.handle, None) is not None:
            self._check(self._cu.cuStreamDestroy(stream.native), "cuStreamDestroy")

    def synchronize_stream(self, stream: CudaStream) -> None:
        self._check(self._cu.cuStreamSynchronize(stream.native), "cuStreamSynchronize")

    def copy_htod_async(self, dst: int, src: np.ndarray, stream: CudaStream) -> None:
        host = np.ascontiguousarray(src)
        self._check(self._cu.cuMemcpyHtoDAsync(self._ptr(dst), host.ctypes.data, host.nbytes,
                                               stream.native), "cuMemcpyHtoDAsync")

    def copy_dtoh_async(self, dst: np.ndarray, src: int, stream: CudaStream) -> None:
        self._check(self._cu.cuMemcpyDtoHAsync(dst.ctypes.data, self._ptr(src), dst.nbytes,
                                               stream.native), "cuMemcpyDtoHAsync")

    def device_name(self) -> str:
        raw = self._check(self._cu.cuDeviceGetName(256, self._device), "cuDeviceGetName")
        return bytes(raw).split(b"\0", 1)[0].decode(errors="replace")

    def compute_capability(self) -> tuple[int, int]:
        attr = self._cu.CUdevice_attribute
        major = self._check(self._cu.cuDeviceGetAttribute(
            attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, self._device),
            "cuDeviceGetAttribute")
        minor = self._check(self._cu.cuDeviceGetAttribute(
            attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, self._device),
            "cuDeviceGetAttribute")
        return int(major), int(minor)

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
        for native in self._streams.values():
            self._cu.cuStreamDestroy(native)
        self._streams.clear()
        for module in self._modules.values():
            self._cu.cuModuleUnload(module)
        self._modules.clear()
        self._functions.clear()
        self._images.clear()
        if self._context is not None:
            self._cu.cuDevicePrimaryCtxRelease(self._device)
            self._context = None
