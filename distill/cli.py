"""The ``distill`` verbs: export, engine, detectors, drift-reference.

``add_parsers`` imports argparse only; each handler imports its modules when it runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_parsers(sub: Any) -> None:
    """Add ``distill`` and its subcommands to ``sub`` (from ``add_subparsers``)."""
    distill = sub.add_parser("distill", help="export a checkpoint for the edge")
    dsub = distill.add_subparsers(dest="distill_cmd", required=True)
    exp = dsub.add_parser("export", help="ONNX (and optionally .pt2) with metadata")
    exp.add_argument("--checkpoint", required=True)
    exp.add_argument("--out", required=True, help="path of the .onnx file to write")
    exp.add_argument("--opset", type=int, default=17)
    exp.add_argument("--pt2", action="store_true", help="also write a torch.export program")
    exp.set_defaults(func=distill_export)
    eng = dsub.add_parser("engine", help="build a TensorRT engine from the ONNX file (on the "
                                         "device that will run it)")
    eng.add_argument("onnx", help="the .onnx written by `distill export`")
    eng.add_argument("--out", default=None, help="engine path (default: beside it, .engine)")
    eng.add_argument("--precision", choices=("auto", "fp16", "fp32", "int8"), default="auto",
                     help="auto: INT8 for a Q/DQ model (`distill quantize`), else FP16 where "
                          "the GPU has fast FP16 (Orin does)")
    eng.add_argument("--timing-cache", default=None, metavar="PATH",
                     help="keep TensorRT's kernel timings here between builds (default: "
                          "tensorrt.timing.cache beside the engine; 'none' for no cache)")
    eng.add_argument("--parity", action="store_true",
                     help="after the build, compare the engine with ONNX Runtime on the same "
                          "inputs, output by output; exit 3 on a mismatch")
    eng.add_argument("--rtol", type=float, default=None,
                     help="parity tolerance (default per precision: fp32 1e-3, fp16 1e-2, "
                          "int8 0.1)")
    eng.add_argument("--atol", type=float, default=None, help="as --rtol, absolute")
    eng.add_argument("--workspace-mib", type=int, default=1024)
    eng.add_argument("--min-batch", type=int, default=1)
    eng.add_argument("--opt-batch", type=int, default=None)
    eng.add_argument("--max-batch", type=int, default=8)
    eng.add_argument("--verbose", action="store_true", help="TensorRT's own log at INFO")
    eng.set_defaults(func=distill_engine)
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
    det.set_defaults(func=distill_detectors)
    ref = dsub.add_parser("drift-reference",
                          help="record the drift monitor's reference from a clean stream into "
                               "the model's metadata")
    ref.add_argument("--model", required=True, help="the .onnx written by `distill export`")
    ref.add_argument("--source", required=True,
                     help="a trusted clean stream: a video, a folder of frames, synthetic://...")
    ref.add_argument("--max-frames", type=int, default=None)
    ref.add_argument("--no-detectors", action="store_true",
                     help="leave the detectors' scores out of the reference")
    ref.set_defaults(func=distill_drift_reference)
    from cloud_train.cli import add_training_options  # argparse only at this point

    student = dsub.add_parser(
        "train", help="distil a teacher checkpoint into a student (kd, ard or rslad)",
        description="Train a student against a teacher: kd (Hinton et al.), ard (Goldblum et "
                    "al. 2020) or rslad (Zi et al. 2021). Scales out with torchrun like "
                    "`roadshield train`: torchrun --standalone --nproc_per_node N -m "
                    "roadshield.cli distill train ...")
    student.add_argument("--teacher", required=True, help="the teacher's .safetensors")
    student.add_argument("--data", required=True, help="GTSRB-layout dataset root (the "
                                                       "teacher's classes, in its order)")
    student.add_argument("--out", required=True, help="the student's .safetensors")
    student.add_argument("--student", default="signnet_mobile",
                         help="registered architecture of the student (signnet_mobile, "
                              "signnet_tiny, ...)")
    student.add_argument("--method", default="rslad", choices=("kd", "ard", "rslad"))
    student.add_argument("--temperature", type=float, default=None,
                         help="softmax temperature (default: kd 4, ard 30, rslad 1)")
    student.add_argument("--alpha", type=float, default=None,
                         help="weight of the teacher's term against the labels' (default: kd "
                              "0.9, ard 1.0; rslad has none)")
    add_training_options(student, epochs=10)
    student.set_defaults(func=distill_train)
    quant = dsub.add_parser("quantize", help="static INT8 quantization to a Q/DQ ONNX model "
                                             "(what TensorRT's INT8 engines are built from)")
    quant.add_argument("--model", required=True, help="the .onnx written by `distill export`")
    quant.add_argument("--data", required=True,
                       help="GTSRB-layout folder the model was trained on: a stratified sample "
                            "of its train split calibrates, its test split measures")
    quant.add_argument("--out", required=True, help="the INT8 model, e.g. model.int8.onnx")
    quant.add_argument("--per-class", type=int, default=32, metavar="N",
                       help="calibration images per class")
    quant.add_argument("--method", default="minmax", choices=("minmax", "entropy", "percentile"),
                       help="how activation ranges are set from the calibration images")
    quant.add_argument("--quantize-stem", action="store_true",
                       help="quantize the first convolution too (by default it stays float: "
                            "symmetric INT8 fits its input badly)")
    quant.add_argument("--test-limit", type=int, default=None, metavar="N")
    quant.add_argument("--seed", type=int, default=0)
    quant.add_argument("--json", action="store_true", help="print the measurement as JSON")
    quant.set_defaults(func=distill_quantize)
    keygen = dsub.add_parser("keygen", help="make the key pair that signs model bundles")
    keygen.add_argument("--out", required=True,
                        help="folder for bundle.key (keep it secret) and bundle.pub (give it "
                             "to the devices as --trust-key)")
    keygen.add_argument("--valid-days", type=float, default=None, metavar="N",
                        help="also write bundle.trust.json: the public key valid for N days "
                             "from now; a device given it as --trust-key refuses the key "
                             "afterwards, and `distill bundle` will not sign with it")
    keygen.set_defaults(func=distill_keygen)
    bundle = dsub.add_parser("bundle", help="write the signed bundle the device runs")
    bundle.add_argument("--model", required=True, help="the .onnx written by `distill export`")
    bundle.add_argument("--key", required=True, help="bundle.key from `distill keygen`")
    bundle.add_argument("--out", required=True, help="bundle folder to create")
    bundle.add_argument("--int8", default=None, help="the Q/DQ INT8 model to carry as well")
    bundle.add_argument("--evaluation", default=None, metavar="JSON",
                        help="evaluation results (`roadshield eval --json`) to carry")
    bundle.add_argument("--provenance", default=None, metavar="JSONL",
                        help="the checkpoint's <checkpoint>.intoto.jsonl from `train --attested`")
    bundle.add_argument("--policy", default=None,
                        help="the stage policy (policy.json) that verifies --provenance")
    bundle.set_defaults(func=distill_bundle)


def distill_export(args: argparse.Namespace) -> int:
    from cloud_train import pipeline  # the checkpoint's model class lives there

    result = pipeline.export_checkpoint(args.checkpoint, args.out, opset=args.opset,
                                        pt2=args.pt2)
    print(f"wrote {result.onnx} (ONNX Runtime vs torch max abs diff {result.parity_max_abs:.2e})"
          + (f" and {result.pt2}" if result.pt2 else ""))
    return 0


def distill_engine(args: argparse.Namespace) -> int:
    from distill.engine import build_engine
    from edge_runtime.runners.engine_meta import sidecar_path

    out = Path(args.out) if args.out else Path(args.onnx).with_suffix(".engine")
    cache = None if args.timing_cache == "none" else \
        Path(args.timing_cache or out.parent / "tensorrt.timing.cache")
    info = build_engine(args.onnx, out, precision=args.precision,
                        workspace_mib=args.workspace_mib, min_batch=args.min_batch,
                        opt_batch=args.opt_batch, max_batch=args.max_batch, verbose=args.verbose,
                        timing_cache=cache)
    print(f"wrote {out} ({info.precision}, TensorRT {info.tensorrt_version}, {info.gpu_name}); "
          f"sidecar {sidecar_path(out).name}" + (f"; timing cache {cache}" if cache else ""))
    if not args.parity:
        return 0
    from distill.parity import DEFAULT_TOLERANCES, engine_parity

    rtol, atol = DEFAULT_TOLERANCES[info.precision]
    report = engine_parity(args.onnx, out, max_batch=args.max_batch,
                           rtol=rtol if args.rtol is None else args.rtol,
                           atol=atol if args.atol is None else args.atol)
    print(report.format())
    return 0 if report.passed else 3


def distill_detectors(args: argparse.Namespace) -> int:
    from distill.detector_fit import fit_from_dataset, write_detectors

    crops = None
    if args.calibrate_source:
        from distill.stream import clean_crops

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

    reference = build_drift_reference(args.model, args.source, detect=not args.no_detectors,
                                      max_frames=args.max_frames)
    write_drift_reference(args.model, reference)
    print(f"wrote the drift reference ({reference.frames} frames, {reference.crops} crops, "
          f"{len(reference.statistics)} statistics) into {args.model}")
    return 0


def distill_keygen(args: argparse.Namespace) -> int:
    from distill.bundle import TRUST_FILE, generate_bundle_keys

    priv, pub = generate_bundle_keys(args.out, valid_days=args.valid_days)
    print(f"wrote {priv} (mode 0600: the signing key) and {pub} (the devices' --trust-key)")
    if args.valid_days is not None:
        print(f"wrote {priv.with_name(TRUST_FILE)}: give it to the devices as --trust-key "
              f"instead of {pub.name} and they refuse the key after {args.valid_days:g} days")
    return 0


def distill_bundle(args: argparse.Namespace) -> int:
    from distill.bundle import write_bundle

    result = write_bundle(args.out, args.model, key=args.key, int8=args.int8,
                          evaluation=args.evaluation, provenance=args.provenance,
                          policy=args.policy)
    for name, digest in result.files.items():
        print(f"  {digest[:16]}  {name}")
    print(f"signed bundle {result.out} (key {result.key_hint[:16]}...)")
    return 0


def distill_quantize(args: argparse.Namespace) -> int:
    from distill.quantize import quantize_from_dataset

    report = quantize_from_dataset(args.model, args.out, args.data, per_class=args.per_class,
                                   method=args.method, seed=args.seed,
                                   test_limit=args.test_limit,
                                   float_stem=not args.quantize_stem)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    print(f"wrote {report.out} ({report.int8_bytes / 1e6:.2f} MB, float "
          f"{report.float_bytes / 1e6:.2f} MB); calibrated on {report.calibration_images} "
          f"train images ({report.method}); left in float: "
          f"{', '.join(report.float_nodes) or 'nothing'}")
    print(f"on {report.test_images} test images: top-1 agreement with the float model "
          f"{100 * report.top1_agreement:.1f} %, accuracy {100 * report.int8_accuracy:.1f} % "
          f"(float {100 * report.float_accuracy:.1f} %), largest logit difference "
          f"{report.max_abs_logit_diff:.3f}")
    return 0


# per method: (temperature, alpha); ARD's are its paper's CIFAR-10 setting, RSLAD has none
_DISTILL_DEFAULTS = {"kd": (4.0, 0.9), "ard": (30.0, 1.0), "rslad": (1.0, 1.0)}


def distill_train(args: argparse.Namespace) -> int:
    import logging
    import os

    import distill.robust_distill  # noqa: F401  (registers kd, ard and rslad)
    from cloud_train import pipeline
    from cloud_train.cli import report_training, training_kwargs
    from roadshield_base.errors import ConfigError

    if args.method == "rslad" and (args.temperature not in (None, 1.0) or
                                   args.alpha not in (None, 1.0)):
        raise ConfigError("rslad takes no --temperature or --alpha",
                          "its loss is 5/6 KL on attacked and 1/6 KL on clean images at T=1")
    if os.environ.get("RANK", "0") not in ("", "0"):
        logging.getLogger().setLevel(logging.WARNING)
    temperature, alpha = _DISTILL_DEFAULTS[args.method]
    kwargs = training_kwargs(args)
    kwargs["trainer_options"].update(
        kd_temperature=temperature if args.temperature is None else args.temperature,
        kd_alpha=alpha if args.alpha is None else args.alpha)
    result = pipeline.train_checkpoint(args.data, args.out, arch=args.student,
                                       trainer=args.method, teacher=args.teacher, **kwargs)
    return report_training(result, args)
