#!/usr/bin/env python3
"""INT8-vs-float benchmark: accuracy, strong robust accuracy, sticker success and latency of
the Q/DQ INT8 models against the float model, all run with ONNX Runtime on the CPU.

Usage: python scripts/bench_int8.py --checkpoint CKPT --data GTSRB_DIR --out OUT
           [--n-eval 200] [--eps 8/255] [--apgd-steps 20] [--square-queries 200]
           [--sticker-steps 150] [--seed 0] [--latency-runs 200]

The checkpoint is exported to ONNX (OUT/model.onnx, checked against torch) and quantised
twice with ``distill.quantize.quantize_from_dataset`` (calibration on the train split):
with the stem convolution in float, the default (OUT/model.int8.onnx), and with everything
quantised (OUT/model.int8-all.onnx). For each of the three models:

- clean accuracy on the whole test split and top-1 agreement with the float model;
- on a seeded ``--n-eval`` test subset at L-inf ``--eps``: APGD-CE and APGD-DLR on each
  model itself (white-box on the float model; on the INT8 graphs, which have no gradients,
  straight-through: the INT8 logits forward, the float model's gradient backward), the
  float model's APGD examples transferred, Square run against each model through ONNX
  Runtime, and the per-example worst case over all of them;
- the success of a printable sticker ("stop" -> "priority_road", optimised white-box on
  the float torch model as the demo does) on a held-out pool of views, when the
  checkpoint was trained on the synthetic sign classes;
- latency: median and p90 ms per call at batch 1 and 64, 1 and 2 intra-op threads, after
  warm-up, the models called in turn so that background load falls on all of them alike.

Writes OUT/int8.json (every figure, the command, the models' sha256, library versions,
the CPU) and OUT/int8.md, prints the tables and the issue's targets (INT8 clean accuracy
within 1 point of float, worst-case robust accuracy within 2 points) as met / missed per
INT8 model. Exit 0 whatever the figures; 2 for bad input (missing checkpoint or data,
classes that differ, a checkpoint whose input is not 3 x S x S). Threads for the
attacks: OMP_NUM_THREADS (default 2).
"""

from __future__ import annotations

import os

_threads = os.environ.setdefault("OMP_NUM_THREADS", "2")
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, _threads)

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

log = logging.getLogger("bench_int8")

MODELS = {"float": "float", "int8": "INT8 (stem float)", "int8_all": "INT8 (all)"}
FILES = {"float": "model.onnx", "int8": "model.int8.onnx", "int8_all": "model.int8-all.onnx"}
INT8 = ("int8", "int8_all")
STICKER_SIGN, STICKER_TARGET = "stop", "priority_road"
# the demo's "quick" profile (roadshield/demo.py) apart from the number of steps
STICKER_OPTIONS = {"positions": 4, "pool": 96, "eval_pool": 64}
CLEAN_LIMIT_POINTS, ROBUST_LIMIT_POINTS = 1.0, 2.0
THREADS, BATCHES = (1, 2), (1, 64)
ATTACK_BATCH = 256


class BadInput(Exception):
    """An input the benchmark cannot measure; the message says which and why."""


class OrtModule(nn.Module):
    """An ONNX Runtime session as a torch module returning the logits (output 0). No
    gradients flow through it: gradient-free attacks (Square) query the ONNX model itself."""

    def __init__(self, session: Any) -> None:
        super().__init__()
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.output_name = session.get_outputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run([self.output_name],
                                                 {self.input_name: batch})[0])


class StraightThrough(nn.Module):
    """BPDA for a quantised model (Athalye et al. 2018): the forward pass returns the ONNX
    model's logits, the backward pass the float torch model's gradient, so APGD attacks
    the INT8 model white-box with quantisation treated as the identity."""

    def __init__(self, onnx_model: OrtModule, float_model: nn.Module) -> None:
        super().__init__()
        self.onnx_model, self.float_model = onnx_model, float_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        approx = self.float_model(x)
        return approx + (self.onnx_model(x) - approx).detach()


