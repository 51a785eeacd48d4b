"""Fit the adversarial-input detectors of ``edge_runtime.detectors`` on an exported model.

Everything is scored by the exported ONNX file through ``OnnxRuntimeRunner`` and the same
NumPy code the edge runs, so the thresholds hold for what the device computes (up to the
execution provider's rounding; CPU is used by default).

* Mahalanobis (Lee et al. 2018): class means and one tied covariance of the penultimate
  features of the *fit* images (pooled within-class, divided by N), shrunk towards a
  scaled identity, ``(1 - a) S + a (tr S / D) I`` with ``a = shrinkage``, so it is
  positive definite even when N < D; the precision is its inverse.
* Thresholds: on *calibration* images (disjoint from the fit images) each detector's
  threshold is ``threshold_at_fpr(scores, fpr)``, so at most ``floor(fpr * n)`` clean
  calibration scores exceed it.
* ``fit_from_dataset`` takes both parts from the **train** split of a GTSRB-layout folder
  (the test split is never read), per class, keeping each GTSRB track (the ``TTTTT_`` file
  name prefix: up to 30 frames of one physical sign) whole on one side, so near-identical
  frames cannot sit on both. Classes with fewer than two tracks are split image by image.
  The classifier itself saw these images in training, so clean scores on unseen images
  run somewhat higher: expect a deployed false-positive rate above ``fpr``.
* ``write_detectors`` stores the metadata object under ``metadata_props["detectors"]``,
  keeping every other entry. The file's sha256 changes: sign bundles and TensorRT engines
  made from the old file must be made again.

    roadshield distill detectors --model MODEL.onnx --data DATA_DIR [--fpr 0.05]
        [--calib-share 0.2] [--calibrate-source URI [--calibrate-frames N]] [--seed 0]
        [--limit-per-class N] [--detectors squeeze,mahalanobis]
        [--squeezers bitdepth:bits=5,median:k=3] [--dry-run]
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from distill.export import write_metadata
from edge_runtime.detectors import (
    DEFAULT_SQUEEZERS,
    DETECTOR_NAMES,
    MAHALANOBIS,
    METADATA_KEY,
    SECTIONS,
    SQUEEZE,
    DetectorSet,
    FeatureSqueezing,
    MahalanobisDetector,
    detectors_from_object,
    detectors_to_object,
    parse_detectors,
)
from edge_runtime.model_info import ModelInfo, read_model_info
from edge_runtime.runners.base import BaseRunner
from edge_runtime.runners.onnxruntime_runner import OnnxRuntimeRunner
from roadshield_base.errors import ConfigError, DatasetError

log = logging.getLogger(__name__)

DEFAULT_SHRINKAGE = 0.01
DEFAULT_FPR = 0.05
#: fitting runs on the CPU unless told otherwise: a few thousand crops take seconds there,
#: and TensorRT would build an engine for every new batch shape
DEFAULT_PROVIDERS = ("cpu",)


# --- the statistics ------------------------------------------------------------------------

def fit_mahalanobis(features: np.ndarray, labels: np.ndarray | Sequence[int], num_classes: int,
                    shrinkage: float = DEFAULT_SHRINKAGE) -> tuple[np.ndarray, np.ndarray]:
    """(means float32 (C, D), precision float32 (D, D)) of (N, D) features.

    Tied covariance pooled within classes, shrunk towards ``tr(S) / D * I`` by ``shrinkage``
    (in [0, 1)), inverted in float64. ConfigError when a class has no sample, the features
    are not finite or do not vary, or the result is not positive definite (raise shrinkage).
    """
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if f.ndim != 2 or f.shape[0] < 1 or f.shape[1] < 1:
        raise ConfigError(f"features of shape {f.shape} are not (N, D)",
                          "pass the model's features output for the fit images")
    if y.shape != (f.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(f"labels of shape {y.shape} and dtype {y.dtype} for {f.shape[0]} "
                          "feature rows", "pass one integer class id per row")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes={num_classes!r}", "pass the model's class count")
    if y.min() < 0 or y.max() >= num_classes:
        raise ConfigError(f"labels run {y.min()}..{y.max()}, outside 0..{num_classes - 1}",
                          "labels index the model's classes")
    if isinstance(shrinkage, bool) or not 0.0 <= float(shrinkage) < 1.0:
        raise ConfigError(f"shrinkage={shrinkage!r} is not in [0, 1)", "e.g. 0.01")
    if not np.isfinite(f).all():
        raise ConfigError("the features hold NaN or infinity", "check the model and images")
    counts = np.bincount(y, minlength=num_classes)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        raise ConfigError(f"classes {empty.tolist()[:10]} have no fit images",
                          "every class needs a mean: give each at least one fit image")
    onehot = np.zeros((len(y), num_classes))
    onehot[np.arange(len(y)), y] = 1.0
    means = (onehot.T @ f) / counts[:, None]
    centred = f - means[y]
    cov = centred.T @ centred / len(y)
    d = f.shape[1]
    scale = float(np.trace(cov)) / d
    if not scale > 0.0:
        raise ConfigError("the features do not vary within classes",
                          "fit on more (and more varied) images")
    cov = (1.0 - shrinkage) * cov + shrinkage * scale * np.eye(d)
    try:
        chol = np.linalg.cholesky(cov)
        inv_chol = np.linalg.inv(chol)
    except np.linalg.LinAlgError as err:
        raise ConfigError("the pooled covariance is singular", "raise shrinkage, e.g. 0.01"
                          ) from err
    precision = inv_chol.T @ inv_chol
    precision = ((precision + precision.T) / 2.0).astype(np.float32)
    try:
        np.linalg.cholesky(precision.astype(np.float64))
    except np.linalg.LinAlgError as err:
        raise ConfigError("the precision is not positive definite in float32",
                          "raise shrinkage, e.g. 0.05") from err
    return means.astype(np.float32), precision


def threshold_at_fpr(clean_scores: np.ndarray | Sequence[float], fpr: float = DEFAULT_FPR
                     ) -> float:
    """The threshold at which at most ``floor(fpr * n)`` of n clean scores are flagged.

    Flagging is ``score > threshold``, so the threshold is the (n - m)-th smallest score,
    m = floor(fpr * n) (the "inverted CDF" (1 - fpr) quantile): exactly m scores lie above
    it when the scores are distinct. Tie rule: scores equal to the threshold are not
    flagged, so ties at it make the calibration rate fall below ``fpr``, never above.
    """
    s = np.asarray(clean_scores, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ConfigError(f"clean scores of shape {s.shape}", "pass a non-empty 1-D array")
    if not np.isfinite(s).all():
        raise ConfigError("some clean scores are not finite",
                          "a clean image scored inf: its logits or features are not finite")
    if isinstance(fpr, bool) or not 0.0 < float(fpr) < 1.0:
        raise ConfigError(f"fpr={fpr!r} is not in (0, 1)", "e.g. 0.05")
    n = s.size
    # the epsilon keeps fpr * n = 5.000000000001 or 4.99999999 from moving m by one
    m = min(int(np.floor(float(fpr) * n + 1e-9)), n - 1)
    return float(np.sort(s)[n - 1 - m])


# --- running the model ---------------------------------------------------------------------

def to_batch(images: np.ndarray) -> np.ndarray:
    """N x S x S x 3 uint8 RGB -> float32 N x 3 x S x S in [0, 1] (``v / 255``, as the edge
    preprocess); a float32 N x 3 x S x S batch passes through."""
    a = np.asarray(images)
    if a.dtype == np.uint8 and a.ndim == 4 and a.shape[3] == 3:
        return np.divide(a.transpose(0, 3, 1, 2), np.float32(255.0), dtype=np.float32)
    if a.dtype == np.float32 and a.ndim == 4 and a.shape[1] == 3:
        return a
    raise ConfigError(f"images of shape {a.shape} and dtype {a.dtype}",
                      "pass N x S x S x 3 uint8 RGB (as load_gtsrb returns) or float32 "
                      "N x 3 x S x S in [0, 1]")


def _chunks(images: np.ndarray, batch: int, desc: str, progress: bool
            ) -> Iterator[np.ndarray]:
    starts = range(0, len(images), batch)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress or len(starts) < 2,
                      leave=False, file=sys.stderr):
        yield to_batch(images[start:start + batch])


def _check_images(images: np.ndarray, info: ModelInfo, what: str) -> None:
    side = info.input_size
    shape = np.shape(images)
    if len(shape) != 4 or not len(images) or (side, side) not in (tuple(shape[1:3]),
                                                                  tuple(shape[2:4])):
        raise ConfigError(f"{what} images have shape {shape}; the model takes {side} x {side}",
                          f"load them at size {side} (load_gtsrb(..., size={side}))")


def _features(runner: BaseRunner, info: ModelInfo, images: np.ndarray, batch: int,
              progress: bool) -> np.ndarray:
    name = info.features_name
    assert name is not None  # checked by the caller
    parts = [runner.infer({info.input_name: x})[name]
             for x in _chunks(images, batch, "fit features", progress)]
    return np.concatenate(parts).astype(np.float32)


def _scores(runner: BaseRunner, info: ModelInfo, detectors: DetectorSet, images: np.ndarray,
            batch: int, progress: bool) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {n: [] for n in detectors.names}
    for x in _chunks(images, batch, "calibration scores", progress):
        _, scores = detectors.infer(runner, x, info.input_name, info.output_name)
        for n, v in scores.items():
            parts[n].append(v)
    return {n: np.concatenate(v) for n, v in parts.items()}


def fit_detectors(onnx_path: str | os.PathLike[str], fit_images: np.ndarray,
                  fit_labels: np.ndarray | Sequence[int], calib_images: np.ndarray,
                  fpr: float = DEFAULT_FPR, batch: int = 256, *,
                  names: str | Sequence[str] = DETECTOR_NAMES,
                  squeezers: str | Sequence[str] = DEFAULT_SQUEEZERS,
                  shrinkage: float = DEFAULT_SHRINKAGE,
                  providers: Sequence[str] | None = DEFAULT_PROVIDERS,
                  progress: bool = True) -> dict[str, Any]:
    """The ``detectors`` metadata object for the model at ``onnx_path``.

    fit_images / calib_images: N x S x S x 3 uint8 RGB or float32 N x 3 x S x S, S the
    model's input size, disjoint sets; fit_labels: class ids of the fit images (used by
    Mahalanobis only). Mahalanobis means / precision come from the fit images' features;
    each detector's threshold is ``threshold_at_fpr`` of its calibration scores. ``batch``
    images go through the runner at a time (times 1 + the squeezer count for squeezing).
    """
    wanted = parse_detectors(names)
    if not wanted:
        raise ConfigError("no detectors to fit", f"name some of {', '.join(DETECTOR_NAMES)}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"batch={batch!r}", "use a positive number of images, e.g. 256")
    info = read_model_info(onnx_path)
    if MAHALANOBIS in wanted and info.features_name is None:
        raise ConfigError(f"{onnx_path} has no features output, so Mahalanobis cannot be fit",
                          "export the model again (`roadshield distill export`; a model with "
                          "embed gets the 'features' output), or fit squeeze only")
    _check_images(calib_images, info, "calibration")
    squeeze = FeatureSqueezing(squeezers) if SQUEEZE in wanted else None
    with OnnxRuntimeRunner(onnx_path, providers=list(providers) if providers else None) \
            as runner:
        mahalanobis = None
        if MAHALANOBIS in wanted:
            _check_images(fit_images, info, "fit")
            labels = np.asarray(fit_labels)
            if labels.shape != (len(fit_images),):
                raise ConfigError(f"{len(fit_images)} fit images but labels of shape "
                                  f"{labels.shape}", "pass one class id per fit image")
            feats = _features(runner, info, fit_images, batch, progress)
            means, precision = fit_mahalanobis(feats, labels, info.num_classes, shrinkage)
            mahalanobis = MahalanobisDetector(means, precision)
        uncalibrated = DetectorSet(squeeze, mahalanobis,
                                   features_name=info.features_name or "features")
        scores = _scores(runner, info, uncalibrated, calib_images, batch, progress)
    thresholds = {n: threshold_at_fpr(s, fpr) for n, s in scores.items()}
    for n, s in scores.items():
        log.info("%s: threshold %.6g flags %.2f%% of %d calibration images", n, thresholds[n],
                 100.0 * float(np.mean(s > thresholds[n])), len(s))
    if squeeze is not None:
        squeeze.threshold = thresholds[SQUEEZE]
    if mahalanobis is not None:
        mahalanobis.threshold = thresholds[MAHALANOBIS]
    return detectors_to_object(DetectorSet(squeeze, mahalanobis,
                                           features_name=uncalibrated.features_name), fpr)


# --- writing -------------------------------------------------------------------------------

def write_detectors(onnx_path: str | os.PathLike[str], meta_obj: dict[str, Any]) -> Path:
    """Re-save ``onnx_path`` with ``metadata_props["detectors"] = json(meta_obj)``.

    The object is first checked against the model (``detectors_from_object`` for the
    sections it holds, features output and class count included); every other metadata
    entry, the graph and the file's permissions are kept; the write is atomic.
    """

    path = Path(onnx_path)
    info = read_model_info(path)
    if not isinstance(meta_obj, dict):
        raise ConfigError(f"the detectors metadata is a {type(meta_obj).__name__}, not a dict",
                          "pass what fit_detectors returned")
    present = [n for n, key in SECTIONS.items() if key in meta_obj]
    if not present:
        raise ConfigError("the detectors metadata holds no detector",
                          f"it needs {' or '.join(SECTIONS.values())}")
    detectors_from_object(meta_obj, info.features_name, present, info.metadata)
    return write_metadata(path, METADATA_KEY, json.dumps(meta_obj, separators=(",", ":")))


# --- a GTSRB-layout dataset ----------------------------------------------------------------

def track_clusters(labels: np.ndarray, paths: Sequence[Path]) -> np.ndarray:
    """A cluster id per image: one per (class, GTSRB track) where the class's file names
    give at least two tracks (``TTTTT_FFFFF.ppm``), else one per image."""
    labels = np.asarray(labels)
    keys: list[tuple[int, str]] = []
    for i, (label, path) in enumerate(zip(labels.tolist(), paths, strict=True)):
        stem = Path(path).stem
        track = stem.split("_", 1)[0] if "_" in stem else f"#{i}"
        keys.append((int(label), track))
    tracks_per_class: dict[int, set[str]] = {}
    for label, track in keys:
        tracks_per_class.setdefault(label, set()).add(track)
    final = [(label, track if len(tracks_per_class[label]) >= 2 else f"#{i}")
             for i, (label, track) in enumerate(keys)]
    ids: dict[tuple[int, str], int] = {}
    return np.array([ids.setdefault(k, len(ids)) for k in final], dtype=np.int64)


def split_fit_calibration(labels: np.ndarray, paths: Sequence[Path], calib_share: float = 0.2,
                          seed: int = 0, limit_per_class: int | None = None
                          ) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, calibration indices), disjoint, per class, tracks kept whole
    (``track_clusters``), seeded. ``limit_per_class`` caps each class at about that many
    images, ``calib_share`` of them for calibration."""
    from cloud_train.splits.split import cluster_split

    if isinstance(calib_share, bool) or not 0.0 < float(calib_share) < 1.0:
        raise ConfigError(f"calib_share={calib_share!r} is not in (0, 1)", "e.g. 0.2")
    if limit_per_class is not None and (isinstance(limit_per_class, bool)
                                        or not isinstance(limit_per_class, int)
                                        or limit_per_class < 2):
        raise ConfigError(f"limit_per_class={limit_per_class!r}",
                          "use None (every image) or an integer >= 2")
    labels = np.asarray(labels, dtype=np.int64)
    split, _ = cluster_split(labels, track_clusters(labels, paths),
                             {"fit": 1.0 - float(calib_share), "calibration": float(calib_share)},
                             seed=seed)
    fit, cal = np.flatnonzero(split == 0), np.flatnonzero(split == 1)
    if limit_per_class is not None:
        rng = np.random.default_rng(seed)
        n_cal = max(1, round(limit_per_class * float(calib_share)))
        fit = _cap_per_class(fit, labels, limit_per_class - n_cal, rng)
        cal = _cap_per_class(cal, labels, n_cal, rng)
    return fit, cal


