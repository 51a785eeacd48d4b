"""Decision policy: from classified signs to actuator commands.

The classifier is the part an attacker targets (a sticker on a stop sign), so the policy
does not trust a single frame: a class must win ``votes_needed`` of the last ``window``
confident sightings before anything moves. An encounter is the run of frames while signs
keep being seen; it ends after ``clear_after_s`` seconds without any sign. Its first voted
decision sets the command, later ones may only tighten it, so flipping the last frames of
an encounter cannot loosen a stop. A speed-limit sign's limit outlives its encounter (it
is the road's new limit, never above ``max_speed_kmh``); stop and slow signs last for
their encounter, after which the vehicle returns to the standing limit. Among the
confident predictions of one frame it votes for the most restrictive, so a decoy next to
a stop sign cannot hide it. A sighting of the class ``UNKNOWN`` (a defence such as
PatchCleanser abstained: the sign may carry an adversarial patch) asks to slow down, and
it votes whatever its confidence: it is sure that the sign cannot be trusted. A sighting
an input detector flagged (``Prediction.flagged``) does not vote at all. While the policy
is cautious (``set_caution``: e.g. the detectors flag too many crops of late) every
command it sends is capped at ``slow_kmh``, and it says why.

Policies are chosen by name: ``create_policy("sign_rules", max_speed_kmh=40)``.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from actuator.interface import ActuatorCommand
from roadshield_base.errors import ConfigError

Box = tuple[int, int, int, int]

#: Classes that mean "stop now": full brake, cap 0 km/h.
STOP_CLASSES: frozenset[str] = frozenset({"stop", "no_entry"})
#: Classes that mean "slow down and look": cap at ``slow_kmh`` with a light brake.
SLOW_CLASSES: frozenset[str] = frozenset({
    "yield", "pedestrians", "general_caution", "roundabout", "children_crossing",
    "bicycles_crossing", "wild_animals_crossing", "road_work", "traffic_signals",
    "slippery_road", "ice_snow", "bumpy_road", "road_narrows_right",
    "dangerous_curve_left", "dangerous_curve_right", "double_curve",
})
#: The class of a sighting the classifier's defence abstained on: treated like a SLOW class.
UNKNOWN = "unknown"
_SPEED_LIMIT = re.compile(r"^speed_limit_(\d+)$")


@dataclass(frozen=True)
class Prediction:
    """The classifier's answer for one located region.

    box: (x0, y0, x1, y1) frame pixels, x1/y1 exclusive; confidence: softmax probability.
    An abstained crop has class_index -1 and class_name ``UNKNOWN``. certified: whether a
    certifying defence proved the label robust (None when none checked). flagged: an input
    detector called the crop adversarial (it does not vote); scores: the detectors' scores
    by name (None when no detector ran).
    """

    box: Box
    class_index: int
    class_name: str
    confidence: float
    locator_score: float = 1.0
    certified: bool | None = None
    flagged: bool = False
    scores: dict[str, float] | None = None

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "box": list(self.box), "class_index": self.class_index,
            "class_name": self.class_name, "confidence": round(self.confidence, 4),
            "locator_score": round(self.locator_score, 4)}
        if self.certified is not None:
            out["certified"] = self.certified
        if self.scores is not None:
            out["flagged"] = self.flagged
            out["scores"] = {k: round(float(v), 4) for k, v in self.scores.items()}
        return out


@dataclass(frozen=True)
class Observation:
    """What the policy sees for one frame: zero or more predictions.

    timestamp: seconds on the source's clock; None means "ask the policy's clock".
    """

    predictions: tuple[Prediction, ...] = ()
    timestamp: float | None = None
    frame_index: int | None = None


@dataclass(frozen=True)
class Rule:
    """What a class asks for: action "stop", "slow", "limit" or "keep" (no change)."""

    action: str
    speed_cap_kmh: float | None
    brake: float


@dataclass(frozen=True)
class Decision:
    """One policy step.

    action: "none" (no sign), "hold" (sign seen, not sure enough yet), "keep" (voted class
    changes nothing), "stop" / "slow" / "limit" (cap tightened), "relax" (encounter over).
    command: the actuator command to send, or None.
    """

    action: str
    class_name: str | None
    confidence: float
    command: ActuatorCommand | None
    reason: str

    def to_dict(self) -> dict[str, object]:
        return {"action": self.action, "class_name": self.class_name,
                "confidence": round(float(self.confidence), 4),
                "command": self.command.to_dict() if self.command is not None else None,
                "reason": self.reason}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


class Policy(Protocol):
    """What the run loop needs from a policy."""

    def decide(self, observation: Observation) -> Decision: ...

    def reset(self) -> None: ...


class SignRulesPolicy:
    """Rules by class name with confidence gating, temporal voting and tighten-only encounters.

    max_speed_kmh: the highest cap ever commanded (km/h); the standing limit at start.
    confidence: minimum softmax probability for a prediction to vote (``UNKNOWN`` sightings
        vote at any confidence).
    votes_needed / window: act when one class won ``votes_needed`` of the last ``window``
        frames with a confident sighting.
    clear_after_s: seconds without any located sign that end an encounter.
    slow_kmh / slow_brake: cap and brake level for SLOW_CLASSES and ``UNKNOWN``.
    ttl_ms: time-to-live put on every command.
    clock: seconds, used when an observation carries no timestamp (injectable for tests).
    """

    name = "sign_rules"

    def __init__(self, max_speed_kmh: float = 50.0, confidence: float = 0.6,
                 votes_needed: int = 3, window: int = 5, clear_after_s: float = 0.6,
                 slow_kmh: float = 20.0, slow_brake: float = 0.3, ttl_ms: int = 500,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not max_speed_kmh > 0:
            raise ConfigError(f"max_speed_kmh={max_speed_kmh} must be > 0",
                              "give the vehicle's top speed in km/h")
        if not 0.0 < confidence <= 1.0:
            raise ConfigError(f"confidence={confidence} is outside (0, 1]",
                              "use a probability such as 0.6")
        if not 1 <= votes_needed <= window:
            raise ConfigError(f"votes_needed={votes_needed} with window={window} cannot be met",
                              "use 1 <= votes_needed <= window, e.g. 3 of 5")
        if not clear_after_s > 0:
            raise ConfigError(f"clear_after_s={clear_after_s} must be > 0",
                              "give the seconds without a sign that end an encounter")
        if not (0 <= slow_kmh and 0.0 <= slow_brake <= 1.0):
            raise ConfigError(f"slow_kmh={slow_kmh} / slow_brake={slow_brake} out of range",
                              "use slow_kmh >= 0 and slow_brake in [0, 1]")
        if ttl_ms <= 0:
            raise ConfigError(f"ttl_ms={ttl_ms} must be > 0", "use e.g. 500 ms")
        self.max_speed_kmh = float(max_speed_kmh)
        self.confidence = confidence
        self.votes_needed = votes_needed
        self.window = window
        self.clear_after_s = clear_after_s
        self.slow_kmh = float(min(slow_kmh, max_speed_kmh))
        self.slow_brake = slow_brake
        self.ttl_ms = ttl_ms
        self._clock = clock
        self._votes: deque[tuple[str, float]] = deque(maxlen=window)
        self.caution: str | None = None
        self.reset()

    # -- rules -------------------------------------------------------------------------
    def rule_for(self, class_name: str) -> Rule:
        """The rule a class maps to, already capped at ``max_speed_kmh``."""
        if class_name in STOP_CLASSES:
            return Rule("stop", 0.0, 1.0)
        if class_name in SLOW_CLASSES or class_name == UNKNOWN:
            return Rule("slow", self.slow_kmh, self.slow_brake)
        match = _SPEED_LIMIT.match(class_name)
        if match:
            return Rule("limit", min(float(match.group(1)), self.max_speed_kmh), 0.0)
        return Rule("keep", None, 0.0)

    def _rank(self, class_name: str) -> tuple[float, float]:
        # Lower sorts first: a lower resulting cap, then a higher brake.
        rule = self.rule_for(class_name)
        cap = self.max_speed_kmh + 1.0 if rule.speed_cap_kmh is None else rule.speed_cap_kmh
        return (cap, -rule.brake)

    # -- state -------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything: standing limit back to max speed, no brake, no encounter, no
        caution."""
        self.limit_kmh = self.max_speed_kmh
        self.caution = None
        self._end_encounter()

    def _end_encounter(self) -> None:
        self._votes.clear()
        self.cap_kmh = self.limit_kmh
        self.brake = 0.0
        self._encounter_rule: Rule | None = None  # the first voted rule of this encounter
        self._last_seen: float | None = None

    @property
    def tightened(self) -> bool:
        """True while the command in force is stricter than the standing limit."""
        return self.cap_kmh < self.limit_kmh or self.brake > 0.0

    @property
    def cautious(self) -> bool:
        return self.caution is not None

    def standing_command(self, reason: str = "keepalive") -> ActuatorCommand:
        """The command that holds the current state (to refresh before its TTL runs out)."""
        return ActuatorCommand(self._capped(self.cap_kmh), self.brake, 0.0, self.ttl_ms, reason)

    def _capped(self, cap_kmh: float) -> float:
        return min(cap_kmh, self.slow_kmh) if self.caution is not None else cap_kmh

    def set_caution(self, reason: str | None) -> ActuatorCommand | None:
        """Go cautious for ``reason`` (speed capped at ``slow_kmh`` until it is cleared), or
        clear it with None. Returns the command that applies the change now, or None when
        nothing changed."""
        was_cautious = self.caution is not None
        self.caution = reason
        if was_cautious == (reason is not None):
            return None  # no change, or still cautious for a newer reason
        why = f"cautious: {reason}" if reason is not None else "caution cleared"
        return self.standing_command(f"{why}; cap {self._capped(self.cap_kmh):g} km/h")

    def decide(self, observation: Observation) -> Decision:
        decision = self._decide(observation)
        command = decision.command
        if self.caution is None or command is None \
                or command.speed_cap_kmh <= self.slow_kmh:
            return decision
        reason = f"{decision.reason}; cautious ({self.caution}): cap {self.slow_kmh:g} km/h"
        return Decision(decision.action, decision.class_name, decision.confidence,
                        ActuatorCommand(self.slow_kmh, command.brake, command.steering,
                                        command.ttl_ms, reason), reason)

    def _decide(self, observation: Observation) -> Decision:
        now = observation.timestamp if observation.timestamp is not None else self._clock()
        if not observation.predictions:
            return self._no_sign(now)
        self._last_seen = now
        voting = [p for p in observation.predictions if not p.flagged]
        if not voting:
            best = max(observation.predictions, key=lambda p: p.confidence)
            return Decision("hold", best.class_name, best.confidence, None,
                            "every sighting in this frame was flagged by an input detector: "
                            "no vote")
        confident = [p for p in voting
                     if p.confidence >= self.confidence or p.class_name == UNKNOWN]
        if not confident:
            best = max(voting, key=lambda p: p.confidence)
            return Decision("hold", best.class_name, best.confidence, None,
                            f"confidence {best.confidence:.2f} below {self.confidence:.2f}")
        chosen = min(confident, key=lambda p: (*self._rank(p.class_name), -p.confidence))
        self._votes.append((chosen.class_name, chosen.confidence))
        counts = Counter(name for name, _ in self._votes)
        top = max(counts.values())
        winner = min((name for name, n in counts.items() if n == top), key=self._rank)
        # Reported confidence: mean over the winner's votes in the window.
        conf = sum(c for name, c in self._votes if name == winner) / top
        if top < self.votes_needed:
            return Decision("hold", winner, conf, None,
                            f"{winner} won {top} of the last {len(self._votes)} sightings; "
                            f"{self.votes_needed} needed")
        rule = self.rule_for(winner)
        votes = f"{winner} won {top}/{len(self._votes)} sightings"
        if rule.speed_cap_kmh is None:
            return Decision("keep", winner, conf, None,
                            f"{votes}; no rule for it, cap stays {self.cap_kmh:g} km/h")
        if self._encounter_rule is None:
            # First decision of the encounter. A speed-limit sign is the road's new limit,
            # looser or not; a stop or slow sign tightens the standing limit.
            self._encounter_rule = rule
            cap = rule.speed_cap_kmh if rule.action == "limit" \
                else min(self.limit_kmh, rule.speed_cap_kmh)
            brake = rule.brake
        else:
            cap = min(self.cap_kmh, rule.speed_cap_kmh)
            brake = max(self.brake, rule.brake)
        if cap == self.cap_kmh and brake == self.brake:
            return Decision("keep", winner, conf, None,
                            f"{votes}; already at {self.cap_kmh:g} km/h, brake "
                            f"{self.brake:.2f} (only tightens within an encounter)")
        self.cap_kmh, self.brake = cap, brake
        reason = f"{votes}: {rule.action} -> cap {cap:g} km/h, brake {brake:.2f}"
        return Decision(rule.action, winner, conf,
                        ActuatorCommand(cap, brake, 0.0, self.ttl_ms, reason), reason)

    def _no_sign(self, now: float) -> Decision:
        if self._last_seen is None or now - self._last_seen < self.clear_after_s:
            return Decision("none", None, 0.0, None, "no sign")
        rule = self._encounter_rule
        if rule is not None and rule.action == "limit" and rule.speed_cap_kmh is not None:
            self.limit_kmh = rule.speed_cap_kmh  # the limit stays after its sign is passed
        was_tight = self.tightened
        self._end_encounter()
        if not was_tight:
            return Decision("none", None, 0.0, None, "no sign; votes cleared")
        reason = (f"no sign for {self.clear_after_s:g} s: back to the standing limit "
                  f"{self.limit_kmh:g} km/h")
        return Decision("relax", None, 0.0,
                        ActuatorCommand(self.limit_kmh, 0.0, 0.0, self.ttl_ms, reason), reason)


