"""Payloads of the link's messages, their constants, and pack / unpack helpers.

Units: brake, throttle and steering are integers in per mille (brake 1000 = full,
steering -1000..1000 = full left..full right); times are milliseconds. All fields are
little-endian, as in ``actuator.protocol.SIGNATURES``.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass

from . import protocol as p

# device states
STATE_SAFE, STATE_ARMED = 0, 1
STATE_NAMES = {STATE_SAFE: "safe", STATE_ARMED: "armed"}
# fault codes (why the device is in its safe state)
FAULT_NONE, FAULT_BOOT, FAULT_LINK_TIMEOUT, FAULT_HOST_BRAKE, FAULT_DISARMED = range(5)
FAULT_WATCHDOG_RESET = 5
FAULT_NAMES = {FAULT_NONE: "none", FAULT_BOOT: "boot", FAULT_LINK_TIMEOUT: "link timeout",
               FAULT_HOST_BRAKE: "host brake", FAULT_DISARMED: "disarmed",
               FAULT_WATCHDOG_RESET: "watchdog reset"}
# COMMAND operations and ACK results
OP_ARM, OP_DISARM, OP_BRAKE, OP_CONFIG = 1, 2, 3, 4
OP_NAMES = {OP_ARM: "arm", OP_DISARM: "disarm", OP_BRAKE: "brake", OP_CONFIG: "config"}
#: ACK / KEY op of a PROVISION or REKEY: its message type with bit 7 set (no COMMAND op)
OP_PROVISION, OP_REKEY = 0x80 | p.PROVISION, 0x80 | p.REKEY
OP_NAMES.update({OP_PROVISION: "provision", OP_REKEY: "rekey"})
RESULT_OK, RESULT_REFUSED, RESULT_BAD_ARGS, RESULT_SEQ_REUSED = 0, 1, 2, 3
RESULT_NAMES = {RESULT_OK: "ok", RESULT_REFUSED: "refused", RESULT_BAD_ARGS: "bad arguments",
                RESULT_SEQ_REUSED: "seq reused by a different command"}
# HELLO flags / STATUS flags
HELLO_PROVISIONED, HELLO_PROVISION_MODE = 0x01, 0x02
STATUS_SETPOINT_ACTIVE, STATUS_PROVISIONED = 0x01, 0x02
COUNTER_MOD = 0x10000  # STATUS counters are u16 and wrap


def counter_delta(new: int, old: int) -> int:
    """Events between two readings of a STATUS counter (they wrap at 65536).

    Exact as long as fewer than 65536 events happen between the two readings.
    """
    return (new - old) % COUNTER_MOD

FULL = 1000  # per mille

_HELLO = struct.Struct("<BBBB8s")
_HEARTBEAT = struct.Struct("<BB")
_SETPOINT = struct.Struct("<HhHH")
_COMMAND = struct.Struct("<BHHHH")
_ACK = struct.Struct("<HBB")
_STATUS = struct.Struct("<BBBHhHHHHHHH")
_FAULT = struct.Struct("<BB")
_KEY = struct.Struct("<HB32s")
LAYOUTS = {p.HELLO: _HELLO, p.HEARTBEAT: _HEARTBEAT, p.SETPOINT: _SETPOINT,
           p.COMMAND: _COMMAND, p.ACK: _ACK, p.STATUS: _STATUS, p.FAULT: _FAULT,
           p.PROVISION: struct.Struct("<32s"), p.KEY: _KEY, p.REKEY: struct.Struct("<32s"),
           p.JOIN: struct.Struct("<8s")}


@dataclass(frozen=True)
class Hello:
    fw_major: int
    fw_minor: int
    fw_patch: int
    flags: int
    nonce: bytes

    @property
    def provisioned(self) -> bool:
        return bool(self.flags & HELLO_PROVISIONED)

    @property
    def provision_mode(self) -> bool:
        """Booted with the provisioning button held: factory key, accepts PROVISION."""
        return bool(self.flags & HELLO_PROVISION_MODE)

    @property
    def firmware(self) -> str:
        return f"{self.fw_major}.{self.fw_minor}.{self.fw_patch}"


@dataclass(frozen=True)
class Setpoint:
    """brake 0..1000, steering -1000..1000, throttle limit 0..1000, ttl_ms 0..65535."""

    brake: int
    steering: int
    throttle: int
    ttl_ms: int


@dataclass(frozen=True)
class Command:
    op: int
    a0: int = 0
    a1: int = 0
    a2: int = 0
    a3: int = 0


@dataclass(frozen=True)
class Ack:
    seq: int
    op: int
    result: int


@dataclass(frozen=True)
class KeyReply:
    """The device's half of a key agreement, answering PROVISION / REKEY ``seq``."""

    seq: int
    op: int
    device_public: bytes


