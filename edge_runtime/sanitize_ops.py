"""The sanitizer operations: pure functions on images and model batches, and their
whole-batch fast paths.

Each operation takes either layout and returns a new array of the same layout:

* "image": H x W x 3 uint8 **BGR** (a camera frame, or a crop of one);
* "batch": N x 3 x H x W float32 **RGB** in [0, 1] (model input). Non-finite values
  raise ``SanitizeError``; finite values outside [0, 1] are clipped to it.

Anything else (another dtype, a channel count other than 3, an empty image) raises
``SanitizeError`` naming the shape and dtype. The exact formulas, and the plain-NumPy
references the CUDA kernels are checked against, are in ``kernels.sanitize_reference``.
The registry and chains are in ``edge_runtime.sanitize``.

Batch fast paths (whole-batch work; what stays per image is a slice copy, or the 4:2:0
codec, which cannot be tiled):

* ``to_uint8_planes`` / ``from_uint8_planes``: ``rint(clip(x) * 255)`` to uint8 and
  ``v / 255`` back, in the batch's own planar RGB layout (no per-pixel transposes);
* ``jpeg_codec_batch``: libjpeg through OpenCV on a **mosaic**: the images, padded to a
  multiple of 8 by repeating their last row/column (what libjpeg itself does), are
  tiled into one picture that is encoded and decoded once. At 4:4:4 every 8 x 8 block
  is coded on its own (DC prediction is lossless, there is no chroma filtering), so
  each tile decodes to exactly what the image would alone; ``tests/edge_runtime``
  checks this bit for bit. 4:2:0 upsamples chroma across blocks, so it stays per image;
* ``jpeg_dct_planes``: the DCT approximation of ``jpeg_dct_reference`` as GEMMs over the
  whole batch (colour transform and DCT along x as one 24 x 24 matrix on rows of 8
  pixels, the DCT along y as D @ block rows; the same back). Same float64 steps in another
  order: a coefficient exactly on a half quantisation step (images of a few flat levels
  produce such ties) rounds whichever way float noise pushes it, here and in the
  reference alike, moving that 8 x 8 block by one quantisation step of the coefficient:
  on noise all values agree, on few-level images >= 99 % with a mean difference under
  0.05 levels (``tests/edge_runtime/test_sanitize_ops.py``);
* ``resize_pad_batch``: images that share a drawn size are resized together, as one
  tall single-channel image per axis (``cv2.resize``, INTER_LINEAR; the other axis
  keeps its size, which OpenCV copies exactly), then pasted at their offsets (one
  slice copy per image: cheaper than any fancy-index scatter measured).
"""

from __future__ import annotations

import contextlib
from typing import Any

import cv2
import numpy as np

from kernels.sanitize_reference import (
    RGB_TO_YCC,
    YCC_TO_RGB,
    SanitizeError,
    bitdepth_lut,
    check_bits,
    check_min_frac,
    check_quality,
    dct_matrix,
    jpeg_quant_tables,
    resize_pad_params,
)

__all__ = ["SanitizeError", "check_input", "bitdepth", "median", "jpeg", "resize_pad",
           "check_k", "check_jpeg", "check_resize_pad"]

def check_input(x: Any, op: str) -> str:
    """Return "image" (H x W x 3 uint8) or "batch" (N x 3 x H x W float32), else raise."""
    if not isinstance(x, np.ndarray):
        raise SanitizeError(f"{op}: input is a {type(x).__name__}, not a numpy array",
                            "pass H x W x 3 uint8 BGR or N x 3 x H x W float32 RGB")
    if x.dtype == np.uint8:
        if x.ndim != 3 or x.shape[2] != 3:
            raise SanitizeError(f"{op}: uint8 input of shape {x.shape} is not H x W x 3",
                                "convert grey/BGRA frames to BGR with cv2.cvtColor first")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise SanitizeError(f"{op}: image of shape {x.shape} is empty",
                                "drop empty crops before sanitizing")
        return "image"
    if x.dtype == np.float32:
        if x.ndim != 4 or x.shape[1] != 3:
            raise SanitizeError(f"{op}: float32 input of shape {x.shape} is not N x 3 x H x W",
                                "float input is a model batch, NCHW RGB in [0, 1]")
        if x.shape[2] == 0 or x.shape[3] == 0:
            raise SanitizeError(f"{op}: batch of shape {x.shape} has no pixels",
                                "give each image at least 1 x 1 pixels")
        if x.size and not (np.isfinite(x.min()) and np.isfinite(x.max())):
            raise SanitizeError(f"{op}: batch of shape {x.shape} holds NaN or infinity",
                                "check the preprocess and anything that wrote the batch")
        return "batch"
    raise SanitizeError(f"{op}: dtype {x.dtype} is not supported",
                        "pass uint8 H x W x 3 BGR images or float32 N x 3 x H x W batches")


