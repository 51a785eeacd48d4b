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


def _monitor_rows(mon: dict[str, Any] | None) -> list[tuple[str, str]]:
    """Detector flags, caution and drift alarms; none when nothing watched the run."""
    if not mon:
        return []
    rows: list[tuple[str, str]] = []
    if mon["detectors"]:
        rows.append(("input detectors", ", ".join(
            f"{n} (threshold {mon['thresholds'][n]:.4g})" for n in mon["detectors"])))
        rows.append(("crops flagged (did not vote)",
                     f"{mon['flagged']} of {mon['scored']} ({_pct(mon['flag_rate'])})"))
        rows += [(f"  flagged by {n}", str(k)) for n, k in mon["flagged_by"].items()]
        on = [e for e in mon["caution_events"] if e["state"] == "on"]
        rows.append(("cautious spells", f"{len(on)}" + (f", first at frame {on[0]['frame']}"
                                                       if on else "")))
    if mon.get("drift"):
        raised = [e for e in mon["drift_events"] if e["state"] == "on"]
        rows.append(("drift alarms raised", f"{len(raised)}" + (
            ": " + ", ".join(f"{e['statistic']} @ frame {e['frame']}" for e in raised[:4])
            if raised else "")))
        rows.append(("drift alarms on at the end", ", ".join(mon["drift_alarms"]) or "none"))
    return rows


def plot_monitor(rep: dict[str, Any], out: str | Path) -> Path:
    """An edge run over time: each detector's score per crop against its threshold, the
    flag rate the caution gate sees, and each drift statistic's test value against its
    threshold (as a share of it), with alarms marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mon = rep.get("monitor") or {}
    series = mon.get("series") or {}
    scores = sorted(k for k in series if k.startswith("score:"))
    drift = sorted(k for k in series if k.startswith("drift:"))
    panels = len(scores) + ("flag_rate" in series) + bool(drift)
    if panels == 0:
        from roadshield_base.errors import ConfigError

        raise ConfigError("the run watched nothing to plot",
                          "run edge with --detect and/or --drift")
    fig, axes = plt.subplots(panels, 1, figsize=(11, 2.6 * panels), sharex=True, squeeze=False)
    axs = iter(axes[:, 0])
    for key in scores:
        name = key.split(":", 1)[1]
        ax = next(axs)
        pts = series[key]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=4, color="#4c72b0")
        thr = mon.get("thresholds", {}).get(name)
        if thr is not None:
            ax.axhline(thr, color="#c44e52", lw=1, label=f"threshold {thr:.3g}")
            ax.legend(loc="upper right", fontsize=8)
        ax.set(ylabel=name, title=f"detector score per crop: {name}")
    if "flag_rate" in series:
        ax = next(axs)
        pts = series["flag_rate"]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color="#8172b2")
        for e in mon.get("caution_events", []):
            ax.axvline(e["frame"], color="#c44e52" if e["state"] == "on" else "#55a868",
                       ls="--", lw=1)
        ax.set(ylabel="flag rate", ylim=(0, 1), title="flagged share of recent crops "
                                                        "(dashed: caution on / off)")
    if drift:
        ax = next(axs)
        for key in drift:
            pts = series[key]
            ax.plot([p[0] for p in pts], [p[1] / p[2] if p[2] else 0.0 for p in pts],
                    lw=1, label=key.split(":", 1)[1])
        ax.axhline(1.0, color="#c44e52", lw=1)
        for e in mon.get("drift_events", []):
            if e["state"] == "on":
                ax.axvline(e["frame"], color="#c44e52", ls="--", lw=1)
        ax.set(ylabel="value / threshold", title="drift tests (above 1 fails; dashed: alarm)")
        ax.legend(loc="upper left", fontsize=7, ncol=4)
    axes[-1, 0].set_xlabel("frame")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def loop_rows(rep: dict[str, Any]) -> list[tuple[str, str]]:
    stages = rep.get("stages", {})
    rows = [("backend", rep.get("runner", "")),
            ("input sanitizers", rep.get("sanitize") or "none"),
            ("frames", str(rep["frames"])),
            ("frames per second", f"{rep['fps']:.1f}"),
            ("frames with a sign located", str(rep["frames_with_detection"])),
            ("commands sent to the actuator", str(rep["commands_sent"]))]
    rows[2:2] = _defence_rows(rep)
    rows += _monitor_rows(rep.get("monitor"))
    for stage in ("locate", "sanitize", "preprocess", "infer", "detect", "frame"):
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

    row("sign accuracy, clean drive", lambda n: _pct(truth(n, "clean")["clean"]["accuracy"]))
    row("encounters with the right action",
        lambda n: f"{truth(n, 'clean')['encounters_right']} of {truth(n, 'clean')['encounters']}")
    row("abstained (unknown), clean drive",
        lambda n: _pct(truth(n, "clean")["clean"].get("abstain_rate", 0.0)))
    row("abstained (unknown), stickered stops", lambda n: _pct(attack[n]["abstained"]))
    row(f"stickered stop signs read as {target}", lambda n: _pct(attack[n]["success"]))
    row("stickered stop signs read as stop",
        lambda n: _pct(attack[n]["read_as"].get("stop", 0) / attack[n]["sightings"]
                       if attack[n]["sightings"] else None))
    row("stickered stops ending in the attacker's action", lambda n: _enc(attack[n]))
    row("stickered stops where the car stopped",
        lambda n: f"{attack[n]['encounters']['obeyed']} of {attack[n]['encounters']['stickered']}")
    row("frames per second, clean drive", lambda n: f"{drives[n]['clean']['fps']:.1f}")
    row("infer ms (median), clean drive",
        lambda n: f"{drives[n]['clean']['stages']['infer']['median_ms']:.2f}"
        if "infer" in drives[n]["clean"]["stages"] else "n/a")
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
            ("clean accuracy", _pct(ev["clean_acc"])),
            (f"FGSM accuracy (eps {eps:.0f}/255)", _pct(ev["fgsm_acc"])),
            (f"PGD-{ev['pgd_steps']} accuracy (eps {eps:.0f}/255)", _pct(ev["pgd_acc"])),
            ("ONNX vs torch max abs diff", f"{summary['export']['parity_max_abs']:.2e}")]
    dt = summary["defended_training"]
    rows += [("defended stack", f"the car's model fine-tuned {dt['epochs']} epochs with "
                                f"{dt['trainer']}, inside {summary['defence']}"),
             ("sticker", f"{st['sign']} -> {st['target']}, {st['config']['shape']}, "
                         f"{st['config']['area']:.0%} of the face, {st['seconds']:.0f} s"),
             ("sticker on held-out views", f"{_pct(st['success'])} read as {st['target']} "
                                           f"(without it: {_pct(st['clean_success'])})"),
             ("backend", summary.get("backend", "")),
             ("actuator", summary.get("actuator", "recording")),
             ("wall time", f"{summary['wall_s']:.0f} s")]
    return (_table(rows, "roadshield demo summary") + "\n\n"
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
