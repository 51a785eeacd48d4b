"""Wire format: CRC check value, COBS, frame round trips, corruption always rejected."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actuator import keyx
from actuator import messages as m
from actuator import protocol as p

KEY = bytes(range(1, 33))
SESSION = p.derive_session_key(KEY, b"\x01" * 8, b"\x02" * 8)
PROTOCOL_MD = Path(p.__file__).resolve().parent / "PROTOCOL.md"


def test_crc16_mcrf4xx_check_value():
    # the catalogue check value of CRC-16/MCRF4XX (reveng.sourceforge.io/crc-catalogue)
    assert p.crc16_mcrf4xx(b"123456789") == 0x6F91
    assert p.crc16_mcrf4xx(b"") == 0xFFFF


def test_crc_extra_bytes_are_the_c_constants():
    # the same bytes are hard-coded in actuator/firmware/rs_link.c (crc_extra)
    assert p.CRC_EXTRA == {p.HELLO: 0x8A, p.HEARTBEAT: 0xA8, p.SETPOINT: 0x6B,
                           p.COMMAND: 0x57, p.ACK: 0x94, p.STATUS: 0x37, p.FAULT: 0x8E,
                           p.PROVISION: 0xBF, p.KEY: 0x6B, p.REKEY: 0xEA, p.JOIN: 0x5C}
    c_src = (PROTOCOL_MD.parent / "firmware" / "rs_link.c").read_text()
    in_c = {name: int(v, 16) for name, v in
            re.findall(r"case RS_([A-Z]+): return (0x[0-9a-f]{2});", c_src)}
    assert in_c == {p.TYPE_NAMES[t]: v for t, v in p.CRC_EXTRA.items()}


def test_protocol_md_lists_every_crc_extra_and_signature():
    # a client written from the spec alone needs the whole table
    text = PROTOCOL_MD.read_text()
    table = {int(t): (name, int(v, 16)) for t, name, v in
             re.findall(r"^\s*\| (\d+)\s+\| ([A-Z]+)\s+\| (0x[0-9A-F]{2}) \|$", text,
                        re.MULTILINE)}
    assert table == {t: (p.TYPE_NAMES[t], v) for t, v in p.CRC_EXTRA.items()}
    for sig in p.SIGNATURES.values():
        assert f"`{sig.split(' ', 1)[1]}`" in text, sig
    assert f"wire format (version {p.VERSION})" in text


def test_session_key_needs_both_nonces():
    dn, hn = b"\x01" * 8, b"\x02" * 8
    assert p.derive_session_key(KEY, dn, hn) != p.derive_session_key(KEY, dn, b"\x03" * 8)
    assert p.derive_hello_key(KEY, dn) != p.derive_session_key(KEY, dn, hn)
    with pytest.raises(ValueError, match="8 bytes"):
        p.derive_session_key(KEY, dn, b"")


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
        p.parse_raw(raw, p.derive_session_key(KEY, b"\x02" * 8, b"\x02" * 8),
                    from_device=False)
    assert err.value.kind == "tag"
    with pytest.raises(p.FrameError, match="direction"):
        p.parse_raw(raw, SESSION, from_device=True)
    body = bytearray(raw[:-2])
    body[0] = 1  # a version-1 frame
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

    dn, hn = bytes.fromhex("0102030405060708"), bytes.fromhex("1112131415161718")
    hk = p.derive_hello_key(TEST_KEY, dn)
    sk = p.derive_session_key(TEST_KEY, dn, hn)
    text = PROTOCOL_MD.read_text()
    assert hk.hex() in text and sk.hex() in text
    frames = [
        p.build_raw(p.HELLO, m.pack_hello(m.Hello(2, 0, 0, 1, dn)), 1, 1, hk,
                    p.FLAG_FROM_DEVICE),
        p.build_raw(p.JOIN, hn, 1, 1, hk),
        p.build_raw(p.HEARTBEAT, m.pack_heartbeat(0, 1), 2, 2, sk, p.FLAG_FROM_DEVICE),
        p.build_raw(p.HEARTBEAT, m.pack_heartbeat(), 2, 2, sk),
        p.build_raw(p.SETPOINT, m.pack_setpoint(m.Setpoint(0, 0, 600, 500)), 3, 3, sk),
    ]
    for raw in frames:
        assert f"`{raw.hex()}`" in text
        assert f"`{(p.cobs_encode(raw) + bytes(1)).hex()}`" in text


def test_documented_key_agreement_in_protocol_md():
    host_secret, dev_secret = bytes(range(0x40, 0x60)), bytes(range(0x60, 0x80))
    host_pub, dev_pub = keyx.public_key(host_secret), keyx.public_key(dev_secret)
    shared = keyx.shared_secret(host_secret, dev_pub)
    assert shared == keyx.shared_secret(dev_secret, host_pub)
    key = keyx.agree(host_secret, host_pub, dev_pub, host=True)
    assert key == keyx.agree(dev_secret, dev_pub, host_pub, host=False)
    text = PROTOCOL_MD.read_text()
    for value in (host_pub, dev_pub, shared, key):
        assert value is not None and value.hex() in text


def test_x25519_rfc7748_vector():
    # RFC 7748 section 6.1
    alice = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    bob_pub = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    assert keyx.public_key(alice).hex() == \
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    assert keyx.shared_secret(alice, bob_pub).hex() == \
        "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    assert keyx.shared_secret(alice, bytes(32)) is None  # low-order point


def test_counter_delta_reads_across_the_wrap():
    assert m.counter_delta(3, 65534) == 5 and m.counter_delta(10, 10) == 0


def test_protocol_md_and_readme_agree_on_what_reflashing_does_to_the_key():
    # the firmware keeps the key in EEPROM and never clears it (roadshield_actuator.ino)
    readme = (PROTOCOL_MD.parent / "README.md").read_text()
    assert "Re-flashing does not erase the key." in PROTOCOL_MD.read_text()
    assert "Re-flashing keeps the key" in readme
    ino = (PROTOCOL_MD.parent / "firmware" / "roadshield_actuator.ino").read_text()
    assert "EEPROM.write(EE_KEY" in ino and "EE_KEY + i, 0" not in ino
