"""Drift monitor: the stream's aggregate statistics against a reference saved at export time.

NumPy only (it runs in the device loop at 30 FPS). A ``ReferenceBuilder`` watches a clean
stream at export time and ``build``s a compact ``DriftReference`` (quantile sketches, class
counts, calibrated thresholds); it travels as JSON in the model's metadata under
``REFERENCE_KEY`` ("drift_reference"). On the device a ``DriftMonitor`` keeps sliding
windows of the same statistics, tests them against the reference every ``check_every``
frames and raises alarms with hysteresis; ``poll()`` hands out the alarms switched on or off.

Statistics (names as they appear in events, ``state()`` and the reference):

- ``frame_brightness``: per frame, the mean Rec.601 luma (0.299 R + 0.587 G + 0.114 B) in
  [0, 1] of the frame subsampled every ``brightness_stride`` pixels in both directions.
- ``frame_dark``: per frame, the ``DARK_PERCENTILE``-th (5th) percentile of the same
  subsampled luma, the k-th smallest value with k = floor(0.05 (n - 1)) (NumPy's "lower"
  method): the black level. A camera's exposure gain leaves black near
  black, so this sees what lifts it (fog, haze, glare, an added brightness offset) in a
  short window, where the mean brightness cannot tell such a shift from a scene's exposure.
- per crop (a row of the float32 (N, 3, S, S) RGB [0, 1] model input and its softmax row):
  ``crop_r`` / ``crop_g`` / ``crop_b`` (channel means), ``crop_spread`` (std over all of the
  crop's values), ``crop_brightness`` (Rec.601 luma of the channel means), ``confidence``
  (top-1 probability) and ``predicted_class`` (argmax, categorical).
- ``score:NAME``: a detector score passed by name to ``observe_crops`` (one float per crop).

Windows and checks: ``frame_brightness`` uses the last ``frame_window`` frames,
``frame_dark`` the last ``dark_window`` frames, crop statistics
the last ``crop_window`` crops (all crop statistics share these rows; each score has its own
window of the last ``crop_window`` crops it was given for). A check runs after every
``check_every``-th observed frame (counted by the monitor, not by ``frame_index``): a frame
statistic is tested once its window is full; a crop statistic once its window is full and at
least one crop arrived since its last test (a window that did not change is not retested, so
a long empty road cannot stack up failing checks).

Tests (a larger value means more drift; a check fails when value > threshold):

- continuous statistic, window of at most ``ks_max_rows`` rows: the two-sample
  Kolmogorov-Smirnov statistic D between the window and the reference (its CDF is the
  piecewise-linear interpolation of the quantile sketch; the reference counts ``count``
  rows). The event also carries the asymptotic p-value: Kolmogorov's distribution at
  (sqrt(n_e) + 0.12 + 0.11 / sqrt(n_e)) * D, n_e = n m / (n + m) (Stephens' correction).
- continuous statistic, larger window: normalised Wasserstein-1, W1(window, reference)
  divided by the reference's std (floored at ``STD_FLOOR``); W1 is integrated exactly between
  the window's step CDF and the sketch's piecewise-linear CDF.
- ``predicted_class``: the population stability index over the ``num_classes`` classes,
  PSI = sum((a - e) * ln(a / e)) with window shares a and reference shares e, each share
  below ``psi_epsilon`` raised to ``psi_epsilon`` (empty bins).

Thresholds. The stream is autocorrelated (a scene and its exposure last ~30 frames, a sign
~15), so a window holds only a handful of independent scenes and a raw p < 0.05 fires on a
clean road every few hundred frames. Each statistic's threshold is therefore the larger of

- the nominal threshold: for KS, the D whose p-value is ``alpha / m`` (Bonferroni over the
  m statistics in the reference); ``wasserstein_threshold`` for W1; ``psi_threshold`` for
  PSI; and
- the calibrated threshold: ``margin`` times the largest value over held-out clean windows
  of the reference stream. Calibration cross-fits: the reference frames are cut into
  ``calibration_folds`` contiguous folds of equal length (crops go with the fold of their
  frame); for each fold the sketch is built from the other folds, and the fold's own stream
  is replayed through exactly the runtime windowing and check rule above (only windows lying
  wholly inside the fold count); the maximum is over every fold's tested windows.

Hysteresis: a statistic's alarm switches on after ``on_after`` consecutive failing tests
and off after ``off_after`` consecutive passing tests; each switch is one ``DriftEvent``.

Defaults, and what they do on the synthetic drive (``scripts/drift_check.py``: reference
from six 5,000-frame drives, one calibration fold each; tests on other drives of 3,000
frames, the ramp from frame 1,500): ``frame_window=1200`` (above ``ks_max_rows``, so
frame brightness takes normalised W1), ``dark_window=240`` (KS), ``crop_window=480``
(~1,100 frames of signs; KS), ``check_every=15``, ``on_after=2``, ``off_after=8``,
``margin=1.1``. Measured (``--seeds 1,2,3,4,5,6 --factors 1.15``): no false alarm in
18,000 clean frames; a x1.15 brightness ramp over 100 frames alarmed in 5 of 6 drives
within 1,500 frames, after 734-1,079 frames. Before the black level was added the same
check on eight drives gave: no false alarm in 24,000 frames; x1.15 and x0.85 each in 6 of 8
(734-1,079 frames brighter, 344-1,274 darker); x1.3 / x0.7 in 8 of 8 (median 749 / 689).
No setting met "alarm within 300 frames of a 15 % gain" without breaking "<= 1 false alarm
per 10,000 clean frames": each ~30-frame scene draws its own exposure (gain, gamma,
contrast, colour cast), so the mean brightness of a clean 300-frame window strays up to
~0.12 from the reference mean (std ~0.036) while a 15 % gain moves it by ~0.07; only
windows of ~1,000 frames and more hold it apart. What lifts the black level (fog, an added
offset) the short ``frame_dark`` window sees within a few hundred frames
(``roadshield redteam inference``'s drift rows).

Use in the loop: once per frame ``observe_frame(frame.index, frame.image)`` (~100 us), after
classification ``observe_crops(frame.index, batch, probs, scores)`` with the exact batch
given to the model and the softmax of its logits, then ``poll()``; each event goes into the
decision log as it is. A check (every ``check_every`` frames) costs about 1 ms.

Reference JSON (``DriftReference.to_json``; every field required, no others allowed)::

    {"format": "roadshield.drift_reference", "version": 1,
     "num_classes": C (int >= 1), "frames": frames observed (int), "crops": crops (int),
     "quantile_count": K (int >= 3; quantiles at probabilities linspace(0, 1, K)),
     "config": {every DriftConfig field: the calibration's, and the default hysteresis},
     "statistics": {NAME: {
         "kind": "continuous" | "categorical",
         "source": "frame" | "crop" | "score",
         "count": rows observed (int >= 2),
         "mean": float, "std": float >= 0,
         "quantiles": K non-decreasing finite floats       (continuous only)
         "class_counts": C ints >= 0 summing to count       (categorical only)
         "test": "ks" | "wasserstein" (continuous) | "psi" (categorical),
         "nominal_threshold": float > 0,
         "calibrated_max": float >= 0 (largest held-out clean value),
         "calibration_windows": int >= 1 (held-out windows tested),
         "threshold": float > 0 (= max(nominal, margin * calibrated_max))}}}

``frame_brightness``, ``frame_dark``, the six crop statistics and ``predicted_class`` are
always present.
"""

