"""Inference backends by name: ``create_runner("onnxruntime" | "torch" | "auto", path)``.

Each backend registers a factory, the model file suffixes it loads and a probe
saying whether (and how well) it can run on this machine. ``"auto"`` asks the
probes of every backend that loads the file's suffix and takes the highest
priority:

    PRIORITY_TENSORRT (50)   a serialized TensorRT engine, with TensorRT and a CUDA binding
    PRIORITY_ORT_GPU (40)    onnxruntime with the TensorRT or CUDA provider
    PRIORITY_TORCH_CUDA (30) torch on a CUDA device
    PRIORITY_ORT_CPU (20)    onnxruntime on the CPU
    PRIORITY_TORCH_CPU (10)  torch on the CPU

The TensorRT backend loads ``.engine`` / ``.plan`` files (built on the device by
``distill.engine``); the others load ``.onnx`` / ``.pt2``. Probes import their
library lazily, so listing backends costs nothing until a backend is asked about.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.runners.base import BaseRunner, ModelBytes
from edge_runtime.runners.engine_meta import ENGINE_SUFFIXES
from edge_runtime.runners.onnxruntime_runner import (
    CPU_EP,
    OnnxRuntimeRunner,
    import_onnxruntime,
    select_providers,
)
from edge_runtime.runners.tensorrt_runner import TensorRTRunner, import_tensorrt
from edge_runtime.runners.torch_runner import TorchRunner
from roadshield_base.errors import BackendUnavailableError, ConfigError

log = logging.getLogger(__name__)

PRIORITY_TENSORRT = 50
PRIORITY_ORT_GPU = 40
PRIORITY_TORCH_CUDA = 30
PRIORITY_ORT_CPU = 20
PRIORITY_TORCH_CPU = 10

RunnerFactory = Callable[..., BaseRunner]


@dataclass(frozen=True)
class Availability:
    """What a probe found: can the backend run here, how good is it, and why."""

    usable: bool
    priority: int
    detail: str


@dataclass(frozen=True)
class RunnerEntry:
    name: str
    factory: RunnerFactory
    suffixes: tuple[str, ...]
    probe: Callable[[], Availability] | None


_RUNNERS: dict[str, RunnerEntry] = {}


def register_runner(name: str, factory: RunnerFactory, *, suffixes: tuple[str, ...] = (),
                    probe: Callable[[], Availability] | None = None) -> None:
    """Make ``create_runner(name, model_path, **kw)`` call ``factory(model_path, **kw)``.

    suffixes: model file suffixes the backend loads (".onnx"); "auto" only
        considers backends whose suffixes include the model's.
    probe: returns this machine's ``Availability``; ``None`` means always usable
        at priority 0.
    """
    if name == "auto":
        raise ConfigError("'auto' is reserved for picking a backend",
                          "register the backend under its own name")
    _RUNNERS[name] = RunnerEntry(name, factory, tuple(s.lower() for s in suffixes), probe)


def list_runners() -> list[str]:
    """Every registered backend name (whether or not it can run here)."""
    return sorted(_RUNNERS)


def probe_runner(name: str) -> Availability:
    """Ask one backend whether it can run on this machine."""
    entry = _entry(name)
    if entry.probe is None:
        return Availability(True, 0, "no probe")
    return entry.probe()


def available_runners() -> list[str]:
    """Backends that can run on this machine, best first."""
    found = [(probe_runner(name), name) for name in _RUNNERS]
    return [name for avail, name in sorted(found, key=lambda f: -f[0].priority) if avail.usable]


def pick_runner(model_path: str | os.PathLike[str]) -> tuple[str, Availability]:
    """The backend "auto" uses for ``model_path``, with the probe result that won."""
    suffix = Path(model_path).suffix.lower()
    candidates = [e.name for e in _RUNNERS.values() if suffix in e.suffixes]
    if not candidates:
        loads = {e.name: list(e.suffixes) for e in _RUNNERS.values()}
        raise ConfigError(f"no backend loads {suffix or 'suffix-less'} files ({model_path})",
                          f"export the model as one of: {loads}")
    probed = {name: probe_runner(name) for name in candidates}
    usable = {name: avail for name, avail in probed.items() if avail.usable}
    if not usable:
        why = "; ".join(f"{name}: {avail.detail}" for name, avail in probed.items())
        raise BackendUnavailableError(f"no backend for {model_path} can run here ({why})",
                                      "install one of them (pip install onnxruntime for the "
                                      "CPU fallback)")
    best = max(usable, key=lambda name: usable[name].priority)
    return best, usable[best]


def create_runner(name: str, model_path: Any, **kwargs: Any) -> BaseRunner:
    """Build (not activate) the backend ``name`` for ``model_path``.

    name: a registered backend or "auto" (best usable backend for the file's suffix).
    model_path: the model file; the "torch" backend also takes an ``nn.Module``, and
        "onnxruntime" (or "auto") a ``ModelBytes`` (a verified bundle's model in memory);
        "tensorrt" takes one too and runs the engine this device built from it
        (``edge_runtime.engine_cache``).
    kwargs: passed to the backend's constructor.
    Raises ``ConfigError`` for an unknown name or a file the backend does not load,
    ``BackendUnavailableError`` when no backend can run here.
    """
    in_memory = model_path if isinstance(model_path, ModelBytes) else None
    if in_memory is not None:
        if name not in ("auto", "onnxruntime", "tensorrt"):
            raise ConfigError(f"backend {name!r} cannot load a model from memory "
                              f"({in_memory.path}, {in_memory.origin})",
                              "a signed bundle carries ONNX models: run it with onnxruntime "
                              "or tensorrt (the engine this device built from it)")
        name = "tensorrt" if name == "tensorrt" else "onnxruntime"
    if name == "auto":
        if not isinstance(model_path, (str, os.PathLike)):
            raise ConfigError(f"backend 'auto' needs a model file, got "
                              f"{type(model_path).__name__}",
                              "name the backend, e.g. create_runner('torch', module)")
        name, avail = pick_runner(model_path)
        others = [n for n in list_runners() if n != name]
        log.info("auto backend for %s: %s (%s; other backends: %s)",
                 Path(model_path).name, name, avail.detail, others)
    entry = _entry(name)
    checked = in_memory.path if in_memory is not None else model_path
    # a bundle's ONNX is what the tensorrt backend looks its cached engine up by
    if isinstance(checked, (str, os.PathLike)) and entry.suffixes and \
            not (in_memory is not None and name == "tensorrt"):
        suffix = Path(checked).suffix.lower()
        if suffix not in entry.suffixes:
            loaders = [e.name for e in _RUNNERS.values() if suffix in e.suffixes]
            raise ConfigError(f"backend {name!r} loads {list(entry.suffixes)} files, not "
                              f"{model_path}",
                              f"use backend {loaders[0]!r} or 'auto'" if loaders
                              else "export the model in a format this backend loads")
    return entry.factory(model_path, **kwargs)


def _entry(name: str) -> RunnerEntry:
    if name not in _RUNNERS:
        raise ConfigError(f"unknown backend {name!r}",
                          f"choose one of {['auto', *list_runners()]}")
    return _RUNNERS[name]


def _probe_onnxruntime() -> Availability:
    try:
        ort = import_onnxruntime()
        providers = select_providers(None, ort.get_available_providers())
    except BackendUnavailableError as err:
        return Availability(False, 0, str(err.args[0]))
    if providers[0] != CPU_EP:
        return Availability(True, PRIORITY_ORT_GPU, f"providers {providers}")
    return Availability(True, PRIORITY_ORT_CPU, f"{CPU_EP} only")


def _probe_torch() -> Availability:
    if importlib.util.find_spec("torch") is None:
        return Availability(False, 0, "torch is not installed")
    import torch

    if torch.cuda.is_available():
        return Availability(True, PRIORITY_TORCH_CUDA,
                            f"CUDA device {torch.cuda.get_device_name(0)}")
    return Availability(True, PRIORITY_TORCH_CPU, "CPU only (no CUDA device)")


def _probe_tensorrt() -> Availability:
    try:
        trt = import_tensorrt()
    except BackendUnavailableError as err:
        return Availability(False, 0, str(err.args[0]))
    bindings = [name for name, module in (("pycuda", "pycuda"), ("cuda-python", "cuda"))
                if importlib.util.find_spec(module) is not None]
    if not bindings:
        return Availability(False, 0, f"TensorRT {trt.__version__} but neither pycuda nor "
                                      "cuda-python is installed (device buffers need one)")
    return Availability(True, PRIORITY_TENSORRT,
                        f"TensorRT {trt.__version__}, CUDA binding {bindings[0]}")


register_runner("tensorrt", TensorRTRunner, suffixes=ENGINE_SUFFIXES, probe=_probe_tensorrt)
register_runner("onnxruntime", OnnxRuntimeRunner, suffixes=(".onnx",), probe=_probe_onnxruntime)
register_runner("torch", TorchRunner, suffixes=(".pt2",), probe=_probe_torch)
