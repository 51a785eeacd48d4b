"""``roadshield data dedup | split | seal | open-sealed | audit``: parsers and lazily-imported
handlers.

Exit codes: 0 clean / done; 3 dedup found clusters spanning train and test, or the audit
found a mismatch; 2 (raised RoadshieldError) bad input, or a refused second opening of the
sealed set.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from roadshield_base.errors import ConfigError, DatasetError


def add_split_parsers(data_subparsers: Any) -> None:
    """Add the split verbs to ``roadshield data``'s subparsers."""
    d = data_subparsers.add_parser("dedup", help="cluster exact/near duplicates; exit 3 if a "
                                   "cluster spans train and test")
    d.add_argument("root", help="GTSRB-layout dataset root")
    d.add_argument("--threshold", type=int, default=None, help="pHash bits (default tuned)")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=data_dedup)
    s = data_subparsers.add_parser("split", help="re-split a dataset so no duplicate cluster "
                                   "spans train and test")
    s.add_argument("root", help="GTSRB-layout dataset root (train and test are pooled)")
    s.add_argument("--out", required=True, help="folder for the new dataset (gets gtsrb/)")
    s.add_argument("--test-fraction", type=float, default=0.2)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--temporal", default=None,
                   help="cut time T (ISO 8601 or epoch seconds): train before, test after")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--times", default=None, help="CSV 'path;time' of capture times, path "
                     "relative to the dataset root (with --temporal)")
    src.add_argument("--store", default=None, help="ingest store: capture times of its "
                     "accepted samples, matched by pixels (with --temporal)")
    s.add_argument("--crossing", choices=("test", "drop"), default="test",
                   help="where a cluster crossing T goes")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=data_split)
    e = data_subparsers.add_parser(
        "seal", help="encrypt a dataset's test split (AES-GCM), pin its opening log, and "
        "remove the plaintext split")
    e.add_argument("root", help="GTSRB-layout dataset root")
    e.add_argument("--key", required=True, help="256-bit key file (mode 0600)")
    e.add_argument("--new-key", action="store_true", help="create the key file first")
    e.add_argument("--out", required=True, help="folder for manifest.json + sealed.bin")
    e.add_argument("--log-key", required=True,
                   help="Ed25519 private key (PEM) that signs the opening log; pinned")
    e.add_argument("--log", default=None,
                   help="opening log to pin (default OUT/openings.jsonl)")
    e.set_defaults(func=data_seal)
    o = data_subparsers.add_parser("open-sealed", help="final evaluation: open the sealed set "
                                   "once for a checkpoint, write predictions and metrics")
    o.add_argument("sealed", help="folder written by `data seal` (manifest.json + sealed.bin)")
    o.add_argument("--key", required=True, help="the sealed set's key file (mode 0600)")
    o.add_argument("--checkpoint", required=True, help="the model (.safetensors) to evaluate")
    o.add_argument("--log-key", required=True,
                   help="Ed25519 private key (PEM) that signs the opening log")
    o.add_argument("--log", default=None, help="opening log (default SEALED/openings.jsonl)")
    o.add_argument("--out", required=True, help="folder for predictions.json + metrics.json")
    o.add_argument("--force", action="store_true",
                   help="open again for a model already evaluated (logged as forced)")
    o.add_argument("--eps", type=float, default=8 / 255, help="FGSM/PGD radius in [0, 1]")
    o.add_argument("--pgd-steps", type=int, default=10)
    o.add_argument("--json", action="store_true")
    o.set_defaults(func=data_open_sealed)
    a = data_subparsers.add_parser("audit", help="recompute metrics from stored predictions")
    a.add_argument("predictions")
    a.add_argument("metrics")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=data_audit)


def _pool(root: str, progress: bool = True) -> tuple[Any, Any, list[str], Any]:
    """Train and test (when present) pooled: images, labels, origin per image, the parts."""
    import numpy as np

    from cloud_train.gtsrb import load_gtsrb

    train = load_gtsrb(root, "train", progress=progress)
    try:
        test = load_gtsrb(root, "test", progress=progress)
    except DatasetError:
        test = None
    if test is None:
        return train.images, train.labels, ["train"] * len(train), train
    return (np.concatenate([train.images, test.images]),
            np.concatenate([train.labels, test.labels]),
            ["train"] * len(train) + ["test"] * len(test), (train, test))


