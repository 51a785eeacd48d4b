"""Backdoor triggers: what the attacker stamps on an image, and how.

Two kinds:

- ``patch`` (BadNets, Gu et al. 2017): a ``size x size`` square replaces the pixels at
  ``position``. Its content is ``pattern``: ``checker`` (pixel ``(i, j)`` of the patch is white
  when ``i + j`` is even, black otherwise), ``white`` (all 255) or ``random`` (uniform uint8
  noise drawn from ``numpy.random.default_rng(seed)``, one value per pixel and channel).
- ``blend`` (Chen et al. 2017): the whole image is mixed with a full-size pattern image,
  ``out = (1 - alpha) * image + alpha * pattern``, rounded to the nearest integer for uint8.
  The pattern image is built as for the patch, at the image's size.

Positions (top-left corner of the patch, ``x`` = column, ``y`` = row): ``bottom_right``
(``x = W - size, y = H - size``), ``top_left`` (``0, 0``), ``"x,y"`` (explicit), or
``random`` (a new corner per image, drawn from the ``rng`` passed in or, when none is, from
``default_rng(seed + 1)``; the tensor version always uses that default, so both give the
same corners for the same trigger).

Images are uint8 ``N x H x W x 3`` RGB (NumPy) or float32 ``N x 3 x H x W`` RGB in [0, 1]
(torch); both functions return a new array and never touch their input.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from roadshield_base.errors import ConfigError

KINDS = ("patch", "blend")
PATTERNS = ("checker", "white", "random")
NAMED_POSITIONS = ("bottom_right", "top_left", "random")


@dataclass(frozen=True)
class Trigger:
    """A backdoor trigger and the class it should send images to.

    kind: ``"patch"`` or ``"blend"``; target: target class index; size: patch side in pixels
    (patch kind); position: ``bottom_right``, ``top_left``, ``random`` or ``"x,y"``;
    pattern: ``checker``, ``white`` or ``random`` (seeded by ``seed``); alpha: blend weight
    in (0, 1] (blend kind). Settings that do not depend on the image are checked at
    construction; :meth:`validate` adds the image size and class count.
    """

    kind: str
    target: int
    size: int = 4
    position: str = "bottom_right"
    pattern: str = "checker"
    alpha: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"trigger kind {self.kind!r} is unknown",
                              f"use one of: {', '.join(KINDS)}")
        if self.pattern not in PATTERNS:
            raise ConfigError(f"trigger pattern {self.pattern!r} is unknown",
                              f"use one of: {', '.join(PATTERNS)}")
        if not _is_int(self.target):
            raise ConfigError(f"trigger target must be an integer class index, got "
                              f"{self.target!r}", "pass the index of the target class")
        if not _is_int(self.size) or self.size < 1:
            raise ConfigError(f"trigger size must be an integer >= 1, got {self.size!r}",
                              "use a patch side in pixels, e.g. 4")
        if not _is_int(self.seed):
            raise ConfigError(f"trigger seed must be an integer, got {self.seed!r}",
                              "pass e.g. seed=0")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) \
                or not 0.0 < float(self.alpha) <= 1.0:
            raise ConfigError(f"blend alpha must be in (0, 1], got {self.alpha!r}",
                              "use a small weight such as 0.1")
        _parse_position(self.position)

    def validate(self, image_hw: tuple[int, int], num_classes: int) -> None:
        """Raise ConfigError unless the trigger fits ``image_hw`` (H, W) and ``num_classes``."""
        if not _is_int(num_classes) or num_classes < 2:
            raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}",
                              "pass the number of classes of the dataset")
        if not 0 <= self.target < num_classes:
            raise ConfigError(f"trigger target {self.target} is outside the classes "
                              f"0..{num_classes - 1}", "pick a target class index in range")
        self._check_geometry(image_hw)

    def _check_geometry(self, image_hw: tuple[int, int]) -> None:
        h, w = int(image_hw[0]), int(image_hw[1])
        if self.kind != "patch":
            return
        if self.size > min(h, w):
            raise ConfigError(f"trigger patch size {self.size} is bigger than the "
                              f"{h}x{w} image", "use a patch side no larger than the image")
        xy = _parse_position(self.position)
        if xy is not None:
            x, y = xy
            if x + self.size > w or y + self.size > h:
                raise ConfigError(f"trigger position {self.position!r} with size {self.size} "
                                  f"does not fit the {h}x{w} image",
                                  f"keep x <= {w - self.size} and y <= {h - self.size}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; :meth:`from_dict` rebuilds the same trigger."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Trigger:
        """Rebuild a trigger from :meth:`to_dict`'s output (unknown keys -> ConfigError)."""
        known = set(cls.__dataclass_fields__)
        extra = sorted(set(d) - known)
        if extra:
            raise ConfigError(f"unknown trigger fields {extra}",
                              f"use only: {', '.join(sorted(known))}")
        if "kind" not in d or "target" not in d:
            raise ConfigError("a trigger dict needs 'kind' and 'target'",
                              "write it with Trigger.to_dict()")
        return cls(**d)


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _parse_position(position: str) -> tuple[int, int] | None:
    """``"x,y"`` -> (x, y); a named position -> None (resolved against the image later)."""
    if position in NAMED_POSITIONS:
        return None
    parts = str(position).split(",")
    try:
        x, y = (int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"trigger position {position!r} is not understood",
                          f"use one of {', '.join(NAMED_POSITIONS)} or 'x,y' "
                          "(column,row of the top-left corner)") from None
    if x < 0 or y < 0:
        raise ConfigError(f"trigger position {position!r} is negative",
                          "x and y count pixels from the top-left corner")
    return x, y


