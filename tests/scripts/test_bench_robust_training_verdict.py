"""The robust-training benchmark's verdict: which trainers meet the target, and the line that
says so (the model with the highest robust accuracy need not be one of them)."""

from __future__ import annotations

from types import ModuleType

import pytest
from script_loader import load_script


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_script("bench_robust_training")


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
