"""Targets, text, markdown and chart of a ``roadshield redteam inference`` result (fields:
``cloud_train.redteam_inference``)."""

from __future__ import annotations

import io
from typing import Any

from cloud_train.report_files import aligned, md_table

#: the issue's targets, at the synthetic world's scale
UNDEFENDED_TARGETED = 0.80  # share of stickered sightings read as the target
UNDEFENDED_ENCOUNTERS = 0.70  # share of stickered encounters ending with the attacker's action
UNDEFENDED_UNTARGETED = 0.90
DEFENDED_NON_ADAPTIVE = 0.05
DEFENDED_ADAPTIVE = 0.10
CLEAN_DROP_POINTS = 2.0
#: input detectors: share of the successful non-adaptive PGD 8/255 examples flagged at the
#: fitted threshold by the better detector, which must keep its measured clean
#: false-positive rate within DETECTION_FPR_CEILING (twice the nominal 5 %)
DETECTION_TARGET = 0.90
DETECTION_FPR_CEILING = 0.10
DETECTION_ATTACK, DETECTION_EPS_255 = "pgd", 8
#: drift monitor: an alarm within DRIFT_FRAMES frames of the onset of the 15 % brightness
#: shift (read on DRIFT_SCENARIO; DRIFT_ALSO, the additive shift, is reported beside it),
#: and at most FALSE_ALARMS_PER_10K false alarms per 10,000 clean frames
DRIFT_FRAMES = 300
DRIFT_SCENARIO, DRIFT_ALSO = "brightness_gain", "brightness_lift"
FALSE_ALARMS_PER_10K = 1.0


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


def detector_target(detectors: dict[str, Any]) -> dict[str, Any]:
    """The detectors' target read from ``result["detectors"]``
    (``cloud_train.redteam_detectors``): the non-adaptive PGD 8/255 row's share of
    successful adversarial examples flagged **at the fitted threshold**, by the better
    detector: the one with the higher such detection among those whose clean false-positive
    rate, measured on the test images, is at most ``DETECTION_FPR_CEILING``. The fitted
    threshold is what the car runs, so that is what the target reads; a detector whose
    threshold flags far more clean images than the nominal 5 % cannot meet it however much
    it detects. Returns the figures read, ``met`` and, when not met, ``why``."""
    row = next((r for r in detectors.get("attacks", []) if r["attack"] == DETECTION_ATTACK
                and r["eps_255"] == DETECTION_EPS_255), None)
    out: dict[str, Any] = {"attack": DETECTION_ATTACK, "eps_255": DETECTION_EPS_255,
                           "target": DETECTION_TARGET, "fpr_ceiling": DETECTION_FPR_CEILING,
                           "detector": None, "detection": None, "fpr": None,
                           "detection_at_fpr": None, "met": False}
    where = f"{DETECTION_ATTACK.upper()} {DETECTION_EPS_255}/255"
    if row is None or not row["successful"]:
        out["why"] = (f"detectors: no {where} row" if row is None else
                      f"detectors: {where} made no successful adversarial example to detect")
        return out
    figs = {k: v for k, v in row["detectors"].items() if k in detectors["detectors"]}
    fair = {k: v for k, v in figs.items()
            if v["fpr"] is not None and v["fpr"] <= DETECTION_FPR_CEILING}
    if not fair:
        rates = ", ".join(f"{k} {_share(v['fpr'])} %" for k, v in figs.items())
        out["why"] = (f"detectors: the fitted thresholds flag {rates} of clean test images "
                      f"(nominal 5 %, ceiling {DETECTION_FPR_CEILING:.0%}): none holds its "
                      "false-positive rate")
        return out
    name, best = max(fair.items(), key=lambda kv: (kv[1]["detection"] or 0.0, -kv[1]["fpr"]))
    out.update(detector=name, detection=best["detection"], fpr=best["fpr"],
               detection_at_fpr=best["detection_at_fpr"])
    out["met"] = (best["detection"] or 0.0) >= DETECTION_TARGET
    if not out["met"]:
        out["why"] = (f"detectors: {name} flags {_share(best['detection'])} % of successful "
                      f"{where} examples at its fitted threshold (measured clean FPR "
                      f"{_share(best['fpr'])} %; target >= {DETECTION_TARGET:.0%} at <= "
                      f"{DETECTION_FPR_CEILING:.0%} FPR)")
    return out