def _cap_per_class(idx: np.ndarray, labels: np.ndarray, cap: int,
                   rng: np.random.Generator) -> np.ndarray:
    """At most ``cap`` random members of ``idx`` per class, in index order."""
    keep = [rng.permutation(idx[labels[idx] == c])[:cap] for c in np.unique(labels[idx])]
    return np.sort(np.concatenate(keep)) if keep else idx


def fit_from_dataset(onnx_path: str | os.PathLike[str], data_dir: str | os.PathLike[str],
                     calib_share: float = 0.2, fpr: float = DEFAULT_FPR, seed: int = 0,
                     limit_per_class: int | None = None, *, batch: int = 256,
                     names: str | Sequence[str] = DETECTOR_NAMES,
                     squeezers: str | Sequence[str] = DEFAULT_SQUEEZERS,
                     shrinkage: float = DEFAULT_SHRINKAGE, crop_roi: bool = False,
                     providers: Sequence[str] | None = DEFAULT_PROVIDERS,
                     calib_crops: np.ndarray | None = None,
                     progress: bool = True) -> dict[str, Any]:
    """``fit_detectors`` on the train split of the GTSRB-layout folder ``data_dir``, split
    by ``split_fit_calibration``; images are loaded at the model's input size (``crop_roi``
    as for training). The dataset's class names must be the model's.

    calib_crops: clean crops as the device cuts them (``distill.stream.clean_crops``, float32
    N x 3 x S x S). When given, the whole train split fits Mahalanobis and the thresholds
    are set on these crops, the distribution the device will see (dataset images are
    cleaner than a camera's crops, so thresholds set on them flag many clean crops)."""
    from cloud_train.gtsrb import load_gtsrb

    info = read_model_info(onnx_path)
    data = load_gtsrb(data_dir, "train", size=info.input_size, crop_roi=crop_roi,
                      progress=progress)
    if tuple(data.class_names) != info.class_names:
        raise DatasetError(f"{data_dir} names {len(data.class_names)} classes, the model "
                           f"{info.num_classes}, or in another order",
                           "fit on the dataset the model was trained on")
    if calib_crops is not None:
        fit = np.arange(len(data.labels))
        if limit_per_class is not None:
            fit = _cap_per_class(fit, data.labels, limit_per_class, np.random.default_rng(seed))
        log.info("fitting on %d images (train split of %s), calibrating on %d stream crops",
                 len(fit), data_dir, len(calib_crops))
        return fit_detectors(onnx_path, data.images[fit], data.labels[fit], calib_crops, fpr,
                             batch, names=names, squeezers=squeezers, shrinkage=shrinkage,
                             providers=providers, progress=progress)
    fit, cal = split_fit_calibration(data.labels, data.paths, calib_share, seed,
                                     limit_per_class)
    if not len(cal) or not len(fit):
        raise DatasetError(f"the train split of {data_dir} gives {len(fit)} fit and "
                           f"{len(cal)} calibration images",
                           "use a larger dataset or another calib_share")
    log.info("fitting on %d images, calibrating on %d (train split of %s)", len(fit), len(cal),
             data_dir)
    return fit_detectors(onnx_path, data.images[fit], data.labels[fit], data.images[cal],
                         fpr, batch, names=names, squeezers=squeezers, shrinkage=shrinkage,
                         providers=providers, progress=progress)
