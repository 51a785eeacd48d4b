"""The sticker as a digital attack on crops, registered as ``rp2`` beside FGSM, PGD and ROA.

The physical sticker (``optimise.optimise_sticker``) is one pattern for every view of a
sign. On a batch of crops the same threat model, a shaped sticker of a given share of the
sign's face with unbounded colours inside it, becomes a per-example attack: the shape is
placed on the face (the crop's central ``face`` share, where the GTSRB-style crops put
the sign) and its pixels are optimised by signed-gradient steps, towards ``target`` when
one is given, away from the true label otherwise. It is the sticker's worst case for
each crop, a lower bound on what a printed sticker can achieve and a fair yardstick for
defences evaluated on crops.

Conventions as in ``cloud_train.attacks``: float32 NCHW RGB in [0, 1], eval mode,
results detached, equal to x outside the sticker.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cloud_train.attacks import eval_mode, register_attack, validate_params
from cloud_train.roa import GREY, default_alpha
from cloud_train.sticker.shapes import SHAPES, check_area, sticker_mask
from roadshield_base.errors import ConfigError

#: a round sign (speed limit 30) as the generic face the digital sticker is shaped on
_GENERIC_FACE_CLASS = 0


def crop_mask(size: int, shape: str = "bars", area: float = 0.10,
              face: float = 0.75) -> torch.Tensor:
    """bool [1, 1, size, size]: the sticker shape on the crop's central ``face`` share."""
    if shape not in SHAPES:
        raise ConfigError(f"unknown sticker shape {shape!r}", "use one of: " + ", ".join(SHAPES))
    check_area(area)
    if not 0.2 <= face <= 1.0:
        raise ConfigError(f"face share {face} outside [0.2, 1]",
                          "the sign covers about 0.6-0.9 of a GTSRB-style crop; use 0.75")
    art = sticker_mask(_GENERIC_FACE_CLASS, shape, area).astype(np.uint8) * 255
    side = max(2, round(size * face))
    small = cv2.resize(art, (side, side), interpolation=cv2.INTER_AREA) >= 128
    out = np.zeros((size, size), bool)
    o = (size - side) // 2
    out[o:o + side, o:o + side] = small
    return torch.from_numpy(out)[None, None]


@register_attack
def rp2(model: nn.Module, x: torch.Tensor, y: torch.Tensor, shape: str = "bars",
        area: float = 0.10, face: float = 0.75, steps: int = 30, alpha: float | None = None,
        target: int | None = None) -> torch.Tensor:
    """A shaped sticker of ``area`` of the sign's face per crop, optimised in ``steps``
    signed-gradient steps of ``alpha`` (None: 2.5 * 0.5 / steps) from grey.

    x: float32 [N, 3, H, W] RGB in [0, 1] (square); y: int64 [N] true labels; target: a
    class index every crop is pushed to (None: untargeted). Returns x_adv, detached.
    """
    validate_params(0.0, alpha, steps)
    if x.ndim != 4 or x.shape[2] != x.shape[3]:
        raise ConfigError(f"rp2 needs square N x 3 x H x W crops, got {tuple(x.shape)}",
                          "pass a float NCHW batch in [0, 1]")
    step = default_alpha(steps) if alpha is None else float(alpha)
    x = x.detach()
    if len(x) == 0:
        return x.clone()
    mask = crop_mask(x.shape[2], shape, area, face).to(x.device)
    goal = y if target is None else torch.full_like(y, int(target))
    sign = 1.0 if target is None else -1.0  # ascend the true label's loss, descend the target's
    fill = torch.full_like(x, GREY)
    with eval_mode(model):
        for _ in range(steps):
            fill.requires_grad_(True)
            loss = F.cross_entropy(model(torch.where(mask, fill, x)), goal, reduction="sum")
            (grad,) = torch.autograd.grad(loss, fill)
            fill = (fill.detach() + sign * step * grad.sign()).clamp_(0.0, 1.0)
    return torch.where(mask, fill, x).detach()
