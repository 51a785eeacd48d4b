"""Clean canonical pictograms of the 14 synthetic sign classes.

Each sign is drawn once at ``ART_SIZE`` x ``ART_SIZE`` as RGBA uint8 (RGB order, alpha
255 on the sign, 0 around it) and cached. The renderers warp these pictograms into
crops and scenes; nothing random happens here, so the art is identical everywhere.

Shapes follow the Vienna-convention signs GTSRB photographs: red-ring discs with
numerals for speed limits, a yellow diamond for priority road, triangles for
warnings and yield, a red octagon for stop, blue discs for mandatory directions.
Turn-left and turn-right are mirror images, so renderers must never flip crops.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np

from cloud_train.signs import SYNTHETIC_CLASSES
from roadshield_base.errors import ConfigError

#: Side of the cached pictograms in pixels.
ART_SIZE = 128
_SS = 2  # drawn at twice the size, then area-downsampled, for clean anti-aliased edges
_N = ART_SIZE * _SS

# RGB colours of sign paint.
RED = (200, 24, 32)
BLUE = (18, 72, 172)
YELLOW = (250, 196, 0)
WHITE = (246, 246, 242)
BLACK = (22, 22, 22)
Canvas = tuple[np.ndarray, np.ndarray]  # (rgb N x N x 3 uint8, alpha N x N uint8)


def _canvas() -> Canvas:
    return np.zeros((_N, _N, 3), np.uint8), np.zeros((_N, _N), np.uint8)


def _p(v: float) -> int:
    """A coordinate in units of the final art size, in drawing-canvas pixels."""
    return int(round(v * _SS))


def _poly(rgb: np.ndarray, pts: np.ndarray, colour: tuple[int, int, int]) -> None:
    cv2.fillPoly(rgb, [np.round(pts * _SS).astype(np.int32)], colour, cv2.LINE_AA)


def _disc(c: Canvas, ring: tuple[int, int, int] | None, face: tuple[int, int, int]) -> None:
    """A round sign: outer ring colour (or none) around a face colour."""
    rgb, alpha = c
    centre, r = (_p(64), _p(64)), _p(62)
    cv2.circle(alpha, centre, r, 255, -1, cv2.LINE_AA)
    if ring is None:
        cv2.circle(rgb, centre, r, face, -1, cv2.LINE_AA)
        cv2.circle(rgb, centre, r, WHITE, _p(2.5), cv2.LINE_AA)  # thin rim most signs have
        return
    cv2.circle(rgb, centre, r, ring, -1, cv2.LINE_AA)
    cv2.circle(rgb, centre, _p(49), face, -1, cv2.LINE_AA)


def _triangle(c: Canvas, point_up: bool) -> None:
    """A warning (point up) or yield (point down) triangle: red border, white face."""
    rgb, alpha = c
    h = 110.0
    if point_up:
        outer = np.array([[64, 64 - h / 2 - 6], [4, 64 + h / 2 - 6], [124, 64 + h / 2 - 6]])
    else:
        outer = np.array([[4, 64 - h / 2 + 6], [124, 64 - h / 2 + 6], [64, 64 + h / 2 + 6]])
    centroid = outer.mean(axis=0)
    inner = centroid + (outer - centroid) * 0.62
    cv2.fillPoly(alpha, [np.round(outer * _SS).astype(np.int32)], 255, cv2.LINE_AA)
    _poly(rgb, outer, RED)
    _poly(rgb, inner, WHITE)


def _text(rgb: np.ndarray, text: str, colour: tuple[int, int, int], width: float,
          cy: float = 64.0, thickness: float = 7.0) -> None:
    """Centre ``text`` at (64, cy), scaled so it spans ``width`` art pixels."""
    font = cv2.FONT_HERSHEY_DUPLEX
    th = _p(thickness)
    (tw, _), _ = cv2.getTextSize(text, font, 1.0, th)
    scale = _p(width) / tw
    (tw, tht), _ = cv2.getTextSize(text, font, scale, th)
    org = (int(_p(64) - tw / 2), int(_p(cy) + tht / 2))
    cv2.putText(rgb, text, org, font, scale, colour, th, cv2.LINE_AA)


def _speed(value: str) -> Canvas:
    c = _canvas()
    _disc(c, RED, WHITE)
    _text(c[0], value, BLACK, 66 if len(value) == 2 else 76, thickness=8 if len(value) == 2 else 6)
    return c


def _priority_road() -> Canvas:
    c = _canvas()
    rgb, alpha = c
    d = np.array([[64, 2], [126, 64], [64, 126], [2, 64]], float)
    cv2.fillPoly(alpha, [np.round(d * _SS).astype(np.int32)], 255, cv2.LINE_AA)
    centre = np.array([64.0, 64.0])
    _poly(rgb, d, (60, 60, 60))  # thin dark edge
    _poly(rgb, centre + (d - centre) * 0.95, WHITE)
    _poly(rgb, centre + (d - centre) * 0.62, YELLOW)
    return c


def _stop() -> Canvas:
    c = _canvas()
    rgb, alpha = c
    ang = np.deg2rad(22.5 + 45 * np.arange(8))
    octo = np.stack([64 + 62 * np.cos(ang), 64 + 62 * np.sin(ang)], axis=1)
    cv2.fillPoly(alpha, [np.round(octo * _SS).astype(np.int32)], 255, cv2.LINE_AA)
    _poly(rgb, octo, WHITE)
    _poly(rgb, 64 + (octo - 64) * 0.92, RED)
    _text(rgb, "STOP", WHITE, 92, thickness=7)
    return c


def _no_entry() -> Canvas:
    c = _canvas()
    _disc(c, None, RED)
    cv2.rectangle(c[0], (_p(22), _p(54)), (_p(106), _p(74)), WHITE, -1, cv2.LINE_AA)
    return c


def _caution() -> Canvas:
    c = _canvas()
    _triangle(c, point_up=True)
    rgb = c[0]
    _poly(rgb, np.array([[59, 44], [69, 44], [66.5, 79], [61.5, 79]]), BLACK)
    cv2.circle(rgb, (_p(64), _p(88)), _p(5.5), BLACK, -1, cv2.LINE_AA)
    return c


def _pedestrians() -> Canvas:
    c = _canvas()
    _triangle(c, point_up=True)
    rgb = c[0]
    t = _p(5.5)
    cv2.circle(rgb, (_p(66), _p(46)), _p(5.5), BLACK, -1, cv2.LINE_AA)  # head
    for a, b in (((65, 53), (61, 74)),            # body
                 ((64, 57), (54, 67)), ((64, 57), (73, 66)),   # arms
                 ((61, 74), (53, 92)), ((61, 74), (71, 91))):  # legs
        cv2.line(rgb, (_p(a[0]), _p(a[1])), (_p(b[0]), _p(b[1])), BLACK, t, cv2.LINE_AA)
    return c


def _arrowhead(rgb: np.ndarray, tip: tuple[float, float], direction: float, size: float) -> None:
    """A filled white arrowhead at ``tip`` pointing along ``direction`` (radians, image axes)."""
    d = np.array([np.cos(direction), np.sin(direction)])
    n = np.array([-d[1], d[0]])
    tip_a = np.array(tip, float)
    base = tip_a - d * size
    _poly(rgb, np.array([tip_a, base + n * size * 0.75, base - n * size * 0.75]), WHITE)


def _turn(mirror: bool) -> Canvas:
    """Turn right ahead: a stem rising from the bottom, bending right into an arrowhead.

    Turn left ahead is the exact mirror image.
    """
    c = _canvas()
    _disc(c, None, BLUE)
    rgb = c[0]
    t = _p(13)
    cv2.line(rgb, (_p(48), _p(106)), (_p(48), _p(64)), WHITE, t, cv2.LINE_AA)
    cv2.ellipse(rgb, (_p(66), _p(64)), (_p(18), _p(18)), 0, 180, 270, WHITE, t, cv2.LINE_AA)
    cv2.line(rgb, (_p(66), _p(46)), (_p(78), _p(46)), WHITE, t, cv2.LINE_AA)
    _arrowhead(rgb, (102, 46), 0.0, 26)
    if mirror:
        return np.ascontiguousarray(c[0][:, ::-1]), np.ascontiguousarray(c[1][:, ::-1])
    return c


def _ahead_only() -> Canvas:
    c = _canvas()
    _disc(c, None, BLUE)
    rgb = c[0]
    cv2.line(rgb, (_p(64), _p(108)), (_p(64), _p(50)), WHITE, _p(14), cv2.LINE_AA)
    _arrowhead(rgb, (64, 18), -np.pi / 2, 34)
    return c


def _roundabout() -> Canvas:
    c = _canvas()
    _disc(c, None, BLUE)
    rgb = c[0]
    r = 32.0
    for k in range(3):
        end = -90 + 120 * k  # degrees, image axes (y down); arrows run anticlockwise on screen
        cv2.ellipse(rgb, (_p(64), _p(64)), (_p(r), _p(r)), 0, end, end + 78,
                    WHITE, _p(11), cv2.LINE_AA)
        e = np.deg2rad(end)
        direction = e - np.pi / 2  # anticlockwise tangent in image axes
        base = np.array([64 + r * np.cos(e), 64 + r * np.sin(e)])
        tip = base + 22 * np.array([np.cos(direction), np.sin(direction)])
        _arrowhead(rgb, (tip[0], tip[1]), direction, 22)
    return c


def _yield() -> Canvas:
    c = _canvas()
    _triangle(c, point_up=False)
    return c


_DRAW = {
    "speed_limit_30": lambda: _speed("30"),
    "speed_limit_50": lambda: _speed("50"),
    "speed_limit_70": lambda: _speed("70"),
    "speed_limit_100": lambda: _speed("100"),
    "priority_road": _priority_road,
    "yield": _yield,
    "stop": _stop,
    "no_entry": _no_entry,
    "general_caution": _caution,
    "pedestrians": _pedestrians,
    "turn_right_ahead": lambda: _turn(mirror=False),
    "turn_left_ahead": lambda: _turn(mirror=True),
    "ahead_only": _ahead_only,
    "roundabout": _roundabout,
}


def check_class_index(class_index: int) -> str:
    """Name of synthetic class ``class_index``; ConfigError when it is out of range."""
    if not isinstance(class_index, (int, np.integer)) or not 0 <= class_index < len(
            SYNTHETIC_CLASSES):
        raise ConfigError(f"sign class index {class_index!r} is not a synthetic class",
                          f"use 0..{len(SYNTHETIC_CLASSES) - 1} "
                          "(an index into cloud_train.signs.SYNTHETIC_CLASSES)")
    return SYNTHETIC_CLASSES[int(class_index)]


@functools.cache
def sign_rgba(class_index: int) -> np.ndarray:
    """Canonical pictogram of synthetic class ``class_index``.

    Returns ART_SIZE x ART_SIZE x 4 uint8, RGBA (RGB order; alpha 255 on the sign).
    The array is cached and read-only; copy it before drawing on it.
    """
    name = check_class_index(class_index)
    rgb, alpha = _DRAW[name]()
    out = np.dstack([rgb, alpha])
    out = cv2.resize(out, (ART_SIZE, ART_SIZE), interpolation=cv2.INTER_AREA)
    # Paint was drawn over black, so anti-aliased rims average paint with black; dividing by
    # alpha lifts them back to full colour (the alpha channel carries the coverage).
    a = out[..., 3:].astype(np.float32) / 255.0
    rgb_f = out[..., :3].astype(np.float32)
    rgb_f = np.where(a > 0.02, rgb_f / np.maximum(a, 1e-3), 0.0)
    out[..., :3] = np.clip(rgb_f, 0, 255).astype(np.uint8)
    out.setflags(write=False)
    return out


@functools.cache
def sign_pyramid(class_index: int) -> tuple[np.ndarray, ...]:
    """``sign_rgba`` at ART_SIZE, ART_SIZE/2, ART_SIZE/4 (area-downsampled, read-only).

    Warping from the level closest to the target size avoids aliasing of small details.
    """
    levels = [sign_rgba(class_index)]
    for _ in range(2):
        prev = levels[-1]
        nxt = cv2.resize(prev, (prev.shape[1] // 2, prev.shape[0] // 2),
                         interpolation=cv2.INTER_AREA)
        nxt.setflags(write=False)
        levels.append(nxt)
    return tuple(levels)


def sign_sheet(cell: int = 64) -> np.ndarray:
    """All pictograms side by side on grey (H x W x 3 uint8 RGB), for a quick look."""
    cells = []
    for i in range(len(SYNTHETIC_CLASSES)):
        art = cv2.resize(sign_rgba(i), (cell, cell), interpolation=cv2.INTER_AREA)
        a = art[..., 3:].astype(np.float32) / 255.0
        cells.append((art[..., :3] * a + 128 * (1 - a)).astype(np.uint8))
    return np.concatenate(cells, axis=1)
