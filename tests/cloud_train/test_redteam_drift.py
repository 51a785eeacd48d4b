"""The drift scenario rows: frame changes before the locator, the count from the onset, a
clean stream without alarms, a strong change that alarms, and the report's drift section."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_redteam_inference import _result, _row

from cloud_train.redteam_drift import (  # noqa: E402
    RAMP_FRAMES,
    Scenario,
    default_scenarios,
    drift_scenarios,
    gain,
    lift,
    ramped,
    scenario_row,
)
from cloud_train.redteam_inference_report import (  # noqa: E402
    chart_png,
    check_targets,
    markdown,
    text_table,
)
from distill.stream import stream_crops  # noqa: E402
from edge_runtime.drift import DriftConfig, DriftEvent  # noqa: E402
from roadshield_base.errors import RoadshieldError  # noqa: E402

# small windows; a wide margin keeps a 400-frame reference from alarming on clean drives
SMALL = DriftConfig(frame_window=60, dark_window=30, crop_window=24, check_every=5,
                    calibration_folds=2, margin=1.5)
SIZES = {"seed": 0, "reference_frames": 400, "clean_frames": 400, "scenario_frames": 160,
         "onset": 80}
STRONG = Scenario("strong_lift", "+100 grey levels at once", lambda t, img: lift(100)(1.0, img))


@pytest.fixture(scope="module")
def sticker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cloud_train.sticker.printout import write_sticker

    colours = np.zeros((128, 128, 3), np.uint8)
    colours[..., 1] = 255
    mask = np.zeros((128, 128), bool)
    mask[40:80, 40:80] = True
    out = tmp_path_factory.mktemp("sticker") / "green"
    write_sticker(out, colours, mask, sign="stop", target="yield", shape="square",
                  sign_mm=600, dpi=50)
    return out


@pytest.fixture(scope="module")
def run(tiny_onnx: Path, sticker_dir: Path) -> dict[str, Any]:
    scenarios = (*default_scenarios(sticker_dir), STRONG)
    return drift_scenarios(tiny_onnx, **SIZES, sticker_dir=sticker_dir, config=SMALL,
                           progress=False, scenarios=scenarios)


# --- frame changes --------------------------------------------------------------------------


def test_changes_round_clip_and_ramp() -> None:
    img = np.array([[[0, 100, 250]]], np.uint8)
    assert gain(1.15)(1.0, img).tolist() == [[[0, 115, 255]]]
    assert lift(38)(0.5, img).tolist() == [[[19, 119, 255]]]
    seen = []
    transform = ramped(lambda t, im: seen.append(t) or im, onset=10)
    for i in (0, 9, 10, 11, 10 + RAMP_FRAMES - 1, 10 + 5 * RAMP_FRAMES):
        transform(i, img)
    assert seen == [1 / RAMP_FRAMES, 2 / RAMP_FRAMES, 1.0, 1.0]


def test_stream_crops_changes_the_frame_before_the_locator(tiny_onnx: Path) -> None:
    source = "synthetic://?seed=3&frames=40&sticker_rate=0"
    plain = list(stream_crops(tiny_onnx, source, progress=False))
    dark = list(stream_crops(tiny_onnx, source, progress=False,
                             transform=lambda i, im: im if i < 20 else im // 4))
    for (f, b), (g, c) in zip(plain, dark, strict=True):
        if f.index < 20:
            assert np.array_equal(f.image, g.image) and (b is None) == (c is None)
        else:  # the yielded frame and its crops are the darkened ones
            assert np.array_equal(g.image, f.image // 4)
            assert c is None or c.max() <= 64 / 255 + 1e-6


# --- counting -------------------------------------------------------------------------------


def _event(frame: int, statistic: str, state: str = "on") -> DriftEvent:
    return DriftEvent(statistic, "ks", 1.0, 0.5, frame, state)


def test_frames_to_alarm_count_from_the_onset() -> None:
    on = [_event(30, "crop_r"), _event(75, "frame_dark"), _event(75, "crop_b"),
          _event(90, "confidence")]
    row = scenario_row(STRONG, 60, 200, on)
    assert row == {"name": "strong_lift", "description": "+100 grey levels at once",
                   "onset": 60, "frames": 200, "alarmed": True, "frames_to_alarm": 15,
                   "first_statistics": ["crop_b", "frame_dark"],
                   "false_alarm_before_onset": True}
    quiet = scenario_row(STRONG, 60, 200, on[:1])
    assert (quiet["alarmed"], quiet["frames_to_alarm"], quiet["first_statistics"]) == (
        False, None, [])


def test_bad_sizes_and_a_bad_sticker_fail_before_the_reference(tiny_onnx: Path,
                                                                tmp_path: Path) -> None:
    with pytest.raises(RoadshieldError, match="onset"):
        drift_scenarios(tiny_onnx, **{**SIZES, "onset": 160}, sticker_dir=tmp_path,
                        config=SMALL, progress=False)
    with pytest.raises(RoadshieldError, match="sticker"):
        drift_scenarios(tiny_onnx, **SIZES, sticker_dir=tmp_path / "missing", config=SMALL,
                        progress=False)


# --- the run ---------------------------------------------------------------------------------


def test_the_run_is_json_and_follows_its_sizes(run: dict[str, Any]) -> None:
    assert json.loads(json.dumps(run)) == run
    ref = run["reference"]
    assert ref["frames"] == SIZES["reference_frames"] and ref["crops"] > SMALL.crop_window
    assert "seed=1000&" in ref["source"] and run["config"] == asdict(SMALL)
    assert [r["name"] for r in run["scenarios"]] == [
        "control", "brightness_gain", "brightness_lift", "fog", "sticker_campaign",
        "random_stickers", "one_class",
        "strong_lift"]
    for r in run["scenarios"]:
        assert (r["onset"], r["frames"]) == (SIZES["onset"], SIZES["scenario_frames"])
        assert r["alarmed"] == (r["frames_to_alarm"] is not None) == bool(r["first_statistics"])
        if r["alarmed"]:
            assert 0 <= r["frames_to_alarm"] < SIZES["scenario_frames"] - SIZES["onset"]


def test_a_clean_stream_raises_no_false_alarm(run: dict[str, Any]) -> None:
    fa = run["false_alarms"]
    assert fa["frames"] == SIZES["clean_frames"] and fa["seeds"] == [1002]
    assert (fa["alarms"], fa["per_10k"], fa["statistics"]) == (0, 0.0, {})


def test_a_strong_brightness_lift_alarms_after_the_onset(run: dict[str, Any]) -> None:
    row = run["scenarios"][-1]
    assert row["alarmed"] and not row["false_alarm_before_onset"]
    # the onset's frames are the clean drive's: no alarm can come at the onset itself
    assert 0 < row["frames_to_alarm"] <= SMALL.frame_window + SMALL.on_after * SMALL.check_every


# --- the report -----------------------------------------------------------------------------


def _scenario(name: str, frames_to_alarm: int | None, early: bool = False) -> dict[str, Any]:
    return {"name": name, "description": name, "onset": 300, "frames": 1500,
            "alarmed": frames_to_alarm is not None, "frames_to_alarm": frames_to_alarm,
            "first_statistics": ["frame_brightness"] if frames_to_alarm is not None else [],
            "false_alarm_before_onset": early}


def _drift(gain_frames: int | None, lift_frames: int | None, alarms: int) -> dict[str, Any]:
    return {"reference": {"frames": 6000, "crops": 2700, "seed": 1000,
                          "source": "synthetic://?seed=1000&frames=6000&sticker_rate=0"},
            "config": asdict(DriftConfig()),
            "false_alarms": {"frames": 10000, "alarms": alarms, "per_10k": float(alarms),
                             "statistics": {"crop_r": alarms} if alarms else {},
                             "seeds": [1002, 1003]},
            "scenarios": [_scenario("brightness_gain", gain_frames),
                          _scenario("brightness_lift", lift_frames),
                          _scenario("fog", None, early=True)],
            "seconds": 60.0}


def _with_drift(drift: dict[str, Any]) -> dict[str, Any]:
    res = _result(_row("a", 0.99, 0.02, 0.08))
    res["drift"] = drift
    return res


def test_drift_targets_met() -> None:
    res = _with_drift(_drift(240, 280, alarms=1))
    check_targets(res)
    assert res["all_targets_met"], res["missed"]
    assert res["targets_checked"] == 8
    t = res["drift"]["targets"]
    assert t["alarm"]["met"] and t["false_alarms"]["met"]
    md = markdown(res)
    assert "## Drift monitor" in md
    assert "| brightness_gain | brightness_gain | 300/1500 | yes | 240 | frame_brightness | no |" \
        in md
    assert "| fog | fog | 300/1500 | no | - | - | yes |" in md
    assert "-> met" in text_table(res)
    assert chart_png(res)[:4] == b"\x89PNG"


def test_missed_drift_targets_name_the_scenarios() -> None:
    res = _with_drift(_drift(914, None, alarms=3))
    check_targets(res)
    assert res["missed"] == [
        "drift: brightness_gain: alarm 914 frames after the onset (frame_brightness); "
        "brightness_lift: no alarm in the 1200 frames after the onset (target: an alarm "
        "within 300 frames of the 15 % brightness shift)",
        "drift: 3 false alarms in 10,000 clean frames (3.00 per 10,000) (target <= 1 per "
        "10,000)"]
    assert "targets MISSED" in text_table(res) and "MISSED drift:" in markdown(res)
    assert chart_png(res)[:4] == b"\x89PNG"


def test_a_missing_scenario_row_is_a_miss() -> None:
    drift = _drift(100, 100, alarms=0)
    drift["scenarios"] = drift["scenarios"][1:]
    res = _with_drift(drift)
    check_targets(res)
    assert res["missed"] == [
        "drift: brightness_gain: no scenario row; brightness_lift: alarm 100 frames after "
        "the onset (frame_brightness) (target: an alarm within 300 frames of the 15 % "
        "brightness shift)"]


def test_an_old_result_without_drift_still_reports() -> None:
    res = _result(_row("a", 0.99, 0.02, 0.08))
    check_targets(res)
    assert res["targets_checked"] == 6 and "drift" not in res
    assert "Drift" not in markdown(res) and "drift" not in text_table(res)
    assert chart_png(res)[:4] == b"\x89PNG"