def _clipped(x: np.ndarray) -> np.ndarray:
    """A float32 batch inside [0, 1] (the input itself when it already is)."""
    if x.size == 0 or (x.min() >= 0.0 and x.max() <= 1.0):
        return x
    return np.clip(x, np.float32(0.0), np.float32(1.0))


# --- the operations --------------------------------------------------------------------------

def bitdepth(x: np.ndarray, bits: int = 5, mode: str = "round") -> np.ndarray:
    """Feature squeezing (Xu et al. 2018): keep ``bits`` (1..8) levels per channel.

    image (uint8): a 256-entry table of the integer rule in ``kernels.sanitize_reference``
    (mode "round": round(x * L / 255) * 255 / L with L = 2**bits - 1, rounded; mode
    "truncate": clear the low 8 - bits bits). batch (float32, [0, 1]): mode "round" is
    ``rint(x * L) / L`` in float32; "truncate" applies the uint8 rule to ``rint(x * 255)``.
    Bit-exact with ``bitdepth_reference``.
    """
    bits, mode = check_bits(bits, mode)
    if check_input(x, "bitdepth") == "image":
        return cv2.LUT(x, bitdepth_lut(bits, mode))
    xc = _clipped(x)
    if mode == "truncate":
        v8 = np.rint(xc * np.float32(255.0)).astype(np.uint8)
        table = bitdepth_lut(bits, mode).astype(np.float32) / np.float32(255.0)
        return table[v8]
    levels = np.float32((1 << bits) - 1)
    out = np.multiply(xc, levels)
    np.rint(out, out=out)
    np.divide(out, levels, out=out)
    return out


def check_k(k: int) -> int:
    if isinstance(k, bool) or k not in (3, 5):
        raise SanitizeError(f"median k={k!r} is not supported", "use median:k=3 or median:k=5")
    return int(k)


def median(x: np.ndarray, k: int = 3) -> np.ndarray:
    """k x k median per channel (k = 3 or 5), borders replicated (BORDER_REPLICATE).

    image: ``cv2.medianBlur``. batch: all N * 3 planes, stacked into one tall single-channel
    image, go through one ``cv2.medianBlur``; the k // 2 rows at the top and bottom of each
    plane, whose windows reached a neighbouring plane, are then recomputed from strips of
    their own plane's rows (replicated at its edges). Bit-exact with ``median_reference``
    (a median only selects values).
    """
    k = check_k(k)
    if check_input(x, "median") == "image":
        return cv2.medianBlur(np.ascontiguousarray(x), k)
    n, c, h, w = x.shape
    if n == 0:
        return x.copy()
    r = k // 2
    planes = np.ascontiguousarray(x).reshape(n * c, h, w)
    out = cv2.medianBlur(planes.reshape(n * c * h, w), k).reshape(n * c, h, w)
    edge_rows = sorted({j for j in (*range(r), *range(h - r, h)) if 0 <= j < h})
    # window rows of each edge row, clamped to the plane: (len(edge_rows), k)
    windows = np.clip(np.array(edge_rows)[:, None] + np.arange(-r, r + 1), 0, h - 1)
    strips = planes[:, windows]  # (planes, edge rows, k, w); a strip's middle row is exact
    fixed = cv2.medianBlur(np.ascontiguousarray(strips).reshape(-1, w), k)
    out[:, edge_rows] = fixed.reshape(strips.shape)[:, :, r]
    return out.reshape(x.shape)


def check_jpeg(quality: int, method: str, chroma: str) -> tuple[int, str, str]:
    quality = check_quality(quality)
    if method not in ("codec", "dct"):
        raise SanitizeError(f"jpeg method={method!r} is unknown",
                            "use method=codec (libjpeg via OpenCV) or method=dct")
    if chroma not in ("444", "420") or (method == "dct" and chroma != "444"):
        raise SanitizeError(f"jpeg chroma={chroma!r} is not available with method={method}",
                            "use chroma=444 (both methods) or chroma=420 (codec only)")
    return quality, method, chroma


