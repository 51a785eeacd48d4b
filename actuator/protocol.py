"""Wire format of the actuator link: COBS framing, CRC-16/MCRF4XX, HMAC-SHA256 tags.

One frame on the wire is ``COBS(raw) + b"\\x00"`` where ``raw`` is (little-endian)::

    version u8 | type u8 | flags u8 | seq u16 | len u8 | payload[len]
    | counter u32 | tag[8] | crc u16

* ``tag`` = HMAC-SHA256(key, header + payload + counter)[:8], where the key is the
  session's hello key for HELLO and JOIN and its session key for every other type.
* ``crc`` = CRC-16/MCRF4XX over header .. tag, then over one per-message-type
  "extra" byte (as MAVLink 2 does), so a frame built for another layout fails.
* session keys come from both ends: the device draws an 8-byte nonce per session and
  announces it in HELLO (tagged with ``hello_key`` = HMAC-SHA256(device_key, b"RSHELLO2" +
  device_nonce)); the host answers with JOIN carrying its own 8-byte nonce, and every
  later frame uses ``session_key`` = HMAC-SHA256(device_key, b"RSLINK2" + device_nonce +
  host_nonce). Traffic recorded in an earlier session never verifies again, and a
  replayed HELLO yields a session the real device never confirms.
* device keys are agreed with X25519 (PROVISION, REKEY), never sent:
  ``device_key`` = HMAC-SHA256(shared_secret, b"RSKEY2" + host_public + device_public).
* ``counter`` strictly increases per direction within a session (replay defence);
  ``seq`` names a message (ACK matching, COMMAND de-duplication, SETPOINT ordering).
* flags bit 7 marks device -> host frames, so a reflected frame is refused.

The C core in ``actuator/firmware/rs_link.c`` implements the same bytes; the shared
vectors in ``actuator/vectors/`` keep the two in step. See ``actuator/PROTOCOL.md``.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

#: wire format version; 2 added JOIN (host nonce), X25519 PROVISION / REKEY / KEY
VERSION = 2
HEADER = struct.Struct("<BBBHB")  # version, type, flags, seq, len
HEADER_LEN = HEADER.size  # 6
COUNTER_LEN = 4
TAG_LEN = 8
CRC_LEN = 2
MAX_PAYLOAD = 35  # KEY: u16 seq, u8 op, 32-byte public key
OVERHEAD = HEADER_LEN + COUNTER_LEN + TAG_LEN + CRC_LEN  # 20
MAX_RAW = OVERHEAD + MAX_PAYLOAD  # 55
#: longest COBS-encoded frame, delimiter excluded (one code byte per 254 data bytes)
MAX_ENCODED = MAX_RAW + 1 + MAX_RAW // 254
#: receive buffer of both ends (C: RS_RX_MAX); longer runs are discarded up to the next 0x00
RX_MAX = 64
HELLO_LABEL = b"RSHELLO2"
SESSION_LABEL = b"RSLINK2"
KEY_LABEL = b"RSKEY2"
NONCE_LEN = 8
KEY_LEN = 32
FACTORY_KEY = bytes(KEY_LEN)  # an unprovisioned device keys its sessions with zeros

FLAG_RETRY = 0x01  # a resend of a COMMAND / PROVISION / REKEY with the same seq
FLAG_FROM_DEVICE = 0x80
FLAG_RESERVED = 0x7E  # sent as 0, ignored on receipt

# message types
HELLO, HEARTBEAT, SETPOINT, COMMAND, ACK, STATUS, FAULT, PROVISION, KEY, REKEY, JOIN = \
    range(1, 12)
TYPE_NAMES = {HELLO: "HELLO", HEARTBEAT: "HEARTBEAT", SETPOINT: "SETPOINT",
              COMMAND: "COMMAND", ACK: "ACK", STATUS: "STATUS", FAULT: "FAULT",
              PROVISION: "PROVISION", KEY: "KEY", REKEY: "REKEY", JOIN: "JOIN"}
#: types a host may send; the device refuses any other (device-only) type
HOST_TYPES = (HEARTBEAT, SETPOINT, COMMAND, PROVISION, REKEY, JOIN)

#: field layout of each message; the CRC extra byte is derived from it, so changing a
#: layout without changing its signature (and the C constants) breaks every vector.
SIGNATURES = {
    HELLO: "HELLO u8 fw_major u8 fw_minor u8 fw_patch u8 flags u8[8] nonce",
    HEARTBEAT: "HEARTBEAT u8 state u8 fault",
    SETPOINT: "SETPOINT u16 brake i16 steering u16 throttle u16 ttl_ms",
    COMMAND: "COMMAND u8 op u16 a0 u16 a1 u16 a2 u16 a3",
    ACK: "ACK u16 seq u8 op u8 result",
    STATUS: ("STATUS u8 state u8 fault u8 flags u16 brake i16 steering u16 throttle "
             "u16 sp_seq u16 bad_frame u16 bad_crc u16 bad_tag u16 replay u16 refused"),
    FAULT: "FAULT u8 code u8 state",
    PROVISION: "PROVISION u8[32] host_public",
    KEY: "KEY u16 seq u8 op u8[32] device_public",
    REKEY: "REKEY u8[32] host_public",
    JOIN: "JOIN u8[8] host_nonce",
}


def crc16_mcrf4xx(data: bytes, crc: int = 0xFFFF) -> int:
    """CRC-16/MCRF4XX (poly 0x1021 reflected, init 0xFFFF, no final xor).

    Check value: ``crc16_mcrf4xx(b"123456789") == 0x6F91``. Same byte-wise update as
    MAVLink's ``crc_accumulate``, so it runs without a table on an 8-bit MCU.
    """
    for byte in data:
        tmp = (byte ^ crc) & 0xFF
        tmp = (tmp ^ (tmp << 4)) & 0xFF
        crc = ((crc >> 8) ^ (tmp << 8) ^ (tmp << 3) ^ (tmp >> 4)) & 0xFFFF
    return crc


def crc_extra(msg_type: int) -> int:
    """Per-message extra byte: the two bytes of the CRC of its signature, xor-ed."""
    c = crc16_mcrf4xx(SIGNATURES[msg_type].encode("ascii"))
    return (c & 0xFF) ^ (c >> 8)


CRC_EXTRA = {t: crc_extra(t) for t in SIGNATURES}


def cobs_encode(data: bytes) -> bytes:
    """Consistent Overhead Byte Stuffing: the result holds no 0x00 (delimiter not added)."""
    out = bytearray()
    block = bytearray()
    for byte in data:
        if byte == 0:
            out.append(len(block) + 1)
            out += block
            block.clear()
        else:
            block.append(byte)
            if len(block) == 254:
                out.append(255)
                out += block
                block.clear()
    out.append(len(block) + 1)
    out += block
    return bytes(out)


class FrameError(ValueError):
    """A received frame is refused; ``kind`` is "frame", "crc", "tag" or "replay"."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def cobs_decode(data: bytes) -> bytes:
    """Inverse of ``cobs_encode``; raises FrameError("frame") on a malformed block."""
    out = bytearray()
    i = 0
    n = len(data)
    while i < n:
        code = data[i]
        if code == 0:
            raise FrameError("frame", "zero byte inside a COBS block")
        end = i + code
        if end > n:
            raise FrameError("frame", "COBS block runs past the frame")
        block = data[i + 1:end]
        if 0 in block:
            raise FrameError("frame", "zero byte inside a COBS block")
        out += block
        i = end
        if code != 255 and i < n:
            out.append(0)
    return bytes(out)


