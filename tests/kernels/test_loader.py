"""The launcher interface without a GPU: argument packing, binding selection errors,
and the launch geometry/arguments CudaKernels hands to a launcher (checked against
the kernels' C signatures by a recording launcher)."""

from __future__ import annotations

import ctypes
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

from kernels import loader
from kernels.build import KERNELS, SOURCE_DIR
from kernels.loader import (
    CudaCallError,
    KernelArg,
    KernelLauncher,
    as_ctypes_tuple,
    as_numpy_scalars,
    create_launcher,
    f32,
    i32,
    ptr,
    size_t,
)
from kernels.ops import CudaKernels
from kernels.reference import RoiError
from roadshield_base.errors import BackendUnavailableError, ConfigError


class RecordingLauncher(KernelLauncher):
    """Records launches; memory calls are not needed by the pointer API."""

    binding = "recording"

    def __init__(self) -> None:
        super().__init__()
        self.launches: list[tuple[str, tuple, tuple, list[KernelArg], int]] = []

    def _load_image(self, image: bytes) -> Any:
        return image

    def _get_function(self, module: Any, kernel: str) -> Any:
        return kernel

    def _launch(self, function: Any, grid: Any, block: Any, args: Sequence[KernelArg],
                shared_bytes: int, stream: Any) -> None:
        self.launches.append((function, grid, block, list(args), shared_bytes))

    def alloc(self, nbytes: int) -> int:
        raise AssertionError("not used")

    free = copy_htod = copy_dtoh = copy_dtod = alloc  # type: ignore[assignment]
    create_stream = destroy_stream = synchronize_stream = alloc  # type: ignore[assignment]
    copy_htod_async = copy_dtoh_async = alloc  # type: ignore[assignment]
    device_name = compute_capability = alloc  # type: ignore[assignment]

    def synchronize(self) -> None:
        return None

    def time_ms(self, fn: Callable[[], None], repeats: int = 10) -> float:
        return 0.0

    def close(self) -> None:
        return None


def _signatures() -> dict[str, list[type]]:
    """Parameter ctypes of every extern "C" kernel, parsed from the .cu sources."""
    sigs = {}
    for name in KERNELS:
        text = (SOURCE_DIR / f"{name}.cu").read_text()
        for kernel, params in re.findall(r'extern "C" __global__ void (\w+)\(([^)]*)\)', text):
            types = []
            for param in params.split(","):
                kind = ctypes.c_void_p if "*" in param else (
                    ctypes.c_uint64 if "size_t" in param else ctypes.c_int32)
                types.append(kind)
            sigs[kernel] = types
    return sigs


def test_every_launch_matches_the_kernel_signature(
        kernels: tuple[CudaKernels, RecordingLauncher]) -> None:
    ops, rec = kernels
    ops.bitdepth(1, 2, 100, 4)
    ops.median(1, 2, 8, 8, 1, 3)
    ops.median(1, 2, 8, 8, 1, 5)
    ops.jpeg(1, 2, 8, 8, 50)
    ops.preprocess_roi(1, 8, 8, (0, 0, 8, 8), 4, 2)
    ops.preprocess_rois(1, 8, 8, 3, 2, 4, 2)
    sigs = _signatures()
    assert {launch[0] for launch in rec.launches} == set(sigs)
    for name, _, _, args, _ in rec.launches:
        assert [t for _, t in args] == sigs[name], name


@pytest.fixture
def kernels() -> tuple[CudaKernels, RecordingLauncher]:
    rec = RecordingLauncher()
    for name in ("bitdepth", "median", "jpeg_dct", "fused_preprocess"):
        rec.load(name, b"image")  # already loaded: CudaKernels does not build
    return CudaKernels(rec), rec


def test_argument_packing_for_both_bindings() -> None:
    args = [ptr(0x7F0000001000), i32(-3), size_t(2**40), f32(0.5)]
    scalars = as_numpy_scalars(args)
    assert [s.dtype for s in scalars] == [np.uint64, np.int32, np.uint64, np.float32]
    assert int(scalars[0]) == 0x7F0000001000 and int(scalars[2]) == 2**40
    values, types = as_ctypes_tuple(args)
    assert values == (0x7F0000001000, -3, 2**40, 0.5)
    assert types == (ctypes.c_void_p, ctypes.c_int32, ctypes.c_uint64, ctypes.c_float)
    with pytest.raises(CudaCallError, match="not supported"):
        as_numpy_scalars([(1, ctypes.c_int16)])


