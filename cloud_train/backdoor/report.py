"""Text, markdown and chart of a ``roadshield redteam backdoor`` result (see
``cloud_train.redteam_backdoor`` for the fields)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

NAMES = {"neural_cleanse": "Neural Cleanse", "activation_clustering": "activation clustering",
         "spectral": "spectral signatures"}


def _order(defences: dict[str, Any]) -> list[str]:
    """Defence names in the report's order (a JSON round trip sorts keys)."""
    return [d for d in NAMES if d in defences] + sorted(d for d in defences if d not in NAMES)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    s, n = result["summary"], len(result["per_seed"])
    rows: list[tuple[str, ...]] = [
        ("defence", "detected", "false flags", "ASR before %", "ASR after %", "clean before %",
         "clean after %", "clean drop pts")]
    for d in _order(s["defences"]):
        v = s["defences"][d]
        rows.append((NAMES.get(d, d), f"{v['detected']}/{n}", f"{v['false_flags']}/{n}",
                     _pct(v["asr_before_mean"]), _pct(v["asr_after_mean"]),
                     _pct(v["clean_acc_before_mean"]), _pct(v["clean_acc_after_mean"]),
                     f"{v['clean_acc_drop_points']:.2f}"))
    return rows


def _seed_span(result: dict[str, Any]) -> str:
    seeds = [s["seed"] for s in result["per_seed"]]
    return f"{len(seeds)} seeds ({min(seeds)}..{max(seeds)})"


def text_table(result: dict[str, Any]) -> str:
    """Fixed-width summary for a terminal, then the targets."""
    if not result["per_seed"]:
        return "no seed finished"
    rows = _rows(result)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    u = result["summary"]["undefended"]
    cfg = result["config"]
    lines.append(f"undefended: ASR {_pct(u['asr_mean'])}% (per seed "
                 f"{', '.join(_pct(a) for a in u['asr'])}), infected clean acc "
                 f"{_pct(u['clean_acc_mean'])}%, clean models {_pct(u['clean_model_acc_mean'])}%")
    lines.append(f"scale {cfg['scale']}, {cfg['trigger_kind']} trigger, poison rate "
                 f"{cfg['poison_rate']}, {_trainer(cfg)} trainer, {_seed_span(result)}, "
                 f"{result['seconds']} s: "
                 + ("all targets met" if result["all_targets_met"] else "targets MISSED:"))
    lines += [f"  - {m}" for m in result["missed"]]
    return "\n".join(lines)


def _trainer(cfg: dict[str, Any]) -> str:
    return str(cfg.get("trainer", "standard"))  # records from before the option: standard


def markdown(result: dict[str, Any]) -> str:
    """The readable report: summary table, per-seed table, targets, chart."""
    cfg = result["config"]
    out = ["# Red team: backdoor attacks against Neural Cleanse, activation clustering and "
           "spectral signatures", "",
           f"Scale `{cfg['scale']}` ({cfg['sizes']}), {cfg['trigger_kind']} trigger, poison "
           f"rate {cfg['poison_rate']}, models trained by the {_trainer(cfg)} trainer, "
           f"{len(result['per_seed'])} seeds, {result['seconds']} s "
           f"on {result['cpu_count']} CPUs, started {result['started']}.", "",
           "Detected: the scan flagged the attack's target class on the infected model. False "
           "flags: clean models (same data, no poison) on which the scan flagged any class. "
           "ASR and clean accuracy are on the test split; 'after' is the infected model after "
           "the defence's mitigation (Neural Cleanse: unlearning; the others: remove the "
           "flagged examples and retrain from scratch).", ""]
    if not result["per_seed"]:
        return "\n".join(out + ["No seed finished.", ""])
    rows = _rows(result)
    out.append("| " + " | ".join(rows[0]) + " |")
    out.append("|---" + "|---:" * (len(rows[0]) - 1) + "|")
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    null = result["summary"]["defences"].get("neural_cleanse", {}).get("null_flag_rate")
    if null is not None:
        out += ["", f"Chance level: with this many classes the anomaly rule (index > 2) flags some "
                f"class of a clean model {100 * null:.0f}% of the time when the per-class trigger "
                "norms are plain normal draws; it flags fewer only where the natural norms have "
                "a light low tail."]
    out += ["", "## Per seed", "",
            "| seed | target | poisoned | ASR % | clean % | clean model % | NC anomaly "
            "(target) | NC max anomaly (clean model) | NC flags inf / clean | AC flags inf / "
            "clean | spectral flags inf / clean | ASR after NC / AC / SS % | seconds |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|---:|"]
    for s in result["per_seed"]:
        d = s["defences"]
        nc = d["neural_cleanse"]

        def flags(k: str, d: dict[str, Any] = d) -> str:
            return f"{d[k]['infected']['flagged']} / {d[k]['clean']['flagged']}"

        out.append(
            f"| {s['seed']} | {s['target']} | {s['poisoned']} | {_pct(s['infected']['asr'])} | "
            f"{_pct(s['infected']['clean_acc'])} | {_pct(s['clean']['clean_acc'])} | "
            f"{nc['infected']['anomaly'][s['target']]:.2f} | "
            f"{max(nc['clean']['anomaly']):.2f} | {flags('neural_cleanse')} | "
            f"{flags('activation_clustering')} | {flags('spectral')} | "
            f"{' / '.join(_pct(d[k]['after']['asr']) for k in _order(d))} | {s['seconds']} |")
    out += ["", "## Targets", ""]
    out += (["All targets met."] if result["all_targets_met"] else
            [f"- MISSED {m}" for m in result["missed"]])
    out += ["", "![ASR before/after and Neural Cleanse anomaly index](redteam_backdoor.png)", ""]
    return "\n".join(out)


