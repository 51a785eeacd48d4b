"""The device's state machine in Python: the simulator's core and the C core's twin.

Everything is driven by the caller's clock (``now_ms``, an unsigned 32-bit millisecond
count that may wrap), so tests inject time and the pty simulator passes a monotonic
clock. ``boot``, ``feed`` and ``tick`` return the encoded frames to write, in order.
``actuator/firmware/rs_link.c`` implements the same rules line for line; the shared
vectors check that both produce the same frames and the same state.

Safety rules:
* boots in SAFE (brake 1000, steering target 0, throttle 0), latched until ARM;
* ARM needs a provisioned key (and no provisioning mode) and a HEARTBEAT received since
  the last fault, no older than the link timeout;
* a session starts with HELLO (device nonce) and is keyed only once the host's JOIN
  (host nonce) arrives; before that only JOIN is accepted;
* PROVISION is accepted only after a boot with the provisioning button held, REKEY only
  under the current key while SAFE; both agree the new key by X25519 (``keyx``);
* a COMMAND that reuses the previous seq is a retry only with the retry flag and the
  same op and arguments; any other reuse is refused (RESULT_SEQ_REUSED);
* no valid HEARTBEAT for ``link_timeout_ms`` (default 250) -> SAFE with fault
  LINK_TIMEOUT, and a new session (fresh nonce, HELLO) so a restarted host can join;
* a SETPOINT drives the outputs only while ARMED and within its TTL; steering is
  clamped to ``steer_limit`` and moves at most ``slew`` per mille per second;
* frames failing COBS/layout, CRC, direction, tag or counter are counted, never acted on.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from . import keyx
from . import messages as m
from . import protocol as p

FW_VERSION = (2, 0, 0)
HELLO_INTERVAL_MS = 200
HEARTBEAT_INTERVAL_MS = 100
DEFAULT_CONFIG = {"steer_limit": 300, "slew": 500, "max_throttle": 1000, "link_timeout": 250}
COUNTER_NAMES = ("bad_frame", "bad_crc", "bad_tag", "replay", "refused", "stale", "expired",
                 "dup", "accepted")
U16, U32 = 0xFFFF, 0xFFFFFFFF


def _elapsed(now: int, then: int) -> int:
    return (now - then) & U32


def _newer(a: int, b: int) -> bool:
    """16-bit serial-number order: a is after b (RFC 1982 style)."""
    return 0 < ((a - b) & U16) < 0x8000


class Device:
    """One actuator board. ``key``: 32-byte device key, or None when unprovisioned.

    ``random(n)`` returns n fresh bytes: 8 per session nonce, 32 per key agreement
    (``os.urandom`` by default; tests pass a fixed sequence). ``provision_button``: the
    board booted with its provisioning button held (physical presence), so its sessions
    use the factory key, it cannot arm, and it accepts one PROVISION.
    """

    def __init__(self, key: bytes | None = None,
                 random: Callable[[int], bytes] | None = None,
                 boot_fault: int = m.FAULT_BOOT, provision_button: bool = False) -> None:
        if key is not None and (len(key) != p.KEY_LEN or key == p.FACTORY_KEY):
            raise ValueError("a device key is 32 bytes and not all zero")
        self.key = key if key is not None else p.FACTORY_KEY
        self.provisioned = key is not None
        self.provision_mode = provision_button
        self.key_changed = False  # set when PROVISION / REKEY stored a new key (persist it)
        self.random = random or os.urandom
        self.config = dict(DEFAULT_CONFIG)
        self.counters = dict.fromkeys(COUNTER_NAMES, 0)
        self.state = m.STATE_SAFE
        self.fault = boot_fault
        self.brake, self.throttle, self.steering, self.target = m.FULL, 0, 0, 0
        self.tx_seq = 0
        self._splitter = p.FrameSplitter()
        self._out: list[bytes] = []
        self.nonce = b""
        self.session_key = b""  # the hello key until JOIN, then the session key
        self.tx_counter = self.rx_counter = 0
        self.host_seen = False
        self.hello_t = self.hb_t = self.last_hb = self.steer_t = 0
        self.hb_since_safe = False
        self.sp: m.Setpoint | None = None
        self.sp_active = False
        self.sp_seen = False
        self.sp_seq = 0
        self.sp_t = 0
        self.cmd_seen = False
        self.cmd_seq = 0
        self.cmd_payload = b""
        self.cmd_result = 0

    # -- public entry points -------------------------------------------------------
    def boot(self, now_ms: int) -> list[bytes]:
        """Start the first session (HELLO) at power-up."""
        self.steer_t = now_ms & U32
        self._start_session(now_ms & U32)
        return self._take()

    def feed(self, data: bytes, now_ms: int) -> list[bytes]:
        """Bytes received at ``now_ms``: handle each complete frame, then ``tick``."""
        now = now_ms & U32
        for encoded in self._splitter.push(data):
            if encoded is None:
                self._count("bad_frame")
            else:
                self._handle(encoded, now)
        self._tick(now)
        return self._take()

    def tick(self, now_ms: int) -> list[bytes]:
        """Timers only: link watchdog, HELLO / HEARTBEAT, TTL, steering slew."""
        self._tick(now_ms & U32)
        return self._take()

    def snapshot(self) -> dict[str, int]:
        """State, outputs and counters, the fields the shared vectors compare."""
        return {"state": self.state, "fault": self.fault, "prov": int(self.provisioned),
                "pmode": int(self.provision_mode), "host": int(self.host_seen),
                "sp": int(self.sp_active), "brake": self.brake,
                "steer": self.steering, "thr": self.throttle, "target": self.target,
                "spseq": self.sp_seq, **self.counters}

    def status(self) -> m.Status:
        flags = (m.STATUS_SETPOINT_ACTIVE if self.sp_active else 0) | \
            (m.STATUS_PROVISIONED if self.provisioned else 0)
        c = self.counters
        return m.Status(self.state, self.fault, flags, self.brake, self.steering, self.throttle,
                        self.sp_seq, c["bad_frame"], c["bad_crc"], c["bad_tag"], c["replay"],
                        c["refused"])

    # -- internals -------------------------------------------------------------------
    def _take(self) -> list[bytes]:
        out, self._out = self._out, []
        return out

    def _count(self, name: str) -> None:
        self.counters[name] = (self.counters[name] + 1) & U16  # wraps, as documented

    def _emit(self, msg_type: int, payload: bytes) -> None:
        self.tx_counter = (self.tx_counter + 1) & U32
        self.tx_seq = (self.tx_seq + 1) & U16
        self._out.append(p.build_frame(msg_type, payload, self.tx_seq, self.tx_counter,
                                       self.session_key, p.FLAG_FROM_DEVICE))

    def _emit_hello(self) -> None:
        flags = (m.HELLO_PROVISIONED if self.provisioned else 0) | \
            (m.HELLO_PROVISION_MODE if self.provision_mode else 0)
        self._emit(p.HELLO, m.pack_hello(m.Hello(*FW_VERSION, flags, self.nonce)))

    @property
    def link_key(self) -> bytes:
        """The key sessions derive from: the factory key in provisioning mode."""
        return p.FACTORY_KEY if self.provision_mode else self.key

    def _draw(self, n: int) -> bytes:
        data = bytes(self.random(n))
        if len(data) != n:
            raise ValueError(f"the random source must return {n} bytes")
        return data

    def _start_session(self, now: int) -> None:
        self.nonce = self._draw(p.NONCE_LEN)
        self.session_key = p.derive_hello_key(self.link_key, self.nonce)
        self.tx_counter = self.rx_counter = 0
        self.host_seen = False
        self.sp_seen = self.sp_active = False
        self.cmd_seen = False
        self.hello_t = now
        self._emit_hello()

    def _enter_safe(self, fault: int, now: int) -> None:
        was_armed = self.state == m.STATE_ARMED
        self.state = m.STATE_SAFE
        self.fault = fault
        self.sp_active = False
        self.hb_since_safe = False
        self._update_outputs(now)
        if was_armed:
            self._emit(p.FAULT, m.pack_fault(m.Fault(fault, self.state)))

    def _tick(self, now: int) -> None:
        if self.host_seen and _elapsed(now, self.last_hb) > self.config["link_timeout"]:
            self._enter_safe(m.FAULT_LINK_TIMEOUT, now)
            self._start_session(now)
        elif not self.host_seen and _elapsed(now, self.hello_t) >= HELLO_INTERVAL_MS:
            self.hello_t = now
            self._emit_hello()
        if self.host_seen and _elapsed(now, self.hb_t) >= HEARTBEAT_INTERVAL_MS:
            self.hb_t = now
            self._emit(p.HEARTBEAT, m.pack_heartbeat(self.state, self.fault))
        self._update_outputs(now)

    def _update_outputs(self, now: int) -> None:
        if self.sp_active and self.sp is not None and \
                _elapsed(now, self.sp_t) >= self.sp.ttl_ms:
            self.sp_active = False
            self._count("expired")
        if self.state == m.STATE_ARMED and self.sp_active and self.sp is not None:
            limit = self.config["steer_limit"]
            self.brake = self.sp.brake
            self.throttle = min(self.sp.throttle, self.config["max_throttle"])
            self.target = max(-limit, min(limit, self.sp.steering))
        else:
            self.brake, self.throttle, self.target = m.FULL, 0, 0
        if self.steering == self.target:
            self.steer_t = now
            return
        step = self.config["slew"] * min(_elapsed(now, self.steer_t), 1000) // 1000
        if step > 0:
            diff = self.target - self.steering
            self.steering += max(-step, min(step, diff))
            self.steer_t = now

    def _handle(self, encoded: bytes, now: int) -> None:
        try:
            raw = p.cobs_decode(encoded)
            frame = p.parse_raw(raw, self.session_key, from_device=False)
        except p.FrameError as err:
            self._count({"crc": "bad_crc", "tag": "bad_tag"}.get(err.kind, "bad_frame"))
            return
        if frame.counter <= self.rx_counter:
            self._count("replay")
            return
        # before JOIN only JOIN; after it every host type but JOIN (device-only types never)
        allowed = frame.msg_type == p.JOIN if not self.host_seen else \
            frame.msg_type in p.HOST_TYPES and frame.msg_type != p.JOIN
        if not allowed or not m.payload_fits(frame.msg_type, frame.payload):
            self._count("bad_frame")
            return
        self.rx_counter = frame.counter
        self._count("accepted")
        if frame.msg_type == p.JOIN:
            self._on_join(frame, now)
        elif frame.msg_type == p.HEARTBEAT:
            self.last_hb = now
            self.hb_since_safe = True
        elif frame.msg_type == p.SETPOINT:
            self._on_setpoint(frame, now)
        elif frame.msg_type == p.COMMAND:
            self._on_command(frame, now)
        else:
            self._on_key_agreement(frame, now)

    def _on_join(self, frame: p.Frame, now: int) -> None:
        # the host's nonce enters the key: a replayed HELLO gets no session this side
        self.session_key = p.derive_session_key(self.link_key, self.nonce, frame.payload)
        self.host_seen = True
        self.last_hb = self.hb_t = now
        self._emit(p.HEARTBEAT, m.pack_heartbeat(self.state, self.fault))  # confirms
    def _on_setpoint(self, frame: p.Frame, now: int) -> None:
        sp = m.Setpoint(*m.LAYOUTS[p.SETPOINT].unpack(frame.payload))
        if self.state != m.STATE_ARMED or sp.brake > m.FULL or sp.throttle > m.FULL \
                or not -m.FULL <= sp.steering <= m.FULL:
            self._count("refused")
        elif sp.ttl_ms == 0:
            self._count("expired")
        elif self.sp_seen and not _newer(frame.seq, self.sp_seq):
            self._count("stale")
        else:
            self.sp, self.sp_seq, self.sp_t = sp, frame.seq, now
            self.sp_seen = self.sp_active = True
        self._update_outputs(now)
        self._emit(p.STATUS, m.pack_status(self.status()))

    def _on_command(self, frame: p.Frame, now: int) -> None:
        cmd = m.Command(*m.LAYOUTS[p.COMMAND].unpack(frame.payload))
        if self.cmd_seen and frame.seq == self.cmd_seq:
            if frame.flags & p.FLAG_RETRY and frame.payload == self.cmd_payload:
                self._count("dup")  # a true retry: answer again, do not redo
                self._emit(p.ACK, m.pack_ack(m.Ack(frame.seq, cmd.op, self.cmd_result)))
            else:  # same seq, other command (or no retry flag): never silently dropped
                self._count("refused")
                self._emit(p.ACK, m.pack_ack(m.Ack(frame.seq, cmd.op, m.RESULT_SEQ_REUSED)))
            return
        result = self._execute(cmd, now)
        self.cmd_seen, self.cmd_seq, self.cmd_payload, self.cmd_result = \
            True, frame.seq, frame.payload, result
        if result != m.RESULT_OK:
            self._count("refused")
        self._emit(p.ACK, m.pack_ack(m.Ack(frame.seq, cmd.op, result)))
        self._emit(p.STATUS, m.pack_status(self.status()))

    def _execute(self, cmd: m.Command, now: int) -> int:
        if cmd.op == m.OP_ARM:
            fresh = self.hb_since_safe and \
                _elapsed(now, self.last_hb) <= self.config["link_timeout"]
            if not (self.provisioned and not self.provision_mode and fresh):
                return m.RESULT_REFUSED
            self.state, self.fault = m.STATE_ARMED, m.FAULT_NONE
            self.sp_active = False
            self._update_outputs(now)
            return m.RESULT_OK
        if cmd.op in (m.OP_DISARM, m.OP_BRAKE):
            self._enter_safe(m.FAULT_DISARMED if cmd.op == m.OP_DISARM else m.FAULT_HOST_BRAKE,
                             now)
            return m.RESULT_OK
        if cmd.op == m.OP_CONFIG:
            if self.state != m.STATE_SAFE:
                return m.RESULT_REFUSED
            if cmd.a0 > m.FULL or not 1 <= cmd.a1 <= 10000 or cmd.a2 > m.FULL \
                    or not 50 <= cmd.a3 <= 1000:
                return m.RESULT_BAD_ARGS
            self.config.update(steer_limit=cmd.a0, slew=cmd.a1, max_throttle=cmd.a2,
                               link_timeout=cmd.a3)
            return m.RESULT_OK
        return m.RESULT_BAD_ARGS

    def _on_key_agreement(self, frame: p.Frame, now: int) -> None:
        """PROVISION (button boot only) or REKEY (current key, SAFE): X25519, then re-key."""
        if frame.msg_type == p.PROVISION:
            op, ok = m.OP_PROVISION, self.provision_mode
        else:
            op = m.OP_REKEY
            ok = self.provisioned and not self.provision_mode and self.state == m.STATE_SAFE
        secret = self._draw(keyx.PUBLIC_LEN) if ok else b""
        new_key = None
        if ok:
            dev_pub = keyx.public_key(secret)
            new_key = keyx.agree(secret, dev_pub, frame.payload, host=False)
        if new_key is None:
            self._count("refused")
            result = m.RESULT_REFUSED if not ok else m.RESULT_BAD_ARGS
            self._emit(p.ACK, m.pack_ack(m.Ack(frame.seq, op, result)))
            return
        self._emit(p.KEY, m.pack_key(m.KeyReply(frame.seq, op, dev_pub)))
        self.key, self.provisioned, self.key_changed = new_key, True, True
        self.provision_mode = False  # one key per button boot
        self._start_session(now)  # re-key at once: the old session ends here
