"""Plain-NumPy references for the input sanitizers.

Each function here is the written-out formula of one sanitizer, with no OpenCV, so a
CUDA kernel and the fast CPU path in ``edge_runtime.sanitize`` can both be checked
against it. They work on one image at a time in the obvious way (pad, slide, sort,
matrix products in float64), which also makes them the slow baseline of
``scripts/bench_sanitize.py``.

Layouts: "image" is H x W x 3 uint8 BGR (a camera frame or a crop of one); "batch" is
N x 3 x H x W float32 RGB in [0, 1] (model input). A batch is turned into 8-bit images,
where an operation needs them, by ``v = rint(clip(x, 0, 1) * 255)``.

Exact definitions
-----------------
bitdepth, uint8, ``L = 2**bits - 1``:
    mode "round":    q = (2 * x * L + 255) // 510          # round(x * L / 255), never a tie
                     y = (2 * q * 255 + L) // (2 * L)      # round(q * 255 / L), never a tie
    mode "truncate": y = (x >> (8 - bits)) << (8 - bits)
bitdepth, float32 (Xu et al. 2018, "feature squeezing"), all in float32:
    mode "round":    y = rint(clip(x, 0, 1) * L) / L      # rint: round half to even
    mode "truncate": the uint8 rule on rint(clip(x, 0, 1) * 255), then / 255
median: k x k window (k odd), the middle of the sorted k*k values, borders replicated
    (OpenCV's cv2.medianBlur uses BORDER_REPLICATE); per channel.
jpeg (DCT approximation): see ``jpeg_dct_reference``.
resize_pad (Xie et al. 2018): see ``resize_pad_params`` and ``resize_pad_reference``.
"""

from __future__ import annotations

import math

import numpy as np

from kernels.reference import bilinear_resize_reference
from roadshield_base.errors import RoadshieldError


class SanitizeError(RoadshieldError, ValueError):
    """An input or a setting a sanitizer cannot work with."""


