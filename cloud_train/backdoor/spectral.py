"""Spectral signatures (Tran, Li and Madry 2018, "Spectral Signatures in Backdoor Attacks").

Per class of the (possibly poisoned) training set: centre the penultimate representations,
take the top right singular vector ``v`` of the centred matrix, and score every example by
``(r_i - mean) . v`` squared. Poisoned examples leave a detectable trace along that direction,
so they collect the largest scores; the paper removes the top ``1.5 * eps`` fraction of each
class, ``eps`` being an upper bound on the poisoned fraction of a class.

The paper removes examples from every class and never "flags" one. To report detections (and
to avoid discarding ``1.5 * eps`` of every clean class) this scan also flags classes, by the
following rule: split the class's projections ``(r_i - mean) . v`` into two groups with
(exact) 1-D 2-means; flag the class when the smaller group holds at most ``1.5 * eps`` of the
class and the two groups are clearly apart, Ashman's D ``sqrt(2) * |m1 - m2| /
sqrt(s1^2 + s2^2) >= separation`` (default 2.0, the usual bound for a clean bimodal split).
The top direction of a poisoned class splits off the poison, a small distinct group; that of
a clean class is a smooth spread whose best split is near half and half. Measured: clean
classes' smaller group 0.31-0.50 of the class (signs and toy shapes), D 2.4-3.5; poisoned
classes 0.18-0.19 with D 7 (toy shapes, 10% poison) but 0.16-0.41 with D 2.6-3.4 on the
signs (1% poison), where the rule flagged 2 of 5 infected models. Removal then takes the
top-scored ``1.5 * eps`` of the flagged classes only (``remove_from="flagged"``) or of every
class (``"all"``, the paper's choice).

Robust whitening (``whiten=True``; SPECTRE, Hayase et al. 2021). The top direction of the raw
representations is the class's largest spread; when a class has a large natural spread of its
own the poison can sit at one end of it rather than along its own direction, and the split rule
misses it (in the three missed sign models the best split held 21-41% of the class). With
``whiten=True`` each class is reduced to ``n_components`` with PCA and whitened with a robust
(minimum covariance determinant) covariance (``features.robust_whiten``), so the clean majority
is an isotropic cloud and the poison is the one dominant direction left. The flag rule is then
the spectral signature itself: ``s1 / s2`` of the top two singular values of the whitened class
``>= min_ratio`` (default 1.5). Measured on the signs: poisoned classes 1.53-2.67 (5 of 5), the
clean classes of 5 infected and 5 clean models 1.42 or less but for one class at 1.58
(flagged), and the top 1.5 eps held 98-100% of the poison. On the toy shapes the robust
estimate is unstable (their few-hundred-image classes have near-degenerate features) and the
raw mode is the one that works.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from cloud_train.backdoor.features import dataset_features, robust_whiten
from roadshield_base.errors import ConfigError

SEPARATION = 2.0
MIN_RATIO = 1.5


@dataclass
class ClassSpectrum:
    label: int
    n: int
    separation: float  # Ashman's D of the 1-D 2-means split of the projections
    small_fraction: float  # the smaller group's share of the class
    ratio: float  # s1 / s2 of the centred class (whitened when whiten=True)
    flagged: bool
    top_idx: np.ndarray = field(repr=False)  # int64 indices (into the whole set) of the top k
    scores: np.ndarray = field(repr=False)  # float64 outlier score per example of the class


@dataclass
class SpectralResult:
    """Per-class separations, flagged classes, and the examples to remove."""

    classes: list[ClassSpectrum]
    flagged: list[int]
    removed_idx: np.ndarray  # int64, sorted
    eps: float
    separation: float
    whiten: bool
    min_ratio: float
    remove_from: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (per-class separation and split size, flags, removal count)."""
        return {"method": "spectral", "eps": self.eps, "separation_threshold": self.separation,
                "whiten": self.whiten, "min_ratio": self.min_ratio,
                "remove_from": self.remove_from, "flagged": list(self.flagged),
                "n_removed": int(len(self.removed_idx)),
                "separation": [round(c.separation, 4) for c in self.classes],
                "small_fraction": [round(c.small_fraction, 4) for c in self.classes],
                "ratio": [round(c.ratio, 4) for c in self.classes],
                "seconds": round(self.seconds, 3)}


def top_projection(feats: np.ndarray) -> np.ndarray:
    """Projection of each centred row of ``feats`` (n x D) on the top right singular vector."""
    return _spectrum(feats)[0]


def _spectrum(feats: np.ndarray) -> tuple[np.ndarray, float]:
    """(top projection of the centred rows, s1 / s2; 1.0 for a single dimension)."""
    centred = feats - feats.mean(axis=0, keepdims=True)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    ratio = float(s[0] / s[1]) if len(s) > 1 and s[1] > 0 else 1.0
    return centred @ vt[0], ratio


