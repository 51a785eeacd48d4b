"""``build_loop`` owns what it opens: every part is closed once, last opened first, when a
later part fails to build, when the actuator refuses to arm, and when the loop closes; a
close that fails while an error propagates never replaces that error.

The parts are fakes that write "open <part>" / "close <part>" into one journal, put in
place of the factories ``build_loop`` calls (the runner registry, the camera opener, the
video writer, the metrics server, the decision log's ``open``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from toy_data import fake_runner_base

import edge_runtime.annotate as annotate_mod
import edge_runtime.loop as loop_mod
import edge_runtime.metrics as metrics_mod
import edge_runtime.runners.registry as registry
import edge_runtime.sanitize_cuda as sanitize_cuda
import edge_runtime.sources as sources
from actuator.interface import RecordingActuator
from edge_runtime.frames import Frame, FrameSource
from edge_runtime.loop import build_loop
from edge_runtime.model_info import ModelInfo
from edge_runtime.sanitize import create_sanitizer
from roadshield_base.errors import ActuatorError, CameraError, ConfigError, ModelLoadError

CLASSES = ("stop", "yield")
SIZE = 16
INFO = ModelInfo(class_names=CLASSES, input_size=SIZE, input_name="input",
                 output_name="logits", arch="fake", sha256="0" * 64)
#: the order build_loop opens its parts in (the chain only with sanitize=, and so on)
OPEN_ORDER = ["chain", "runner", "metrics", "video", "decision log", "camera"]


class Journal(list[str]):
    def opened(self) -> list[str]:
        return [e.split(" ", 1)[1] for e in self if e.startswith("open ")]

    def closed(self) -> list[str]:
        return [e.split(" ", 1)[1] for e in self if e.startswith("close ")]


class Parts:
    """The fakes and where each one fails: ``fail[step] = exception`` raises it when the
    part opens (``"arm"``: when the actuator arms), ``fail_close[part]`` when it closes."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.fail: dict[str, BaseException] = {}
        self.fail_close: dict[str, BaseException] = {}

    def opening(self, part: str) -> None:
        if part in self.fail:
            raise self.fail[part]
        self.journal.append(f"open {part}")

    def closing(self, part: str) -> None:
        self.journal.append(f"close {part}")
        if part in self.fail_close:
            raise self.fail_close[part]


@pytest.fixture
def parts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Parts]:
    journal = Journal()
    p = Parts(journal)

    class Runner(fake_runner_base()):
        name = "fake"

        def activate_impl(self) -> None:
            p.opening("runner")

        def deactivate_impl(self) -> None:
            p.closing("runner")

        def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {"logits": np.zeros((len(feed["input"]), len(CLASSES)), np.float32)}

        @property
        def model_info(self) -> ModelInfo:
            return INFO

    def create_runner(name: str, model_path: Any, **kw: Any) -> Runner:
        if "create runner" in p.fail:
            raise p.fail["create runner"]
        return Runner()

    class Source(FrameSource):
        uri = "fake://camera"

        def __iter__(self) -> Iterator[Frame]:
            yield from ()

        def close(self) -> None:
            p.closing("camera")

    def open_source(uri: str) -> Source:
        p.opening("camera")
        return Source()

    class Video:
        def __init__(self, path: Any, fps: float) -> None:
            p.opening("video")

        def write(self, frame: np.ndarray) -> None:
            pass

        def close(self) -> None:
            p.closing("video")

    class Metrics:
        url = "http://127.0.0.1:1/metrics"

        def __init__(self, port: int) -> None:
            pass

        def start(self) -> Metrics:
            p.opening("metrics")
            return self

        def close(self) -> None:
            p.closing("metrics")

    real_open = open

    class LogFile:
        def __init__(self, fh: Any) -> None:
            self._fh = fh

        def write(self, text: str) -> int:
            return int(self._fh.write(text))

        def flush(self) -> None:
            self._fh.flush()

        def close(self) -> None:
            self._fh.close()
            p.closing("decision log")

    def fake_open(path: Any, *args: Any, **kwargs: Any) -> LogFile:
        p.opening("decision log")
        return LogFile(real_open(path, *args, **kwargs))

    monkeypatch.setattr(registry, "create_runner", create_runner)
    monkeypatch.setattr(sources, "open_source", open_source)
    monkeypatch.setattr(annotate_mod, "VideoAnnotator", Video)
    monkeypatch.setattr(metrics_mod, "EdgeMetrics", Metrics)
    monkeypatch.setattr(loop_mod, "open", fake_open, raising=False)
    yield p


