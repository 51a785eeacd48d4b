"""Sticker print files: the PNG, the true-size PDF, the preview and sticker.json."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest

from cloud_train.sign_art import sign_rgba
from cloud_train.signs import SYNTHETIC_CLASSES
from cloud_train.sticker.placement import load_placed_sticker, placed_from_art, plate_box
from cloud_train.sticker.printout import write_sticker
from roadshield_base.errors import ConfigError

STOP = SYNTHETIC_CLASSES.index("stop")
PT_PER_MM = 72 / 25.4


def _noise_sticker(seed: int = 0, sign: int = STOP) -> tuple[np.ndarray, np.ndarray]:
    """Random colours and a disc-with-a-hole mask well inside the plate of ``sign``."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:128, :128]
    r = np.hypot(xx - 58, yy - 70)
    mask = (r < 22) & (r >= 5)
    assert (sign_rgba(sign)[..., 3][mask] > 127).all()
    return colours, mask


def _write(out: Path, dpi: float = 127, sign_mm: float = 116, **kw: object) -> dict[str, Path]:
    colours, mask = _noise_sticker()
    args: dict[str, object] = {"sign": "stop", "target": "speed_limit_30", "shape": "circle",
                               "sign_mm": sign_mm, "dpi": dpi,
                               "meta": {"model_sha256": "ab" * 32, "success_rate": 0.75}}
    args.update(kw)
    return write_sticker(out, colours, mask, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize("dpi", [20, 127, 300])
def test_write_then_load_is_bit_exact(tmp_path: Path, dpi: int) -> None:
    colours, mask = _noise_sticker()
    paths = _write(tmp_path / "st", dpi=dpi)
    assert sorted(p.name for p in (tmp_path / "st").iterdir()) == [
        "preview.png", "sticker.json", "sticker.pdf", "sticker.png"]  # no temp file left
    want = placed_from_art(colours, mask, "stop", "speed_limit_30", "circle", 116)
    for where in (tmp_path / "st", paths["json"], paths["png"]):
        got = load_placed_sticker(where)
        assert got.box_art == want.box_art and got.sign == "stop"
        assert got.target == "speed_limit_30" and got.shape == "circle" and got.sign_mm == 116
        assert got.rgba_art.dtype == np.uint8
        assert np.array_equal(got.rgba_art, want.rgba_art)
        assert got.meta == {"model_sha256": "ab" * 32, "success_rate": 0.75}


def test_json_fields(tmp_path: Path) -> None:
    colours, mask = _noise_sticker()
    doc = json.loads(_write(tmp_path, target=None)["json"].read_text())
    assert doc["format"] == "roadshield-sticker/1"
    assert (doc["sign"], doc["target"], doc["shape"]) == ("stop", None, "circle")
    assert doc["art_size"] == 128 and doc["sign_mm"] == 116
    ys, xs = np.nonzero(mask)
    box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
    assert doc["box_art"] == box
    # The plate's horizontal extent is the sign's width: sign_mm / w_plate mm per art pixel.
    px0, py0, px1, py1 = plate_box(STOP)
    alpha_cols = np.nonzero((sign_rgba(STOP)[..., 3] > 127).any(axis=0))[0]
    assert px1 - px0 == alpha_cols.max() + 1 - alpha_cols.min()
    art_mm = 116 / (px1 - px0)
    assert doc["art_mm"] == pytest.approx(art_mm)
    assert doc["plate_box_art"] == [px0, py0, px1, py1]
    assert doc["plate_mm"] == pytest.approx([116, (py1 - py0) * art_mm])
    want_mm = [(box[0] - px0) * art_mm, (box[1] - py0) * art_mm, (box[2] - px0) * art_mm,
               (box[3] - py0) * art_mm]
    assert doc["box_mm"] == pytest.approx(want_mm, abs=1e-3)
    assert doc["px_per_art"] == max(1, round(127 * art_mm / 25.4)) == 5
    assert doc["dpi"] == 127
    assert doc["png_dpi"] == pytest.approx(5 * 25.4 / art_mm, abs=1e-3)
    assert doc["png_px"] == [(box[2] - box[0]) * 5, (box[3] - box[1]) * 5]
    assert (doc["png"], doc["pdf"], doc["preview"]) == ("sticker.png", "sticker.pdf",
                                                        "preview.png")
    plate_area = np.count_nonzero(sign_rgba(STOP)[..., 3] > 127)
    assert doc["area_share"] == pytest.approx(mask.sum() / plate_area, abs=1e-6)
    assert doc["attack"] == {"model_sha256": "ab" * 32, "success_rate": 0.75}


@pytest.mark.parametrize("sign_mm", [116, 600, 40])
def test_pdf_page_is_the_true_physical_size(tmp_path: Path, sign_mm: float) -> None:
    paths = _write(tmp_path, sign_mm=sign_mm, dpi=30)
    doc = json.loads(paths["json"].read_text())
    data = paths["pdf"].read_bytes()
    assert data.startswith(b"%PDF")
    boxes = re.findall(rb"/MediaBox\s*\[\s*([-\d.\s]+)\]", data)
    assert len(boxes) == 1  # one page
    x0, y0, x1, y1 = (float(v) for v in boxes[0].split())
    # Page: the sign's bounding box plus 20 mm all round (wide enough for the 100 mm bar).
    plate_w, plate_h = doc["plate_mm"]
    want = (max(plate_w, 100) + 40, plate_h + 40)
    assert plate_w == pytest.approx(sign_mm)
    assert doc["page_mm"] == pytest.approx(want, abs=1e-3)
    assert (x0, y0) == (0, 0)
    assert x1 == pytest.approx(want[0] * PT_PER_MM, abs=0.01)
    assert y1 == pytest.approx(want[1] * PT_PER_MM, abs=0.01)


def _png_chunks(data: bytes) -> dict[bytes, bytes]:
    pos, out = 8, {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        out.setdefault(data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n])
        pos += 12 + n
    return out


def test_png_is_rgba_with_alpha_zero_off_the_ink_and_its_dpi(tmp_path: Path) -> None:
    colours, mask = _noise_sticker()
    paths = _write(tmp_path)
    doc = json.loads(paths["json"].read_text())
    img = cv2.imread(str(paths["png"]), cv2.IMREAD_UNCHANGED)
    assert img.shape == (doc["png_px"][1], doc["png_px"][0], 4) and img.dtype == np.uint8
    x0, y0, x1, y1 = doc["box_art"]
    k = doc["px_per_art"]
    big_mask = np.repeat(np.repeat(mask[y0:y1, x0:x1], k, axis=0), k, axis=1)
    assert (img[..., 3][~big_mask] == 0).all() and (img[..., 3][big_mask] == 255).all()
    rgb = img[..., 2::-1]
    big_col = np.repeat(np.repeat(colours[y0:y1, x0:x1], k, axis=0), k, axis=1)
    assert np.array_equal(rgb[big_mask], big_col[big_mask])
    (ppm_x, ppm_y, unit) = struct.unpack(">IIB", _png_chunks(paths["png"].read_bytes())[b"pHYs"])
    assert unit == 1 and ppm_x == ppm_y
    assert ppm_x * 0.0254 == pytest.approx(doc["png_dpi"], abs=0.05)


def test_preview_shows_the_stickered_sign(tmp_path: Path) -> None:
    paths = _write(tmp_path)
    prev = cv2.imread(str(paths["preview"]))
    assert prev is not None and prev.ndim == 3 and prev.shape[1] > prev.shape[0] >= 512


def _mask_on(box: tuple[int, int, int, int]) -> np.ndarray:
    m = np.zeros((128, 128), bool)
    m[box[1]:box[3], box[0]:box[2]] = True
    return m


@pytest.mark.parametrize("kw, match", [
    ({"sign_mm": 0}, "positive"),
    ({"sign_mm": -600}, "positive"),
    ({"sign_mm": float("nan")}, "positive"),
    ({"sign_mm": float("inf")}, "positive"),
    ({"sign_mm": "600"}, "positive"),
    ({"sign_mm": True}, "positive"),
    ({"dpi": 0}, "dpi"),
    ({"dpi": -300}, "dpi"),
    ({"sign": "moose"}, "unknown sign class"),
    ({"target": "moose"}, "unknown target class"),
    ({"target": "stop"}, "target"),
    ({"mask": np.zeros((128, 128), bool)}, "empty"),
    ({"mask": _mask_on((0, 0, 20, 20))}, "outside the sign face"),
    ({"mask": np.ones((128, 128), bool)}, "larger than the sign"),
    ({"mask": np.ones((128, 128), np.uint8)}, "bool"),
    ({"mask": np.ones((64, 64), bool)}, "128 x 128"),
    ({"colours": np.zeros((128, 128, 3), np.float32)}, "uint8"),
    ({"colours": np.zeros((128, 128), np.uint8)}, "uint8"),
    ({"meta": {"model": object()}}, "JSON"),
])
def test_bad_inputs_raise_config_error_and_write_nothing(tmp_path: Path, kw: dict[str, object],
                                                         match: str) -> None:
    colours, mask = _noise_sticker()
    args: dict[str, object] = {"sign": "stop", "target": None, "shape": "square",
                               "sign_mm": 600, "dpi": 100}
    colours = kw.pop("colours", colours)  # type: ignore[assignment]
    mask = kw.pop("mask", mask)  # type: ignore[assignment]
    args.update(kw)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=match) as err:
        write_sticker(out, colours, mask, **args)  # type: ignore[arg-type]
    assert err.value.hint
    assert not out.exists()
    if "sign" in kw:
        assert "speed_limit_30" in err.value.hint  # the hint lists the class names
