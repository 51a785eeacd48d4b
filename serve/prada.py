"""PRADA (Juuti et al. 2019, "PRADA: Protecting against DNN model stealing attacks"), per key.

The rule follows the paper's Algorithm 1 and its reference implementation, applied to each
key's stream of answered images, in order:

1. x is the image as the service saw it, quantised: uint8 round(255 * x), read back as
   float32 / 255, flattened (3 * S * S values).
2. c is the model's predicted class of x (before any watermark or output policy).
3. The first image of class c founds class c's growing set G_c, with set distances
   D_Gc = [0] and threshold T_c = 0. For any later image of class c,
   d = min over G_c of ||x - g||_2 is appended to class c's distances D_c; if d > T_c,
   x joins G_c, d joins D_Gc and T_c = max(T_c, mean(D_Gc) - std(D_Gc)) (population std).
   An image within T_c of the set is measured but not kept, so a near copy of a kept query
   is not the yardstick of the next one.
4. After the key's k-th image, when k is a multiple of ``test_every`` (10): D = the union of
   the D_c that hold at least ``class_min`` (10) distances; values at 3 standard deviations
   or more from D's mean are dropped (none when D's values are all equal); if at least
   ``min_distances`` (100) remain, W = Shapiro-Wilk statistic of them (scipy.stats.shapiro).
   W < delta (0.9, the reference implementation's setting) is an alarm; the alarm is
   sticky and cuts the key to label-only or off (``prada_on_alarm``).

A benign client's distances spread like a normal sample; a synthetic-query attacker
(Jacobian augmentation: each new query a small step from an earlier one) produces many
tiny distances beside a few large ones, which Shapiro-Wilk rejects.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

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


def shapiro_sample(class_distances: Iterable[Sequence[float]], class_min: int
                   ) -> np.ndarray:
    """Step 4's sample: the distances of classes with at least ``class_min`` of them, less
    those 3 standard deviations or more from the mean."""
    kept = [d for d in class_distances if len(d) >= class_min]
    values = np.concatenate([np.asarray(d, np.float64) for d in kept]) if kept else np.zeros(0)
    spread = float(values.std()) if values.size else 0.0
    if spread == 0.0:
        return values
    return values[np.abs(values - values.mean()) < 3.0 * spread]


class _GrowingSet:
    """One class's kept points (step 3), their set distances and threshold."""

    def __init__(self, dim: int) -> None:
        self.points = _Points(dim)
        self.set_distances: list[float] = [0.0]
        self.threshold = 0.0

    def admits(self, d: float) -> bool:
        return d > self.threshold

    def keep(self, v: np.ndarray, d: float) -> None:
        self.points.add(v)
        self.set_distances.append(d)
        values = np.asarray(self.set_distances, np.float64)
        self.threshold = max(self.threshold, float(values.mean() - values.std()))


@dataclass(frozen=True)
class _Mark:
    """The state's sizes before a request: enough to undo it exactly."""

    seq: int
    distances: int
    class_distances: dict[int, int]
    sets: dict[int, tuple[int, int, float]]  # class -> (points, set distances, threshold)


@dataclass(frozen=True)
class PradaUpdate:
    """What one request adds: points (class, uint8 bytes) from sequence ``first_seq``,
    distances (seq, d), the test (n queries, W, alarm) if one ran; ``undo`` restores the
    state as it was before the request."""

    first_seq: int
    points: list[tuple[int, bytes]]
    distances: list[tuple[int, float]]
    test: tuple[int, float, bool] | None
    undo: _Mark = field(repr=False, compare=False)


class PradaState:
    """One key's PRADA history. ``observe`` runs a request's images through the rule and
    returns the update; the caller then either ``apply``s it (once the store committed the
    same update) or ``revert``s it, which puts the state back exactly."""

    def __init__(self, delta: float = 0.9, min_distances: int = 100,
                 test_every: int = 10, class_min: int = 10) -> None:
        self.delta = delta
        self.min_distances = min_distances
        self.test_every = test_every
        self.class_min = class_min
        self.classes: dict[int, _GrowingSet] = {}
        self.class_distances: dict[int, list[float]] = {}
        self.distances: list[float] = []
        self.seq = 0
        self.alarm = False
        self.last_w: float | None = None

    @classmethod
    def from_history(cls, points: Sequence[tuple[int, int, bytes]], alarm: bool,
                     **settings: float) -> PradaState:
        """The state rebuilt by replaying the stored points in order (the rule is
        deterministic, so the sets, thresholds and distances come out as they were)."""
        state = cls(**settings)  # type: ignore[arg-type]
        for _, c, image in points:
            state._step(to_vector(image), c, len(image))
        state.alarm = alarm
        return state

    def observe(self, images_u8: Sequence[bytes], classes: Sequence[int]) -> PradaUpdate:
        """Steps 1-4 for a request's images, in order. The state advances at once; the
        caller must ``apply`` or ``revert`` the update before the key's next request."""
        mark = _Mark(self.seq, len(self.distances),
                     {c: len(d) for c, d in self.class_distances.items()},
                     {c: (s.points.n, len(s.set_distances), s.threshold)
                      for c, s in self.classes.items()})
        first = self.seq
        distances: list[tuple[int, float]] = []
        crossed = False
        for i, (image, c) in enumerate(zip(images_u8, classes, strict=True)):
            d = self._step(to_vector(image), int(c), len(image))
            if d is not None:
                distances.append((first + i, d))
            crossed = crossed or (first + i + 1) % self.test_every == 0
        test = None
        if crossed:
            sample = shapiro_sample(self.class_distances.values(), self.class_min)
            if len(sample) >= self.min_distances:
                w = shapiro_w(sample)
                test = (self.seq, w, w < self.delta)
        points = [(int(c), image) for image, c in zip(images_u8, classes, strict=True)]
        return PradaUpdate(first, points, distances, test, mark)

    def apply(self, update: PradaUpdate) -> None:
        if update.test is not None:
            self.last_w = update.test[1]
            self.alarm = self.alarm or update.test[2]

    def revert(self, update: PradaUpdate) -> None:
        mark = update.undo
        self.seq = mark.seq
        del self.distances[mark.distances:]
        for c in list(self.class_distances):
            if c in mark.class_distances:
                del self.class_distances[c][mark.class_distances[c]:]
            else:
                del self.class_distances[c]
        for c in list(self.classes):
            if c not in mark.sets:
                del self.classes[c]
                continue
            grown, (n, kept, threshold) = self.classes[c], mark.sets[c]
            grown.points.n = n
            del grown.set_distances[kept:]
            grown.threshold = threshold

    def _step(self, v: np.ndarray, c: int, dim: int) -> float | None:
        """Step 3 for one image; its distance, or None when it founds its class's set."""
        self.seq += 1
        grown = self.classes.get(c)
        if grown is None:
            grown = self.classes[c] = _GrowingSet(dim)
            grown.points.add(v)
            return None
        d = grown.points.min_distance(v)
        assert d is not None  # a founded set holds its first point
        self.class_distances.setdefault(c, []).append(d)
        self.distances.append(d)
        if grown.admits(d):
            grown.keep(v, d)
        return d
