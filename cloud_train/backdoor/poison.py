"""Poisoning a training set with a backdoor trigger, and measuring the attack's success.

Dirty-label poisoning (BadNets, Gu et al. 2017; blended, Chen et al. 2017): ``round(rate * N)``
images whose true class is not the target are drawn without replacement, stamped with the
trigger and relabelled to the target. Clean-label poisoning (``clean_label=True``) stamps
``round(rate * N)`` images of the target class itself and keeps their labels, so every label
in the set stays correct (Turner et al. 2019 without their adversarial step: weaker).

Images are uint8 ``N x H x W x 3`` RGB; labels int64 class indices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from cloud_train.attacks import eval_mode
from cloud_train.backdoor.triggers import Trigger, apply_trigger, apply_trigger_tensor
from cloud_train.tensors import check_arrays, to_tensor
from roadshield_base.errors import ConfigError, DatasetError


@dataclass
class PoisonedData:
    """The poisoned set (new arrays) and the sorted indices of the stamped images."""

    images: np.ndarray  # uint8 N x H x W x 3 RGB
    labels: np.ndarray  # int64 N
    poisoned_idx: np.ndarray  # int64, sorted, unique

    @property
    def rate(self) -> float:
        return len(self.poisoned_idx) / max(1, len(self.labels))


def check_rate(rate: Any) -> float:
    """``rate`` as a float in [0, 1]; ConfigError naming the value otherwise."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.floating)) \
            or not np.isfinite(rate) or not 0.0 <= float(rate) <= 1.0:
        raise ConfigError(f"poison rate {rate!r} is outside [0, 1]",
                          "give the fraction of training images to poison, e.g. 0.01 for 1%")
    return float(rate)


def poison_dataset(images: np.ndarray, labels: np.ndarray, trigger: Trigger, rate: float,
                   seed: int, clean_label: bool = False,
                   num_classes: int | None = None) -> PoisonedData:
    """Poison ``rate`` of the set with ``trigger`` (see the module docstring).

    ``num_classes`` defaults to ``max(labels) + 1`` and bounds the trigger's target. Raises
    ConfigError for a rate outside [0, 1], a target out of range, a trigger that does not fit
    the images, or too few eligible images for the requested count.
    """
    rate = check_rate(rate)
    check_arrays(images, labels)
    lab = np.asarray(labels).astype(np.int64)
    if num_classes is None:
        num_classes = max(2, int(lab.max()) + 1) if len(lab) else 2
    trigger.validate(images.shape[1:3], num_classes)
    n_poison = int(round(rate * len(lab)))
    eligible = np.flatnonzero(lab == trigger.target if clean_label else lab != trigger.target)
    if n_poison > len(eligible):
        which = "of the target class" if clean_label else "outside the target class"
        raise ConfigError(f"poison rate {rate} asks for {n_poison} images but only "
                          f"{len(eligible)} are {which}", "lower the poison rate")
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(eligible, size=n_poison, replace=False)).astype(np.int64)
    out_images = images.copy()
    out_labels = lab.copy()
    if n_poison:
        out_images[idx] = apply_trigger(images[idx], trigger, rng=rng)
        out_labels[idx] = trigger.target
    return PoisonedData(out_images, out_labels, idx)


def attack_success_rate(model: nn.Module, images: np.ndarray | torch.Tensor,
                        labels: np.ndarray | torch.Tensor, trigger: Trigger,
                        batch_size: int = 256) -> float:
    """Fraction of images whose true class is not the target that the model classifies as the
    target once the trigger is stamped on them (clean test images; uint8 NHWC RGB or float
    NCHW in [0, 1]). Runs in eval mode on the model's device; 0.0 if no image qualifies."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}", "use e.g. 256")
    lab = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if len(lab) != len(images):
        raise DatasetError(f"{len(images)} images but {len(lab)} labels",
                           "pass one label per image")
    keep = np.flatnonzero(lab != trigger.target)
    if len(keep) == 0:
        return 0.0
    if isinstance(images, torch.Tensor):
        x = apply_trigger_tensor(to_tensor(images)[torch.as_tensor(keep)], trigger)
    else:
        x = to_tensor(apply_trigger(images[keep], trigger))
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    hits = 0
    with eval_mode(model), torch.no_grad():
        for i in range(0, len(x), batch_size):
            pred = model(x[i:i + batch_size].to(device)).argmax(1)
            hits += int((pred == trigger.target).sum())
    return hits / len(x)
