"""``roadshield data ingest | sources | quarantine | make-batch | export`` (handlers import
lazily)."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_ingest_parsers(data_subparsers: argparse._SubParsersAction) -> None:
    """Add the stage-1 verbs to ``roadshield data``."""
    ing = data_subparsers.add_parser(
        "ingest", help="run a source batch through the ingest gate",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit codes:\n"
               "  0  every sample accepted\n"
               "  3  some samples held in quarantine; the batch as a whole looks clean\n"
               "     (at most max(5, 2 % of the batch) held, none for an attack reason)\n"
               "  4  the batch is SUSPECT: a batch-level distribution shift, a pattern\n"
               "     shared by many images of one class (TRIGGER_CLUSTER), an attack\n"
               "     reason (hash mismatch, path escape, bomb, duplicate content, ...) or\n"
               "     more held samples than that; inspect it before releasing anything\n"
               "  2  the batch was rejected whole (source, signature, replay, caps) or\n"
               "     unreadable\n"
               "see cloud_train/ingest/FORMAT.md")
    ing.add_argument("batch", help="batch folder or .tar / .tar.gz")
    ing.add_argument("--store", required=True, help="the gate's store folder")
    ing.add_argument("--json", action="store_true",
                     help="print the summary as JSON (with the quarantined sample ids)")
    ing.add_argument("--max-rows", type=int, default=None,
                     help="per-batch cap on index rows (default 10000)")
    ing.add_argument("--max-bytes", type=int, default=None,
                     help="per-batch cap on image bytes (default 268435456, 256 MiB)")
    # everything the gate keeps is synced before it returns: no interpreter teardown
    ing.set_defaults(func=cmd_ingest, skip_teardown=True)

    src = data_subparsers.add_parser("sources", help="the signed allow-list of data providers")
    ssub = src.add_subparsers(dest="sources_cmd", required=True)
    add = ssub.add_parser("add", help="allow a provider and its Ed25519 public key")
    add.add_argument("name")
    add.add_argument("--public-key", required=True, help="the provider's PEM public key")
    rev = ssub.add_parser("revoke", help="reject a provider's batches from now on")
    rev.add_argument("name")
    for p in (add, rev):
        p.add_argument("--root-key", required=True, help="the project's root private key (PEM)")
    lst = ssub.add_parser("list", help="list providers")
    lst.add_argument("--json", action="store_true")
    init = ssub.add_parser("init", help="create a store trusting a root public key")
    init.add_argument("--root-pub", required=True, help="the root public key (PEM)")
    for p in (add, rev, lst, init):
        p.add_argument("--store", required=True)
    add.set_defaults(func=cmd_sources_add)
    rev.set_defaults(func=cmd_sources_revoke)
    lst.set_defaults(func=cmd_sources_list)
    init.set_defaults(func=cmd_sources_init)

    q = data_subparsers.add_parser("quarantine", help="list, inspect and release quarantine")
    qsub = q.add_subparsers(dest="quarantine_cmd", required=True)
    ql = qsub.add_parser("list", help="quarantined samples not yet released")
    ql.add_argument("--all", action="store_true", help="include released samples")
    qs = qsub.add_parser("show", help="one quarantined sample: reasons and image path")
    qs.add_argument("ref", help="key, sample id or object sha256")
    qs.add_argument("--export", help="also write the image bytes to this file")
    qr = qsub.add_parser("release", help="move a sample into the accepted set (logged)")
    qr.add_argument("ref")
    qr.add_argument("--reason", required=True, help="why it is safe, for the release log")
    for p in (ql, qs, qr):
        p.add_argument("--store", required=True)
        p.add_argument("--json", action="store_true")
    ql.set_defaults(func=cmd_quarantine_list)
    qs.set_defaults(func=cmd_quarantine_show)
    qr.set_defaults(func=cmd_quarantine_release)

    ref = data_subparsers.add_parser("reference", help="build the gate's trusted screening "
                                     "reference (a dataset, or synthetic renders)")
    ref.add_argument("--store", required=True)
    ref.add_argument("--images", help="a GTSRB-layout dataset root whose train split is trusted")
    ref.add_argument("--synth-per-class", type=int, default=400,
                     help="without --images: render this many per synthetic class")
    ref.add_argument("--seed", type=int, default=1)
    ref.add_argument("--embed-epochs", type=int, default=None,
                     help="passes of the label screen's network over the reference "
                          "(default 10)")
    ref.add_argument("--embed-min-steps", type=int, default=None,
                     help="at least this many training batches, for small references "
                          "(default 150)")
    ref.set_defaults(func=cmd_reference)

    mb = data_subparsers.add_parser("make-batch", help="sign a folder of images as a batch")
    mb.add_argument("--images", required=True,
                    help="a GTSRB-layout dataset root (its train split becomes the batch)")
    mb.add_argument("--out", required=True)
    mb.add_argument("--source", required=True)
    mb.add_argument("--key", required=True, help="the provider's private key (PEM)")
    mb.add_argument("--batch-id", required=True)
    mb.add_argument("--limit", type=int, default=0, help="first N images only (0: all)")
    mb.set_defaults(func=cmd_make_batch)
    _add_export_parser(data_subparsers)


def _add_export_parser(data_subparsers: argparse._SubParsersAction) -> None:
    ex = data_subparsers.add_parser(
        "export", help="write the gate's accepted samples as a signed export, the only input "
        "`data preprocess` takes",
        description="Writes OUT/gtsrb (the accepted and released samples, GTSRB layout) and "
        "OUT/gate_export.intoto.jsonl (an in-toto statement of every file and the gate's "
        "decision for every sample, signed by KEYS/gate.key). See cloud_train/ingest/export.py.")
    ex.add_argument("--store", required=True, help="the gate's store folder")
    ex.add_argument("--out", required=True, help="a new folder for the export")
    ex.add_argument("--keys", required=True,
                    help="the stage keys folder (`roadshield data keys init`) holding gate.key")
    ex.add_argument("--json", action="store_true")
    ex.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from collections import Counter

    from cloud_train.attest.policy import GATE, load_stage_key
    from cloud_train.ingest.export import export_store

    exp = export_store(args.store, args.out, load_stage_key(args.keys, GATE))
    decisions = Counter(s["decision"] for s in exp.samples)
    doc = {"out": str(args.out), "samples": len(exp.samples), "files": len(exp.subjects),
           "decisions": dict(decisions), "keyid": exp.keyid}
    _print(doc, args.json, f"exported {len(exp.samples)} samples ({dict(decisions)}) to "
           f"{args.out}, signed by gate key {exp.keyid}")
    return 0


def _print(obj: Any, as_json: bool, text: str) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True) if as_json else text)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -2, -3, -8


def _keep_freed_memory() -> None:
    """Have glibc's malloc keep memory it frees for the next allocation. The gate allocates
    and drops arrays of tens of MB on several threads; by default each thread gets its own
    heap and every large block goes back to the kernel when freed, so the next one is
    faulted in page by page again. Here: one heap, large blocks from it up to glibc's
    32 MiB limit, no trimming (measured on a 2,016-image batch: system time 0.41 s to
    0.29 s, medians of 20 runs). The process ends with the batch, so nothing is held for
    long. Elsewhere than Linux: nothing."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt  # glibc's, or musl's (which ignores it)
    except (OSError, AttributeError):
        return
    for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, 32 << 20),
                         (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20)):
        mallopt(param, value)


