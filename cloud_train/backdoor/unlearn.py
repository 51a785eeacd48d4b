"""Unlearning a backdoor with the trigger Neural Cleanse reversed (Wang et al. 2019,
section VI.C): fine-tune on the defender's clean images where a fraction ``stamp_rate`` of
every batch carries the reversed trigger of a flagged class and keeps its TRUE label, so the
model learns that the trigger means nothing.

Stamping is ``(1 - m) * x + m * p`` with the reversed mask ``m`` (H x W) and pattern ``p``
(3 x H x W) on float NCHW RGB in [0, 1]. Each stamped image gets one of the reversed
triggers, drawn uniformly.

Rounds: the smallest trigger Neural Cleanse reverses is often only a fragment of the real one
(a model trained with random-crop augmentation reacts to parts of the patch at several
shifts), and unlearning the fragment leaves the real trigger working: on signnet_tiny trained
on the 14 synthetic signs with a 1% BadNets poison, one pass left the attack success rate at
97%. So after each round the flagged classes' triggers are reversed again on the fine-tuned
model (the same optimisation, next seed) and the next round unlearns every trigger found so
far. On that model four rounds took the attack success rate from 100% to under 1% for about 1
point of clean accuracy. ``rounds=1`` is the paper's procedure.

Fine-tuning uses plain SGD (no momentum) from a small rate decayed to 0 (cosine), the usual
light augmentation, dropout on and batch-norm statistics frozen (a few hundred images should
not re-estimate them).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cloud_train.backdoor.neural_cleanse import (
    NeuralCleanseResult,
    check_clean_data,
    neural_cleanse,
)
from cloud_train.tensors import Augment, make_loader
from roadshield_base.errors import ConfigError

DEFAULT_ROUNDS = 4
# Neural Cleanse settings reused when a round reverses the flagged triggers again
_NC_KEYS = ("steps", "lr", "init_cost", "batch_size", "success_threshold", "patience",
            "cost_multiplier", "early_stop", "restarts")


def stamp(x: torch.Tensor, masks: torch.Tensor, patterns: torch.Tensor,
          which: torch.Tensor) -> torch.Tensor:
    """Stamp trigger ``which[i]`` on image ``x[i]``.

    x: float ``N x 3 x H x W`` in [0, 1]; masks ``T x H x W``; patterns ``T x 3 x H x W``;
    which: int64 ``N`` indices into the triggers. Returns a new tensor.
    """
    m = masks[which].unsqueeze(1)
    return (1 - m) * x + m * patterns[which]


def _check(epochs: Any, lr: Any, stamp_rate: Any, seed: Any, batch_size: Any) -> None:
    def bad(name: str, value: Any, hint: str) -> ConfigError:
        return ConfigError(f"unlearn {name}={value!r} is out of range", hint)

    def is_int(v: Any) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if not is_int(epochs) or epochs < 1:
        raise bad("epochs", epochs, "use an integer >= 1, e.g. 5")
    if not is_int(batch_size) or batch_size < 1:
        raise bad("batch_size", batch_size, "use an integer >= 1, e.g. 64")
    if not is_int(seed) or seed < 0:
        raise bad("seed", seed, "use an integer >= 0")
    for name, v, hint in (("lr", lr, "use a small rate such as 0.01"),
                          ("stamp_rate", stamp_rate, "use a fraction in (0, 1], e.g. 0.2")):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) \
                or not np.isfinite(v) or v <= 0:
            raise bad(name, v, hint)
    if stamp_rate > 1:
        raise bad("stamp_rate", stamp_rate, "use a fraction in (0, 1], e.g. 0.2")


def unlearn(model: nn.Module, images: np.ndarray, labels: np.ndarray,
            result: NeuralCleanseResult, *, epochs: int = 5, lr: float = 0.01,
            stamp_rate: float = 0.2, seed: int = 0, batch_size: int = 64,
            augment: bool = True, rounds: int = DEFAULT_ROUNDS) -> nn.Module:
    """Fine-tune ``model`` in place to forget the triggers of ``result.flagged``.

    images: uint8 ``N x H x W x 3`` RGB clean images with their true int ``labels`` (the
    defender's data, e.g. the images Neural Cleanse used). Each round is ``epochs`` passes at
    learning rate ``lr`` in batches of ``batch_size``, where ``round(stamp_rate * B)`` images
    of each batch carry one of the reversed triggers found so far; after every round but the
    last, Neural Cleanse (with ``result.settings``) reverses the flagged classes' triggers
    again on the fine-tuned model and adds them (module docstring). ``rounds=1`` is the
    paper's single unlearning pass. Runs on the model's device; deterministic for ``seed`` on
    the CPU. Returns the model in eval mode; with no flagged class it is returned unchanged
    (still switched to eval mode). Raises ConfigError for bad settings or data first.
    """
    _check(epochs, lr, stamp_rate, seed, batch_size)
    if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or rounds < 1:
        raise ConfigError(f"unlearn rounds={rounds!r} is out of range",
                          "use an integer >= 1 (1 is the paper's single pass)")
    lab = check_clean_data(images, labels, None, "unlearn")
    if not result.flagged:
        return model.eval()
    hw = tuple(images.shape[1:3])
    if tuple(result.masks.shape[1:]) != hw or tuple(result.patterns.shape[2:]) != hw:
        raise ConfigError(f"unlearn: reversed masks are {tuple(result.masks.shape[1:])} but "
                          f"the images are {hw}",
                          "pass the images at the size Neural Cleanse ran on")
    num = getattr(model, "num_classes", None)
    if isinstance(num, int) and (lab.min() < 0 or lab.max() >= num):
        raise ConfigError(f"unlearn: labels span {int(lab.min())}..{int(lab.max())} but the "
                          f"model has {num} classes", "pass labels of the model's classes")
    flagged = [int(c) for c in result.flagged]
    rows = [result.row(c) for c in flagged]
    masks = [np.asarray(result.masks[rows], np.float32)]
    patterns = [np.asarray(result.patterns[rows], np.float32)]
    nc_args = {k: result.settings[k] for k in _NC_KEYS if k in result.settings}
    try:
        for r in range(rounds):
            _finetune(model, images, lab, torch.from_numpy(np.concatenate(masks)),
                      torch.from_numpy(np.concatenate(patterns)), epochs=epochs, lr=float(lr),
                      stamp_rate=float(stamp_rate), seed=seed + r, batch_size=batch_size,
                      augment=augment)
            if r + 1 < rounds:
                nc_args["seed"] = seed + r + 1
                again = neural_cleanse(model, images, lab, classes=flagged, **nc_args)
                masks.append(again.masks)
                patterns.append(again.patterns)
    finally:
        model.eval()
    return model


def _finetune(model: nn.Module, images: np.ndarray, labels: np.ndarray, masks: torch.Tensor,
              patterns: torch.Tensor, *, epochs: int, lr: float, stamp_rate: float, seed: int,
              batch_size: int, augment: bool) -> None:
    """One unlearning round: ``masks`` T x H x W and ``patterns`` T x 3 x H x W on the CPU."""
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    # stamping, then augmentation, run on the loader's CPU batches: the attacker's poisoned
    # images were augmented after stamping too, so the trigger is unlearnt at every shift the
    # random crop gives
    loader = make_loader(images, labels, batch_size, shuffle=True, augment=False, seed=seed)
    aug = Augment() if augment else None
    gen = torch.Generator().manual_seed(seed)
    # plain SGD, cosine decay to 0: the model is confidently wrong on the stamped images, so
    # the first gradients are large; with momentum 0.9 they carried on into the clean
    # features (on the 8-class toy set clean accuracy fell 3-5 points at any lr, against
    # 0-0.3 points without momentum, for the same backdoor removal)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr,
                          momentum=0.0, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(loader))
    model.train()
    for mod in model.modules():  # keep the running statistics the model was trained with
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.eval()
    for _ in range(epochs):
        for x, y in loader:
            k = int(round(stamp_rate * len(x)))
            if k:
                pick = torch.randperm(len(x), generator=gen)[:k]
                which = torch.randint(0, len(masks), (k,), generator=gen)
                x = x.clone()
                x[pick] = stamp(x[pick], masks, patterns, which)
            if aug is not None:
                x = aug(x, torch.Generator().manual_seed(
                    int(torch.randint(0, 2**62, (1,), generator=gen))))
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(model(x), y)
            if not torch.isfinite(loss):
                raise ConfigError(f"unlearning diverged (loss {float(loss.detach())})",
                                  f"lower the learning rate (now {lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
