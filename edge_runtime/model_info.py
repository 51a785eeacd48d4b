"""What an exported model says about itself, and checks of what runners are fed.

``roadshield distill export`` writes ONNX files whose ``metadata_props`` carry
``class_names`` (a JSON list), ``input_size``, ``input_format``,
``normalization``, ``arch`` and ``source_sha256``. ``read_model_info`` reads
them with the ``onnx`` package, or with onnxruntime's model metadata where
``onnx`` is not installed, and adds the file's own sha256. The logits are graph
output 0; a model exported with its head's input features has a second output, named by
the ``features_output`` metadata ("features"), which ``ModelInfo.features_name`` reports.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from roadshield_base.errors import ConfigError, ModelLoadError
from roadshield_base.fileio import file_sha256

EXPORT_HINT = "re-export the checkpoint with `roadshield distill export`"
REQUIRED_KEYS = ("class_names", "input_size", "arch")
_DIM_NAMES = ("batch", "channels", "height", "width")


@dataclass(frozen=True)
class ModelInfo:
    """Identity and I/O of an exported classifier.

    class_names: label names in logit order.
    input_size: square input side in pixels (input is float32 N x 3 x S x S RGB in [0, 1]).
    input_name / output_name: graph tensor names (normally "input" / "logits").
    arch: architecture name recorded at export.
    sha256: hex digest of the model file's bytes.
    metadata: every metadata_props entry as written (e.g. normalization, source_sha256).
    features_name: name of the float32 [N, D] features output ("features": what the head reads),
        or None when the graph has no such output.
    """

    class_names: tuple[str, ...]
    input_size: int
    input_name: str
    output_name: str
    arch: str
    sha256: str
    metadata: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)
    features_name: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


FEATURES_NAME = "features"

_Read = tuple[dict[str, str], str, list[str], int | None]


def _read_with_onnx(path: Path) -> _Read:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf raises several unrelated types for bad bytes
        raise ModelLoadError(f"cannot parse ONNX file {path}: {err}", EXPORT_HINT) from err
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if not inputs or not graph.output:
        raise ModelLoadError(f"ONNX file {path} has no graph inputs or outputs", EXPORT_HINT)
    out_dims = graph.output[0].type.tensor_type.shape.dim
    width = out_dims[-1].dim_value if len(out_dims) == 2 and out_dims[-1].dim_value else None
    meta = {prop.key: prop.value for prop in model.metadata_props}
    return meta, inputs[0].name, [o.name for o in graph.output], width


def _read_with_onnxruntime(path: Path) -> _Read:
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise ModelLoadError(
            f"cannot read metadata of {path}: neither onnx nor onnxruntime is installed",
            "pip install onnx (or onnxruntime)") from err
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own pybind types for bad files
        raise ModelLoadError(f"cannot load ONNX file {path}: {err}", EXPORT_HINT) from err
    out = session.get_outputs()[0]
    width = out.shape[-1] if len(out.shape) == 2 and isinstance(out.shape[-1], int) else None
    meta = dict(session.get_modelmeta().custom_metadata_map)
    return (meta, session.get_inputs()[0].name, [o.name for o in session.get_outputs()],
            width)


def read_model_info(path: str | os.PathLike[str]) -> ModelInfo:
    """Read class names, input size, tensor names, arch and sha256 of an ONNX model.

    Raises ``ModelLoadError`` when the file is missing, unreadable, or lacks the
    metadata ``roadshield distill export`` writes. The edge loop takes the same
    ``ModelInfo`` from its runner instead (``BaseRunner.model_info``), which covers
    ``.pt2`` programs and TensorRT engines too.
    """
    model_path = Path(path)
    if not model_path.is_file():
        raise ModelLoadError(f"model file {model_path} does not exist",
                             f"check the path, or {EXPORT_HINT}")
    if model_path.suffix.lower() != ".onnx":
        raise ModelLoadError(f"{model_path} is not an .onnx file; metadata is read from ONNX",
                             "point at the .onnx written beside it by `roadshield distill export`")
    try:
        import onnx  # noqa: F401
    except ImportError:
        meta, input_name, outputs, width = _read_with_onnxruntime(model_path)
    else:
        meta, input_name, outputs, width = _read_with_onnx(model_path)
    return model_info_from_metadata(meta, f"ONNX file {model_path}", input_name=input_name,
                                    outputs=outputs, width=width,
                                    sha256=file_sha256(model_path))


def model_info_from_metadata(meta: Mapping[str, str], where: str, *, input_name: str,
                             outputs: Sequence[str], width: int | None, sha256: str,
                             hint: str = EXPORT_HINT) -> ModelInfo:
    """Check the export metadata ``meta`` (string values, as ``metadata_props`` holds them)
    and build the ``ModelInfo`` every backend reports.

    where: what the metadata came from, for messages ("ONNX file m.onnx").
    outputs: the model's output names, logits first; a later output named by
        ``features_output`` (default "features") becomes ``features_name``.
    width: C of the logits output when the model declares it, checked against the
        class names; None when unknown.
    Raises ``ModelLoadError`` naming the missing or malformed entry.
    """
    if not outputs:
        raise ModelLoadError(f"{where} has no outputs", hint)
    # the features output is optional: older exports and other graphs have logits only
    features = meta.get("features_output") or FEATURES_NAME
    features_name = features if features in outputs[1:] else None
    missing = [key for key in REQUIRED_KEYS if not meta.get(key)]
    if missing:
        raise ModelLoadError(f"{where} lacks metadata {missing}",
                             f"the model must be exported with `roadshield distill export`; "
                             f"{hint}")
    try:
        names = json.loads(meta["class_names"])
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"class_names metadata of {where} is not JSON: {err}",
                             hint) from err
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ModelLoadError(f"class_names metadata of {where} is not a list of strings", hint)
    try:
        input_size = int(meta["input_size"])
    except ValueError as err:
        raise ModelLoadError(f"input_size metadata of {where} is "
                             f"{meta['input_size']!r}, not an integer", hint) from err
    if input_size < 1:
        raise ModelLoadError(f"input_size metadata of {where} is {input_size}", hint)
    if width is not None and width != len(names):
        raise ModelLoadError(f"{where} outputs {width} logits but names {len(names)} classes",
                             hint)
    return ModelInfo(class_names=tuple(names), input_size=input_size, input_name=input_name,
                     output_name=outputs[0], arch=meta["arch"], sha256=sha256,
                     metadata=dict(meta), features_name=features_name)


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape (``None`` for a dynamic dimension) and dtype a runner expects."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype | None = np.dtype(np.float32)


def check_feed(feed: Mapping[str, np.ndarray], specs: Sequence[TensorSpec],
               runner: str) -> dict[str, np.ndarray]:
    """Check a runner's feed against its input specs; return C-contiguous arrays.

    Raises ``ConfigError`` naming the tensor, what was given and what was expected
    for a missing or unexpected name, a non-array, a wrong dtype, rank or static
    dimension (for rank-4 inputs dim 1 is the channel count: 3 for RGB).
    """
    if not isinstance(feed, Mapping):
        raise ConfigError(f"{runner}: feed is a {type(feed).__name__}, expected a dict",
                          f"call infer({{{specs[0].name!r}: array}})" if specs else "")
    expected = [spec.name for spec in specs]
    missing = [name for name in expected if name not in feed]
    extra = [name for name in feed if name not in expected]
    if missing or extra:
        raise ConfigError(f"{runner}: feed names {sorted(feed)} do not match the model inputs "
                          f"{expected} (missing {missing}, unexpected {extra})",
                          f"feed exactly {expected}")
    checked: dict[str, np.ndarray] = {}
    for spec in specs:
        array = feed[spec.name]
        if not isinstance(array, np.ndarray):
            raise ConfigError(f"{runner}: input {spec.name!r} is a {type(array).__name__}, "
                              "expected a numpy array", "convert it with np.asarray(...)")
        if spec.dtype is not None and array.dtype != spec.dtype:
            raise ConfigError(f"{runner}: input {spec.name!r} has dtype {array.dtype}, "
                              f"expected {spec.dtype}",
                              "model inputs are float32 RGB in [0, 1]; use "
                              "edge_runtime.preprocess or .astype(np.float32)")
        if array.ndim != len(spec.shape):
            raise ConfigError(f"{runner}: input {spec.name!r} has shape {array.shape} "
                              f"(rank {array.ndim}), expected rank {len(spec.shape)} "
                              f"{_describe(spec.shape)}",
                              "add the batch axis with x[np.newaxis]" if
                              array.ndim + 1 == len(spec.shape) else "")
        for axis, (got, want) in enumerate(zip(array.shape, spec.shape, strict=True)):
            if want is not None and got != want:
                what = _DIM_NAMES[axis] if len(spec.shape) == 4 else f"dim {axis}"
                raise ConfigError(f"{runner}: input {spec.name!r} has shape {array.shape}; "
                                  f"its {what} is {got}, expected {want} "
                                  f"{_describe(spec.shape)}",
                                  "model inputs are N x 3 x S x S RGB (NCHW), S = input_size")
        checked[spec.name] = np.ascontiguousarray(array)
    return checked


def _describe(shape: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"
