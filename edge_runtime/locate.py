"""Classical road-sign locator: colour masks, contours and shape checks.

Road signs are painted in a few saturated colours (red rims, blue discs, yellow
diamonds) and have simple convex outlines inside a roughly square bounding box.
That is enough to propose a handful of regions per frame in about a millisecond
on a CPU, which the classifier then labels. No learning is involved, so nothing
here can be poisoned; the classifier behind it is what the rest of the kit
hardens.

Pure function ``locate_signs`` plus a thin ``SignLocator`` class holding the
settings, and a tiny registry so the loop can pick a locator by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from roadshield_base.errors import ConfigError

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Candidate:
    """A region that probably holds a sign.

    box: (x0, y0, x1, y1) in frame pixels, x1/y1 exclusive, padded and clamped to the frame.
    score: how sign-like the region looks, in (0, 1]; higher is better.
    colour: the mask that found it: "red", "blue", "yellow", or "frame" for the full-frame locator.
    """

    box: Box
    score: float
    colour: str

    def to_dict(self) -> dict[str, object]:
        return {"box": list(self.box), "score": round(self.score, 4), "colour": self.colour}


# Colour gates in OpenCV's HSV units (H in [0, 180), S and V in [0, 255]): hue ranges
# (inclusive), minimum saturation, minimum value. Red wraps around H = 0, hence two ranges.
# Red stops at H 8 and yellow starts at H 18 so that brown (bark, soil, fences: H 10-17)
# falls between them; red also needs S >= 100 and V >= 90 because the hue of dark, dull
# pixels is noisy and would let brown leak in. Sky is blue too, but paler (S below ~120)
# and far too large to pass the shape checks.
_GATES: dict[str, tuple[tuple[tuple[int, int], ...], int, int]] = {
    "red": (((0, 8), (165, 179)), 100, 90),
    "blue": (((100, 128),), 140, 50),
    "yellow": (((18, 34),), 140, 120),
}

#: Padding added on every side, as a fraction of the sign's side: GTSRB crops keep about 10 %
#: margin around the sign, and the classifier was trained on such crops.
DEFAULT_PAD = 0.10

# Share of the sign's side the coloured part covers: the yellow core of a priority-road sign
# sits inside a white frame, about 65 % of the sign's width; red and blue reach the edge.
_CORE = {"red": 1.0, "blue": 1.0, "yellow": 0.65}
# A yellow core counts only inside such a white frame: dry or sunlit grass has the same hue
# and saturation but grass, not white paint, around it. White: S <= 80 and V >= 90.
_WHITE_S_MAX, _WHITE_V_MIN, _MIN_WHITE_SHARE = 80, 90, 0.4
# Paint is vivid: every gate also needs S x V / 255 >= 62. Red-brown soil and dull clutter
# sit at the red gate's edge (soil: S ~134, V ~102, so ~54) while sign paint, even dimmed to
# 55 %, stays above ~90 away from its anti-aliased rim.
_MIN_VIVID = 62

# Bounding-box fill (convex hull area / box area) of the outlines signs have:
# disc pi/4 = 0.785, regular octagon 0.828, triangle and diamond 0.5.
_SHAPE_FILLS = (0.785, 0.828, 0.5)
_KERNEL = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))


@dataclass
class _Planes:
    """Per colour gate (raw mask, closed mask); white paint; saturation and value. H x W."""

    masks: dict[str, tuple[np.ndarray, np.ndarray]]
    white: np.ndarray
    sat: np.ndarray
    val: np.ndarray


def _colour_masks(frame_bgr: np.ndarray) -> _Planes:
    """Masks are 0/255 uint8; sat and val are OpenCV HSV's S and V planes."""
    hue, sat, val = cv2.split(cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2HSV))
    masks: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    vivid = cv2.threshold(cv2.multiply(sat, val, scale=1.0 / 255.0), _MIN_VIVID - 1, 255,
                          cv2.THRESH_BINARY)[1]
    # Single-plane inRange / threshold / and are several times faster than a 3-channel
    # inRange per gate; together they keep the whole locator near one millisecond.
    for colour, (hues, s_min, v_min) in _GATES.items():
        mask = cv2.inRange(hue, hues[0][0], hues[0][1])
        for lo, hi in hues[1:]:
            mask = cv2.bitwise_or(mask, cv2.inRange(hue, lo, hi))
        mask = cv2.bitwise_and(mask, cv2.threshold(sat, s_min - 1, 255, cv2.THRESH_BINARY)[1])
        mask = cv2.bitwise_and(mask, cv2.threshold(val, v_min - 1, 255, cv2.THRESH_BINARY)[1])
        mask = cv2.bitwise_and(mask, vivid)
        # Closing joins a thin ring broken by anti-aliasing, glare or a small sticker.
        masks[colour] = (mask, cv2.morphologyEx(mask, cv2.MORPH_CLOSE, _KERNEL))
    white = cv2.bitwise_and(cv2.threshold(sat, _WHITE_S_MAX, 255, cv2.THRESH_BINARY_INV)[1],
                            cv2.threshold(val, _WHITE_V_MIN - 1, 255, cv2.THRESH_BINARY)[1])
    return _Planes(masks, white, sat, val)


