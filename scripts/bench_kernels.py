#!/usr/bin/env python3
"""GPU benchmark of the sanitization and preprocess kernels against copy bandwidth.

Usage: python scripts/bench_kernels.py [--frames 16] [--height 1080] [--width 1920]
           [--rois 256] [--size 224] [--repeats 20] [--binding pycuda|cuda-python]
           [--json out.json]

Each kernel runs on a batch of BGR frames stacked into one tall image (the median
window therefore also spans frame seams, which does not change its cost). Times
are CUDA-event means over --repeats launches after one warm-up. "GB/s" counts the
bytes a kernel must move at least once (read input + write output); the reference
is a measured device-to-device cudaMemcpy of the frame batch (read + write), and
"ratio" is kernel GB/s over that copy's GB/s. Exits with status 2 and a message
when there is no GPU, binding or nvcc.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np


def _write_json(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _roi_boxes(rois: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Random boxes of 32..256 px sides inside the frame, int32 [rois, 4] (x0, y0, x1, y1)."""
    rng = np.random.default_rng(seed)
    side = rng.integers(32, min(257, height, width) + 1, (rois, 2))
    x0 = rng.integers(0, width - side[:, 0] + 1)
    y0 = rng.integers(0, height - side[:, 1] + 1)
    return np.stack([x0, y0, x0 + side[:, 0], y0 + side[:, 1]], 1).astype(np.int32)


def run(args: argparse.Namespace) -> dict:
    from kernels.loader import create_launcher
    from kernels.ops import CudaKernels

    launcher = create_launcher(args.binding)
    try:
        ops = CudaKernels(launcher)
    except BaseException:
        launcher.close()
        raise
    height, width = args.frames * args.height, args.width
    nbytes = height * width * 3
    frames = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    boxes = _roi_boxes(args.rois, args.height, args.width)
    roi_in = int(((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) * 3).sum())
    roi_out = args.rois * 3 * args.size * args.size * 4
    src = launcher.to_device(frames)
    dst = launcher.alloc(nbytes)
    table = launcher.to_device(boxes)
    out = launcher.alloc(roi_out)
    cases = {
        "memcpy_dtod": (lambda: launcher.copy_dtod(dst, src, nbytes), 2 * nbytes),
        "bitdepth": (lambda: ops.bitdepth(src, dst, nbytes, 5), 2 * nbytes),
        "median3": (lambda: ops.median(src, dst, height, width, 3, 3), 2 * nbytes),
        "median5": (lambda: ops.median(src, dst, height, width, 3, 5), 2 * nbytes),
        "jpeg_q75": (lambda: ops.jpeg(src, dst, height, width, 75), 2 * nbytes),
        "preprocess_rois": (lambda: ops.preprocess_rois(src, args.height, args.width, table,
                                                        args.rois, args.size, out),
                            roi_in + roi_out),
    }
    results = {}
    try:
        for name, (fn, moved) in cases.items():
            fn()  # warm-up: module load, caches, clocks
            launcher.synchronize()
            ms = launcher.time_ms(fn, args.repeats)
            results[name] = {"ms": ms, "bytes": moved, "gb_per_s": moved / (ms * 1e-3) / 1e9}
    finally:
        for address in (src, dst, table, out):
            launcher.free(address)
        launcher.close()
    copy_bw = results["memcpy_dtod"]["gb_per_s"]
    for entry in results.values():
        entry["ratio_to_memcpy"] = entry["gb_per_s"] / copy_bw
    return {"binding": launcher.binding, "frames": args.frames, "height": args.height,
            "width": args.width, "rois": args.rois, "size": args.size,
            "repeats": args.repeats, "results": results}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--height", type=int, default=1080)
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--rois", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--binding", choices=["pycuda", "cuda-python"], default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    from roadshield_base.errors import BackendUnavailableError

    try:
        report = run(args)
    except BackendUnavailableError as err:
        print(f"bench_kernels: no GPU benchmark possible here.\n{err}", file=sys.stderr)
        return 2
    print(f"binding {report['binding']}; {args.frames} x {args.height}x{args.width} BGR "
          f"frames; {args.rois} ROIs -> {args.size}x{args.size}")
    print(f"{'kernel':<16} {'ms':>9} {'GB/s':>9} {'vs memcpy':>10}")
    for name, r in report["results"].items():
        print(f"{name:<16} {r['ms']:>9.3f} {r['gb_per_s']:>9.1f} {r['ratio_to_memcpy']:>10.2f}")
    if args.json:
        _write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
