"""``roadshield redteam extraction``: a tiny run through the real service whose figures
re-check against the service's own records, the targets' verdicts, the exit code and bad
input."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import pytest

from cloud_train import redteam_extraction as X
from cloud_train.redteam_cli import EXIT_TARGET_MISSED, add_redteam_parsers
from cloud_train.redteam_extraction_attacks import schedule
from cloud_train.redteam_extraction_client import request_body
from cloud_train.redteam_extraction_report import check_targets, markdown, text_table
from roadshield_base.errors import ConfigError, RoadshieldError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("extraction")
    return out, X.run_extraction_redteam(out, scale="tiny", seed=0, progress=False)


def _row(result, key):
    return next(r for r in result["runs"] if r["key"] == key)


def test_the_tiny_run_writes_its_report_and_every_defence_meets_both_attacks(run):
    out, result = run
    for ext in ("json", "md", "png"):
        assert (out / f"redteam_extraction.{ext}").stat().st_size > 0
    assert json.loads((out / "redteam_extraction.json").read_text())["runs"] == result["runs"]
    assert (out / "redteam_extraction.png").read_bytes()[:4] == b"\x89PNG"
    keys = {(r["defence"], r["mode"]) for r in result["runs"]}
    assert keys == {(d.name, m) for d in X.DEFENCES for m in X.MODES}
    for r in result["runs"]:
        qs = [p["queries"] for p in r["curve"]]
        assert qs == sorted(set(qs)) and qs[-1] == r["queries"] > 0
        assert all(0.0 <= p["agreement"] <= 1.0 for p in r["curve"])
    assert "undefended" in markdown(result) and "MISSED" in text_table(result)


def test_the_watermark_cost_sample_is_measured_and_reported(run):
    _, result = run
    sample = result["watermark_sample"]
    assert sample["crops"] == X.SCALES["tiny"].cost_crops
    # a marked answer is wrong, so it can only lower the served accuracy, by at most one each
    lost = sample["correct_victim"] - sample["correct_served"]
    assert 0 <= lost <= sample["marked"]
    assert result["watermark_cost"]["cost_points"] == round(100 * lost / sample["crops"], 3)


def test_the_service_counted_what_each_attacker_was_answered(run):
    _, result = run
    budget = result["budget"]
    for r in result["runs"]:
        # the store's count of answered images is the attacker's own count
        assert r["store"]["used"] == r["client"]["answered"] == r["queries"]
        if r["limited"]:
            assert r["queries"] == budget and r["stopped"] == "budget exhausted"
    limited = [r for r in result["runs"] if r["limited"]]
    # the token bucket refused for real and the attackers waited as told
    assert sum(r["client"]["rate_limited"] for r in limited) >= 1
    assert sum(r["client"]["waited_s"] for r in limited) > 0
    assert _row(result, "label-natural")["soft_answers"] == 0
    assert _row(result, "undefended-natural")["soft_answers"] == result["sizes"]["max_queries"]
    assert all((r["prada"] is None) == (r["service"] == "open") for r in result["runs"])
    assert [b["answered"] for b in result["benign"]] == [budget] * result["sizes"][
        "benign_clients"]


def test_the_undefended_clone_agrees_more_than_the_budget_capped_one(run):
    _, result = run
    # both keys answer the full softmax (no noise drawn from the run's fresh noise key);
    # the budget's only difference is fewer queries
    for mode in X.MODES:
        assert _row(result, f"undefended-{mode}")["agreement"] > \
            _row(result, f"budget-{mode}")["agreement"]


def test_the_watermark_p_values_are_those_of_the_verify_command(run, capsys):
    from roadshield.cli import main

    _, result = run
    row = _row(result, "undefended-natural")
    argv = row["watermark"]["command"].split()[1:] + ["--json"]
    assert main(argv) == 0
    verdict = json.loads(capsys.readouterr().out)
    mine = row["watermark"]["clone"]
    assert (verdict["queries"], verdict["agree"], verdict["p_value"]) == (
        mine["queries"], mine["agree"], mine["p_value"])


def test_the_cli_exits_3_naming_each_missed_target(run, monkeypatch, capsys, tmp_path):
    _, result = run
    assert not result["all_targets_met"]  # 112 tiny queries cannot reach 90 % agreement
    monkeypatch.setattr(X, "run_extraction_redteam", lambda *a, **k: result)
    p = argparse.ArgumentParser(prog="roadshield")
    add_redteam_parsers(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["redteam", "extraction", "--out", str(tmp_path), "--scale", "tiny"])
    assert args.func(args) == EXIT_TARGET_MISSED
    text = capsys.readouterr().out
    assert "MISSED undefended extraction >= 90 % agreement" in text


def _fake(**over):
    """A result whose every target is met; ``over`` changes one run's fields."""
    def mk(defence, mode, agreement, q90, queries=2240, alarm=None, service="open"):
        wm = {"queries": 10, "agree": 9, "p_value": 1e-9}
        return {"defence": defence, "mode": mode, "key": f"{defence}-{mode}",
                "agreement": agreement, "queries": queries, "queries_to_90": q90,
                "stopped": "plan spent", "service": service,
                "prada": None if service == "open" else {"alarm_at": alarm, "min_w": 0.5},
                "watermark": {"clone": wm, "independent": {"queries": 10, "agree": 0,
                                                           "p_value": 1.0},
                              "command": "roadshield watermark verify ..."}}

    runs = [mk("undefended", "natural", 0.94, 560), mk("undefended", "synthetic", 0.7, None),
            mk("full", "natural", 0.6, None, 500, None, "prada"),
            mk("full", "synthetic", 0.4, None, 500, 120, "prada"),
            mk("prada", "synthetic", 0.6, None, 2240, 110, "prada")]
    for key, fields in over.items():
        next(r for r in runs if r["key"] == key).update(fields)
    benign = [{"answered": 500, "correct_served": 490, "correct_victim": 491, "changed": 2,
               "prada": {"alarm_at": None, "min_w": 0.93}} for _ in range(10)]
    sample = {"crops": 20_000, "marked": 80, "correct_victim": 19_000, "correct_served": 18_925}
    return {"runs": runs, "benign": benign, "watermark_sample": sample}