class ArmingActuator(RecordingActuator):
    """Records ``arm`` in the journal; raises ``fail`` instead when given."""

    def __init__(self, parts: Parts) -> None:
        super().__init__()
        self.parts = parts

    def arm(self) -> None:
        self.parts.opening("arm")


def _build(tmp_path: Path, parts: Parts, arm: bool = True, **kw: Any) -> Any:
    options: dict[str, Any] = dict(annotate_video=tmp_path / "out.mp4",
                                   decision_log=tmp_path / "log.jsonl", metrics_port=0,
                                   actuator=ArmingActuator(parts))
    if arm:
        options["arm_actuator"] = True
    options.update(kw)
    return build_loop("fake://camera", tmp_path / "model.onnx", **options)


def test_the_loop_closes_every_part_it_opened_last_first(parts: Parts, tmp_path: Path) -> None:
    loop = _build(tmp_path, parts)
    # the actuator is armed last, once everything it depends on is open
    assert parts.journal == [f"open {p}" for p in OPEN_ORDER[1:]] + ["open arm"]
    assert loop.runner.is_active  # activated here: its metadata gave the class names
    assert loop.class_names == list(CLASSES) and loop.input_size == SIZE
    with loop:
        loop.run(progress=False)
    assert parts.journal.closed() == OPEN_ORDER[1:][::-1]
    loop.close()  # a second close closes nothing twice
    assert parts.journal.closed() == OPEN_ORDER[1:][::-1]
    assert not loop.actuator.closed  # the caller's actuator stays the caller's


@pytest.mark.parametrize("step, error", [
    ("create runner", ModelLoadError("model.onnx is corrupt")),
    ("runner", ModelLoadError("cannot load model.onnx")),
    ("metrics", OSError("address in use")),
    ("video", ConfigError("cannot open a video writer")),
    ("decision log", PermissionError("read-only folder")),
    ("camera", CameraError("cannot open camera source 'fake://camera'")),
    ("arm", ActuatorError("the board refused to arm")),
    ("arm", KeyboardInterrupt()),
])
def test_a_part_that_fails_closes_everything_opened_before_it(
        parts: Parts, tmp_path: Path, step: str, error: BaseException) -> None:
    parts.fail[step] = error
    with pytest.raises(type(error)) as caught:
        _build(tmp_path, parts, arm=step == "arm")
    assert caught.value is error  # the original error, not one raised while cleaning up
    opened = parts.journal.opened()
    assert step not in opened
    assert parts.journal.closed() == opened[::-1]  # each once, last opened first
    if step == "arm":
        assert opened == OPEN_ORDER[1:]