def chart_png(result: dict[str, Any], threshold: float = 2.0) -> bytes:
    """Two panels: ASR before/after per defence (mean bars, seeds as dots) and the Neural
    Cleanse anomaly index per seed, infected target class vs the clean model's largest, with
    the threshold line. PNG bytes."""
    from matplotlib.figure import Figure  # Agg canvas, no pyplot global state

    fig = Figure(figsize=(11, 4.2), dpi=110)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    seeds = result["per_seed"]
    if seeds:
        before = [s["infected"]["asr"] for s in seeds]
        labels, values, colours = ["undefended"], [before], ["#c62828"]
        for d in _order(seeds[0]["defences"]):
            labels.append(NAMES.get(d, d).replace(" ", "\n", 1))
            values.append([s["defences"][d]["after"]["asr"] for s in seeds])
            # green: the mean meets the 5% target; orange: it does not
            colours.append("#2e7d32" if np.mean(values[-1]) <= 0.05 else "#ef6c00")
        xs = np.arange(len(labels))
        bars = ax1.bar(xs, [100 * float(np.mean(v)) for v in values], color=colours, alpha=0.8)
        ax1.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
        for x, v in zip(xs, values, strict=True):
            jitter = np.linspace(-0.15, 0.15, len(v)) if len(v) > 1 else np.zeros(1)
            ax1.scatter(x + jitter, [100 * a for a in v], s=12, color="black", zorder=3)
        ax1.axhline(90, color="#c62828", linestyle=":", linewidth=1)
        ax1.axhline(5, color="#2e7d32", linestyle="--", linewidth=1)
        ax1.set_xticks(xs, labels, fontsize=8)
        ax1.set_ylim(0, 108)
        ax1.set_ylabel("attack success rate % (test)")
        ax1.set_title("ASR: undefended vs after each mitigation (dots: seeds; lines: 90%\n"
                      "attack target, 5% defence target; orange: mean above 5%)", fontsize=9)
        idx = [s["seed"] for s in seeds]
        inf = [s["defences"]["neural_cleanse"]["infected"]["anomaly"][s["target"]]
               for s in seeds]
        cln = [max(s["defences"]["neural_cleanse"]["clean"]["anomaly"]) for s in seeds]
        ax2.plot(idx, inf, "o-", color="#c62828", label="infected: target class")
        ax2.plot(idx, cln, "s-", color="#1565c0", label="clean model: largest of any class")
        ax2.axhline(threshold, color="black", linestyle="--", linewidth=1,
                    label=f"threshold {threshold:g}")
        ax2.set_xticks(idx)
        ax2.set_xlabel("seed")
        ax2.set_ylabel("anomaly index (MAD units, small-norm side)")
        ax2.set_title("Neural Cleanse anomaly index per seed", fontsize=9)
        ax2.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
