"""Road scenes, stickers, video files and the synthetic:// camera."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from cloud_train import scenes
from cloud_train.scenes import (
    STICKER_KINDS,
    load_sticker,
    make_sticker,
    render_scene,
    render_scene_full,
    write_video,
)
from cloud_train.signs import SYNTHETIC_CLASSES
from cloud_train.synthetic_camera import SyntheticCamera, register
from edge_runtime.frames import source_factory
from roadshield_base.errors import CameraError, ConfigError, DatasetError


def test_scene_shape_truth_and_determinism() -> None:
    img, truth = render_scene(np.random.default_rng(5), 6, width=320, height=240)
    assert img.shape == (240, 320, 3) and img.dtype == np.uint8
    assert truth is not None and truth.class_name == "stop" and not truth.stickered
    again, truth2 = render_scene(np.random.default_rng(5), 6, width=320, height=240)
    assert again.tobytes() == img.tobytes() and truth2 == truth
    other, _ = render_scene(np.random.default_rng(6), 6, width=320, height=240)
    assert other.tobytes() != img.tobytes()
    empty, none = render_scene(np.random.default_rng(5), None)
    assert none is None and empty.shape == (480, 640, 3)


def test_scene_is_bgr_sky_above_grass() -> None:
    img, _ = render_scene(np.random.default_rng(2), None)
    b, g, r = (img[:40].reshape(-1, 3).astype(float).mean(axis=0))
    assert b >= r - 5  # sky is blue or grey, never orange: channels are in BGR order


@pytest.mark.parametrize("seed", [*range(12), 34])
def test_box_is_tight_around_the_sign(seed: int) -> None:
    """Independent of the renderer's own mask: the frame with the sign minus the same frame
    without it (same rng) changes visibly (> 12 grey levels) only in the box, grown by 2 px,
    and in the pole below it; the changes reach each side of the box to within 3 px (a white
    rim against a white sky can hide a pixel or two of the plate's edge)."""
    k = seed % len(SYNTHETIC_CLASSES)
    with_sign = render_scene_full(np.random.default_rng(seed), k)
    without = render_scene_full(np.random.default_rng(seed), None)
    x0, y0, x1, y1 = with_sign.truth.box
    assert 0 <= x0 < x1 <= 640 and 0 <= y0 < y1 <= 480
    side = max(x1 - x0, y1 - y0)
    assert 20 <= side <= 125
    changed = np.any(np.abs(with_sign.image.astype(int) - without.image) > 12, axis=2)
    allowed = np.zeros_like(changed)
    allowed[max(0, y0 - 2):y1 + 2, max(0, x0 - 2):x1 + 2] = True
    allowed[y1:, x0:x1] = True  # the pole
    assert not (changed & ~allowed).any()
    ys, xs = np.nonzero(changed[:y1 + 2])
    assert abs(xs.min() - x0) <= 3 and abs(xs.max() + 1 - x1) <= 3
    assert abs(ys.min() - y0) <= 3
    # The renderer's mask agrees: the plate lies inside the box grown by 2 px.
    ys, xs = np.nonzero(with_sign.mask)
    assert xs.min() >= x0 - 2 and xs.max() < x1 + 2 and ys.min() >= y0 - 2 and ys.max() < y1 + 2


@pytest.mark.parametrize("seed", range(10))
def test_sticker_changes_pixels_only_inside_the_box(seed: int) -> None:
    k = seed % len(SYNTHETIC_CLASSES)
    sticker = make_sticker(np.random.default_rng(100 + seed), STICKER_KINDS[seed % 4])
    clean = render_scene_full(np.random.default_rng(seed), k)
    stuck = render_scene_full(np.random.default_rng(seed), k, sticker=sticker)
    assert stuck.truth.stickered and stuck.truth.box == clean.truth.box
    x0, y0, x1, y1 = clean.truth.box
    diff = np.any(stuck.image != clean.image, axis=2)
    inside = np.zeros_like(diff)
    inside[y0:y1, x0:x1] = True
    assert diff.any() and not (diff & ~inside).any()
    # It covers a visible part of the plate (10-25% of it, less where colours coincide).
    assert 0.02 < diff.sum() / clean.mask.sum() < 0.4


def test_stickers_every_kind_and_loading(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for kind in (*STICKER_KINDS, "random"):
        st = make_sticker(rng, kind)
        assert st.ndim == 3 and st.shape[2] == 4 and st.dtype == np.uint8
        assert st[..., 3].max() == 255
    with pytest.raises(ConfigError):
        make_sticker(rng, "glitter")
    rgba = make_sticker(rng, "patches")
    rgba[:8, :8, 3] = 0
    path = tmp_path / "sticker.png"
    assert cv2.imwrite(str(path), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    assert np.array_equal(load_sticker(path), rgba)
    opaque = tmp_path / "opaque.png"
    assert cv2.imwrite(str(opaque), rgba[..., 2::-1].copy())  # BGR, no alpha
    loaded = load_sticker(opaque)
    assert np.array_equal(loaded[..., :3], rgba[..., :3]) and (loaded[..., 3] == 255).all()
    frame, truth = render_scene(np.random.default_rng(1), 0, sticker=loaded)
    assert truth is not None and truth.stickered
    for bad in (tmp_path / "missing.png", tmp_path / "junk.png"):
        if bad.name == "junk.png":
            bad.write_bytes(b"not a png")
        with pytest.raises(DatasetError, match=str(bad)):
            load_sticker(bad)
    with pytest.raises(ConfigError):
        render_scene(np.random.default_rng(1), 0, sticker=rgba[..., :3])


def test_bad_scene_arguments() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError):
        render_scene(rng, 99)
    with pytest.raises(ConfigError):
        render_scene(rng, 0, width=320, height=240, sign_px=400)
    with pytest.raises(ConfigError):
        render_scene(rng, 0, width=32, height=24)


@pytest.mark.parametrize("name", ["clip.mp4", "clip.avi"])
def test_video_round_trip(tmp_path: Path, name: str) -> None:
    rng = np.random.default_rng(0)
    frames = [render_scene(rng, i % 14, width=160, height=120)[0] for i in range(7)]
    path = tmp_path / name
    assert write_video(iter(frames), path, fps=15) == 7
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened()
    got = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        got.append(f)
    cap.release()
    assert len(got) == 7 and got[0].shape == (120, 160, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temp file left


def test_video_errors(tmp_path: Path) -> None:
    frame = np.zeros((48, 64, 3), np.uint8)
    with pytest.raises(DatasetError, match="clip.gif"):
        write_video([frame], tmp_path / "clip.gif")
    with pytest.raises(DatasetError, match="no frames"):
        write_video([], tmp_path / "clip.mp4")
    with pytest.raises(ConfigError):
        write_video([frame, np.zeros((10, 10, 3), np.uint8)], tmp_path / "clip.avi")
    assert list(tmp_path.iterdir()) == []


def test_video_writer_that_cannot_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Closed:
        fourcc = staticmethod(cv2.VideoWriter.fourcc)

        def __init__(self, *args: object) -> None: ...
        def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
            return False
        def release(self) -> None: ...

    monkeypatch.setattr(scenes.cv2, "VideoWriter", Closed)
    with pytest.raises(DatasetError, match="cannot open"):
        write_video([np.zeros((48, 64, 3), np.uint8)], tmp_path / "clip.mp4")
    assert list(tmp_path.iterdir()) == []


def test_camera_yields_the_promised_frames_with_truth() -> None:
    uri = "synthetic://?seed=3&frames=90&width=320&height=240&fps=10&sticker_rate=0.5"
    with SyntheticCamera(uri) as cam:
        frames = list(cam)
        again = list(cam)
    assert len(frames) == 90 and cam.frame_count == 90
    assert [f.index for f in frames] == list(range(90))
    assert frames[7].timestamp == pytest.approx(0.7)
    assert all(f.image.shape == (240, 320, 3) and f.image.dtype == np.uint8 for f in frames)
    truths = [f.truth for f in frames]
    assert any(t is None for t in truths) and sum(t is not None for t in truths) > 30
    assert sum(t is None for t in truths) > 30  # about a second of empty road between signs
    assert all(a.image.tobytes() == b.image.tobytes() and a.truth == b.truth
               for a, b in zip(frames, again, strict=True))
    # Within an encounter the sign approaches: it grows from small to large.
    run = []
    for t in truths:
        if t is None:
            if len(run) >= 8:
                break
            run = []
        else:
            run.append(t.box[2] - t.box[0])
    assert len(run) >= 8 and run[0] < 32 and run[-1] > 50 and run == sorted(run)
    other = list(SyntheticCamera(uri.replace("seed=3", "seed=4")))
    assert any(a.image.tobytes() != b.image.tobytes() for a, b in zip(frames, other, strict=True))


def test_camera_options_classes_and_sticker_rate() -> None:
    frames = list(SyntheticCamera("synthetic://?frames=40&width=160&height=120&"
                                  "classes=stop,yield&sticker_rate=1"))
    truths = [f.truth for f in frames if f.truth is not None]
    assert {t.class_name for t in truths} <= {"stop", "yield"} and all(t.stickered for t in truths)
    clean = list(SyntheticCamera("synthetic://?frames=40&width=160&height=120&sticker_rate=0"))
    assert not any(f.truth.stickered for f in clean if f.truth is not None)
    assert len(list(SyntheticCamera("synthetic://?frames=40&max_frames=5"))) == 5


@pytest.mark.parametrize("query", ["seed=-1", "frames=abc", "frames=0", "sticker_rate=2",
                                   "fps=nan", "width=10", "colour=red", "classes=stop,moose",
                                   "seed=1&seed=2", "sticker=/no/such/sticker.png"])
def test_camera_rejects_bad_uris(query: str) -> None:
    uri = f"synthetic://?{query}"
    with pytest.raises(CameraError) as err:
        SyntheticCamera(uri)
    assert uri in str(err.value) and err.value.hint


def test_camera_registers_its_scheme() -> None:
    register()
    cam = source_factory("synthetic")("synthetic://?frames=3&width=96&height=72")
    assert isinstance(cam, SyntheticCamera) and len(list(cam)) == 3
    cam.close()
    with pytest.raises(CameraError):
        list(cam)
