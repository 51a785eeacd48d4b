"""Batch-level screen for correct-label triggers: each class of a batch as a whole, against
the trusted reference.

A clean-label backdoor (a trigger stamped on images of the target class, every label left
correct: a small patch, SIG's sine stripes, a blended pattern) gives the label screen nothing
to find and each poisoned image alone looks ordinary. What gives it away is that many images
of one class share the same added pattern, and the trusted reference does not.

Representation: the high-pass residual of each 32 x 32 RGB image (the image minus its 5 x 5
Gaussian blur, sigma 1, reflected border), L2-normalised: 3,072 values. A stamped or added
pattern shows in it at full strength whatever the image is, while scene content (edges of
signs and backgrounds at varying places) spreads over many directions.

Search, per class c of the batch (a spectral signature taken relative to the reference, in
the spirit of Tran et al. 2018 and SPECTRE's use of a clean covariance): with B the batch's
residuals of class c and R the reference's, find the direction v maximising

    lambda = sum_B (b . v)^2 - (n_B / n_R) sum_R (r . v)^2,

the energy the batch puts along v beyond what the same number of reference images puts
there, in units of images: a pattern shared by m images, making up a share rho of their
residual energy, gives lambda ~ m * rho. It is the top eigenvector of a symmetric matrix,
solved in the span of B (exactly up to ``max_exact`` images, else in a randomised subspace
of the batch's top directions).

Null, calibrated on the reference (``calibrate``): pseudo-batches of n images drawn from a
class's reference, each against the rest of that class; lambda_null(n) = 1 + k * sqrt(n)
with k the largest value measured over classes, sizes and draws. A class is flagged when
lambda >= ``margin`` * lambda_null(n_B).

Per image, in a flagged class: the projection on v (the trigger's direction, signed so the
batch's excess is positive) standardised by the reference class's projections; the
direction is then refined once as the mean residual of the images over ``z_min`` minus the
reference mean (a matched filter for the pattern itself), and images with z >= ``z_min`` on
it are held with ``TRIGGER_CLUSTER``. The report names each flagged class, its lambda and
threshold, the images held and the box where the recovered pattern's energy lies (where
the trigger is).

Measured with ``scripts/bench_ingest.py --attacks --cl-rates 0.03,0.015 --cl-targets all``
(reference of 600 renders per class, 2,016-image batches of 144 per class, each of the 14
classes the target in turn): at 3 % of the batch (60 images of one class) triangle 839 of
840 held, SIG 821 of 840, blend 840 of 840, and no clean image held as TRIGGER_CLUSTER (of
27,384); at 1.5 % (30 images) 418, 356 and 390 of 420, one clean image held (of 27,804);
a SIG or blend class missed at 1.5 % stays under its threshold as a whole.

What it cannot see: a pattern on too few images of a class to stand above the null (lambda
grows with the count, the null with its square root: at 3 % of a single-class batch of a
few hundred images the trigger is under it), and triggers that leave the residual alone
(a smooth colour shift is the distribution test's job). Stage 3's scans
(``cloud_train.backdoor``) work on a trained model's activations; this screen works on
pixels against trusted data, before any model exists, so it shares their idea (a spectral
signature per class) but not their code, which imports torch. NumPy and OpenCV only.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from roadshield_base.errors import ConfigError, DatasetError

REASON = "TRIGGER_CLUSTER"
SIDE = 32
_PAD = 2  # rows of reflected border each image gets in the blur stack


@dataclass
class TriggerScreenConfig:
    margin: float = 2.0       # lambda must reach margin x the reference's null curve
    z_min: float = 4.0        # per-image projection, in reference standard deviations
    min_class: int = 8        # classes with fewer batch images are not screened
    max_exact: int = 400      # above this many images of a class: randomised subspace
    subspace: int = 192       # its size
    max_ref: int = 256        # reference images per class compared with (seeded draw)
    calib_draws: int = 2      # pseudo-batches per class and size when calibrating
    seed: int = 0

    def check(self) -> None:
        if not self.margin >= 1.0 or not self.z_min > 0 or self.min_class < 4 \
                or self.max_exact < 16 or self.subspace < 16 or self.calib_draws < 1 \
                or self.max_ref < 16:
            raise ConfigError(f"trigger screen config {self} is out of range",
                              "use margin >= 1, z_min > 0, min_class >= 4, max_exact >= 16, "
                              "subspace >= 16, calib_draws >= 1, max_ref >= 16")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TriggerScreenConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def residuals(images: np.ndarray) -> np.ndarray:
    """(n, 3072) float32 unit-norm high-pass residuals of n x 32 x 32 x 3 uint8 RGB images."""
    import cv2

    x = np.asarray(images)
    if x.ndim != 4 or x.shape[1:] != (SIDE, SIDE, 3):
        raise DatasetError(f"the trigger screen needs n x 32 x 32 x 3 images, got {x.shape}",
                           "resize with screens.to_feature_size() first")
    n = len(x)
    if not n:
        return np.zeros((0, SIDE * SIDE * 3), np.float32)
    # the images stacked vertically, each with its own two reflected rows above and below:
    # one blur of the stack gives each image's own blur (a 5-tap kernel reaches 2 rows),
    # the same pixels as cv2.GaussianBlur on each image alone, in one call
    tall = np.empty((n, SIDE + 2 * _PAD, SIDE, 3), np.float32)
    tall[:, _PAD:_PAD + SIDE] = x
    for k in range(1, _PAD + 1):  # BORDER_REFLECT_101: rows 2, 1 above, 29, 30 below
        tall[:, _PAD - k] = x[:, k]
        tall[:, _PAD + SIDE - 1 + k] = x[:, SIDE - 1 - k]
    blur = cv2.GaussianBlur(tall.reshape(-1, SIDE, 3), (5, 5), 1.0,
                            borderType=cv2.BORDER_REFLECT_101).reshape(tall.shape)
    inner = slice(_PAD, _PAD + SIDE)
    r = np.subtract(tall[:, inner], blur[:, inner]).reshape(n, -1)
    r /= (np.sqrt(np.einsum("ij,ij->i", r, r)) + 1e-6)[:, None]
    return r


def contrast(b: np.ndarray, r: np.ndarray, cfg: TriggerScreenConfig
             ) -> tuple[float, np.ndarray]:
    """(lambda, unit direction v) maximising the batch's energy along v beyond the
    reference's, scaled to the batch's size (see the module doc)."""
    beta = len(b) / len(r)
    if len(b) > cfg.max_exact:  # a randomised subspace of the batch's top directions
        q = _subspace(b, cfg)
        bk, rk = b @ q, r @ q
        m = bk.T @ bk - beta * (rk.T @ rk)
        lam, vec = np.linalg.eigh((m + m.T) / 2)
        v = q @ vec[:, -1]
    else:
        # exactly, in the span of the batch: v = b^T a. With G = b b^T = L L^T (Cholesky)
        # and D = L^-1 b r^T the problem is the symmetric eigenproblem of
        # L^T L - beta D D^T in w = L^T a.
        g = (b @ b.T).astype(np.float64)
        g[np.diag_indices_from(g)] += 1e-6 * max(float(np.trace(g)) / len(g), 1e-12)
        chol = np.linalg.cholesky(g)
        d = np.linalg.solve(chol, (b @ r.T).astype(np.float64))
        m = chol.T @ chol - beta * (d @ d.T)
        lam, vec = np.linalg.eigh((m + m.T) / 2)
        v = b.T @ np.linalg.solve(chol.T, vec[:, -1]).astype(np.float32)
    return float(lam[-1]), (v / (np.linalg.norm(v) + 1e-12)).astype(np.float32)


def _subspace(b: np.ndarray, cfg: TriggerScreenConfig) -> np.ndarray:
    """Orthonormal (d, ``subspace``) basis of the batch's top directions (randomised range
    finder, Halko et al. 2011, two power iterations)."""
    rng = np.random.default_rng(cfg.seed)
    q = np.linalg.qr(b.T @ rng.standard_normal((len(b), cfg.subspace)).astype(np.float32))[0]
    for _ in range(2):
        q = np.linalg.qr(b.T @ (b @ q))[0]
    return q


_native_lock = threading.Lock()
_native_holder: list[threading.Thread] = []  # the thread whose context holds the settings


@contextlib.contextmanager
def single_thread_native() -> Iterator[None]:
    """A context holding BLAS and OpenCV to one thread each. The screens' matrices and
    images are small (a few thousand rows at most), the gate already runs them side by side
    on its own threads, and on a shared machine native helper threads cost far more than
    they give (measured on 2 busy cores: a 3,072 x 64 QR took 2 s with two BLAS threads,
    5 ms with one; a 2,016-image batch through the gate 4.5 CPU s against 1.4).

    The settings are process-wide, and threadpoolctl lets only one thread at a time change
    OpenBLAS's: while one thread's context holds them, a context opened in any thread does
    nothing (the gate opens one around all its threaded work)."""
    with _native_lock:
        stack = None if _native_holder else _hold_native_threads()
        if stack is not None:
            _native_holder.append(threading.current_thread())
    try:
        yield
    finally:
        if stack is not None:
            with _native_lock:
                stack.close()
                _native_holder.clear()


def _hold_native_threads() -> contextlib.ExitStack:
    import cv2

    stack = contextlib.ExitStack()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # scikit-learn's dependency; without it BLAS keeps its own setting
        pass
    else:
        stack.enter_context(threadpool_limits(1, user_api="blas"))
    stack.callback(cv2.setNumThreads, cv2.getNumThreads())
    cv2.setNumThreads(1)
    return stack


def _ref_subset(ref_labels: np.ndarray, c: int, cfg: TriggerScreenConfig) -> np.ndarray:
    """Indices of the reference images of class ``c`` the screen compares with: at most
    ``max_ref``, a seeded draw (the same in calibration and screening)."""
    idx = np.flatnonzero(ref_labels == c)
    if len(idx) > cfg.max_ref:
        idx = np.sort(np.random.default_rng([cfg.seed, int(c)]).choice(idx, cfg.max_ref,
                                                                      replace=False))
    return idx


def calibrate(ref_images: np.ndarray, ref_labels: np.ndarray,
              cfg: TriggerScreenConfig | None = None) -> dict[str, Any]:
    """The null curve's slope k from the reference alone: for each class, pseudo-batches of
    8, 16, 32, ... images (up to half the class) drawn from its reference images, each
    against at most ``max_ref`` of the rest; k is the largest (lambda - 1) / sqrt(n) seen.
    Returns {"k", "points": [[class, n, lambda], ...], "config"}.
    """
    cfg = cfg or TriggerScreenConfig()
    cfg.check()
    with single_thread_native():
        return _calibrate(ref_images, np.asarray(ref_labels, np.int64), cfg)


def _calibrate(ref_images: np.ndarray, labels: np.ndarray, cfg: TriggerScreenConfig
               ) -> dict[str, Any]:
    rng = np.random.default_rng(cfg.seed)
    points: list[list[float]] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        res = residuals(ref_images[idx])
        n = 8
        while n <= len(idx) // 2:
            for _ in range(cfg.calib_draws):
                perm = rng.permutation(len(idx))
                lam, _ = contrast(res[perm[:n]], res[perm[n:n + cfg.max_ref]], cfg)
                points.append([int(c), n, round(lam, 4)])
            n *= 2
    if not points:
        raise DatasetError("the reference has no class with 16 or more images, too few to "
                           "calibrate the trigger screen", "give the reference more images")
    k = max((lam - 1.0) / math.sqrt(n) for _, n, lam in points)
    return {"k": float(max(k, 0.0)), "points": points, "config": asdict(cfg)}


def null_lambda(k: float, n: int) -> float:
    return 1.0 + k * math.sqrt(n)


def _box(v: np.ndarray, share: float = 0.5) -> list[int]:
    """[row0, col0, row1, col1] (exclusive ends) of the smallest box of pixels, taken from
    the strongest down, that holds ``share`` of the pattern's energy."""
    e = (v.reshape(SIDE, SIDE, 3).astype(np.float64) ** 2).sum(axis=2)
    order = np.argsort(e, axis=None)[::-1]
    cum = np.cumsum(e.ravel()[order])
    top = order[:int(np.searchsorted(cum, share * cum[-1])) + 1]
    rows, cols = np.unravel_index(top, e.shape)
    return [int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1]


