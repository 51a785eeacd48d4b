"""The audit recomputes reported metrics from stored predictions and flags any mismatch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cloud_train.splits.audit import audit, compute_metrics, write_metrics, write_predictions
from roadshield_base.errors import DatasetError


@pytest.fixture()
def files(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 6, 400)
    p = np.where(rng.random(400) < 0.8, y, rng.integers(0, 6, 400))
    pred = tmp_path / "predictions.json"
    write_predictions(pred, [f"id{i}" for i in range(400)], y, p, "a" * 64, 6)
    met = tmp_path / "metrics.json"
    write_metrics(met, pred)
    return pred, met


def test_numpy_metrics_agree_with_sklearn() -> None:
    from sklearn.metrics import accuracy_score, f1_score

    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, 300)
    p = rng.integers(0, 5, 300)
    m = compute_metrics(y, p, 5)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert m["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))


def test_honest_report_passes(files: tuple[Path, Path]) -> None:
    rep = audit(*files)
    assert rep.ok, rep.mismatches
    assert 0.7 < rep.recomputed["accuracy"] < 0.9


def test_inflated_metric_is_caught(files: tuple[Path, Path]) -> None:
    pred, met = files
    m = json.loads(met.read_text())
    m["accuracy"] += 0.05
    m["per_class_accuracy"]["2"] = 1.0
    met.write_text(json.dumps(m))
    rep = audit(pred, met)
    assert not rep.ok
    assert any(x.startswith("accuracy") for x in rep.mismatches)
    assert any(x.startswith("per_class_accuracy.2") for x in rep.mismatches)


def test_edited_predictions_are_caught(files: tuple[Path, Path]) -> None:
    pred, met = files
    data = json.loads(pred.read_text())
    for r in data["rows"]:
        r["prediction"] = r["label"]  # make the stored predictions match the report... or not
    pred.write_text(json.dumps(data))
    rep = audit(pred, met)
    assert not rep.ok
    assert any("predictions_sha256" in x for x in rep.mismatches)
    assert any(x.startswith("accuracy") for x in rep.mismatches)


def test_unreadable_predictions_raise(tmp_path: Path) -> None:
    bad = tmp_path / "p.json"
    bad.write_text('{"rows": [{"label": "x"}]}')
    with pytest.raises(DatasetError):
        audit(bad, bad)