from __future__ import annotations

import json
import logging
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

import numpy as np

from roadshield_base.errors import ConfigError

log = logging.getLogger(__name__)

REFERENCE_KEY = "drift_reference"
REFERENCE_FORMAT = "roadshield.drift_reference"
REFERENCE_VERSION = 1
QUANTILE_COUNT = 201
STD_FLOOR = 1e-6

FRAME_BRIGHTNESS = "frame_brightness"
FRAME_DARK = "frame_dark"
FRAME_STATISTICS = (FRAME_BRIGHTNESS, FRAME_DARK)
DARK_PERCENTILE = 5.0
CROP_STATISTICS = ("crop_r", "crop_g", "crop_b", "crop_spread", "crop_brightness",
                   "confidence")
PREDICTED_CLASS = "predicted_class"
SCORE_PREFIX = "score:"
TESTS = {"continuous": ("ks", "wasserstein"), "categorical": ("psi",)}

_LUMA_RGB = np.array([0.299, 0.587, 0.114], dtype=np.float64)
_LUMA_BGR32 = _LUMA_RGB[::-1].astype(np.float32)


# -- configuration -------------------------------------------------------------------------
@dataclass(frozen=True)
class DriftConfig:
    """Windows, cadence, hysteresis and test thresholds of the drift monitor.

    frame_window: frames per frame-statistic window. crop_window: crops per crop-statistic
    window. check_every: frames between checks. on_after / off_after: consecutive failing /
    passing tests that switch an alarm on / off. alpha: family-wise KS level, split over the
    statistics (Bonferroni). ks_max_rows: KS for windows up to this many rows, normalised
    Wasserstein beyond. wasserstein_threshold / psi_threshold: nominal thresholds.
    psi_epsilon: the smallest share a PSI bin counts with. margin: calibrated threshold =
    margin * largest held-out clean value. calibration_folds: folds for that calibration.
    brightness_stride: pixel step of the frame-brightness subsample. history_size: records
    ``DriftMonitor.history`` keeps.
    """

    frame_window: int = 1200
    dark_window: int = 240
    crop_window: int = 480
    check_every: int = 15
    on_after: int = 2
    off_after: int = 8
    alpha: float = 0.05
    ks_max_rows: int = 1000
    wasserstein_threshold: float = 0.1
    psi_threshold: float = 0.2
    psi_epsilon: float = 1e-4
    margin: float = 1.1
    calibration_folds: int = 4
    brightness_stride: int = 8
    history_size: int = 4096

    def __post_init__(self) -> None:
        for name in ("frame_window", "dark_window", "crop_window"):
            value = getattr(self, name)
            _check_int(value, name, 2, "a two-sample test needs at least 2 rows per window; "
                       "size windows in frames / crops, e.g. frame_window=1200, "
                       "crop_window=480")
        for name in ("check_every", "on_after", "off_after", "brightness_stride",
                     "history_size", "ks_max_rows"):
            _check_int(getattr(self, name), name, 1, f"use a whole number >= 1 for {name}")
        _check_int(self.calibration_folds, "calibration_folds", 2,
                   "calibration needs at least 2 folds (one held out), e.g. 4")
        # (name, low, high, low allowed, hint): open ranges unless the bound is allowed
        for name, lo, hi, lo_ok, hint in (
                ("alpha", 0.0, 1.0, False, "a significance level such as 0.05"),
                ("wasserstein_threshold", 0.0, math.inf, False, "e.g. 0.1 (W1 / reference std)"),
                ("psi_threshold", 0.0, math.inf, False, "e.g. 0.2"),
                ("psi_epsilon", 0.0, 0.5, False, "a small share such as 1e-4"),
                ("margin", 1.0, math.inf, True, "a factor >= 1 over the clean maximum, e.g. 1.1")):
            value = getattr(self, name)
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
                  and math.isfinite(value) and value < hi
                  and (lo <= value if lo_ok else lo < value))
            if not ok:
                bound = "[" if lo_ok else "("
                raise ConfigError(f"drift config {name}={value!r} is out of range "
                                  f"{bound}{lo}, {hi})", hint)


