#!/usr/bin/env python3
"""Robust-training benchmark: cost per epoch, clean, strong robust and sticker accuracy per trainer.

Usage: python scripts/bench_robust_training.py [--per-class 100] [--test-per-class 20]
           [--epochs 2] [--arch signnet] [--size 32] [--trainers standard,fast_at,pgd_at,trades,roa]
           [--seed 0] [--out runs/bench_robust] [--n-eval 200] [--apgd-steps 20]
           [--square-queries 200] [--roa-steps 30] [--device auto]

One run renders the 14 synthetic sign classes in memory (``cloud_train.render``, the same
per-image generators as ``render_dataset``: train images ``image_rng(seed, "train", c, i)``,
i < per-class; a guard/validation set from the next ``--val-per-class`` train indices; test
images from the test split), then trains every trainer on the same data with the same initial
weights, loader order and schedule. Per trainer it reports the seconds of an epoch's
optimisation pass (``TrainHistory.seconds_per_epoch``) and its ratio to ``standard`` measured
in this run; clean accuracy on the whole test set; the worst case over APGD-CE, APGD-DLR and
Square at L-inf ``--eps`` (``cloud_train.robust_eval.strong_evaluate``) and the ROA sticker
attack (``cloud_train.roa.roa``, ``--roa-size`` square, ``--roa-steps`` steps) on a seeded
``--n-eval`` test subset, with the evaluation's sanity checks (``sanity_checks``: monotone in
eps, unbounded attack near 0 %, more steps no better, black box no stronger; a model that
fails one cannot meet the target). Saves each trained model as OUT/<trainer>.pt. Writes
OUT/robust_training.json, .md (table) and .png (bars: clean,
robust and sticker accuracy per trainer, labelled with the cost ratio), prints the table, and
says which trainers meet the issue's target (robust >= 60 % with clean >= 90 %, sanity
checks passed) and which has the highest robust accuracy.
Progress: one log line per trainer and epoch. Threads: OMP_NUM_THREADS (default 2).
"""

from __future__ import annotations

import os

# one knob: OMP_NUM_THREADS (default 2) also sets the BLAS pools, which torch would otherwise
# follow instead (MKL_NUM_THREADS wins over OMP_NUM_THREADS when both are set)
_threads = os.environ.setdefault("OMP_NUM_THREADS", "2")
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, _threads)

import argparse  # noqa: E402
import io  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from fractions import Fraction  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

TARGET_ROBUST = 0.60
TARGET_CLEAN = 0.90
ALL_TRAINERS = "standard,fast_at,pgd_at,trades,roa"


