#!/usr/bin/env python3
"""Ingest-gate benchmark: samples per second with every check, and the stage-1 attacks.

Usage: python scripts/bench_ingest.py [--per-class 144] [--ref-per-class 600]
           [--attacks] [--repeat 3] [--json out.json] [--reference-cache DIR]
Builds a store in a temp folder (root key, one provider, a reference of rendered signs),
then times a clean signed batch of 14 x ``--per-class`` 32 x 32 PNGs (2,016 by default).
``--reference-cache DIR`` keeps the built reference (its label-screen network takes minutes
to train) in DIR and copies it into the next run's store when ``--ref-per-class`` and
``--seed`` match; the store loads it like any other, checking every hash.

- end to end: ``roadshield data ingest BATCH --store S --json`` as a whole process
  (interpreter start, imports, loading the store's reference, signature, per-image sha256,
  schema, decode, features, KS, Isolation Forest, range, label and trigger screens, the
  journal and object writes), best and median of ``--repeat`` runs;
- start-up of a run that needs no model: the same command on a batch from an unknown
  source, rejected whole before any image is read;
- in process: ``ingest`` with the reference already loaded.

BLAS / OpenMP are held to 2 threads (the gate holds BLAS to one thread while it screens).
Each figure is printed beside the 1-minute load average: on a shared machine it shows how
much of the wall time was waiting for a core. ``--attacks`` also runs every stage-1 attack
on fresh renders and prints, per attack, bad samples sent / stopped and clean samples
wrongly stopped. ``--stage3`` measures what happens to a correct-label trigger that
slipped past the gate (see ``stage3``): the backdoor's attack success rate in a model
trained on it, before and after stage 3's activation-clustering and spectral scans.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "2")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


def timed_cli(batch: Path, store: Path) -> tuple[float, float, dict]:
    """(wall s, CPU s of the child, summary) of one ``roadshield data ingest`` process."""
    exe = shutil.which("roadshield") or str(Path(sys.executable).with_name("roadshield"))
    before = os.times()
    t = time.perf_counter()
    out = subprocess.run([exe, "data", "ingest", str(batch), "--store", str(store), "--json"],
                         capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = os.times()
    if out.returncode not in (0, 2, 3, 4):
        raise SystemExit(f"roadshield data ingest failed ({out.returncode}): {out.stderr}")
    cpu = (after.children_user - before.children_user
           + after.children_system - before.children_system)
    return wall, cpu, json.loads(out.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=144)
    ap.add_argument("--ref-per-class", type=int, default=600)
    ap.add_argument("--attacks", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="timed clean batches (best reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--reference-cache",
                    help="reuse the reference built by an earlier run with the same "
                         "--ref-per-class and --seed from this folder (built there if absent)")
    ap.add_argument("--cl-rates", default="0.03",
                    help="--attacks: shares of the batch given a correct-label trigger, "
                         "comma-separated")
    ap.add_argument("--cl-targets", default="0,3,6,9,12",
                    help="--attacks: target classes of the correct-label triggers "
                         "(comma-separated, or 'all')")
    ap.add_argument("--stage3", action="store_true",
                    help="only this: train on triggers that slipped past the gate, scan, "
                         "retrain (no gate timing)")
    ap.add_argument("--stage3-fraction", type=float, default=0.1,
                    help="share of the target class's training images carrying the trigger")
    args = ap.parse_args()
    if args.stage3:  # a measurement of its own: no gate store needed
        res = {"stage3": [stage3(kind, args.stage3_fraction, args.seed)
                          for kind in ("triangle", "sig", "blend")],
               "cpu_count": os.cpu_count(), "threads": os.environ["OMP_NUM_THREADS"]}
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
        return 0

    from cloud_train.ingest import attacks as A
    from cloud_train.ingest.gate import ingest, init_store, store_paths
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
        built = reference(store / "reference", args)
        out["reference_build_s"] = round(time.perf_counter() - t, 2) if built else "cached"
        t = time.perf_counter()
        ref = Reference.load(store / "reference")
        out["reference_images"] = len(ref.labels)
        out["reference_load_s"] = round(time.perf_counter() - t, 2)
        out["reference_load_retrained_embedding"] = ref.embed_trained
        how = (f"built in {out['reference_build_s']} s (label screen CNN trained once, "
               "cached)" if built else f"copied from {args.reference_cache}")
        print(f"reference: {len(ref.labels)} images {how}, loaded in "
              f"{out['reference_load_s']} s "
              f"({'retrained' if ref.embed_trained else 'cached'} embedding)")

        imgs, labels = A.render_images(args.per_class, seed=200 + args.seed)
        # the same images under --repeat batch ids (a rerun of one batch would be skipped)
        cli = []
        for k in range(args.repeat):
            b = A.clean(d / f"cli{k}", imgs, labels, "acme", prov, f"bench-cli-{k}")
            cli.append(timed_cli(b.path, store) + (round(os.getloadavg()[0], 2),))
        walls = sorted(c[0] for c in cli)
        wall, cpu_s, s, load = min(cli, key=lambda c: c[0])
        out["cli_end_to_end"] = {
            "samples": s["received"], "seconds": round(wall, 3),
            "samples_per_s": round(s["received"] / wall, 1),
            "median_samples_per_s": round(s["received"] / walls[len(walls) // 2], 1),
            "cpu_seconds": round(cpu_s, 3),
            "samples_per_cpu_s": round(s["received"] / cpu_s, 1),
            "load_average_1m": load, "repeats": args.repeat, "status": s["status"],
            "quarantined": s["quarantined"], "reasons": s["reason_counts"]}
        print(f"end to end (roadshield data ingest, whole process): {s['received']} samples in "
              f"{wall:.2f} s = {s['received'] / wall:.0f} samples/s (best of {args.repeat}, "
              f"median {out['cli_end_to_end']['median_samples_per_s']:.0f}); {cpu_s:.2f} CPU s "
              f"= {s['received'] / cpu_s:.0f} samples per CPU s; load average {load}; "
              f"{s['status']}, held {s['quarantined']} {s['reason_counts']}")
        nomodel = A.unknown_source(d / "nomodel", imgs[:14], labels[:14], evil, "nomodel")
        starts = [timed_cli(nomodel.path, store) for _ in range(args.repeat)]
        best = min(starts, key=lambda c: c[0])
        out["startup_no_model"] = {"seconds": round(best[0], 3), "cpu_seconds": round(best[1], 3),
                                   "status": best[2]["status"],
                                   "load_average_1m": round(os.getloadavg()[0], 2)}
        print(f"start-up of a run that needs no model (batch rejected: unknown source): "
              f"{best[0]:.2f} s wall, {best[1]:.2f} CPU s (best of {args.repeat})")

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
        t = time.perf_counter()
        ref.trigger_screen(imgs, labels)
        trigger_s = time.perf_counter() - t
        out["ingest"] = {"samples": s["received"], "seconds": round(dt, 3),
                         "samples_per_s": round(s["received"] / dt, 1),
                         "median_samples_per_s": round(s["received"] / walls[len(walls) // 2],
                                                       1),
                         "cpu_seconds": round(cpu_s, 3), "repeats": args.repeat,
                         "label_screen_s": round(label_s, 3),
                         "trigger_screen_s": round(trigger_s, 3),
                         "load_average_1m": round(os.getloadavg()[0], 2),
                         "accepted": s["accepted"], "quarantined": s["quarantined"],
                         "clean_false_quarantine_rate": round(s["quarantined"] / s["received"],
                                                              4),
                         "reasons": s["reason_counts"]}
        print(f"in process (reference loaded): {s['received']} samples in {dt:.2f} s = "
              f"{s['received'] / dt:.0f} samples/s (best of {args.repeat}, median "
              f"{out['ingest']['median_samples_per_s']:.0f}; {cpu_s:.2f} CPU s, "
              f"load average {out['ingest']['load_average_1m']}); of which the label screen "
              f"{label_s:.2f} s, the trigger screen {trigger_s:.2f} s; clean wrongly "
              f"quarantined {s['quarantined']} ({s['quarantined'] / s['received']:.2%}) "
              f"{s['reason_counts']}")

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
                *[A.correct_label_trigger(d / f"cl-{kind}-{t}-{rate}", ai, al, "acme", prov,
                                          f"cl-{kind}-{t}-{rate}", kind, rate, target=t,
                                          seed=args.seed)
                  for rate in map(float, args.cl_rates.split(","))
                  for kind in A.CORRECT_LABEL_KINDS
                  for t in (range(14) if args.cl_targets == "all"
                            else map(int, args.cl_targets.split(",")))],
                A.surrogate_label_flip(d / "sflip", ai, al, "acme", prov, "sflip", 0.01,
                                       seed=args.seed),
            ]
            out["attacks"] = []
            for atk in built:
                r = A.score(atk, store, ref)
                out["attacks"].append(r)
                r["batch"] = atk.path.name
                label = f"{r['attack']} [{atk.path.name}]"
                trig = f" trigger in class {r['trigger_flagged']}" if r["trigger_flagged"] else ""
                print(f"{label:42s} {r['status']:17s} bad stopped {r['bad_stopped']:5d}/"
                      f"{r['bad_sent']:<5d} ({r['bad_stopped'] / max(1, r['bad_sent']):.1%})  "
                      f"clean wrongly stopped {r['clean_stopped']}/{r['clean_sent']} "
                      f"({r['clean_stopped'] / max(1, r['clean_sent']):.2%}) "
                      f"{r['batch_reasons'] or ''}{trig}")
            out["correct_label_totals"] = totals = correct_label_totals(out["attacks"])
            for k, v in totals.items():
                print(f"{k}: bad stopped {v['bad_stopped']}/{v['bad_sent']}, clean held as "
                      f"TRIGGER_CLUSTER {v['clean_trigger_held']}/{v['clean_sent']}, clean "
                      f"stopped by any screen {v['clean_stopped']}/{v['clean_sent']}")
            out["screen_level"] = screen_level(ref, ai, al, args.seed)
            for k, v in out["screen_level"].items():
                print(f"screen level, every sample poisoned: {k}: {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    return 0


def reference(folder: Path, args: argparse.Namespace) -> bool:
    """Put the benchmark's reference in ``folder`` (a store's ``reference``): from
    ``--reference-cache`` when it holds one for these settings, else built (and cached).
    True if it was built."""
    from cloud_train.ingest import attacks as A
    from cloud_train.ingest.gate import build_reference

    cache = (Path(args.reference_cache) / f"ref{args.ref_per_class}-seed{args.seed}"
             if args.reference_cache else None)
    if cache is not None and (cache / "reference.json").is_file():
        shutil.copytree(cache, folder)
        return False
    ri, rl = A.render_images(args.ref_per_class, seed=100 + args.seed)
    build_reference(folder.parent, ri, rl, 14)
    if cache is not None:  # copied whole, then renamed: a cut-short copy is never used
        part = cache.with_name(cache.name + ".part")
        shutil.rmtree(part, ignore_errors=True)
        shutil.copytree(folder, part)
        shutil.rmtree(cache, ignore_errors=True)
        part.rename(cache)
    return True


def stage3(kind: str, fraction: float, seed: int) -> dict:
    """A correct-label trigger on ``fraction`` of one class's training images (what gets
    through when it comes a few images per batch, under the gate's chance level): train a
    model on it as ``roadshield redteam backdoor`` does at its quick scale, measure the
    attack success rate (non-target test images with the trigger sent to the target),
    run activation clustering and spectral signatures on the training set, and retrain
    without what they flag."""
    import numpy as np
    import torch

    from cloud_train.backdoor.activation_clustering import activation_clustering
    from cloud_train.backdoor.features import dataset_features
    from cloud_train.backdoor.retrain import retrain_without
    from cloud_train.backdoor.spectral import spectral_signatures
    from cloud_train.ingest import attacks as A
    from cloud_train.redteam_backdoor import SCALES, _fit, _train_cfg, world
    from cloud_train.tensors import to_tensor

    t0 = time.perf_counter()
    sc = SCALES["quick"]
    w = world(sc, seed)
    target = int(np.random.default_rng(seed).integers(14))
    cand = np.flatnonzero(w["ytr"] == target)
    idx = np.random.default_rng(seed + 1).choice(cand, round(fraction * len(cand)), False)
    x = w["xtr"].copy()
    x[idx] = A.stamp(kind, x[idx], seed)
    cfg = _train_cfg(sc, seed)

    def measure(model) -> dict:
        keep = w["yte"] != target
        with torch.no_grad():
            acc = float((model(to_tensor(w["xte"])).argmax(1).numpy() == w["yte"]).mean())
            pred = model(to_tensor(A.stamp(kind, w["xte"][keep], seed))).argmax(1).numpy()
        return {"clean_acc": round(acc, 4), "asr": round(float((pred == target).mean()), 4)}

    model = _fit(sc, x, w["ytr"], cfg)
    rec = {"kind": kind, "target": target, "poisoned": len(idx), "class_size": len(cand),
           "train_size": len(x), "infected": measure(model)}
    feats = dataset_features(model, x, w["ytr"])
    ac = activation_clustering(model, x, w["ytr"], features=feats, seed=seed)
    sp = spectral_signatures(model, x, w["ytr"], eps=min(1 / 1.5, 2 * fraction), whiten=True,
                             features=feats, seed=seed)
    poisoned = set(idx.tolist())
    for name, flagged, removed in (("activation_clustering", ac.flagged, ac.suspicious_idx),
                                   ("spectral", sp.flagged, sp.removed_idx)):
        row = {"flagged": [int(c) for c in flagged], "detected": target in flagged,
               "removed": int(len(removed)),
               "poison_removed": len(poisoned & set(removed.tolist()))}
        row["after"] = (measure(retrain_without(model, x, w["ytr"], removed, cfg,
                                                seed=seed).model)
                        if len(removed) else rec["infected"])
        rec[name] = row
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"stage 3, {kind} on {len(idx)}/{len(cand)} of class {target}: infected ASR "
          f"{rec['infected']['asr']:.1%} (clean acc {rec['infected']['clean_acc']:.1%}); "
          f"activation clustering flagged {rec['activation_clustering']['flagged']}, ASR after "
          f"{rec['activation_clustering']['after']['asr']:.1%}; spectral flagged "
          f"{rec['spectral']['flagged']}, ASR after {rec['spectral']['after']['asr']:.1%} "
          f"({rec['seconds']} s)", flush=True)
    return rec


def correct_label_totals(rows: list) -> dict:
    """Per correct-label attack and rate, summed over its target classes."""
    totals: dict = {}
    for r in rows:
        if not r["attack"].startswith("correct_label"):
            continue
        t = totals.setdefault(r["attack"], {"batches": 0, "bad_sent": 0, "bad_stopped": 0,
                                            "clean_sent": 0, "clean_stopped": 0,
                                            "clean_trigger_held": 0})
        t["batches"] += 1
        for k in ("bad_sent", "bad_stopped", "clean_sent", "clean_stopped"):
            t[k] += r[k]
        t["clean_trigger_held"] += r["clean_trigger_held"]
    return totals


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
