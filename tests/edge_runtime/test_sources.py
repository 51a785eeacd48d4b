"""Camera sources: URI parsing, CSI pipeline, folders, video files, and their errors."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_runtime import frames as frames_mod
from edge_runtime import sources
from edge_runtime.frames import Frame, FrameSource
from edge_runtime.sources import csi_pipeline, open_source
from roadshield_base.errors import CameraError


def write_images(folder: Path, names: list[str], size: tuple[int, int] = (48, 64)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        img = np.full((*size, 3), 10 * (i + 1), np.uint8)  # frame i has grey level 10(i+1)
        assert cv2.imwrite(str(folder / name), img)


class FakeCapture:
    """Stands in for cv2.VideoCapture: records how it was opened, serves set frames."""

    opened_with: list[tuple[object, ...]] = []

    def __init__(self, *args: object, is_open: bool = True,
                 frames: list[np.ndarray | None] | None = None) -> None:
        FakeCapture.opened_with.append(args)
        self._open = is_open
        self._frames = list(frames or [])
        self.released = False

    def isOpened(self) -> bool:  # noqa: N802 (OpenCV's name)
        return self._open

    def read(self) -> tuple[bool, np.ndarray | None]:
        img = self._frames.pop(0) if self._frames else None
        return img is not None, img

    def get(self, prop: int) -> float:
        return 0.0

    def set(self, prop: int, value: float) -> bool:
        return True

    def release(self) -> None:
        self.released = True


def test_csi_pipeline_string() -> None:
    assert csi_pipeline(1, 1920, 1080, 60, 2) == (
        "nvarguscamerasrc sensor-id=1 ! "
        "video/x-raw(memory:NVMM),width=1920,height=1080,framerate=60/1 ! "
        "nvvidconv flip-method=2 ! video/x-raw,format=BGRx ! videoconvert ! "
        "video/x-raw,format=BGR ! appsink drop=1 max-buffers=1")
    assert "width=1280,height=720,framerate=30/1" in csi_pipeline()
    with pytest.raises(CameraError, match="flip-method 9"):
        csi_pipeline(flip=9)


def test_csi_opens_the_pipeline_with_gstreamer(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeCapture.opened_with = []
    monkeypatch.setattr(sources.cv2, "VideoCapture",
                        lambda *a: FakeCapture(*a, is_open=False))
    uri = "csi://0?width=640&height=480&fps=15&flip=2"
    with pytest.raises(CameraError) as err:
        open_source(uri)
    assert FakeCapture.opened_with == [(csi_pipeline(0, 640, 480, 15, 2), cv2.CAP_GSTREAMER)]
    text = str(err.value)
    assert uri in text and "nvargus-daemon" in text and "GStreamer" in text
    assert "opencv-python" in err.value.hint


def test_live_capture_frames_and_lost_camera(monkeypatch: pytest.MonkeyPatch) -> None:
    img = np.zeros((4, 6, 3), np.uint8)
    fake = FakeCapture(frames=[img, img, None, img] + [None] * 10)
    monkeypatch.setattr(sources.cv2, "VideoCapture", lambda *a: fake)
    src = open_source("csi://0")
    got: list[Frame] = []
    with pytest.raises(CameraError, match="stopped delivering frames"):
        for frame in src:
            got.append(frame)
    assert [f.index for f in got] == [0, 1, 2]  # one failed read is tolerated
    assert all(b.timestamp >= a.timestamp >= 0 for a, b in zip(got, got[1:], strict=False))
    src.close()
    assert fake.released
    with pytest.raises(CameraError, match="is closed"):
        next(iter(src))


@pytest.mark.parametrize("uri, match", [
    ("/nonexistent/clip.mp4", "no such file or folder"),
    ("/dev/video99", "does not exist"),
    ("v4l2://99", "cannot open camera source"),
    ("99", "cannot open camera source"),
    ("rtsp://10.0.0.2/stream", "no camera source handles"),
    ("csi://front", "needs a sensor number"),
])
def test_bad_uris_name_the_uri(uri: str, match: str) -> None:
    with pytest.raises(CameraError, match=match) as err:
        open_source(uri)
    assert uri in str(err.value)
    assert err.value.hint


def test_empty_folder_and_bad_options(tmp_path: Path) -> None:
    with pytest.raises(CameraError, match="holds no images") as err:
        open_source(str(tmp_path))
    assert str(tmp_path) in str(err.value)
    write_images(tmp_path / "f", ["a.png"])
    with pytest.raises(CameraError, match="unknown option"):
        open_source(f"{tmp_path / 'f'}?lopo=2")
    with pytest.raises(CameraError, match="not an integer"):
        open_source(f"{tmp_path / 'f'}?loop=x")


def test_folder_yields_sorted_frames(tmp_path: Path) -> None:
    # written out of order; natural order is 1, 2, 10, then b.jpg (letters after digits)
    write_images(tmp_path, ["10.png", "b.jpg", "2.bmp", "1.png"])
    (tmp_path / "notes.txt").write_text("not an image")
    with open_source(f"{tmp_path}?fps=10") as src:
        frames = list(src)
    assert [f.index for f in frames] == [0, 1, 2, 3]
    assert [int(f.image[0, 0, 0]) for f in frames] == [40, 30, 10, 20]  # 1, 2, 10, b
    assert [f.timestamp for f in frames] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert all(f.image.shape == (48, 64, 3) and f.image.dtype == np.uint8 for f in frames)
    assert src.frame_count == 4


def test_folder_loop_and_max_frames(tmp_path: Path) -> None:
    write_images(tmp_path, ["0.png", "1.png", "2.png"])
    assert len(list(open_source(f"{tmp_path}?loop=3"))) == 9
    src = open_source(f"file://{tmp_path}?loop=0&max_frames=7")
    assert [f.index for f in src] == list(range(7))
    assert src.frame_count == 7


def test_unreadable_image(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_images(tmp_path, ["0.png", "2.png"])
    (tmp_path / "1.png").write_bytes(b"not a png")
    with pytest.raises(CameraError, match=r"cannot read image '.*1\.png'"):
        list(open_source(str(tmp_path)))
    with caplog.at_level(logging.WARNING, logger="edge_runtime.sources"):
        frames = list(open_source(f"{tmp_path}?skip_bad=1"))
    assert [int(f.image[0, 0, 0]) for f in frames] == [10, 20]  # 0.png, 2.png
    assert "1.png" in caplog.text


def test_video_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10.0, (64, 48))
    assert writer.isOpened()
    levels = [20, 60, 100, 140, 180, 220]
    for level in levels:
        writer.write(np.full((48, 64, 3), level, np.uint8))
    writer.release()
    src = open_source(str(path))
    assert isinstance(src, FrameSource)
    frames = list(src)
    assert len(frames) == len(levels)
    assert [f.index for f in frames] == list(range(6))
    assert [f.timestamp for f in frames] == pytest.approx([i / 10 for i in range(6)])
    for frame, level in zip(frames, levels, strict=True):
        assert frame.image.shape == (48, 64, 3)
        assert abs(float(frame.image.mean()) - level) < 4  # MJPG is lossy
    assert len(list(src)) == 6  # iterating again replays the file from its start
    assert len(list(open_source(f"{path}?loop=2"))) == 12
    src.close()
    with pytest.raises(CameraError, match="is closed"):
        list(src)


def test_not_a_video(tmp_path: Path) -> None:
    bad = tmp_path / "clip.mp4"
    bad.write_text("hello")
    with pytest.raises(CameraError, match="cannot open camera source") as err:
        open_source(str(bad))
    assert str(bad) in str(err.value)


def test_registered_scheme_comes_first(monkeypatch: pytest.MonkeyPatch) -> None:
    class One(FrameSource):
        def __init__(self, uri: str) -> None:
            self.uri = uri

        def __iter__(self):  # type: ignore[no-untyped-def]
            yield Frame(np.zeros((2, 2, 3), np.uint8), 0, 0.0)

    monkeypatch.setitem(frames_mod._SOURCES, "csi", One)  # even a built-in scheme
    src = open_source("csi://anything")
    assert isinstance(src, One) and src.uri == "csi://anything"
