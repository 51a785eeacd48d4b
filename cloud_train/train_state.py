"""The resumable training state: what ``cloud_train.train.train`` needs to continue a run.

Written atomically by rank 0 at the end of every epoch (temp file, fsync, rename), so an
interrupted run leaves the state of its last finished epoch, never half of one. It holds
the model weights, optimizer (SGD momentum buffers), scheduler and grad-scaler states,
the number of finished epochs, the per-epoch history, the weights kept by the
catastrophic-overfitting guard, every rank's random-generator states (torch CPU and
CUDA, NumPy, Python), the batch order generator of the loader, and the config and
model identity it was written with. Resuming from it continues bit for bit on the CPU:
the same final weights as a run that was never stopped.

File layout: ``MAGIC`` (16 bytes), the sha256 of the payload (32 bytes), then the
payload, a ``torch.save`` dict read back with ``weights_only=True`` (tensors, numbers,
strings, lists and dicts only; no code is unpickled). A missing, truncated or altered
file raises ModelLoadError before any training starts.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from roadshield_base.errors import ConfigError, ModelLoadError
from roadshield_base.fileio import atomic_write_bytes

FORMAT = "roadshield-train-state/1"
MAGIC = b"RSTRAINSTATE/1\n\x00"
#: config keys that change how a run executes, not what it computes; they may differ
#: between the interrupted run and its resumption (mixed precision changes the rounding)
RUNTIME_KEYS = frozenset({"device", "num_workers", "amp", "channels_last"})


@dataclass
class TrainState:
    """One training run after ``epoch`` finished epochs (see the module docstring)."""

    epoch: int
    config: dict[str, Any]
    model_meta: dict[str, Any]
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]
    history: dict[str, Any]
    kept_state: dict[str, torch.Tensor] | None
    best_guard: float
    rng: list[dict[str, Any]]
    sampler_rng: torch.Tensor | None
    steps_per_epoch: int
    world_size: int
    source: str = field(default="the training state", compare=False)  # for messages; not saved


def _saved_fields() -> list[str]:
    return [f.name for f in fields(TrainState) if f.name != "source"]


def model_identity(model: nn.Module) -> dict[str, Any]:
    """``arch``, ``num_classes``, ``input_size`` and ``model_kwargs`` of a registry model,
    normalised through JSON (tuples become lists) so two identities compare with ``==``."""
    meta = {"arch": getattr(model, "arch", type(model).__name__),
            "num_classes": getattr(model, "num_classes", None),
            "input_size": list(getattr(model, "input_size", ()) or ()),
            "model_kwargs": getattr(model, "model_kwargs", {})}
    return json.loads(json.dumps(meta, sort_keys=True, default=str))


def capture_rng(device: torch.device) -> dict[str, Any]:
    """This process's generator states: torch CPU (and CUDA for a CUDA device), NumPy's
    legacy global generator and Python's ``random``."""
    name, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(name), "key": torch.from_numpy(np.asarray(key, np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    """Put back what :func:`capture_rng` took (CUDA only when both sides have it)."""
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["key"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_train_state(state: TrainState, path: str | Path) -> str:
    """Write ``state`` to ``path`` atomically; return the sha256 of its payload."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **{k: getattr(state, k) for k in _saved_fields()}}, buf)
    payload = buf.getvalue()
    digest = hashlib.sha256(payload).digest()
    atomic_write_bytes(path, MAGIC + digest + payload)
    return digest.hex()


def load_train_state(path: str | Path) -> TrainState:
    """Read a state written by :func:`save_train_state`; ModelLoadError if the file is
    missing, unreadable, truncated, altered or of another format."""
    path = Path(path)
    hint = "resume from the .trainstate file the interrupted run wrote, or start afresh"
    if not path.is_file():
        raise ModelLoadError(f"training state {path} does not exist", hint)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ModelLoadError(f"cannot read training state {path}: {err.strerror or err}",
                             "check the path and its permissions") from err
    head = len(MAGIC) + 32
    if len(data) <= head or not data.startswith(MAGIC):
        raise ModelLoadError(f"{path} is not a roadshield training state (no {FORMAT} header)",
                             hint)
    payload = data[head:]
    if hashlib.sha256(payload).digest() != data[len(MAGIC):head]:
        raise ModelLoadError(f"training state {path} is corrupt (its sha256 does not match: "
                             "truncated or altered)", hint)
    try:
        raw = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:  # the unpickler raises several types for a bad payload
        raise ModelLoadError(f"training state {path} cannot be read: {err}", hint) from err
    names = set(_saved_fields())
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or set(raw) - {"format"} != names:
        got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise ModelLoadError(f"training state {path} has format "
                             f"{raw.get('format') if isinstance(raw, dict) else None!r} and "
                             f"keys {got}, expected {FORMAT}", hint)
    return TrainState(**{k: raw[k] for k in names}, source=f"training state {path}")


def _config_defaults() -> dict[str, Any]:
    """Every TrainConfig field with a default, as saved in a training state."""
    import dataclasses

    from cloud_train.train import TrainConfig

    return {f.name: f.default for f in dataclasses.fields(TrainConfig)
            if f.default is not dataclasses.MISSING}


def check_resumable(state: TrainState, model: nn.Module, config: dict[str, Any],
                    steps_per_epoch: int) -> None:
    """Refuse a state that cannot continue this run, before any work: another model
    (ModelLoadError), other settings or another amount of data per epoch (ConfigError)."""
    source = state.source
    mine = model_identity(model)
    if state.model_meta != mine:
        theirs = state.model_meta
        raise ModelLoadError(f"{source} was written for {theirs.get('arch')!r} with "
                             f"{theirs.get('num_classes')} classes, input "
                             f"{theirs.get('input_size')}, options {theirs.get('model_kwargs')}; "
                             f"this run builds {mine['arch']!r} with {mine['num_classes']} "
                             f"classes, input {mine['input_size']}, options "
                             f"{mine['model_kwargs']}",
                             "resume with the same --arch, --size and dataset, or start afresh "
                             "without --resume")
    # a key the saved run did not know yet (a field added since) counts at its default
    saved = {**_config_defaults(), **state.config}
    changed = sorted(k for k in set(saved) | set(config) if k not in RUNTIME_KEYS
                     and saved.get(k) != config.get(k))
    if changed:
        diff = ", ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in changed)
        raise ConfigError(f"{source} was written with other training settings ({diff})",
                          "resume with the settings of the interrupted run (only device, "
                          "workers and mixed precision may change), or start afresh")
    if state.steps_per_epoch != steps_per_epoch:
        raise ConfigError(f"{source} was written with {state.steps_per_epoch} batches per epoch, "
                          f"this run has {steps_per_epoch}",
                          "the dataset or the batch size changed: resume on the same data")
    if not 0 <= state.epoch <= int(config.get("epochs", state.epoch)):
        raise ConfigError(f"{source} says {state.epoch} epochs are done, of "
                          f"{config.get('epochs')}", "the file was altered; start afresh")
    expected = set(model.state_dict())
    if set(state.model) != expected:
        raise ModelLoadError(f"{source} holds weights {sorted(set(state.model) ^ expected)[:4]} "
                             "that do not fit this model", "start afresh without --resume")