def test_every_target_met_and_each_miss_named():
    ok = _fake()
    check_targets(ok)
    assert ok["all_targets_met"], ok["missed"]
    cases = {
        "full stack vs natural": {"full-natural": {"agreement": 0.85, "queries_to_90": None}},
        "flags every synthetic-query run": {"prada-synthetic": {"prada": {"alarm_at": 2010,
                                                                          "min_w": 0.8}}},
        "recognises the stolen clone": {"undefended-natural": {"watermark": {
            "clone": {"queries": 10, "agree": 3, "p_value": 1e-3},
            "independent": {"queries": 10, "agree": 0, "p_value": 1.0}, "command": ""}}},
    }
    for name, over in cases.items():
        res = _fake(**over)
        check_targets(res)
        assert not res["all_targets_met"]
        assert len(res["missed"]) == 1 and name in res["missed"][0], res["missed"]
    # ten times the undefended queries to 90 % is a defence even above 70 %
    slow = _fake(**{"full-natural": {"agreement": 0.92, "queries_to_90": 5600,
                                     "queries": 5600}})
    check_targets(slow)
    assert slow["all_targets_met"], slow["missed"]
    flagged = _fake()
    flagged["benign"][3]["prada"] = {"alarm_at": 130, "min_w": 0.88}
    costly = copy.deepcopy(_fake())
    costly["watermark_sample"]["correct_served"] = 18_890  # 0.55 points
    for res, name in ((flagged, "never flags the benign"), (costly, "costs honest users")):
        check_targets(res)
        assert [m for m in res["missed"] if name in m] and len(res["missed"]) == 1
    # the benign clients' own answers are reported beside the sample, not judged
    scattered = _fake()
    for b in scattered["benign"]:
        b["correct_served"] = 480
    check_targets(scattered)
    assert scattered["all_targets_met"]
    assert scattered["watermark_cost"]["benign_points"] == 2.2
    assert scattered["watermark_cost"]["cost_points"] == 0.375
    unmeasured = _fake()
    del unmeasured["watermark_sample"]
    check_targets(unmeasured)
    assert [m for m in unmeasured["missed"] if "costs honest users" in m]


def test_bad_input_is_a_clear_error_before_any_work(tmp_path: Path, tiny_onnx: Path):
    with pytest.raises(ConfigError, match="unknown red-team scale 'huge'"):
        X.run_extraction_redteam(tmp_path / "a", scale="huge")
    junk = tmp_path / "victim.onnx"
    junk.write_text("not a model")
    with pytest.raises(RoadshieldError, match="victim.onnx"):
        X.run_extraction_redteam(tmp_path / "b", scale="tiny", victim=str(junk))
    with pytest.raises(RoadshieldError, match="does not exist"):
        X.run_extraction_redteam(tmp_path / "c", scale="tiny", victim=str(tmp_path / "no.onnx"))
    with pytest.raises(ConfigError, match="synthetic classes at 32 px"):
        X.run_extraction_redteam(tmp_path / "d", scale="tiny", victim=str(tiny_onnx))
    with pytest.raises(ConfigError, match="below one request"):
        X.run_extraction_redteam(tmp_path / "e", scale="tiny", budget=3)
    with pytest.raises(ConfigError, match="prada_delta 1.5"):
        X.run_extraction_redteam(tmp_path / "f", scale="tiny", prada_delta=1.5)
    assert not any((tmp_path / n).exists() for n in "abcdef")


def test_requests_carry_the_exact_uint8_images_and_the_schedule_doubles():
    from serve.tensors import parse_infer_request
    from serve.watermark import quantise

    x = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    req = parse_infer_request(request_body(x, "input"), input_name="input", size=8,
                              max_batch=64)
    for got, want in zip(req.images, x, strict=True):  # the bytes the service hashes
        assert quantise(got) == want.transpose(2, 0, 1).tobytes()
    assert schedule(140, 2240) == [140, 280, 560, 1120, 2240]
    assert schedule(28, 100) == [28, 56, 100]
    with pytest.raises(ConfigError):
        schedule(0, 10)
