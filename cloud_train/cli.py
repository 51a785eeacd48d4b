"""The cloud tier's verbs: ``data``, ``train``, ``eval``, ``attack`` and ``redteam``.

``add_parsers`` imports argparse only; each handler imports its modules when it runs,
so ``roadshield --help`` stays fast and a device without torch can still parse.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_parsers(sub: Any) -> None:
    """Add the cloud tier's subcommands to ``sub`` (from ``add_subparsers``)."""
    from cloud_train.redteam_cli import add_redteam_parsers
    from cloud_train.sticker.cli import add_attack_parsers

    for add in (_add_data, _add_train, _add_eval, add_attack_parsers,
                add_redteam_parsers):
        add(sub)


def _add_data(sub: Any) -> None:
    data = sub.add_parser("data", help="synthetic road-sign data and GTSRB datasets")
    dsub = data.add_subparsers(dest="data_cmd", required=True)
    synth = dsub.add_parser("synth", help="render a synthetic dataset in the GTSRB layout")
    synth.add_argument("--out", required=True, help="folder to write (gets a gtsrb/ inside)")
    synth.add_argument("--train-per-class", type=int, default=300)
    synth.add_argument("--test-per-class", type=int, default=60)
    synth.add_argument("--size", type=int, default=32, help="crop side in pixels")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=data_synth)
    scenes = dsub.add_parser("scenes", help="render camera frames (images or a video file)")
    scenes.add_argument("--out", required=True, help="a folder for PNGs, or a .mp4/.avi file")
    scenes.add_argument("--frames", type=int, default=120)
    scenes.add_argument("--sticker-rate", type=float, default=0.3)
    scenes.add_argument("--seed", type=int, default=0)
    scenes.set_defaults(func=data_scenes)
    info = dsub.add_parser("info", help="count images and classes of a GTSRB-layout dataset")
    info.add_argument("root")
    info.set_defaults(func=data_info)
    # stage 1 (ingest gate), stage 2 (attestations), stage 4 (dedup, splits, sealed set);
    # each module imports only argparse at this point
    from cloud_train.attest.cli import add_attest_parsers
    from cloud_train.ingest.cli import add_ingest_parsers
    from cloud_train.splits.cli import add_split_parsers

    for add in (add_ingest_parsers, add_attest_parsers, add_split_parsers):
        add(dsub)


def _add_train(sub: Any) -> None:
    parser = sub.add_parser(
        "train", help="train a classifier (standard or adversarial; one or several processes)",
        description="Train a classifier. The same command scales out with torchrun: "
                    "torchrun --standalone --nproc_per_node N -m roadshield.cli train ... "
                    "(--batch-size is then the global batch, split over the N processes).")
    parser.add_argument("--data", required=True,
                        help="GTSRB-layout dataset root, or with --attested a folder written "
                             "by `roadshield data preprocess`")
    parser.add_argument("--attested", metavar="KEYS", default=None,
                        help="stage keys folder (policy.json, trainer.key): verify --data's "
                             "signed stages first, refuse to train if any check fails, and "
                             "write SLSA provenance beside the checkpoint")
    parser.add_argument("--out", required=True, help="checkpoint path (.safetensors)")
    parser.add_argument("--init", default=None, metavar="CKPT",
                        help="start from this checkpoint's weights (fine-tuning; same --arch "
                             "and classes) instead of random ones")
    parser.add_argument("--arch", default="signnet")
    parser.add_argument("--trainer", default="fast_at",
                        help="standard | fast_at | pgd_at | trades | roa | masked")
    add_training_options(parser)
    parser.set_defaults(func=train)