def _one_blas_thread() -> None:
    """Start OpenBLAS (NumPy's and OpenCV's, loaded after this) with no helper threads
    unless the environment says otherwise: the gate holds BLAS to one thread in all its
    work, and each helper thread OpenBLAS starts spins for about 0.1 CPU s before it
    sleeps (measured: 0.10 to 0.15 s per run on this gate)."""
    import os

    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def cmd_ingest(args: argparse.Namespace) -> int:
    import sys

    if getattr(args, "command_line", False):  # a process of its own, NumPy not loaded yet
        _one_blas_thread()
        _keep_freed_memory()

    from cloud_train.ingest import batch as bfmt
    from cloud_train.ingest.gate import ingest

    s = ingest(args.batch, args.store,
               max_rows=args.max_rows if args.max_rows is not None else bfmt.MAX_BATCH_ROWS,
               max_bytes=args.max_bytes if args.max_bytes is not None else bfmt.MAX_BATCH_BYTES)
    for w in s["decoder_warnings"]:  # native decoders name no file: say which sample it was
        print(f"warning: sample {w['id']} ({w['file']}, index line {w['line']}): {w['text']}",
              file=sys.stderr)
    text = (f"batch {s['batch_id'] or '?'}: {s['status']}  received {s['received']} = "
            f"accepted {s['accepted']} + quarantined {s['quarantined']} + "
            f"rejected {s['rejected']}")
    if s["batch_reasons"]:
        text += f"\n  batch rejected: {', '.join(s['batch_reasons'])}"
    if s.get("error"):
        text += f"\n  {s['error']}"
    for code, n in s["reason_counts"].items():
        text += f"\n  {code}: {n}"
    for q in s["quarantined_samples"][:20]:
        text += f"\n  held {q['id']} (line {q['line']}): {', '.join(q['reasons'])}"
    if len(s["quarantined_samples"]) > 20:
        text += (f"\n  ... {len(s['quarantined_samples']) - 20} more "
                 "(--json, or `roadshield data quarantine list`)")
    _print(s, args.json, text)
    return int(s["exit_code"])


