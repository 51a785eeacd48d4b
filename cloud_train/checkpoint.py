"""Checkpoints as safetensors files: weights plus provenance, no pickle.

The safetensors header metadata (string -> string) records what rebuilds and
explains the model: ``arch``, ``num_classes``, ``input_size`` (JSON ``[3, H, W]``),
``model_kwargs`` (JSON), ``class_names`` (JSON list), ``train_config`` (JSON),
``created`` (UTC, ISO 8601) and any extra keys the caller passes (JSON-encoded).
A checkpoint is addressed by the sha256 of its bytes, which ``save_checkpoint``
returns and ``load_checkpoint`` can verify before trusting anything in the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from cloud_train.models import create_model
from roadshield_base.errors import ConfigError, ModelLoadError, RoadshieldError
from roadshield_base.fileio import atomic_write_bytes

FORMAT = "roadshield-checkpoint/1"
#: header values stored as plain strings; every other value is JSON, so it decodes exactly
_TEXT_KEYS = ("arch", "format", "created")


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def save_checkpoint(model: nn.Module, path: str | Path, meta: dict[str, Any]) -> str:
    """Write ``model``'s weights and metadata to ``path`` atomically; return the file's sha256.

    ``meta`` must hold ``class_names`` (one name per output, in label order) and may
    hold ``train_config`` (a dict or a TrainConfig) and other JSON-serialisable keys.
    ``arch``, ``num_classes``, ``input_size`` and ``model_kwargs`` come from the model
    (built by ``create_model``); a conflicting value in ``meta`` is a ConfigError.
    """
    path = Path(path)
    for attr in ("arch", "num_classes", "input_size"):
        if not hasattr(model, attr):
            raise ConfigError(f"model {type(model).__name__} has no {attr!r} attribute",
                              "build models with cloud_train.models.create_model")
    names = meta.get("class_names")
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ConfigError("meta['class_names'] must be a list of strings",
                          "pass the dataset's class names in label order")
    if len(names) != model.num_classes:
        raise ConfigError(f"{len(names)} class names for a model with {model.num_classes} outputs",
                          "pass exactly one name per class")
    fixed = {"arch": model.arch, "num_classes": model.num_classes,
             "input_size": list(cast(Sequence[int], model.input_size)),
             "model_kwargs": getattr(model, "model_kwargs", {})}
    for key, value in fixed.items():
        if key in meta and _jsonable(meta[key]) != value \
                and not (key == "input_size" and list(meta[key]) == value):
            raise ConfigError(f"meta[{key!r}]={meta[key]!r} contradicts the model ({value!r})",
                              f"drop {key!r} from meta: it is read from the model")
    header: dict[str, str] = {"format": FORMAT,
                              "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    for key, value in {**meta, **fixed, "class_names": list(names)}.items():
        value = _jsonable(value)
        try:
            header[key] = value if key in _TEXT_KEYS else json.dumps(value, sort_keys=True)
        except TypeError as err:
            raise ConfigError(f"meta[{key!r}] is not JSON-serialisable: {err}",
                              "pass plain numbers, strings, lists and dicts") from err
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    data = st_save(tensors, metadata=header)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def _read_header(data: bytes, path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (8-byte LE length, then a JSON header)."""
    if len(data) < 8:
        raise ModelLoadError(f"{path} is not a safetensors file (only {len(data)} bytes)",
                             "re-create it with save_checkpoint")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ModelLoadError(f"{path} is truncated or not a safetensors file (header of {n} "
                             f"bytes in a {len(data)}-byte file)", "re-create or re-download it")
    try:
        header = json.loads(data[8:8 + n])
        meta = header.get("__metadata__") or {}
    except (ValueError, AttributeError) as err:
        raise ModelLoadError(f"{path} has a corrupt safetensors header: {err}",
                             "re-create or re-download it") from err
    if meta.get("format") != FORMAT:
        raise ModelLoadError(f"{path} is not a roadshield checkpoint (format "
                             f"{meta.get('format')!r}, expected {FORMAT!r})",
                             "save it with cloud_train.checkpoint.save_checkpoint")
    return meta


def _decode(raw: dict[str, str], path: Path) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _TEXT_KEYS:
            meta[key] = value
            continue
        try:
            meta[key] = json.loads(value)
        except ValueError:
            raise ModelLoadError(f"{path}: metadata {key!r} is not valid JSON",
                                 "the file was altered; re-create it") from None
    names, size = meta.get("class_names"), meta.get("input_size")
    checks = {
        "arch": isinstance(meta.get("arch"), str),
        "num_classes": isinstance(meta.get("num_classes"), int),
        "class_names": isinstance(names, list) and all(isinstance(n, str) for n in names),
        "input_size": isinstance(size, list) and len(size) == 3
        and all(isinstance(d, int) for d in size),
        "model_kwargs": isinstance(meta.get("model_kwargs", {}), dict),
    }
    bad = [key for key, ok in checks.items() if not ok]
    if bad:
        raise ModelLoadError(f"{path}: metadata {bad} missing or of the wrong type",
                             "the file was altered or not written by save_checkpoint")
    meta["input_size"] = tuple(size)  # type: ignore[arg-type]
    return meta


def load_checkpoint(path: str | Path,
                    expected_sha256: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model recorded in ``path`` and load its weights strictly.

    Returns ``(model in eval mode on the CPU, metadata)``; metadata holds the decoded
    header (``class_names`` as a list, ``input_size`` as a tuple, ``train_config`` as a
    dict, ...) plus ``sha256`` and ``path``. A missing or corrupt file, a sha256 that
    differs from ``expected_sha256``, or weights that do not fit the recorded
    architecture raise ModelLoadError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {path} does not exist",
                             "check the path, or train one with `roadshield train`")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ModelLoadError(f"cannot read checkpoint {path}: {err}", "check permissions") from err
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise ModelLoadError(f"checkpoint {path} has sha256 {digest}, expected {expected_sha256}",
                             "the file was altered or is another checkpoint; use the right one")
    meta = _decode(_read_header(data, path), path)
    try:
        tensors = st_load(data)
    except Exception as err:  # safetensors raises its own SafetensorError type
        raise ModelLoadError(f"checkpoint {path} is corrupt: {err}",
                             "re-create or re-download it") from err
    kwargs = meta.get("model_kwargs", {})
    if "input_size" not in kwargs:
        kwargs = {**kwargs, "input_size": list(meta["input_size"][1:])}
    try:
        model = create_model(meta["arch"], meta["num_classes"], **kwargs)
    except RoadshieldError as err:
        raise ModelLoadError(f"checkpoint {path} records a model that cannot be built: {err}",
                             "it was written by another version of roadshield") from err
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise ModelLoadError(f"weights in {path} do not fit arch {meta['arch']!r} with "
                             f"{meta['num_classes']} classes: {' '.join(first[:4])}",
                             "the metadata and the weights disagree; re-create the file") from err
    if len(meta["class_names"]) != model.num_classes:
        raise ModelLoadError(f"{path} lists {len(meta['class_names'])} class names for "
                             f"{model.num_classes} outputs", "re-create the checkpoint")
    meta["sha256"] = digest
    meta["path"] = str(path)
    return model.eval(), meta


def state_dicts_equal(a: nn.Module, b: nn.Module) -> bool:
    """True when two models hold bit-identical parameters and buffers under the same names."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)
