"""The NumPy preprocess reference, checked against numbers worked out by hand
from its documented formula: s = clip((d + 0.5) * n_src / n_dst - 0.5, 0, n_src - 1)."""

from __future__ import annotations

import numpy as np
import pytest

from kernels.reference import (
    RoiError,
    bilinear_resize_reference,
    clamp_box,
    linear_taps,
    preprocess_roi_reference,
)
from roadshield_base.errors import RoadshieldError

# 2x2 -> 4x4: s = (d + 0.5) * 0.5 - 0.5 = -0.25, 0.25, 0.75, 1.25 -> clipped to 0, .25, .75, 1,
# so each output mixes (p0, p1) with weights (1, 0), (.75, .25), (.25, .75), (0, 1).
PATCH = np.array([[0.0, 100.0], [200.0, 40.0]])
# Top row: 0, .75*0+.25*100, .25*0+.75*100, 100.  Bottom row: 200, .75*200+.25*40 = 160,
# .25*200+.75*40 = 80, 40.  Middle rows: .75*top+.25*bottom and .25*top+.75*bottom.
EXPECTED_4X4 = np.array([
    [0.0, 25.0, 75.0, 100.0],
    [50.0, 58.75, 76.25, 85.0],
    [150.0, 126.25, 78.75, 55.0],
    [200.0, 160.0, 80.0, 40.0],
])


def test_linear_taps_by_hand() -> None:
    i0, i1, w = linear_taps(2, 4)
    np.testing.assert_array_equal(i0, [0, 0, 0, 1])
    np.testing.assert_array_equal(i1, [1, 1, 1, 1])
    np.testing.assert_allclose(w, [0.0, 0.25, 0.75, 0.0])
    # Same length: every output sits on a source centre, weight 0.
    i0, _, w = linear_taps(5, 5)
    np.testing.assert_array_equal(i0, np.arange(5))
    np.testing.assert_array_equal(w, 0.0)
    # 4 -> 2: s = (d + .5) * 2 - .5 = .5, 2.5: the mean of pixel pairs.
    i0, i1, w = linear_taps(4, 2)
    np.testing.assert_array_equal(i0, [0, 2])
    np.testing.assert_array_equal(i1, [1, 3])
    np.testing.assert_allclose(w, [0.5, 0.5])


def test_two_by_two_to_four_by_four_by_hand() -> None:
    np.testing.assert_allclose(bilinear_resize_reference(PATCH, 4, 4), EXPECTED_4X4, atol=1e-12)


def test_preprocess_reference_by_hand() -> None:
    # B carries the pattern, G and R are constant: output channel 0 is R, channel 2 is B.
    frame = np.zeros((2, 2, 3), np.uint8)
    frame[..., 0] = PATCH.astype(np.uint8)
    frame[..., 1] = 7
    frame[..., 2] = 250
    out = preprocess_roi_reference(frame, (0, 0, 2, 2), 4)
    assert out.shape == (1, 3, 4, 4) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], 250 / 255, rtol=1e-6)
    np.testing.assert_allclose(out[0, 1], 7 / 255, rtol=1e-6)
    np.testing.assert_allclose(out[0, 2], EXPECTED_4X4 / 255, rtol=1e-6)


def test_same_size_is_the_crop_in_rgb() -> None:
    frame = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    out = preprocess_roi_reference(frame, (5, 3, 15, 13), 10)
    expected = frame[3:13, 5:15, ::-1].transpose(2, 0, 1)[None] / 255.0
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_one_pixel_and_one_column_sources() -> None:
    frame = np.array([[[10, 20, 30]]], np.uint8)
    out = preprocess_roi_reference(frame, (0, 0, 1, 1), 3)
    np.testing.assert_allclose(out[0, :, 1, 2], np.array([30, 20, 10]) / 255, rtol=1e-6)
    column = np.arange(4095, dtype=np.int64).reshape(4095, 1, 1).repeat(3, axis=2) % 256
    out = preprocess_roi_reference(column.astype(np.uint8), (0, 0, 1, 4095), 5)
    assert np.all(out[0, :, :, 0:1] == out[0, :, :, :])  # one source column: rows are flat


def test_clamp_box() -> None:
    assert clamp_box((-5, -2, 10, 8), 6, 7) == (0, 0, 7, 6)
    assert clamp_box((1.2, 0.5, 3.1, 2.0), 10, 10) == (1, 0, 4, 2)  # widened to the pixel grid
    assert clamp_box((10, 0, 20, 5), 6, 7) is None  # right of the frame
    assert clamp_box((3, 3, 3, 5), 6, 7) is None  # zero width
    with pytest.raises(RoiError, match="4"):
        clamp_box((0, 0, 1), 6, 7)
    with pytest.raises(RoiError, match="non-finite"):
        clamp_box((0, 0, float("nan"), 1), 6, 7)


@pytest.mark.parametrize("frame, box, size, match", [
    (np.zeros((4, 4, 3), np.uint8), (4, 4, 8, 8), 2, "empty inside a 4x4 frame"),
    (np.zeros((4, 4, 3), np.float32), (0, 0, 2, 2), 2, "uint8"),
    (np.zeros((4, 4), np.uint8), (0, 0, 2, 2), 2, "H x W x 3"),
    (np.zeros((4, 4, 3), np.uint8), (0, 0, 2, 2), 0, "positive integer"),
])
def test_reference_rejects_bad_input(frame: np.ndarray, box: tuple, size: int,
                                     match: str) -> None:
    with pytest.raises(RoiError, match=match) as info:
        preprocess_roi_reference(frame, box, size)
    assert isinstance(info.value, ValueError) and isinstance(info.value, RoadshieldError)
