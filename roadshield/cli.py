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


# each tier registers its own verbs; its add_parsers imports argparse only
TIER_PARSERS = ("cloud_train.cli", "distill.cli", "edge_runtime.cli", "actuator.cli",
                "serve.cli")


def _add_tiers(sub: argparse._SubParsersAction) -> None:
    """Add every installed tier's verbs; a tier whose package is not installed (a device
    install without the cloud tier) simply offers none."""
    import importlib

    for module in TIER_PARSERS:
        package = module.split(".")[0]
        try:
            tier = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != package:  # a broken tier must not pass for an absent one
                raise
            logging.getLogger(__name__).debug("tier %s not installed", package)
            continue
        tier.add_parsers(sub)


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
    _add_tiers(sub)
    _add_demo(sub)
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
