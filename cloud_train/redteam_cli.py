"""``roadshield redteam data``, ``backdoor``, ``inference`` and ``extraction`` (handlers
import the red-team runs lazily).

Exit codes: 0 when every target of the issue is met, 3 when some target is missed (each miss
is printed), 2 for a usage or run error (raised as a RoadshieldError, reported by the CLI).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

EXIT_TARGET_MISSED = 3


def check_scale_and_seed(scale: str, seed: int, scales: dict[str, Any]) -> tuple[Any, int]:
    """A red team's sizes for ``scale`` and the seed as an int; ConfigError for an unknown
    scale or a negative seed."""
    from roadshield_base.errors import ConfigError

    if scale not in scales:
        raise ConfigError(f"unknown red-team scale {scale!r}", "use one of: " + ", ".join(scales))
    if int(seed) < 0:
        raise ConfigError(f"seed {seed} is negative", "pass a seed >= 0")
    return scales[scale], int(seed)


def add_redteam_parsers(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add ``roadshield redteam`` and its ``data`` and ``backdoor`` verbs to the top-level
    subparsers.

    Returns the ``redteam`` subparsers, so other red-team verbs can be added beside them.
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
    _add_backdoor_parser(rsub)
    _add_inference_parser(rsub)
    _add_extraction_parser(rsub)
    return rsub


def _add_backdoor_parser(rsub: argparse._SubParsersAction) -> None:
    bd = rsub.add_parser(
        "backdoor", help="BadNets / blended backdoors against Neural Cleanse, activation "
        "clustering and spectral signatures",
        description="Per seed, trains an infected and a clean model on the synthetic signs, "
        "scans both with the three defences, mitigates the infected one, writes "
        "OUT/redteam_backdoor.json (after every seed), .md and .png, prints the table with "
        "the backdoor verdict (--verdict-rule) beside each scan's figures; exit 0 when every "
        "target is met, 3 when some target is missed.")
    bd.add_argument("--out", required=True, help="folder for redteam_backdoor.{json,md,png}")
    bd.add_argument("--seeds", type=int, default=None,
                    help="number of seeds (default: tiny 1, quick 3, full 10)")
    bd.add_argument("--first-seed", type=int, default=0,
                    help="first seed (default 0; e.g. 10 for a second sample of seeds)")
    bd.add_argument("--scale", choices=("tiny", "quick", "full"), default="quick",
                    help="tiny: a smoke test; quick: minutes per seed on 2 cores; full: larger "
                    "sets, ten seeds")
    bd.add_argument("--poison-rate", type=float, default=0.01,
                    help="fraction of the training set poisoned (default 0.01)")
    bd.add_argument("--trigger", choices=("patch", "blend"), default="patch",
                    help="patch: BadNets corner patch; blend: full-image blended pattern")
    bd.add_argument("--trainer", default="standard",
                    help="trainer of both models and of the retraining mitigations (default "
                    "standard; e.g. fast_at measures adversarial training against the "
                    "backdoor)")
    bd.add_argument("--resume", action="store_true",
                    help="keep the seeds already in OUT/redteam_backdoor.json")
    bd.add_argument("--jobs", type=int, default=1,
                    help="seeds run at once in worker processes (default 1; e.g. the number "
                    "of cores)")
    bd.add_argument("--verdict-rule", default=None, metavar="RULE.json",
                    help="measure the kit's backdoor verdict with this frozen rule (written by "
                    "--calibrate-verdict on other seeds); refused on seeds it was calibrated "
                    "on; exit 3 when the verdict misses detection >= 90%% or false flags "
                    "<= 10%%")
    bd.add_argument("--calibrate-verdict", default=None, metavar="OUT.json",
                    help="when every seed is done, choose the verdict rule on this run's seeds "
                    "(calibration seeds) and write it to OUT.json; with --resume on a finished "
                    "run it works from the saved seeds")
    bd.add_argument("--json", action="store_true", help="print the result as JSON")
    bd.add_argument("--no-progress", action="store_true", help="no progress bar")
    bd.set_defaults(func=cmd_redteam_backdoor)


def _add_inference_parser(rsub: argparse._SubParsersAction) -> None:
    inf = rsub.add_parser(
        "inference", help="the printable sticker against the undefended car and the patch "
        "defences (ROA, PatchCleanser, sanitizers), non-adaptive and adaptive",
        description="Optimises stickers (white-box on the teacher, black-box, and adaptive "
        "with each defence in the loop), drives the edge loop through clean and stickered "
        "synthetic streams with every stack, writes OUT/redteam_inference.json, .md and .png "
        "and the stickers' print files, prints the table; exit 0 when every target is met, "
        "3 when some target is missed.")
    inf.add_argument("--out", required=True, help="folder for redteam_inference.{json,md,png}")
    inf.add_argument("--scale", choices=("tiny", "quick"), default="quick",
                     help="tiny: a smoke test; quick: the demo's sizes (minutes on 2 cores)")
    inf.add_argument("--seed", type=int, default=0)
    inf.add_argument("--teacher", default=None,
                     help="undefended model checkpoint (default: trained at the scale)")
    inf.add_argument("--masked", default=None,
                     help="PatchCleanser's model, trained with masks (default: trained)")
    inf.add_argument("--roa", default=None,
                     help="the ROA-trained model (default: trained at the scale)")
    inf.add_argument("--json", action="store_true", help="print the result as JSON")
    inf.add_argument("--no-progress", action="store_true", help="no progress bar")
    inf.set_defaults(func=cmd_redteam_inference)


def _add_extraction_parser(rsub: argparse._SubParsersAction) -> None:
    ex = rsub.add_parser(
        "extraction", help="model extraction (Knockoff natural crops, Jacobian synthetic "
        "queries) through the protected query service against each of its defences",
        description="Serves the victim with `roadshield serve` on loopback and steals it "
        "over HTTP with one API key per defence and attack (undefended softmax, label only, "
        "noise, budget and rate limit, PRADA, all together); benign clients test PRADA's "
        "false alarms and the watermark's cost; the watermark is verified on every clone "
        "and on an independently trained model. Writes OUT/redteam_extraction.json, .md and "
        ".png, prints the table; exit 0 when every target is met, 3 when some target is "
        "missed.")
    ex.add_argument("--out", required=True, help="folder for redteam_extraction.{json,md,png}")
    ex.add_argument("--scale", default="quick",
                    help="tiny: a smoke test (under a minute); quick: 2,240-query attackers "
                    "and ten benign clients (about 10 minutes on 2 busy cores)")
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--victim", default=None,
                    help="the victim model (.onnx on the synthetic signs, e.g. "
                    "runs/latest/model.onnx); default: trained at the scale")
    ex.add_argument("--budget", type=int, default=None,
                    help="images per limited key (budget, full stack, benign clients); "
                    "default: the scale's")
    ex.add_argument("--prada-delta", type=float, default=None,
                    help="PRADA's threshold on Shapiro-Wilk's W (default: the service's)")
    ex.add_argument("--json", action="store_true", help="print the result as JSON")
    ex.add_argument("--no-progress", action="store_true", help="no progress bar")
    ex.set_defaults(func=cmd_redteam_extraction)


def cmd_redteam_extraction(args: argparse.Namespace) -> int:
    from cloud_train.redteam_extraction import run_extraction_redteam
    from cloud_train.redteam_extraction_report import text_table

    result: dict[str, Any] = run_extraction_redteam(
        args.out, scale=args.scale, seed=args.seed, victim=args.victim, budget=args.budget,
        prada_delta=args.prada_delta, progress=not (args.no_progress or args.json))
    return _finish(result, text_table, args.json)


def cmd_redteam_inference(args: argparse.Namespace) -> int:
    from cloud_train.redteam_inference import run_inference_redteam
    from cloud_train.redteam_inference_report import text_table

    result: dict[str, Any] = run_inference_redteam(
        args.out, scale=args.scale, seed=args.seed, teacher=args.teacher, masked=args.masked,
        roa=args.roa, progress=not (args.no_progress or args.json))
    return _finish(result, text_table, args.json)


def cmd_redteam_data(args: argparse.Namespace) -> int:
    from cloud_train.redteam_data import run_data_redteam, text_table

    result: dict[str, Any] = run_data_redteam(args.out, seed=args.seed, scale=args.scale,
                                              progress=not (args.no_progress or args.json))
    return _finish(result, text_table, args.json)


def cmd_redteam_backdoor(args: argparse.Namespace) -> int:
    from cloud_train.backdoor.report import text_table
    from cloud_train.redteam_backdoor import run_backdoor_redteam

    result: dict[str, Any] = run_backdoor_redteam(
        args.out, seeds=args.seeds, scale=args.scale, poison_rate=args.poison_rate,
        trigger=args.trigger, resume=args.resume, jobs=args.jobs, first_seed=args.first_seed,
        trainer=args.trainer, verdict_rule=args.verdict_rule,
        calibrate_verdict=args.calibrate_verdict,
        progress=not (args.no_progress or args.json))
    return _finish(result, text_table, args.json)


def _finish(result: dict[str, Any], text_table: Callable[[dict[str, Any]], str],
            as_json: bool) -> int:
    """Print the result (JSON, or the table and the report files) and return the exit code."""
    if as_json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(text_table(result))
        print("report: " + ", ".join(result["files"].values()))
    if result["all_targets_met"]:
        return 0
    if as_json:  # stdout stays pure JSON; the misses are in it and repeated on stderr
        import sys

        for m in result["missed"]:
            print(f"target missed: {m}", file=sys.stderr)
    return EXIT_TARGET_MISSED
