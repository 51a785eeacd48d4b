"""``roadshield data preprocess | verify | keys init``: the attested preprocessing pipeline.

Exit codes: ``verify`` 0 verified, 2 failed (also for unreadable inputs).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

_POLICY_ENV = "ROADSHIELD_STAGE_POLICY"


def _policy_arg(args: argparse.Namespace) -> str:
    from roadshield_base.errors import ConfigError

    path = args.policy or os.environ.get(_POLICY_ENV)
    if not path:
        raise ConfigError("no stage policy given",
                          f"pass --policy KEYS_DIR (or its policy.json), or set {_POLICY_ENV}")
    return str(path)


def cmd_preprocess(args: argparse.Namespace) -> int:
    from cloud_train.attest.stages import run_pipeline

    results = run_pipeline(args.raw, args.out, args.keys, seed=args.seed, size=args.size,
                           n_shards=args.shards, copies=args.copies)
    if args.json:
        print(json.dumps([{"stage": r.stage, "keyid": r.keyid, "attestation": str(r.attestation),
                           "outputs": r.outputs} for r in results], indent=2))
    else:
        for r in results:
            print(f"{r.stage:<10} {len(r.outputs)} outputs, {len(r.inputs)} inputs, "
                  f"signed by {r.keyid} -> {r.attestation}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from cloud_train.attest.verify import verify_pipeline

    rep = verify_pipeline(args.dir, _policy_arg(args), raw_dir=args.raw)
    print(json.dumps(rep.to_dict(), indent=2) if args.json else rep.text())
    return 0 if rep.ok else 2


def cmd_keys_init(args: argparse.Namespace) -> int:
    from cloud_train.attest.policy import make_stage_keys

    pol = make_stage_keys(args.dir, overwrite=args.overwrite)
    for role, kid in pol.keyids.items():
        print(f"{role:<10} {kid}")
    print(f"root       {pol.root_keyid}\npolicy     {pol.path}")
    return 0


def add_attest_parsers(data_subparsers: Any) -> None:
    """Add ``preprocess``, ``verify`` and ``keys init`` to ``roadshield data``."""
    pre = data_subparsers.add_parser("preprocess", help="run the signed preprocessing stages")
    pre.add_argument("raw", help="a folder written by `roadshield data export` (the gate's "
                     "signed export; anything else is refused)")
    pre.add_argument("--out", required=True, help="pipeline folder to write")
    pre.add_argument("--keys", required=True, help="folder made by `data keys init`")
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--size", type=int, default=32)
    pre.add_argument("--shards", type=int, default=4)
    pre.add_argument("--copies", type=int, default=1, help="augmented copies per image")
    pre.add_argument("--json", action="store_true")
    pre.set_defaults(func=cmd_preprocess)
    ver = data_subparsers.add_parser(
        "verify", help="check hashes, signatures, chain and drift of a pipeline folder "
                       "(exit 0 verified, 2 failed)")
    ver.add_argument("dir", help="pipeline folder written by `data preprocess`")
    ver.add_argument("--policy", help=f"keys folder or policy.json (default ${_POLICY_ENV})")
    ver.add_argument("--raw", help="the export folder decode read: re-hash its files against "
                     "the gate's statement and decode them again")
    ver.add_argument("--json", action="store_true")
    ver.set_defaults(func=cmd_verify)
    keys = data_subparsers.add_parser("keys", help="stage signing keys and their policy")
    ksub = keys.add_subparsers(dest="keys_cmd", required=True)
    init = ksub.add_parser("init", help="create root, stage and trainer keys and policy.json")
    init.add_argument("dir")
    init.add_argument("--overwrite", action="store_true", help="rotate every key")
    init.set_defaults(func=cmd_keys_init)
