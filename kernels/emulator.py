"""A ``KernelLauncher`` that runs on the CPU: device memory in host arrays, kernels
replaced by their NumPy/OpenCV references.

``EmulatedLauncher`` lets everything above the launcher (``CudaKernels`` launch
geometry and argument order, the CUDA sanitize chain, the TensorRT runner's buffers
and streams) run and be checked on a machine with no GPU. It is not fast, and it is
not the kernels: their arithmetic is checked by the host build (``kernels.host``) and
the ``gpu`` parity tests. What it does check:

- every device access lies inside one allocation (``CudaCallError`` otherwise), with
  the kernels' own row strides, so an offset or stride error shows up as a failure;
- each launch's arguments are unpacked by the kernel's C signature order;
- ``launches`` and ``calls`` record what was asked, in order, for tests.

Kernel semantics (see ``kernels/README.md``): bitdepth = ``bitdepth_reference``;
median = ``cv2.medianBlur`` per channel (BORDER_REPLICATE); jpeg = ``jpeg_dct_reference``;
preprocess = ``preprocess_roi_reference`` (an empty clamped box writes zeros).
Streams are recorded but work runs at once, in call order (a valid stream order).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np

from kernels.build import KERNELS
from kernels.loader import CudaCallError, CudaStream, Dim3, KernelArg, KernelLauncher
from kernels.reference import preprocess_roi_reference
from kernels.sanitize_reference import bitdepth_reference, jpeg_dct_reference

_BASE = 0x7F00_0000_0000
_ALIGN = 256  # cudaMalloc alignment; TensorRT requires at least this


class EmulatedLauncher(KernelLauncher):
    """Host-memory stand-in for a CUDA device (see the module docstring).

    name / capability: what ``device_name()`` / ``compute_capability()`` report.
    """

    binding = "emulated"

    def __init__(self, name: str = "roadshield emulated GPU",
                 capability: tuple[int, int] = (8, 7)) -> None:
        super().__init__()
        self.name = name
        self.capability = capability
        self.memory: dict[int, np.ndarray] = {}
        self.launches: list[tuple[str, Dim3, Dim3, list[int | float], int]] = []
        self.calls: list[tuple[Any, ...]] = []
        self._next = _BASE
        self._streams = 0
        self.closed = False
        for module in KERNELS:  # every kernel is emulated: no fatbin to build or load
            self.load(module, b"")

    # -- memory ---------------------------------------------------------------------
    def alloc(self, nbytes: int) -> int:
        if nbytes < 1:
            raise CudaCallError(f"alloc of {nbytes} bytes", "allocate at least 1 byte")
        address = self._next
        self._next += -(-int(nbytes) // _ALIGN) * _ALIGN + _ALIGN  # a gap catches overruns
        self.memory[address] = np.zeros(int(nbytes), np.uint8)
        self.calls.append(("alloc", address, int(nbytes)))
        return address

    def free(self, address: int) -> None:
        if self.memory.pop(int(address), None) is None:
            raise CudaCallError(f"free of {address:#x}, which is not an allocation",
                                "free only pointers returned by alloc()")
        self.calls.append(("free", int(address)))

    def region(self, address: int, nbytes: int) -> np.ndarray:
        """The uint8 view of ``nbytes`` at ``address``; must lie inside one allocation."""
        for base, buf in self.memory.items():
            if base <= address and address + nbytes <= base + buf.size:
                return buf[address - base:address - base + nbytes]
        raise CudaCallError(f"device access of {nbytes} bytes at {address:#x} is outside "
                            "every allocation", "check offsets, strides and buffer sizes")

    def image(self, address: int, height: int, width: int, channels: int,
              stride: int) -> np.ndarray:
        """A strided H x W x C uint8 view of device memory (rows ``stride`` bytes apart)."""
        row = width * channels
        if stride < row:
            raise CudaCallError(f"row stride {stride} < row size {row}", "pass a valid stride")
        span = self.region(address, (height - 1) * stride + row)
        return np.lib.stride_tricks.as_strided(span, (height, width, channels),
                                               (stride, channels, 1), writeable=True)

    def copy_htod(self, dst: int, src: np.ndarray) -> None:
        host = np.ascontiguousarray(src)
        self.region(dst, host.nbytes)[:] = host.reshape(-1).view(np.uint8)
        self.calls.append(("htod", int(dst), host.nbytes, None))

    def copy_dtoh(self, dst: np.ndarray, src: int) -> None:
        dst.reshape(-1).view(np.uint8)[:] = self.region(src, dst.nbytes)
        self.calls.append(("dtoh", int(src), dst.nbytes, None))

    def copy_dtod(self, dst: int, src: int, nbytes: int) -> None:
        self.region(dst, nbytes)[:] = self.region(src, nbytes).copy()
        self.calls.append(("dtod", int(dst), int(src), int(nbytes)))

    def copy_htod_async(self, dst: int, src: np.ndarray, stream: CudaStream) -> None:
        self.copy_htod(dst, src)
        self.calls[-1] = ("htod", int(dst), int(np.asarray(src).nbytes), stream.handle)

    def copy_dtoh_async(self, dst: np.ndarray, src: int, stream: CudaStream) -> None:
        self.copy_dtoh(dst, src)
        self.calls[-1] = ("dtoh", int(src), dst.nbytes, stream.handle)

    # -- streams, device ------------------------------------------------------------
    def create_stream(self) -> CudaStream:
        self._streams += 1
        stream = CudaStream(0x5000 + self._streams, f"stream-{self._streams}")
        self.calls.append(("create_stream", stream.handle))
        return stream

    def destroy_stream(self, stream: CudaStream) -> None:
        self.calls.append(("destroy_stream", stream.handle))

    def synchronize_stream(self, stream: CudaStream) -> None:
        self.calls.append(("sync", stream.handle))

    def synchronize(self) -> None:
        self.calls.append(("sync", None))

    def device_name(self) -> str:
        return self.name

    def compute_capability(self) -> tuple[int, int]:
        return self.capability

    def time_ms(self, fn: Callable[[], None], repeats: int = 10) -> float:
        raise CudaCallError("the emulated launcher has no GPU clock",
                            "time kernels on a CUDA device (scripts/bench_kernels.py)")

    def close(self) -> None:
        self.closed = True
        self._modules.clear()
        self._functions.clear()

    # -- kernels ----------------------------------------------------------------------
    def _load_image(self, image: bytes) -> Any:
        return bytes(image)

    def _get_function(self, module: Any, kernel: str) -> Any:
        if kernel not in _KERNELS:
            raise CudaCallError(f"kernel {kernel!r} has no emulation",
                                f"emulated kernels: {sorted(_KERNELS)}")
        return kernel

    def _launch(self, function: Any, grid: Dim3, block: Dim3, args: Sequence[KernelArg],
                shared_bytes: int, stream: Any) -> None:
        values = [v for v, _ in args]
        self.launches.append((function, grid, block, values, shared_bytes))
        self.calls.append(("launch", function, stream))
        _KERNELS[function](self, *values)


def _bitdepth(dev: EmulatedLauncher, src: int, dst: int, nbytes: int, bits: int,
              mode: int) -> None:
    data = dev.region(src, nbytes).copy()
    dev.region(dst, nbytes)[:] = bitdepth_reference(data, bits, "round" if mode else "truncate")


def _median(k: int) -> Callable[..., None]:
    def run(dev: EmulatedLauncher, src: int, dst: int, height: int, width: int,
            channels: int, src_stride: int, dst_stride: int) -> None:
        img = dev.image(src, height, width, channels, src_stride).copy()
        out = np.stack([cv2.medianBlur(np.ascontiguousarray(img[..., c]), k)
                        for c in range(channels)], axis=-1)
        dev.image(dst, height, width, channels, dst_stride)[:] = out
    return run


def _jpeg(dev: EmulatedLauncher, src: int, dst: int, height: int, width: int, src_stride: int,
          dst_stride: int, quality: int, bgr: int) -> None:
    img = dev.image(src, height, width, 3, src_stride).copy()
    img = img if bgr else img[..., ::-1]
    out = jpeg_dct_reference(np.ascontiguousarray(img), quality)
    dev.image(dst, height, width, 3, dst_stride)[:] = out if bgr else out[..., ::-1]


def _store(dev: EmulatedLauncher, frame: int, height: int, width: int, stride: int,
           box: Sequence[int], size: int, out: int) -> None:
    x0, x1 = (min(max(v, 0), width) for v in (box[0], box[2]))
    y0, y1 = (min(max(v, 0), height) for v in (box[1], box[3]))
    target = dev.region(out, 3 * size * size * 4).view(np.float32)
    if x1 <= x0 or y1 <= y0:
        target[:] = 0.0
        return
    img = dev.image(frame, height, width, 3, stride)
    target[:] = preprocess_roi_reference(np.ascontiguousarray(img), (x0, y0, x1, y1),
                                         size).reshape(-1)


def _preprocess_roi(dev: EmulatedLauncher, frame: int, height: int, width: int, stride: int,
                    x0: int, y0: int, x1: int, y1: int, size: int, out: int) -> None:
    _store(dev, frame, height, width, stride, (x0, y0, x1, y1), size, out)


def _preprocess_rois(dev: EmulatedLauncher, frame: int, height: int, width: int, stride: int,
                     boxes: int, n_rois: int, size: int, out: int) -> None:
    table = dev.region(boxes, n_rois * 16).view(np.int32).reshape(n_rois, 4)
    for roi in range(n_rois):
        _store(dev, frame, height, width, stride, [int(v) for v in table[roi]], size,
               out + roi * 3 * size * size * 4)


_KERNELS: dict[str, Callable[..., None]] = {
    "rs_bitdepth_u8": _bitdepth,
    "rs_median3_u8": _median(3),
    "rs_median5_u8": _median(5),
    "rs_jpeg_u8": _jpeg,
    "rs_preprocess_roi": _preprocess_roi,
    "rs_preprocess_rois": _preprocess_rois,
}