def data_dedup(args: argparse.Namespace) -> int:
    import numpy as np

    from cloud_train.splits.dedup import NEAR_THRESHOLD, dedup

    images, _, origin, _ = _pool(args.root)
    res = dedup(images, args.threshold if args.threshold is not None else NEAR_THRESHOLD)
    is_test = np.array([o == "test" for o in origin])
    spanning = [g for g in res.groups() if is_test[g].any() and not is_test[g].all()]
    summary = dict(res.summary(), clusters_spanning_train_test=len(spanning))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{summary['images']} images, {summary['clusters']} clusters, "
              f"{summary['duplicate_clusters']} with duplicates "
              f"({summary['images_in_duplicate_clusters']} images); "
              f"{len(spanning)} clusters span train and test")
    return 3 if spanning else 0


def data_split(args: argparse.Namespace) -> int:
    import numpy as np

    from cloud_train.gtsrb import write_split
    from cloud_train.splits.dedup import dedup
    from cloud_train.splits.split import cluster_split, temporal_split
    from cloud_train.splits.times import parse_time, times_from_csv, times_from_store
    from roadshield_base.fileio import atomic_write_json

    images, labels, origin, parts = _pool(args.root)
    first = parts[0] if isinstance(parts, tuple) else parts
    paths = list(first.paths) + (list(parts[1].paths) if isinstance(parts, tuple) else [])
    res = dedup(images)
    if args.temporal is not None:
        if args.times:
            times = times_from_csv(args.times, Path(args.root), paths)
        elif args.store:
            times = times_from_store(args.store, images, paths)
        else:
            raise ConfigError("--temporal needs capture times",
                              "pass --store (the ingest store) or --times (a CSV)")
        split, names = temporal_split(times, res.cluster, parse_time(args.temporal),
                                      args.crossing)
    else:
        split, names = cluster_split(labels, res.cluster, {"train": 1 - args.test_fraction,
                                                           "test": args.test_fraction},
                                     args.seed)
    for k, name in enumerate(names):
        sel = np.flatnonzero(split == k)
        if not len(sel):
            raise DatasetError(f"the {name} split would be empty", "change T or the fraction")
        write_split(images[sel], labels[sel], first.class_names, args.out, name)
    manifest = {"source": str(Path(args.root).resolve()), "seed": args.seed,
                "temporal": args.temporal, "crossing": args.crossing,
                "times_from": args.times or (args.store and f"ingest store {args.store}"),
                "threshold_bits": res.threshold,
                "samples": [{"path": str(p), "sha256": d, "cluster": int(c),
                             "split": names[s] if s >= 0 else "dropped", "origin": o}
                            for p, d, c, s, o in zip(paths, res.sha256, res.cluster.tolist(),
                                                     split.tolist(), origin, strict=True)]}
    out = Path(args.out) / "gtsrb" / "split_manifest.json"
    atomic_write_json(out, manifest)
    counts = {n: int((split == k).sum()) for k, n in enumerate(names)}
    counts["dropped"] = int((split < 0).sum())
    print(json.dumps(counts) if args.json else
          f"wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
          + f"; manifest {out}")
    return 0


