"""The device simulator: the Python ``Device`` behind a real pseudo-terminal.

The simulator holds the master end of a pty pair; the host link opens the slave end
(``/dev/pts/N``, or a stable symlink such as ``/tmp/roadshield-ttyACM0``) with pyserial
exactly as it would open ``/dev/ttyACM0``. Time comes from a monotonic clock in
milliseconds; every state change is recorded with its time, so tests and the benchmark
can measure how long the device took to reach its safe state.

Run it alone: ``roadshield actuator simulate --link /tmp/rs-tty --key-file dev.key``
(or ``python -m actuator.simulator ...``). ``--provision-button`` boots it as a board
whose provisioning button is held: it then accepts one PROVISION (key agreement).
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import threading
import time
import tty
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from roadshield_base.errors import ActuatorError

from . import messages as m
from .device import Device
from .keys import load_key, save_key


@dataclass(frozen=True)
class Transition:
    """The device changed state at monotonic time ``t`` (seconds)."""

    t: float
    state: int
    fault: int


class PtySimulator:
    """Runs ``Device`` in a thread on the master end of a new pty.

    key: the device key (None: an unprovisioned board). link_path: optional symlink
    made to point at the slave, replaced atomically, so a restarted simulator keeps the
    path the host opened. key_file: where a key agreed by PROVISION / REKEY is saved
    (hex), as the board keeps it in EEPROM. provision_button: boot as if the board's
    provisioning button were held (physical presence).
    """

    def __init__(self, key: bytes | None, *, link_path: str | os.PathLike[str] | None = None,
                 key_file: str | os.PathLike[str] | None = None, tick_s: float = 0.002,
                 clock: Callable[[], float] = time.monotonic,
                 random: Callable[[int], bytes] | None = None,
                 provision_button: bool = False) -> None:
        self.device = Device(key, random, provision_button=provision_button)
        self.link_path = Path(link_path) if link_path is not None else None
        self.key_file = Path(key_file) if key_file is not None else None
        self.tick_s = tick_s
        self.clock = clock
        self.lock = threading.Lock()
        self.transitions: list[Transition] = []
        self.frames_in = 0
        self._master = self._slave = -1
        self.slave_path = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> str:
        """The path a host should open."""
        return str(self.link_path) if self.link_path is not None else self.slave_path

    def now_ms(self) -> int:
        return int(self.clock() * 1000) & 0xFFFFFFFF

    def start(self) -> PtySimulator:
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)  # no echo, no line editing: the device's bytes pass as-is
        os.set_blocking(self._master, False)
        self.slave_path = os.ttyname(self._slave)
        if self.link_path is not None:
            tmp = self.link_path.with_name(f".{self.link_path.name}.{os.getpid()}.tmp")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(self.slave_path)
            os.replace(tmp, self.link_path)
        with self.lock:
            self._write(self.device.boot(self.now_ms()))
            self.transitions.append(Transition(self.clock(), self.device.state,
                                               self.device.fault))
        self._thread = threading.Thread(target=self._run, name="pty-simulator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        for fd in (self._master, self._slave):
            if fd >= 0:
                os.close(fd)
        self._master = self._slave = -1
        if self.link_path is not None and self.link_path.is_symlink() \
                and os.readlink(self.link_path) == self.slave_path:
            self.link_path.unlink(missing_ok=True)

    def __enter__(self) -> PtySimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return self.device.snapshot()

    def safe_since(self, t: float) -> float | None:
        """Monotonic time of the first entry into SAFE at or after ``t``, if any."""
        with self.lock:
            return next((tr.t for tr in self.transitions
                         if tr.t >= t and tr.state == m.STATE_SAFE), None)

    def _write(self, frames: list[bytes]) -> None:
        for frame in frames:
            try:
                os.write(self._master, frame)
            except (BlockingIOError, OSError):
                return  # nobody reads the slave: a UART with no listener drops bytes too

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._master], [], [], self.tick_s)
            data = b""
            if ready:
                try:
                    data = os.read(self._master, 4096)
                except (BlockingIOError, OSError):
                    data = b""
            with self.lock:
                before = (self.device.state, self.device.fault)
                now = self.now_ms()
                frames = self.device.feed(data, now) if data else self.device.tick(now)
                self.frames_in += data.count(0)
                after = (self.device.state, self.device.fault)
                if after != before:
                    self.transitions.append(Transition(self.clock(), *after))
                if self.device.key_changed and self.key_file is not None:
                    save_key(self.key_file, self.device.key)
                    self.device.key_changed = False
                self._write(frames)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="actuator device simulator on a pty")
    add_simulate_arguments(parser)
    return simulate(parser.parse_args(argv))


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--link", default=None,
                        help="also make this symlink point at the pty (e.g. /tmp/rs-ttyACM0)")
    parser.add_argument("--key-file", default=None,
                        help="device key (hex); missing file = unprovisioned board")
    parser.add_argument("--duration", type=float, default=None, help="stop after N seconds")
    parser.add_argument("--provision-button", action="store_true",
                        help="boot with the provisioning button held: accept one PROVISION")


def simulate(args: argparse.Namespace) -> int:
    key_file = Path(args.key_file) if args.key_file else None
    key = load_key(key_file) if key_file is not None and key_file.exists() else None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        sim = PtySimulator(key, link_path=args.link, key_file=key_file,
                           provision_button=args.provision_button).start()
    except OSError as err:
        raise ActuatorError(f"cannot create the simulator's pty or link {args.link}: {err}",
                            "pick a --link path in a writable folder") from err
    state = "provisioned" if key is not None else "unprovisioned"
    if args.provision_button:
        state += ", provisioning button held (accepts one PROVISION)"
    elif key is None:
        state += " (restart with --provision-button to provision it)"
    print(f"roadshield actuator simulator on {sim.slave_path}"
          + (f" (link {sim.link_path})" if sim.link_path else "") + f", {state}", flush=True)
    try:
        stop.wait(args.duration)
    finally:
        sim.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
