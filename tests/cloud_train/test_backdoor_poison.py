"""Poisoning counts and labels, attack success rate on a hand-built model, penultimate hooks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cloud_train.backdoor.features import dataset_features, penultimate
from cloud_train.backdoor.poison import attack_success_rate, poison_dataset
from cloud_train.backdoor.triggers import Trigger, apply_trigger
from cloud_train.models import create_model
from cloud_train.tensors import to_tensor
from roadshield_base.errors import ConfigError


def _set(n: int = 400, classes: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    # pixel values stay below 250, so a white patch is unmistakable
    return (rng.integers(0, 250, (n, 16, 16, 3), dtype=np.uint8),
            rng.integers(0, classes, n).astype(np.int64))


TRIG = Trigger("patch", target=2, size=3, pattern="white")


@pytest.mark.parametrize("rate", [0.0, 0.01, 0.05, 0.25])
def test_poison_count_labels_and_untouched_rest(rate: float):
    imgs, labels = _set()
    pd = poison_dataset(imgs, labels, TRIG, rate, seed=1)
    assert len(pd.poisoned_idx) == round(rate * 400)
    assert len(np.unique(pd.poisoned_idx)) == len(pd.poisoned_idx)
    assert (labels[pd.poisoned_idx] != 2).all()  # dirty label: drawn outside the target
    assert (pd.labels[pd.poisoned_idx] == 2).all()
    rest = np.setdiff1d(np.arange(400), pd.poisoned_idx)
    assert np.array_equal(pd.labels[rest], labels[rest])
    assert np.array_equal(pd.images[rest], imgs[rest])
    assert np.array_equal(pd.images[pd.poisoned_idx], apply_trigger(imgs[pd.poisoned_idx], TRIG))
    assert np.array_equal(imgs, _set()[0])  # inputs untouched


def test_poison_is_seeded():
    imgs, labels = _set()
    a = poison_dataset(imgs, labels, TRIG, 0.1, seed=4).poisoned_idx
    b = poison_dataset(imgs, labels, TRIG, 0.1, seed=4).poisoned_idx
    c = poison_dataset(imgs, labels, TRIG, 0.1, seed=5).poisoned_idx
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_clean_label_keeps_every_label():
    imgs, labels = _set()
    pd = poison_dataset(imgs, labels, TRIG, 0.05, seed=0, clean_label=True)
    assert len(pd.poisoned_idx) == 20
    assert np.array_equal(pd.labels, labels)
    assert (labels[pd.poisoned_idx] == 2).all()


@pytest.mark.parametrize("rate", [1.5, -0.1, float("nan")])
def test_rate_out_of_range_names_the_value(rate: float):
    imgs, labels = _set()
    with pytest.raises(ConfigError, match=f"poison rate {rate}"):
        poison_dataset(imgs, labels, TRIG, rate, seed=0)


def test_bad_target_size_and_counts():
    imgs, labels = _set()
    with pytest.raises(ConfigError, match="target 7"):
        poison_dataset(imgs, labels, Trigger("patch", 7), 0.1, seed=0)
    with pytest.raises(ConfigError, match="target 5"):
        poison_dataset(imgs, labels, Trigger("patch", 5), 0.1, seed=0, num_classes=5)
    with pytest.raises(ConfigError, match="size 20"):
        poison_dataset(imgs, labels, Trigger("patch", 1, size=20), 0.1, seed=0)
    with pytest.raises(ConfigError, match="only"):  # ~80 target images, 200 asked
        poison_dataset(imgs, labels, TRIG, 0.5, seed=0, clean_label=True)


class _CornerDetector(nn.Module):
    """Says class 2 when the bottom-right 3x3 is white, else the class coded by the mean red."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))  # gives the model a device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        white = (x[:, :, -3:, -3:] > 0.99).flatten(1).all(1)
        logits = torch.zeros(len(x), 5)
        logits[torch.arange(len(x)), (x[:, 0].mean((1, 2)) * 5).long().clamp(0, 4)] = 1.0
        logits[white] = 0.0
        logits[white, 2] = 1.0
        return logits + self.w


def test_attack_success_rate_counts_non_target_images_only():
    imgs, labels = _set(200)
    model = _CornerDetector()
    assert attack_success_rate(model, imgs, labels, TRIG) == 1.0
    assert attack_success_rate(model, to_tensor(imgs), torch.as_tensor(labels), TRIG) == 1.0
    # a trigger the model does not react to succeeds only where the model says 2 anyway
    other = Trigger("patch", target=2, size=3, position="top_left", pattern="white")
    keep = labels != 2
    base = model(to_tensor(apply_trigger(imgs[keep], other))).argmax(1)
    want = float((base == 2).float().mean())
    assert attack_success_rate(model, imgs, labels, other, batch_size=7) == pytest.approx(want)
    assert attack_success_rate(model, imgs[labels == 2], labels[labels == 2], TRIG) == 0.0


def test_penultimate_is_the_input_of_the_last_linear():
    torch.manual_seed(0)
    model = create_model("signnet", 4, input_size=32).train()
    x = torch.rand(10, 3, 32, 32)
    feats = penultimate(model, x, batch_size=3)
    model.eval()
    with torch.no_grad():
        pooled = model.pool(model.features(model.normalize(x)))
        want = model.head[:-1](pooled)  # Flatten, Linear, ReLU, Dropout (off in eval)
    assert feats.shape == (10, 128)
    assert torch.allclose(feats, want, atol=1e-5)
    model.train()
    penultimate(model, x)
    assert all(m.training for m in model.modules())  # training flags restored
    assert not model.head[-1]._forward_pre_hooks  # hook removed


def test_dataset_features_checks_shape():
    imgs, labels = _set(12)
    model = create_model("signnet_tiny", 5, input_size=16)
    assert dataset_features(model, imgs, labels).shape == (12, 64)
    with pytest.raises(ConfigError, match="N x D"):
        dataset_features(model, imgs, labels, features=np.zeros((11, 64)))
