"""A sticker stuck at an exact place on a sign, and the sign art with it.

Coordinates are the sign's ART grid: the ART_SIZE x ART_SIZE (128 x 128) square of
``cloud_train.sign_art.sign_rgba``, x right, y down, in art pixels. A sticker is its colours
(RGB uint8) and where its ink is (a bool mask) on that square; on the sign it replaces the
art's colour where the mask is set: ``art_rgb' = art_rgb * (1 - m) + colours * m`` (the art's
alpha, i.e. the sign's outline, never changes). The ink must lie on the sign's plate (the
pixels of ``sign_rgba`` with alpha > 127).

``sticker.json`` plus the print PNG it names (written by
``cloud_train.sticker.printout.write_sticker``) describe one; ``load_placed_sticker`` reads
them back bit-exactly. This module must not import ``cloud_train.scenes`` at module level:
scenes imports it.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from cloud_train.sign_art import ART_SIZE, check_class_index, sign_rgba
from cloud_train.signs import SYNTHETIC_CLASSES
from roadshield_base.errors import ConfigError, DatasetError, RoadshieldError

#: The ``format`` value of sticker.json files this module reads and writes.
STICKER_FORMAT = "roadshield-sticker/1"
#: File names inside a sticker folder.
STICKER_JSON = "sticker.json"
STICKER_PNG = "sticker.png"

Box = tuple[int, int, int, int]


def class_index_of(name: str, what: str = "sign") -> int:
    """Index in SYNTHETIC_CLASSES of a class name ("speed limit 100" works as well);
    ConfigError listing the names for anything else."""
    key = name.strip().lower().replace(" ", "_").replace("-", "_") if isinstance(
        name, str) else None
    if key not in SYNTHETIC_CLASSES:
        raise ConfigError(f"unknown {what} class {name!r}",
                          "choose one of: " + ", ".join(SYNTHETIC_CLASSES))
    return SYNTHETIC_CLASSES.index(key)


@functools.cache
def plate_box(class_index: int) -> Box:
    """Bounding box (x0, y0, x1, y1), x1/y1 exclusive, in art pixels, of the sign's plate
    (alpha > 127): its left, top, right and bottom edges as one measures a real sign."""
    ys, xs = np.nonzero(sign_rgba(class_index)[..., 3] > 127)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def art_mm(class_index: int, sign_mm: float) -> float:
    """Millimetres of one art pixel when the sign is ``sign_mm`` wide.

    ``sign_mm`` is the sign's WIDTH as one measures a real sign: the plate's horizontal
    extent, w_plate art pixels (``plate_box``), so one art pixel is sign_mm / w_plate mm.
    """
    x0, _, x1, _ = plate_box(class_index)
    return float(sign_mm) / (x1 - x0)


def check_positive(value: Any, what: str, hint: str) -> float:
    """``value`` as a float when it is a positive finite number; ConfigError otherwise."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not ok or not math.isfinite(float(value)) or float(value) <= 0:
        raise ConfigError(f"{what} {value!r} is not a positive finite number", hint)
    return float(value)


