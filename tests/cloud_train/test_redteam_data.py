"""``roadshield redteam data`` at the tiny scale: structure, detections, controls, reports."""

from __future__ import annotations

import argparse
import json

import pytest

from cloud_train import redteam_data as R
from cloud_train.redteam_cli import EXIT_TARGET_MISSED, add_redteam_parsers
from roadshield_base.errors import ConfigError

GATE = {"clean_batch", "label_flip_1%", "label_flip_3%", "badnets_trigger_1%", "ood_junk_3%",
        "unknown_source", "forged_signature", "replayed_signature", "replayed_batch_id",
        "hidden_frame_jpeg_bomb", "one_png_150_rows", "index_20000_rows",
        "correct_label_triangle_3%", "correct_label_sig_3%", "correct_label_blend_3%",
        "surrogate_label_flip_1%",
        "victim_after_batch_id_squat"}
VERIFY = {"clean_pipeline", "changed_normalisation_constant", "flipped_labels_in_shard",
          "dropped_class", "swapped_file", "resigned_with_unknown_key", "insider_feature_shift",
          "insider_label_swap", "insider_backdoor", "gate_bypass_unexported_folder",
          "poison_slipped_into_export"}
LEAK = {"clean_split", "leak_test_rows_exact", "leak_near_dup_jpeg", "leak_near_dup_shift",
        "leak_near_dup_brightness", "leak_near_dup_rescale", "leak_near_dup_zoom",
        "leak_near_dup_hflip", "leak_near_dup_crop90", "future_dated"}
