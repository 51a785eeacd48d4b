#!/usr/bin/env python3
"""Build the TensorRT engine of the signed bundle on this device, once, before the service
starts (the unit's ExecStartPre; setup.sh installs it as
/opt/roadshield/bin/roadshield-prepare-engine).

It verifies the bundle with the trusted key, then asks the device's engine cache
(``edge_runtime.engine_cache``) for the engine of the verified model under this TensorRT
version and GPU; when there is none it builds it from the verified bytes
(``distill.engine.build_engine``) and records it in the cache's index. A second start
finds it there and builds nothing. Settings come from the flags, else from the same
variables the unit's environment file sets for ``roadshield edge run``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence


def parse_args(argv: Sequence[str] | None, env: Mapping[str, str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="roadshield-prepare-engine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=env.get("ROADSHIELD_BUNDLE"),
                        help="the signed bundle folder ($ROADSHIELD_BUNDLE)")
    parser.add_argument("--trust-key", default=env.get("ROADSHIELD_TRUST_KEY"),
                        help="the publisher's bundle.pub ($ROADSHIELD_TRUST_KEY)")
    parser.add_argument("--bundle-model", default=env.get("ROADSHIELD_BUNDLE_MODEL", "model"),
                        choices=("model", "int8"), help="$ROADSHIELD_BUNDLE_MODEL")
    parser.add_argument("--backend", default=env.get("ROADSHIELD_BACKEND", "tensorrt"),
                        help="only the tensorrt backend needs an engine ($ROADSHIELD_BACKEND)")
    parser.add_argument("--cache", default=env.get("ROADSHIELD_ENGINE_CACHE"),
                        help="the engine cache folder ($ROADSHIELD_ENGINE_CACHE, default "
                             "/var/lib/roadshield/engines)")
    parser.add_argument("--precision", default=env.get("ROADSHIELD_ENGINE_PRECISION", "auto"),
                        choices=("auto", "fp16", "fp32", "int8"))
    parser.add_argument("--max-batch", type=int,
                        default=int(env.get("ROADSHIELD_ENGINE_MAX_BATCH", "8")),
                        help="the engine's largest batch: at least edge run's max ROIs")
    parser.add_argument("--workspace-mib", type=int, default=1024)
    args = parser.parse_args(argv)
    missing = [flag for flag, value in (("--bundle", args.bundle),
                                        ("--trust-key", args.trust_key)) if not value]
    if missing and args.backend == "tensorrt":
        parser.error(f"{' and '.join(missing)} needed (or ROADSHIELD_BUNDLE / "
                     "ROADSHIELD_TRUST_KEY in the environment file)")
    return args


def prepare(args: argparse.Namespace) -> str:
    """Verify, then find or build the engine; returns the line to print."""
    from distill.engine import build_engine, detect_gpu
    from edge_runtime.bundle import verify_bundle
    from edge_runtime.engine_cache import EngineCache, EngineKey
    from edge_runtime.runners.base import ModelBytes
    from edge_runtime.runners.tensorrt_runner import import_tensorrt

    if args.backend != "tensorrt":
        return f"backend {args.backend}: no TensorRT engine to prepare"
    bundle = verify_bundle(args.bundle, args.trust_key)
    name = bundle.model_name(args.bundle_model)
    model = ModelBytes(bundle.root / name, bundle.model_bytes(args.bundle_model),
                       origin=f"bundle {bundle.root} (key {bundle.key_hint[:16]})")
    trt = import_tensorrt()
    gpu_name, capability = detect_gpu()
    cache = EngineCache(args.cache) if args.cache else EngineCache.from_env({})
    key = EngineKey(trt.__version__, gpu_name, capability, model.sha256)
    _, info, built = cache.ensure(model, key, build_engine, precision=args.precision,
                                  max_batch=args.max_batch, workspace_mib=args.workspace_mib)
    verb = "built" if built else "found"
    return (f"{verb} {cache.engine_path(key)} ({info.precision}, TensorRT "
            f"{info.tensorrt_version}, {info.gpu_name} sm {info.compute_capability}) for "
            f"{name} sha256 {model.sha256[:16]}")


def main(argv: Sequence[str] | None = None) -> int:
    from roadshield_base.errors import RoadshieldError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv, os.environ)
    try:
        print(prepare(args))
    except RoadshieldError as err:
        print(f"roadshield-prepare-engine: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
