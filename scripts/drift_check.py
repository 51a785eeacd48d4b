#!/usr/bin/env python3
"""Drift-monitor check on the synthetic drive: false alarms on clean frames, frames to alarm.

Usage: python scripts/drift_check.py [--model runs/latest/model.onnx]
           [--ref-seeds 1000,1001,1002,1003,1004,1005] [--ref-frames 5000]
           [--seeds 1,2,3,4,5,6] [--t0 1500] [--after 1500] [--factors 1.15,0.85]
           [--ramp 100] [--frame-window 1200] [--crop-window 480] [--check-every 15]
           [--on-after 2] [--off-after 8] [--margin 1.1] [--save-reference PATH] [--json]

Every frame goes through the parts ``distill drift-reference`` uses (``distill.stream.
crop_cutter``: the edge loop's HSV locator and preprocess, up to 3 crops a frame;
``distill.drift_reference.crop_scorer``: the ONNX model and the detectors fitted into it),
and the monitor sees the frame and the crops with their softmax probabilities and detector
scores, as the loop would show them.

1. Reference: ``synthetic://?seed=S&frames=F`` for each reference seed, one drive after the
   other, into a ``ReferenceBuilder``; ``build`` sketches and calibrates (one calibration
   fold per drive when the folds equal the seeds).
2. Test drives (seeds disjoint from the reference's), each ``t0 + after`` frames long and
   rendered once. A monitor on the clean frames counts false alarms ("on" events) over every
   frame. For each factor, another monitor sees the same frames up to ``t0``, then the frames
   multiplied by a factor going linearly from 1 to ``factor`` over ``ramp`` frames and held
   (``clip(rint(frame * f), 0, 255)``); frames to alarm = frame of its first "on" event at
   or after t0, minus t0 ("missed" when none came within ``after`` frames).
3. The monitor's own cost per frame (observe_frame + observe_crops + checks) on the clean
   drives, in microseconds, and alone: one frame and its crops fed 3,000 times (the
   median without and with a check).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


def seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of "
                                         "whole numbers") from None


def factors(text: str) -> list[float]:
    try:
        return [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of "
                                         "numbers") from None


class Pipeline:
    """The edge loop's locator and preprocess, and the model with the detectors fitted into
    it, as ``distill drift-reference`` runs them: frame -> (batch, probs, scores)."""

    def __init__(self, model: Path) -> None:
        from distill.drift_reference import crop_scorer
        from distill.stream import crop_cutter
        from edge_runtime.model_info import read_model_info

        info = read_model_info(model)
        self.class_names, self.size = info.class_names, info.input_size
        self.cut = crop_cutter(model)
        self._scorer = crop_scorer(model)
        self.score = self._scorer.__enter__()

    def __call__(self, image: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray] | None]:
        batch = self.cut(image)
        if batch is None:
            empty = np.zeros((0, 3, self.size, self.size), np.float32)
            return empty, np.zeros((0, len(self.class_names)), np.float32), None
        probs, scores = self.score(batch)
        return batch, probs, scores or None

    def close(self) -> None:
        self._scorer.__exit__(None, None, None)


def drive(seed: int, frames: int) -> Any:
    from edge_runtime.sources import open_source

    return open_source(f"synthetic://?seed={seed}&frames={frames}")


@dataclass
class RampResult:
    seed: int
    factor: float
    frames_to_alarm: int | None
    statistic: str | None


@dataclass
class CleanResult:
    seed: int
    frames: int
    alarms: list[dict[str, Any]] = field(default_factory=list)


def build_reference(pipe: Pipeline, ref_seeds: list[int], ref_frames: int, config: Any) -> Any:
    from edge_runtime.drift import ReferenceBuilder

    builder = ReferenceBuilder(brightness_stride=config.brightness_stride)
    for seed in ref_seeds:
        t = time.perf_counter()
        with drive(seed, ref_frames) as src:
            for frame in src:
                builder.observe_frame(frame.image)
                builder.observe_crops(*pipe(frame.image))
        print(f"  reference seed {seed}: {ref_frames} frames in "
              f"{time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    return builder.build(len(pipe.class_names), config)


def test_drive(pipe: Pipeline, reference: Any, seed: int, t0: int, after: int, ramp: int,
               ramp_factors: list[float], cost_us: list[float]
               ) -> tuple[CleanResult, list[RampResult]]:
    from cloud_train.redteam_drift import gain
    from edge_runtime.drift import DriftMonitor

    clean = DriftMonitor(reference)
    ramps = {f: DriftMonitor(reference) for f in ramp_factors}
    first: dict[float, tuple[int, str] | None] = dict.fromkeys(ramp_factors)
    result = CleanResult(seed, t0 + after)
    with drive(seed, t0 + after) as src:
        for frame in src:
            i = frame.index
            batch, probs, scores = pipe(frame.image)
            c0 = time.perf_counter()
            clean.observe_frame(i, frame.image)
            clean.observe_crops(i, batch, probs, scores)
            cost_us.append((time.perf_counter() - c0) * 1e6)
            result.alarms += [e.to_dict() for e in clean.poll() if e.state == "on"]
            for f, monitor in ramps.items():
                if i < t0:  # the same frames as the clean drive
                    image, b, p, sc = frame.image, batch, probs, scores
                else:
                    image = gain(f)(min(1.0, (i - t0) / ramp), frame.image)
                    b, p, sc = pipe(image)
                monitor.observe_frame(i, image)
                monitor.observe_crops(i, b, p, sc)
                for e in monitor.poll():
                    if e.state == "on" and e.frame >= t0 and first[f] is None:
                        first[f] = (e.frame - t0, e.statistic)
    out = [RampResult(seed, f, *(first[f] or (None, None))) for f in ramp_factors]
    return result, out


def isolated_cost(pipe: Pipeline, reference: Any, seed: int, frames: int = 3000
                  ) -> dict[str, float]:
    """The monitor alone on one frame with crops, repeated: microseconds per frame."""
    from edge_runtime.drift import DriftMonitor

    sample = None
    with drive(seed, 400) as src:
        for frame in src:
            batch, probs, scores = pipe(frame.image)
            if len(batch):
                sample = frame.image
                break
    if sample is None:
        raise SystemExit(f"seed {seed} showed no sign in 400 frames")
    monitor = DriftMonitor(reference)
    every = reference.config.check_every
    plain: list[float] = []
    checks: list[float] = []
    for i in range(frames):
        t = time.perf_counter()
        monitor.observe_frame(i, sample)
        monitor.observe_crops(i, batch, probs, scores)
        monitor.poll()
        (checks if (i + 1) % every == 0 else plain).append((time.perf_counter() - t) * 1e6)
    return {"crops_per_frame": len(batch), "mean": round(float(np.mean(plain + checks)), 1),
            "plain_median": round(float(np.median(plain)), 1),
            "check_median": round(float(np.median(checks)), 1)}


def summary(ramps: list[RampResult], factor: float, after: int) -> dict[str, Any]:
    got = [r.frames_to_alarm for r in ramps if r.factor == factor]
    hit = sorted(v for v in got if v is not None)
    return {"factor": factor, "drives": len(got), "detected": len(hit),
            "within_300": sum(v <= 300 for v in hit),
            "median": float(np.median(hit)) if len(hit) == len(got) and hit else None,
            "max": max(hit) if len(hit) == len(got) and hit else None,
            "frames_to_alarm": got, "window": after}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/latest/model.onnx")
    ap.add_argument("--ref-seeds", type=seeds, default=seeds("1000,1001,1002,1003,1004,1005"))
    ap.add_argument("--ref-frames", type=int, default=5000)
    ap.add_argument("--seeds", type=seeds, default=seeds("1,2,3,4,5,6"))
    ap.add_argument("--t0", type=int, default=1500, help="frame the ramp starts at")
    ap.add_argument("--after", type=int, default=1500, help="frames watched from t0")
    ap.add_argument("--factors", type=factors, default=factors("1.15,0.85"))
    ap.add_argument("--ramp", type=int, default=100, help="frames the ramp takes")
    ap.add_argument("--frame-window", type=int, default=None)
    ap.add_argument("--crop-window", type=int, default=None)
    ap.add_argument("--check-every", type=int, default=None)
    ap.add_argument("--on-after", type=int, default=None)
    ap.add_argument("--off-after", type=int, default=None)
    ap.add_argument("--margin", type=float, default=None)
    ap.add_argument("--folds", type=int, default=None,
                    help="calibration folds (default: one per reference seed)")
    ap.add_argument("--save-reference", default=None, help="write the reference JSON here")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if set(args.seeds) & set(args.ref_seeds):
        ap.error("test seeds must differ from the reference seeds")
    if args.ramp < 1 or args.after < 1:
        ap.error("--ramp and --after must be >= 1")

    from edge_runtime.drift import DriftConfig
    from roadshield_base.fileio import atomic_write_bytes

    overrides = {k: v for k, v in {
        "frame_window": args.frame_window, "crop_window": args.crop_window,
        "check_every": args.check_every, "on_after": args.on_after,
        "off_after": args.off_after, "margin": args.margin,
        "calibration_folds": args.folds or len(args.ref_seeds)}.items() if v is not None}
    config = DriftConfig(**overrides)
    if args.t0 < config.frame_window:
        ap.error(f"--t0 {args.t0} must be >= the frame window {config.frame_window}, so the "
                 "window is full of clean frames when the ramp starts")

    with tempfile.TemporaryDirectory() as tmp:
        # a private copy: the run folder may be replaced while this runs
        model = Path(tmp) / "model.onnx"
        shutil.copyfile(args.model, model)
        pipe = Pipeline(model)
        t = time.perf_counter()
        reference = build_reference(pipe, args.ref_seeds, args.ref_frames, config)
        build_s = time.perf_counter() - t
        if args.save_reference:
            atomic_write_bytes(args.save_reference, reference.to_json().encode())
        cleans: list[CleanResult] = []
        ramps: list[RampResult] = []
        cost_us: list[float] = []
        for seed in args.seeds:
            t = time.perf_counter()
            c, got = test_drive(pipe, reference, seed, args.t0, args.after, args.ramp,
                                args.factors, cost_us)
            cleans.append(c)
            ramps += got
            print(f"  test seed {seed}: {c.frames} frames in {time.perf_counter() - t:.0f} s",
                  file=sys.stderr, flush=True)
        isolated = isolated_cost(pipe, reference, args.seeds[0])
        pipe.close()

    clean_frames = sum(c.frames for c in cleans)
    false_alarms = sum(len(c.alarms) for c in cleans)
    report = {
        "model": args.model, "config": reference.to_dict()["config"],
        "reference": {"seeds": args.ref_seeds, "frames": reference.frames,
                      "crops": reference.crops, "build_s": round(build_s, 1),
                      "json_bytes": len(reference.to_json()),
                      "statistics": {k: {"test": v.test, "nominal": v.nominal_threshold,
                                         "clean_max": v.calibrated_max,
                                         "windows": v.calibration_windows,
                                         "threshold": v.threshold}
                                     for k, v in reference.statistics.items()}},
        "clean": {"seeds": args.seeds, "frames": clean_frames, "false_alarms": false_alarms,
                  "per_10k_frames": round(false_alarms * 1e4 / clean_frames, 3),
                  "alarms": [{"seed": c.seed, **a} for c in cleans for a in c.alarms]},
        "ramps": [summary(ramps, f, args.after) for f in args.factors],
        "ramp_detail": [vars(r) for r in ramps],
        "monitor_us_per_frame": {"mean": round(float(np.mean(cost_us)), 1),
                                 "p50": round(float(np.percentile(cost_us, 50)), 1),
                                 "p99": round(float(np.percentile(cost_us, 99)), 1),
                                 "max": round(float(np.max(cost_us)), 1),
                                 "isolated": isolated},
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    ref = report["reference"]
    print(f"reference: {ref['frames']} frames, {ref['crops']} crops (seeds {ref['seeds']}), "
          f"built in {ref['build_s']} s, {ref['json_bytes']} bytes of JSON")
    print(f"config: {report['config']}")
    print(f"{'statistic':18s} {'test':12s} {'nominal':>8s} {'clean max':>10s} "
          f"{'windows':>8s} {'threshold':>10s}")
    for name, s in ref["statistics"].items():
        print(f"{name:18s} {s['test']:12s} {s['nominal']:8.3f} {s['clean_max']:10.3f} "
              f"{s['windows']:8d} {s['threshold']:10.3f}")
    c = report["clean"]
    print(f"clean: {c['frames']} frames (seeds {c['seeds']}): {c['false_alarms']} false "
          f"alarm(s), {c['per_10k_frames']} per 10,000 frames")
    for a in c["alarms"]:
        print(f"  seed {a['seed']} frame {a['frame']}: {a['statistic']} {a['test']} "
              f"{a['value']:.3f} > {a['threshold']:.3f}")
    for s in report["ramps"]:
        print(f"ramp x{s['factor']} from t0={args.t0} over {args.ramp} frames: detected "
              f"{s['detected']}/{s['drives']} within {args.after} frames, "
              f"{s['within_300']}/{s['drives']} within 300; frames to alarm "
              f"{s['frames_to_alarm']} (median {s['median']}, max {s['max']})")
    for r in ramps:
        print(f"  seed {r.seed} x{r.factor}: {r.frames_to_alarm} ({r.statistic})")
    m = report["monitor_us_per_frame"]
    print(f"monitor cost per frame in the drive: mean {m['mean']} us, median {m['p50']} us, "
          f"p99 {m['p99']} us, max {m['max']} us")
    iso = m["isolated"]
    print(f"monitor alone ({iso['crops_per_frame']} crop(s) a frame): mean {iso['mean']} us, "
          f"median {iso['plain_median']} us on a frame without a check, "
          f"{iso['check_median']} us with one")
    return 0


if __name__ == "__main__":
    sys.exit(main())
