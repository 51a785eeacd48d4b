"""The plain-NumPy sanitizer references, checked against hand-worked values, the papers'
formulas, OpenCV (cv2.medianBlur, libjpeg through cv2.imencode) and the JPEG standard."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from kernels.reference import bilinear_resize_reference
from kernels.sanitize_reference import (
    JPEG_LUMA_TABLE,
    RGB_TO_YCC,
    YCC_TO_RGB,
    SanitizeError,
    batch_to_images,
    bitdepth_lut,
    bitdepth_reference,
    dct_matrix,
    images_to_batch,
    jpeg_dct_reference,
    jpeg_quant_tables,
    median_reference,
    resize_pad_params,
    resize_pad_reference,
)
from roadshield_base.errors import RoadshieldError

ODD_SHAPES = [(1, 1, 3), (7, 9, 3), (4095, 1, 3), (1, 33, 3), (2, 2, 3)]


def test_bitdepth_round_matches_xu_formula_on_the_uint8_scale():
    x = np.arange(256)
    for bits in range(1, 9):
        levels = 2**bits - 1
        # Xu et al.: round(x * L) / L on [0, 1], mapped back to 0..255 and rounded.
        xu = np.round(np.round(x / 255 * levels) / levels * 255).astype(np.uint8)
        np.testing.assert_array_equal(bitdepth_lut(bits, "round"), xu)
        assert np.unique(bitdepth_lut(bits)).size == levels + 1


def test_bitdepth_hand_values():
    lut5 = bitdepth_lut(5)
    # 100 * 31 / 255 = 12.157 -> 12; 12 * 255 / 31 = 98.71 -> 99
    assert lut5[100] == 99 and lut5[0] == 0 and lut5[255] == 255
    assert list(bitdepth_lut(1)[[0, 127, 128, 255]]) == [0, 0, 255, 255]
    # truncate keeps the top bits: 13 = 0b01101 -> 0b01000 at 5 bits
    assert bitdepth_lut(5, "truncate")[13] == 8 and bitdepth_lut(5, "truncate")[255] == 248
    np.testing.assert_array_equal(bitdepth_lut(8), np.arange(256, dtype=np.uint8))


def test_bitdepth_float_levels_and_clipping():
    x = np.array([-0.5, 0.0, 0.1, 0.49, 0.51, 1.0, 2.0], np.float32)
    y = bitdepth_reference(x, 1)
    np.testing.assert_array_equal(y, [0, 0, 0, 0, 1, 1, 1])
    y3 = bitdepth_reference(np.linspace(0, 1, 1001, dtype=np.float32), 3)
    assert set(np.round(y3 * 7, 5)) <= set(range(8)) and y3.dtype == np.float32
    # truncate on floats is the uint8 rule on rint(x * 255): 13/255 -> 8/255
    assert bitdepth_reference(np.float32([13 / 255]), 5, "truncate")[0] == np.float32(8 / 255)


@pytest.mark.parametrize("bits", [0, 9, 2.5, True])
def test_bitdepth_rejects_bad_bits(bits):
    with pytest.raises(SanitizeError, match="bits"):
        bitdepth_lut(bits)


@pytest.mark.parametrize("shape", ODD_SHAPES + [(48, 64, 3)])
@pytest.mark.parametrize("k", [3, 5])
def test_median_reference_is_bit_exact_with_opencv(shape, k):
    img = np.random.default_rng(k + shape[0]).integers(0, 256, shape, dtype=np.uint8)
    np.testing.assert_array_equal(median_reference(img, k), cv2.medianBlur(img, k))
    f = img.astype(np.float32) / 255
    np.testing.assert_array_equal(median_reference(f, k), cv2.medianBlur(f, k))


def test_median_reference_hand_value_and_border():
    img = np.array([[0, 0, 0], [0, 9, 0], [0, 0, 5]], np.uint8)
    out = median_reference(img, 3)
    assert out[1, 1] == 0  # one 9 and one 5 among seven zeros
    # corner (2, 2): replicated window holds 5 four times and 9 once, zeros four times -> 5
    assert out[2, 2] == 5
    with pytest.raises(SanitizeError):
        median_reference(img, 4)


def test_quant_tables_follow_the_ijg_formula():
    np.testing.assert_array_equal(jpeg_quant_tables(50)[0], JPEG_LUMA_TABLE)
    assert (jpeg_quant_tables(100) == 1).all()
    # q=75: scale = 200 - 150 = 50 -> (16 * 50 + 50) // 100 = 8; q=10: scale 500 -> 80
    assert jpeg_quant_tables(75)[0, 0, 0] == 8 and jpeg_quant_tables(10)[0, 0, 0] == 80
    assert jpeg_quant_tables(1).max() == 255  # baseline tables stop at 255
    for bad in (0, 101, 50.0):
        with pytest.raises(SanitizeError, match="quality"):
            jpeg_quant_tables(bad)


def test_dct_matrix_is_orthonormal_dct_ii():
    d = dct_matrix()
    np.testing.assert_allclose(d @ d.T, np.eye(8), atol=1e-12)
    np.testing.assert_allclose(d[0], np.full(8, 1 / np.sqrt(8)))
    np.testing.assert_allclose(d[1, 0], 0.5 * np.cos(np.pi / 16))
    np.testing.assert_allclose(YCC_TO_RGB @ RGB_TO_YCC, np.eye(3), atol=1e-6)


def test_jpeg_dct_keeps_flat_blocks_and_is_near_lossless_at_100():
    flat = np.full((16, 16, 3), (40, 120, 200), np.uint8)
    # a flat block has only a DC term; at q=50 its step is 16 (luma) / 17 (chroma)
    assert np.abs(jpeg_dct_reference(flat, 50).astype(int) - flat).max() <= 8
    img = np.random.default_rng(0).integers(0, 256, (13, 21, 3), dtype=np.uint8)
    assert np.abs(jpeg_dct_reference(img, 100).astype(int) - img).max() <= 2
    low = np.abs(jpeg_dct_reference(img, 10).astype(int) - img).mean()
    assert low > np.abs(jpeg_dct_reference(img, 90).astype(int) - img).mean()
    stack = np.stack([img, img[::-1]])
    np.testing.assert_array_equal(jpeg_dct_reference(stack, 60)[1],
                                  jpeg_dct_reference(img[::-1].copy(), 60))


@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_jpeg_dct_odd_sizes(shape):
    img = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    out = jpeg_dct_reference(img, 75)
    assert out.shape == shape and out.dtype == np.uint8


def _cv2_jpeg(img: np.ndarray, quality: int, sampling: int) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality,
                                         cv2.IMWRITE_JPEG_SAMPLING_FACTOR, sampling])
    assert ok
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)


def test_jpeg_dct_is_close_to_the_libjpeg_round_trip_on_rendered_frames():
    from cloud_train.scenes import render_scene

    rng = np.random.default_rng(7)
    frames = [render_scene(rng, c, 320, 240)[0] for c in (0, 3, None)]
    diffs = {q: np.concatenate([np.abs(jpeg_dct_reference(f, q).astype(int)
                                       - _cv2_jpeg(f, q, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444))
                                .ravel() for f in frames]) for q in (50, 75, 90)}
    # Measured on these three 320x240 frames against libjpeg at 4:4:4, in grey levels:
    # q=50 mean 0.55 / 99.9th pct 9 / max 28; q=75 0.66 / 6 / 25; q=90 0.73 / 5 / 20.
    # (The JPEG error itself is 2.7 / 2.2 / 1.9 mean; libjpeg at its default 4:2:0 is
    # 1.6 / 1.5 / 1.4 mean, max 116, away from the approximation.) The gap comes from
    # libjpeg's integer DCT and its 8-bit YCbCr samples: a coefficient that lands on the
    # other side of a rounding boundary moves its whole 8x8 block, hence the rare large max.
    for q, d in diffs.items():
        assert d.mean() < 1.0, (q, d.mean())
        assert np.percentile(d, 99.9) <= 12, (q, np.percentile(d, 99.9))
        assert d.max() <= 40, (q, d.max())
        # and far closer than the compression error itself
        err = np.concatenate([np.abs(_cv2_jpeg(f, q, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444)
                                     .astype(int) - f).ravel() for f in frames])
        assert d.mean() < 0.5 * err.mean()


def test_resize_pad_params_replay_and_ranges():
    a = resize_pad_params(3, 10, 32, 32, 64, 0.875)
    np.testing.assert_array_equal(a, resize_pad_params(3, 10, 32, 32, 64, 0.875))
    assert not np.array_equal(a, resize_pad_params(3, 11, 32, 32, 64, 0.875))
    assert not np.array_equal(a, resize_pad_params(4, 10, 32, 32, 64, 0.875))
    new_h, new_w, top, left = a.T
    assert new_h.min() >= 28 and new_h.max() <= 32 and (new_w == new_h).all()
    assert (top >= 0).all() and (top + new_h <= 32).all() and (left + new_w <= 32).all()
    # non-square keeps the aspect: new_w = round(new_h * W / H)
    b = resize_pad_params(0, 0, 10, 40, 50, 0.5)
    np.testing.assert_array_equal(b[:, 1], np.clip((2 * 40 * b[:, 0] + 10) // 20, 1, 40))
    assert resize_pad_params(0, 0, 1, 1, 3).tolist() == [[1, 1, 0, 0]] * 3
    with pytest.raises(SanitizeError, match="min_frac"):
        resize_pad_params(0, 0, 8, 8, 1, 0.0)


def test_resize_pad_reference_hand_value():
    img = np.array([[[0.0], [100.0]], [[200.0], [40.0]]], np.float32)
    # 2x2 -> 1x1: s = (0 + 0.5) * 2 - 0.5 = 0.5 on both axes -> the mean, 85
    out = resize_pad_reference(img, (1, 1, 1, 0), fill=0.25)
    np.testing.assert_allclose(out[..., 0], [[0.25, 0.25], [85.0, 0.25]])
    u8 = resize_pad_reference(np.full((4, 4, 3), 200, np.uint8), (2, 2, 0, 2), fill=1.0)
    assert (u8[:2, 2:] == 200).all() and (u8[2:] == 255).all()
    np.testing.assert_allclose(resize_pad_reference(img, (2, 2, 0, 0)),
                               bilinear_resize_reference(img, 2, 2))
    with pytest.raises(SanitizeError, match="do not fit"):
        resize_pad_reference(img, (2, 2, 1, 0))


def test_batch_helpers_round_trip_and_colour_order():
    imgs = np.random.default_rng(2).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    batch = images_to_batch(imgs)
    assert batch.shape == (3, 3, 5, 7) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[:, 0] * 255, imgs[..., 2].astype(np.float32))  # R
    np.testing.assert_array_equal(batch_to_images(batch), imgs)


def test_errors_are_typed():
    assert issubclass(SanitizeError, RoadshieldError) and issubclass(SanitizeError, ValueError)
    with pytest.raises(SanitizeError, match="uint8"):
        jpeg_dct_reference(np.zeros((4, 4, 4), np.uint8))