ROW_KEYS = {"attack", "group", "defence", "unit", "bad_sent", "bad_stopped", "stopped_rate",
            "clean_sent", "clean_flagged", "clean_flag_rate", "detected", "first_reason",
            "target", "target_met", "seconds", "details"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("redteam")
    return out, R.run_data_redteam(out, seed=0, scale="tiny", progress=False)


def _rows(result):
    return {r["attack"]: r for r in result["attacks"]}


def test_every_attack_and_control_has_a_complete_row(run):
    out, result = run
    rows = _rows(result)
    assert set(rows) == GATE | VERIFY | LEAK and len(rows) == len(result["attacks"])
    for r in result["attacks"]:
        assert set(r) == ROW_KEYS, r["attack"]
    assert {rows[a]["defence"] for a in GATE} == {"ingest gate"}
    bypass = {"gate_bypass_unexported_folder", "poison_slipped_into_export"}
    assert {rows[a]["defence"] for a in VERIFY - bypass} == {"verify"}
    assert {rows[a]["defence"] for a in bypass} == {"preprocess"}
    assert {rows[a]["defence"] for a in LEAK} == {"check_leakage"}
    assert result["schema"] == R.SCHEMA and result["scale"] == "tiny"
    assert result["sizes"]["batch_per_class"] == R.SCALES["tiny"].batch_per_class
    on_disk = json.loads((out / "redteam_data.json").read_text())
    assert on_disk == json.loads(json.dumps(result))


def test_counts_add_up(run):
    _, result = run
    for r in result["attacks"]:
        assert 0 <= r["bad_stopped"] <= r["bad_sent"], r
        if r["bad_sent"]:
            assert r["stopped_rate"] == round(r["bad_stopped"] / r["bad_sent"], 4), r
        else:
            assert r["group"] == "control" and r["stopped_rate"] is None, r
        if r["clean_sent"] is not None:
            assert 0 <= r["clean_flagged"] <= r["clean_sent"], r
        if r["defence"] == "ingest gate":  # every sample of the batch is counted once
            assert r["bad_sent"] + r["clean_sent"] == r["details"]["received"], r
    rows = _rows(result)
    n_batch = 14 * R.SCALES["tiny"].batch_per_class
    assert rows["label_flip_1%"]["bad_sent"] == round(0.01 * n_batch)
    assert rows["label_flip_3%"]["bad_sent"] == round(0.03 * n_batch)
    assert rows["forged_signature"]["bad_sent"] == n_batch
    assert rows["dropped_class"]["bad_sent"] == R.SCALES["tiny"].pipe_seeds
    assert rows["leak_near_dup_jpeg"]["bad_sent"] == R.SCALES["tiny"].per_kind
    assert rows["future_dated"]["bad_sent"] == R.SCALES["tiny"].future
    assert result["targets_checked"] == sum(r["target_met"] is not None
                                            for r in result["attacks"])
    assert result["all_targets_met"] == (not result["missed"])
    assert len(result["missed"]) == sum(r["target_met"] is False for r in result["attacks"])


def test_tampering_forgery_and_unknown_sources_are_all_detected(run):
    _, result = run
    hard = [r for r in result["attacks"]
            if r["group"] in ("forgery", "tampering", "insider", "gate bypass")]
    assert {r["attack"] for r in hard} == (VERIFY - {"clean_pipeline"}) | {
        "unknown_source", "forged_signature", "replayed_signature", "replayed_batch_id"}
    for r in hard:
        assert r["detected"] and r["bad_stopped"] == r["bad_sent"] > 0, r
        assert r["target_met"] is True and r["first_reason"], r
    rows = _rows(result)
    assert rows["unknown_source"]["first_reason"] == "SOURCE_UNKNOWN"
    assert rows["forged_signature"]["first_reason"] == "SIGNATURE_INVALID"
    assert rows["replayed_batch_id"]["first_reason"] == "REPLAYED_BATCH_ID"
    assert "[signature]" in rows["resigned_with_unknown_key"]["first_reason"]
    assert "[drift]" in rows["insider_feature_shift"]["first_reason"]
    assert "[invariant]" in rows["insider_label_swap"]["first_reason"]
    assert rows["insider_backdoor"]["details"]["finding_checks"]["invariant"] > 0
    for name in ("gate_bypass_unexported_folder", "poison_slipped_into_export"):
        assert rows[name]["details"]["poisoned_files_reaching_training"] == 0
        assert rows[name]["details"]["poisoned_files"] > 0


def test_resource_attacks_are_held_and_stored_once(run):
    _, result = run
    rows = _rows(result)
    bomb = rows["hidden_frame_jpeg_bomb"]
    assert bomb["bad_stopped"] == 1 and bomb["first_reason"] == "DECOMPRESSION_BOMB", bomb
    dup = rows["one_png_150_rows"]
    assert dup["bad_stopped"] == dup["bad_sent"] == 149 and dup["details"]["status"] == "SUSPECT"
    assert dup["details"]["store_bytes_added"] < 8 << 20  # one copy, not 150
    big = rows["index_20000_rows"]
    assert big["first_reason"] == "BATCH_TOO_LARGE" and big["bad_stopped"] == 20000, big
    victim = rows["victim_after_batch_id_squat"]
    assert victim["details"]["status"] != "REJECTED" and victim["target_met"] is True, victim


def test_clean_controls_raise_no_batch_or_pipeline_alarm(run):
    _, result = run
    rows = _rows(result)
    gate = rows["clean_batch"]
    assert gate["details"]["status"] != "REJECTED" and not gate["detected"], gate
    assert gate["bad_sent"] == 0 and gate["clean_sent"] == 14 * R.SCALES["tiny"].batch_per_class
    pipe = rows["clean_pipeline"]
    assert pipe["clean_sent"] == R.SCALES["tiny"].pipe_seeds and pipe["clean_flagged"] == 0, pipe
    assert pipe["target_met"] is True
    # leakage planted from test rows: exact copies are always caught
    assert rows["leak_test_rows_exact"]["bad_stopped"] == rows["leak_test_rows_exact"]["bad_sent"]
    assert rows["future_dated"]["bad_stopped"] == rows["future_dated"]["bad_sent"]


def test_markdown_and_chart_are_written(run):
    out, result = run
    md = (out / "redteam_data.md").read_text()
    for name in GATE | VERIFY | LEAK:
        assert f"| {name} |" in md
    assert "redteam_data.png" in md
    png = (out / "redteam_data.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    assert result["files"]["png"] == str(out / "redteam_data.png")
    assert not list(out.glob(".*.tmp"))


def test_targets_are_judged_from_the_counts():
    def met(stopped, sent, flagged, clean, target):
        return R._row("a", "poisoning", "d", "samples", sent, stopped, clean, flagged,
                      stopped > 0, "", target, 0.0, {})["target_met"]

    assert met(95, 100, 1, 100, R.POISON) is True
    assert met(94, 100, 0, 100, R.POISON) is False
    assert met(100, 100, 2, 100, R.POISON) is False
    assert met(99, 100, 0, 100, R.DETECT_ALL) is False
    assert met(99, 100, 0, 100, R.LEAK) is True
    assert met(0, 10, 0, 10, None) is None


def test_unknown_scale_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="scale"):
        R.run_data_redteam(tmp_path, scale="huge")


def _parse(argv):
    p = argparse.ArgumentParser(prog="roadshield")
    add_redteam_parsers(p.add_subparsers(dest="command", required=True))
    return p.parse_args(argv)


@pytest.mark.parametrize("all_met", [True, False])
def test_cli_exit_code_follows_the_targets(run, monkeypatch, capsys, tmp_path, all_met):
    _, result = run
    fake = dict(result, all_targets_met=all_met,
                missed=[] if all_met else ["label_flip_3%: stopped 4/6 (target >= 95%)"])
    seen = {}

    def fake_run(out, seed, scale, progress):
        seen.update(out=out, seed=seed, scale=scale)
        return fake

    monkeypatch.setattr(R, "run_data_redteam", fake_run)
    args = _parse(["redteam", "data", "--out", str(tmp_path), "--scale", "tiny", "--seed", "3"])
    assert args.func(args) == (0 if all_met else EXIT_TARGET_MISSED)
    assert seen == {"out": str(tmp_path), "seed": 3, "scale": "tiny"}
    text = capsys.readouterr().out
    assert "forged_signature" in text
    assert ("label_flip_3%: stopped 4/6" in text) is (not all_met)
    args = _parse(["redteam", "data", "--out", str(tmp_path), "--json"])
    assert args.func(args) == (0 if all_met else EXIT_TARGET_MISSED)
    assert json.loads(capsys.readouterr().out)["all_targets_met"] is all_met
