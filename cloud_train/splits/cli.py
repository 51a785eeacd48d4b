"""``roadshield data dedup | split | seal | audit``: parsers and lazily-imported handlers.

Exit codes: 0 clean / done; 3 dedup found clusters spanning train and test, or the audit
found a mismatch; 2 (raised RoadshieldError) bad input.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from roadshield.errors import ConfigError, DatasetError


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
    s.add_argument("--times", default=None, help="CSV 'path;time' of capture times, path "
                   "relative to the dataset root (needed with --temporal)")
    s.add_argument("--crossing", choices=("test", "drop"), default="test",
                   help="where a cluster crossing T goes")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=data_split)
    e = data_subparsers.add_parser("seal", help="encrypt a dataset's test split (AES-GCM)")
    e.add_argument("root", help="GTSRB-layout dataset root")
    e.add_argument("--key", required=True, help="256-bit key file (mode 0600)")
    e.add_argument("--new-key", action="store_true", help="create the key file first")
    e.add_argument("--out", required=True, help="folder for manifest.json + sealed.bin")
    e.set_defaults(func=data_seal)
    a = data_subparsers.add_parser("audit", help="recompute metrics from stored predictions")
    a.add_argument("predictions")
    a.add_argument("metrics")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=data_audit)


def _parse_time(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as err:
        raise ConfigError(f"cannot read time {text!r}", "use ISO 8601 or epoch seconds") from err
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()


def _pool(root: str) -> tuple[Any, Any, list[str], Any]:
    import numpy as np

    from cloud_train.gtsrb import load_gtsrb

    train = load_gtsrb(root, "train")
    try:
        test = load_gtsrb(root, "test")
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


def _read_times(path: str, base: Path, paths: list[Path]) -> Any:
    import numpy as np

    table: dict[str, float] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip() or line.lower().startswith("path;"):
            continue
        try:
            name, when = line.rsplit(";", 1)
        except ValueError as err:
            raise DatasetError(f"{path} line {n} is not 'path;time'", "fix the line") from err
        table[name.strip()] = _parse_time(when)
    rel = [p.resolve().relative_to(base.resolve()).as_posix() for p in paths]
    missing = [r for r in rel if r not in table]
    if missing:
        raise DatasetError(f"{path} has no capture time for {len(missing)} images "
                           f"(first: {missing[0]})", "give every image a time")
    return np.array([table[r] for r in rel])


def data_split(args: argparse.Namespace) -> int:
    import numpy as np

    from cloud_train.gtsrb import write_split
    from cloud_train.splits.dedup import dedup
    from cloud_train.splits.split import cluster_split, temporal_split
    from roadshield.fileio import atomic_write_json

    images, labels, origin, parts = _pool(args.root)
    first = parts[0] if isinstance(parts, tuple) else parts
    paths = list(first.paths) + (list(parts[1].paths) if isinstance(parts, tuple) else [])
    res = dedup(images)
    if args.temporal is not None:
        if not args.times:
            raise ConfigError("--temporal needs --times", "pass a CSV of capture times")
        times = _read_times(args.times, Path(args.root), paths)
        split, names = temporal_split(times, res.cluster, _parse_time(args.temporal),
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
    from cloud_train.gtsrb import load_gtsrb, locate_gtsrb
    from cloud_train.splits.sealed import generate_key, load_key, seal
    from roadshield.fileio import file_sha256

    if args.new_key:
        generate_key(args.key)
    test = load_gtsrb(args.root, "test")
    base = locate_gtsrb(args.root).gtsrb
    man = next((m for m in (base / "split_manifest.json", base.parent / "split_manifest.json")
                if m.is_file()), base / "split_manifest.json")
    ids = [p.resolve().relative_to(Path(args.root).resolve()).as_posix() for p in test.paths]
    meta = {"class_names": list(test.class_names), "source": str(base.resolve()),
            "split_manifest_sha256": file_sha256(man) if man.is_file() else None}
    out = seal(args.out, test.images, test.labels, ids, load_key(args.key), meta)
    print(f"sealed {len(test)} test images into {out}")
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
