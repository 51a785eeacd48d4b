#!/usr/bin/env python3
"""Ingest-gate benchmark: samples per second with every check, and the stage-1 attacks.

Usage: python scripts/bench_ingest.py [--per-class 150] [--ref-per-class 600]
           [--attacks] [--repeat 3] [--json out.json]
Builds a store in a temp folder (root key, one provider, a reference of rendered signs),
then times ``ingest`` of a clean signed batch of 14 x ``--per-class`` 32 x 32 PNGs:
signature, per-image sha256, schema, decode, features, KS, Isolation Forest, range and
label screens (the CNN embedding forward pass included), and the journal/object writes
(reference already loaded). BLAS / OpenMP
are held to 2 threads. ``--attacks`` also runs every stage-1 attack on fresh renders
and prints, per attack, bad samples sent / stopped and clean samples wrongly stopped.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "2")

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=150)
    ap.add_argument("--ref-per-class", type=int, default=600)
    ap.add_argument("--attacks", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="timed clean batches (best reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    from cloud_train.ingest import attacks as A
    from cloud_train.ingest.gate import build_reference, ingest, init_store, store_paths
    from cloud_train.ingest.reference import Reference
    from cloud_train.ingest.registry import add_source
    from roadshield_base.trust import generate_private_key

    out: dict = {"cpu_count": os.cpu_count(), "threads": os.environ["OMP_NUM_THREADS"]}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        store = d / "store"
        root, prov, evil = generate_private_key(), generate_private_key(), generate_private_key()
        init_store(store, root.public_key())
        add_source(store_paths(store)["registry"], root, "acme", prov.public_key(),
                   "2026-01-01T00:00:00Z")
        t = time.perf_counter()
        ri, rl = A.render_images(args.ref_per_class, seed=100 + args.seed)
        build_reference(store, ri, rl, 14)
        out["reference_images"] = len(rl)
        out["reference_build_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        ref = Reference.load(store / "reference")
        out["reference_load_s"] = round(time.perf_counter() - t, 2)
        out["reference_load_retrained_embedding"] = ref.embed_trained
        print(f"reference: {len(rl)} images built in {out['reference_build_s']} s (label "
              f"screen CNN trained once, cached), loaded in {out['reference_load_s']} s "
              f"({'retrained' if ref.embed_trained else 'cached'} embedding)")

        imgs, labels = A.render_images(args.per_class, seed=200 + args.seed)
        # the same images under --repeat batch ids (a rerun of one batch would be skipped);
        # the best run is the figure least disturbed by other load on the machine
        runs = []
        for k in range(args.repeat):
            b = A.clean(d / f"clean{k}", imgs, labels, "acme", prov, f"bench-clean-{k}")
            cpu, t = time.process_time(), time.perf_counter()
            s_k = ingest(b.path, store, reference=ref)
            runs.append((time.perf_counter() - t, time.process_time() - cpu, s_k, b))
        dt, cpu_s, s, clean = min(runs, key=lambda r: r[0])
        walls = sorted(r[0] for r in runs)
        t = time.perf_counter()
        ref.label_scores(imgs, labels)
        label_s = time.perf_counter() - t
        out["ingest"] = {"samples": s["received"], "seconds": round(dt, 3),
                         "samples_per_s": round(s["received"] / dt, 1),
                         "median_samples_per_s": round(s["received"] / walls[len(walls) // 2],
                                                       1),
                         "cpu_seconds": round(cpu_s, 3), "repeats": args.repeat,
                         "label_screen_s": round(label_s, 3),
                         "load_average_1m": round(os.getloadavg()[0], 2),
                         "accepted": s["accepted"], "quarantined": s["quarantined"],
                         "clean_false_quarantine_rate": round(s["quarantined"] / s["received"],
                                                              4),
                         "reasons": s["reason_counts"]}
        print(f"ingest: {s['received']} samples in {dt:.2f} s = {s['received'] / dt:.0f} "
              f"samples/s (best of {args.repeat}, median "
              f"{out['ingest']['median_samples_per_s']:.0f}; 2 threads, {cpu_s:.2f} CPU s, "
              f"load average {out['ingest']['load_average_1m']}); of which the learned label "
              f"screen {label_s:.2f} s; clean wrongly quarantined {s['quarantined']} "
              f"({s['quarantined'] / s['received']:.2%}) {s['reason_counts']}")

        if args.attacks:
            ai, al = A.render_images(args.per_class, seed=300 + args.seed)
            built = [
                A.label_flip(d / "f1", ai, al, "acme", prov, "flip1", 0.01, seed=args.seed),
                A.label_flip(d / "f3", ai, al, "acme", prov, "flip3", 0.03, seed=args.seed),
                A.badnets(d / "bn", ai, al, "acme", prov, "badnets1", 0.01, seed=args.seed),
                A.ood_junk(d / "junk", ai, al, "acme", prov, "junk3", 0.03, seed=args.seed),
                A.unknown_source(d / "us", ai, al, evil, "unknown"),
                A.forged_signature(d / "fs", ai, al, "acme", evil, "forged"),
                A.replayed_signature(d / "rs", clean.path),
                A.replayed_batch_id(d / "rb", ai, al, "acme", prov, "bench-clean-0"),
            ]
            out["attacks"] = []
            for atk in built:
                r = A.score(atk, store, ref)
                out["attacks"].append(r)
                print(f"{r['attack']:20s} {r['status']:17s} bad stopped {r['bad_stopped']:5d}/"
                      f"{r['bad_sent']:<5d} ({r['bad_stopped'] / max(1, r['bad_sent']):.1%})  "
                      f"clean wrongly stopped {r['clean_stopped']}/{r['clean_sent']} "
                      f"({r['clean_stopped'] / max(1, r['clean_sent']):.2%}) "
                      f"{r['batch_reasons'] or ''}")
            out["screen_level"] = screen_level(ref, ai, al, args.seed)
            for k, v in out["screen_level"].items():
                print(f"screen level, every sample poisoned: {k}: {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    return 0


def screen_level(ref, imgs, labels, seed: int) -> dict:
    """Recall with every sample of a batch poisoned (a tighter estimate than 1-3% batches)."""
    import numpy as np

    from cloud_train.ingest.attacks import add_trigger
    from cloud_train.ingest.screens import image_features

    rng = np.random.default_rng(seed)
    feats = image_features(imgs)
    flipped = (labels + rng.integers(1, 14, len(labels))) % 14

    def rate(f, y, code=None, images=imgs):
        res = ref.screen(f, y, images)
        hit = [bool(r) if code is None else code in r for r in res]
        return round(float(np.mean(hit)), 4)

    keep = labels != 0
    trig_img = np.stack([add_trigger(x) for x in imgs[keep]])
    trig = image_features(trig_img)
    target = np.zeros(int(keep.sum()), np.int64)
    return {"clean_false_quarantine": rate(feats, labels),
            "label_flip_recall": rate(feats, flipped),
            "badnets_recall_all_screens": rate(trig, target, images=trig_img),
            "badnets_recall_label_screen_only": rate(trig, target, "LABEL_INCONSISTENT",
                                                     trig_img),
            "badnets_recall_patch_range_only": rate(trig, target, "OUT_OF_RANGE", trig_img),
            "trigger_kept_true_label_recall": rate(trig, labels[keep], images=trig_img)}


if __name__ == "__main__":
    raise SystemExit(main())
