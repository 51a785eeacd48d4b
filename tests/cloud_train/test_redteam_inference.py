"""``roadshield redteam inference``: the targets' verdicts, and a tiny end-to-end run whose
figures re-check from what it wrote."""

from __future__ import annotations

import json

import pytest

from cloud_train.redteam_inference_report import (
    chart_png,
    check_targets,
    markdown,
    text_table,
)
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


def _figs(detection, fpr, n=10):
    return {"n": n, "detected": round((detection or 0.0) * n), "detection": detection,
            "clean": 100, "false_positives": round(100 * fpr), "fpr": fpr,
            "threshold": 1.0, "threshold_at_fpr": 1.0, "detection_at_fpr": detection,
            "fpr_at_threshold": 0.05, "auc": 0.9}


def _det_figs(sq, sq_fpr, maha, maha_fpr, n=10):
    return {"squeeze": _figs(sq, sq_fpr, n), "mahalanobis": _figs(maha, maha_fpr, n),
            "either": _figs(max(sq or 0.0, maha or 0.0), max(sq_fpr, maha_fpr), n)}


def _detectors(sq, sq_fpr, maha, maha_fpr, successful=10):
    attacks = [{"attack": a, "eps": e / 255, "eps_255": e, "images": 20,
                "successful": successful, "success": successful / 20,
                "detectors": _det_figs(sq, sq_fpr, maha, maha_fpr, successful)}
               for a in ("fgsm", "pgd", "apgd") for e in (2, 4, 8)]
    run = {"lambda": 1.0, "images": 8, "successful": 4, "success": 0.5, "evaded": 2,
           "evasion": 0.25, "evaded_either": 1, "evasion_either": 0.125,
           "detectors": _det_figs(0.5, 0.05, 0.5, 0.05, 4)}
    return {"detectors": ["squeeze", "mahalanobis"], "fpr_nominal": 0.05,
            "clean": {"kept": 20, "sampled": 28,
                      "fpr": {"squeeze": sq_fpr, "mahalanobis": maha_fpr, "either": 0.1}},
            "attacks": attacks,
            "stickers": {"clean_crops": 50, "clean_accuracy": 0.98,
                         "clean_fpr": {"squeeze": 0.04, "mahalanobis": 0.06, "either": 0.1},
                         "drives": [{"name": "targeted", "sign": "stop",
                                     "target": "priority_road", "crops": 30, "successful": 27,
                                     "success": 0.9,
                                     "detectors_successful": _det_figs(0.3, 0.04, 0.8, 0.06),
                                     "detectors_all": _det_figs(0.3, 0.04, 0.8, 0.06)}]},
            "adaptive": {"eps_255": 8, "steps": 2, "images": 8,
                         "sets": {k: {"attacked": [k], "runs": [run], "strongest_lambda": 1.0,
                                      "evaded_any_lambda": 2, "evasion_any_lambda": 0.25}
                                  for k in ("squeeze", "mahalanobis", "both")}}}


def _met_result(**det):
    res = _result(_row("a", 0.99, 0.02, 0.08))
    res["detectors"] = _detectors(**det)
    return res


def test_the_detector_target_reads_the_better_detector_at_its_fitted_threshold():
    res = _met_result(sq=0.6, sq_fpr=0.04, maha=0.95, maha_fpr=0.07)
    check_targets(res)
    t = res["detectors"]["target"]
    assert (t["detector"], t["detection"], t["fpr"], t["met"]) == ("mahalanobis", 0.95, 0.07,
                                                                   True)
    assert res["all_targets_met"] and res["targets_checked"] == 7
    # the measured FPR is shown beside the detection, and flagged when above nominal
    text = text_table(res)
    assert "measured clean FPR of 7.0 % (above the nominal 5 %)" in text
    assert "## Input detectors" in markdown(res) and "adaptive vs both" in markdown(res)
    assert chart_png(res)[:4] == b"\x89PNG"


def test_a_detection_short_of_the_target_is_missed_with_its_fpr():
    res = _met_result(sq=0.85, sq_fpr=0.05, maha=0.7, maha_fpr=0.02)
    check_targets(res)
    assert res["missed"] == [
        "detectors: squeeze flags 85.0 % of successful PGD 8/255 examples at its fitted "
        "threshold (measured clean FPR 5.0 %; target >= 90% at <= 10% FPR)"]
    assert "MISSED" in text_table(res)


def test_a_detector_whose_threshold_flags_too_many_clean_images_cannot_meet_the_target():
    # mahalanobis detects everything, but its fitted threshold flags 30 % of clean images:
    # the target reads squeeze, which misses
    res = _met_result(sq=0.5, sq_fpr=0.05, maha=1.0, maha_fpr=0.30)
    check_targets(res)
    assert res["detectors"]["target"]["detector"] == "squeeze"
    assert not res["all_targets_met"]
    both_bad = _met_result(sq=1.0, sq_fpr=0.2, maha=1.0, maha_fpr=0.30)
    check_targets(both_bad)
    assert both_bad["missed"] == [
        "detectors: the fitted thresholds flag squeeze 20.0 %, mahalanobis 30.0 % of clean "
        "test images (nominal 5 %, ceiling 10%): none holds its false-positive rate"]
    assert "none holds" in text_table(both_bad)


