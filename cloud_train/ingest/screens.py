"""Schema, statistical and label-consistency screens against a trusted reference.

Features (``image_features``): for a 32 x 32 RGB crop, a gradient-orientation histogram
(HOG-like: 4 x 4 cells of 8 px, 9 unsigned bins, and 8 x 8 cells of 4 px, 8 bins; each
L2-normalised) plus the 8 x 8 area-downsampled RGB image in [0, 1]. Deterministic NumPy.

The reference is a set of trusted, labelled images. From its features the gate fits, with
fixed seeds: an Isolation Forest (per-sample outliers), an LDA projection with a kNN in it
(label consistency, confident-learning style: the share of a sample's neighbours, and the
LDA posterior, that agree with its given label). Thresholds are calibrated on a held-out
fifth of the reference to a target false-quarantine rate.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge_runtime.trust import sha256_hex
from roadshield.errors import DatasetError
from roadshield.fileio import atomic_write_bytes, atomic_write_json

FEATURE_SIDE = 32
_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_HEX_RE = re.compile(r"^[0-9a-f]{64}$")
EARLIEST_CAPTURE = datetime(1990, 1, 1, tzinfo=timezone.utc)


# ---------------------------------------------------------------- schema and range checks
def validate_row(fields: dict[str, Any], n_classes: int, now: datetime,
                 required: tuple[str, ...], skew: timedelta = timedelta(minutes=10)) -> list[str]:
    """Reason codes for one index row (empty list: the row is well-formed and in range)."""
    reasons = []
    missing = [f for f in required if f not in fields or fields[f] in (None, "")]
    extra = [f for f in fields if f not in required]
    if missing:
        reasons.append("INDEX_MISSING_FIELD")
    if extra:
        reasons.append("INDEX_EXTRA_FIELD")
    sid = fields.get("id")
    if "id" not in missing and not (isinstance(sid, str) and _ID_RE.match(sid)):
        reasons.append("BAD_ID")
    sha = fields.get("sha256")
    if "sha256" not in missing and not (isinstance(sha, str) and _HEX_RE.match(sha)):
        reasons.append("BAD_SHA256")
    label = fields.get("label")
    if "label" not in missing:
        if isinstance(label, str) and label.strip().lstrip("-").isdigit():
            label = int(label)  # CSV carries numbers as text
        if isinstance(label, bool) or not isinstance(label, int):
            reasons.append("BAD_LABEL_TYPE")
        elif not 0 <= label < n_classes:
            reasons.append("LABEL_OUT_OF_RANGE")
    t = fields.get("capture_time")
    if "capture_time" not in missing:
        try:
            ts = datetime.fromisoformat(str(t).replace("Z", "+00:00"))
            if ts.tzinfo is None or ts.utcoffset() != timedelta(0):
                reasons.append("CAPTURE_TIME_NOT_UTC")
            elif ts > now + skew:
                reasons.append("CAPTURE_TIME_FUTURE")
            elif ts < EARLIEST_CAPTURE:
                reasons.append("CAPTURE_TIME_TOO_OLD")
        except ValueError:
            reasons.append("CAPTURE_TIME_UNPARSABLE")
    return reasons


def row_label(fields: dict[str, Any]) -> int:
    return int(fields["label"])


def check_image(img: np.ndarray, min_side: int = 8, max_side: int = 512) -> list[str]:
    """Size range checks on a decoded H x W x 3 uint8 RGB image."""
    h, w = img.shape[:2]
    return [] if min_side <= min(h, w) and max(h, w) <= max_side else ["BAD_SIZE"]


# ---------------------------------------------------------------- features
def _hog(grey: np.ndarray, cell: int, bins: int) -> np.ndarray:
    n, h, w = grey.shape
    gx = np.zeros_like(grey)
    gy = np.zeros_like(grey)
    gx[:, :, 1:-1] = grey[:, :, 2:] - grey[:, :, :-2]
    gy[:, 1:-1, :] = grey[:, 2:, :] - grey[:, :-2, :]
    mag = np.sqrt(gx * gx + gy * gy)
    ang = np.arctan2(gy, gx)
    ang = np.where(ang < 0, ang + np.float32(np.pi), ang)  # unsigned orientation; % is slow
    b = np.minimum((ang * np.float32(bins / np.pi)).astype(np.int64), bins - 1)
    ch, cw = h // cell, w // cell
    cid = (np.arange(h) // cell)[:, None] * cw + (np.arange(w) // cell)[None, :]
    idx = (np.arange(n)[:, None, None] * (ch * cw) + cid[None]) * bins + b
    hist = np.bincount(idx.ravel(), weights=mag.ravel(), minlength=n * ch * cw * bins)
    hist = hist.reshape(n, ch * cw * bins).astype(np.float32)
    return hist / (np.linalg.norm(hist, axis=1, keepdims=True) + 1e-6)


def _global_stats(f: np.ndarray, grey: np.ndarray) -> np.ndarray:
    """Per-image: RGB mean and std, grey gradient energy, saturation mean/std, local contrast."""
    n = len(f)
    flat = f.reshape(n, -1, 3)
    mean = flat.mean(axis=1)
    std = np.sqrt(np.maximum((flat * flat).mean(axis=1) - mean * mean, 0))
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    sat = (np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)).reshape(n, -1)
    sat_m = sat.mean(axis=1)
    sat_s = np.sqrt(np.maximum((sat * sat).mean(axis=1) - sat_m * sat_m, 0))
    grad = (np.abs(grey[:, 1:] - grey[:, :-1]).mean(axis=(1, 2))
            + np.abs(grey[:, :, 1:] - grey[:, :, :-1]).mean(axis=(1, 2)))
    # contrast per 4 x 4 block: its maximum flags small pasted patches (triggers)
    m1 = grey.reshape(n, 8, 4, 8, 4).mean(axis=(2, 4))
    m2 = (grey * grey).reshape(n, 8, 4, 8, 4).mean(axis=(2, 4))
    local = np.sqrt(np.maximum(m2 - m1 * m1, 0)).reshape(n, -1)
    # pixel-scale (Nyquist) energy per 4 x 4 block: renders are band-limited by the camera
    # blur, a pasted high-contrast patch is not
    hf = np.zeros_like(grey)
    hf[:, 1:-1, 1:-1] = (np.abs(2 * grey[:, 1:-1, 1:-1] - grey[:, 1:-1, :-2] - grey[:, 1:-1, 2:])
                         + np.abs(2 * grey[:, 1:-1, 1:-1] - grey[:, :-2, 1:-1]
                                  - grey[:, 2:, 1:-1]))
    hf_blk = hf.reshape(n, 8, 4, 8, 4).mean(axis=(2, 4)).reshape(n, -1)
    hf_ratio = hf_blk.max(axis=1)
    return np.column_stack([mean, std, grad, sat_m, sat_s, local.max(axis=1), hf_ratio])


N_STATS = 11


def image_features(images_rgb: np.ndarray) -> np.ndarray:
    """(n, 859) float32 features of n x 32 x 32 x 3 uint8 RGB images (see module doc).

    Columns: 144 HOG (8 px cells), 512 HOG (4 px cells), 192 8 x 8 RGB, 11 global stats
    (the last ``N_STATS`` columns).
    """
    x = np.asarray(images_rgb)
    if x.ndim != 4 or x.shape[1:] != (FEATURE_SIDE, FEATURE_SIDE, 3):
        raise DatasetError(f"features need n x 32 x 32 x 3 images, got {x.shape}",
                           "resize with to_feature_size() first")
    n = len(x)
    f = x.astype(np.float32) * np.float32(1 / 255)
    grey = f @ np.array([0.299, 0.587, 0.114], np.float32)
    small = f.reshape(n, 8, 4, 8, 4, 3).mean(axis=(2, 4)).reshape(n, -1)
    return np.hstack([_hog(grey, 8, 9), _hog(grey, 4, 8), small,
                      _global_stats(f, grey)]).astype(np.float32)


def to_feature_size(img_rgb: np.ndarray) -> np.ndarray:
    if img_rgb.shape[:2] == (FEATURE_SIDE, FEATURE_SIDE):
        return img_rgb
    return cv2.resize(img_rgb, (FEATURE_SIDE, FEATURE_SIDE), interpolation=cv2.INTER_AREA)


# ---------------------------------------------------------------- KS test
def ks_2samp(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic D and its asymptotic p-value.

    D = sup |F_a - F_b|; p from the Kolmogorov distribution with the Stephens correction
    lambda = (sqrt(ne) + 0.12 + 0.11 / sqrt(ne)) * D, ne = n*m/(n+m) (Numerical Recipes).
    """
    a = np.sort(np.asarray(a, np.float64))
    b = np.sort(np.asarray(b, np.float64))
    n, m = len(a), len(b)
    if n == 0 or m == 0:
        return 0.0, 1.0
    allv = np.concatenate([a, b])
    d = float(np.max(np.abs(np.searchsorted(a, allv, "right") / n
                            - np.searchsorted(b, allv, "right") / m)))
    ne = math.sqrt(n * m / (n + m))
    lam = (ne + 0.12 + 0.11 / ne) * d
    if lam < 1e-3:
        return d, 1.0
    k = np.arange(1, 101)
    p = 2.0 * np.sum((-1.0) ** (k - 1) * np.exp(-2.0 * (k * lam) ** 2))
    return d, float(min(max(p, 0.0), 1.0))


