"""Images as the duplicate search sees them, and the views it hashes them under.

Every image is brought to 32 x 32 (cv2.INTER_AREA, or INTER_LINEAR when smaller); a view is
a separable linear resampling of it: zoom about the centre, move by (dx, dy), mirror
left-right. ``make_probes`` builds the default set: the identity, every integer shift of up to
``MAX_SHIFT`` px, the mirror under the same shifts, and zoomed-in views (the central
``ZOOMS`` of the side fill the frame, which is what a crop resized back looks like) under
half-pixel shifts of up to ``ZOOM_SHIFT`` px (a crop's centre sits on the half-pixel grid
when it drops a number of pixels of either parity).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from roadshield_base.errors import ConfigError, DatasetError

HASH_SIDE = 32  # side of the working image (the DCT and the pixel check run at this size)
MAX_SHIFT = 3  # views cover shifts of -3..3 px on both axes (at 32x32)
# zoomed views: the central 30 or 29 of the 32 px fill the frame, i.e. a 95% or 90% crop of
# an image seen at 32 px. Exact pixel counts matter: 0.90 instead of 29/32 = 0.906 misses
# 2-6% of 90% crops (a 0.1 px error at the border is enough to break a 2-bit hash match).
ZOOMS = (30 / 32, 29 / 32)
ZOOM_SHIFT = 1.5  # zoomed views move by -1.5..1.5 px ...
ZOOM_STEP = 0.5  # ... in half-pixel steps
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601


def as_batch(images: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray] | np.ndarray:
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise DatasetError(f"images have shape {images.shape} dtype {images.dtype}",
                               "pass N x H x W x 3 uint8 RGB images")
        return images
    out = list(images)
    for i, img in enumerate(out):
        if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[-1] != 3 \
                or img.dtype != np.uint8:
            raise DatasetError(f"image {i} is not an H x W x 3 uint8 array",
                               "pass H x W x 3 uint8 RGB images")
    return out


def subset(batch: list[np.ndarray] | np.ndarray,
            idx: np.ndarray) -> list[np.ndarray] | np.ndarray:
    return batch[idx] if isinstance(batch, np.ndarray) else [batch[i] for i in idx]


def rgb32(images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """N x 32 x 32 x 3 float32 RGB in [0, 255] (any size, resized INTER_AREA)."""
    batch = as_batch(images)
    if isinstance(batch, np.ndarray) and batch.shape[1:3] == (HASH_SIDE, HASH_SIDE):
        return batch.astype(np.float32)
    out = np.empty((len(batch), HASH_SIDE, HASH_SIDE, 3), np.float32)
    for i, img in enumerate(batch):
        interp = cv2.INTER_AREA if min(img.shape[:2]) >= HASH_SIDE else cv2.INTER_LINEAR
        out[i] = cv2.resize(img.astype(np.float32), (HASH_SIDE, HASH_SIDE),
                            interpolation=interp)
    return out


def luma(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) RGB -> (...) BT.601 luma, float32 for float32 input."""
    # a weighted sum, not rgb @ _LUMA: matmul over a length-3 axis is several times slower
    return rgb[..., 0] * _LUMA[0] + rgb[..., 1] * _LUMA[1] + rgb[..., 2] * _LUMA[2]


def grey32(images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """N x 32 x 32 float32 luma in [0, 255] of RGB images (any size, resized INTER_AREA)."""
    return luma(rgb32(images))


def resample_matrix(zoom: float, offset: float, mirror: bool = False,
                    n: int = HASH_SIDE) -> np.ndarray:
    """n x n float32 A with (A @ v)[p] = v(c + zoom * (p' - c) + offset), bilinear, edges
    replicated; c = (n - 1) / 2 and p' = n - 1 - p when ``mirror`` else p."""
    c = (n - 1) / 2
    p = np.arange(n, dtype=np.float64)
    if mirror:
        p = p[::-1]
    x = np.clip(c + zoom * (p - c) + offset, 0, n - 1)
    x0 = np.floor(x).astype(np.int64)
    x1 = np.minimum(x0 + 1, n - 1)
    w = x - x0
    m = np.zeros((n, n), np.float64)
    np.add.at(m, (np.arange(n), x0), 1 - w)
    np.add.at(m, (np.arange(n), x1), w)
    return m.astype(np.float32)


@dataclass(frozen=True)
class Probes:
    """The views each image is hashed under. View k of a 32x32 grey image g is
    ``Ay @ g @ Ax.T`` with (Ay, Ax) = ``operators(k)``: zoom about the centre so the central
    ``zoom[k]`` of the side fills the frame, move by (dx[k], dy[k]) px (content at
    (x + dx, y + dy) comes to (x, y)), then mirror left-right if ``mirror[k]``.
    View 0 is the identity (the plain pHash)."""

    mirror: np.ndarray  # bool (K,)
    zoom: np.ndarray  # float64 (K,), 1 = no zoom
    dy: np.ndarray  # float64 (K,), px at 32x32
    dx: np.ndarray  # float64 (K,)

    def __len__(self) -> int:
        return len(self.mirror)

    def operators(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Ay, Ax), 32 x 32 float32 each, of view k (``resample_matrix``)."""
        z = float(self.zoom[k])
        return (resample_matrix(z, float(self.dy[k])),
                resample_matrix(z, float(self.dx[k]), bool(self.mirror[k])))

    def kinds(self) -> np.ndarray:
        """Per view: 'plain', 'shift', 'mirror' or 'zoom' (object array)."""
        out = np.where(self.mirror, "mirror", np.where(self.zoom != 1, "zoom", "shift"))
        out = out.astype(object)
        out[0] = "plain"
        return out


def make_probes(max_shift: int = MAX_SHIFT, mirror: bool = True,
                zooms: Sequence[float] = ZOOMS, zoom_shift: float = ZOOM_SHIFT,
                zoom_step: float = ZOOM_STEP) -> Probes:
    """Identity; integer shifts up to ``max_shift``; their mirrors (``mirror``); each zoom in
    ``zooms`` under shifts of -zoom_shift..zoom_shift px in ``zoom_step`` steps."""
    if not 0 <= int(max_shift) <= 8 or not 0 <= zoom_shift <= 4 or zoom_step <= 0 \
            or any(not 0.5 <= z < 1 for z in zooms):
        raise ConfigError(f"views max_shift={max_shift}, zooms={tuple(zooms)}, "
                          f"zoom_shift={zoom_shift}, zoom_step={zoom_step} are out of range",
                          "use shifts of 0-8 px, zooms in [0.5, 1) and a positive step")
    s = int(max_shift)
    rows = [(False, 1.0, 0.0, 0.0)]
    grid = [(float(y), float(x)) for y in range(-s, s + 1) for x in range(-s, s + 1)]
    rows += [(False, 1.0, y, x) for y, x in grid if y or x]
    if mirror:
        rows += [(True, 1.0, y, x) for y, x in grid]
    offs = np.arange(-zoom_shift, zoom_shift + zoom_step / 2, zoom_step)
    rows += [(False, float(z), float(y), float(x)) for z in zooms for y in offs for x in offs]
    return Probes(np.array([r[0] for r in rows], bool), np.array([r[1] for r in rows]),
                  np.array([r[2] for r in rows]), np.array([r[3] for r in rows]))
