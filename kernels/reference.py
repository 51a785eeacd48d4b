"""NumPy reference for the fused crop -> resize -> BGR->RGB -> /255 preprocess.

This is the ground truth a CUDA kernel (and the OpenCV fast path in
``edge_runtime.preprocess``) is compared with. It is plain, vectorised NumPy in
float64, with no OpenCV, so every number it produces follows from the formulas
written below.

Conventions
-----------
Box: ``(x0, y0, x1, y1)`` in pixels, ``x1`` / ``y1`` exclusive (as in
``edge_runtime.frames.SignTruth``). Non-integer coordinates are widened to the
enclosing pixel grid (floor for x0/y0, ceil for x1/y1). The box is clamped to
the frame; a box that is empty after clamping is rejected with ``RoiError``.

Resize: bilinear with OpenCV's ``INTER_LINEAR`` convention (half-pixel centres).
For an output index ``d`` along an axis of source length ``n_src`` and output
length ``n_dst``::

    scale = n_src / n_dst
    s     = (d + 0.5) * scale - 0.5       # source coordinate of the output centre
    s     = clip(s, 0, n_src - 1)          # replicate the border pixels
    i0    = floor(s);  i1 = min(i0 + 1, n_src - 1);  w = s - i0
    out   = (1 - w) * src[i0] + w * src[i1]

applied along y then x (the order does not matter: the filter is separable).
Clipping ``s`` is the same as OpenCV's rule "if the left tap is left of 0 use
pixel 0 with weight 0; if it is at or right of the last pixel use the last
pixel with weight 0". OpenCV itself rounds its uint8 result and uses 11-bit
fixed-point weights, so it stays within 1/255 of this reference after /255.

Output: float32, shape ``(1, 3, size, size)``, channel order RGB, values in
``[0, 1]`` (``value / 255``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from roadshield_base.errors import RoadshieldError

Box = Sequence[float]


class RoiError(RoadshieldError, ValueError):
    """The frame or region of interest handed to a preprocess is unusable."""


def clamp_box(box: Box, height: int, width: int) -> tuple[int, int, int, int] | None:
    """Clamp ``(x0, y0, x1, y1)`` (x1/y1 exclusive) to a ``height`` x ``width`` frame.

    Non-integer coordinates are widened to the enclosing pixel grid. Returns the
    clamped integer box, or ``None`` when nothing of it lies inside the frame
    (or the box itself is empty).
    """
    if len(box) != 4:
        raise RoiError(f"box {tuple(box)!r} has {len(box)} values, expected 4",
                       "pass boxes as (x0, y0, x1, y1) in pixels, x1/y1 exclusive")
    values = [float(v) for v in box]
    if not all(math.isfinite(v) for v in values):
        raise RoiError(f"box {tuple(box)!r} holds a non-finite coordinate",
                       "drop detections whose box is NaN or infinite before preprocessing")
    x0 = max(math.floor(values[0]), 0)
    y0 = max(math.floor(values[1]), 0)
    x1 = min(math.ceil(values[2]), width)
    y1 = min(math.ceil(values[3]), height)
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def linear_taps(n_src: int, n_dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source taps of a half-pixel-centre bilinear resize along one axis.

    Returns ``(i0, i1, w)``: int64 indices of the two source pixels and the
    float64 weight of ``i1`` for each of the ``n_dst`` output pixels, following
    the formula in the module docstring.
    """
    if n_src < 1 or n_dst < 1:
        raise RoiError(f"cannot resize an axis of {n_src} pixels to {n_dst}",
                       "both lengths must be at least 1")
    scale = n_src / n_dst
    s = (np.arange(n_dst, dtype=np.float64) + 0.5) * scale - 0.5
    s = np.clip(s, 0.0, n_src - 1)
    i0 = np.floor(s).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_src - 1)
    return i0, i1, s - i0


def bilinear_resize_reference(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Resize ``image`` (H x W or H x W x C, any real dtype) to ``out_h`` x ``out_w``.

    Returns float64, unrounded, with OpenCV's ``INTER_LINEAR`` sampling grid.
    """
    src = np.asarray(image, dtype=np.float64)
    yi0, yi1, wy = linear_taps(src.shape[0], out_h)
    xi0, xi1, wx = linear_taps(src.shape[1], out_w)
    # Broadcast the weights over any trailing channel axis.
    extra = (1,) * (src.ndim - 2)
    wy = wy.reshape((-1, 1) + extra)
    wx = wx.reshape((1, -1) + extra)
    rows = src[yi0] * (1.0 - wy) + src[yi1] * wy
    return rows[:, xi0] * (1.0 - wx) + rows[:, xi1] * wx


def preprocess_roi_reference(frame_bgr: np.ndarray, box: Box, size: int) -> np.ndarray:
    """Crop ``box`` from a BGR frame, resize to ``size`` x ``size``, return the model input.

    frame_bgr: H x W x 3 uint8, BGR (a camera frame).
    box: (x0, y0, x1, y1) in pixels, x1/y1 exclusive; clamped to the frame.
    size: output side in pixels (>= 1).
    Returns float32 ``(1, 3, size, size)``, RGB, in ``[0, 1]``.
    Raises ``RoiError`` for a frame that is not H x W x 3 uint8, a bad ``size``,
    or a box that is empty once clamped to the frame.
    """
    if not isinstance(frame_bgr, np.ndarray) or frame_bgr.dtype != np.uint8:
        raise RoiError(f"frame must be a uint8 ndarray, got "
                       f"{getattr(frame_bgr, 'dtype', type(frame_bgr).__name__)}",
                       "pass the camera frame as H x W x 3 uint8 BGR")
    if frame_bgr.ndim != 3 or frame_bgr.shape[2] != 3:
        raise RoiError(f"frame shape {frame_bgr.shape} is not H x W x 3",
                       "pass the camera frame as H x W x 3 uint8 BGR")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise RoiError(f"size {size!r} must be a positive integer",
                       "use the model's input_size")
    height, width = frame_bgr.shape[:2]
    clamped = clamp_box(box, height, width)
    if clamped is None:
        raise RoiError(f"box {tuple(box)!r} is empty inside a {width}x{height} frame",
                       "pass a box with x0 < x1 and y0 < y1 that overlaps the frame")
    x0, y0, x1, y1 = clamped
    resized = bilinear_resize_reference(frame_bgr[y0:y1, x0:x1], int(size), int(size))
    rgb = resized[:, :, ::-1]  # BGR -> RGB
    chw = np.transpose(rgb, (2, 0, 1)) / 255.0
    return chw[np.newaxis].astype(np.float32)
