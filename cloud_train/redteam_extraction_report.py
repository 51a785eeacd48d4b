"""Targets, text, markdown and chart of a ``roadshield redteam extraction`` result (fields:
``cloud_train.redteam_extraction``).

The issue's targets, as ``check_targets`` reads them:

- undefended: an extraction through the full-softmax key reaches >= 90 % agreement (either
  attack; the queries each took are stated);
- full stack, for each attack: the queries to 90 % agreement are >= 10x the undefended
  key's for the same attack, or the clone stays below 70 % agreement with what the key
  answered (its budget, its rate limit and the attacker's wall-clock cap);
- PRADA flags every synthetic-query run on a PRADA key before 2,000 queries, and none of
  the benign clients (the natural-crop runs' alarms are reported, never a target);
- watermark: each stolen clone (an undefended run that reached 90 %; without one, the
  undefended clone of the highest agreement) is recognised with p < 1e-6 in <= 200
  queries, the independent model on the same rows is not (p > 0.01), and the watermark
  costs honest users <= 0.5 points of clean accuracy: measured on the offline sample of
  fresh crops (``watermark_sample``: what the service's key and rate would serve, against
  the victim's own labels), with the benign clients' answers through the service beside it.
"""

from __future__ import annotations

import io
from typing import Any

from cloud_train.report_files import aligned, md_table

UNDEFENDED_AGREEMENT = 0.90
DEFENDED_FACTOR = 10
DEFENDED_CEILING = 0.70
PRADA_BEFORE = 2000
WATERMARK_P = 1e-6
WATERMARK_QUERIES = 200
INDEPENDENT_P = 0.01
WATERMARK_COST_POINTS = 0.5


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _q(x: int | None) -> str:
    return "-" if x is None else str(x)


def _p(x: float | None) -> str:
    return "-" if x is None else f"{x:.2g}"


def _run(result: dict[str, Any], defence: str, mode: str) -> dict[str, Any] | None:
    return next((r for r in result["runs"] if r["defence"] == defence and r["mode"] == mode),
                None)


def _reach(row: dict[str, Any]) -> str:
    q90 = row["queries_to_90"]
    head = (f"{row['defence']}/{row['mode']}: {_pct(row['agreement'])} % agreement after "
            f"{row['queries']} queries")
    return head + (f", 90 % at {q90}" if q90 is not None else ", 90 % not reached")


def _undefended(result: dict[str, Any]) -> dict[str, Any]:
    rows = [r for r in (_run(result, "undefended", m) for m in ("natural", "synthetic")) if r]
    best = max((r["agreement"] for r in rows), default=0.0)
    return {"name": "undefended extraction >= 90 % agreement",
            "met": best >= UNDEFENDED_AGREEMENT, "text": "; ".join(_reach(r) for r in rows)}


def _full_stack(result: dict[str, Any], mode: str) -> dict[str, Any]:
    full, base = _run(result, "full", mode), _run(result, "undefended", mode)
    name = f"full stack vs {mode} queries: >= {DEFENDED_FACTOR}x queries to 90 % or < 70 %"
    if full is None:
        return {"name": name, "met": False, "text": f"no full/{mode} run"}
    b90 = base["queries_to_90"] if base else None
    f90 = full["queries_to_90"]
    held = full["agreement"] < DEFENDED_CEILING
    slowed = b90 is not None and ((f90 is not None and f90 >= DEFENDED_FACTOR * b90)
                                  or (f90 is None and full["queries"] >= DEFENDED_FACTOR * b90))
    text = (f"full/{mode}: {_pct(full['agreement'])} % agreement with the "
            f"{full['queries']} queries answered ({full['stopped']}); 90 % "
            + (f"at {f90}" if f90 is not None else "not reached")
            + f"; undefended/{mode} reached 90 % "
            + (f"at {b90}" if b90 is not None else "never"))
    return {"name": name, "met": held or slowed, "text": text}


