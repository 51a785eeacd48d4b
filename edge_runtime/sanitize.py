"""Input sanitizers by name: a registry, chains of steps, and the chain the run loop calls.

The operations themselves (``bitdepth``, ``median``, ``jpeg``, ``resize_pad``; both the
H x W x 3 uint8 BGR image and the N x 3 x H x W float32 RGB batch layouts, bad-input
rules and formulas) are in ``edge_runtime.sanitize_ops`` and re-exported here.

Where the chain runs in the loop: on each **crop** between locate and preprocess. A box
is clamped to the frame (x1/y1 exclusive), the crop is treated as an image of its own (a
median replicates the crop's edge pixels, not the frame's), the sanitizers named before
``preprocess`` run on it, the crop is resized to the model input, and the sanitizers named
after ``preprocess`` run on the float batch. A spec that does not name ``preprocess``
puts every step on the crops. So ``"bitdepth:bits=5,median:k=3"`` means
crop -> bitdepth -> median -> resize -> model, and ``"median,preprocess,resize_pad"``
shrinks-and-pads the model input rows.

Spec syntax: steps separated by ``,``; options after the name with ``:``
(``"jpeg:quality=60:method=dct"``); a ``key=value`` piece after a comma belongs to the
step before it (``"resize_pad:seed=3,min_frac=0.9"``). A leading ``cuda:`` runs the chain
as CUDA kernels (``edge_runtime.sanitize_cuda``: bitdepth, median, jpeg with method=dct,
then the fused preprocess, written straight into a TensorRT engine's input when one is
attached); ``cpu:`` or no prefix runs it here.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kernels.reference import Box, clamp_box
from kernels.sanitize_reference import check_bits
from roadshield_base.errors import ConfigError

from .preprocess import check_frame, preprocess_batch
from .sanitize_ops import (
    SanitizeError,
    bitdepth,
    check_input,
    check_jpeg,
    check_k,
    check_resize_pad,
    jpeg,
    median,
    resize_pad,
)

__all__ = ["SanitizeError", "Sanitizer", "SanitizeChain", "bitdepth", "median", "jpeg",
           "resize_pad", "register_sanitizer", "list_sanitizers", "create_sanitizer",
           "parse_chain", "split_device", "build_chain", "check_input", "DEFAULT_CHAIN",
           "DEVICES"]

#: bit-depth reduction, 3x3 median, then the fused crop -> resize -> RGB -> [0, 1].
DEFAULT_CHAIN = "bitdepth:bits=5,median:k=3,preprocess"
#: where a chain runs: a spec may start with "cpu:" (the default) or "cuda:"
DEVICES = ("cpu", "cuda")


# --- registry --------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Entry:
    fn: Callable[..., Any]
    options: dict[str, Any]  # option name -> default (its type converts spec strings)
    check: Callable[..., Any] | None
    frame_seeded: bool


_SANITIZERS: dict[str, _Entry] = {}
PREPROCESS = "preprocess"


def register_sanitizer(name: str, fn: Callable[..., Any], *,
                       check: Callable[..., Any] | None = None) -> None:
    """Make ``fn(x, **options)`` available as ``name`` in chains and ``create_sanitizer``.

    Options are the keyword parameters of ``fn`` with defaults (except ``frame_index``,
    which the chain passes per frame when ``fn`` has it). ``check(**options)`` validates
    options when a chain is built.
    """
    params = inspect.signature(fn).parameters
    options = {k: p.default for k, p in params.items()
               if p.default is not inspect.Parameter.empty and k != "frame_index"}
    _SANITIZERS[name] = _Entry(fn, options, check, "frame_index" in params)


def list_sanitizers() -> list[str]:
    """Registered names, ``preprocess`` included."""
    return sorted(_SANITIZERS)


def _convert(name: str, key: str, value: Any, default: Any) -> Any:
    if not isinstance(value, str) or isinstance(default, str):
        return value
    try:
        return type(default)(value)
    except ValueError:
        raise ConfigError(f"sanitizer {name}: option {key}={value!r} is not of type "
                          f"{type(default).__name__}", f"e.g. {name}:{key}={default}") from None


@dataclass
class Sanitizer:
    """One named step with its options: ``Sanitizer(...)(x, frame_index=i)``."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def __call__(self, x: np.ndarray, frame_index: int = 0) -> np.ndarray:
        entry = _SANITIZERS[self.name]
        if self.name == PREPROCESS:
            raise ConfigError("preprocess needs a frame, boxes and a size, not one array",
                              "name it inside a chain (build_chain) or call preprocess_batch")
        extra = {"frame_index": frame_index} if entry.frame_seeded else {}
        return entry.fn(x, **self.options, **extra)

    @property
    def spec(self) -> str:
        return ":".join([self.name] + [f"{k}={v}" for k, v in self.options.items()])

    @property
    def settings(self) -> dict[str, Any]:
        """Every option's value: the defaults of the function, updated by ``options``."""
        return {**_SANITIZERS[self.name].options, **self.options}