#: DriftConfig fields that shape the thresholds; a monitor must use the reference's values.
CALIBRATION_FIELDS = ("frame_window", "dark_window", "crop_window", "check_every", "alpha",
                      "ks_max_rows", "wasserstein_threshold", "psi_threshold", "psi_epsilon",
                      "margin", "calibration_folds", "brightness_stride")


def _check_int(value: object, name: str, lo: int, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ConfigError(f"drift config {name}={value!r} must be a whole number >= {lo}", hint)


# -- per-frame and per-crop statistics -----------------------------------------------------
def _subsampled_luma(image_bgr: np.ndarray, stride: int) -> tuple[np.ndarray, float]:
    """(float32 Rec.601 luma of an H x W x 3 BGR frame every ``stride`` pixels, full scale)."""
    if not isinstance(image_bgr, np.ndarray) or image_bgr.ndim != 3 \
            or image_bgr.shape[2] != 3 or image_bgr.size == 0:
        shape = getattr(image_bgr, "shape", type(image_bgr).__name__)
        raise ConfigError(f"drift monitor got a frame shaped {shape}, expected H x W x 3",
                          "pass the camera frame (uint8 BGR) as the loop reads it")
    # float32 first: NumPy reduces a strided uint8 view far slower than a float matrix
    sub = image_bgr[::stride, ::stride].astype(np.float32).reshape(-1, 3)
    scale = 255.0 if image_bgr.dtype == np.uint8 else 1.0
    return sub @ _LUMA_BGR32, scale


def frame_brightness(image_bgr: np.ndarray, stride: int = 8) -> float:
    """Mean Rec.601 luma in [0, 1] of an H x W x 3 uint8 BGR frame, every ``stride`` pixels."""
    luma, scale = _subsampled_luma(image_bgr, stride)
    return float(luma.mean(dtype=np.float64)) / scale


def frame_statistics(image_bgr: np.ndarray, stride: int = 8) -> dict[str, float]:
    """{``frame_brightness``, ``frame_dark``} of one frame (module docstring)."""
    luma, scale = _subsampled_luma(image_bgr, stride)
    k = int(DARK_PERCENTILE / 100 * (luma.size - 1))  # NumPy's "lower" percentile
    return {FRAME_BRIGHTNESS: float(luma.mean(dtype=np.float64)) / scale,
            FRAME_DARK: float(np.partition(luma, k)[k]) / scale}


def crop_statistics(batch: np.ndarray, probs: np.ndarray) -> dict[str, np.ndarray]:
    """The per-crop statistics of a (N, 3, S, S) RGB batch and its (N, C) probabilities.

    Returns {name: (N,) float64} for ``CROP_STATISTICS`` and ``PREDICTED_CLASS`` (as float).
    """
    n = batch.shape[0]
    flat = batch.reshape(n, 3, -1)
    means = flat.mean(axis=2, dtype=np.float64)
    return {
        "crop_r": means[:, 0], "crop_g": means[:, 1], "crop_b": means[:, 2],
        "crop_spread": batch.reshape(n, -1).std(axis=1, dtype=np.float64),
        "crop_brightness": means @ _LUMA_RGB,
        "confidence": probs.max(axis=1).astype(np.float64),
        PREDICTED_CLASS: probs.argmax(axis=1).astype(np.float64),
    }


# -- tests ---------------------------------------------------------------------------------
def kolmogorov_sf(lam: float) -> float:
    """P(K > lam) for Kolmogorov's limiting distribution K (the two-sided KS limit)."""
    if lam <= 0.0:
        return 1.0
    j = np.arange(1, 40, dtype=np.float64)
    if lam < 1.18:  # the theta-function form converges fast for small lam
        terms = np.exp(-((2 * j - 1) ** 2) * math.pi ** 2 / (8 * lam * lam))
        return float(min(1.0, max(0.0, 1.0 - math.sqrt(2 * math.pi) / lam * terms.sum())))
    signs = np.where(j % 2 == 1, 1.0, -1.0)
    return float(min(1.0, max(0.0, 2.0 * (signs * np.exp(-2 * j * j * lam * lam)).sum())))


def _stephens(n: float, m: float) -> float:
    en = n * m / (n + m)
    return math.sqrt(en) + 0.12 + 0.11 / math.sqrt(en)


def ks_pvalue(d: float, n: int, m: int) -> float:
    """Asymptotic two-sided p-value of a two-sample KS statistic d for sizes n and m."""
    return kolmogorov_sf(_stephens(n, m) * d)


def ks_critical(alpha: float, n: int, m: int) -> float:
    """The KS statistic whose ``ks_pvalue`` is ``alpha`` for sizes n and m (at most 1)."""
    lo, hi = 0.0, 10.0
    for _ in range(100):  # bisection: kolmogorov_sf falls monotonically
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if kolmogorov_sf(mid) > alpha else (lo, mid)
    return min(1.0, hi / _stephens(n, m))


def ks_2samp(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Two-sample KS on raw samples: (D exactly, asymptotic two-sided p-value)."""
    a, b = np.sort(np.ravel(a)), np.sort(np.ravel(b))
    pts = np.concatenate([a, b])
    d = float(np.abs(np.searchsorted(a, pts, "right") / a.size
                     - np.searchsorted(b, pts, "right") / b.size).max())
    return d, ks_pvalue(d, a.size, b.size)


def wasserstein_1d(a: np.ndarray, b: np.ndarray) -> float:
    """W1 between two raw samples: the integral of |F_a - F_b| (exact)."""
    a, b = np.sort(np.ravel(a)), np.sort(np.ravel(b))
    pts = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(a, pts[:-1], "right") / a.size
    fb = np.searchsorted(b, pts[:-1], "right") / b.size
    return float(np.sum(np.abs(fa - fb) * np.diff(pts)))


def sketch(values: np.ndarray, count: int = QUANTILE_COUNT) -> np.ndarray:
    """The quantile sketch of ``values``: quantiles at probabilities linspace(0, 1, count)."""
    return np.quantile(np.asarray(values, dtype=np.float64), np.linspace(0.0, 1.0, count))


def sketch_cdf(x: np.ndarray, quantiles: np.ndarray, right: bool = True) -> np.ndarray:
    """The sketch's piecewise-linear CDF at x: its right limit, or left limit (right=False).

    Tied quantiles are a jump of the CDF, so the two limits differ there.
    """
    q = quantiles
    p = np.linspace(0.0, 1.0, q.size)
    j = np.searchsorted(q, x, "right" if right else "left")
    out = np.where(j >= q.size, 1.0, 0.0)
    mid = (j > 0) & (j < q.size)
    jm = j[mid]
    q0, q1 = q[jm - 1], q[jm]
    out[mid] = p[jm - 1] + (p[jm] - p[jm - 1]) * (x[mid] - q0) / (q1 - q0)
    return out


def ks_to_sketch(sample: np.ndarray, quantiles: np.ndarray) -> float:
    """KS statistic sup |F_sample - F_sketch|, exact for the sketch's piecewise-linear CDF.

    Between consecutive breakpoints (sample values and quantiles) the sample's CDF is flat
    and the sketch's linear, so the supremum is at a one-sided limit at a breakpoint.
    """
    x = np.sort(np.ravel(sample))
    d = 0.0
    for pts in (x, quantiles):  # a repeated point costs nothing, so no union is needed
        right = np.searchsorted(x, pts, "right") / x.size - sketch_cdf(pts, quantiles)
        left = np.searchsorted(x, pts, "left") / x.size - sketch_cdf(pts, quantiles, False)
        d = max(d, float(np.abs(right).max()), float(np.abs(left).max()))
    return d


def wasserstein_to_sketch(sample: np.ndarray, quantiles: np.ndarray) -> float:
    """W1 between a sample and a sketch: the integral of |F_sample - F_sketch|, exact."""
    x = np.sort(np.ravel(sample))
    pts = np.sort(np.concatenate([x, quantiles]))  # a repeated point adds a zero width
    f = np.searchsorted(x, pts[:-1], "right") / x.size  # flat on each interval
    d0 = sketch_cdf(pts[:-1], quantiles) - f
    d1 = sketch_cdf(pts[1:], quantiles, right=False) - f
    width = np.diff(pts)
    a0, a1 = np.abs(d0), np.abs(d1)
    same = d0 * d1 >= 0
    # |linear| over an interval: a trapezoid, or two triangles where it crosses zero
    tot = np.where(same, 0.5 * (a0 + a1),
                   0.5 * (a0 * a0 + a1 * a1) / np.maximum(a0 + a1, 1e-300))
    return float(np.sum(tot * width))


def psi(reference_counts: np.ndarray, window_counts: np.ndarray, epsilon: float = 1e-4
        ) -> float:
    """Population stability index between two histograms over the same bins."""
    e = np.asarray(reference_counts, dtype=np.float64)
    a = np.asarray(window_counts, dtype=np.float64)
    e = np.maximum(e / e.sum(), epsilon)
    a = np.maximum(a / a.sum(), epsilon)
    return float(np.sum((a - e) * np.log(a / e)))


# -- the reference -------------------------------------------------------------------------
@dataclass
class StatisticReference:
    """One statistic's part of the reference (see the module docstring for the fields)."""

    kind: str
    source: str
    count: int
    mean: float
    std: float
    test: str
    nominal_threshold: float
    calibrated_max: float
    calibration_windows: int
    threshold: float
    quantiles: np.ndarray | None = None
    class_counts: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind, "source": self.source, "count": self.count,
            "mean": _num(self.mean), "std": _num(self.std), "test": self.test,
            "nominal_threshold": _num(self.nominal_threshold),
            "calibrated_max": _num(self.calibrated_max),
            "calibration_windows": self.calibration_windows,
            "threshold": _num(self.threshold)}
        if self.quantiles is not None:
            out["quantiles"] = [_num(v) for v in self.quantiles]
        if self.class_counts is not None:
            out["class_counts"] = [int(v) for v in self.class_counts]
        return out


def _num(value: float) -> float:
    """A float with 8 significant digits: exact enough, and a compact JSON."""
    return float(f"{float(value):.8g}")


@dataclass
class DriftReference:
    """What the monitor compares the stream against; JSON under ``REFERENCE_KEY``."""

    num_classes: int
    frames: int
    crops: int
    config: DriftConfig
    statistics: dict[str, StatisticReference]
    quantile_count: int = QUANTILE_COUNT

    def to_dict(self) -> dict[str, Any]:
        return {"format": REFERENCE_FORMAT, "version": REFERENCE_VERSION,
                "num_classes": self.num_classes, "frames": self.frames, "crops": self.crops,
                "quantile_count": self.quantile_count, "config": asdict(self.config),
                "statistics": {k: v.to_dict() for k, v in self.statistics.items()}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> DriftReference:
        """Parse and validate; a malformed field raises one ConfigError naming it."""
        try:
            data = json.loads(text)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{REFERENCE_KEY} is not valid JSON: {err}",
                              "re-export the model so its drift reference is rewritten") from err
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> DriftReference:
        return _parse_reference(data)


_TOP_FIELDS = ("format", "version", "num_classes", "frames", "crops", "quantile_count",
               "config", "statistics")
_STAT_FIELDS = ("kind", "source", "count", "mean", "std", "test", "nominal_threshold",
                "calibrated_max", "calibration_windows", "threshold")
_REBUILD = "rebuild the reference with ReferenceBuilder.build and re-export the model"


def _bad(path: str, problem: str) -> ConfigError:
    return ConfigError(f"{REFERENCE_KEY}.{path} {problem}", _REBUILD)


def _keys(obj: Any, path: str, required: Sequence[str], optional: Sequence[str] = ()
          ) -> dict[str, Any]:
    where = f"{REFERENCE_KEY}.{path}" if path else REFERENCE_KEY
    if not isinstance(obj, dict):
        raise ConfigError(f"{where} is a {type(obj).__name__}, expected an object", _REBUILD)
    missing = [k for k in required if k not in obj]
    if missing:
        raise ConfigError(f"{where} lacks the field(s) {missing}", _REBUILD)
    extra = sorted(set(obj) - set(required) - set(optional))
    if extra:
        raise ConfigError(f"{where} has unknown field(s) {extra}", _REBUILD)
    return obj


def _int(obj: dict[str, Any], key: str, path: str, lo: int) -> int:
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise _bad(f"{path}{key}", f"is {v!r}, expected a whole number >= {lo}")
    return v


def _float(obj: dict[str, Any], key: str, path: str, lo: float, strict: bool = False
           ) -> float:
    v = obj[key]
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
        and (v > lo if strict else v >= lo)
    if not ok:
        raise _bad(f"{path}{key}", f"is {v!r}, expected a finite number "
                   f"{'>' if strict else '>='} {lo}")
    return float(v)


def _parse_reference(data: Any) -> DriftReference:
    top = _keys(data, "", _TOP_FIELDS)
    if top["format"] != REFERENCE_FORMAT:
        raise _bad("format", f"is {top['format']!r}, expected {REFERENCE_FORMAT!r}")
    if top["version"] != REFERENCE_VERSION or isinstance(top["version"], bool):
        raise _bad("version", f"is {top['version']!r}; this runtime reads version "
                   f"{REFERENCE_VERSION}")
    num_classes = _int(top, "num_classes", "", 1)
    frames = _int(top, "frames", "", 0)
    crops = _int(top, "crops", "", 0)
    k = _int(top, "quantile_count", "", 3)
    cfg = _keys(top["config"], "config", [f.name for f in fields(DriftConfig)])
    try:
        config = DriftConfig(**cfg)
    except ConfigError as err:
        raise _bad("config", f"is invalid: {str(err).splitlines()[0]}") from err
    stats = top["statistics"]
    if not isinstance(stats, dict):
        raise _bad("statistics", f"is a {type(stats).__name__}, expected an object")
    required = (*FRAME_STATISTICS, *CROP_STATISTICS, PREDICTED_CLASS)
    missing = [s for s in required if s not in stats]
    if missing:
        raise _bad("statistics", f"lacks {missing}")
    parsed = {name: _parse_statistic(name, body, num_classes, k)
              for name, body in stats.items()}
    return DriftReference(num_classes, frames, crops, config, parsed, k)


def _expected_source(name: str) -> str:
    if name in FRAME_STATISTICS:
        return "frame"
    if name in CROP_STATISTICS or name == PREDICTED_CLASS:
        return "crop"
    if name.startswith(SCORE_PREFIX) and len(name) > len(SCORE_PREFIX):
        return "score"
    raise _bad(f"statistics.{name}", "is not a statistic this runtime knows; names are "
               f"{', '.join(FRAME_STATISTICS)}, {', '.join(CROP_STATISTICS)}, {PREDICTED_CLASS} or "
               f"{SCORE_PREFIX}NAME")


def _parse_statistic(name: str, body: Any, num_classes: int, k: int) -> StatisticReference:
    path = f"statistics.{name}."
    categorical = name == PREDICTED_CLASS
    extra = ("class_counts",) if categorical else ("quantiles",)
    obj = _keys(body, path[:-1], (*_STAT_FIELDS, *extra))
    kind = "categorical" if categorical else "continuous"
    if obj["kind"] != kind:
        raise _bad(f"{path}kind", f"is {obj['kind']!r}, expected {kind!r}")
    source = _expected_source(name)
    if obj["source"] != source:
        raise _bad(f"{path}source", f"is {obj['source']!r}, expected {source!r}")
    if obj["test"] not in TESTS[kind]:
        raise _bad(f"{path}test", f"is {obj['test']!r}, expected one of {list(TESTS[kind])}")
    count = _int(obj, "count", path, 2)
    ref = StatisticReference(
        kind=kind, source=source, count=count,
        mean=_float(obj, "mean", path, -math.inf), std=_float(obj, "std", path, 0.0),
        test=obj["test"], nominal_threshold=_float(obj, "nominal_threshold", path, 0.0, True),
        calibrated_max=_float(obj, "calibrated_max", path, 0.0),
        calibration_windows=_int(obj, "calibration_windows", path, 1),
        threshold=_float(obj, "threshold", path, 0.0, True))
    if categorical:
        counts = obj["class_counts"]
        if not isinstance(counts, list) or len(counts) != num_classes or any(
                isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts) \
                or sum(counts) != count:
            raise _bad(f"{path}class_counts", f"must be {num_classes} whole numbers >= 0 "
                       f"summing to count={count}")
        ref.class_counts = np.asarray(counts, dtype=np.int64)
    else:
        q = obj["quantiles"]
        arr = None
        if isinstance(q, list) and len(q) == k and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in q):
            arr = np.asarray(q, dtype=np.float64)
        if arr is None or not np.isfinite(arr).all() or (np.diff(arr) < 0).any():
            raise _bad(f"{path}quantiles", f"must be {k} finite non-decreasing numbers")
        ref.quantiles = arr
    return ref


