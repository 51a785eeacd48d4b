"""The ``roadshield`` command: one subcommand per stage, each tier imported lazily.

``roadshield edge ...`` therefore runs on a device with no torch, and ``--help``
stays fast. Every RoadshieldError ends as one clear message and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from roadshield import __version__
from roadshield_base.errors import RoadshieldError

Handler = Callable[[argparse.Namespace], int]


def _handler(module: str, func: str) -> Handler:
    """Import ``module`` only when its subcommand runs."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        return int(getattr(importlib.import_module(module), func)(args) or 0)

    return run


def _add_data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="synthetic road-sign data and GTSRB datasets")
    dsub = data.add_subparsers(dest="data_cmd", required=True)
    synth = dsub.add_parser("synth", help="render a synthetic dataset in the GTSRB layout")
    synth.add_argument("--out", required=True, help="folder to write (gets a gtsrb/ inside)")
    synth.add_argument("--train-per-class", type=int, default=300)
    synth.add_argument("--test-per-class", type=int, default=60)
    synth.add_argument("--size", type=int, default=32, help="crop side in pixels")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=_handler("roadshield.commands", "data_synth"))
    scenes = dsub.add_parser("scenes", help="render camera frames (images or a video file)")
    scenes.add_argument("--out", required=True, help="a folder for PNGs, or a .mp4/.avi file")
    scenes.add_argument("--frames", type=int, default=120)
    scenes.add_argument("--sticker-rate", type=float, default=0.3)
    scenes.add_argument("--seed", type=int, default=0)
    scenes.set_defaults(func=_handler("roadshield.commands", "data_scenes"))
    info = dsub.add_parser("info", help="count images and classes of a GTSRB-layout dataset")
    info.add_argument("root")
    info.set_defaults(func=_handler("roadshield.commands", "data_info"))
    # stage 1 (ingest gate), stage 2 (attestations), stage 4 (dedup, splits, sealed set);
    # each module imports only argparse at this point
    from cloud_train.attest.cli import add_attest_parsers
    from cloud_train.ingest.cli import add_ingest_parsers
    from cloud_train.splits.cli import add_split_parsers

    for add in (add_ingest_parsers, add_attest_parsers, add_split_parsers):
        add(dsub)


def _add_train(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser(
        "train", help="train a classifier (standard or adversarial; one or several processes)",
        description="Train a classifier. The same command scales out with torchrun: "
                    "torchrun --standalone --nproc_per_node N -m roadshield.cli train ... "
                    "(--batch-size is then the global batch, split over the N processes).")
    train.add_argument("--data", required=True,
                       help="GTSRB-layout dataset root, or with --attested a folder written "
                            "by `roadshield data preprocess`")
    train.add_argument("--attested", metavar="KEYS", default=None,
                       help="stage keys folder (policy.json, trainer.key): verify --data's "
                            "signed stages first, refuse to train if any check fails, and "
                            "write SLSA provenance beside the checkpoint")
    train.add_argument("--out", required=True, help="checkpoint path (.safetensors)")
    train.add_argument("--init", default=None, metavar="CKPT",
                       help="start from this checkpoint's weights (fine-tuning; same --arch "
                            "and classes) instead of random ones")
    train.add_argument("--arch", default="signnet")
    train.add_argument("--trainer", default="fast_at",
                       help="standard | fast_at | pgd_at | trades | roa | masked")
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--batch-size", type=int, default=128,
                       help="global batch (all processes together)")
    train.add_argument("--lr", type=float, default=0.05, help="peak of the one-cycle schedule")
    train.add_argument("--eps", type=float, default=8 / 255, help="L-inf radius in [0,1] units")
    train.add_argument("--eps-warmup", type=int, default=0,
                       help="epochs over which eps ramps up from 0 (adversarial trainers)")
    train.add_argument("--size", type=int, default=32)
    train.add_argument("--seed", type=int, default=0)
    multi = train.add_argument_group("multi-step trainers (pgd_at, trades, roa)")
    multi.add_argument("--pgd-steps", type=int, default=7, help="inner attack steps")
    multi.add_argument("--trades-beta", type=float, default=6.0,
                       help="weight of TRADES' robustness term")
    multi.add_argument("--roa-size", type=int, default=7,
                       help="side in pixels of ROA's occluding rectangle")
    masked = train.add_argument_group("masked trainer (PatchCleanser's model)")
    masked.add_argument("--mask-size", type=int, default=None,
                        help="side in pixels of the grey squares (default: PatchCleanser's "
                             "mask for a 10 %% patch at the input size, 14 at 32 px)")
    masked.add_argument("--mask-double-rate", type=float, default=0.5,
                        help="share of examples masked by two squares instead of one")
    run = train.add_argument_group("devices, processes and resumption")
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
    train.set_defaults(func=_handler("roadshield.commands", "train"))

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
    ev.set_defaults(func=_handler("roadshield.commands", "evaluate"))


