"""kernels.emulator: CudaKernels' array calls on the emulated launcher give the reference
results (so the launch geometry, argument order and buffer sizes of ops.py are consistent
with the kernels' semantics), and a device access outside an allocation is an error."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from kernels.emulator import EmulatedLauncher
from kernels.loader import CudaCallError, DeviceArray
from kernels.ops import CudaKernels
from kernels.reference import preprocess_roi_reference
from kernels.sanitize_reference import bitdepth_reference, jpeg_dct_reference


@pytest.fixture
def ops() -> CudaKernels:
    return CudaKernels(EmulatedLauncher())


def _image(h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


@pytest.mark.parametrize("shape", [(1, 1), (7, 9), (4095, 1), (33, 47)])
def test_array_calls_match_the_references(ops: CudaKernels, shape: tuple[int, int]) -> None:
    img = _image(*shape)
    np.testing.assert_array_equal(ops.bitdepth_array(img, 3), bitdepth_reference(img, 3))
    np.testing.assert_array_equal(ops.bitdepth_array(img, 6, "truncate"), (img >> 2) << 2)
    for k in (3, 5):
        np.testing.assert_array_equal(ops.median_array(img, k), cv2.medianBlur(img, k))
    np.testing.assert_array_equal(ops.median_array(img[..., :1], 3)[..., 0],
                                  cv2.medianBlur(np.ascontiguousarray(img[..., 0]), 3))
    np.testing.assert_array_equal(ops.jpeg_array(img, 40), jpeg_dct_reference(img, 40))
    np.testing.assert_array_equal(ops.jpeg_array(img[..., ::-1], 40, bgr=False),
                                  jpeg_dct_reference(img, 40)[..., ::-1])
    box = (0, 0, shape[1], shape[0])
    np.testing.assert_array_equal(ops.preprocess_array(img, box, 8),
                                  preprocess_roi_reference(img, box, 8))


def test_batched_preprocess_matches_single_rois(ops: CudaKernels) -> None:
    img = _image(60, 80, seed=1)
    boxes = [(0, 0, 20, 20), (10, 5, 80, 60), (-5, -5, 10, 70)]
    batch = ops.preprocess_batch_array(img, boxes, 12)
    for i, box in enumerate(boxes):
        np.testing.assert_array_equal(batch[i], ops.preprocess_array(img, box, 12)[0])


def test_out_of_bounds_and_bad_frees_are_errors() -> None:
    dev = EmulatedLauncher()
    ops = CudaKernels(dev)
    src = dev.alloc(8 * 8 * 3)
    dst = dev.alloc(8 * 8 * 3)
    with pytest.raises(CudaCallError, match="outside every allocation"):
        ops.median(src, dst, 9, 8, 3, 3)  # one row more than was allocated
    with pytest.raises(CudaCallError, match="outside every allocation"):
        ops.preprocess_roi(src, 8, 8, (0, 0, 8, 8), 8, dst)  # 768 floats do not fit
    with pytest.raises(CudaCallError, match="not an allocation"):
        dev.free(src + 1)
    with pytest.raises(CudaCallError, match="no GPU clock"):
        dev.time_ms(lambda: None)
    with pytest.raises(CudaCallError, match="not valid"):
        DeviceArray(0, (1,), np.float32)
    dev.free(src)
    dev.free(dst)
    assert dev.memory == {}
    assert DeviceArray(16, (2, 3), np.float32).nbytes == 24


def test_streams_and_async_copies_are_recorded() -> None:
    dev = EmulatedLauncher("Orin", (8, 7))
    stream = dev.create_stream()
    host = np.arange(10, dtype=np.float32)
    address = dev.alloc(host.nbytes)
    dev.copy_htod_async(address, host, stream)
    back = np.empty_like(host)
    dev.copy_dtoh_async(back, address, stream)
    dev.synchronize_stream(stream)
    np.testing.assert_array_equal(back, host)
    assert [c[0] for c in dev.calls] == ["create_stream", "alloc", "htod", "dtoh", "sync"]
    assert dev.calls[2][3] == stream.handle
    assert (dev.device_name(), dev.compute_capability()) == ("Orin", (8, 7))
