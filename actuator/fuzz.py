"""Fuzzing the device: forged, corrupted and replayed frames must never be acted on.

An armed ``Device`` (injected clock) receives a stream that mixes a valid host (a
heartbeat and a fresh setpoint now and then, so the device stays armed and its state
keeps moving) with fuzzed frames of these kinds:

* ``random``: random bytes of random length;
* ``bitflip``: a valid, never-sent frame with one bit flipped;
* ``byteflip``: a valid, never-sent frame with 1-4 bytes replaced;
* ``forged``: well-formed with a correct CRC but tagged with a random key;
* ``replay``: a frame the device already accepted, sent again;
* ``old_session``: a valid frame for the session before the device's last re-key;
* ``reflected``: a valid frame carrying the device-to-host direction flag;
* ``truncated``: a valid, never-sent frame cut short.

A fuzzed frame counts as *acted on* if the device accepted it, wrote any frame in
reply, or changed its state, outputs or setpoint. The target is zero.

Every kind is produced from the first frame on (the run starts with one reboot, so an
earlier session's key exists); a kind that cannot be built raises instead of quietly
becoming another kind. ``rejected_by_kind`` shows which check refused each kind.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from . import messages as m
from . import protocol as p
from .device import Device

KINDS = ("random", "bitflip", "byteflip", "forged", "replay", "old_session", "reflected",
         "truncated")
_WATCHED = ("state", "fault", "sp", "spseq", "brake", "thr", "target", "steer", "accepted")


@dataclass
class FuzzReport:
    frames: int = 0
    acted_on: int = 0
    valid_sent: int = 0
    valid_accepted: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    rejected_as: dict[str, int] = field(default_factory=dict)
    rejected_by_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"frames": self.frames, "acted_on": self.acted_on,
                "valid_sent": self.valid_sent, "valid_accepted": self.valid_accepted,
                "by_kind": dict(self.by_kind), "rejected_as": dict(self.rejected_as),
                "rejected_by_kind": {k: dict(v) for k, v in self.rejected_by_kind.items()},
                "examples": self.examples}


class _Host:
    def __init__(self, key: bytes, rng: random.Random) -> None:
        self.key, self.rng = key, rng
        self.session_key = b""
        self.old_session_key = b""
        self.counter = 0
        self.seq = 0

    def join(self, nonce: bytes) -> bytes:
        """Follow the device's HELLO: the JOIN frame, and the new session key from here."""
        host_nonce = self.rng.randbytes(p.NONCE_LEN)
        self.counter = 1
        self.seq += 1
        raw = p.build_raw(p.JOIN, host_nonce, self.seq, 1, p.derive_hello_key(self.key, nonce))
        self.old_session_key = self.session_key
        self.session_key = p.derive_session_key(self.key, nonce, host_nonce)
        return raw

    def raw(self, msg_type: int, payload: bytes, key: bytes | None = None, flags: int = 0,
            consume: bool = True) -> bytes:
        counter, seq = self.counter + 1, self.seq + 1
        if consume:
            self.counter, self.seq = counter, seq
        return p.build_raw(msg_type, payload, seq, counter, key or self.session_key, flags)

    def random_valid(self, consume: bool = False, key: bytes | None = None,
                     flags: int = 0) -> bytes:
        r = self.rng
        if r.random() < 0.5:
            sp = m.Setpoint(r.randrange(0, 1001), r.randrange(-1000, 1001),
                            r.randrange(0, 1001), r.randrange(1, 2000))
            return self.raw(p.SETPOINT, m.pack_setpoint(sp), key, flags, consume)
        op = r.choice((m.OP_ARM, m.OP_DISARM, m.OP_BRAKE))
        return self.raw(p.COMMAND, m.pack_command(m.Command(op)), key, flags, consume)


