"""Camera frames of a road with a sign on a pole, stickers for the signs, and video files.

A scene is sky, a far tree line or buildings, grass verges and a road in perspective with
lane marks, sometimes a tree, a post or (rarely) a red, blue or yellow object that is not a
sign. The sign stands on a pole beside the road; its tight box comes from the warped
pictogram's alpha (pixels at least half covered), so it is exact to a pixel.

Frames are returned as H x W x 3 uint8 **BGR**. Stickers are RGBA uint8 (RGB order).
"""

from __future__ import annotations

import functools
import math
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from cloud_train.render import fractal_noise, lighting_lut, palette, sign_corners, texture_bank
from cloud_train.sign_art import ART_SIZE, check_class_index, sign_pyramid, sign_rgba
from cloud_train.sticker.placement import PlacedSticker, sticker_art
from edge_runtime.frames import SignTruth
from roadshield_base.errors import ConfigError, DatasetError

STICKER_KINDS = ("patches", "checkerboard", "bar", "noise")
_NOISE_PAD = 32


@dataclass(frozen=True)
class SceneLayout:
    """Where things are in a scene; sign placement is in units of the sign's side.

    A sign of side s px has its centre at (vanish_x + side * lateral * s, horizon - rise * s)
    and its pole foot at horizon + ground * s, which is how a sign beside a straight road
    moves as the camera drives towards it (all offsets scale with 1 / distance).
    """

    width: int
    height: int
    horizon: float
    vanish_x: float
    side: int  # +1: right verge, -1: left verge
    lateral: float
    rise: float
    ground: float


@dataclass
class SceneRender:
    """A rendered frame: image H x W x 3 uint8 BGR, truth, and mask (H x W bool, True where
    the sign plate covers any part of a pixel; all False without a sign)."""

    image: np.ndarray
    truth: SignTruth | None
    mask: np.ndarray


