"""The edge run loop: camera -> locator -> classifier -> policy -> actuator.

Every part arrives through the constructor, so the same loop runs a Jetson CSI camera with
TensorRT and a serial actuator, or a list of drawn frames with a fake runner in a test.
``build_loop`` wires the defaults by name. Per frame it times each stage, logs every
decision as one JSON line (append-only), and, when frames carry ground truth, scores the
locator, the classifier and the actions taken per sign encounter. A runner may also
return "abstain" (N,) bool, as the PatchCleanser defence does (``build_loop(...,
defence=...)``): those crops become the class ``UNKNOWN``, which the policy treats
cautiously. With ``monitoring`` (``edge_runtime.monitoring``) it also scores each crop
with input detectors (a flagged crop does not vote), feeds a drift monitor, lets the policy
go cautious when the detectors flag too many crops of late, and exports Prometheus
metrics; drift alarms and caution changes go into the decision log. Any error, and Ctrl-C,
first puts the actuator into its safe state, then propagates.

``build_loop`` owns what it opens (sanitizer chain, runner, metrics server, video writer,
decision log, camera) on one ``contextlib.ExitStack``, which the returned loop closes: a
part that fails to build, or an actuator that refuses to arm, closes everything opened
before it, and a close that fails while an error propagates is logged (and noted on that
error) instead of replacing it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol

import numpy as np

from actuator.interface import Actuator, ActuatorCommand
from roadshield_base.errors import ConfigError, RoadshieldError
from roadshield_base.fileio import atomic_write_json

from .annotate import annotate
from .frames import Frame, FrameSource
from .locate import Candidate
from .monitoring import Monitoring
from .patchcleanser import PatchCleanserRunner
from .policy import UNKNOWN, Observation, Policy, Prediction
from .runners.base import BaseRunner, named_array
from .sanitize import SanitizeChain
from .scoring import TruthScorer
from .sdnotify import Notifier

log = logging.getLogger(__name__)

#: (frame_bgr H x W x 3 uint8 BGR, boxes, size) -> float32 (N, 3, size, size) RGB in [0, 1]
Preprocess = Callable[[np.ndarray, list[tuple[int, int, int, int]], int], np.ndarray]
Locator = Callable[[np.ndarray], list[Candidate]]
STAGES = ("read", "locate", "sanitize", "preprocess", "infer", "detect", "decide", "actuate",
          "annotate", "frame")


class FrameWriter(Protocol):
    def write(self, frame_bgr: np.ndarray) -> None: ...

    def close(self) -> None: ...


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, C) logits, float32, stable for large values."""
    z = logits.astype(np.float32) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _stats(samples: list[float]) -> dict[str, float]:
    arr = np.asarray(samples, dtype=np.float64)
    return {"count": int(arr.size), "median_ms": round(float(np.median(arr)), 4),
            "p95_ms": round(float(np.percentile(arr, 95)), 4),
            "mean_ms": round(float(arr.mean()), 4)}


def _status_line(report: LoopReport, elapsed_s: float) -> str:
    """The unit's one-line STATUS= while the loop runs."""
    fps = report.frames / elapsed_s if elapsed_s > 0 else 0.0
    return (f"{report.frames} frames, {fps:.1f} fps, {report.commands_sent} commands, "
            f"runner {report.runner}")


def own(stack: ExitStack, what: str, close: Callable[[], object]) -> None:
    """Register ``close`` on ``stack`` so that it never hides the error unwinding the stack.

    With no error in flight a failing ``close`` raises as usual. While an error propagates
    (a part failed to build, the run failed, or an earlier close failed) a failing close is
    logged, noted on the propagating error (Python 3.11+), and the other closers still run.
    what: the part, for the log ("the camera source").
    """

    def exit_(exc_type: type[BaseException] | None, exc: BaseException | None,
              tb: TracebackType | None) -> bool:
        try:
            close()
        except Exception as err:
            if exc is None:
                raise
            log.error("closing %s failed while handling %s: %s", what, type(exc).__name__,
                      err, exc_info=err)
            if hasattr(exc, "add_note"):  # 3.11+: the traceback shows it under the original
                exc.add_note(f"closing {what} also failed: {type(err).__name__}: {err}")
        return False  # never swallow the error being handled

    stack.push(exit_)


