"""Adversarial-input detectors scored with NumPy on the classifier's own outputs.

Two detectors, each a score per image (higher = more suspicious) and an optional threshold;
an image is flagged when its score is **strictly greater** than the threshold:

* ``FeatureSqueezing`` (Xu et al., NDSS 2018): score = max over squeezers of the L1
  distance between ``softmax(logits(x))`` and ``softmax(logits(squeeze(x)))``. Squeezers are
  sanitizer specs of ``edge_runtime.sanitize`` applied to the float model batch (default
  ``"bitdepth:bits=5"`` and ``"median:k=3"``), one spec per squeezer. Scores lie in [0, 2].
* ``MahalanobisDetector`` (Lee et al., NeurIPS 2018, one tied covariance, no input
  preprocessing): score = min over classes c of ``(f - mu_c)^T P (f - mu_c)``, f the
  features the classifier head reads (the exported graph's "features" output), mu_c the
  class means, P the shared precision matrix. With P = L L^T (Cholesky, done once) the score is
  ``min_c ||(f - mu_c) L||^2``: one (N, D) @ (D, D) product, then squared distances to the C
  projected means.

A row whose logits or features are not finite scores ``+inf`` (always flagged): a NaN
score would compare False and pass silently.

One runner call per batch: ``DetectorSet.expand`` stacks the squeezed copies after the
original rows (``(1 + s) * N`` rows, s squeezers, copy k of image i at row ``k * N + i``);
``DetectorSet.scores_from_outputs`` takes the logits of the first N rows for the
classification, the squeeze scores from all rows and the Mahalanobis scores from the features
of the first N rows.

Metadata format: the ONNX ``metadata_props`` key ``detectors`` holds a JSON object::

    {"version": 1,
     "fpr": 0.05,
     "feature_squeezing": {"squeezers": ["bitdepth:bits=5", "median:k=3"],
                           "threshold": 0.31},
     "mahalanobis": {"features_output": "features", "classes": C, "dim": D,
                     "means": B64, "precision": B64, "threshold": 97.5}}

* ``version``: the integer 1.
* ``fpr``: the false-positive rate the thresholds were calibrated for, a number in (0, 1),
  or null.
* ``feature_squeezing`` and ``mahalanobis`` are each optional (a file may hold either or
  both); no other keys are allowed at either level.
* ``squeezers``: a non-empty list of single-step sanitizer specs (not ``preprocess``).
* ``threshold``: a finite number, or null for a detector that was not calibrated (it
  scores but cannot flag).
* ``features_output``: the graph output holding the features (must be the model's).
* ``classes`` / ``dim``: positive integers C and D; they must match the model's
  ``num_classes`` / ``features_dim`` metadata where it has them.
* B64: standard base64 (with padding) of the array's **little-endian float32 bytes in
  row-major order**: ``means`` is (C, D), ``precision`` (D, D), symmetric positive definite.

``detectors_from_metadata`` raises one ``ConfigError`` (with a hint) per problem: a missing
key, bad JSON, a wrong version, shape or length, bad base64, a precision that is not
positive definite, or Mahalanobis asked of a model without the features output.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from roadshield_base.errors import ConfigError

from .runners.base import BaseRunner
from .sanitize import (
    PREPROCESS,
    SanitizeError,
    Sanitizer,
    check_input,
    create_sanitizer,
    parse_chain,
)

__all__ = ["DETECTOR_NAMES", "SECTIONS", "METADATA_KEY", "FORMAT_VERSION", "DEFAULT_SQUEEZERS",
           "FeatureSqueezing", "MahalanobisDetector", "DetectorSet", "softmax",
           "parse_detectors", "detectors_from_metadata", "detectors_from_object",
           "detectors_to_metadata", "detectors_to_object", "encode_array", "decode_array"]

SQUEEZE = "squeeze"
MAHALANOBIS = "mahalanobis"
#: names accepted by ``parse_detectors`` and ``detectors_from_metadata``
DETECTOR_NAMES = (SQUEEZE, MAHALANOBIS)
METADATA_KEY = "detectors"
FORMAT_VERSION = 1
DEFAULT_SQUEEZERS = ("bitdepth:bits=5", "median:k=3")
FEATURES_NAME = "features"
FIT_HINT = ("fit the detectors with `roadshield distill detectors --model MODEL.onnx "
            "--data DATA`")
#: metadata object key of each detector name
SECTIONS = {SQUEEZE: "feature_squeezing", MAHALANOBIS: "mahalanobis"}


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, C) logits in float64 (max subtracted first)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def _check_threshold(threshold: Any, who: str) -> float | None:
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.number)) \
            or not math.isfinite(float(threshold)):
        raise ConfigError(f"{who} threshold {threshold!r} is not a finite number",
                          f"pass a number or None (uncalibrated); {FIT_HINT}")
    return float(threshold)


def _check_fpr(fpr: Any) -> float | None:
    if fpr is None:
        return None
    if isinstance(fpr, bool) or not isinstance(fpr, (int, float, np.floating)) \
            or not 0.0 < float(fpr) < 1.0:
        raise ConfigError(f"fpr {fpr!r} is not a number in (0, 1)",
                          "the calibrated false-positive rate, e.g. 0.05 (or None)")
    return float(fpr)


def _flags(scores: np.ndarray, threshold: float | None, who: str) -> np.ndarray:
    if threshold is None:
        raise ConfigError(f"the {who} detector has no threshold, so it cannot flag",
                          f"calibrate it: {FIT_HINT}")
    return np.asarray(scores) > threshold


def _finite_rows(a: np.ndarray) -> np.ndarray:
    return np.isfinite(a).all(axis=tuple(range(1, a.ndim)))


# --- feature squeezing -------------------------------------------------------------------

def _squeezers(squeezers: str | Sequence[str]) -> list[Sanitizer]:
    """Sanitizers from one chain-style string or a list of single-step specs."""
    if isinstance(squeezers, str):
        steps = parse_chain(squeezers)
    else:
        if not isinstance(squeezers, Sequence) or not all(isinstance(s, str)
                                                          for s in squeezers):
            raise ConfigError(f"squeezers {squeezers!r} is not a list of spec strings",
                              f"e.g. {list(DEFAULT_SQUEEZERS)}")
        steps = []
        for spec in squeezers:
            parsed = parse_chain(spec)
            if len(parsed) != 1:
                raise ConfigError(f"squeezer {spec!r} names {len(parsed)} steps",
                                  "give one sanitizer per squeezer, e.g. "
                                  f"{list(DEFAULT_SQUEEZERS)}")
            steps += parsed
    if not steps:
        raise ConfigError("feature squeezing needs at least one squeezer",
                          f"e.g. {list(DEFAULT_SQUEEZERS)}")
    if any(name == PREPROCESS for name, _ in steps):
        raise ConfigError("preprocess is not a squeezer",
                          "use bitdepth, median, jpeg or resize_pad")
    return [create_sanitizer(name, **options) for name, options in steps]


class FeatureSqueezing:
    """Xu et al. 2018 feature squeezing on float32 N x 3 x H x W RGB [0, 1] batches.

    squeezers: sanitizer specs, one per squeezer (a single string is split like a chain,
    ``"bitdepth:bits=5,median:k=3"``). threshold: flag when score > threshold; None
    scores only.
    """

    name = SQUEEZE

    def __init__(self, squeezers: str | Sequence[str] = DEFAULT_SQUEEZERS,
                 threshold: float | None = None) -> None:
        self.squeezers = _squeezers(squeezers)
        self.threshold = _check_threshold(threshold, "feature squeezing")

    @property
    def specs(self) -> list[str]:
        """Canonical spec of each squeezer (as written to the metadata)."""
        return [s.spec for s in self.squeezers]

    @property
    def copies(self) -> int:
        """Rows ``expand`` makes per input row (the original and one per squeezer)."""
        return 1 + len(self.squeezers)

    def expand(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) float32 -> ((1 + s) * N, 3, H, W): the batch, then each squeezed copy."""
        try:
            if check_input(batch, "feature squeezing") != "batch":
                raise SanitizeError(f"feature squeezing: got a uint8 image {batch.shape}",
                                    "squeeze the float32 N x 3 x H x W model batch")
            return np.concatenate([batch, *(s(batch) for s in self.squeezers)])
        except SanitizeError as err:
            raise ConfigError(str(err.args[0]), err.hint) from err

    def scores_from_logits(self, logits_big: np.ndarray, n: int) -> np.ndarray:
        """(N,) float32 scores from the logits of ``expand``'s ``(1 + s) * N`` rows."""
        logits = np.asarray(logits_big)
        if logits.ndim != 2 or logits.shape[0] != self.copies * n or logits.shape[1] < 1:
            raise ConfigError(f"feature squeezing: logits of shape {logits.shape} for "
                              f"{n} images and {len(self.squeezers)} squeezers",
                              f"feed the model expand(batch) and pass its ({self.copies} * N,"
                              " C) logits with N = len(batch)")
        c = logits.shape[1]
        ok = _finite_rows(logits.reshape(self.copies, n, c).transpose(1, 0, 2))
        probs = softmax(np.where(np.isfinite(logits), logits, 0.0)).reshape(self.copies, n, c)
        dist = np.abs(probs[1:] - probs[0]).sum(axis=2).max(axis=0, initial=0.0)
        return np.where(ok, dist, np.inf).astype(np.float32)

    def score(self, runner: BaseRunner, batch: np.ndarray, input_name: str = "input",
              output_name: str = "logits") -> np.ndarray:
        """(N,) scores of ``batch`` with one ``runner.infer`` call on ``expand(batch)``."""
        out = runner.infer({input_name: self.expand(batch)})
        if output_name not in out:
            raise ConfigError(f"the runner returned {sorted(out)}, not {output_name!r}",
                              "pass output_name= (the logits output)")
        return self.scores_from_logits(out[output_name], len(batch))

    def flags(self, scores: np.ndarray) -> np.ndarray:
        """(N,) bool: score > threshold (ConfigError without a threshold)."""
        return _flags(scores, self.threshold, "feature squeezing")


