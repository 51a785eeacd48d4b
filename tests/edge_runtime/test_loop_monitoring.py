"""The edge loop with its watch: detectors that take a crop's vote away, the caution gate
that caps the speed, the decision log's caution lines, and the metrics it exports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_loop import CLASSES, SIZE, ColourRunner, frame, make_loop, preprocess

from edge_runtime.caution import CautionGate
from edge_runtime.detectors import DetectorSet, FeatureSqueezing
from edge_runtime.drift import DriftConfig, DriftMonitor, DriftReference, ReferenceBuilder
from edge_runtime.frames import Frame
from edge_runtime.locate import SignLocator
from edge_runtime.loop import softmax
from edge_runtime.monitoring import Monitoring, Series
from edge_runtime.policy import MonitorPolicy, SignRulesPolicy
from roadshield_base.errors import ConfigError

SMALL_DRIFT = DriftConfig(frame_window=20, dark_window=10, crop_window=12, check_every=5,
                          calibration_folds=2)


def squeezing(threshold: float) -> DetectorSet:
    return DetectorSet(FeatureSqueezing(threshold=threshold))


def test_flagged_crops_do_not_vote_and_caution_caps_the_speed(tmp_path: Path) -> None:
    # a threshold of -1 flags every crop: nothing votes, and after the window the car slows
    frames = [frame(i, "red", "stop") for i in range(6)]
    loop, actuator = make_loop(frames, tmp_path, ColourRunner(),
                               policy=SignRulesPolicy(max_speed_kmh=50, slow_kmh=20),
                               monitoring=Monitoring(squeezing(-1.0),
                                                     caution=CautionGate(4, 0.5, 0.1)))
    report = loop.run(progress=False)
    assert report.stages["infer"]["count"] == 6  # the squeezed copies ride in that call
    sent = [(c.command.speed_cap_kmh, c.command.brake) for c in actuator.commands]
    assert sent == [(20.0, 0.0)]  # no stop was voted; caution capped the speed
    assert "cautious" in actuator.commands[0].command.reason
    records = [json.loads(x) for x in (tmp_path / "decisions.jsonl").read_text().splitlines()]
    assert all(r["predictions"][0]["flagged"] for r in records)
    assert all(set(r["predictions"][0]["scores"]) == {"squeeze"} for r in records)
    caution = [r for r in records if "caution" in r]
    assert [(r["frame"], r["caution"]["state"], r["caution"]["sent"]) for r in caution] == [
        (3, "on", True)]
    mon = report.monitor
    assert mon is not None and (mon["scored"], mon["flagged"], mon["flag_rate"]) == (6, 6, 1.0)
    assert mon["flagged_by"] == {"squeeze": 6} and mon["caution_events"][0]["state"] == "on"
    assert len(mon["series"]["score:squeeze"]) == 6 and len(mon["series"]["flag_rate"]) == 6
    assert report.stages["detect"]["count"] == 6


def test_unflagged_crops_vote_as_before(tmp_path: Path) -> None:
    frames = [frame(i, "red", "stop") for i in range(4)]
    loop, actuator = make_loop(frames, tmp_path, monitoring=Monitoring(squeezing(10.0)))
    report = loop.run(progress=False)
    assert [(c.command.speed_cap_kmh, c.command.brake) for c in actuator.commands] == [
        (0.0, 1.0)]
    assert report.monitor is not None and report.monitor["flagged"] == 0
    assert report.truth is not None and report.truth["accuracy"] == 1.0


def test_without_monitoring_the_report_has_no_monitor_section(tmp_path: Path) -> None:
    loop, _ = make_loop([frame(0, "red", "stop")], tmp_path)
    assert loop.run(progress=False).monitor is None


def test_a_policy_that_cannot_go_cautious_is_refused(tmp_path: Path) -> None:
    class Plain:
        def decide(self, observation: object) -> object: ...

        def reset(self) -> None: ...

    with pytest.raises(ConfigError, match="cannot go cautious"):
        make_loop([], tmp_path, policy=Plain(),
                  monitoring=Monitoring(squeezing(0.1), caution=CautionGate()))
    make_loop([], tmp_path, policy=MonitorPolicy(),
              monitoring=Monitoring(squeezing(0.1), caution=CautionGate()))


def test_metrics_see_frames_crops_flags_and_decisions(tmp_path: Path) -> None:
    from edge_runtime.metrics import EdgeMetrics

    metrics = EdgeMetrics(None)
    frames = [frame(i, "red", "stop") for i in range(3)] + [frame(3, None)]
    loop, _ = make_loop(frames, tmp_path, monitoring=Monitoring(squeezing(-1.0),
                                                                metrics=metrics))
    loop.run(progress=False)
    text = metrics.render()

    def value(line_start: str) -> float:
        line = next(x for x in text.splitlines() if x.startswith(line_start))
        return float(line.rsplit(" ", 1)[1])

    assert value("roadshield_edge_frames_total") == 4
    assert value("roadshield_edge_crops_classified_total") == 3
    assert value('roadshield_edge_detector_flags_total{detector="squeeze"}') == 3
    assert value('roadshield_edge_decisions_total{action="hold"}') == 3
    assert value('roadshield_edge_stage_latency_seconds_count{stage="detect"}') == 3
    assert value("roadshield_edge_actuator_up") == 1


def test_series_thin_by_halves_and_keep_the_whole_run() -> None:
    s = Series(limit=8)
    for i in range(100):
        s.add(i, i * 2)
    frames = [p[0] for p in s.points]
    assert len(frames) <= 8 and frames[0] == 0 and frames[-1] >= 80
    assert len(set(np.diff(frames))) == 1  # evenly spaced after thinning


def drift_reference(frames: list[Frame]) -> DriftReference:
    """A reference recorded from ``frames`` as the loop cuts and classifies them."""
    builder = ReferenceBuilder(brightness_stride=SMALL_DRIFT.brightness_stride)
    locator = SignLocator()
    with ColourRunner() as runner:
        for f in frames:
            _observe(builder, runner, locator, f)
    return builder.build(len(CLASSES), SMALL_DRIFT)


def _observe(builder: ReferenceBuilder, runner: ColourRunner, locator: SignLocator,
             f: Frame) -> None:
    builder.observe_frame(f.image)
    boxes = [c.box for c in locator(f.image)]
    if boxes:
        batch = preprocess(f.image, boxes, SIZE)
        builder.observe_crops(batch, softmax(runner.infer({"input": batch})["logits"]))


def test_a_darker_road_raises_a_drift_alarm_in_the_log_and_the_report(tmp_path: Path) -> None:
    signs = ("red", "blue", "yellow", None)
    clean = [frame(i, signs[i % 4]) for i in range(200)]
    monitor = DriftMonitor(drift_reference(clean))
    dark = [Frame((f.image * 0.5).astype(np.uint8), i, i * 0.1, None)
            for i, f in enumerate(clean[:60])]
    loop, _ = make_loop(dark, tmp_path, monitoring=Monitoring(drift=monitor))
    report = loop.run(progress=False)
    records = [json.loads(x) for x in (tmp_path / "decisions.jsonl").read_text().splitlines()]
    events = [e for r in records for e in r.get("drift", [])]
    assert events and {e["statistic"] for e in events} >= {"frame_brightness"}
    first = events[0]
    assert first["state"] == "on" and first["value"] > first["threshold"]
    mon = report.monitor
    assert mon is not None and mon["drift"] and "frame_brightness" in mon["drift_alarms"]
    assert mon["drift_events"][0] == first
    assert any(name.startswith("drift:") for name in mon["series"])
