"""``roadshield attack sticker``: optimise a printable sticker and write its print files.

White-box when ``--model`` is a checkpoint (.safetensors): RP2 / EOT on the teacher, then
the same held-out views are scored by the exported ONNX model the car runs (``--onnx``,
or a temporary export), which is the transfer the car sees. Black-box when ``--model`` is
an .onnx file: the score-based search queries ONNX Runtime only.

Writes into ``--out``: sticker.png (print resolution), sticker.pdf (true size, cut outline,
placement marks), preview.png, sticker.json (the format is cloud_train/sticker/FORMAT.md)
and attack.json (the optimisation's figures).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from roadshield_base.errors import ConfigError


def add_attack_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add ``roadshield attack`` and its ``sticker`` verb."""
    attack = subparsers.add_parser("attack", help="attacks a person can carry out for real")
    asub = attack.add_subparsers(dest="attack_cmd", required=True)
    st = asub.add_parser(
        "sticker", help="optimise a printable adversarial sticker for a road sign",
        description="Optimises a sticker (RP2 / expectation over the synthetic camera's "
        "transformations) that makes the model read --sign as --target (or as anything else "
        "without --target), and writes a print-resolution PNG, a true-size PDF with cut "
        "outline and placement marks, a preview and sticker.json.")
    st.add_argument("--model", required=True,
                    help="teacher checkpoint (.safetensors: white-box) or an .onnx model "
                         "(black-box: scores only)")
    st.add_argument("--sign", required=True, help='the sign to sticker, e.g. "stop"')
    st.add_argument("--target", default=None,
                    help='the class the car should read, e.g. "speed limit 100" (default: '
                         "untargeted, any wrong class)")
    st.add_argument("--sign-mm", type=float, default=600.0,
                    help="the real sign's width in millimetres (default 600)")
    st.add_argument("--out", required=True, help="folder for the sticker's files")
    st.add_argument("--shape", default="bars", help="bars (two graffiti bars), square, circle")
    st.add_argument("--area", type=float, default=0.15,
                    help="sticker area as a share of the sign's face (default 0.15)")
    st.add_argument("--steps", type=int, default=300, help="optimisation steps (white-box)")
    st.add_argument("--positions", type=int, default=4,
                    help="candidate places on the face tried before the main run")
    st.add_argument("--onnx", default=None,
                    help="the exported model to measure the transfer on (white-box; default: "
                         "export the checkpoint to a temporary file)")
    st.add_argument("--budget", type=int, default=40000,
                    help="black-box: queries (rendered views) the search may send")
    st.add_argument("--search", choices=("nes", "square"), default="nes",
                    help="black-box search: nes (gradient estimates from scores) or square "
                         "(random palette squares)")
    st.add_argument("--dpi", type=int, default=300, help="print resolution of sticker.png")
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--json", action="store_true", help="print attack.json")
    st.add_argument("--no-progress", action="store_true", help="no progress bar")
    st.set_defaults(func=cmd_attack_sticker)


def _check_classes(class_names: Any, model: str) -> None:
    """Refuse, before any work, a model not trained on the synthetic world's classes."""
    from cloud_train.signs import SYNTHETIC_CLASSES

    if tuple(class_names) != SYNTHETIC_CLASSES:
        raise ConfigError(f"model {model} was not trained on the synthetic sign classes",
                          "the sticker is optimised in the synthetic world; use its model")


def _onnx_predictor(path: str | Path) -> Any:
    import numpy as np

    from edge_runtime.loop import softmax
    from edge_runtime.model_info import read_model_info
    from edge_runtime.runners.registry import create_runner

    info = read_model_info(path)
    runner = create_runner("onnxruntime", path)
    runner.activate()

    def predict(x: Any) -> Any:
        arr = x.numpy() if hasattr(x, "numpy") else np.asarray(x, np.float32)
        out = runner.infer({info.input_name: np.ascontiguousarray(arr, np.float32)})
        return softmax(out[info.output_name])

    return predict, runner, info


def _whitebox(args: argparse.Namespace, sign: int, target: int | None) -> dict[str, Any]:
    from tqdm import tqdm

    from cloud_train.checkpoint import load_checkpoint
    from cloud_train.sticker.eot import EotPool
    from cloud_train.sticker.optimise import StickerConfig, measure, optimise_sticker
    from distill.export import export_onnx

    model, meta = load_checkpoint(args.model)
    _check_classes(meta["class_names"], args.model)
    cfg = StickerConfig(sign=sign, target=target, shape=args.shape, area=args.area,
                        steps=args.steps, positions=args.positions, seed=args.seed)
    cfg.check()
    bar = tqdm(total=cfg.steps, desc="sticker", unit="step", disable=args.no_progress)

    def progress(step: int, total: int, loss: float) -> None:
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{loss:.3f}")

    try:
        result = optimise_sticker(model, cfg, progress=progress)
    finally:
        bar.close()
    with tempfile.TemporaryDirectory() as tmp:
        onnx = args.onnx or export_onnx(model, meta["class_names"], Path(tmp) / "model.onnx",
                                        source_sha256=meta["sha256"])
        predict, runner, info = _onnx_predictor(onnx)
        try:
            held_out = EotPool(sign, cfg.eval_pool, seed=cfg.seed + 1000,
                               input_size=info.input_size, jpeg_p=cfg.jpeg_p)
            transfer = measure(predict, held_out, result.colours, result.mask, sign, target,
                               seed=cfg.seed)
        finally:
            runner.deactivate()
    return {"mode": "white-box", "model": str(args.model), "model_sha256": meta["sha256"],
            "class_names": list(meta["class_names"]),
            "teacher": result.summary(history=True),
            "onnx": {"model": str(args.onnx) if args.onnx else "temporary export",
                     **transfer},
            "colours": result.colours, "mask": result.mask}


