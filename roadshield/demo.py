"""``roadshield demo``: the whole chain on this machine's CPU, written under ``runs/<id>/``.

synthetic data -> fast adversarial training -> clean / FGSM / PGD evaluation -> ONNX export
(checked against torch) -> the edge loop on a synthetic camera stream with stickered signs
-> ``summary.json``, ``summary.png`` and a printed table. ``runs/latest`` moves to the new
run only once everything has succeeded.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from roadshield import pipeline
from roadshield.errors import ConfigError
from roadshield.fileio import atomic_write_json
from roadshield.report import format_demo_summary, plot_demo
from roadshield.runs import staged_run


@dataclass(frozen=True)
class Profile:
    train_per_class: int
    test_per_class: int
    epochs: int
    pgd_steps: int
    edge_frames: int
    trainer: str = "fast_at"
    arch: str = "signnet"
    sticker_rate: float = 0.4


PROFILES = {
    # the README's demo: a few minutes on two CPU cores
    "quick": Profile(train_per_class=500, test_per_class=60, epochs=10, pgd_steps=10,
                     edge_frames=450),
    # the end-to-end test: the same chain, small enough for seconds
    "tiny": Profile(train_per_class=24, test_per_class=6, epochs=2, pgd_steps=3,
                    edge_frames=40),
}


def _step(title: str) -> None:
    print(f"\n== {title}", flush=True)


@contextmanager
def demo_actuator(kind: str) -> Iterator[tuple[object, float | None]]:
    """Yield (actuator, keepalive seconds): in-process recording, or the serial link to the
    device simulator on a real pseudo-terminal (authenticated frames, watchdog, TTLs)."""
    from actuator.interface import RecordingActuator

    if kind == "recording":
        yield RecordingActuator(), None
        return
    if kind != "simulator":
        raise ConfigError(f"unknown demo actuator {kind!r}", "use recording or simulator")
    from actuator.serial_actuator import SerialActuator
    from actuator.simulator import PtySimulator

    key = os.urandom(32)  # a fresh board key for this run only
    with PtySimulator(key) as sim:
        act = SerialActuator(sim.port, key)
        try:
            yield act, 0.2  # commands expire after their 500 ms TTL: refresh well before
        finally:
            act.close()


def run_demo(profile_name: str = "quick", runs_dir: str | Path = "runs", seed: int = 0,
             progress: bool = True, actuator: str = "recording") -> dict[str, Any]:
    """Run every stage into a new run folder; return the summary also saved as summary.json."""
    if profile_name not in PROFILES:
        raise ConfigError(f"unknown demo profile {profile_name!r}",
                          f"choose one of: {', '.join(PROFILES)}")
    prof = PROFILES[profile_name]
    t0 = time.perf_counter()
    with staged_run(runs_dir) as run:
        _step("1/5 rendering the synthetic road-sign dataset (GTSRB layout)")
        data = pipeline.synth_dataset(run / "data", prof.train_per_class, prof.test_per_class,
                                      seed=seed, progress=progress)

        _step(f"2/5 training {prof.arch} with {prof.trainer} for {prof.epochs} epochs")
        trained = pipeline.train_checkpoint(run / "data", run / "teacher.safetensors",
                                            arch=prof.arch, trainer=prof.trainer,
                                            epochs=prof.epochs, seed=seed, progress=progress)

        _step("3/5 evaluating: clean, FGSM and PGD accuracy on the test split")
        evaluation = pipeline.evaluate_checkpoint(trained.checkpoint, run / "data",
                                                  pgd_steps=prof.pgd_steps,
                                                  expected_sha256=trained.sha256)

        _step("4/5 exporting to ONNX and checking it against torch")
        exported = pipeline.export_checkpoint(trained.checkpoint, run / "model.onnx",
                                              expected_sha256=trained.sha256, seed=seed)

        _step(f"5/5 edge loop on a synthetic camera with stickered signs ({actuator} actuator)")
        source = (f"synthetic://?seed={seed + 1}&frames={prof.edge_frames}"
                  f"&sticker_rate={prof.sticker_rate}")
        with demo_actuator(actuator) as (act, keepalive_s):
            edge = pipeline.run_edge(exported.onnx, source, video=run / "edge.mp4",
                                     decision_log=run / "decisions.jsonl", actuator=act,
                                     keepalive_s=keepalive_s, progress=progress)

        summary = {
            "run_dir": str(Path(runs_dir) / run.name.removeprefix(".").removesuffix(".partial")),
            "profile": profile_name,
            "seed": seed,
            "dataset": {"root": str(data.root), "classes": list(data.class_names),
                        "train_images": data.train_images, "test_images": data.test_images},
            "training": {"arch": prof.arch, "trainer": prof.trainer, "epochs": prof.epochs,
                         "checkpoint_sha256": trained.sha256,
                         "seconds_per_epoch": trained.history["seconds_per_epoch"],
                         "history": trained.history},
            "evaluation": evaluation,
            "export": {"onnx": "model.onnx", "parity_max_abs": exported.parity_max_abs},
            "clean_acc": evaluation["clean_acc"],
            "fgsm_acc": evaluation["fgsm_acc"],
            "pgd_acc": evaluation["pgd_acc"],
            "backend": edge.runner,
            "actuator": actuator,
            "fps": edge.fps,
            "commands_sent": edge.commands_sent,
            "edge": edge.to_dict(),
            "wall_s": time.perf_counter() - t0,
        }
        atomic_write_json(run / "summary.json", summary)
        plot_demo(summary, run / "summary.png")
    print()
    print(format_demo_summary(summary))
    print(f"\nwrote {summary['run_dir']}/ (summary.json, summary.png, model.onnx, edge.mp4, "
          "decisions.jsonl, data/gtsrb) and pointed runs/latest at it")
    return summary


def main(args: argparse.Namespace) -> int:
    run_demo(args.profile, args.runs_dir, args.seed, actuator=args.actuator)
    return 0