def session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _eps(text: str) -> float:
    num, _, den = text.partition("/")
    return float(num) / float(den) if den else float(num)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def check_inputs(checkpoint: Path, data: Path) -> tuple[nn.Module, dict[str, Any], Any]:
    """Load the checkpoint and the test split, or raise BadInput with one clear message."""
    from cloud_train.checkpoint import load_checkpoint
    from cloud_train.gtsrb import load_gtsrb, locate_gtsrb
    from roadshield_base.errors import RoadshieldError

    if not checkpoint.is_file():
        raise BadInput(f"checkpoint {checkpoint} does not exist")
    if not data.is_dir():
        raise BadInput(f"dataset folder {data} does not exist")
    try:
        model, meta = load_checkpoint(checkpoint)
    except RoadshieldError as err:
        raise BadInput(f"cannot load checkpoint {checkpoint}: {err}") from err
    c, h, w = meta["input_size"]
    if c != 3 or h != w:
        raise BadInput(f"checkpoint {checkpoint} takes {c} x {h} x {w} inputs; the ONNX "
                       "edge contract is 3 x S x S (square RGB)")
    try:
        if locate_gtsrb(data).train_dir is None:
            raise BadInput(f"{data} has no train split to calibrate the INT8 models on")
        test = load_gtsrb(data, "test", size=h, progress=False)
    except RoadshieldError as err:
        raise BadInput(f"cannot read the test split of {data}: {err}") from err
    if tuple(test.class_names) != tuple(meta["class_names"]):
        raise BadInput(f"{data} names other classes than {checkpoint}: "
                       f"{list(test.class_names)} vs {list(meta['class_names'])}")
    return model, meta, test


def build_models(checkpoint: Path, data: Path, out: Path, seed: int) -> dict[str, Any]:
    """Export the float model and write both INT8 models; their files and figures."""
    from cloud_train import pipeline
    from distill.quantize import quantize_from_dataset

    exported = pipeline.export_checkpoint(checkpoint, out / FILES["float"], seed=seed)
    models: dict[str, Any] = {"float": {"parity_max_abs": exported.parity_max_abs}}
    for name, float_stem in (("int8", True), ("int8_all", False)):
        log.info("quantising %s", MODELS[name])
        report = quantize_from_dataset(exported.onnx, out / FILES[name], data, seed=seed,
                                       progress=False, float_stem=float_stem)
        models[name] = {"float_stem": float_stem, "quantize_report": report.to_dict()}
    for name, entry in models.items():
        path = out / FILES[name]
        entry.update(path=str(path), sha256=_sha256(path), bytes=path.stat().st_size)
    return models


def logits(module: nn.Module, x: torch.Tensor, batch: int = ATTACK_BATCH) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([module(x[i:i + batch]) for i in range(0, len(x), batch)])


def clean_figures(modules: dict[str, nn.Module], x: torch.Tensor,
                  y: torch.Tensor) -> dict[str, Any]:
    preds = {name: logits(m, x).argmax(1) for name, m in modules.items()}
    return {"n": len(y), **{name: {"acc": float((p == y).float().mean()),
                                   "agreement": float((p == preds["float"]).float().mean())}
                            for name, p in preds.items()}}


def _batched(attack: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
             y: torch.Tensor) -> torch.Tensor:
    return torch.cat([attack(x[i:i + ATTACK_BATCH], y[i:i + ATTACK_BATCH])
                      for i in range(0, len(x), ATTACK_BATCH)])


