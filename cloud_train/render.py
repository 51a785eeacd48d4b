"""GTSRB-like sign crops rendered from the canonical pictograms, and datasets of them.

A crop is drawn at twice its final size (the "canvas"), then area-downsampled, so
edges, blur and perspective look like a camera's rather than like drawn pixels.
Every random choice comes from the ``rng`` passed in, so a seed fixes the bytes.

Dataset files: crops are written at ``size`` x ``size`` (no border beyond the one the
render already has); each CSV row carries the sign's ROI like real GTSRB (inclusive
pixel coordinates), so ``load_gtsrb(..., crop_roi=True)`` works on them too.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from cloud_train import gtsrb
from cloud_train.sign_art import check_class_index, sign_pyramid
from cloud_train.signs import SYNTHETIC_CLASSES
from roadshield_base.errors import ConfigError

_BANK_SIDE = 160
_BANK_COUNT = 48


def fractal_noise(rng: np.random.Generator, side: int, octaves: Sequence[int]) -> np.ndarray:
    """Smooth value noise in [0, 1] (side x side float32): random grids, upsampled, summed."""
    acc = np.zeros((side, side), np.float32)
    total = 0.0
    for k, cells in enumerate(octaves):
        grid = rng.random((cells, cells), dtype=np.float32)
        w = 0.55 ** k
        acc += w * cv2.resize(grid, (side, side), interpolation=cv2.INTER_CUBIC)
        total += w
    return np.clip(acc / total, 0.0, 1.0)


def palette(t: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Map t in [0, 1] (H x W) through a list of RGB colours to H x W x 3 float32."""
    pos = t * (len(colours) - 1)
    i = np.clip(pos.astype(np.int32), 0, len(colours) - 2)
    f = (pos - i)[..., None]
    return colours[i] * (1 - f) + colours[i + 1] * f


