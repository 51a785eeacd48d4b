"""PRADA (Juuti et al. 2019, "PRADA: Protecting against DNN model stealing attacks"), per key.

Rule, as the service applies it to each key's stream of answered images, in order:

1. x is the image as the service saw it, quantised: uint8 round(255 * x), read back as
   float32 / 255, flattened (3 * S * S values).
2. c is the model's predicted class of x (before any watermark or output policy).
3. If the key sent earlier images of class c, d = min over them of ||x - x'||_2 is
   appended to the key's distance list D. Every image is then added to class c's set
   (no pruning: "earlier queries of its predicted class" are all of them).
4. After the key's k-th image, when k is a multiple of ``test_every`` (10) and
   |D| >= ``min_distances`` (100), W = Shapiro-Wilk statistic of D (scipy.stats.shapiro).
   W < delta (0.9, the reference implementation's setting) is an alarm; the alarm is
   sticky and cuts the key to label-only or off (``prada_on_alarm``).

A benign client's distances spread like a normal sample; a synthetic-query attacker
(Jacobian augmentation: each new query a small step from an earlier one) produces many
tiny distances beside a few large ones, which Shapiro-Wilk rejects.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def shapiro_w(distances: Sequence[float]) -> float:
    """Shapiro-Wilk's W of ``distances`` (scipy; W is exact for any n, only the p-value
    is approximate past 5000 samples, which is why scipy warns there)."""
    from scipy.stats import shapiro

    values = np.asarray(distances, dtype=np.float64)
    if np.ptp(values) == 0.0:
        return 0.0  # identical distances: as far from normal as it gets
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(shapiro(values).statistic)


def to_vector(image_u8: bytes) -> np.ndarray:
    """The flattened float32 point PRADA measures from uint8 image bytes."""
    return np.frombuffer(image_u8, dtype=np.uint8).astype(np.float32) / 255.0


class _Points:
    """A growing float32 matrix of one class's points (capacity doubles) and their squared
    norms, so a nearest neighbour costs one matrix-vector product."""

    def __init__(self, dim: int) -> None:
        self.data = np.empty((16, dim), dtype=np.float32)
        self.sq = np.empty(16, dtype=np.float32)
        self.n = 0

    def add(self, v: np.ndarray) -> None:
        if self.n == self.data.shape[0]:
            self.data = np.concatenate([self.data, np.empty_like(self.data)])
            self.sq = np.concatenate([self.sq, np.empty_like(self.sq)])
        self.data[self.n] = v
        self.sq[self.n] = v @ v
        self.n += 1

    def min_distance(self, v: np.ndarray) -> float | None:
        if self.n == 0:
            return None
        # ||a - v||^2 = ||a||^2 - 2 a.v + ||v||^2 picks the nearest point; its distance is
        # then computed directly, free of the expansion's cancellation
        nearest = int(np.argmin(self.sq[:self.n] - 2.0 * (self.data[:self.n] @ v)))
        diff = self.data[nearest] - v
        return float(np.sqrt(diff @ diff))


@dataclass(frozen=True)
class PradaUpdate:
    """What one request adds: points (class, uint8 bytes) from sequence ``first_seq``,
    distances (seq, d), the test (n queries, W, alarm) if one ran."""

    first_seq: int
    points: list[tuple[int, bytes]]
    distances: list[tuple[int, float]]
    test: tuple[int, float, bool] | None


class PradaState:
    """One key's PRADA history; ``observe`` proposes, ``apply`` commits to memory (after
    the store committed the same update)."""

    def __init__(self, delta: float = 0.9, min_distances: int = 100,
                 test_every: int = 10) -> None:
        self.delta = delta
        self.min_distances = min_distances
        self.test_every = test_every
        self.classes: dict[int, _Points] = {}
        self.distances: list[float] = []
        self.seq = 0
        self.alarm = False
        self.last_w: float | None = None

    @classmethod
    def from_history(cls, points: Sequence[tuple[int, int, bytes]], distances: Sequence[float],
                     alarm: bool, **settings: float) -> PradaState:
        state = cls(**settings)  # type: ignore[arg-type]
        for _, c, image in points:
            state._points(c, len(image)).add(to_vector(image))
        state.seq = len(points)
        state.distances = list(distances)
        state.alarm = alarm
        return state

    def _points(self, c: int, dim: int) -> _Points:
        if c not in self.classes:
            self.classes[c] = _Points(dim)
        return self.classes[c]

    def observe(self, images_u8: Sequence[bytes], classes: Sequence[int]) -> PradaUpdate:
        """Distances and the test for a request's images, without changing the state."""
        pending: dict[int, list[np.ndarray]] = {}
        distances: list[tuple[int, float]] = []
        crossed = False
        for i, (image, c) in enumerate(zip(images_u8, classes, strict=True)):
            v = to_vector(image)
            known = self.classes.get(c)
            best = known.min_distance(v) if known is not None else None
            for earlier in pending.get(c, []):
                d = float(np.linalg.norm(earlier - v))
                best = d if best is None else min(best, d)
            if best is not None:
                distances.append((self.seq + i, best))
            pending.setdefault(c, []).append(v)
            crossed = crossed or (self.seq + i + 1) % self.test_every == 0
        test = None
        all_d = self.distances + [d for _, d in distances]
        if crossed and len(all_d) >= self.min_distances:
            w = shapiro_w(all_d)
            test = (self.seq + len(images_u8), w, w < self.delta)
        points = [(int(c), image) for image, c in zip(images_u8, classes, strict=True)]
        return PradaUpdate(self.seq, points, distances, test)

    def apply(self, update: PradaUpdate) -> None:
        for c, image in update.points:
            self._points(c, len(image)).add(to_vector(image))
        self.distances.extend(d for _, d in update.distances)
        self.seq += len(update.points)
        if update.test is not None:
            self.last_w = update.test[1]
            self.alarm = self.alarm or update.test[2]