# --- Mahalanobis -----------------------------------------------------------------------------

def _float_matrix(value: Any, what: str) -> np.ndarray:
    try:
        a = np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"Mahalanobis {what} is not a numeric array: {err}",
                          "pass a float32 NumPy array") from err
    if a.ndim != 2 or 0 in a.shape:
        raise ConfigError(f"Mahalanobis {what} has shape {a.shape}, expected a non-empty matrix",
                          "means are (C, D), the precision (D, D)")
    if not np.isfinite(a).all():
        raise ConfigError(f"Mahalanobis {what} holds NaN or infinity",
                          f"fit the detector again: {FIT_HINT}")
    return a


class MahalanobisDetector:
    """Lee et al. 2018 with a tied covariance: score = min_c (f - mu_c)^T P (f - mu_c).

    means: (C, D) class means of the head's input features; precision: (D, D) symmetric
    positive-definite inverse covariance; threshold: flag when score > threshold.
    """

    name = MAHALANOBIS

    def __init__(self, means: np.ndarray, precision: np.ndarray,
                 threshold: float | None = None) -> None:
        mu = _float_matrix(means, "means")
        p = _float_matrix(precision, "precision")
        d = mu.shape[1]
        if p.shape != (d, d):
            raise ConfigError(f"Mahalanobis precision has shape {p.shape} for means of shape "
                              f"{mu.shape}", f"the precision must be ({d}, {d})")
        scale = float(np.abs(p).max())
        if float(np.abs(p - p.T).max()) > 1e-5 * scale:
            raise ConfigError("Mahalanobis precision is not symmetric",
                              f"pass the inverse of a covariance matrix; {FIT_HINT}")
        p = (p + p.T) / 2.0
        try:
            chol = np.linalg.cholesky(p)
        except np.linalg.LinAlgError as err:
            raise ConfigError("Mahalanobis precision is not positive definite",
                              f"fit it with shrinkage so the covariance is invertible; "
                              f"{FIT_HINT}") from err
        self.means = mu.astype(np.float32)
        self.precision = p.astype(np.float32)
        self.threshold = _check_threshold(threshold, "Mahalanobis")
        # centring on the mean of the class means keeps the projected norms small, so the
        # expanded |a - b|^2 = |a|^2 - 2 a.b + |b|^2 loses little to cancellation
        self._center = mu.mean(axis=0)
        self._chol = chol
        self._proj_means = (mu - self._center) @ chol
        self._proj_sq = np.einsum("cd,cd->c", self._proj_means, self._proj_means)

    @property
    def classes(self) -> int:
        return int(self.means.shape[0])

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def score(self, features: np.ndarray) -> np.ndarray:
        """(N,) float32 scores of (N, D) features."""
        f = np.asarray(features)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ConfigError(f"Mahalanobis: features of shape {f.shape}, expected (N, {self.dim})",
                              "pass the model's features output for the original rows")
        ok = _finite_rows(f)
        z = (np.where(np.isfinite(f), f, 0.0) - self._center) @ self._chol
        d2 = (np.einsum("nd,nd->n", z, z)[:, None] - 2.0 * (z @ self._proj_means.T)
              + self._proj_sq[None, :])
        best = np.maximum(d2.min(axis=1, initial=np.inf), 0.0)
        return np.where(ok, best, np.inf).astype(np.float32)

    def flags(self, scores: np.ndarray) -> np.ndarray:
        """(N,) bool: score > threshold (ConfigError without a threshold)."""
        return _flags(scores, self.threshold, "Mahalanobis")


