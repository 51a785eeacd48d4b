"""Activation clustering (Chen et al. 2018, "Detecting Backdoor Attacks on Deep Neural Networks
by Activation Clustering").

For every class of the (possibly poisoned) training set: take the penultimate activations of
the model trained on it, reduce them to ``n_components`` dimensions (10 as in the paper), split
them with 2-means, and look at the two clusters. A poisoned class holds two kinds of images
that the network sends to the same label for different reasons (the true class features, the
trigger), so its activations separate into a large clean cluster and a small, well separated
poison cluster; a clean class splits arbitrarily, near half and half.

Reduction (``reduce``): ``robust`` by default: PCA to 10 dimensions, then whitening with a
robust (minimum covariance determinant) covariance (``features.robust_whiten``, as SPECTRE,
Hayase et al. 2021), so the clean majority of the class is an isotropic cloud and a small
poison cluster is what 2-means splits off even when the class has a large natural spread of
its own. Measured on the synthetic signs (1% poison, 5 infected and 5 clean models): robust
flagged 5/5 targets, 95-100% of the poison in the suspicious set and 0-2 clean images with
it, but also flagged 2-3 classes of 2 of the 5 clean models (silhouette anomaly 3.1-6.5,
against 8.8-14.8 for the targets); plain ``pca`` (the paper's reduction, with PCA in place
of ICA) flagged 4/5 targets (in the missed one 2-means cut the class in half, the poison
inside one half) and no clean class; FastICA (``ica``, the paper's) put only 19% of the
poison in the small cluster. Robust is the default because a missed backdoor costs more than
a needless retraining. On the toy shapes, whose few-hundred-image
classes have near-degenerate features, the robust estimate splits off outliers of every
class and plain ``pca`` is the one that works (the tests use it there).

Flag rule (both must hold; the paper's relative-size and silhouette analyses together):

- relative size of the smaller cluster ``<= size_threshold`` (paper: 0.35); alone this flags
  clean classes (after robust whitening their splits measured down to 0.16);
- the class's silhouette score is an outlier among the classes: anomaly index
  ``(s - median) / (1.4826 * MAD) >= silhouette_anomaly`` (default 3.0; the same
  median-absolute-deviation test Neural Cleanse uses, on the large side). An absolute
  silhouette threshold does not carry across data sets or reductions (plain PCA: clean
  classes 0.19-0.33 on the signs but 0.37-0.49 on the toy shapes); as anomaly indices the
  poisoned class scored 8.8-14.8 (robust, signs), clean classes mostly below 2.5.
  This assumes most classes are clean (true for a single-target backdoor).

The suspicious examples are the smaller cluster of each flagged class (indices into the set
given), grown by further rounds: poison drawn from several source classes can form more than
one cluster (on the toy shapes, triggered triangles sat apart from the triggered discs and
crosses, and a single split found 70% of the poison), so a flagged class is split again
without its suspicious examples while the split still passes the rule and splits off no
more than was found so far. Mitigation: remove them and retrain
(``cloud_train.backdoor.retrain``).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from cloud_train.backdoor.features import dataset_features, robust_whiten
from roadshield_base.errors import ConfigError

SIZE_THRESHOLD = 0.35
SILHOUETTE_ANOMALY = 3.0
MAD_TO_SIGMA = 1.4826  # MAD of normal data times this = its standard deviation
REDUCERS = ("robust", "pca", "ica")


@dataclass
class ClassClusters:
    """The 2-means split of one class: sizes, scores, and the indices of its smaller cluster."""

    label: int
    n: int
    relative_size: float  # smaller cluster / class size, in [0, 0.5]
    silhouette: float  # mean silhouette of the 2-cluster split, in [-1, 1]
    silhouette_anomaly: float  # (silhouette - median) / (1.4826 * MAD) over the classes
    flagged: bool
    small_idx: np.ndarray = field(repr=False)  # int64 indices into the whole set


@dataclass
class ActivationClusteringResult:
    """Per-class scores, the flagged classes and the suspicious example indices."""

    classes: list[ClassClusters]
    flagged: list[int]
    suspicious_idx: np.ndarray  # int64, sorted: smaller clusters of the flagged classes
    size_threshold: float
    silhouette_anomaly: float
    reduce: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (per-class scores, flags, number of suspicious examples)."""
        return {"method": "activation_clustering", "reduce": self.reduce,
                "size_threshold": self.size_threshold,
                "silhouette_anomaly_threshold": self.silhouette_anomaly,
                "flagged": list(self.flagged), "n_suspicious": int(len(self.suspicious_idx)),
                "relative_size": [round(c.relative_size, 4) for c in self.classes],
                "silhouette": [round(c.silhouette, 4) for c in self.classes],
                "silhouette_anomaly": [round(c.silhouette_anomaly, 3) for c in self.classes],
                "class_sizes": [c.n for c in self.classes],
                "seconds": round(self.seconds, 3)}