def data_seal(args: argparse.Namespace) -> int:
    """Seal the test split, check the sealed copy, then remove the plaintext split.

    The plaintext goes because a readable copy beside the sealed one makes the seal
    meaningless (``eval --data`` read it with no key and no log entry). Nothing is lost:
    the original files are sealed with the arrays, and they are removed only after the
    sealed set has been decrypted and compared with them. The marker SEALED_TEST.json left
    beside GTSRB/ makes every reader (``load_gtsrb``) refuse the split; if a crash stops the
    removal half-way, running the same command again finishes it.
    """
    import numpy as np

    from cloud_train.gtsrb import SEALED_MARKER, load_gtsrb, locate_gtsrb, sealed_marker
    from cloud_train.splits.sealed import _decrypt, generate_key, load_key, seal
    from roadshield_base.fileio import atomic_write_json, file_sha256
    from roadshield_base.trust import load_private_key

    root = Path(args.root).resolve()
    done = sealed_marker(root)
    if done is not None:
        left = _remove_plaintext(root, json.loads(done.read_text()).get("files", []))
        print(f"the test split of {root} is already sealed ({done}); "
              f"removed {left} leftover plaintext files")
        return 0
    signer = load_private_key(args.log_key)  # fail before anything is written
    if args.new_key:
        generate_key(args.key)
    key = load_key(args.key)
    test = load_gtsrb(root, "test")
    layout = locate_gtsrb(root)
    base = layout.gtsrb
    man = next((m for m in (base / "split_manifest.json", base.parent / "split_manifest.json")
                if m.is_file()), base / "split_manifest.json")
    ids = [p.resolve().relative_to(root).as_posix() for p in test.paths]
    plain = [p.resolve() for p in test.paths]
    if layout.test_csv is not None:
        plain.append(layout.test_csv.resolve())
    files = {(p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p)):
             p.read_bytes() for p in plain}
    meta = {"class_names": list(test.class_names), "source": str(base.resolve()),
            "split_manifest_sha256": file_sha256(man) if man.is_file() else None}
    out = seal(args.out, test.images, test.labels, ids, key, meta, log_signer=signer,
               log=args.log, files=files)
    back, sealed_sha, manifest_sha = _decrypt(Path(out), key)
    if (back.files != files or not np.array_equal(back.images, test.images)
            or back.labels.tolist() != test.labels.tolist() or back.ids != ids):
        raise DatasetError(f"the sealed copy in {out} does not match the test split of {root}",
                           "nothing was removed; check the disk and seal again")
    marker = base.resolve().parent / SEALED_MARKER  # beside GTSRB/
    atomic_write_json(marker, {"sealed_dir": str(Path(out).resolve()),
                               "sealed_sha256": sealed_sha, "manifest_sha256": manifest_sha,
                               "files": sorted(files)})
    removed = _remove_plaintext(root, sorted(files))
    print(f"sealed {len(test)} test images into {out}; removed the plaintext test split "
          f"({removed} files; marker {marker})")
    return 0


def _remove_plaintext(root: Path, names: list[str]) -> int:
    """Remove the sealed split's files under ``root`` and the folders they leave empty."""
    n = 0
    for name in names:
        p = root / name  # an absolute name stays absolute
        if p.is_file():
            p.unlink()
            n += 1
        for d in list(p.parents)[:2]:  # Images/ and Final_Test/
            if d != root and d.is_dir() and not any(d.iterdir()):
                d.rmdir()
    return n


def data_open_sealed(args: argparse.Namespace) -> int:
    from cloud_train.splits.final_eval import evaluate_sealed

    m = evaluate_sealed(args.sealed, args.key, args.checkpoint, args.log_key, args.out,
                        log=args.log, force=args.force, eps=args.eps, pgd_steps=args.pgd_steps)
    if args.json:
        print(json.dumps(m, indent=2, sort_keys=True))
    else:
        print(f"model {m['model_sha256'][:16]} on the sealed set ({m['n']} images"
              f"{', FORCED opening' if m['forced'] else ''}): accuracy {m['accuracy']:.4f}, "
              f"macro recall {m['macro_recall']:.4f}, macro F1 {m['macro_f1']:.4f}, "
              f"FGSM {m['fgsm_acc']:.4f}, PGD {m['pgd_acc']:.4f} (eps {m['eps']:.4f})\n"
              f"wrote {Path(args.out) / 'predictions.json'} and "
              f"{Path(args.out) / 'metrics.json'}; opening log head {m['opening_log_head']}")
    return 0


def data_audit(args: argparse.Namespace) -> int:
    from cloud_train.splits.audit import audit

    rep = audit(args.predictions, args.metrics)
    if args.json:
        print(json.dumps(rep.to_dict(), indent=2))
    else:
        print("audit: metrics match the stored predictions" if rep.ok else
              "audit: MISMATCH\n  " + "\n  ".join(rep.mismatches))
    return 0 if rep.ok else 3
