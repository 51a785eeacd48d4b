"""Leakage attacks and the detector that must catch them.

Attacks: copy test rows (and JPEG / shift / brightness / rescale / zoom / mirror / 90% crop
variants of them, ``cloud_train.splits.variants``) into train, and add future-dated samples
to a temporal train split. ``check_leakage`` clusters train and test together (``dedup``)
and reports every train sample whose cluster reaches into test and every test sample whose
cluster reaches into train, plus train samples captured at or after the temporal cut. On a
split with no planted leak, the test rows it reports are false leaks (distinct images joined).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from cloud_train.splits.dedup import NEAR_THRESHOLD, dedup
from cloud_train.splits.variants import VARIANTS, make_variant


@dataclass
class LeakageReport:
    """leaked_train: train indices that duplicate a test sample (exact or near);
    leaked_test: test indices that duplicate a train sample; future_train: train indices
    captured at or after the cut."""

    n_train: int
    n_test: int
    leaked_train: np.ndarray
    future_train: np.ndarray
    threshold: int
    seconds: dict[str, float] = field(default_factory=dict)
    leaked_test: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))

    @property
    def clean(self) -> bool:
        return not len(self.leaked_train) and not len(self.future_train)

    def to_dict(self) -> dict[str, object]:
        return {"clean": self.clean, "n_train": self.n_train, "n_test": self.n_test,
                "leaked_train": self.leaked_train.tolist(),
                "leaked_test": self.leaked_test.tolist(),
                "future_train": self.future_train.tolist(), "threshold_bits": self.threshold,
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}


def _images(x: object) -> np.ndarray:
    return np.asarray(getattr(x, "images", x))


def check_leakage(train: object, test: object, *,
                  train_times: Sequence[float] | np.ndarray | None = None,
                  cutoff: float | None = None,
                  threshold: int = NEAR_THRESHOLD) -> LeakageReport:
    """Train/test leakage report. train, test: N x H x W x 3 uint8 RGB arrays or objects
    with ``.images`` (e.g. LabeledImages). train_times + cutoff: temporal check."""
    a, b = _images(train), _images(test)
    result = dedup(np.concatenate([a, b]) if len(a) and len(b) else
                   (a if len(a) else b), threshold=threshold)
    cl = result.cluster
    test_clusters = np.unique(cl[len(a):]) if len(b) else np.empty(0, np.int64)
    leaked = np.flatnonzero(np.isin(cl[:len(a)], test_clusters))
    leaked_test = np.flatnonzero(np.isin(cl[len(a):], cl[leaked])) if len(b) else leaked[:0]
    future = np.empty(0, np.int64)
    if train_times is not None and cutoff is not None:
        future = np.flatnonzero(np.asarray(train_times, np.float64) >= cutoff)
    return LeakageReport(len(a), len(b), leaked, future, threshold, result.seconds,
                         leaked_test)


@dataclass
class PlantedLeak:
    """Train set with leaks added: images/labels, and for each planted row its kind and the
    test index it came from (rows n_clean.. of images are the planted ones)."""

    images: np.ndarray
    labels: np.ndarray
    n_clean: int
    kinds: list[str]
    sources: np.ndarray


def plant_test_leaks(train_images: np.ndarray, train_labels: np.ndarray,
                     test_images: np.ndarray, test_labels: np.ndarray, per_kind: int,
                     kinds: Sequence[str] = tuple(VARIANTS), seed: int = 0) -> PlantedLeak:
    """Append ``per_kind`` variants of random test rows to train, for each kind."""
    rng = np.random.default_rng(seed)
    extra, labs, ks, src = [], [], [], []
    for kind in kinds:
        pick = rng.choice(len(test_images), size=min(per_kind, len(test_images)), replace=False)
        for i in pick:
            extra.append(make_variant(kind, test_images[i], rng))
            labs.append(int(test_labels[i]))
            ks.append(kind)
            src.append(int(i))
    images = np.concatenate([train_images, np.stack(extra)]) if extra else train_images
    labels = np.concatenate([np.asarray(train_labels, np.int64), np.asarray(labs, np.int64)])
    return PlantedLeak(images, labels, len(train_images), ks, np.asarray(src, np.int64))


def plant_future_dated(times: np.ndarray, cutoff: float, count: int,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Re-date ``count`` random samples to after ``cutoff`` (up to 30 days later).
    Returns (new times, indices changed)."""
    rng = np.random.default_rng(seed)
    times = np.asarray(times, np.float64).copy()
    idx = rng.choice(len(times), size=min(count, len(times)), replace=False)
    times[idx] = cutoff + rng.uniform(1.0, 30 * 86400.0, size=len(idx))
    return times, np.sort(idx)


def leakage_attack(train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
                   test_labels: np.ndarray, per_kind: int = 50,
                   kinds: Sequence[str] = tuple(VARIANTS), seed: int = 0,
                   threshold: int = NEAR_THRESHOLD) -> dict[str, object]:
    """Run the test-row leakage attack and score the detector.

    Returns {"kinds": {kind: {"sent", "caught", "recall"}}, "clean_train": n,
    "clean_wrongly_flagged": n, "clean_flag_rate": r}. A clean train row is wrongly flagged
    when the detector links it to a test row although it was not planted.
    """
    planted = plant_test_leaks(train_images, train_labels, test_images, test_labels,
                               per_kind, kinds, seed)
    rep = check_leakage(planted.images, test_images, threshold=threshold)
    flagged = np.zeros(len(planted.images), bool)
    flagged[rep.leaked_train] = True
    out: dict[str, dict[str, float]] = {}
    kinds_arr = np.asarray(planted.kinds)
    for kind in kinds:
        rows = planted.n_clean + np.flatnonzero(kinds_arr == kind)
        caught = int(flagged[rows].sum())
        out[kind] = {"sent": len(rows), "caught": caught,
                     "recall": caught / max(len(rows), 1)}
    wrong = int(flagged[:planted.n_clean].sum())
    return {"kinds": out, "clean_train": planted.n_clean, "clean_wrongly_flagged": wrong,
            "clean_flag_rate": wrong / max(planted.n_clean, 1), "threshold_bits": threshold}


def future_dated_attack(train_images: np.ndarray, test_images: np.ndarray,
                        train_times: np.ndarray, cutoff: float, count: int = 20,
                        seed: int = 0) -> dict[str, object]:
    """Re-date ``count`` train samples past the temporal cut and score the detector:
    {"sent", "caught", "clean_train", "clean_wrongly_flagged"}."""
    times, idx = plant_future_dated(train_times, cutoff, count, seed)
    rep = check_leakage(train_images, test_images, train_times=times, cutoff=cutoff)
    caught = int(np.isin(idx, rep.future_train).sum())
    clean = np.setdiff1d(np.arange(len(times)), idx)
    wrong = int(np.isin(rep.future_train, clean).sum())
    return {"sent": len(idx), "caught": caught, "clean_train": len(clean),
            "clean_wrongly_flagged": wrong}