@dataclass(frozen=True, eq=False)
class PlacedSticker:
    """A sticker at an exact place on one sign class.

    sign: class name the sticker is for; target: class it aims to be read as (None: any
    wrong class); shape: the sticker's shape name ("square", "bars", ...).
    box_art: (x0, y0, x1, y1) in art pixels, x1/y1 exclusive: the bounding box of the ink.
    rgba_art: (y1 - y0) x (x1 - x0) x 4 uint8 RGBA, alpha 255 on the ink and 0 elsewhere
    (read-only; intermediate alpha blends linearly).
    sign_mm: the sign's width in mm (see ``art_mm``). meta: free JSON-able notes (the
    attack's model, success rates, ...; NumPy values become plain ones). Validated on
    construction (ConfigError); compared by identity.
    """

    sign: str
    target: str | None
    shape: str
    box_art: Box
    rgba_art: np.ndarray
    sign_mm: float
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        idx = class_index_of(self.sign, "sign")
        object.__setattr__(self, "sign", SYNTHETIC_CLASSES[idx])
        if self.target is not None:
            t = SYNTHETIC_CLASSES[class_index_of(self.target, "target")]
            if t == self.sign:
                raise ConfigError(f"the sticker's target {t!r} is the sign it is stuck on",
                                  "give another class as target, or none for an untargeted "
                                  "sticker")
            object.__setattr__(self, "target", t)
        if not isinstance(self.shape, str) or not self.shape.strip():
            raise ConfigError(f"sticker shape {self.shape!r} is not a name",
                              "give the shape's name, e.g. 'square' or 'bars'")
        object.__setattr__(self, "sign_mm", check_positive(
            self.sign_mm, "sign width sign_mm", "give the real sign's width in millimetres, "
            "e.g. 600 or 750"))
        box = _check_box(self.box_art, idx)
        object.__setattr__(self, "box_art", box)
        rgba = np.asarray(self.rgba_art)
        want = (box[3] - box[1], box[2] - box[0], 4)
        if rgba.dtype != np.uint8 or rgba.shape != want:
            raise ConfigError(f"sticker image has shape {rgba.shape} and dtype {rgba.dtype}",
                              f"its box {box} needs a {want[0]} x {want[1]} x 4 uint8 RGBA image")
        _check_on_plate(idx, box, rgba[..., 3] > 0)
        rgba = rgba.copy()
        rgba.setflags(write=False)
        object.__setattr__(self, "rgba_art", rgba)
        meta = {} if self.meta is None else self.meta
        if not isinstance(meta, dict):
            raise ConfigError(f"sticker meta is a {type(meta).__name__}",
                              "give a dict of JSON values, or None")
        try:
            meta = json.loads(json.dumps(meta, default=_jsonable))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"sticker meta cannot be written as JSON: {err}",
                              "use str, int, float, bool, None, lists and dicts") from err
        object.__setattr__(self, "meta", meta)

    @property
    def class_index(self) -> int:
        """Index of ``sign`` in SYNTHETIC_CLASSES."""
        return SYNTHETIC_CLASSES.index(self.sign)


