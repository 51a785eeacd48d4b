"""``roadshield redteam inference``: the printable sticker against the car, undefended and defended.

Every stack is the real edge loop (``cloud_train.pipeline.run_edge``: synthetic camera ->
sign locator -> [sanitizers] -> ONNX Runtime [inside PatchCleanser] -> policy -> actuator)
on two drives: a clean one (every class, no sticker) and a stickered one (stop signs
carrying the printed sticker where its sticker.json puts it). Stacks:

- ``undefended``: the teacher alone;
- ``sanitize``: the teacher behind the existing input sanitizers (bit depth 5, median 3x3
  on the model input);
- ``roa``: the teacher fine-tuned against rectangular occlusions (Wu et al. 2020);
- ``patchcleanser``: the teacher fine-tuned with PatchCleanser's masks, inside double
  masking (Xiang et al. 2022) for patches up to 10 % of the crop;
- ``roa+patchcleanser``: the ROA model inside double masking.

Attacks: the sticker optimised white-box on the teacher (targeted: stop -> priority road,
which makes the car drive through the stop, and untargeted) is the non-adaptive attack
for every stack. The adaptive attack re-optimises the sticker with the stack in the loop:
against the ROA model itself, EOT over PatchCleanser's masks, BPDA through the
sanitizers. Black-box stickers (NES on
score queries to the undefended ONNX model only, targeted and untargeted) report the
queries they needed for 50 %.

Figures per stack: sign accuracy on the clean drive, encounters with the right action,
abstain rate on clean crops, attack success (targeted: share of stickered sightings read
as the target; untargeted: share read as anything but the sign), stickered encounters
that end with the attacker's action at the actuator (the policy acted on the target and
no stop went out: ``edge_runtime.scoring.attacker_encounters``), ms per crop as a ratio
to the bare runner, and PatchCleanser's certified accuracy on clean crops. Exit 3 names
every missed target.

Input detectors (``cloud_train.redteam_detectors``, whose docstring states the protocol):
feature squeezing and Mahalanobis are fitted into the teacher's ONNX metadata
(``distill.detector_fit.fit_from_dataset`` on the train split of ``work/data``, rendered at
the scale when the models were given, thresholds at 5 % FPR); ``result["detectors"]``
holds their detection of FGSM, PGD and APGD examples at 2, 4 and 8/255 on test images, of
the targeted and untargeted stickers' crops in the edge loop, and what is left against
adaptive attacks (PGD with the detectors' scores in the loss, BPDA through the squeezers).
Target: the better detector flags >= 90 % of the successful PGD 8/255 examples at its
fitted threshold while its clean false-positive rate measured on the test images stays
<= 10 % (``redteam_inference_report.detector_target``); the adaptive figures are
reported, never a target.

Drift monitor (``cloud_train.redteam_drift``, whose docstring states the protocol): a drift
reference is built for the teacher's ONNX (with its detectors) from a clean synthetic drive;
``result["drift"]`` holds the alarms a monitor raises on other clean drives (false alarms,
per 10,000 frames) and, for five scenarios that change the road at an onset (brightness
x1.15 and +15 % of full scale, fog, the targeted sticker on 30 % of stop signs, a road of
stop signs only), whether and how many frames after the onset it alarmed and on which
statistics. Targets (``redteam_inference_report.drift_targets``): an alarm within 300
frames of the onset of the 15 % brightness shift (``brightness_gain``), and at most one
false alarm per 10,000 clean frames. The ``tiny`` scale runs a small ``DriftConfig``
(60-frame windows), so its figures check the plumbing, not the monitor.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from cloud_train.demo_drives import SIGN, TARGET, drive_sources
from cloud_train.progress import step_ticker
from cloud_train.redteam_cli import check_scale_and_seed
from cloud_train.report_files import write_report
from edge_runtime.drift import DriftConfig
from edge_runtime.scoring import sticker_figures
from roadshield_base.errors import ConfigError

SCHEMA = "roadshield-redteam-inference/1"
SANITIZE_SPEC = "preprocess,bitdepth:bits=5,median:k=3"
DEFENCE_SPEC = "patchcleanser:share=0.1,k=6"
MODELS = ("teacher", "masked", "roa")


@dataclass(frozen=True)
class Scale:
    """Sizes of one red-team run (training data, epochs, drives, optimisation)."""

    train_per_class: int
    epochs: int
    masked_epochs: int
    roa_epochs: int
    clean_frames: int
    sticker_frames: int
    steps: int
    positions: int
    pool: int
    eval_pool: int
    budget: int
    timing_crops: int
    # the input detectors' rows (cloud_train.redteam_detectors)
    detector_images: int  # clean test images sampled (stratified) before keeping the right
    pgd_steps: int
    apgd_steps: int
    adaptive_images: int
    adaptive_steps: int
    lambdas: tuple[float, ...]
    # the drift monitor's rows (cloud_train.redteam_drift)
    drift_reference_frames: int
    drift_clean_frames: int  # clean frames watched for false alarms
    drift_scenario_frames: int  # per scenario, the onset included
    drift_onset: int
    drift_config: DriftConfig | None  # None: the monitor's defaults


SCALES = {
    "tiny": Scale(train_per_class=12, epochs=1, masked_epochs=1, roa_epochs=1,
                  clean_frames=60, sticker_frames=60, steps=2, positions=1, pool=6,
                  eval_pool=6, budget=320, timing_crops=8, detector_images=28, pgd_steps=2,
                  apgd_steps=4, adaptive_images=8, adaptive_steps=2, lambdas=(1.0,),
                  drift_reference_frames=200, drift_clean_frames=200,
                  drift_scenario_frames=150, drift_onset=60,
                  drift_config=DriftConfig(frame_window=60, dark_window=30, crop_window=24,
                                           check_every=5, calibration_folds=2)),
    "quick": Scale(train_per_class=500, epochs=10, masked_epochs=10, roa_epochs=3,
                   clean_frames=450, sticker_frames=300, steps=300, positions=4, pool=96,
                   eval_pool=64, budget=80000, timing_crops=200, detector_images=280,
                   pgd_steps=20, apgd_steps=50, adaptive_images=112, adaptive_steps=50,
                   lambdas=(0.03, 0.1, 0.3, 1.0, 3.0), drift_reference_frames=30000,
                   drift_clean_frames=10000, drift_scenario_frames=3000, drift_onset=1500,
                   drift_config=None),
}


@dataclass(frozen=True)
class Stack:
    name: str
    model: str
    sanitize: str | None = None
    defence: str | None = None


STACKS = (
    Stack("undefended", "teacher"),
    Stack("sanitize", "teacher", sanitize=SANITIZE_SPEC),
    Stack("roa", "roa"),
    Stack("patchcleanser", "masked", defence=DEFENCE_SPEC),
    Stack("roa+patchcleanser", "roa", defence=DEFENCE_SPEC),
)

Tick = Callable[[str], None]


# --- models ---------------------------------------------------------------------------------

def _train_models(work: Path, sc: Scale, seed: int, given: dict[str, str | None],
                  tick: Tick) -> dict[str, Path]:
    """Checkpoints by role: the given ones, else trained here (kept in ``work`` for reuse);
    the masked and ROA models start from the teacher's weights."""
    from cloud_train import pipeline
    from cloud_train.robust_trainers import PATCHCLEANSER_FINETUNE_DOUBLE_RATE

    # the defended models are the teacher fine-tuned against patches, as PatchCleanser's
    # authors fine-tune theirs: the same start, so a difference is the defence's
    trainers = {"teacher": ("standard", sc.epochs), "masked": ("masked", sc.masked_epochs),
                "roa": ("roa", sc.roa_epochs)}
    paths: dict[str, Path] = {}
    data = work / "data"
    for role in MODELS:
        if given.get(role):
            paths[role] = Path(str(given[role]))
            if not paths[role].is_file():
                raise ConfigError(f"--{role} {paths[role]} does not exist",
                                  "pass a checkpoint written by `roadshield train`")
            continue
        ckpt = work / "models" / f"{role}.safetensors"
        if not ckpt.is_file():
            if not (data / "gtsrb").is_dir():
                tick("rendering training data")
                pipeline.synth_dataset(data, sc.train_per_class, _test_per_class(sc),
                                       seed=seed, progress=False)
            trainer, epochs = trainers[role]
            tick(f"training the {role} model ({trainer}, {epochs} epochs)")
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            start = None if role == "teacher" else paths["teacher"]
            options = {"mask_double_rate": PATCHCLEANSER_FINETUNE_DOUBLE_RATE} \
                if trainer == "masked" else None
            pipeline.train_checkpoint(data, ckpt, arch="signnet", trainer=trainer,
                                      epochs=epochs, seed=seed, progress=False, init=start,
                                      lr=0.05 if start is None else 0.02,
                                      trainer_options=options)
        paths[role] = ckpt
    return paths


