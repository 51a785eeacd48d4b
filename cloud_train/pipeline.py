"""The chain's steps as plain functions, shared by the CLI subcommands and the demo.

Each function imports its tier when called, so importing this module is cheap and
``roadshield edge`` never pulls in torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from roadshield_base.errors import ConfigError

log = logging.getLogger(__name__)


def synth_dataset(out: str | Path, train_per_class: int, test_per_class: int, size: int = 32,
                  seed: int = 0, progress: bool = True) -> Any:
    """Render the synthetic sign dataset in GTSRB layout under ``out/gtsrb``."""
    from cloud_train.render import render_dataset

    if train_per_class < 1 or test_per_class < 1:
        raise ConfigError(f"per-class counts must be >= 1 (got train={train_per_class}, "
                          f"test={test_per_class})", "use e.g. --train-per-class 300")
    return render_dataset(out, train_per_class, test_per_class, seed=seed, size=size,
                          progress=progress)


@dataclass
class TrainResult:
    checkpoint: Path
    sha256: str
    class_names: tuple[str, ...]
    history: dict[str, Any]
    train_images: int
    provenance: Path | None = None  # SLSA provenance, for training on an attested pipeline


def _training_data(data: str | Path, size: int, attested_keys: str | Path | None
                   ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], Any]:
    """Images, labels and class names to train on, plus the verify report when attested.

    With ``attested_keys`` (the stage keys folder holding the root-signed policy and the
    trainer key), ``data`` is a `roadshield data preprocess` output folder and training
    refuses to start unless every hash, signature, chain link and drift check passes.
    """
    if attested_keys is None:
        from cloud_train.gtsrb import load_gtsrb

        ds = load_gtsrb(data, "train", size=size)
        return ds.images, ds.labels, tuple(ds.class_names), None
    from cloud_train.attest.verify import verified_training_data

    # one read: the arrays are decoded from the bytes the verification hashed, so a file
    # swapped after verification is never trained on; raises VerifyError naming the stage
    shards, report = verified_training_data(data, attested_keys)
    if shards["images"].shape[1] != size:
        raise ConfigError(f"attested data in {data} is {shards['images'].shape[1]} px, "
                          f"training asked for {size}", f"train with --size "
                          f"{shards['images'].shape[1]} or preprocess with --size {size}")
    return shards["images"], shards["labels"], shards["class_names"], report


def train_checkpoint(data: str | Path, out: str | Path, *, arch: str = "signnet",
                     trainer: str = "fast_at", epochs: int = 10, batch_size: int = 128,
                     lr: float = 0.05, eps: float = 8 / 255, eps_warmup_epochs: int = 0,
                     size: int = 32, seed: int = 0, progress: bool = True,
                     attested_keys: str | Path | None = None, device: str = "auto",
                     amp: bool | None = None, channels_last: bool | None = None,
                     world_size: int | None = None, backend: str = "auto",
                     resume: str | Path | None = None, state_path: str | Path | None = None,
                     stop_after_epoch: int | None = None,
                     trainer_options: dict[str, Any] | None = None,
                     init: str | Path | None = None,
                     init_sha256: str | None = None,
                     teacher: str | Path | None = None) -> TrainResult:
    """Train ``arch`` on the train split of a GTSRB-layout dataset, or on a verified attested
    pipeline folder (``attested_keys``); save a safetensors file (and, when attested, its
    signed SLSA provenance beside it as ``<checkpoint>.intoto.jsonl``).

    Started by torchrun (``torchrun --nproc_per_node N -m roadshield.cli train ...``) every
    process runs this with the same arguments: ``batch_size`` is the global batch, split
    evenly over the processes (``world_size``, when given, must match torchrun's), and only
    rank 0 writes the checkpoint, the provenance and the training state (``state_path``,
    after every epoch). ``resume`` continues an interrupted run from its state;
    ``stop_after_epoch`` ends this call early, leaving no checkpoint yet. ``amp`` /
    ``channels_last``: None = on with CUDA, off on the CPU. ``trainer_options`` are further
    TrainConfig fields (``pgd_steps``, ``trades_beta``, ``roa_height``, ...). ``init``: a
    checkpoint of the same architecture and classes to start from instead of random
    weights (fine-tuning, e.g. a teacher fine-tuned with ``masked`` for PatchCleanser;
    ``init_sha256`` pins it). ``teacher``: the checkpoint a distillation trainer (``kd``,
    ``ard``, ``rslad``, registered by ``distill.robust_distill``) learns from, on the same
    classes; its sha256 goes into the student's checkpoint. Every setting, the launch and
    the resume file are checked before the data is loaded.
    """
    import torch

    from cloud_train.checkpoint import save_checkpoint
    from cloud_train.distributed import session
    from cloud_train.models import create_model
    from cloud_train.tensors import make_loader
    from cloud_train.train import TrainConfig, resolve_precision, train
    from cloud_train.train_state import load_train_state

    cfg = TrainConfig(trainer=trainer, epochs=epochs, batch_size=batch_size, lr=lr, eps=eps,
                      eps_warmup_epochs=eps_warmup_epochs, seed=seed, device=device, amp=amp,
                      channels_last=channels_last, **(trainer_options or {}))  # validates
    state = load_train_state(resume) if resume is not None else None
    with session(device=device, backend=backend, expected_world_size=world_size,
                 batch_size=batch_size) as ctx:
        resolve_precision(cfg, ctx.device)  # amp / channels-last forced on a CPU: refuse now
        images, labels, class_names, report = _training_data(data, size, attested_keys)
        torch.manual_seed(seed)
        model = create_model(arch, num_classes=len(class_names), input_size=size)
        if init is not None:
            _load_init(model, init, init_sha256, arch, class_names)
        teacher_model, teacher_meta = (None, {}) if teacher is None else \
            _load_teacher(teacher, class_names)
        # hold out a small, fixed slice of the training split for per-epoch validation
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(labels))
        n_val = min(512, len(order) // 10)
        val_idx, train_idx = order[:n_val], order[n_val:]
        loader = make_loader(images[train_idx], labels[train_idx], batch_size=batch_size,
                             shuffle=True, augment=True, seed=seed)
        val = (images[val_idx], labels[val_idx]) if n_val else None
        history = train(model, loader, cfg, val=val, progress=progress, dist=ctx,
                        resume=resume if state is None else state, state_path=state_path,
                        stop_after_epoch=stop_after_epoch, teacher=teacher_model)
        # rank 0 writes; every rank learns the sha256, or every rank raises if rank 0 failed
        sha, provenance, error = "", None, None
        if history.completed and ctx.is_main:
            try:
                sha = save_checkpoint(model, out, {"class_names": list(class_names),
                                                   "train_config": cfg,
                                                   "dataset": str(Path(data)),
                                                   **teacher_meta})
                log.info("checkpoint %s sha256=%s", out, sha)
                if report is not None:
                    from cloud_train.attest.policy import load_stage_key
                    from cloud_train.attest.training_gate import (
                        provenance_for_training,
                        write_provenance,
                    )

                    envelope = provenance_for_training(
                        sha, report, cfg.to_dict(), load_stage_key(attested_keys, "trainer"),
                        checkpoint_name=Path(out).name)
                    provenance = write_provenance(Path(f"{out}.intoto.jsonl"), envelope)
            except Exception as err:  # re-raised below, once the other ranks know
                error = err
        if not ctx.all_ok(error is None):
            if error is not None:
                raise error
            raise ConfigError(f"rank 0 could not write the checkpoint {out}",
                              "see rank 0's error message")
        sha, provenance = ctx.broadcast_object((sha, provenance))
        # history["completed"] is False after stop_after_epoch: no checkpoint yet (sha256 "")
        return TrainResult(Path(out), sha, tuple(class_names), history.to_dict(),
                           int(len(train_idx)), provenance)


def _load_teacher(path: str | Path, class_names: Any) -> tuple[Any, dict[str, Any]]:
    """The teacher checkpoint's model (eval mode) and what the student records of it."""
    from cloud_train.checkpoint import load_checkpoint
    from roadshield_base.fileio import file_sha256

    model, meta = load_checkpoint(path)
    if list(meta["class_names"]) != list(class_names):
        raise ConfigError(f"teacher {path} knows {len(meta['class_names'])} classes, the data "
                          f"{len(class_names)} (or in another order)",
                          "distil on the dataset the teacher was trained on")
    return model.eval(), {"teacher": {"path": str(path), "sha256": file_sha256(path),
                                      "arch": meta.get("arch", "")}}


def _load_init(model: Any, init: str | Path, sha256: str | None, arch: str,
               class_names: Any) -> None:
    """Copy the weights of checkpoint ``init`` into ``model`` (same arch and classes)."""
    from cloud_train.checkpoint import load_checkpoint

    start, meta = load_checkpoint(init, expected_sha256=sha256)
    if meta.get("arch") != arch or list(meta["class_names"]) != list(class_names):
        raise ConfigError(f"--init {init} is a {meta.get('arch')} on {len(meta['class_names'])} "
                          f"classes; this run trains a {arch} on {len(class_names)}",
                          "start from a checkpoint of the same architecture and classes")
    model.load_state_dict(start.state_dict())


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path, *, eps: float = 8 / 255,
                        pgd_steps: int = 10, expected_sha256: str | None = None,
                        strong: bool = False, apgd_steps: int = 100, square_queries: int = 1000,
                        limit: int | None = None) -> dict[str, Any]:
    """Clean, FGSM and PGD accuracy of a checkpoint on a dataset's test split; with ``strong``
    also the worst case over APGD-CE, APGD-DLR and Square plus the sanity checks (under
    ``metrics["strong_eval"]``). ``limit`` evaluates the first N test images only."""
    from cloud_train.checkpoint import load_checkpoint
    from cloud_train.evaluate import evaluate
    from cloud_train.gtsrb import load_gtsrb

    model, meta = load_checkpoint(checkpoint, expected_sha256=expected_sha256)
    size = int(meta["input_size"][-1])
    ds = load_gtsrb(data, "test", size=size)
    if tuple(ds.class_names) != tuple(meta["class_names"]):
        raise ConfigError(f"dataset {data} has classes {list(ds.class_names)[:4]}... but "
                          f"checkpoint {checkpoint} was trained on {meta['class_names'][:4]}...",
                          "evaluate on a dataset with the same class list")
    images, labels = ds.images, ds.labels
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"limit must be >= 1, got {limit}", "omit it to use every image")
        images, labels = images[:limit], labels[:limit]
    metrics = evaluate(model, images, labels, eps=eps, pgd_steps=pgd_steps)
    if strong:
        from cloud_train.robust_eval import strong_report

        metrics["strong_eval"] = strong_report(model, images, labels, eps=eps,
                                               apgd_steps=apgd_steps,
                                               square_queries=square_queries)
    metrics["checkpoint_sha256"] = meta["sha256"]
    return metrics


