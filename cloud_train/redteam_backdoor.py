"""``roadshield redteam backdoor``: infected and clean models against three backdoor scans.

Per seed: render the 14-class synthetic sign world (train, test, and a small clean set the
defender holds; 32 x 32 x 3 uint8 RGB, seeded), poison the training set with a BadNets patch
(or a blended trigger) toward a random target class, train one infected and one clean model
with the standard trainer (or another registered one, e.g. fast_at, to measure adversarial
training against the backdoor: the retraining mitigations then use it too), and measure
clean accuracy and attack success rate (ASR) on the test split. Then scan both models:

- Neural Cleanse (Wang et al. 2019) on the defender's clean images; mitigation: unlearning;
- activation clustering (Chen et al. 2018; robust whitening before 2-means) on the training
  set; mitigation: drop the flagged examples and retrain from scratch with the same recipe;
- spectral signatures (Tran et al. 2018; scored after robust whitening, SPECTRE-style) on the
  training set; same mitigation.

Only infected models are mitigated (clean models report false flags only). A scan that flags
nothing leaves the model as it was. Each seed's record is written to OUT/redteam_backdoor.json
as soon as the seed ends (atomically), and ``resume=True`` skips the seeds already there, so
a crash loses at most the seed in progress.

Targets (the issue's, as fractions of the seeds run): undefended ASR >= 90% (mean); after
each defence's mitigation, mean ASR <= 5% with mean clean accuracy down by at most 2 points;
the kit's backdoor verdict (``cloud_train.backdoor.verdict``: a rule over the three scans,
fixed on calibration seeds) names the target class of >= 90% of the infected models and
some class of <= 10% of the clean models (9/10 and 1/10 at ten seeds). The verdict is
measured when a frozen rule is given (``verdict_rule``), never on its calibration seeds;
``calibrate_verdict`` writes such a rule from the run's own seeds. Neural Cleanse alone keeps
the paper's rule (MAD anomaly index > 2): the report shows its measured false-flag rate
beside the rule's chance rate, as a replication, not as a target.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from roadshield_base.errors import ConfigError
from roadshield_base.fileio import atomic_write_bytes, atomic_write_json

SCHEMA = "roadshield.redteam.backdoor/v1"
DEFENCES = ("neural_cleanse", "activation_clustering", "spectral")
ASR_MIN = 0.90  # undefended attack must be real
ASR_AFTER_MAX = 0.05
CLEAN_DROP_MAX = 0.02  # accuracy fraction (2 points)


@dataclass(frozen=True)
class Scale:
    """Sizes of one run; per-class counts are over the 14 synthetic classes."""

    train_per_class: int
    test_per_class: int
    defender_per_class: int  # clean images held by the defender (Neural Cleanse, unlearning)
    arch: str
    epochs: int
    seeds: int  # default number of seeds
    nc_steps: int  # Adam steps per class for Neural Cleanse
    unlearn_epochs: int
    trigger_size: int  # BadNets patch side in pixels


# The defender holds 100 clean images per class: unlearning (5 epochs at its default rate) with
# the true trigger on them kept clean accuracy within 0.4 points (97.3 -> 97.0%) and took ASR
# from 97% to 0.8%; with 40 per class fine-tuning cost 1.6-2.3 points of clean accuracy.
SCALES: dict[str, Scale] = {
    "tiny": Scale(30, 10, 12, "signnet_tiny", 2, 1, 20, 1, 4),
    "quick": Scale(300, 40, 100, "signnet_tiny", 12, 3, 300, 5, 4),
    "full": Scale(400, 80, 100, "signnet_tiny", 15, 10, 300, 5, 4),
}


def make_trigger(kind: str, target: int, sc: Scale, seed: int) -> Any:
    """The attack's trigger: a ``trigger_size`` black-and-white checkerboard in the
    bottom-right corner (BadNets; 4 px on 32 px images as in Neural Cleanse's GTSRB setup),
    or a full-image random pattern blended at alpha 0.1 (Chen et al.).

    Chosen by measurement at 1% poison without augmentation: an 8 px random-colour patch
    reached 73% ASR where a 6 px checker reached 92% (200 per class, 10 epochs); at the quick
    scale a 4 px checker reached 97%. A larger patch is no stronger attack here and is a
    worse test of Neural Cleanse: a 6 px (36 pixel) trigger reversed to an L1 norm of 38
    while clean classes' smallest triggers measured 44-93, an anomaly index of 1.7, so the
    scan cannot call it small."""
    from cloud_train.backdoor.triggers import Trigger

    if kind == "patch":
        return Trigger("patch", target, size=sc.trigger_size, position="bottom_right",
                       pattern="checker", seed=seed)
    if kind == "blend":
        return Trigger("blend", target, alpha=0.1, pattern="random", seed=seed)
    raise ConfigError(f"trigger kind {kind!r} is unknown", "use patch or blend")


def world(sc: Scale, seed: int) -> dict[str, np.ndarray]:
    """Train, test and defender sets of one seed (uint8 N x 32 x 32 x 3 RGB, int64 labels).

    The same renderer as ``redteam data`` (``render_images``); the defender's images use
    their own seed, so none of them is a test or training image.
    """
    from cloud_train.ingest.attacks import render_images

    xtr, ytr = render_images(sc.train_per_class, seed=10_000 + seed, split="train")
    xte, yte = render_images(sc.test_per_class, seed=10_000 + seed, split="test")
    xdf, ydf = render_images(sc.defender_per_class, seed=20_000 + seed, split="test")
    return {"xtr": xtr, "ytr": ytr.astype(np.int64), "xte": xte, "yte": yte.astype(np.int64),
            "xdf": xdf, "ydf": ydf.astype(np.int64)}


def _train_cfg(sc: Scale, seed: int, trainer: str = "standard") -> Any:
    from cloud_train.train import TrainConfig

    # no augmentation: the random crop would shift the corner trigger out of the image
    return TrainConfig(trainer=trainer, epochs=sc.epochs, batch_size=64, lr=0.05,
                       seed=seed, device="cpu")


def _fit(sc: Scale, x: np.ndarray, y: np.ndarray, cfg: Any) -> Any:
    """A fresh ``sc.arch`` model trained on ``x, y`` with ``cfg`` (its seed: weights, order)."""
    import torch

    from cloud_train.models import create_model
    from cloud_train.tensors import make_loader
    from cloud_train.train import train

    torch.manual_seed(cfg.seed)
    model = create_model(sc.arch, int(y.max()) + 1)
    loader = make_loader(x, y, cfg.batch_size, shuffle=True, seed=cfg.seed)
    train(model, loader, cfg, progress=False)
    return model.eval()


def _measure(model: Any, w: dict[str, np.ndarray], trig: Any) -> dict[str, float]:
    import torch

    from cloud_train.backdoor.poison import attack_success_rate
    from cloud_train.tensors import to_tensor

    x, y = to_tensor(w["xte"]), torch.as_tensor(w["yte"])
    with torch.no_grad():
        acc = float((model.eval()(x).argmax(1) == y).float().mean())
    return {"clean_acc": round(acc, 4),
            "asr": round(attack_success_rate(model, w["xte"], w["yte"], trig), 4)}


def run_seed(sc: Scale, seed: int, kind: str, rate: float,
             tick: Callable[[str], None] = lambda s: None,
             trainer: str = "standard") -> dict[str, Any]:
    """One seed's full record: attack, both models (trained by ``trainer``), three scans,
    mitigations."""
    from cloud_train.backdoor.activation_clustering import activation_clustering
    from cloud_train.backdoor.features import dataset_features
    from cloud_train.backdoor.neural_cleanse import neural_cleanse
    from cloud_train.backdoor.poison import poison_dataset
    from cloud_train.backdoor.retrain import retrain_without
    from cloud_train.backdoor.spectral import spectral_signatures
    from cloud_train.backdoor.unlearn import unlearn

    t0 = time.perf_counter()
    w = world(sc, seed)
    n_classes = int(w["ytr"].max()) + 1
    target = int(np.random.default_rng(seed).integers(n_classes))
    trig = make_trigger(kind, target, sc, seed)
    pd = poison_dataset(w["xtr"], w["ytr"], trig, rate, seed=seed, num_classes=n_classes)
    tick("render + poison")
    cfg = _train_cfg(sc, seed, trainer)  # both models and the retraining mitigations
    models = {"infected": _fit(sc, pd.images, pd.labels, cfg),
              "clean": _fit(sc, w["xtr"], w["ytr"], cfg)}
    train_s = time.perf_counter() - t0
    tick("train infected + clean")
    rec: dict[str, Any] = {"seed": seed, "target": target, "trigger": trig.to_dict(),
                           "poisoned": int(len(pd.poisoned_idx)), "train_size": len(pd.labels),
                           "train_seconds_two_models": round(train_s, 2)}
    for name, m in models.items():
        rec[name] = _measure(m, w, trig)
    data = {"infected": (pd.images, pd.labels), "clean": (w["xtr"], w["ytr"])}
    defs: dict[str, Any] = {d: {} for d in DEFENCES}
    poisoned = set(pd.poisoned_idx.tolist())
    for name, m in models.items():
        xs, ys = data[name]
        feats = dataset_features(m, xs, ys)
        t = time.perf_counter()
        nc = neural_cleanse(m, w["xdf"], w["ydf"], steps=sc.nc_steps, seed=seed, restarts=2,
                            early_stop=80)
        defs["neural_cleanse"][name] = _scan_row(nc.flagged, target, name, time.perf_counter() - t,
                                                 anomaly=[round(float(a), 3)
                                                          for a in nc.anomaly_index],
                                                 norms=[round(float(v), 2) for v in nc.norms],
                                                 attack_success=[round(float(v), 3) for v in
                                                                 nc.attack_success])
        tick(f"neural cleanse ({name})")
        t = time.perf_counter()
        ac = activation_clustering(m, xs, ys, features=feats, seed=seed)
        defs["activation_clustering"][name] = _scan_row(
            ac.flagged, target, name, time.perf_counter() - t,
            silhouette=[round(c.silhouette, 3) for c in ac.classes],
            silhouette_anomaly=[round(c.silhouette_anomaly, 2) for c in ac.classes],
            relative_size=[round(c.relative_size, 3) for c in ac.classes],
            removed=int(len(ac.suspicious_idx)),
            poison_removed=len(poisoned & set(ac.suspicious_idx.tolist())))
        t = time.perf_counter()
        # eps: poisoned fraction of one class if the whole budget went into it
        eps = min(1 / 1.5, rate * n_classes)
        sp = spectral_signatures(m, xs, ys, eps=eps, whiten=True, features=feats, seed=seed)
        defs["spectral"][name] = _scan_row(
            sp.flagged, target, name, time.perf_counter() - t,
            ratio=[round(c.ratio, 3) for c in sp.classes],
            removed=int(len(sp.removed_idx)),
            poison_removed=len(poisoned & set(sp.removed_idx.tolist())))
        tick(f"AC + spectral ({name})")
        if name != "infected":
            continue
        t = time.perf_counter()
        fixed = unlearn(copy.deepcopy(m), w["xdf"], w["ydf"], nc, epochs=sc.unlearn_epochs,
                        seed=seed)
        defs["neural_cleanse"]["after"] = _measure(fixed, w, trig)
        defs["neural_cleanse"]["mitigation_seconds"] = round(time.perf_counter() - t, 2)
        tick("unlearn")
        for dname, idx in (("activation_clustering", ac.suspicious_idx),
                           ("spectral", sp.removed_idx)):
            t = time.perf_counter()
            if len(idx) == 0:  # nothing flagged: the model stays as it was
                defs[dname]["after"] = dict(rec["infected"])
            else:
                new = retrain_without(m, xs, ys, idx, cfg, seed=seed).model
                defs[dname]["after"] = _measure(new, w, trig)
            defs[dname]["mitigation_seconds"] = round(time.perf_counter() - t, 2)
            tick(f"retrain ({dname})")
    rec["defences"] = defs
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


def _scan_row(flagged: list[int], target: int, model: str, seconds: float,
              **extra: Any) -> dict[str, Any]:
    flagged = [int(c) for c in flagged]
    row: dict[str, Any] = {"flagged": flagged, "seconds": round(seconds, 2), **extra}
    if model == "infected":
        row["detected"] = target in flagged
        row["other_flags"] = [c for c in flagged if c != target]
    else:
        row["false_flag"] = bool(flagged)
    return row


def summarise(seeds: list[dict[str, Any]], rule: Any = None,
              config: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
    """Per-defence means and per-seed lists, the verdict of ``rule`` (a frozen
    ``VerdictRule``; ConfigError on its calibration seeds) when given, and the missed
    targets (text)."""
    from cloud_train.backdoor.neural_cleanse import null_flag_rate
    inf_asr = [s["infected"]["asr"] for s in seeds]
    inf_acc = [s["infected"]["clean_acc"] for s in seeds]
    summary: dict[str, Any] = {
        "seeds": [s["seed"] for s in seeds], "targets": [s["target"] for s in seeds],
        "undefended": {"asr_mean": _mean(inf_asr), "asr": inf_asr,
                       "clean_acc_mean": _mean(inf_acc), "clean_acc": inf_acc,
                       "clean_model_acc_mean": _mean([s["clean"]["clean_acc"] for s in seeds]),
                       "clean_model_asr_mean": _mean([s["clean"]["asr"] for s in seeds])},
        "defences": {}}
    missed: list[str] = []
    n = len(seeds)
    if _mean(inf_asr) < ASR_MIN:
        missed.append(f"undefended ASR {_mean(inf_asr):.1%} < {ASR_MIN:.0%}")
    for d in DEFENCES:
        rows = [s["defences"][d] for s in seeds]
        det = sum(r["infected"]["detected"] for r in rows)
        false = sum(r["clean"]["false_flag"] for r in rows)
        asr_after = [r["after"]["asr"] for r in rows]
        acc_after = [r["after"]["clean_acc"] for r in rows]
        drop = _mean(inf_acc) - _mean(acc_after)
        summary["defences"][d] = {
            "detected": det, "detection_rate": round(det / n, 4),
            "false_flags": false, "false_flag_rate": round(false / n, 4),
            "asr_before_mean": _mean(inf_asr), "asr_after_mean": _mean(asr_after),
            "asr_after": asr_after, "clean_acc_before_mean": _mean(inf_acc),
            "clean_acc_after_mean": _mean(acc_after), "clean_acc_after": acc_after,
            "clean_acc_drop_points": round(100 * drop, 2)}
        if _mean(asr_after) > ASR_AFTER_MAX:
            missed.append(f"{d}: ASR after mitigation {_mean(asr_after):.1%} > "
                          f"{ASR_AFTER_MAX:.0%}")
        if drop > CLEAN_DROP_MAX + 1e-9:
            missed.append(f"{d}: clean accuracy down {100 * drop:.2f} points > "
                          f"{100 * CLEAN_DROP_MAX:.0f}")
    nc = summary["defences"]["neural_cleanse"]
    # what the MAD rule alone would flag on clean models with normal per-class norms: the
    # yardstick the measured false flags replicate (or not); no longer a target of its own
    n_classes = len(seeds[0]["defences"]["neural_cleanse"]["clean"]["anomaly"]) if seeds else 0
    nc["null_flag_rate"] = round(null_flag_rate(n_classes), 4) if n_classes >= 3 else None
    nc["replication"] = "replication of the paper's rule (MAD anomaly index > 2): measured " \
        "false-flag rate on clean models beside its chance rate"
    if rule is not None and seeds:
        from cloud_train.backdoor.verdict import measure

        summary["verdict"] = measure(rule, seeds, config)
        missed += summary["verdict"]["missed"]
    return summary, missed


def _mean(v: list[float]) -> float:
    return round(float(np.mean(v)), 4) if v else 0.0


def _config(sc: Scale, scale: str, kind: str, rate: float, trainer: str) -> dict[str, Any]:
    return {"scale": scale, "sizes": asdict(sc), "trigger_kind": kind, "poison_rate": rate,
            "trainer": trainer}


def _load_record(path: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The interrupted run's record (ConfigError when unreadable or made with other settings)."""
    try:
        old: Any = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot resume from {path}: {err}",
                          "run without --resume to start over") from err
    if not isinstance(old, dict):
        raise ConfigError(f"{path} holds no red-team record", "run without --resume to start over")
    if old.get("schema") != SCHEMA or old.get("config") != config:
        raise ConfigError(f"{path} was written with other settings ({old.get('config')})",
                          "resume with the same --scale, --trigger, --poison-rate and "
                          "--trainer, or start over without --resume")
    return old


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_backdoor_redteam(out: str | Path, seeds: int | None = None, scale: str = "quick",
                         poison_rate: float = 0.01, trigger: str = "patch",
                         resume: bool = False, progress: bool = True,
                         jobs: int = 1, first_seed: int = 0,
                         trainer: str = "standard", verdict_rule: str | Path | None = None,
                         calibrate_verdict: str | Path | None = None) -> dict[str, Any]:
    """Run seeds first_seed .. first_seed+seeds-1, write OUT/redteam_backdoor.{json,md,png},
    return the result.

    ``seeds`` defaults to the scale's; ``first_seed`` > 0 draws fresh worlds, attacks and
    models for a second sample of seeds. ``trainer`` trains both models and the retraining
    mitigations (a registered trainer name). ``jobs`` > 1 runs that many seeds at once in worker
    processes (spawned, each with ``cpu_count // jobs`` torch threads: the models are small,
    so seeds in parallel use the cores better than threads inside one seed); a seed's record
    does not depend on which process ran it. ``verdict_rule``: a rule file written by
    ``calibrate_verdict`` (``cloud_train.backdoor.verdict``); the run reports the verdict's
    detection and false flags against the targets, and refuses seeds the rule was calibrated
    on. ``calibrate_verdict``: write the rule calibrated on this run's seeds to that path once
    every seed is done. With ``resume`` on a finished run either one works from the saved
    seeds without new work. Bad settings raise ConfigError before any work.
    """
    from tqdm.auto import tqdm

    from cloud_train.backdoor.poison import check_rate
    from cloud_train.backdoor.report import chart_png, markdown

    if scale not in SCALES:
        raise ConfigError(f"unknown scale {scale!r}", f"use one of: {', '.join(SCALES)}")
    sc = SCALES[scale]
    n_seeds = sc.seeds if seeds is None else seeds
    if not isinstance(n_seeds, int) or n_seeds < 1:
        raise ConfigError(f"seeds must be an integer >= 1, got {n_seeds!r}", "use e.g. 10")
    if isinstance(first_seed, bool) or not isinstance(first_seed, int) or first_seed < 0:
        raise ConfigError(f"first seed must be an integer >= 0, got {first_seed!r}",
                          "use 0, or e.g. 10 for a second sample of ten seeds")
    wanted = list(range(first_seed, first_seed + n_seeds))
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"jobs must be an integer >= 1, got {jobs!r}",
                          f"use 1 to {os.cpu_count() or 1} (one per core at most)")
    rate = check_rate(poison_rate)
    make_trigger(trigger, 0, sc, 0)  # unknown kind -> ConfigError now, not after rendering
    _train_cfg(sc, 0, trainer)  # unknown trainer likewise
    rule = _verdict_settings(verdict_rule, calibrate_verdict, wanted)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "redteam_backdoor.json"
    config = _config(sc, scale, trigger, rate, trainer)
    before = _load_record(json_path, config) if resume and json_path.exists() else {}
    done = {str(s["seed"]): s for s in before.get("per_seed", [])}
    stray = sorted(int(k) for k in done if int(k) not in wanted)
    if stray:  # writing the new record would drop them
        raise ConfigError(f"{json_path} holds seeds {stray} outside {wanted[0]}..{wanted[-1]}",
                          "resume with the same --seeds and --first-seed, or use another --out")
    # a resumed run keeps its first start and adds the earlier runs' wall time to its own
    started = before.get("started") or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    earlier_s = float(before.get("seconds", 0.0))
    t0 = time.perf_counter()
    bar = tqdm(total=n_seeds * 9, desc="redteam backdoor", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)

    def tick(what: str) -> None:
        bar.set_postfix_str(what, refresh=False)
        bar.update()

    def result(final: bool) -> dict[str, Any]:
        per_seed = [done[str(s)] for s in wanted if str(s) in done]
        summary, missed = summarise(per_seed, rule, config) if per_seed else \
            ({}, ["no seed finished"])
        unchecked = [] if rule is not None else [
            "backdoor verdict (detection >= 90%, false flags <= 10%): no verdict rule given; "
            "calibrate one on other seeds (--calibrate-verdict) and pass it (--verdict-rule)"]
        return {"schema": SCHEMA, "config": config, "started": started, "complete": final,
                "seeds_requested": n_seeds, "first_seed": first_seed,
                "seconds": round(earlier_s + time.perf_counter() - t0, 2),
                "cpu_count": os.cpu_count(), "per_seed": per_seed, "summary": summary,
                "all_targets_met": final and not missed, "missed": missed,
                "unchecked": unchecked,
                "files": {k: str(out / f"redteam_backdoor.{k}") for k in ("json", "md", "png")}}

    todo = [s for s in wanted if str(s) not in done]
    bar.update(9 * (n_seeds - len(todo)))
    try:
        if jobs == 1 or len(todo) < 2:
            for s in todo:
                def seed_tick(what: str, s: int = s) -> None:
                    tick(f"seed {s}: {what}")

                done[str(s)] = run_seed(sc, s, trigger, rate, seed_tick, trainer=trainer)
                # a crash loses one seed at most
                atomic_write_json(json_path, result(final=False))
        else:
            def saved(s: int) -> None:
                bar.set_postfix_str(f"seed {s} done", refresh=False)
                bar.update(9)
                atomic_write_json(json_path, result(final=False))

            _run_parallel(todo, jobs, sc, trigger, rate, trainer, done, saved)
    finally:
        bar.close()
    res = result(final=True)
    if calibrate_verdict is not None:
        res["verdict_calibration"] = _calibrate(res, config, calibrate_verdict)
    atomic_write_bytes(out / "redteam_backdoor.png", chart_png(res))
    atomic_write_bytes(out / "redteam_backdoor.md", markdown(res).encode())
    atomic_write_json(json_path, res)
    return res


