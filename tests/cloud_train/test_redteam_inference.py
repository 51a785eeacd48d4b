"""``roadshield redteam inference``: the targets' verdicts, and a tiny end-to-end run whose
figures re-check from what it wrote."""

from __future__ import annotations

import json

import pytest

from cloud_train.redteam_inference_report import check_targets, markdown, text_table
from edge_runtime.scoring import attacker_encounters


def _fig(success, won=0, of=10):
    return {"sightings": 100, "success": success, "accuracy": 0.0, "read_as": {},
            "encounters": {"stickered": of, "attacker_action": won}}


def _row(name, clean, targeted, adaptive, ms=1.0, untargeted=1.0, won=0):
    return {"stack": name, "clean_accuracy": clean, "clean_abstain_rate": 0.0,
            "clean_encounters_right": 14, "clean_encounters": 14, "certified_accuracy": None,
            "targeted": _fig(targeted, won), "untargeted": _fig(untargeted),
            "adaptive": _fig(adaptive, won), "ms_per_crop": ms, "cost_ratio": ms}


def _result(*defended):
    bare = _row("undefended", 1.0, 0.95, 0.95, won=9)
    return {"scale": "tiny", "seed": 0, "sign": "stop", "target": "priority_road",
            "stacks": [bare, *defended],
            "attacks": {"targeted": {"success": 0.9, "confident": 0.8},
                        "blackbox": {"success": 0.1, "queries": 100, "queries_to_half": None}}}


def test_the_best_stack_stops_the_sticker_and_keeps_the_most_clean_accuracy():
    # b is safer but loses 5 points; c keeps everything but stops nothing; a stops the
    # sticker within the targets and keeps clean accuracy: a is the best
    res = _result(_row("a", 0.99, 0.02, 0.08), _row("b", 0.95, 0.0, 0.0),
                  _row("c", 1.0, 0.9, 0.95))
    check_targets(res)
    assert res["best_stack"] == "a" and res["all_targets_met"], res["missed"]


def test_a_stack_that_stops_nothing_is_never_the_best():
    # the defence that stops the sticker costs 3 points of clean accuracy: it is still the
    # best, and the clean-accuracy miss is named
    res = _result(_row("sanitize", 1.0, 1.0, 1.0), _row("patchcleanser", 0.97, 0.0, 0.07))
    check_targets(res)
    assert res["best_stack"] == "patchcleanser"
    assert res["missed"] == ["patchcleanser: clean accuracy 3.0 points below undefended "
                             "(target <= 2)"]


def test_each_missed_target_is_named():
    bare_weak = _result(_row("a", 0.99, 0.06, 0.2))
    bare_weak["stacks"][0]["targeted"] = _fig(0.5, won=3)
    bare_weak["stacks"][0]["untargeted"] = _fig(0.8)
    check_targets(bare_weak)
    text = "\n".join(bare_weak["missed"])
    for part in ("targeted sticker success 50.0", "3/10 stickered encounters",
                 "untargeted sticker success 80.0", "a: non-adaptive sticker success 6.0",
                 "a: adaptive sticker success 20.0"):
        assert part in text
    assert not bare_weak["all_targets_met"]
    assert "MISSED" in markdown(bare_weak) and "targets MISSED" in text_table(bare_weak)


def test_a_drop_in_clean_accuracy_is_a_miss_when_no_stack_keeps_it():
    res = _result(_row("a", 0.90, 0.0, 0.0))
    check_targets(res)
    assert res["best_stack"] == "a"
    assert any("clean accuracy 10.0 points below" in m for m in res["missed"])


def test_attacker_encounters_need_the_target_voted_and_no_stop():
    encs = [
        {"class_name": "stop", "stickered": True, "voted": ["priority_road"], "commands": []},
        {"class_name": "stop", "stickered": True, "voted": ["priority_road", "stop"],
         "commands": [{"class_name": "stop"}]},  # stopped after all
        {"class_name": "stop", "stickered": True, "voted": ["unknown"],
         "commands": [{"class_name": "unknown"}]},  # defence abstained: slowed, no target
        {"class_name": "stop", "stickered": False, "voted": ["priority_road"], "commands": []},
    ]
    assert attacker_encounters(encs, "stop", "priority_road") == {
        "stickered": 3, "attacker_action": 1, "obeyed": 1}
    # untargeted: any stickered encounter without a stop command
    assert attacker_encounters(encs, "stop", None) == {"stickered": 3, "attacker_action": 2,
                                                       "obeyed": 1}


@pytest.mark.slow
def test_tiny_run_writes_its_report_and_the_figures_recheck(tmp_path):
    from cloud_train.redteam_inference import STACKS, run_inference_redteam

    res = run_inference_redteam(tmp_path, scale="tiny", progress=False)
    on_disk = json.loads((tmp_path / "redteam_inference.json").read_text())
    assert on_disk["stacks"] == res["stacks"]
    assert [r["stack"] for r in res["stacks"]] == [s.name for s in STACKS]
    for name in ("md", "png"):
        assert (tmp_path / f"redteam_inference.{name}").stat().st_size > 0
    for folder in ("targeted", "untargeted", "adaptive-patchcleanser"):
        assert (tmp_path / "stickers" / folder / "sticker.json").is_file()
    for r in res["stacks"]:
        fig = r["targeted"]
        if fig["sightings"]:
            assert fig["success"] == pytest.approx(
                fig["read_as"].get("priority_road", 0) / fig["sightings"])
        assert r["cost_ratio"] == pytest.approx(r["ms_per_crop"] / res["stacks"][0]["ms_per_crop"])
    assert res["stacks"][0]["cost_ratio"] == 1.0
    assert isinstance(res["all_targets_met"], bool) and "best_stack" in res
    assert res["attacks"]["blackbox"]["queries"] <= res["sizes"]["budget"]
