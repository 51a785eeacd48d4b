"""Draw what the run loop saw and decided onto frames, and write them to a video.

Colours (BGR): located candidates thin grey, classified signs green, signs the defence
abstained on ("unknown (patch?)") red, the ground-truth box magenta, the decision banner
dark with white text and the command in amber. A certified label ends in "cert".
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import cv2
import numpy as np

from actuator.interface import ActuatorCommand
from roadshield_base.errors import ConfigError

from .frames import SignTruth
from .locate import Candidate
from .policy import UNKNOWN, Decision, Prediction

_CANDIDATE = (160, 160, 160)
_PREDICTION = (40, 200, 40)
_UNKNOWN = (40, 40, 230)
_TRUTH = (220, 40, 220)
_COMMAND = (0, 190, 255)
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_FOURCC = {".mp4": "mp4v", ".avi": "MJPG"}


def _label(img: np.ndarray, text: str, x: int, y: int, colour: tuple[int, int, int],
           scale: float) -> None:
    """Text with a filled dark box behind it; (x, y) is the box's bottom-left corner."""
    thickness = max(1, int(round(scale * 2)))
    (tw, th), base = cv2.getTextSize(text, _FONT, scale, thickness)
    h, w = img.shape[:2]
    x = int(min(max(0, x), max(0, w - tw - 4)))
    y = int(min(max(th + base + 2, y), h - 1))
    cv2.rectangle(img, (x, y - th - base - 2), (x + tw + 4, y), (30, 30, 30), -1)
    cv2.putText(img, text, (x + 2, y - base), _FONT, scale, colour, thickness, cv2.LINE_AA)


def annotate(frame_bgr: np.ndarray, candidates: Sequence[Candidate],
             predictions: Sequence[Prediction], decision: Decision | None,
             truth: SignTruth | None = None,
             command: ActuatorCommand | None = None) -> np.ndarray:
    """A copy of ``frame_bgr`` (H x W x 3 uint8 BGR) with boxes, labels and the decision.

    command: the command currently in force (defaults to ``decision.command``).
    """
    img = frame_bgr.copy()
    scale = max(0.4, img.shape[1] / 1280.0)
    for cand in candidates:
        x0, y0, x1, y1 = cand.box
        cv2.rectangle(img, (x0, y0), (x1 - 1, y1 - 1), _CANDIDATE, 1)
    if truth is not None:
        x0, y0, x1, y1 = truth.box
        cv2.rectangle(img, (x0, y0), (x1 - 1, y1 - 1), _TRUTH, 2)
        tag = f"truth: {truth.class_name}" + (" (stickered)" if truth.stickered else "")
        _label(img, tag, x0, y1 + int(40 * scale), _TRUTH, scale * 0.8)
    for pred in predictions:
        x0, y0, x1, y1 = pred.box
        unknown = pred.class_name == UNKNOWN
        colour = _UNKNOWN if unknown else _PREDICTION
        cv2.rectangle(img, (x0, y0), (x1 - 1, y1 - 1), colour, 2)
        name = "unknown (patch?)" if unknown else pred.class_name
        cert = " cert" if pred.certified else ""
        _label(img, f"{name} {pred.confidence:.2f}{cert}", x0, y0 - 2, colour, scale * 0.8)
    line = int(28 * scale)
    if decision is not None:
        _label(img, f"{decision.action}: {decision.reason}"[:110], 4, line, (255, 255, 255),
               scale * 0.7)
    current = command if command is not None else (decision.command if decision else None)
    if current is not None:
        _label(img, f"cap {current.speed_cap_kmh:g} km/h  brake {current.brake:.2f}", 4,
               2 * line + 4, _COMMAND, scale * 0.8)
    return img


class VideoAnnotator:
    """Writes BGR frames to ``path`` (.mp4 with mp4v, .avi with MJPG); a context manager.

    fps: frames per second of the written video. size: (width, height) in pixels, or None to
    take it from the first frame. The video is written to a temporary file beside ``path``
    and moved into place by ``close()``, so a reader never sees a half-written file.
    """

    def __init__(self, path: str | os.PathLike[str], fps: float = 15.0,
                 size: tuple[int, int] | None = None) -> None:
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in _FOURCC:
            raise ConfigError(f"cannot write annotated video '{self.path}': unknown container "
                              f"'{suffix or '(none)'}'", "name the file .mp4 or .avi")
        if not fps > 0:
            raise ConfigError(f"video fps {fps} must be > 0", "use e.g. 15")
        self.fps = float(fps)
        self.size = size
        self.frames_written = 0
        self._tmp = self.path.with_name(f".{self.path.stem}.partial{suffix}")
        self._writer: cv2.VideoWriter | None = None
        self._closed = False
        if size is not None:
            self._open(size)

    def _open(self, size: tuple[int, int]) -> cv2.VideoWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fourcc = cv2.VideoWriter.fourcc(*_FOURCC[self.path.suffix.lower()])
        writer = cv2.VideoWriter(str(self._tmp), fourcc, self.fps, size)
        if not writer.isOpened():
            writer.release()
            raise ConfigError(f"cannot open a video writer for '{self.path}' "
                              f"({_FOURCC[self.path.suffix.lower()]}, {size[0]}x{size[1]})",
                              "check the folder is writable and this OpenCV build has FFmpeg "
                              "(cv2.getBuildInformation()); try .avi (MJPG) instead")
        self._writer = writer
        self.size = size
        return writer

    def write(self, frame_bgr: np.ndarray) -> None:
        """Append one H x W x 3 uint8 BGR frame; frames of another size are resized."""
        if self._closed:
            raise ConfigError(f"video '{self.path}' is already closed",
                              "create a new VideoAnnotator")
        size = (frame_bgr.shape[1], frame_bgr.shape[0])
        writer = self._writer if self._writer is not None else self._open(size)
        if size != self.size:
            frame_bgr = cv2.resize(frame_bgr, self.size, interpolation=cv2.INTER_AREA)
        writer.write(frame_bgr)
        self.frames_written += 1

    def close(self) -> None:
        self._closed = True
        if self._writer is None:
            return
        self._writer.release()
        self._writer = None
        with open(self._tmp, "rb+") as fh:  # flush the container to disk before the rename
            os.fsync(fh.fileno())
        os.replace(self._tmp, self.path)

    def __enter__(self) -> VideoAnnotator:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
