"""Mitigation for the data scans: drop the flagged examples and train again from scratch.

Activation clustering and spectral signatures point at training examples, not at weights, so
their fix is to remove those examples and retrain with the same recipe: the same architecture
(rebuilt from the model's registry name and keyword arguments), the same ``TrainConfig``, the
same loader settings and the same seed. Only the data changes, so a difference in clean
accuracy or attack success comes from the removed examples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from cloud_train.models import create_model
from cloud_train.tensors import check_arrays, make_loader
from cloud_train.train import TrainConfig, TrainHistory, train
from roadshield_base.errors import ConfigError


@dataclass
class RetrainResult:
    model: nn.Module  # eval mode
    history: TrainHistory
    kept: int  # training examples kept
    removed: int  # training examples dropped


def fresh_model(model: nn.Module, seed: int) -> nn.Module:
    """A new, untrained model of the same registry architecture, initialised after
    ``torch.manual_seed(seed)`` (ConfigError for a model not built by ``create_model``)."""
    arch, num_classes = vars(model).get("arch"), vars(model).get("num_classes")
    if arch is None or not isinstance(num_classes, int):
        raise ConfigError(f"{type(model).__name__} has no registry name (arch)",
                          "build models with cloud_train.models.create_model")
    torch.manual_seed(seed)
    return create_model(arch, num_classes, **vars(model).get("model_kwargs", {}))


def retrain_without(model: nn.Module, images: np.ndarray, labels: np.ndarray,
                    remove_idx: np.ndarray | list[int], cfg: TrainConfig, *,
                    augment: bool = False, seed: int | None = None,
                    val: tuple[Any, Any] | None = None,
                    progress: bool = False) -> RetrainResult:
    """Train a fresh copy of ``model``'s architecture on the set without ``remove_idx``.

    images: uint8 N x H x W x 3 RGB; labels: N ints (as trained on, poisoned labels
    included); remove_idx: indices into them. The loader is ``make_loader(kept, labels,
    cfg.batch_size, shuffle=True, augment=augment, seed=seed)`` and the weights start from
    ``torch.manual_seed(seed)``; ``seed`` defaults to ``cfg.seed``. ``model`` is untouched.
    """
    check_arrays(images, labels)
    idx = np.unique(np.asarray(remove_idx, dtype=np.int64))
    if idx.size and (idx[0] < 0 or idx[-1] >= len(images)):
        raise ConfigError(f"remove_idx holds {int(idx[0])}..{int(idx[-1])}, outside the "
                          f"{len(images)} training examples", "pass indices into this set")
    keep = np.setdiff1d(np.arange(len(images)), idx)
    if len(keep) == 0:
        raise ConfigError("every training example would be removed",
                          "check the scan's thresholds")
    seed = cfg.seed if seed is None else seed
    new = fresh_model(model, seed)
    lab = np.asarray(labels)
    loader = make_loader(images[keep], lab[keep], cfg.batch_size, shuffle=True,
                         augment=augment, seed=seed)
    history = train(new, loader, cfg, val=val, progress=progress)
    return RetrainResult(new.eval(), history, int(len(keep)), int(len(idx)))
