"""The device state machine under an injected clock: watchdog, latch, TTL, limits, replay."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actuator import messages as m
from actuator import protocol as p
from actuator.device import Device
from actuator.scenarios import TEST_KEY, HostScript


def nonces():
    i = 0
    while True:
        i += 1
        yield i.to_bytes(8, "little")


class Bench:
    """A device and a host speaking its current session, with a hand-driven clock."""

    def __init__(self, key: bytes | None = TEST_KEY) -> None:
        gen = nonces()
        self.dev = Device(key, lambda: next(gen))
        self.now = 0
        self.out = self.dev.boot(0)
        self.key = key or p.FACTORY_KEY
        self.rekey()

    def rekey(self) -> None:
        self.sk = p.derive_session_key(self.key, self.dev.nonce)
        self.counter = self.seq = 0

    def send(self, msg_type: int, payload: bytes, *, seq: int | None = None,
             at: int | None = None) -> list[bytes]:
        self.counter += 1
        self.seq = seq if seq is not None else self.seq + 1
        self.now = self.now if at is None else at
        wire = p.build_frame(msg_type, payload, self.seq, self.counter, self.sk)
        self.last_wire = wire
        return self.dev.feed(wire, self.now)

    def hb(self, at: int | None = None) -> list[bytes]:
        return self.send(p.HEARTBEAT, m.pack_heartbeat(), at=at)

    def cmd(self, op: int, *args: int, at: int | None = None, seq: int | None = None):
        return self.send(p.COMMAND, m.pack_command(m.Command(op, *args)), at=at, seq=seq)

    def sp(self, brake: int, steer: int, thr: int, ttl: int, at: int | None = None):
        return self.send(p.SETPOINT, m.pack_setpoint(m.Setpoint(brake, steer, thr, ttl)), at=at)

    def tick(self, at: int) -> list[bytes]:
        self.now = at
        return self.dev.tick(at)

    def armed(self) -> Bench:
        self.hb(at=10)
        self.cmd(m.OP_ARM, at=20)
        assert self.dev.state == m.STATE_ARMED
        return self


def decode_types(frames: list[bytes], bench: Bench) -> list[int]:
    return [p.cobs_decode(f[:-1])[1] for f in frames]


def test_boots_safe_and_announces_hello():
    b = Bench()
    assert decode_types(b.out, b) == [p.HELLO]
    snap = b.dev.snapshot()
    assert (snap["state"], snap["brake"], snap["steer"], snap["thr"]) == (m.STATE_SAFE, 1000, 0, 0)


@pytest.mark.parametrize("last_hb", [20, 1000, 2**32 - 100])  # includes a clock wrap
def test_link_watchdog_fires_after_250_ms_of_silence(last_hb):
    b = Bench()
    b.hb(at=last_hb - 10)
    b.cmd(m.OP_ARM, at=last_hb - 5)
    b.sp(0, 0, 600, 60_000, at=last_hb - 2)
    b.hb(at=last_hb)
    assert b.dev.brake == 0
    b.tick((last_hb + 250) & 0xFFFFFFFF)
    assert b.dev.state == m.STATE_ARMED  # 250 ms is still within the bound
    out = b.tick((last_hb + 251) & 0xFFFFFFFF)
    assert b.dev.state == m.STATE_SAFE and b.dev.fault == m.FAULT_LINK_TIMEOUT
    assert (b.dev.brake, b.dev.throttle, b.dev.target) == (1000, 0, 0)
    assert decode_types(out, b) == [p.FAULT, p.HELLO]


def test_safe_state_stays_latched_until_rearm_with_fresh_heartbeat():
    b = Bench().armed()
    b.tick(400)
    assert b.dev.state == m.STATE_SAFE
    b.rekey()  # the host follows the new HELLO
    b.sp(0, 0, 500, 1000, at=410)
    assert b.dev.state == m.STATE_SAFE and b.dev.brake == 1000  # setpoints do not un-latch
    b.cmd(m.OP_ARM, at=420)
    assert b.dev.state == m.STATE_SAFE  # no heartbeat since the fault
    b.hb(at=430)
    b.cmd(m.OP_ARM, at=440)
    assert b.dev.state == m.STATE_ARMED and b.dev.fault == m.FAULT_NONE


def test_setpoint_past_its_ttl_stops_driving():
    b = Bench().armed()
    b.sp(0, 0, 700, 100, at=30)
    assert (b.dev.brake, b.dev.throttle) == (0, 700)
    b.tick(129)
    assert b.dev.throttle == 700
    b.tick(130)
    assert (b.dev.brake, b.dev.throttle) == (1000, 0)
    b.sp(0, 0, 700, 0, at=140)  # a TTL of 0 is never live
    assert b.dev.brake == 1000 and b.dev.counters["expired"] == 2


def test_steering_is_range_and_slew_limited():
    b = Bench().armed()
    b.sp(0, 1000, 500, 5000, at=100)  # far past the default 300 limit
    assert b.dev.target == 300
    last_hb = 100
    for t in range(101, 1200, 7):
        prev = b.dev.steering
        if t - last_hb >= 100:
            b.hb(at=t)
            last_hb = t
        else:
            b.tick(t)
        assert 0 <= b.dev.steering - prev <= 500 * 7 // 1000 + 1  # 500 per mille per second
        assert abs(b.dev.steering) <= 300
    assert b.dev.steering == 300


def test_out_of_range_setpoint_is_refused():
    b = Bench().armed()
    b.sp(1001, 0, 0, 100, at=30)
    b.sp(0, 0, 1001, 100, at=31)
    b.sp(0, -1001, 0, 100, at=32)
    assert b.dev.counters["refused"] == 3 and not b.dev.sp_active


def test_replay_within_a_session_and_across_a_reboot():
    b = Bench().armed()
    b.sp(0, 0, 400, 1000, at=30)
    wire = b.last_wire
    b.dev.feed(wire, 40)
    assert b.dev.counters["replay"] == 1
    gen = nonces()
    next(gen)
    rebooted = Device(TEST_KEY, lambda: next(gen))  # a different boot nonce
    rebooted.boot(50)
    rebooted.feed(wire, 60)
    assert rebooted.counters["bad_tag"] == 1 and rebooted.counters["accepted"] == 0


def test_commands_are_deduplicated_by_seq():
    b = Bench().armed()
    b.cmd(m.OP_BRAKE, at=30, seq=500)
    b.hb(at=40)
    b.cmd(m.OP_ARM, at=50)
    assert b.dev.state == m.STATE_ARMED
    out = b.cmd(m.OP_ARM, at=60, seq=b.seq)  # a retry of the ARM: acknowledged again
    assert decode_types(out, b) == [p.ACK] and b.dev.counters["dup"] == 1


def test_provisioning_happens_once():
    b = Bench(key=None)
    b.hb(at=10)
    b.cmd(m.OP_ARM, at=20)
    assert b.dev.state == m.STATE_SAFE  # an unprovisioned board never arms
    new_key = bytes(range(100, 132))
    out = b.send(p.PROVISION, new_key, at=30)
    assert decode_types(out, b) == [p.ACK, p.HELLO] and b.dev.key_changed
    b.key = new_key
    b.rekey()
    refused = b.dev.counters["refused"]
    b.send(p.PROVISION, bytes(range(32)), at=40)
    assert b.dev.key == new_key and b.dev.counters["refused"] == refused + 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=120), max_size=8))
def test_random_streams_never_crash_nor_act(chunks):
    b = Bench().armed()
    before = b.dev.snapshot()
    t = 30
    for chunk in chunks:
        out = b.dev.feed(chunk, t)
        assert out == []
    after = b.dev.snapshot()
    assert after["accepted"] == before["accepted"] and after["state"] == m.STATE_ARMED


def test_a_valid_frame_with_any_single_bit_flip_is_never_acted_on():
    b = Bench().armed()
    h = HostScript("x", "", TEST_KEY, [b.dev.nonce])
    h.counter = b.counter + 10
    wire = h.setpoint(0, 100, 900, 1000)
    for bit in range((len(wire) - 1) * 8):  # every bit but the delimiter's
        bad = bytearray(wire)
        bad[bit // 8] ^= 1 << (bit % 8)
        accepted = b.dev.counters["accepted"]
        assert b.dev.feed(bytes(bad) + b"\0", 30) == []
        assert b.dev.counters["accepted"] == accepted and not b.dev.sp_active
    b.dev.feed(wire, 31)
    assert b.dev.sp_active and b.dev.throttle == 900
