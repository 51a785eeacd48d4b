"""Unlearning a backdoor with the trigger Neural Cleanse reversed (Wang et al. 2019,
section VI.C): fine-tune on the defender's clean images where a fraction ``stamp_rate`` of
every batch carries the reversed trigger of a flagged class and keeps its TRUE label, so the
model learns that the trigger means nothing.

Stamping is ``(1 - m) * x + m * p`` with the reversed mask ``m`` (H x W) and pattern ``p``
(3 x H x W) on float NCHW RGB in [0, 1]. Each stamped image gets the trigger of one flagged
class, drawn uniformly. Fine-tuning uses plain SGD (no momentum) from a small rate decayed to 0
(cosine), the usual light augmentation, dropout on and batch-norm statistics frozen (a few
hundred images should not re-estimate them).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cloud_train.backdoor.neural_cleanse import NeuralCleanseResult, check_clean_data
from cloud_train.tensors import make_loader
from roadshield.errors import ConfigError


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
            augment: bool = True) -> nn.Module:
    """Fine-tune ``model`` in place to forget the triggers of ``result.flagged``.

    images: uint8 ``N x H x W x 3`` RGB clean images with their true int ``labels`` (the
    defender's data, e.g. the images Neural Cleanse used). ``epochs`` passes at learning rate
    ``lr`` in batches of ``batch_size``; in each batch ``round(stamp_rate * B)`` images carry
    a reversed trigger. Runs on the model's device; deterministic for ``seed`` on the CPU.
    Returns the model in eval mode; with no flagged class it is returned unchanged (still
    switched to eval mode). Raises ConfigError for bad settings or data before training.
    """
    _check(epochs, lr, stamp_rate, seed, batch_size)
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
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    rows = [result.row(c) for c in result.flagged]
    masks = torch.from_numpy(np.asarray(result.masks[rows], np.float32)).to(device)
    patterns = torch.from_numpy(np.asarray(result.patterns[rows], np.float32)).to(device)

    loader = make_loader(images, lab, batch_size, shuffle=True, augment=augment, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    # plain SGD, cosine decay to 0: the model is confidently wrong on the stamped images, so
    # the first gradients are large; with momentum 0.9 they carried on into the clean
    # features (on the 8-class toy set clean accuracy fell 3-5 points at any lr, against
    # 0-0.3 points without momentum, for the same backdoor removal)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=float(lr),
                          momentum=0.0, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(loader))
    model.train()
    for mod in model.modules():  # keep the running statistics the model was trained with
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.eval()
    try:
        for _ in range(epochs):
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                k = int(round(stamp_rate * len(x)))
                if k:
                    pick = torch.randperm(len(x), generator=gen)[:k].to(device)
                    which = torch.randint(0, len(rows), (k,), generator=gen).to(device)
                    x = x.clone()
                    x[pick] = stamp(x[pick], masks, patterns, which)
                loss = F.cross_entropy(model(x), y)
                if not torch.isfinite(loss):
                    raise ConfigError(f"unlearning diverged (loss {float(loss)})",
                                      f"lower the learning rate (now {lr})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    finally:
        model.eval()
    return model
