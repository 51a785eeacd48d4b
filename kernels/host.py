"""ctypes binding to the host build of the kernels' shared math (``pixel_math.cuh``).

The host library runs the very ``__host__ __device__`` functions the CUDA kernels
run, on the CPU, so tests compare the kernels' arithmetic with NumPy references
on machines with no GPU. ``load_host_math()`` builds the library on first use
(``kernels.build.build_host_library``; a C++ compiler is enough).

Image conventions: uint8 HWC, C-contiguous. ``jpeg`` takes 3-channel frames,
BGR by default (camera frames). ``preprocess_roi`` returns the model input:
float32 ``(1, 3, size, size)`` RGB in ``[0, 1]``.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kernels.build import build_host_library
from kernels.reference import RoiError, clamp_box
from roadshield_base.errors import ConfigError, RoadshieldError

ABI_VERSION = 2
BITDEPTH_MODES = {"truncate": 0, "round": 1}

_u8p = ctypes.POINTER(ctypes.c_uint8)
_u32p = ctypes.POINTER(ctypes.c_uint32)
_i32p = ctypes.POINTER(ctypes.c_int)
_f32p = ctypes.POINTER(ctypes.c_float)
_SIGNATURES: dict[str, list[type]] = {
    "rs_host_abi_version": [],
    "rs_host_bitdepth": [_u8p, _u8p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int],
    "rs_host_bitdepth_packed": [_u32p, _u32p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int],
    "rs_host_median": [_u8p, _u8p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int],
    "rs_host_linear_taps": [ctypes.c_int, ctypes.c_int, _i32p, _i32p, _f32p],
    "rs_host_preprocess": [_u8p, ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_int,
                           ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, _f32p],
    "rs_host_jpeg_qtable": [ctypes.c_int, ctypes.c_int, _i32p],
    "rs_host_dct_basis": [_f32p],
    "rs_host_jpeg": [_u8p, _u8p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int],
}


def _ptr(array: np.ndarray, ctype: type) -> ctypes._Pointer:  # type: ignore[type-arg]
    return array.ctypes.data_as(ctypes.POINTER(ctype))


def _image(image: np.ndarray, what: str, channels: int | None = None) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ConfigError(f"{what} must be a uint8 ndarray, got "
                          f"{getattr(image, 'dtype', type(image).__name__)}",
                          "pass an H x W x C uint8 image")
    if image.ndim not in (2, 3) or image.shape[0] < 1 or image.shape[1] < 1:
        raise ConfigError(f"{what} shape {image.shape} is not a non-empty H x W (x C) image",
                          "pass an H x W x C uint8 image")
    if channels is not None and (image.ndim != 3 or image.shape[2] != channels):
        raise ConfigError(f"{what} shape {image.shape} must have {channels} channels",
                          "pass an H x W x 3 uint8 frame")
    return np.ascontiguousarray(image)


def check_bits(bits: int) -> int:
    """Validate a bit depth (1..8)."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise ConfigError(f"bit depth {bits!r} is outside 1..8", "choose bits between 1 and 8")
    return int(bits)


def check_mode(mode: str) -> int:
    """Validate a bit-depth mode ("round" or "truncate"); returns the kernel's code."""
    if mode not in BITDEPTH_MODES:
        raise ConfigError(f"bitdepth mode {mode!r} is unknown",
                          "use mode 'round' (Xu et al.) or 'truncate' (drop low bits)")
    return BITDEPTH_MODES[mode]


def check_ksize(ksize: int) -> int:
    """Validate a median window (3 or 5)."""
    if ksize not in (3, 5) or isinstance(ksize, bool):
        raise ConfigError(f"median window {ksize!r} is not supported",
                          "use ksize 3 or 5")
    return int(ksize)


def check_quality(quality: int) -> int:
    """Validate a JPEG quality (1..100, IJG scale)."""
    if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)) \
            or not 1 <= quality <= 100:
        raise ConfigError(f"JPEG quality {quality!r} is outside 1..100",
                          "choose a quality between 1 and 100 (75 is the IJG default)")
    return int(quality)