def _add_distill(sub: argparse._SubParsersAction) -> None:
    distill = sub.add_parser("distill", help="export a checkpoint for the edge")
    dsub = distill.add_subparsers(dest="distill_cmd", required=True)
    exp = dsub.add_parser("export", help="ONNX (and optionally .pt2) with metadata")
    exp.add_argument("--checkpoint", required=True)
    exp.add_argument("--out", required=True, help="path of the .onnx file to write")
    exp.add_argument("--opset", type=int, default=17)
    exp.add_argument("--pt2", action="store_true", help="also write a torch.export program")
    exp.set_defaults(func=_handler("roadshield.commands", "distill_export"))
    eng = dsub.add_parser("engine", help="build a TensorRT engine from the ONNX file (on the "
                                         "device that will run it)")
    eng.add_argument("onnx", help="the .onnx written by `distill export`")
    eng.add_argument("--out", default=None, help="engine path (default: beside it, .engine)")
    eng.add_argument("--precision", choices=("auto", "fp16", "fp32"), default="auto",
                     help="auto: FP16 where the GPU has fast FP16 (Orin does)")
    eng.add_argument("--workspace-mib", type=int, default=1024)
    eng.add_argument("--min-batch", type=int, default=1)
    eng.add_argument("--opt-batch", type=int, default=None)
    eng.add_argument("--max-batch", type=int, default=8)
    eng.add_argument("--verbose", action="store_true", help="TensorRT's own log at INFO")
    eng.set_defaults(func=_handler("roadshield.commands", "distill_engine"))
    det = dsub.add_parser("detectors", help="fit the adversarial-input detectors (feature "
                          "squeezing, Mahalanobis) into the model's metadata")
    det.add_argument("--model", required=True, help="the .onnx written by `distill export`")
    det.add_argument("--data", required=True,
                     help="GTSRB-layout folder; only its train split is read")
    det.add_argument("--fpr", type=float, default=0.05,
                     help="false-positive rate the thresholds are set at, on clean images")
    det.add_argument("--calib-share", type=float, default=0.2,
                     help="share of the train split (whole tracks) held out to set thresholds")
    det.add_argument("--calibrate-source", default=None, metavar="URI",
                     help="set the thresholds on the crops of this clean stream (a recorded "
                          "drive, synthetic://...) instead of held-out train images; the whole "
                          "train split then fits Mahalanobis")
    det.add_argument("--calibrate-frames", type=int, default=None, metavar="N")
    det.add_argument("--detectors", default="squeeze,mahalanobis", metavar="NAMES")
    det.add_argument("--squeezers", default="bitdepth:bits=5,median:k=3", metavar="CHAIN")
    det.add_argument("--limit-per-class", type=int, default=None, metavar="N")
    det.add_argument("--seed", type=int, default=0)
    det.add_argument("--dry-run", action="store_true", help="print the fit, write nothing")
    det.set_defaults(func=_handler("roadshield.commands", "distill_detectors"))
    ref = dsub.add_parser("drift-reference",
                          help="record the drift monitor's reference from a clean stream into "
                               "the model's metadata")
    ref.add_argument("--model", required=True, help="the .onnx written by `distill export`")
    ref.add_argument("--source", required=True,
                     help="a trusted clean stream: a video, a folder of frames, synthetic://...")
    ref.add_argument("--max-frames", type=int, default=None)
    ref.add_argument("--no-detectors", action="store_true",
                     help="leave the detectors' scores out of the reference")
    ref.set_defaults(func=_handler("roadshield.commands", "distill_drift_reference"))


