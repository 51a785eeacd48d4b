"""The sign_rules decision policy: rules, confidence gate, voting, tighten-only, relax."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime import policy as policy_mod
from edge_runtime.policy import (
    Decision,
    MonitorPolicy,
    Observation,
    Prediction,
    Rule,
    SignRulesPolicy,
    create_policy,
    list_policies,
    register_policy,
)
from roadshield_base.errors import ConfigError


def obs(*preds: tuple[str, float], t: float | None = None) -> Observation:
    return Observation(tuple(Prediction((0, 0, 10, 10), i, name, conf)
                             for i, (name, conf) in enumerate(preds)), t)


def run(policy: SignRulesPolicy, frames: list[Observation]) -> list[Decision]:
    return [policy.decide(o) for o in frames]


def commands(decisions: list[Decision]) -> list[tuple[str, float, float]]:
    return [(d.action, d.command.speed_cap_kmh, d.command.brake)
            for d in decisions if d.command is not None]


def test_rules_by_class_name() -> None:
    p = SignRulesPolicy(max_speed_kmh=60, slow_kmh=20, slow_brake=0.3)
    assert p.rule_for("stop") == Rule("stop", 0.0, 1.0)
    assert p.rule_for("no_entry") == Rule("stop", 0.0, 1.0)
    for name in ("yield", "pedestrians", "general_caution", "roundabout", "children_crossing"):
        assert p.rule_for(name) == Rule("slow", 20.0, 0.3)
    assert p.rule_for("speed_limit_30") == Rule("limit", 30.0, 0.0)
    assert p.rule_for("speed_limit_120") == Rule("limit", 60.0, 0.0)  # capped at max speed
    for name in ("priority_road", "ahead_only", "end_speed_limit_80", "turn_left_ahead"):
        assert p.rule_for(name).action == "keep"


def test_three_of_five_votes_then_full_brake() -> None:
    p = SignRulesPolicy()
    decisions = run(p, [obs(("stop", 0.9), t=i * 0.1) for i in range(5)])
    assert [d.action for d in decisions] == ["hold", "hold", "stop", "keep", "keep"]
    assert commands(decisions) == [("stop", 0.0, 1.0)]
    assert decisions[2].class_name == "stop" and decisions[2].confidence == pytest.approx(0.9)


def test_one_fooled_frame_moves_nothing() -> None:
    p = SignRulesPolicy(max_speed_kmh=100)
    frames = [obs(("speed_limit_50", 0.9), t=i * 0.1) for i in range(6)]
    frames.insert(4, obs(("stop", 0.99), t=0.35))  # a sticker fools the classifier once
    decisions = run(p, frames)
    assert commands(decisions) == [("limit", 50.0, 0.0)]
    # and a lone fooled frame outside any encounter does nothing either
    assert commands(run(SignRulesPolicy(), [obs(("stop", 0.99), t=0.0)])) == []


def test_low_confidence_makes_no_decision_and_casts_no_vote() -> None:
    p = SignRulesPolicy(confidence=0.6)
    decisions = run(p, [obs(("stop", 0.55), t=i * 0.1) for i in range(6)])
    assert {d.action for d in decisions} == {"hold"}
    assert "below 0.60" in decisions[0].reason
    assert commands(decisions) == []
    # the three confident frames that follow are what it takes
    more = run(p, [obs(("stop", 0.8), t=1 + i * 0.1) for i in range(3)])
    assert commands(more) == [("stop", 0.0, 1.0)]


def test_only_tightens_within_an_encounter() -> None:
    p = SignRulesPolicy(max_speed_kmh=100)
    first = run(p, [obs(("speed_limit_30", 0.9), t=i * 0.1) for i in range(3)])
    looser = run(p, [obs(("speed_limit_70", 0.9), t=0.3 + i * 0.1) for i in range(5)])
    assert commands(first) == [("limit", 30.0, 0.0)]
    assert commands(looser) == []
    assert looser[-1].action == "keep" and "only tightens" in looser[-1].reason
    tighter = run(p, [obs(("yield", 0.9), t=1 + i * 0.1) for i in range(5)])
    assert commands(tighter) == [("slow", 20.0, 0.3)]


def test_most_restrictive_confident_prediction_gets_the_vote() -> None:
    p = SignRulesPolicy()
    # a decoy labelled speed_limit_30 sits beside a stop sign on every frame
    decisions = run(p, [obs(("speed_limit_30", 0.97), ("stop", 0.7), t=i * 0.1)
                        for i in range(3)])
    assert commands(decisions) == [("stop", 0.0, 1.0)]


def test_relaxes_after_clear_time_with_injected_clock() -> None:
    now = [0.0]
    p = SignRulesPolicy(max_speed_kmh=45, clear_after_s=2.0, clock=lambda: now[0])

    def at(t: float, o: Observation) -> Decision:
        now[0] = t
        return p.decide(o)

    seen = [at(0.1 * i, obs(("stop", 0.9))) for i in range(4)]
    assert commands(seen) == [("stop", 0.0, 1.0)]
    assert at(1.0, obs()).action == "none"
    assert at(2.2, obs()).command is None  # last sign at 0.3 s: 1.9 s without a sign
    relax = at(2.31, obs())
    assert relax.action == "relax"
    assert relax.command is not None
    assert (relax.command.speed_cap_kmh, relax.command.brake) == (45.0, 0.0)
    assert at(3.0, obs()).command is None  # relaxed once, not on every frame
    # a new encounter needs its own three votes
    again = [at(4 + 0.1 * i, obs(("stop", 0.9))) for i in range(3)]
    assert [d.action for d in again] == ["hold", "hold", "stop"]


def test_votes_expire_with_the_encounter() -> None:
    p = SignRulesPolicy(clear_after_s=1.0)
    run(p, [obs(("stop", 0.9), t=0.0), obs(("stop", 0.9), t=0.1)])
    assert p.decide(obs(t=1.5)).reason == "no sign; votes cleared"
    assert p.decide(obs(("stop", 0.9), t=1.6)).action == "hold"  # 1 vote, not 3


names = st.sampled_from(["stop", "yield", "speed_limit_30", "speed_limit_80",
                         "speed_limit_120", "priority_road", "no_entry", "roundabout"])
frames_st = st.lists(st.tuples(st.lists(st.tuples(names, st.floats(0, 1)), max_size=3),
                               st.floats(0, 0.8)), max_size=60)


@settings(max_examples=60, deadline=None)
@given(frames=frames_st, max_speed=st.floats(5, 130))
def test_never_commands_above_max_speed(frames: list, max_speed: float) -> None:
    p = SignRulesPolicy(max_speed_kmh=max_speed)
    t = 0.0
    for preds, dt in frames:
        t += dt
        d = p.decide(obs(*preds, t=t))
        if d.command is not None:
            assert 0.0 <= d.command.speed_cap_kmh <= max_speed
            assert 0.0 <= d.command.brake <= 1.0 and d.command.steering == 0.0
        json.loads(d.to_json())


def test_decision_is_json() -> None:
    p = SignRulesPolicy()
    d = run(p, [obs(("stop", 0.9), t=i * 0.1) for i in range(3)])[-1]
    data = json.loads(d.to_json())
    assert data["action"] == "stop" and data["class_name"] == "stop"
    assert data["command"]["speed_cap_kmh"] == 0.0 and data["command"]["brake"] == 1.0
    assert json.loads(Decision("none", None, 0.0, None, "no sign").to_json())["command"] is None
    assert p.standing_command().to_dict()["brake"] == 1.0


def test_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    assert {"sign_rules", "monitor"} <= set(list_policies())
    p = create_policy("sign_rules", max_speed_kmh=30, votes_needed=2, window=3)
    assert isinstance(p, SignRulesPolicy) and p.max_speed_kmh == 30.0
    with pytest.raises(ConfigError, match="unknown decision policy 'fast'"):
        create_policy("fast")
    with pytest.raises(ConfigError, match="bad settings for policy 'sign_rules'"):
        create_policy("sign_rules", top_speed=3)
    monkeypatch.setattr(policy_mod, "_POLICIES", dict(policy_mod._POLICIES))

    @register_policy("cautious")
    class Cautious(SignRulesPolicy):
        pass

    assert isinstance(create_policy("cautious"), Cautious)


def test_monitor_never_sends() -> None:
    p = MonitorPolicy()
    decisions = run(p, [obs(("stop", 0.9), t=i * 0.1) for i in range(4)])
    assert decisions[2].action == "stop" and decisions[2].command is None
    assert decisions[2].reason.startswith("monitor only")


@pytest.mark.parametrize("kwargs, match", [
    ({"max_speed_kmh": 0}, "max_speed_kmh"),
    ({"confidence": 1.5}, "confidence"),
    ({"votes_needed": 6, "window": 5}, "cannot be met"),
    ({"clear_after_s": 0}, "clear_after_s"),
    ({"slow_brake": 2}, "slow_brake"),
    ({"ttl_ms": 0}, "ttl_ms"),
])
def test_bad_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SignRulesPolicy(**kwargs)


def encounter(p: SignRulesPolicy, name: str, t0: float, frames: int = 4) -> list[Decision]:
    """``frames`` sightings of ``name`` 0.1 s apart, then 1.5 s of empty road."""
    seen = run(p, [obs((name, 0.9), t=t0 + 0.1 * i) for i in range(frames)])
    return seen + [p.decide(obs(t=t0 + 0.1 * frames + 1.5))]


def test_speed_limit_outlives_its_encounter_and_stop_returns_to_it() -> None:
    p = SignRulesPolicy(max_speed_kmh=80, clear_after_s=1.0)
    limit = encounter(p, "speed_limit_50", 0.0)
    # the limit is commanded once and stays: passing the sign sends no relax command
    assert commands(limit) == [("limit", 50.0, 0.0)]
    assert p.limit_kmh == 50.0
    stop = encounter(p, "stop", 10.0)
    # after the stop sign, the car resumes at the standing 50 km/h, not at max speed
    assert commands(stop) == [("stop", 0.0, 1.0), ("relax", 50.0, 0.0)]
    slow = encounter(p, "pedestrians", 20.0)
    assert commands(slow) == [("slow", 20.0, 0.3), ("relax", 50.0, 0.0)]


def test_a_new_speed_limit_sign_may_loosen_but_never_past_max_speed() -> None:
    p = SignRulesPolicy(max_speed_kmh=60, clear_after_s=1.0)
    assert commands(encounter(p, "speed_limit_30", 0.0)) == [("limit", 30.0, 0.0)]
    assert commands(encounter(p, "speed_limit_100", 10.0)) == [("limit", 60.0, 0.0)]
    assert p.limit_kmh == 60.0


def test_late_votes_in_an_encounter_cannot_loosen_a_stop() -> None:
    p = SignRulesPolicy(votes_needed=3, window=5)
    first = run(p, [obs(("stop", 0.9), t=0.1 * i) for i in range(3)])
    # an attacker flips every later frame of the same encounter to a speed limit
    later = run(p, [obs(("speed_limit_50", 0.99), t=0.3 + 0.1 * i) for i in range(10)])
    assert commands(first + later) == [("stop", 0.0, 1.0)]
    assert (p.cap_kmh, p.brake) == (0.0, 1.0)


def flagged(name: str, conf: float = 0.95) -> Prediction:
    return Prediction((0, 0, 10, 10), 0, name, conf, flagged=True, scores={"squeeze": 1.5})


def test_flagged_sightings_do_not_vote() -> None:
    p = SignRulesPolicy(votes_needed=3, window=5)
    decisions = [p.decide(Observation((flagged("speed_limit_100"),), t)) for t in (0, .1, .2)]
    assert [d.action for d in decisions] == ["hold"] * 3
    assert all("flagged" in d.reason and d.command is None for d in decisions)
    # a clean sighting beside a flagged one votes alone
    mixed = [p.decide(Observation((flagged("speed_limit_100"),
                                   Prediction((0, 0, 9, 9), 1, "stop", 0.9)), t))
             for t in (.3, .4, .5)]
    assert commands(mixed) == [("stop", 0.0, 1.0)]
    assert flagged("stop").to_dict()["flagged"] is True
    assert "flagged" not in Prediction((0, 0, 1, 1), 0, "stop", 1.0).to_dict()


def test_caution_caps_every_command_until_cleared() -> None:
    p = SignRulesPolicy(max_speed_kmh=100, slow_kmh=20)
    on = p.set_caution("detectors flagged 40 % of the last 30 crops")
    assert on is not None and on.speed_cap_kmh == 20 and on.brake == 0.0
    assert "cautious" in on.reason and p.cautious
    assert p.set_caution("a newer reason") is None  # still cautious: nothing new to send
    limit = commands(encounter(p, "speed_limit_70", 0.0))
    assert limit == [("limit", 20.0, 0.0)]  # the sign says 70; caution holds 20
    assert p.standing_command().speed_cap_kmh == 20
    stop = commands(encounter(p, "stop", 5.0))
    # stricter commands pass unchanged; the return to the road's 70 is held at 20
    assert stop == [("stop", 0.0, 1.0), ("relax", 20.0, 0.0)]
    off = p.set_caution(None)
    assert off is not None and off.speed_cap_kmh == 70.0 and "cleared" in off.reason
    assert p.set_caution(None) is None and not p.cautious
    p.reset()
    assert p.set_caution("again") is not None and p.reset() is None and not p.cautious


def test_monitor_policy_goes_cautious_without_sending() -> None:
    p = MonitorPolicy()
    assert p.set_caution("flags") is None and p.cautious