# -- windowed evaluation shared by calibration and the monitor -----------------------------
def _evaluate(ref: StatisticReference, window: np.ndarray, config: DriftConfig
              ) -> tuple[float, float | None]:
    """(value, KS p-value or None) of one window against one statistic's reference."""
    if ref.test == "psi":
        assert ref.class_counts is not None
        counts = np.bincount(window.astype(np.int64), minlength=ref.class_counts.size)
        return psi(ref.class_counts, counts[: ref.class_counts.size], config.psi_epsilon), None
    assert ref.quantiles is not None
    if ref.test == "ks":
        d = ks_to_sketch(window, ref.quantiles)
        return d, ks_pvalue(d, window.size, ref.count)
    return wasserstein_to_sketch(window, ref.quantiles) / max(ref.std, STD_FLOOR), None


def window_rows(name: str, source: str, config: DriftConfig) -> int:
    """Rows in the window of statistic ``name`` (module docstring: windows and checks)."""
    if source == "frame":
        return config.dark_window if name == FRAME_DARK else config.frame_window
    return config.crop_window


def _test_for(kind: str, rows: int, config: DriftConfig) -> str:
    if kind == "categorical":
        return "psi"
    return "ks" if rows <= config.ks_max_rows else "wasserstein"


def _nominal(test: str, rows: int, ref_count: int, m: int, config: DriftConfig) -> float:
    if test == "psi":
        return config.psi_threshold
    if test == "wasserstein":
        return config.wasserstein_threshold
    return ks_critical(config.alpha / m, rows, ref_count)


