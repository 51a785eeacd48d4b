"""The demo's summary table and plot, built from the JSON the run writes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge_runtime.report import pct, text_table


def _columns(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in rows]


def _enc(fig: dict[str, Any]) -> str:
    e = fig["encounters"]
    return f"{e['attacker_action']} of {e['stickered']}"


def compare_rows(summary: dict[str, Any]) -> list[tuple[str, ...]]:
    """The undefended car against the defended stack, drive by drive."""
    drives, attack = summary["drives"], summary["attack"]
    names = list(drives)
    target = summary["sticker"]["target"]
    rows: list[tuple[str, ...]] = [("", *names)]

    def row(label: str, fn: Any) -> None:
        rows.append((label, *(fn(n) for n in names)))

    def truth(n: str, drive: str) -> dict[str, Any]:
        return drives[n][drive].get("truth") or {}

    row("sign accuracy, clean drive", lambda n: pct(truth(n, "clean")["clean"]["accuracy"]))
    row("encounters with the right action",
        lambda n: f"{truth(n, 'clean')['encounters_right']} of {truth(n, 'clean')['encounters']}")
    row("abstained (unknown), clean drive",
        lambda n: pct(truth(n, "clean")["clean"].get("abstain_rate", 0.0)))
    row("abstained (unknown), stickered stops", lambda n: pct(attack[n]["abstained"]))
    row(f"stickered stop signs read as {target}", lambda n: pct(attack[n]["success"]))
    row("stickered stop signs read as stop",
        lambda n: pct(attack[n]["read_as"].get("stop", 0) / attack[n]["sightings"]
                       if attack[n]["sightings"] else None))
    row("stickered stops ending in the attacker's action", lambda n: _enc(attack[n]))
    row("stickered stops where the car stopped",
        lambda n: f"{attack[n]['encounters']['obeyed']} of {attack[n]['encounters']['stickered']}")
    row("frames per second, clean drive", lambda n: f"{drives[n]['clean']['fps']:.1f}")
    row("infer ms (median), clean drive",
        lambda n: f"{drives[n]['clean']['stages']['infer']['median_ms']:.2f}"
        if "infer" in drives[n]["clean"]["stages"] else "n/a")
    return rows


def _student_rows(student: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The Jetson student, its INT8 model and the signed bundle it was run from."""
    if not student:
        return []
    ev, q, b = student["evaluation"], student["int8"], student["bundle"]
    rows = [("Jetson student", f"{student['arch']} by {student['method']} from the car's "
                               f"model, {student['epochs']} epochs: {student['macs_ratio']:.0%} "
                               f"of its multiply-adds, {student['params']:,} parameters"),
            ("student accuracy: clean / PGD", f"{pct(ev['clean_acc'])} / {pct(ev['pgd_acc'])}"),
            ("student INT8 vs float", f"{pct(q['int8_accuracy'])} vs {pct(q['float_accuracy'])}"
                                      f", top-1 agreement {pct(q['top1_agreement'])}, "
                                      f"{q['int8_bytes'] / 1024:.0f} KB")]
    drive = student.get("drive")
    if drive:
        truth = drive.get("truth") or {}
        rows.append(("signed bundle", f"{b['dir']}/ verified against {b['trust_key']} in "
                                      f"{b['verify_ms']:.1f} ms; its INT8 student on the clean "
                                      f"drive: {pct(truth['clean']['accuracy'])} sign accuracy, "
                                      f"{truth['encounters_right']} of {truth['encounters']} "
                                      "encounters right"))
    return rows