def _blackbox(args: argparse.Namespace, sign: int, target: int | None) -> dict[str, Any]:
    from cloud_train.sticker.blackbox import blackbox_sticker, nes_sticker
    from cloud_train.sticker.eot import EotPool
    from cloud_train.sticker.shapes import sticker_mask

    predict, runner, info = _onnx_predictor(args.model)
    try:
        _check_classes(info.class_names, args.model)
        pool = EotPool(sign, 48, seed=args.seed, input_size=info.input_size)
        held_out = EotPool(sign, 64, seed=args.seed + 1000, input_size=info.input_size)
        mask = sticker_mask(sign, args.shape, args.area)
        search = nes_sticker if args.search == "nes" else blackbox_sticker
        result = search(predict, pool, held_out, mask, sign, target, budget=args.budget,
                        seed=args.seed)
    finally:
        runner.deactivate()
    return {"mode": f"black-box ({args.search})", "model": str(args.model),
            "class_names": list(info.class_names), "blackbox": result.summary(),
            "colours": result.colours, "mask": result.mask}


def cmd_attack_sticker(args: argparse.Namespace) -> int:
    from cloud_train.signs import SYNTHETIC_CLASSES
    from cloud_train.sticker.placement import class_index_of
    from cloud_train.sticker.printout import write_sticker
    from cloud_train.sticker.shapes import check_area, check_shape
    from roadshield_base.fileio import atomic_write_json

    sign = class_index_of(args.sign, "sign")
    target = class_index_of(args.target, "target") if args.target is not None else None
    if target == sign:
        raise ConfigError(f"--target {args.target!r} is the sign itself",
                          "name another class, or leave --target out (untargeted)")
    if not args.sign_mm > 0:
        raise ConfigError(f"--sign-mm {args.sign_mm} is not a positive size",
                          "give the sign's width in millimetres, e.g. 600")
    check_shape(args.shape)
    check_area(args.area)
    suffix = Path(args.model).suffix.lower()
    if suffix not in (".safetensors", ".onnx"):
        raise ConfigError(f"--model {args.model} is neither a .safetensors checkpoint nor an "
                          ".onnx model", "pass the teacher checkpoint or the exported model")
    if not Path(args.model).is_file():
        raise ConfigError(f"--model {args.model} does not exist", "check the path")
    run = _whitebox(args, sign, target) if suffix == ".safetensors" else \
        _blackbox(args, sign, target)
    colours, mask = run.pop("colours"), run.pop("mask")
    target_name = SYNTHETIC_CLASSES[target] if target is not None else None
    files = write_sticker(args.out, colours, mask, sign=SYNTHETIC_CLASSES[sign],
                          target=target_name, shape=args.shape, sign_mm=args.sign_mm,
                          dpi=args.dpi, meta=_placement_meta(run))
    run["files"] = {k: str(v) for k, v in files.items()}
    run.pop("class_names", None)
    report = Path(args.out) / "attack.json"
    atomic_write_json(report, run)
    if args.json:
        print(json.dumps(run, indent=2))
        return 0
    _print(run, SYNTHETIC_CLASSES[sign], target_name, report)
    return 0


def _placement_meta(run: dict[str, Any]) -> dict[str, Any]:
    """What sticker.json keeps of the run: the figures, not the loss history."""
    meta = {k: v for k, v in run.items() if k != "class_names"}
    if "teacher" in meta:
        meta["teacher"] = {k: v for k, v in meta["teacher"].items() if k != "history"}
    return meta


def _print(run: dict[str, Any], sign: str, target: str | None, report: Path) -> None:
    goal = f"{sign} -> {target}" if target else f"{sign} -> any other class"
    print(f"sticker for {goal} ({run['mode']})")
    if "teacher" in run:
        t, o = run["teacher"], run["onnx"]
        print(f"  held-out views won, teacher: {t['success']:.1%} "
              f"(confident {t['confident']:.1%}; clean control {t['clean_success']:.1%})")
        print(f"  held-out views won, ONNX model: {o['success']:.1%} "
              f"(confident {o['confident']:.1%})")
        print("  by distance: " + ", ".join(f"{k} {v:.0%}" for k, v in t["by_distance"].items()))
    else:
        b = run["blackbox"]
        half = b["queries_to_half"]
        print(f"  held-out views won: {b['success']:.1%} after {b['queries']} queries; 50 % "
              f"reached {'after ' + str(half) + ' queries' if half else 'never'}")
    print("  files: " + ", ".join(run["files"].values()) + f", {report}")
