"""Sign pictograms and GTSRB-like crops: shapes, determinism, and that classes differ."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from cloud_train.render import image_rng, render_sign, render_sign_roi
from cloud_train.sign_art import ART_SIZE, sign_pyramid, sign_rgba
from cloud_train.signs import SYNTHETIC_CLASSES
from roadshield_base.errors import ConfigError

N_CLASSES = len(SYNTHETIC_CLASSES)


def test_every_pictogram_is_rgba_with_a_plate() -> None:
    for k in range(N_CLASSES):
        art = sign_rgba(k)
        assert art.shape == (ART_SIZE, ART_SIZE, 4) and art.dtype == np.uint8
        alpha = art[..., 3]
        assert alpha[0, 0] == 0 and alpha[ART_SIZE // 2, ART_SIZE // 2] == 255
        # Every sign is big: its plate covers most of its square (a triangle about half).
        assert 0.4 < np.mean(alpha > 127) < 0.95
        assert not art.flags.writeable
        assert [lv.shape[0] for lv in sign_pyramid(k)] == [ART_SIZE, ART_SIZE // 2, ART_SIZE // 4]


def test_clean_pictograms_differ_at_32_px() -> None:
    """For every pair of 32 px pictograms over grey, count pixels whose colour differs by more
    than 60 grey levels in some channel: clearly visible differences, not rounding."""
    small = []
    for k in range(N_CLASSES):
        art = cv2.resize(sign_rgba(k), (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
        a = art[..., 3:] / 255.0
        small.append(art[..., :3] * a + 128 * (1 - a))
    counts = np.array([[int((np.abs(x - y).max(axis=-1) > 60).sum()) for y in small]
                       for x in small])
    off = counts[~np.eye(N_CLASSES, dtype=bool)]
    # The closest pair is 30 vs 50 km/h (only a numeral differs): 11 pixels when measured.
    assert off.min() >= 8, off.min()
    # Turn left / turn right are mirror images and must stay far apart (no flip anywhere).
    left, right = SYNTHETIC_CLASSES.index("turn_left_ahead"), SYNTHETIC_CLASSES.index(
        "turn_right_ahead")
    assert counts[left, right] > 40


@pytest.mark.parametrize("size", [32, 48])
def test_every_class_renders(size: int) -> None:
    rng = np.random.default_rng(0)
    for k in range(N_CLASSES):
        img, (x0, y0, x1, y1) = render_sign_roi(k, rng, size)
        assert img.shape == (size, size, 3) and img.dtype == np.uint8
        assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
        # The sign fills ~60-90% of the crop (less when yawed, so allow some slack).
        assert 0.3 * size <= max(x1 - x0, y1 - y0) <= size
        assert img.std() > 3  # not a flat image


def test_same_seed_same_bytes_other_seed_other_bytes() -> None:
    a = [render_sign(k, np.random.default_rng(7), 32) for k in range(N_CLASSES)]
    b = [render_sign(k, np.random.default_rng(7), 32) for k in range(N_CLASSES)]
    c = [render_sign(k, np.random.default_rng(8), 32) for k in range(N_CLASSES)]
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a, b, strict=True))
    assert all(x.tobytes() != z.tobytes() for x, z in zip(a, c, strict=True))


def test_image_rng_depends_on_every_part() -> None:
    base = render_sign(3, image_rng(0, "train", 3, 5))
    assert render_sign(3, image_rng(0, "train", 3, 5)).tobytes() == base.tobytes()
    for other in (image_rng(1, "train", 3, 5), image_rng(0, "test", 3, 5),
                  image_rng(0, "train", 4, 5), image_rng(0, "train", 3, 6)):
        assert render_sign(3, other).tobytes() != base.tobytes()


def test_bad_arguments_raise_config_error() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError, match="14"):
        render_sign(14, rng)
    with pytest.raises(ConfigError):
        render_sign(-1, rng)
    with pytest.raises(ConfigError, match="size"):
        render_sign(0, rng, size=4)


def test_nearest_centroid_on_raw_pixels_beats_chance() -> None:
    """Rendered classes are separable even by the crudest classifier: one mean image per
    class, test crops labelled by the closest mean (pixels centred and L2-normalised)."""
    def crops(split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        xs = [render_sign(k, image_rng(0, split, k, i)) for k in range(N_CLASSES)
              for i in range(n)]
        x = np.asarray(xs, np.float32).reshape(len(xs), -1)
        x -= x.mean(axis=1, keepdims=True)
        x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-6
        return x, np.repeat(np.arange(N_CLASSES), n)

    x_tr, y_tr = crops("train", 30)
    x_te, y_te = crops("test", 15)
    centroids = np.stack([x_tr[y_tr == k].mean(axis=0) for k in range(N_CLASSES)])
    pred = ((x_te[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(axis=1)
    accuracy = float((pred == y_te).mean())
    chance = 1.0 / N_CLASSES  # 0.071
    # Measured 0.53 with these seeds; a class that renders wrong or blank drags it down.
    assert accuracy > 4 * chance, accuracy
