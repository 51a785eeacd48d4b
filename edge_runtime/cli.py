"""The ``edge`` verbs: ``run`` (camera -> model -> policy -> actuator) and ``backends``.

``add_parsers`` imports argparse only; the handlers import the runtime when they run,
and nothing here names torch or the cloud tier, so a device install runs them.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parsers(sub: Any) -> None:
    """Add ``edge`` and its subcommands to ``sub`` (from ``add_subparsers``)."""
    edge = sub.add_parser("edge", help="the on-device runtime")
    esub = edge.add_subparsers(dest="edge_cmd", required=True)
    run = esub.add_parser("run", help="camera -> locate -> infer -> decide -> actuator")
    what = run.add_mutually_exclusive_group(required=True)
    what.add_argument("--bundle", default=None, metavar="DIR",
                      help="a signed bundle (`roadshield distill bundle`): its signature is "
                           "checked with --trust-key and the bytes checked are the bytes run")
    what.add_argument("--model", default=None,
                      help="a bare model file: .onnx, .pt2 (torch backend) or .engine "
                           "(tensorrt backend); unsigned, so it needs --allow-unsigned")
    run.add_argument("--trust-key", default=None, metavar="KEY",
                     help="the bundle publisher's public key: bundle.pub from `distill "
                          "keygen`, or its bundle.trust.json (`--valid-days`), which also "
                          "says until when the key is trusted")
    run.add_argument("--bundle-model", default="model", choices=("model", "int8"),
                     help="which of the bundle's models to run")
    run.add_argument("--allow-unsigned", action="store_true",
                     help="run a bare --model file with no signature check (the log and the "
                          "report say so)")
    run.add_argument("--source", default=None,
                     help="csi://N (Jetson CSI camera), /dev/videoN or v4l2://N (USB camera), "
                          "a video file, a folder of images, or a scheme an installed tier "
                          "adds (synthetic://?frames=120: the cloud tier's rendered drive). "
                          "Default: this device's camera, csi://0 where GStreamer and "
                          "nvargus are present, else /dev/video0")
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
    run.set_defaults(func=edge_run)
    backends = esub.add_parser("backends", help="list the inference backends usable here")
    backends.set_defaults(func=edge_backends)


def edge_run(args: argparse.Namespace) -> int:
    import logging

    from edge_runtime.loop import build_loop
    from edge_runtime.sources import default_camera
    from roadshield_base.errors import ConfigError

    if args.serial and not args.serial_key:
        raise ConfigError("--serial needs --serial-key",
                          "pass the key file written by `roadshield actuator provision`")
    model, trust = _model_to_run(args)
    source = args.source
    if source is None:
        source = default_camera()
        logging.getLogger(__name__).info("no --source given: using this device's camera %s",
                                         source)
    actuator = None
    if args.serial:
        from actuator.serial_actuator import SerialActuator

        # connected but not armed: the loop arms it once the model and the camera are open
        actuator = SerialActuator(args.serial, args.serial_key, max_speed_kmh=args.max_speed,
                                  arm=False)
    try:
        # commands on the serial link expire after their TTL (500 ms): refresh well before
        loop = build_loop(source, model, backend=args.backend,
                          policy_options={"max_speed_kmh": args.max_speed}, actuator=actuator,
                          annotate_video=args.video, decision_log=args.decision_log,
                          sanitize=args.sanitize, defence=args.defence,
                          keepalive_s=0.2 if actuator is not None else None,
                          detect=args.detect, drift=args.drift,
                          metrics_port=args.metrics_port,
                          caution={"window": args.caution_window,
                                   "limit": args.caution_limit},
                          arm_actuator=actuator is not None)
        with loop:
            report = loop.run(max_frames=args.max_frames, progress=True)
    finally:
        if actuator is not None:
            actuator.close()
    if not trust["signed"]:
        from roadshield_base.fileio import file_sha256

        trust["sha256"] = file_sha256(args.model)  # for the record: nothing vouched for it
        logging.getLogger(__name__).warning(
            "UNSIGNED MODEL %s (sha256 %s) was run with --allow-unsigned", args.model,
            trust["sha256"])
    report.model_trust = trust
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        from edge_runtime.report import format_loop_report

        print(format_loop_report(report.to_dict()))
    if args.plot:
        from edge_runtime.report import plot_monitor

        print(f"wrote {plot_monitor(report.to_dict(), args.plot)}")
    return 0


def edge_backends(args: argparse.Namespace) -> int:
    from edge_runtime.runners.registry import available_runners, list_runners

    usable = available_runners()
    for name in list_runners():
        print(f"{name:12s} {'available' if name in usable else 'not installed'}")
    return 0


def _model_to_run(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The model to hand to the loop, and what vouches for it (the report's model_trust).

    A bundle is verified here and its model handed on as the verified bytes; a bare file
    runs only with --allow-unsigned."""
    import logging

    from roadshield_base.errors import ConfigError

    log = logging.getLogger(__name__)
    if args.bundle is not None:
        if args.allow_unsigned:
            raise ConfigError("--allow-unsigned does not apply to a bundle",
                              "a bundle is always verified; drop --allow-unsigned")
        if not args.trust_key:
            raise ConfigError(f"--bundle {args.bundle} needs --trust-key",
                              "pass the publisher's bundle.pub: a bundle is run only once "
                              "its signature checks out")
        from edge_runtime.bundle import bundle_model

        model, trust = bundle_model(args.bundle, args.trust_key, args.bundle_model)
        log.info("bundle %s verified: signed by key %s, root digest %s; running %s",
                 trust["bundle"], trust["key_hint"][:16], trust["root_digest"][:16],
                 trust["model"])
        return model, trust
    if args.trust_key:
        raise ConfigError("--trust-key checks a --bundle, not a bare --model file",
                          "sign the model into a bundle with `roadshield distill bundle`")
    if not args.allow_unsigned:
        raise ConfigError(f"{args.model} is a bare, unsigned model file: refusing to run it",
                          "run a signed bundle (--bundle DIR --trust-key bundle.pub), or "
                          "pass --allow-unsigned to run it anyway (the log and the report "
                          "say so)")
    # the file is not read here: the loop checks every setting before it opens the model
    log.warning("UNSIGNED MODEL: %s runs without a signature check (--allow-unsigned)",
                args.model)
    return args.model, {"signed": False, "model": str(args.model), "sha256": "",
                        "allow_unsigned": True}
