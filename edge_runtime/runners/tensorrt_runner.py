"""TensorRT engine backend, on the TensorRT 10 API (JetPack 6: TensorRT 10.3).

``activate`` checks the engine's sidecar (``engine_meta``: same TensorRT version, same
GPU, same bytes), deserializes it (``trt.Runtime(logger).deserialize_cuda_engine``),
lists its I/O tensors (``num_io_tensors`` / ``get_tensor_name`` / ``get_tensor_mode`` /
``get_tensor_shape`` / ``get_tensor_dtype``), creates an execution context, one stream
and one device buffer per tensor sized for the optimization profile's largest shape,
and binds each buffer with ``set_tensor_address``. ``infer`` sets the actual input
shapes (``set_input_shape``: dynamic batch), copies inputs in, runs
``execute_async_v3(stream)``, copies outputs out and waits for the stream: one sync
per call. No bindings list, no implicit batch, no ``execute_async_v2``.

Device memory and the stream come from a ``kernels.loader.KernelLauncher`` (pycuda or
cuda-python on the primary context), the same layer the sanitization kernels use. A
feed value may be a ``kernels.loader.DeviceArray`` instead of an ndarray: the engine
then reads that device memory directly (no host round trip). The usual one is
``input_buffer()``, the runner's own input buffer, which the fused-preprocess kernel
fills on ``stream`` (see ``edge_runtime.sanitize_cuda``); any other device pointer is
bound for that call only, and must be written before the call (on ``stream`` or
synchronised).

A verified bundle's model (``ModelBytes``: ONNX bytes whose signature checked out) runs
as the engine this device built from it: ``activate`` asks the device's engine cache
(``edge_runtime.engine_cache``) for the engine keyed by that model's sha256, this
TensorRT version and this GPU. The cache returns the engine only when its own index lists
it and the bytes match the digest recorded at the build; those same bytes are
deserialized. An engine file given by path is checked against its sidecar the same way:
the bytes hashed are the bytes deserialized.

``tensorrt`` is imported when a runner is built, so this module loads anywhere.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from kernels.loader import CudaStream, DeviceArray, KernelLauncher, create_launcher
from roadshield_base.errors import (
    BackendUnavailableError,
    ConfigError,
    ModelLoadError,
    RoadshieldError,
)

from ..engine_cache import EngineCache, EngineKey
from ..model_info import ModelInfo, TensorSpec, check_feed
from .base import BaseRunner, ModelBytes, RunnerStateError
from .engine_meta import REBUILD_HINT, EngineInfo, check_engine, engine_model_info, read_sidecar

if TYPE_CHECKING:
    import tensorrt as trt

log = logging.getLogger(__name__)

INSTALL_HINT = ("TensorRT comes with JetPack on a Jetson (apt: python3-libnvinfer; use the "
                "system Python or a venv made with --system-site-packages); on x86-64 "
                "`pip install tensorrt`; or run the ONNX model with the onnxruntime backend")
Feed = Mapping[str, "np.ndarray | DeviceArray"]


def import_tensorrt() -> ModuleType:
    """Import TensorRT or raise ``BackendUnavailableError`` saying what to install."""
    try:
        import tensorrt
    except ImportError as err:
        raise BackendUnavailableError(f"TensorRT is not installed ({err})", INSTALL_HINT) from err
    if not hasattr(tensorrt, "Runtime"):  # a namespace package, e.g. tensorrt-stubs alone
        raise BackendUnavailableError(
            f"the 'tensorrt' module at {getattr(tensorrt, '__path__', '?')} has no Runtime "
            "(type stubs only, or a broken install)", INSTALL_HINT)
    return tensorrt


def dims(shape: Any) -> tuple[int, ...]:
    """A TensorRT ``Dims`` (or any sequence) as a tuple of ints; -1 marks a dynamic axis."""
    return tuple(int(shape[i]) for i in range(len(shape)))


@dataclass
class TensorBinding:
    """One I/O tensor of the engine and the device buffer bound to it."""

    name: str
    is_input: bool
    dtype: np.dtype
    shape: tuple[int, ...]      # as the engine declares it, -1 = dynamic
    min_shape: tuple[int, ...]  # profile minimum (inputs; = shape for static ones)
    max_shape: tuple[int, ...]  # profile maximum, the buffer's capacity
    address: int = 0

    @property
    def capacity_bytes(self) -> int:
        return int(np.prod(self.max_shape, dtype=np.int64)) * self.dtype.itemsize


class TensorRTRunner(BaseRunner):
    """Run a serialized TensorRT engine (``.engine`` / ``.plan``) with its sidecar.

    engine_path: the engine; ``<engine>.json`` beside it must describe it (see
        ``engine_meta``) unless ``verify=False``. Or a verified bundle's ONNX model
        (``ModelBytes``): the engine this device built from it is loaded from
        ``engine_cache`` (an ``EngineCache`` or its folder; None: ``$ROADSHIELD_ENGINE_CACHE``
        or /var/lib/roadshield/engines), always verified.
    launcher: the CUDA launcher to allocate on (shared with the sanitize kernels);
        None creates one with ``binding`` / ``device`` on ``activate`` and closes it
        on ``deactivate``.
    Inputs are float32 N x 3 x S x S RGB in [0, 1] for exported classifiers; N may be
    anything in the engine's optimization profile.
    """

    name = "tensorrt"

    def __init__(self, engine_path: str | os.PathLike[str] | ModelBytes, *,
                 launcher: KernelLauncher | None = None, binding: str | None = None,
                 device: int = 0, verify: bool = True,
                 engine_cache: EngineCache | str | os.PathLike[str] | None = None) -> None:
        super().__init__()
        import_tensorrt()
        self._model: ModelBytes | None = None
        self._cache: EngineCache | None = None
        if isinstance(engine_path, ModelBytes):
            self._model = engine_path
            if not verify:
                raise ConfigError("verify=False does not apply to a bundle's model",
                                  "an engine from the device's cache is always checked")
            self._cache = (engine_cache if isinstance(engine_cache, EngineCache)
                           else EngineCache.from_env() if engine_cache is None
                           else EngineCache(engine_cache))
            self.engine_path = engine_path.path  # the cached engine's path once active
        else:
            if engine_cache is not None:
                raise ConfigError("engine_cache applies to a bundle's model (ModelBytes)",
                                  "pass the verified model, or drop engine_cache")
            self.engine_path = Path(engine_path)
            if not self.engine_path.is_file():
                raise ModelLoadError(f"TensorRT engine {self.engine_path} does not exist",
                                     f"check the path, or {REBUILD_HINT}")
        self.binding = binding
        self.device = device
        self.verify = verify
        self._launcher = launcher
        self._owns_launcher = launcher is None
        self._stream: CudaStream | None = None
        self._runtime: trt.Runtime | None = None
        self._engine: trt.ICudaEngine | None = None
        self._context: trt.IExecutionContext | None = None
        self._tensors: dict[str, TensorBinding] = {}
        self._sidecar: EngineInfo | None = None  # the sidecar checked on activate

    # -- state shared with the sanitize kernels --------------------------------------
    def share_launcher(self, launcher: KernelLauncher) -> None:
        """Allocate on ``launcher`` (which the caller keeps and closes); before activate."""
        if self.is_active and launcher is not self._launcher:
            raise RunnerStateError(f"runner {self.name} is active on another CUDA launcher",
                                   "share the launcher before activating the runner")
        if self._launcher is not None and self._owns_launcher and launcher is not self._launcher:
            self._launcher.close()
        self._launcher, self._owns_launcher = launcher, False

    @property
    def launcher(self) -> KernelLauncher:
        if self._launcher is None:
            raise RunnerStateError(f"runner {self.name} has no CUDA launcher yet",
                                   "activate it (or share_launcher()) first")
        return self._launcher

    @property
    def stream(self) -> CudaStream:
        """The stream the engine runs on; queue kernels that fill inputs here."""
        if self._stream is None:
            raise RunnerStateError(f"runner {self.name} is not active",
                                   "activate it (or enter its context) first")
        return self._stream

    def _require_loaded(self) -> None:
        if not self._tensors:
            raise RunnerStateError(f"runner {self.name} has not loaded {self.engine_path} yet",
                                   "activate it (or enter its context) first")

    @property
    def input_names(self) -> list[str]:
        self._require_loaded()
        return [t.name for t in self._tensors.values() if t.is_input]

    @property
    def output_names(self) -> list[str]:
        self._require_loaded()
        return [t.name for t in self._tensors.values() if not t.is_input]

    @property
    def model_info(self) -> ModelInfo:
        """The model's identity from the engine's sidecar (the ONNX metadata it was built
        from); valid once active."""
        self._require_loaded()
        return engine_model_info(self.engine_path, self._sidecar)

    @property
    def tensors(self) -> dict[str, TensorBinding]:
        """Every I/O tensor with its bound buffer (valid once active)."""
        self._require_loaded()
        return dict(self._tensors)

    @property
    def input_specs(self) -> list[TensorSpec]:
        """Shape (``None`` = dynamic) and dtype of every input (valid once active)."""
        return [TensorSpec(t.name, tuple(None if d < 0 else d for d in t.shape), t.dtype)
                for t in self._tensors.values() if t.is_input] if self._tensors else []

    def input_buffer(self, name: str | None = None) -> DeviceArray:
        """The device buffer of input ``name`` (the only input when None), at its profile
        maximum shape; write a batch of N into its first N rows, then ``infer`` with
        ``DeviceArray(buffer.address, (N, ...), dtype)``."""
        self._require_loaded()
        inputs = self.input_names
        if name is None:
            if len(inputs) != 1:
                raise ConfigError(f"engine {self.engine_path.name} has inputs {inputs}",
                                  "name the input: input_buffer('input')")
            name = inputs[0]
        tensor = self._tensors.get(name)
        if tensor is None or not tensor.is_input:
            raise ConfigError(f"engine {self.engine_path.name} has no input {name!r}",
                              f"its inputs: {inputs}")
        return DeviceArray(tensor.address, tensor.max_shape, tensor.dtype)

    # -- lifecycle --------------------------------------------------------------------
    def activate_impl(self) -> None:
        import_tensorrt()
        import tensorrt as trt

        if self._launcher is None:
            self._launcher, self._owns_launcher = create_launcher(self.binding, self.device), True
        launcher = self._launcher
        try:
            # the bytes checked here are the bytes deserialized: nothing is reopened
            data = self._checked_engine_bytes(trt.__version__, launcher)
            self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            engine = self._runtime.deserialize_cuda_engine(data)
            if engine is None:
                raise ModelLoadError(f"TensorRT could not deserialize {self.engine_path} "
                                     "(see the TensorRT log above)", REBUILD_HINT)
            self._engine = engine
            context = engine.create_execution_context()
            if context is None:
                raise ModelLoadError(f"no execution context for {self.engine_path} (device "
                                     "memory exhausted?)", "free GPU memory or rebuild the "
                                     "engine with a smaller max batch / workspace")
            self._context = context
            self._stream = launcher.create_stream()
            self._bind_tensors(engine, context, launcher)
        except BaseException:
            self._release()
            raise
        log.info("TensorRT %s engine %s on %s: inputs %s, outputs %s", trt.__version__,
                 self.engine_path.name, launcher.device_name(),
                 {t.name: t.max_shape for t in self._tensors.values() if t.is_input},
                 {t.name: t.max_shape for t in self._tensors.values() if not t.is_input})

    def _checked_engine_bytes(self, tensorrt_version: str, launcher: KernelLauncher) -> bytes:
        """The engine's bytes, once they passed their checks (see the module docstring)."""
        if self._model is not None and self._cache is not None:
            key = EngineKey(tensorrt_version, launcher.device_name(),
                            launcher.compute_capability(), self._model.sha256)
            data, self._sidecar = self._cache.load(key)
            self.engine_path = self._cache.engine_path(key)
            return data
        try:
            data = self.engine_path.read_bytes()
        except OSError as err:
            raise ModelLoadError(f"cannot read TensorRT engine {self.engine_path}: {err}",
                                 "check the path and its permissions") from err
        if self.verify:
            sidecar = read_sidecar(self.engine_path)
            check_engine(self.engine_path, sidecar, tensorrt_version=tensorrt_version,
                         gpu_name=launcher.device_name(),
                         compute_capability=launcher.compute_capability(),
                         engine_sha256=hashlib.sha256(data).hexdigest())
            self._sidecar = sidecar
        return data

    def _bind_tensors(self, engine: trt.ICudaEngine, context: trt.IExecutionContext,
                      launcher: KernelLauncher) -> None:
        import tensorrt as trt

        tensors: list[TensorBinding] = []
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            shape = dims(engine.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            low = high = shape
            if is_input and min(shape, default=0) < 0:
                low, _, high = (dims(s) for s in engine.get_tensor_profile_shape(name, 0))
                if not context.set_input_shape(name, high):
                    raise ModelLoadError(f"engine {self.engine_path.name} rejects its own "
                                         f"profile maximum {high} for {name!r}", REBUILD_HINT)
            tensors.append(TensorBinding(name, is_input, dtype, shape, low, high))
        for tensor in tensors:
            if not tensor.is_input:  # output sizes follow from the inputs at their maximum
                tensor.max_shape = tensor.min_shape = dims(context.get_tensor_shape(tensor.name))
                if min(tensor.max_shape, default=0) < 0:
                    raise ModelLoadError(f"output {tensor.name!r} of {self.engine_path.name} "
                                         f"has a data-dependent shape {tensor.max_shape}",
                                         "export a classifier with a fixed [N, C] output")
            tensor.address = launcher.alloc(max(tensor.capacity_bytes, 1))
            self._tensors[tensor.name] = tensor
            if not context.set_tensor_address(tensor.name, tensor.address):
                raise ModelLoadError(f"TensorRT refused the buffer of {tensor.name!r}",
                                     "device buffers must be 256-byte aligned (alloc() is)")

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        context, launcher, stream = self._context, self.launcher, self.stream
        if context is None:
            raise RunnerStateError(f"runner {self.name} is not active", "activate it first")
        host, device, shapes = self._check_feed(feed)
        rebound: list[str] = []
        try:
            for name, shape in shapes.items():
                if not context.set_input_shape(name, shape):
                    raise ConfigError(f"{self.name}: engine rejected shape {shape} for "
                                      f"{name!r}", "stay inside the engine's profile")
            for name, array in host.items():
                launcher.copy_htod_async(self._tensors[name].address, array, stream)
            for name, view in device.items():
                if view.address != self._tensors[name].address:
                    rebound.append(name)
                    if not context.set_tensor_address(name, view.address):
                        raise ConfigError(f"TensorRT refused device address "
                                          f"{view.address:#x} for {name!r}",
                                          "pass a 256-byte aligned device pointer")
            outputs = {name: np.empty(dims(context.get_tensor_shape(name)),
                                      self._tensors[name].dtype)
                       for name in self.output_names}
            if not context.execute_async_v3(stream.handle):
                raise RoadshieldError(f"TensorRT execute_async_v3 failed for "
                                      f"{self.engine_path.name}", "see the TensorRT log above")
            for name, out in outputs.items():
                launcher.copy_dtoh_async(out, self._tensors[name].address, stream)
            launcher.synchronize_stream(stream)
        finally:
            for name in rebound:  # host feeds use the runner's own buffer again
                context.set_tensor_address(name, self._tensors[name].address)
        return outputs

    def _check_feed(self, feed: Feed) -> tuple[dict[str, np.ndarray], dict[str, DeviceArray],
                                               dict[str, tuple[int, ...]]]:
        """Split a feed into host arrays and device views checked against the engine;
        also returns every input's shape."""
        if not isinstance(feed, Mapping):
            raise ConfigError(f"{self.name}: feed is a {type(feed).__name__}, expected a dict",
                              f"call infer({{{self.input_names[0]!r}: array}})")
        specs = self.input_specs
        device = {k: v for k, v in feed.items() if isinstance(v, DeviceArray)}
        host = check_feed({k: v for k, v in feed.items() if not isinstance(v, DeviceArray)},
                          [s for s in specs if s.name not in device], self.name)
        for name, view in device.items():
            tensor = self._tensors.get(name)
            if tensor is None or not tensor.is_input:
                raise ConfigError(f"{self.name}: {name!r} is not an input of "
                                  f"{self.engine_path.name}", f"its inputs: {self.input_names}")
            if view.dtype != tensor.dtype or len(view.shape) != len(tensor.shape):
                raise ConfigError(f"{self.name}: device input {name!r} is {view.dtype} "
                                  f"{view.shape}, the engine takes {tensor.dtype} of rank "
                                  f"{len(tensor.shape)}", "write the batch the engine expects")
        shapes = {name: tuple(int(d) for d in array.shape) for name, array in host.items()}
        shapes.update({name: view.shape for name, view in device.items()})
        for name, shape in shapes.items():
            low, high = self._tensors[name].min_shape, self._tensors[name].max_shape
            if any(not lo <= d <= hi for d, lo, hi in zip(shape, low, high, strict=True)):
                raise ConfigError(f"{self.name}: input {name!r} of shape {shape} is outside "
                                  f"the engine's profile {low}..{high}",
                                  "send at most the max batch per call (max_rois), or "
                                  f"{REBUILD_HINT} with a larger max batch")
        return host, device, shapes

    def deactivate_impl(self) -> None:
        self._release()

    def _release(self) -> None:
        launcher = self._launcher
        try:
            if launcher is not None and self._stream is not None:
                launcher.synchronize_stream(self._stream)
        finally:
            # TensorRT objects go before the memory they use: context, engine, runtime
            self._context = None
            self._engine = None
            self._runtime = None
            if launcher is not None:
                for tensor in self._tensors.values():
                    if tensor.address:
                        launcher.free(tensor.address)
                if self._stream is not None:
                    launcher.destroy_stream(self._stream)
                if self._owns_launcher:
                    launcher.close()
                    self._launcher = None
            self._tensors.clear()
            self._stream = None
