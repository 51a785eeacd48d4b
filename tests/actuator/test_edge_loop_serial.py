"""The edge loop driving SerialActuator over a pty: a stop decision brakes the board."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest
from toy_data import fake_runner_base

from actuator import messages as m
from actuator.scenarios import TEST_KEY
from actuator.serial_actuator import SerialActuator
from actuator.simulator import PtySimulator
from edge_runtime.frames import Frame, FrameSource
from edge_runtime.locate import Candidate
from edge_runtime.loop import EdgeLoop
from edge_runtime.policy import SignRulesPolicy

CLASSES = ("stop", "priority_road")
SIZE = 8


class AlwaysStop(fake_runner_base()):
    """Logits that say "stop" for every ROI: (N, 3, S, S) in, (N, 2) out."""

    name = "always-stop"

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = feed["input"].shape[0]
        return {"logits": np.tile(np.array([[6.0, 0.0]], np.float32), (n, 1))}


class TimedFrames(FrameSource):
    """``count`` grey frames ``dt`` seconds apart in wall time; fails at ``fail_at``."""

    def __init__(self, count: int, dt: float, fail_at: int | None = None) -> None:
        self.uri, self.count, self.dt, self.fail_at = "timed://", count, dt, fail_at
        self.frame_count = count

    def __iter__(self) -> Iterator[Frame]:
        for i in range(self.count):
            if i == self.fail_at:
                raise RuntimeError("camera unplugged")
            time.sleep(self.dt)
            yield Frame(np.full((32, 32, 3), 100, np.uint8), i, i * self.dt)

    def close(self) -> None:
        self.count = 0


def locate(image: np.ndarray) -> list[Candidate]:
    return [Candidate((4, 4, 28, 28), 0.9, "red")]


def preprocess(image: np.ndarray, boxes: list, size: int) -> np.ndarray:
    return np.zeros((len(boxes), 3, size, size), np.float32)


def make_loop(source: FrameSource, act: SerialActuator) -> EdgeLoop:
    return EdgeLoop(source, locate, preprocess, AlwaysStop(), CLASSES, SIZE,
                    SignRulesPolicy(max_speed_kmh=50.0), act, keepalive_s=0.2)


def test_stop_decision_brakes_the_board_and_keepalive_holds_it():
    with PtySimulator(TEST_KEY) as sim, \
            SerialActuator(sim.port, TEST_KEY, max_speed_kmh=50.0) as act:
        report = make_loop(TimedFrames(16, 0.05), act).run(progress=False)
        assert report.commands_sent == 1 and report.keepalives_sent >= 1
        snap = sim.snapshot()
        # braking by command (armed, setpoint live), not by the safe-state latch
        assert (snap["state"], snap["sp"], snap["brake"], snap["thr"]) == \
            (m.STATE_ARMED, 1, 1000, 0)
        assert snap["accepted"] >= 3 and snap["bad_tag"] == snap["replay"] == 0


def test_a_loop_failure_latches_the_board_safe():
    with PtySimulator(TEST_KEY) as sim, \
            SerialActuator(sim.port, TEST_KEY, max_speed_kmh=50.0) as act:
        with pytest.raises(RuntimeError, match="camera unplugged"):
            make_loop(TimedFrames(8, 0.01, fail_at=5), act).run(progress=False)
        snap = sim.snapshot()
        assert (snap["state"], snap["fault"], snap["brake"]) == \
            (m.STATE_SAFE, m.FAULT_HOST_BRAKE, 1000)