@dataclass
class LoopReport:
    """What one ``EdgeLoop.run`` did; ``to_dict()`` is the run's summary.json."""

    frames: int = 0
    frames_with_detection: int = 0
    decisions: int = 0  # decisions logged: frames with a located sign, or with an action
    commands_sent: int = 0
    keepalives_sent: int = 0
    wall_s: float = 0.0
    fps: float = 0.0
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    truth: dict[str, Any] | None = None
    encounters: list[dict[str, Any]] = field(default_factory=list)
    source: str = ""
    runner: str = ""
    sanitize: str = ""  # the sanitizer chain's spec; "" when none ran
    defence: str = ""  # the input-patch defence's spec; "" when none ran
    defence_stats: dict[str, int] | None = None  # the defence's cost counters for this run
    monitor: dict[str, Any] | None = None  # detectors, drift, caution (Monitoring.summary)
    interrupted: str | None = None
    # who vouched for the model: {"signed": True, bundle, model, sha256, root_digest,
    # key_hint} or {"signed": False, model, sha256, "allow_unsigned": True}; None when the
    # caller built the loop itself
    model_trust: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write_json(self, path: str | os.PathLike[str]) -> None:
        """Write ``to_dict()`` as JSON atomically (temp file, fsync, rename)."""
        atomic_write_json(path, self.to_dict())


