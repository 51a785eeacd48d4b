"""Host side of the actuator link, on pyserial.

``SerialLink(port, key).open()`` opens ``/dev/ttyACM0`` (or a pty), waits for the
board's HELLO instead of sleeping through its reset, derives the session key from the
HELLO's nonce, then a background thread reads frames, sends a HEARTBEAT every
``heartbeat_s`` seconds, notices a silent device (``lost_after_s``), and reopens the
port after it vanished (USB unplugged, simulator restarted), following the device into
each new session. ``state`` is the latest picture of the device.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from roadshield_base.errors import ActuatorError

from . import messages as m
from . import protocol as p

log = logging.getLogger(__name__)

UDEV_HINT = ("install actuator/99-roadshield-actuator.rules into /etc/udev/rules.d/ and "
             "run `sudo udevadm control --reload && sudo udevadm trigger`, or add yourself "
             "to the dialout group (`sudo usermod -aG dialout $USER`, then log in again)")


@dataclass(frozen=True)
class DeviceState:
    """What the host knows of the device. Times are ``time.monotonic()`` seconds."""

    connected: bool = False
    device_state: int = m.STATE_SAFE  # from the latest HEARTBEAT / STATUS / FAULT
    device_fault: int = m.FAULT_NONE
    firmware: str = ""
    provisioned: bool = False
    nonce: str = ""
    sessions: int = 0
    status: m.Status | None = None
    status_t: float = 0.0
    last_rx: float = 0.0
    faults: tuple[int, ...] = ()
    rx_rejected: dict[str, int] = field(default_factory=dict)
    hello_bad_tag: int = 0
    reconnects: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"connected": self.connected,
                "state": m.STATE_NAMES.get(self.device_state, str(self.device_state)),
                "fault": m.FAULT_NAMES.get(self.device_fault, str(self.device_fault)),
                "firmware": self.firmware,
                "provisioned": self.provisioned, "sessions": self.sessions,
                "status": self.status.to_dict() if self.status else None,
                "faults": [m.FAULT_NAMES.get(f, str(f)) for f in self.faults],
                "rx_rejected": dict(self.rx_rejected), "reconnects": self.reconnects}


def open_serial(port: str, baudrate: int = 115200) -> Any:
    """Open ``port`` exclusively; every failure becomes one ActuatorError with its fix."""
    try:
        import serial  # type: ignore[import-untyped]
    except ImportError as err:
        raise ActuatorError("pyserial is not installed", "pip install pyserial") from err
    try:
        return serial.Serial(port, baudrate, timeout=0.01, write_timeout=0.5, exclusive=True)
    except serial.SerialException as err:
        code = err.args[0] if err.args and isinstance(err.args[0], int) else err.errno
        text = str(err)
        if code == errno.ENOENT or "No such file" in text:
            raise ActuatorError(f"serial port {port} does not exist",
                                "plug the board in and list ports with `ls /dev/ttyACM* "
                                "/dev/ttyUSB*`; with the udev rule it is /dev/roadshield-"
                                "actuator") from err
        if code in (errno.EACCES, errno.EPERM) or "Permission denied" in text:
            raise ActuatorError(f"permission denied opening serial port {port}",
                                UDEV_HINT) from err
        if code in (errno.EBUSY, errno.EAGAIN) or "exclusively lock" in text:
            raise ActuatorError(f"serial port {port} is busy (another program holds it)",
                                "close serial monitors / other roadshield runs; stop "
                                "ModemManager (`sudo systemctl stop ModemManager`) or "
                                "install the udev rule, which tells it to keep off") from err
        raise ActuatorError(f"cannot open serial port {port}: {text}",
                            "check the cable and the port path") from err


class SerialLink:
    """Authenticated link to one actuator board (see the module docstring).

    key: the 32-byte device key, or None to talk to an unprovisioned board (factory key).
    """

    def __init__(self, port: str, key: bytes | None, *, baudrate: int = 115200,
                 hello_timeout_s: float = 3.0, heartbeat_s: float = 0.05,
                 lost_after_s: float = 0.5, reconnect: bool = True) -> None:
        self.port = port
        self.key = key if key is not None else p.FACTORY_KEY
        self.baudrate = baudrate
        self.hello_timeout_s = hello_timeout_s
        self.heartbeat_s = heartbeat_s
        self.lost_after_s = lost_after_s
        self.reconnect = reconnect
        self.heartbeat_enabled = True  # tests turn it off to make the host fall silent
        self._ser: Any = None
        self._cond = threading.Condition()
        self._wlock = threading.Lock()
        self._state = DeviceState(rx_rejected=dict.fromkeys(("frame", "crc", "tag", "replay"), 0))
        self._session_key = b""
        self._nonce = b""
        self._rx_counter = self._tx_counter = 0
        self._tx_seq = 0
        self._acks: dict[int, m.Ack] = {}
        self._splitter = p.FrameSplitter()
        self._last_hb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------
    def open(self) -> SerialLink:
        """Open the port and wait for a verified HELLO; raises ActuatorError with a fix."""
        self._ser = open_serial(self.port, self.baudrate)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="actuator-link", daemon=True)
        self._thread.start()
        if not self.wait_connected(self.hello_timeout_s):
            state = self.state
            self.close()
            if state.hello_bad_tag:
                raise ActuatorError(
                    f"the board on {self.port} says HELLO but its tag does not verify with "
                    "this key: key mismatch (or the board is unprovisioned)",
                    "use the key file this board was provisioned with; a new board needs "
                    "`roadshield actuator provision --port ... --key-file ... --generate`")
            raise ActuatorError(f"no HELLO from {self.port} within {self.hello_timeout_s} s",
                                "check that this is the actuator's port, that the roadshield "
                                "firmware is flashed, and the baud rate (115200)")
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        self._close_port()

    def __enter__(self) -> SerialLink:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def last_heartbeat_t(self) -> float:
        """``time.monotonic()`` of the last HEARTBEAT written."""
        return self._last_hb

    @property
    def is_open(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    # -- state -----------------------------------------------------------------------
    @property
    def state(self) -> DeviceState:
        with self._cond:
            return replace(self._state, rx_rejected=dict(self._state.rx_rejected))

    def wait_connected(self, timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._state.connected, timeout_s)

    def wait_status(self, predicate: Any, timeout_s: float, after: float = 0.0
                    ) -> m.Status | None:
        """Wait for a STATUS received after ``after`` (monotonic s) that satisfies it."""
        def ok() -> bool:
            s = self._state
            return s.status is not None and s.status_t > after and bool(predicate(s.status))
        with self._cond:
            return self._state.status if self._cond.wait_for(ok, timeout_s) else None

    # -- sending ---------------------------------------------------------------------
    def send_setpoint(self, brake: int, steering: int, throttle: int, ttl_ms: int) -> int:
        """Per mille brake / steering / throttle limit and a TTL in ms; returns the seq."""
        sp = m.Setpoint(int(brake), int(steering), int(throttle), int(ttl_ms))
        return self._send(p.SETPOINT, m.pack_setpoint(sp))

    def command(self, op: int, a0: int = 0, a1: int = 0, a2: int = 0, a3: int = 0, *,
                timeout_s: float = 0.25, retries: int = 3) -> m.Ack:
        """Send a COMMAND and wait for its ACK, resending (same seq) up to ``retries``."""
        payload = m.pack_command(m.Command(op, a0, a1, a2, a3))
        return self._request(p.COMMAND, payload, timeout_s, retries)

    def arm(self) -> m.Ack:
        return self.command(m.OP_ARM)

    def brake(self) -> m.Ack:
        return self.command(m.OP_BRAKE)

    def disarm(self) -> m.Ack:
        return self.command(m.OP_DISARM)

    def configure(self, steer_limit: int, slew: int, max_throttle: int,
                  link_timeout_ms: int) -> m.Ack:
        return self.command(m.OP_CONFIG, steer_limit, slew, max_throttle, link_timeout_ms)

    def provision(self, new_key: bytes, timeout_s: float = 0.5) -> m.Ack:
        """Send PROVISION (only an unprovisioned board accepts it)."""
        return self._request(p.PROVISION, bytes(new_key), timeout_s, 3)

    def _request(self, msg_type: int, payload: bytes, timeout_s: float, retries: int) -> m.Ack:
        seq = self._next_seq()
        for attempt in range(retries + 1):
            self._send(msg_type, payload, seq=seq, flags=p.FLAG_RETRY if attempt else 0)
            with self._cond:
                if self._cond.wait_for(lambda: seq in self._acks, timeout_s):
                    return self._acks.pop(seq)
        raise ActuatorError(f"{p.TYPE_NAMES[msg_type]} to {self.port} was not acknowledged "
                            f"after {retries + 1} tries",
                            "the device is lost or not keyed to this session; it brakes on "
                            "its own link watchdog; check `roadshield actuator status`")

    def _next_seq(self) -> int:
        with self._wlock:
            self._tx_seq = (self._tx_seq + 1) & 0xFFFF
            return self._tx_seq

    def _send(self, msg_type: int, payload: bytes, *, seq: int | None = None,
              flags: int = 0) -> int:
        with self._cond:
            connected, key = self._state.connected, self._session_key
        if not connected or self._ser is None:
            raise ActuatorError(f"actuator on {self.port} is not connected",
                                "wait for the board's HELLO (check cable and power)")
        if seq is None:
            seq = self._next_seq()
        with self._wlock:
            self._tx_counter += 1
            frame = p.build_frame(msg_type, payload, seq, self._tx_counter, key, flags)
            try:
                self._ser.write(frame)
            except Exception as err:  # SerialException / OSError: the port went away
                raise ActuatorError(f"write to {self.port} failed: {err}",
                                    "the board was unplugged or reset; the link reconnects "
                                    "by itself") from err
        return seq

    # -- background thread ---------------------------------------------------------------
    def _close_port(self) -> None:
        ser, self._ser = self._ser, None
        if ser is not None:
            try:
                ser.close()
            except Exception:  # closing a vanished device may fail; nothing to keep
                log.debug("closing %s failed", self.port, exc_info=True)

    def _lost(self, why: str) -> None:
        with self._cond:
            if self._state.connected:
                log.warning("actuator on %s lost: %s", self.port, why)
            self._state = replace(self._state, connected=False)
            self._nonce = b""
            self._cond.notify_all()

    def _run(self) -> None:
        next_open = 0.0
        while not self._stop.is_set():
            if self._ser is None:
                if not self.reconnect or time.monotonic() < next_open:
                    self._stop.wait(0.02)
                    continue
                next_open = time.monotonic() + 0.1
                try:
                    self._ser = open_serial(self.port, self.baudrate)
                    self._splitter = p.FrameSplitter()
                    with self._cond:
                        self._state = replace(self._state, reconnects=self._state.reconnects + 1)
                except ActuatorError:
                    continue
            try:
                data = self._ser.read(max(1, self._ser.in_waiting))
            except Exception as err:  # SerialException / OSError (EIO): device vanished
                self._lost(f"read failed: {err}")
                self._close_port()
                continue
            now = time.monotonic()
            for encoded in self._splitter.push(data):
                self._on_frame(encoded, now)
            self._housekeeping(now)

    def _housekeeping(self, now: float) -> None:
        with self._cond:
            connected, last_rx = self._state.connected, self._state.last_rx
        if connected and now - last_rx > self.lost_after_s:
            self._lost(f"no valid frame for {self.lost_after_s} s")
        elif connected and self.heartbeat_enabled and now - self._last_hb >= self.heartbeat_s:
            self._heartbeat(now)

    def _heartbeat(self, now: float) -> None:
        self._last_hb = now
        try:
            self._send(p.HEARTBEAT, m.pack_heartbeat())
        except ActuatorError as err:
            log.debug("heartbeat not sent: %s", err)

    def _reject(self, kind: str) -> None:
        with self._cond:
            self._state.rx_rejected[kind] = self._state.rx_rejected.get(kind, 0) + 1

    def _on_frame(self, encoded: bytes | None, now: float) -> None:
        try:
            if encoded is None:
                raise p.FrameError("frame", "over-long frame")
            raw = p.cobs_decode(encoded)
            msg_type, _, _, length, _ = p.check_raw(raw)
            if msg_type == p.HELLO:
                self._on_hello(raw, length, now)
                return
            frame = p.parse_raw(raw, self._session_key, from_device=True)
            if frame.counter <= self._rx_counter:
                raise p.FrameError("replay", "counter did not increase")
            msg = m.unpack(frame.msg_type, frame.payload)
        except p.FrameError as err:
            self._reject(err.kind)
            return
        with self._cond:
            self._rx_counter = frame.counter
            st = replace(self._state, last_rx=now)
            if isinstance(msg, m.Status):
                st = replace(st, status=msg, status_t=now, device_state=msg.state,
                             device_fault=msg.fault)
            elif isinstance(msg, m.Ack):
                self._acks[msg.seq] = msg
                if msg.result == m.RESULT_OK and msg.op == m.OP_ARM:
                    st = replace(st, device_state=m.STATE_ARMED, device_fault=m.FAULT_NONE)
                elif msg.result == m.RESULT_OK and msg.op in (m.OP_BRAKE, m.OP_DISARM):
                    st = replace(st, device_state=m.STATE_SAFE)
            elif isinstance(msg, m.Fault):
                st = replace(st, faults=(*st.faults, msg.code)[-16:], device_state=msg.state,
                             device_fault=msg.code)
            elif isinstance(msg, tuple):  # HEARTBEAT: (state, fault)
                st = replace(st, device_state=msg[0], device_fault=msg[1])
            self._state = st
            self._cond.notify_all()

    def _on_hello(self, raw: bytes, length: int, now: float) -> None:
        nonce = raw[p.HEADER_LEN + 4:p.HEADER_LEN + 4 + p.NONCE_LEN]
        if length != m.LAYOUTS[p.HELLO].size:
            raise p.FrameError("frame", "HELLO of the wrong size")
        if nonce == self._nonce:  # a repeat in the current session: liveness only
            frame = p.parse_raw(raw, self._session_key, from_device=True)
            if frame.counter <= self._rx_counter:
                raise p.FrameError("replay", "counter did not increase")
            with self._cond:
                self._rx_counter = frame.counter
                self._state = replace(self._state, last_rx=now)
            return
        session_key = p.derive_session_key(self.key, nonce)
        try:
            frame = p.parse_raw(raw, session_key, from_device=True)
        except p.FrameError as err:
            if err.kind == "tag":
                with self._cond:
                    self._state = replace(self._state,
                                          hello_bad_tag=self._state.hello_bad_tag + 1)
            raise
        hello = m.unpack(p.HELLO, frame.payload)
        if not isinstance(hello, m.Hello):
            raise p.FrameError("frame", "HELLO payload")
        with self._wlock:
            self._tx_counter = 0
        with self._cond:
            self._session_key, self._nonce, self._rx_counter = session_key, nonce, frame.counter
            self._acks.clear()
            self._state = replace(self._state, connected=True, firmware=hello.firmware,
                                  provisioned=hello.provisioned, nonce=nonce.hex(),
                                  sessions=self._state.sessions + 1, last_rx=now, status=None,
                                  device_state=m.STATE_SAFE)  # every session starts safe
            self._cond.notify_all()
        log.info("actuator on %s: HELLO firmware %s, new session", self.port, hello.firmware)
        if self.heartbeat_enabled:
            self._heartbeat(now)  # answer at once so the device stops announcing
