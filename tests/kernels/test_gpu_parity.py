"""Each CUDA kernel, launched through every usable binding, against the CPU.

Expected values: the bitdepth formula; cv2.medianBlur; kernels.reference (float64
preprocess, tolerance 4 * n_src * 2**-24 + 1e-6 as in test_host_math); the host
build of the same pixel_math.cuh (bit-exact: both sides compile without FMA
contraction and run the same operations in the same order); and jpeg_numpy.py
(statistical tolerance, see test_host_math). Skipped without a CUDA device (the
``device`` fixture), a binding (pycuda / cuda-python), or nvcc / prebuilt fatbins.
"""

from __future__ import annotations

from collections.abc import Iterator

import cv2
import numpy as np
import pytest
from jpeg_numpy import jpeg_reference

from kernels.host import HostMath, load_host_math
from kernels.loader import BINDINGS, create_launcher
from kernels.ops import CudaKernels
from kernels.reference import preprocess_roi_reference
from roadshield_base.errors import BackendUnavailableError

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("device")]
SHAPES = [(1, 1), (7, 9), (4095, 1), (67, 131)]


@pytest.fixture(scope="module", params=BINDINGS)
def ops(request: pytest.FixtureRequest) -> Iterator[CudaKernels]:
    """The kernels on one binding; skips where the binding, a GPU or the fatbins are missing
    (fatbins are built with nvcc, or taken prebuilt from the build folder)."""
    # Same check as conftest's (function-scoped) ``device``, which cannot serve a module fixture.
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    try:
        launcher = create_launcher(request.param)
    except BackendUnavailableError as err:
        pytest.skip(f"{request.param}: {str(err).splitlines()[0]}")
    with launcher:
        try:
            kernels = CudaKernels(launcher)
        except BackendUnavailableError as err:
            pytest.skip(str(err).splitlines()[0])
        yield kernels


@pytest.fixture(scope="module")
def host() -> HostMath:
    try:
        return load_host_math()
    except BackendUnavailableError as err:
        pytest.skip(str(err))


def _image(h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    shape = (h, w) if c == 1 else (h, w, c)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize("nbytes", [1, 15, 16, 4096 + 7, 3 * 1920 * 1080 + 5])
def test_bitdepth(ops: CudaKernels, host: HostMath, nbytes: int) -> None:
    data = _image(1, nbytes, 1, seed=nbytes)[0]
    for bits in (1, 3, 5, 8):
        np.testing.assert_array_equal(ops.bitdepth_array(data, bits, "truncate"),
                                      (data >> (8 - bits)) << (8 - bits))
        np.testing.assert_array_equal(ops.bitdepth_array(data, bits, "round"),
                                      host.bitdepth(data, bits, "round"))


def test_bitdepth_unaligned_pointers_take_the_byte_path(ops: CudaKernels) -> None:
    data = _image(1, 1000, 1, seed=9)[0]
    launcher = ops.launcher
    src = launcher.to_device(data)
    dst = launcher.alloc(1001)
    try:
        ops.bitdepth(src + 1, dst + 1, 999, 2, mode="truncate")
        launcher.synchronize()
        out = launcher.from_device(dst + 1, (999,), np.uint8)
    finally:
        launcher.free(src)
        launcher.free(dst)
    np.testing.assert_array_equal(out, (data[1:] >> 6) << 6)


@pytest.mark.parametrize("ksize", [3, 5])
@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("shape", SHAPES)
def test_median(ops: CudaKernels, host: HostMath, ksize: int, channels: int,
                shape: tuple[int, int]) -> None:
    img = _image(*shape, c=channels, seed=ksize + channels)
    got = ops.median_array(img, ksize)
    np.testing.assert_array_equal(got, cv2.medianBlur(img, ksize))
    np.testing.assert_array_equal(got, host.median(img, ksize))


@pytest.mark.parametrize("quality", [10, 50, 90])
@pytest.mark.parametrize("shape", SHAPES)
def test_jpeg(ops: CudaKernels, host: HostMath, quality: int, shape: tuple[int, int]) -> None:
    img = _image(*shape, seed=quality)
    got = ops.jpeg_array(img, quality)
    np.testing.assert_array_equal(got, host.jpeg(img, quality))
    diff = np.abs(got.astype(int) - jpeg_reference(img, quality).astype(int))
    assert np.mean(diff == 0) >= 0.99 and diff.mean() < 0.05


def test_jpeg_in_place(ops: CudaKernels, host: HostMath) -> None:
    img = _image(37, 45, seed=3)
    launcher = ops.launcher
    buf = launcher.to_device(img)
    try:
        ops.jpeg(buf, buf, 37, 45, 60)
        launcher.synchronize()
        out = launcher.from_device(buf, img.shape, np.uint8)
    finally:
        launcher.free(buf)
    np.testing.assert_array_equal(out, host.jpeg(img, 60))


@pytest.mark.parametrize("shape,box,size", [
    ((480, 640), (100, 50, 300, 260), 224),
    ((480, 640), (-20, -20, 30.5, 700), 32),
    ((1, 1), (0, 0, 1, 1), 8),
    ((7, 9), (0, 0, 9, 7), 5),
    ((4095, 1), (0, 0, 1, 4095), 32),
])
def test_preprocess(ops: CudaKernels, host: HostMath, shape: tuple[int, int], box: tuple,
                    size: int) -> None:
    frame = _image(*shape, seed=size)
    got = ops.preprocess_array(frame, box, size)
    np.testing.assert_array_equal(got, host.preprocess_roi(frame, box, size))
    np.testing.assert_allclose(got, preprocess_roi_reference(frame, box, size),
                               atol=4 * max(shape) * 2.0**-24 + 1e-6, rtol=0)


def test_preprocess_writes_into_a_slot_of_a_caller_buffer(ops: CudaKernels) -> None:
    frame = _image(120, 160, seed=11)
    size = 24
    launcher = ops.launcher
    sentinel = np.full((3, 3, size, size), -1.0, np.float32)
    src = launcher.to_device(frame)
    out = launcher.to_device(sentinel)  # stands in for an engine's input binding
    try:
        slot = out + 1 * 3 * size * size * 4  # batch index 1
        ops.preprocess_roi(src, 120, 160, (10, 20, 90, 100), size, slot)
        launcher.synchronize()
        got = launcher.from_device(out, sentinel.shape, np.float32)
    finally:
        launcher.free(src)
        launcher.free(out)
    np.testing.assert_array_equal(got[0], -1.0)
    np.testing.assert_array_equal(got[2], -1.0)
    np.testing.assert_allclose(got[1], preprocess_roi_reference(frame, (10, 20, 90, 100),
                                                                size)[0], atol=1e-5)


def test_preprocess_batch_matches_single(ops: CudaKernels) -> None:
    frame = _image(200, 300, seed=12)
    boxes = [(0, 0, 50, 50), (100, 20, 290, 199), (299, 199, 300, 200), (-5, -5, 10, 400)]
    batch = ops.preprocess_batch_array(frame, boxes, 40)
    assert batch.shape == (4, 3, 40, 40)
    for i, box in enumerate(boxes):
        np.testing.assert_array_equal(batch[i], ops.preprocess_array(frame, box, 40)[0])