class EdgeLoop:
    """Runs frames from ``source`` through locate -> classify -> decide -> actuate.

    locator: frame_bgr -> candidates, best first. preprocess: see ``Preprocess``.
    runner: a BaseRunner taking {input_name: (N, 3, S, S)} and returning
        {output_name: (N, len(class_names)) logits}; activated here if it is not already.
        It may add "abstain" (N,) bool (those crops become ``UNKNOWN`` predictions, their
        confidence the softmax maximum) and "certified" (N,) bool, kept on the predictions.
    input_size: S, the classifier's square input side in pixels.
    annotator: optional frame writer (e.g. ``VideoAnnotator``) for annotated frames.
    decision_log: JSON-lines file, opened in append mode for each run, one line per
        decision; or an open text stream, written to and left open (its owner closes it).
    max_rois: how many of the best candidates are classified per frame (one batch).
    keepalive_s: when set, re-send the policy's standing command if nothing was sent for
        this many seconds of wall time, so a device with a command TTL stays in its state.
    sanitizers: optional ``edge_runtime.sanitize.SanitizeChain`` run between locate and
        the model: its crop steps on each clamped box (before ``preprocess``), its batch
        steps on the model input. The "preprocess" stage time includes it; the time spent
        in the sanitizers alone is also reported as the "sanitize" stage.
    resources: the closers of every part, in the order the parts were opened (what
        ``build_loop`` hands over); ``close()`` unwinds it. None: the loop closes the
        source, the annotator and the metrics server itself.
    monitoring: optional detectors, drift monitor, caution gate and metrics. Without a
        defence the squeezed copies ride in the model's own call (its time counts as
        "infer"); behind a defence the detectors make one more call of the bare model on
        the unmasked crops. "detect" is the time of the scoring and of that extra call.
    """

    def __init__(self, source: FrameSource, locator: Locator, preprocess: Preprocess,
                 runner: BaseRunner, class_names: Sequence[str], input_size: int,
                 policy: Policy, actuator: Actuator, annotator: FrameWriter | None = None,
                 decision_log: str | os.PathLike[str] | IO[str] | None = None, *,
                 input_name: str = "input", output_name: str = "logits", max_rois: int = 3,
                 keepalive_s: float | None = None, sanitizers: SanitizeChain | None = None,
                 monitoring: Monitoring | None = None,
                 resources: ExitStack | None = None) -> None:
        if not class_names:
            raise ConfigError("the edge loop got no class names",
                              "read them from the model's metadata (read_model_info)")
        if input_size <= 0 or max_rois < 1:
            raise ConfigError(f"input_size={input_size} / max_rois={max_rois} must be positive",
                              "use the model's input size and max_rois >= 1")
        if keepalive_s is not None and not keepalive_s > 0:
            raise ConfigError(f"keepalive_s={keepalive_s} must be > 0 or None",
                              "use about half the command TTL, e.g. 0.2")
        self.source = source
        self.locator = locator
        self.preprocess = preprocess
        self.runner = runner
        self.class_names = list(class_names)
        self.input_size = int(input_size)
        self.policy = policy
        self.actuator = actuator
        self.annotator = annotator
        self._log_stream: IO[str] | None = None
        if decision_log is None or isinstance(decision_log, (str, os.PathLike)):
            self.decision_log = Path(decision_log) if decision_log is not None else None
        else:
            self._log_stream = decision_log
            name = getattr(decision_log, "name", None)
            self.decision_log = Path(name) if isinstance(name, str) else None
        self.input_name = input_name
        self.output_name = output_name
        self.max_rois = max_rois
        self.keepalive_s = keepalive_s
        self.sanitizers = sanitizers
        self.monitoring = monitoring if monitoring is not None else Monitoring()
        if self.monitoring.caution is not None and not hasattr(policy, "set_caution"):
            raise ConfigError(f"policy {type(policy).__name__} cannot go cautious",
                              "use the sign_rules policy with a caution gate, or drop the gate")
        if resources is None:  # pushed in reverse, so they close source first, metrics last
            resources = ExitStack()
            if self.monitoring.metrics is not None:
                own(resources, "the metrics server", self.monitoring.metrics.close)
            if annotator is not None:
                own(resources, "the annotated video", annotator.close)
            own(resources, "the camera source", source.close)
        self._resources = resources
        self._crops: tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]] | None = None
        self.current_command: ActuatorCommand | None = None
        self.last_report: LoopReport | None = None
        self._last_send = float("-inf")

    # -- one frame's parts -------------------------------------------------------------
    def classify(self, image: np.ndarray, candidates: Sequence[Candidate],
                 times: dict[str, list[float]], frame_index: int = 0) -> list[Prediction]:
        """Classify the best ``max_rois`` candidates; predictions in candidate order.

        frame_index seeds the randomized sanitizers (a run replays frame for frame).
        """
        chosen = list(candidates[: self.max_rois])
        boxes = [c.box for c in chosen]
        t0 = time.perf_counter()
        if self.sanitizers is None:
            batch = self.preprocess(image, boxes, self.input_size)
        else:
            batch = self.sanitizers(image, boxes, self.input_size, frame_index=frame_index,
                                    preprocess=self.preprocess)
            times["sanitize"].append(self.sanitizers.last_sanitize_ms)
        t1 = time.perf_counter()
        expected = (len(chosen), 3, self.input_size, self.input_size)
        if batch.shape != expected or batch.dtype != np.float32:
            raise ConfigError(f"preprocess returned {batch.dtype} {batch.shape}, expected "
                              f"float32 {expected}", "fix the preprocess callable")
        detectors = self.monitoring.detectors
        shared = detectors is not None and not isinstance(self.runner, PatchCleanserRunner)
        outputs = self.runner.infer({self.input_name: detectors.expand(batch)
                                     if shared and detectors is not None else batch})
        logits = np.asarray(named_array(outputs, self.output_name,
                                        f"the output of runner {self.runner.name}",
                                        "pass output_name= to the loop"))
        t_infer = time.perf_counter()
        scores: dict[str, np.ndarray] = {}
        if detectors is not None:
            if shared:
                logits, scores = detectors.scores_from_outputs(
                    {**outputs, self.output_name: logits}, len(chosen), self.output_name)
            else:  # behind a defence: the bare model sees the unmasked crops
                inner = getattr(self.runner, "inner", self.runner)
                _, scores = detectors.infer(inner, batch, self.input_name, self.output_name)
        logits = logits.reshape(len(chosen), -1)
        if logits.shape[1] != len(self.class_names):
            raise ConfigError(f"model gives {logits.shape[1]} scores but {len(self.class_names)}"
                              " class names were given", "use the model's own class names")
        if not np.isfinite(logits).all():
            raise RoadshieldError(f"runner {self.runner.name} returned non-finite logits",
                                  "check the engine / model file and the input range [0, 1]")
        abstain = self._row_flags(outputs, "abstain", len(chosen))
        certified = self._row_flags(outputs, "certified", len(chosen))
        probs = softmax(logits)
        flags = detectors.flags(scores) if detectors is not None else np.zeros(len(chosen), bool)
        t2 = time.perf_counter()
        times["preprocess"].append((t1 - t0) * 1e3)
        times["infer"].append((t_infer - t1) * 1e3)
        if detectors is not None:
            times["detect"].append((t2 - t_infer) * 1e3)
        if self.monitoring.metrics is not None:
            self.monitoring.metrics.crops(len(chosen), int(abstain.sum())
                                          if abstain is not None else 0)
        self._crops = (batch, probs, scores)
        best = probs.argmax(axis=1)
        predictions = []
        for i, (c, k) in enumerate(zip(chosen, best, strict=True)):
            index, name = ((-1, UNKNOWN) if abstain is not None and abstain[i]
                           else (int(k), self.class_names[int(k)]))
            predictions.append(Prediction(
                c.box, index, name, float(probs[i, k]), c.score,
                None if certified is None else bool(certified[i]), bool(flags[i]),
                {n: float(v[i]) for n, v in scores.items()} if detectors is not None else None))
        return predictions

    @property
    def last_crops(self) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]] | None:
        """(model input batch, softmax probs, detector scores by name) of the last
        ``classify``, or None before any."""
        return self._crops

    def _row_flags(self, outputs: dict[str, np.ndarray], key: str, n: int
                   ) -> np.ndarray | None:
        """The runner's optional per-crop bool output ``key`` as (n,) bool, or None."""
        flags = outputs.get(key)
        if flags is None:
            return None
        flags = np.asarray(flags)
        if flags.shape != (n,):
            raise ConfigError(f"runner {self.runner.name} returned '{key}' shaped "
                              f"{flags.shape}, expected ({n},)", "return one flag per crop")
        return flags.astype(bool)

    def _send(self, command: ActuatorCommand, report: LoopReport, keepalive: bool) -> None:
        self.actuator.send(command)
        self.current_command = command
        self._last_send = time.monotonic()
        if keepalive:
            report.keepalives_sent += 1
        else:
            report.commands_sent += 1

    def _step(self, frame: Frame, t0: float, times: dict[str, list[float]],
              report: LoopReport, scorer: TruthScorer, log_fh: IO[str] | None) -> None:
        """One frame: locate, classify, watch, decide, actuate, log, score, annotate."""
        mon = self.monitoring
        if mon.drift is not None:
            mon.drift.observe_frame(frame.index, frame.image)
        candidates = self.locator(frame.image)
        t1 = time.perf_counter()
        times["locate"].append((t1 - t0) * 1e3)
        self._crops = None
        predictions = (self.classify(frame.image, candidates, times, frame.index)
                       if candidates else [])
        events = self._watch(frame.index, predictions, report)
        t2 = time.perf_counter()
        decision = self.policy.decide(Observation(tuple(predictions), frame.timestamp,
                                                  frame.index))
        t3 = time.perf_counter()
        times["decide"].append((t3 - t2) * 1e3)
        standing = getattr(self.policy, "standing_command", None)
        keepalive = False
        if decision.command is not None:
            self._send(decision.command, report, keepalive=False)
        elif (self.keepalive_s is not None and standing is not None
              and time.monotonic() - self._last_send >= self.keepalive_s):
            self._send(standing(), report, keepalive=True)
            keepalive = True
        t4 = time.perf_counter()
        times["actuate"].append((t4 - t3) * 1e3)
        report.frames += 1
        report.frames_with_detection += bool(candidates)
        if mon.metrics is not None:
            mon.metrics.decision(decision.action, decision.command is not None, keepalive)
        if predictions or decision.action != "none" or events:
            report.decisions += 1
            if log_fh is not None:
                line = {"frame": frame.index, "t": round(frame.timestamp, 6),
                        "wall_time": time.time(), **decision.to_dict(),
                        "sent": decision.command is not None,
                        "predictions": [p.to_dict() for p in predictions], **events}
                log_fh.write(json.dumps(line, sort_keys=True) + "\n")
                log_fh.flush()  # one line per decision survives a crash
        scorer.add(frame, candidates, predictions, decision)
        if self.annotator is not None:
            self.annotator.write(annotate(frame.image, candidates, predictions, decision,
                                          frame.truth, self.current_command))
            times["annotate"].append((time.perf_counter() - t4) * 1e3)

    def _watch(self, frame_index: int, predictions: list[Prediction],
               report: LoopReport) -> dict[str, Any]:
        """Detector counts, caution and drift for one frame; returns the decision log's
        extra fields: "caution" when the policy went cautious or back, "drift" with the
        alarms switched on or off."""
        mon = self.monitoring
        events: dict[str, Any] = {}
        if self._crops is not None:
            batch, probs, scores = self._crops
            if mon.detectors is not None:
                flags = np.array([p.flagged for p in predictions], dtype=bool)
                mon.detected(frame_index, scores, flags)
                changed, reason = mon.caution_update(frame_index, flags)
                if changed:
                    command = self.policy.set_caution(reason)  # type: ignore[attr-defined]
                    if command is not None:
                        self._send(command, report, keepalive=False)
                    events["caution"] = {"state": "on" if reason else "off", "reason": reason,
                                         "sent": command is not None}
            if mon.drift is not None:
                mon.drift.observe_crops(frame_index, batch, probs, scores or None)
        drift = mon.drift_poll()
        if drift:
            events["drift"] = [e.to_dict() for e in drift]
        return events

    def _export_frame(self, times: dict[str, list[float]], mark: dict[str, int],
                      frame_count: int) -> None:
        """This frame's stage times (and now and then the actuator's link) to the metrics."""
        metrics = self.monitoring.metrics
        if metrics is None:
            return
        metrics.frame({name: v[-1] for name, v in times.items() if len(v) > mark[name]})
        if frame_count % 30 == 1:  # reading a serial link's state takes its lock
            from .metrics import actuator_link_state

            metrics.actuator(*actuator_link_state(self.actuator))

    def run(self, max_frames: int | None = None, progress: bool = True) -> LoopReport:
        """Run until the source ends or ``max_frames`` frames; returns the report.

        On any exception (Ctrl-C included) the actuator gets ``safe_stop`` first and the
        exception propagates; the report so far stays in ``self.last_report``.
        """
        from tqdm import tqdm  # type: ignore[import-untyped]

        defence = self.runner if isinstance(self.runner, PatchCleanserRunner) else None
        report = LoopReport(source=getattr(self.source, "uri", ""), runner=self.runner.name,
                            sanitize=self.sanitizers.spec if self.sanitizers else "",
                            defence=defence.spec if defence is not None else "")
        self.last_report = report
        if defence is not None:
            defence.reset_stats()
        self.monitoring.reset()
        times: dict[str, list[float]] = {name: [] for name in STAGES}
        scorer = TruthScorer(getattr(self.policy, "rule_for", None))
        self._last_send = float("-inf")
        activated = False
        log_fh: IO[str] | None = None
        total = getattr(self.source, "frame_count", None)
        if max_frames is not None:
            total = min(total, max_frames) if total else max_frames
        # systemd (Type=notify): READY after the first frame, the watchdog fed every frame,
        # STOPPING on the way out; under it STATUS= replaces the progress bar
        notify = Notifier.from_env()
        bar = tqdm(total=total, disable=not progress or notify.enabled, unit="frame",
                   desc="edge loop")
        start = time.perf_counter()
        try:
            if not self.runner.is_active:
                self.runner.activate()
                activated = True
            report.runner = self.runner.name  # backends name their provider once active
            scorer.abstains = "abstain" in self.runner.output_names
            if self._log_stream is not None:
                log_fh = self._log_stream
            elif self.decision_log is not None:
                self.decision_log.parent.mkdir(parents=True, exist_ok=True)
                log_fh = open(self.decision_log, "a", encoding="utf-8")  # noqa: SIM115
            frames = iter(self.source)
            while max_frames is None or report.frames < max_frames:
                t_read = time.perf_counter()
                frame = next(frames, None)
                if frame is None:
                    break
                t0 = time.perf_counter()
                mark = {name: len(v) for name, v in times.items()}
                times["read"].append((t0 - t_read) * 1e3)
                self._step(frame, t0, times, report, scorer, log_fh)
                times["frame"].append((time.perf_counter() - t0) * 1e3)
                self._export_frame(times, mark, report.frames)
                bar.update(1)
                if report.frames == 1:
                    notify.ready(f"first frame done; running on {report.runner}")
                else:
                    notify.tick(lambda: _status_line(report, time.perf_counter() - start))
        except BaseException as exc:  # KeyboardInterrupt too: brake first, then propagate
            first_line = (str(exc).splitlines() or [""])[0]
            report.interrupted = f"{type(exc).__name__}: {first_line}".rstrip(": ")
            try:
                self.actuator.safe_stop(f"edge loop stopped by {report.interrupted}")
            except Exception:  # keep the original error; the failed stop goes to the log
                log.exception("safe_stop failed after %s", report.interrupted)
            raise
        finally:
            bar.close()
            notify.stopping(f"stopping after {report.frames} frames"
                            + (f": {report.interrupted}" if report.interrupted else ""))
            notify.close()
            if log_fh is not None and log_fh is not self._log_stream:
                log_fh.close()
            if activated:
                self.runner.deactivate()
            if defence is not None:
                report.defence_stats = defence.stats()
            if self.monitoring:
                report.monitor = self.monitoring.summary()
            self._finish(report, times, scorer, time.perf_counter() - start)
        return report

    @staticmethod
    def _finish(report: LoopReport, times: dict[str, list[float]], scorer: TruthScorer,
                wall_s: float) -> None:
        report.wall_s = round(wall_s, 4)
        report.fps = round(report.frames / wall_s, 3) if wall_s > 0 else 0.0
        report.stages = {name: _stats(v) for name, v in times.items() if v}
        report.truth = scorer.summary()
        report.encounters = scorer.encounters()

    def close(self) -> None:
        """Close every part the loop owns (see ``resources``), last opened first; the
        actuator stays open for the caller. Closing twice is harmless."""
        self._resources.close()

    def __enter__(self) -> EdgeLoop:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # the error of the run, if any, reaches the closers: a failing close is logged
        # instead of replacing it
        self._resources.__exit__(exc_type, exc, tb)