# ---------------------------------------------------------------- the reference
@dataclass
class ScreenConfig:
    target_fp: float = 0.001    # Isolation Forest, on held-out reference samples
    label_fp: float = 0.004     # label-consistency screen, on held-out reference samples
    k: int = 20
    n_components: int = 128     # PCA before LDA / kNN
    range_q: float = 0.0005     # per-stat two-sided range screen quantile
    ks_alpha: float = 1e-3      # family-wise, Bonferroni over features
    ks_min_effect: float = 0.2  # a batch shift must also be large to quarantine a batch
    ks_features: int = 16       # KS on the first principal components
    seed: int = 0


class Reference:
    """Trusted features + labels and the screens fitted on them (refit on load, no pickles).

    ``features`` is (n, D) float32 from ``image_features``; ``labels`` (n,) class indices.
    """

    def __init__(self, features: np.ndarray, labels: np.ndarray, n_classes: int,
                 config: ScreenConfig | None = None) -> None:
        from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
        from sklearn.ensemble import IsolationForest
        from sklearn.neighbors import NearestNeighbors

        self.features = np.asarray(features, np.float32)
        self.labels = np.asarray(labels, np.int64)
        self.n_classes = int(n_classes)
        self.cfg = config or ScreenConfig()
        hold = np.random.default_rng(self.cfg.seed).random(len(self.labels)) < 0.2
        fit_x, fit_y = self.features[~hold], self.labels[~hold]
        self.mu = fit_x.mean(axis=0)
        self.sd = fit_x.std(axis=0) + 1e-3
        z = self._z(fit_x)
        _, vecs = np.linalg.eigh(z.T @ z)  # PCA via the covariance: cheap for D ~ 900
        self.pcs = np.ascontiguousarray(vecs[:, ::-1][:, : self.cfg.n_components])
        proj = z @ self.pcs
        self.iforest = IsolationForest(n_estimators=100, random_state=self.cfg.seed).fit(z)
        self.lda = LinearDiscriminantAnalysis().fit(proj, fit_y)
        self.fit_labels = fit_y
        self.nn = NearestNeighbors(n_neighbors=self.cfg.k).fit(self.lda.transform(proj))
        stats = fit_x[:, -N_STATS:]
        self.lo = np.quantile(stats, self.cfg.range_q, axis=0)
        self.hi = np.quantile(stats, 1 - self.cfg.range_q, axis=0)
        held_x, held_y = self.features[hold], self.labels[hold]
        self.if_threshold = float(np.quantile(self.iforest.score_samples(self._z(held_x)),
                                              self.cfg.target_fp))
        self.label_threshold = float(np.quantile(self.label_scores(held_x, held_y),
                                                 self.cfg.label_fp))
        self.ref_proj = proj[:, : self.cfg.ks_features]

    def _z(self, feats: np.ndarray) -> np.ndarray:
        return (np.asarray(feats, np.float32) - self.mu) / self.sd

    def label_scores(self, feats: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Agreement with the given label in [0, 1]: mean of kNN share and LDA posterior."""
        proj = self._z(feats) @ self.pcs
        _, idx = self.nn.kneighbors(self.lda.transform(proj))
        share = (self.fit_labels[idx] == labels[:, None]).mean(axis=1)
        post = self.lda.predict_proba(proj)
        cols = np.searchsorted(self.lda.classes_, labels).clip(0, len(self.lda.classes_) - 1)
        p = post[np.arange(len(labels)), cols] * (self.lda.classes_[cols] == labels)
        return 0.5 * share + 0.5 * p

    def batch_shift(self, feats: np.ndarray) -> dict[str, Any]:
        """KS per principal component, batch vs reference; 'shifted' if significant and large."""
        proj = (self._z(feats) @ self.pcs)[:, : self.cfg.ks_features]
        worst_d, worst_p, worst_j = 0.0, 1.0, -1
        for j in range(proj.shape[1]):
            d, p = ks_2samp(proj[:, j], self.ref_proj[:, j])
            if d > worst_d:
                worst_d, worst_p, worst_j = d, p, j
        alpha = self.cfg.ks_alpha / proj.shape[1]
        shifted = len(feats) >= 20 and worst_p < alpha and worst_d >= self.cfg.ks_min_effect
        return {"shifted": bool(shifted), "max_ks": round(worst_d, 4), "p": worst_p,
                "feature": f"pc{worst_j}"}

    def screen(self, feats: np.ndarray, labels: np.ndarray) -> list[list[str]]:
        """Reason codes per sample: OUTLIER (Isolation Forest), OUT_OF_RANGE (global stats
        outside the reference's range), LABEL_INCONSISTENT (kNN / LDA disagree with label)."""
        out: list[list[str]] = [[] for _ in range(len(labels))]
        if not len(labels):
            return out
        iso = self.iforest.score_samples(self._z(feats))
        stats = feats[:, -N_STATS:]
        span = self.hi - self.lo
        outside = (stats < self.lo - 0.05 * span) | (stats > self.hi + 0.05 * span)
        off: np.ndarray = np.asarray(outside.any(axis=1))
        agree = self.label_scores(feats, labels)
        for i in range(len(labels)):
            if iso[i] < self.if_threshold:
                out[i].append("OUTLIER")
            if off[i]:
                out[i].append("OUT_OF_RANGE")
            if agree[i] < self.label_threshold or agree[i] == 0.0:
                out[i].append("LABEL_INCONSISTENT")
        return out

    def save(self, folder: str | os.PathLike[str]) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta: dict[str, Any] = {"n_classes": self.n_classes, "config": vars(self.cfg)}
        for name, arr in (("features", self.features), ("labels", self.labels)):
            data = _npy_bytes(arr)
            atomic_write_bytes(folder / f"{name}.npy", data)
            meta[f"{name}_sha256"] = sha256_hex(data)
        atomic_write_json(folder / "reference.json", meta)

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> Reference:
        folder = Path(folder)
        try:
            meta = json.loads((folder / "reference.json").read_text())
            arrays = {}
            for name in ("features", "labels"):
                data = (folder / f"{name}.npy").read_bytes()
                if sha256_hex(data) != meta[f"{name}_sha256"]:
                    raise DatasetError(f"reference {folder / name}.npy does not match its hash",
                                       "rebuild the reference with build_reference()")
                arrays[name] = np.load(folder / f"{name}.npy", allow_pickle=False)
        except (OSError, KeyError, ValueError) as err:
            raise DatasetError(f"no usable screening reference in {folder}: {err}",
                               "build one with cloud_train.ingest.gate.build_reference()") from err
        return cls(arrays["features"], arrays["labels"], meta["n_classes"],
                   ScreenConfig(**meta["config"]))


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()