def test_a_close_that_fails_during_unwinding_does_not_hide_the_error(
        parts: Parts, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    camera_error = CameraError("cannot open camera source 'fake://camera'")
    parts.fail["camera"] = camera_error
    parts.fail_close["video"] = OSError("disk full while finishing the video")
    parts.fail_close["runner"] = RuntimeError("device lost")
    with caplog.at_level(logging.ERROR, logger="edge_runtime.loop"), \
            pytest.raises(CameraError) as caught:
        _build(tmp_path, parts, arm=False)
    assert caught.value is camera_error
    # the closers after the failing ones still ran
    assert parts.journal.closed() == ["decision log", "video", "metrics", "runner"]
    logged = caplog.text
    assert "closing the annotated video failed" in logged and "disk full" in logged
    assert "device lost" in logged
    if sys.version_info >= (3, 11):
        notes = getattr(caught.value, "__notes__", [])
        assert any("disk full" in n for n in notes) and any("device lost" in n for n in notes)


def test_a_run_error_survives_a_failing_close(parts: Parts, tmp_path: Path) -> None:
    parts.fail_close["camera"] = OSError("camera hung on release")
    loop = _build(tmp_path, parts)
    run_error = RuntimeError("engine lost")
    with pytest.raises(RuntimeError) as caught, loop:
        raise run_error
    assert caught.value is run_error
    assert parts.journal.closed() == OPEN_ORDER[1:][::-1]


def test_a_failing_close_without_an_error_is_raised_after_the_rest_closed(
        parts: Parts, tmp_path: Path) -> None:
    parts.fail_close["video"] = OSError("disk full while finishing the video")
    loop = _build(tmp_path, parts)
    with pytest.raises(OSError, match="disk full"):
        loop.close()
    assert parts.journal.closed() == OPEN_ORDER[1:][::-1]


def test_arm_needs_an_actuator_that_arms(parts: Parts, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="has no arm"):
        _build(tmp_path, parts, actuator=RecordingActuator())
    assert parts.journal == []  # refused before anything opened


# -- the CUDA sanitizer chain ------------------------------------------------------------------
class FakeLauncher:
    """Records allocations; ``free`` fails when told to (a context gone bad)."""

    def __init__(self, parts: Parts, fail_free: bool = False) -> None:
        self.parts = parts
        self.fail_free = fail_free
        self.live: set[int] = set()
        self.closed = 0
        self.parts.opening("chain")

    def alloc(self, nbytes: int) -> int:
        address = 256 * (len(self.live) + 1)
        self.live.add(address)
        return address

    def free(self, address: int) -> None:
        if self.fail_free:
            raise RuntimeError("cuMemFree failed")
        self.live.discard(address)

    def create_stream(self) -> str:
        return "stream"

    def destroy_stream(self, stream: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def close(self) -> None:
        self.closed += 1
        self.parts.closing("chain")


@pytest.fixture
def cuda_launcher(parts: Parts, monkeypatch: pytest.MonkeyPatch) -> list[FakeLauncher]:
    made: list[FakeLauncher] = []

    def create_launcher(*args: Any) -> FakeLauncher:
        made.append(FakeLauncher(parts))
        return made[-1]

    monkeypatch.setattr(sanitize_cuda, "create_launcher", create_launcher)
    monkeypatch.setattr(sanitize_cuda, "CudaKernels", lambda launcher, build_dir: object())
    return made


@pytest.mark.parametrize("step", ["runner", "camera", "arm"])
def test_the_cuda_chain_is_closed_when_a_later_part_fails(
        parts: Parts, cuda_launcher: list[FakeLauncher], tmp_path: Path, step: str) -> None:
    parts.fail[step] = CameraError("boom") if step == "camera" else ModelLoadError("boom")
    with pytest.raises(type(parts.fail[step])):
        _build(tmp_path, parts, arm=step == "arm", sanitize="cuda:bitdepth:bits=5,median:k=3")
    assert len(cuda_launcher) == 1 and cuda_launcher[0].closed == 1
    assert parts.journal.opened()[0] == "chain"
    assert parts.journal.closed() == parts.journal.opened()[::-1]


def test_the_cuda_chain_closes_with_the_loop(parts: Parts, cuda_launcher: list[FakeLauncher],
                                             tmp_path: Path) -> None:
    with _build(tmp_path, parts, sanitize="cuda:bitdepth:bits=5"):
        pass
    assert parts.journal.closed() == OPEN_ORDER[::-1]


def test_a_bad_cuda_spec_is_refused_before_a_launcher_exists(
        parts: Parts, cuda_launcher: list[FakeLauncher], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no GPU kernel"):
        _build(tmp_path, parts, arm=False, sanitize="cuda:resize_pad")
    assert cuda_launcher == [] and parts.journal == []


def test_cuda_chain_close_releases_the_launcher_even_when_a_free_fails(
        parts: Parts, cuda_launcher: list[FakeLauncher]) -> None:
    chain = sanitize_cuda.CudaSanitizeChain([create_sanitizer("bitdepth", bits="5")])
    launcher = cuda_launcher[0]
    launcher.fail_free = True
    chain._buffer("frame", 1024, "stream")
    with pytest.raises(RuntimeError, match="cuMemFree"):
        chain.close()
    assert launcher.closed == 1
    chain.close()  # idempotent: the launcher is not closed twice
    assert launcher.closed == 1
