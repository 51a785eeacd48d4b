"""The device state machine under an injected clock: watchdog, latch, TTL, limits, replay."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actuator import keyx
from actuator import messages as m
from actuator import protocol as p
from actuator.device import Device
from actuator.scenarios import TEST_KEY, HostScript


class Counting:
    """A deterministic random source: distinct bytes on every draw."""

    def __init__(self) -> None:
        self.i = 0

    def __call__(self, n: int) -> bytes:
        self.i += 1
        return (self.i.to_bytes(4, "little") * ((n + 3) // 4))[:n]


class Bench:
    """A device and a host speaking its current session, with a hand-driven clock."""

    def __init__(self, key: bytes | None = TEST_KEY, *, button: bool = False) -> None:
        self.dev = Device(key, Counting(), provision_button=button)
        self.now = 0
        self.wire_log: list[bytes] = []
        self.out = self._log(self.dev.boot(0))
        self.key = (key or p.FACTORY_KEY) if not button else p.FACTORY_KEY
        self.rekey()

    def _log(self, frames: list[bytes]) -> list[bytes]:
        self.wire_log += frames
        return frames

    def rekey(self, host_nonce: bytes = b"\x5a" * 8) -> list[bytes]:
        """Follow the device's latest HELLO: send JOIN, then use the session key."""
        self.counter = self.seq = 0
        self.sk = p.derive_hello_key(self.key, self.dev.nonce)
        out = self.send(p.JOIN, host_nonce)
        self.sk = p.derive_session_key(self.key, self.dev.nonce, host_nonce)
        return out

    def send(self, msg_type: int, payload: bytes, *, seq: int | None = None,
             at: int | None = None, flags: int = 0) -> list[bytes]:
        self.counter += 1
        self.seq = seq if seq is not None else self.seq + 1
        self.now = self.now if at is None else at
        wire = p.build_frame(msg_type, payload, self.seq, self.counter, self.sk, flags)
        self.last_wire = wire
        self.wire_log.append(wire)
        return self._log(self.dev.feed(wire, self.now))

    def hb(self, at: int | None = None) -> list[bytes]:
        return self.send(p.HEARTBEAT, m.pack_heartbeat(), at=at)

    def cmd(self, op: int, *args: int, at: int | None = None, seq: int | None = None,
            flags: int = 0):
        return self.send(p.COMMAND, m.pack_command(m.Command(op, *args)), at=at, seq=seq,
                         flags=flags)

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


def acks(frames: list[bytes], bench: Bench) -> list[m.Ack]:
    out = []
    for f in frames:
        frame = p.parse_raw(p.cobs_decode(f[:-1]), bench.sk, from_device=True)
        if frame.msg_type == p.ACK:
            ack = m.unpack(p.ACK, frame.payload)
            assert isinstance(ack, m.Ack)
            out.append(ack)
    return out


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
    b.rekey()  # the host follows the new HELLO (JOIN at t=400)
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
    rebooted = Device(TEST_KEY, lambda n: b"\x77" * n)  # a different boot nonce
    rebooted.boot(50)
    rebooted.feed(wire, 60)
    assert rebooted.counters["bad_tag"] == 1 and rebooted.counters["accepted"] == 0


def test_a_true_retry_is_acknowledged_again_not_redone():
    b = Bench().armed()
    b.cmd(m.OP_BRAKE, at=30, seq=500)
    b.hb(at=40)
    out = b.cmd(m.OP_BRAKE, at=50, seq=500, flags=p.FLAG_RETRY)
    assert decode_types(out, b) == [p.ACK] and b.dev.counters["dup"] == 1
    assert acks(out, b) == [m.Ack(500, m.OP_BRAKE, m.RESULT_OK)]


def test_brake_reusing_the_seq_of_an_arm_is_refused_not_answered_ok():
    # the reported defect: a BRAKE with the previous ARM's seq got ACK ok, unexecuted
    b = Bench().armed()
    arm_seq = b.seq
    out = b.cmd(m.OP_BRAKE, at=30, seq=arm_seq)
    assert acks(out, b) == [m.Ack(arm_seq, m.OP_BRAKE, m.RESULT_SEQ_REUSED)]
    assert b.dev.counters["dup"] == 0 and b.dev.counters["refused"] == 1
    out = b.cmd(m.OP_BRAKE, at=31, seq=arm_seq, flags=p.FLAG_RETRY)  # flag, other op
    assert acks(out, b) == [m.Ack(arm_seq, m.OP_BRAKE, m.RESULT_SEQ_REUSED)]


@pytest.mark.parametrize("flags, args", [(0, ()), (p.FLAG_RETRY, (7,))],
                         ids=["same-command-no-retry-flag", "retry-flag-other-arguments"])
def test_seq_reuse_needs_the_retry_flag_and_identical_arguments(flags, args):
    b = Bench()
    b.hb(at=10)
    b.cmd(m.OP_CONFIG, 500, 1000, 800, 200, at=20, seq=40)
    a3 = args[0] if args else 200
    out = b.cmd(m.OP_CONFIG, 500, 1000, 800, a3, at=30, seq=40, flags=flags)
    assert [a.result for a in acks(out, b)] == [m.RESULT_SEQ_REUSED]
    assert b.dev.config["link_timeout"] == 200 and b.dev.counters["dup"] == 0


