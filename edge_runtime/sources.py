"""Camera sources: open a URI and iterate BGR frames.

URIs understood, in the order they are tried:

- any scheme registered through ``edge_runtime.frames.register_source`` (``synthetic://...``);
- ``csi://N[?width=1280&height=720&fps=30&flip=0]``: a Jetson CSI camera through
  ``nvarguscamerasrc`` (needs JetPack's cv2 built with GStreamer);
- ``/dev/videoN``, ``v4l2://N[?width=..&height=..&fps=..]`` or a bare ``N``: a USB / V4L2
  camera;
- ``file://PATH`` or a path to an existing video file, image file or folder of images
  (``.png .jpg .jpeg .bmp .ppm``, natural sort order; ``?skip_bad=1`` skips unreadable
  images with a warning, ``?fps=N`` sets the timestamps, default 30).

Every source also takes ``max_frames=N``; files and folders take ``loop=N`` (play N passes,
0 = forever). Frames are H x W x 3 uint8 BGR with a 0-based index and a timestamp in
seconds since the source opened (for files and folders: index / fps, so a replay is
repeatable).
"""

from __future__ import annotations

import abc
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs

import cv2
import numpy as np

from roadshield_base.errors import CameraError

from .frames import (
    Frame,
    FrameSource,
    missing_plugin_error,
    registered_schemes,
    source_factory,
)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.DOTALL)
_DEV_VIDEO = re.compile(r"^/dev/video(\d+)$")
#: consecutive failed reads after which a live camera counts as lost
LIVE_READ_RETRIES = 5

_CSI_HINT = ("check that nvargus-daemon is running (sudo systemctl restart nvargus-daemon), that "
             "the ribbon cable is seated and the sensor id is right, and that Python loads "
             "JetPack's system cv2 with GStreamer (cv2.getBuildInformation() shows "
             "'GStreamer: YES'), not pip's opencv-python, which has no GStreamer")


def _gstreamer_available() -> bool:
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GStreamer:"):
            return "YES" in line.split(":", 1)[1]
    return False


#: the V4L2 device a device install falls back to when it has no CSI camera
V4L2_DEFAULT = "/dev/video0"
#: where JetPack installs the Argus camera daemon a CSI capture goes through
NVARGUS_PATHS = ("/usr/sbin/nvargus-daemon", "/usr/bin/nvargus-daemon")


def _nvargus_present() -> bool:
    return shutil.which("nvargus-daemon") is not None or any(
        os.path.exists(p) for p in NVARGUS_PATHS)


def default_camera() -> str:
    """The URI of this device's own camera, for ``edge run`` without ``--source``.

    ``csi://0`` where a CSI camera can be captured (this cv2 has GStreamer and JetPack's
    nvargus-daemon is installed), else ``/dev/video0`` when it exists. Raises
    ``CameraError`` saying so, and listing the sources this install knows, when there is
    neither: a test stream is never picked silently.
    """
    if _gstreamer_available() and _nvargus_present():
        return "csi://0"
    if os.path.exists(V4L2_DEFAULT):
        return V4L2_DEFAULT
    schemes = ", ".join(f"{s}://" for s in (*registered_schemes(), "csi", "v4l2", "file"))
    raise CameraError("no camera found on this device: no CSI camera (needs cv2 with "
                      f"GStreamer and nvargus-daemon) and no {V4L2_DEFAULT}",
                      f"name one with --source: {schemes}, /dev/videoN, a video file or a "
                      "folder of images (e.g. --source /path/to/frames)")


