"""The caution gate: the flagged share over a window of crops, with hysteresis."""

from __future__ import annotations

import numpy as np
import pytest

from edge_runtime.caution import CautionGate
from roadshield_base.errors import ConfigError


def test_switches_on_above_the_limit_and_off_at_the_clear_level() -> None:
    gate = CautionGate(window=10, limit=0.3, clear=0.05)
    changes = []
    for flag in [1, 1, 1, 1] + [0] * 5:  # 4 of 9: the window is not full yet
        changes.append(gate.update(np.array([flag])))
    assert all(c == (False, None) for c in changes) and not gate.active
    changed, reason = gate.update(np.array([False]))  # 10 crops, 40 % flagged
    assert changed and gate.active and reason is not None and "40%" in reason
    # 2 of the last 10 flagged: 20 % is below the limit but above the clear level: stays on
    for _ in range(2):
        assert gate.update(np.array([0])) == (False, gate.reason())
    assert gate.active and gate.rate == pytest.approx(0.2)
    gate.update(np.zeros(1))
    assert gate.update(np.zeros(1)) == (True, None) and not gate.active  # 0 %
    assert gate.update(np.array([], dtype=bool)) == (False, None)


def test_one_frame_may_bring_several_crops() -> None:
    gate = CautionGate(window=4, limit=0.5, clear=0.0)
    assert gate.update(np.array([True, True, True, False]))[0]


@pytest.mark.parametrize("kwargs", [{"window": 1}, {"window": 2.5}, {"limit": 0.0},
                                    {"limit": 1.5}, {"clear": 0.4}, {"clear": -0.1}])
def test_bad_settings(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        CautionGate(**kwargs)