def test_no_successful_adversarial_example_is_a_miss():
    res = _met_result(sq=None, sq_fpr=0.05, maha=None, maha_fpr=0.05)
    for row in res["detectors"]["attacks"]:
        row["successful"], row["success"] = 0, 0.0
    check_targets(res)
    assert res["missed"] == ["detectors: PGD 8/255 made no successful adversarial example "
                             "to detect"]


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
    _check_detector_section(res, on_disk, tmp_path)
    _check_drift_section(res, on_disk, tmp_path)


def _recheck(figs, names):
    for k in (*names, "either"):
        f = figs[k]
        assert f["detection"] == (f["detected"] / f["n"] if f["n"] else None)
        assert f["fpr"] == (f["false_positives"] / f["clean"] if f["clean"] else None)
        assert (f["auc"] is None) == (not f["n"] or not f["clean"])
        assert f["detected"] <= f["n"] and f["false_positives"] <= f["clean"]
        assert f["fpr_at_threshold"] is None or f["fpr_at_threshold"] <= 0.05


def _check_detector_section(res, on_disk, out):
    from edge_runtime.model_info import read_model_info

    det = res["detectors"]
    assert on_disk["detectors"] == json.loads(json.dumps(det))
    names = det["detectors"]
    assert names == ["squeeze", "mahalanobis"]
    assert "detectors" in read_model_info(out / "work" / "teacher.onnx").metadata
    c = det["clean"]
    assert c["split"] == "test" and c["sampled"] == res["sizes"]["detector_images"]
    assert c["kept"] <= c["sampled"]
    assert [(r["attack"], r["eps_255"]) for r in det["attacks"]] == [
        (a, e) for a in ("fgsm", "pgd", "apgd") for e in (2, 4, 8)]
    for r in det["attacks"]:
        assert r["images"] == c["kept"]
        assert r["success"] == (r["successful"] / r["images"] if r["images"] else None)
        assert {f["n"] for f in r["detectors"].values()} == {r["successful"]}
        assert {f["clean"] for f in r["detectors"].values()} == {c["kept"]}
        assert r["detectors"]["either"]["fpr"] == c["fpr"]["either"]
        _recheck(r["detectors"], names)
    drives = det["stickers"]["drives"]
    assert [d["name"] for d in drives] == ["targeted", "untargeted"]
    for d in drives:
        assert d["success"] == (d["successful"] / d["crops"] if d["crops"] else None)
        assert d["detectors_all"]["squeeze"]["n"] == d["crops"]
        assert d["detectors_successful"]["squeeze"]["n"] == d["successful"]
        _recheck(d["detectors_all"], names)
        _recheck(d["detectors_successful"], names)
    ad = det["adaptive"]
    assert ad["eps_255"] == 8 and set(ad["sets"]) == {"squeeze", "mahalanobis", "both"}
    for st in ad["sets"].values():
        assert [r["lambda"] for r in st["runs"]] == list(res["sizes"]["lambdas"])
        for r in st["runs"]:
            assert r["evaded_either"] <= r["evaded"] <= r["successful"] <= r["images"]
            assert r["evasion"] == (r["evaded"] / r["images"] if r["images"] else None)
            _recheck(r["detectors"], names)
        best = max(st["runs"], key=lambda r: (r["evasion"] or 0, r["success"] or 0,
                                              -r["lambda"]))
        assert st["strongest_lambda"] == best["lambda"]
        assert best["evaded"] <= st["evaded_any_lambda"] <= ad["images"]
    t = det["target"]
    assert isinstance(t["met"], bool)
    assert t["met"] or t["why"] in res["missed"]
    assert "## Input detectors" in (out / "redteam_inference.md").read_text()


def _check_drift_section(res, on_disk, out):
    drift = res["drift"]
    assert on_disk["drift"] == json.loads(json.dumps(drift))
    sizes = res["sizes"]
    assert drift["config"]["frame_window"] == sizes["drift_config"]["frame_window"]
    assert drift["reference"]["frames"] == sizes["drift_reference_frames"]
    assert drift["false_alarms"]["frames"] == sizes["drift_clean_frames"]
    assert [r["name"] for r in drift["scenarios"]] == [
        "control", "brightness_gain", "brightness_lift", "fog", "sticker_campaign",
        "random_stickers", "one_class"]
    for r in drift["scenarios"]:
        assert (r["onset"], r["frames"]) == (sizes["drift_onset"], sizes["drift_scenario_frames"])
        assert r["alarmed"] == (r["frames_to_alarm"] is not None)
    for t in drift["targets"].values():
        assert isinstance(t["met"], bool)
        assert t["met"] or t["why"] in res["missed"]
    assert "## Drift monitor" in (out / "redteam_inference.md").read_text()