@dataclass
class ExportResult:
    onnx: Path
    parity_max_abs: float
    pt2: Path | None = None
    class_names: tuple[str, ...] = field(default_factory=tuple)


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, opset: int = 17,
                      pt2: bool = False, expected_sha256: str | None = None,
                      seed: int = 0) -> ExportResult:
    """Export a checkpoint to ONNX (and .pt2) and check ONNX Runtime agrees with torch."""
    from cloud_train.checkpoint import load_checkpoint
    from distill.export import check_parity, export_onnx, export_torch_program

    model, meta = load_checkpoint(checkpoint, expected_sha256=expected_sha256)
    size = int(meta["input_size"][-1])
    onnx_path = export_onnx(model, meta["class_names"], out, opset=opset,
                            source_sha256=meta["sha256"])
    # a fixed batch: the parity figure is reproducible run to run
    batch = np.random.default_rng(seed).random((8, 3, size, size), dtype=np.float32)
    parity = check_parity(model, onnx_path, batch)
    pt2_path = None
    if pt2:
        pt2_path = export_torch_program(model, Path(out).with_suffix(".pt2"), size,
                                        class_names=meta["class_names"],
                                        source_sha256=meta["sha256"])
    return ExportResult(Path(onnx_path), parity, pt2_path, tuple(meta["class_names"]))


