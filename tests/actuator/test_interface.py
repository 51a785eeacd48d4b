"""The actuator interface: bounded commands and the in-process recording actuator."""

from __future__ import annotations

import math

import pytest

from actuator.interface import ActuatorCommand, RecordingActuator
from roadshield_base.errors import ActuatorError


@pytest.mark.parametrize("kwargs, field", [
    ({"speed_cap_kmh": -1.0, "brake": 0.0}, "speed cap"),
    ({"speed_cap_kmh": math.nan, "brake": 0.0}, "speed cap"),
    ({"speed_cap_kmh": 30.0, "brake": 1.5}, "brake"),
    ({"speed_cap_kmh": 30.0, "brake": math.nan}, "brake"),
    ({"speed_cap_kmh": 30.0, "brake": 0.0, "steering": -1.2}, "steering"),
    ({"speed_cap_kmh": 30.0, "brake": 0.0, "ttl_ms": 0}, "ttl"),
])
def test_out_of_range_commands_are_refused(kwargs, field):
    with pytest.raises(ActuatorError, match=field):
        ActuatorCommand(**kwargs)


def test_recording_actuator_keeps_commands_in_order():
    act = RecordingActuator()
    first = ActuatorCommand(30.0, 0.0, reason="speed_limit_30")
    second = ActuatorCommand(0.0, 1.0, reason="stop")
    with act:
        act.send(first)
        act.send(second)
    assert [r.command for r in act.commands] == [first, second]
    assert act.commands[0].t <= act.commands[1].t
    assert act.closed
    with pytest.raises(ActuatorError, match="closed"):
        act.send(first)


def test_safe_stop_records_full_brake_and_neutral_steering():
    act = RecordingActuator()
    act.safe_stop("camera lost")
    assert act.safe_stops == ["camera lost"]
    cmd = act.commands[-1].command
    assert (cmd.speed_cap_kmh, cmd.brake, cmd.steering) == (0.0, 1.0, 0.0)
    assert cmd.to_dict()["reason"] == "safe stop: camera lost"
