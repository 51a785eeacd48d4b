"""Sticker masks on a sign's face, the printer palette, and the printability terms.

Everything here lives in the sign's ART space: the 128 x 128 square of
``cloud_train.sign_art.sign_rgba`` (x right, y down). A sticker is a boolean mask on
that square plus its colours; it always lies on the sign's face shrunk by 8 % of the
square's side (the same inner plate the random stickers of ``cloud_train.scenes`` use),
so it never reaches the rim and never changes the sign's outline.

Shapes (Eykholt et al. 2018, "Robust physical-world attacks on deep learning visual
classification", use rectangles and a two-bar "graffiti"):

- ``bars``: two horizontal bars, each 4 : 1, one above and one below the given centre;
- ``square``: one square;
- ``circle``: one disc.

``area`` is the sticker's share of the sign plate's area (alpha > 127), 0.05-0.15 in the
paper's physical tests.
"""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np
import torch

from cloud_train.sign_art import ART_SIZE, sign_rgba
from roadshield_base.errors import ConfigError

SHAPES = ("bars", "square", "circle")
#: sticker area as a share of the plate: what fits on a sign's face without covering it
AREA_RANGE = (0.01, 0.3)
#: share of the square's side the inner plate is shrunk by on every side
_INNER_SHRINK = 0.08

#: A nominal printer palette (sRGB, 0-255): the paper swatches a matte inkjet / vinyl
#: print reproduces faithfully: black, greys, white, and primaries, secondaries and their
#: darker and lighter tones. Non-printability is the distance to the nearest of these.
PRINTER_PALETTE: np.ndarray = np.array([
    [18, 18, 18], [70, 70, 70], [128, 128, 128], [190, 190, 190], [245, 245, 242],
    [200, 30, 36], [130, 20, 25], [240, 120, 120], [235, 110, 20], [250, 190, 120],
    [250, 210, 0], [180, 150, 20], [250, 240, 150], [40, 150, 60], [20, 90, 40],
    [140, 210, 140], [20, 150, 170], [140, 215, 225], [25, 80, 170], [15, 40, 100],
    [120, 160, 230], [110, 50, 150], [190, 150, 215], [200, 40, 130], [240, 150, 200],
    [120, 80, 40], [190, 150, 100], [80, 60, 30], [60, 110, 110], [160, 40, 40],
], dtype=np.uint8)


@functools.cache
def plate_masks(class_index: int) -> tuple[np.ndarray, np.ndarray]:
    """(plate, inner): bool 128 x 128 read-only masks of the sign's face (alpha > 127) and
    of the face eroded by 8 % of the square's side, where a sticker may go."""
    alpha = sign_rgba(class_index)[..., 3]
    k = int(ART_SIZE * _INNER_SHRINK) * 2 + 1
    inner = cv2.erode(alpha, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))) > 127
    plate = alpha > 127
    plate.setflags(write=False)
    inner.setflags(write=False)
    return plate, inner


def check_area(area: float) -> float:
    lo, hi = AREA_RANGE
    if not isinstance(area, (int, float)) or not math.isfinite(area) or not lo <= area <= hi:
        raise ConfigError(f"sticker area {area!r} is outside {lo}-{hi} of the sign's face",
                          "use a share such as 0.1 (physical attacks use 0.05-0.15); a "
                          "sticker larger than that covers the sign rather than fooling it")
    return float(area)


def _box(canvas: np.ndarray, cx: float, cy: float, w: int, h: int) -> None:
    """Fill a w x h pixel box centred on (cx, cy) (any whole size, odd or even)."""
    x0, y0 = round(cx - w / 2), round(cy - h / 2)
    cv2.rectangle(canvas, (x0, y0), (x0 + w - 1, y0 + h - 1), 1, -1)