def optimise_sticker_files(checkpoint: str | Path, out: str | Path, *, sign: str,
                           target: str | None, sign_mm: float = 600.0, seed: int = 0,
                           transform: Any = None, progress: Any = None,
                           **options: Any) -> dict[str, Any]:
    """Optimise a printable sticker for ``sign`` on a checkpoint (white-box, RP2 / EOT) and
    write its print files into ``out`` (cloud_train/sticker/FORMAT.md); returns the
    optimiser's figures. ``options`` are further ``StickerConfig`` fields (steps, area,
    shape, positions, ...); ``transform`` puts a defence in the loop (adaptive attacks)."""
    from cloud_train.checkpoint import load_checkpoint
    from cloud_train.signs import SYNTHETIC_CLASSES
    from cloud_train.sticker.optimise import StickerConfig, optimise_sticker
    from cloud_train.sticker.placement import class_index_of
    from cloud_train.sticker.printout import write_sticker

    model, meta = load_checkpoint(checkpoint)
    if tuple(meta["class_names"]) != SYNTHETIC_CLASSES:
        raise ConfigError(f"{checkpoint} was not trained on the synthetic sign classes",
                          "stickers are optimised in the synthetic world; use its models")
    cfg = StickerConfig(sign=class_index_of(sign, "sign"),
                        target=None if target is None else class_index_of(target, "target"),
                        seed=seed, **options)
    result = optimise_sticker(model, cfg, progress=progress, transform=transform)
    figures = {"model_sha256": meta["sha256"], **result.summary()}
    write_sticker(out, result.colours, result.mask, sign=SYNTHETIC_CLASSES[cfg.sign],
                  target=None if cfg.target is None else SYNTHETIC_CLASSES[cfg.target],
                  shape=cfg.shape, sign_mm=sign_mm, meta=figures)
    return figures


