"""The OpenCV preprocess fast path against the NumPy reference.

Expected values come from ``kernels.reference.preprocess_roi_reference`` (the
half-pixel bilinear formula in float64). ``cv2.resize`` follows the same
formula but rounds to uint8 and uses 11-bit fixed-point weights, so after /255
the two agree within 1/255, which is the tolerance used throughout.
"""

from __future__ import annotations

import numpy as np
import pytest

from edge_runtime.preprocess import (
    PreprocessError,
    Preprocessor,
    preprocess_batch,
    preprocess_roi,
)
from kernels.reference import preprocess_roi_reference
from roadshield_base.errors import RoadshieldError

TOL = 1 / 255 + 1e-6  # float32 rounding on top of OpenCV's uint8 rounding


def _frame(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _assert_matches_reference(frame: np.ndarray, box: tuple, size: int) -> None:
    fast = preprocess_roi(frame, box, size)
    ref = preprocess_roi_reference(frame, box, size)
    assert fast.shape == ref.shape == (1, 3, size, size) and fast.dtype == np.float32
    assert fast.flags.c_contiguous
    np.testing.assert_allclose(fast, ref, atol=TOL, rtol=0, err_msg=f"box {box} size {size}")


def test_random_frames_and_boxes_match_the_reference() -> None:
    rng = np.random.default_rng(42)
    for case in range(150):
        h, w = (int(v) for v in rng.integers(1, 120, 2))
        frame = _frame(h, w, seed=case)
        x0, x1 = sorted(int(v) for v in rng.integers(-10, w + 10, 2))
        y0, y1 = sorted(int(v) for v in rng.integers(-10, h + 10, 2))
        x1, y1 = max(x1, 1, x0 + 1), max(y1, 1, y0 + 1)  # at least one pixel inside
        x0, y0 = min(x0, w - 1), min(y0, h - 1)
        _assert_matches_reference(frame, (x0, y0, x1, y1), int(rng.integers(1, 70)))


@pytest.mark.parametrize("h, w", [(1, 1), (7, 9), (9, 7), (4095, 1), (1, 4095)])
@pytest.mark.parametrize("size", [1, 5, 32])
def test_edge_sized_frames(h: int, w: int, size: int) -> None:
    _assert_matches_reference(_frame(h, w, seed=h * w), (0, 0, w, h), size)


@pytest.mark.parametrize("box", [(10, 20, 11, 21), (3, 4, 10, 13), (0, 0, 1, 4095),
                                 (50, 0, 51, 4095)])
def test_edge_sized_boxes_in_a_large_frame(box: tuple) -> None:
    _assert_matches_reference(_frame(4095, 64, seed=1), box, 24)


def test_exact_resample_cases() -> None:
    # Same size is a pure crop; 2x downscale averages pixel pairs (OpenCV uses INTER_AREA
    # there, which equals the half-pixel bilinear weights 0.5 / 0.5).
    frame = _frame(64, 64, seed=3)
    same = preprocess_roi(frame, (8, 8, 40, 40), 32)
    np.testing.assert_allclose(same[0], frame[8:40, 8:40, ::-1].transpose(2, 0, 1) / 255.0,
                               rtol=1e-6, atol=0)
    _assert_matches_reference(frame, (0, 0, 64, 64), 32)


def test_two_by_two_to_four_by_four_by_hand() -> None:
    # Numbers worked out from the formula in kernels/reference.py (see tests/kernels).
    frame = np.zeros((2, 2, 3), np.uint8)
    frame[..., 0] = [[0, 100], [200, 40]]
    expected_b = np.array([[0, 25, 75, 100], [50, 58.75, 76.25, 85],
                           [150, 126.25, 78.75, 55], [200, 160, 80, 40]]) / 255
    np.testing.assert_allclose(preprocess_roi(frame, (0, 0, 2, 2), 4)[0, 2], expected_b,
                               atol=TOL, rtol=0)


def test_partly_outside_boxes_are_clamped() -> None:
    frame = _frame(48, 64, seed=5)
    for box, inside in [((-10, -5, 20, 30), (0, 0, 20, 30)), ((50, 40, 90, 70), (50, 40, 64, 48)),
                        ((-100, -100, 1000, 1000), (0, 0, 64, 48))]:
        np.testing.assert_array_equal(preprocess_roi(frame, box, 16),
                                      preprocess_roi(frame, inside, 16))
        _assert_matches_reference(frame, box, 16)


@pytest.mark.parametrize("box", [(64, 0, 80, 10), (-20, -20, 0, 0), (10, 48, 20, 60),
                                 (5, 5, 5, 10), (9, 9, 3, 3)])
def test_wholly_outside_or_empty_boxes_are_rejected(box: tuple) -> None:
    with pytest.raises(PreprocessError, match="wholly outside the 64x48 frame") as info:
        preprocess_roi(_frame(48, 64), box, 16)
    assert info.value.hint and isinstance(info.value, ValueError)


@pytest.mark.parametrize("frame, match, hint", [
    (np.zeros((8, 8, 3), np.float32), "dtype is float32, expected uint8", "astype(np.uint8)"),
    (np.zeros((8, 8), np.uint8), "1 channel", "GRAY2BGR"),
    (np.zeros((8, 8, 4), np.uint8), "4 channel", "BGRA2BGR"),
    (np.zeros((0, 8, 3), np.uint8), "empty", "camera"),
    ([[0, 0, 0]], "expected a numpy array", "ndarray"),
])
def test_bad_frames(frame: np.ndarray, match: str, hint: str) -> None:
    with pytest.raises(PreprocessError, match=match) as info:
        preprocess_roi(frame, (0, 0, 4, 4), 8)
    assert hint in info.value.hint and isinstance(info.value, RoadshieldError)


@pytest.mark.parametrize("box, size, match", [
    ((0, 0, 4), 8, "3 values, expected 4"),
    ((0, 0, float("inf"), 4), 8, "non-finite"),
    ((0, 0, 4, 4), 0, "positive integer"),
    ((0, 0, 4, 4), 2.5, "positive integer"),
    ((0, 0, 4, 4), True, "positive integer"),
])
def test_bad_boxes_and_sizes(box: tuple, size: int, match: str) -> None:
    with pytest.raises(PreprocessError, match=match):
        preprocess_roi(_frame(8, 8), box, size)


def test_batch_matches_single_calls() -> None:
    frame = _frame(120, 160, seed=9)
    boxes = [(0, 0, 32, 32), (100, 50, 170, 130), (-5, 60, 40, 90)]
    batch = preprocess_batch(frame, boxes, 20)
    assert batch.shape == (3, 3, 20, 20) and batch.dtype == np.float32
    for row, box in zip(batch, boxes, strict=True):
        np.testing.assert_array_equal(row, preprocess_roi(frame, box, 20)[0])
    np.testing.assert_array_equal(preprocess_batch(frame, np.array(boxes), 20), batch)
    assert preprocess_batch(frame, [], 20).shape == (0, 3, 20, 20)


def test_batch_errors_name_the_box() -> None:
    frame = _frame(40, 40)
    with pytest.raises(PreprocessError, match=r"boxes\[1\]: .*wholly outside"):
        preprocess_batch(frame, [(0, 0, 8, 8), (50, 50, 60, 60)], 8)
    with pytest.raises(PreprocessError, match=r"shape \(2, 3\), expected \(N, 4\)"):
        preprocess_batch(frame, np.zeros((2, 3)), 8)


def test_preprocessor_class() -> None:
    frame = _frame(30, 40, seed=2)
    pre = Preprocessor(12)
    assert repr(pre) == "Preprocessor(size=12)"
    box = (1, 2, 20, 25)
    np.testing.assert_array_equal(pre(frame, box), preprocess_roi(frame, box, 12))
    assert pre.batch(frame, [(0, 0, 5, 5), (5, 5, 30, 30)]).shape == (2, 3, 12, 12)
    with pytest.raises(PreprocessError):
        Preprocessor(0)