@dataclass(frozen=True)
class Status:
    """The device's report: state, outputs and refused-frame counters.

    The counters are u16 that wrap at 65536 and restart at 0 only at boot; read a
    change with ``counter_delta``.
    """

    state: int
    fault: int
    flags: int
    brake: int
    steering: int
    throttle: int
    sp_seq: int
    bad_frame: int
    bad_crc: int
    bad_tag: int
    replay: int
    refused: int

    @property
    def setpoint_active(self) -> bool:
        return bool(self.flags & STATUS_SETPOINT_ACTIVE)

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = asdict(self)
        out["state_name"] = STATE_NAMES.get(self.state, str(self.state))
        out["fault_name"] = FAULT_NAMES.get(self.fault, str(self.fault))
        out["setpoint_active"] = self.setpoint_active
        return out


@dataclass(frozen=True)
class Fault:
    code: int
    state: int


def pack_hello(h: Hello) -> bytes:
    return _HELLO.pack(h.fw_major, h.fw_minor, h.fw_patch, h.flags, h.nonce)


def pack_heartbeat(state: int = 0, fault: int = 0) -> bytes:
    return _HEARTBEAT.pack(state, fault)


def pack_setpoint(s: Setpoint) -> bytes:
    return _SETPOINT.pack(s.brake, s.steering, s.throttle, s.ttl_ms)


def pack_command(c: Command) -> bytes:
    return _COMMAND.pack(c.op, c.a0, c.a1, c.a2, c.a3)


def pack_ack(a: Ack) -> bytes:
    return _ACK.pack(a.seq, a.op, a.result)


def pack_status(s: Status) -> bytes:
    return _STATUS.pack(s.state, s.fault, s.flags, s.brake, s.steering, s.throttle, s.sp_seq,
                        s.bad_frame, s.bad_crc, s.bad_tag, s.replay, s.refused)


def pack_fault(f: Fault) -> bytes:
    return _FAULT.pack(f.code, f.state)


def pack_key(k: KeyReply) -> bytes:
    return _KEY.pack(k.seq, k.op, k.device_public)


def payload_fits(msg_type: int, payload: bytes) -> bool:
    """True when ``payload`` has exactly the size of ``msg_type``'s layout."""
    layout = LAYOUTS.get(msg_type)
    return layout is not None and len(payload) == layout.size


def unpack(msg_type: int, payload: bytes) -> object:
    """Payload -> its dataclass (PROVISION / REKEY / JOIN -> their raw bytes)."""
    if not payload_fits(msg_type, payload):
        raise p.FrameError("frame", f"{p.TYPE_NAMES.get(msg_type, msg_type)} payload of "
                                    f"{len(payload)} bytes has the wrong size")
    fields = LAYOUTS[msg_type].unpack(payload)
    kinds: dict[int, type] = {p.HELLO: Hello, p.SETPOINT: Setpoint, p.COMMAND: Command,
                              p.ACK: Ack, p.STATUS: Status, p.FAULT: Fault, p.KEY: KeyReply}
    if msg_type in kinds:
        return kinds[msg_type](*fields)
    if msg_type == p.HEARTBEAT:
        return fields
    return fields[0]
