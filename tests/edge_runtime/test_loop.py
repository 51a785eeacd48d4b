"""The edge run loop end to end with a colour-reading fake classifier and drawn frames."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from toy_data import fake_runner_base

from actuator.interface import RecordingActuator
from edge_runtime.annotate import VideoAnnotator, annotate
from edge_runtime.frames import Frame, FrameSource, SignTruth
from edge_runtime.locate import SignLocator
from edge_runtime.loop import EdgeLoop, LoopReport, build_loop, softmax
from edge_runtime.policy import SignRulesPolicy
from edge_runtime.runners.base import BaseRunner
from roadshield_base.errors import ConfigError

CLASSES = ("stop", "ahead_only", "priority_road", "speed_limit_30")
SIZE = 24
H, W = 240, 320
RED, BLUE, YELLOW, WHITE = (30, 30, 200), (170, 90, 10), (0, 200, 250), (245, 245, 245)


class ColourRunner(fake_runner_base()):
    """Reads the mean colour of the ROI's centre: red -> stop, blue -> ahead_only,
    yellow -> priority_road. Input (N, 3, S, S) RGB in [0, 1]; output logits (N, 4)."""

    name = "colour-fake"

    def __init__(self, fail_on_call: int | None = None) -> None:
        super().__init__()
        self.calls = 0
        self.fail_on_call = fail_on_call

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("engine lost")
        x = feed["input"]
        c = x.shape[2] // 4
        r, g, b = (x[:, k, c:-c, c:-c].mean(axis=(1, 2)) for k in range(3))
        logits = np.stack([r - np.maximum(g, b), b - np.maximum(r, g),
                           np.minimum(r, g) - b, np.full_like(r, -0.5)], axis=1)
        return {"logits": (8.0 * logits).astype(np.float32)}


def preprocess(frame: np.ndarray, boxes: list[tuple[int, int, int, int]],
               size: int) -> np.ndarray:
    out = np.empty((len(boxes), 3, size, size), np.float32)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        roi = cv2.resize(frame[y0:y1, x0:x1], (size, size))
        out[i] = roi[:, :, ::-1].transpose(2, 0, 1) / 255.0
    return out


class ListSource(FrameSource):
    def __init__(self, frames: list[Frame], interrupt_at: int | None = None) -> None:
        self.uri = "list://test"
        self.frames = frames
        self.interrupt_at = interrupt_at
        self.closed = False
        self.frame_count = len(frames)

    def __iter__(self) -> Iterator[Frame]:
        for frame in self.frames:
            if frame.index == self.interrupt_at:
                raise KeyboardInterrupt
            yield frame

    def close(self) -> None:
        self.closed = True


def scene(sign: str | None, at: tuple[int, int] = (160, 110),
          side: int = 50) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A grey road frame with one sign: "red"/"blue" disc or "yellow" diamond."""
    img = np.full((H, W, 3), 115, np.uint8)
    img[: H // 3] = (230, 200, 160)  # sky
    cx, cy = at
    r = side // 2
    if sign in ("red", "blue"):
        cv2.circle(img, (cx, cy), r, RED if sign == "red" else BLUE, -1, cv2.LINE_AA)
    elif sign == "yellow":
        outer = np.array([[cx - r, cy], [cx, cy - r], [cx + r, cy], [cx, cy + r]], np.int32)
        cv2.fillPoly(img, [outer], WHITE)
        cv2.fillPoly(img, [(outer - [cx, cy]) * 65 // 100 + [cx, cy]], YELLOW)
    return img, (cx - r, cy - r, cx + r + 1, cy + r + 1)


def frame(i: int, sign: str | None, truth: str | None = None, stickered: bool = False,
          truth_box: tuple[int, int, int, int] | None = None, dt: float = 0.1) -> Frame:
    img, box = scene(sign)
    t = SignTruth(truth, truth_box or box, stickered) if truth else None
    return Frame(img, i, i * dt, t)


def make_loop(frames: list[Frame], tmp_path: Path, runner: BaseRunner | None = None,
              **kw: object) -> tuple[EdgeLoop, RecordingActuator]:
    actuator = RecordingActuator()
    loop = EdgeLoop(ListSource(frames), SignLocator(), preprocess, runner or ColourRunner(),
                    CLASSES, SIZE, kw.pop("policy", SignRulesPolicy(clear_after_s=1.0)),
                    actuator, decision_log=tmp_path / "decisions.jsonl", **kw)  # type: ignore[arg-type]
    return loop, actuator


def test_end_to_end_stop_then_relax(tmp_path: Path) -> None:
    # six frames with a stop sign 0.25 s apart, then ten without
    frames = [frame(i, "red", "stop", dt=0.25) for i in range(6)]
    frames += [frame(i, None, dt=0.25) for i in range(6, 16)]
    loop, actuator = make_loop(frames, tmp_path)
    report = loop.run(progress=False)
    sent = [(c.command.speed_cap_kmh, c.command.brake) for c in actuator.commands]
    assert sent == [(0.0, 1.0), (50.0, 0.0)]  # full brake on the 3rd vote, relax after 1 s
    assert (report.frames, report.frames_with_detection) == (16, 6)
    assert (report.commands_sent, report.keepalives_sent, report.decisions) == (2, 0, 7)
    for stage in ("read", "locate", "preprocess", "infer", "decide", "actuate", "frame"):
        assert report.stages[stage]["median_ms"] >= 0.0
        assert report.stages[stage]["p95_ms"] >= report.stages[stage]["median_ms"]
    assert report.stages["locate"]["count"] == 16 and report.stages["infer"]["count"] == 6
    assert report.fps > 0 and report.runner == "colour-fake" and report.source == "list://test"
    assert report.truth is not None
    assert report.truth["locator_recall"] == 1.0 and report.truth["accuracy"] == 1.0
    assert [(e["class_name"], e["expected"], e["right"]) for e in report.encounters] == [
        ("stop", "stop", True)]
    lines = (tmp_path / "decisions.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["action"] for r in records] == ["hold", "hold", "stop", "keep", "keep", "keep",
                                              "relax"]
    assert records[2]["sent"] and records[2]["command"]["brake"] == 1.0
    assert records[2]["predictions"][0]["class_name"] == "stop" and records[2]["frame"] == 2
    json.dumps(report.to_dict())
    report.write_json(tmp_path / "summary.json")
    assert json.loads((tmp_path / "summary.json").read_text())["frames"] == 16
    # the decision log is append-only: a second run adds its lines after the first's
    make_loop(frames[:3], tmp_path)[0].run(progress=False)
    assert len((tmp_path / "decisions.jsonl").read_text().splitlines()) == 10


def test_truth_scoring_hand_built_case(tmp_path: Path) -> None:
    frames = [
        frame(0, "red", "stop"),                         # located, right
        frame(1, "red", "stop", stickered=True),         # located, right
        frame(2, "blue", "stop", stickered=True),        # located, read as ahead_only
        frame(3, "red", "stop", truth_box=(250, 170, 300, 220)),  # truth elsewhere: missed
        frame(4, "red"),                                 # no truth, yet a detection
        frame(5, None),
        *(frame(i, "yellow", "priority_road") for i in (6, 7, 8)),  # right: nothing to do
        *(frame(i, "red", "speed_limit_30") for i in (9, 10, 11)),  # read as stop: wrong
    ]
    loop, actuator = make_loop(frames, tmp_path)
    report = loop.run(progress=False)
    truth = report.truth
    assert truth is not None
    assert truth["frames_with_truth"] == 10 and truth["located"] == 9
    assert truth["locator_recall"] == pytest.approx(0.9)
    assert (truth["classified"], truth["correct"]) == (9, 5)
    assert truth["accuracy"] == pytest.approx(5 / 9)
    # the three speed limits were read as stop: read_as says what each sign was taken for
    assert truth["clean"] == {"classified": 7, "correct": 4, "accuracy": pytest.approx(4 / 7),
                              "read_as": {"priority_road": 3, "stop": 4}}
    assert truth["stickered"] == {"classified": 2, "correct": 1, "accuracy": 0.5,
                                  "read_as": {"ahead_only": 1, "stop": 1}}
    assert (truth["frames_without_truth"], truth["false_detection_frames"]) == (2, 1)
    assert (truth["encounters"], truth["encounters_right"]) == (3, 2)
    # the stop came on frame 3 (votes: stop, stop, ahead_only, stop)
    assert [c.command.brake for c in actuator.commands] == [1.0]
    assert [(e["class_name"], e["first_frame"], e["last_frame"], e["stickered"], e["right"])
            for e in report.encounters] == [("stop", 0, 3, True, True),
                                            ("priority_road", 6, 8, False, True),
                                            ("speed_limit_30", 9, 11, False, False)]


def test_runner_error_triggers_safe_stop(tmp_path: Path) -> None:
    runner = ColourRunner(fail_on_call=3)
    loop, actuator = make_loop([frame(i, "red", "stop") for i in range(6)], tmp_path, runner)
    with pytest.raises(RuntimeError, match="engine lost"):
        loop.run(progress=False)
    assert len(actuator.safe_stops) == 1 and "RuntimeError: engine lost" in actuator.safe_stops[0]
    assert actuator.commands[-1].command.brake == 1.0
    assert not runner.is_active  # the loop activated it, so it released it too


def test_ctrl_c_triggers_safe_stop(tmp_path: Path) -> None:
    actuator = RecordingActuator()
    source = ListSource([frame(i, "red") for i in range(5)], interrupt_at=2)
    loop = EdgeLoop(source, SignLocator(), preprocess, ColourRunner(), CLASSES, SIZE,
                    SignRulesPolicy(), actuator)
    with pytest.raises(KeyboardInterrupt):
        loop.run(progress=False)
    assert actuator.safe_stops == ["edge loop stopped by KeyboardInterrupt"]
    assert loop.last_report is not None and loop.last_report.frames == 2
    assert loop.last_report.interrupted == "KeyboardInterrupt"
    loop.close()
    assert source.closed


def test_keepalive_resends_the_standing_command(tmp_path: Path) -> None:
    loop, actuator = make_loop([frame(i, "red") for i in range(5)], tmp_path,
                               keepalive_s=1e-9)
    report = loop.run(progress=False)
    assert (report.commands_sent, report.keepalives_sent) == (1, 4)
    assert [c.command.speed_cap_kmh for c in actuator.commands] == [50, 50, 0, 0, 0]


def test_wrong_class_count_is_a_config_error(tmp_path: Path) -> None:
    actuator = RecordingActuator()
    loop = EdgeLoop(ListSource([frame(0, "red")]), SignLocator(), preprocess, ColourRunner(),
                    CLASSES[:3], SIZE, SignRulesPolicy(), actuator)
    with pytest.raises(ConfigError, match="model gives 4 scores but 3 class names"):
        loop.run(progress=False)
    assert actuator.safe_stops  # a configuration error mid-run still brakes


def test_annotated_video(tmp_path: Path) -> None:
    frames = [frame(i, "red", "stop", stickered=True) for i in range(4)]
    out = tmp_path / "run" / "annotated.avi"
    with VideoAnnotator(out, fps=5) as video:
        loop, _ = make_loop(frames, tmp_path, annotator=video)
        report = loop.run(progress=False)
    assert report.stages["annotate"]["count"] == 4
    cap = cv2.VideoCapture(str(out))
    count = 0
    while cap.read()[0]:
        count += 1
    cap.release()
    assert count == 4
    assert not list(out.parent.glob(".*partial*"))  # the temporary file was moved into place
    with pytest.raises(ConfigError, match="name the file .mp4 or .avi"):
        VideoAnnotator(tmp_path / "x.gif")


def test_annotate_draws_without_touching_the_input() -> None:
    img, box = scene("red")
    before = img.copy()
    from edge_runtime.locate import Candidate
    from edge_runtime.policy import Decision, Prediction

    out = annotate(img, [Candidate(box, 0.9, "red")], [Prediction(box, 0, "stop", 0.97)],
                   Decision("stop", "stop", 0.97, None, "test"), SignTruth("stop", box, True))
    assert np.array_equal(img, before)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert (out != img).any(axis=2).sum() > 500


def test_softmax_is_stable() -> None:
    p = softmax(np.array([[1000.0, 0.0, -1000.0], [1.0, 1.0, 1.0]], np.float32))
    assert np.allclose(p.sum(axis=1), 1.0) and p[0, 0] == pytest.approx(1.0)
    assert np.allclose(p[1], 1 / 3)


def test_build_loop_with_the_onnx_backend(tiny_onnx: Path, tiny: object,
                                          tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(5):
        assert cv2.imwrite(str(folder / f"{i}.png"), scene("red" if i < 3 else None)[0])
    with build_loop(str(folder), tiny_onnx, decision_log=tmp_path / "log.jsonl") as loop:
        assert loop.class_names == list(tiny.classes)  # type: ignore[attr-defined]
        report = loop.run(progress=False)
    assert isinstance(report, LoopReport)
    assert (report.frames, report.frames_with_detection) == (5, 3)
    assert report.stages["infer"]["count"] == 3
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) >= 3
