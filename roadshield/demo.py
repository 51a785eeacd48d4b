"""``roadshield demo``: the whole chain on this machine's CPU, written under ``runs/<id>/``.

synthetic data -> the car's model -> clean / FGSM / PGD evaluation -> ONNX export (checked
against torch) -> the defended stack's model (trained with PatchCleanser's masks) -> the
Jetson student distilled from the car's model, quantised to INT8 and signed into
``bundle/`` (trusted key ``bundle.pub``) -> a printable adversarial sticker optimised on the
car's model -> the edge loop, undefended and defended, on a clean drive and past stickered
stop signs, and the student run from the verified bundle on the clean drive ->
``summary.json``,
``summary.png``, a side-by-side ``edge.mp4`` and a printed table. ``runs/latest`` moves to
the new run only once everything has succeeded.

Repeatability: data, weight initialisation, batch order, augmentation and attack starts
are all seeded; the torch work also runs with a fixed number of intra-op threads
(``threads``, default ``DEMO_THREADS``, not "every core") and deterministic algorithms,
because how a reduction is split over threads changes its float rounding. So the same
seed, torch build and thread count give the same figures; another CPU (other SIMD
instructions, another oneDNN/MKL code path) or another torch build may round differently.
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

from cloud_train import pipeline
from distill.jetson_bundle import student_bundle
from roadshield.report import format_demo_summary, plot_demo
from roadshield.runs import staged_run
from roadshield_base.errors import ConfigError
from roadshield_base.fileio import atomic_write_json


@dataclass(frozen=True)
class Profile:
    train_per_class: int
    test_per_class: int
    epochs: int
    pgd_steps: int
    edge_frames: int  # the clean drive
    sticker_frames: int  # the drive past stickered stop signs
    defended_epochs: int
    sticker_steps: int
    sticker_positions: int
    sticker_pool: int
    trainer: str = "standard"
    defended_trainer: str = "masked"
    defended_lr: float = 0.02  # a fine-tune: below the 0.05 peak that trains from scratch
    # share of the masked fine-tune's examples under two masks rather than one (see
    # cloud_train.robust_trainers.PATCHCLEANSER_FINETUNE_DOUBLE_RATE)
    defended_mask_double_rate: float = 0.25
    arch: str = "signnet"
    defence: str = "patchcleanser:share=0.1,k=6"
    student_arch: str = "signnet_mobile"  # the Jetson student, distilled from the car's model
    student_method: str = "kd"
    student_epochs: int = 10


PROFILES = {
    # the README's demo: minutes on two CPU cores
    "quick": Profile(train_per_class=500, test_per_class=60, epochs=10, pgd_steps=10,
                     edge_frames=450, sticker_frames=300, defended_epochs=10,
                     sticker_steps=300, sticker_positions=4, sticker_pool=96),
    # the end-to-end test: the same chain, small enough for seconds
    "tiny": Profile(train_per_class=24, test_per_class=6, epochs=2, pgd_steps=3,
                    edge_frames=40, sticker_frames=40, defended_epochs=1, sticker_steps=3,
                    sticker_positions=1, sticker_pool=6, student_epochs=1),
}
STEPS = 8
# the README's two-core CPU; a fixed count, so a bigger machine computes the same sums
DEMO_THREADS = 2


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


@contextmanager
def repeatable_torch(threads: int) -> Iterator[None]:
    """torch with ``threads`` intra-op threads and deterministic algorithms (an error, not a
    silent fallback, for an op without a deterministic kernel); both are put back after."""
    import torch

    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads={threads!r} must be a positive integer",
                          f"use the default {DEMO_THREADS}, or the same count on every machine "
                          "whose figures you compare")
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1], warn_only=before[2])


def run_demo(profile_name: str = "quick", runs_dir: str | Path = "runs", seed: int = 0,
             progress: bool = True, actuator: str = "recording",
             threads: int = DEMO_THREADS) -> dict[str, Any]:
    """Run every stage into a new run folder; return the summary also saved as summary.json.

    threads: torch's intra-op threads for every stage; the figures repeat for the same
        seed, torch build and thread count (see the module docstring)."""
    if profile_name not in PROFILES:
        raise ConfigError(f"unknown demo profile {profile_name!r}",
                          f"choose one of: {', '.join(PROFILES)}")
    with repeatable_torch(threads):
        return _run_demo(profile_name, runs_dir, seed, progress, actuator)


def _run_demo(profile_name: str, runs_dir: str | Path, seed: int, progress: bool,
              actuator: str) -> dict[str, Any]:
    from cloud_train.demo_drives import (
        SIGN,
        TARGET,
        DemoStack,
        drive_sources,
        run_drives,
        side_by_side,
    )
    from edge_runtime.scoring import sticker_figures

    prof = PROFILES[profile_name]
    t0 = time.perf_counter()
    with staged_run(runs_dir) as run:
        _step(f"1/{STEPS} rendering the synthetic road-sign dataset (GTSRB layout)")
        data = pipeline.synth_dataset(run / "data", prof.train_per_class, prof.test_per_class,
                                      seed=seed, progress=progress)

        _step(f"2/{STEPS} training the car's model: {prof.arch}, {prof.trainer}, "
              f"{prof.epochs} epochs")
        trained = pipeline.train_checkpoint(run / "data", run / "teacher.safetensors",
                                            arch=prof.arch, trainer=prof.trainer,
                                            epochs=prof.epochs, seed=seed, progress=progress)

        _step(f"3/{STEPS} evaluating: clean, FGSM and PGD accuracy on the test split")
        evaluation = pipeline.evaluate_checkpoint(trained.checkpoint, run / "data",
                                                  pgd_steps=prof.pgd_steps,
                                                  expected_sha256=trained.sha256)

        _step(f"4/{STEPS} exporting to ONNX and checking it against torch")
        exported = pipeline.export_checkpoint(trained.checkpoint, run / "model.onnx",
                                              expected_sha256=trained.sha256, seed=seed)

        _step(f"5/{STEPS} the defended stack's model: the car's model fine-tuned with "
              f"{prof.defended_trainer} (PatchCleanser's masks), {prof.defended_epochs} epochs")
        defended = pipeline.train_checkpoint(run / "data", run / "defended.safetensors",
                                             arch=prof.arch, trainer=prof.defended_trainer,
                                             epochs=prof.defended_epochs, seed=seed,
                                             lr=prof.defended_lr, progress=progress,
                                             init=trained.checkpoint,
                                             init_sha256=trained.sha256,
                                             trainer_options={"mask_double_rate":
                                                              prof.defended_mask_double_rate})
        defended_onnx = pipeline.export_checkpoint(defended.checkpoint, run / "defended.onnx",
                                                   expected_sha256=defended.sha256, seed=seed)

        _step(f"6/{STEPS} the Jetson student: {prof.student_arch} distilled "
              f"({prof.student_method}) from the car's model, {prof.student_epochs} epochs; "
              "INT8; the signed bundle")
        student = student_bundle(run, run / "data", trained.checkpoint, trained.sha256,
                                 arch=prof.student_arch, method=prof.student_method,
                                 epochs=prof.student_epochs, pgd_steps=prof.pgd_steps,
                                 seed=seed, progress=progress)

        _step(f"7/{STEPS} optimising a printable sticker: {SIGN} -> {TARGET} "
              "(white-box on the car's model, over the camera's views)")
        sticker = pipeline.optimise_sticker_files(
            trained.checkpoint, run / "sticker", sign=SIGN, target=TARGET, seed=seed,
            progress=_sticker_bar(prof.sticker_steps, progress), steps=prof.sticker_steps,
            positions=prof.sticker_positions, pool=prof.sticker_pool,
            eval_pool=max(8, prof.sticker_pool * 2 // 3), search_steps=min(30, prof.sticker_steps))

        _step(f"8/{STEPS} driving: a clean road and stickered stop signs, undefended and "
              f"defended, and the student from its verified bundle ({actuator} actuator)")
        stacks = [DemoStack("undefended", "undefended", exported.onnx),
                  DemoStack("defended", f"defended: {prof.defended_trainer} + "
                            f"{prof.defence.split(':')[0]}", defended_onnx.onnx, prof.defence)]
        sources = drive_sources(seed + 1, prof.edge_frames, prof.sticker_frames, run / "sticker")
        drives = run_drives(stacks, sources, run,
                            actuator_factory=lambda: demo_actuator(actuator), progress=progress)
        side_by_side(run / "edge-undefended-stickered.mp4", run / "edge-defended-stickered.mp4",
                     run / "edge.mp4", (stacks[0].title, stacks[1].title))
        student["drive"] = bundle_drive(run, sources["clean"], actuator, progress)
        edge = drives["undefended"]["clean"]
        summary = {
            "run_dir": str(Path(runs_dir) / run.name.removeprefix(".").removesuffix(".partial")),
            "profile": profile_name,
            "seed": seed,
            "torch_threads": torch_threads(),
            "dataset": {"root": str(data.root), "classes": list(data.class_names),
                        "train_images": data.train_images, "test_images": data.test_images},
            "training": {"arch": prof.arch, "trainer": prof.trainer, "epochs": prof.epochs,
                         "checkpoint_sha256": trained.sha256,
                         "seconds_per_epoch": trained.history["seconds_per_epoch"],
                         "history": trained.history},
            "defended_training": {"trainer": prof.defended_trainer,
                                  "init": "teacher.safetensors",
                                  "epochs": prof.defended_epochs,
                                  "checkpoint_sha256": defended.sha256,
                                  "seconds_per_epoch": defended.history["seconds_per_epoch"]},
            "evaluation": evaluation,
            "export": {"onnx": "model.onnx", "parity_max_abs": exported.parity_max_abs,
                       "defended_onnx": "defended.onnx",
                       "defended_parity_max_abs": defended_onnx.parity_max_abs},
            "sticker": {"sign": SIGN, "target": TARGET, "folder": "sticker", **sticker},
            "student": student,
            "defence": prof.defence,
            "clean_acc": evaluation["clean_acc"],
            "fgsm_acc": evaluation["fgsm_acc"],
            "pgd_acc": evaluation["pgd_acc"],
            "backend": edge["runner"],
            "actuator": actuator,
            "fps": edge["fps"],
            "commands_sent": edge["commands_sent"],
            "edge": edge,
            "drives": drives,
            "attack": {name: sticker_figures(d["stickered"], SIGN, TARGET)
                       for name, d in drives.items()},
            "wall_s": time.perf_counter() - t0,
        }
        atomic_write_json(run / "summary.json", summary)
        plot_demo(summary, run / "summary.png")
    print()
    print(format_demo_summary(summary))
    print(f"\nwrote {summary['run_dir']}/ (summary.json, summary.png, edge.mp4, sticker/, "
          "model.onnx, defended.onnx, bundle/ and bundle.pub, decisions*.jsonl, data/gtsrb) "
          "and pointed runs/latest at it")
    return summary


def bundle_drive(run: Path, source: str, actuator: str, progress: bool) -> dict[str, Any]:
    """The student's INT8 model, as the Jetson runs it, on ``source``: loaded from the bundle
    only after its signature checks out against ``bundle.pub``, from the verified bytes."""
    from edge_runtime.bundle import bundle_model

    model, trust = bundle_model(run / "bundle", run / "bundle.pub", "int8")
    with demo_actuator(actuator) as (act, keepalive_s):
        rep = pipeline.run_edge(model, source, decision_log=run / "decisions-student-clean.jsonl",
                                actuator=act, keepalive_s=keepalive_s, progress=progress)
    rep.model_trust = trust
    return rep.to_dict()


def _sticker_bar(steps: int, progress: bool) -> Any:
    """A progress callback for the sticker's optimisation steps (a tqdm bar)."""
    from tqdm import tqdm

    bar = tqdm(total=steps, desc="sticker", unit="step", disable=not progress)

    def update(step: int, total: int, loss: float) -> None:
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{loss:.3f}")
        if step >= total:
            bar.close()

    return update


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def main(args: argparse.Namespace) -> int:
    # a --threads option is the CLI's to add; the fixed default keeps runs comparable
    run_demo(args.profile, args.runs_dir, args.seed, actuator=args.actuator,
             threads=getattr(args, "threads", None) or DEMO_THREADS)
    return 0
