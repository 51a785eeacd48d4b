#!/usr/bin/env python3
"""Sanitizer benchmark on the CPU: the default chain per frame, and each sanitizer on a batch.

Usage: python scripts/bench_sanitize.py [--threads 2] [--runs 2000] [--batch-runs 15]
           [--content noise|smooth] [--json]

(1) ``edge_runtime.sanitize.DEFAULT_CHAIN`` (bitdepth:bits=5, median:k=3, the fused
    preprocess) on a 640x480 frame with one 64x64 region, model input 32x32: median ms per
    frame over ``--runs`` calls, next to the same steps done with the plain-NumPy
    references of ``kernels.sanitize_reference`` / ``kernels.reference``.
(2) Each sanitizer on a batch of 256 images, 3 x 32 x 32 float32 RGB, against the plain
    way of computing the same thing, both timed in this run (median of ``--batch-runs``
    calls; the ratio is plain / fast). The plain way runs the same algorithm:
      bitdepth, median, resize_pad: the NumPy references, one image at a time;
      jpeg codec: a PIL encode/decode per image (libjpeg on both sides, 4:4:4; the
        script checks the outputs are identical), plus the per-image cv2 loop;
      jpeg dct: the same float64 DCT-quantise-IDCT, one 8 x 8 block at a time.
    ``--content smooth`` blurs the batch (JPEG's cost depends on it; noise is the worst
    case for the codec). Each row also gives the ratio of process CPU times, which a
    busy shared machine disturbs less than wall-clock times.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def median_ms(fn: Callable[[], Any], runs: int, warmup: int = 3) -> float:
    return timed(fn, runs, warmup)[0]


def timed(fn: Callable[[], Any], runs: int, warmup: int = 3) -> tuple[float, float]:
    """Median wall-clock ms and median process CPU ms (all threads) of ``fn()``.

    On a shared machine the wall time includes waiting for a core; the CPU time does
    not (but counts threads that spin, e.g. a multithreaded BLAS waiting for work)."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(runs):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return float(np.median(wall)) * 1e3, float(np.median(cpu)) * 1e3


def per_image(batch: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """An H x W x C function applied to each row of an N x 3 x H x W batch."""
    return np.stack([fn(im.transpose(1, 2, 0)).transpose(2, 0, 1) for im in batch])


def pil_jpeg(images_bgr: np.ndarray, quality: int) -> np.ndarray:
    """The plain codec way: one PIL (libjpeg) round trip per image, 4:4:4."""
    from PIL import Image

    out = []
    for im in images_bgr:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(im[..., ::-1])).save(buf, format="JPEG",
                                                                  quality=quality,
                                                                  subsampling=0)
        buf.seek(0)
        out.append(np.asarray(Image.open(buf).convert("RGB"))[..., ::-1])
    return np.stack(out)