def _prada_synthetic(result: dict[str, Any]) -> dict[str, Any]:
    rows = [r for r in result["runs"] if r["mode"] == "synthetic" and r["prada"] is not None]
    parts, ok = [], bool(rows)
    for r in rows:
        at = r["prada"]["alarm_at"]
        ok = ok and at is not None and at < PRADA_BEFORE
        parts.append(f"{r['key']} " + (f"flagged after {at} queries" if at is not None else
                                      f"not flagged in its {r['queries']} queries "
                                      f"({r['stopped']}; lowest W {r['prada']['min_w']})"))
    return {"name": f"PRADA flags every synthetic-query run before {PRADA_BEFORE} queries",
            "met": ok, "text": "; ".join(parts) or "no synthetic run on a PRADA key"}


def _prada_benign(result: dict[str, Any]) -> dict[str, Any]:
    benign = result["benign"]
    flagged = [b for b in benign if b["prada"]["alarm_at"] is not None]
    ws = [b["prada"]["min_w"] for b in benign if b["prada"]["min_w"] is not None]
    text = (f"{len(flagged)} of {len(benign)} benign clients flagged"
            + (" (after " + ", ".join(str(b["prada"]["alarm_at"]) for b in flagged)
               + " queries)" if flagged else "")
            + (f"; lowest W {min(ws):.3f}" if ws else "; PRADA ran no test on them"))
    return {"name": "PRADA never flags the benign clients", "met": not flagged and bool(benign),
            "text": text}


