#!/usr/bin/env python3
"""Input-detector cost on the CPU: milliseconds per crop the detectors add to inference.

Usage: python scripts/bench_detectors.py [--model runs/latest/model.onnx] [--crops 1,2,3]
           [--repeats 300] [--threads 2] [--squeezers bitdepth:bits=5,median:k=3] [--json]

For each batch size (the edge loop sends up to 3 crops a frame), one ONNX Runtime session
of the model times, over ``--repeats`` calls after a warm-up:

- ``bare``: ``runner.infer`` on the batch alone;
- ``squeeze`` / ``mahalanobis`` / ``both``: ``DetectorSet.infer`` as the loop calls it (one
  runner call holding the batch and, with squeezing, its bit-depth-5 and median-3x3 copies;
  then the softmax distances and / or the Mahalanobis score on the features output).

It prints the median milliseconds per call and the detectors' added cost per crop,
(median with detectors - median bare) / crops. The model must have the ``features``
output (``distill export`` writes it). The timing does not depend on the fitted
statistics, so the detectors are built here with the right shapes: class means and an
identity precision matrix. Without ``--model`` an untrained signnet is exported to a
temporary folder.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from edge_runtime.detectors import DetectorSet
    from edge_runtime.model_info import ModelInfo
    from edge_runtime.runners.base import BaseRunner


def untrained_model(folder: Path) -> Path:
    import torch

    from cloud_train.models import create_model
    from cloud_train.signs import SYNTHETIC_CLASSES
    from distill.export import export_onnx

    torch.manual_seed(0)
    model = create_model("signnet", num_classes=len(SYNTHETIC_CLASSES)).eval()
    return export_onnx(model, SYNTHETIC_CLASSES, folder / "model.onnx")


def median_ms(call: Callable[[], object], repeats: int) -> float:
    for _ in range(max(5, repeats // 10)):  # warm-up: allocations, thread pool
        call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000.0


def time_batch(runner: BaseRunner, sets: dict[str, DetectorSet], batch: np.ndarray,
               info: ModelInfo, repeats: int) -> dict[str, Any]:
    """One batch size: bare and per-detector medians, and the added ms per crop."""
    n = len(batch)
    feed = {info.input_name: batch}
    bare = median_ms(lambda: runner.infer(feed), repeats)
    row: dict[str, Any] = {"crops": n, "bare_ms": bare}
    for name, det in sets.items():
        ms = median_ms(partial(det.infer, runner, batch, info.input_name, info.output_name),
                       repeats)
        row[f"{name}_ms"] = ms
        row[f"{name}_added_ms_per_crop"] = (ms - bare) / n
    return row


def bench(model: Path, crops: list[int], repeats: int, threads: int,
          squeezers: str | None = None) -> dict[str, Any]:
    from edge_runtime.detectors import (
        DEFAULT_SQUEEZERS,
        DetectorSet,
        FeatureSqueezing,
        MahalanobisDetector,
    )
    from edge_runtime.model_info import read_model_info
    from edge_runtime.runners.onnxruntime_runner import OnnxRuntimeRunner

    info = read_model_info(model)
    if info.features_name is None:
        sys.exit(f"{model} has no features output: export it again with `roadshield distill "
                 "export` (Mahalanobis needs it)")
    rng = np.random.default_rng(0)
    size = info.input_size
    rows: list[dict[str, Any]] = []
    with OnnxRuntimeRunner(model, intra_op_threads=threads) as runner:
        probe = runner.infer({info.input_name: np.zeros((1, 3, size, size), np.float32)})
        dim = probe[info.features_name].shape[1]
        classes = len(info.class_names)
        maha = MahalanobisDetector(rng.normal(size=(classes, dim)).astype(np.float32),
                                   np.eye(dim, dtype=np.float32), threshold=1.0)
        squeeze = FeatureSqueezing(squeezers or DEFAULT_SQUEEZERS, threshold=0.5)
        sets = {"squeeze": DetectorSet(squeeze, features_name=info.features_name),
                "mahalanobis": DetectorSet(mahalanobis=maha, features_name=info.features_name),
                "both": DetectorSet(squeeze, maha,
                                    features_name=info.features_name)}
        for n in crops:
            batch = rng.random((n, 3, size, size), dtype=np.float32)
            rows.append(time_batch(runner, sets, batch, info, repeats))
    return {"model": str(model), "input_size": size, "features_dim": int(dim),
            "squeezers": [f"{q.name}:{q.options}" for q in squeeze.squeezers],
            "threads": threads, "repeats": repeats, "rows": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--crops", default="1,2,3", help="batch sizes, comma-separated")
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    ap.add_argument("--squeezers", default=None,
                    help="feature squeezing's squeezers (default: the detector's own)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    crops = [int(c) for c in args.crops.split(",")]
    if not crops or min(crops) < 1 or args.repeats < 1:
        ap.error("--crops takes batch sizes >= 1 and --repeats a count >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else untrained_model(Path(tmp))
        result = bench(model, crops, args.repeats, args.threads, args.squeezers)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['model']}: input {result['input_size']} px, features "
          f"{result['features_dim']}, {args.threads} threads, median of {args.repeats} calls, "
          f"squeezers {', '.join(result['squeezers'])}")
    print(f"{'crops':>5} {'bare ms':>8} {'+squeeze':>9} {'+maha':>7} {'+both':>7}  (ms per crop)")
    for r in result["rows"]:
        print(f"{r['crops']:>5} {r['bare_ms']:8.3f} {r['squeeze_added_ms_per_crop']:9.3f} "
              f"{r['mahalanobis_added_ms_per_crop']:7.3f} {r['both_added_ms_per_crop']:7.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