def build_loop(source: str | FrameSource, model_path: str | os.PathLike[str], *,
               backend: str = "auto", policy: str | Policy = "sign_rules",
               policy_options: dict[str, Any] | None = None, actuator: Actuator | None = None,
               locator: str | Locator = "hsv", locator_options: dict[str, Any] | None = None,
               annotate_video: str | os.PathLike[str] | None = None, video_fps: float = 15.0,
               decision_log: str | os.PathLike[str] | None = None, max_rois: int = 3,
               keepalive_s: float | None = None,
               sanitize: str | Sequence[str] | None = None,
               defence: str | None = None, detect: str | Sequence[str] | None = None,
               drift: bool = False, metrics_port: int | None = None,
               caution: dict[str, Any] | None = None, arm_actuator: bool = False) -> EdgeLoop:
    """Wire the default parts by name: a camera URI, a model file and a backend name.

    sanitize: a sanitizer chain spec (``edge_runtime.sanitize``), e.g.
    ``"bitdepth:bits=5,median:k=3"``; None or "" runs none. It is checked before the
    model or the camera is opened.
    defence: an input-patch defence spec (``edge_runtime.patchcleanser``), e.g.
    ``"patchcleanser:share=0.1,k=6"``, wrapped around the backend's runner; None or ""
    runs none. It is checked before the model or the camera is opened too.
    detect: input detectors by name, e.g. ``"squeeze,mahalanobis"``, fitted into the
    model's metadata by ``roadshield distill detectors``; flagged crops do not vote, and a
    ``CautionGate`` (``caution``: its keyword settings) makes the policy cautious when too
    many are flagged. drift: watch the stream against the model's ``drift_reference``.
    metrics_port: serve Prometheus metrics on 127.0.0.1:PORT (0: any free port). All of
    these are checked, and the metrics port bound, before the camera is opened.
    arm_actuator: call the actuator's ``arm()`` once every other part is open, so a part
    that fails leaves the board disarmed; when arming fails, everything built is closed.

    The runner is activated here, and the model's class names, input size and tensor names
    come from what it loaded (``BaseRunner.model_info``: ONNX metadata, the ``.pt2``
    program's embedded metadata, or a TensorRT engine's sidecar). The actuator defaults to
    an in-process RecordingActuator; a given one stays the caller's to close. The loop
    owns every other part it opens and closes them with ``EdgeLoop.close`` (or its
    ``with`` block).
    """
    from actuator.interface import RecordingActuator

    from .caution import CautionGate
    from .detectors import parse_detectors
    from .locate import create_locator
    from .patchcleanser import create_defence, parse_defence
    from .policy import create_policy
    from .preprocess import preprocess_batch
    from .runners.registry import create_runner
    from .sanitize import build_chain, check_chain_spec
    from .sources import open_source

    # specs first: a typo costs nothing to open and nothing to close
    check_chain_spec(sanitize)
    if defence:
        parse_defence(defence)
    detector_names = parse_detectors(detect)
    gate = CautionGate(**(caution or {})) if detector_names else None
    arm = getattr(actuator, "arm", None) if arm_actuator else None
    if arm_actuator and not callable(arm):
        raise ConfigError(f"arm_actuator=True but actuator {type(actuator).__name__} has no "
                          "arm()", "pass an actuator that arms (SerialActuator) or leave "
                          "arm_actuator off")
    act = actuator if actuator is not None else RecordingActuator()
    stack = ExitStack()
    try:
        chain = build_chain(sanitize)
        if chain is not None:  # a CUDA chain holds a launcher and device buffers
            own(stack, "the sanitizer chain", chain.close)
        runner: BaseRunner = create_runner(backend, model_path)
        if chain is not None and not defence:
            # a CUDA chain writes its fused preprocess straight into a TensorRT input
            # buffer (not through a defence, which masks the batch on the host first);
            # the runner must allocate on the chain's launcher, so attach before activating
            chain.attach_runner(runner)
        runner.activate()
        own(stack, f"the runner {runner.name}", runner.deactivate)
        info = runner.model_info  # from what the backend loaded, whatever the file type
        if defence:
            runner = create_defence(defence, runner, info.input_size,
                                    input_name=info.input_name, output_name=info.output_name)
            runner.activate()  # the inner runner is already active and stays ours
            own(stack, "the defence", runner.deactivate)
        monitoring = _monitoring(info, detector_names, drift, metrics_port, gate)
        if monitoring.metrics is not None:
            own(stack, "the metrics server", monitoring.metrics.close)
        pol = (create_policy(policy, **(policy_options or {})) if isinstance(policy, str)
               else policy)
        loc = (create_locator(locator, **(locator_options or {})) if isinstance(locator, str)
               else locator)
        annotator = None
        if annotate_video is not None:
            from .annotate import VideoAnnotator

            annotator = VideoAnnotator(annotate_video, video_fps)
            own(stack, "the annotated video", annotator.close)
        log_stream: IO[str] | None = None
        if decision_log is not None:
            path = Path(decision_log)
            path.parent.mkdir(parents=True, exist_ok=True)
            log_stream = open(path, "a", encoding="utf-8")  # noqa: SIM115 - the stack closes it
            own(stack, "the decision log", log_stream.close)
        src = open_source(source) if isinstance(source, str) else source
        own(stack, "the camera source", src.close)
        loop = EdgeLoop(src, loc, preprocess_batch, runner, info.class_names, info.input_size,
                        pol, act, annotator, log_stream, input_name=info.input_name,
                        output_name=info.output_name, max_rois=max_rois,
                        keepalive_s=keepalive_s, sanitizers=chain, monitoring=monitoring,
                        resources=stack)
        if arm is not None:
            arm()  # last: no part can fail to open once the board is armed
    except BaseException as err:
        # close what was opened, last first; the closers see ``err`` and log their own
        # failures rather than raise over it
        stack.__exit__(type(err), err, err.__traceback__)
        raise
    return loop


