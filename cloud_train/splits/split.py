"""Cluster-aware splits: a duplicate cluster never spans two splits.

``cluster_split`` assigns whole clusters, seeded, stratified by each cluster's majority
label. ``temporal_split`` puts clusters captured wholly before T in train and wholly at or
after T in test; a cluster that crosses T goes whole to test (``crossing="test"``, so train
never holds a sample from after T) or is dropped (``crossing="drop"``, reported).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from roadshield_base.errors import ConfigError

DROPPED = -1


def cluster_split(labels: np.ndarray, clusters: np.ndarray,
                  fractions: Mapping[str, float] | None = None,
                  seed: int = 0) -> tuple[np.ndarray, tuple[str, ...]]:
    """Split index per sample: int64 (N,), values index the returned split names.

    Clusters are grouped by their majority label; within a label, clusters are shuffled
    (seeded) and each goes to the split furthest below its target share of that label's
    samples, largest clusters first, so big clusters cannot unbalance the tail.
    """
    fractions = dict(fractions or {"train": 0.8, "test": 0.2})
    names = tuple(fractions)
    share = np.array([float(fractions[n]) for n in names])
    if len(names) < 2 or (share < 0).any() or not np.isclose(share.sum(), 1.0):
        raise ConfigError(f"split fractions {fractions} are invalid",
                          "give two or more non-negative fractions that sum to 1")
    labels = np.asarray(labels, np.int64)
    clusters = np.asarray(clusters, np.int64)
    if labels.shape != clusters.shape:
        raise ConfigError(f"{len(labels)} labels but {len(clusters)} cluster ids",
                          "give one cluster id per sample")
    rng = np.random.default_rng(seed)
    out = np.full(len(labels), DROPPED, np.int64)
    order = np.argsort(clusters, kind="stable")
    cut = np.flatnonzero(np.diff(clusters[order])) + 1
    members = np.split(order, cut) if len(order) else []
    major = np.array([np.bincount(labels[m]).argmax() for m in members], np.int64)
    for lab in np.unique(major):
        idx = np.flatnonzero(major == lab)
        idx = idx[rng.permutation(len(idx))]
        idx = idx[np.argsort([-len(members[i]) for i in idx], kind="stable")]
        total = sum(len(members[i]) for i in idx)
        have = np.zeros(len(names))
        for i in idx:
            k = int(np.argmax(share * total - have))
            out[members[i]] = k
            have[k] += len(members[i])
    return out, names


def temporal_split(times: np.ndarray, clusters: np.ndarray, cutoff: float,
                   crossing: str = "test") -> tuple[np.ndarray, tuple[str, ...]]:
    """Train before ``cutoff``, test at or after it, clusters kept whole.

    times: capture times (N,) in seconds since the epoch (any monotone unit works).
    Returns (split index per sample with DROPPED = -1 for dropped samples, ("train", "test")).
    """
    if crossing not in ("test", "drop"):
        raise ConfigError(f"crossing={crossing!r}", "use 'test' or 'drop'")
    times = np.asarray(times, np.float64)
    clusters = np.asarray(clusters, np.int64)
    if times.shape != clusters.shape:
        raise ConfigError(f"{len(times)} times but {len(clusters)} cluster ids",
                          "give one capture time per sample")
    if not np.isfinite(times).all():
        raise ConfigError("some capture times are not finite", "fix or drop those samples")
    n_c = int(clusters.max()) + 1 if len(clusters) else 0
    earliest = np.full(n_c, np.inf)
    latest = np.full(n_c, -np.inf)
    np.minimum.at(earliest, clusters, times)
    np.maximum.at(latest, clusters, times)
    before = latest[clusters] < cutoff
    after = earliest[clusters] >= cutoff
    out = np.where(before, 0, np.where(after, 1, 1 if crossing == "test" else DROPPED))
    return out.astype(np.int64), ("train", "test")


def spanning_clusters(clusters: np.ndarray, split: np.ndarray) -> np.ndarray:
    """Cluster ids whose (non-dropped) members sit in more than one split."""
    clusters = np.asarray(clusters, np.int64)
    split = np.asarray(split, np.int64)
    keep = split != DROPPED
    pairs = np.unique(np.stack([clusters[keep], split[keep]], axis=1), axis=0)
    ids, counts = np.unique(pairs[:, 0], return_counts=True)
    return ids[counts > 1]
