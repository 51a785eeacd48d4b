"""ONNX -> serialized TensorRT engine, built on the device that will run it (TensorRT 10).

The steps are those of NVIDIA's TensorRT 10 Python samples:

1. ``trt.Builder(logger)``, ``builder.create_network(0)`` (explicit batch is the only
   mode in TensorRT 10), ``trt.OnnxParser(network, logger).parse(onnx_bytes, path)``;
   parser errors are raised with every ``parser.get_error(i).desc()``.
2. ``builder.create_builder_config()``: ``set_memory_pool_limit(WORKSPACE, bytes)``;
   FP16 (``BuilderFlag.FP16``) when ``precision="fp16"``, or ``"auto"`` on a platform
   with fast FP16 (``builder.platform_has_fast_fp16``: every Jetson Orin). Inputs and
   outputs stay float32; TensorRT picks FP16 kernels inside.
3. One optimization profile: every input whose batch axis is dynamic (-1) gets
   ``(min, *rest)`` / ``(opt, *rest)`` / ``(max, *rest)``; other dynamic axes are refused.
4. ``builder.build_serialized_network(network, config)``; the bytes are written
   atomically, then the JSON sidecar (``edge_runtime.runners.engine_meta``) with the
   TensorRT version, GPU name and compute capability, sha256 of the ONNX and of the
   engine, precision, workspace, profile and the ONNX metadata. The runner refuses an
   engine whose sidecar names another TensorRT version or GPU.

INT8 comes only from an explicitly quantized ONNX (``roadshield distill quantize``
writes one: QuantizeLinear / DequantizeLinear pairs with symmetric INT8 scales): TensorRT
10 deprecates implicit INT8 calibration (10.1) and, for Q/DQ networks, asks for a strongly
typed network without precision flags, so such a model is parsed into
``create_network(1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED))`` and built with
no FP16/INT8 flag; the sidecar says "int8". ``precision="auto"`` picks this path when the
ONNX holds Q/DQ nodes; "fp16"/"fp32" refuse a Q/DQ model and "int8" a float one.

A timing cache (``timing_cache``: a file, created on the first build) keeps TensorRT's
kernel timings between builds: ``config.create_timing_cache(bytes)`` /
``set_timing_cache(cache, ignore_mismatch=False)`` before the build and
``config.get_timing_cache().serialize()`` written back (atomically) after it; a cache from
another TensorRT version or GPU is refused with a hint to delete it.

TensorRT 11 drops the FP16/INT8 builder flags: there ``precision="fp16"`` is refused
(export an FP16 or explicitly quantized ONNX instead) and ``"auto"`` builds what the
ONNX types say.
"""

from __future__ import annotations

import hashlib
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_runtime.model_info import read_model_info
from edge_runtime.runners.engine_meta import EngineInfo, write_sidecar
from edge_runtime.runners.tensorrt_runner import dims, import_tensorrt
from roadshield_base.errors import ConfigError, ModelLoadError
from roadshield_base.fileio import atomic_write_bytes

if TYPE_CHECKING:
    import tensorrt as trt

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp16", "fp32", "int8")
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


def has_qdq(onnx_bytes: bytes) -> bool:
    """Whether the ONNX graph is explicitly quantized (holds Q/DQ nodes)."""
    import onnx

    graph = onnx.load_from_string(onnx_bytes).graph
    return any(node.op_type in QDQ_OPS for node in graph.node)


def _int8_path(precision: str, qdq: bool, source: Path) -> bool:
    """Whether to build the strongly typed INT8 engine of a Q/DQ model."""
    if precision == "int8" and not qdq:
        raise ConfigError(f"{source} holds no Q/DQ nodes, so it has no INT8 scales",
                          "quantize it first: roadshield distill quantize --model ... "
                          "--out model.int8.onnx, then build that")
    if qdq and precision in ("fp16", "fp32"):
        raise ConfigError(f"{source} is explicitly quantized (Q/DQ): it builds as INT8 only",
                          "use --precision int8 (or auto), or build the float model for "
                          f"{precision}")
    return qdq


def _check_batches(min_batch: int, opt_batch: int | None, max_batch: int) -> tuple[int, int, int]:
    opt = max_batch if opt_batch is None else opt_batch
    values = (min_batch, opt, max_batch)
    if any(isinstance(v, bool) or not isinstance(v, int) for v in values) \
            or not 1 <= min_batch <= opt <= max_batch:
        raise ConfigError(f"batch profile min={min_batch} opt={opt_batch} max={max_batch} "
                          "is not 1 <= min <= opt <= max",
                          "e.g. --max-batch 8 (the loop's max_rois or more)")
    return values


def detect_gpu(launcher: Any = None) -> tuple[str, tuple[int, int]]:
    """Name and compute capability of CUDA device 0, through the kernels' launcher layer."""
    from kernels.loader import create_launcher

    own = launcher is None
    launcher = launcher or create_launcher()
    try:
        return launcher.device_name(), launcher.compute_capability()
    finally:
        if own:
            launcher.close()


def _fp16(trt_mod: Any, builder: trt.Builder, precision: str) -> bool:
    has_flag = hasattr(trt_mod.BuilderFlag, "FP16")
    if precision == "fp16" and not has_flag:
        raise ConfigError(f"TensorRT {trt_mod.__version__} has no FP16 builder flag",
                          "TensorRT 11 takes precisions from the ONNX: export an FP16 (or "
                          "Q/DQ) ONNX and build with --precision auto")
    if precision == "auto":
        # deprecated in late TensorRT 10 releases, absent in 11: no attribute -> no flag
        return has_flag and bool(getattr(builder, "platform_has_fast_fp16", False))
    return precision == "fp16"