def format_demo_summary(summary: dict[str, Any]) -> str:
    ev = summary["evaluation"]
    eps = ev["eps"] * 255
    st = summary["sticker"]
    rows = [("run", summary["run_dir"]),
            ("dataset (train / test images)",
             f"{summary['dataset']['train_images']} / {summary['dataset']['test_images']}"),
            ("car's model", f"{summary['training']['arch']}, {summary['training']['trainer']}, "
                            f"{summary['training']['epochs']} epochs, "
                            f"{summary['training']['seconds_per_epoch']:.1f} s/epoch"),
            ("clean accuracy", pct(ev["clean_acc"])),
            (f"FGSM accuracy (eps {eps:.0f}/255)", pct(ev["fgsm_acc"])),
            (f"PGD-{ev['pgd_steps']} accuracy (eps {eps:.0f}/255)", pct(ev["pgd_acc"])),
            ("ONNX vs torch max abs diff", f"{summary['export']['parity_max_abs']:.2e}")]
    dt = summary["defended_training"]
    rows += [("defended stack", f"the car's model fine-tuned {dt['epochs']} epochs with "
                                f"{dt['trainer']}, inside {summary['defence']}"),
             ("sticker", f"{st['sign']} -> {st['target']}, {st['config']['shape']}, "
                         f"{st['config']['area']:.0%} of the face, {st['seconds']:.0f} s"),
             ("sticker on held-out views", f"{pct(st['success'])} read as {st['target']} "
                                           f"(without it: {pct(st['clean_success'])})"),
             *_student_rows(summary.get("student")),
             ("backend", summary.get("backend", "")),
             ("actuator", summary.get("actuator", "recording")),
             ("wall time", f"{summary['wall_s']:.0f} s")]
    return (text_table(rows, "roadshield demo summary") + "\n\n"
            + "\n".join(_columns(compare_rows(summary))))


def plot_demo(summary: dict[str, Any], out: str | Path) -> Path:
    """Training curve, test-set bars (clean / FGSM / PGD) and, per stack, what the drives
    showed: clean sign accuracy, right encounters, stickered stops read as the target and
    stickered stops ending in the attacker's action."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    epochs = summary["training"]["history"]["epochs"]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2),
                                        gridspec_kw={"width_ratios": [1, 0.8, 1.6]})
    xs = [e["epoch"] for e in epochs]
    ax1.plot(xs, [e["train_acc"] for e in epochs], marker="o", label="train (as trained on)")
    if any(e.get("val_acc") is not None for e in epochs):
        ax1.plot(xs, [e["val_acc"] for e in epochs], marker="o", label="validation, clean")
    if any(e.get("guard_pgd_acc") is not None for e in epochs):
        ax1.plot(xs, [e["guard_pgd_acc"] for e in epochs], marker="o", label="guard batch, PGD")
    ax1.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1), title="the car's model: training")
    ax1.legend(loc="lower right")
    ev = summary["evaluation"]
    bars = {"clean": ev["clean_acc"], "FGSM": ev["fgsm_acc"], "PGD": ev["pgd_acc"]}
    ax2.bar(list(bars), list(bars.values()), color="#4c72b0")
    for i, v in enumerate(bars.values()):
        ax2.text(i, v + 0.02, f"{100 * v:.0f}%", ha="center")
    ax2.set(ylim=(0, 1.1), ylabel="accuracy", title="test set (L-inf 8/255)")
    drives, attack = summary["drives"], summary["attack"]
    names = list(drives)
    target = summary["sticker"]["target"]
    metrics = {
        "sign accuracy,\nclean drive": [drives[n]["clean"]["truth"]["clean"]["accuracy"]
                                        for n in names],
        "right encounters,\nclean drive": [drives[n]["clean"]["truth"]["encounter_accuracy"]
                                           for n in names],
        f"stickered stops\nread as {target}": [attack[n]["success"] for n in names],
        "stickered stops:\nattacker's action": [
            attack[n]["encounters"]["attacker_action"] / attack[n]["encounters"]["stickered"]
            if attack[n]["encounters"]["stickered"] else None for n in names]}
    x = np.arange(len(metrics))
    colours = ["#c44e52", "#55a868", "#8172b2"]
    for i, n in enumerate(names):
        vals = [(v[i] or 0.0) for v in metrics.values()]
        pos = x + (i - (len(names) - 1) / 2) * 0.38
        ax3.bar(pos, vals, 0.36, label=n, color=colours[i % len(colours)])
        for px, v in zip(pos, vals, strict=True):
            ax3.text(px, v + 0.02, f"{100 * v:.0f}%", ha="center", fontsize=8)
    ax3.set_xticks(x, list(metrics), fontsize=8)
    ax3.set(ylim=(0, 1.3), yticks=[0, 0.25, 0.5, 0.75, 1.0],
            title="the drives: undefended vs defended")
    ax3.legend(loc="upper center", ncol=len(names), fontsize=8)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
