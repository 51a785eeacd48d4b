"""The CUDA sanitize chain on the emulated launcher (kernels.emulator: device memory in
host arrays, each kernel replaced by its reference), so the wiring runs without a GPU:
spec parsing, refusals, pointer offsets and strides of every launch, the stream, the
write into a TensorRT engine's input buffer, and the errors without a GPU.

Expected values: the CPU sanitizers on the crop (bitdepth and median are bit-exact with
the kernels; jpeg is the DCT reference the emulator runs) followed by
kernels.reference.preprocess_roi_reference, the fused kernel's formula. The same chain
on a real GPU is compared with the CPU in the ``gpu`` test at the end.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from test_tensorrt_runner import FakeTRT, expected_logits, write_engine

from edge_runtime.preprocess import PreprocessError, preprocess_batch
from edge_runtime.runners.tensorrt_runner import TensorRTRunner
from edge_runtime.sanitize import (
    DEFAULT_CHAIN,
    SanitizeChain,
    SanitizeError,
    bitdepth,
    build_chain,
    median,
    split_device,
)
from edge_runtime.sanitize_cuda import CudaSanitizeChain
from kernels import loader
from kernels.emulator import EmulatedLauncher
from kernels.loader import DeviceArray
from kernels.reference import preprocess_roi_reference
from kernels.sanitize_reference import jpeg_dct_reference
from roadshield_base.errors import BackendUnavailableError, ConfigError

FRAME = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
BOXES = [(5, 4, 29, 30), (-3, 20, 17.5, 60), (40, 0, 64, 12)]  # the 2nd is clamped


def _clamped(box: tuple) -> tuple[int, int, int, int]:
    x0, y0 = max(int(np.floor(box[0])), 0), max(int(np.floor(box[1])), 0)
    return x0, y0, min(int(np.ceil(box[2])), 64), min(int(np.ceil(box[3])), 48)


def _expected(steps, size: int = 16) -> np.ndarray:
    """CPU sanitizers on each crop, then the fused preprocess formula."""
    rows = []
    for box in BOXES:
        x0, y0, x1, y1 = _clamped(box)
        crop = FRAME[y0:y1, x0:x1]
        for step in steps:
            crop = step(crop)
        rows.append(preprocess_roi_reference(np.ascontiguousarray(crop),
                                             (0, 0, x1 - x0, y1 - y0), size)[0])
    return np.stack(rows)


@pytest.fixture
def dev() -> EmulatedLauncher:
    return EmulatedLauncher("Orin (emulated)", (8, 7))


def test_device_prefix_and_spec(dev: EmulatedLauncher) -> None:
    assert split_device("cuda:bitdepth:bits=5,median") == ("cuda", "bitdepth:bits=5,median")
    assert split_device(" CPU:median") == ("cpu", "median")
    assert split_device("bitdepth:bits=5") == (None, "bitdepth:bits=5")
    chain = build_chain("cuda:" + DEFAULT_CHAIN, launcher=dev)
    assert isinstance(chain, CudaSanitizeChain) and chain.device == "cuda"
    assert chain.spec == "cuda:bitdepth:bits=5,median:k=3,preprocess"
    assert build_chain(chain.spec, launcher=dev).spec == chain.spec
    same = build_chain(DEFAULT_CHAIN, device="cuda", launcher=dev)
    assert isinstance(same, CudaSanitizeChain)
    cpu = build_chain("cpu:" + DEFAULT_CHAIN)
    assert type(cpu) is SanitizeChain and cpu.device == "cpu" and not cpu.attach_runner(None)
    with pytest.raises(ConfigError, match="names device 'cuda' but device='cpu'"):
        build_chain("cuda:median", device="cpu")
    with pytest.raises(ConfigError, match="names no step"):
        build_chain("cuda:")
    with pytest.raises(ConfigError, match="unknown"):
        build_chain("median", device="tpu")
    with pytest.raises(ConfigError, match="only apply to device 'cuda'"):
        build_chain("median", launcher=dev)


@pytest.mark.parametrize("spec,match", [
    ("cuda:resize_pad:seed=1,preprocess", "no GPU kernel"),
    ("cuda:median,preprocess,bitdepth", "after preprocess"),
    ("cuda:jpeg:quality=60", "method=dct"),
])
def test_steps_without_a_kernel_are_refused(dev: EmulatedLauncher, spec: str,
                                            match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        build_chain(spec, launcher=dev)
    assert "'cuda:' prefix" in info.value.hint or "method=dct" in info.value.hint


def test_default_chain_matches_the_cpu_steps(dev: EmulatedLauncher) -> None:
    chain = build_chain("cuda:" + DEFAULT_CHAIN, launcher=dev)
    out = chain(FRAME, BOXES, 16)
    assert isinstance(out, np.ndarray) and out.shape == (3, 3, 16, 16)
    np.testing.assert_array_equal(out, _expected([lambda c: bitdepth(c, 5),
                                                  lambda c: median(c, 3)]))
    # the CPU chain resizes with OpenCV's uint8 path: within one grey level
    cpu = build_chain(DEFAULT_CHAIN)(FRAME, BOXES, 16, preprocess=preprocess_batch)
    assert np.abs(out - cpu).max() <= 1.0 / 255 + 1e-6
    names = [launch[0] for launch in dev.launches]
    assert names == ["rs_bitdepth_u8"] + ["rs_median3_u8", "rs_preprocess_roi"] * 3
    assert chain.last_sanitize_ms > 0


def test_launch_arguments_address_each_crop_in_place(dev: EmulatedLauncher) -> None:
    chain = build_chain("cuda:bitdepth:bits=4,median:k=5,jpeg:method=dct:quality=60",
                        launcher=dev)
    out = chain(FRAME, BOXES, 12)
    np.testing.assert_array_equal(out, _expected([lambda c: bitdepth(c, 4),
                                                  lambda c: median(c, 5),
                                                  lambda c: jpeg_dct_reference(c, 60)], 12))
    work = dev.launches[0][3][1]  # the whole-frame bitdepth's destination
    medians = [launch for launch in dev.launches if launch[0] == "rs_median5_u8"]
    for (_, _, _, args, _), box in zip(medians, BOXES, strict=True):
        x0, y0, x1, y1 = _clamped(box)
        src, _, h, w, c, src_stride, dst_stride = args
        assert src == work + y0 * 64 * 3 + x0 * 3 and (h, w, c) == (y1 - y0, x1 - x0, 3)
        assert (src_stride, dst_stride) == (64 * 3, (x1 - x0) * 3)
    slots = [launch[3][-1] for launch in dev.launches if launch[0] == "rs_preprocess_roi"]
    assert np.diff(slots).tolist() == [3 * 12 * 12 * 4] * 2


def test_bitdepth_only_chain_preprocesses_from_the_frame(dev: EmulatedLauncher) -> None:
    chain = build_chain("cuda:bitdepth:bits=3:mode=truncate", launcher=dev)
    out = chain(FRAME, BOXES, 16)
    reduced = bitdepth(FRAME, 3, "truncate")
    expected = np.concatenate([preprocess_roi_reference(reduced, b, 16) for b in BOXES])
    np.testing.assert_array_equal(out, expected)
    assert [launch[0] for launch in dev.launches] == ["rs_bitdepth_u8"] + \
        ["rs_preprocess_roi"] * 3


def test_bad_boxes_frames_and_empty_batches(dev: EmulatedLauncher) -> None:
    chain = build_chain("cuda:median", launcher=dev)
    assert chain(FRAME, [], 16).shape == (0, 3, 16, 16)
    with pytest.raises(SanitizeError, match="lies outside"):
        chain(FRAME, [(70, 0, 90, 10)], 16)
    with pytest.raises(PreprocessError, match="channel"):  # as on the CPU
        chain(FRAME[..., :2], BOXES, 16)
    assert dev.launches == []  # nothing was queued for a refused frame


def test_buffers_are_reused_grown_and_freed(dev: EmulatedLauncher) -> None:
    chain = build_chain("cuda:median", launcher=dev)
    chain(FRAME, BOXES[:1], 16)
    first = dict(chain._buffers)
    chain(FRAME, BOXES[:1], 16)
    assert chain._buffers == first  # same frame and crop sizes: no new allocation
    big = np.zeros((96, 128, 3), np.uint8)
    chain(big, [(0, 0, 128, 96)], 16)
    assert chain._buffers["frame"][1] == big.nbytes
    chain.close()
    assert dev.memory == {} and not dev.closed  # the caller's launcher stays open


def test_attached_tensorrt_runner_gets_the_batch_in_its_input_buffer(
        dev: EmulatedLauncher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trt = FakeTRT(dev)
    monkeypatch.setitem(sys.modules, "tensorrt", trt.module)
    chain = build_chain("cuda:" + DEFAULT_CHAIN, launcher=dev)
    runner = TensorRTRunner(write_engine(tmp_path))
    assert chain.attach_runner(runner)
    with runner:
        assert runner.launcher is dev  # one launcher: one context, one stream
        dev.calls.clear()
        batch = chain(FRAME, BOXES, 16)
        assert isinstance(batch, DeviceArray)
        assert batch.address == runner.input_buffer().address
        assert batch.shape == (3, 3, 16, 16) and batch.dtype == np.float32
        stream = runner.stream.handle
        assert {c[2] for c in dev.calls if c[0] == "launch"} == {runner.stream.native}
        assert [c for c in dev.calls if c[0] in ("htod", "dtoh")] == [
            ("htod", chain._buffers["frame"][0], FRAME.nbytes, stream)]  # the frame only
        logits = runner.infer({"input": batch})["logits"]
        with pytest.raises(ConfigError, match="max batch 8"):
            chain(FRAME, BOXES * 3, 16)
        with pytest.raises(ConfigError, match="engine input"):
            chain(FRAME, BOXES, 12)
    expected = _expected([lambda c: bitdepth(c, 5), lambda c: median(c, 3)])
    np.testing.assert_allclose(logits, expected_logits(expected), rtol=1e-6)
    # once the runner is inactive the chain hands back host arrays again
    np.testing.assert_array_equal(chain(FRAME, BOXES, 16), expected)


def test_attach_ignores_other_runners(dev: EmulatedLauncher) -> None:
    chain = build_chain("cuda:median", launcher=dev)
    assert not chain.attach_runner(object())  # e.g. onnxruntime: host arrays


def test_no_gpu_is_a_backend_error_with_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> None:
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(loader, "_import", missing)
    with pytest.raises(BackendUnavailableError, match="on the GPU: no CUDA binding") as info:
        build_chain("cuda:" + DEFAULT_CHAIN)
    assert "drop the 'cuda:' prefix" in info.value.hint


def test_missing_kernel_build_is_a_backend_error(dev: EmulatedLauncher,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import kernels.ops as ops

    def no_nvcc(name: str, build_dir: Path | None = None) -> Path:
        raise BackendUnavailableError("nvcc was not found", "install the CUDA toolkit")

    monkeypatch.setattr(ops, "build_kernel", no_nvcc)
    bare = EmulatedLauncher()
    bare._modules.clear()  # as a real launcher starts: no module loaded
    with pytest.raises(BackendUnavailableError, match="nvcc was not found") as info:
        build_chain("cuda:median", launcher=bare)
    assert "make kernels" in info.value.hint


@pytest.mark.gpu
def test_cuda_chain_on_the_gpu_matches_the_cpu_chain(device: str) -> None:
    """On a CUDA device: the real kernels through the chain, against the CPU chain."""
    try:
        chain = build_chain("cuda:" + DEFAULT_CHAIN)
    except BackendUnavailableError as err:
        pytest.skip(str(err).splitlines()[0])
    with chain:
        out = chain(FRAME, BOXES, 16)
        frame = np.random.default_rng(5).integers(0, 256, (480, 640, 3), dtype=np.uint8)
        big = chain(frame, [(288, 208, 352, 272), (0, 0, 640, 480)], 32)
    np.testing.assert_allclose(out, _expected([lambda c: bitdepth(c, 5),
                                               lambda c: median(c, 3)]), atol=2e-5)
    cpu = build_chain(DEFAULT_CHAIN)(frame, [(288, 208, 352, 272), (0, 0, 640, 480)], 32)
    assert np.abs(big - cpu).max() <= 1.0 / 255 + 1e-5