def csi_pipeline(sensor_id: int = 0, width: int = 1280, height: int = 720, fps: int = 30,
                 flip: int = 0) -> str:
    """GStreamer pipeline for a Jetson CSI camera, ending in a BGR appsink for OpenCV.

    width/height: capture size in pixels; fps: frames per second; flip: nvvidconv
    flip-method (0 none, 2 rotate 180, 4 horizontal, 6 vertical; 0-7 allowed). The appsink
    keeps only the newest buffer, so a slow consumer sees fresh frames, not a backlog.
    """
    if sensor_id < 0:
        raise CameraError(f"CSI sensor id {sensor_id} is negative", "use csi://0 or csi://1")
    if width <= 0 or height <= 0 or fps <= 0:
        raise CameraError(f"CSI mode {width}x{height}@{fps} is not positive",
                          "use a mode the sensor supports, e.g. width=1280&height=720&fps=30")
    if not 0 <= flip <= 7:
        raise CameraError(f"CSI flip-method {flip} is outside 0-7",
                          "use 0 (none), 2 (rotate 180), 4 (horizontal) or 6 (vertical)")
    return (f"nvarguscamerasrc sensor-id={sensor_id} ! "
            f"video/x-raw(memory:NVMM),width={width},height={height},framerate={fps}/1 ! "
            f"nvvidconv flip-method={flip} ! video/x-raw,format=BGRx ! videoconvert ! "
            f"video/x-raw,format=BGR ! appsink drop=1 max-buffers=1")