def _verdict_settings(verdict_rule: str | Path | None, calibrate_verdict: str | Path | None,
                      wanted: list[int]) -> Any:
    """The frozen verdict rule to measure (None when none is given), checked against the
    seeds of the run before any work."""
    from cloud_train.backdoor.verdict import check_disjoint, load_rule

    if verdict_rule is not None and calibrate_verdict is not None:
        # the rule would be measured on the seeds the new one is fitted to: keep them apart
        raise ConfigError("--verdict-rule and --calibrate-verdict in one run",
                          "calibrate on one sample of seeds, then measure on another run")
    if verdict_rule is None:
        return None
    rule = load_rule(verdict_rule)
    check_disjoint(rule, wanted)
    return rule


def _calibrate(res: dict[str, Any], config: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """Calibrate the verdict on the finished run's seeds, write the rule, return its figures."""
    from cloud_train.backdoor.verdict import calibrate, save_rule

    rule = calibrate(res["per_seed"], config)
    written = save_rule(rule, path)
    cal = rule.calibration
    return {"file": str(written), "rule": rule.name, "description": rule.describe(),
            "seeds": list(rule.calibration_seeds), "n": cal["n"], "detected": cal["detected"],
            "false_flags": cal["false_flags"], "misnamed": cal["misnamed"],
            "meets_targets": cal["meets_targets"], "per_scan": cal["per_scan"],
            "candidates": cal["candidates"]}


def _run_parallel(todo: list[int], jobs: int, sc: Scale, trigger: str, rate: float,
                  trainer: str, done: dict[str, dict[str, Any]],
                  finished: Callable[[int], None]) -> None:
    """Run ``todo`` seeds in ``jobs`` spawned processes; record each as it completes and call
    ``finished(seed)`` (which saves), so a crash keeps every seed that had finished. Workers
    report no progress inside a seed (the parent counts finished seeds)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(max_workers=min(jobs, len(todo)),
                             mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init, initargs=(threads,)) as pool:
        futures = {pool.submit(run_seed, sc, s, trigger, rate, trainer=trainer): s
                   for s in todo}
        try:
            for fut in as_completed(futures):
                s = futures[fut]
                done[str(s)] = fut.result()
                finished(s)
        except BaseException:
            for fut in futures:
                fut.cancel()  # seeds not started yet; running ones finish and are dropped
            raise
