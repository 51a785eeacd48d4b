"""The edge loop's report as a table and its monitor plot, built from the report's JSON."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def text_table(rows: Sequence[tuple[str, str]], title: str) -> str:
    width = max(len(k) for k, _ in rows)
    lines = [title, "-" * max(len(title), width + 20)]
    lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
    return "\n".join(lines)


def pct(x: float | None) -> str:
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
                     f"{mon['flagged']} of {mon['scored']} ({pct(mon['flag_rate'])})"))
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


def _trust_row(trust: dict[str, Any] | None) -> str:
    if not trust:
        return "not recorded"
    if trust.get("signed"):
        return (f"signed bundle {trust['bundle']} ({trust['model']}, key "
                f"{trust['key_hint'][:16]}, sha256 {trust['sha256'][:16]})")
    return f"UNSIGNED {trust['model']} (sha256 {trust['sha256'][:16]}, --allow-unsigned)"


def loop_rows(rep: dict[str, Any]) -> list[tuple[str, str]]:
    stages = rep.get("stages", {})
    rows = [("model", _trust_row(rep.get("model_trust"))),
            ("backend", rep.get("runner", "")),
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
        rows += [("locator recall", pct(truth.get("locator_recall"))),
                 ("sign accuracy, clean", pct(truth.get("clean", {}).get("accuracy"))),
                 ("sign accuracy, stickered", pct(truth.get("stickered", {}).get("accuracy"))),
                 ("encounters with the right action",
                  f"{truth.get('encounters_right', 0)} of {truth.get('encounters', 0)}")]
        for split in ("clean", "stickered"):
            part = truth.get(split) or {}
            if "abstained" in part:
                rows.append((f"abstained, {split}", f"{part['abstained']} of "
                             f"{part.get('classified', 0)} ({pct(part.get('abstain_rate'))})"))
            if "certified" in part:
                rows.append((f"certified, {split}", f"{part['certified']} of "
                             f"{part.get('classified', 0)} ({part.get('certified_correct', 0)}"
                             " also correct)"))
    return rows


def format_loop_report(rep: dict[str, Any]) -> str:
    return text_table(loop_rows(rep), "edge loop")
