"""The batch fast paths of edge_runtime.sanitize_ops against the plain way of doing the same
thing: one ``cv2.imencode``/``cv2.imdecode`` per image (the JPEG mosaic must equal it bit
for bit), ``jpeg_dct_reference`` (the GEMM DCT path, stated tolerance), the
kernels.sanitize_reference layout helpers, and ``resize_pad_reference``."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from edge_runtime import sanitize_ops
from edge_runtime.sanitize import jpeg, resize_pad
from edge_runtime.sanitize_ops import (
    from_uint8_planes,
    jpeg_codec_batch,
    jpeg_dct_image,
    jpeg_dct_planes,
    to_uint8_planes,
)
from kernels.sanitize_reference import (
    batch_to_images,
    images_to_batch,
    jpeg_dct_reference,
    resize_pad_params,
    resize_pad_reference,
)

SHAPES = [(37, 32, 32), (5, 17, 9), (3, 1, 1), (10, 13, 40), (2, 8, 64)]


def _planes(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """uint8 RGB (n, 3, h, w): noise, plus flat and two-level images (rounding ties)."""
    rng = np.random.default_rng(seed)
    planes = rng.integers(0, 256, (n, 3, h, w), dtype=np.uint8)
    planes[1::3] = rng.integers(0, 256, (len(planes[1::3]), 3, 1, 1), dtype=np.uint8)
    planes[2::3] = (planes[2::3] // 128) * 128 + 17
    return planes


def _codec_one(image_bgr: np.ndarray, quality: int, factor: int) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", image_bgr, [cv2.IMWRITE_JPEG_QUALITY, quality,
                                               cv2.IMWRITE_JPEG_SAMPLING_FACTOR, factor])
    assert ok
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)


def _per_image_codec(planes: np.ndarray, quality: int, factor: int) -> np.ndarray:
    images = np.ascontiguousarray(planes[:, ::-1].transpose(0, 2, 3, 1))
    out = np.stack([_codec_one(im, quality, factor) for im in images])
    return out[..., ::-1].transpose(0, 3, 1, 2)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quality", [20, 75, 95])
def test_jpeg_mosaic_equals_separate_round_trips(shape: tuple[int, int, int],
                                                 quality: int) -> None:
    planes = _planes(*shape, seed=quality)
    got = jpeg_codec_batch(planes, quality, "444")
    np.testing.assert_array_equal(
        got, _per_image_codec(planes, quality, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444))


def test_jpeg_420_batch_equals_separate_round_trips() -> None:
    planes = _planes(6, 21, 30, seed=3)
    np.testing.assert_array_equal(
        jpeg_codec_batch(planes, 60, "420"),
        _per_image_codec(planes, 60, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420))


def test_jpeg_mosaic_splits_past_the_codec_side_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    planes = _planes(23, 17, 9, seed=4)
    whole = jpeg_codec_batch(planes, 50, "444")
    monkeypatch.setattr(sanitize_ops, "_MAX_JPEG_SIDE", 40)  # 2 x 2 tiles per mosaic
    np.testing.assert_array_equal(jpeg_codec_batch(planes, 50, "444"), whole)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quality", [10, 50, 90])
def test_dct_fast_path_is_within_tolerance_of_the_reference(shape: tuple[int, int, int],
                                                            quality: int) -> None:
    planes = _planes(*shape, seed=quality + 1)
    images = np.ascontiguousarray(planes[:, ::-1].transpose(0, 2, 3, 1))
    ref = jpeg_dct_reference(images, quality)[..., ::-1].transpose(0, 3, 1, 2)
    diff = np.abs(jpeg_dct_planes(planes, quality).astype(int) - ref)
    noise = diff[0::3]
    # Noise images: no coefficient sits on a tie (measured: all equal). Images of a few
    # flat levels do hit exact ties (e.g. a DC of exactly -24.5 steps), which the two
    # float64 summation orders round either way: that block moves by one quantisation
    # step of the coefficient, up to 10 levels at quality 10 (measured over these cases:
    # >= 99.6 % of values equal, mean difference < 0.02).
    assert (noise == 0).mean() >= 0.999 and noise.max() <= 2
    assert (diff == 0).mean() >= 0.99 and diff.mean() < 0.05
    np.testing.assert_array_equal(jpeg_dct_image(images[0], quality),
                                  np.ascontiguousarray(
                                      jpeg_dct_planes(planes[:1], quality)[0]
                                      .transpose(1, 2, 0)[..., ::-1]))


def test_dct_path_gives_the_same_bytes_with_and_without_the_blas_limit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    planes = _planes(40, 24, 40, seed=9)
    limited = jpeg_dct_planes(planes, 70)
    monkeypatch.setattr(sanitize_ops, "_BLAS", False)  # as without threadpoolctl
    np.testing.assert_array_equal(jpeg_dct_planes(planes, 70), limited)


def test_layout_helpers_match_the_reference_conversions() -> None:
    x = np.random.default_rng(5).random((7, 3, 5, 6), dtype=np.float32) * 1.4 - 0.2
    planes = to_uint8_planes(x)
    np.testing.assert_array_equal(planes, batch_to_images(x)[..., ::-1].transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(from_uint8_planes(planes),
                                  images_to_batch(batch_to_images(x)))
    assert from_uint8_planes(planes).dtype == np.float32


def test_jpeg_batch_is_the_per_image_jpeg() -> None:
    x = np.random.default_rng(6).random((9, 3, 24, 24), dtype=np.float32)
    images = batch_to_images(x)
    for method in ("codec", "dct"):
        expected = np.stack([jpeg(im, 65, method=method) for im in images])
        np.testing.assert_array_equal(jpeg(x, 65, method=method),
                                      images_to_batch(expected))


@pytest.mark.parametrize("shape", [(64, 32, 32), (9, 1, 1), (12, 1, 40), (12, 7, 9)])
@pytest.mark.parametrize("fill", [0.0, 0.5])
def test_resize_pad_batch_against_the_reference(shape: tuple[int, int, int],
                                                fill: float) -> None:
    n, h, w = shape
    x = np.random.default_rng(n).random((n, 3, h, w), dtype=np.float32)
    out = resize_pad(x, seed=4, frame_index=2, min_frac=0.5, fill=fill)
    params = resize_pad_params(4, 2, h, w, n, 0.5)
    ref = np.stack([resize_pad_reference(im.transpose(1, 2, 0), p, fill).transpose(2, 0, 1)
                    for im, p in zip(x, params, strict=True)])
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    assert out.dtype == np.float32 and out.shape == x.shape