def jpeg(x: np.ndarray, quality: int = 75, method: str = "codec",
         chroma: str = "444") -> np.ndarray:
    """JPEG recompression (Dziugaite et al. 2016; Das et al. 2017) at ``quality`` (1..100).

    method "codec": ``cv2.imencode`` / ``cv2.imdecode`` (libjpeg), chroma "444" (no
    subsampling, the default) or "420"; a batch at 4:4:4 goes through the codec as one
    mosaic, equal image for image to separate round trips (see the module docstring). method
    "dct": the 8 x 8 DCT-quantise-IDCT approximation the GPU kernel computes (4:4:4
    only), as batched GEMMs; within the stated tolerance of ``jpeg_dct_reference``. A
    batch is first made 8-bit (``rint(clip(x) * 255)``) and returned as ``v / 255``.
    """
    quality, method, chroma = check_jpeg(quality, method, chroma)
    if check_input(x, "jpeg") == "image":
        if method == "dct":
            return jpeg_dct_image(x, quality)
        factor = (cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444 if chroma == "444"
                  else cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420)
        return codec_round_trip(np.ascontiguousarray(x), [
            cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, factor])
    if x.shape[0] == 0:
        return x.copy()
    planes = to_uint8_planes(x)
    if method == "dct":
        return from_uint8_planes(jpeg_dct_planes(planes, quality))
    return from_uint8_planes(jpeg_codec_batch(planes, quality, chroma))


def check_resize_pad(seed: int, min_frac: float, fill: float) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SanitizeError(f"resize_pad seed={seed!r} is not a non-negative integer",
                            "e.g. resize_pad:seed=0")
    check_min_frac(min_frac)
    if not (isinstance(fill, (int, float)) and 0.0 <= fill <= 1.0):
        raise SanitizeError(f"resize_pad fill={fill!r} is not in [0, 1]",
                            "fill is a grey level in [0, 1] units (0 = black)")


def resize_pad(x: np.ndarray, seed: int = 0, frame_index: int = 0, min_frac: float = 0.875,
               fill: float = 0.0) -> np.ndarray:
    """Randomized resize and pad (Xie et al. 2018), replayable per (seed, frame_index).

    Each image is shrunk by one random scale in [min_frac, 1] (``cv2.resize``,
    INTER_LINEAR) and placed at a random offset on a canvas of ``fill`` ([0, 1] units) of
    the input's own size, so the output size is fixed. The draws are
    ``resize_pad_params(seed, frame_index, H, W, count)``: one row for an image, one per
    row for a batch (rows that drew the same size are resized together). Within 1 grey
    level (uint8) / 1e-5 (float32) of
    ``resize_pad_reference``, which rounds OpenCV's bilinear formula in float64.
    """
    check_resize_pad(seed, min_frac, fill)
    if check_input(x, "resize_pad") == "image":
        h, w = x.shape[:2]
        nh, nw, top, left = (int(v) for v in resize_pad_params(seed, frame_index, h, w, 1,
                                                               min_frac)[0])
        out = np.full_like(x, int(np.rint(fill * 255.0)))
        out[top:top + nh, left:left + nw] = cv2.resize(x, (nw, nh),
                                                       interpolation=cv2.INTER_LINEAR)
        return out
    n, _, h, w = x.shape
    return resize_pad_batch(x, resize_pad_params(seed, frame_index, h, w, n, min_frac), fill)


# --- batch fast paths ---------------------------------------------------------------------

# libjpeg refuses pictures beyond 65535 pixels a side; stay clear of it
_MAX_JPEG_SIDE = 65000
_DCT = dct_matrix()
# a row of 8 pixels x 3 colours, ordered (colour, x) -> (Y/Cb/Cr, horizontal frequency u)
_ROW_FORWARD = np.kron(RGB_TO_YCC, _DCT).T
_ROW_INVERSE = np.kron(YCC_TO_RGB.T, _DCT)  # (Y/Cb/Cr, u) -> (R/G/B, x)
_BLAS: Any = None  # threadpoolctl's controller once looked up; False where it is missing
_F255 = np.float32(255.0)


def to_uint8_planes(batch: np.ndarray) -> np.ndarray:
    """N x 3 x H x W float32 -> uint8 of the same layout, ``rint(clip(x, 0, 1) * 255)``."""
    v = np.multiply(batch, np.float32(255.0))
    np.clip(v, 0.0, 255.0, out=v)
    np.rint(v, out=v)
    return v.astype(np.uint8)


def from_uint8_planes(planes: np.ndarray) -> np.ndarray:
    """uint8 N x 3 x H x W -> float32 ``v / 255`` (the same division as images_to_batch)."""
    return np.divide(planes, _F255, dtype=np.float32)