# --- the set the loop holds ------------------------------------------------------------------

class DetectorSet:
    """Either detector, both, or none, scored from one runner call per batch.

    features_name: the runner output holding the (N, D) features for Mahalanobis.
    fpr: the false-positive rate the thresholds were calibrated for (None: unknown).
    """

    def __init__(self, squeeze: FeatureSqueezing | None = None,
                 mahalanobis: MahalanobisDetector | None = None, *,
                 features_name: str = FEATURES_NAME, fpr: float | None = None) -> None:
        self.squeeze = squeeze
        self.mahalanobis = mahalanobis
        self.features_name = features_name
        self.fpr = _check_fpr(fpr)

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the detectors held, in ``DETECTOR_NAMES`` order."""
        return tuple(n for n, d in ((SQUEEZE, self.squeeze), (MAHALANOBIS, self.mahalanobis))
                     if d is not None)

    @property
    def thresholds(self) -> dict[str, float | None]:
        held = {SQUEEZE: self.squeeze, MAHALANOBIS: self.mahalanobis}
        return {n: getattr(held[n], "threshold", None) for n in self.names}

    def __bool__(self) -> bool:
        return bool(self.names)

    def __repr__(self) -> str:
        return f"DetectorSet({', '.join(self.names) or 'none'})"

    def expand(self, batch: np.ndarray) -> np.ndarray:
        """The rows to feed the model: the squeezed copies after ``batch`` when squeezing,
        else ``batch`` itself."""
        return self.squeeze.expand(batch) if self.squeeze is not None else batch

    def scores_from_outputs(self, outputs: Mapping[str, np.ndarray], n: int,
                            output_name: str = "logits"
                            ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(logits of the N original rows, {name: (N,) float32 score}) from the outputs of
        one ``runner.infer({input: expand(batch)})``."""
        if output_name not in outputs:
            raise ConfigError(f"the runner returned {sorted(outputs)}, not {output_name!r}",
                              "pass output_name= (the logits output)")
        logits_big = np.asarray(outputs[output_name])
        scores: dict[str, np.ndarray] = {}
        if self.squeeze is not None:
            scores[SQUEEZE] = self.squeeze.scores_from_logits(logits_big, n)
        if self.mahalanobis is not None:
            feats = outputs.get(self.features_name)
            if feats is None:
                raise ConfigError(f"the runner returned {sorted(outputs)}, without the "
                                  f"features output {self.features_name!r}",
                                  "run a model exported with its features output "
                                  "(`roadshield distill export` of a model with embed)")
            scores[MAHALANOBIS] = self.mahalanobis.score(np.asarray(feats)[:n])
        return logits_big[:n], scores

    def infer(self, runner: BaseRunner, batch: np.ndarray, input_name: str = "input",
              output_name: str = "logits") -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One ``runner.infer`` call: (logits (N, C) of ``batch``, {name: (N,) scores})."""
        outputs = runner.infer({input_name: self.expand(batch)})
        return self.scores_from_outputs(outputs, len(batch), output_name)

    def flags(self, scores: Mapping[str, np.ndarray]) -> np.ndarray:
        """(N,) bool: any held detector's score > its threshold.

        ConfigError when a held detector has no threshold or no score in ``scores``, or
        when the set is empty (test ``if detectors:`` before scoring).
        """
        if not self:
            raise ConfigError("an empty DetectorSet has nothing to flag",
                              "check `if detectors:` first, or load some with "
                              "detectors_from_metadata")
        missing = [n for n in self.names if n not in scores]
        if missing:
            raise ConfigError(f"no scores for {missing} (got {sorted(scores)})",
                              "pass the dict scores_from_outputs / infer returned")
        held = {SQUEEZE: self.squeeze, MAHALANOBIS: self.mahalanobis}
        out = [held[n].flags(scores[n]) for n in self.names]  # type: ignore[union-attr]
        if len({f.shape for f in out}) != 1:
            raise ConfigError(f"score arrays of shapes {[f.shape for f in out]} differ",
                              "score one batch with every detector")
        return np.logical_or.reduce(out)


# --- spec and metadata -----------------------------------------------------------------------

def parse_detectors(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"squeeze,mahalanobis"`` -> ``("squeeze", "mahalanobis")``; "" or None -> ().

    Names are stripped and deduplicated (first occurrence kept). An unknown or empty name
    is a ConfigError listing the known ones.
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return ()
    pieces = spec.split(",") if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for piece in pieces:
        name = piece.strip() if isinstance(piece, str) else piece
        if name not in DETECTOR_NAMES:
            raise ConfigError(f"unknown detector {name!r} in {spec!r}",
                              f"use a comma-separated subset of: {', '.join(DETECTOR_NAMES)}")
        if name not in names:
            names.append(name)
    return tuple(names)


def encode_array(a: np.ndarray) -> str:
    """Base64 of little-endian float32 row-major bytes (the metadata's B64)."""
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f4").tobytes()).decode("ascii")


def decode_array(text: Any, shape: tuple[int, ...], what: str) -> np.ndarray:
    """The inverse of ``encode_array``, checked: ConfigError for a non-string, bad base64
    or a byte count that is not 4 * prod(shape)."""
    if not isinstance(text, str):
        raise ConfigError(f"detector metadata: {what} is a {type(text).__name__}, expected "
                          "a base64 string", FIT_HINT)
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as err:
        raise ConfigError(f"detector metadata: {what} is not valid base64 ({err})",
                          f"write it with encode_array; {FIT_HINT}") from err
    want = 4 * math.prod(shape)
    if len(raw) != want:
        raise ConfigError(f"detector metadata: {what} holds {len(raw)} bytes, expected {want} "
                          f"(float32 {shape})", f"classes/dim disagree with the arrays; "
                          f"{FIT_HINT}")
    return np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32)