def add_training_options(parser: argparse.ArgumentParser, *, epochs: int = 10) -> None:
    """The schedule, attack, device and resumption options every training command shares
    (``train`` and ``distill train``); ``training_kwargs`` turns them into arguments of
    ``cloud_train.pipeline.train_checkpoint``."""
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--batch-size", type=int, default=128,
                        help="global batch (all processes together)")
    parser.add_argument("--lr", type=float, default=0.05, help="peak of the one-cycle schedule")
    parser.add_argument("--eps", type=float, default=8 / 255,
                        help="L-inf radius in [0,1] units")
    parser.add_argument("--eps-warmup", type=int, default=0,
                        help="epochs over which eps ramps up from 0 (adversarial trainers)")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    multi = parser.add_argument_group("multi-step trainers (pgd_at, trades, roa, ard, rslad)")
    multi.add_argument("--pgd-steps", type=int, default=7, help="inner attack steps")
    multi.add_argument("--trades-beta", type=float, default=6.0,
                       help="weight of TRADES' robustness term")
    multi.add_argument("--roa-size", type=int, default=7,
                       help="side in pixels of ROA's occluding rectangle")
    masked = parser.add_argument_group("masked trainer (PatchCleanser's model)")
    masked.add_argument("--mask-size", type=int, default=None,
                        help="side in pixels of the grey squares (default: PatchCleanser's "
                             "mask for a 10 %% patch at the input size, 14 at 32 px)")
    masked.add_argument("--mask-double-rate", type=float, default=0.5,
                        help="share of examples masked by two squares instead of one")
    run = parser.add_argument_group("devices, processes and resumption")
    run.add_argument("--device", default="auto",
                     help="auto | cpu | cuda (under torchrun each process takes cuda:LOCAL_RANK)")
    run.add_argument("--world-size", type=int, default=None, metavar="N",
                     help="processes expected; refused unless torchrun started exactly N")
    run.add_argument("--backend", default="auto", choices=("auto", "gloo", "nccl"),
                     help="process-group backend (auto: nccl on CUDA, gloo on the CPU)")
    run.add_argument("--amp", default="auto", choices=("auto", "on", "off"),
                     help="float16 mixed precision (auto: on with CUDA; on is refused on CPU)")
    run.add_argument("--channels-last", default="auto", choices=("auto", "on", "off"),
                     help="channels-last memory format (auto: on with CUDA)")
    run.add_argument("--state", default=None, metavar="PATH",
                     help="training state written after every epoch "
                          "(default: <out>.trainstate)")
    run.add_argument("--resume", default=None, metavar="STATE",
                     help="continue an interrupted run from its training state")
    run.add_argument("--stop-after-epoch", type=int, default=None, metavar="E",
                     help="stop after epoch E (time-boxed jobs); continue later with --resume")


def training_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of ``train_checkpoint`` from ``add_training_options``'s options."""
    switch = {"auto": None, "on": True, "off": False}
    return dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, eps=args.eps,
                eps_warmup_epochs=args.eps_warmup, size=args.size, seed=args.seed,
                device=args.device, amp=switch[args.amp],
                channels_last=switch[args.channels_last], world_size=args.world_size,
                backend=args.backend, resume=args.resume,
                state_path=args.state or f"{args.out}.trainstate",
                stop_after_epoch=args.stop_after_epoch,
                trainer_options={"pgd_steps": args.pgd_steps, "trades_beta": args.trades_beta,
                                 "roa_height": args.roa_size, "roa_width": args.roa_size,
                                 "mask_size": args.mask_size,
                                 "mask_double_rate": args.mask_double_rate})


def report_training(result: Any, args: argparse.Namespace) -> int:
    """Print what a training run left behind (rank 0 only under torchrun)."""
    import os

    if os.environ.get("RANK", "0") not in ("", "0"):
        return 0
    history = result.history
    state = args.state or f"{args.out}.trainstate"
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


def _add_eval(sub: Any) -> None:
    ev = sub.add_parser("eval", help="clean, FGSM and PGD accuracy of a checkpoint")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--data", required=True, help="GTSRB-layout dataset root (its test split)")
    ev.add_argument("--eps", type=float, default=8 / 255)
    ev.add_argument("--pgd-steps", type=int, default=10)
    ev.add_argument("--strong", action="store_true",
                    help="also the worst case over APGD-CE, APGD-DLR and Square, with the "
                         "gradient-masking sanity checks")
    ev.add_argument("--apgd-steps", type=int, default=100)
    ev.add_argument("--square-queries", type=int, default=1000)
    ev.add_argument("--limit", type=int, default=None, help="evaluate the first N test images")
    ev.add_argument("--json", action="store_true", help="print the metrics as JSON")
    ev.set_defaults(func=evaluate)


def data_synth(args: argparse.Namespace) -> int:
    from cloud_train import pipeline

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
    from roadshield_base.errors import ConfigError

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

    from cloud_train import pipeline

    if os.environ.get("RANK", "0") not in ("", "0"):  # under torchrun only rank 0 reports
        logging.getLogger().setLevel(logging.WARNING)
    result = pipeline.train_checkpoint(args.data, args.out, arch=args.arch,
                                       trainer=args.trainer, attested_keys=args.attested,
                                       init=args.init, **training_kwargs(args))
    return report_training(result, args)


def evaluate(args: argparse.Namespace) -> int:
    from cloud_train import pipeline
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