def test_status_counters_wrap_instead_of_saturating():
    b = Bench().armed()
    b.dev.counters["bad_crc"] = 0xFFFF
    raw = bytearray(p.build_raw(p.HEARTBEAT, m.pack_heartbeat(), 90, 90, b.sk))
    raw[-1] ^= 0x01  # a CRC that does not match
    bad = p.cobs_encode(bytes(raw)) + b"\0"
    b.dev.feed(bad, 30)
    assert b.dev.counters["bad_crc"] == 0  # was stuck at 65535
    b.dev.feed(bad, 31)
    assert m.counter_delta(b.dev.status().bad_crc, 0xFFFF) == 2


def test_only_join_is_accepted_before_the_session_is_keyed():
    dev = Device(TEST_KEY, Counting())
    dev.boot(0)
    hello_key = p.derive_hello_key(TEST_KEY, dev.nonce)
    assert dev.feed(p.build_frame(p.HEARTBEAT, m.pack_heartbeat(), 1, 1, hello_key), 5) == []
    assert dev.counters["bad_frame"] == 1 and not dev.host_seen
    out = dev.feed(p.build_frame(p.JOIN, b"\x01" * 8, 2, 2, hello_key), 6)
    sk = p.derive_session_key(TEST_KEY, dev.nonce, b"\x01" * 8)
    assert [p.parse_raw(p.cobs_decode(f[:-1]), sk, from_device=True).msg_type
            for f in out] == [p.HEARTBEAT]  # confirmed under the key with both nonces


def _provision(b: Bench, at: int, msg_type: int = p.PROVISION):
    secret = bytes(range(0x40, 0x60))
    pub = keyx.public_key(secret)
    out = b.send(msg_type, pub, at=at)
    return secret, pub, out


def test_provisioning_needs_the_button_at_boot():
    b = Bench(key=None)
    _, _, out = _provision(b, 10)
    assert acks(out, b) == [m.Ack(b.seq, m.OP_PROVISION, m.RESULT_REFUSED)]
    assert not b.dev.provisioned and not b.dev.key_changed


def test_provisioning_agrees_a_key_that_never_crosses_the_wire():
    b = Bench(key=None, button=True)
    b.hb(at=5)
    b.cmd(m.OP_ARM, at=8)
    assert b.dev.state == m.STATE_SAFE  # provisioning mode never arms
    secret, pub, out = _provision(b, 10)
    assert decode_types(out, b) == [p.KEY, p.HELLO] and b.dev.key_changed
    reply = m.unpack(p.KEY, p.parse_raw(p.cobs_decode(out[0][:-1]), b.sk,
                                        from_device=True).payload)
    assert isinstance(reply, m.KeyReply) and reply.op == m.OP_PROVISION
    key = keyx.agree(secret, pub, reply.device_public, host=True)
    assert key == b.dev.key and b.dev.provisioned and not b.dev.provision_mode
    # neither the key nor the secret appears in any frame on the wire, either direction
    wire = b"".join(p.cobs_decode(f[:-1]) for f in b.wire_log)
    assert key not in wire and key[:8] not in wire
    b.key = key
    b.rekey()
    _, _, out = _provision(b, 20)  # one key per button boot
    assert acks(out, b)[0].result == m.RESULT_REFUSED and b.dev.key == key
    b.hb(at=30)
    b.cmd(m.OP_ARM, at=40)
    assert b.dev.state == m.STATE_ARMED


def test_a_button_boot_keys_the_session_with_the_factory_key_even_when_provisioned():
    b = Bench(key=TEST_KEY, button=True)
    assert b.dev.host_seen  # the JOIN under the factory key was taken
    secret, pub, out = _provision(b, 10)
    assert decode_types(out, b) == [p.KEY, p.HELLO] and b.dev.key != TEST_KEY


def test_rekey_under_the_current_key_only_while_safe():
    b = Bench().armed()
    _, _, out = _provision(b, 30, p.REKEY)
    assert acks(out, b) == [m.Ack(b.seq, m.OP_REKEY, m.RESULT_REFUSED)]
    b.cmd(m.OP_BRAKE, at=40)
    secret, pub, out = _provision(b, 50, p.REKEY)
    assert decode_types(out, b) == [p.KEY, p.HELLO]
    reply = m.unpack(p.KEY, p.parse_raw(p.cobs_decode(out[0][:-1]), b.sk,
                                        from_device=True).payload)
    assert isinstance(reply, m.KeyReply) and reply.op == m.OP_REKEY
    new_key = keyx.agree(secret, pub, reply.device_public, host=True)
    assert new_key == b.dev.key != TEST_KEY
    old_wire = p.build_frame(p.JOIN, b"\x01" * 8, 99, 99,
                             p.derive_hello_key(TEST_KEY, b.dev.nonce))
    b.dev.feed(old_wire, 60)
    assert not b.dev.host_seen  # the old key no longer opens a session
    b.key = new_key
    b.rekey()
    assert b.dev.host_seen


def test_a_low_order_public_key_gives_no_key():
    b = Bench(key=None, button=True)
    out = b.send(p.PROVISION, bytes(32), at=10)
    assert acks(out, b) == [m.Ack(b.seq, m.OP_PROVISION, m.RESULT_BAD_ARGS)]
    assert not b.dev.provisioned and b.dev.provision_mode


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
    h.sk = b.sk  # the bench's joined session
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
