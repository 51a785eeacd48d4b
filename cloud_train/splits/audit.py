"""Stored predictions next to reported metrics, and an audit that recomputes them.

predictions file (JSON): {"model_sha256", "n_classes", "rows": [{"id", "label",
"prediction"}, ...]}. metrics file (JSON): the reported numbers plus "predictions_sha256"
and "model_sha256". ``audit`` recomputes accuracy, macro recall, macro F1 and per-class
accuracy from the predictions with scikit-learn (an implementation independent of the one
that produced the report) and lists every disagreement.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from roadshield_base.errors import DatasetError
from roadshield_base.fileio import atomic_write_json, file_sha256

TOLERANCE = 1e-9


def compute_metrics(labels: Sequence[int], predictions: Sequence[int],
                    n_classes: int) -> dict[str, Any]:
    """accuracy, macro_recall, macro_f1 (over classes present in labels or predictions),
    per_class_accuracy (recall per present label, keyed by str(class)), n. Plain numpy."""
    y = np.asarray(labels, np.int64)
    p = np.asarray(predictions, np.int64)
    cm = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(cm, (y, p), 1)
    tp = np.diag(cm).astype(float)
    support = cm.sum(1).astype(float)
    predicted = cm.sum(0).astype(float)
    present = (support > 0) | (predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {"n": len(y), "accuracy": float(tp.sum() / max(len(y), 1)),
            "macro_recall": float(recall[present].mean()) if present.any() else 0.0,
            "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
            "per_class_accuracy": {str(c): float(recall[c]) for c in np.flatnonzero(support)}}


def write_predictions(path: str | os.PathLike[str], ids: Sequence[str], labels: Sequence[int],
                      predictions: Sequence[int], model_sha256: str, n_classes: int) -> str:
    """Store the final evaluation's predictions; returns the file's sha256."""
    if not len(ids) == len(labels) == len(predictions):
        raise DatasetError(f"{len(ids)} ids, {len(labels)} labels, {len(predictions)} "
                           "predictions", "give one of each per sample")
    rows = [{"id": str(i), "label": int(y), "prediction": int(p)}
            for i, y, p in zip(ids, labels, predictions, strict=True)]
    atomic_write_json(path, {"model_sha256": model_sha256, "n_classes": int(n_classes),
                             "rows": rows})
    return file_sha256(path)


def write_metrics(path: str | os.PathLike[str], predictions_path: str | os.PathLike[str],
                  metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the reported metrics (computed from the predictions unless given) with the
    predictions' digest and model digest."""
    pred = _load(predictions_path)
    if metrics is None:
        metrics = compute_metrics([r["label"] for r in pred["rows"]],
                                  [r["prediction"] for r in pred["rows"]], pred["n_classes"])
    out = dict(metrics, predictions_sha256=file_sha256(predictions_path),
               model_sha256=pred["model_sha256"])
    atomic_write_json(path, out)
    return out


def _load(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
        for r in data["rows"]:
            int(r["label"]), int(r["prediction"])
        int(data["n_classes"])
        str(data["model_sha256"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DatasetError(f"cannot read predictions {path}: {err}",
                           "point at a file written by write_predictions") from err
    return data


@dataclass
class AuditReport:
    ok: bool
    mismatches: list[str] = field(default_factory=list)
    recomputed: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "mismatches": self.mismatches, "recomputed": self.recomputed}


def _recompute(y: np.ndarray, p: np.ndarray) -> dict[str, Any]:
    from sklearn.metrics import (  # type: ignore[import-untyped]
        accuracy_score,
        f1_score,
        recall_score,
    )

    labels = np.union1d(y, p)
    per = recall_score(y, p, labels=np.unique(y), average=None, zero_division=0)
    return {"n": len(y), "accuracy": float(accuracy_score(y, p)),
            "macro_recall": float(recall_score(y, p, labels=labels, average="macro",
                                               zero_division=0)),
            "macro_f1": float(f1_score(y, p, labels=labels, average="macro", zero_division=0)),
            "per_class_accuracy": {str(c): float(r) for c, r in zip(np.unique(y), per,
                                                                    strict=True)}}


def audit(predictions_path: str | os.PathLike[str],
          metrics_path: str | os.PathLike[str]) -> AuditReport:
    """Recompute the metrics from the stored predictions and compare with the report."""
    pred = _load(predictions_path)
    try:
        reported = json.loads(Path(metrics_path).read_text())
    except (OSError, ValueError) as err:
        raise DatasetError(f"cannot read metrics {metrics_path}: {err}",
                           "point at the metrics JSON of the evaluation") from err
    y = np.array([int(r["label"]) for r in pred["rows"]], np.int64)
    p = np.array([int(r["prediction"]) for r in pred["rows"]], np.int64)
    mine = _recompute(y, p)
    bad: list[str] = []
    digest = file_sha256(predictions_path)
    if reported.get("predictions_sha256") not in (None, digest):
        bad.append(f"predictions_sha256: reported {reported['predictions_sha256']}, "
                   f"file is {digest}")
    if reported.get("model_sha256") not in (None, pred["model_sha256"]):
        bad.append(f"model_sha256: reported {reported['model_sha256']}, predictions are for "
                   f"{pred['model_sha256']}")

    def compare(key: str, theirs: Any, ours: Any) -> None:
        if isinstance(ours, dict):
            if not isinstance(theirs, dict):
                bad.append(f"{key}: reported {theirs!r}, expected a table")
                return
            for k in sorted(set(ours) | set(theirs)):
                compare(f"{key}.{k}", theirs.get(k), ours.get(k))
        elif theirs is None or ours is None or not isinstance(theirs, (int, float)) \
                or abs(float(theirs) - float(ours)) > TOLERANCE:
            bad.append(f"{key}: reported {theirs!r}, recomputed {ours!r}")

    for key, ours in mine.items():
        if key in reported:
            compare(key, reported[key], ours)
    if not any(k in reported for k in mine):
        bad.append("the metrics file reports none of: " + ", ".join(mine))
    return AuditReport(not bad, bad, mine)