def _now() -> str:
    from cloud_train.ingest.batch import utc_now_iso

    return utc_now_iso()


def cmd_sources_init(args: argparse.Namespace) -> int:
    from cloud_train.ingest.gate import init_store
    from roadshield_base.trust import key_id, load_public_key

    pub = load_public_key(args.root_pub)
    print(f"store {init_store(args.store, pub)} trusts root key {key_id(pub)}")
    return 0


def cmd_sources_add(args: argparse.Namespace) -> int:
    from cloud_train.ingest.gate import store_paths
    from cloud_train.ingest.registry import add_source
    from roadshield_base.trust import load_private_key, load_public_key

    s = add_source(store_paths(args.store)["registry"], load_private_key(args.root_key),
                   args.name, load_public_key(args.public_key), _now())
    print(f"added source {s.name} (key {s.keyid})")
    return 0


def cmd_sources_revoke(args: argparse.Namespace) -> int:
    from cloud_train.ingest.gate import store_paths
    from cloud_train.ingest.registry import revoke_source
    from roadshield_base.trust import load_private_key

    s = revoke_source(store_paths(args.store)["registry"], load_private_key(args.root_key),
                      args.name, _now())
    print(f"revoked source {s.name} at {s.revoked}")
    return 0


def cmd_sources_list(args: argparse.Namespace) -> int:
    from cloud_train.ingest.gate import store_paths
    from cloud_train.ingest.registry import list_sources
    from roadshield_base.trust import load_public_key

    p = store_paths(args.store)
    rows = list_sources(p["registry"], load_public_key(p["root_pub"]))
    text = "\n".join(f"{s.name:20s} {s.keyid}  added {s.added}  "
                     f"{'REVOKED ' + s.revoked if s.revoked else 'active'}" for s in rows)
    _print([vars(s) for s in rows], args.json, text or "no sources")
    return 0


def cmd_quarantine_list(args: argparse.Namespace) -> int:
    from cloud_train.ingest.store import quarantined

    rows = quarantined(args.store, include_released=args.all)
    text = "\n".join(f"{r['key'][:12]}:{r['key'].split(':')[1]:>6s}  {r['id']:28s} "
                     f"label {r['label']!s:4s} {','.join(r['reasons'])}"
                     + ("  (released)" if r["released"] else "") for r in rows)
    _print(rows, args.json, text or "quarantine is empty")
    return 0


def cmd_quarantine_show(args: argparse.Namespace) -> int:
    from cloud_train.ingest.store import find

    r = find(args.store, args.ref)
    if args.export:
        from cloud_train.ingest.store import export

        r = {**r, "exported_to": export(args.store, args.ref, args.export)}
    _print(r, args.json, "\n".join(f"{k}: {v}" for k, v in sorted(r.items())))
    return 0


def cmd_quarantine_release(args: argparse.Namespace) -> int:
    from cloud_train.ingest.store import release

    r = release(args.store, args.ref, args.reason, _now())
    _print(r, args.json, f"released {r['id']} ({r['key']})")
    return 0


def cmd_make_batch(args: argparse.Namespace) -> int:
    from cloud_train.gtsrb import load_gtsrb
    from cloud_train.ingest.batch import make_batch
    from roadshield_base.trust import load_private_key

    ds = load_gtsrb(args.images, "train")
    n = args.limit or len(ds.labels)
    out = make_batch(args.out, ds.images[:n], ds.labels[:n], args.source,
                     load_private_key(args.key), args.batch_id)
    print(f"wrote batch {args.batch_id} ({n} images) to {out}")
    return 0


def cmd_reference(args: argparse.Namespace) -> int:
    from cloud_train.ingest.embed import EMBED_NAME as EMBED_FILE
    from cloud_train.ingest.gate import build_reference

    if args.images:
        from cloud_train.gtsrb import load_gtsrb

        ds = load_gtsrb(args.images, "train")
        images, labels, n_classes = ds.images, ds.labels, len(ds.class_names)
    else:
        from cloud_train.ingest.attacks import render_images
        from cloud_train.signs import SYNTHETIC_CLASSES

        images, labels = render_images(args.synth_per_class, args.seed)
        n_classes = len(SYNTHETIC_CLASSES)
    from cloud_train.ingest.reference import ScreenConfig

    cfg = ScreenConfig()
    if args.embed_epochs is not None:
        cfg.embed_epochs = args.embed_epochs
    if args.embed_min_steps is not None:
        cfg.embed_min_steps = args.embed_min_steps
    ref = build_reference(args.store, images, labels, n_classes, cfg)
    print(f"reference of {len(ref.labels)} images, {n_classes} classes written to "
          f"{args.store}/reference (label screen network cached in {EMBED_FILE})")
    return 0
