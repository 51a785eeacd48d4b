"""The kernels' shared math (pixel_math.cuh), built for the host, against NumPy.

Where expected values come from:
- bitdepth: "truncate" y = (x >> (8 - bits)) << (8 - bits) and "round"
  y = round(round(x L / 255) * 255 / L), L = 2**bits - 1, over all 256 x 8 inputs;
  also kernels.sanitize_reference, the CPU sanitizers' reference.
- median: cv2.medianBlur and a NumPy edge-padded window median (bit-exact).
- preprocess: kernels.reference (float64). The kernel runs in float32: the source
  coordinate s is off by at most a few float32 ulps of n_src, and the output is
  continuous in s with slope at most 1 (in [0, 1] units), so the tolerance is
  4 * n_src * 2**-24 + 1e-6.
- jpeg: jpeg_numpy.py (float64, written from the JPEG/IJG formulas). The kernel's
  float32 DCT can round a coefficient that sits within float error of a half step
  the other way, which moves a few pixels; the tolerance is therefore statistical:
  at least 99.9% of values equal and mean |difference| below 0.01 (99% and
  0.05 on the tiny edge shapes, where one flipped value is a large share).
Edge sizes 1x1, 7x9 and 4095x1 run through every operation.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from jpeg_numpy import CHROMA, LUMA, dct_matrix, ijg_table, jpeg_reference

from kernels.host import HostMath, load_host_math
from kernels.reference import RoiError, linear_taps, preprocess_roi_reference
from roadshield_base.errors import BackendUnavailableError, ConfigError

EDGE_SHAPES = [(1, 1), (7, 9), (4095, 1)]


@pytest.fixture(scope="module")
def host() -> HostMath:
    try:
        return load_host_math()
    except BackendUnavailableError as err:
        pytest.skip(f"no compiler for the host math library: {err}")


def _image(h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    shape = (h, w) if c == 1 else (h, w, c)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _median_numpy(image: np.ndarray, k: int) -> np.ndarray:
    r = k // 2
    img = image if image.ndim == 3 else image[..., None]
    padded = np.pad(img, ((r, r), (r, r), (0, 0)), mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (k, k), axis=(0, 1))
    med = np.median(windows.reshape(*windows.shape[:3], k * k), axis=-1).astype(np.uint8)
    return med if image.ndim == 3 else med[..., 0]


def test_bitdepth_exhaustive(host: HostMath) -> None:
    x = np.arange(256, dtype=np.uint8)
    for bits in range(1, 9):
        truncated = (x >> (8 - bits)) << (8 - bits)
        np.testing.assert_array_equal(host.bitdepth(x, bits, "truncate"), truncated)
        levels = 2**bits - 1
        q = np.floor(x.astype(np.float64) * levels / 255 + 0.5)  # never exactly k + 1/2
        rounded = np.floor(q * 255 / levels + 0.5).astype(np.uint8)
        np.testing.assert_array_equal(host.bitdepth(x, bits, "round"), rounded)
    # By hand: 4 bits keeps the high nibble, or rounds 0xAB = 171 to 10 * 17 = 170.
    assert host.bitdepth(np.array([0xAB], np.uint8), 4, "truncate")[0] == 0xA0
    assert host.bitdepth(np.array([0xAB], np.uint8), 4, "round")[0] == 170
    np.testing.assert_array_equal(host.bitdepth(x, 1, "round"), np.where(x >= 128, 255, 0))
    np.testing.assert_array_equal(host.bitdepth(x, 8), x)


def test_bitdepth_matches_cpu_sanitizer_reference(host: HostMath) -> None:
    from kernels import sanitize_reference as ref

    x = np.arange(256, dtype=np.uint8)
    for mode in ("round", "truncate"):
        for bits in range(1, 9):
            np.testing.assert_array_equal(host.bitdepth(x, bits, mode),
                                          ref.bitdepth_reference(x, bits, mode))


@pytest.mark.parametrize("mode", ["round", "truncate"])
def test_bitdepth_packed_path_matches_bytewise(host: HostMath, mode: str) -> None:
    data = _image(64, 64, 4, seed=1)
    words = data.reshape(-1).view(np.uint32)
    for bits in range(1, 9):
        packed = host.bitdepth_packed(words, bits, mode).view(np.uint8).reshape(data.shape)
        np.testing.assert_array_equal(packed, host.bitdepth(data, bits, mode))


@pytest.mark.parametrize("shape", EDGE_SHAPES)
def test_bitdepth_edge_shapes(host: HostMath, shape: tuple[int, int]) -> None:
    img = _image(*shape)
    np.testing.assert_array_equal(host.bitdepth(img, 3, "truncate"), (img >> 5) << 5)
    lut = host.bitdepth(np.arange(256, dtype=np.uint8), 3)
    np.testing.assert_array_equal(host.bitdepth(img, 3), lut[img])


@pytest.mark.parametrize("bits", [0, 9, -1, 2.5, True])
def test_bitdepth_rejects_bad_bits(host: HostMath, bits: object) -> None:
    with pytest.raises(ConfigError, match="bit depth"):
        host.bitdepth(np.zeros(4, np.uint8), bits)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="mode"):
        host.bitdepth(np.zeros(4, np.uint8), 4, "floor")


@pytest.mark.parametrize("ksize", [3, 5])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_median_matches_opencv(host: HostMath, ksize: int, channels: int) -> None:
    img = _image(37, 53, channels, seed=ksize * 10 + channels)
    got = host.median(img, ksize)
    np.testing.assert_array_equal(got, cv2.medianBlur(img, ksize))
    np.testing.assert_array_equal(got, _median_numpy(img, ksize))


@pytest.mark.parametrize("ksize", [3, 5])
@pytest.mark.parametrize("shape", EDGE_SHAPES)
def test_median_edge_shapes(host: HostMath, ksize: int, shape: tuple[int, int]) -> None:
    img = _image(*shape, seed=2)
    got = host.median(img, ksize)
    np.testing.assert_array_equal(got, _median_numpy(img, ksize))
    np.testing.assert_array_equal(got, cv2.medianBlur(img, ksize))


def test_median_matches_cpu_sanitizer_reference(host: HostMath) -> None:
    from kernels import sanitize_reference as ref

    for ksize in (3, 5):
        for shape in EDGE_SHAPES + [(31, 45)]:
            img = _image(*shape, seed=ksize)
            np.testing.assert_array_equal(host.median(img, ksize),
                                          ref.median_reference(img, ksize))


def test_median_by_hand(host: HostMath) -> None:
    # One bright outlier in a flat 3x3 patch disappears; a single pixel is its own median.
    img = np.full((3, 3), 10, np.uint8)
    img[1, 1] = 250
    np.testing.assert_array_equal(host.median(img, 3), np.full((3, 3), 10, np.uint8))
    assert host.median(np.array([[7]], np.uint8), 5)[0, 0] == 7
    with pytest.raises(ConfigError, match="median window"):
        host.median(img, 7)


@pytest.mark.parametrize("n_src,n_dst", [(2, 4), (4, 2), (5, 5), (1, 7), (4095, 32), (9, 224)])
def test_linear_taps_match_reference(host: HostMath, n_src: int, n_dst: int) -> None:
    i0, i1, w = host.linear_taps(n_src, n_dst)
    r0, r1, rw = linear_taps(n_src, n_dst)
    # Compare the sampled source position i0 + w; float32 may put an integer s on
    # either side of a tap boundary, which leaves the position (and output) unchanged.
    np.testing.assert_allclose(i0 + w.astype(np.float64), r0 + rw,
                               atol=4 * n_src * 2.0**-24 + 1e-7)
    assert np.all((i1 == np.minimum(i0 + 1, n_src - 1)) & (i0 >= 0) & (i1 < n_src))


@pytest.mark.parametrize("shape,box,size", [
    ((48, 64), (5, 7, 45, 40), 32),
    ((48, 64), (-10.5, 3.2, 200, 47.9), 16),
    ((1, 1), (0, 0, 1, 1), 8),
    ((7, 9), (0, 0, 9, 7), 5),
    ((4095, 1), (0, 0, 1, 4095), 32),
    ((4095, 1), (0, 100, 1, 101), 1),
])
def test_preprocess_matches_reference(host: HostMath, shape: tuple[int, int], box: tuple,
                                      size: int) -> None:
    frame = _image(*shape, seed=3)
    got = host.preprocess_roi(frame, box, size)
    expected = preprocess_roi_reference(frame, box, size)
    assert got.shape == expected.shape == (1, 3, size, size) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=4 * max(shape) * 2.0**-24 + 1e-6, rtol=0)


def test_preprocess_swaps_channels_and_scales(host: HostMath) -> None:
    frame = np.zeros((4, 4, 3), np.uint8)
    frame[..., 0] = 255  # pure blue in BGR
    out = host.preprocess_roi(frame, (0, 0, 4, 4), 2)
    np.testing.assert_array_equal(out[0, 2], 1.0)  # B is the last RGB channel
    np.testing.assert_array_equal(out[0, :2], 0.0)


def test_preprocess_rejects_empty_box(host: HostMath) -> None:
    with pytest.raises(RoiError, match="empty"):
        host.preprocess_roi(_image(8, 8), (10, 10, 20, 20), 4)


@pytest.mark.parametrize("quality", [1, 10, 49, 50, 75, 90, 100])
def test_jpeg_tables_follow_ijg(host: HostMath, quality: int) -> None:
    np.testing.assert_array_equal(host.jpeg_qtable(quality), ijg_table(LUMA, quality))
    np.testing.assert_array_equal(host.jpeg_qtable(quality, chroma=True),
                                  ijg_table(CHROMA, quality))


def test_jpeg_tables_by_hand(host: HostMath) -> None:
    np.testing.assert_array_equal(host.jpeg_qtable(50), LUMA)  # scale 100%: the base table
    np.testing.assert_array_equal(host.jpeg_qtable(100), 1)  # scale 0%: clamped to 1
    assert host.jpeg_qtable(75)[0, 0] == 8  # (16 * 50 + 50) // 100
    assert host.jpeg_qtable(1, chroma=True)[0, 0] == 255  # 17 * 5000 / 100 clamps to 255
    with pytest.raises(ConfigError, match="quality"):
        host.jpeg_qtable(0)


def test_dct_basis_is_orthonormal(host: HostMath) -> None:
    basis = host.dct_basis().astype(np.float64)
    np.testing.assert_allclose(basis, dct_matrix(), atol=1e-7)
    np.testing.assert_allclose(basis @ basis.T, np.eye(8), atol=1e-6)


def _agreement(got: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    diff = np.abs(got.astype(np.int32) - expected.astype(np.int32))
    return float(np.mean(diff == 0)), float(diff.mean())


@pytest.mark.parametrize("quality", [10, 50, 75, 95])
def test_jpeg_matches_numpy_reference(host: HostMath, quality: int) -> None:
    # A smooth image with noise, so blocks carry both low and high frequencies.
    yy, xx = np.mgrid[0:61, 0:83]
    base = np.stack([xx * 3, yy * 4, (xx + yy) * 2], -1).astype(np.float64)
    noise = np.random.default_rng(quality).normal(0, 12, base.shape)
    img = np.clip(base + noise, 0, 255).astype(np.uint8)
    for bgr in (True, False):
        equal, mean_abs = _agreement(host.jpeg(img, quality, bgr=bgr),
                                     jpeg_reference(img, quality, bgr=bgr))
        assert equal >= 0.999 and mean_abs < 0.01, (quality, bgr, equal, mean_abs)


@pytest.mark.parametrize("quality", [10, 50, 90])
def test_jpeg_matches_cpu_sanitizer_reference(host: HostMath, quality: int) -> None:
    from kernels import sanitize_reference as ref

    img = _image(53, 70, seed=quality)
    np.testing.assert_array_equal(ref.jpeg_quant_tables(quality)[0], host.jpeg_qtable(quality))
    np.testing.assert_array_equal(ref.jpeg_quant_tables(quality)[1],
                                  host.jpeg_qtable(quality, chroma=True))
    equal, mean_abs = _agreement(host.jpeg(img, quality), ref.jpeg_dct_reference(img, quality))
    assert equal >= 0.999 and mean_abs < 0.01, (quality, equal, mean_abs)


@pytest.mark.parametrize("shape", EDGE_SHAPES)
def test_jpeg_edge_shapes(host: HostMath, shape: tuple[int, int]) -> None:
    img = _image(*shape, seed=4)
    got = host.jpeg(img, 50)
    assert got.shape == img.shape
    equal, mean_abs = _agreement(got, jpeg_reference(img, 50))
    assert equal >= 0.99 and mean_abs < 0.05, (shape, equal, mean_abs)


def test_jpeg_flat_image_survives_and_quality_orders_error(host: HostMath) -> None:
    flat = np.full((16, 16, 3), (30, 140, 220), np.uint8)
    # A flat block has only a DC term, well inside every quantisation step here.
    assert np.abs(host.jpeg(flat, 90).astype(int) - flat).max() <= 2
    img = _image(64, 64, seed=5)
    errors = [np.abs(host.jpeg(img, q).astype(int) - img).mean() for q in (10, 50, 95)]
    assert errors[0] > errors[1] > errors[2]
