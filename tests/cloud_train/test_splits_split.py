"""Cluster-aware and temporal splits keep every duplicate cluster in one split."""

from __future__ import annotations

import numpy as np
import pytest

from cloud_train.splits.split import DROPPED, cluster_split, spanning_clusters, temporal_split
from roadshield_base.errors import ConfigError


def _clusters(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    clusters = np.sort(rng.integers(0, n // 3, n))
    clusters = np.unique(clusters, return_inverse=True)[1]
    labels = clusters % 5  # a cluster holds one label, as duplicates do
    return labels, clusters


def test_cluster_split_never_spans_and_is_stratified() -> None:
    labels, clusters = _clusters(3000, 0)
    split, names = cluster_split(labels, clusters, {"train": 0.8, "test": 0.2}, seed=1)
    assert names == ("train", "test") and (split >= 0).all()
    assert not len(spanning_clusters(clusters, split))
    for lab in range(5):
        frac = float((split[labels == lab] == 1).mean())
        assert abs(frac - 0.2) < 0.03, (lab, frac)


def test_cluster_split_is_seeded() -> None:
    labels, clusters = _clusters(600, 1)
    a, _ = cluster_split(labels, clusters, seed=3)
    b, _ = cluster_split(labels, clusters, seed=3)
    c, _ = cluster_split(labels, clusters, seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_three_way_split() -> None:
    labels, clusters = _clusters(3000, 2)
    split, names = cluster_split(labels, clusters, {"train": 0.7, "val": 0.1, "test": 0.2})
    assert names == ("train", "val", "test")
    assert not len(spanning_clusters(clusters, split))
    assert abs(float((split == 1).mean()) - 0.1) < 0.03


def test_bad_fractions_raise() -> None:
    with pytest.raises(ConfigError):
        cluster_split(np.zeros(4), np.arange(4), {"train": 0.9, "test": 0.2})


def test_temporal_split_keeps_future_out_of_train() -> None:
    times = np.array([1.0, 2.0, 3.0, 10.0, 11.0, 4.0, 12.0])
    clusters = np.array([0, 1, 2, 3, 4, 5, 5])  # cluster 5 crosses T=5
    split, names = temporal_split(times, clusters, 5.0)
    assert names == ("train", "test")
    assert split.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert times[split == 0].max() < 5.0
    dropped, _ = temporal_split(times, clusters, 5.0, crossing="drop")
    assert dropped.tolist() == [0, 0, 0, 1, 1, DROPPED, DROPPED]
    assert not len(spanning_clusters(clusters, dropped))


def test_temporal_split_rejects_bad_input() -> None:
    with pytest.raises(ConfigError):
        temporal_split(np.array([1.0, np.nan]), np.array([0, 1]), 1.0)
    with pytest.raises(ConfigError):
        temporal_split(np.array([1.0]), np.array([0]), 1.0, crossing="train")