def _pad8(planes: np.ndarray) -> np.ndarray:
    """Pad the last two axes to multiples of 8 by repeating the last row / column."""
    h, w = planes.shape[-2:]
    hp, wp = -(-h // 8) * 8, -(-w // 8) * 8
    if (hp, wp) == (h, w):
        return planes
    pad = [(0, 0)] * (planes.ndim - 2) + [(0, hp - h), (0, wp - w)]
    return np.pad(planes, pad, mode="edge")


def codec_round_trip(image_bgr: np.ndarray, params: list[int]) -> np.ndarray:
    """One H x W x 3 uint8 BGR image through ``cv2.imencode`` / ``cv2.imdecode``."""
    ok, buf = cv2.imencode(".jpg", image_bgr, params)
    out = cv2.imdecode(buf, cv2.IMREAD_COLOR) if ok else None
    if out is None or out.shape != image_bgr.shape:
        raise SanitizeError(f"JPEG round trip of a {image_bgr.shape} image failed",
                            "check the OpenCV build has JPEG support (cv2.getBuildInformation)")
    return out


def _mosaic_round_trip(planes: np.ndarray, params: list[int]) -> np.ndarray:
    """uint8 RGB (k, 3, Hp, Wp), Hp/Wp multiples of 8, through one codec call."""
    k, _, hp, wp = planes.shape
    cols = max(1, min(int(np.ceil(np.sqrt(k))), _MAX_JPEG_SIDE // wp))
    rows = -(-k // cols)
    if rows * cols > k:
        planes = np.concatenate([planes, np.zeros((rows * cols - k, 3, hp, wp), np.uint8)])
    # (rows, cols, c, hp, wp) -> one (rows*hp, cols*wp) plane per colour, merged as BGR
    tiles = planes.reshape(rows, cols, 3, hp, wp)
    bgr = [np.ascontiguousarray(tiles[:, :, c].transpose(0, 2, 1, 3)).reshape(rows * hp, -1)
           for c in (2, 1, 0)]
    decoded = cv2.split(codec_round_trip(cv2.merge(bgr), params))
    out = np.empty((rows * cols, 3, hp, wp), np.uint8)
    for c, plane in zip((2, 1, 0), decoded, strict=True):
        out[:, c] = plane.reshape(rows, hp, cols, wp).transpose(0, 2, 1, 3).reshape(-1, hp, wp)
    return out[:k]


def jpeg_codec_batch(planes: np.ndarray, quality: int, chroma: str) -> np.ndarray:
    """uint8 RGB (N, 3, H, W) through libjpeg at ``quality``; same shape back.

    Equal, image for image, to an ``imencode``/``imdecode`` round trip of each image
    as H x W x 3 BGR (4:4:4 by mosaic, 4:2:0 one image at a time).
    """
    factor = (cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444 if chroma == "444"
              else cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420)
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality), cv2.IMWRITE_JPEG_SAMPLING_FACTOR, factor]
    n, _, h, w = planes.shape
    if chroma != "444":
        images = np.ascontiguousarray(planes[:, ::-1].transpose(0, 2, 3, 1))
        out = np.stack([codec_round_trip(im, params) for im in images])
        return np.ascontiguousarray(out[..., ::-1].transpose(0, 3, 1, 2))
    padded = _pad8(planes)
    hp, wp = padded.shape[-2:]
    if max(hp, wp) > _MAX_JPEG_SIDE:
        raise SanitizeError(f"jpeg: images of {w}x{h} exceed libjpeg's 65535-pixel side",
                            "resize the input before jpeg")
    per_mosaic = max(1, (_MAX_JPEG_SIDE // hp) * (_MAX_JPEG_SIDE // wp))
    parts = [_mosaic_round_trip(padded[i:i + per_mosaic], params)
             for i in range(0, n, per_mosaic)]
    return np.ascontiguousarray(np.concatenate(parts)[:, :, :h, :w])


def _one_blas_thread() -> contextlib.AbstractContextManager[Any]:
    """Run BLAS single-threaded for the small-K GEMMs below, when threadpoolctl is there.

    Their K is 8 or 24: one thread does them in about a millisecond, while OpenBLAS's
    worker threads spin, and on a busy 2-core machine cost ten times that in CPU time.
    The results are the same either way (the threads split rows, not sums).
    """
    global _BLAS
    if _BLAS is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _BLAS = False
        else:
            _BLAS = ThreadpoolController()
    if _BLAS is False:
        return contextlib.nullcontext()
    return _BLAS.limit(limits=1, user_api="blas")


def jpeg_dct_planes(planes: np.ndarray, quality: int) -> np.ndarray:
    """The DCT approximation on uint8 RGB (N, 3, H, W); same shape back (see module doc)."""
    with _one_blas_thread():
        return _jpeg_dct_planes(planes, quality)


def _jpeg_dct_planes(planes: np.ndarray, quality: int) -> np.ndarray:
    q = jpeg_quant_tables(quality)  # validates quality
    n, _, h, w = planes.shape
    padded = _pad8(planes)
    hb, wb = padded.shape[2] // 8, padded.shape[3] // 8
    # rows of 8 pixels x 3 colours, ordered (n, hb, y, wb, c, x): colour transform and DCT
    # along x as one GEMM, giving (n, hb, y, wb, c, u)
    rows = np.ascontiguousarray(padded.reshape(n, 3, hb, 8, wb, 8).transpose(0, 2, 3, 4, 1, 5))
    rows = rows.reshape(-1, 24).astype(np.float64) @ _ROW_FORWARD
    # DCT along y: D @ (8, wb * 24) per block row, no transpose; gives [v][wb][c][u]
    coef = np.matmul(_DCT, rows.reshape(n * hb, 8, wb * 24)).reshape(n * hb, 8, wb, 3, 8)
    coef[:, 0, :, 0, 0] -= 1024.0  # Y - 128 (a DC coefficient is 8 x the block mean)
    table = q[[0, 1, 1]].transpose(1, 0, 2)[:, None]  # [v][1][c][u]
    np.divide(coef, table, out=coef)
    np.rint(coef, out=coef)
    np.multiply(coef, table, out=coef)
    coef[:, 0, :, 0, 0] += 1024.0
    # the same steps back: along v, then along u with the colour transform to RGB
    rec = np.matmul(_DCT.T, coef.reshape(n * hb, 8, wb * 24))
    rgb = rec.reshape(-1, 24) @ _ROW_INVERSE
    np.rint(rgb, out=rgb)
    np.clip(rgb, 0.0, 255.0, out=rgb)
    out = rgb.astype(np.uint8).reshape(n, hb, 8, wb, 3, 8).transpose(0, 4, 1, 2, 3, 5)
    return np.ascontiguousarray(out.reshape(n, 3, hb * 8, wb * 8)[:, :, :h, :w])


def jpeg_dct_image(image_bgr: np.ndarray, quality: int) -> np.ndarray:
    """``jpeg_dct_planes`` for one H x W x 3 uint8 BGR image."""
    planes = image_bgr[..., ::-1].transpose(2, 0, 1)[None]
    out = jpeg_dct_planes(planes, quality)[0]
    return np.ascontiguousarray(out.transpose(1, 2, 0)[..., ::-1])


def resize_pad_batch(batch: np.ndarray, params: np.ndarray, fill: float) -> np.ndarray:
    """Shrink each N x 3 x H x W float32 row to ``params[i, :2]`` and paste it at
    ``params[i, 2:]`` on a ``fill`` canvas (rows ``(new_h, new_w, top, left)``)."""
    n, _, h, w = batch.shape
    out = np.full_like(batch, np.float32(fill))
    sizes = params[:, 0] * (w + 1) + params[:, 1]
    for key in np.unique(sizes):
        group = np.flatnonzero(sizes == key)
        nh, nw, k = int(params[group[0], 0]), int(params[group[0], 1]), group.size
        rows = batch[group].reshape(k * 3 * h, w)
        if nw != w:  # horizontal pass over every row of the group at once
            rows = cv2.resize(rows, (nw, k * 3 * h), interpolation=cv2.INTER_LINEAR)
        small = rows.reshape(k * 3, h, nw)
        if nh != h:  # vertical pass: columns as rows of a transposed tall image
            cols = np.ascontiguousarray(small.transpose(0, 2, 1)).reshape(k * 3 * nw, h)
            cols = cv2.resize(cols, (nh, k * 3 * nw), interpolation=cv2.INTER_LINEAR)
            small = cols.reshape(k * 3, nw, nh).transpose(0, 2, 1)
        resized = small.reshape(k, 3, nh, nw)
        for j, i in enumerate(group):  # paste: one slice copy per image
            top, left = int(params[i, 2]), int(params[i, 3])
            out[i, :, top:top + nh, left:left + nw] = resized[j]
    return out