def _alarm_text(row: dict[str, Any] | None, name: str) -> str:
    if row is None:
        return f"{name}: no scenario row"
    early = " (and a false alarm before the onset)" if row["false_alarm_before_onset"] else ""
    if not row["alarmed"]:
        return (f"{name}: no alarm in the {row['frames'] - row['onset']} frames after the "
                f"onset{early}")
    return (f"{name}: alarm {row['frames_to_alarm']} frames after the onset "
            f"({', '.join(row['first_statistics'])}){early}")


def drift_targets(drift: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The drift monitor's two targets read from ``result["drift"]``
    (``cloud_train.redteam_drift``): "alarm" (an alarm within ``DRIFT_FRAMES`` frames of
    the onset of the 15 % brightness shift, read on ``DRIFT_SCENARIO``) and "false_alarms"
    (at most ``FALSE_ALARMS_PER_10K`` per 10,000 clean frames). Each has ``met``, a
    ``text`` naming the scenarios read and, when not met, ``why``."""
    rows = {r["name"]: r for r in drift.get("scenarios", [])}
    row = rows.get(DRIFT_SCENARIO)
    met = bool(row and row["alarmed"] and row["frames_to_alarm"] <= DRIFT_FRAMES)
    text = "; ".join(_alarm_text(rows.get(n), n) for n in (DRIFT_SCENARIO, DRIFT_ALSO))
    alarm: dict[str, Any] = {"scenario": DRIFT_SCENARIO, "frames": DRIFT_FRAMES,
                             "frames_to_alarm": row["frames_to_alarm"] if row else None,
                             "met": met, "text": text}
    if not met:
        alarm["why"] = (f"drift: {text} (target: an alarm within {DRIFT_FRAMES} frames of the "
                        "15 % brightness shift)")
    fa = drift.get("false_alarms") or {}
    per_10k = fa.get("per_10k")
    ok = per_10k is not None and per_10k <= FALSE_ALARMS_PER_10K
    text = (f"{fa.get('alarms', 0)} false alarms in {fa.get('frames', 0):,} clean frames"
            + ("" if per_10k is None else f" ({per_10k:.2f} per 10,000)"))
    false: dict[str, Any] = {"per_10k": per_10k, "ceiling": FALSE_ALARMS_PER_10K, "met": ok,
                             "text": text}
    if not ok:
        false["why"] = f"drift: {text} (target <= {FALSE_ALARMS_PER_10K:g} per 10,000)"
    return {"alarm": alarm, "false_alarms": false}


def check_targets(result: dict[str, Any]) -> None:
    """Pick the best defended stack and record ``missed`` / ``all_targets_met`` in place.

    Best: among the defended stacks that stop the sticker (non-adaptive success <= 5 %,
    adaptive <= 10 %), the one with the highest clean accuracy (then the cheaper); when
    none does, the one with the lowest worst case. Its clean accuracy must then be within
    2 points of the undefended one's, or that is a miss: a stack that keeps clean accuracy
    by stopping nothing is never the best.

    With a ``detectors`` section, its target is checked too: ``detector_target``'s reading
    goes to ``result["detectors"]["target"]`` and, when not met, its reason to ``missed``;
    likewise a ``drift`` section's two targets (``drift_targets``) go to
    ``result["drift"]["targets"]``.
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
    det = result.get("detectors")
    if det is not None:
        det["target"] = detector_target(det)
        if not det["target"]["met"]:
            missed.append(det["target"]["why"])
    drift = result.get("drift")
    if drift is not None:
        drift["targets"] = drift_targets(drift)
        missed += [t["why"] for t in drift["targets"].values() if not t["met"]]
    result["missed"] = missed
    result["all_targets_met"] = not missed
    result["targets_checked"] = (3 + (3 if best is not None else 0) + (det is not None)
                                 + (2 if drift is not None else 0))


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


def _auc(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _strongest_run(adaptive_set: dict[str, Any]) -> dict[str, Any] | None:
    lam = adaptive_set.get("strongest_lambda")
    return next((r for r in adaptive_set["runs"] if r["lambda"] == lam), None)


def _det_cells(figs: dict[str, Any], names: list[str]) -> list[str]:
    out = []
    for k in (*names, "either"):
        f = figs[k]
        out += [_share(f["detection"]), _share(f["detection_at_fpr"]), _auc(f["auc"])]
    return out


def _detector_table(det: dict[str, Any]) -> list[tuple[str, ...]]:
    """Rows (header first) of the detectors' section: each attack, the sticker, and the
    strongest adaptive attack against each detector set."""
    names = list(det["detectors"])
    rows: list[tuple[str, ...]] = [(
        "attack", "eps", "success %", "evasion %",
        *[f"{k} {c}" for k in (*names, "either") for c in ("det %", "det@5% %", "AUC")])]
    for r in det["attacks"]:
        rows.append((r["attack"], f"{r['eps_255']}/255", _share(r["success"]), "-",
                     *_det_cells(r["detectors"], names)))
    for d in det["stickers"]["drives"]:
        read = d["target"] or f"not {d['sign']}"
        rows.append((f"sticker {d['name']}: read as {read}", "-", _share(d["success"]), "-",
                     *_det_cells(d["detectors_successful"], names)))
        rows.append((f"sticker {d['name']}: all crops", "-", "-", "-",
                     *_det_cells(d["detectors_all"], names)))
    ad = det["adaptive"]
    for set_name, st in ad["sets"].items():
        run = _strongest_run(st)
        if run is not None:
            rows.append((f"adaptive vs {set_name} (lambda {run['lambda']:g})",
                         f"{ad['eps_255']}/255", _share(run["success"]), _share(run["evasion"]),
                         *_det_cells(run["detectors"], names)))
    return rows


def _detector_lines(det: dict[str, Any]) -> list[str]:
    """What the detectors' table means, the clean figures and the target's reading."""
    c = det["clean"]
    fpr = ", ".join(f"{k} {_share(v)} %" for k, v in c["fpr"].items())
    st = det["stickers"]
    crop_fpr = ", ".join(f"{k} {_share(v)} %" for k, v in st["clean_fpr"].items())
    lines = [
        f"input detectors on the teacher, thresholds fitted at {_share(det['fpr_nominal'])} % "
        "FPR on train-split images; clean set: "
        f"{c['kept']} of {c['sampled']} test images classified right; clean FPR measured at "
        f"the fitted thresholds: {fpr}",
        f"sticker rows: {st['clean_crops']} clean-drive sign crops as the clean set "
        f"(accuracy {_share(st['clean_accuracy'])} %), clean FPR measured: {crop_fpr}",
        "det %: successful adversarial examples flagged at the fitted threshold; det@5% %: at "
        "a threshold re-set to 5 % FPR on the clean set; AUC: successful adversarial vs clean; "
        "evasion %: attacked images misclassified and unflagged by the attacked detectors "
        "(adaptive attacks: reported, never a target)"]
    ad = det["adaptive"]
    lines.append(f"adaptive attacks ({ad['eps_255']}/255, {ad['images']} images): evasion with "
                 "lambda chosen per image: " + ", ".join(
                     f"{k} {_share(st['evasion_any_lambda'])} %" for k, st in ad["sets"].items()))
    t = det.get("target")
    if t is not None:
        if t["detector"] is None:
            lines.append(f"detector target: {t['why']}")
        else:
            note = "" if t["fpr"] <= 0.05 else " (above the nominal 5 %)"
            lines.append(
                f"detector target ({t['attack']} {t['eps_255']}/255, >= {t['target']:.0%} at "
                f"the fitted threshold, clean FPR <= {t['fpr_ceiling']:.0%}): {t['detector']} "
                f"flags {_share(t['detection'])} % with a measured clean FPR of "
                f"{_share(t['fpr'])} %{note}; at a threshold re-set to 5 % FPR it flags "
                f"{_share(t['detection_at_fpr'])} % -> {'met' if t['met'] else 'MISSED'}")
    return lines


def _adaptive_table(det: dict[str, Any]) -> list[tuple[str, ...]]:
    names = list(det["detectors"])
    rows: list[tuple[str, ...]] = [("attacked", "lambda", "success %", "evasion %",
                                    "evasion (either) %",
                                    *[f"{k} det %" for k in (*names, "either")])]
    for set_name, st in det["adaptive"]["sets"].items():
        for r in st["runs"]:
            mark = " *" if r["lambda"] == st["strongest_lambda"] else ""
            rows.append((set_name + mark, f"{r['lambda']:g}", _share(r["success"]),
                         _share(r["evasion"]), _share(r["evasion_either"]),
                         *[_share(r["detectors"][k]["detection"]) for k in (*names, "either")]))
    return rows


def _drift_table(drift: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = [("scenario", "change", "onset/frames", "alarmed", "frames to alarm", "first statistics",
             "alarm before onset")]
    for r in drift["scenarios"]:
        rows.append((r["name"], r["description"], f"{r['onset']}/{r['frames']}",
                     "yes" if r["alarmed"] else "no",
                     "-" if r["frames_to_alarm"] is None else str(r["frames_to_alarm"]),
                     ", ".join(r["first_statistics"]) or "-",
                     "yes" if r["false_alarm_before_onset"] else "no"))
    return rows


def _drift_lines(drift: dict[str, Any]) -> list[str]:
    """The reference, the false alarms and the targets' reading."""
    ref, cfg, fa = drift["reference"], drift["config"], drift["false_alarms"]
    stats = ", ".join(f"{k} {v}" for k, v in fa["statistics"].items())
    per_10k = "-" if fa["per_10k"] is None else f"{fa['per_10k']:.2f}"
    lines = [f"drift reference: {ref['frames']:,} clean frames, {ref['crops']:,} crops "
             f"({ref['source']}); windows of {cfg['frame_window']} frames and "
             f"{cfg['crop_window']} crops, a test every {cfg['check_every']} frames, an alarm "
             f"after {cfg['on_after']} failing tests",
             f"false alarms: {fa['alarms']} in {fa['frames']:,} clean frames ({per_10k} per "
             f"10,000)" + (f": {stats}" if stats else ""),
             "onset: the scenario's first changed frame / its frames; frames to alarm: from "
             "the onset to the first alarm switched on; a window must fill before its first "
             "test, so an onset before the frame window is full adds that wait"]
    targets = drift.get("targets")
    if targets is not None:
        a, f = targets["alarm"], targets["false_alarms"]
        lines += [f"drift target (an alarm within {a['frames']} frames of the 15 % brightness "
                  f"shift): {a['text']} -> {'met' if a['met'] else 'MISSED'}",
                  f"drift target (<= {f['ceiling']:g} false alarm per 10,000 clean frames): "
                  f"{f['text']} -> {'met' if f['met'] else 'MISSED'}"]
    return lines


def text_table(result: dict[str, Any]) -> str:
    lines = [f"roadshield redteam inference ({result['scale']}, seed {result['seed']}, "
             f"{result.get('seconds', 0):.0f} s)", *aligned(_rows(result)),
             *_attack_lines(result)]
    det = result.get("detectors")
    if det is not None:
        lines += ["", *aligned(_detector_table(det)), *_detector_lines(det), ""]
    drift = result.get("drift")
    if drift is not None:
        lines += [*aligned(_drift_table(drift)), *_drift_lines(drift), ""]
    lines.append("* best defended stack. " + ("all targets met" if result["all_targets_met"]
                                              else "targets MISSED:"))
    lines += [f"  - {m}" for m in result["missed"]]
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    out = [f"# Sticker red team ({result['scale']}, seed {result['seed']})", "",
           f"Sign {result['sign']}, target {result['target']}. Success: share of stickered "
           "sightings read as the target (untargeted: as anything but the sign). Attacker "
           "enc.: stickered encounters where the policy acted on the target and never stopped. "
           "Adaptive: the sticker re-optimised with the stack in the loop. Cost: ms per "
           "crop as a multiple of the bare runner's.", "", *md_table(_rows(result))]
    out += ["", *[f"- {line}" for line in _attack_lines(result)], ""]
    det = result.get("detectors")
    if det is not None:
        ad = det["adaptive"]
        out += ["## Input detectors", "",
                *[f"- {line}" for line in _detector_lines(det)], "",
                *md_table(_detector_table(det)), "",
                f"### Adaptive attacks ({ad['eps_255']}/255, {ad['steps']} steps, "
                f"{ad['images']} images)", "",
                "PGD minimising CE to the highest wrong class plus lambda times the attacked "
                "detectors' scores over their thresholds (BPDA through the squeezers). "
                "* the strongest lambda: the highest evasion.", "",
                *md_table(_adaptive_table(det)), "",
                *[f"- against {k}: {_share(st['evasion_any_lambda'])} % of the images evade "
                  "with at least one lambda" for k, st in ad["sets"].items()], ""]
    drift = result.get("drift")
    if drift is not None:
        out += ["## Drift monitor", "", *[f"- {line}" for line in _drift_lines(drift)], "",
                *md_table(_drift_table(drift)), ""]
    out += (["All targets met."] if result["all_targets_met"] else
            [f"- MISSED {m}" for m in result["missed"]])
    return "\n".join(out) + "\n"


def _detector_cases(det: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, figures by detector) of the chart's detector panel."""
    cases = [(f"{r['attack']} {r['eps_255']}/255", r["detectors"]) for r in det["attacks"]
             if r["eps_255"] == max(x["eps_255"] for x in det["attacks"])]
    cases += [(f"sticker {d['name']}", d["detectors_successful"])
              for d in det["stickers"]["drives"]]
    for set_name, st in det["adaptive"]["sets"].items():
        run = _strongest_run(st)
        if run is not None:
            cases.append((f"adaptive vs {set_name}", run["detectors"]))
    return cases


def _drift_panel(ax: Any, drift: dict[str, Any]) -> None:
    """Frames from the onset to the first alarm per scenario, against the target's line;
    a scenario without an alarm gets a hatched bar as long as it was watched."""
    import numpy as np

    rows = drift["scenarios"]
    x = np.arange(len(rows))
    for i, r in enumerate(rows):
        if r["alarmed"]:
            ax.bar(i, r["frames_to_alarm"], 0.6, color="#1565c0")
            ax.annotate(str(r["frames_to_alarm"]), (i, r["frames_to_alarm"]), ha="center",
                        va="bottom", fontsize=8)
        else:
            ax.bar(i, r["frames"] - r["onset"], 0.6, color="none", edgecolor="#9e9e9e",
                   hatch="//")
            ax.annotate("no alarm", (i, r["frames"] - r["onset"]), ha="center", va="bottom",
                        fontsize=8)
    ax.axhline(DRIFT_FRAMES, color="#c62828", linestyle="--",
               label=f"target: {DRIFT_FRAMES} frames")
    ax.set_xticks(x, [r["name"] for r in rows], fontsize=8)
    ax.set_ylabel("frames from the onset to the alarm")
    fa = drift["false_alarms"]
    per_10k = "-" if fa["per_10k"] is None else f"{fa['per_10k']:.2f}"
    ax.set_title(f"drift monitor (false alarms: {per_10k} per 10,000 clean frames)",
                 fontsize=10)
    ax.legend(loc="upper right", fontsize=8)


def chart_png(result: dict[str, Any]) -> bytes:
    """Grouped bars per stack: clean accuracy and the three attacks' success; with a
    detectors section, a panel of the share of successful attacks each detector flags at
    its fitted threshold; with a drift section, a panel of the frames to alarm."""
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
    det, drift = result.get("detectors"), result.get("drift")
    panels = 1 + (det is not None) + (drift is not None)
    fig, axes = plt.subplots(panels, 1, dpi=100, squeeze=False, figsize=(10, 4.5 * panels))
    ax = axes[0][0]
    x = np.arange(len(names))
    for i, (label, vals, colour) in enumerate(series):
        ax.bar(x + (i - 1.5) * 0.2, [100 * (v or 0.0) for v in vals], 0.2, label=label,
               color=colour)
    ax.set_xticks(x, names)
    ax.set_ylabel("% of crops")
    ax.set_ylim(0, 105)
    ax.set_title(f"sticker on {result['sign']} -> {result['target']}: undefended vs defences")
    ax.legend(loc="upper right", fontsize=8)
    if det is not None:
        ax = axes[1][0]
        cases = _detector_cases(det)
        keys = [*det["detectors"], "either"]
        x = np.arange(len(cases))
        width = 0.8 / len(keys)
        for i, (k, colour) in enumerate(zip(keys, ("#1565c0", "#00838f", "#37474f"),
                                            strict=False)):
            vals = [100 * (figs[k]["detection"] or 0.0) for _, figs in cases]
            ax.bar(x + (i - (len(keys) - 1) / 2) * width, vals, width, label=k, color=colour)
        ax.set_xticks(x, [c for c, _ in cases], rotation=15, fontsize=8)
        ax.set_ylabel("% of successful attacks flagged")
        ax.set_ylim(0, 105)
        fpr = ", ".join(f"{k} {_share(v)} %" for k, v in det["clean"]["fpr"].items())
        ax.set_title(f"input detectors at the fitted thresholds (clean test FPR: {fpr})",
                     fontsize=10)
        ax.legend(loc="upper right", fontsize=8)
    if drift is not None:
        _drift_panel(axes[-1][0], drift)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
