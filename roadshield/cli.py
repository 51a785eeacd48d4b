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
# the verbs each tier's add_parsers registers (tests/roadshield/test_cli.py holds them to it)
TIER_VERBS = {"cloud_train.cli": ("data", "train", "eval", "attack", "redteam"),
              "distill.cli": ("distill",), "edge_runtime.cli": ("edge",),
              "actuator.cli": ("actuator",), "serve.cli": ("serve", "watermark")}


def _verb(argv: Sequence[str] | None) -> str | None:
    """The verb a command line names (its first word that is not an option), if it is
    ``demo`` or a tier registers it; None for no verb or an unknown one."""
    for word in argv or ():
        if not word.startswith("-"):
            known = word == "demo" or any(word in verbs for verbs in TIER_VERBS.values())
            return word if known else None
    return None


def _add_tiers(sub: argparse._SubParsersAction, verb: str | None = None) -> None:
    """Add the verbs of every installed tier, or with ``verb`` only of the tier that
    registers it; a tier whose package is not installed (a device install without the
    cloud tier) simply offers none."""
    import importlib

    for module in TIER_PARSERS:
        if verb is not None and verb not in TIER_VERBS.get(module, ()):
            continue
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


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line; given the words of one, only the tier that owns its verb is
    added (each tier's parsers take tens of milliseconds to build), and every tier when
    the verb is missing or unknown, so help and argparse's errors list all of them."""
    parser = argparse.ArgumentParser(
        prog="roadshield",
        description="Road-sign classifier from robust cloud training to a Jetson and its actuator.")
    parser.add_argument("--version", action="version", version=f"roadshield {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True)
    verb = _verb(argv)
    if verb != "demo":
        _add_tiers(sub, verb)
    if verb in (None, "demo"):
        _add_demo(sub)
    if verb is not None and verb not in sub.choices:  # its tier is not installed here
        return build_parser()
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(words).parse_args(words)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    args.command_line = argv is None  # a process of its own: a handler may tune it
    try:
        code = args.func(args)
    except RoadshieldError as err:
        print(f"roadshield: error: {err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("roadshield: interrupted", file=sys.stderr)
        code = 130
    if argv is None and getattr(args, "skip_teardown", False):
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """End the process without tearing the interpreter down, for a command (it sets
    ``skip_teardown``) that has written, synced and closed everything it keeps: freeing
    every module and a few hundred MB of arrays one object at a time takes longer than
    some commands' own work (measured: about a tenth of ``data ingest``'s wall time on a
    2,016-image batch). Only for a command-line run (``argv`` None), never in a caller's
    process."""
    import os

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
