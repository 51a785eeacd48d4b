"""``SerialActuator``: the edge loop's Actuator over the authenticated serial link.

Mapping of an ActuatorCommand to a SETPOINT (all per mille):
* throttle limit = 1000 * min(speed_cap_kmh, max_speed_kmh) / max_speed_kmh, so the host
  can never ask for more than the policy's own limit;
* brake = 1000 * brake;
* steering is clamped to +-``steering_limit`` (0 by default: the sign policy only slows
  or stops, it never steers), and the device clamps and slews it again;
* ttl = ttl_ms (at most 65535).
``safe_stop`` sends COMMAND brake (acknowledged, retried); the device latches its safe
state until ``arm()`` with a fresh heartbeat.
"""

from __future__ import annotations

import logging
import os

from roadshield_base.errors import ActuatorError

from . import messages as m
from .interface import Actuator, ActuatorCommand
from .keys import load_key
from .link import SerialLink

log = logging.getLogger(__name__)


def command_to_setpoint(command: ActuatorCommand, max_speed_kmh: float,
                        steering_limit: float = 0.0) -> m.Setpoint:
    """The SETPOINT a command becomes (see the module docstring)."""
    cap = min(command.speed_cap_kmh, max_speed_kmh)
    throttle = round(m.FULL * cap / max_speed_kmh)
    brake = round(m.FULL * command.brake)
    lim = max(0.0, min(1.0, steering_limit))
    steering = round(m.FULL * max(-lim, min(lim, command.steering)))
    return m.Setpoint(brake, steering, throttle, min(int(command.ttl_ms), 0xFFFF))


class SerialActuator(Actuator):
    """Drives a roadshield actuator board (or the simulator) on ``port``.

    key: the device key, or a path to its key file. max_speed_kmh: the policy's limit,
    which maps to throttle limit 1000. arm: arm the board once connected.
    auto_rearm: when the board has latched its safe state (link timeout, host brake),
    re-arm before the next command instead of raising; off by default, because the
    latch exists so that a person looks at why it braked.
    """

    name = "serial"

    def __init__(self, port: str, key: bytes | str | os.PathLike[str], *,
                 max_speed_kmh: float = 50.0, steering_limit: float = 0.0, arm: bool = True,
                 auto_rearm: bool = False, hello_timeout_s: float = 3.0,
                 link: SerialLink | None = None) -> None:
        if not max_speed_kmh > 0:
            raise ActuatorError(f"max_speed_kmh={max_speed_kmh} must be > 0",
                                "pass the policy's max speed, e.g. 50")
        device_key = key if isinstance(key, bytes) else load_key(key)
        self.max_speed_kmh = float(max_speed_kmh)
        self.steering_limit = float(steering_limit)
        self.auto_rearm = auto_rearm
        self.link = link or SerialLink(port, device_key, hello_timeout_s=hello_timeout_s)
        if not self.link.is_open:
            self.link.open()
        self.sent = 0
        if arm:
            self.arm()

    def arm(self) -> None:
        """Arm the board (needs a fresh heartbeat, which the link keeps sending)."""
        ack = self.link.arm()
        if ack.result != m.RESULT_OK:
            raise ActuatorError(f"the board on {self.link.port} refused to arm "
                                f"({m.RESULT_NAMES.get(ack.result, ack.result)})",
                                "an unprovisioned board (or one booted with its provisioning "
                                "button held) cannot arm: run `roadshield actuator provision`, "
                                "then reset it without the button; otherwise check "
                                "`roadshield actuator status`")

    def send(self, command: ActuatorCommand) -> None:
        state = self.link.state
        if state.device_state == m.STATE_SAFE:
            if not self.auto_rearm:
                raise ActuatorError(
                    f"the board on {self.link.port} is latched in its safe state "
                    f"({m.FAULT_NAMES.get(state.device_fault, state.device_fault)}); "
                    "commands are refused",
                    "find why (`roadshield actuator status`), then restart the run to re-arm")
            self.arm()
        sp = command_to_setpoint(command, self.max_speed_kmh, self.steering_limit)
        self.link.send_setpoint(sp.brake, sp.steering, sp.throttle, sp.ttl_ms)
        self.sent += 1

    def safe_stop(self, reason: str) -> None:
        log.warning("safe stop on %s: %s", self.link.port, reason)
        self.link.brake()

    def close(self) -> None:
        try:
            if self.link.state.connected:
                self.link.disarm()
        except ActuatorError as err:  # the board brakes on its own watchdog anyway
            log.warning("disarm on close failed: %s", err)
        finally:
            self.link.close()
