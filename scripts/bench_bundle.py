#!/usr/bin/env python3
"""Signed-bundle benchmark: how long the device's check takes, and whether any single-byte
change anywhere in the bundle gets past it.

Usage: python scripts/bench_bundle.py [--model runs/latest/model.onnx] [--repeats 50]
           [--flips 1000] [--seed 0] [--json out.json]

Signs ``--model`` (default: an untrained signnet exported to ONNX, about 1.2 MB) with a
fresh key into a temporary bundle, then
- times ``edge_runtime.bundle.verify_bundle`` (read every file, check the signature, hash
  every file) ``--repeats`` times and reports min / median / max in ms;
- makes ``--flips`` copies of the bundle, each with one byte changed (a random byte of a
  random file, every file of the bundle in turn so each gets its share, XOR a random
  non-zero value), and counts how many the check refuses (TrustError) and how many it
  accepts (should be none), per file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _model(work: Path) -> Path:
    from cloud_train.models import create_model
    from cloud_train.signs import SYNTHETIC_CLASSES
    from distill.export import export_onnx

    out = work / "model.onnx"
    export_onnx(create_model("signnet", len(SYNTHETIC_CLASSES), input_size=32).eval(),
                SYNTHETIC_CLASSES, out, input_size=32)
    return out


def measure(model: Path | None, repeats: int, flips: int, seed: int) -> dict[str, Any]:
    import numpy as np

    from distill.bundle import generate_bundle_keys, write_bundle
    from edge_runtime.bundle import verify_bundle
    from roadshield_base.trust import TrustError

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = model or _model(work)
        key, pub = generate_bundle_keys(work / "keys")
        write_bundle(work / "bundle", model, key=key)
        files = sorted(p.name for p in (work / "bundle").iterdir())
        sizes = {n: (work / "bundle" / n).stat().st_size for n in files}
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            verify_bundle(work / "bundle", pub)
            times.append((time.perf_counter() - t0) * 1000)
        rng = np.random.default_rng(seed)
        per_file = {n: {"flips": 0, "refused": 0} for n in files}
        accepted: list[str] = []
        victim = work / "flipped"
        for k in range(flips):
            name = files[k % len(files)]
            shutil.rmtree(victim, ignore_errors=True)
            shutil.copytree(work / "bundle", victim)
            data = bytearray((victim / name).read_bytes())
            at = int(rng.integers(len(data)))
            data[at] ^= int(rng.integers(1, 256))
            (victim / name).write_bytes(bytes(data))
            per_file[name]["flips"] += 1
            try:
                verify_bundle(victim, pub)
                accepted.append(f"{name}@{at}")
            except TrustError:
                per_file[name]["refused"] += 1
        return {"model_bytes": sizes["model.onnx"], "bundle_bytes": sum(sizes.values()),
                "files": sizes, "verify_ms": {"min": min(times),
                                              "median": statistics.median(times),
                                              "max": max(times), "repeats": repeats},
                "flips": flips, "refused": sum(f["refused"] for f in per_file.values()),
                "accepted": accepted, "per_file": per_file}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--flips", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    res = measure(args.model, args.repeats, args.flips, args.seed)
    v = res["verify_ms"]
    print(f"bundle of {res['bundle_bytes'] / 1e6:.2f} MB (model {res['model_bytes'] / 1e6:.2f}"
          f" MB): verify min / median / max {v['min']:.1f} / {v['median']:.1f} / "
          f"{v['max']:.1f} ms over {v['repeats']}")
    print(f"single-byte flips: {res['refused']} of {res['flips']} refused, "
          f"{len(res['accepted'])} accepted")
    for name, f in res["per_file"].items():
        print(f"  {name:24s} {f['refused']:5d} / {f['flips']} refused")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0 if not res["accepted"] else 1


if __name__ == "__main__":
    sys.exit(main())
