"""systemd's notify protocol, spoken directly over ``$NOTIFY_SOCKET`` (no libsystemd).

A ``Type=notify`` service tells systemd how it is doing by sending datagrams of
newline-separated ``KEY=value`` lines to the AF_UNIX socket named in ``$NOTIFY_SOCKET``
(sd_notify(3)): ``READY=1`` once it serves, ``WATCHDOG=1`` at least once per
``WatchdogSec=`` (systemd passes it as ``$WATCHDOG_USEC``, microseconds), ``STOPPING=1``
when it shuts down and ``STATUS=...``, the line ``systemctl status`` shows. A name that
starts with ``@`` is in the abstract namespace (the ``@`` stands for a leading NUL byte).

Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op, so the edge loop sends the
same notifications wherever it runs. A send that fails is logged once and not raised:
the loop goes on driving the car, and a watchdog left unfed restarts the service anyway.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

from roadshield_base.errors import ConfigError

log = logging.getLogger(__name__)

#: how often STATUS= is refreshed when no watchdog asks for more (seconds)
STATUS_INTERVAL_S = 5.0
_HINT = "run under systemd (Type=notify), or unset the variable to run without it"


def socket_address(value: str) -> str | bytes:
    """The ``connect`` address of a ``$NOTIFY_SOCKET`` value: an absolute path, or
    ``@name`` for the abstract namespace (returned as bytes with a leading NUL)."""
    if value.startswith("@"):
        if len(value) < 2:
            raise ConfigError("NOTIFY_SOCKET='@' names no abstract socket", _HINT)
        return b"\0" + value[1:].encode()
    if not value.startswith("/"):
        # systemd 253+ also hands out vsock:CID:PORT (virtual machines); not a Jetson's case
        raise ConfigError(f"NOTIFY_SOCKET={value!r} is neither an absolute path nor @name",
                          _HINT)
    return value


def watchdog_interval(env: Mapping[str, str], pid: int | None = None) -> float | None:
    """Seconds between watchdog pings: half of ``$WATCHDOG_USEC`` (sd_watchdog_enabled(3)
    advises pinging at half the timeout), or None when there is no watchdog for this
    process (no ``$WATCHDOG_USEC``, or ``$WATCHDOG_PID`` names another process)."""
    raw = env.get("WATCHDOG_USEC")
    if raw is None or raw == "":
        return None
    owner = env.get("WATCHDOG_PID")
    if owner:
        if not owner.isdigit():
            raise ConfigError(f"WATCHDOG_PID={owner!r} is not a process id", _HINT)
        if int(owner) != (os.getpid() if pid is None else pid):
            return None  # the watchdog belongs to another process (e.g. a wrapper)
    if not raw.isdigit() or int(raw) == 0:
        raise ConfigError(f"WATCHDOG_USEC={raw!r} is not a positive number of microseconds",
                          "set WatchdogSec= in the unit (e.g. WatchdogSec=10s)")
    return int(raw) / 2e6


class Notifier:
    """Sends sd_notify messages to one socket; does nothing when ``address`` is None.

    address: a ``$NOTIFY_SOCKET`` value (see ``socket_address``).
    watchdog_s: seconds between ``WATCHDOG=1`` pings (``watchdog_interval``); None sends
        none. ``tick`` sends at most one ping per interval, however often it is called.
    clock: monotonic seconds (a test passes its own).
    """

    def __init__(self, address: str | None, watchdog_s: float | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.address = address
        self._target = socket_address(address) if address is not None else None
        if watchdog_s is not None and not watchdog_s > 0:
            raise ConfigError(f"watchdog_s={watchdog_s} must be > 0 or None",
                              "half of WatchdogSec=, in seconds")
        self.watchdog_s = watchdog_s
        self._clock = clock
        self._sock: socket.socket | None = None
        self._last_tick = float("-inf")
        self._failed = False
        self.sent = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        """The notifier systemd set up for this process (``$NOTIFY_SOCKET``,
        ``$WATCHDOG_USEC``, ``$WATCHDOG_PID``); a no-op one outside systemd."""
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET") or None
        return cls(address, watchdog_interval(env) if address else None)

    @property
    def enabled(self) -> bool:
        return self._target is not None

    def send(self, **fields: str | int) -> bool:
        """Send one datagram of ``KEY=value`` lines, e.g. ``send(READY=1, STATUS="up")``;
        True when it went out. Newlines in a value would start a new field: refused."""
        if self._target is None:
            return False
        lines = []
        for key, value in fields.items():
            text = str(value)
            if "\n" in text:
                raise ConfigError(f"sd_notify field {key} holds a newline",
                                  "send one line per field")
            lines.append(f"{key}={text}")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX,
                                           socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(lines).encode(), self._target)
        except OSError as err:
            if not self._failed:  # once: a dead socket would otherwise log every frame
                log.warning("sd_notify to %s failed: %s", self.address, err)
                self._failed = True
            return False
        self.sent += 1
        return True

    def ready(self, status: str) -> bool:
        """``READY=1``: start-up is over (the unit leaves "activating")."""
        self._last_tick = self._clock()
        fields: dict[str, str | int] = {"READY": 1, "STATUS": status}
        if self.watchdog_s is not None:
            fields["WATCHDOG"] = 1
        return self.send(**fields)

    def tick(self, status: Callable[[], str] | None = None) -> bool:
        """Call once per loop iteration: pings the watchdog (and refreshes STATUS= from
        ``status()``) when an interval has passed since the last one; cheap otherwise.
        Without a watchdog, STATUS= is refreshed every ``STATUS_INTERVAL_S``."""
        if self._target is None:
            return False
        interval = self.watchdog_s if self.watchdog_s is not None else STATUS_INTERVAL_S
        now = self._clock()
        if now - self._last_tick < interval:
            return False
        self._last_tick = now
        fields: dict[str, str | int] = {}
        if self.watchdog_s is not None:
            fields["WATCHDOG"] = 1
        if status is not None:
            fields["STATUS"] = status()
        return self.send(**fields) if fields else False

    def stopping(self, status: str) -> bool:
        """``STOPPING=1``: the service is shutting down (or failed)."""
        return self.send(STOPPING=1, STATUS=status)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