def _jsonable(value: Any) -> Any:
    """NumPy scalars and arrays as their Python values, for ``json.dumps``."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _check_box(box: Any, class_index: int) -> Box:
    """``box`` as 4 ints inside the art square and no larger than the plate; ConfigError."""
    vals = tuple(box) if isinstance(box, (tuple, list)) else ()
    if len(vals) != 4 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                 for v in vals):
        raise ConfigError(f"sticker box {box!r} is not four whole numbers",
                          "give (x0, y0, x1, y1) in art pixels, x1/y1 exclusive")
    vals = tuple(int(v) for v in vals)
    x0, y0, x1, y1 = vals
    if not (0 <= x0 < x1 <= ART_SIZE and 0 <= y0 < y1 <= ART_SIZE):
        raise ConfigError(f"sticker box {vals} is outside the {ART_SIZE} x {ART_SIZE} art square",
                          f"use 0 <= x0 < x1 <= {ART_SIZE} and 0 <= y0 < y1 <= {ART_SIZE}")
    px0, py0, px1, py1 = plate_box(class_index)
    if x1 - x0 > px1 - px0 or y1 - y0 > py1 - py0:
        raise ConfigError(f"sticker larger than the sign: its box is {x1 - x0} x {y1 - y0} art "
                          f"px, the sign's plate {px1 - px0} x {py1 - py0}",
                          "make the sticker smaller than the sign's face")
    return x0, y0, x1, y1


def _check_on_plate(class_index: int, box: Box, ink: np.ndarray) -> None:
    """ConfigError unless ``ink`` (bool, box-sized) has a pixel and all of them on the plate."""
    if not ink.any():
        raise ConfigError("the sticker is empty: its mask has no pixel set",
                          "give a mask with the sticker's ink set to True")
    x0, y0, x1, y1 = box
    plate = sign_rgba(class_index)[y0:y1, x0:x1, 3] > 127
    off = int(np.count_nonzero(ink & ~plate))
    if off:
        name = SYNTHETIC_CLASSES[class_index]
        if int(ink.sum()) > int(np.count_nonzero(sign_rgba(class_index)[..., 3] > 127)):
            raise ConfigError(f"sticker larger than the sign: {int(ink.sum())} px of ink on a "
                              f"{name} sign", "make the sticker smaller than the sign's face")
        raise ConfigError(f"{off} sticker pixels lie outside the sign face of {name}",
                          "keep the mask on the plate (alpha > 127 of sign_rgba)")


def placed_from_art(colours: np.ndarray, mask: np.ndarray, sign: str, target: str | None,
                    shape: str, sign_mm: float, meta: dict[str, Any] | None = None
                    ) -> PlacedSticker:
    """A PlacedSticker from a sticker in art space.

    colours: 128 x 128 x 3 uint8 RGB; mask: 128 x 128 bool, True where the ink is (on the
    plate of ``sign``); sign/target: class names (target None: untargeted); sign_mm: the
    sign's width in mm (see ``art_mm``). The box is the mask's bounding box; colours
    outside the mask are dropped (RGBA 0). ConfigError with a hint for anything invalid.
    """
    class_index_of(sign, "sign")
    col, m = np.asarray(colours), np.asarray(mask)
    if m.dtype != np.bool_ or m.shape != (ART_SIZE, ART_SIZE):
        raise ConfigError(f"sticker mask has shape {m.shape} and dtype {m.dtype}",
                          f"give a {ART_SIZE} x {ART_SIZE} bool mask in the sign's art grid")
    if col.dtype != np.uint8 or col.shape != (ART_SIZE, ART_SIZE, 3):
        raise ConfigError(f"sticker colours have shape {col.shape} and dtype {col.dtype}",
                          f"give {ART_SIZE} x {ART_SIZE} x 3 uint8 RGB in the sign's art grid")
    if not m.any():
        raise ConfigError("the sticker is empty: its mask has no pixel set",
                          "give a mask with the sticker's ink set to True")
    ys, xs = np.nonzero(m)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    x0, y0, x1, y1 = box
    crop = m[y0:y1, x0:x1]
    rgba = np.zeros((y1 - y0, x1 - x0, 4), np.uint8)
    rgba[crop, :3] = col[y0:y1, x0:x1][crop]
    rgba[crop, 3] = 255
    return PlacedSticker(sign, target, shape, box, rgba, sign_mm, meta or {})


def sticker_art(class_index: int, placed: PlacedSticker) -> tuple[np.ndarray, ...]:
    """The pyramid of ``sign_pyramid(class_index)`` with ``placed`` composited at its box.

    Level 0 is ART_SIZE x ART_SIZE x 4 uint8 RGBA with art_rgb * (1 - m) + colours * m
    (m = sticker alpha / 255, exact where m is 0 or 1; the art's alpha unchanged), then two
    INTER_AREA halvings (64, 32). Pure and deterministic; the arrays are read-only.
    ConfigError when ``class_index`` is not the sticker's sign.
    """
    name = check_class_index(class_index)
    if name != placed.sign:
        raise ConfigError(f"the sticker is for a {placed.sign} sign, not {name}",
                          "stick it only on its own sign class")
    art = sign_rgba(class_index).copy()
    x0, y0, x1, y1 = placed.box_art
    m = placed.rgba_art[..., 3:].astype(np.float32) / 255.0
    region = art[y0:y1, x0:x1, :3].astype(np.float32)
    blend = region * (1.0 - m) + placed.rgba_art[..., :3].astype(np.float32) * m
    art[y0:y1, x0:x1, :3] = np.clip(np.rint(blend), 0, 255).astype(np.uint8)
    levels = [art]
    for _ in range(2):
        prev = levels[-1]
        levels.append(cv2.resize(prev, (prev.shape[1] // 2, prev.shape[0] // 2),
                                 interpolation=cv2.INTER_AREA))
    for lv in levels:
        lv.setflags(write=False)
    return tuple(levels)


def sticker_json_path(path: str | Path) -> Path:
    """The sticker.json meant by ``path``: the .json itself, the folder holding it, or the
    PNG beside it (which the json must name). DatasetError when there is none."""
    p = Path(path)
    if p.is_dir():
        j = p / STICKER_JSON
    elif p.suffix.lower() == ".json":
        j = p
    else:
        j = p.parent / STICKER_JSON
    if not j.is_file():
        raise DatasetError(f"no sticker description {j}",
                           "give the folder, sticker.json or sticker.png written by "
                           "cloud_train.sticker.printout.write_sticker")
    return j


def _bad(path: Path, what: str, hint: str) -> DatasetError:
    return DatasetError(f"sticker file {path}: {what}", hint)


def _read_json(j: Path) -> dict[str, Any]:
    try:
        doc = json.loads(j.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise _bad(j, f"cannot be read as JSON ({err})",
                   "write it again with write_sticker") from err
    if not isinstance(doc, dict):
        raise _bad(j, "is not a JSON object", "write it again with write_sticker")
    if doc.get("format") != STICKER_FORMAT:
        raise _bad(j, f"unknown format version {doc.get('format')!r}",
                   f"this reader understands {STICKER_FORMAT!r}; write it again with this kit")
    missing = [k for k in ("sign", "shape", "sign_mm", "art_size", "box_art", "px_per_art", "png")
               if k not in doc]
    if missing:
        raise _bad(j, f"lacks {', '.join(missing)}", "write it again with write_sticker")
    if doc["art_size"] != ART_SIZE:
        raise _bad(j, f"art_size {doc['art_size']!r} is not {ART_SIZE}",
                   f"stickers are placed on the {ART_SIZE} x {ART_SIZE} sign art")
    return doc


def _read_png(png: Path) -> np.ndarray:
    """The print PNG as H x W x 4 uint8 BGRA; DatasetError unless it is a non-empty RGBA."""
    img = cv2.imread(str(png), cv2.IMREAD_UNCHANGED) if png.is_file() else None
    if img is None:
        raise _bad(png, "is missing or not an image OpenCV can read",
                   "keep the PNG sticker.json names beside it")
    if img.dtype != np.uint8:
        raise _bad(png, f"has pixel type {img.dtype}", "save it as an 8-bit RGBA PNG")
    if img.ndim != 3 or img.shape[2] != 4:
        raise _bad(png, f"is not RGBA ({1 if img.ndim == 2 else img.shape[2]} channels)",
                   "save it with its alpha channel: alpha 255 on the sticker, 0 around it")
    if not (img[..., 3] > 0).any():
        raise _bad(png, "is empty: no pixel has alpha > 0",
                   "the sticker's ink must have alpha 255")
    return img


def load_placed_sticker(path: str | Path) -> PlacedSticker:
    """Read a sticker folder: ``path`` is sticker.json, the PNG beside it, or the folder.

    The PNG is at print resolution, px_per_art print pixels per art pixel, so an INTER_AREA
    resize to the box recovers ``rgba_art`` exactly. DatasetError (with the file's path and
    a hint) for missing or unreadable files, a PNG that is not RGBA, is empty or does not
    measure box * px_per_art, an unknown format, a box outside the art square or the
    sign's plate, or invalid fields.
    """
    j = sticker_json_path(path)
    doc = _read_json(j)
    png_name = doc["png"]
    if not isinstance(png_name, str) or Path(png_name).name != png_name or not png_name:
        raise _bad(j, f"png {png_name!r} is not a file name", "name a PNG in the same folder")
    p = Path(path)
    if not p.is_dir() and p.suffix.lower() != ".json" and p.name != png_name:
        raise _bad(j, f"describes {png_name}, not {p.name}",
                   f"give {png_name}, the folder or sticker.json")
    ppa = doc["px_per_art"]
    if isinstance(ppa, bool) or not isinstance(ppa, int) or ppa < 1:
        raise _bad(j, f"px_per_art {ppa!r} is not a positive whole number",
                   "write it again with write_sticker")
    try:
        idx = class_index_of(doc["sign"], "sign")
        x0, y0, x1, y1 = _check_box(doc["box_art"], idx)
    except ConfigError as err:
        raise _bad(j, err.args[0], err.hint) from err
    img = _read_png(j.parent / png_name)
    want = ((y1 - y0) * ppa, (x1 - x0) * ppa)
    if img.shape[:2] != want:
        raise _bad(j.parent / png_name,
                   f"measures {img.shape[1]} x {img.shape[0]} px, the box "
                   f"{(x0, y0, x1, y1)} at {ppa} px per art pixel needs {want[1]} x {want[0]}",
                   "keep the PNG as written; do not resize or crop it")
    small = cv2.resize(img, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
    rgba = cv2.cvtColor(small, cv2.COLOR_BGRA2RGBA)
    meta = doc.get("attack") or {}
    try:
        return PlacedSticker(doc["sign"], doc.get("target"), doc["shape"], (x0, y0, x1, y1),
                             rgba, doc["sign_mm"], meta)
    except RoadshieldError as err:
        raise _bad(j, err.args[0], err.hint) from err