class HostMath:
    """The host library's functions with NumPy in and out."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            lib = ctypes.CDLL(str(self.path))
        except OSError as err:
            raise RoadshieldError(f"cannot load the host math library {self.path}: {err}",
                                  "rebuild it with `python -m kernels.build --host --force`"
                                  ) from err
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int
        version = lib.rs_host_abi_version()
        if version != ABI_VERSION:
            raise RoadshieldError(f"{self.path} has ABI version {version}, expected "
                                  f"{ABI_VERSION}", "rebuild with `python -m kernels.build`")
        self._lib = lib

    def _check(self, code: int, call: str) -> None:
        if code != 0:
            raise ConfigError(f"{call} rejected its arguments (code {code})",
                              "check shapes, sizes and parameter ranges")

    def bitdepth(self, image: np.ndarray, bits: int, mode: str = "round") -> np.ndarray:
        """Bit-depth reduction of any uint8 array, byte by byte; same shape and dtype."""
        src = np.ascontiguousarray(image, dtype=np.uint8)
        dst = np.empty_like(src)
        self._check(self._lib.rs_host_bitdepth(_ptr(src, ctypes.c_uint8),
                                               _ptr(dst, ctypes.c_uint8), src.size,
                                               check_bits(bits), check_mode(mode)), "bitdepth")
        return dst

    def bitdepth_packed(self, words: np.ndarray, bits: int, mode: str = "round") -> np.ndarray:
        """The kernel's vector path on uint32 words (four packed bytes each)."""
        src = np.ascontiguousarray(words, dtype=np.uint32)
        dst = np.empty_like(src)
        self._check(self._lib.rs_host_bitdepth_packed(_ptr(src, ctypes.c_uint32),
                                                      _ptr(dst, ctypes.c_uint32), src.size,
                                                      check_bits(bits), check_mode(mode)),
                    "bitdepth_packed")
        return dst

    def median(self, image: np.ndarray, ksize: int) -> np.ndarray:
        """K x K median per channel, borders replicated; H x W or H x W x C uint8."""
        src = _image(image, "median input")
        channels = 1 if src.ndim == 2 else src.shape[2]
        dst = np.empty_like(src)
        self._check(self._lib.rs_host_median(_ptr(src, ctypes.c_uint8),
                                             _ptr(dst, ctypes.c_uint8), src.shape[0],
                                             src.shape[1], channels, check_ksize(ksize)),
                    "median")
        return dst

    def linear_taps(self, n_src: int, n_dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(i0, i1, w)`` of the float32 bilinear taps, as ``kernels.reference.linear_taps``."""
        i0 = np.empty(n_dst, np.int32)
        i1 = np.empty(n_dst, np.int32)
        w = np.empty(n_dst, np.float32)
        self._check(self._lib.rs_host_linear_taps(n_src, n_dst, _ptr(i0, ctypes.c_int),
                                                  _ptr(i1, ctypes.c_int),
                                                  _ptr(w, ctypes.c_float)), "linear_taps")
        return i0, i1, w

    def preprocess_roi(self, frame_bgr: np.ndarray, box: Sequence[float], size: int) -> np.ndarray:
        """Fused crop/resize/BGR->RGB//255: float32 ``(1, 3, size, size)`` RGB in [0, 1]."""
        frame = _image(frame_bgr, "frame", channels=3)
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise RoiError(f"size {size!r} must be a positive integer",
                           "use the model's input_size")
        clamped = clamp_box(box, frame.shape[0], frame.shape[1])
        if clamped is None:
            raise RoiError(f"box {tuple(box)!r} is empty inside a "
                           f"{frame.shape[1]}x{frame.shape[0]} frame",
                           "pass a box with x0 < x1 and y0 < y1 that overlaps the frame")
        out = np.empty((1, 3, int(size), int(size)), np.float32)
        self._check(self._lib.rs_host_preprocess(_ptr(frame, ctypes.c_uint8), frame.shape[0],
                                                 frame.shape[1], frame.strides[0], *clamped,
                                                 int(size), _ptr(out, ctypes.c_float)),
                    "preprocess_roi")
        return out

    def jpeg_qtable(self, quality: int, chroma: bool = False) -> np.ndarray:
        """The IJG-scaled 8 x 8 quantisation table (int32, row-major over (v, u))."""
        out = np.empty(64, np.int32)
        self._check(self._lib.rs_host_jpeg_qtable(check_quality(quality), int(chroma),
                                                  _ptr(out, ctypes.c_int)), "jpeg_qtable")
        return out.reshape(8, 8)

    def dct_basis(self) -> np.ndarray:
        """The orthonormal 8-point DCT-II basis, float32 ``[k, n]``."""
        out = np.empty(64, np.float32)
        self._check(self._lib.rs_host_dct_basis(_ptr(out, ctypes.c_float)), "dct_basis")
        return out.reshape(8, 8)

    def jpeg(self, image: np.ndarray, quality: int, bgr: bool = True) -> np.ndarray:
        """JPEG approximation of an H x W x 3 uint8 image (BGR unless ``bgr=False``)."""
        src = _image(image, "jpeg input", channels=3)
        dst = np.empty_like(src)
        self._check(self._lib.rs_host_jpeg(_ptr(src, ctypes.c_uint8), _ptr(dst, ctypes.c_uint8),
                                           src.shape[0], src.shape[1], check_quality(quality),
                                           int(bgr)), "jpeg")
        return dst


_CACHE: dict[Path, HostMath] = {}


def load_host_math(build_dir: Path | None = None) -> HostMath:
    """Build (if needed) and load the host library; cached per library path.

    Raises ``BackendUnavailableError`` when no compiler can build it.
    """
    path = build_host_library(build_dir)
    if path not in _CACHE:
        _CACHE[path] = HostMath(path)
    return _CACHE[path]