# -- building the reference ----------------------------------------------------------------
class ReferenceBuilder:
    """Collects a clean stream's statistics at export time; ``build`` makes the reference.

    Call ``observe_frame`` for every frame and ``observe_crops`` after it for that frame's
    crops, in stream order (the calibration replays this order).
    """

    def __init__(self, brightness_stride: int = 8) -> None:
        _check_int(brightness_stride, "brightness_stride", 1, "e.g. 8")
        self.brightness_stride = brightness_stride
        self._frames: dict[str, list[float]] = {n: [] for n in FRAME_STATISTICS}
        self._crop_pos: list[int] = []  # frame position each crop came with
        self._crops: dict[str, list[float]] = {n: [] for n in (*CROP_STATISTICS,
                                                                 PREDICTED_CLASS)}
        self._score_pos: dict[str, list[int]] = {}
        self._scores: dict[str, list[float]] = {}
        self._num_probs: int | None = None

    @property
    def frames(self) -> int:
        return len(self._frames[FRAME_BRIGHTNESS])

    @property
    def crops(self) -> int:
        return len(self._crop_pos)

    def observe_frame(self, image_bgr: np.ndarray) -> None:
        for name, value in frame_statistics(image_bgr, self.brightness_stride).items():
            self._frames[name].append(value)

    def observe_crops(self, batch: np.ndarray, probs: np.ndarray,
                      scores: Mapping[str, np.ndarray] | None = None) -> None:
        """Add one frame's crops: batch (N, 3, S, S) RGB [0, 1], probs (N, C), scores."""
        if not self.frames:
            raise ConfigError("observe_crops came before any observe_frame",
                              "observe each frame first, then its crops")
        n, checked = _check_crops(batch, probs, scores, self._num_probs)
        self._num_probs = probs.shape[1] if n else self._num_probs
        pos = self.frames - 1
        if n:
            for name, values in crop_statistics(batch, probs).items():
                self._crops[name].extend(values.tolist())
            self._crop_pos.extend([pos] * n)
        for name, values in checked.items():
            key = SCORE_PREFIX + name
            self._scores.setdefault(key, []).extend(values.tolist())
            self._score_pos.setdefault(key, []).extend([pos] * n)

    def build(self, num_classes: int, config: DriftConfig | None = None) -> DriftReference:
        """Sketch every statistic and calibrate its threshold (module docstring: exactly)."""
        config = config or DriftConfig(brightness_stride=self.brightness_stride)
        if config.brightness_stride != self.brightness_stride:
            raise ConfigError(f"the builder measured brightness at stride "
                              f"{self.brightness_stride}, the config says "
                              f"{config.brightness_stride}", "use the same stride in both")
        _check_int(num_classes, "num_classes", 1, "pass the model's number of classes")
        if self._num_probs is not None and self._num_probs != num_classes:
            raise ConfigError(f"the crops had {self._num_probs} class probabilities but "
                              f"num_classes={num_classes}", "pass the model's class count")
        folds = config.calibration_folds
        window = max(config.frame_window, config.dark_window)
        need = folds * (window + config.check_every)
        if self.frames < need:
            raise ConfigError(f"the reference saw {self.frames} frames; calibrating "
                              f"{folds} folds of {window}-frame windows needs "
                              f">= {need}", "observe a longer clean stream (e.g. 20,000 "
                              "frames from several drives)")
        frame_pos = np.arange(self.frames)
        streams: dict[str, tuple[str, np.ndarray, np.ndarray]] = {
            name: ("frame", np.asarray(values), frame_pos)
            for name, values in self._frames.items()}
        crop_pos = np.asarray(self._crop_pos, dtype=np.int64)
        for name, values in self._crops.items():
            streams[name] = ("crop", np.asarray(values), crop_pos)
        for name, values in self._scores.items():
            streams[name] = ("score", np.asarray(values),
                             np.asarray(self._score_pos[name], dtype=np.int64))
        m = len(streams)
        stats = {name: self._build_one(name, source, values, pos, num_classes, m, config)
                 for name, (source, values, pos) in sorted(streams.items())}
        built = DriftReference(num_classes, self.frames, self.crops, config, stats)
        # what the device will load: the JSON's rounded numbers, validated
        return DriftReference.from_json(built.to_json())

    def _build_one(self, name: str, source: str, values: np.ndarray, pos: np.ndarray,
                   num_classes: int, m: int, config: DriftConfig) -> StatisticReference:
        categorical = name == PREDICTED_CLASS
        rows = window_rows(name, source, config)
        if not np.isfinite(values).all():
            raise ConfigError(f"statistic {name} has non-finite values",
                              "check the model outputs and detector scores")
        kind = "categorical" if categorical else "continuous"
        test = _test_for(kind, rows, config)
        ref = StatisticReference(
            kind=kind, source=source, count=int(values.size),
            mean=float(values.mean()) if values.size else 0.0,
            std=float(values.std()) if values.size else 0.0, test=test,
            nominal_threshold=_nominal(test, rows, max(2, values.size), m, config),
            calibrated_max=0.0, calibration_windows=0, threshold=0.0)
        top, tested = 0.0, 0
        bounds = np.linspace(0, self.frames, config.calibration_folds + 1).astype(np.int64)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            inside = (pos >= a) & (pos < b)
            held = _fit(ref, values[~inside], num_classes)
            for window in _replay(values[inside], pos[inside], int(a), int(b), rows,
                                  source == "frame", config.check_every):
                top = max(top, _evaluate(held, window, config)[0])
                tested += 1
        if tested == 0:
            raise ConfigError(f"statistic {name} had {values.size} rows, too few to fill a "
                              f"{rows}-row window in every calibration fold",
                              "observe a longer clean stream with signs, or pass this score "
                              "with every batch")
        final = _fit(ref, values, num_classes)
        final.calibrated_max = top
        final.calibration_windows = tested
        final.threshold = max(ref.nominal_threshold, config.margin * top)
        return final


