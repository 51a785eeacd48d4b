"""The sanitization and preprocess kernels as Python calls, on device pointers or arrays.

``CudaKernels`` loads the fatbins built by ``kernels.build`` (building them when
nvcc is present) into a ``KernelLauncher`` and knows each kernel's launch
geometry. Two layers:

- pointer calls (``bitdepth``, ``median``, ``jpeg``, ``preprocess_roi``,
  ``preprocess_rois``): device pointers in and out, asynchronous on ``stream``;
  ``preprocess_roi`` writes straight into e.g. a TensorRT input binding;
- array calls (``*_array``): NumPy in, NumPy out, for tests and one-off use.

Images are HWC uint8 with a row stride in bytes (default: tightly packed);
``jpeg`` and the preprocess take 3-channel BGR frames. The preprocess writes
float32 NCHW RGB in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kernels.build import KERNELS, build_kernel
from kernels.host import check_bits, check_ksize, check_mode, check_quality
from kernels.loader import KernelLauncher, create_launcher, i32, ptr, size_t
from kernels.reference import Box, RoiError, clamp_box
from roadshield_base.errors import ConfigError

BITDEPTH_BLOCK = 256
BITDEPTH_MAX_BLOCKS = 65535
MEDIAN_TILE = 16  # matches RS_MEDIAN_TILE in median.cu
PREPROCESS_BLOCK = 16
MAX_GRID_YZ = 65535


def _blocks(n: int, per_block: int) -> int:
    return max(1, -(-int(n) // per_block))


def _positive(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{what} {value!r} must be a positive integer",
                          "pass the image's real size")
    return int(value)


class CudaKernels:
    """The four kernel modules on one launcher (created with ``create_launcher`` if None)."""

    def __init__(self, launcher: KernelLauncher | None = None,
                 build_dir: Path | None = None) -> None:
        self.launcher = launcher or create_launcher()
        for name in KERNELS:
            if not self.launcher.has_module(name):
                self.launcher.load(name, build_kernel(name, build_dir).read_bytes())

    # ------------------------------------------------------------ pointer calls
    def bitdepth(self, src: int, dst: int, nbytes: int, bits: int, mode: str = "round",
                 stream: Any = None) -> None:
        """Reduce each of ``nbytes`` bytes to ``bits`` bits (src may equal dst); ``mode``
        "round" (Xu et al., the CPU default) or "truncate" (drop the low bits)."""
        words = max(int(nbytes) // 16, 1)
        grid = min(_blocks(words, BITDEPTH_BLOCK), BITDEPTH_MAX_BLOCKS)
        self.launcher.launch("bitdepth", "rs_bitdepth_u8", (grid,), (BITDEPTH_BLOCK,),
                             [ptr(src), ptr(dst), size_t(nbytes), i32(check_bits(bits)),
                              i32(check_mode(mode))], stream=stream)

    def median(self, src: int, dst: int, height: int, width: int, channels: int, ksize: int,
               src_stride: int | None = None, dst_stride: int | None = None,
               stream: Any = None) -> None:
        """K x K median per channel, borders replicated; src and dst must differ."""
        height, width = _positive(height, "height"), _positive(width, "width")
        channels, ksize = _positive(channels, "channels"), check_ksize(ksize)
        if channels > 16:
            raise ConfigError(f"median of {channels} channels is not supported",
                              "split the image into groups of at most 16 channels")
        if src == dst:
            raise ConfigError("median cannot run in place (src == dst)",
                              "pass a separate output buffer")
        tile = MEDIAN_TILE + ksize - 1
        grid = (_blocks(width, MEDIAN_TILE), _blocks(height, MEDIAN_TILE))
        if grid[1] > MAX_GRID_YZ:
            raise ConfigError(f"image height {height} is too large for one launch",
                              "process the image in horizontal strips")
        row = width * channels
        self.launcher.launch("median", f"rs_median{ksize}_u8", grid, (MEDIAN_TILE, MEDIAN_TILE),
                             [ptr(src), ptr(dst), i32(height), i32(width), i32(channels),
                              size_t(src_stride or row), size_t(dst_stride or row)],
                             shared_bytes=tile * tile * channels, stream=stream)

    def jpeg(self, src: int, dst: int, height: int, width: int, quality: int, bgr: bool = True,
             src_stride: int | None = None, dst_stride: int | None = None,
             stream: Any = None) -> None:
        """JPEG approximation of a 3-channel frame (BGR unless ``bgr=False``); in place is fine."""
        height, width = _positive(height, "height"), _positive(width, "width")
        grid = (_blocks(width, 8), _blocks(height, 8))
        if grid[1] > MAX_GRID_YZ:
            raise ConfigError(f"image height {height} is too large for one launch",
                              "process the image in horizontal strips")
        self.launcher.launch("jpeg_dct", "rs_jpeg_u8", grid, (8, 8),
                             [ptr(src), ptr(dst), i32(height), i32(width),
                              size_t(src_stride or width * 3), size_t(dst_stride or width * 3),
                              i32(check_quality(quality)), i32(int(bool(bgr)))], stream=stream)

    def preprocess_roi(self, frame: int, height: int, width: int, box: Box, size: int, out: int,
                       row_stride: int | None = None,
                       stream: Any = None) -> tuple[int, int, int, int]:
        """Crop ``box`` (x0, y0, x1, y1; x1/y1 exclusive) of a BGR frame, resize to
        size x size and write float32 [3, size, size] RGB in [0, 1] at ``out``.

        Returns the box after clamping to the frame; raises ``RoiError`` if it is empty.
        """
        height, width = _positive(height, "height"), _positive(width, "width")
        size = _positive(size, "size")
        clamped = clamp_box(box, height, width)
        if clamped is None:
            raise RoiError(f"box {tuple(box)!r} is empty inside a {width}x{height} frame",
                           "pass a box with x0 < x1 and y0 < y1 that overlaps the frame")
        grid = (_blocks(size, PREPROCESS_BLOCK), _blocks(size, PREPROCESS_BLOCK))
        self.launcher.launch("fused_preprocess", "rs_preprocess_roi", grid,
                             (PREPROCESS_BLOCK, PREPROCESS_BLOCK),
                             [ptr(frame), i32(height), i32(width),
                              size_t(row_stride or width * 3), *(i32(v) for v in clamped),
                              i32(size), ptr(out)], stream=stream)
        return clamped

    def preprocess_rois(self, frame: int, height: int, width: int, boxes: int, n_rois: int,
                        size: int, out: int, row_stride: int | None = None,
                        stream: Any = None) -> None:
        """Batch form: ``boxes`` is a device int32 [n_rois, 4] of clamped boxes, ``out``
        float32 [n_rois, 3, size, size]. An empty box yields zeros."""
        height, width = _positive(height, "height"), _positive(width, "width")
        n_rois, size = _positive(n_rois, "n_rois"), _positive(size, "size")
        if n_rois > MAX_GRID_YZ:
            raise ConfigError(f"{n_rois} ROIs exceed one launch ({MAX_GRID_YZ})",
                              "split the boxes into smaller batches")
        grid = (_blocks(size, PREPROCESS_BLOCK), _blocks(size, PREPROCESS_BLOCK), n_rois)
        self.launcher.launch("fused_preprocess", "rs_preprocess_rois", grid,
                             (PREPROCESS_BLOCK, PREPROCESS_BLOCK),
                             [ptr(frame), i32(height), i32(width),
                              size_t(row_stride or width * 3), ptr(boxes), i32(n_rois),
                              i32(size), ptr(out)], stream=stream)

    # ------------------------------------------------------------ array calls
    def _roundtrip(self, image: np.ndarray, call: Any, out_shape: Sequence[int],
                   out_dtype: Any) -> np.ndarray:
        launcher = self.launcher
        src = launcher.to_device(image)
        dst = launcher.alloc(max(int(np.prod(out_shape)) * np.dtype(out_dtype).itemsize, 1))
        try:
            call(src, dst)
            launcher.synchronize()
            return launcher.from_device(dst, out_shape, out_dtype)
        finally:
            launcher.free(src)
            launcher.free(dst)

    def bitdepth_array(self, image: np.ndarray, bits: int, mode: str = "round") -> np.ndarray:
        """Bit-depth reduction of any uint8 array."""
        img = np.ascontiguousarray(image, dtype=np.uint8)
        return self._roundtrip(img, lambda s, d: self.bitdepth(s, d, img.size, bits, mode),
                               img.shape, np.uint8)

    def median_array(self, image: np.ndarray, ksize: int) -> np.ndarray:
        """K x K median of an H x W or H x W x C uint8 image."""
        img = np.ascontiguousarray(image, dtype=np.uint8)
        channels = 1 if img.ndim == 2 else img.shape[2]
        return self._roundtrip(img, lambda s, d: self.median(s, d, img.shape[0], img.shape[1],
                                                             channels, ksize),
                               img.shape, np.uint8)

    def jpeg_array(self, image: np.ndarray, quality: int, bgr: bool = True) -> np.ndarray:
        """JPEG approximation of an H x W x 3 uint8 image."""
        img = np.ascontiguousarray(image, dtype=np.uint8)
        if img.ndim != 3 or img.shape[2] != 3:
            raise ConfigError(f"jpeg input shape {img.shape} is not H x W x 3",
                              "pass a 3-channel uint8 frame")
        return self._roundtrip(img, lambda s, d: self.jpeg(s, d, img.shape[0], img.shape[1],
                                                           quality, bgr), img.shape, np.uint8)

    def preprocess_array(self, frame_bgr: np.ndarray, box: Box, size: int) -> np.ndarray:
        """Model input float32 (1, 3, size, size) RGB in [0, 1] from a BGR frame."""
        img = np.ascontiguousarray(frame_bgr, dtype=np.uint8)
        if img.ndim != 3 or img.shape[2] != 3:
            raise RoiError(f"frame shape {img.shape} is not H x W x 3",
                           "pass the camera frame as H x W x 3 uint8 BGR")
        return self._roundtrip(
            img, lambda s, d: self.preprocess_roi(s, img.shape[0], img.shape[1], box, size, d),
            (1, 3, size, size), np.float32)

    def preprocess_batch_array(self, frame_bgr: np.ndarray, boxes: Sequence[Box],
                               size: int) -> np.ndarray:
        """float32 (N, 3, size, size) for N boxes of one frame (clamped; empty -> RoiError)."""
        img = np.ascontiguousarray(frame_bgr, dtype=np.uint8)
        clamped = []
        for box in boxes:
            c = clamp_box(box, img.shape[0], img.shape[1])
            if c is None:
                raise RoiError(f"box {tuple(box)!r} is empty inside the frame",
                               "drop boxes that do not overlap the frame")
            clamped.append(c)
        table = self.launcher.to_device(np.asarray(clamped, np.int32).reshape(-1, 4))
        try:
            return self._roundtrip(
                img, lambda s, d: self.preprocess_rois(s, img.shape[0], img.shape[1], table,
                                                       len(clamped), size, d),
                (len(clamped), 3, size, size), np.float32)
        finally:
            self.launcher.free(table)
