"""The backdoor verdict: the rule on synthetic scan records (answers worked out by hand from
the rule's definition in ``cloud_train.backdoor.verdict``), calibration, the frozen rule
file, the refusal to measure on calibration seeds, and the report rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import cloud_train.redteam_backdoor as rb
from cloud_train.backdoor import verdict as vd
from cloud_train.backdoor.report import detection_rows, markdown, text_table
from roadshield_base.errors import ConfigError

NC, AC, SS = vd.SCANS


def _record(seed: int, inf: dict[str, list[int]], clean: dict[str, list[int]],
            target: int | None = None) -> dict[str, Any]:
    """A red-team seed record whose scans flagged ``inf`` / ``clean`` (scan -> classes)."""
    target = seed % 14 if target is None else target

    def scan(name: str) -> dict[str, Any]:
        fi, fc = inf.get(name, []), clean.get(name, [])
        return {"infected": {"flagged": fi, "detected": target in fi,
                             "other_flags": [c for c in fi if c != target],
                             "anomaly": [0.1] * 14},
                "clean": {"flagged": fc, "false_flag": bool(fc), "anomaly": [0.5] * 14},
                "after": {"asr": 0.01, "clean_acc": 0.95}}

    return {"seed": seed, "target": target, "poisoned": 30, "train_size": 3000, "trigger": {},
            "infected": {"asr": 0.97, "clean_acc": 0.955},
            "clean": {"asr": 0.02, "clean_acc": 0.96}, "seconds": 1.0,
            "defences": {s: scan(s) for s in vd.SCANS}}


def test_named_classes_follow_the_rule_definitions():
    flags = {NC: [3, 7], AC: [7], SS: [2]}
    two_same = vd.VerdictRule("same_class", vd.SCANS, 2)
    assert vd.named_classes(two_same, flags) == [7]  # only 7 is flagged by two scans
    assert vd.named_classes(vd.VerdictRule("same_class", vd.SCANS, 3), flags) == []
    # any class, 2 of 3: three scans flag something, so every flagged class is named
    assert vd.named_classes(vd.VerdictRule("any", vd.SCANS, 2), flags) == [2, 3, 7]
    assert vd.named_classes(vd.VerdictRule("any", (NC, AC), 2), {NC: [3]}) == []
    assert vd.named_classes(vd.VerdictRule("same_class", (NC, SS), 2), flags) == []
    assert vd.named_classes(vd.VerdictRule("any", (SS,), 1), flags) == [2]
    assert vd.named_classes(two_same, {}) == []  # missing scans flagged nothing


def test_seed_verdict_counts_a_wrong_class_as_a_miss():
    rule = vd.VerdictRule("same_class", vd.SCANS, 2)
    rec = _record(1, {NC: [5], AC: [5]}, {AC: [9], SS: [9]}, target=4)
    row = vd.seed_verdict(rule, rec)
    assert row["infected"] == [5] and not row["detected"] and row["misnamed"]
    assert row["clean"] == [9] and row["false_flag"]
    hit = vd.seed_verdict(rule, _record(2, {NC: [4, 1], SS: [4]}, {NC: [3]}, target=4))
    assert hit["detected"] and not hit["misnamed"] and not hit["false_flag"]


def test_bad_rule_shapes_are_config_errors():
    with pytest.raises(ConfigError, match="kind"):
        vd.VerdictRule("majority", vd.SCANS, 2)
    with pytest.raises(ConfigError, match="min_scans"):
        vd.VerdictRule("any", (NC, AC), 3)
    with pytest.raises(ConfigError, match="distinct"):
        vd.VerdictRule("any", (NC, NC), 1)
    with pytest.raises(ConfigError, match="distinct"):
        vd.VerdictRule("any", ("strip",), 1)


def _calibration_set() -> list[dict[str, Any]]:
    """Ten seeds: NC flags every target and class 3 of clean models 2, 4, 6; AC flags the
    targets of seeds 1..9 and class 8 of clean models 4, 7; spectral flags the targets of
    seeds 2..9 and no clean class."""
    recs = []
    for s in range(10):
        t = s % 14
        inf = {NC: [t], AC: [t] if s != 0 else [], SS: [t] if s not in (0, 1) else []}
        clean = {NC: [3] if s in (2, 4, 6) else [], AC: [8] if s in (4, 7) else []}
        recs.append(_record(s, inf, clean))
    return recs


def test_calibration_picks_the_first_rule_meeting_the_targets_and_freezes_it(tmp_path: Path):
    recs = _calibration_set()
    # by hand: same class 2 of 3 names the target where >= 2 scans flag it: seeds 1..9
    # (seed 0: NC only) -> 9/10; clean: NC and AC never flag the same class -> 0/10
    ev = vd.evaluate(vd.VerdictRule("same_class", vd.SCANS, 2), recs)
    assert (ev["detected"], ev["false_flags"], ev["meets_targets"]) == (9, 0, True)
    # any class 2 of 3: seed 4's clean model has NC and AC flags -> 1 false flag
    ev_any = vd.evaluate(vd.VerdictRule("any", vd.SCANS, 2), recs)
    assert (ev_any["detected"], ev_any["false_flags"]) == (9, 1)
    rule = vd.calibrate(recs, {"scale": "quick"})
    assert rule.shape() == {"kind": "same_class", "scans": list(vd.SCANS), "min_scans": 2}
    assert rule.calibration_seeds == tuple(range(10))
    assert rule.calibration["detected"] == 9 and rule.calibration["false_flags"] == 0
    assert len(rule.calibration["candidates"]) == len(vd.candidates())
    # NC alone: 10/10 and 3/10, with the MAD rule's chance rate beside it
    nc = rule.calibration["per_scan"][NC]
    assert (nc["detected"], nc["false_flags"]) == (10, 3)
    assert 0.3 < nc["chance_false_flag_rate"] < 0.45
    path = vd.save_rule(rule, tmp_path / "rule.json")
    again = vd.load_rule(path)
    assert again == rule and json.loads(path.read_text())["calibration_seeds"] == list(range(10))


def test_calibration_prefers_margin_then_order_and_says_when_nothing_meets():
    # every scan flags every target and nothing else: all rules tie at 10/10, 0/10
    perfect = [_record(s, {NC: [s], AC: [s], SS: [s]}, {}) for s in range(10)]
    assert vd.calibrate(perfect).name == vd.candidates()[0].name
    # only NC sees the targets, and it flags half the clean models: nothing meets the targets
    noisy = [_record(s, {NC: [s]}, {NC: [1]} if s % 2 else {}) for s in range(10)]
    rule = vd.calibrate(noisy)
    assert not rule.calibration["meets_targets"]
    # margin detected - false flags: NC alone 10 - 5 = 5 beats every rule that detects 0
    assert rule.name == "any class: 1 of NC+AC+SS"
    with pytest.raises(ConfigError, match="no calibration"):
        vd.calibrate([])
    with pytest.raises(ConfigError, match="repeat"):
        vd.calibrate([perfect[0], perfect[0]])


def test_measuring_on_calibration_seeds_is_refused(tmp_path: Path):
    rule = vd.calibrate(_calibration_set())
    with pytest.raises(ConfigError, match=r"calibrated on seeds \[9\]") as err:
        vd.measure(rule, [_record(9, {}, {}), _record(100, {}, {})])
    assert "fresh seeds" in err.value.hint
    path = vd.save_rule(rule, tmp_path / "rule.json")

    def never(*a: Any, **k: Any) -> None:
        pytest.fail("work started")

    # the red team refuses before any seed is run
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rb, "run_seed", never)
        with pytest.raises(ConfigError, match="calibrated on seeds"):
            rb.run_backdoor_redteam(tmp_path / "r", seeds=3, first_seed=8, scale="tiny",
                                    progress=False, verdict_rule=path)
        with pytest.raises(ConfigError, match="in one run"):
            rb.run_backdoor_redteam(tmp_path / "r", seeds=3, first_seed=100, scale="tiny",
                                    progress=False, verdict_rule=path,
                                    calibrate_verdict=tmp_path / "x.json")


def test_rule_files_without_seeds_or_schema_are_refused(tmp_path: Path):
    rule = vd.calibrate(_calibration_set())
    d = rule.to_dict()
    for broken, match in (({**d, "calibration_seeds": []}, "no calibration seeds"),
                          ({**d, "schema": "other"}, "not a backdoor verdict rule"),
                          ({**d, "min_scans": 5}, "min_scans")):
        p = tmp_path / "bad.json"
        p.write_text(json.dumps(broken))
        with pytest.raises(ConfigError, match=match):
            vd.load_rule(p)
    with pytest.raises(ConfigError, match="cannot read"):
        vd.load_rule(tmp_path / "missing.json")


def test_measurement_on_fresh_seeds_reports_misses():
    rule = vd.calibrate(_calibration_set())
    fresh = [_record(100 + i, {NC: [i], AC: [i] if i < 8 else []}, {NC: [2], AC: [2]}
                     if i < 2 else {}, target=i) for i in range(10)]
    m = vd.measure(rule, fresh, {"scale": "quick"})
    # same class 2 of 3: 8/10 detected (seeds 108, 109 only NC), 2/10 clean flagged
    assert (m["detected"], m["false_flags"], m["n"]) == (8, 2, 10)
    assert not m["met"] and len(m["missed"]) == 2
    assert any("8/10 infected" in x for x in m["missed"])
    assert any("2/10 clean" in x for x in m["missed"])
    assert m["calibration"]["detected"] == 9 and m["per_scan"][NC]["detected"] == 10
    assert m["same_settings_as_calibration"] is None  # calibrated without a config
    other = vd.calibrate(_calibration_set(), {"scale": "full"})
    assert vd.measure(other, fresh, {"scale": "quick"})["same_settings_as_calibration"] is False


def test_red_team_calibrates_then_measures_and_reports(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture):
    cal = {r["seed"]: r for r in _calibration_set()}
    monkeypatch.setattr(rb, "run_seed", lambda sc, seed, *_, **__: cal[seed])
    res = rb.run_backdoor_redteam(tmp_path / "cal", seeds=10, scale="tiny", progress=False,
                                  calibrate_verdict=tmp_path / "rule.json")
    assert res["verdict_calibration"]["rule"] == "same class: 2 of NC+AC+SS"
    assert res["unchecked"] and "verdict" not in res["summary"]
    # NC's own false flags (3/10) are a replication beside the chance rate, not a target
    assert res["all_targets_met"]
    md = (tmp_path / "cal" / "redteam_backdoor.md").read_text()
    assert "not checked" in md and "Candidates tried" in md
    rule = vd.load_rule(tmp_path / "rule.json")
    assert rule.calibration_config == res["config"]

    fresh = {100 + i: _record(100 + i, {NC: [i], AC: [i]}, {NC: [4]} if i == 0 else {},
                              target=i) for i in range(10)}
    monkeypatch.setattr(rb, "run_seed", lambda sc, seed, *_, **__: fresh[seed])
    res = rb.run_backdoor_redteam(tmp_path / "fresh", seeds=10, first_seed=100, scale="tiny",
                                  progress=False, verdict_rule=tmp_path / "rule.json")
    v = res["summary"]["verdict"]
    assert (v["detected"], v["false_flags"], v["met"]) == (10, 0, True)
    assert v["same_settings_as_calibration"] and res["all_targets_met"] and not res["unchecked"]
    rows = detection_rows(res)
    assert rows[1][2:4] == ("10/10", "0/10")
    assert "calibrated on seeds 0..9: 9/10, 0/10" in rows[1][0]
    nc_row = next(r for r in rows if r[0].startswith("Neural Cleanse"))
    assert "replication" in nc_row[0] and nc_row[3] == "1/10 (10%)" and nc_row[4] == "38%"
    text = text_table(res)
    assert "backdoor verdict [same class: 2 of NC+AC+SS]" in text
    assert "detected 10/10 infected, false flags 0/10 clean" in text
    md = markdown(res)
    assert "## Backdoor verdict" in md and "none of which it saw" in md
    assert (tmp_path / "fresh" / "redteam_backdoor.png").read_bytes()[:4] == b"\x89PNG"
    # a resumed, finished run measures a rule from the saved seeds without new work
    monkeypatch.setattr(rb, "run_seed", lambda *a, **k: pytest.fail("work started"))
    again = rb.run_backdoor_redteam(tmp_path / "fresh", seeds=10, first_seed=100,
                                    scale="tiny", progress=False, resume=True,
                                    verdict_rule=tmp_path / "rule.json")
    assert again["summary"]["verdict"]["detected"] == 10
    # a miss of the verdict is a missed target (exit 3 in the CLI): two targets named by NC
    # alone (8/10) and one clean model with AC and spectral on the same class (1/10: met)
    fresh[101] = _record(101, {NC: [1]}, {AC: [6], SS: [6]}, target=1)
    fresh[102] = _record(102, {NC: [2], SS: [5]}, {}, target=2)
    monkeypatch.setattr(rb, "run_seed", lambda sc, seed, *_, **__: fresh[seed])
    res = rb.run_backdoor_redteam(tmp_path / "fresh2", seeds=10, first_seed=100, scale="tiny",
                                  progress=False, verdict_rule=tmp_path / "rule.json")
    assert not res["all_targets_met"]
    assert res["missed"] == ["backdoor verdict (same class: 2 of NC+AC+SS) detected 8/10 "
                             "infected models < 90%"]
    assert "MISSED" in text_table(res)
    capsys.readouterr()