def robust_figures(torch_model: nn.Module, modules: dict[str, nn.Module], x: torch.Tensor,
                   y: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """Per model: clean, APGD-CE and APGD-DLR on the model itself (white-box on the float
    model, straight-through on the INT8 ones), the same two transferred from the float
    model, Square on the model itself, and the per-example worst case over all of them; an
    example counts only if clean-correct."""
    from cloud_train.strong_attacks import apgd, square

    eps, steps, seed = args.eps, args.apgd_steps, args.seed

    def apgd_on(model: nn.Module, loss: str) -> torch.Tensor:
        return _batched(lambda xb, yb: apgd(model, xb, yb, eps, steps, loss, 1, seed), x, y)

    t0 = time.perf_counter()
    transferred = {loss: apgd_on(torch_model, loss) for loss in ("ce", "dlr")}
    log.info("APGD-CE and APGD-DLR on the float torch model: %.1f s", time.perf_counter() - t0)
    rows: dict[str, Any] = {}
    for name, module in modules.items():
        t0 = time.perf_counter()
        advs = {"transfer_apgd_ce": transferred["ce"], "transfer_apgd_dlr": transferred["dlr"]}
        if name == "float":  # its own white-box attack is the transferred one
            advs.update(apgd_ce=transferred["ce"], apgd_dlr=transferred["dlr"])
        else:
            bpda = StraightThrough(module, torch_model)  # type: ignore[arg-type]
            advs.update(apgd_ce=apgd_on(bpda, "ce"), apgd_dlr=apgd_on(bpda, "dlr"))
        advs["square"] = _batched(lambda xb, yb, m=module: square(
            m, xb, yb, eps, args.square_queries, seed=seed), x, y)
        ok = {"clean": logits(module, x).argmax(1) == y}
        for attack, adv in advs.items():
            ok[attack] = ok["clean"] & (logits(module, adv).argmax(1) == y)
        worst = ok["clean"].clone()
        for attack in advs:
            worst &= ok[attack]
        ok["worst"] = worst
        rows[name] = {f"{k}_acc": float(v.float().mean()) for k, v in ok.items()}
        log.info("%s: attacks and evaluation %.1f s", MODELS[name], time.perf_counter() - t0)
    return {"n": len(y), "eps": eps, "apgd_steps": steps, "square_queries": args.square_queries,
            "seed": seed, "note": "APGD-CE and APGD-DLR attack each model itself: white-box on "
            "the float model, and on the INT8 graphs (which have no gradients) straight-through "
            "(BPDA: the INT8 model's logits forward, the float model's gradient backward); the "
            "float model's APGD examples are also transferred to the INT8 models, and Square "
            "(gradient-free) queries each model through ONNX Runtime. The worst case is over "
            "all of them.", "models": rows}


def sticker_figures(torch_model: nn.Module, modules: dict[str, nn.Module],
                    class_names: Sequence[str], args: argparse.Namespace) -> dict[str, Any]:
    """The demo's sticker optimised on the float torch model, measured on every model."""
    from cloud_train.signs import SYNTHETIC_CLASSES
    from cloud_train.sticker.eot import EotPool
    from cloud_train.sticker.optimise import (
        StickerConfig,
        measure,
        optimise_sticker,
        torch_predictor,
    )

    base = {"sign": STICKER_SIGN, "target": STICKER_TARGET, "steps": args.sticker_steps}
    missing = [c for c in (STICKER_SIGN, STICKER_TARGET) if c not in class_names]
    if missing:
        return {**base, "applicable": False,
                "reason": f"the checkpoint's classes do not include {' and '.join(missing)}"}
    if tuple(class_names) != SYNTHETIC_CLASSES:
        return {**base, "applicable": False,
                "reason": "the sticker's views are rendered from the synthetic sign classes; "
                          "the checkpoint names other classes (or another order)"}
    sign, target = SYNTHETIC_CLASSES.index(STICKER_SIGN), SYNTHETIC_CLASSES.index(STICKER_TARGET)
    cfg = StickerConfig(sign=sign, target=target, seed=args.seed, steps=args.sticker_steps,
                        search_steps=min(30, args.sticker_steps), **STICKER_OPTIONS)
    t0 = time.perf_counter()
    result = optimise_sticker(torch_model, cfg, progress=_every(50))
    log.info("sticker optimised in %.1f s", time.perf_counter() - t0)
    size = int(torch_model.input_size[-1])  # type: ignore[index]
    # the same held-out views optimise_sticker measures on, never optimised on
    held_out = EotPool(sign, cfg.eval_pool, seed=cfg.seed + 1000, input_size=size,
                       jpeg_p=cfg.jpeg_p)
    measured = {name: measure(torch_predictor(m), held_out, result.colours, result.mask, sign,
                              target, seed=cfg.seed) for name, m in modules.items()}
    return {**base, "applicable": True, "options": STICKER_OPTIONS,
            "float_torch": result.summary(), "models": measured}


def _every(n: int) -> Callable[[int, int, float], None]:
    """A sticker progress callback that logs every ``n`` steps and the last."""
    def report(step: int, steps: int, loss: float) -> None:
        if step % n == 0 or step == steps:
            log.info("sticker step %d/%d, loss %.3f", step, steps, loss)
    return report


def _stats(times: list[float]) -> dict[str, float]:
    ms = np.array(times) * 1000
    return {"median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90))}


def latency_figures(paths: dict[str, Path], side: int, runs: int,
                    seed: int) -> dict[str, Any]:
    warmup = max(5, runs // 10)
    rng = np.random.default_rng(seed)
    rows = []
    load_before = os.getloadavg()
    for threads in THREADS:
        sessions = {name: session(p, threads) for name, p in paths.items()}
        for batch in BATCHES:
            x = rng.random((batch, 3, side, side), dtype=np.float32)
            feeds = {name: (s, {s.get_inputs()[0].name: x}) for name, s in sessions.items()}
            times: dict[str, list[float]] = {name: [] for name in sessions}
            for i in range(warmup + runs):
                # in turn, so that load from other processes falls on every model alike
                for name, (sess, feed) in feeds.items():
                    t0 = time.perf_counter()
                    sess.run(None, feed)
                    if i >= warmup:
                        times[name].append(time.perf_counter() - t0)
            stats = {name: _stats(t) for name, t in times.items()}
            for name, s in stats.items():
                rows.append({"model": name, "threads": threads, "batch": batch, **s,
                             "ratio_to_float": s["median_ms"] / stats["float"]["median_ms"]})
    return {"runs": runs, "warmup": warmup, "provider": "CPUExecutionProvider",
            "load_average_before": list(load_before),
            "load_average_after": list(os.getloadavg()), "rows": rows}


def targets(clean: dict[str, Any], robust: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets per INT8 model: drops in points against the float model."""
    out = {}
    rob = robust["models"]
    for name in INT8:
        drop_clean = 100 * (clean["float"]["acc"] - clean[name]["acc"])
        drop_robust = 100 * (rob["float"]["worst_acc"] - rob[name]["worst_acc"])
        out[name] = {
            "clean": {"drop_points": drop_clean, "limit_points": CLEAN_LIMIT_POINTS,
                      "met": drop_clean <= CLEAN_LIMIT_POINTS},
            "robust_worst_case": {"drop_points": drop_robust,
                                  "limit_points": ROBUST_LIMIT_POINTS,
                                  "met": drop_robust <= ROBUST_LIMIT_POINTS}}
    return out


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def _clean_table(clean: dict[str, Any], models: dict[str, Any]) -> list[str]:
    lines = [f"### Clean accuracy (whole test split, {clean['n']} images, ONNX Runtime CPU)", "",
             "| model | clean % | top-1 agreement with float % | file KiB |", "|---|---|---|---|"]
    return lines + [f"| {MODELS[n]} | {_pct(clean[n]['acc'])} | {_pct(clean[n]['agreement'])} | "
                    f"{models[n]['bytes'] / 1024:.0f} |" for n in MODELS]


def _robust_table(robust: dict[str, Any]) -> list[str]:
    lines = [f"### Strong robust accuracy ({robust['n']} test images, L-inf eps "
             f"{robust['eps'] * 255:.0f}/255, APGD {robust['apgd_steps']} steps, Square "
             f"{robust['square_queries']} queries)", "",
             "| model | clean % | APGD-CE % | APGD-DLR % | transferred CE / DLR % | Square % "
             "| worst case % |", "|---|---|---|---|---|---|---|"]
    for n in MODELS:
        r = robust["models"][n]
        lines.append(f"| {MODELS[n]} | {_pct(r['clean_acc'])} | {_pct(r['apgd_ce_acc'])} | "
                     f"{_pct(r['apgd_dlr_acc'])} | {_pct(r['transfer_apgd_ce_acc'])} / "
                     f"{_pct(r['transfer_apgd_dlr_acc'])} | {_pct(r['square_acc'])} | "
                     f"{_pct(r['worst_acc'])} |")
    return [*lines, "", robust["note"]]


def _sticker_table(sticker: dict[str, Any]) -> list[str]:
    lines = [f"### Sticker ({sticker['sign']} -> {sticker['target']}, {sticker['steps']} steps, "
             "optimised on the float torch model)", ""]
    if not sticker["applicable"]:
        return [*lines, f"not applicable: {sticker['reason']}"]
    lines += ["| model | success % | confident % | clean control % | views |",
              "|---|---|---|---|---|"]
    return lines + [f"| {MODELS[n]} | {_pct(s['success'])} | {_pct(s['confident'])} | "
                    f"{_pct(s['clean_success'])} | {s['views']} |"
                    for n, s in sticker["models"].items()]


def _latency_table(lat: dict[str, Any]) -> list[str]:
    load = ", ".join(f"{v:.1f}" for v in lat["load_average_before"])
    names = [*MODELS.values(), *(f"{MODELS[n]} / float" for n in INT8)]
    lines = [f"### Latency (ms per call, median / p90 of {lat['runs']} calls, ONNX Runtime "
             f"CPU; load average {load} when it began)", "",
             "| threads | batch | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]
    for threads in THREADS:
        for batch in BATCHES:
            rows = {r["model"]: r for r in lat["rows"]
                    if r["threads"] == threads and r["batch"] == batch}
            cells = [f"{rows[n]['median_ms']:.3f} / {rows[n]['p90_ms']:.3f}" for n in MODELS]
            cells += [f"{rows[n]['ratio_to_float']:.2f}" for n in INT8]
            lines.append(f"| {threads} | {batch} | " + " | ".join(cells) + " |")
    return lines


def _target_lines(targets: dict[str, Any]) -> list[str]:
    lines = ["### Targets (against the float model)", ""]
    for n, t in targets.items():
        c, r = t["clean"], t["robust_worst_case"]
        lines.append(f"- {MODELS[n]}: clean drop {c['drop_points']:+.1f} points (limit "
                     f"{c['limit_points']:.0f}): {'met' if c['met'] else 'MISSED'}; worst-case "
                     f"robust drop {r['drop_points']:+.1f} points (limit "
                     f"{r['limit_points']:.0f}): {'met' if r['met'] else 'MISSED'}")
    return lines


def tables(report: dict[str, Any]) -> str:
    parts = [_clean_table(report["clean"], report["models"]), _robust_table(report["robust"]),
             _sticker_table(report["sticker"]), _latency_table(report["latency"]),
             _target_lines(report["targets"])]
    return "\n\n".join("\n".join(p) for p in parts)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--n-eval", type=int, default=200)
    p.add_argument("--eps", type=_eps, default=8 / 255)
    p.add_argument("--apgd-steps", type=int, default=20)
    p.add_argument("--square-queries", type=int, default=200)
    p.add_argument("--sticker-steps", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latency-runs", type=int, default=200)
    args = p.parse_args(argv)
    for name in ("n_eval", "apgd_steps", "square_queries", "sticker_steps", "latency_runs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.eps <= 1:
        p.error("--eps must be in [0, 1] (image units, e.g. 8/255)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(int(_threads))
    start = time.time()
    try:
        torch_model, meta, test = check_inputs(args.checkpoint, args.data)
    except BadInput as err:
        print(f"bench_int8: error: {err}", file=sys.stderr)
        return 2
    import onnx
    import onnxruntime as ort

    from distill.detector_fit import to_batch

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    models = build_models(args.checkpoint, args.data, out, args.seed)
    paths = {name: out / FILES[name] for name in MODELS}
    modules = {name: OrtModule(session(p, int(_threads))) for name, p in paths.items()}
    x, y = torch.from_numpy(to_batch(test.images)), torch.from_numpy(test.labels)
    log.info("clean accuracy on %d test images", len(y))
    clean = clean_figures(modules, x, y)
    pick = np.sort(np.random.default_rng(args.seed).permutation(len(y))[:args.n_eval])
    log.info("strong attacks on %d test images", len(pick))
    robust = robust_figures(torch_model, modules, x[pick], y[pick], args)
    sticker = sticker_figures(torch_model, modules, meta["class_names"], args)
    log.info("latency, %d calls per setting", args.latency_runs)
    latency = latency_figures(paths, int(meta["input_size"][-1]), args.latency_runs, args.seed)
    report = {
        "command": " ".join(["python", *(sys.argv if argv is None else
                                         ["scripts/bench_int8.py", *argv])]),
        "checkpoint": {"path": str(args.checkpoint), "sha256": meta["sha256"],
                       "arch": meta["arch"], "input_size": list(meta["input_size"]),
                       "class_names": list(meta["class_names"])},
        "data": str(args.data), "models": models, "clean": clean, "robust": robust,
        "sticker": sticker, "latency": latency, "targets": targets(clean, robust),
        "versions": {"onnxruntime": ort.__version__, "torch": torch.__version__,
                     "onnx": onnx.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": int(_threads),
        "not_measured": "TensorRT engines (no GPU here); INT8 latency on the Jetson",
        "seconds": time.time() - start}
    text = tables(report)
    (out / "int8.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "int8.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
