"""``train --init``: fine-tuning starts from a checkpoint's weights, and only a compatible one."""

from __future__ import annotations

import pytest
import torch

from cloud_train import pipeline
from cloud_train.checkpoint import load_checkpoint
from cloud_train.render import render_dataset
from roadshield_base.errors import ConfigError


@pytest.fixture(scope="module")
def data_and_start(tmp_path_factory):
    root = tmp_path_factory.mktemp("init")
    render_dataset(root / "data", train_per_class=3, test_per_class=1, progress=False)
    start = pipeline.train_checkpoint(root / "data", root / "start.safetensors",
                                      arch="signnet_tiny", trainer="standard", epochs=1,
                                      batch_size=16, seed=1, progress=False)
    return root, start


def _max_weight_gap(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters(),
                                                          strict=True))


def test_a_fine_tune_starts_from_the_given_weights(data_and_start):
    root, start = data_and_start
    kw = dict(arch="signnet_tiny", trainer="standard", epochs=1, batch_size=16, seed=0,
              lr=1e-6, progress=False)
    tuned = pipeline.train_checkpoint(root / "data", root / "tuned.safetensors",
                                      init=start.checkpoint, init_sha256=start.sha256, **kw)
    fresh = pipeline.train_checkpoint(root / "data", root / "fresh.safetensors", **kw)
    base, _ = load_checkpoint(start.checkpoint)
    # one epoch at lr 1e-6 barely moves a weight: the fine-tune stays at its start, while
    # a run from random weights (another seed's) is far from it
    assert _max_weight_gap(load_checkpoint(tuned.checkpoint)[0], base) < 1e-3
    assert _max_weight_gap(load_checkpoint(fresh.checkpoint)[0], base) > 0.05


def test_an_incompatible_or_altered_start_is_refused(data_and_start):
    root, start = data_and_start
    with pytest.raises(ConfigError, match="same architecture"):
        pipeline.train_checkpoint(root / "data", root / "x.safetensors", arch="signnet",
                                  epochs=1, batch_size=16, progress=False,
                                  init=start.checkpoint)
    from roadshield_base.errors import ModelLoadError

    with pytest.raises(ModelLoadError):
        pipeline.train_checkpoint(root / "data", root / "y.safetensors", arch="signnet_tiny",
                                  epochs=1, batch_size=16, progress=False,
                                  init=start.checkpoint, init_sha256="0" * 64)