def _reduce(feats: np.ndarray, n_components: int, method: str, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA, FastICA
    from sklearn.exceptions import ConvergenceWarning

    if method == "robust":
        return robust_whiten(feats, n_components, seed)
    centred = feats - feats.mean(axis=0, keepdims=True)
    # dead ReLU units are constant columns; they carry nothing and break ICA's whitening
    centred = centred[:, centred.std(axis=0) > 1e-8]
    if centred.shape[1] == 0:
        return np.zeros((len(feats), 1))
    # neither method can return more components than the data's numerical rank
    s = np.linalg.svd(centred, compute_uv=False)
    rank = int((s > 1e-6 * s[0]).sum()) if s[0] > 0 else 0
    k = max(1, min(n_components, rank, feats.shape[0] - 1))
    if method == "ica":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            ica = FastICA(n_components=k, whiten="unit-variance", random_state=seed,
                          max_iter=500)
            try:
                out = ica.fit_transform(centred)
            except (ValueError, np.linalg.LinAlgError):
                out = None
        if out is not None and np.isfinite(out).all():
            return out
        # ICA failed numerically on this class: PCA keeps the scan going (same dimensions)
    return PCA(n_components=k, random_state=seed).fit_transform(centred)


def cluster_class(feats: np.ndarray, n_components: int = 10, reduce: str = "robust",
                  seed: int = 0) -> tuple[np.ndarray, float]:
    """2-means of one class's activations (n x D float): (0/1 labels, silhouette score)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    reduced = _reduce(feats, n_components, reduce, seed)
    km = KMeans(n_clusters=2, n_init=10, random_state=seed).fit(reduced)
    assign = km.labels_.astype(np.int64)
    if len(np.unique(assign)) < 2:
        return assign, 0.0
    return assign, float(silhouette_score(reduced, assign))


def _more_rounds(feats: np.ndarray, idx: np.ndarray, small_idx: np.ndarray, rounds: int,
                 n_components: int, reduce: str, seed: int,
                 passes: Callable[[float, float], bool]) -> np.ndarray:
    """Re-cluster a flagged class without its suspicious examples while the split still
    passes the flag rule and its small cluster is no larger than the suspicious set so far;
    returns the grown suspicious set (poison from several source classes can form more than
    one cluster, and 2-means sees one at a time)."""
    found = small_idx
    for _ in range(rounds):
        rest = np.setdiff1d(idx, found)
        if len(rest) < 4:
            break
        assign, sil = cluster_class(feats[rest], n_components, reduce, seed)
        small = int(np.argmin(np.bincount(assign, minlength=2)))
        part = rest[assign == small]
        # poison split by source class comes in pieces smaller than what was found; a piece
        # larger than that is the clean rest being cut in two
        if len(part) > len(found) or not passes(len(part) / len(idx), sil):
            break
        found = np.union1d(found, part).astype(np.int64)
    return found


def activation_clustering(model: nn.Module, images: np.ndarray, labels: np.ndarray, *,
                          n_components: int = 10, reduce: str = "robust", rounds: int = 3,
                          size_threshold: float = SIZE_THRESHOLD,
                          silhouette_anomaly: float = SILHOUETTE_ANOMALY,
                          features: torch.Tensor | np.ndarray | None = None,
                          batch_size: int = 256, seed: int = 0) -> ActivationClusteringResult:
    """Scan a training set for poisoned classes (see the module docstring for the rule).

    images: uint8 N x H x W x 3 RGB (the training set the model was trained on); labels: N
    ints. ``features``: precomputed penultimate activations (N x D), e.g. shared with the
    spectral scan; otherwise they are computed with ``penultimate``. Classes with fewer than
    4 examples are not clustered and never flagged. ``rounds``: a flagged class is split again
    without its suspicious examples, up to ``rounds - 1`` more times, while the new split
    passes the same rule (its relative size counted against the whole class, its silhouette
    against the first round's median and MAD) and its small cluster is no larger than the
    suspicious set so far; each passing small cluster joins the suspicious set.
    """
    if reduce not in REDUCERS:
        raise ConfigError(f"unknown reduction {reduce!r}", f"use one of: {', '.join(REDUCERS)}")
    if not 0.0 < size_threshold <= 0.5:
        raise ConfigError(f"size_threshold {size_threshold} is outside (0, 0.5]",
                          "the smaller of two clusters holds at most half; the paper uses 0.35")
    if not silhouette_anomaly > 0:
        raise ConfigError(f"silhouette_anomaly {silhouette_anomaly!r} must be > 0",
                          f"use e.g. {SILHOUETTE_ANOMALY} (MAD units)")
    if not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"rounds must be an integer >= 1, got {rounds!r}",
                          "1 is the paper's single split; 3 also finds poison in 2-3 clusters")
    if not isinstance(n_components, int) or n_components < 1:
        raise ConfigError(f"n_components must be an integer >= 1, got {n_components!r}",
                          "the paper reduces to 10 dimensions")
    t0 = time.perf_counter()
    feats = dataset_features(model, images, labels, features, batch_size)
    lab = np.asarray(labels).astype(np.int64)
    splits: list[tuple[int, int, float, float, np.ndarray]] = []
    for c in range(int(lab.max()) + 1 if len(lab) else 0):
        idx = np.flatnonzero(lab == c)
        if len(idx) < 4:
            splits.append((c, len(idx), 0.5, 0.0, np.empty(0, np.int64)))
            continue
        assign, sil = cluster_class(feats[idx], n_components, reduce, seed)
        small = int(np.argmin(np.bincount(assign, minlength=2)))
        small_idx = idx[assign == small].astype(np.int64)
        splits.append((c, len(idx), len(small_idx) / len(idx), sil, small_idx))
    sils = np.array([s[3] for s in splits if s[1] >= 4])
    med = float(np.median(sils)) if sils.size else 0.0
    mad = max(float(np.median(np.abs(sils - med))) * MAD_TO_SIGMA if sils.size else 0.0, 1e-12)
    classes = []
    for c, n, rel, sil, small_idx in splits:
        a = (sil - med) / mad if n >= 4 else 0.0
        flag = n >= 4 and rel <= size_threshold and a >= silhouette_anomaly
        if flag and rounds > 1:
            small_idx = _more_rounds(feats, np.flatnonzero(lab == c), small_idx, rounds - 1,
                                     n_components, reduce, seed,
                                     lambda r, s: r <= size_threshold
                                     and (s - med) / mad >= silhouette_anomaly)
        classes.append(ClassClusters(c, n, rel, sil, float(a), bool(flag), small_idx))
    flagged = [c.label for c in classes if c.flagged]
    parts = [c.small_idx for c in classes if c.flagged]
    suspicious = np.sort(np.concatenate(parts)) if parts else np.empty(0, np.int64)
    return ActivationClusteringResult(classes, flagged, suspicious, size_threshold,
                                      silhouette_anomaly, reduce, time.perf_counter() - t0)