def derive_hello_key(device_key: bytes, device_nonce: bytes) -> bytes:
    """Key of a session's HELLO and JOIN frames: HMAC-SHA256(key, "RSHELLO2" + nonce)."""
    return hmac.new(device_key, HELLO_LABEL + device_nonce, hashlib.sha256).digest()


def derive_session_key(device_key: bytes, device_nonce: bytes, host_nonce: bytes) -> bytes:
    """Key of every frame after JOIN: HMAC-SHA256(key, "RSLINK2" + device + host nonce)."""
    if len(device_nonce) != NONCE_LEN or len(host_nonce) != NONCE_LEN:
        raise ValueError("both session nonces are 8 bytes")
    return hmac.new(device_key, SESSION_LABEL + device_nonce + host_nonce,
                    hashlib.sha256).digest()


def derive_device_key(shared_secret: bytes, host_public: bytes, device_public: bytes) -> bytes:
    """Device key from an X25519 agreement (PROVISION / REKEY); see PROTOCOL.md."""
    return hmac.new(shared_secret, KEY_LABEL + host_public + device_public,
                    hashlib.sha256).digest()


def compute_tag(session_key: bytes, body: bytes) -> bytes:
    """Truncated (8-byte) HMAC-SHA256 of header + payload + counter."""
    return hmac.new(session_key, body, hashlib.sha256).digest()[:TAG_LEN]