def _sky(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """h x w x 3 float32 RGB: pale blue (low saturation, as the sign locator expects) or grey."""
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    if rng.random() < 0.3:  # overcast
        top = np.full(3, rng.uniform(150, 215), np.float32)
        low = top + rng.uniform(5, 30)
    else:
        hue = np.array([0.0, rng.uniform(0.35, 0.6), 1.0], np.float32)
        s, v = rng.uniform(0.15, 0.42), rng.uniform(185, 245)
        top = v * ((1 - s) + s * hue)
        low = np.minimum(v * ((1 - s * 0.4) + s * 0.4 * hue) + 15, 250)
    img = top * (1 - y) + low * y + np.zeros((1, w, 1), np.float32)
    cloud = cv2.resize(fractal_noise(rng, 48, (3, 6, 12)), (w, h), interpolation=cv2.INTER_LINEAR)
    cloud = np.clip((cloud - rng.uniform(0.5, 0.7)) * 3.0, 0, 1)[..., None]
    return img * (1 - cloud) + rng.uniform(215, 245) * cloud


def _tex(rng: np.random.Generator, kind: int, w: int, h: int) -> np.ndarray:
    """A bank texture (0 foliage, 1 sky, 2 urban, 3 asphalt, 4 field), resized, float32."""
    bank = texture_bank()
    tex = bank[kind + 5 * int(rng.integers(0, len(bank) // 5))]
    return cv2.resize(tex, (w, h), interpolation=cv2.INTER_LINEAR).astype(np.float32)


def _grass(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Grass verge, h x w x 3 float32 RGB: blotchy greens with fine grain."""
    greens = np.array([[30, 50, 18], [62, 96, 36], [104, 132, 58], [150, 160, 92]], np.float32)
    small = palette(fractal_noise(rng, 64, (3, 8, 20, 48)), greens * rng.uniform(0.8, 1.2))
    grain = (rng.random((h, w, 1), dtype=np.float32) - 0.5) * 24
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR) + grain


def _clutter(img: np.ndarray, rng: np.random.Generator, hz: int, vx: float) -> None:
    """Trees, posts and, rarely, a saturated non-sign object (in place, half-res RGB)."""
    h, w = img.shape[:2]
    for _ in range(rng.integers(0, 4)):
        x = int(rng.integers(0, w))
        if abs(x - vx) < w * 0.15:
            continue
        base = int(hz + rng.uniform(0.05, 0.5) * (h - hz))
        size = max(3, int((base - hz) * rng.uniform(0.4, 1.0)))
        if rng.random() < 0.6:  # tree: trunk and crown
            cv2.rectangle(img, (x - size // 10, base - size), (x + size // 10, base),
                          (70, 55, 40), -1)
            crown = tuple(float(v) for v in rng.uniform([25, 55, 20], [70, 110, 55]))
            cv2.ellipse(img, (x, base - size), (size // 2, int(size * 0.7)), 0, 0, 360, crown,
                        -1, cv2.LINE_AA)
        else:  # grey post or lamp pole
            cv2.rectangle(img, (x, base - 2 * size), (x + max(1, size // 12), base),
                          (120, 120, 118), -1)
    if rng.random() < 0.12:  # a car, billboard or bin in a sign colour: not every red is a sign
        col = [(170, 30, 30), (30, 60, 160), (220, 180, 20)][int(rng.integers(0, 3))]
        x = int(rng.uniform(0.05, 0.8) * w)
        y = int(hz + rng.uniform(0.0, 0.3) * (h - hz))
        bw, bh = int(rng.uniform(0.05, 0.15) * w), int(rng.uniform(0.03, 0.08) * h)
        cv2.rectangle(img, (x, y - bh), (x + bw, y), col, -1)


def scene_background(rng: np.random.Generator, width: int = 640,
                     height: int = 480) -> tuple[np.ndarray, SceneLayout]:
    """An empty road scene (height x width x 3 uint8 RGB) and where a sign may go.

    Drawn at half resolution and upsampled, which softens it like a camera lens would.
    """
    if width < 64 or height < 48:
        raise ConfigError(f"scene size {width}x{height} is too small", "use at least 64x48")
    w, h = (width + 1) // 2, (height + 1) // 2
    hz = int(h * rng.uniform(0.38, 0.5))
    vx = w * rng.uniform(0.4, 0.6)
    layout = SceneLayout(width, height, hz * height / h, vx * width / w,
                         1 if rng.random() < 0.8 else -1, rng.uniform(0.9, 1.7),
                         rng.uniform(0.35, 1.0), rng.uniform(1.6, 2.6))
    img = np.empty((h, w, 3), np.float32)
    img[:hz] = _sky(rng, w, hz)
    ground = _grass(rng, w, h - hz)
    if rng.random() < 0.3:  # dry grass or bare soil instead of green
        ground = ground.mean(axis=2, keepdims=True) * np.array([1.35, 1.1, 0.75], np.float32)
    img[hz:] = ground * rng.uniform(0.75, 1.1, 3).astype(np.float32)
    band = max(2, int(h * rng.uniform(0.03, 0.1)))  # far tree line or buildings
    far = _tex(rng, 0 if rng.random() < 0.6 else 2, w, band) * 0.8
    edge = hz - band + (cv2.resize(rng.random((1, max(2, w // 12)), dtype=np.float32), (w, 1),
                                   interpolation=cv2.INTER_LINEAR)[0] * band * 0.6).astype(int)
    rows = np.arange(hz - band, hz)[:, None]
    img[hz - band:hz] = np.where((rows >= edge[None, :])[..., None], far, img[hz - band:hz])
    # Road: a trapezoid from the vanishing point to the bottom edge, with lane marks. Its
    # edge passes inside the sign pole's foot (the pole stands on the verge): at the foot's
    # row, lateral * s from the vanishing point, the road reaches at most 85% of that.
    half = layout.lateral * (h - hz) / layout.ground * rng.uniform(0.55, 0.85)
    road = np.array([[vx - 1, hz], [vx + 1, hz], [vx + half, h], [vx - half, h]], np.float32)
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [road.astype(np.int32)], 255, cv2.LINE_AA)
    asphalt = _tex(rng, 3, w, h) * rng.uniform(0.7, 1.1)
    a = mask[..., None].astype(np.float32) / 255.0
    img += (asphalt - img) * a
    paint = (225.0, 225.0, 215.0)
    for sgn in (-1, 1):  # edge lines
        p0, p1 = (vx + sgn * 1, hz), (vx + sgn * half * 0.93, h)
        cv2.line(img, (int(p0[0]), int(p0[1])), (int(p1[0]), int(p1[1])), paint,
                 max(1, w // 160), cv2.LINE_AA)
    phase = rng.uniform(0, 1)
    for k in range(12):  # dashed centre line, dashes longer nearer the camera
        u0, u1 = ((k + phase) / 12) ** 2, ((k + phase + 0.5) / 12) ** 2
        y0, y1 = hz + u0 * (h - hz), hz + u1 * (h - hz)
        t0, t1 = max(0.5, u0 * w * 0.012), max(0.5, u1 * w * 0.012)
        quad = np.array([[vx - t0, y0], [vx + t0, y0], [vx + t1, y1], [vx - t1, y1]])
        cv2.fillPoly(img, [np.round(quad).astype(np.int32)], paint, cv2.LINE_AA)
    _clutter(img, rng, hz, vx)
    full = cv2.resize(np.clip(img, 0, 255).astype(np.uint8), (width, height),
                      interpolation=cv2.INTER_LINEAR)
    return full, layout


def sign_centre(layout: SceneLayout, sign_px: float) -> tuple[float, float]:
    """Centre of a sign of side ``sign_px`` in the frame, kept fully inside it."""
    s = float(sign_px)
    cx = layout.vanish_x + layout.side * layout.lateral * s
    cy = layout.horizon - layout.rise * s
    m = 0.6 * s + 2  # half the posed sign plus a margin
    cx = min(max(cx, m), layout.width - m)
    cy = min(max(cy, m), layout.height - m)
    return cx, cy


@functools.cache
def _inner_plate(class_index: int) -> tuple[np.ndarray, np.ndarray]:
    """The plate shrunk by 8% of the art's side (ART_SIZE^2 uint8 0/255, read-only) and the
    (x, y) coordinates of its pixels: where a sticker may sit without reaching the rim."""
    plate = sign_rgba(class_index)[..., 3]
    k = int(ART_SIZE * 0.08) * 2 + 1
    inner = cv2.erode(plate, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    ys, xs = np.nonzero(inner > 127)
    inner.setflags(write=False)
    return inner, np.stack([xs, ys], axis=1)


def _sticker_art(class_index: int, sticker: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """The pictogram pyramid with ``sticker`` (RGBA) stuck on its face at a random place.

    The sticker's area is 10-25% of the plate's, centred on a random point of the plate
    shrunk by 8% of its side, and clipped to that shrunk plate: it never reaches the rim,
    so it never changes pixels outside the sign.
    """
    art = sign_rgba(class_index).copy()
    inner, coords = _inner_plate(class_index)
    area = float(np.count_nonzero(art[..., 3] > 127))
    sh, sw = sticker.shape[:2]
    scale = math.sqrt(rng.uniform(0.10, 0.25) * area / (sh * sw))
    tw, th = min(ART_SIZE, max(2, round(sw * scale))), min(ART_SIZE, max(2, round(sh * scale)))
    st = cv2.resize(sticker, (tw, th), interpolation=cv2.INTER_AREA).astype(np.float32)
    cx, cy = coords[int(rng.integers(0, len(coords)))]
    x = int(min(max(cx - tw // 2, 0), ART_SIZE - tw))
    y = int(min(max(cy - th // 2, 0), ART_SIZE - th))
    a = st[..., 3:] / 255.0 * (inner[y:y + th, x:x + tw, None] / 255.0)
    region = art[y:y + th, x:x + tw, :3].astype(np.float32)
    art[y:y + th, x:x + tw, :3] = np.clip(region + (st[..., :3] - region) * a, 0, 255)
    levels = [art]
    for _ in range(2):
        prev = levels[-1]
        levels.append(cv2.resize(prev, (prev.shape[1] // 2, prev.shape[0] // 2),
                                 interpolation=cv2.INTER_AREA))
    return tuple(levels)


def place_sign(frame_rgb: np.ndarray, layout: SceneLayout, class_index: int, sign_px: float,
               pose_seed: int, sticker: np.ndarray | None = None,
               sticker_rng: np.random.Generator | None = None, *,
               placed: PlacedSticker | None = None,
               ) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """Draw pole and sign into ``frame_rgb`` (H x W x 3 uint8 RGB, in place).

    The pose (yaw, pitch, roll) comes from ``pose_seed`` alone, so the same seed at growing
    ``sign_px`` shows one sign approaching. Returns (box, mask): the tight box (x0, y0, x1,
    y1), x1/y1 exclusive, of pixels the plate covers at least half, and an H x W bool mask
    of every pixel the plate touches.

    sticker (RGBA uint8) is stuck at a random place drawn from ``sticker_rng``; placed is a
    sticker at an exact place on its own sign class (``cloud_train.sticker.placement``),
    drawn only when ``class_index`` is that class, and then instead of ``sticker``.
    """
    h, w = frame_rgb.shape[:2]
    s = float(sign_px)
    cx, cy = sign_centre(layout, s)
    foot = min(h + 10.0, layout.horizon + layout.ground * s)
    pw = max(1, round(s * 0.07))
    cv2.rectangle(frame_rgb, (round(cx - pw / 2), round(cy)), (round(cx + pw / 2), round(foot)),
                  (105, 105, 100), -1)
    corners = sign_corners(np.random.default_rng(pose_seed), (0.0, 0.0), s, max_yaw_deg=25.0)
    x0 = max(0, int(math.floor(cx + corners[:, 0].min())) - 2)
    y0 = max(0, int(math.floor(cy + corners[:, 1].min())) - 2)
    x1 = min(w, int(math.ceil(cx + corners[:, 0].max())) + 3)
    y1 = min(h, int(math.ceil(cy + corners[:, 1].max())) + 3)
    local = corners + np.array([cx - x0, cy - y0], np.float32)
    if placed is not None and placed.class_index == int(class_index):
        levels = sticker_art(class_index, placed)
    elif sticker is None:
        levels = sign_pyramid(class_index)
    else:
        levels = _sticker_art(class_index, sticker, sticker_rng or np.random.default_rng(0))
    span = float(np.max(np.ptp(local, axis=0)))
    art = next((lv for lv in reversed(levels) if lv.shape[0] >= span), levels[0])
    n = art.shape[0]
    src = np.array([[0, 0], [n, 0], [n, n], [0, n]], np.float32) - 0.5
    m = cv2.getPerspectiveTransform(src, local - 0.5)
    rgba = cv2.warpPerspective(art, m, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0, 0))
    a = rgba[..., 3:].astype(np.float32) / 255.0
    roi = frame_rgb[y0:y1, x0:x1].astype(np.float32)
    frame_rgb[y0:y1, x0:x1] = np.clip(roi + (rgba[..., :3] - roi) * a, 0, 255).astype(np.uint8)
    mask = np.zeros((h, w), bool)
    mask[y0:y1, x0:x1] = rgba[..., 3] > 0
    bx, by, bw, bh = cv2.boundingRect((rgba[..., 3] > 127).astype(np.uint8))
    return (x0 + bx, y0 + by, x0 + bx + bw, y0 + by + bh), mask


@functools.cache
def _noise_field(width: int, height: int) -> np.ndarray:
    """A fixed field of N(0, 1) noise, int16 in units of 1/16, a little larger than a frame."""
    rng = np.random.default_rng(7)
    field = rng.standard_normal((height + _NOISE_PAD, width + _NOISE_PAD, 3), dtype=np.float32)
    return np.round(field * 16).astype(np.int16)


def camera_finish(frame_rgb: np.ndarray, lut: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Exposure curve, a little lens blur and sensor noise; returns H x W x 3 uint8 BGR."""
    h, w = frame_rgb.shape[:2]
    img = cv2.LUT(frame_rgb, lut)
    sigma = rng.uniform(0.3, 0.7)
    img = cv2.GaussianBlur(img, (3, 3), sigma)
    dy, dx = (int(v) for v in rng.integers(0, _NOISE_PAD, 2))
    amp = int(rng.integers(1, 5))  # noise std in grey levels
    noise = _noise_field(w, h)[dy:dy + h, dx:dx + w]
    out = img.astype(np.int16) + (noise * amp >> 4)
    return cv2.cvtColor(np.clip(out, 0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR)


def scene_lut(rng: np.random.Generator) -> np.ndarray:
    """A camera exposure curve for scenes (milder than for crops): 1 x 256 x 3 uint8."""
    return lighting_lut(rng, log_gain=(-0.5, 0.25), contrast=(0.8, 1.15))


def render_scene_full(rng: np.random.Generator, class_index: int | None, width: int = 640,
                      height: int = 480, sign_px: int | None = None,
                      sticker: np.ndarray | None = None) -> SceneRender:
    """``render_scene`` that also returns the plate mask (for checks and debugging)."""
    seeds = [int(v) for v in rng.integers(0, 2**63 - 1, size=5)]
    bg_rng, size_rng, sticker_rng, cam_rng = (np.random.default_rng(s) for s in seeds[:4])
    frame, layout = scene_background(bg_rng, width, height)
    if class_index is None:
        mask = np.zeros((height, width), bool)
        return SceneRender(camera_finish(frame, scene_lut(cam_rng), cam_rng), None, mask)
    name = check_class_index(class_index)
    if sign_px is None:
        sign_px = int(size_rng.integers(24, max(25, min(121, height // 3, width // 4))))
    if sign_px < 4 or 1.2 * sign_px + 4 > min(width, height):
        raise ConfigError(f"sign size {sign_px} px does not fit a {width}x{height} frame",
                          "use a sign size between 4 px and about 80% of the frame height")
    st = None if sticker is None else _check_sticker(sticker)
    box, mask = place_sign(frame, layout, int(class_index), sign_px, seeds[4], st, sticker_rng)
    image = camera_finish(frame, scene_lut(cam_rng), cam_rng)
    return SceneRender(image, SignTruth(name, box, stickered=st is not None), mask)


def render_scene(rng: np.random.Generator, class_index: int | None, width: int = 640,
                 height: int = 480, sign_px: int | None = None,
                 sticker: np.ndarray | None = None) -> tuple[np.ndarray, SignTruth | None]:
    """A road-scene camera frame, H x W x 3 uint8 BGR, and the sign's truth (None: no sign).

    class_index: synthetic class to show, or None for an empty road. sign_px: side of the
    sign in pixels (default: random 24..120). sticker: RGBA uint8 (any size) stuck on the
    sign face at a random place, covering 10-25% of the plate. With the same rng state, the
    frames with and without a sticker differ only inside the sign's box.
    """
    r = render_scene_full(rng, class_index, width, height, sign_px, sticker)
    return r.image, r.truth


def _check_sticker(sticker: np.ndarray) -> np.ndarray:
    st = np.asarray(sticker)
    if st.dtype != np.uint8 or st.ndim != 3 or st.shape[2] != 4 or min(st.shape[:2]) < 1:
        raise ConfigError(f"sticker has shape {st.shape} and dtype {st.dtype}",
                          "pass an H x W x 4 uint8 RGBA image (load_sticker reads PNGs)")
    return st


def make_sticker(rng: np.random.Generator, kind: str = "random") -> np.ndarray:
    """A sticker, H x W x 4 uint8 RGBA: "patches" (coloured blocks), "checkerboard",
    "bar" (a black or white strip, as in graffiti-style physical attacks), "noise"
    (adversarial-looking colour noise) or "random" (any of these)."""
    if kind == "random":
        kind = STICKER_KINDS[int(rng.integers(0, len(STICKER_KINDS)))]
    if kind not in STICKER_KINDS:
        raise ConfigError(f"unknown sticker kind {kind!r}",
                          "use one of: random, " + ", ".join(STICKER_KINDS))
    side = 64
    rgb: np.ndarray
    if kind == "patches":
        n = int(rng.integers(2, 5))
        blocks = rng.integers(0, 256, (n, n, 3)).astype(np.uint8)
        rgb = cv2.resize(blocks, (side, side), interpolation=cv2.INTER_NEAREST)
    elif kind == "checkerboard":
        n = int(rng.integers(3, 7))
        board = (np.indices((n, n)).sum(axis=0) % 2 * 255).astype(np.uint8)
        rgb = np.repeat(cv2.resize(board, (side, side), interpolation=cv2.INTER_NEAREST)[..., None],
                        3, axis=2)
    elif kind == "bar":
        long_side, short = side, max(4, int(side / rng.uniform(2.5, 4.0)))
        shape = (short, long_side) if rng.random() < 0.7 else (long_side, short)
        rgb = np.full((*shape, 3), 20 if rng.random() < 0.5 else 240, np.uint8)
    else:
        cells = int(rng.integers(8, 17))
        noise = rng.integers(0, 256, (cells, cells, 3)).astype(np.uint8)
        rgb = cv2.resize(noise, (side, side), interpolation=cv2.INTER_NEAREST)
    alpha = np.full(rgb.shape[:2] + (1,), 255, np.uint8)
    return np.concatenate([rgb, alpha], axis=2)


def load_sticker(path: str | Path) -> np.ndarray:
    """Read an image file (a PNG with alpha, or any image: opaque) as H x W x 4 uint8 RGBA."""
    p = Path(path)
    img = cv2.imread(str(p), cv2.IMREAD_UNCHANGED) if p.is_file() else None
    if img is None:
        raise DatasetError(f"cannot read sticker image {p}",
                           "give a PNG (RGBA) or another image file OpenCV can read")
    if img.dtype == np.uint16:
        img = (img // 257).astype(np.uint8)
    if img.dtype != np.uint8:
        raise DatasetError(f"sticker {p} has pixel type {img.dtype}", "save it as 8-bit PNG")
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if img.shape[2] == 3:
        return np.dstack([img[..., ::-1], np.full(img.shape[:2], 255, np.uint8)])
    return cv2.cvtColor(img, cv2.COLOR_BGRA2RGBA)


_FOURCC = {".mp4": "mp4v", ".avi": "MJPG"}


def write_video(frames: Iterable[np.ndarray], path: str | Path, fps: float = 15) -> int:
    """Write H x W x 3 uint8 BGR frames to an .mp4 (mp4v) or .avi (MJPG); returns the count.

    The file is written under a temporary name in the same folder and renamed when complete.
    """
    path = Path(path)
    fourcc = _FOURCC.get(path.suffix.lower())
    if fourcc is None:
        raise DatasetError(f"cannot write video {path}: unknown extension",
                           "name the file .mp4 (mp4v) or .avi (MJPG)")
    if not fps > 0:
        raise ConfigError(f"video frame rate {fps} is not positive", "use e.g. fps=15")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}{path.suffix}")
    writer: cv2.VideoWriter | None = None
    count, size = 0, (0, 0)
    try:
        for frame in frames:
            f = np.asarray(frame)
            if f.dtype != np.uint8 or f.ndim != 3 or f.shape[2] != 3:
                raise ConfigError(f"frame {count} has shape {f.shape} and dtype {f.dtype}",
                                  "video frames are H x W x 3 uint8 BGR")
            if writer is None:
                size = (f.shape[1], f.shape[0])
                writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter.fourcc(*fourcc), float(fps),
                                         size)
                if not writer.isOpened():
                    raise DatasetError(f"OpenCV cannot open a {fourcc} video writer for {path}",
                                       "check the folder is writable and this OpenCV build has "
                                       "video encoders (try .avi with MJPG)")
            if (f.shape[1], f.shape[0]) != size:
                raise ConfigError(f"frame {count} is {f.shape[1]}x{f.shape[0]}, the video is "
                                  f"{size[0]}x{size[1]}", "give frames of one size")
            writer.write(np.ascontiguousarray(f))
            count += 1
        if writer is None:
            raise DatasetError(f"no frames to write to {path}", "pass at least one frame")
        writer.release()
        writer = None
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if writer is not None:
            writer.release()
        if tmp.exists():
            tmp.unlink()
    return count