def detectors_to_object(detectors: DetectorSet, fpr: float | None = None) -> dict[str, Any]:
    """The metadata object (module docstring) for the detectors held; ``fpr`` defaults to
    the set's own."""
    fpr = _check_fpr(fpr if fpr is not None else detectors.fpr)
    obj: dict[str, Any] = {"version": FORMAT_VERSION, "fpr": fpr}
    if detectors.squeeze is not None:
        obj[SECTIONS[SQUEEZE]] = {"squeezers": detectors.squeeze.specs,
                                    "threshold": detectors.squeeze.threshold}
    if detectors.mahalanobis is not None:
        m = detectors.mahalanobis
        obj[SECTIONS[MAHALANOBIS]] = {"features_output": detectors.features_name,
                              "classes": m.classes, "dim": m.dim,
                              "means": encode_array(m.means),
                              "precision": encode_array(m.precision),
                              "threshold": m.threshold}
    return obj


def detectors_to_metadata(detectors: DetectorSet, fpr: float | None = None) -> str:
    """The ``detectors`` metadata_props value: ``detectors_to_object`` as compact JSON."""
    return json.dumps(detectors_to_object(detectors, fpr), separators=(",", ":"))


def _section(obj: Mapping[str, Any], key: str, allowed: set[str]) -> Mapping[str, Any]:
    sec = obj.get(key)
    if not isinstance(sec, Mapping):
        raise ConfigError(f"detector metadata has no {key!r} object"
                          if sec is None else f"detector metadata: {key} is not an object",
                          f"fit that detector: {FIT_HINT}")
    _no_extra(sec, allowed, key)
    missing = sorted(allowed - set(sec))
    if missing:
        raise ConfigError(f"detector metadata: {key} lacks {missing}", FIT_HINT)
    return sec