class TriggerScreen:
    """The screen fitted to a reference: its images and labels (n x 32 x 32 x 3 uint8 RGB)
    and the calibrated null slope ``k``. Reference residuals are computed per class when a
    batch first needs them and kept for the next batch."""

    def __init__(self, ref_images: np.ndarray, ref_labels: np.ndarray, k: float,
                 cfg: TriggerScreenConfig | None = None) -> None:
        self.cfg = cfg or TriggerScreenConfig()
        self.cfg.check()
        self.ref_images = ref_images
        self.ref_labels = np.asarray(ref_labels, np.int64)
        self.k = float(k)
        self._res: dict[int, np.ndarray] = {}

    def _reference(self, c: int) -> np.ndarray:
        if c not in self._res:
            self._res[c] = residuals(self.ref_images[_ref_subset(self.ref_labels, c, self.cfg)])
        return self._res[c]

    def prepare(self, labels: np.ndarray) -> None:
        """Compute the reference residuals of every class ``screen`` would compare a batch
        with these labels against, ahead of the batch (the same arrays it would compute)."""
        ref_counts = np.bincount(self.ref_labels)
        labels = np.asarray(labels, np.int64).reshape(-1)
        counts = np.bincount(labels[(labels >= 0) & (labels < len(ref_counts))],
                             minlength=len(ref_counts))
        with single_thread_native():
            for c in np.flatnonzero((counts >= self.cfg.min_class)
                                    & (ref_counts >= 2 * self.cfg.min_class)):
                self._reference(int(c))

    def screen(self, images: np.ndarray, labels: np.ndarray
               ) -> tuple[np.ndarray, dict[str, Any]]:
        """Screen each class of a batch (n x 32 x 32 x 3 uint8 RGB, n labels) against the
        reference's images of that class. Returns (held: bool per image, report with
        "classes" (lambda, threshold, images held, trigger box per screened class),
        "flagged" (the classes found carrying a trigger) and "null_k")."""
        with single_thread_native():
            return self._screen(images, labels)

    def _screen(self, images: np.ndarray, labels: np.ndarray
                ) -> tuple[np.ndarray, dict[str, Any]]:
        cfg = self.cfg
        labels = np.asarray(labels, np.int64)
        held = np.zeros(len(labels), bool)
        report: dict[str, Any] = {"classes": [], "flagged": [], "null_k": round(self.k, 4)}
        if not len(labels):
            return held, report
        ref_counts = np.bincount(self.ref_labels, minlength=int(labels.max()) + 1)
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)
            # too few images to tell a shared pattern from chance (the other screens still
            # run), or a class the reference lacks (the label screen holds those)
            if len(idx) < cfg.min_class or c < 0 or ref_counts[c] < 2 * cfg.min_class:
                continue
            # one class at a time: each image's residual is its own, and a class's arrays
            # are a few MB where the whole batch's would be tens
            b, r = residuals(images[idx]), self._reference(int(c))
            lam, v = contrast(b, r, cfg)
            thr = cfg.margin * null_lambda(self.k, len(idx))
            row: dict[str, Any] = {"class": int(c), "n": len(idx), "lambda": round(lam, 3),
                                   "threshold": round(thr, 3), "flagged": lam >= thr,
                                   "held": 0}
            if lam >= thr:
                z = _zscores(b, r, v)
                strong = z >= cfg.z_min
                if strong.sum() >= 2:  # refine: the strongest images' mean residual
                    pattern = b[strong].mean(axis=0) - r.mean(axis=0)
                    v = pattern / (np.linalg.norm(pattern) + 1e-12)
                    z = _zscores(b, r, v)
                hit = z >= cfg.z_min
                held[idx[hit]] = True
                row.update(held=int(hit.sum()), trigger_box=_box(v))
                report["flagged"].append(int(c))
            report["classes"].append(row)
        return held, report


def _zscores(b: np.ndarray, r: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Batch projections on v, standardised by the reference's, signed so the batch's
    excess (its mean beyond the reference's) is positive."""
    pb, pr = b @ v, r @ v
    mu, sd = float(pr.mean()), float(pr.std()) + 1e-9
    z = (pb - mu) / sd
    return z if pb.mean() >= mu else -z
