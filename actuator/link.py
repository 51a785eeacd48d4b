"""Host side of the actuator link, on pyserial.

``SerialLink(port, key).open()`` opens ``/dev/ttyACM0`` (or a pty), waits for the
board's HELLO instead of sleeping through its reset, answers it with JOIN carrying a
fresh host nonce, and counts the session as up only once the device's first frame under
the key derived from both nonces arrives. A replayed HELLO therefore never replaces a
live session: its JOIN goes unanswered and it is dropped (``unconfirmed_hellos``).
A background thread reads frames, sends a HEARTBEAT every ``heartbeat_s`` seconds,
notices a silent device (``lost_after_s``), and reopens the port after it vanished (USB
unplugged, simulator restarted), following the device into each new session. ``state``
is the latest picture of the device. Replies are matched by seq and op: an ACK that
answers another op than the one sent raises ActuatorError.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from roadshield_base.errors import ActuatorError

from . import keyx
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
    provision_mode: bool = False
    nonce: str = ""
    sessions: int = 0
    status: m.Status | None = None
    status_t: float = 0.0
    last_rx: float = 0.0
    faults: tuple[int, ...] = ()
    rx_rejected: dict[str, int] = field(default_factory=dict)
    hello_bad_tag: int = 0
    unconfirmed_hellos: int = 0  # HELLOs whose session the device never confirmed
    reconnects: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"connected": self.connected,
                "state": m.STATE_NAMES.get(self.device_state, str(self.device_state)),
                "fault": m.FAULT_NAMES.get(self.device_fault, str(self.device_fault)),
                "firmware": self.firmware,
                "provisioned": self.provisioned, "provision_mode": self.provision_mode,
                "sessions": self.sessions, "unconfirmed_hellos": self.unconfirmed_hellos,
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


@dataclass
class _Pending:
    """A session the device announced (HELLO) and the host joined, not yet confirmed."""

    nonce: bytes
    host_nonce: bytes
    hello_key: bytes
    session_key: bytes
    rx_counter: int
    since: float
    hello: m.Hello
    tx_counter: int = 0


@dataclass
class _Agreement:
    """An X25519 key agreement in flight (PROVISION / REKEY ``seq``)."""

    seq: int
    secret: bytes
    public: bytes
    key: bytes | None = None


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
        self._acks: dict[int, m.Ack | m.KeyReply] = {}
        self._pending: _Pending | None = None
        self._agreement: _Agreement | None = None
        self._splitter = p.FrameSplitter()
        self._last_hb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------
    def open(self) -> SerialLink:
        """Open the port and wait until the board confirms a session (HELLO, JOIN, its
        first frame under the session key); raises ActuatorError with a fix."""
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
                    "`roadshield actuator provision --port ... --key-file ...` after a boot "
                    "with its provisioning button held (D2 to GND)")
            raise ActuatorError(f"no HELLO from {self.port} within {self.hello_timeout_s} s",
                                "check that this is the actuator's port, that the roadshield "
                                f"firmware speaking protocol version {p.VERSION} (firmware "
                                f"{p.VERSION}.x) is flashed, and the baud rate (115200)")
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
        """Send a COMMAND and wait for its ACK, resending (same seq, retry flag)."""
        payload = m.pack_command(m.Command(op, a0, a1, a2, a3))
        reply = self._request(p.COMMAND, payload, op, timeout_s, retries)
        if not isinstance(reply, m.Ack):
            raise ActuatorError(f"the board on {self.port} answered COMMAND {op} with a KEY",
                                "update the firmware and the host to the same protocol")
        return reply

    def arm(self) -> m.Ack:
        return self.command(m.OP_ARM)

    def brake(self) -> m.Ack:
        return self.command(m.OP_BRAKE)

    def disarm(self) -> m.Ack:
        return self.command(m.OP_DISARM)

    def configure(self, steer_limit: int, slew: int, max_throttle: int,
                  link_timeout_ms: int) -> m.Ack:
        return self.command(m.OP_CONFIG, steer_limit, slew, max_throttle, link_timeout_ms)

    def provision(self, timeout_s: float = 30.0) -> bytes:
        """Agree a device key with a board in provisioning mode; returns the new key.

        The board must have booted with its provisioning button held. Only public keys
        cross the wire. ``timeout_s`` covers the board's X25519 (seconds on an AVR).
        """
        return self._agree(p.PROVISION, m.OP_PROVISION, timeout_s)

    def rotate_key(self, timeout_s: float = 30.0) -> bytes:
        """Replace the device key by a new X25519 agreement under the current key.

        The board must be SAFE (disarmed or braked). Returns the new key; the link
        follows the board into its new session at once.
        """
        return self._agree(p.REKEY, m.OP_REKEY, timeout_s)

    def _agree(self, msg_type: int, op: int, timeout_s: float) -> bytes:
        secret = os.urandom(keyx.PUBLIC_LEN)
        agreement = _Agreement(self._next_seq(), secret, keyx.public_key(secret))
        with self._cond:
            self._agreement = agreement
        try:
            reply = self._request(msg_type, agreement.public, op, timeout_s, 1,
                                  seq=agreement.seq)
        finally:
            with self._cond:
                self._agreement = None
        name = p.TYPE_NAMES[msg_type]
        if isinstance(reply, m.Ack):
            why = m.RESULT_NAMES.get(reply.result, str(reply.result))
            hint = ("boot the board with its provisioning button held (D2 to GND), then "
                    "provision within that boot" if msg_type == p.PROVISION else
                    "brake or disarm the board first: keys rotate only in its safe state")
            raise ActuatorError(f"the board on {self.port} refused {name} ({why})", hint)
        if agreement.key is None:
            raise ActuatorError(f"the board on {self.port} answered {name} with a public key "
                                "that gives no shared secret",
                                "check that this is a roadshield board; try again")
        return agreement.key

    def _request(self, msg_type: int, payload: bytes, op: int, timeout_s: float,
                 retries: int, seq: int | None = None) -> m.Ack | m.KeyReply:
        seq = self._next_seq() if seq is None else seq
        for attempt in range(retries + 1):
            self._send(msg_type, payload, seq=seq, flags=p.FLAG_RETRY if attempt else 0)
            with self._cond:
                if self._cond.wait_for(lambda: seq in self._acks, timeout_s):
                    reply = self._acks.pop(seq)
                    break
        else:
            raise ActuatorError(f"{p.TYPE_NAMES[msg_type]} to {self.port} was not "
                                f"acknowledged after {retries + 1} tries",
                                "the device is lost or not keyed to this session; it brakes "
                                "on its own link watchdog; check `roadshield actuator status`")
        if reply.op != op:  # seq matched but it answers something else: never trust it
            raise ActuatorError(
                f"the board on {self.port} answered seq {seq} with op "
                f"{m.OP_NAMES.get(reply.op, reply.op)}, not the "
                f"{m.OP_NAMES.get(op, op)} sent",
                "the board and the host disagree on what was asked: check "
                "`roadshield actuator status` and re-send the command")
        return reply

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
            pending = self._pending
            if pending is not None and now - pending.since > self.lost_after_s:
                # nobody answered our JOIN under that nonce: a replayed (or stale) HELLO
                log.warning("actuator on %s: HELLO with nonce %s never confirmed; ignored",
                            self.port, pending.nonce.hex())
                self._pending = None
                self._state = replace(self._state,
                                      unconfirmed_hellos=self._state.unconfirmed_hellos + 1)
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

    def _verify(self, raw: bytes) -> p.Frame:
        """Verify under the current session, else confirm the pending one with it."""
        with self._cond:
            current, pending = self._session_key, self._pending
        if current:
            try:
                return p.parse_raw(raw, current, from_device=True)
            except p.FrameError as err:
                if err.kind != "tag" or pending is None:
                    raise
        if pending is None:
            raise p.FrameError("tag", "no session yet: waiting for a HELLO")
        frame = p.parse_raw(raw, pending.session_key, from_device=True)
        if frame.counter <= pending.rx_counter:
            raise p.FrameError("replay", "counter did not increase")
        self._adopt(pending)  # the device proved it took our JOIN: the session is live
        return frame

    def _adopt(self, pending: _Pending) -> None:
        with self._wlock:
            self._tx_counter = pending.tx_counter
        self._last_hb = 0.0  # heartbeat at once: the board needs one before it arms
        with self._cond:
            self._session_key, self._nonce = pending.session_key, pending.nonce
            self._rx_counter = pending.rx_counter
            self._pending = None
            self._acks.clear()
            hello = pending.hello
            self._state = replace(self._state, connected=True, firmware=hello.firmware,
                                  provisioned=hello.provisioned,
                                  provision_mode=hello.provision_mode,
                                  nonce=pending.nonce.hex(), sessions=self._state.sessions + 1,
                                  status=None, device_state=m.STATE_SAFE)  # starts safe
            self._cond.notify_all()
        log.info("actuator on %s: firmware %s, new session confirmed", self.port,
                 pending.hello.firmware)

    def _on_frame(self, encoded: bytes | None, now: float) -> None:
        try:
            if encoded is None:
                raise p.FrameError("frame", "over-long frame")
            raw = p.cobs_decode(encoded)
            msg_type, _, _, length, _ = p.check_raw(raw)
            if msg_type == p.HELLO:
                self._on_hello(raw, length, now)
                return
            frame = self._verify(raw)
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
            elif isinstance(msg, m.KeyReply):
                agreement = self._agreement
                if agreement is not None and agreement.seq == msg.seq:
                    # derive at once: the board's next HELLO is already under the new key
                    agreement.key = keyx.agree(agreement.secret, agreement.public,
                                               msg.device_public, host=True)
                    if agreement.key is not None:
                        self.key = agreement.key
                self._acks[msg.seq] = msg
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
        if length != m.LAYOUTS[p.HELLO].size:
            raise p.FrameError("frame", "HELLO of the wrong size")
        nonce = raw[p.HEADER_LEN + 4:p.HEADER_LEN + 4 + p.NONCE_LEN]
        with self._cond:
            pending, current = self._pending, self._nonce
        if pending is not None and nonce == pending.nonce:
            # the device repeats its HELLO: our JOIN was lost; send it again
            frame = p.parse_raw(raw, pending.hello_key, from_device=True)
            if frame.counter <= pending.rx_counter:
                raise p.FrameError("replay", "counter did not increase")
            pending.rx_counter = frame.counter
            self._send_join(pending)
            return
        if nonce == current:  # the device stops HELLO once joined: a replay
            raise p.FrameError("replay", "HELLO of the current session")
        hello_key = p.derive_hello_key(self.key, nonce)
        try:
            frame = p.parse_raw(raw, hello_key, from_device=True)
        except p.FrameError as err:
            if err.kind == "tag":
                with self._cond:
                    self._state = replace(self._state,
                                          hello_bad_tag=self._state.hello_bad_tag + 1)
            raise
        hello = m.unpack(p.HELLO, frame.payload)
        if not isinstance(hello, m.Hello):
            raise p.FrameError("frame", "HELLO payload")
        host_nonce = os.urandom(p.NONCE_LEN)  # our share of the session's freshness
        pending = _Pending(nonce, host_nonce, hello_key,
                           p.derive_session_key(self.key, nonce, host_nonce), frame.counter,
                           now, hello)
        with self._cond:
            if self._pending is not None:
                self._state = replace(self._state,
                                      unconfirmed_hellos=self._state.unconfirmed_hellos + 1)
            self._pending = pending
        log.info("actuator on %s: HELLO firmware %s, joining", self.port, hello.firmware)
        self._send_join(pending)

    def _send_join(self, pending: _Pending) -> None:
        seq = self._next_seq()
        with self._wlock:
            pending.tx_counter += 1
            frame = p.build_frame(p.JOIN, pending.host_nonce, seq, pending.tx_counter,
                                  pending.hello_key)
            try:
                if self._ser is not None:
                    self._ser.write(frame)
            except Exception as err:  # the port went away; the reader reopens it
                log.debug("JOIN not sent: %s", err)