def create_sanitizer(name: str, **options: Any) -> Sanitizer:
    """Build a step by name (``list_sanitizers()``); string option values are converted."""
    entry = _SANITIZERS.get(name)
    if entry is None:
        raise ConfigError(f"unknown sanitizer '{name}'",
                          f"use one of: {', '.join(list_sanitizers())}")
    unknown = sorted(set(options) - set(entry.options))
    if unknown:
        raise ConfigError(f"sanitizer {name} has no option {', '.join(unknown)}",
                          f"its options: {', '.join(entry.options) or 'none'}")
    opts = {k: _convert(name, k, v, entry.options[k]) for k, v in options.items()}
    if entry.check is not None:
        try:
            entry.check(**{**entry.options, **opts})
        except SanitizeError as err:
            raise ConfigError(str(err.args[0]), err.hint) from err
    return Sanitizer(name, opts)


register_sanitizer("bitdepth", bitdepth, check=check_bits)
register_sanitizer("median", median, check=check_k)
register_sanitizer("jpeg", jpeg, check=check_jpeg)
register_sanitizer("resize_pad", resize_pad, check=check_resize_pad)
register_sanitizer(PREPROCESS, preprocess_batch)


# --- chains ----------------------------------------------------------------------------------

def parse_chain(spec: str | Sequence[str]) -> list[tuple[str, dict[str, str]]]:
    """``"bitdepth:bits=5,median:k=3"`` -> ``[("bitdepth", {"bits": "5"}), ("median", ...)]``.

    A sequence gives one step per item (``["jpeg:quality=60", "median"]``). Values stay
    strings here; ``create_sanitizer`` converts them.
    """
    pieces = spec.split(",") if isinstance(spec, str) else [str(s) for s in spec]
    steps: list[tuple[str, dict[str, str]]] = []
    for raw in pieces:
        piece = raw.strip()
        if not piece:
            raise ConfigError(f"sanitizer chain {spec!r} has an empty step",
                              'write steps as "name:key=value,name", e.g. '
                              '"bitdepth:bits=5,median:k=3"')
        head, *opts = piece.split(":")
        if "=" in head:  # "key=value" continuing the previous step's options
            if not steps or not isinstance(spec, str):
                raise ConfigError(f"sanitizer chain {spec!r}: option '{head}' has no step",
                                  "put options after a name: name:key=value")
            opts = [head, *opts]
            name, options = steps[-1]
        else:
            name, options = head.strip(), {}
            steps.append((name, options))
        for opt in opts:
            key, sep, value = opt.partition("=")
            if not sep or not key.strip() or not value.strip():
                raise ConfigError(f"sanitizer chain {spec!r}: '{opt}' is not key=value",
                                  "e.g. median:k=3")
            options[key.strip()] = value.strip()
    return steps


class SanitizeChain:
    """Sanitizers for crops, the preprocess, and sanitizers for the model batch.

    ``chain(frame_bgr, boxes, size, frame_index)`` has the loop's ``Preprocess`` contract:
    frame H x W x 3 uint8 BGR, boxes (x0, y0, x1, y1) with x1/y1 exclusive, returns float32
    (N, 3, size, size) RGB in [0, 1]. ``last_sanitize_ms`` is the time the last call spent
    in sanitizers (the rest is the preprocess).
    """

    def __init__(self, steps: Sequence[Sanitizer]) -> None:
        names = [s.name for s in steps]
        if names.count(PREPROCESS) > 1:
            raise ConfigError(f"sanitizer chain {names} names preprocess twice",
                              "name it once, between crop and batch steps")
        cut = names.index(PREPROCESS) if PREPROCESS in names else len(names)
        self.crop_steps = list(steps[:cut])
        self.batch_steps = list(steps[cut + 1:])
        self.last_sanitize_ms = 0.0

    #: where the steps run ("cpu" here; "cuda" for ``CudaSanitizeChain``)
    device = "cpu"

    def close(self) -> None:
        """Release what the chain holds: nothing on the CPU (``CudaSanitizeChain`` frees
        its device memory); every chain has it, so its owner closes any chain alike."""

    def attach_runner(self, runner: Any) -> bool:
        """Hand the batch to ``runner`` in device memory where the chain can (a CUDA chain
        and a TensorRT runner). A CPU chain returns host arrays: nothing to attach,
        returns False."""
        return False

    @property
    def spec(self) -> str:
        """The canonical spec string; ``build_chain(chain.spec)`` rebuilds the chain."""
        parts = [s.spec for s in self.crop_steps] + [PREPROCESS]
        return ",".join(parts + [s.spec for s in self.batch_steps])

    def __repr__(self) -> str:
        return f"SanitizeChain({self.spec!r})"

    def sanitize_crop(self, crop_bgr: np.ndarray, frame_index: int = 0) -> np.ndarray:
        """Run the crop steps on one H x W x 3 uint8 BGR image."""
        for step in self.crop_steps:
            crop_bgr = step(crop_bgr, frame_index=frame_index)
        return crop_bgr

    def sanitize_batch(self, batch: np.ndarray, frame_index: int = 0) -> np.ndarray:
        """Run the batch steps on an N x 3 x H x W float32 RGB batch."""
        for step in self.batch_steps:
            batch = step(batch, frame_index=frame_index)
        return batch

    def __call__(self, frame_bgr: np.ndarray, boxes: Sequence[Box] | np.ndarray, size: int,
                 frame_index: int = 0,
                 preprocess: Callable[..., np.ndarray] | None = None) -> np.ndarray:
        pre = preprocess if preprocess is not None else preprocess_batch
        spent = 0.0
        if not self.crop_steps:
            out = pre(frame_bgr, boxes, size)
        else:
            height, width = check_frame(frame_bgr)
            out = np.empty((len(boxes), 3, size, size), np.float32)
            for i, box in enumerate(boxes):
                clamped = clamp_box(box, height, width)
                if clamped is None:
                    raise SanitizeError(f"boxes[{i}] {tuple(box)!r} lies outside the "
                                        f"{width}x{height} frame",
                                        "drop detections that fall off the image")
                x0, y0, x1, y1 = clamped
                t0 = time.perf_counter()
                crop = self.sanitize_crop(frame_bgr[y0:y1, x0:x1], frame_index)
                spent += time.perf_counter() - t0
                out[i] = pre(crop, [(0, 0, x1 - x0, y1 - y0)], size)[0]
        t0 = time.perf_counter()
        out = self.sanitize_batch(out, frame_index)
        self.last_sanitize_ms = (spent + time.perf_counter() - t0) * 1e3
        return out


