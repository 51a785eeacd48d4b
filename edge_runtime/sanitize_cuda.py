"""The sanitizer chain on the GPU: the CUDA kernels of ``kernels/`` in place of the CPU steps.

``build_chain("cuda:bitdepth:bits=5,median:k=3,preprocess")`` (or ``device="cuda"``)
gives a ``CudaSanitizeChain``. Per frame it uploads the H x W x 3 uint8 BGR frame once
and queues, on one stream:

1. the leading ``bitdepth`` steps on the whole frame (a per-pixel rule, so
   crop-then-reduce equals reduce-then-crop, bit for bit);
2. per box (clamped to the frame, x1/y1 exclusive), the remaining crop steps on the
   crop alone, read in place from the frame with its row stride and written packed
   (a median replicates the crop's edge pixels, exactly as the CPU chain does);
3. the fused preprocess (crop -> bilinear -> RGB -> [0, 1] -> NCHW) of each box into
   row i of the model input.

Steps the GPU runs: ``bitdepth`` (both modes), ``median`` (k = 3, 5), ``jpeg`` with
``method=dct`` (the kernel is the DCT approximation; libjpeg's codec runs only on the
CPU). ``resize_pad`` and steps after ``preprocess`` (float batch steps) have no kernel
and are refused with a ``ConfigError``.

With a TensorRT runner attached (``attach_runner``; it then allocates on this chain's
launcher) the preprocess writes straight into the engine's input buffer on the
engine's stream and the call returns a ``kernels.loader.DeviceArray`` naming it, which
``TensorRTRunner.infer`` consumes without a host round trip. Otherwise the batch is
copied back and returned as a float32 (N, 3, size, size) ndarray, like the CPU chain.

``last_sanitize_ms`` is the host time of the whole call (upload, sanitizers and the
fused preprocess are queued together; with an engine attached the GPU work finishes
inside the engine's ``infer``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kernels.loader import CudaStream, DeviceArray, KernelLauncher, create_launcher
from kernels.ops import CudaKernels
from kernels.reference import Box, clamp_box
from roadshield_base.errors import BackendUnavailableError, ConfigError

from .preprocess import check_frame
from .runners.base import BaseRunner
from .runners.tensorrt_runner import TensorRTRunner
from .sanitize import SanitizeChain, SanitizeError, Sanitizer

GPU_STEPS = ("bitdepth", "median", "jpeg")
CPU_HINT = "drop the 'cuda:' prefix to run the same chain on the CPU"


def check_gpu_steps(steps: Sequence[Sanitizer], batch_steps: Sequence[Sanitizer]) -> None:
    """Refuse steps with no kernel (``ConfigError`` naming the step and the way out)."""
    if batch_steps:
        raise ConfigError(f"steps after preprocess ({[s.spec for s in batch_steps]}) have no "
                          "GPU kernel (they work on the float model input)",
                          f"put them before preprocess, or {CPU_HINT}")
    for step in steps:
        if step.name not in GPU_STEPS:
            raise ConfigError(f"sanitizer {step.name!r} has no GPU kernel",
                              f"the GPU runs {', '.join(GPU_STEPS)}; {CPU_HINT}")
        if step.name == "jpeg" and step.settings["method"] != "dct":
            raise ConfigError(f"{step.spec}: the GPU runs the DCT approximation of JPEG, "
                              "not libjpeg's codec",
                              "write jpeg:method=dct (see kernels/README.md for how it "
                              f"differs), or {CPU_HINT}")


class CudaSanitizeChain(SanitizeChain):
    """The chain's crop steps and the fused preprocess as CUDA kernels.

    launcher: the CUDA launcher (None: ``create_launcher()``, closed by ``close()``).
    kernels: the loaded kernels (None: ``CudaKernels(launcher, build_dir)``, which builds
        the fatbins with nvcc or takes them prebuilt from ``build_dir``).
    Raises ``BackendUnavailableError`` (with a hint) where no GPU, binding or kernel
    build is available, ``ConfigError`` for steps the GPU does not run.
    """

    device = "cuda"

    def __init__(self, steps: Sequence[Sanitizer], *, launcher: KernelLauncher | None = None,
                 kernels: CudaKernels | None = None, build_dir: Path | None = None) -> None:
        super().__init__(steps)
        check_gpu_steps(self.crop_steps, self.batch_steps)
        where = f"sanitizer chain {super().spec!r} on the GPU"
        try:
            self.launcher = launcher or create_launcher()
        except BackendUnavailableError as err:
            raise BackendUnavailableError(f"{where}: {str(err.args[0])}",
                                          f"{CPU_HINT}; or install pycuda / cuda-python on a "
                                          "machine with an NVIDIA GPU") from err
        self._owns_launcher = launcher is None
        self._stream: CudaStream | None = None
        self._runner: TensorRTRunner | None = None
        self._buffers: dict[str, tuple[int, int]] = {}
        try:
            self.ops = kernels or CudaKernels(self.launcher, build_dir)
        except BackendUnavailableError as err:
            self.close()
            raise BackendUnavailableError(f"{where}: {str(err.args[0])}",
                                          "build the kernels with `make kernels` (nvcc), or "
                                          f"copy build/kernels from a machine with nvcc; {CPU_HINT}"
                                          ) from err
        count = next((i for i, s in enumerate(self.crop_steps) if s.name != "bitdepth"),
                     len(self.crop_steps))
        self.lead = self.crop_steps[:count]      # per frame
        self.per_box = self.crop_steps[count:]   # per crop

    @property
    def spec(self) -> str:
        return "cuda:" + super().spec

    def __repr__(self) -> str:
        return f"CudaSanitizeChain({self.spec!r})"

    def attach_runner(self, runner: BaseRunner) -> bool:
        """Feed ``runner``'s device input directly when it is a TensorRT runner (it then
        allocates on this chain's launcher; attach before activating it). Returns whether
        it was attached; other runners get host arrays."""
        if not isinstance(runner, TensorRTRunner):
            return False
        runner.share_launcher(self.launcher)
        self._runner = runner
        return True

    # -- device memory ------------------------------------------------------------------
    def _stream_now(self) -> CudaStream:
        runner = self._runner
        if runner is not None and runner.is_active:
            return runner.stream
        if self._stream is None:
            self._stream = self.launcher.create_stream()
        return self._stream

    def _buffer(self, name: str, nbytes: int, stream: CudaStream) -> int:
        """A device buffer of at least ``nbytes`` kept across calls (grown when short)."""
        address, capacity = self._buffers.get(name, (0, 0))
        if capacity < nbytes:
            if address:
                self.launcher.synchronize_stream(stream)  # nothing queued may still use it
                self.launcher.free(address)
            capacity = max(int(nbytes), 1)
            address = self.launcher.alloc(capacity)
            self._buffers[name] = (address, capacity)
        return address

    def _output(self, n: int, size: int, stream: CudaStream) -> tuple[int, bool]:
        """Where the batch goes: the engine's input buffer (True) or our own (False)."""
        runner = self._runner
        if runner is not None and runner.is_active:
            buf = runner.input_buffer()
            if buf.dtype != np.float32 or tuple(buf.shape[1:]) != (3, size, size):
                raise ConfigError(f"engine input is {buf.dtype} {buf.shape}, the chain makes "
                                  f"float32 (N, 3, {size}, {size})",
                                  "build the engine from the model this loop runs")
            if n > buf.shape[0]:
                raise ConfigError(f"{n} regions exceed the engine's max batch {buf.shape[0]}",
                                  "lower max_rois or rebuild the engine with a larger "
                                  "--max-batch")
            return buf.address, True
        return self._buffer("out", n * 3 * size * size * 4, stream), False

    # -- the chain ------------------------------------------------------------------------
    def _run_step(self, step: Sanitizer, src: int, dst: int, height: int, width: int,
                  stride: int, stream: CudaStream) -> None:
        opts, packed = step.settings, width * 3
        if step.name == "bitdepth":  # only on packed crops here (leading ones run per frame)
            self.ops.bitdepth(src, dst, height * packed, int(opts["bits"]), str(opts["mode"]),
                              stream=stream)
        elif step.name == "median":
            self.ops.median(src, dst, height, width, 3, int(opts["k"]),
                            src_stride=stride, dst_stride=packed, stream=stream)
        else:  # jpeg, method=dct (check_gpu_steps)
            self.ops.jpeg(src, dst, height, width, int(opts["quality"]), bgr=True,
                          src_stride=stride, dst_stride=packed, stream=stream)

    def __call__(self, frame_bgr: np.ndarray, boxes: Sequence[Box] | np.ndarray, size: int,
                 frame_index: int = 0, preprocess: Callable[..., np.ndarray] | None = None
                 ) -> Any:
        """Sanitize and preprocess ``boxes`` of ``frame_bgr`` on the GPU.

        Returns float32 (N, 3, size, size) RGB in [0, 1]: a ``DeviceArray`` in the
        attached engine's input buffer, else an ndarray. ``preprocess`` is ignored (the
        fused kernel is the preprocess); ``frame_index`` is unused (no step is random).
        """
        t0 = time.perf_counter()
        height, width = check_frame(frame_bgr)
        clamped = []
        for i, box in enumerate(boxes):
            c = clamp_box(box, height, width)
            if c is None:
                raise SanitizeError(f"boxes[{i}] {tuple(box)!r} lies outside the "
                                    f"{width}x{height} frame",
                                    "drop detections that fall off the image")
            clamped.append(c)
        n = len(clamped)
        if n == 0:
            self.last_sanitize_ms = (time.perf_counter() - t0) * 1e3
            return np.empty((0, 3, size, size), np.float32)
        stream = self._stream_now()
        out, on_engine = self._output(n, size, stream)
        frame = np.ascontiguousarray(frame_bgr)
        src = self._buffer("frame", frame.nbytes, stream)
        crop_bytes = max((y1 - y0) * (x1 - x0) * 3 for x0, y0, x1, y1 in clamped)
        ping = [self._buffer(f"crop{j}", crop_bytes, stream) for j in range(2)] \
            if self.per_box else []
        self.launcher.copy_htod_async(src, frame, stream)
        stride = width * 3
        if self.lead:
            work = self._buffer("work", frame.nbytes, stream)
            for step in self.lead:
                opts = step.settings
                self.ops.bitdepth(src, work, frame.nbytes, int(opts["bits"]), str(opts["mode"]),
                                  stream=stream)
                src = work
        plane_bytes = 3 * size * size * 4
        for i, (x0, y0, x1, y1) in enumerate(clamped):
            slot = out + i * plane_bytes
            if not self.per_box:
                self.ops.preprocess_roi(src, height, width, (x0, y0, x1, y1), size, slot,
                                        row_stride=stride, stream=stream)
                continue
            ch, cw = y1 - y0, x1 - x0
            cur, cur_stride = src + y0 * stride + x0 * 3, stride
            for j, step in enumerate(self.per_box):
                self._run_step(step, cur, ping[j % 2], ch, cw, cur_stride, stream)
                cur, cur_stride = ping[j % 2], cw * 3
            self.ops.preprocess_roi(cur, ch, cw, (0, 0, cw, ch), size, slot,
                                    row_stride=cur_stride, stream=stream)
        if on_engine:
            result: Any = DeviceArray(out, (n, 3, size, size), np.dtype(np.float32))
        else:
            result = np.empty((n, 3, size, size), np.float32)
            self.launcher.copy_dtoh_async(result, out, stream)
            self.launcher.synchronize_stream(stream)
        self.last_sanitize_ms = (time.perf_counter() - t0) * 1e3
        return result

    def close(self) -> None:
        """Free the chain's device buffers and stream (and its launcher, if it made it).

        Idempotent; the launcher is closed even when freeing a buffer fails (its context
        going away releases what is left)."""
        stream, self._stream = self._stream, None
        buffers, self._buffers = list(self._buffers.values()), {}
        owns, self._owns_launcher = self._owns_launcher, False
        try:
            if buffers:
                self.launcher.synchronize()  # queued work may still read or write them
            for address, _ in buffers:
                self.launcher.free(address)
            if stream is not None:
                self.launcher.destroy_stream(stream)
        finally:
            if owns:
                self.launcher.close()

    def __enter__(self) -> CudaSanitizeChain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
