"""Input sanitizers: pure functions, a registry by name, and a chain for the run loop.

Each sanitizer takes either layout and returns a new array of the same layout:

* "image": H x W x 3 uint8 **BGR** (a camera frame, or a crop of one);
* "batch": N x 3 x H x W float32 **RGB** in [0, 1] (model input). Non-finite values
  raise ``SanitizeError``; finite values outside [0, 1] are clipped to it.

Anything else (another dtype, a channel count other than 3, an empty image) raises
``SanitizeError`` naming the shape and dtype. The exact formulas, and the plain-NumPy
references the CUDA kernels are checked against, are in ``kernels.sanitize_reference``.

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
step before it (``"resize_pad:seed=3,min_frac=0.9"``).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from kernels.reference import Box, clamp_box
from kernels.sanitize_reference import (
    SanitizeError,
    batch_to_images,
    bitdepth_lut,
    check_bits,
    check_min_frac,
    check_quality,
    images_to_batch,
    jpeg_dct_reference,
    resize_pad_params,
)
from roadshield.errors import ConfigError

from .preprocess import check_frame, preprocess_batch

__all__ = ["SanitizeError", "Sanitizer", "SanitizeChain", "bitdepth", "median", "jpeg",
           "resize_pad", "register_sanitizer", "list_sanitizers", "create_sanitizer",
           "parse_chain", "build_chain", "DEFAULT_CHAIN"]

#: bit-depth reduction, 3x3 median, then the fused crop -> resize -> RGB -> [0, 1].
DEFAULT_CHAIN = "bitdepth:bits=5,median:k=3,preprocess"
# cv2.resize (OpenCV 5) takes at most 128 channels from Python: 42 RGB images at once
_MAX_RESIZE_IMAGES = 42


def check_input(x: Any, op: str) -> str:
    """Return "image" (H x W x 3 uint8) or "batch" (N x 3 x H x W float32), else raise."""
    if not isinstance(x, np.ndarray):
        raise SanitizeError(f"{op}: input is a {type(x).__name__}, not a numpy array",
                            "pass H x W x 3 uint8 BGR or N x 3 x H x W float32 RGB")
    if x.dtype == np.uint8:
        if x.ndim != 3 or x.shape[2] != 3:
            raise SanitizeError(f"{op}: uint8 input of shape {x.shape} is not H x W x 3",
                                "convert grey/BGRA frames to BGR with cv2.cvtColor first")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise SanitizeError(f"{op}: image of shape {x.shape} is empty",
                                "drop empty crops before sanitizing")
        return "image"
    if x.dtype == np.float32:
        if x.ndim != 4 or x.shape[1] != 3:
            raise SanitizeError(f"{op}: float32 input of shape {x.shape} is not N x 3 x H x W",
                                "float input is a model batch, NCHW RGB in [0, 1]")
        if x.shape[2] == 0 or x.shape[3] == 0:
            raise SanitizeError(f"{op}: batch of shape {x.shape} has no pixels",
                                "give each image at least 1 x 1 pixels")
        if x.size and not (np.isfinite(x.min()) and np.isfinite(x.max())):
            raise SanitizeError(f"{op}: batch of shape {x.shape} holds NaN or infinity",
                                "check the preprocess and anything that wrote the batch")
        return "batch"
    raise SanitizeError(f"{op}: dtype {x.dtype} is not supported",
                        "pass uint8 H x W x 3 BGR images or float32 N x 3 x H x W batches")


def _clipped(x: np.ndarray) -> np.ndarray:
    """A float32 batch inside [0, 1] (the input itself when it already is)."""
    if x.size == 0 or (x.min() >= 0.0 and x.max() <= 1.0):
        return x
    return np.clip(x, np.float32(0.0), np.float32(1.0))


# --- the operations --------------------------------------------------------------------------

def bitdepth(x: np.ndarray, bits: int = 5, mode: str = "round") -> np.ndarray:
    """Feature squeezing (Xu et al. 2018): keep ``bits`` (1..8) levels per channel.

    image (uint8): a 256-entry table of the integer rule in ``kernels.sanitize_reference``
    (mode "round": round(x * L / 255) * 255 / L with L = 2**bits - 1, rounded; mode
    "truncate": clear the low 8 - bits bits). batch (float32, [0, 1]): mode "round" is
    ``rint(x * L) / L`` in float32; "truncate" applies the uint8 rule to ``rint(x * 255)``.
    Bit-exact with ``bitdepth_reference``.
    """
    bits, mode = check_bits(bits, mode)
    if check_input(x, "bitdepth") == "image":
        return cv2.LUT(x, bitdepth_lut(bits, mode))
    xc = _clipped(x)
    if mode == "truncate":
        v8 = np.rint(xc * np.float32(255.0)).astype(np.uint8)
        table = bitdepth_lut(bits, mode).astype(np.float32) / np.float32(255.0)
        return table[v8]
    levels = np.float32((1 << bits) - 1)
    out = np.multiply(xc, levels)
    np.rint(out, out=out)
    np.divide(out, levels, out=out)
    return out


def _check_k(k: int) -> int:
    if isinstance(k, bool) or k not in (3, 5):
        raise SanitizeError(f"median k={k!r} is not supported", "use median:k=3 or median:k=5")
    return int(k)


def median(x: np.ndarray, k: int = 3) -> np.ndarray:
    """k x k median per channel (k = 3 or 5), borders replicated (BORDER_REPLICATE).

    image: ``cv2.medianBlur``. batch: all N * 3 planes, stacked into one tall single-channel
    image, go through one ``cv2.medianBlur``; the k // 2 rows at the top and bottom of each
    plane, whose windows reached a neighbouring plane, are then recomputed from strips of
    their own plane's rows (replicated at its edges). Bit-exact with ``median_reference``
    (a median only selects values).
    """
    k = _check_k(k)
    if check_input(x, "median") == "image":
        return cv2.medianBlur(np.ascontiguousarray(x), k)
    n, c, h, w = x.shape
    if n == 0:
        return x.copy()
    r = k // 2
    planes = np.ascontiguousarray(x).reshape(n * c, h, w)
    out = cv2.medianBlur(planes.reshape(n * c * h, w), k).reshape(n * c, h, w)
    edge_rows = sorted({j for j in (*range(r), *range(h - r, h)) if 0 <= j < h})
    # window rows of each edge row, clamped to the plane: (len(edge_rows), k)
    windows = np.clip(np.array(edge_rows)[:, None] + np.arange(-r, r + 1), 0, h - 1)
    strips = planes[:, windows]  # (planes, edge rows, k, w); a strip's middle row is exact
    fixed = cv2.medianBlur(np.ascontiguousarray(strips).reshape(-1, w), k)
    out[:, edge_rows] = fixed.reshape(strips.shape)[:, :, r]
    return out.reshape(x.shape)


def _check_jpeg(quality: int, method: str, chroma: str) -> tuple[int, str, str]:
    quality = check_quality(quality)
    if method not in ("codec", "dct"):
        raise SanitizeError(f"jpeg method={method!r} is unknown",
                            "use method=codec (libjpeg via OpenCV) or method=dct")
    if chroma not in ("444", "420") or (method == "dct" and chroma != "444"):
        raise SanitizeError(f"jpeg chroma={chroma!r} is not available with method={method}",
                            "use chroma=444 (both methods) or chroma=420 (codec only)")
    return quality, method, chroma


def _codec_round_trip(image_bgr: np.ndarray, params: list[int]) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", image_bgr, params)
    out = cv2.imdecode(buf, cv2.IMREAD_COLOR) if ok else None
    if out is None or out.shape != image_bgr.shape:
        raise SanitizeError(f"JPEG round trip of a {image_bgr.shape} image failed",
                            "check the OpenCV build has JPEG support (cv2.getBuildInformation)")
    return out


def jpeg(x: np.ndarray, quality: int = 75, method: str = "codec",
         chroma: str = "444") -> np.ndarray:
    """JPEG recompression (Dziugaite et al. 2016; Das et al. 2017) at ``quality`` (1..100).

    method "codec": ``cv2.imencode`` / ``cv2.imdecode`` (libjpeg), chroma "444" (no
    subsampling, the default) or "420". method "dct": ``jpeg_dct_reference``, the 8 x 8
    DCT-quantise-IDCT approximation a GPU kernel computes (4:4:4 only). A batch is first
    made 8-bit (``rint(x * 255)``), RGB -> BGR, and returned as ``v / 255``.
    """
    quality, method, chroma = _check_jpeg(quality, method, chroma)
    factor = (cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444 if chroma == "444"
              else cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, factor]
    if check_input(x, "jpeg") == "image":
        if method == "dct":
            return jpeg_dct_reference(x, quality)
        return _codec_round_trip(np.ascontiguousarray(x), params)
    if x.shape[0] == 0:
        return x.copy()
    images = batch_to_images(x)
    if method == "dct":
        return images_to_batch(jpeg_dct_reference(images, quality))
    return images_to_batch(np.stack([_codec_round_trip(im, params) for im in images]))


def _check_resize_pad(seed: int, min_frac: float, fill: float) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SanitizeError(f"resize_pad seed={seed!r} is not a non-negative integer",
                            "e.g. resize_pad:seed=0")
    check_min_frac(min_frac)
    if not (isinstance(fill, (int, float)) and 0.0 <= fill <= 1.0):
        raise SanitizeError(f"resize_pad fill={fill!r} is not in [0, 1]",
                            "fill is a grey level in [0, 1] units (0 = black)")


def resize_pad(x: np.ndarray, seed: int = 0, frame_index: int = 0, min_frac: float = 0.875,
               fill: float = 0.0) -> np.ndarray:
    """Randomized resize and pad (Xie et al. 2018), replayable per (seed, frame_index).

    Each image is shrunk by one random scale in [min_frac, 1] (``cv2.resize``,
    INTER_LINEAR) and placed at a random offset on a canvas of ``fill`` ([0, 1] units) of
    the input's own size, so the output size is fixed. The draws are
    ``resize_pad_params(seed, frame_index, H, W, count)``: one row for an image, one per
    row for a batch. Within 1 grey level (uint8) / 1e-5 (float32) of
    ``resize_pad_reference``, which rounds OpenCV's bilinear formula in float64.
    """
    _check_resize_pad(seed, min_frac, fill)
    if check_input(x, "resize_pad") == "image":
        h, w = x.shape[:2]
        nh, nw, top, left = (int(v) for v in resize_pad_params(seed, frame_index, h, w, 1,
                                                               min_frac)[0])
        out = np.full_like(x, int(np.rint(fill * 255.0)))
        out[top:top + nh, left:left + nw] = cv2.resize(x, (nw, nh),
                                                       interpolation=cv2.INTER_LINEAR)
        return out
    n, _, h, w = x.shape
    params = resize_pad_params(seed, frame_index, h, w, n, min_frac)
    out = np.full_like(x, np.float32(fill))
    nhwc = x.transpose(0, 2, 3, 1)
    for nh in np.unique(params[:, 0]):
        rows = np.flatnonzero(params[:, 0] == nh)
        nh, nw = int(nh), int(params[rows[0], 1])
        # Images that share a size go through one resize as the channels of one image.
        for start in range(0, rows.size, _MAX_RESIZE_IMAGES):
            part = rows[start:start + _MAX_RESIZE_IMAGES]
            stack = np.ascontiguousarray(nhwc[part].transpose(1, 2, 0, 3)).reshape(h, w, -1)
            small = cv2.resize(stack, (nw, nh), interpolation=cv2.INTER_LINEAR)
            small = small.reshape(nh, nw, part.size, 3).transpose(2, 3, 0, 1)
            for j, i in enumerate(part):
                top, left = int(params[i, 2]), int(params[i, 3])
                out[i, :, top:top + nh, left:left + nw] = small[j]
    return out


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
register_sanitizer("median", median, check=_check_k)
register_sanitizer("jpeg", jpeg, check=_check_jpeg)
register_sanitizer("resize_pad", resize_pad, check=_check_resize_pad)
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


def build_chain(spec: str | Sequence[str] | SanitizeChain | None) -> SanitizeChain | None:
    """A chain from a spec string, a list of step specs, or a chain; None/"" gives None."""
    if spec is None or isinstance(spec, SanitizeChain):
        return spec
    if isinstance(spec, str) and not spec.strip():
        return None
    return SanitizeChain([create_sanitizer(name, **opts) for name, opts in parse_chain(spec)])