def cv2_jpeg(images_bgr: np.ndarray, quality: int) -> np.ndarray:
    import cv2

    params = [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
              cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
    return np.stack([cv2.imdecode(cv2.imencode(".jpg", im, params)[1], 1) for im in images_bgr])


def per_block_dct_jpeg(images_bgr: np.ndarray, quality: int) -> np.ndarray:
    """The plain DCT way: ``jpeg_dct_reference``'s float64 steps, one 8 x 8 block at a time."""
    from kernels.sanitize_reference import RGB_TO_YCC, YCC_TO_RGB, dct_matrix, jpeg_quant_tables

    d, tables = dct_matrix(), jpeg_quant_tables(quality)
    out = np.empty_like(images_bgr)
    for n, img in enumerate(images_bgr):
        h, w, _ = img.shape
        ycc = img[..., ::-1].astype(np.float64) @ RGB_TO_YCC.T
        ycc[..., 0] -= 128.0
        ycc = np.pad(ycc, ((0, -h % 8), (0, -w % 8), (0, 0)), mode="edge")
        rec = np.empty_like(ycc)
        for y in range(0, ycc.shape[0], 8):
            for x in range(0, ycc.shape[1], 8):
                for c in range(3):
                    table = tables[0 if c == 0 else 1]
                    coef = np.rint(d @ ycc[y:y + 8, x:x + 8, c] @ d.T / table) * table
                    rec[y:y + 8, x:x + 8, c] = d.T @ coef @ d
        rec = rec[:h, :w]
        rec[..., 0] += 128.0
        out[n] = np.clip(np.rint(rec @ YCC_TO_RGB.T), 0, 255).astype(np.uint8)[..., ::-1]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="OpenCV threads (cv2.setNumThreads)")
    ap.add_argument("--runs", type=int, default=2000, help="calls timed for the per-frame chain")
    ap.add_argument("--batch-runs", type=int, default=15, help="calls timed per batch figure")
    ap.add_argument("--content", choices=["noise", "smooth"], default="noise")
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
    if chain is None:
        raise SystemExit("DEFAULT_CHAIN is empty")
    counter = iter(range(10**9))
    fast_chain = median_ms(lambda: chain(frame, [box], 32, frame_index=next(counter)), args.runs)

    def plain_chain() -> np.ndarray:
        crop = median_reference(bitdepth_reference(frame[208:272, 288:352], 5), 3)
        return preprocess_roi_reference(crop, (0, 0, 64, 64), 32)

    plain = median_ms(plain_chain, max(20, args.runs // 20))
    result: dict[str, Any] = {
        "threads": args.threads, "content": args.content,
        "chain": {"spec": chain.spec, "frame": "640x480", "region": "64x64", "size": 32,
                  "fast_ms": round(fast_chain, 4), "plain_numpy_ms": round(plain, 4),
                  "ratio": round(plain / fast_chain, 1)}}

    batch = rng.random((256, 3, 32, 32), dtype=np.float32)
    if args.content == "smooth":
        batch = np.ascontiguousarray(np.stack([
            cv2.GaussianBlur(im.transpose(1, 2, 0), (7, 7), 2).transpose(2, 0, 1)
            for im in batch]))
    images = batch_to_images(batch)
    params = resize_pad_params(0, 0, 32, 32, 256)
    same_codec = bool(np.array_equal(pil_jpeg(images[:16], 75), cv2_jpeg(images[:16], 75)))
    cases: dict[str, tuple[Callable[[], Any], Callable[[], Any], str]] = {
        "bitdepth:bits=5": (lambda: bitdepth(batch, 5), lambda: bitdepth_reference(batch, 5),
                            "NumPy reference"),
        "median:k=3": (lambda: median(batch, 3),
                       lambda: per_image(batch, lambda im: median_reference(im, 3)),
                       "NumPy reference per image"),
        "median:k=5": (lambda: median(batch, 5),
                       lambda: per_image(batch, lambda im: median_reference(im, 5)),
                       "NumPy reference per image"),
        "jpeg:quality=75 (codec)": (
            lambda: jpeg(batch, 75), lambda: images_to_batch(pil_jpeg(images, 75)),
            "PIL round trip per image" + ("" if same_codec else " (OUTPUT DIFFERS)")),
        "  same, vs cv2 per image": (
            lambda: jpeg(batch, 75), lambda: images_to_batch(cv2_jpeg(images, 75)),
            "cv2.imencode/imdecode per image"),
        "jpeg:quality=75:method=dct": (
            lambda: jpeg(batch, 75, method="dct"),
            lambda: images_to_batch(per_block_dct_jpeg(images, 75)),
            "same float64 DCT, per 8x8 block"),
        "  same, vs block-vectorised ref": (
            lambda: jpeg(batch, 75, method="dct"),
            lambda: images_to_batch(jpeg_dct_reference(images, 75)),
            "jpeg_dct_reference on the batch"),
        "resize_pad:seed=0": (
            lambda: resize_pad(batch, seed=0, frame_index=0),
            lambda: np.stack([resize_pad_reference(im.transpose(1, 2, 0), p).transpose(2, 0, 1)
                              for im, p in zip(batch, params, strict=True)]),
            "NumPy reference per image"),
    }
    rows = []
    for name, (fast, slow, plain_way) in cases.items():
        f, f_cpu = timed(fast, args.batch_runs)
        s, s_cpu = timed(slow, max(3, args.batch_runs // 3), warmup=1)
        rows.append({"sanitizer": name, "fast_ms": round(f, 3), "plain_ms": round(s, 3),
                     "speedup": round(s / f, 1), "fast_cpu_ms": round(f_cpu, 3),
                     "plain_cpu_ms": round(s_cpu, 3),
                     "cpu_speedup": round(s_cpu / max(f_cpu, 1e-3), 1), "plain_way": plain_way})
    result["batch"] = {"shape": list(batch.shape), "dtype": "float32", "rows": rows,
                       "pil_equals_cv2_codec": same_codec}

    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    c = result["chain"]
    print(f"(1) {c['spec']} on a {c['frame']} frame, {c['region']} region -> {c['size']}x"
          f"{c['size']}, {args.threads} OpenCV threads")
    print(f"    fast {c['fast_ms']:.4f} ms/frame (median of {args.runs}); plain NumPy "
          f"{c['plain_numpy_ms']:.3f} ms ({c['ratio']}x)")
    print(f"(2) batch {tuple(batch.shape)} float32, {args.content}")
    print(f"    {'sanitizer':32s} {'fast ms':>9s} {'plain ms':>9s} {'speed-up':>9s} "
          f"{'CPU-time':>9s}  plain way")
    for r in rows:
        print(f"    {r['sanitizer']:32s} {r['fast_ms']:9.3f} {r['plain_ms']:9.3f} "
              f"{r['speedup']:8.1f}x {r['cpu_speedup']:8.1f}x  {r['plain_way']}")
    print("    (ms: median wall clock; CPU-time: the same ratio in process CPU time)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