def _draw(shape: str, centre: tuple[float, float], half: int) -> np.ndarray:
    """The shape at size ``half`` / 2 art pixels around ``centre``: a square of
    (half // 2) x ((half + 1) // 2) pixels (so sizes come in half-pixel steps of area), a
    disc of radius half // 4, or two 4 : 1 bars of width half // 2, one bar height apart."""
    canvas = np.zeros((ART_SIZE, ART_SIZE), np.uint8)
    cx, cy = centre
    w = max(1, half // 2)
    if shape == "square":
        _box(canvas, cx, cy, w, max(1, (half + 1) // 2))
    elif shape == "circle":
        cv2.circle(canvas, (round(cx), round(cy)), max(1, half // 4), 1, -1)
    else:
        h = max(1, round(w / 4))
        _box(canvas, cx, cy - h, w, h)
        _box(canvas, cx, cy + h, w, h)
    return canvas.astype(bool)


#: the sizes tried for a sticker, in half art pixels
_SIZES = range(4, 2 * ART_SIZE + 1)


def sticker_mask(class_index: int, shape: str, area: float,
                 centre: tuple[float, float] | None = None) -> np.ndarray:
    """A 128 x 128 bool mask of ``shape`` covering ``area`` of the plate, on the inner plate.

    centre: (x, y) in art pixels (default: the inner plate's centroid). Every size of the
    shape (half-pixel steps) is drawn and clipped to the inner plate; the one whose clipped
    area is closest to the asked share wins, among those that keep at least 90 % of
    themselves on the face. ConfigError for an unknown shape, an area out of range, or a
    centre where no size comes within 5 % of the area without losing more than 10 % over
    the face's edge.
    """
    check_shape(shape)
    check_area(area)
    plate, inner = plate_masks(class_index)
    want = area * float(plate.sum())
    if centre is None:
        ys, xs = np.nonzero(inner)
        centre = (float(xs.mean()), float(ys.mean()))
    if not inner[int(np.clip(round(centre[1]), 0, ART_SIZE - 1)),
                 int(np.clip(round(centre[0]), 0, ART_SIZE - 1))]:
        raise ConfigError(f"sticker centre {centre} is not on the sign's face",
                          "give a centre inside the face, in art pixels (0-128)")
    best, best_err = None, float("inf")
    for half in _SIZES:
        full = _draw(shape, centre, half)
        drawn = float(full.sum())
        if drawn > 1.2 * want / 0.9:  # past any size that could still fit: stop
            break
        m = full & inner
        got = float(m.sum())
        if got >= 0.9 * drawn and abs(got - want) < best_err:
            best, best_err = m, abs(got - want)
    if best is None or best_err > 0.05 * want:
        raise ConfigError(f"a {shape} sticker of {area:.0%} of the face does not fit at "
                          f"{tuple(round(c) for c in centre)}",
                          "use a smaller area or a centre nearer the middle of the sign")
    return best


def check_shape(shape: str) -> str:
    if shape not in SHAPES:
        raise ConfigError(f"unknown sticker shape {shape!r}", "use one of: " + ", ".join(SHAPES))
    return shape


def candidate_centres(class_index: int, count: int, shape: str = "bars",
                      area: float = 0.15) -> list[tuple[float, float]]:
    """Up to ``count`` centres where a ``shape`` sticker of ``area`` fits on the face: the
    inner plate's centroid first, then points on rings of 16 and 28 art pixels around it
    (above, below, beside and diagonally), in that order."""
    _, inner = plate_masks(class_index)
    ys, xs = np.nonzero(inner)
    cx, cy = float(xs.mean()), float(ys.mean())
    spots = [(cx, cy)]
    for radius in (16.0, 28.0):
        for k in (6, 2, 0, 4, 7, 5, 1, 3):  # up, down, right, left, then the diagonals
            a = k * math.pi / 4
            spots.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
    out: list[tuple[float, float]] = []
    for spot in spots:
        try:
            sticker_mask(class_index, shape, area, spot)
        except ConfigError:
            continue
        out.append(spot)
        if len(out) >= count:
            break
    return out


def non_printability(colours: torch.Tensor, mask: torch.Tensor,
                     palette: np.ndarray = PRINTER_PALETTE) -> torch.Tensor:
    """Mean distance from each sticker pixel to its nearest palette colour (RGB in [0, 1]).

    colours: float [3, H, W] in [0, 1]; mask: float [1, H, W] in {0, 1}. A scalar tensor,
    0 when every pixel is a palette colour (the min form of Sharif et al. 2016's NPS).
    """
    pal = torch.as_tensor(palette, dtype=colours.dtype, device=colours.device) / 255.0
    pix = colours.flatten(1).T  # [HW, 3]
    # the direct form: the matrix-product shortcut leaves ~5e-4 on exact palette colours
    dist = torch.cdist(pix, pal, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
    w = mask.flatten()
    return (dist * w).sum() / w.sum().clamp_min(1.0)


def total_variation(colours: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring sticker pixels (both on the mask)."""
    dx = (colours[:, :, 1:] - colours[:, :, :-1]).abs() * (mask[:, :, 1:] * mask[:, :, :-1])
    dy = (colours[:, 1:, :] - colours[:, :-1, :]).abs() * (mask[:, 1:, :] * mask[:, :-1, :])
    return (dx.sum() + dy.sum()) / (3.0 * mask.sum().clamp_min(1.0))


def snap_to_palette(colours: np.ndarray, palette: np.ndarray = PRINTER_PALETTE) -> np.ndarray:
    """Each pixel of ``colours`` (H x W x 3 uint8) replaced by its nearest palette colour."""
    flat = colours.reshape(-1, 3).astype(np.float32)
    d = ((flat[:, None, :] - palette[None].astype(np.float32)) ** 2).sum(axis=2)
    return palette[d.argmin(axis=1)].reshape(colours.shape)