class MonitorPolicy(SignRulesPolicy):
    """``sign_rules`` that never sends a command: a dry run that logs what it would do."""

    name = "monitor"

    def decide(self, observation: Observation) -> Decision:
        decision = super().decide(observation)
        if decision.command is None:
            return decision
        return Decision(decision.action, decision.class_name, decision.confidence, None,
                        f"monitor only, not sent: {decision.reason}")

    def set_caution(self, reason: str | None) -> ActuatorCommand | None:
        super().set_caution(reason)
        return None  # a dry run sends nothing


_POLICIES: dict[str, Callable[..., Policy]] = {}


def register_policy(name: str, factory: Callable[..., Policy] | None = None
                    ) -> Callable[..., Policy]:
    """Register ``factory`` under ``name``.

    Without a factory it returns a decorator: ``@register_policy("mine")`` on a class.
    """
    def add(f: Callable[..., Policy]) -> Callable[..., Policy]:
        _POLICIES[name] = f
        return f
    return add(factory) if factory is not None else add  # type: ignore[return-value]


def list_policies() -> list[str]:
    return sorted(_POLICIES)


def create_policy(name: str, **kwargs: object) -> Policy:
    """Build a policy by name (``list_policies()``) with keyword settings."""
    try:
        factory = _POLICIES[name]
    except KeyError:
        raise ConfigError(f"unknown decision policy '{name}'",
                          f"use one of: {', '.join(list_policies())}") from None
    try:
        return factory(**kwargs)
    except TypeError as err:
        raise ConfigError(f"bad settings for policy '{name}': {err}",
                          "check the option names against the policy's docstring") from None


register_policy("sign_rules", SignRulesPolicy)
register_policy("monitor", MonitorPolicy)
