"""ONNX Runtime backend: TensorRT > CUDA > CPU execution providers.

onnxruntime is imported when a runner is built, never at module level, so this
module loads on machines without it. On a Jetson, onnxruntime-gpu comes from
NVIDIA's Jetson wheels (PyPI has no aarch64 GPU build).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from edge_runtime.model_info import (
    EXPORT_HINT,
    ModelInfo,
    TensorSpec,
    check_feed,
    model_info_from_metadata,
)
from edge_runtime.runners.base import BaseRunner, ModelBytes, RunnerStateError
from roadshield_base.errors import BackendUnavailableError, ConfigError, ModelLoadError
from roadshield_base.fileio import file_sha256

log = logging.getLogger(__name__)

TENSORRT_EP = "TensorrtExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"
#: preferred order; anything else onnxruntime offers is used only when asked for by name
PROVIDER_ORDER = (TENSORRT_EP, CUDA_EP, CPU_EP)
_ALIASES = {"tensorrt": TENSORRT_EP, "trt": TENSORRT_EP, "cuda": CUDA_EP, "cpu": CPU_EP}
INSTALL_HINT = ("pip install onnxruntime (CPU) or onnxruntime-gpu (x86-64 with CUDA); on a "
                "Jetson install NVIDIA's onnxruntime-gpu wheel for your JetPack from the Jetson "
                "Zoo / jetson-ai-lab pip index")
_ORT_DTYPES: dict[str, np.dtype] = {
    "tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64), "tensor(uint8)": np.dtype(np.uint8),
    "tensor(int32)": np.dtype(np.int32), "tensor(int64)": np.dtype(np.int64),
}

ProviderEntry = tuple[str, dict[str, Any]]


def import_onnxruntime() -> ModuleType:
    """Import onnxruntime or raise ``BackendUnavailableError`` saying what to install."""
    try:
        import onnxruntime
    except ImportError as err:
        raise BackendUnavailableError(f"onnxruntime is not installed ({err})",
                                      INSTALL_HINT) from err
    return onnxruntime


def select_providers(requested: Sequence[str] | None, available: Sequence[str]) -> list[str]:
    """Execution providers to ask for, best first.

    requested: provider names ("CUDAExecutionProvider") or aliases ("tensorrt",
    "trt", "cuda", "cpu"); ``None`` means every provider of ``PROVIDER_ORDER``
    that ``available`` lists. Raises ``BackendUnavailableError`` for a requested
    provider this onnxruntime build lacks, ``ConfigError`` for an empty request.
    """
    if requested is None:
        chosen = [p for p in PROVIDER_ORDER if p in available]
        if not chosen:
            raise BackendUnavailableError(
                f"onnxruntime offers none of {list(PROVIDER_ORDER)} (it has {list(available)})",
                INSTALL_HINT)
        return chosen
    if not requested:
        raise ConfigError("providers=[] asks for no execution provider",
                          f"pass None for the default order or some of {list(PROVIDER_ORDER)}")
    chosen = []
    for name in requested:
        full = _ALIASES.get(name.lower(), name)
        if full not in available:
            raise BackendUnavailableError(
                f"execution provider {name!r} is not in this onnxruntime build "
                f"(available: {list(available)})",
                "drop it from providers, or install onnxruntime-gpu (NVIDIA's Jetson wheel on "
                "a Jetson) for CUDA / TensorRT")
        if full not in chosen:
            chosen.append(full)
    return chosen


def trt_cache_dir(model_path: str | os.PathLike[str]) -> Path:
    """Where the TensorRT EP keeps its timing cache: beside the model."""
    path = Path(model_path)
    return path.parent / f"{path.stem}.ort_trt_cache"


def provider_options(provider: str, model_path: str | os.PathLike[str], device_id: int = 0,
                     fp16: bool = True) -> dict[str, Any]:
    """onnxruntime options for one execution provider (empty for CPU and others).

    TensorRT: FP16 kernels allowed, the timing cache beside the model (kernel timings make
    a rebuild faster), no engine cache, 1 GiB workspace (the Orin Nano shares 8 GB between
    CPU and GPU). CUDA: the device id.
    """
    if provider == TENSORRT_EP:
        cache = str(trt_cache_dir(model_path))
        # The engine cache stays off: ONNX Runtime would deserialize whatever engine file
        # it finds there, with no way to check it against what the bundle signed or what
        # this device built. Cached engines come from the tensorrt backend instead, which
        # loads only those in the device's own index, digest-checked
        # (edge_runtime.engine_cache).
        return {"device_id": device_id, "trt_fp16_enable": fp16,
                "trt_max_workspace_size": 1 << 30, "trt_engine_cache_enable": False,
                "trt_timing_cache_enable": True, "trt_timing_cache_path": cache}
    if provider == CUDA_EP:
        return {"device_id": device_id}
    return {}


def _prepare_trt_cache(entries: list[ProviderEntry]) -> list[ProviderEntry]:
    """Create the TensorRT cache folder, or run without caches when it cannot exist."""
    prepared: list[ProviderEntry] = []
    for name, options in entries:
        if name == TENSORRT_EP and options.get("trt_timing_cache_enable"):
            folder = Path(options["trt_timing_cache_path"])
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                log.warning("cannot create TensorRT cache %s (%s); kernels will be timed "
                            "again on every start", folder, err)
                options = {k: v for k, v in options.items()
                           if not k.startswith(("trt_engine_cache", "trt_timing_cache"))}
        prepared.append((name, options))
    return prepared


class OnnxRuntimeRunner(BaseRunner):
    """Run an ONNX model with onnxruntime.

    model_path: ``.onnx`` file; input float32 N x 3 x S x S RGB in [0, 1], output logits.
    providers: execution providers or aliases, best first; ``None`` picks
        TensorRT > CUDA > CPU among those this onnxruntime build offers.
    intra_op_threads: CPU threads per operator (``None``: onnxruntime's default).
    device_id: GPU for the CUDA / TensorRT providers.
    fp16: let the TensorRT provider use FP16 kernels.
    """

    name = "onnxruntime"

    def __init__(self, model_path: str | os.PathLike[str] | ModelBytes,
                 providers: list[str] | None = None,
                 intra_op_threads: int | None = None, *, device_id: int = 0,
                 fp16: bool = True) -> None:
        super().__init__()
        # a ModelBytes is loaded from its bytes; its path only names it (and the TRT cache)
        self._bytes = model_path if isinstance(model_path, ModelBytes) else None
        self.model_path = self._bytes.path if self._bytes is not None \
            else Path(model_path)  # type: ignore[arg-type]
        self._ort = import_onnxruntime()
        if self._bytes is None and not self.model_path.is_file():
            raise ModelLoadError(f"ONNX model {self.model_path} does not exist",
                                 f"check the path, or {EXPORT_HINT}")
        if intra_op_threads is not None and intra_op_threads < 1:
            raise ConfigError(f"intra_op_threads={intra_op_threads} must be >= 1",
                              "pass None for onnxruntime's default")
        self.providers = select_providers(providers, self._ort.get_available_providers())
        self.intra_op_threads = intra_op_threads
        self.device_id = device_id
        self.fp16 = fp16
        self._session: Any = None
        self._specs: list[TensorSpec] = []
        self._outputs: list[str] = []
        self._metadata: dict[str, str] = {}
        self._logits_width: int | None = None
        self._info: ModelInfo | None = None

    def provider_entries(self) -> list[ProviderEntry]:
        """``(provider, options)`` pairs handed to ``InferenceSession``."""
        where = self.model_path
        if self._bytes is not None:
            # a verified bundle stays exactly as signed: a cache folder inside it would make
            # its next check refuse it, so its timing cache lives in the device's cache
            from edge_runtime.engine_cache import EngineCache

            where = EngineCache.from_env().root / "ort-timing" / f"{self._bytes.sha256[:16]}.onnx"
        return [(p, provider_options(p, where, self.device_id, self.fp16))
                for p in self.providers]

    @property
    def input_names(self) -> list[str]:
        self._require_loaded()
        return [spec.name for spec in self._specs]

    @property
    def output_names(self) -> list[str]:
        self._require_loaded()
        return list(self._outputs)

    @property
    def input_specs(self) -> list[TensorSpec]:
        """Shape (``None`` = dynamic) and dtype of every input (valid once active)."""
        self._require_loaded()
        return list(self._specs)

    @property
    def model_info(self) -> ModelInfo:
        """The export metadata of the loaded session (``metadata_props``), checked as
        ``edge_runtime.model_info.read_model_info`` checks it; valid once active."""
        self._require_loaded()
        if self._info is None:
            self._info = model_info_from_metadata(
                self._metadata, f"ONNX file {self.model_path}", input_name=self._specs[0].name,
                outputs=self._outputs, width=self._logits_width,
                sha256=self._bytes.sha256 if self._bytes else file_sha256(self.model_path))
        return self._info

    def _require_loaded(self) -> None:
        if not self._specs:
            raise RunnerStateError(f"runner {self.name} has not loaded {self.model_path} yet",
                                   "activate it (or enter its context) first")

    def activate_impl(self) -> None:
        ort = self._ort
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.intra_op_threads is not None:
            options.intra_op_num_threads = self.intra_op_threads
        entries = _prepare_trt_cache(self.provider_entries())
        try:
            model = self._bytes.data if self._bytes else str(self.model_path)
            session = ort.InferenceSession(model, sess_options=options,
                                           providers=[name for name, _ in entries],
                                           provider_options=[opts for _, opts in entries])
        except Exception as err:  # onnxruntime raises its own pybind types for bad files
            raise ModelLoadError(f"cannot load ONNX model {self.model_path}: {err}",
                                 f"the file is corrupt or not ONNX; {EXPORT_HINT} "
                                 "(and re-sign the bundle)") from err
        used = session.get_providers()
        self.name = f"onnxruntime:{used[0]}"
        log.info("onnxruntime session for %s uses %s (asked for %s)",
                 self.model_path.name, used, self.providers)
        if used[0] != self.providers[0]:
            log.warning("onnxruntime could not start %s for %s and fell back to %s; check the "
                        "CUDA / TensorRT libraries", self.providers[0], self.model_path.name,
                        used[0])
        self._specs = [TensorSpec(i.name, tuple(d if isinstance(d, int) else None
                                                for d in i.shape), _ORT_DTYPES.get(i.type))
                       for i in session.get_inputs()]
        self._outputs = [o.name for o in session.get_outputs()]
        self._metadata = dict(session.get_modelmeta().custom_metadata_map)
        logits = session.get_outputs()[0].shape if self._outputs else []
        self._logits_width = (logits[-1] if len(logits) == 2 and isinstance(logits[-1], int)
                              else None)
        self._info = None
        self._session = session

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        checked = check_feed(feed, self._specs, self.name)
        results = self._session.run(self._outputs, checked)
        return dict(zip(self._outputs, results, strict=True))

    def deactivate_impl(self) -> None:
        self._session = None