def _monitoring(info: Any, detector_names: tuple[str, ...], drift: bool,
                metrics_port: int | None, gate: Any) -> Monitoring:
    """Detectors and the drift reference from the model's metadata, and the metrics server
    (bound last, so a bad model or reference leaves no port open)."""
    from .detectors import detectors_from_metadata

    detectors = (detectors_from_metadata(info.metadata, info.features_name, detector_names)
                 if detector_names else None)
    monitor = None
    if drift:
        from .drift import REFERENCE_KEY, DriftMonitor, DriftReference

        text = info.metadata.get(REFERENCE_KEY)
        if text is None:
            raise ConfigError(f"the model has no {REFERENCE_KEY!r} metadata to watch drift "
                              "against", "build one with `roadshield distill drift-reference "
                              "--model MODEL --source CLEAN_STREAM`, or run without --drift")
        reference = DriftReference.from_json(text)
        if reference.num_classes != len(info.class_names):
            raise ConfigError(f"the drift reference counts {reference.num_classes} classes, "
                              f"the model {len(info.class_names)}",
                              "rebuild the reference with this model")
        monitor = DriftMonitor(reference)
    metrics = None
    if metrics_port is not None:
        from .metrics import EdgeMetrics

        metrics = EdgeMetrics(metrics_port).start()
        log.info("metrics on %s", metrics.url)
    return Monitoring(detectors, monitor, gate, metrics)
