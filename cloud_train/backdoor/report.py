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


def _span(seeds: list[int]) -> str:
    return f"{min(seeds)}..{max(seeds)}" if seeds else "none"


def _frac(x: int, n: int) -> str:
    return f"{x}/{n}"


def detection_rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    """Header and rows: the backdoor verdict (when measured) and each scan alone, detected
    (target flagged on the infected model) and false flags (any class flagged on the clean
    twin), on this run's seeds and, for the verdict's rule, on its calibration seeds. Neural
    Cleanse's row is the paper's rule (MAD > 2) with its chance false-flag rate beside it."""
    s, n = result["summary"], len(result["per_seed"])
    v = s.get("verdict")
    head = ("", "rule", "detected", "false flags", "false flags by chance", "target")
    rows: list[tuple[str, ...]] = [head]
    if v is not None:
        cal = v["calibration"]
        rows.append((f"backdoor verdict (calibrated on seeds {_span(v['calibration_seeds'])}: "
                     f"{cal['detected']}/{cal['n']}, {cal['false_flags']}/{cal['n']})",
                     v["rule"], _frac(v["detected"], v["n"]), _frac(v["false_flags"], v["n"]),
                     "", ">= 90% / <= 10%" + ("" if v["met"] else " MISSED")))
    null = s["defences"].get("neural_cleanse", {}).get("null_flag_rate")
    for d in _order(s["defences"]):
        row = s["defences"][d]
        if d == "neural_cleanse":
            rows.append(("Neural Cleanse, replication of the paper's rule",
                         "MAD anomaly index > 2", _frac(row["detected"], n),
                         f"{_frac(row['false_flags'], n)} ({100 * row['false_flag_rate']:.0f}%)",
                         "" if null is None else f"{100 * null:.0f}%", "none (replication)"))
        else:
            rows.append((NAMES.get(d, d), "its own flag rule", _frac(row["detected"], n),
                         _frac(row["false_flags"], n), "", "none (input to the verdict)"))
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
    lines += _verdict_lines(result)
    return "\n".join(lines)


def _verdict_lines(result: dict[str, Any]) -> list[str]:
    s, n = result["summary"], len(result["per_seed"])
    lines: list[str] = []
    v = s.get("verdict")
    if v is not None:
        cal = v["calibration"]
        lines.append(f"backdoor verdict [{v['rule']}], fixed on seeds "
                     f"{_span(v['calibration_seeds'])} ({cal['detected']}/{cal['n']} detected, "
                     f"{cal['false_flags']}/{cal['n']} false flags there): detected "
                     f"{v['detected']}/{v['n']} infected, false flags {v['false_flags']}/{v['n']} "
                     f"clean (targets >= 90%, <= 10%)"
                     + ("; calibrated with other settings"
                        if v["same_settings_as_calibration"] is False else ""))
    nc = s["defences"].get("neural_cleanse")
    if nc is not None:
        null = nc.get("null_flag_rate")
        chance = "" if null is None else f" against {100 * null:.0f}% by chance (normal null)"
        lines.append(f"Neural Cleanse, replication of the paper's rule (MAD > 2): target "
                     f"flagged {nc['detected']}/{n}, clean models flagged {nc['false_flags']}/{n} "
                     f"({100 * nc['false_flag_rate']:.0f}%){chance}")
    for d in ("activation_clustering", "spectral"):
        if d in s["defences"]:
            r = s["defences"][d]
            lines.append(f"{NAMES[d]}: target flagged {r['detected']}/{n}, clean models "
                         f"flagged {r['false_flags']}/{n}")
    cal = result.get("verdict_calibration")
    if cal is not None:
        lines.append(f"verdict rule calibrated on seeds {_span(cal['seeds'])}: [{cal['rule']}] "
                     f"detected {cal['detected']}/{cal['n']}, false flags "
                     f"{cal['false_flags']}/{cal['n']}"
                     + ("" if cal["meets_targets"] else " (misses the targets even here)")
                     + f"; written to {cal['file']}")
    lines += [f"  not checked: {u}" for u in result.get("unchecked", [])]
    return lines


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
    out += ["", "## Backdoor verdict", "", _verdict_intro(result), ""]
    rows = detection_rows(result)
    out.append("| " + " | ".join(rows[0]) + " |")
    out.append("|---|---" + "|---:" * (len(rows[0]) - 3) + "|---|")
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    if null is not None:
        out += ["", f"Neural Cleanse keeps the paper's rule, and this row is a replication of "
                f"it: with this many classes the anomaly rule (index > 2) flags some "
                f"class of a clean model {100 * null:.0f}% of the time when the per-class trigger "
                "norms are plain normal draws; it flags fewer only where the natural norms have "
                "a light low tail."]
    cal = result.get("verdict_calibration")
    if cal is not None:
        out += ["", f"Calibrated on this run's seeds {_span(cal['seeds'])} and written to "
                f"`{cal['file']}`: **{cal['rule']}** ({cal['description']}), detected "
                f"{cal['detected']}/{cal['n']}, false flags {cal['false_flags']}/{cal['n']} on "
                "these seeds (a fit, not a measurement). Candidates tried, in order of "
                "preference:", "", "| rule | detected | false flags | meets targets |",
                "|---|---:|---:|---|"]
        out += [f"| {c['name']} | {c['detected']}/{cal['n']} | {c['false_flags']}/{cal['n']} | "
                f"{'yes' if c['meets_targets'] else 'no'} |" for c in cal["candidates"]]
    verdict = result["summary"].get("verdict")
    by_seed = {r["seed"]: r for r in verdict["per_seed"]} if verdict else {}
    out += ["", "## Per seed", "",
            "| seed | target | poisoned | ASR % | clean % | clean model % | NC anomaly "
            "(target) | NC max anomaly (clean model) | NC flags inf / clean | AC flags inf / "
            "clean | spectral flags inf / clean | verdict names inf / clean | ASR after NC / AC / "
            "SS % | seconds |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|---|---:|"]
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
            f"{_seed_verdict(by_seed.get(s['seed']))} | "
            f"{' / '.join(_pct(d[k]['after']['asr']) for k in _order(d))} | {s['seconds']} |")
    out += ["", "## Targets", ""]
    out += (["All targets met."] if result["all_targets_met"] else
            [f"- MISSED {m}" for m in result["missed"]])
    out += [f"- not checked: {u}" for u in result.get("unchecked", [])]
    out += ["", "![ASR before/after, Neural Cleanse anomaly index, detection and false flags]"
            "(redteam_backdoor.png)", ""]
    return "\n".join(out)