def _profile_shapes(network: trt.INetworkDefinition, batches: tuple[int, int, int],
                    onnx_path: Path) -> dict[str, list[list[int]]]:
    """``{input: [min, opt, max]}``; static inputs get their own shape three times."""
    shapes: dict[str, list[list[int]]] = {}
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        shape = dims(tensor.shape)
        if any(d < 0 for d in shape[1:]):
            raise ConfigError(f"input {tensor.name!r} of {onnx_path} has dynamic axes "
                              f"{shape} besides the batch",
                              "export with a fixed 3 x S x S input (roadshield distill export)")
        if shape and shape[0] < 0:
            shapes[tensor.name] = [[b, *shape[1:]] for b in batches]
        else:
            shapes[tensor.name] = [list(shape)] * 3
    return shapes


def build_engine(onnx_path: str | os.PathLike[str], engine_path: str | os.PathLike[str] | None
                 = None, *, precision: str = "auto", workspace_mib: int = 1024,
                 min_batch: int = 1, opt_batch: int | None = None, max_batch: int = 8,
                 gpu: tuple[str, tuple[int, int]] | None = None,
                 verbose: bool = False,
                 timing_cache: str | os.PathLike[str] | None = None) -> EngineInfo:
    """Build ``engine_path`` (default: the ONNX path with ``.engine``) and its sidecar.

    onnx_path: an ONNX classifier from ``roadshield distill export`` (float32 NCHW RGB
        input with a dynamic batch; its metadata is copied into the sidecar).
    precision: "auto" (INT8 for a Q/DQ model, else FP16 where the platform has fast
        FP16), "fp16", "fp32" or "int8" (a Q/DQ model only).
    workspace_mib: TensorRT's workspace memory pool limit, MiB (the Orin Nano shares 8 GB).
    min_batch / opt_batch / max_batch: the optimization profile's batch sizes (opt
        defaults to max); the engine accepts any batch in [min, max].
    gpu: (name, (major, minor)) of the building GPU; None asks the CUDA driver.
    timing_cache: a file that keeps kernel timings between builds (read if present,
        written after the build); None builds without one.
    Returns the sidecar's ``EngineInfo``. Raises ``BackendUnavailableError`` without
    TensorRT or a GPU, ``ModelLoadError`` when parsing or building fails,
    ``ConfigError`` for bad settings.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is unknown", f"use one of {PRECISIONS}")
    if isinstance(workspace_mib, bool) or not isinstance(workspace_mib, int) or workspace_mib < 1:
        raise ConfigError(f"workspace_mib={workspace_mib!r} must be a positive integer",
                          "e.g. 1024 (1 GiB)")
    batches = _check_batches(min_batch, opt_batch, max_batch)
    source = Path(onnx_path)
    target = Path(engine_path) if engine_path is not None else source.with_suffix(".engine")
    model = read_model_info(source)  # refuses an ONNX without the export metadata
    data = source.read_bytes()
    int8 = _int8_path(precision, has_qdq(data), source)
    import_tensorrt()
    import tensorrt as trt

    gpu_name, capability = gpu if gpu is not None else detect_gpu()
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(
        1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if int8 else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(data, str(source)):
        errors = [parser.get_error(i).desc() for i in range(parser.num_errors)]
        raise ModelLoadError(f"TensorRT cannot parse {source}: " + "; ".join(errors or ["?"]),
                             "check the opset and operators (roadshield distill export "
                             "writes opset 17 with standard ops)")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    # a strongly typed network takes its precisions from the Q/DQ graph: no flags
    fp16 = not int8 and _fp16(trt, builder, precision)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    cache_path = None if timing_cache is None else Path(timing_cache)
    if cache_path is not None:
        cached = cache_path.read_bytes() if cache_path.is_file() else b""
        if not config.set_timing_cache(config.create_timing_cache(cached), False):
            raise ConfigError(f"timing cache {cache_path} was made by another TensorRT "
                              "version or GPU", f"delete {cache_path}; the next build "
                              "writes a new one")
    shapes = _profile_shapes(network, batches, source)
    dynamic = {name: s for name, s in shapes.items() if s[0] != s[2]}
    if dynamic:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in dynamic.items():
            profile.set_shape(name, trt.Dims(low), trt.Dims(opt), trt.Dims(high))
        config.add_optimization_profile(profile)
    built = "int8" if int8 else "fp16" if fp16 else "fp32"
    log.info("building TensorRT %s engine from %s (%s, workspace %d MiB, profile %s)",
             trt.__version__, source.name, built, workspace_mib, shapes)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ModelLoadError(f"TensorRT failed to build an engine from {source} (see its log)",
                             "raise --workspace-mib, lower --max-batch, or run with verbose")
    engine_bytes = bytes(serialized)
    atomic_write_bytes(target, engine_bytes)
    if cache_path is not None:
        atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    info = EngineInfo(
        tensorrt_version=trt.__version__, gpu_name=gpu_name,
        compute_capability=f"{capability[0]}.{capability[1]}",
        engine_sha256=hashlib.sha256(engine_bytes).hexdigest(),
        onnx_sha256=hashlib.sha256(data).hexdigest(), precision=built,
        workspace_bytes=workspace_mib << 20, input_name=model.input_name,
        output_name=model.output_name, profiles=shapes, model_metadata=dict(model.metadata),
        built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    # engine first: a crash in between leaves a sidecar whose sha256 refuses the new engine
    write_sidecar(target, info)
    return info
