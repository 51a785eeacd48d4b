"""Measure detection and verify time: ``python -m cloud_train.attest.bench --per-class 358``.

Renders a synthetic dataset (14 classes x per-class training images), runs the signed
pipeline for several seeds, verifies each clean run (false alarms), applies every tampering
attack to every run (detections), and prints/writes JSON with the first finding per attack
and the verify times.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from cloud_train.attest.policy import load_stage_key, make_stage_keys
from cloud_train.attest.stages import run_pipeline
from cloud_train.attest.tamper import ATTACKS, INSIDER, run_attack
from cloud_train.attest.verify import verify_pipeline
from cloud_train.ingest.export import sign_folder_as_export
from cloud_train.render import render_dataset


def measure(work: Path, per_class: int, seeds: int) -> dict[str, Any]:
    render_dataset(work / "raw", per_class, 0, seed=0, progress=False)
    make_stage_keys(work / "keys")
    sign_folder_as_export(work / "raw", load_stage_key(work / "keys", "gate"))
    attacks = [*ATTACKS, *INSIDER]
    out: dict[str, Any] = {"per_class": per_class, "seeds": seeds, "clean": [],
                           "attacks": {a: {"detected": 0, "runs": 0, "first_finding": ""}
                                       for a in attacks}}
    for seed in range(seeds):
        clean = work / f"clean{seed}"
        t0 = time.perf_counter()
        run_pipeline(work / "raw", clean, work / "keys", seed=seed, progress=False)
        pipeline_s = time.perf_counter() - t0
        rep = verify_pipeline(clean, work / "keys")
        out["clean"].append({"seed": seed, "ok": rep.ok, "images": rep.images,
                             "pipeline_s": round(pipeline_s, 3),
                             "verify_s": round(rep.seconds, 3),
                             "max_mean_drift": max(d.max_mean_rel for d in rep.drift),
                             "max_ks": max(d.max_ks for d in rep.drift)})
        for a in attacks:
            _, bad = run_attack(a, clean, work / "attacks", work / "keys")
            r = verify_pipeline(bad, work / "keys")
            entry = out["attacks"][a]
            entry["runs"] += 1
            entry["detected"] += int(not r.ok)
            if r.findings and not entry["first_finding"]:
                entry["first_finding"] = str(r.findings[0])
    out["false_alarms"] = sum(not c["ok"] for c in out["clean"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--per-class", type=int, default=358, help="14 x 358 = 5012 images")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        res = measure(Path(tmp), args.per_class, args.seeds)
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