def _fit(ref: StatisticReference, values: np.ndarray, num_classes: int) -> StatisticReference:
    """A copy of ``ref`` whose sketch / class counts (and count, mean, std) fit ``values``."""
    out = StatisticReference(**{f.name: getattr(ref, f.name) for f in fields(ref)})
    out.count = int(values.size)
    out.mean = float(values.mean()) if values.size else 0.0
    out.std = float(values.std()) if values.size else 0.0
    if ref.kind == "categorical":
        out.class_counts = np.bincount(values.astype(np.int64), minlength=num_classes)
        out.quantiles = None
    else:
        out.quantiles = sketch(values) if values.size else np.zeros(QUANTILE_COUNT)
    return out


def _replay(values: np.ndarray, pos: np.ndarray, start: int, stop: int, rows: int,
            per_frame: bool, check_every: int) -> Iterable[np.ndarray]:
    """The windows the monitor would test on frames [start, stop) (module docstring)."""
    last_seen = -1
    # checks follow every check_every-th frame: positions p with (p + 1) % check_every == 0
    first = start + (-(start + 1)) % check_every
    for p in range(first, stop, check_every):
        if per_frame:
            if p - rows + 1 >= start:
                yield values[p - rows + 1 - start: p + 1 - start]
            continue
        seen = int(np.searchsorted(pos, p, "left"))  # crops of frames before p
        if seen >= rows and seen > last_seen:
            yield values[seen - rows: seen]
        last_seen = seen