def _test_per_class(sc: Scale) -> int:
    """Test images rendered per class: enough for the detectors' stratified sample."""
    from cloud_train.signs import SYNTHETIC_CLASSES

    return max(2, -(-sc.detector_images // len(SYNTHETIC_CLASSES)))


def _detector_data(work: Path, sc: Scale, seed: int, tick: Tick) -> Path:
    """The data set the detectors are fitted on (train split) and scored on (test split):
    ``work/data``, rendered at the scale when missing (given models leave it unrendered)
    or when its test split is short of the sample. Image (split, class, i) is rendered
    from its own seed, so a re-render keeps every training image."""
    from cloud_train import pipeline
    from cloud_train.gtsrb import load_gtsrb

    data = work / "data"
    need = _test_per_class(sc)
    if (data / "gtsrb").is_dir():
        labels = load_gtsrb(data, "test", progress=False).labels
        if len(labels) and np.bincount(labels).min() >= need:
            return data
    tick("rendering the detectors' data")
    pipeline.synth_dataset(data, sc.train_per_class, need, seed=seed, progress=False)
    return data


def _fit_detectors(onnx: Path, data: Path, seed: int) -> dict[str, Any]:
    """Fit squeezing and Mahalanobis into ``onnx``'s metadata (train split of ``data``,
    thresholds at 5 % FPR on held-out train images); returns the metadata object."""
    from distill.detector_fit import fit_from_dataset, write_detectors

    obj = fit_from_dataset(onnx, data, seed=seed, progress=False)
    write_detectors(onnx, obj)
    return obj


def _export(paths: dict[str, Path], work: Path) -> dict[str, Path]:
    from cloud_train import pipeline

    onnx = {}
    for role, ckpt in paths.items():
        onnx[role] = pipeline.export_checkpoint(ckpt, work / f"{role}.onnx").onnx
    return onnx


# --- stickers -------------------------------------------------------------------------------

def _stack_transform(stack: Stack, size: int) -> Any:
    from cloud_train.sticker.adaptive import (
        chain_transforms,
        patch_mask_transform,
        sanitizer_transform,
    )

    return chain_transforms(
        sanitizer_transform(stack.sanitize) if stack.sanitize else None,
        patch_mask_transform(size) if stack.defence else None)


def _optimise(ckpt: Path, sc: Scale, seed: int, target: str | None, out: Path,
              transform: Any = None) -> dict[str, Any]:
    """Optimise a sticker on ``ckpt`` (with a defence's ``transform`` in the loop) and write
    its print files into ``out``; returns the optimiser's figures."""
    from cloud_train.pipeline import optimise_sticker_files

    return optimise_sticker_files(ckpt, out, sign=SIGN, target=target, seed=seed,
                                  transform=transform, steps=sc.steps, positions=sc.positions,
                                  pool=sc.pool, eval_pool=sc.eval_pool,
                                  search_steps=min(30, sc.steps))


def _blackbox(onnx: Path, sc: Scale, seed: int, target: str | None,
              budget: int) -> dict[str, Any]:
    """NES on the undefended ONNX model's scores only (no gradients)."""
    from cloud_train.signs import SYNTHETIC_CLASSES
    from cloud_train.sticker.blackbox import nes_sticker
    from cloud_train.sticker.eot import EotPool
    from cloud_train.sticker.shapes import sticker_mask
    from edge_runtime.loop import softmax
    from edge_runtime.model_info import read_model_info
    from edge_runtime.runners.registry import create_runner

    sign = SYNTHETIC_CLASSES.index(SIGN)
    goal = None if target is None else SYNTHETIC_CLASSES.index(target)
    info = read_model_info(onnx)
    with create_runner("onnxruntime", onnx) as runner:
        def query(x: np.ndarray) -> np.ndarray:
            return softmax(runner.infer({info.input_name: x})[info.output_name])

        pool = EotPool(sign, min(48, sc.pool), seed=seed, input_size=info.input_size)
        held = EotPool(sign, sc.eval_pool, seed=seed + 1000, input_size=info.input_size)
        views = min(8, len(pool))
        result = nes_sticker(query, pool, held, sticker_mask(sign, "bars", 0.15), sign, goal,
                             budget=max(budget, 2 * 10 * views), views=views, seed=seed)
    return {"target": target, **result.summary()}


# --- the drives -----------------------------------------------------------------------------

def _drive(onnx: Path, stack: Stack, source: str, certify: bool = False) -> dict[str, Any]:
    from cloud_train import pipeline

    defence = stack.defence
    if defence and certify:
        defence += ",certify=1"
    report = pipeline.run_edge(onnx, source, sanitize=stack.sanitize, defence=defence,
                               progress=False)
    if report.truth is None:
        raise ConfigError(f"the drive {source} carried no ground truth",
                          "use a synthetic:// source")
    return {"truth": report.truth, "encounters": report.encounters,
            "defence_stats": report.defence_stats}


def _time_stack(onnx: Path, stack: Stack, sc: Scale, seed: int) -> float:
    """Median ms per crop (one crop per call, as the loop sends a sign) of the stack's
    sanitizers, model and defence on stickered stop-sign crops."""
    import torch

    from cloud_train.signs import SYNTHETIC_CLASSES
    from cloud_train.sticker.eot import EotPool
    from edge_runtime.model_info import read_model_info
    from edge_runtime.patchcleanser import create_defence
    from edge_runtime.runners.registry import create_runner
    from edge_runtime.sanitize import build_chain

    info = read_model_info(onnx)
    pool = EotPool(SYNTHETIC_CLASSES.index(SIGN), min(sc.timing_crops, 32), seed=seed + 7,
                   input_size=info.input_size)
    with torch.no_grad():
        crops = pool.render(torch.zeros(3, 128, 128), torch.zeros(1, 128, 128)).numpy()
    chain = build_chain(stack.sanitize) if stack.sanitize else None
    runner = create_runner("onnxruntime", onnx)
    if stack.defence:
        runner = create_defence(stack.defence, runner, info.input_size,
                                input_name=info.input_name, output_name=info.output_name)
    times = []
    with runner:
        for i in range(sc.timing_crops):
            x = crops[i % len(crops)][None]
            t0 = time.perf_counter()
            if chain is not None:
                x = chain.sanitize_batch(x)
            runner.infer({info.input_name: np.ascontiguousarray(x, np.float32)})
            times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


# --- the run --------------------------------------------------------------------------------

def run_inference_redteam(out_dir: str | os.PathLike[str], scale: str = "quick", seed: int = 0,
                          teacher: str | None = None, masked: str | None = None,
                          roa: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run every stack against the stickers; write redteam_inference.{json,md,png} (and the
    stickers' print files under stickers/) into ``out_dir``. Models not given are trained
    at the scale (kept under out_dir/work/models and reused by a later run)."""
    from cloud_train.redteam_detectors import detector_rows
    from cloud_train.redteam_drift import drift_scenarios
    from cloud_train.redteam_inference_report import chart_png, check_targets, markdown

    sc, seed = check_scale_and_seed(scale, seed, SCALES)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    steps = 3 + 2 + len(STACKS) - 1 + 1 + len(STACKS) * 4 + len(STACKS) + 4
    t0 = time.perf_counter()
    started = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    with step_ticker(steps, "redteam inference", progress) as tick:
        ckpts = _train_models(work, sc, seed, {"teacher": teacher, "masked": masked, "roa": roa},
                              tick)
        onnx = _export(ckpts, work)
        tick("exported the models to ONNX")
        data = _detector_data(work, sc, seed, tick)
        _fit_detectors(onnx["teacher"], data, seed)
        tick("fitted the input detectors into the teacher's ONNX")
        stickers = out / "stickers"
        attacks: dict[str, Any] = {}
        tick("optimising the targeted sticker on the teacher")
        attacks["targeted"] = _optimise(ckpts["teacher"], sc, seed, TARGET,
                                        stickers / "targeted")
        tick("optimising the untargeted sticker on the teacher")
        attacks["untargeted"] = _optimise(ckpts["teacher"], sc, seed, None,
                                          stickers / "untargeted")
        for stack in STACKS[1:]:
            tick(f"adaptive sticker against {stack.name}")
            attacks[f"adaptive:{stack.name}"] = _optimise(
                ckpts[stack.model], sc, seed, TARGET, stickers / f"adaptive-{stack.name}",
                _stack_transform(stack, 32))
        tick("black-box sticker searches")
        attacks["blackbox"] = _blackbox(onnx["teacher"], sc, seed, TARGET, sc.budget)
        attacks["blackbox_untargeted"] = _blackbox(onnx["teacher"], sc, seed, None,
                                                   sc.budget // 4)
        def drives(folder: str) -> dict[str, str]:  # the demo's clean and stickered drives
            return drive_sources(seed + 1, sc.clean_frames, sc.sticker_frames,
                                 stickers / folder)

        clean_src = drives("targeted")["clean"]

        def stuck(folder: str) -> str:
            return drives(folder)["stickered"]

        rows = []
        for stack in STACKS:
            model = onnx[stack.model]
            tick(f"{stack.name}: clean drive")
            clean = _drive(model, stack, clean_src)
            tick(f"{stack.name}: stickered drives")
            targeted = sticker_figures(_drive(model, stack, stuck("targeted")), SIGN, TARGET)
            untargeted = sticker_figures(_drive(model, stack, stuck("untargeted")), SIGN, None)
            adaptive = targeted if stack.name == "undefended" else sticker_figures(
                _drive(model, stack, stuck(f"adaptive-{stack.name}")), SIGN, TARGET)
            tick(f"{stack.name}: certification and timing")
            cert = None
            if stack.defence:
                part = _drive(model, stack, clean_src, certify=True)["truth"]["clean"]
                cert = part["certified_correct"] / part["classified"] \
                    if part["classified"] else None
            t = clean["truth"]
            rows.append({
                "stack": stack.name, "model": stack.model, "sanitize": stack.sanitize or "",
                "defence": stack.defence or "",
                "clean_accuracy": t["clean"]["accuracy"],
                "clean_abstain_rate": t["clean"].get("abstain_rate", 0.0),
                "clean_encounters_right": t["encounters_right"],
                "clean_encounters": t["encounters"],
                "certified_accuracy": cert,
                "targeted": targeted, "untargeted": untargeted, "adaptive": adaptive,
                "ms_per_crop": _time_stack(model, stack, sc, seed)})
            tick(f"{stack.name}: done")
        detectors = detector_rows(
            ckpts["teacher"], onnx["teacher"], data,
            {"targeted": stickers / "targeted", "untargeted": stickers / "untargeted"},
            images=sc.detector_images, seed=seed, apgd_steps=sc.apgd_steps,
            pgd_steps=sc.pgd_steps, progress=progress, adaptive_images=sc.adaptive_images,
            adaptive_steps=sc.adaptive_steps, lambdas=sc.lambdas,
            clean_frames=sc.clean_frames, sticker_frames=sc.sticker_frames)
        tick("input detectors: attacks, sticker and adaptive attacks")
        drift = drift_scenarios(
            onnx["teacher"], seed=seed, reference_frames=sc.drift_reference_frames,
            clean_frames=sc.drift_clean_frames, scenario_frames=sc.drift_scenario_frames,
            onset=sc.drift_onset, sticker_dir=stickers / "targeted", config=sc.drift_config,
            progress=progress)
        tick("drift monitor: reference, clean drives and scenarios")
    bare = rows[0]["ms_per_crop"]
    for r in rows:
        r["cost_ratio"] = r["ms_per_crop"] / bare if bare > 0 else None
    result: dict[str, Any] = {
        "schema": SCHEMA, "scale": scale, "seed": seed, "sizes": asdict(sc), "sign": SIGN,
        "target": TARGET, "started": started, "cpu_count": os.cpu_count(),
        "models": {k: str(v) for k, v in ckpts.items()}, "attacks": attacks, "stacks": rows,
        "detectors": detectors, "drift": drift}
    check_targets(result)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    write_report(out, "redteam_inference", result, chart_png, markdown)
    return result
