"""CPU preprocessing: camera-frame region of interest -> model input.

The fast path uses OpenCV: crop a view (no copy), ``cv2.resize`` with
``INTER_LINEAR`` on the uint8 crop, ``cv2.cvtColor`` BGR->RGB on the small
result, then transpose to CHW and scale by 1/255. ``kernels.reference`` holds
the NumPy formula this follows (OpenCV's half-pixel-centre bilinear); the two
agree within 1/255 because OpenCV rounds its uint8 output.

Box convention: ``(x0, y0, x1, y1)`` in pixels, x1/y1 exclusive. A box partly
outside the frame is clamped to it; a box wholly outside is an error.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import cv2
import numpy as np

from kernels.reference import Box, RoiError, clamp_box
from roadshield_base.errors import RoadshieldError

log = logging.getLogger(__name__)

_INV_255 = np.float32(1.0 / 255.0)


class PreprocessError(RoadshieldError, ValueError):
    """A frame, box or size cannot be turned into a model input."""


def check_frame(frame_bgr: np.ndarray) -> tuple[int, int]:
    """Check a camera frame is non-empty H x W x 3 uint8; return ``(height, width)``."""
    if not isinstance(frame_bgr, np.ndarray):
        raise PreprocessError(f"frame is a {type(frame_bgr).__name__}, expected a numpy array",
                              "pass the camera frame as an H x W x 3 uint8 BGR ndarray")
    if frame_bgr.dtype != np.uint8:
        raise PreprocessError(
            f"frame dtype is {frame_bgr.dtype}, expected uint8",
            "camera frames are uint8 BGR; convert a [0, 1] float image with "
            "(img * 255).round().astype(np.uint8)")
    if frame_bgr.ndim != 3 or frame_bgr.shape[2] != 3:
        channels = frame_bgr.shape[2] if frame_bgr.ndim == 3 else 1
        raise PreprocessError(
            f"frame shape {frame_bgr.shape} has {channels} channel(s), expected H x W x 3",
            "convert grey with cv2.cvtColor(img, cv2.COLOR_GRAY2BGR) and BGRA with "
            "cv2.COLOR_BGRA2BGR")
    height, width = frame_bgr.shape[:2]
    if height == 0 or width == 0:
        raise PreprocessError(f"frame shape {frame_bgr.shape} is empty",
                              "the camera returned no pixels; check the source")
    return height, width


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise PreprocessError(f"size {size!r} must be a positive integer",
                              "use the model's input_size (read_model_info(path).input_size)")
    return int(size)


def _clamped(box: Box, height: int, width: int) -> tuple[int, int, int, int]:
    try:
        clamped = clamp_box(box, height, width)
    except RoiError as err:
        raise PreprocessError(str(err.args[0]), err.hint) from err
    if clamped is None:
        raise PreprocessError(
            f"box {tuple(box)!r} lies wholly outside the {width}x{height} frame (or is empty)",
            "pass (x0, y0, x1, y1) with x0 < x1, y0 < y1 overlapping the frame; "
            "drop detections that fall off the image")
    if log.isEnabledFor(logging.DEBUG) and clamped != tuple(box):
        log.debug("box %s clamped to %s in a %dx%d frame", tuple(box), clamped, width, height)
    return clamped


def _roi_into(frame_bgr: np.ndarray, box: tuple[int, int, int, int], size: int,
              out: np.ndarray) -> None:
    """Write one clamped box of ``frame_bgr`` into ``out`` (3 x size x size float32)."""
    x0, y0, x1, y1 = box
    crop = frame_bgr[y0:y1, x0:x1]  # a view: no copy of the frame
    resized = cv2.resize(crop, (size, size), interpolation=cv2.INTER_LINEAR)
    rgb = cv2.cvtColor(resized, cv2.COLOR_BGR2RGB)
    np.multiply(rgb.transpose(2, 0, 1), _INV_255, out=out)


def preprocess_roi(frame_bgr: np.ndarray, box: Box, size: int) -> np.ndarray:
    """Turn one box of a camera frame into a model input.

    frame_bgr: H x W x 3 uint8, BGR.
    box: (x0, y0, x1, y1) in pixels, x1/y1 exclusive; clamped when partly outside.
    size: output side in pixels (the model's input_size).
    Returns float32 ``(1, 3, size, size)``, RGB, values in ``[0, 1]``.
    Raises ``PreprocessError`` for a wrong dtype, channel count, empty frame,
    bad size, or a box wholly outside the frame.
    """
    height, width = check_frame(frame_bgr)
    side = _check_size(size)
    clamped = _clamped(box, height, width)
    out = np.empty((1, 3, side, side), dtype=np.float32)
    _roi_into(frame_bgr, clamped, side, out[0])
    return out


def preprocess_batch(frame_bgr: np.ndarray, boxes: Sequence[Box] | np.ndarray,
                     size: int) -> np.ndarray:
    """Turn several boxes of one camera frame into a batch.

    boxes: a sequence of (x0, y0, x1, y1) or an (N, 4) array, pixels, x1/y1 exclusive.
    Returns float32 ``(N, 3, size, size)``, RGB in ``[0, 1]``; ``N = 0`` gives an
    empty batch. Any box wholly outside the frame fails the whole call (its
    index is in the message), so the caller never mixes up rows and boxes.
    """
    height, width = check_frame(frame_bgr)
    side = _check_size(size)
    if isinstance(boxes, np.ndarray) and boxes.size and (boxes.ndim != 2 or boxes.shape[1] != 4):
        raise PreprocessError(f"boxes array has shape {boxes.shape}, expected (N, 4)",
                              "stack boxes as rows of (x0, y0, x1, y1)")
    clamped = []
    for i, box in enumerate(boxes):
        try:
            clamped.append(_clamped(box, height, width))
        except PreprocessError as err:
            raise PreprocessError(f"boxes[{i}]: {err.args[0]}", err.hint) from err
    out = np.empty((len(clamped), 3, side, side), dtype=np.float32)
    for i, box in enumerate(clamped):
        _roi_into(frame_bgr, box, side, out[i])
    return out


class Preprocessor:
    """Preprocess boxes of camera frames to a fixed model input size.

    ``Preprocessor(32)(frame, box)`` is ``preprocess_roi(frame, box, 32)``.
    """

    def __init__(self, size: int) -> None:
        self.size = _check_size(size)

    def __call__(self, frame_bgr: np.ndarray, box: Box) -> np.ndarray:
        """float32 ``(1, 3, size, size)`` RGB in ``[0, 1]`` for one box."""
        return preprocess_roi(frame_bgr, box, self.size)

    def batch(self, frame_bgr: np.ndarray, boxes: Sequence[Box] | np.ndarray) -> np.ndarray:
        """float32 ``(N, 3, size, size)`` RGB in ``[0, 1]`` for N boxes."""
        return preprocess_batch(frame_bgr, boxes, self.size)

    def __repr__(self) -> str:
        return f"Preprocessor(size={self.size})"
