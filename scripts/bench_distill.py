#!/usr/bin/env python3
"""Robust distillation benchmark: the student distilled from a robust teacher (RSLAD, ARD,
KD) against the teacher and against the same student trained alone (fast_at, pgd_at).

Usage: python scripts/bench_distill.py --out runs/bench_distill [--data GTSRB_DIR]
           [--teacher CKPT | --teacher-trainer fast_at --teacher-epochs 10]
           [--student signnet_mobile] [--methods rslad,ard,kd] [--alone fast_at,pgd_at]
           [--epochs 10] [--eps 8/255] [--per-class 300] [--n-eval 200]
           [--apgd-steps 20] [--square-queries 200] [--seed 0] [--warm-start]

Without --data it renders the synthetic signs (``--per-class`` train images per class) into
OUT/data; without --teacher it trains one (signnet, --teacher-trainer). Every student
starts from the same seed and sees the same data order and schedule; with --warm-start
the distilled students instead start from the weights of the student trained alone. Per
model: parameters, seconds per training epoch, clean accuracy on the whole test split, and
on a seeded ``--n-eval`` subset the PGD-10 accuracy and the strong evaluation's worst case
over APGD-CE, APGD-DLR and Square at ``--eps`` with its sanity checks. Writes OUT/distill.json and
OUT/distill.md and prints the table. A finished model is kept (OUT/<name>.safetensors) and
not retrained when the script runs again. Threads: OMP_NUM_THREADS (default 2).
"""

from __future__ import annotations

import os

_threads = os.environ.setdefault("OMP_NUM_THREADS", "2")
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, _threads)

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

log = logging.getLogger("bench_distill")


def _eps(text: str) -> float:
    num, _, den = text.partition("/")
    return float(num) / float(den) if den else float(num)


def _train(name: str, out: Path, data: Path, arch: str, trainer: str, args: argparse.Namespace,
           teacher: Path | None = None, init: Path | None = None) -> tuple[Path, float]:
    """Train (or reuse) OUT/<name>.safetensors; return it and its seconds per epoch."""
    from cloud_train import pipeline

    ckpt = out / f"{name}.safetensors"
    record = out / f"{name}.train.json"
    if ckpt.is_file() and record.is_file():
        log.info("%s: reusing %s", name, ckpt)
        return ckpt, float(json.loads(record.read_text())["seconds_per_epoch"])
    options: dict[str, Any] = {"pgd_steps": args.pgd_steps}
    if trainer in ("kd", "ard"):
        options.update(kd_temperature={"kd": 4.0, "ard": 30.0}[trainer],
                       kd_alpha={"kd": 0.9, "ard": 1.0}[trainer])
    epochs = args.teacher_epochs if name == "teacher" else args.epochs
    state = out / f"{name}.trainstate"  # an interrupted run resumes from its last epoch
    log.info("%s: training %s with %s for %d epochs", name, arch, trainer, epochs)
    result = pipeline.train_checkpoint(data, ckpt, arch=arch, trainer=trainer, epochs=epochs,
                                       batch_size=args.batch_size, lr=args.lr, eps=args.eps,
                                       eps_warmup_epochs=min(2, epochs), seed=args.seed,
                                       device="cpu", state_path=state,
                                       resume=state if state.is_file() else None,
                                       trainer_options=options, teacher=teacher,
                                       init=init, progress=False)
    seconds = float(result.history["seconds_per_epoch"])
    record.write_text(json.dumps({"seconds_per_epoch": seconds, "trainer": trainer}))
    return ckpt, seconds