def _add_edge(sub: argparse._SubParsersAction) -> None:
    edge = sub.add_parser("edge", help="the on-device runtime")
    esub = edge.add_subparsers(dest="edge_cmd", required=True)
    run = esub.add_parser("run", help="camera -> locate -> infer -> decide -> actuator")
    run.add_argument("--model", required=True,
                     help=".onnx, .pt2 (torch backend) or .engine (tensorrt backend)")
    run.add_argument("--source", default="synthetic://?frames=120",
                     help="csi://N, /dev/videoN, v4l2://N, a video file, a folder, synthetic://")
    run.add_argument("--backend", default="auto", help="auto | onnxruntime | torch | tensorrt")
    run.add_argument("--max-frames", type=int, default=None)
    run.add_argument("--video", default=None, help="write an annotated video here (.mp4/.avi)")
    run.add_argument("--decision-log", default=None, help="append decisions here (JSON lines)")
    run.add_argument("--max-speed", type=float, default=50.0, help="km/h the policy never exceeds")
    run.add_argument("--sanitize", default=None, metavar="CHAIN",
                     help='input sanitizers run on each crop, e.g. "bitdepth:bits=5,median:k=3"'
                          " (bitdepth, median, jpeg, resize_pad; preprocess splits crop/batch);"
                          ' a "cuda:" prefix runs the chain as CUDA kernels, e.g. '
                          '"cuda:bitdepth:bits=5,median:k=3,preprocess"')
    run.add_argument("--defence", default=None, metavar="SPEC",
                     help='input-patch defence wrapped around the model, e.g. '
                          '"patchcleanser:share=0.1,k=6"')
    run.add_argument("--detect", default=None, metavar="NAMES",
                     help='input detectors fitted into the model by `distill detectors`, e.g. '
                          '"squeeze,mahalanobis": a flagged crop does not vote')
    run.add_argument("--caution-window", type=int, default=60, metavar="N",
                     help="crops over which the detectors' flag rate is taken")
    run.add_argument("--caution-limit", type=float, default=0.4, metavar="SHARE",
                     help="flag rate above which the policy goes cautious (caps speed)")
    run.add_argument("--drift", action="store_true",
                     help="watch the stream against the model's drift reference "
                          "(`distill drift-reference`)")
    run.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                     help="serve Prometheus metrics on 127.0.0.1:PORT (0: any free port)")
    run.add_argument("--plot", default=None, metavar="PNG",
                     help="write a plot of the detector scores and drift statistics over time")
    run.add_argument("--serial", default=None,
                     help="drive a serial actuator: /dev/ttyACM0, /dev/roadshield-actuator, "
                          "or a simulator's pty")
    run.add_argument("--serial-key", default=None,
                     help="the board's key file (written by `roadshield actuator provision`)")
    run.add_argument("--json", action="store_true", help="print the loop report as JSON")
    run.set_defaults(func=_handler("roadshield.commands", "edge_run"))
    backends = esub.add_parser("backends", help="list the inference backends usable here")
    backends.set_defaults(func=_handler("roadshield.commands", "edge_backends"))


def _add_actuator(sub: argparse._SubParsersAction) -> None:
    from actuator.cli import add_parsers  # argparse and json only: stays fast

    add_parsers(sub)


def _add_redteam(sub: argparse._SubParsersAction) -> None:
    from cloud_train.redteam_cli import add_redteam_parsers  # argparse only at this point

    add_redteam_parsers(sub)


def _add_attack(sub: argparse._SubParsersAction) -> None:
    from cloud_train.sticker.cli import add_attack_parsers  # argparse only at this point

    add_attack_parsers(sub)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="the whole chain on this machine's CPU")
    demo.add_argument("--profile", default="quick", help="quick (default) or tiny")
    demo.add_argument("--runs-dir", default="runs")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--actuator", default="recording",
                      help="recording (in-process) or simulator (the serial link to the "
                           "device simulator on a pseudo-terminal)")
    demo.set_defaults(func=_handler("roadshield.demo", "main"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="roadshield",
        description="Road-sign classifier from robust cloud training to a Jetson and its actuator.")
    parser.add_argument("--version", action="version", version=f"roadshield {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_data, _add_train, _add_distill, _add_edge, _add_actuator, _add_attack,
                _add_redteam, _add_demo):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except RoadshieldError as err:
        print(f"roadshield: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("roadshield: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
