"""``roadshield redteam data``: every data attack of stages 1, 2 and 4 against its defence.

Three defences, each with a clean control run to count false alarms:

- the ingest gate (``cloud_train.ingest``): label flipping 1% and 3%, BadNets trigger 1%,
  out-of-distribution junk, correct-label triggers on one class at 3% of the batch (a yellow
  triangle, SIG's sine stripes, a pattern blended at alpha 0.1), label flips at 1% chosen
  as the most ambiguous by the attacker's own network, an unknown source, a forged
  signature, a replayed signature and a replayed batch id; the resource attacks (a JPEG
  bomb whose frame header hides behind a fill byte and an APP1 segment, 150 rows naming one
  8 MB padded PNG, a 20,000-row index) and a control batch sent after another source took
  its batch id; unit: samples of a signed source batch;
- ``verify_pipeline`` (``cloud_train.attest``): the five mid-pipeline tampering attacks and the
  insider feature shift (made with the genuine stage keys); unit: pipeline folders, one per
  pipeline seed;
- ``check_leakage`` (``cloud_train.splits``): test rows and their near-duplicate variants copied
  into train, one row per variant kind, and future-dated train samples; unit: train rows.

Every image is 32 x 32 x 3 uint8 RGB, rendered from ``cloud_train.render`` with seeds derived
from ``seed``. Each attack row holds bad_sent / bad_stopped, clean_sent / clean_flagged (clean
samples of the same run wrongly stopped), detected, the first reason, the issue's target for
that attack and whether it was met. ``run_data_redteam`` writes redteam_data.json, .md, .png.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from cloud_train.progress import step_ticker
from cloud_train.redteam_cli import check_scale_and_seed
from roadshield_base.fileio import atomic_write_bytes, atomic_write_json

SCHEMA = "roadshield.redteam.data/v1"
STOP_TARGET = 0.95  # poisoned samples quarantined (label flips, trigger injection)
CLEAN_MAX = 0.01  # clean samples wrongly quarantined
LEAK_TARGET = 0.99  # planted near-duplicate variants caught
CLEAN_LEAK_MAX = 0.001  # clean split: test rows joined to a train row (false leaks)


@dataclass(frozen=True)
class Scale:
    """Sizes of one red-team run (per-class counts are over the 14 synthetic classes)."""

    ref_per_class: int  # trusted screening reference of the gate
    batch_per_class: int  # each source batch sent to the gate
    pipe_per_class: int  # training images through the signed pipeline
    pipe_seeds: int  # clean pipelines, each attacked by every tampering attack
    train_per_class: int  # leakage: clean train rows
    test_per_class: int  # leakage: test rows (variants are planted from these)
    per_kind: int  # leakage: planted variants per kind
    future: int  # leakage: future-dated train rows
    embed_min_steps: int = 150  # training batches of the gate's label-screen network, at least


# "full" uses the benches' sizes: scripts/bench_ingest.py, cloud_train/attest/bench.py,
# scripts/bench_dedup.py --recall (1,000 variants per kind).
SCALES: dict[str, Scale] = {
    "tiny": Scale(60, 15, 8, 1, 20, 6, 30, 5, embed_min_steps=40),
    "quick": Scale(600, 100, 100, 2, 150, 30, 300, 30),
    "full": Scale(600, 150, 358, 5, 358, 72, 1000, 100),
}


@dataclass
class Target:
    """What the issue asks of one attack (None: not asked)."""

    min_stopped: float | None = None
    max_clean_rate: float | None = None
    no_false_alarm: bool = False

    def text(self) -> str:
        parts = []
        if self.min_stopped is not None:
            parts.append("100% detected" if self.min_stopped >= 1 else
                         f">= {self.min_stopped:.0%} stopped")
        if self.max_clean_rate is not None:
            digits = 0 if (100 * self.max_clean_rate).is_integer() else 1
            parts.append(f"clean <= {self.max_clean_rate:.{digits}%}")
        if self.no_false_alarm:
            parts.append("no false alarm")
        return ", ".join(parts)


DETECT_ALL = Target(min_stopped=1.0)
POISON = Target(min_stopped=STOP_TARGET, max_clean_rate=CLEAN_MAX)
CORRECT_LABEL = Target(min_stopped=0.90, max_clean_rate=CLEAN_MAX)  # caught at the gate
LEAK = Target(min_stopped=LEAK_TARGET)
CLEAN_SPLIT = Target(max_clean_rate=CLEAN_LEAK_MAX)


def _row(attack: str, group: str, defence: str, unit: str, bad_sent: int, bad_stopped: int,
         clean_sent: int | None, clean_flagged: int | None, detected: bool, first_reason: str,
         target: Target | None, seconds: float, details: dict[str, Any]) -> dict[str, Any]:
    """One result row; ``target_met`` is None when the issue sets no target for the attack."""
    stopped_rate = bad_stopped / bad_sent if bad_sent else None
    clean_rate = clean_flagged / clean_sent if clean_sent and clean_flagged is not None else None
    met: bool | None = None
    if target is not None:
        met = True
        if target.min_stopped is not None:
            met &= stopped_rate is not None and stopped_rate >= target.min_stopped
        if target.max_clean_rate is not None:
            met &= clean_rate is not None and clean_rate <= target.max_clean_rate
        if target.no_false_alarm:
            met &= not detected
    return {"attack": attack, "group": group, "defence": defence, "unit": unit,
            "bad_sent": bad_sent, "bad_stopped": bad_stopped,
            "stopped_rate": None if stopped_rate is None else round(stopped_rate, 4),
            "clean_sent": clean_sent, "clean_flagged": clean_flagged,
            "clean_flag_rate": None if clean_rate is None else round(clean_rate, 4),
            "detected": bool(detected), "first_reason": first_reason,
            "target": target.text() if target else None, "target_met": met,
            "seconds": round(seconds, 3), "details": details}


# --- stage 1: the ingest gate -------------------------------------------------------------

def _gate_rows(work: Path, sc: Scale, seed: int, tick: Callable[[str], None]
               ) -> list[dict[str, Any]]:
    from cloud_train.ingest import attacks as A
    from cloud_train.ingest.batch import read_batch
    from cloud_train.ingest.gate import build_reference, init_store, read_records, store_paths
    from cloud_train.ingest.reference import ScreenConfig
    from cloud_train.ingest.registry import add_source
    from cloud_train.signs import SYNTHETIC_CLASSES
    from roadshield_base.trust import generate_private_key

    store = work / "store"
    root, prov, evil = generate_private_key(), generate_private_key(), generate_private_key()
    init_store(store, root.public_key())
    add_source(store_paths(store)["registry"], root, "acme", prov.public_key(),
               "2026-01-01T00:00:00Z")
    other = generate_private_key()  # a second registered source, for the batch-id squat
    add_source(store_paths(store)["registry"], root, "other", other.public_key(),
               "2026-01-01T00:00:00Z")
    ri, rl = A.render_images(sc.ref_per_class, seed=100 + seed)
    ref = build_reference(store, ri, rl, len(SYNTHETIC_CLASSES),
                          ScreenConfig(embed_min_steps=sc.embed_min_steps))
    ci, cl = A.render_images(sc.batch_per_class, seed=200 + seed)
    ai, al = A.render_images(sc.batch_per_class, seed=300 + seed)
    cl_target = int(np.random.default_rng(seed).integers(len(SYNTHETIC_CLASSES)))
    tick("gate reference")

    clean_batch = work / "clean"
    builders: list[tuple[str, Target | None, Callable[[], Any]]] = [
        ("clean_batch", Target(max_clean_rate=CLEAN_MAX, no_false_alarm=True),
         lambda: A.clean(clean_batch, ci, cl, "acme", prov, f"clean-{seed}")),
        ("label_flip_1%", POISON,
         lambda: A.label_flip(work / "f1", ai, al, "acme", prov, "flip1", 0.01, seed=seed)),
        ("label_flip_3%", POISON,
         lambda: A.label_flip(work / "f3", ai, al, "acme", prov, "flip3", 0.03, seed=seed)),
        ("badnets_trigger_1%", POISON,
         lambda: A.badnets(work / "bn", ai, al, "acme", prov, "badnets1", 0.01, seed=seed)),
        ("ood_junk_3%", None,
         lambda: A.ood_junk(work / "junk", ai, al, "acme", prov, "junk3", 0.03, seed=seed)),
        # correct-label (clean-label) triggers on one class, every label right: the batch
        # trigger screen's job; the target is for the triangle and the blend
        *[(f"correct_label_{kind}_3%", CORRECT_LABEL if kind != "sig" else None,
           lambda kind=kind: A.correct_label_trigger(
               work / f"cl-{kind}", ai, al, "acme", prov, f"cl-{kind}-{seed}", kind, 0.03,
               target=cl_target, seed=seed))
          for kind in A.CORRECT_LABEL_KINDS],
        # flips aimed past the label screen: the samples the attacker's own network finds
        # most ambiguous get their runner-up class
        ("surrogate_label_flip_1%", None,
         lambda: A.surrogate_label_flip(
             work / "sflip", ai, al, "acme", prov, f"sflip-{seed}", 0.01, seed=seed,
             surrogate=A.train_surrogate(max(30, sc.ref_per_class // 4), seed=seed,
                                         min_steps=sc.embed_min_steps))),
        ("unknown_source", DETECT_ALL,
         lambda: A.unknown_source(work / "us", ai, al, evil, "unknown")),
        ("forged_signature", DETECT_ALL,
         lambda: A.forged_signature(work / "fs", ai, al, "acme", evil, "forged")),
        ("replayed_signature", DETECT_ALL,
         lambda: A.replayed_signature(work / "rs", clean_batch)),
        ("replayed_batch_id", DETECT_ALL,
         lambda: A.replayed_batch_id(work / "rb", ai, al, "acme", prov, f"clean-{seed}")),
        # resource attacks: the bomb and the duplicates must be held, the 20,000-row index
        # refused whole; store_bytes_added shows the 150 rows stored once
        ("hidden_frame_jpeg_bomb", DETECT_ALL,
         lambda: A.bomb_batch(work / "bomb", "acme", prov, f"bomb-{seed}")),
        ("one_png_150_rows", DETECT_ALL,
         lambda: A.one_file_many_rows(work / "dup", ai[0], int(al[0]), "acme", prov,
                                      f"dup-{seed}", rows=150, pad_to=8 << 20)),
        ("index_20000_rows", DETECT_ALL,
         lambda: A.many_rows(work / "rows", ai[0], "acme", prov, f"rows-{seed}")),
        # a source taking another's next batch id first: the victim's batch must pass
        ("victim_after_batch_id_squat", Target(no_false_alarm=True),
         lambda: _squat_then_victim(work, ai, al, prov, other, f"acme-next-{seed}", ref)),
    ]
    rows = []
    objects = store_paths(store)["objects"]
    for name, target, build in builders:  # clean first: the replays reuse its folder and id
        t0 = time.perf_counter()
        atk = build()
        packed = sum(f.stat().st_size for f in objects.glob("*.pack"))
        r = A.score(atk, store, ref)
        recs = read_records(store_paths(store)["journal"]
                            / f"{read_batch(atk.path).index_sha256}.jsonl").values()
        bad = atk.bad_ids if not atk.expect_rejected else set(atk.ids)
        bad_reasons = [rec["reasons"] for rec in recs
                       if rec["id"] in bad and rec["decision"] != "ACCEPTED"]
        clean_reasons = [rec["reasons"] for rec in recs
                         if rec["id"] not in bad and rec["decision"] != "ACCEPTED"]
        control = name in ("clean_batch", "victim_after_batch_id_squat")
        if control:  # a false alarm is a rejected batch; single quarantines count below
            detected = r["status"] == "REJECTED"
            first = ", ".join(clean_reasons[0]) if clean_reasons else ""
        else:
            detected = r["bad_stopped"] > 0
            first = ", ".join(r["batch_reasons"] or (bad_reasons[0] if bad_reasons else []))
        group = ("control" if control else "resource" if name in _RESOURCE else
                 "forgery" if atk.expect_rejected else "poisoning")
        rows.append(_row(
            name, group,
            "ingest gate", "samples", r["bad_sent"], r["bad_stopped"], r["clean_sent"],
            r["clean_stopped"], detected, first, target, time.perf_counter() - t0,
            {"status": r["status"], "exit_code": r["exit_code"], "received": r["received"],
             "batch_reasons": r["batch_reasons"],
             "store_bytes_added": sum(f.stat().st_size for f in objects.glob("*.pack"))
             - packed,
             "bad_reason_counts": dict(Counter(c for rs in bad_reasons for c in rs)),
             "clean_reason_counts": dict(Counter(c for rs in clean_reasons for c in rs)),
             "trigger_flagged_classes": r["trigger_flagged"]}))
        tick(name)
    return rows


_RESOURCE = ("hidden_frame_jpeg_bomb", "one_png_150_rows", "index_20000_rows")


def _squat_then_victim(work: Path, images: np.ndarray, labels: np.ndarray, victim_key: Any,
                       squatter_key: Any, batch_id: str, ref: Any) -> Any:
    """Source "other" ingests under acme's next batch id; returns acme's real batch."""
    from cloud_train.ingest import attacks as A
    from cloud_train.ingest.gate import ingest

    squat = A.squat_batch_id(work / "squat", images[::-1], labels[::-1], "other",
                             squatter_key, batch_id)
    ingest(squat.path, work / "store", reference=ref)
    return A.clean(work / "victim", images, labels, "acme", victim_key, batch_id)


# --- stage 2: signed stage attestations ---------------------------------------------------

def _bypass(work: Path, k: int, seed: int) -> dict[str, tuple[bool, str, list[str]]]:
    """The gate-bypass attacks on one export: (refused before training?, first message,
    poisoned files) per attack. Poison that reaches a stage-2 output counts as reaching
    training: preprocess must refuse before decode writes anything."""
    from cloud_train.attest.stages import run_pipeline
    from cloud_train.attest.tamper import poison_export
    from cloud_train.ingest.export import ExportError

    out = {}
    for name, keep in (("gate_bypass_unexported_folder", False),
                       ("poison_slipped_into_export", True)):
        bad = work / "bypass" / name
        files = poison_export(work / "raw", bad, keep_statement=keep, seed=seed + k)
        try:
            run_pipeline(bad, work / "bypass" / f"{name}-pipe", work / "keys", seed=seed,
                         progress=False)
            out[name] = (False, "", files)
        except ExportError as err:
            out[name] = (not (work / "bypass" / f"{name}-pipe" / "decode").exists(),
                         str(err).splitlines()[0], files)
    return out


def _verify_rows(work: Path, sc: Scale, seed: int, tick: Callable[[str], None]
                 ) -> list[dict[str, Any]]:
    from cloud_train.attest.policy import load_stage_key, make_stage_keys
    from cloud_train.attest.stages import run_pipeline
    from cloud_train.attest.tamper import ATTACKS, INSIDER, run_attack
    from cloud_train.attest.verify import verify_pipeline
    from cloud_train.ingest.export import sign_folder_as_export
    from cloud_train.render import render_dataset

    render_dataset(work / "raw", sc.pipe_per_class, 0, seed=seed, progress=False)
    make_stage_keys(work / "keys")
    # the raw folder stands in for the gate's export (the gate itself is measured above)
    sign_folder_as_export(work / "raw", load_stage_key(work / "keys", "gate"))
    names = [*ATTACKS, *INSIDER]
    bypass = ["gate_bypass_unexported_folder", "poison_slipped_into_export"]
    acc: dict[str, dict[str, Any]] = {n: {"sent": 0, "stopped": 0, "first": "", "files": [],
                                          "checks": Counter(), "s": 0.0}
                                      for n in ["clean_pipeline", *names, *bypass]}
    def add(a: dict[str, Any], rep: Any, t0: float, files: tuple[str, ...]) -> None:
        a["sent"] += 1
        a["stopped"] += int(not rep.ok)  # a failed verify refuses the whole pipeline
        a["first"] = a["first"] or (str(rep.findings[0]) if rep.findings else "")
        a["files"] = a["files"] or list(files)
        a["checks"].update(f.check for f in rep.findings)
        a["s"] += time.perf_counter() - t0

    for k in range(sc.pipe_seeds):
        clean = work / f"clean{k}"
        t0 = time.perf_counter()
        run_pipeline(work / "raw", clean, work / "keys", seed=seed + k, progress=False)
        add(acc["clean_pipeline"], verify_pipeline(clean, work / "keys"), t0, ())
        tick(f"clean pipeline {k}")
        for name in names:
            t0 = time.perf_counter()
            res, bad = run_attack(name, clean, work / "tampered", work / "keys")
            add(acc[name], verify_pipeline(bad, work / "keys"), t0, res.files)
            tick(name)
        t0 = time.perf_counter()
        for name, (refused, msg, files) in _bypass(work, k, seed).items():
            a = acc[name]
            a["sent"] += 1
            a["stopped"] += int(refused)
            a["first"] = a["first"] or msg
            a["files"] = a["files"] or files[:3]
            a["checks"].update(["export"] if refused else [])
            a["poisoned_files"] = a.get("poisoned_files", 0) + len(files)
            a["s"] += (time.perf_counter() - t0) / len(bypass)
        tick("gate bypass")
    rows = []
    for name, a in acc.items():
        control = name == "clean_pipeline"
        details = {"images_per_pipeline": sc.pipe_per_class * 14, "finding_checks":
                   dict(a["checks"]), "tampered_files": a["files"]}
        if name in bypass:
            details["poisoned_files"] = a["poisoned_files"]
            details["poisoned_files_reaching_training"] = \
                a["poisoned_files"] * (a["sent"] - a["stopped"]) // max(a["sent"], 1)
        if control:  # every clean pipeline must verify: a failure is a false alarm
            rows.append(_row(name, "control", "verify", "pipelines", 0, 0, a["sent"],
                             a["stopped"], a["stopped"] > 0, a["first"],
                             Target(no_false_alarm=True), a["s"], details))
        else:
            group = "gate bypass" if name in bypass else (
                "insider" if name in INSIDER else "tampering")
            rows.append(_row(name, group, "preprocess" if name in bypass else "verify",
                             "pipelines", a["sent"], a["stopped"], None, None,
                             a["stopped"] > 0, a["first"], DETECT_ALL, a["s"], details))
    return rows


# --- stage 4: leakage-proof splits --------------------------------------------------------

def _leak_rows(sc: Scale, seed: int, tick: Callable[[str], None]) -> list[dict[str, Any]]:
    from cloud_train.ingest.attacks import render_images
    from cloud_train.splits.leakage import check_leakage, plant_future_dated, plant_test_leaks
    from cloud_train.splits.variants import LEAK_TARGETS, VARIANTS

    tr, trl = render_images(sc.train_per_class, seed=400 + seed, split="train")
    te, tel = render_images(sc.test_per_class, seed=400 + seed, split="test")
    # capture times: train in the 30 days before the cut, as a temporal split would give
    cutoff = datetime(2026, 1, 1, tzinfo=timezone.utc).timestamp()
    times = cutoff - np.random.default_rng(seed).uniform(60.0, 30 * 86400.0, len(tr))
    rows = []
    t0 = time.perf_counter()
    rep = check_leakage(tr, te, train_times=times, cutoff=cutoff)
    # every render is distinct, so each test row joined to a train row is a false leak; the
    # figure is their share of the test rows (the temporal check's flags are counted beside)
    joined, future = len(rep.leaked_test), len(rep.future_train)
    first = (f"test row {int(rep.leaked_test[0])} shares a duplicate cluster with a train row"
             if joined else f"train row {int(rep.future_train[0])} flagged as after the cut"
             if future else "")
    rows.append(_row("clean_split", "control", "check_leakage", "test rows", 0, 0, len(te),
                     joined, joined + future > 0, first, CLEAN_SPLIT, time.perf_counter() - t0,
                     {"n_train": len(tr), "n_test": len(te),
                      "train_rows_joined_to_test": len(rep.leaked_train),
                      "train_rows_flagged_future": future, "threshold_bits": rep.threshold}))
    tick("clean split")
    for j, kind in enumerate(VARIANTS):
        t0 = time.perf_counter()
        p = plant_test_leaks(tr, trl, te, tel, sc.per_kind, (kind,), seed=seed + j)
        rep = check_leakage(p.images, te)
        hit = np.zeros(len(p.images), bool)
        hit[rep.leaked_train] = True
        planted = hit[p.n_clean:]
        caught = np.flatnonzero(planted)
        first = (f"train row {p.n_clean + int(caught[0])} ({kind} variant of test row "
                 f"{int(p.sources[caught[0]])}) shares a duplicate cluster with test"
                 if len(caught) else "")
        required = kind in LEAK_TARGETS
        target = Target(min_stopped=LEAK_TARGETS[kind]) if required else None
        rows.append(_row(
            "leak_test_rows_exact" if kind == "exact" else f"leak_near_dup_{kind}", "leakage",
            "check_leakage", "train rows", len(planted), int(planted.sum()), p.n_clean,
            int(hit[:p.n_clean].sum()), len(caught) > 0, first, target,
            time.perf_counter() - t0,
            {"kind": kind, "required_by_issue": required, "threshold_bits": rep.threshold,
             "n_test": len(te)}))
        tick(f"leak {kind}")
    t0 = time.perf_counter()
    ftimes, idx = plant_future_dated(times, cutoff, sc.future, seed=seed)
    rep = check_leakage(tr, te, train_times=ftimes, cutoff=cutoff)
    caught = np.intersect1d(idx, rep.future_train)
    wrong = np.setdiff1d(rep.future_train, idx)
    first = ""
    if len(caught):
        when = datetime.fromtimestamp(float(ftimes[caught[0]]), timezone.utc)
        first = (f"train row {int(caught[0])} captured {when:%Y-%m-%dT%H:%M:%SZ}, at or after "
                 f"the cut {datetime.fromtimestamp(cutoff, timezone.utc):%Y-%m-%dT%H:%M:%SZ}")
    rows.append(_row("future_dated", "leakage", "check_leakage", "train rows", len(idx),
                     len(caught), len(tr) - len(idx), len(wrong), len(caught) > 0, first, None,
                     time.perf_counter() - t0, {"cutoff_unix_s": cutoff}))
    tick("future dated")
    return rows


# --- the run and its reports --------------------------------------------------------------

def _steps(sc: Scale) -> int:
    from cloud_train.splits.variants import VARIANTS

    # gate: the reference and 13 rows; per pipeline seed: the clean run, 8 attacks, the
    # bypass pair; leakage: the clean split, each variant, future-dated
    return 1 + 13 + sc.pipe_seeds * 10 + 1 + len(VARIANTS) + 1


def run_data_redteam(out_dir: str | os.PathLike[str], seed: int = 0, scale: str = "quick",
                     progress: bool = True) -> dict[str, Any]:
    """Run every data attack against its defence; write redteam_data.{json,md,png} in out_dir.

    scale: "tiny" (tests, seconds), "quick" (one to two minutes on 2 cores, most of it spent
    training the gate's label-screen network on the reference) or "full" (the benchmarks'
    sizes). Returns the JSON's dict: rows under "attacks", and "all_targets_met" / "missed"
    for the issue's targets.
    """
    sc, seed = check_scale_and_seed(scale, seed, SCALES)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    started = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    with step_ticker(_steps(sc), "redteam data", progress) as tick, \
            tempfile.TemporaryDirectory(prefix="roadshield-redteam-") as tmp:
        work = Path(tmp)
        rows = (_gate_rows(work / "gate", sc, seed, tick)
                + _verify_rows(work / "attest", sc, seed, tick)
                + _leak_rows(sc, seed, tick))
    missed = [f"{r['attack']}: {_achieved(r)} (target {r['target']})"
              for r in rows if r["target_met"] is False]
    result = {"schema": SCHEMA, "scale": scale, "seed": seed, "sizes": asdict(sc),
              "started": started, "seconds": round(time.perf_counter() - t0, 2),
              "cpu_count": os.cpu_count(), "attacks": rows,
              "targets_checked": sum(r["target_met"] is not None for r in rows),
              "all_targets_met": not missed, "missed": missed,
              "files": {k: str(out / f"redteam_data.{k}") for k in ("json", "md", "png")}}
    atomic_write_bytes(out / "redteam_data.png", _chart_png(rows))
    atomic_write_bytes(out / "redteam_data.md", markdown(result).encode())
    atomic_write_json(out / "redteam_data.json", result)
    return result


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _achieved(r: dict[str, Any]) -> str:
    if r["group"] == "control":
        return f"{r['clean_flagged']}/{r['clean_sent']} clean flagged"
    clean = (f", clean {r['clean_flagged']}/{r['clean_sent']}"
             if r["clean_sent"] is not None else "")
    return f"stopped {r['bad_stopped']}/{r['bad_sent']}{clean}"


def _met(r: dict[str, Any]) -> str:
    return {True: "yes", False: "NO", None: "-"}[r["target_met"]]


def text_table(result: dict[str, Any]) -> str:
    """Fixed-width table of the rows, for a terminal."""
    head = (f"{'attack':31s} {'defence':13s} {'unit':10s} {'stopped':>13s} {'%':>7s} "
            f"{'clean flagged':>13s} {'det':3s} {'target':32s} met  first reason")
    lines = [head, "-" * len(head)]
    for r in result["attacks"]:
        clean = ("-" if r["clean_sent"] is None else f"{r['clean_flagged']}/{r['clean_sent']}")
        stop = f"{r['bad_stopped']}/{r['bad_sent']}" if r["bad_sent"] else "-"
        lines.append(f"{r['attack']:31s} {r['defence']:13s} {r['unit']:10s} {stop:>13s} "
                     f"{_pct(r['stopped_rate']):>7s} {clean:>13s} "
                     f"{'yes' if r['detected'] else 'no':3s} {r['target'] or '-':32s} "
                     f"{_met(r):4s} {r['first_reason'][:90]}")
    lines.append(f"scale {result['scale']}, seed {result['seed']}, {result['seconds']} s: "
                 + (f"all {result['targets_checked']} targets met" if result["all_targets_met"]
                    else f"{len(result['missed'])} of {result['targets_checked']} targets "
                    "MISSED:"))
    lines += [f"  - {m}" for m in result["missed"]]
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    """The readable report: one table row per attack, then the targets."""
    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    out = ["# Red team: data attacks against the ingest gate, verify and check_leakage", "",
           f"Scale `{result['scale']}` (sizes: {result['sizes']}), seed {result['seed']}, "
           f"{result['seconds']} s on {result['cpu_count']} CPUs, started {result['started']}.",
           "", "Detected: for an attack, at least one bad sample/artefact stopped; for a "
           "clean control, a false alarm (batch rejected, pipeline failed, row flagged).", "",
           "| attack | defence | bad sent | stopped | % stopped | clean wrongly flagged | "
           "detected | target | met | first reason |",
           "|---|---|---:|---:|---:|---:|---|---|---|---|"]
    for r in result["attacks"]:
        clean = ("-" if r["clean_sent"] is None else
                 f"{r['clean_flagged']}/{r['clean_sent']} ({_pct(r['clean_flag_rate'])})")
        out.append(f"| {r['attack']} | {r['defence']} | {r['bad_sent']} {r['unit']} | "
                   f"{r['bad_stopped']} | {_pct(r['stopped_rate'])} | {clean} | "
                   f"{'yes' if r['detected'] else 'no'} | {r['target'] or '-'} | {_met(r)} | "
                   f"{cell(r['first_reason']) or '-'} |")
    out += ["", "## Targets", ""]
    out += ([f"All {result['targets_checked']} targets met."] if result["all_targets_met"] else
            [f"- MISSED {cell(m)}" for m in result["missed"]])
    out += ["", "Rows with target `-` are reported without a target in the issue.", "",
            "![% stopped per attack](redteam_data.png)", ""]
    return "\n".join(out)


def _chart_png(rows: list[dict[str, Any]]) -> bytes:
    """Horizontal bars: % stopped per attack, the 95% target as a dashed line. PNG bytes."""
    from matplotlib.figure import Figure  # Agg canvas, no pyplot global state

    attacks = [r for r in rows if r["bad_sent"]]
    fig = Figure(figsize=(8, 0.35 * len(attacks) + 1.4), dpi=110)
    ax = fig.add_subplot()
    ypos = np.arange(len(attacks))[::-1]
    colour = {True: "#2e7d32", False: "#c62828", None: "#9e9e9e"}
    bars = ax.barh(ypos, [100 * r["stopped_rate"] for r in attacks],
                   color=[colour[r["target_met"]] for r in attacks])
    ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax.set_yticks(ypos, [f"{r['attack']} ({r['defence']})" for r in attacks], fontsize=8)
    ax.axvline(100 * STOP_TARGET, color="black", linestyle="--", linewidth=1)
    ax.text(100 * STOP_TARGET, len(attacks) - 0.4, " 95% target", fontsize=8, va="bottom")
    ax.set_xlim(0, 112)
    ax.set_xlabel("% of bad samples / artefacts stopped (green: target met, red: missed, "
                  "grey: no target)", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
