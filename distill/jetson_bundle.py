"""The demo's device chain in one call: distil the Jetson student from the car's model,
quantise it to INT8, and sign both into the bundle the edge loop verifies before it runs.

Writes into ``run``: ``student.safetensors``, ``student.onnx``, ``student.int8.onnx``,
``student-evaluation.json``, ``keys/bundle.key`` (0600) and ``keys/bundle.pub``,
``bundle/`` (``model.onnx``, ``model.int8.onnx``, ``evaluation.json``, ``metadata.json``,
``model.sig``) and ``bundle.pub`` beside it: the key the device trusts.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from roadshield_base.fileio import atomic_write_bytes

# Hinton et al.'s soft targets; alpha weighs the teacher's term against the labels'
KD_OPTIONS = {"kd_temperature": 4.0, "kd_alpha": 0.9}


def student_bundle(run: Path, data: Path, teacher: Path, teacher_sha256: str, *,
                   arch: str = "signnet_mobile", method: str = "kd", epochs: int = 10,
                   pgd_steps: int = 10, seed: int = 0, progress: bool = True
                   ) -> dict[str, Any]:
    """Distil, evaluate, export, quantise and sign; returns the figures for the summary
    (the student's and teacher's MACs and parameters, its evaluation, the INT8 report, the
    bundle's files and how long verifying it took)."""
    import distill.robust_distill  # noqa: F401  (registers kd, ard and rslad)
    from cloud_train import pipeline
    from cloud_train.checkpoint import load_checkpoint
    from distill.bundle import generate_bundle_keys, write_bundle
    from distill.macs import count_macs
    from distill.quantize import quantize_from_dataset
    from edge_runtime.bundle import verify_bundle

    options = dict(KD_OPTIONS) if method == "kd" else {}
    student = pipeline.train_checkpoint(data, run / "student.safetensors", arch=arch,
                                        trainer=method, epochs=epochs, seed=seed,
                                        progress=progress, teacher=teacher,
                                        trainer_options=options)
    evaluation = pipeline.evaluate_checkpoint(student.checkpoint, data, pgd_steps=pgd_steps,
                                              expected_sha256=student.sha256)
    atomic_write_bytes(run / "student-evaluation.json",
                       json.dumps(evaluation, indent=2, sort_keys=True).encode() + b"\n")
    exported = pipeline.export_checkpoint(student.checkpoint, run / "student.onnx",
                                          expected_sha256=student.sha256, seed=seed)
    int8 = quantize_from_dataset(exported.onnx, run / "student.int8.onnx", data, seed=seed,
                                 progress=progress)
    key, pub = generate_bundle_keys(run / "keys")
    bundle = write_bundle(run / "bundle", exported.onnx, key=key, int8=run / "student.int8.onnx",
                          evaluation=run / "student-evaluation.json")
    shutil.copyfile(pub, run / "bundle.pub")
    t0 = time.perf_counter()
    verify_bundle(run / "bundle", run / "bundle.pub")
    verify_ms = (time.perf_counter() - t0) * 1000

    def size(ckpt: Path) -> tuple[int, int]:
        model, meta = load_checkpoint(ckpt)
        side = meta.get("input_size", 32)
        side = side[-1] if isinstance(side, (tuple, list)) else side  # (C, H, W)
        return count_macs(model, int(side)), sum(p.numel() for p in model.parameters())

    (s_macs, s_params), (t_macs, t_params) = size(student.checkpoint), size(teacher)
    return {"arch": arch, "method": method, "epochs": epochs, "options": options,
            "checkpoint_sha256": student.sha256, "teacher_sha256": teacher_sha256,
            "seconds_per_epoch": student.history["seconds_per_epoch"],
            "macs": s_macs, "teacher_macs": t_macs, "macs_ratio": s_macs / t_macs,
            "params": s_params, "teacher_params": t_params,
            "evaluation": evaluation, "int8": int8.to_dict(),
            "bundle": {"dir": "bundle", "trust_key": "bundle.pub", "files": bundle.files,
                       "key_hint": bundle.key_hint, "verify_ms": verify_ms}}
