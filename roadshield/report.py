"""Human-readable tables and the demo's plot, built from the JSON the run writes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _table(rows: Sequence[tuple[str, str]], title: str) -> str:
    width = max(len(k) for k, _ in rows)
    lines = [title, "-" * max(len(title), width + 20)]
    lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def _defence_rows(rep: dict[str, Any]) -> list[tuple[str, str]]:
    """The input-patch defence and its cost; none when no defence ran."""
    if not rep.get("defence"):
        return []
    rows = [("input-patch defence", rep["defence"])]
    cost = rep.get("defence_stats") or {}
    if cost:
        rows += [("defence model calls / images",
                  f"{cost.get('calls', 0)} / {cost.get('images', 0)} for "
                  f"{cost.get('crops', 0)} crops"),
                 ("crops needing a second round", str(cost.get("second_round_crops", 0))),
                 ("crops abstained (unknown)", str(cost.get("abstained", 0)))]
    return rows


def loop_rows(rep: dict[str, Any]) -> list[tuple[str, str]]:
    stages = rep.get("stages", {})
    rows = [("backend", rep.get("runner", "")),
            ("input sanitizers", rep.get("sanitize") or "none"),
            ("frames", str(rep["frames"])),
            ("frames per second", f"{rep['fps']:.1f}"),
            ("frames with a sign located", str(rep["frames_with_detection"])),
            ("commands sent to the actuator", str(rep["commands_sent"]))]
    rows[2:2] = _defence_rows(rep)
    for stage in ("locate", "sanitize", "preprocess", "infer", "frame"):
        if stage in stages:
            s = stages[stage]
            rows.append((f"{stage} ms (median / p95)", f"{s['median_ms']:.2f} / {s['p95_ms']:.2f}"))
    truth = rep.get("truth")
    if truth:
        rows += [("locator recall", _pct(truth.get("locator_recall"))),
                 ("sign accuracy, clean", _pct(truth.get("clean", {}).get("accuracy"))),
                 ("sign accuracy, stickered", _pct(truth.get("stickered", {}).get("accuracy"))),
                 ("encounters with the right action",
                  f"{truth.get('encounters_right', 0)} of {truth.get('encounters', 0)}")]
        for split in ("clean", "stickered"):
            part = truth.get(split) or {}
            if "abstained" in part:
                rows.append((f"abstained, {split}", f"{part['abstained']} of "
                             f"{part.get('classified', 0)} ({_pct(part.get('abstain_rate'))})"))
            if "certified" in part:
                rows.append((f"certified, {split}", f"{part['certified']} of "
                             f"{part.get('classified', 0)} ({part.get('certified_correct', 0)}"
                             " also correct)"))
    return rows


def format_loop_report(rep: dict[str, Any]) -> str:
    return _table(loop_rows(rep), "edge loop")


def format_demo_summary(summary: dict[str, Any]) -> str:
    ev = summary["evaluation"]
    eps = ev["eps"] * 255
    rows = [("run", summary["run_dir"]),
            ("dataset (train / test images)",
             f"{summary['dataset']['train_images']} / {summary['dataset']['test_images']}"),
            ("trainer", f"{summary['training']['trainer']}, "
                        f"{summary['training']['epochs']} epochs, "
                        f"{summary['training']['seconds_per_epoch']:.1f} s/epoch"),
            ("clean accuracy", _pct(ev["clean_acc"])),
            (f"FGSM accuracy (eps {eps:.0f}/255)", _pct(ev["fgsm_acc"])),
            (f"PGD-{ev['pgd_steps']} accuracy (eps {eps:.0f}/255)", _pct(ev["pgd_acc"])),
            ("ONNX vs torch max abs diff", f"{summary['export']['parity_max_abs']:.2e}")]
    rows.append(("actuator", summary.get("actuator", "recording")))
    rows += loop_rows(summary["edge"])
    rows.append(("wall time", f"{summary['wall_s']:.0f} s"))
    return _table(rows, "roadshield demo summary")


def plot_demo(summary: dict[str, Any], out: str | Path) -> Path:
    """Training curve and accuracy bars (clean / FGSM / PGD / edge clean / edge stickered)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = summary["training"]["history"]["epochs"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [e["epoch"] for e in epochs]
    ax1.plot(xs, [e["train_acc"] for e in epochs], marker="o", label="train (as trained on)")
    if any(e.get("val_acc") is not None for e in epochs):
        ax1.plot(xs, [e["val_acc"] for e in epochs], marker="o", label="validation, clean")
    if any(e.get("guard_pgd_acc") is not None for e in epochs):
        ax1.plot(xs, [e["guard_pgd_acc"] for e in epochs], marker="o", label="guard batch, PGD")
    ax1.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1), title="training")
    ax1.legend(loc="lower right")
    ev, truth = summary["evaluation"], summary["edge"].get("truth") or {}
    bars = {"clean": ev["clean_acc"], "FGSM": ev["fgsm_acc"], "PGD": ev["pgd_acc"],
            "edge\nclean": truth.get("clean", {}).get("accuracy"),
            "edge\nstickered": truth.get("stickered", {}).get("accuracy")}
    names = [k for k, v in bars.items() if v is not None]
    ax2.bar(names, [bars[k] for k in names], color=["#4c72b0"] * 3 + ["#55a868", "#c44e52"][
        :len(names) - 3])
    for i, k in enumerate(names):
        ax2.text(i, bars[k] + 0.02, f"{100 * bars[k]:.0f}%", ha="center")
    ax2.set(ylim=(0, 1.1), ylabel="accuracy", title="test set and edge stream")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