def render(per_class: int, split: str, seed: int, size: int,
           first: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` renders of each synthetic class, indices ``first..first+per_class-1``:
    (N x size x size x 3 uint8 RGB, N int64 labels), class by class."""
    from cloud_train.render import image_rng, render_sign
    from cloud_train.signs import SYNTHETIC_CLASSES

    imgs = [render_sign(c, image_rng(seed, split, c, first + i), size)
            for c in range(len(SYNTHETIC_CLASSES)) for i in range(per_class)]
    labels = np.repeat(np.arange(len(SYNTHETIC_CLASSES)), per_class)
    return np.stack(imgs), labels.astype(np.int64)


def parse_eps(text: str) -> float:
    """``8/255`` or ``0.031`` -> float."""
    try:
        return float(Fraction(text)) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError) as err:
        raise argparse.ArgumentTypeError(f"bad eps {text!r}: use e.g. 8/255") from err


def step_seconds(model: Any, cfg: Any, batch: tuple[Any, Any], repeats: int) -> float:
    """Fastest of ``repeats`` timed training steps (attack, forward, backward) on one batch,
    on a copy of ``model``: a cost figure that shared, busy cores disturb far less than the
    epoch's wall time."""
    import contextlib
    import copy

    import torch

    from cloud_train import train as train_mod

    device = train_mod.resolve_device(cfg.device)
    amp = train_mod.resolve_precision(cfg, device)[0]  # as the training loop runs the step
    net = copy.deepcopy(model).to(device).train()
    p = next(net.parameters())
    x, y = batch[0].to(p.device), batch[1].to(p.device)
    step = train_mod._TRAINERS[cfg.trainer].step  # the registered per-batch step
    times = []
    with torch.random.fork_rng(devices=[]):
        for _ in range(repeats + 1):  # the first, untimed, pays for one-off allocations
            t = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.float16) if amp \
                    else contextlib.nullcontext():
                loss, _ = step(net, x, y, cfg, cfg.eps)
            loss.backward()
            if p.device.type == "cuda":
                torch.cuda.synchronize(p.device)
            times.append(time.perf_counter() - t)
            net.zero_grad(set_to_none=True)
    return min(times[1:])


def evaluate_trainer(model: Any, test: tuple[np.ndarray, np.ndarray], pick: np.ndarray,
                     args: argparse.Namespace) -> dict[str, Any]:
    """Clean accuracy on all of ``test``; strong L-inf accuracy with the evaluation's sanity
    checks (eps/2, eps, 2 eps) and ROA accuracy on ``test[pick]``."""
    import torch

    from cloud_train.evaluate import eval_tensors
    from cloud_train.roa import roa
    from cloud_train.robust_eval import sanity_checks, strong_evaluate

    x, y, _ = eval_tensors(model, *test)
    with torch.no_grad():
        clean = float(torch.cat([model(x[i:i + 512]).argmax(1) == y[i:i + 512]
                                 for i in range(0, len(x), 512)]).float().mean())
    xs, ys = x[pick], y[pick]
    strong = strong_evaluate(model, xs, ys, eps=args.eps, apgd_steps=args.apgd_steps,
                             square_queries=args.square_queries, seed=args.seed)
    t = time.perf_counter()
    sanity = sanity_checks(model, xs, ys, [args.eps / 2, args.eps, min(1.0, 2 * args.eps)],
                           square_queries=args.square_queries, seed=args.seed)
    sanity_s = time.perf_counter() - t
    t = time.perf_counter()
    hits = 0
    for i in range(0, len(xs), 256):
        xb, yb = xs[i:i + 256], ys[i:i + 256]
        x_adv = roa(model, xb, yb, height=args.roa_size, width=args.roa_size,
                    stride=args.roa_stride, candidates=args.roa_candidates, steps=args.roa_steps)
        with torch.no_grad():
            hits += int((model(x_adv).argmax(1) == yb).sum())
    return {"clean_acc": clean, "eval_clean_acc": strong["clean_acc"],
            "robust_acc": strong["robust_acc"],
            **{f"{a}_acc": strong[f"{a}_acc"] for a in strong["attacks"]},
            "roa_acc": hits / len(ys), "strong_eval_seconds": strong["seconds"],
            "sanity": sanity, "sanity_passed": sanity["all_passed"],
            "sanity_seconds": sanity_s, "roa_eval_seconds": time.perf_counter() - t}


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def table_md(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| trainer | s/epoch | cost vs standard | step cost vs standard | clean % | "
           "clean % (eval set) | "
           "robust % (strong) | APGD-CE % | APGD-DLR % | Square % | sticker (ROA) % | "
           "kept epoch | sanity checks |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ratio = "-" if r["cost_ratio"] is None else f"{r['cost_ratio']:.2f}x"
        step = "-" if r["step_ratio"] is None else f"{r['step_ratio']:.2f}x"
        out.append(f"| {r['trainer']} | {r['seconds_per_epoch']:.2f} | {ratio} | {step} | "
                   f"{pct(r['clean_acc'])} | {pct(r['eval_clean_acc'])} | {pct(r['robust_acc'])} | "
                   f"{pct(r.get('apgd_ce_acc'))} "
                   f"| {pct(r.get('apgd_dlr_acc'))} | {pct(r.get('square_acc'))} | "
                   f"{pct(r['roa_acc'])} | {r['kept_epoch']} | {sanity_cell(r)} |")
    return out


def sanity_cell(row: dict[str, Any]) -> str:
    """'pass', or the names of the failed checks (a robust figure not worth quoting)."""
    checks = row.get("sanity")
    if checks is None:
        return "-"
    failed = [k for k, v in checks.items() if isinstance(v, dict) and not v["passed"]]
    return "pass" if not failed else "FAIL: " + ", ".join(failed)


def verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's target on the best robust model (highest strong robust accuracy); a
    model whose evaluation failed a sanity check cannot meet it."""
    best = max(rows, key=lambda r: (r["robust_acc"], r["clean_acc"]))
    met = [r["trainer"] for r in rows
           if r["robust_acc"] >= TARGET_ROBUST and r["clean_acc"] >= TARGET_CLEAN
           and r.get("sanity_passed", False)]
    return {"best_robust_trainer": best["trainer"], "best_robust_acc": best["robust_acc"],
            "best_clean_acc": best["clean_acc"], "target_met": bool(met),
            "trainers_meeting_target": met,
            "target": f"robust >= {TARGET_ROBUST:.0%} with clean >= {TARGET_CLEAN:.0%}"}


def verdict_text(v: dict[str, Any]) -> str:
    """One line: which trainers meet the target, then the highest robust accuracy (which may
    belong to a model below the clean bar)."""
    met = v["trainers_meeting_target"]
    return (f"Target ({v['target']}): {'met by ' + ', '.join(met) if met else 'not met'}; "
            f"highest robust accuracy: {v['best_robust_trainer']} (robust "
            f"{pct(v['best_robust_acc'])} %, clean {pct(v['best_clean_acc'])} %)")


def report_md(result: dict[str, Any]) -> str:
    a, v = result["args"], result["verdict"]
    lines = [
        "# Robust training benchmark", "",
        f"{a['per_class']} train / {a['test_per_class']} test images per class, 14 synthetic "
        f"classes, {a['size']} px, {a['arch']}, {a['epochs']} epochs, seed {a['seed']}, "
        f"device {result['device']} ({result['torch_threads']} torch threads). Strong robust "
        "accuracy: worst case over APGD-CE, APGD-DLR "
        f"({a['apgd_steps']} steps) and Square ({a['square_queries']} queries) at L-inf "
        f"{a['eps']:.4f} ({a['eps'] * 255:.1f}/255) on {result['n_eval']} test images; sticker: "
        f"ROA {a['roa_size']} x {a['roa_size']} px, {a['roa_steps']} steps, same images "
        "(\"eval set\"; clean % is on the whole test set). "
        "Cost: seconds of one epoch's optimisation pass, as a ratio to standard in this run; "
        f"step cost: the fastest of {a['step_repeats']} timed steps on one batch (attack, "
        "forward, backward), the same ratio with little of the noise of busy, shared cores.",
        "", *table_md(result["rows"]), "",
        verdict_text(v) + ".", "", "![clean vs robust](robust_training.png)", "",
        f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def chart_png(rows: list[dict[str, Any]], eps: float) -> bytes:
    from matplotlib.figure import Figure  # Agg canvas, no pyplot global state

    fig = Figure(figsize=(2.0 * len(rows) + 2.0, 4.2), dpi=110)
    ax = fig.add_subplot()
    xpos = np.arange(len(rows))
    series = [("clean", "clean_acc", "#1565c0"),
              (f"robust (strong, {eps * 255:.0f}/255)", "robust_acc", "#c62828"),
              ("sticker (ROA)", "roa_acc", "#f9a825")]
    for k, (label, key, colour) in enumerate(series):
        bars = ax.bar(xpos + (k - 1) * 0.27, [100 * r[key] for r in rows], 0.27, label=label,
                      color=colour)
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    names = [r["trainer"] + ("" if r["cost_ratio"] is None else
                             f"\ncost {r['cost_ratio']:.1f}x epoch, {r['step_ratio']:.1f}x step")
             for r in rows]
    ax.set_xticks(xpos, names, fontsize=8)
    ax.axhline(100 * TARGET_ROBUST, color="#c62828", linestyle="--", linewidth=0.8)
    ax.axhline(100 * TARGET_CLEAN, color="#1565c0", linestyle="--", linewidth=0.8)
    ax.set_ylim(0, 112)
    ax.set_ylabel("accuracy %  (dashed: targets)")
    ax.legend(fontsize=8, loc="upper right", ncol=3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = ap.add_argument
    add("--per-class", type=int, default=100, help="training images per class")
    add("--test-per-class", type=int, default=20)
    add("--val-per-class", type=int, default=10, help="guard / validation images per class")
    add("--epochs", type=int, default=2)
    add("--arch", default="signnet")
    add("--size", type=int, default=32)
    add("--trainers", default=ALL_TRAINERS, help="comma-separated trainer names")
    add("--seed", type=int, default=0)
    add("--out", default="runs/bench_robust")
    add("--batch-size", type=int, default=128)
    add("--lr", type=float, default=0.05)
    add("--eps", type=parse_eps, default=8 / 255, help="L-inf radius, e.g. 8/255")
    add("--eps-warmup-epochs", type=int, default=0)
    add("--pgd-steps", type=int, default=7, help="inner steps of pgd_at, trades and roa")
    add("--trades-beta", type=float, default=6.0)
    add("--n-eval", type=int, default=200, help="test images under the strong and ROA attacks")
    add("--apgd-steps", type=int, default=20)
    add("--square-queries", type=int, default=200)
    add("--roa-size", type=int, default=7, help="sticker side in pixels (train and eval)")
    add("--roa-stride", type=int, default=2)
    add("--roa-candidates", type=int, default=10)
    add("--roa-steps", type=int, default=30, help="PGD steps of the evaluation sticker")
    add("--step-repeats", type=int, default=3, help="timed steps per trainer (best kept)")
    add("--device", default="auto")
    return ap


def main() -> int:
    args = build_parser().parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout)
    logging.getLogger("cloud_train.train").setLevel(logging.INFO)  # one line per epoch

    import torch

    from cloud_train.checkpoint import save_checkpoint
    from cloud_train.models import create_model
    from cloud_train.roa import check_rectangle
    from cloud_train.signs import SYNTHETIC_CLASSES
    from cloud_train.tensors import make_loader
    from cloud_train.train import TrainConfig, list_trainers, train
    from roadshield_base.errors import ConfigError, RoadshieldError
    from roadshield_base.fileio import atomic_write_bytes, atomic_write_json

    try:
        trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
        unknown = [t for t in trainers if t not in list_trainers()]
        if unknown or not trainers:
            raise ConfigError(f"unknown or no trainers {unknown or trainers!r}",
                              f"choose from: {', '.join(list_trainers())}")
        for name, v, low in (("--per-class", args.per_class, 1), ("--test-per-class",
                             args.test_per_class, 1), ("--val-per-class", args.val_per_class, 1),
                             ("--n-eval", args.n_eval, 1), ("--step-repeats",
                             args.step_repeats, 1)):
            if v < low:
                raise ConfigError(f"{name} {v} is below {low}", f"use {name} {low} or more")
        # every config is built (and checked) before the first long step
        configs = {t: TrainConfig(trainer=t, epochs=args.epochs, batch_size=args.batch_size,
                                  lr=args.lr, eps=args.eps, seed=args.seed, device=args.device,
                                  eps_warmup_epochs=args.eps_warmup_epochs,
                                  pgd_steps=args.pgd_steps, trades_beta=args.trades_beta,
                                  roa_height=args.roa_size, roa_width=args.roa_size,
                                  roa_stride=args.roa_stride, roa_candidates=args.roa_candidates)
                   for t in trainers}
        create_model(args.arch, 14, input_size=args.size)  # arch and size, checked up front
        check_rectangle(args.roa_size, args.roa_size, args.roa_stride, args.roa_candidates,
                        (args.size, args.size))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        train_set = render(args.per_class, "train", args.seed, args.size)
        val_set = render(args.val_per_class, "train", args.seed, args.size, first=args.per_class)
        test_set = render(args.test_per_class, "test", args.seed, args.size)
        print(f"rendered {len(train_set[1])} train / {len(val_set[1])} val / "
              f"{len(test_set[1])} test images in {time.perf_counter() - t0:.1f} s", flush=True)
        pick = np.sort(np.random.default_rng(args.seed).permutation(len(test_set[1]))
                       [:args.n_eval])
        # its own loader: drawing from the training loader would shift its shuffling
        timing_batch = next(iter(make_loader(*train_set, batch_size=args.batch_size,
                                             shuffle=True, augment=True, seed=args.seed)))
        rows: list[dict[str, Any]] = []
        device = "cpu"
        for name in trainers:
            torch.manual_seed(args.seed)  # the same initial weights for every trainer
            model = create_model(args.arch, 14, input_size=args.size)
            loader = make_loader(*train_set, batch_size=args.batch_size, shuffle=True,
                                 augment=True, seed=args.seed)
            step_s = step_seconds(model, configs[name], timing_batch, args.step_repeats)
            t = time.perf_counter()
            history = train(model, loader, configs[name], val=val_set, progress=False)
            train_s = time.perf_counter() - t
            device = history.device
            # kept, so a figure can be checked again later (roadshield eval --strong)
            ckpt = out / f"{name}.pt"
            digest = save_checkpoint(model, ckpt, {"class_names": list(SYNTHETIC_CLASSES),
                                                   "train_config": configs[name]})
            metrics = evaluate_trainer(model, test_set, pick, args)
            rows.append({"trainer": name, "seconds_per_epoch": history.seconds_per_epoch,
                         "train_seconds": train_s, "kept_epoch": history.kept_epoch,
                         "step_seconds": step_s, "cost_ratio": None, "step_ratio": None,
                         "checkpoint": str(ckpt), "checkpoint_sha256": digest,
                         **metrics, "history": history.to_dict()})
            print(f"{name}: {history.seconds_per_epoch:.2f} s/epoch, clean "
                  f"{pct(metrics['clean_acc'])} %, robust {pct(metrics['robust_acc'])} %, "
                  f"sticker {pct(metrics['roa_acc'])} %", flush=True)
        std = next((r for r in rows if r["trainer"] == "standard"), None)
        for r in rows:
            if std is not None:
                r["cost_ratio"] = r["seconds_per_epoch"] / std["seconds_per_epoch"]
                r["step_ratio"] = r["step_seconds"] / std["step_seconds"]
        result: dict[str, Any] = {
            "schema": "roadshield.bench.robust_training/v1", "args": vars(args),
            "command": " ".join(["python", *sys.argv]), "device": device, "n_eval": len(pick),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "rows": rows,
            "verdict": verdict(rows), "seconds": time.perf_counter() - t0}
        atomic_write_json(out / "robust_training.json", result)
        atomic_write_bytes(out / "robust_training.md", report_md(result).encode())
        atomic_write_bytes(out / "robust_training.png", chart_png(rows, args.eps))
    except RoadshieldError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print()
    print("\n".join(table_md(rows)))
    v = result["verdict"]
    print("\n" + verdict_text(v))
    print(f"wrote {out / 'robust_training.json'}, .md, .png in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