def fuzz(frames: int = 100_000, seed: int = 0, key: bytes | None = None) -> FuzzReport:
    """Send ``frames`` fuzzed frames to an armed simulated device; see the module doc."""
    if frames < 0:
        raise ValueError(f"frames={frames}: pass a count >= 0")
    rng = random.Random(seed)
    key = key or bytes(rng.randrange(1, 256) for _ in range(p.KEY_LEN))
    dev = Device(key, rng.randbytes)
    host = _Host(key, rng)
    report = FuzzReport(by_kind=dict.fromkeys(KINDS, 0))
    rejected: Counter[str] = Counter()
    by_kind: dict[str, Counter[str]] = {k: Counter() for k in KINDS}
    accepted_raw: list[bytes] = []
    now = 0
    dev.boot(now)

    def send_valid(raw: bytes) -> None:
        before = dev.counters["accepted"]
        dev.feed(p.cobs_encode(raw) + b"\0", now)
        report.valid_sent += 1
        if dev.counters["accepted"] > before:
            report.valid_accepted += 1
            accepted_raw.append(raw)
            del accepted_raw[:-64]

    def new_session() -> None:
        send_valid(host.join(dev.nonce))
        send_valid(host.raw(p.HEARTBEAT, m.pack_heartbeat()))
        send_valid(host.raw(p.COMMAND, m.pack_command(m.Command(m.OP_ARM))))

    def reboot() -> None:  # old frames must stay dead
        nonlocal dev
        dev = Device(key, rng.randbytes)
        dev.boot(now)
        accepted_raw.clear()  # "replay" stays within the session; "old_session" covers reboots
        new_session()

    new_session()
    reboot()  # so an earlier session's key exists from the first frame on
    new_session_every = 20_000
    for i in range(frames):
        now += 1
        if i and i % new_session_every == 0:
            reboot()
        if i % 50 == 0:
            send_valid(host.raw(p.HEARTBEAT, m.pack_heartbeat()))
            if dev.state != m.STATE_ARMED:
                send_valid(host.raw(p.COMMAND, m.pack_command(m.Command(m.OP_ARM))))
            send_valid(host.random_valid(consume=True) if i % 100 else host.raw(
                p.SETPOINT, m.pack_setpoint(m.Setpoint(0, 0, 500, 60_000))))
        kind = KINDS[i % len(KINDS)]
        data = _make(kind, host, accepted_raw, rng)
        dev.tick(now)
        before = dev.snapshot()
        out = dev.feed(data, now)
        after = dev.snapshot()
        report.frames += 1
        report.by_kind[kind] += 1
        changed = [k for k in _WATCHED if before[k] != after[k]]
        if changed or out:
            report.acted_on += 1
            if len(report.examples) < 10:
                report.examples.append({"kind": kind, "data": data.hex(), "changed": changed})
        for name in ("bad_frame", "bad_crc", "bad_tag", "replay"):
            rejected[name] += after[name] - before[name]
            by_kind[kind][name] += after[name] - before[name]
    report.rejected_as = dict(rejected)
    report.rejected_by_kind = {k: {n: c for n, c in v.items() if c} for k, v in by_kind.items()}
    return report


def _make(kind: str, host: _Host, accepted: list[bytes], rng: random.Random) -> bytes:
    if kind == "random":
        return rng.randbytes(rng.randrange(1, 80)) + b"\0"
    if kind == "replay":
        if not accepted:
            raise RuntimeError("fuzz: no accepted frame to replay yet")
        return p.cobs_encode(rng.choice(accepted)) + b"\0"
    if kind == "old_session":
        if not host.old_session_key:
            raise RuntimeError("fuzz: no earlier session to take a key from yet")
        return p.cobs_encode(host.random_valid(key=host.old_session_key)) + b"\0"
    if kind == "forged":
        return p.cobs_encode(host.random_valid(key=rng.randbytes(p.KEY_LEN))) + b"\0"
    if kind == "reflected":
        return p.cobs_encode(host.random_valid(flags=p.FLAG_FROM_DEVICE)) + b"\0"
    raw = bytearray(host.random_valid())
    if kind == "truncated":
        return p.cobs_encode(bytes(raw[:rng.randrange(0, len(raw))])) + b"\0"
    if kind == "byteflip":
        # distinct positions: two changes at one position could restore the valid byte
        for pos in rng.sample(range(len(raw)), rng.randrange(1, 5)):
            raw[pos] = (raw[pos] + rng.randrange(1, 256)) & 0xFF
        return p.cobs_encode(bytes(raw)) + b"\0"
    if kind != "bitflip":
        raise ValueError(f"unknown fuzz kind {kind!r}; known: {', '.join(KINDS)}")
    encoded = bytearray(p.cobs_encode(bytes(raw)))
    bit = rng.randrange(len(encoded) * 8)
    encoded[bit // 8] ^= 1 << (bit % 8)
    return bytes(encoded) + b"\0"