def _measure(name: str, ckpt: Path, trainer: str, seconds: float, data: Path,
             args: argparse.Namespace) -> dict[str, Any]:
    from cloud_train import pipeline
    from cloud_train.checkpoint import load_checkpoint
    from cloud_train.models import count_parameters

    model, meta = load_checkpoint(ckpt)
    clean = pipeline.evaluate_checkpoint(ckpt, data, eps=args.eps)
    strong = pipeline.evaluate_checkpoint(ckpt, data, eps=args.eps, strong=True,
                                          limit=args.n_eval, apgd_steps=args.apgd_steps,
                                          square_queries=args.square_queries)
    s = strong["strong_eval"]
    return {"name": name, "arch": meta["arch"], "trainer": trainer,
            "parameters": count_parameters(model), "seconds_per_epoch": seconds,
            "clean_acc": clean["clean_acc"], "pgd_acc": strong["pgd_acc"],
            "robust_acc": s["strong"]["robust_acc"], "n_eval": s["strong"]["n"],
            "sanity_passed": s["sanity"]["all_passed"]}


def _table(rows: list[dict[str, Any]], eps: float) -> str:
    head = (f"| model | arch | trainer | params | s/epoch | clean % | PGD-10 % | "
            f"worst case % (APGD-CE, APGD-DLR, Square at {eps * 255:.0f}/255) | sanity |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['name']} | {r['arch']} | {r['trainer']} | {r['parameters']:,} | "
                     f"{r['seconds_per_epoch']:.1f} | {100 * r['clean_acc']:.1f} | "
                     f"{100 * r['pgd_acc']:.1f} | {100 * r['robust_acc']:.1f} | "
                     f"{'pass' if r['sanity_passed'] else 'FAIL'} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--data", default=None)
    parser.add_argument("--teacher", default=None)
    parser.add_argument("--teacher-trainer", default="fast_at")
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--student", default="signnet_mobile")
    parser.add_argument("--methods", default="rslad,ard,kd")
    parser.add_argument("--alone", default="fast_at,pgd_at")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--eps", type=_eps, default=8 / 255)
    parser.add_argument("--pgd-steps", type=int, default=5)
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--n-eval", type=int, default=200)
    parser.add_argument("--apgd-steps", type=int, default=20)
    parser.add_argument("--square-queries", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warm-start", action="store_true",
                        help="each distilled student starts from the same student trained "
                             "alone with the first --alone trainer (named student_M_warm)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    torch.set_num_threads(int(_threads))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.data is None:
        from cloud_train import pipeline

        data = out / "data" / "gtsrb"
        if not data.is_dir():
            pipeline.synth_dataset(out / "data", args.per_class, max(20, args.per_class // 5),
                                   seed=args.seed)
    else:
        data = Path(args.data)
    import distill.robust_distill  # noqa: F401  (registers kd, ard and rslad)

    start = time.time()
    runs: list[tuple[str, Path, str, float]] = []
    if args.teacher:
        teacher = Path(args.teacher)
        runs.append(("teacher", teacher, "given", float("nan")))
    else:
        teacher, secs = _train("teacher", out, data, "signnet", args.teacher_trainer, args)
        runs.append(("teacher", teacher, args.teacher_trainer, secs))
    alone = []
    for trainer in filter(None, args.alone.split(",")):
        ckpt, secs = _train(f"alone_{trainer}", out, data, args.student, trainer, args)
        alone.append((f"alone_{trainer}", ckpt, trainer, secs))
    if args.warm_start and not alone:
        parser.error("--warm-start needs a student trained alone (--alone)")
    init, suffix = (alone[0][1], "_warm") if args.warm_start else (None, "")
    for method in filter(None, args.methods.split(",")):
        name = f"student_{method}{suffix}"
        ckpt, secs = _train(name, out, data, args.student, method, args, teacher, init)
        runs.append((name, ckpt, method, secs))
    runs += alone
    rows = [_measure(name, ckpt, trainer, secs, data, args) for name, ckpt, trainer, secs in runs]
    table = _table(rows, args.eps)
    report = {"rows": rows, "eps": args.eps, "epochs": args.epochs, "seed": args.seed,
              "warm_start": args.warm_start,
              "data": str(data), "seconds": time.time() - start}
    (out / "distill.json").write_text(json.dumps(report, indent=2))
    (out / "distill.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
