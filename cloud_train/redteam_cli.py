"""``roadshield redteam data`` (the handler imports the red-team run lazily).

Exit codes: 0 when every target of the issue is met, 3 when some target is missed (each miss
is printed), 2 for a usage or run error (raised as a RoadshieldError, reported by the CLI).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

EXIT_TARGET_MISSED = 3


def add_redteam_parsers(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add ``roadshield redteam`` and its ``data`` verb to the top-level subparsers.

    Returns the ``redteam`` subparsers, so other red-team verbs can be added beside ``data``.
    """
    red = subparsers.add_parser("redteam", help="run the attacks against the defences")
    rsub = red.add_subparsers(dest="redteam_cmd", required=True)
    data = rsub.add_parser(
        "data", help="poisoning, forgery, tampering and leakage attacks against the ingest "
        "gate, pipeline verify and the leakage check",
        description="Runs every data attack against its defence plus a clean control per "
        "defence, writes OUT/redteam_data.json, .md and .png, prints the table; exit 0 when "
        "every target is met, 3 when some target is missed.")
    data.add_argument("--out", required=True, help="folder for redteam_data.{json,md,png}")
    data.add_argument("--scale", choices=("tiny", "quick", "full"), default="quick",
                      help="quick: about a minute on 2 cores; full: the benchmarks' sizes")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--json", action="store_true", help="print the result as JSON")
    data.add_argument("--no-progress", action="store_true", help="no progress bar")
    data.set_defaults(func=cmd_redteam_data)
    return rsub


def cmd_redteam_data(args: argparse.Namespace) -> int:
    from cloud_train.redteam_data import run_data_redteam, text_table

    result: dict[str, Any] = run_data_redteam(args.out, seed=args.seed, scale=args.scale,
                                              progress=not (args.no_progress or args.json))
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(text_table(result))
        print("report: " + ", ".join(result["files"].values()))
    if result["all_targets_met"]:
        return 0
    if args.json:  # stdout stays pure JSON; the misses are in it and repeated on stderr
        import sys

        for m in result["missed"]:
            print(f"target missed: {m}", file=sys.stderr)
    return EXIT_TARGET_MISSED