def _white_frame_share(white: np.ndarray, x: int, y: int, w: int, h: int) -> float:
    """Share of white paint just outside a yellow core, beyond its four vertices.

    A priority-road sign's yellow diamond has its white frame right past each vertex (from
    1x to ~1.5x the core's half-size along the axes); four short strips there are sampled,
    so a sticker over one of them still leaves the rest.
    """
    height, width = white.shape
    cx, cy, ax, ay = x + w / 2.0, y + h / 2.0, w / 2.0, h / 2.0
    hits = total = 0
    for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        # strip from 1.1 to 1.35 half-sizes out, 0.2 half-sizes across
        lo, hi = (1.1, 1.35) if dx + dy > 0 else (-1.35, -1.1)
        xs = (cx + lo * ax, cx + hi * ax) if dx else (cx - 0.1 * ax, cx + 0.1 * ax)
        ys = (cy + lo * ay, cy + hi * ay) if dy else (cy - 0.1 * ay, cy + 0.1 * ay)
        x0, x1 = max(0, int(xs[0])), min(width, max(int(xs[0]) + 1, int(round(xs[1]))))
        y0, y1 = max(0, int(ys[0])), min(height, max(int(ys[0]) + 1, int(round(ys[1]))))
        if x1 > x0 and y1 > y0:
            hits += cv2.countNonZero(white[y0:y1, x0:x1])
            total += (x1 - x0) * (y1 - y0)
    return hits / total if total else 0.0


