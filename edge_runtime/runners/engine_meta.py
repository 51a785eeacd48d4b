"""The JSON sidecar of a TensorRT engine, and the checks made before loading one.

A serialized engine only runs under the TensorRT version that built it, on the GPU
model it was built for, so ``distill.engine.build_engine`` writes
``<engine>.json`` beside ``<engine>`` (e.g. ``sign.engine.json``) holding:

- ``format``: ``"roadshield-tensorrt-engine/1"``;
- ``tensorrt_version``, ``gpu_name``, ``compute_capability`` ("8.7"): where it was built;
- ``engine_sha256`` (the engine file), ``onnx_sha256`` (the ONNX it came from);
- ``precision`` ("fp16", "fp32", or "int8" for an explicitly quantized ONNX),
  ``workspace_bytes``;
- ``profiles``: input name -> ``[min, opt, max]`` shapes of the optimization profile;
- ``model_metadata``: the ONNX ``metadata_props`` (class names, input size, arch...),
  so the edge runtime knows the model without the ONNX file;
- ``input_name`` / ``output_name`` and ``built_at`` (UTC, ISO 8601).

``check_engine`` refuses, with a ``ModelLoadError`` saying how to rebuild, an engine
whose bytes, TensorRT version or GPU differ from what the sidecar records.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Any

from roadshield_base.errors import ModelLoadError
from roadshield_base.fileio import atomic_write_json, file_sha256

from ..model_info import ModelInfo, model_info_from_metadata

SIDECAR_FORMAT = "roadshield-tensorrt-engine/1"
ENGINE_SUFFIXES = (".engine", ".plan")
REBUILD_HINT = ("rebuild the engine on this device from the ONNX file: "
                "`roadshield distill engine` (distill.engine.build_engine)")


@dataclass(frozen=True)
class EngineInfo:
    """What the sidecar records about one engine (see the module docstring)."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    engine_sha256: str
    onnx_sha256: str
    precision: str
    workspace_bytes: int
    input_name: str
    output_name: str
    profiles: dict[str, list[list[int]]] = field(default_factory=dict)
    model_metadata: dict[str, str] = field(default_factory=dict)
    built_at: str = ""
    format: str = SIDECAR_FORMAT

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "sidecar") -> EngineInfo:
        if data.get("format") != SIDECAR_FORMAT:
            raise ModelLoadError(f"{where} has format {data.get('format')!r}, not "
                                 f"{SIDECAR_FORMAT!r}", REBUILD_HINT)
        known = set(cls.__dataclass_fields__)
        required = {name for name, f in cls.__dataclass_fields__.items()
                    if f.default is MISSING and f.default_factory is MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ModelLoadError(f"{where} lacks {missing}", REBUILD_HINT)
        try:
            info = cls(**{k: v for k, v in data.items() if k in known})
            int(info.workspace_bytes)
        except (TypeError, ValueError) as err:
            raise ModelLoadError(f"{where} is malformed: {err}", REBUILD_HINT) from err
        return info


def sidecar_path(engine_path: str | os.PathLike[str]) -> Path:
    """``model.engine`` -> ``model.engine.json``."""
    path = Path(engine_path)
    return path.with_name(path.name + ".json")


def write_sidecar(engine_path: str | os.PathLike[str], info: EngineInfo) -> Path:
    """Write the sidecar of ``engine_path`` atomically; returns its path."""
    target = sidecar_path(engine_path)
    atomic_write_json(target, info.to_json())
    return target


def read_sidecar(engine_path: str | os.PathLike[str]) -> EngineInfo:
    """The sidecar of ``engine_path``; ``ModelLoadError`` when missing or malformed."""
    target = sidecar_path(engine_path)
    try:
        data = json.loads(target.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"TensorRT engine {engine_path} has no sidecar {target.name} "
                             "(TensorRT version, GPU, sha256)",
                             f"an engine is only loaded with its sidecar; {REBUILD_HINT}"
                             ) from None
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"cannot read {target}: {err}", REBUILD_HINT) from err
    if not isinstance(data, dict):
        raise ModelLoadError(f"{target} is not a JSON object", REBUILD_HINT)
    return EngineInfo.from_json(data, str(target))


def check_engine(engine_path: str | os.PathLike[str], info: EngineInfo, *,
                 tensorrt_version: str, gpu_name: str,
                 compute_capability: tuple[int, int] | None = None,
                 engine_sha256: str | None = None) -> None:
    """Refuse an engine that is not the one its sidecar describes, or not for this machine.

    tensorrt_version: ``tensorrt.__version__`` here; must equal the building version
        (TensorRT does not load engines across versions).
    gpu_name / compute_capability: this GPU; the engine's kernels were chosen for the
        building GPU's model.
    engine_sha256: the engine file's digest (computed when None).
    Raises ``ModelLoadError`` naming both values and how to rebuild.
    """
    digest = engine_sha256 if engine_sha256 is not None else file_sha256(engine_path)
    if digest != info.engine_sha256:
        raise ModelLoadError(f"TensorRT engine {engine_path} has sha256 {digest[:12]}..., its "
                             f"sidecar records {info.engine_sha256[:12]}...",
                             f"the engine and its sidecar do not belong together; "
                             f"{REBUILD_HINT}")
    if info.tensorrt_version != tensorrt_version:
        raise ModelLoadError(f"TensorRT engine {engine_path} was built with TensorRT "
                             f"{info.tensorrt_version}; this machine has {tensorrt_version}",
                             f"engines do not load across TensorRT versions; {REBUILD_HINT}")
    here_cc = f"{compute_capability[0]}.{compute_capability[1]}" if compute_capability else None
    if info.gpu_name != gpu_name or (here_cc is not None and info.compute_capability != here_cc):
        raise ModelLoadError(f"TensorRT engine {engine_path} was built for "
                             f"{info.gpu_name} (sm {info.compute_capability}); this GPU is "
                             f"{gpu_name}" + (f" (sm {here_cc})" if here_cc else ""),
                             f"engines are tuned for one GPU model; {REBUILD_HINT}")


def engine_model_info(engine_path: str | os.PathLike[str],
                      sidecar: EngineInfo | None = None) -> ModelInfo:
    """The model's identity from an engine's sidecar (its ONNX metadata), for the loop.

    Same fields as ``edge_runtime.model_info.read_model_info`` gives for the ONNX file;
    ``sha256`` is the engine's. sidecar: the one already read (and checked) for this
    engine; None reads it. Raises ``ModelLoadError`` when the metadata is missing.
    """
    info = sidecar if sidecar is not None else read_sidecar(engine_path)
    meta = info.model_metadata
    hint = ("build the engine from an ONNX written by `roadshield distill export`; "
            f"{REBUILD_HINT}")
    outputs = [info.output_name]
    features = meta.get("features_output")
    if features:  # the engine keeps every output of the ONNX it was built from
        outputs.append(features)
    return model_info_from_metadata(meta, f"sidecar of {engine_path}",
                                    input_name=info.input_name, outputs=outputs, width=None,
                                    sha256=info.engine_sha256, hint=hint)
