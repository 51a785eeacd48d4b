"""What the edge loop asks of an actuator, whatever carries it (in-process, serial).

The host only ever asks to slow down or stop: a command carries a speed cap and a
brake level, both bounded, and a time-to-live after which the device must treat
it as stale and fall back to its safe state.
"""

from __future__ import annotations

import abc
import time
from dataclasses import asdict, dataclass, field

from roadshield_base.errors import ActuatorError


@dataclass(frozen=True)
class ActuatorCommand:
    """One request to the vehicle.

    speed_cap_kmh: highest speed allowed from now on, km/h (>= 0).
    brake: brake level in [0, 1]; 1 is a full stop.
    steering: steering setpoint in [-1, 1]; the sign policy always sends 0.
    ttl_ms: how long the command stays valid, milliseconds (> 0).
    reason: the decision that produced it, for the log.
    """

    speed_cap_kmh: float
    brake: float
    steering: float = 0.0
    ttl_ms: int = 500
    reason: str = ""

    def __post_init__(self) -> None:
        if not (self.speed_cap_kmh >= 0.0):
            raise ActuatorError(f"speed cap {self.speed_cap_kmh} km/h is negative or NaN",
                                "use a value >= 0")
        if not (0.0 <= self.brake <= 1.0):
            raise ActuatorError(f"brake level {self.brake} is outside [0, 1]",
                                "clamp the brake level to [0, 1]")
        if not (-1.0 <= self.steering <= 1.0):
            raise ActuatorError(f"steering {self.steering} is outside [-1, 1]",
                                "clamp steering to [-1, 1]")
        if self.ttl_ms <= 0:
            raise ActuatorError(f"ttl {self.ttl_ms} ms is not positive", "use a ttl > 0 ms")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class Actuator(abc.ABC):
    """Receives commands from the decision policy; a context manager."""

    name: str = "actuator"

    @abc.abstractmethod
    def send(self, command: ActuatorCommand) -> None:
        """Deliver one command (may raise ActuatorError)."""

    @abc.abstractmethod
    def safe_stop(self, reason: str) -> None:
        """Bring the vehicle to its safe state: brake on, steering neutral."""

    def close(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release the link; the default holds nothing."""

    def __enter__(self) -> Actuator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class RecordedCommand:
    t: float
    command: ActuatorCommand


@dataclass
class RecordingActuator(Actuator):
    """In-process actuator that keeps every command it was given, in order."""

    name: str = "recording"
    commands: list[RecordedCommand] = field(default_factory=list)
    safe_stops: list[str] = field(default_factory=list)
    closed: bool = False

    def send(self, command: ActuatorCommand) -> None:
        if self.closed:
            raise ActuatorError("command sent to a closed actuator", "open a new actuator")
        self.commands.append(RecordedCommand(time.monotonic(), command))

    def safe_stop(self, reason: str) -> None:
        self.safe_stops.append(reason)
        self.commands.append(RecordedCommand(
            time.monotonic(), ActuatorCommand(0.0, 1.0, 0.0, 1000, f"safe stop: {reason}")))

    def close(self) -> None:  # noqa: B027 - optional hook, not abstract
        self.closed = True