def _check_crops(batch: np.ndarray, probs: np.ndarray,
                 scores: Mapping[str, np.ndarray] | None, num_probs: int | None
                 ) -> tuple[int, dict[str, np.ndarray]]:
    """Validate one frame's crop inputs; returns (N, {score name: (N,) float64})."""
    if not isinstance(batch, np.ndarray) or batch.ndim != 4 or batch.shape[1] != 3:
        raise ConfigError(f"drift crops shaped {getattr(batch, 'shape', None)}, expected "
                          "(N, 3, S, S)", "pass the model input batch the loop built")
    n = batch.shape[0]
    if not isinstance(probs, np.ndarray) or probs.ndim != 2 or probs.shape[0] != n:
        raise ConfigError(f"drift probabilities shaped {getattr(probs, 'shape', None)}, "
                          f"expected ({n}, C)", "pass the softmax of the batch's logits")
    if n and num_probs is not None and probs.shape[1] != num_probs:
        raise ConfigError(f"drift probabilities have {probs.shape[1]} classes, expected "
                          f"{num_probs}", "pass the same model's probabilities")
    checked: dict[str, np.ndarray] = {}
    for name, values in (scores or {}).items():
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
        if arr.size != n:
            raise ConfigError(f"drift score {name!r} has {arr.size} values for {n} crops",
                              "pass one score per crop")
        if n:
            checked[name] = arr
    return n, checked