@dataclass(frozen=True)
class Frame:
    """One verified frame; ``payload`` is still packed (see ``actuator.messages``)."""

    msg_type: int
    flags: int
    seq: int
    payload: bytes
    counter: int

    @property
    def from_device(self) -> bool:
        return bool(self.flags & FLAG_FROM_DEVICE)


def build_raw(msg_type: int, payload: bytes, seq: int, counter: int, session_key: bytes,
              flags: int = 0) -> bytes:
    """The unencoded frame (header .. crc) for ``payload``; see the module docstring."""
    if msg_type not in SIGNATURES:
        raise ValueError(f"unknown message type {msg_type}")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    body = HEADER.pack(VERSION, msg_type, flags & 0xFF, seq & 0xFFFF, len(payload)) + payload \
        + struct.pack("<I", counter & 0xFFFFFFFF)
    signed = body + compute_tag(session_key, body)
    crc = crc16_mcrf4xx(bytes([CRC_EXTRA[msg_type]]), crc16_mcrf4xx(signed))
    return signed + struct.pack("<H", crc)


def build_frame(msg_type: int, payload: bytes, seq: int, counter: int, session_key: bytes,
                flags: int = 0) -> bytes:
    """The frame as sent on the wire: COBS-encoded, followed by the 0x00 delimiter."""
    return cobs_encode(build_raw(msg_type, payload, seq, counter, session_key, flags)) + b"\0"


def check_raw(raw: bytes) -> tuple[int, int, int, int, int]:
    """Checks the layout and the CRC of an unencoded frame (no key needed).

    Returns (type, flags, seq, length, counter); raises FrameError("frame") for a bad
    layout or version and FrameError("crc") for a CRC mismatch.
    """
    if len(raw) < OVERHEAD:
        raise FrameError("frame", f"frame of {len(raw)} bytes is shorter than {OVERHEAD}")
    version, msg_type, flags, seq, length = HEADER.unpack_from(raw)
    if version != VERSION:
        raise FrameError("frame", f"protocol version {version}, expected {VERSION}")
    if length > MAX_PAYLOAD or len(raw) != OVERHEAD + length:
        raise FrameError("frame", f"length field {length} does not match {len(raw)} bytes")
    if msg_type not in CRC_EXTRA:
        raise FrameError("frame", f"unknown message type {msg_type}")
    crc = crc16_mcrf4xx(bytes([CRC_EXTRA[msg_type]]), crc16_mcrf4xx(raw[:-CRC_LEN]))
    if crc != struct.unpack_from("<H", raw, len(raw) - CRC_LEN)[0]:
        raise FrameError("crc", "CRC mismatch")
    counter = struct.unpack_from("<I", raw, HEADER_LEN + length)[0]
    return msg_type, flags, seq, length, counter


def parse_raw(raw: bytes, session_key: bytes, *, from_device: bool) -> Frame:
    """Verify an unencoded frame: layout, CRC, direction, then tag (constant-time compare).

    ``from_device``: the direction the receiver expects (True on the host side).
    The replay check (counter) is the receiver's, since it needs the session's state.
    """
    msg_type, flags, seq, length, counter = check_raw(raw)
    if bool(flags & FLAG_FROM_DEVICE) != from_device:
        raise FrameError("frame", "frame travels in the wrong direction")
    body_end = HEADER_LEN + length + COUNTER_LEN
    if not hmac.compare_digest(compute_tag(session_key, raw[:body_end]),
                               raw[body_end:body_end + TAG_LEN]):
        raise FrameError("tag", "authentication tag mismatch")
    return Frame(msg_type, flags, seq, bytes(raw[HEADER_LEN:HEADER_LEN + length]), counter)


class FrameSplitter:
    """Cuts a byte stream at 0x00 delimiters into encoded frames, bounded by RX_MAX.

    ``push`` returns the complete encoded frames (delimiter removed); an over-long
    run is reported as ``None`` so the caller can count it, and the stream resyncs
    at the next delimiter. Same rules as the C core's receive path.
    """

    def __init__(self, limit: int = RX_MAX) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._overflow = False

    def push(self, data: bytes) -> list[bytes | None]:
        out: list[bytes | None] = []
        for byte in data:
            if byte == 0:
                if self._overflow:
                    out.append(None)
                elif self._buf:
                    out.append(bytes(self._buf))
                self._buf.clear()
                self._overflow = False
            elif not self._overflow:
                if len(self._buf) >= self.limit:
                    self._overflow = True
                    self._buf.clear()
                else:
                    self._buf.append(byte)
        return out