def _to_bgr(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image


def _natural_key(path: Path) -> list[object]:
    # frame_2 before frame_10, as a person expects
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


class _Options:
    """``?key=value`` options of one URI; every value must be used or it is an error."""

    def __init__(self, uri: str, query: str, allowed: tuple[str, ...]) -> None:
        self.uri = uri
        self._values = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        unknown = sorted(set(self._values) - set(allowed))
        if unknown:
            raise CameraError(f"unknown option(s) {', '.join(unknown)} in camera URI '{uri}'",
                              f"options this source takes: {', '.join(allowed)}")

    def integer(self, key: str, default: int, minimum: int = 0) -> int:
        raw = self._values.get(key)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise CameraError(f"option {key}={raw!r} in camera URI '{self.uri}' is not an "
                              "integer", f"write e.g. {key}={default}") from None
        if value < minimum:
            raise CameraError(f"option {key}={value} in camera URI '{self.uri}' is below "
                              f"{minimum}", f"use {key} >= {minimum}")
        return value

    def flag(self, key: str) -> bool:
        return self._values.get(key, "0").lower() in ("1", "true", "yes")


class _BaseSource(FrameSource):
    """Numbers frames, applies ``loop`` and ``max_frames``, guards use after close."""

    def __init__(self, uri: str, passes: int = 1, max_frames: int = 0) -> None:
        self.uri = uri
        self._passes = passes  # 0 = repeat forever
        self._max_frames = max_frames  # 0 = no limit
        self._closed = False
        self._opened_at = time.monotonic()

    @property
    def frame_count(self) -> int | None:
        """Frames one full iteration yields, when known (for progress bars)."""
        per_pass = self._frames_per_pass()
        if per_pass is None or self._passes == 0:
            return self._max_frames or None
        total = per_pass * self._passes
        return min(total, self._max_frames) if self._max_frames else total

    def _frames_per_pass(self) -> int | None:
        return None

    @abc.abstractmethod
    def _one_pass(self) -> Iterator[np.ndarray]:
        """Images of one pass over the media, from its start (files) or from now (live)."""

    def _timestamp(self, index: int) -> float:
        return time.monotonic() - self._opened_at

    def __iter__(self) -> Iterator[Frame]:
        if self._closed:
            raise CameraError(f"camera source '{self.uri}' is closed",
                              "open it again with open_source()")
        index = 0
        done = 0
        while self._passes == 0 or done < self._passes:
            for image in self._one_pass():
                yield Frame(image=_to_bgr(image), index=index, timestamp=self._timestamp(index))
                index += 1
                if self._max_frames and index >= self._max_frames:
                    return  # before reading another frame from the device
            done += 1

    def close(self) -> None:
        self._closed = True


class CaptureSource(_BaseSource):
    """A cv2.VideoCapture: a live camera (CSI, V4L2) or a video file."""

    def __init__(self, uri: str, open_capture: Callable[[], cv2.VideoCapture], *, live: bool,
                 hint: str, passes: int = 1, max_frames: int = 0) -> None:
        super().__init__(uri, passes, max_frames)
        self._open_capture = open_capture
        self._live = live
        self._hint = hint
        self._cap: cv2.VideoCapture | None = self._open()
        self._fresh = True  # nothing read since the capture was opened
        fps = float(self._cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.fps = fps if fps > 0 else 30.0
        count = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self._count = count if (count > 0 and not live) else None

    def _open(self) -> cv2.VideoCapture:
        cap = self._open_capture()
        if not cap.isOpened():
            cap.release()
            raise CameraError(f"cannot open camera source '{self.uri}'", self._hint)
        return cap

    def _frames_per_pass(self) -> int | None:
        return self._count

    def _timestamp(self, index: int) -> float:
        # Live: wall time since opening. File: media time, so replays are repeatable.
        return super()._timestamp(index) if self._live else index / self.fps

    def _one_pass(self) -> Iterator[np.ndarray]:
        if self._cap is None:
            raise CameraError(f"camera source '{self.uri}' is closed",
                              "open it again with open_source()")
        if not self._live and not self._fresh:  # a file's next pass starts from the beginning
            self._cap.release()
            self._cap = self._open()
        self._fresh = False
        failures = 0
        got_any = False
        while True:
            ok, image = self._cap.read()
            if ok and image is not None:
                failures = 0
                got_any = True
                yield image
                continue
            if not self._live:
                if not got_any:
                    raise CameraError(f"no frame could be decoded from '{self.uri}'",
                                      "check the file plays (ffprobe) and is not truncated")
                return
            failures += 1
            if failures >= LIVE_READ_RETRIES:
                raise CameraError(f"camera '{self.uri}' stopped delivering frames "
                                  f"({failures} failed reads in a row)", self._hint)

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None
        super().close()


class FolderSource(_BaseSource):
    """Images from a list of files (a folder, natural sort order, or one image file)."""

    def __init__(self, uri: str, files: list[Path], fps: float = 30.0, skip_bad: bool = False,
                 passes: int = 1, max_frames: int = 0) -> None:
        super().__init__(uri, passes, max_frames)
        if not files:
            raise CameraError(f"folder source '{uri}' holds no images",
                              f"put {', '.join(IMAGE_SUFFIXES)} files in it")
        self.files = files
        self.fps = fps
        self._skip_bad = skip_bad

    def _frames_per_pass(self) -> int | None:
        return None if self._skip_bad else len(self.files)

    def _timestamp(self, index: int) -> float:
        return index / self.fps

    def _one_pass(self) -> Iterator[np.ndarray]:
        yielded = 0
        for path in self.files:
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                if not self._skip_bad:
                    raise CameraError(f"cannot read image '{path}' in source '{self.uri}'",
                                      "replace or remove the file, or add ?skip_bad=1 to skip "
                                      "unreadable images")
                log.warning("skipping unreadable image %s in %s", path, self.uri)
                continue
            yielded += 1
            yield image
        if yielded == 0:
            raise CameraError(f"no image in '{self.uri}' could be read",
                              "check the files are real PNG/JPEG/BMP/PPM images")


def _open_csi(uri: str, rest: str, query: str) -> FrameSource:
    opts = _Options(uri, query, ("width", "height", "fps", "flip", "max_frames"))
    if not rest.isdigit():
        raise CameraError(f"CSI camera URI '{uri}' needs a sensor number", "write csi://0")
    pipeline = csi_pipeline(int(rest), opts.integer("width", 1280, 1),
                            opts.integer("height", 720, 1), opts.integer("fps", 30, 1),
                            opts.integer("flip", 0))
    hint = _CSI_HINT
    if not _gstreamer_available():
        hint = ("this cv2 was built without GStreamer (cv2.getBuildInformation() shows "
                "'GStreamer: NO'): uninstall pip's opencv-python / opencv-python-headless so "
                "JetPack's system cv2 is used; then " + _CSI_HINT)
    return CaptureSource(uri, lambda: cv2.VideoCapture(pipeline, cv2.CAP_GSTREAMER), live=True,
                         hint=hint, max_frames=opts.integer("max_frames", 0))


def _open_v4l2(uri: str, number: int, query: str) -> FrameSource:
    opts = _Options(uri, query, ("width", "height", "fps", "max_frames"))
    settings = [(cv2.CAP_PROP_FRAME_WIDTH, opts.integer("width", 0)),
                (cv2.CAP_PROP_FRAME_HEIGHT, opts.integer("height", 0)),
                (cv2.CAP_PROP_FPS, opts.integer("fps", 0))]

    def open_capture() -> cv2.VideoCapture:
        cap = cv2.VideoCapture(number, cv2.CAP_V4L2)
        for prop, value in settings:
            if value and cap.isOpened():
                cap.set(prop, value)
        return cap

    hint = (f"check /dev/video{number} exists (ls /dev/video*), that this user is in the "
            f"'video' group, and that no other program holds it (fuser /dev/video{number})")
    return CaptureSource(uri, open_capture, live=True, hint=hint,
                         max_frames=opts.integer("max_frames", 0))


def _open_path(uri: str, path: Path, query: str) -> FrameSource:
    if path.is_dir():
        opts = _Options(uri, query, ("loop", "max_frames", "fps", "skip_bad"))
        files = sorted((p for p in path.iterdir()
                        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)
        return FolderSource(uri, files, fps=float(opts.integer("fps", 30, 1)),
                            skip_bad=opts.flag("skip_bad"), passes=opts.integer("loop", 1),
                            max_frames=opts.integer("max_frames", 0))
    if path.suffix.lower() in IMAGE_SUFFIXES:
        opts = _Options(uri, query, ("loop", "max_frames", "fps"))
        return FolderSource(uri, [path], fps=float(opts.integer("fps", 30, 1)),
                            passes=opts.integer("loop", 1),
                            max_frames=opts.integer("max_frames", 0))
    opts = _Options(uri, query, ("loop", "max_frames"))
    return CaptureSource(uri, lambda: cv2.VideoCapture(str(path)), live=False,
                         hint="check the file is a video OpenCV's FFmpeg can decode "
                              "(e.g. H.264 .mp4, MJPG .avi) and is not truncated",
                         passes=opts.integer("loop", 1), max_frames=opts.integer("max_frames", 0))


def _split_query(text: str) -> tuple[str, str]:
    if os.path.exists(text) or "?" not in text:
        return text, ""
    head, _, query = text.rpartition("?")
    return head, query


def open_source(uri: str) -> FrameSource:
    """Open a camera, video file or image folder by URI (see the module docstring).

    Raises CameraError naming the URI, with a hint, when it cannot be parsed or opened.
    """
    match = _SCHEME.match(uri)
    if match:
        scheme, rest = match.group(1).lower(), match.group(2)
        if scheme in registered_schemes():
            return source_factory(scheme)(uri)
        if scheme == "file":
            return _open_existing(uri, rest)
        body, query = _split_query(rest)
        if scheme == "csi":
            return _open_csi(uri, body, query)
        if scheme == "v4l2":
            if not body.isdigit():
                raise CameraError(f"V4L2 camera URI '{uri}' needs a device number",
                                  "write v4l2://0 for /dev/video0")
            return _open_v4l2(uri, int(body), query)
        missing = missing_plugin_error(scheme)
        if missing is not None:
            raise missing
        known = ", ".join(f"{s}://" for s in (*registered_schemes(), "csi", "v4l2", "file"))
        raise CameraError(f"no camera source handles '{uri}' (scheme '{scheme}://')",
                          f"use one of: {known}, /dev/videoN, a video file or a folder")
    body, query = _split_query(uri)
    if body.isdigit() and not os.path.exists(body):  # "0", as OpenCV users write it
        return _open_v4l2(uri, int(body), query)
    dev = _DEV_VIDEO.match(body)
    if dev:
        if not os.path.exists(body):
            raise CameraError(f"camera device '{uri}' does not exist",
                              "list cameras with ls /dev/video* (v4l2-ctl --list-devices)")
        return _open_v4l2(uri, int(dev.group(1)), query)
    return _open_existing(uri, uri)


def _open_existing(uri: str, text: str) -> FrameSource:
    body, query = _split_query(text)
    path = Path(body).expanduser()
    if not path.exists():
        raise CameraError(f"camera source '{uri}' is not a known scheme and no such file or "
                          "folder exists",
                          "give csi://N, /dev/videoN, v4l2://N, a video file, a folder of "
                          "images or an installed scheme: "
                          + (", ".join(f"{s}://" for s in registered_schemes()) or "none"))
    return _open_path(uri, path, query)