def _shape_score(contour: np.ndarray, raw: np.ndarray, closed: np.ndarray, w: int, h: int,
                 x: int, y: int) -> float:
    """0 when the outline cannot be a sign, else a score in (0, 1]."""
    aspect = min(w, h) / max(w, h)
    if aspect < 0.55:
        return 0.0
    hull = cv2.convexHull(contour)
    hull_area = float(cv2.contourArea(hull))
    if hull_area <= 0.0:
        return 0.0
    hull_fill = hull_area / float(w * h)
    if not 0.38 <= hull_fill <= 0.9:
        return 0.0
    # Ring signs are mostly white inside; still, some paint must be there.
    closed_px = cv2.countNonZero(closed[y:y + h, x:x + w])
    density = closed_px / hull_area
    if density < 0.18:
        return 0.0
    # Paint is solid colour; a blob the closing stitched together from scattered pixels
    # (noise on brown bark, dark foliage) is not.
    purity = cv2.countNonZero(raw[y:y + h, x:x + w]) / max(closed_px, 1)
    if purity < 0.8:
        return 0.0
    # Solidity of the outer outline: 1 for an intact disc, ring or triangle, lower for a
    # ring cut by a sticker or for ragged clutter.
    solidity = float(cv2.contourArea(contour)) / hull_area
    if solidity < 0.25:
        return 0.0
    shape = max(math.exp(-(((hull_fill - f) / 0.09) ** 2)) for f in _SHAPE_FILLS)
    return aspect * shape * (0.4 + 0.6 * min(solidity, 1.0)) * min(1.0, 0.5 + density)


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes, x1/y1 exclusive."""
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _pad_box(x: int, y: int, w: int, h: int, scale: float, width: int, height: int) -> Box:
    # Grow about the centre on both axes; a sign seen at an angle keeps its aspect, and the
    # classifier's resize to a square then undoes part of the perspective, as in GTSRB.
    cx, cy = x + w / 2.0, y + h / 2.0
    half_w, half_h = w * scale / 2.0, h * scale / 2.0
    x0 = max(0, int(round(cx - half_w)))
    y0 = max(0, int(round(cy - half_h)))
    x1 = min(width, int(round(cx + half_w)))
    y1 = min(height, int(round(cy + half_h)))
    return (x0, y0, x1, y1)


def locate_signs(frame_bgr: np.ndarray, min_side: int = 16, max_candidates: int = 3,
                 max_side: int | None = None, pad: float = DEFAULT_PAD) -> list[Candidate]:
    """Find regions that look like road signs in one camera frame.

    frame_bgr: H x W x 3 uint8, BGR.
    min_side / max_side: accepted size of the sign's longer side before padding, in pixels;
        max_side defaults to half the frame's shorter side.
    pad: margin added on every side, as a fraction of the sign's side.
    Returns at most ``max_candidates`` candidates, best score first; boxes keep the sign's
    aspect, grow by ``pad`` of its size on every side, and are clamped to the frame.
    """
    if frame_bgr.ndim != 3 or frame_bgr.shape[2] != 3 or frame_bgr.dtype != np.uint8:
        raise ConfigError(f"locate_signs needs an H x W x 3 uint8 BGR frame, got "
                          f"shape {frame_bgr.shape} dtype {frame_bgr.dtype}",
                          "convert the frame with cv2.cvtColor / astype(np.uint8) first")
    height, width = frame_bgr.shape[:2]
    top = max_side if max_side is not None else min(height, width) // 2
    found: list[Candidate] = []
    planes = _colour_masks(frame_bgr)
    for colour, (raw, closed) in planes.masks.items():
        contours, _ = cv2.findContours(closed, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        for contour in contours:
            x, y, w, h = cv2.boundingRect(contour)
            sign_side = max(w, h) / _CORE[colour]
            if sign_side < min_side or sign_side > top:
                continue
            score = _shape_score(contour, raw, closed, w, h, x, y)
            if score > 0.0 and _CORE[colour] < 1.0 and (
                    _white_frame_share(planes.white, x, y, w, h) < _MIN_WHITE_SHARE):
                score = 0.0
            if score > 0.0:
                scale = (1.0 + 2.0 * pad) / _CORE[colour]
                box = _pad_box(x, y, w, h, scale, width, height)
                found.append(Candidate(box, float(score), colour))
    found.sort(key=lambda c: c.score, reverse=True)
    kept: list[Candidate] = []
    for cand in found:  # the same sign can show in two masks (e.g. orange-ish red)
        if all(box_iou(cand.box, k.box) < 0.5 for k in kept):
            kept.append(cand)
        if len(kept) >= max_candidates:
            break
    return kept


class SignLocator:
    """``locate_signs`` with its settings bound; call it on a BGR frame."""

    name = "hsv"

    def __init__(self, min_side: int = 16, max_candidates: int = 3,
                 max_side: int | None = None, pad: float = DEFAULT_PAD) -> None:
        if min_side < 4:
            raise ConfigError(f"min_side={min_side} px is too small to judge a shape",
                              "use min_side >= 4")
        if max_candidates < 1:
            raise ConfigError(f"max_candidates={max_candidates} must be >= 1",
                              "ask for at least one candidate")
        if not 0.0 <= pad <= 0.5:
            raise ConfigError(f"pad={pad} is outside [0, 0.5]",
                              "use a margin fraction such as 0.1 (GTSRB's crops)")
        self.min_side = min_side
        self.max_candidates = max_candidates
        self.max_side = max_side
        self.pad = pad

    def __call__(self, frame_bgr: np.ndarray) -> list[Candidate]:
        return locate_signs(frame_bgr, self.min_side, self.max_candidates, self.max_side,
                            self.pad)


class FullFrameLocator:
    """Treats the centred square of the frame as the sign: for a camera aimed at one sign."""

    name = "full"

    def __init__(self, fraction: float = 1.0) -> None:
        if not 0.1 <= fraction <= 1.0:
            raise ConfigError(f"fraction={fraction} is outside [0.1, 1]",
                              "use the share of the shorter side the sign fills")
        self.fraction = fraction

    def __call__(self, frame_bgr: np.ndarray) -> list[Candidate]:
        height, width = frame_bgr.shape[:2]
        side = int(min(height, width) * self.fraction)
        x0, y0 = (width - side) // 2, (height - side) // 2
        return [Candidate((x0, y0, x0 + side, y0 + side), 1.0, "frame")]


Locator = Callable[[np.ndarray], list[Candidate]]
_LOCATORS: dict[str, Callable[..., Locator]] = {"hsv": SignLocator, "full": FullFrameLocator}


def list_locators() -> list[str]:
    return sorted(_LOCATORS)


def create_locator(name: str, **kwargs: object) -> Locator:
    """Build a locator by name (``list_locators()``), passing ``kwargs`` to it."""
    try:
        factory = _LOCATORS[name]
    except KeyError:
        raise ConfigError(f"unknown sign locator '{name}'",
                          f"use one of: {', '.join(list_locators())}") from None
    return factory(**kwargs)
