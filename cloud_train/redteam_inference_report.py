"""Targets, text, markdown and chart of a ``roadshield redteam inference`` result (fields:
``cloud_train.redteam_inference``)."""

from __future__ import annotations

import io
from typing import Any

#: the issue's targets, at the synthetic world's scale
UNDEFENDED_TARGETED = 0.80  # share of stickered sightings read as the target
UNDEFENDED_ENCOUNTERS = 0.70  # share of stickered encounters ending with the attacker's action
UNDEFENDED_UNTARGETED = 0.90
DEFENDED_NON_ADAPTIVE = 0.05
DEFENDED_ADAPTIVE = 0.10
CLEAN_DROP_POINTS = 2.0


def _share(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _enc(fig: dict[str, Any]) -> str:
    e = fig["encounters"]
    return f"{e['attacker_action']}/{e['stickered']}"


def _worst(row: dict[str, Any]) -> float:
    vals = [row[k]["success"] for k in ("targeted", "adaptive") if row[k]["success"] is not None]
    return max(vals) if vals else 1.0


def _stops(row: dict[str, Any]) -> bool:
    na, ad = row["targeted"]["success"], row["adaptive"]["success"]
    return na is not None and ad is not None and na <= DEFENDED_NON_ADAPTIVE \
        and ad <= DEFENDED_ADAPTIVE


def check_targets(result: dict[str, Any]) -> None:
    """Pick the best defended stack and record ``missed`` / ``all_targets_met`` in place.

    Best: among the defended stacks that stop the sticker (non-adaptive success <= 5 %,
    adaptive <= 10 %), the one with the highest clean accuracy (then the cheaper); when
    none does, the one with the lowest worst case. Its clean accuracy must then be within
    2 points of the undefended one's, or that is a miss: a stack that keeps clean accuracy
    by stopping nothing is never the best.
    """
    rows = result["stacks"]
    bare = rows[0]
    missed: list[str] = []
    t, u = bare["targeted"], bare["untargeted"]
    if (t["success"] or 0.0) < UNDEFENDED_TARGETED:
        missed.append(f"undefended: targeted sticker success {_share(t['success'])} % "
                      f"(target >= {UNDEFENDED_TARGETED:.0%})")
    enc = t["encounters"]
    share = enc["attacker_action"] / enc["stickered"] if enc["stickered"] else 0.0
    if share < UNDEFENDED_ENCOUNTERS:
        missed.append(f"undefended: {_enc(t)} stickered encounters ended with the attacker's "
                      f"action (target >= {UNDEFENDED_ENCOUNTERS:.0%})")
    if (u["success"] or 0.0) < UNDEFENDED_UNTARGETED:
        missed.append(f"undefended: untargeted sticker success {_share(u['success'])} % "
                      f"(target >= {UNDEFENDED_UNTARGETED:.0%})")
    base = bare["clean_accuracy"] or 0.0
    defended = rows[1:]
    safe = [r for r in defended if _stops(r)]
    best = (max(safe, key=lambda r: ((r["clean_accuracy"] or 0.0), -r["ms_per_crop"]))
            if safe else min(defended, key=lambda r: (_worst(r), -(r["clean_accuracy"] or 0.0),
                                                      r["ms_per_crop"])) if defended else None)
    if best is not None:
        result["best_stack"] = best["stack"]
        drop = 100 * (base - (best["clean_accuracy"] or 0.0))
        if drop > CLEAN_DROP_POINTS:
            missed.append(f"{best['stack']}: clean accuracy {drop:.1f} points below "
                          f"undefended (target <= {CLEAN_DROP_POINTS:g})")
        na, ad = best["targeted"]["success"], best["adaptive"]["success"]
        if na is None or na > DEFENDED_NON_ADAPTIVE:
            missed.append(f"{best['stack']}: non-adaptive sticker success {_share(na)} % "
                          f"(target <= {DEFENDED_NON_ADAPTIVE:.0%})")
        if ad is None or ad > DEFENDED_ADAPTIVE:
            missed.append(f"{best['stack']}: adaptive sticker success {_share(ad)} % "
                          f"(target <= {DEFENDED_ADAPTIVE:.0%})")
    result["missed"] = missed
    result["all_targets_met"] = not missed
    result["targets_checked"] = 3 + (3 if best is not None else 0)


HEADER = ("stack", "clean acc %", "clean enc.", "abstain %", "certified %", "targeted %",
          "attacker enc.", "untargeted %", "adaptive %", "adaptive enc.", "cost x")


def _rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    out = [HEADER]
    for r in result["stacks"]:
        mark = " *" if r["stack"] == result.get("best_stack") else ""
        out.append((r["stack"] + mark, _share(r["clean_accuracy"]),
                    f"{r['clean_encounters_right']}/{r['clean_encounters']}",
                    _share(r["clean_abstain_rate"]), _share(r["certified_accuracy"]),
                    _share(r["targeted"]["success"]), _enc(r["targeted"]),
                    _share(r["untargeted"]["success"]), _share(r["adaptive"]["success"]),
                    _enc(r["adaptive"]),
                    "-" if r["cost_ratio"] is None else f"{r['cost_ratio']:.1f}"))
    return out


def _attack_lines(result: dict[str, Any]) -> list[str]:
    a = result["attacks"]
    t = a["targeted"]
    lines = [f"teacher sticker ({result['sign']} -> {result['target']}): "
             f"{_share(t['success'])} % of held-out views on the teacher (confident "
             f"{_share(t['confident'])} %)"]
    for key, what in (("blackbox", f"targeted ({result['target']})"),
                      ("blackbox_untargeted", "untargeted")):
        if key in a:
            b = a[key]
            half = b["queries_to_half"]
            lines.append(f"black-box sticker, {what}: {_share(b['success'])} % of held-out "
                         f"views after {b['queries']} queries; 50 % "
                         + (f"reached after {half} queries" if half else
                            "not reached in the budget"))
    return lines


def text_table(result: dict[str, Any]) -> str:
    rows = _rows(result)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"roadshield redteam inference ({result['scale']}, seed {result['seed']}, "
             f"{result.get('seconds', 0):.0f} s)"]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    lines += _attack_lines(result)
    lines.append("* best defended stack. " + ("all targets met" if result["all_targets_met"]
                                              else "targets MISSED:"))
    lines += [f"  - {m}" for m in result["missed"]]
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    rows = _rows(result)
    out = [f"# Sticker red team ({result['scale']}, seed {result['seed']})", "",
           f"Sign {result['sign']}, target {result['target']}. Success: share of stickered "
           "sightings read as the target (untargeted: as anything but the sign). Attacker "
           "enc.: stickered encounters where the policy acted on the target and never stopped. "
           "Adaptive: the sticker re-optimised with the stack in the loop. Cost: ms per "
           "crop as a multiple of the bare runner's.", "",
           "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    out += ["", *[f"- {line}" for line in _attack_lines(result)], ""]
    out += (["All targets met."] if result["all_targets_met"] else
            [f"- MISSED {m}" for m in result["missed"]])
    return "\n".join(out) + "\n"


def chart_png(result: dict[str, Any]) -> bytes:
    """Grouped bars per stack: clean accuracy and the three attacks' success."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = result["stacks"]
    names = [r["stack"] for r in rows]
    series = [("clean accuracy", [r["clean_accuracy"] for r in rows], "#2e7d32"),
              ("targeted success", [r["targeted"]["success"] for r in rows], "#c62828"),
              ("untargeted success", [r["untargeted"]["success"] for r in rows], "#ef6c00"),
              ("adaptive success", [r["adaptive"]["success"] for r in rows], "#6a1b9a")]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=100)
    for i, (label, vals, colour) in enumerate(series):
        ax.bar(x + (i - 1.5) * 0.2, [100 * (v or 0.0) for v in vals], 0.2, label=label,
               color=colour)
    ax.set_xticks(x, names)
    ax.set_ylabel("% of crops")
    ax.set_ylim(0, 105)
    ax.set_title(f"sticker on {result['sign']} -> {result['target']}: undefended vs defences")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
