#!/usr/bin/env python3
"""Edge-loop benchmark on the CPU: frames per second and per-stage milliseconds.

Usage: python scripts/bench_edge.py [--model runs/latest/model.onnx] [--frames 600]
           [--backend auto] [--source synthetic://...]
Without --model, an untrained signnet is exported to a temporary folder (timing does
not depend on the weights). The synthetic camera renders frames on the fly; its
rendering time is reported as the "read" stage and is excluded from "pipeline fps".
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def untrained_model(folder: Path) -> Path:
    import torch

    from cloud_train.models import create_model
    from cloud_train.signs import SYNTHETIC_CLASSES
    from distill.export import export_onnx

    torch.manual_seed(0)
    model = create_model("signnet", num_classes=len(SYNTHETIC_CLASSES)).eval()
    return export_onnx(model, SYNTHETIC_CLASSES, folder / "model.onnx")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--frames", type=int, default=600)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--source", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from cloud_train.pipeline import run_edge

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else untrained_model(Path(tmp))
        source = args.source or f"synthetic://?seed=7&frames={args.frames}&sticker_rate=0.3"
        rep = run_edge(model, source, backend=args.backend, progress=False).to_dict()
    stages = rep["stages"]
    # "frame" times everything after the frame was read: locate .. annotate
    rep["pipeline_fps_excluding_read"] = 1000.0 / stages["frame"]["mean_ms"]
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    print(f"backend {rep['runner']}, {rep['frames']} frames from {source}")
    print(f"{'stage':12s} {'median ms':>10s} {'p95 ms':>10s} {'mean ms':>10s}")
    for name, s in stages.items():
        print(f"{name:12s} {s['median_ms']:10.3f} {s['p95_ms']:10.3f} {s['mean_ms']:10.3f}")
    print(f"loop fps (with rendering): {rep['fps']:.1f}")
    print(f"pipeline fps (locate..actuate, excluding the frame read): "
          f"{rep['pipeline_fps_excluding_read']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
