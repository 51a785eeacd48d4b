"""Wire format: CRC check value, COBS, frame round trips, corruption always rejected."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actuator import messages as m
from actuator import protocol as p

KEY = bytes(range(1, 33))
SESSION = p.derive_session_key(KEY, b"\x01" * 8)


def test_crc16_mcrf4xx_check_value():
    # the catalogue check value of CRC-16/MCRF4XX (reveng.sourceforge.io/crc-catalogue)
    assert p.crc16_mcrf4xx(b"123456789") == 0x6F91
    assert p.crc16_mcrf4xx(b"") == 0xFFFF


def test_crc_extra_bytes_are_the_c_constants():
    # the same bytes are hard-coded in actuator/firmware/rs_link.c (crc_extra)
    assert p.CRC_EXTRA == {p.HELLO: 0x8A, p.HEARTBEAT: 0xA8, p.SETPOINT: 0x6B,
                           p.COMMAND: 0x57, p.ACK: 0x94, p.STATUS: 0x37, p.FAULT: 0x8E,
                           p.PROVISION: 0x66}


def test_payload_layouts_match_signatures():
    sizes = {"u8": 1, "u16": 2, "i16": 2, "u8[8]": 8, "u8[32]": 32}
    for msg_type, sig in p.SIGNATURES.items():
        words = sig.split()[1:]
        assert m.LAYOUTS[msg_type].size == sum(sizes[t] for t in words[::2]), sig


@pytest.mark.parametrize("raw, encoded", [  # examples from the COBS paper / Wikipedia
    (b"\x00", b"\x01\x01"),
    (b"\x00\x00", b"\x01\x01\x01"),
    (b"\x11\x22\x00\x33", b"\x03\x11\x22\x02\x33"),
    (b"\x11\x22\x33\x44", b"\x05\x11\x22\x33\x44"),
    (b"\x11\x00\x00\x00", b"\x02\x11\x01\x01\x01"),
    (bytes(range(1, 255)), b"\xff" + bytes(range(1, 255)) + b"\x01"),
])
def test_cobs_known_encodings(raw, encoded):
    assert p.cobs_encode(raw) == encoded
    assert p.cobs_decode(encoded) == raw


@given(st.binary(max_size=600))
def test_cobs_round_trip_has_no_zero(data):
    enc = p.cobs_encode(data)
    assert 0 not in enc
    assert p.cobs_decode(enc) == data


@given(st.sampled_from(sorted(p.SIGNATURES)), st.binary(max_size=p.MAX_PAYLOAD),
       st.integers(0, 0xFFFF), st.integers(1, 0xFFFFFFFF), st.booleans())
def test_frame_round_trip(msg_type, payload, seq, counter, from_device):
    flags = p.FLAG_FROM_DEVICE if from_device else 0
    wire = p.build_frame(msg_type, payload, seq, counter, SESSION, flags)
    assert wire.endswith(b"\0") and 0 not in wire[:-1]
    assert len(wire) - 1 <= p.MAX_ENCODED
    frame = p.parse_raw(p.cobs_decode(wire[:-1]), SESSION, from_device=from_device)
    assert (frame.msg_type, frame.payload, frame.seq, frame.counter) == \
        (msg_type, payload, seq, counter)


def test_every_single_bit_flip_is_rejected():
    payload = m.pack_setpoint(m.Setpoint(100, -200, 700, 500))
    raw = p.build_raw(p.SETPOINT, payload, 7, 42, SESSION)
    for bit in range(len(raw) * 8):
        bad = bytearray(raw)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(p.FrameError) as err:
            p.parse_raw(bytes(bad), SESSION, from_device=False)
        assert err.value.kind in ("frame", "crc")  # the CRC catches every single-bit error


def test_wrong_key_direction_and_version_are_rejected():
    raw = p.build_raw(p.HEARTBEAT, m.pack_heartbeat(), 1, 1, SESSION)
    with pytest.raises(p.FrameError, match="tag") as err:
        p.parse_raw(raw, p.derive_session_key(KEY, b"\x02" * 8), from_device=False)
    assert err.value.kind == "tag"
    with pytest.raises(p.FrameError, match="direction"):
        p.parse_raw(raw, SESSION, from_device=True)
    body = bytearray(raw[:-2])
    body[0] = 2
    crc = p.crc16_mcrf4xx(bytes([p.CRC_EXTRA[p.HEARTBEAT]]), p.crc16_mcrf4xx(bytes(body)))
    with pytest.raises(p.FrameError, match="version"):
        p.parse_raw(bytes(body) + struct.pack("<H", crc), SESSION, from_device=False)


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_random_bytes_never_crash_the_parser(data):
    for encoded in p.FrameSplitter().push(data + b"\0"):
        if encoded is None:
            continue
        try:
            raw = p.cobs_decode(encoded)
            p.parse_raw(raw, SESSION, from_device=False)
        except p.FrameError as err:
            assert err.kind in ("frame", "crc", "tag")


def test_splitter_discards_over_long_runs_and_resyncs():
    good = p.build_frame(p.HEARTBEAT, m.pack_heartbeat(), 1, 1, SESSION)
    out = p.FrameSplitter().push(b"\x07" * 200 + b"\0" + b"\0\0" + good)
    assert out == [None, good[:-1]]


def test_status_round_trip():
    s = m.Status(1, 0, 3, 200, -150, 800, 9, 1, 2, 3, 4, 5)
    assert m.unpack(p.STATUS, m.pack_status(s)) == s
    assert s.to_dict()["state_name"] == "armed" and s.setpoint_active
    with pytest.raises(p.FrameError, match="wrong size"):
        m.unpack(p.STATUS, b"\0" * 3)


def test_documented_frames_in_protocol_md():
    from actuator.scenarios import TEST_KEY

    nonce = bytes.fromhex("0102030405060708")
    sk = p.derive_session_key(TEST_KEY, nonce)
    assert sk.hex() == "229daa32b630e31d90cc3118b113beaca17943cfa04a7536147b1c6800e3ca94"
    hello = p.build_frame(p.HELLO, m.pack_hello(m.Hello(1, 0, 0, 1, nonce)), 1, 1, sk,
                          p.FLAG_FROM_DEVICE)
    hb = p.build_frame(p.HEARTBEAT, m.pack_heartbeat(), 1, 1, sk)
    sp = p.build_frame(p.SETPOINT, m.pack_setpoint(m.Setpoint(0, 0, 600, 500)), 2, 2, sk)
    assert hello.hex() == "0501018001030c01010b0101020304050607080101010ba3c901a45acf0350d27c00"
    assert hb.hex() == "0301020201020201020101010bf24e9f75550e0f57f1ec00"
    assert sp.hex() == "03010302020208010101065802f4010201010b1922f94b04352ab8726500"