def run_edge(model: str | Path, source: str, *, backend: str = "auto",
             max_frames: int | None = None, video: str | Path | None = None,
             decision_log: str | Path | None = None, max_speed_kmh: float = 50.0,
             actuator: Any = None, keepalive_s: float | None = None, progress: bool = True,
             sanitize: str | None = None, defence: str | None = None,
             detect: str | None = None, drift: bool = False, metrics_port: int | None = None,
             caution: dict[str, Any] | None = None) -> Any:
    """Run the edge loop once over ``source``; return its LoopReport.

    sanitize: a sanitizer chain spec such as ``"bitdepth:bits=5,median:k=3"`` (see
    ``edge_runtime.sanitize``), applied to each located crop before the model.
    defence: an input-patch defence spec such as ``"patchcleanser:share=0.1,k=6"`` (see
    ``edge_runtime.patchcleanser``), wrapped around the model.
    keepalive_s: re-send the standing command this often (seconds) so a device whose
    commands expire (the serial actuator's TTL) keeps its state between decisions.
    detect / drift / metrics_port / caution: input detectors, the drift monitor, the
    Prometheus port and the caution gate's settings (see ``edge_runtime.loop.build_loop``).
    """
    from edge_runtime.loop import build_loop

    loop = build_loop(source, model, backend=backend,
                      policy_options={"max_speed_kmh": max_speed_kmh}, actuator=actuator,
                      annotate_video=video, decision_log=decision_log, sanitize=sanitize,
                      defence=defence, keepalive_s=keepalive_s, detect=detect, drift=drift,
                      metrics_port=metrics_port, caution=caution)
    with loop:
        return loop.run(max_frames=max_frames, progress=progress)