def test_no_binding_is_a_backend_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> Any:
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(loader, "_import", missing)
    with pytest.raises(BackendUnavailableError, match="no CUDA binding") as info:
        create_launcher()
    assert "pycuda" in str(info.value) and "cuda-python" in str(info.value)
    with pytest.raises(BackendUnavailableError, match="unknown CUDA binding"):
        create_launcher("opencl")


def test_launch_needs_a_loaded_module_and_valid_dims() -> None:
    rec = RecordingLauncher()
    with pytest.raises(CudaCallError, match="not loaded"):
        rec.launch("median", "rs_median3_u8", (1,), (1,), [])
    rec.load("median", b"x")
    with pytest.raises(CudaCallError, match="positive"):
        rec.launch("median", "rs_median3_u8", (0,), (1,), [])
    rec.launch("median", "rs_median3_u8", (2, 3), (16, 16), [])
    assert rec.launches[-1][1:3] == ((2, 3, 1), (16, 16, 1))


def test_bitdepth_geometry(kernels: tuple[CudaKernels, RecordingLauncher]) -> None:
    ops, rec = kernels
    ops.bitdepth(0x1000, 0x2000, 1920 * 1080 * 3, 5)
    name, grid, block, args, _ = rec.launches[-1]
    assert name == "rs_bitdepth_u8" and block == (256, 1, 1)
    # 16 bytes per thread: grid * 256 * 16 covers the frame.
    assert grid[0] * 256 * 16 >= 1920 * 1080 * 3 > (grid[0] - 1) * 256 * 16
    assert [v for v, _ in args] == [0x1000, 0x2000, 1920 * 1080 * 3, 5, 1]  # 1: "round"
    ops.bitdepth(0x1000, 0x2000, 10, 5, mode="truncate")
    assert rec.launches[-1][3][-1][0] == 0
    with pytest.raises(ConfigError, match="bit depth"):
        ops.bitdepth(0x1000, 0x2000, 10, 0)


def test_median_geometry(kernels: tuple[CudaKernels, RecordingLauncher]) -> None:
    ops, rec = kernels
    ops.median(0x1000, 0x2000, 33, 17, 3, 5)
    name, grid, block, args, shared = rec.launches[-1]
    assert (name, grid, block) == ("rs_median5_u8", (2, 3, 1), (16, 16, 1))
    assert shared == 20 * 20 * 3
    assert [v for v, _ in args] == [0x1000, 0x2000, 33, 17, 3, 17 * 3, 17 * 3]
    with pytest.raises(ConfigError, match="in place"):
        ops.median(0x1000, 0x1000, 8, 8, 1, 3)


def test_jpeg_geometry(kernels: tuple[CudaKernels, RecordingLauncher]) -> None:
    ops, rec = kernels
    ops.jpeg(0x1000, 0x1000, 9, 17, 75, bgr=False, src_stride=64)
    name, grid, block, args, _ = rec.launches[-1]
    assert (name, grid, block) == ("rs_jpeg_u8", (3, 2, 1), (8, 8, 1))
    assert [v for v, _ in args] == [0x1000, 0x1000, 9, 17, 64, 51, 75, 0]
    with pytest.raises(ConfigError, match="quality"):
        ops.jpeg(0x1000, 0x2000, 8, 8, 101)


def test_preprocess_clamps_the_box(kernels: tuple[CudaKernels, RecordingLauncher]) -> None:
    ops, rec = kernels
    assert ops.preprocess_roi(0x1000, 48, 64, (-5.5, 2.2, 80, 40), 33, 0x9000) == (0, 2, 64, 40)
    name, grid, block, args, _ = rec.launches[-1]
    assert (name, grid, block) == ("rs_preprocess_roi", (3, 3, 1), (16, 16, 1))
    assert [v for v, _ in args] == [0x1000, 48, 64, 64 * 3, 0, 2, 64, 40, 33, 0x9000]
    with pytest.raises(RoiError, match="empty"):
        ops.preprocess_roi(0x1000, 48, 64, (70, 0, 90, 10), 33, 0x9000)
    ops.preprocess_rois(0x1000, 48, 64, 0x5000, 7, 32, 0x9000)
    assert rec.launches[-1][1] == (2, 2, 7)