def _texture(rng: np.random.Generator, kind: str, side: int) -> np.ndarray:
    """One background texture, side x side x 3 uint8 RGB."""
    if kind == "foliage":
        t = fractal_noise(rng, side, (4, 9, 20, 45))
        greens = np.array([[20, 35, 12], [48, 80, 30], [90, 120, 50], [140, 150, 80]], np.float32)
        img = palette(t, greens * rng.uniform(0.7, 1.2))
        for _ in range(rng.integers(3, 10)):  # gaps to sky or shadow between leaves
            c = (int(rng.integers(0, side)), int(rng.integers(0, side)))
            col = (150, 180, 210) if rng.random() < 0.4 else (15, 20, 10)
            cv2.circle(img, c, int(rng.integers(2, 9)), col, -1, cv2.LINE_AA)
    elif kind == "sky":
        y = np.linspace(0, 1, side, dtype=np.float32)[:, None]
        top = rng.uniform([60, 110, 170], [140, 170, 235]).astype(np.float32)
        low = rng.uniform([170, 190, 200], [235, 240, 250]).astype(np.float32)
        img = (top * (1 - y[..., None]) + low * y[..., None]) * np.ones((1, side, 1), np.float32)
        cloud = fractal_noise(rng, side, (3, 7, 16))
        cloud = np.clip((cloud - rng.uniform(0.45, 0.65)) * 3.0, 0, 1)[..., None]
        img = img * (1 - cloud) + 235 * cloud
    elif kind == "urban":
        base = rng.uniform(70, 190)
        tint = rng.uniform([0.85, 0.8, 0.75], [1.2, 1.05, 1.0])
        img = np.full((side, side, 3), base, np.float32) * tint.astype(np.float32)
        for _ in range(rng.integers(4, 14)):  # windows, panels, doors
            x0, y0 = (int(v) for v in rng.integers(0, side, 2))
            w, h = (int(v) for v in rng.integers(8, 50, 2))
            paint = tuple(float(v) for v in rng.uniform(20, 230) * rng.uniform(0.8, 1.2, 3))
            cv2.rectangle(img, (x0, y0), (x0 + w, y0 + h), paint, -1)
        img += (fractal_noise(rng, side, (16, 40))[..., None] - 0.5) * 30
    elif kind == "asphalt":
        g = rng.uniform(50, 140)
        img = np.full((side, side, 3), g, np.float32)
        img += (rng.random((side, side, 1), dtype=np.float32) - 0.5) * 40
        img += (fractal_noise(rng, side, (5, 12))[..., None] - 0.5) * 40
    else:  # "field": horizon with sky above, vegetation or soil below
        h = int(rng.integers(side // 4, 3 * side // 4))
        img = _texture(rng, "sky", side).astype(np.float32)
        ground = _texture(rng, "foliage", side).astype(np.float32)
        if rng.random() < 0.4:
            ground = ground.mean(axis=2, keepdims=True) * np.array([1.3, 1.0, 0.7], np.float32)
        img[h:] = ground[h:]
    return np.clip(img, 0, 255).astype(np.uint8)


@functools.cache
def texture_bank() -> tuple[np.ndarray, ...]:
    """A fixed set of background textures (the same on every machine and in every process)."""
    rng = np.random.default_rng(20240607)
    kinds = ("foliage", "sky", "urban", "asphalt", "field")
    return tuple(_texture(rng, kinds[i % len(kinds)], _BANK_SIDE) for i in range(_BANK_COUNT))


def background(rng: np.random.Generator, side: int) -> np.ndarray:
    """A random background patch, side x side x 3 uint8 RGB.

    Mostly a random crop of the fixed texture bank (rescaled, tinted); sometimes a plain
    gradient, which real photographs of signs against sky or walls often show.
    """
    if rng.random() < 0.15:
        a, b = rng.uniform(30, 230, (2, 3)).astype(np.float32)
        ang = rng.uniform(0, 2 * np.pi)
        ramp = np.linspace(-1, 1, side, dtype=np.float32)
        t = (np.cos(ang) * ramp[None, :] + np.sin(ang) * ramp[:, None]) * 0.5 + 0.5
        return (a * (1 - t[..., None]) + b * t[..., None]).astype(np.uint8)
    bank = texture_bank()
    tex = bank[int(rng.integers(0, len(bank)))]
    crop = int(rng.integers(_BANK_SIDE // 3, _BANK_SIDE + 1))
    x0, y0 = (int(v) for v in rng.integers(0, _BANK_SIDE - crop + 1, 2))
    patch = tex[y0:y0 + crop, x0:x0 + crop]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    patch = cv2.resize(patch, (side, side), interpolation=cv2.INTER_LINEAR)
    gains = (rng.uniform(0.75, 1.25) * rng.uniform(0.9, 1.1, 3)).astype(np.float32)
    return np.clip(patch * gains, 0, 255).astype(np.uint8)


def sign_corners(rng: np.random.Generator, centre: tuple[float, float], side: float,
                 max_rot_deg: float = 15.0, max_yaw_deg: float = 35.0) -> np.ndarray:
    """Where the corners of a sign's square land after a random pose (4 x 2 float32, x, y).

    The sign square (``side`` px) is turned in 3-D by yaw and pitch, rolled in the image
    plane (a few degrees, at most ``max_rot_deg``) and projected with mild perspective.
    """
    yaw = math.radians(rng.uniform(-max_yaw_deg, max_yaw_deg))
    pitch = math.radians(rng.uniform(-15, 15))
    roll = math.radians(float(np.clip(rng.normal(0, max_rot_deg / 3), -max_rot_deg,
                                      max_rot_deg)))
    sq = np.array([[-1, -1, 0], [1, -1, 0], [1, 1, 0], [-1, 1, 0]], np.float64) * (side / 2)
    cy, sy, cp, sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    p = sq @ (rx @ ry).T
    dist = side * rng.uniform(2.5, 6.0)  # camera distance in sign sizes: the perspective strength
    xy = p[:, :2] * (dist / (dist + p[:, 2:3]))
    cr, sr = math.cos(roll), math.sin(roll)
    xy = xy @ np.array([[cr, sr], [-sr, cr]])
    xy += rng.normal(0, side * 0.012, xy.shape)  # a bent or badly mounted plate
    return (xy + np.asarray(centre)).astype(np.float32)


def warp_sign(class_index: int, corners: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    """Warp the pictogram so its square lands on ``corners``; out_h x out_w x 4 uint8 RGBA."""
    span = float(np.max(np.ptp(corners, axis=0)))
    levels = sign_pyramid(class_index)
    art = next((lv for lv in reversed(levels) if lv.shape[0] >= span), levels[0])
    n = art.shape[0]
    src = np.array([[0, 0], [n, 0], [n, n], [0, n]], np.float32) - 0.5
    m = cv2.getPerspectiveTransform(src, corners - 0.5)
    return cv2.warpPerspective(art, m, (out_w, out_h), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0, 0))


def _occlude(img: np.ndarray, rng: np.random.Generator, box: tuple[int, int, int, int]) -> None:
    """Draw a branch or a box over part of the sign box (in place, float32 RGB canvas)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if rng.random() < 0.6:  # branch: from outside the sign across one of its parts
        col = tuple(float(v) for v in rng.uniform([25, 30, 10], [90, 90, 45]))
        start = (x0 + rng.uniform(-0.5, 1.5) * w, y0 - rng.uniform(0.1, 0.4) * h)
        end = (x0 + rng.uniform(0, 1) * w, y0 + rng.uniform(0.2, 0.6) * h)
        pts = np.array([start, end], np.float64)
        thick = max(1, int(w * rng.uniform(0.04, 0.1)))
        cv2.line(img, tuple(int(v) for v in pts[0]), tuple(int(v) for v in pts[1]), col, thick,
                 cv2.LINE_AA)
        for _ in range(rng.integers(2, 6)):  # leaves along the branch
            t = rng.uniform(0.2, 1.0)
            c = pts[0] * (1 - t) + pts[1] * t + rng.normal(0, w * 0.05, 2)
            leaf = tuple(float(v) for v in rng.uniform([20, 60, 10], [90, 140, 50]))
            axes = (max(1, int(w * rng.uniform(0.05, 0.12))), max(1, int(w * 0.04)))
            cv2.ellipse(img, (int(c[0]), int(c[1])), axes, rng.uniform(0, 180), 0, 360, leaf, -1,
                        cv2.LINE_AA)
    else:  # box: a pole, another plate or a vehicle edge over one side
        frac = rng.uniform(0.15, 0.35)
        col = tuple(float(v) for v in rng.uniform(30, 200) * rng.uniform(0.85, 1.15, 3))
        side = int(rng.integers(0, 4))
        if side == 0:
            r = (x0 - 2, y0 - 2, int(x0 + frac * w), y1 + 2)
        elif side == 1:
            r = (int(x1 - frac * w), y0 - 2, x1 + 2, y1 + 2)
        elif side == 2:
            r = (x0 - 2, int(y1 - frac * h), x1 + 2, y1 + 2)
        else:
            r = (x0 - 2, y0 - 2, x1 + 2, int(y0 + frac * h))
        cv2.rectangle(img, r[:2], r[2:], col, -1)


def lighting_lut(rng: np.random.Generator, log_gain: tuple[float, float] = (-0.9, 0.35),
                 contrast: tuple[float, float] = (0.6, 1.3)) -> np.ndarray:
    """A random exposure / contrast / gamma / colour-cast curve: 1 x 256 x 3 uint8 for cv2.LUT.

    log_gain: range of the natural log of the exposure gain (default 0.4x dusk/shade to
    1.4x glare); contrast: range of the contrast factor around mid-grey.
    """
    v = np.arange(256, dtype=np.float32) / 255.0
    gamma = math.exp(rng.uniform(-0.4, 0.4))
    c = rng.uniform(*contrast)
    gain = math.exp(rng.uniform(*log_gain))
    cast = rng.uniform(0.85, 1.15, 3).astype(np.float32)
    curve = ((v ** gamma - 0.5) * c + 0.5 + rng.uniform(-0.08, 0.08)) * gain
    lut = np.clip(curve[:, None] * cast[None, :] * 255.0, 0, 255)
    return lut.astype(np.uint8)[None]


def blur(img: np.ndarray, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Maybe blur ``img`` (H x W x C): Gaussian defocus or a straight motion streak.

    ``scale`` is canvas pixels per output pixel, so the blur looks alike at any canvas size.
    """
    r = rng.random()
    if r < 0.45:
        sigma = rng.uniform(0.3, 1.4) * scale
        return cv2.GaussianBlur(img, (0, 0), sigma)
    if r < 0.65:
        k = int(rng.integers(2, 5) * scale) | 1
        kern = np.zeros((k, k), np.float32)
        ang = rng.uniform(0, np.pi)
        c = (k - 1) / 2
        dx, dy = math.cos(ang) * c, math.sin(ang) * c
        cv2.line(kern, (round(c - dx), round(c - dy)), (round(c + dx), round(c + dy)), 1.0, 1)
        return cv2.filter2D(img, -1, kern / kern.sum())
    return img


def render_sign_roi(class_index: int, rng: np.random.Generator,
                    size: int = 32) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A GTSRB-like crop and the sign's box in it.

    Returns (image, roi): image size x size x 3 uint8 RGB; roi (x0, y0, x1, y1) in pixels of
    the image, x1/y1 exclusive, the tight box of the sign before occlusion.
    """
    check_class_index(class_index)
    if not isinstance(size, (int, np.integer)) or size < 8:
        raise ConfigError(f"crop size {size!r} is too small", "use a size of 8 pixels or more")
    n = 2 * int(size)
    bg = background(rng, n)
    side = n * rng.uniform(0.6, 0.9)
    slack = (n - side) / 2
    centre = (n / 2 + rng.uniform(-0.7, 0.7) * slack, n / 2 + rng.uniform(-0.7, 0.7) * slack)
    rgba = warp_sign(class_index, sign_corners(rng, centre, side), n, n)
    x, y, w, h = cv2.boundingRect((rgba[..., 3] > 127).astype(np.uint8))
    sign = rgba[..., :3].astype(np.float32)
    fade = rng.uniform(0.0, 0.35) if rng.random() < 0.4 else 0.0  # sun-bleached paint
    if fade:
        sign = sign * (1 - fade) + sign.mean(axis=2, keepdims=True) * fade
    sign *= rng.uniform(0.75, 1.2)  # retro-reflective plate vs ambient
    a = rgba[..., 3:].astype(np.float32) * (1 / 255)
    img = bg.astype(np.float32)
    img += (sign - img) * a
    if rng.random() < 0.2:
        _occlude(img, rng, (x, y, x + w, y + h))
    if rng.random() < 0.25:  # a cast shadow edge across the crop
        ang = rng.uniform(0, 2 * np.pi)
        ramp = np.arange(n, dtype=np.float32) - n / 2
        d = math.cos(ang) * ramp[None, :] + math.sin(ang) * ramp[:, None] - rng.uniform(-n, n) / 3
        img *= (1 - rng.uniform(0.3, 0.6) * np.clip(d / (n * 0.05), 0, 1))[..., None]
    canvas = cv2.LUT(np.clip(img, 0, 255).astype(np.uint8), lighting_lut(rng))
    canvas = blur(canvas, rng, 2.0)
    out = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA)
    sigma = rng.uniform(0.5, 4.0) if rng.random() < 0.8 else rng.uniform(4.0, 10.0)
    noise = rng.standard_normal(out.shape, dtype=np.float32) * sigma
    out = np.clip(out + noise, 0, 255).astype(np.uint8)
    if rng.random() < 0.3:  # JPEG blocks, as in crops cut from compressed video
        q = int(rng.integers(30, 90))
        ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, q])
        decoded = cv2.imdecode(buf, cv2.IMREAD_COLOR) if ok else None
        out = decoded if decoded is not None else out
    roi = (x // 2, y // 2, min(size, -(-(x + w) // 2)), min(size, -(-(y + h) // 2)))
    return out, roi


def render_sign(class_index: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A GTSRB-like crop of synthetic class ``class_index``: size x size x 3 uint8 RGB.

    The sign fills ~60-90% of the crop, posed with random perspective, scale and a roll of
    a few (up to ~15) degrees, over a varied background, with random lighting and colour
    cast, defocus or motion blur, sensor noise, sometimes occlusion or JPEG artefacts.
    Deterministic for the state of ``rng``.
    """
    return render_sign_roi(class_index, rng, size)[0]


def image_rng(seed: int, split: str, class_index: int, index: int) -> np.random.Generator:
    """The generator for one dataset image, so any subset of a dataset re-renders identically."""
    return np.random.default_rng((int(seed), 0 if split == "train" else 1, int(class_index),
                                  int(index)))


@dataclass(frozen=True)
class DatasetSummary:
    """What ``render_dataset`` wrote. root is the ``gtsrb/`` folder."""

    root: Path
    class_names: tuple[str, ...]
    train_images: int
    test_images: int
    size: int
    seed: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return (self.train_images + self.test_images) / max(self.seconds, 1e-9)


def render_dataset(root: str | Path, train_per_class: int, test_per_class: int, seed: int = 0,
                   size: int = 32, classes: Sequence[str] = SYNTHETIC_CLASSES,
                   progress: bool = True) -> DatasetSummary:
    """Render a synthetic dataset into ``root/gtsrb`` in the torchvision GTSRB layout.

    ClassId k in the files is ``classes[k]`` (names also go to ``gtsrb/classes.csv``), so a
    subset of classes still gives contiguous ids, as torchvision's folder order expects.
    Image (split, class, i) is rendered from ``image_rng(seed, split, synthetic index, i)``.
    Everything is written into a temporary folder beside ``root/gtsrb`` and renamed into
    place at the end; an existing ``root/gtsrb`` is replaced.
    """
    names = tuple(classes)
    unknown = [c for c in names if c not in SYNTHETIC_CLASSES]
    if not names or unknown or len(set(names)) != len(names):
        raise ConfigError(f"cannot render classes {list(names)!r}",
                          "pick distinct names from: " + ", ".join(SYNTHETIC_CLASSES))
    for label, count in (("train_per_class", train_per_class), ("test_per_class", test_per_class)):
        if count < 0 or (label == "train_per_class" and count < 1):
            raise ConfigError(f"{label}={count} is out of range",
                              "render at least one training image per class")
    t0 = time.perf_counter()
    syn = [SYNTHETIC_CLASSES.index(c) for c in names]
    order = np.random.default_rng((int(seed), 2)).permutation(len(names) * test_per_class)
    test_jobs = [(int(j) // test_per_class, int(j) % test_per_class) for j in order]
    total = len(names) * (train_per_class + test_per_class)
    with gtsrb.staged_dataset(root, names) as stage, tqdm(
            total=total, desc="render", unit="img", disable=not progress) as bar:
        train = gtsrb.SplitWriter(stage, "train", len(names))
        for cid, k in enumerate(syn):
            for i in range(train_per_class):
                img, roi = render_sign_roi(k, image_rng(seed, "train", k, i), size)
                train.add(img, cid, roi)
                bar.update()
        train.close()
        test = gtsrb.SplitWriter(stage, "test", len(names))
        for cid, i in test_jobs:
            img, roi = render_sign_roi(syn[cid], image_rng(seed, "test", syn[cid], i), size)
            test.add(img, cid, roi)
            bar.update()
        test.close()
    return DatasetSummary(gtsrb.resolve_base(root), names, train.count, test.count, int(size),
                          int(seed), time.perf_counter() - t0)
