"""Image size checks, hand-made image features and the two-sample KS test (the per-row
schema and range checks, which need no NumPy, are in ``cloud_train.ingest.rows``).

Features (``image_features``): for a 32 x 32 RGB crop, a gradient-orientation histogram
(HOG-like: 4 x 4 cells of 8 px, 9 unsigned bins, and 8 x 8 cells of 4 px, 8 bins; each
L2-normalised) plus the 8 x 8 area-downsampled RGB image in [0, 1] and 11 global
statistics. Deterministic NumPy. The screens fitted on a trusted reference (Isolation
Forest, range, KS, label consistency) live in ``cloud_train.ingest.reference``.
"""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np

from roadshield_base.errors import DatasetError

FEATURE_SIDE = 32
def check_image(img: np.ndarray, min_side: int = 8, max_side: int = 512) -> list[str]:
    """Size range checks on a decoded H x W x 3 uint8 RGB image."""
    h, w = img.shape[:2]
    return [] if min_side <= min(h, w) and max(h, w) <= max_side else ["BAD_SIZE"]


# ---------------------------------------------------------------- features
def _gradients(grey: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Central-difference gradient magnitude and unsigned orientation in [0, pi]."""
    gx = np.zeros_like(grey)
    gy = np.zeros_like(grey)
    gx[:, :, 1:-1] = grey[:, :, 2:] - grey[:, :, :-2]
    gy[:, 1:-1, :] = grey[:, 2:, :] - grey[:, :-2, :]
    mag = np.sqrt(gx * gx + gy * gy)
    ang = np.arctan2(gy, gx)
    ang = np.where(ang < 0, ang + np.float32(np.pi), ang)  # unsigned orientation; % is slow
    return mag, ang


def _hog(mag: np.ndarray, ang: np.ndarray, cell: int, bins: int) -> np.ndarray:
    n, h, w = mag.shape
    b = np.minimum((ang * np.float32(bins / np.pi)).astype(np.int64), bins - 1)
    ch, cw = h // cell, w // cell
    cid = (np.arange(h) // cell)[:, None] * cw + (np.arange(w) // cell)[None, :]
    idx = (np.arange(n)[:, None, None] * (ch * cw) + cid[None]) * bins + b
    hist = np.bincount(idx.ravel(), weights=mag.ravel(), minlength=n * ch * cw * bins)
    hist = hist.reshape(n, ch * cw * bins).astype(np.float32)
    return hist / (np.linalg.norm(hist, axis=1, keepdims=True) + 1e-6)


def _block_mean(a: np.ndarray, k: int = 4) -> np.ndarray:
    """Means over k x k pixel blocks of (n, H, W[, C]) float32 images: sums of strided
    slices, which NumPy vectorises (a reduction over reshaped block axes does not)."""
    rows = functools.reduce(np.add, [a[:, i::k] for i in range(k)])
    return functools.reduce(np.add, [rows[:, :, j::k] for j in range(k)]) * np.float32(1 / k ** 2)


def _pixel_mean(a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """Per image and channel, the mean over the pixels of (n, P, C) ``a`` (or of a * b):
    einsum sums along the pixel axis far faster than ``mean(axis=1)`` on this layout."""
    total = np.einsum("npc->nc", a) if b is None else np.einsum("npc,npc->nc", a, b)
    return total * np.float32(1 / a.shape[1])


def _global_stats(f: np.ndarray, grey: np.ndarray) -> np.ndarray:
    """Per-image: RGB mean and std, grey gradient energy, saturation mean/std, local contrast."""
    n = len(f)
    flat = f.reshape(n, -1, 3)
    mean = _pixel_mean(flat)
    std = np.sqrt(np.maximum(_pixel_mean(flat, flat) - mean * mean, 0))
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    sat = (np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)).reshape(n, -1)
    sat_m = sat.mean(axis=1)
    sat_s = np.sqrt(np.maximum((sat * sat).mean(axis=1) - sat_m * sat_m, 0))
    grad = (np.abs(grey[:, 1:] - grey[:, :-1]).mean(axis=(1, 2))
            + np.abs(grey[:, :, 1:] - grey[:, :, :-1]).mean(axis=(1, 2)))
    # contrast per 4 x 4 block: its maximum flags small pasted patches (triggers)
    m1 = _block_mean(grey)
    m2 = _block_mean(grey * grey)
    local = np.sqrt(np.maximum(m2 - m1 * m1, 0)).reshape(n, -1)
    # pixel-scale (Nyquist) energy per 4 x 4 block: renders are band-limited by the camera
    # blur, a pasted high-contrast patch is not
    hf = np.zeros_like(grey)
    hf[:, 1:-1, 1:-1] = (np.abs(2 * grey[:, 1:-1, 1:-1] - grey[:, 1:-1, :-2] - grey[:, 1:-1, 2:])
                         + np.abs(2 * grey[:, 1:-1, 1:-1] - grey[:, :-2, 1:-1]
                                  - grey[:, 2:, 1:-1]))
    hf_ratio = _block_mean(hf).reshape(n, -1).max(axis=1)
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
    small = _block_mean(f).reshape(n, -1)
    mag, ang = _gradients(grey)  # shared by both cell sizes
    return np.hstack([_hog(mag, ang, 8, 9), _hog(mag, ang, 4, 8), small,
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
    return d, _kolmogorov_p(d, n, m)


def _kolmogorov_p(d: float, n: float, m: float) -> float:
    ne = math.sqrt(n * m / (n + m))
    lam = (ne + 0.12 + 0.11 / ne) * d
    if lam < 1e-3:
        return 1.0
    k = np.arange(1, 101)
    p = 2.0 * np.sum((-1.0) ** (k - 1) * np.exp(-2.0 * (k * lam) ** 2))
    return float(min(max(p, 0.0), 1.0))


def ks_2samp_weighted(a: np.ndarray, b: np.ndarray, wb: np.ndarray) -> tuple[float, float]:
    """KS of sample ``a`` against sample ``b`` weighted by ``wb`` (>= 0, any scale).

    D = sup |F_a - G_b| with G_b the weighted ECDF of b; the p-value is the Kolmogorov one
    of ``ks_2samp`` with b's size replaced by its effective size (sum w)^2 / sum w^2
    (Kish). Equal weights give exactly ``ks_2samp``.
    """
    a = np.sort(np.asarray(a, np.float64))
    order = np.argsort(np.asarray(b, np.float64), kind="stable")
    b = np.asarray(b, np.float64)[order]
    w = np.asarray(wb, np.float64)[order]
    if len(a) == 0 or len(b) == 0 or w.sum() <= 0:
        return 0.0, 1.0
    cum = np.concatenate([[0.0], np.cumsum(w) / w.sum()])
    allv = np.concatenate([a, b])
    d = float(np.max(np.abs(np.searchsorted(a, allv, "right") / len(a)
                            - cum[np.searchsorted(b, allv, "right")])))
    m_eff = float(w.sum() ** 2 / np.sum(w * w))
    return d, _kolmogorov_p(d, len(a), m_eff)
