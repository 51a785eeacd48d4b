"""Leakage-proof splits: duplicate clustering, cluster-aware and temporal splits (capture times
from a CSV or the ingest journal), a sealed held-out set with a signed opening log and the
final evaluation that opens it, metric audits, and the leakage attacks.

Names are loaded on first use, so ``cloud_train.splits.cli`` (imported to build the
``roadshield`` parser) stays cheap. The entry points ``dedup.dedup`` and ``audit.audit``
share their module's name and are imported from the modules
(``from cloud_train.splits.dedup import dedup``).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "compute_metrics": "audit", "write_metrics": "audit", "write_predictions": "audit",
    "evaluate_sealed": "final_eval",
    "NEAR_THRESHOLD": "dedup", "DedupResult": "dedup", "phash": "dedup",
    "pixel_sha256": "dedup",
    "LeakageReport": "leakage", "check_leakage": "leakage", "future_dated_attack": "leakage",
    "leakage_attack": "leakage",
    "SealedSetError": "sealed", "generate_key": "sealed", "load_key": "sealed",
    "open_sealed": "sealed", "seal": "sealed", "verify_log": "sealed",
    "cluster_split": "split", "spanning_clusters": "split", "temporal_split": "split",
    "parse_time": "times", "times_from_csv": "times", "times_from_store": "times",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cloud_train.splits' has no attribute {name!r}")
    return getattr(importlib.import_module(f"cloud_train.splits.{module}"), name)