def pattern_image(trigger: Trigger, h: int, w: int) -> np.ndarray:
    """The trigger's content as uint8 ``h x w x 3`` RGB (patch: h = w = size)."""
    if trigger.pattern == "checker":
        ii, jj = np.indices((h, w))
        cell = np.where((ii + jj) % 2 == 0, 255, 0).astype(np.uint8)
        return np.repeat(cell[:, :, None], 3, axis=2)
    if trigger.pattern == "white":
        return np.full((h, w, 3), 255, np.uint8)
    return np.random.default_rng(trigger.seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def patch_corners(trigger: Trigger, n: int, h: int, w: int,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """Top-left corners ``(x, y)`` of the patch for ``n`` images, int64 ``n x 2``."""
    s = trigger.size
    xy = _parse_position(trigger.position)
    if trigger.position == "random":
        gen = rng if rng is not None else np.random.default_rng(trigger.seed + 1)
        xs = gen.integers(0, w - s + 1, n)
        ys = gen.integers(0, h - s + 1, n)
        return np.stack([xs, ys], axis=1).astype(np.int64)
    if trigger.position == "bottom_right":
        xy = (w - s, h - s)
    elif trigger.position == "top_left":
        xy = (0, 0)
    return np.tile(np.asarray(xy, np.int64), (n, 1))


def _check_images(images: np.ndarray) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 \
            or images.shape[-1] != 3:
        desc = f"{type(images).__name__} {getattr(images, 'dtype', '')} " \
               f"{getattr(images, 'shape', '')}"
        raise ConfigError(f"apply_trigger needs N x H x W x 3 uint8 RGB images, got {desc}",
                          "use apply_trigger_tensor for float NCHW tensors")


def apply_trigger(images: np.ndarray, trigger: Trigger,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """Stamp ``trigger`` on uint8 ``N x H x W x 3`` RGB images; returns a new array.

    ``rng`` is used only by ``position="random"`` (one corner per image).
    """
    _check_images(images)
    n, h, w, _ = images.shape
    trigger._check_geometry((h, w))
    out = images.copy()
    if trigger.kind == "blend":
        pat = pattern_image(trigger, h, w).astype(np.float64)
        mixed = (1.0 - trigger.alpha) * images.astype(np.float64) + trigger.alpha * pat
        return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    s = trigger.size
    pat = pattern_image(trigger, s, s)
    for i, (x, y) in enumerate(patch_corners(trigger, n, h, w, rng)):
        out[i, y:y + s, x:x + s] = pat
    return out


def apply_trigger_tensor(x: torch.Tensor, trigger: Trigger) -> torch.Tensor:
    """Stamp ``trigger`` on float ``N x 3 x H x W`` RGB in [0, 1]; returns a new tensor.

    Same pixels as :func:`apply_trigger` on the uint8 image (patch: exactly the pattern / 255;
    blend: without the rounding to whole uint8 levels). Differentiable with respect to ``x``.
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3 \
            or not x.is_floating_point():
        raise ConfigError(f"apply_trigger_tensor needs a float N x 3 x H x W tensor, got "
                          f"{getattr(x, 'dtype', type(x).__name__)} "
                          f"{tuple(getattr(x, 'shape', ()))}",
                          "use apply_trigger for uint8 NHWC arrays")
    n, _, h, w = x.shape
    trigger._check_geometry((h, w))
    if trigger.kind == "blend":
        pat = _pattern_tensor(trigger, h, w, x)
        return (1.0 - trigger.alpha) * x + trigger.alpha * pat
    s = trigger.size
    pat = _pattern_tensor(trigger, s, s, x)
    out = x.clone()
    corners = patch_corners(trigger, n, h, w)
    if trigger.position != "random":  # one corner for the batch: a single slice assignment
        cx, cy = (int(v) for v in corners[0])
        out[:, :, cy:cy + s, cx:cx + s] = pat
        return out
    for i, (cx, cy) in enumerate(corners):
        out[i, :, cy:cy + s, cx:cx + s] = pat
    return out


def _pattern_tensor(trigger: Trigger, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    pat = torch.from_numpy(pattern_image(trigger, h, w)).permute(2, 0, 1)
    return pat.to(device=like.device, dtype=like.dtype).div(255.0)
