"""Handlers of the ``roadshield`` subcommands: parse nothing, print results, return exit codes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from roadshield import pipeline
from roadshield_base.errors import ConfigError


def data_synth(args: argparse.Namespace) -> int:
    summary = pipeline.synth_dataset(args.out, args.train_per_class, args.test_per_class,
                                     size=args.size, seed=args.seed)
    print(f"wrote {summary.train_images} train + {summary.test_images} test images of "
          f"{len(summary.class_names)} classes to {summary.root} "
          f"({summary.images_per_second:.0f} images/s)")
    return 0


def data_scenes(args: argparse.Namespace) -> int:
    import cv2

    from cloud_train.scenes import write_video
    from cloud_train.synthetic_camera import SyntheticCamera

    uri = f"synthetic://?seed={args.seed}&frames={args.frames}&sticker_rate={args.sticker_rate}"
    out = Path(args.out)
    with SyntheticCamera(uri) as cam:
        if out.suffix.lower() in (".mp4", ".avi"):
            n = write_video((f.image for f in cam), out, fps=cam.fps)
        else:
            out.mkdir(parents=True, exist_ok=True)
            n = 0
            for frame in cam:
                if not cv2.imwrite(str(out / f"{frame.index:05d}.png"), frame.image):
                    raise ConfigError(f"could not write {out / f'{frame.index:05d}.png'}",
                                      "check the folder is writable and has space")
                n += 1
    print(f"wrote {n} frames to {out}")
    return 0


def data_info(args: argparse.Namespace) -> int:
    import numpy as np

    from cloud_train.gtsrb import load_gtsrb

    for split in ("train", "test"):
        ds = load_gtsrb(args.root, split)
        counts = np.bincount(ds.labels, minlength=len(ds.class_names))
        print(f"{split}: {len(ds.labels)} images, {int((counts > 0).sum())} of "
              f"{len(ds.class_names)} classes present, {int(counts.min())}-{int(counts.max())} "
              "per class")
    return 0


def train(args: argparse.Namespace) -> int:
    import logging
    import os

    rank = os.environ.get("RANK", "0")
    if rank not in ("", "0"):  # under torchrun only rank 0 reports
        logging.getLogger().setLevel(logging.WARNING)
    switch = {"auto": None, "on": True, "off": False}
    state = args.state or f"{args.out}.trainstate"
    result = pipeline.train_checkpoint(
        args.data, args.out, arch=args.arch, trainer=args.trainer, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, eps=args.eps, eps_warmup_epochs=args.eps_warmup,
        size=args.size, seed=args.seed, attested_keys=args.attested, device=args.device,
        amp=switch[args.amp], channels_last=switch[args.channels_last],
        world_size=args.world_size, backend=args.backend, resume=args.resume, state_path=state,
        stop_after_epoch=args.stop_after_epoch,
        init=args.init,
        trainer_options={"pgd_steps": args.pgd_steps, "trades_beta": args.trades_beta,
                         "roa_height": args.roa_size, "roa_width": args.roa_size,
                         "mask_size": args.mask_size,
                         "mask_double_rate": args.mask_double_rate})
    if rank not in ("", "0"):
        return 0
    history = result.history
    if not history["completed"]:
        done = history["epochs"][-1]["epoch"] if history["epochs"] else 0
        print(f"stopped after epoch {done} of {args.epochs}; training state {state} "
              f"(continue with --resume {state})")
        return 0
    print(f"checkpoint {result.checkpoint} sha256={result.sha256} "
          f"({history['seconds_per_epoch']:.1f} s/epoch on {history['world_size']} "
          f"process(es), {history['device']})")
    if result.provenance is not None:
        print(f"provenance {result.provenance} (signed by the trainer key)")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from cloud_train.evaluate import format_table

    metrics = pipeline.evaluate_checkpoint(args.checkpoint, args.data, eps=args.eps,
                                           pgd_steps=args.pgd_steps, strong=args.strong,
                                           apgd_steps=args.apgd_steps,
                                           square_queries=args.square_queries, limit=args.limit)
    if args.json:
        print(json.dumps(metrics, indent=2))
        return 0
    print(format_table(metrics))
    if "strong_eval" in metrics:
        from cloud_train.robust_eval import format_strong

        print(format_strong(metrics["strong_eval"]))
    return 0


def distill_export(args: argparse.Namespace) -> int:
    result = pipeline.export_checkpoint(args.checkpoint, args.out, opset=args.opset, pt2=args.pt2)
    print(f"wrote {result.onnx} (ONNX Runtime vs torch max abs diff {result.parity_max_abs:.2e})"
          + (f" and {result.pt2}" if result.pt2 else ""))
    return 0


def distill_engine(args: argparse.Namespace) -> int:
    from distill.engine import build_engine
    from edge_runtime.runners.engine_meta import sidecar_path

    info = build_engine(args.onnx, args.out, precision=args.precision,
                        workspace_mib=args.workspace_mib, min_batch=args.min_batch,
                        opt_batch=args.opt_batch, max_batch=args.max_batch, verbose=args.verbose)
    out = Path(args.out) if args.out else Path(args.onnx).with_suffix(".engine")
    print(f"wrote {out} ({info.precision}, TensorRT {info.tensorrt_version}, {info.gpu_name}); "
          f"sidecar {sidecar_path(out).name}")
    return 0


def distill_detectors(args: argparse.Namespace) -> int:
    from distill.detector_fit import fit_from_dataset, write_detectors

    crops = None
    if args.calibrate_source:
        from distill.stream import clean_crops
        from roadshield.pipeline import register_synthetic_camera

        register_synthetic_camera()
        crops = clean_crops(args.model, args.calibrate_source, max_frames=args.calibrate_frames)
    obj = fit_from_dataset(args.model, args.data, args.calib_share, args.fpr, args.seed,
                           args.limit_per_class, names=args.detectors, squeezers=args.squeezers,
                           calib_crops=crops)
    thresholds = {k: v["threshold"] for k, v in obj.items() if isinstance(v, dict)}
    if not args.dry_run:
        write_detectors(args.model, obj)
    print(json.dumps({"written": not args.dry_run, "fpr": obj["fpr"],
                      "thresholds": thresholds}))
    return 0


def distill_drift_reference(args: argparse.Namespace) -> int:
    from distill.drift_reference import build_drift_reference, write_drift_reference
    from roadshield.pipeline import register_synthetic_camera

    register_synthetic_camera()
    reference = build_drift_reference(args.model, args.source, detect=not args.no_detectors,
                                      max_frames=args.max_frames)
    write_drift_reference(args.model, reference)
    print(f"wrote the drift reference ({reference.frames} frames, {reference.crops} crops, "
          f"{len(reference.statistics)} statistics) into {args.model}")
    return 0


def edge_run(args: argparse.Namespace) -> int:
    actuator = None
    if args.serial:
        if not args.serial_key:
            raise ConfigError("--serial needs --serial-key",
                              "pass the key file written by `roadshield actuator provision`")
        from actuator.serial_actuator import SerialActuator

        actuator = SerialActuator(args.serial, args.serial_key, max_speed_kmh=args.max_speed)
    try:
        # commands on the serial link expire after their TTL (500 ms): refresh well before
        report = pipeline.run_edge(args.model, args.source, backend=args.backend,
                                   max_frames=args.max_frames, video=args.video,
                                   decision_log=args.decision_log,
                                   max_speed_kmh=args.max_speed, sanitize=args.sanitize,
                                   defence=args.defence, actuator=actuator,
                                   keepalive_s=0.2 if actuator is not None else None,
                                   detect=args.detect, drift=args.drift,
                                   metrics_port=args.metrics_port,
                                   caution={"window": args.caution_window,
                                            "limit": args.caution_limit})
    finally:
        if actuator is not None:
            actuator.close()
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        from roadshield.report import format_loop_report

        print(format_loop_report(report.to_dict()))
    if args.plot:
        from roadshield.report import plot_monitor

        print(f"wrote {plot_monitor(report.to_dict(), args.plot)}")
    return 0


def edge_backends(args: argparse.Namespace) -> int:
    from edge_runtime.runners.registry import available_runners, list_runners

    usable = available_runners()
    for name in list_runners():
        print(f"{name:12s} {'available' if name in usable else 'not installed'}")
    return 0
