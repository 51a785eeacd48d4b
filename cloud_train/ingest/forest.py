"""A fitted scikit-learn Isolation Forest as plain arrays, scored in NumPy.

The gate fits its Isolation Forest once, when the reference is built, and keeps the trees as
arrays beside it (no pickles); ingest then scores batches without importing scikit-learn
(about a second of start-up). ``score_samples`` returns exactly what
``IsolationForest.score_samples`` returns: -2 ** (-E[h(x)] / c(max_samples)), where h is the
depth of the leaf a sample reaches plus c(samples in that leaf) - 1 (Liu et al. 2008), the
features compared as float32 against float64 thresholds, as the trees do.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from roadshield_base.errors import DatasetError

KEYS = ("forest_feature", "forest_threshold", "forest_left", "forest_right", "forest_value",
        "forest_denominator")


def _average_path_length(n: np.ndarray) -> np.ndarray:
    """c(n): the average path length of an unsuccessful search in a binary search tree of
    n nodes (0 for n <= 1, 1 for n = 2)."""
    n = np.asarray(n, np.float64)
    out = np.zeros_like(n)
    out[n == 2] = 1.0
    big = n > 2
    out[big] = 2.0 * (np.log(n[big] - 1.0) + np.euler_gamma) - 2.0 * (n[big] - 1.0) / n[big]
    return out


def to_arrays(forest: Any) -> dict[str, np.ndarray]:
    """The trees of a fitted ``sklearn.ensemble.IsolationForest`` as padded arrays
    (trees x nodes): feature index (in the forest's input columns; -1 at a leaf), threshold,
    left and right child, and at each leaf its depth + c(samples) - 1."""
    trees = [(t.tree_, np.asarray(f)) for t, f in zip(forest.estimators_,
                                                      forest.estimators_features_,
                                                      strict=True)]
    width = max(t.node_count for t, _ in trees)
    shape = (len(trees), width)
    feature = np.full(shape, -1, np.int32)
    threshold = np.zeros(shape, np.float64)
    left = np.zeros(shape, np.int32)
    right = np.zeros(shape, np.int32)
    value = np.zeros(shape, np.float64)
    for i, (t, cols) in enumerate(trees):
        m = t.node_count
        leaf = t.children_left[:m] < 0
        feature[i, :m] = np.where(leaf, -1, cols[np.maximum(t.feature[:m], 0)])
        threshold[i, :m] = t.threshold[:m]
        # a leaf points at itself, so every sample can take the same number of steps
        left[i, :m] = np.where(leaf, np.arange(m), t.children_left[:m])
        right[i, :m] = np.where(leaf, np.arange(m), t.children_right[:m])
        value[i, :m] = t.compute_node_depths()[:m] + _average_path_length(
            t.n_node_samples[:m]) - 1.0
    denominator = len(trees) * float(_average_path_length(np.array([forest._max_samples]))[0])
    return {"forest_feature": feature, "forest_threshold": threshold, "forest_left": left,
            "forest_right": right, "forest_value": value,
            "forest_denominator": np.array(denominator)}


def score_samples(arrays: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """``IsolationForest.score_samples`` of the rows of ``x`` (n x features), from
    ``to_arrays``'s output: lower is more abnormal."""
    missing = [k for k in KEYS if k not in arrays]
    if missing:
        raise DatasetError(f"the Isolation Forest arrays lack {missing}",
                           "rebuild the reference (build_reference)")
    feat, thr = arrays["forest_feature"], arrays["forest_threshold"]
    left, right, value = arrays["forest_left"], arrays["forest_right"], arrays["forest_value"]
    xs = np.asarray(x, np.float32).astype(np.float64)  # the trees compare float32 inputs
    n, (t, width) = len(xs), feat.shape
    feat, thr = feat.ravel(), thr.ravel()
    offset = (np.arange(t) * width)[None, :]
    # child pointers as flat indices into the (trees x nodes) arrays
    left, right = (left + offset.T).ravel(), (right + offset.T).ravel()
    at = np.broadcast_to(offset, (n, t)).copy()  # every sample at every tree's root
    cols = xs.shape[1] * np.arange(n)[:, None]
    flat_x = xs.ravel()
    while True:
        f = feat[at]
        inner = f >= 0
        if not inner.any():
            break
        go_left = flat_x[cols + np.maximum(f, 0)] <= thr[at]
        at = np.where(go_left, left[at], right[at])  # a leaf points at itself
    depths = value.ravel()[at].sum(axis=1)
    den = float(arrays["forest_denominator"])
    return -(2.0 ** (-(depths / den if den else np.ones(n))))