def split_device(spec: str) -> tuple[str | None, str]:
    """``"cuda:bitdepth:bits=5,preprocess"`` -> ``("cuda", "bitdepth:bits=5,preprocess")``;
    a spec without a device prefix gives ``(None, spec)``."""
    head, sep, rest = spec.strip().partition(":")
    if sep and head.strip().lower() in DEVICES:
        return head.strip().lower(), rest
    return None, spec


def _chain_steps(spec: str | Sequence[str], device: str | None
                 ) -> tuple[str, list[Sanitizer]] | None:
    """(device, steps) of a chain spec, or None for an empty one; opens nothing."""
    if isinstance(spec, str):
        named, spec = split_device(spec)
        if named is not None and device is not None and named != device.lower():
            raise ConfigError(f"sanitizer chain names device {named!r} but device={device!r}",
                              "name the device once")
        device = named or device
        if not spec.strip():
            if named is not None:
                raise ConfigError(f"sanitizer chain '{named}:' names no step",
                                  f"e.g. {named}:{DEFAULT_CHAIN}")
            return None
    device = (device or "cpu").lower()
    if device not in DEVICES:
        raise ConfigError(f"sanitizer device {device!r} is unknown", f"use one of {DEVICES}")
    return device, [create_sanitizer(name, **opts) for name, opts in parse_chain(spec)]


def check_chain_spec(spec: str | Sequence[str] | SanitizeChain | None,
                     device: str | None = None) -> None:
    """Raise the ``ConfigError`` ``build_chain`` would for a bad spec, without opening
    anything (no CUDA launcher, no kernels): a caller checks every setting first."""
    if spec is None or isinstance(spec, SanitizeChain):
        return
    parsed = _chain_steps(spec, device)
    if parsed is None:
        return
    chain = SanitizeChain(parsed[1])  # preprocess named twice, crop / batch split
    if parsed[0] == "cuda":
        from .sanitize_cuda import check_gpu_steps

        check_gpu_steps(chain.crop_steps, chain.batch_steps)


def build_chain(spec: str | Sequence[str] | SanitizeChain | None, device: str | None = None,
                **cuda_options: Any) -> SanitizeChain | None:
    """A chain from a spec string, a list of step specs, or a chain; None/"" gives None.

    device: "cpu" (default) or "cuda"; a spec string may name it instead as a prefix,
    ``"cuda:bitdepth:bits=5,median:k=3,preprocess"`` (both given must agree). "cuda"
    returns an ``edge_runtime.sanitize_cuda.CudaSanitizeChain`` (``cuda_options`` go to
    it: ``launcher``, ``kernels``, ``build_dir``); it raises ``BackendUnavailableError``
    with a hint where no GPU or CUDA binding is present. Close the chain (``close()``)
    when done: a CUDA chain holds device memory.
    """
    if spec is None or isinstance(spec, SanitizeChain):
        return spec
    parsed = _chain_steps(spec, device)
    if parsed is None:
        return None
    device, steps = parsed
    if device == "cuda":
        from .sanitize_cuda import CudaSanitizeChain

        return CudaSanitizeChain(steps, **cuda_options)
    if cuda_options:
        raise ConfigError(f"options {sorted(cuda_options)} only apply to device 'cuda'",
                          "drop them, or build the chain with device='cuda'")
    return SanitizeChain(steps)