def _verdict_intro(result: dict[str, Any]) -> str:
    v = result["summary"].get("verdict")
    if v is None:
        return ("No verdict rule was given, so the kit's verdict was not measured; each scan "
                "alone below.")
    other = f" The calibration run used other settings: {v['calibration_config']}." \
        if v["same_settings_as_calibration"] is False else ""
    return (f"The kit's verdict, {v['rule']}: {v['description']}. Its rule was fixed in "
            f"advance on calibration seeds {_span(v['calibration_seeds'])} and is measured here "
            f"on seeds {_span(v['seeds'])}, none of which it saw. Detected: the classes it names "
            "on the infected model include the attack's target; false flag: it names any class "
            f"of the clean twin. Misnamed (called backdoored, wrong class): {v['misnamed']}/"
            f"{v['n']}.{other}")


def _seed_verdict(row: dict[str, Any] | None) -> str:
    return "-" if row is None else f"{row['infected']} / {row['clean']}"


def chart_png(result: dict[str, Any], threshold: float = 2.0) -> bytes:
    """Three panels: ASR before/after per defence (mean bars, seeds as dots); the Neural
    Cleanse anomaly index per seed, infected target class vs the clean model's largest, with
    the threshold line; detected and false-flag fractions of the verdict and of each scan.
    PNG bytes."""
    from matplotlib.figure import Figure  # Agg canvas, no pyplot global state

    fig = Figure(figsize=(16, 4.4), dpi=110)
    ax1, ax2, ax3 = (fig.add_subplot(1, 3, i) for i in (1, 2, 3))
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
        _detection_panel(ax3, result)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _detection_panel(ax: Any, result: dict[str, Any]) -> None:
    """Detected and false-flag fractions per scan and for the verdict, target lines at 90%
    and 10%, Neural Cleanse's chance false-flag rate as a marker."""
    s, n = result["summary"], len(result["per_seed"])
    labels, det, false = [], [], []
    v = s.get("verdict")
    if v is not None:
        labels.append("verdict")
        det.append(v["detected"] / max(v["n"], 1))
        false.append(v["false_flags"] / max(v["n"], 1))
    for d in _order(s["defences"]):
        short = NAMES.get(d, d).replace(" ", "\n", 1)
        labels.append("NC\n(MAD > 2)" if d == "neural_cleanse" else short)
        det.append(s["defences"][d]["detected"] / n)
        false.append(s["defences"][d]["false_flags"] / n)
    xs = np.arange(len(labels))
    b1 = ax.bar(xs - 0.2, [100 * x for x in det], width=0.4, color="#2e7d32",
                label="detected (infected)")
    b2 = ax.bar(xs + 0.2, [100 * x for x in false], width=0.4, color="#c62828",
                label="false flags (clean)")
    ax.bar_label(b1, fmt="%.0f", fontsize=8, padding=2)
    ax.bar_label(b2, fmt="%.0f", fontsize=8, padding=2)
    null = s["defences"].get("neural_cleanse", {}).get("null_flag_rate")
    if null is not None and "neural_cleanse" in s["defences"]:
        i = _order(s["defences"]).index("neural_cleanse") + (v is not None)
        ax.scatter([i + 0.2], [100 * null], marker="_", s=400, color="black", zorder=3,
                   label=f"NC chance false flags ({100 * null:.0f}%)")
    ax.axhline(90, color="#2e7d32", linestyle=":", linewidth=1)
    ax.axhline(10, color="#c62828", linestyle=":", linewidth=1)
    ax.set_xticks(xs, labels, fontsize=8)
    ax.set_ylim(0, 135)  # room for the legend above the bars
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel(f"% of {n} seeds")
    title = "verdict and each scan" if v is not None else "each scan (no verdict rule given)"
    ax.set_title(f"Detection and false flags: {title}\n(lines: 90% / 10% targets of the "
                 "verdict)", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", ncol=2)
