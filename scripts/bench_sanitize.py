#!/usr/bin/env python3
"""Sanitizer benchmark on the CPU: the default chain per frame, and each sanitizer on a batch.

Usage: python scripts/bench_sanitize.py [--threads 2] [--runs 2000] [--json]

(1) ``edge_runtime.sanitize.DEFAULT_CHAIN`` (bitdepth:bits=5, median:k=3, the fused
    preprocess) on a 640x480 frame with one 64x64 region, model input 32x32: median ms per
    frame over ``--runs`` calls, next to the same steps done with the plain-NumPy
    references of ``kernels.sanitize_reference`` / ``kernels.reference``.
(2) Each sanitizer on a batch of 256 images, 3 x 32 x 32 float32 RGB, against the
    plain-NumPy way (the reference, one image at a time where it works per image), both
    timed in this run; the ratio is plain / fast.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def median_ms(fn: Callable[[], Any], runs: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def per_image(batch: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """An H x W x C function applied to each row of an N x 3 x H x W batch."""
    return np.stack([fn(im.transpose(1, 2, 0)).transpose(2, 0, 1) for im in batch])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="OpenCV threads (cv2.setNumThreads)")
    ap.add_argument("--runs", type=int, default=2000, help="calls timed for the per-frame chain")
    ap.add_argument("--batch-runs", type=int, default=15, help="calls timed per batch figure")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import cv2

    from edge_runtime.sanitize import DEFAULT_CHAIN, bitdepth, build_chain, jpeg, median, resize_pad
    from kernels.reference import preprocess_roi_reference
    from kernels.sanitize_reference import (
        batch_to_images,
        bitdepth_reference,
        images_to_batch,
        jpeg_dct_reference,
        median_reference,
        resize_pad_params,
        resize_pad_reference,
    )

    cv2.setNumThreads(args.threads)
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    box = (288, 208, 352, 272)  # 64 x 64 in the middle
    chain = build_chain(DEFAULT_CHAIN)
    assert chain is not None
    counter = iter(range(10**9))
    fast_chain = median_ms(lambda: chain(frame, [box], 32, frame_index=next(counter)), args.runs)

    def plain_chain() -> np.ndarray:
        crop = median_reference(bitdepth_reference(frame[208:272, 288:352], 5), 3)
        return preprocess_roi_reference(crop, (0, 0, 64, 64), 32)

    plain = median_ms(plain_chain, max(20, args.runs // 20))
    result: dict[str, Any] = {
        "threads": args.threads,
        "chain": {"spec": chain.spec, "frame": "640x480", "region": "64x64", "size": 32,
                  "fast_ms": round(fast_chain, 4), "plain_numpy_ms": round(plain, 4),
                  "ratio": round(plain / fast_chain, 1)}}

    batch = rng.random((256, 3, 32, 32), dtype=np.float32)
    params = resize_pad_params(0, 0, 32, 32, 256)
    cases: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
        "bitdepth:bits=5": (lambda: bitdepth(batch, 5), lambda: bitdepth_reference(batch, 5)),
        "median:k=3": (lambda: median(batch, 3),
                       lambda: per_image(batch, lambda im: median_reference(im, 3))),
        "median:k=5": (lambda: median(batch, 5),
                       lambda: per_image(batch, lambda im: median_reference(im, 5))),
        "jpeg:quality=75 (codec)": (
            lambda: jpeg(batch, 75),
            lambda: images_to_batch(np.stack([jpeg_dct_reference(im, 75)
                                              for im in batch_to_images(batch)]))),
        "jpeg:quality=75:method=dct": (
            lambda: jpeg(batch, 75, method="dct"),
            lambda: images_to_batch(np.stack([jpeg_dct_reference(im, 75)
                                              for im in batch_to_images(batch)]))),
        "resize_pad:seed=0": (
            lambda: resize_pad(batch, seed=0, frame_index=0),
            lambda: np.stack([resize_pad_reference(im.transpose(1, 2, 0), p).transpose(2, 0, 1)
                              for im, p in zip(batch, params, strict=True)])),
    }
    rows = []
    for name, (fast, slow) in cases.items():
        f = median_ms(fast, args.batch_runs)
        s = median_ms(slow, max(3, args.batch_runs // 3), warmup=1)
        rows.append({"sanitizer": name, "fast_ms": round(f, 3), "plain_numpy_ms": round(s, 3),
                     "speedup": round(s / f, 1)})
    result["batch"] = {"shape": list(batch.shape), "dtype": "float32", "rows": rows}

    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    c = result["chain"]
    print(f"(1) {c['spec']} on a {c['frame']} frame, {c['region']} region -> {c['size']}x"
          f"{c['size']}, {args.threads} OpenCV threads")
    print(f"    fast {c['fast_ms']:.4f} ms/frame (median of {args.runs}); plain NumPy "
          f"{c['plain_numpy_ms']:.3f} ms ({c['ratio']}x)")
    print(f"(2) batch {tuple(batch.shape)} float32")
    print(f"    {'sanitizer':30s} {'fast ms':>9s} {'NumPy ms':>10s} {'speed-up':>9s}")
    for r in rows:
        print(f"    {r['sanitizer']:30s} {r['fast_ms']:9.3f} {r['plain_numpy_ms']:10.3f} "
              f"{r['speedup']:8.1f}x")
    print("    (jpeg rows: the plain way is the NumPy DCT approximation, one image at a time)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
