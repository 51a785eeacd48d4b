"""A sticker at an exact place: sign art with it, loading its files, the synthetic camera."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from cloud_train.scenes import SceneLayout, place_sign
from cloud_train.sign_art import sign_pyramid, sign_rgba
from cloud_train.signs import SYNTHETIC_CLASSES
from cloud_train.sticker.placement import (
    PlacedSticker,
    load_placed_sticker,
    placed_from_art,
    plate_box,
    sticker_art,
)
from cloud_train.sticker.printout import write_sticker
from cloud_train.synthetic_camera import SyntheticCamera
from roadshield_base.errors import CameraError, ConfigError, DatasetError

STOP = SYNTHETIC_CLASSES.index("stop")
YIELD = SYNTHETIC_CLASSES.index("yield")
GREEN_BOX = (30, 34, 54, 58)  # x0, y0, x1, y1 on the stop sign's art, upper left of its face
# Two encounters at this seed: stop in frames 18-34, yield in frames 58-70.
CAM = "synthetic://?seed=1&frames=72&width=320&height=240&classes=stop,yield"


def _green_square() -> tuple[np.ndarray, np.ndarray]:
    colours = np.zeros((128, 128, 3), np.uint8)
    colours[..., 1] = 255
    mask = np.zeros((128, 128), bool)
    x0, y0, x1, y1 = GREEN_BOX
    mask[y0:y1, x0:x1] = True
    return colours, mask


@pytest.fixture()
def green_dir(tmp_path: Path) -> Path:
    colours, mask = _green_square()
    write_sticker(tmp_path / "green", colours, mask, sign="stop", target="yield",
                  shape="square", sign_mm=600, dpi=50)
    return tmp_path / "green"


def test_sticker_art_composites_exactly_and_keeps_the_pyramid() -> None:
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    mask = (sign_rgba(STOP)[..., 3] > 127) & (rng.random((128, 128)) < 0.3)
    placed = placed_from_art(colours, mask, "stop", None, "noise", 600)
    levels = sticker_art(STOP, placed)
    plain = sign_pyramid(STOP)
    assert [lv.shape for lv in levels] == [lv.shape for lv in plain] == [
        (128, 128, 4), (64, 64, 4), (32, 32, 4)]
    art = sign_rgba(STOP)
    # art_rgb * (1 - m) + colours * m with a 0/1 mask: the sticker's colours on the mask.
    want = np.where(mask[..., None], colours, art[..., :3])
    assert np.array_equal(levels[0][..., :3], want)
    assert np.array_equal(levels[0][..., 3], art[..., 3])  # the outline is untouched
    for a, b in zip(levels, levels[1:], strict=False):
        half = cv2.resize(a, (a.shape[1] // 2, a.shape[0] // 2), interpolation=cv2.INTER_AREA)
        assert np.array_equal(b, half)
    assert all(not lv.flags.writeable for lv in levels)
    assert np.array_equal(sticker_art(STOP, placed)[2], levels[2])  # deterministic
    with pytest.raises(ConfigError, match="stop"):
        sticker_art(YIELD, placed)


def test_placed_sticker_box_and_rgba() -> None:
    colours, mask = _green_square()
    placed = placed_from_art(colours, mask, "stop", "yield", "square", 600, {"k": 1})
    assert placed.box_art == GREEN_BOX and placed.class_index == STOP
    assert placed.rgba_art.shape == (24, 24, 4) and (placed.rgba_art[..., 3] == 255).all()
    assert (placed.rgba_art[..., :3] == (0, 255, 0)).all()
    assert not placed.rgba_art.flags.writeable and placed.meta == {"k": 1}
    numpy_meta = {"rate": np.float32(0.5), "queries": np.int64(7), "v": np.arange(2)}
    assert placed_from_art(colours, mask, "stop", None, "square", 600, numpy_meta).meta == {
        "rate": 0.5, "queries": 7, "v": [0, 1]}
    # Names are normalised; the box must fit the plate; the image must match the box.
    assert placed_from_art(colours, mask, "Stop", "speed limit 30", "square", 600).target == \
        "speed_limit_30"
    with pytest.raises(ConfigError, match="larger than the sign"):
        PlacedSticker("stop", None, "square", (0, 0, 128, 128),
                      np.zeros((128, 128, 4), np.uint8), 600.0)
    with pytest.raises(ConfigError, match="outside"):
        PlacedSticker("stop", None, "square", (120, 0, 130, 10), np.zeros((10, 10, 4), np.uint8),
                      600.0)
    with pytest.raises(ConfigError, match="shape"):
        PlacedSticker("stop", None, "square", GREEN_BOX, np.zeros((4, 4, 4), np.uint8), 600.0)


def _rewrite_json(folder: Path, **changes: object) -> None:
    path = folder / "sticker.json"
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))


def _rewrite_png(folder: Path, img: np.ndarray) -> None:
    assert cv2.imwrite(str(folder / "sticker.png"), img)


@pytest.mark.parametrize("case, match", [
    ("no json", "no sticker description"),
    ("no png", "missing or not an image"),
    ("junk png", "missing or not an image"),
    ("junk json", "JSON"),
    ("not rgba", "not RGBA"),
    ("grey", "not RGBA"),
    ("empty", "empty"),
    ("wrong size", "measures"),
    ("format", "unknown format version"),
    ("box outside", "outside the 128 x 128"),
    ("box too big", "larger than the sign"),
    ("box not ints", "four whole numbers"),
    ("off the face", "outside the sign face"),
    ("bad sign_mm", "positive"),
    ("unknown sign", "unknown sign class"),
    ("target is sign", "target"),
    ("other png", "describes sticker.png"),
    ("png path", "not a file name"),
])
def test_load_errors(green_dir: Path, case: str, match: str) -> None:
    img = cv2.imread(str(green_dir / "sticker.png"), cv2.IMREAD_UNCHANGED)
    where: Path = green_dir
    if case == "no json":
        (green_dir / "sticker.json").unlink()
    elif case == "no png":
        (green_dir / "sticker.png").unlink()
    elif case == "junk png":
        (green_dir / "sticker.png").write_bytes(b"not a png")
    elif case == "junk json":
        (green_dir / "sticker.json").write_text("{")
    elif case == "not rgba":
        _rewrite_png(green_dir, img[..., :3])
    elif case == "grey":
        _rewrite_png(green_dir, img[..., 1])
    elif case == "empty":
        img[..., 3] = 0
        _rewrite_png(green_dir, img)
    elif case == "wrong size":
        _rewrite_png(green_dir, img[1:])
    elif case == "format":
        _rewrite_json(green_dir, format="roadshield-sticker/2")
    elif case == "box outside":
        _rewrite_json(green_dir, box_art=[-4, 34, 20, 58])
    elif case == "box too big":
        _rewrite_json(green_dir, box_art=[0, 0, 128, 128])
    elif case == "box not ints":
        _rewrite_json(green_dir, box_art=[30.5, 34, 54, 58])
    elif case == "off the face":  # the same size, moved into the corner off the octagon
        _rewrite_json(green_dir, box_art=[0, 0, 24, 24])
    elif case == "bad sign_mm":
        _rewrite_json(green_dir, sign_mm=-1)
    elif case == "unknown sign":
        _rewrite_json(green_dir, sign="moose")
    elif case == "target is sign":
        _rewrite_json(green_dir, target="stop")
    elif case == "other png":
        (green_dir / "other.png").write_bytes((green_dir / "sticker.png").read_bytes())
        where = green_dir / "other.png"
    elif case == "png path":
        _rewrite_json(green_dir, png="../sticker.png")
    with pytest.raises(DatasetError, match=match) as err:
        load_placed_sticker(where)
    assert err.value.hint


def test_place_sign_draws_a_placed_sticker_only_on_its_class(green_dir: Path) -> None:
    placed = load_placed_sticker(green_dir)
    layout = SceneLayout(160, 160, 80.0, 80.0, 1, 0.0, 0.0, 2.0)

    def draw(cls: int, **kw: object) -> tuple[np.ndarray, tuple[int, int, int, int]]:
        frame = np.full((160, 160, 3), 200, np.uint8)
        box, _ = place_sign(frame, layout, cls, 100, 7, **kw)  # type: ignore[arg-type]
        return frame, box

    clean_yield, _ = draw(YIELD)
    assert np.array_equal(draw(YIELD, placed=placed)[0], clean_yield)
    clean_stop, box = draw(STOP)
    stuck, box2 = draw(STOP, placed=placed)
    assert box == box2 and not np.array_equal(stuck, clean_stop)
    diff = np.any(stuck != clean_stop, axis=2)
    ys, xs = np.nonzero(diff)
    assert box[0] <= xs.min() and xs.max() < box[2] and box[1] <= ys.min() and ys.max() < box[3]


def _green_centroid_in_box(image: np.ndarray, clean: np.ndarray,
                           box: tuple[int, int, int, int]) -> tuple[float, float]:
    """Centroid of the pixels the sticker changed, relative to ``box`` (0..1 each way)."""
    changed = np.any(np.abs(image.astype(int) - clean) > 20, axis=2)
    b, g, r = (image[..., c].astype(int) for c in range(3))
    green = changed & (g > r + 60) & (g > b + 60)
    ys, xs = np.nonzero(green)
    assert len(xs) >= 20
    x0, y0, x1, y1 = box
    return (xs.mean() + 0.5 - x0) / (x1 - x0), (ys.mean() + 0.5 - y0) / (y1 - y0)


@pytest.mark.parametrize("which", ["folder", "json", "png"])
def test_camera_sticks_a_placed_sticker_on_its_class_only(green_dir: Path, which: str) -> None:
    path = {"folder": green_dir, "json": green_dir / "sticker.json",
            "png": green_dir / "sticker.png"}[which]
    stuck = list(SyntheticCamera(f"{CAM}&sticker_rate=1&sticker={path}"))
    clean = list(SyntheticCamera(f"{CAM}&sticker_rate=0"))
    names = {f.truth.class_name for f in stuck if f.truth is not None}
    assert names == {"stop", "yield"}
    x0, y0, x1, y1 = GREEN_BOX
    px0, py0, px1, py1 = plate_box(STOP)
    want = ((x0 + x1) / 2 - px0) / (px1 - px0), ((y0 + y1) / 2 - py0) / (py1 - py0)
    seen = 0
    for s, c in zip(stuck, clean, strict=True):
        assert s.truth == (None if c.truth is None else type(c.truth)(
            c.truth.class_name, c.truth.box, stickered=c.truth.class_name == "stop"))
        diff = np.any(s.image != c.image, axis=2)
        if s.truth is None or s.truth.class_name != "stop":
            assert not diff.any()  # empty road and the yield sign: the clean stream's pixels
            continue
        bx0, by0, bx1, by1 = s.truth.box
        inside = np.zeros_like(diff)
        inside[by0:by1, bx0:bx1] = True
        assert diff.any() and not (diff & ~inside).any()
        if bx1 - bx0 >= 40:  # big enough to locate the square within the sign
            rx, ry = _green_centroid_in_box(s.image, c.image, s.truth.box)
            assert abs(rx - want[0]) < 0.05 and abs(ry - want[1]) < 0.05
            seen += 1
    assert seen >= 3


def test_camera_with_a_plain_sticker_image_keeps_the_random_placement(tmp_path: Path) -> None:
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 1] = 255
    rgba[..., 3] = 255
    assert cv2.imwrite(str(tmp_path / "plain.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    frames = list(SyntheticCamera(f"{CAM}&sticker_rate=1&sticker={tmp_path / 'plain.png'}"))
    truths = [f.truth for f in frames if f.truth is not None]
    assert {t.class_name for t in truths} == {"stop", "yield"} and all(t.stickered for t in truths)
    rgba[..., 3] = 0
    assert cv2.imwrite(str(tmp_path / "clear.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    with pytest.raises(CameraError, match="transparent"):
        SyntheticCamera(f"{CAM}&sticker={tmp_path / 'clear.png'}")


def test_camera_errors_from_a_sticker_folder(green_dir: Path, tmp_path: Path) -> None:
    _rewrite_json(green_dir, format="something/9")
    for path in (green_dir, green_dir / "sticker.png", green_dir / "sticker.json"):
        uri = f"{CAM}&sticker={path}"
        with pytest.raises(CameraError, match="unknown format version") as err:
            SyntheticCamera(uri)
        assert uri in str(err.value) and "roadshield-sticker/1" in err.value.hint
    (tmp_path / "bare").mkdir()
    with pytest.raises(CameraError, match="no sticker description") as err:
        SyntheticCamera(f"{CAM}&sticker={tmp_path / 'bare'}")
    assert err.value.hint