def check_bits(bits: int, mode: str = "round") -> tuple[int, str]:
    """Validate a bit depth (1..8) and mode ("round" or "truncate")."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise SanitizeError(f"bitdepth bits={bits!r} is not an integer in 1..8",
                            "Xu et al. use 1-5 bits for colour images; e.g. bitdepth:bits=5")
    if mode not in ("round", "truncate"):
        raise SanitizeError(f"bitdepth mode={mode!r} is unknown",
                            "use mode=round (Xu's formula) or mode=truncate (drop low bits)")
    return int(bits), mode


def bitdepth_lut(bits: int, mode: str = "round") -> np.ndarray:
    """The 256-entry uint8 table of the uint8 bit-depth rule (module docstring)."""
    bits, mode = check_bits(bits, mode)
    x = np.arange(256, dtype=np.int64)
    return bitdepth_reference(x.astype(np.uint8), bits, mode)


def bitdepth_reference(x: np.ndarray, bits: int, mode: str = "round") -> np.ndarray:
    """Bit-depth reduction of uint8 (any shape) or float32 in [0, 1] (any shape).

    Returns the same dtype and shape; the formulas are in the module docstring.
    """
    bits, mode = check_bits(bits, mode)
    levels = (1 << bits) - 1
    if x.dtype == np.uint8:
        v = x.astype(np.int64)
        if mode == "truncate":
            shift = 8 - bits
            return ((v >> shift) << shift).astype(np.uint8)
        q = (2 * v * levels + 255) // 510
        return ((2 * q * 255 + levels) // (2 * levels)).astype(np.uint8)
    if x.dtype != np.float32:
        raise SanitizeError(f"bitdepth_reference got dtype {x.dtype}",
                            "pass uint8 images or float32 batches")
    xc = np.clip(x, np.float32(0.0), np.float32(1.0))
    if mode == "truncate":
        v8 = np.rint(xc * np.float32(255.0)).astype(np.uint8)
        return bitdepth_reference(v8, bits, mode).astype(np.float32) / np.float32(255.0)
    lv = np.float32(levels)
    return (np.rint(xc * lv) / lv).astype(np.float32)


def median_reference(image: np.ndarray, k: int = 3) -> np.ndarray:
    """k x k median of an H x W or H x W x C array, borders replicated; same dtype."""
    if k < 1 or k % 2 == 0:
        raise SanitizeError(f"median window k={k} must be odd and positive", "use k=3 or k=5")
    r = k // 2
    pad = ((r, r), (r, r)) + ((0, 0),) * (image.ndim - 2)
    padded = np.pad(image, pad, mode="edge")
    win = np.lib.stride_tricks.sliding_window_view(padded, (k, k), axis=(0, 1))
    flat = win.reshape(win.shape[:-2] + (k * k,))
    return np.sort(flat, axis=-1)[..., (k * k) // 2]


# --- JPEG approximation ---------------------------------------------------------------------

#: ITU-T T.81 Annex K, table K.1 (luminance) and K.2 (chrominance), row-major.
JPEG_LUMA_TABLE = np.array([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56], [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], np.int64)
JPEG_CHROMA_TABLE = np.full((8, 8), 99, np.int64)
JPEG_CHROMA_TABLE[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99],
                             [47, 66, 99, 99]]
#: BT.601 full range (JFIF): rows give Y, Cb - 128, Cr - 128 from R, G, B.
RGB_TO_YCC = np.array([[0.299, 0.587, 0.114],
                       [-0.168735892, -0.331264108, 0.5],
                       [0.5, -0.418687589, -0.081312411]])
#: JFIF inverse: rows give R, G, B from Y, Cb - 128, Cr - 128.
YCC_TO_RGB = np.array([[1.0, 0.0, 1.402],
                       [1.0, -0.344136286, -0.714136286],
                       [1.0, 1.772, 0.0]])


def check_quality(quality: int) -> int:
    if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)) \
            or not 1 <= quality <= 100:
        raise SanitizeError(f"jpeg quality={quality!r} is not an integer in 1..100",
                            "Guo et al. and Das et al. use quality 50-90; e.g. jpeg:quality=75")
    return int(quality)


def jpeg_quant_tables(quality: int) -> np.ndarray:
    """(2, 8, 8) float64: luminance and chrominance tables scaled by IJG's formula.

    scale = 5000 // q for q < 50, else 200 - 2 q; entry = clip((base * scale + 50) // 100,
    1, 255) (libjpeg's ``jpeg_quality_scaling`` with ``force_baseline``).
    """
    q = check_quality(quality)
    scale = 5000 // q if q < 50 else 200 - 2 * q
    base = np.stack([JPEG_LUMA_TABLE, JPEG_CHROMA_TABLE])
    return np.clip((base * scale + 50) // 100, 1, 255).astype(np.float64)


def dct_matrix() -> np.ndarray:
    """8 x 8 orthonormal DCT-II: D[u, n] = c(u) cos((2n + 1) u pi / 16), c(0) = sqrt(1/8),
    c(u > 0) = sqrt(2/8). Forward F = D B D^T, inverse B = D^T F D."""
    n = np.arange(8)
    d = np.cos((2 * n[None, :] + 1) * n[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    d[0] /= math.sqrt(2)
    return d


def jpeg_dct_reference(image_bgr: np.ndarray, quality: int = 75) -> np.ndarray:
    """JPEG-like recompression of H x W x 3 (or N x H x W x 3) uint8 BGR; same shape/dtype.

    Steps, in float64: BGR -> RGB -> YCbCr (``RGB_TO_YCC``, no intermediate rounding),
    level shift (Y - 128; Cb, Cr centred on 0), pad right/bottom to a multiple of 8 by
    repeating the last column/row (as libjpeg does), per 8 x 8 block and channel
    F = D B D^T, quantise ``rint(F / Q)`` with ``jpeg_quant_tables(quality)`` (luma table
    for Y, chroma for Cb and Cr), dequantise ``* Q``, inverse DCT, crop, undo the level
    shift, ``YCC_TO_RGB``, ``rint``, clip to 0..255, back to BGR. No chroma subsampling
    (libjpeg at 4:4:4), no entropy coding (lossless, so it changes nothing).
    """
    q_tables = jpeg_quant_tables(quality)
    if image_bgr.dtype != np.uint8 or image_bgr.ndim not in (3, 4) or image_bgr.shape[-1] != 3:
        raise SanitizeError(f"jpeg_dct_reference got {image_bgr.dtype} {image_bgr.shape}",
                            "pass H x W x 3 or N x H x W x 3 uint8 BGR")
    single = image_bgr.ndim == 3
    img = image_bgr[None] if single else image_bgr
    n, h, w, _ = img.shape
    ycc = img[..., ::-1].astype(np.float64) @ RGB_TO_YCC.T
    ycc[..., 0] -= 128.0
    hp, wp = -(-h // 8) * 8, -(-w // 8) * 8
    ycc = np.pad(ycc, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)), mode="edge")
    # (n, hb, 8, wb, 8, c) -> (n, hb, wb, c, 8, 8)
    blocks = ycc.reshape(n, hp // 8, 8, wp // 8, 8, 3).transpose(0, 1, 3, 5, 2, 4)
    d = dct_matrix()
    coef = d @ blocks @ d.T
    qt = q_tables[[0, 1, 1]][None, None, None]  # (1, 1, 1, 3, 8, 8)
    coef = np.rint(coef / qt) * qt
    rec = d.T @ coef @ d
    rec = rec.transpose(0, 1, 4, 2, 5, 3).reshape(n, hp, wp, 3)[:, :h, :w]
    rec[..., 0] += 128.0
    rgb = rec @ YCC_TO_RGB.T
    out = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)[..., ::-1]
    out = np.ascontiguousarray(out)
    return out[0] if single else out


# --- randomized resize and pad --------------------------------------------------------------

def check_min_frac(min_frac: float) -> float:
    if not (isinstance(min_frac, (int, float, np.floating)) and 0.0 < float(min_frac) <= 1.0):
        raise SanitizeError(f"resize_pad min_frac={min_frac!r} is not in (0, 1]",
                            "Xie et al. shrink by at most ~10%; e.g. resize_pad:min_frac=0.875")
    return float(min_frac)


def resize_pad_params(seed: int, frame_index: int, height: int, width: int, count: int,
                      min_frac: float = 0.875) -> np.ndarray:
    """The random draws of ``resize_pad``: int64 (count, 4) rows ``(new_h, new_w, top, left)``.

    ``rng = np.random.default_rng((seed, frame_index))``; then, vectorised over the
    ``count`` images of that frame, in this order:
    ``new_h = rng.integers(max(1, ceil(min_frac * height)), height + 1)``,
    ``new_w = clip((2 * width * new_h + height) // (2 * height), 1, width)`` (same scale),
    ``top = rng.integers(0, height - new_h + 1)``, ``left = rng.integers(0, width - new_w + 1)``.
    The same (seed, frame_index) always gives the same rows, so a run replays.
    """
    min_frac = check_min_frac(min_frac)
    if seed < 0 or frame_index < 0:
        raise SanitizeError(f"seed={seed} / frame_index={frame_index} must be >= 0",
                            "use non-negative integers (the frame index from the source)")
    rng = np.random.default_rng((int(seed), int(frame_index)))
    lo = max(1, math.ceil(min_frac * height - 1e-9))
    new_h = rng.integers(lo, height + 1, size=count)
    new_w = np.clip((2 * width * new_h + height) // (2 * height), 1, width)
    top = rng.integers(0, height - new_h + 1)
    left = rng.integers(0, width - new_w + 1)
    return np.stack([new_h, new_w, top, left], axis=1).astype(np.int64)


def resize_pad_reference(image: np.ndarray, params: np.ndarray | tuple[int, int, int, int],
                         fill: float = 0.0) -> np.ndarray:
    """Shrink an H x W x C image (uint8 or float32) and pad it back to H x W.

    params: ``(new_h, new_w, top, left)`` from ``resize_pad_params``. The image is resized
    to new_h x new_w with ``kernels.reference.bilinear_resize_reference`` (OpenCV's
    half-pixel-centre bilinear), placed with its top-left corner at (top, left) on a canvas
    of ``fill`` (in [0, 1] units: ``rint(fill * 255)`` for uint8). uint8 results are
    ``rint``-ed and clipped.
    """
    new_h, new_w, top, left = (int(v) for v in params)
    h, w = image.shape[:2]
    if not (1 <= new_h <= h and 1 <= new_w <= w and 0 <= top <= h - new_h
            and 0 <= left <= w - new_w):
        raise SanitizeError(f"resize_pad params {tuple(params)} do not fit a {w}x{h} image",
                            "draw them with resize_pad_params for this image size")
    small = bilinear_resize_reference(image, new_h, new_w)
    if image.dtype == np.uint8:
        canvas = np.full(image.shape, int(np.rint(fill * 255.0)), np.uint8)
        small = np.clip(np.rint(small), 0, 255).astype(np.uint8)
    else:
        canvas = np.full(image.shape, fill, image.dtype)
    canvas[top:top + new_h, left:left + new_w] = small.astype(image.dtype)
    return canvas


# --- batch layout helpers -------------------------------------------------------------------

def batch_to_images(batch: np.ndarray) -> np.ndarray:
    """N x 3 x H x W float32 RGB in [0, 1] -> N x H x W x 3 uint8 BGR, ``rint(clip(x)*255)``."""
    v = np.rint(np.clip(batch, 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)
    return np.ascontiguousarray(v[:, ::-1].transpose(0, 2, 3, 1))


def images_to_batch(images_bgr: np.ndarray) -> np.ndarray:
    """N x H x W x 3 uint8 BGR -> N x 3 x H x W float32 RGB, ``v / 255``."""
    rgb = images_bgr[..., ::-1].transpose(0, 3, 1, 2)
    return (rgb.astype(np.float32) / np.float32(255.0)).astype(np.float32)