# -- the monitor ---------------------------------------------------------------------------
@dataclass(frozen=True)
class DriftEvent:
    """An alarm switched on or off. p_value: the KS p-value (None for other tests)."""

    statistic: str
    test: str
    value: float
    threshold: float
    frame: int
    state: str  # "on" | "off"
    p_value: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class HistoryRecord(NamedTuple):
    frame: int
    statistic: str
    value: float
    threshold: float


class _Ring:
    """The last ``size`` values pushed, plus how many were ever pushed."""

    def __init__(self, size: int) -> None:
        self.buf = np.zeros(size, dtype=np.float64)
        self.total = 0

    def push(self, values: np.ndarray) -> None:
        size = self.buf.size
        values = values[-size:]
        idx = (self.total + np.arange(values.size)) % size
        self.buf[idx] = values
        self.total += values.size

    @property
    def full(self) -> bool:
        return self.total >= self.buf.size


@dataclass
class _Watch:
    ref: StatisticReference
    ring: _Ring
    tested_at: int = -1  # ring.total at the last test
    value: float = math.nan
    fails: int = 0
    passes: int = 0
    alarm: bool = False


class DriftMonitor:
    """Tests the stream's windows against ``reference``; see the module docstring.

    config: None uses the reference's own; another config must keep the reference's
    ``CALIBRATION_FIELDS`` (its thresholds hold for those windows only) and may change
    on_after, off_after and history_size.
    """

    def __init__(self, reference: DriftReference, config: DriftConfig | None = None) -> None:
        ref_cfg = reference.config
        cfg = config or ref_cfg
        differ = [f"{k}={getattr(cfg, k)!r} (reference: {getattr(ref_cfg, k)!r})"
                  for k in CALIBRATION_FIELDS if getattr(cfg, k) != getattr(ref_cfg, k)]
        if differ:
            raise ConfigError("the drift config differs from the one the reference was "
                              "calibrated with: " + ", ".join(differ),
                              "change only on_after, off_after or history_size, or rebuild "
                              "the reference with this config")
        self.reference = reference
        self.config = cfg
        self.frames_seen = 0
        self._events: list[DriftEvent] = []
        self._history: deque[HistoryRecord] = deque(maxlen=cfg.history_size)
        self._warned: set[str] = set()
        self._watch: dict[str, _Watch] = {}
        for name, ref in sorted(reference.statistics.items()):  # events in a fixed order
            self._watch[name] = _Watch(ref, _Ring(window_rows(name, ref.source, cfg)))

    def observe_frame(self, frame_index: int, image_bgr: np.ndarray) -> None:
        """Add one frame; every ``check_every``-th frame runs a check."""
        for name, value in frame_statistics(image_bgr, self.config.brightness_stride).items():
            self._watch[name].ring.push(np.array([value]))
        self.frames_seen += 1
        if self.frames_seen % self.config.check_every == 0:
            self._check(frame_index)

    def observe_crops(self, frame_index: int, batch: np.ndarray, probs: np.ndarray,
                      scores: Mapping[str, np.ndarray] | None = None) -> None:
        """Add one frame's crops (call after ``observe_frame`` for that frame)."""
        n, checked = _check_crops(batch, probs, scores, self.reference.num_classes)
        if n == 0:
            return
        for name, values in crop_statistics(batch, probs).items():
            self._watch[name].ring.push(values)
        for name, values in checked.items():
            watch = self._watch.get(SCORE_PREFIX + name)
            if watch is not None:
                watch.ring.push(values)
            elif name not in self._warned:  # a misnamed score must not stop the vehicle
                self._warned.add(name)
                log.warning("drift score %r is not in the reference (it has %s); ignored",
                            name, [k for k in self._watch if k.startswith(SCORE_PREFIX)])

    def _check(self, frame_index: int) -> None:
        cfg = self.config
        for name, w in self._watch.items():
            if not w.ring.full or (w.ref.source != "frame" and w.ring.total == w.tested_at):
                continue
            w.tested_at = w.ring.total
            value, p = _evaluate(w.ref, w.ring.buf, cfg)
            w.value = value
            self._history.append(HistoryRecord(frame_index, name, value, w.ref.threshold))
            if value > w.ref.threshold:
                w.fails, w.passes = w.fails + 1, 0
            else:
                w.fails, w.passes = 0, w.passes + 1
            switch = (not w.alarm and w.fails >= cfg.on_after) or (
                w.alarm and w.passes >= cfg.off_after)
            if switch:
                w.alarm = not w.alarm
                self._events.append(DriftEvent(name, w.ref.test, value, w.ref.threshold,
                                               frame_index, "on" if w.alarm else "off", p))

    def poll(self) -> list[DriftEvent]:
        """Alarms switched on or off since the last poll, oldest first."""
        events, self._events = self._events, []
        return events

    def state(self) -> dict[str, dict[str, Any]]:
        """{statistic: {"value", "threshold", "alarm"}}; value is NaN until first tested."""
        return {name: {"value": w.value, "threshold": w.ref.threshold, "alarm": w.alarm}
                for name, w in self._watch.items()}

    @property
    def history(self) -> list[HistoryRecord]:
        """(frame, statistic, value, threshold) of the latest tests, oldest first."""
        return list(self._history)

    @property
    def alarms(self) -> list[str]:
        """Statistics whose alarm is on."""
        return [name for name, w in self._watch.items() if w.alarm]