def spectral_scores(feats: np.ndarray) -> np.ndarray:
    """Outlier score per row of ``feats`` (n x D): the squared top projection (Tran et al.)."""
    return top_projection(feats) ** 2


def split_separation(proj: np.ndarray) -> tuple[float, float]:
    """1-D 2-means of ``proj``: (Ashman's D of the two groups, smaller group's share).

    1-D k-means is exact by scanning the sorted values for the split with the smallest
    within-group sum of squares.
    """
    v = np.sort(np.asarray(proj, np.float64))
    n = len(v)
    if n < 4 or v[-1] - v[0] <= 0:
        return 0.0, 0.0
    csum, csq = np.cumsum(v), np.cumsum(v * v)
    k = np.arange(1, n)  # left group = v[:k]
    left_ss = csq[:-1] - csum[:-1] ** 2 / k
    right_ss = (csq[-1] - csq[:-1]) - (csum[-1] - csum[:-1]) ** 2 / (n - k)
    cut = int(np.argmin(left_ss + right_ss)) + 1
    a, b = v[:cut], v[cut:]
    d = float(np.sqrt(2) * abs(a.mean() - b.mean()) / np.sqrt(a.var() + b.var() + 1e-12))
    return d, min(len(a), len(b)) / n


def spectral_signatures(model: nn.Module, images: np.ndarray, labels: np.ndarray, *,
                        eps: float = 0.1, separation: float = SEPARATION,
                        whiten: bool = False, min_ratio: float = MIN_RATIO,
                        n_components: int = 10, remove_from: str = "flagged",
                        features: torch.Tensor | np.ndarray | None = None,
                        batch_size: int = 256, seed: int = 0) -> SpectralResult:
    """Score, flag and pick examples to remove (see the module docstring).

    images: uint8 N x H x W x 3 RGB (the training set); labels: N ints. ``eps``: upper bound
    on the poisoned fraction of a class, in (0, 1/1.5]; each class's top ``ceil(1.5 * eps *
    n_class)`` examples are its removal candidates. ``whiten``: score in the robust-whitened
    ``n_components``-dimensional space and flag by ``s1 / s2 >= min_ratio``; otherwise score
    the raw representations and flag by the split rule (``separation``, ``1.5 * eps``).
    ``features``: precomputed penultimate activations (N x D), else computed here. Classes
    with fewer than 4 examples are never flagged.
    """
    if not isinstance(eps, (int, float)) or not 0.0 < eps <= 1 / 1.5:
        raise ConfigError(f"spectral eps {eps!r} is outside (0, 0.667]",
                          "give an upper bound on the poisoned fraction of a class, e.g. 0.1")
    if remove_from not in ("flagged", "all"):
        raise ConfigError(f"remove_from {remove_from!r} is unknown", "use 'flagged' or 'all'")
    if not min_ratio >= 1.0:
        raise ConfigError(f"min_ratio {min_ratio!r} must be >= 1",
                          f"use e.g. {MIN_RATIO} (s1 / s2 of the whitened class)")
    if not isinstance(n_components, int) or n_components < 2:
        raise ConfigError(f"n_components must be an integer >= 2, got {n_components!r}",
                          "use e.g. 10")
    if not separation > 0:
        raise ConfigError(f"separation threshold {separation!r} must be > 0",
                          f"use e.g. {SEPARATION} (Ashman's D; above 2 means bimodal)")
    t0 = time.perf_counter()
    feats = dataset_features(model, images, labels, features, batch_size)
    lab = np.asarray(labels).astype(np.int64)
    classes: list[ClassSpectrum] = []
    for c in range(int(lab.max()) + 1 if len(lab) else 0):
        idx = np.flatnonzero(lab == c)
        if len(idx) < 4:
            classes.append(ClassSpectrum(c, len(idx), 0.0, 0.0, 1.0, False,
                                         np.empty(0, np.int64), np.zeros(len(idx))))
            continue
        rep = robust_whiten(feats[idx], n_components, seed) if whiten else feats[idx]
        proj, ratio = _spectrum(rep)
        scores = proj ** 2
        d, small = split_separation(proj)
        k = min(len(idx) - 1, math.ceil(1.5 * eps * len(idx)))
        top = idx[np.argsort(-scores, kind="stable")[:k]].astype(np.int64)
        flag = ratio >= min_ratio if whiten else (d >= separation and small <= 1.5 * eps)
        classes.append(ClassSpectrum(c, len(idx), d, small, ratio, bool(flag), top, scores))
    flagged = [c.label for c in classes if c.flagged]
    parts = [c.top_idx for c in classes if remove_from == "all" or c.flagged]
    removed = np.sort(np.concatenate(parts)) if parts else np.empty(0, np.int64)
    return SpectralResult(classes, flagged, removed, float(eps), float(separation), bool(whiten),
                          float(min_ratio), remove_from, time.perf_counter() - t0)