def _no_extra(obj: Mapping[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(obj) - allowed)
    if extra:
        raise ConfigError(f"detector metadata: unknown keys {extra} in {where}",
                          f"the allowed keys are {sorted(allowed)}")


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"detector metadata: {what} is {value!r}, not a positive integer",
                          FIT_HINT)
    return value


def _meta_int(meta: Mapping[str, str], key: str) -> int | None:
    try:
        return int(meta[key]) if key in meta else None
    except (TypeError, ValueError):
        return None


def detectors_from_object(obj: Any, features_name: str | None,
                          names: str | Sequence[str] | None = DETECTOR_NAMES,
                          meta: Mapping[str, str] | None = None) -> DetectorSet:
    """A DetectorSet of ``names`` from a decoded metadata object; see
    ``detectors_from_metadata``. ``meta`` (the model's metadata_props) lets ``classes`` /
    ``dim`` be checked against ``num_classes`` / ``features_dim``."""
    wanted = parse_detectors(names)
    if not isinstance(obj, Mapping):
        raise ConfigError(f"detector metadata is a {type(obj).__name__}, not a JSON object",
                          FIT_HINT)
    _no_extra(obj, {"version", "fpr", *SECTIONS.values()}, "the top level")
    if obj.get("version") != FORMAT_VERSION or isinstance(obj.get("version"), bool):
        raise ConfigError(f"detector metadata version {obj.get('version')!r} is not "
                          f"{FORMAT_VERSION}", f"this runtime reads version {FORMAT_VERSION}; "
                          f"{FIT_HINT}")
    fpr = _check_fpr(obj.get("fpr"))
    squeeze = mahalanobis = None
    if SQUEEZE in wanted:
        sec = _section(obj, SECTIONS[SQUEEZE], {"squeezers", "threshold"})
        specs = sec["squeezers"]
        if not isinstance(specs, list) or not specs or not all(isinstance(s, str) for s in specs):
            raise ConfigError(f"detector metadata: squeezers {specs!r} is not a non-empty "
                              "list of strings", f"e.g. {list(DEFAULT_SQUEEZERS)}")
        squeeze = FeatureSqueezing(specs, sec["threshold"])
    if MAHALANOBIS in wanted:
        if features_name is None:
            raise ConfigError("Mahalanobis needs the model's features output, and this model "
                              "has none",
                              "re-export it with `roadshield distill export` (a model with "
                              "embed gets the 'features' output) and fit again, or drop "
                              "mahalanobis from the detectors")
        sec = _section(obj, SECTIONS[MAHALANOBIS],
                       {"features_output", "classes", "dim", "means", "precision", "threshold"})
        if sec["features_output"] != features_name:
            raise ConfigError(f"detector metadata names the features output "
                              f"{sec['features_output']!r}; the model's is {features_name!r}",
                              f"fit the detectors on this model: {FIT_HINT}")
        c = _positive_int(sec["classes"], "mahalanobis.classes")
        d = _positive_int(sec["dim"], "mahalanobis.dim")
        meta = meta or {}
        for what, got, key in (("classes", c, "num_classes"), ("dim", d, "features_dim")):
            model_value = _meta_int(meta, key)
            if model_value is not None and model_value != got:
                raise ConfigError(f"detector metadata: mahalanobis.{what} is {got}, the "
                                  f"model's {key} is {model_value}",
                                  f"the detectors were fitted on another model; {FIT_HINT}")
        mahalanobis = MahalanobisDetector(decode_array(sec["means"], (c, d), "mahalanobis.means"),
                                          decode_array(sec["precision"], (d, d),
                                                       "mahalanobis.precision"),
                                          sec["threshold"])
    return DetectorSet(squeeze, mahalanobis,
                       features_name=features_name if features_name else FEATURES_NAME, fpr=fpr)


def detectors_from_metadata(meta: Mapping[str, str], features_name: str | None,
                            names: str | Sequence[str] | None = DETECTOR_NAMES) -> DetectorSet:
    """The detectors ``names`` (see ``parse_detectors``) from a model's ``metadata_props``.

    meta: e.g. ``ModelInfo.metadata``; features_name: ``ModelInfo.features_name``. Nothing
    is read when ``names`` is empty (an empty set comes back). One ConfigError with a hint
    for each problem listed in the module docstring.
    """
    wanted = parse_detectors(names)
    if not wanted:
        return DetectorSet()
    text = meta.get(METADATA_KEY)
    if text is None:
        raise ConfigError(f"the model has no {METADATA_KEY!r} metadata, so {list(wanted)} "
                          "cannot run", f"{FIT_HINT}, or run without detectors")
    try:
        obj = json.loads(text)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"the model's {METADATA_KEY!r} metadata is not JSON: {err}",
                          FIT_HINT) from err
    return detectors_from_object(obj, features_name, wanted, meta)
