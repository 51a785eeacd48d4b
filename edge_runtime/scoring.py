"""Scoring an edge-loop run against the ground truth synthetic frames carry, and what a
sticker did to a run."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from roadshield_base.errors import ConfigError

from .frames import Frame
from .locate import Candidate, box_iou
from .policy import UNKNOWN, Decision, Prediction, SignRulesPolicy


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


class TruthScorer:
    """Scores a run against the ground truth that synthetic frames carry.

    Locator recall: a candidate overlaps the truth box with IoU >= ``iou``. Accuracy: the
    prediction for that candidate names the truth class (only when it was classified),
    split clean vs stickered; ``read_as`` counts, per split, the class names those
    predictions gave (what a stickered sign was read as). With ``abstains`` (the runner
    can abstain) each split also counts the crops that abstained (classified, never
    correct) and their rate; where a defence certified its labels, the certified crops
    and those also correct.
    Encounter: consecutive frames showing the same truth class. It is right when the
    policy's voted decisions include a class with the truth class's rule (a stop sign voted
    "stop" or "no_entry") and no command went out under another rule; for a class whose
    rule changes nothing, when no command went out under a rule.
    Voted, not sent: a speed limit already in force is a right decision with no command.
    """

    def __init__(self, rule_for: Callable[[str], Any] | None, iou: float = 0.5, *,
                 abstains: bool = False) -> None:
        self.rule_for = rule_for
        self.iou = iou
        self.abstains = abstains
        self.counts = {"frames_with_truth": 0, "located": 0, "frames_without_truth": 0,
                       "false_detection_frames": 0}
        self.split = {k: {"classified": 0, "correct": 0} for k in ("clean", "stickered")}
        self.read_as: dict[str, Counter[str]] = {k: Counter() for k in ("clean", "stickered")}
        self.defended = {k: {"abstained": 0, "certified": 0, "certified_correct": 0}
                         for k in ("clean", "stickered")}
        self._certify_seen = False
        self._done: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None

    def add(self, frame: Frame, candidates: Sequence[Candidate],
            predictions: Sequence[Prediction], decision: Decision) -> None:
        truth = frame.truth
        if self._open is not None and (truth is None
                                       or truth.class_name != self._open["class_name"]):
            self._close()
        if truth is None:
            self.counts["frames_without_truth"] += 1
            self.counts["false_detection_frames"] += bool(candidates)
            return
        self.counts["frames_with_truth"] += 1
        hits = [i for i, c in enumerate(candidates) if box_iou(c.box, truth.box) >= self.iou]
        if hits:
            self.counts["located"] += 1
            if hits[0] < len(predictions):
                key = "stickered" if truth.stickered else "clean"
                pred = predictions[hits[0]]
                correct = pred.class_name == truth.class_name
                self.split[key]["classified"] += 1
                self.split[key]["correct"] += correct
                self.read_as[key][pred.class_name] += 1
                extra = self.defended[key]
                extra["abstained"] += pred.class_name == UNKNOWN
                if pred.certified is not None:
                    self._certify_seen = True
                    extra["certified"] += pred.certified
                    extra["certified_correct"] += pred.certified and correct
        if self._open is None:
            self._open = {"class_name": truth.class_name, "stickered": truth.stickered,
                          "first_frame": frame.index, "last_frame": frame.index, "frames": 0,
                          "commands": [], "voted": []}
        enc = self._open
        enc["last_frame"] = frame.index
        enc["frames"] += 1
        enc["stickered"] = enc["stickered"] or truth.stickered
        if decision.action not in ("none", "hold", "relax") and decision.class_name:
            enc["voted"].append(decision.class_name)
        if decision.command is not None:
            enc["commands"].append({"action": decision.action, "class_name": decision.class_name,
                                    "speed_cap_kmh": decision.command.speed_cap_kmh,
                                    "brake": decision.command.brake})

    def _close(self) -> None:
        enc, self._open = self._open, None
        if enc is None or self.rule_for is None:
            return
        want = self.rule_for(enc["class_name"])
        enc["expected"] = want.action
        wrong_command = any(c["class_name"] is not None and self.rule_for(c["class_name"]) != want
                            for c in enc["commands"])
        voted_right = want.action == "keep" or any(self.rule_for(name) == want
                                                   for name in enc["voted"])
        enc["right"] = voted_right and not wrong_command
        enc["voted"] = sorted(set(enc["voted"]))
        self._done.append(enc)

    def encounters(self) -> list[dict[str, Any]]:
        self._close()
        return list(self._done)

    def summary(self) -> dict[str, Any] | None:
        if self.counts["frames_with_truth"] == 0:
            return None
        encs = self.encounters()
        classified = sum(p["classified"] for p in self.split.values())
        correct = sum(p["correct"] for p in self.split.values())
        out: dict[str, Any] = dict(self.counts)
        out["locator_recall"] = _ratio(self.counts["located"], self.counts["frames_with_truth"])
        out.update(classified=classified, correct=correct, accuracy=_ratio(correct, classified))
        abstained = sum(p["abstained"] for p in self.defended.values())
        for key, part in self.split.items():
            out[key] = {**part, "accuracy": _ratio(part["correct"], part["classified"]),
                        "read_as": dict(sorted(self.read_as[key].items()))}
            extra = self.defended[key]
            if self.abstains or abstained:
                out[key].update(abstained=extra["abstained"],
                                abstain_rate=_ratio(extra["abstained"], part["classified"]))
            if self._certify_seen:
                out[key].update(certified=extra["certified"],
                                certified_correct=extra["certified_correct"])
        if self.abstains or abstained:
            out["abstained"] = abstained
        right = sum(bool(e.get("right")) for e in encs)
        out.update(encounters=len(encs), encounters_right=right,
                   encounter_accuracy=_ratio(right, len(encs)))
        return out


def attacker_encounters(encounters: list[dict[str, Any]], sign: str,
                        target: str | None) -> dict[str, int]:
    """Stickered encounters of ``sign``, those that ended with the attacker's action, and
    those in which the car obeyed the sign (a command under its own rule went out).

    Targeted: the policy acted on the target (the target won a vote: its command went out,
    or the car already obeyed it and kept going) and no command under the sign's own rule
    went out; a stop sign read as "priority road" (no rule: keep going) or as "speed limit
    100" on a 50 km/h road leaves the car driving on. Untargeted: no command under the
    sign's own rule went out.
    """
    rule = SignRulesPolicy().rule_for
    own = rule(sign)
    stickered = [e for e in encounters if e["stickered"] and e["class_name"] == sign]
    won = obeyed_count = 0
    for e in stickered:
        obeyed = own in [rule(c["class_name"]) for c in e["commands"] if c["class_name"]]
        obeyed_count += obeyed
        if target is None:
            won += not obeyed
        else:
            won += target in e["voted"] and not obeyed
    return {"stickered": len(stickered), "attacker_action": won, "obeyed": obeyed_count}


def sticker_figures(report: dict[str, Any], sign: str, target: str | None) -> dict[str, Any]:
    """What the sticker did on a drive's report: sightings, the share read as the target
    (untargeted: as another sign; a crop the defence abstained on, "unknown", was not
    fooled), the share abstained, what they were read as, and the encounters it won."""
    truth = report.get("truth")
    if not truth:
        raise ConfigError("the stickered drive carried no ground truth",
                          "drive a synthetic:// source")
    part = truth["stickered"]
    n = part["classified"]
    read = part.get("read_as", {})
    abstained = read.get(UNKNOWN, 0)
    won = read.get(target, 0) if target else n - read.get(sign, 0) - abstained
    return {"sightings": n, "success": won / n if n else None,
            "abstained": abstained / n if n else None, "accuracy": part["accuracy"],
            "read_as": read,
            "encounters": attacker_encounters(report["encounters"], sign, target)}
