"""The robust-training benchmark's verdict: which trainers meet the target, and the line that
says so (the model with the highest robust accuracy need not be one of them)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType
from unittest import mock

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_robust_training.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_robust_training", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    with mock.patch.dict(os.environ):  # the script sets thread variables when imported
        spec.loader.exec_module(mod)
    return mod


def row(trainer: str, clean: float, robust: float, sane: bool = True) -> dict:
    return {"trainer": trainer, "clean_acc": clean, "robust_acc": robust, "sanity_passed": sane}


def test_a_robust_model_below_the_clean_bar_does_not_hide_the_one_that_meets_it(bench) -> None:
    v = bench.verdict([row("standard", 0.995, 0.015), row("pgd_at", 0.857, 0.775),
                       row("trades", 0.95, 0.74)])
    assert v["target_met"] and v["trainers_meeting_target"] == ["trades"]
    assert v["best_robust_trainer"] == "pgd_at"
    text = bench.verdict_text(v)
    assert "met by trades;" in text and "highest robust accuracy: pgd_at (robust 77.5 %" in text


def test_a_failed_sanity_check_or_a_miss_is_not_met(bench) -> None:
    v = bench.verdict([row("fast_at", 0.97, 0.73, sane=False), row("standard", 0.99, 0.01)])
    assert not v["target_met"] and v["trainers_meeting_target"] == []
    assert bench.verdict_text(v).startswith("Target (robust >= 60% with clean >= 90%): not met;")