def stolen_runs(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The clones the watermark must recognise: the undefended runs that reached 90 %, or
    the undefended run of the highest agreement when none did."""
    rows = [r for r in result["runs"] if r["defence"] == "undefended"]
    stolen = [r for r in rows if r["queries_to_90"] is not None]
    return stolen or sorted(rows, key=lambda r: -r["agreement"])[:1]


def _watermark(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = stolen_runs(result)
    clone_ok, indep_ok, clone_txt, indep_txt = bool(rows), bool(rows), [], []
    for r in rows:
        c, i = r["watermark"]["clone"], r["watermark"]["independent"]
        clone_ok = clone_ok and 0 < c["queries"] <= WATERMARK_QUERIES and \
            c["p_value"] < WATERMARK_P
        indep_ok = indep_ok and i["queries"] > 0 and i["p_value"] > INDEPENDENT_P
        clone_txt.append(f"{r['key']} clone: {c['agree']}/{c['queries']} watermark answers "
                         f"reproduced (all the watermark rows of its {r['queries']} queries"
                         if c["queries"] < WATERMARK_QUERIES else
                         f"{r['key']} clone: {c['agree']}/{c['queries']} watermark answers "
                         f"reproduced (the first {WATERMARK_QUERIES} rows")
        clone_txt[-1] += f"), p = {_p(c['p_value'])}"
        indep_txt.append(f"independent model on {r['key']}'s rows: {i['agree']}/{i['queries']},"
                         f" p = {_p(i['p_value'])}")
    return [{"name": f"watermark recognises the stolen clone (p < {WATERMARK_P:g}, <= "
                     f"{WATERMARK_QUERIES} queries)", "met": clone_ok,
             "text": "; ".join(clone_txt) or "no undefended run"},
            {"name": f"watermark does not accuse the independent model (p > {INDEPENDENT_P})",
             "met": indep_ok, "text": "; ".join(indep_txt) or "no undefended run"}]


def watermark_cost(result: dict[str, Any]) -> dict[str, Any]:
    """The watermark's cost to honest users in points of clean accuracy: on the offline
    sample of fresh crops (``watermark_sample``, the target's figure) and on the benign
    clients' own answers through the service (fewer answers, so it scatters more)."""
    benign = result["benign"]
    n = sum(b["answered"] for b in benign)
    served = sum(b["correct_served"] for b in benign)
    own = sum(b["correct_victim"] for b in benign)
    changed = sum(b["changed"] for b in benign)
    points = 100.0 * (own - served) / n if n else None
    # what the rate predicts: a watermarked answer costs a point only where the victim
    # was right
    rate = result.get("watermark_rate")
    expected = None if rate is None or not n else round(100.0 * rate * own / n, 3)
    sample = result.get("watermark_sample") or {}
    m = sample.get("crops", 0)
    sample_points = (100.0 * (sample["correct_victim"] - sample["correct_served"]) / m
                     if m else None)
    return {"answers": n, "accuracy_served": served / n if n else None,
            "accuracy_victim": own / n if n else None, "changed": changed,
            "benign_points": None if points is None else round(points, 3),
            "expected_points": expected, "sample_crops": m,
            "sample_marked": sample.get("marked"),
            "cost_points": None if sample_points is None else round(sample_points, 3)}


def check_targets(result: dict[str, Any]) -> None:
    """Record ``targets`` (each with name, met, text), ``missed``, ``all_targets_met`` and
    the watermark's cost (``watermark_cost``) in ``result``."""
    cost = watermark_cost(result)
    result["watermark_cost"] = cost
    targets = [_undefended(result), _full_stack(result, "natural"),
               _full_stack(result, "synthetic"), _prada_synthetic(result),
               _prada_benign(result), *_watermark(result),
               {"name": f"watermark costs honest users <= {WATERMARK_COST_POINTS} points",
                "met": cost["cost_points"] is not None
                and cost["cost_points"] <= WATERMARK_COST_POINTS,
                "text": f"{cost['cost_points']} points on {cost['sample_crops']} fresh crops "
                        f"({cost['sample_marked']} marked); the benign clients' answers "
                        f"{_pct(cost['accuracy_served'])} % correct against the victim's "
                        f"{_pct(cost['accuracy_victim'])} % on the same {cost['answers']} "
                        f"crops: {cost['benign_points']} points ({cost['changed']} answers "
                        f"changed; the rate predicts {cost['expected_points']})"}]
    result["targets"] = targets
    result["missed"] = [f"{t['name']}: {t['text']}" for t in targets if not t["met"]]
    result["all_targets_met"] = not result["missed"]


HEADER = ("defence", "attack", "policy", "queries", "agree %", "acc %", "q@90%", "q@70%",
          "PRADA alarm", "429s", "waited s", "stopped", "wm clone p", "wm indep p")


def _rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = [HEADER]
    for r in result["runs"]:
        prada = "-" if r["prada"] is None else _q(r["prada"]["alarm_at"]) \
            if r["prada"]["alarm_at"] is not None else "none"
        wm = r.get("watermark") or {}
        c, i = wm.get("clone", {}), wm.get("independent", {})
        out.append((r["defence"], r["mode"], r["policy"], str(r["queries"]),
                    _pct(r["agreement"]), _pct(r["accuracy"]), _q(r["queries_to_90"]),
                    _q(r["queries_to_70"]), prada, str(r["client"]["rate_limited"]),
                    f"{r['client']['waited_s']:.0f}", r["stopped"],
                    f"{_p(c.get('p_value'))} ({c.get('agree', 0)}/{c.get('queries', 0)})",
                    f"{_p(i.get('p_value'))} ({i.get('agree', 0)}/{i.get('queries', 0)})"))
    return out


def _notes(result: dict[str, Any]) -> list[str]:
    v, ind = result["victim"], result["independent"]
    sizes = result["sizes"]
    lines = [f"victim {v['path']} ({v['arch']}, {_pct(v['accuracy'])} % on the "
             f"{result['eval_crops']} held-out crops); clone and independent model: "
             f"{sizes['clone_arch']}; independent model trained on the true labels of "
             f"{ind['train_crops']} other crops: {_pct(ind['accuracy'])} % accurate, "
             f"{_pct(ind['agreement'])} % agreement with the victim",
             f"limited keys (budget, full, benign): budget {result['budget']} images, "
             f"{sizes['rate']:g} images/s, burst {sizes['burst']:g}; attacker wall-clock "
             f"cap {sizes['wall_cap_s']:g} s per run; agreement and accuracy on held-out "
             "natural crops; q@90%: first point of the doubling schedule at >= 90 %"]
    for r in result["runs"]:
        if r["mode"] == "natural" and r["prada"] is not None:
            at = r["prada"]["alarm_at"]
            lines.append(f"natural crops vs PRADA ({r['key']}): "
                         + (f"flagged after {at} queries" if at is not None else
                            f"never flagged in {r['queries']} queries")
                         + (f" (lowest W {r['prada']['min_w']:.3f})"
                            if r["prada"]["min_w"] is not None else ""))
    lines.append("re-check a p-value: " + stolen_runs(result)[0]["watermark"]["command"]
                 if stolen_runs(result) else "no undefended run")
    return lines


def curve_lines(result: dict[str, Any]) -> list[str]:
    """Each run's agreement at every measured query count."""
    return [f"{r['defence']}/{r['mode']}: " + ", ".join(
        f"{p['queries']} -> {_pct(p['agreement'])} %" for p in r["curve"])
        for r in result["runs"]]


def text_table(result: dict[str, Any]) -> str:
    lines = [f"roadshield redteam extraction ({result['scale']}, seed {result['seed']}, "
             f"{result.get('seconds', 0):.0f} s)", *aligned(_rows(result)), *_notes(result)]
    for t in result["targets"]:
        lines.append(f"{'met   ' if t['met'] else 'MISSED'} {t['name']}: {t['text']}")
    lines.append("all targets met" if result["all_targets_met"] else "targets MISSED")
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    out = [f"# Model extraction red team ({result['scale']}, seed {result['seed']})", "",
           "Each row is one attacker with its own API key on the real service over loopback "
           "HTTP: natural crops (Knockoff Nets) or synthetic queries (Jacobian-based "
           "augmentation). Agree: the clone's agreement with the victim; acc: its clean "
           "accuracy; wm p: the watermark's p-value (reproduced / replayed) on the clone and "
           "on the independent model, on that key's watermark rows.", "",
           *md_table(_rows(result)), "", *[f"- {line}" for line in _notes(result)], "",
           "## Agreement against queries answered", "",
           *[f"- {line}" for line in curve_lines(result)], "", "## Targets", ""]
    out += [f"- {'met' if t['met'] else '**MISSED**'}: {t['name']}: {t['text']}"
            for t in result["targets"]]
    return "\n".join(out) + "\n"


COLOURS = {"undefended": "#c62828", "label": "#1565c0", "noise": "#6a1b9a",
           "budget": "#ef6c00", "prada": "#00838f", "full": "#2e7d32"}


def chart_png(result: dict[str, Any]) -> bytes:
    """Agreement against queries answered, one panel per attack, one line per defence."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), dpi=100, sharey=True)
    for ax, mode in zip(axes, ("natural", "synthetic"), strict=True):
        for r in (r for r in result["runs"] if r["mode"] == mode):
            qs = [p["queries"] for p in r["curve"]]
            ag = [100 * p["agreement"] for p in r["curve"]]
            ax.plot(qs, ag, marker="o", ms=3, label=r["defence"],
                    color=COLOURS.get(r["defence"]))
            at = (r["prada"] or {}).get("alarm_at")
            if at is not None:
                ax.axvline(at, color=COLOURS.get(r["defence"]), linestyle=":", lw=1)
        ax.axhline(100 * UNDEFENDED_AGREEMENT, color="#424242", linestyle="--", lw=1)
        ax.axhline(100 * DEFENDED_CEILING, color="#9e9e9e", linestyle="--", lw=1)
        ax.axvline(result["budget"], color="#9e9e9e", linestyle="-.", lw=1)
        ax.set_xscale("log", base=2)
        # the schedule's counts (the longest curve's); the budget is the labelled line
        longest = max((r["curve"] for r in result["runs"] if r["mode"] == mode), key=len)
        ticks = [p["queries"] for p in longest]
        ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=8)
        ax.minorticks_off()
        ax.annotate(f"budget {result['budget']}", (result["budget"], 2), fontsize=8,
                    rotation=90, ha="right", va="bottom", color="#616161")
        ax.set_xlabel("queries answered (dash-dot: the budget; dotted: PRADA's alarm)")
        ax.set_title(f"{mode} {'crops (Knockoff)' if mode == 'natural' else 'queries (Jacobian)'}")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("agreement with the victim (%)")
    axes[1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
