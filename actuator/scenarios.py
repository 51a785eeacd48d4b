"""Shared test vectors: scripted byte streams for the device, run through Python and C.

A vector (``actuator/vectors/<name>.json``) holds the device key (or null when
unprovisioned), whether the provisioning button was held at boot, counter presets, the
random bytes the device will draw (8 per session nonce, 32 per key agreement, in order)
and steps ``boot`` / ``rx`` / ``tick`` at given milliseconds, each with the frames the
device must write and its state afterwards. ``to_script`` turns a vector into the line
script the C harness (``actuator/firmware/host/vector_runner``) reads; ``run_script`` runs
the same script through the Python ``Device`` and prints the same lines. Regenerate the
files with ``python -m actuator.scenarios --write`` after a deliberate protocol change.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from . import keyx
from . import messages as m
from . import protocol as p
from .device import COUNTER_NAMES, Device

VECTOR_DIR = Path(__file__).resolve().parent / "vectors"
TEST_KEY = bytes(range(1, 33))
#: the host's X25519 secret in the key-agreement vectors (a fixed test value)
HOST_SECRET = bytes(range(0x40, 0x60))
STATE_KEYS = ("state", "fault", "prov", "pmode", "host", "sp", "brake", "steer", "thr",
              "target", "spseq", *COUNTER_NAMES)


def state_line(snap: dict[str, int]) -> str:
    return "state " + " ".join(f"{k}={snap[k]}" for k in STATE_KEYS)


def run_script(lines: Sequence[str]) -> list[str]:
    """The Python twin of vector_runner.c: same script in, same lines out."""
    out: list[str] = []
    key: bytes | None = None
    boot_fault = m.FAULT_BOOT
    button = False
    preset = 0
    pool = bytearray()
    drawn = 0
    dev: Device | None = None

    def draw(n: int) -> bytes:  # one pool across reboots, as the C harness draws
        nonlocal drawn
        if drawn + n > len(pool):
            raise ValueError("script ran out of random bytes")
        drawn += n
        return bytes(pool[drawn - n:drawn])

    def emit(frames: list[bytes]) -> None:
        out.extend(f"tx {f.hex()}" for f in frames)
        if dev is not None:
            out.append(state_line(dev.snapshot()))

    for line in lines:
        word, _, rest = line.strip().partition(" ")
        if word == "key":
            key = None if rest == "none" else bytes.fromhex(rest)
        elif word == "bootfault":
            boot_fault = int(rest)
        elif word == "button":
            button = bool(int(rest))
        elif word == "counters":
            preset = int(rest)
        elif word == "random":
            pool += bytes.fromhex(rest)
        elif word == "boot":
            dev = Device(key, draw, boot_fault, provision_button=button)
            dev.counters = dict.fromkeys(COUNTER_NAMES, preset)
            emit(dev.boot(int(rest)))
        elif word == "rx" and dev is not None:
            t, data = rest.split(" ")
            emit(dev.feed(bytes.fromhex(data), int(t)))
        elif word == "tick" and dev is not None:
            emit(dev.tick(int(rest)))
        elif word:
            raise ValueError(f"cannot parse script line {line!r}")
    return out


def to_script(vector: dict[str, Any]) -> list[str]:
    lines = [f"key {vector['key'] or 'none'}", f"bootfault {vector['boot_fault']}",
             f"button {int(vector['provision_button'])}", f"counters {vector['counters']}"]
    lines += [f"random {n}" for n in vector["random"]]
    for step in vector["steps"]:
        if step["op"] == "rx":
            lines.append(f"rx {step['t']} {step['data']}")
        else:
            lines.append(f"{step['op']} {step['t']}")
    return lines


def expected_lines(vector: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for step in vector["steps"]:
        out += [f"tx {f}" for f in step["expect_tx"]]
        out.append(state_line(step["expect_state"]))
    return out


class HostScript:
    """Builds a vector: host frames keyed to the device's announced session.

    ``random``: the device's draws in order (8-byte nonces, 32-byte X25519 secrets).
    ``follow(i)`` tracks the device into the session announced with ``random[i]``;
    ``join(host_nonce)`` returns the JOIN frame and switches to that session's key.
    """

    def __init__(self, name: str, description: str, key: bytes | None, random: list[bytes],
                 boot_fault: int = m.FAULT_BOOT, *, provision_button: bool = False,
                 counters: int = 0) -> None:
        self.name, self.description = name, description
        self.key, self.random, self.boot_fault = key, random, boot_fault
        self.provision_button, self.counters = provision_button, counters
        self.boot_key = key  # the key the device boots with (``key`` follows key agreements)
        self.steps: list[dict[str, Any]] = []
        self.dnonce = random[0]
        self.sk = p.derive_hello_key(key or p.FACTORY_KEY, self.dnonce)
        self.counter = 0
        self.seq = 0

    def follow(self, index: int, key: bytes | None = None) -> None:
        """The device started the session whose nonce is ``random[index]``."""
        if key is not None:
            self.key = key
        self.dnonce = self.random[index]
        self.sk = p.derive_hello_key(self.key or p.FACTORY_KEY, self.dnonce)
        self.counter = 0

    def join(self, host_nonce: bytes = b"\xc3" * p.NONCE_LEN, **kw: Any) -> bytes:
        wire = self.frame(p.JOIN, host_nonce, **kw)
        self.sk = p.derive_session_key(self.key or p.FACTORY_KEY, self.dnonce, host_nonce)
        return wire

    def frame(self, msg_type: int, payload: bytes, *, seq: int | None = None,
              counter: int | None = None, key: bytes | None = None, flags: int = 0) -> bytes:
        if counter is None:
            self.counter += 1
            counter = self.counter
        if seq is None:
            self.seq += 1
            seq = self.seq
        return p.build_frame(msg_type, payload, seq, counter, key or self.sk, flags)

    def heartbeat(self, **kw: Any) -> bytes:
        return self.frame(p.HEARTBEAT, m.pack_heartbeat(), **kw)

    def setpoint(self, brake: int, steering: int, throttle: int, ttl: int, **kw: Any) -> bytes:
        return self.frame(p.SETPOINT, m.pack_setpoint(m.Setpoint(brake, steering, throttle, ttl)),
                          **kw)

    def command(self, op: int, *args: int, **kw: Any) -> bytes:
        return self.frame(p.COMMAND, m.pack_command(m.Command(op, *args)), **kw)

    def agreed_key(self, device_secret_index: int) -> bytes:
        """The key both ends hold after a KEY reply made with ``random[index]``."""
        dev_pub = keyx.public_key(self.random[device_secret_index])
        key = keyx.agree(HOST_SECRET, keyx.public_key(HOST_SECRET), dev_pub, host=True)
        if key is None:
            raise ValueError("the test secrets give a degenerate key")
        return key

    def boot(self, t: int, note: str = "") -> None:
        self.steps.append({"op": "boot", "t": t, "note": note})

    def rx(self, t: int, data: bytes, note: str = "") -> None:
        self.steps.append({"op": "rx", "t": t, "data": data.hex(), "note": note})

    def tick(self, t: int, note: str = "") -> None:
        self.steps.append({"op": "tick", "t": t, "note": note})

    def build(self) -> dict[str, Any]:
        """Run the steps through the Python device and record what it wrote."""
        vector: dict[str, Any] = {
            "name": self.name, "description": self.description,
            "key": self.boot_key.hex() if self.boot_key else None, "boot_fault": self.boot_fault,
            "provision_button": self.provision_button, "counters": self.counters,
            "random": [n.hex() for n in self.random], "steps": self.steps}
        lines = iter(run_script(to_script(vector)))
        for step in self.steps:
            step["expect_tx"] = []
            for line in lines:
                if line.startswith("tx "):
                    step["expect_tx"].append(line[3:])
                else:
                    step["expect_state"] = dict(kv.split("=") for kv in line[6:].split())
                    step["expect_state"] = {k: int(v) for k, v in step["expect_state"].items()}
                    break
        return vector


def _nonces(tag: int, n: int = 4) -> list[bytes]:
    return [bytes([tag, i]) + b"\xa5" * 6 for i in range(n)]


def _secret(tag: int) -> bytes:
    return bytes([tag]) * 16 + bytes(range(16))


def _armed(h: HostScript) -> None:
    h.boot(0, "power-up: SAFE, HELLO")
    h.rx(5, h.join(), "JOIN with the host nonce: session keyed, HEARTBEAT confirms it")
    h.rx(10, h.heartbeat(), "first host heartbeat")
    h.rx(20, h.command(m.OP_ARM), "arm with a fresh heartbeat: ACK ok, STATUS armed")


def scenarios() -> Iterator[HostScript]:
    h = HostScript("boot_hello", "HELLO at boot and every 200 ms until the host's JOIN",
                   TEST_KEY, _nonces(1))
    h.boot(0)
    h.tick(199, "no HELLO yet")
    h.tick(200, "HELLO again")
    h.rx(250, h.join(), "JOIN: HEARTBEAT under the session key, HELLOs stop")
    h.tick(350, "device HEARTBEAT every 100 ms")
    yield h

    h = HostScript("join", "the session key needs the host's JOIN nonce", TEST_KEY,
                   _nonces(9))
    h.boot(0)
    h.rx(10, h.heartbeat(), "HEARTBEAT before JOIN (under the hello key): bad frame")
    other = HostScript("x", "", TEST_KEY, _nonces(9))
    forged = other.join(b"\x11" * 8, counter=50)
    stranger = other.heartbeat(counter=51)  # keyed with a host nonce the device never saw
    h.rx(20, h.join(), "JOIN: keyed, confirming HEARTBEAT")
    h.rx(30, forged, "a second JOIN (hello key) after the session is keyed: bad tag")
    h.rx(40, stranger, "a frame keyed to another host nonce: bad tag")
    h.rx(50, h.heartbeat(), "the joined host's heartbeat: accepted")
    yield h

    h = HostScript("arm_setpoint", "arm, setpoint, steering slew and limit, TTL expiry",
                   TEST_KEY, _nonces(2))
    h.boot(0)
    h.rx(5, h.join())
    h.rx(10, h.command(m.OP_ARM), "arm before any heartbeat: refused")
    h.rx(20, h.heartbeat())
    h.rx(30, h.command(m.OP_ARM), "armed")
    h.rx(40, h.setpoint(0, 250, 600, 300), "setpoint: brake off, steer 250, throttle 600")
    h.tick(240, "steering slews at 500 per mille per second")
    h.rx(245, h.heartbeat())
    h.tick(339, "setpoint still live")
    h.tick(340, "TTL over: brake on, steering back to neutral")
    h.rx(341, h.heartbeat())
    h.rx(350, h.setpoint(0, 900, 2000, 300), "throttle above 1000: refused")
    h.rx(360, h.setpoint(200, 900, 800, 300), "steering clamped to the 300 limit")
    h.rx(450, h.setpoint(100, 0, 800, 0), "TTL 0: ignored")
    yield h

    h = HostScript("link_timeout", "no heartbeat for 250 ms -> SAFE latched, new session",
                   TEST_KEY, _nonces(3))
    _armed(h)
    h.rx(30, h.setpoint(0, 0, 500, 1000))
    h.tick(260, "250 ms since the last heartbeat: still armed")
    old = h.heartbeat()
    h.tick(261, "timeout: FAULT, SAFE, HELLO with a new nonce")
    h.rx(280, old, "heartbeat keyed to the old session: bad tag")
    h.follow(1)
    h.rx(285, h.join(b"\xc4" * 8), "JOIN the new session")
    h.rx(290, h.setpoint(0, 0, 500, 1000), "setpoint in the new session: refused, latched")
    h.rx(300, h.command(m.OP_ARM), "arm without a fresh heartbeat: refused")
    h.rx(310, h.heartbeat())
    h.rx(320, h.command(m.OP_ARM), "explicit re-arm with a fresh heartbeat: ok")
    yield h

    h = HostScript("replay", "replayed frames within a session and after a reboot",
                   TEST_KEY, _nonces(4))
    _armed(h)
    sp = h.setpoint(0, 0, 400, 1000)
    h.rx(30, sp, "accepted")
    h.rx(40, sp, "same bytes again: replay")
    h.rx(50, h.setpoint(0, 0, 900, 1000, seq=h.seq - 2), "older seq, newer counter: stale")
    h.rx(60, h.heartbeat(counter=h.counter - 1), "counter not above the last: replay")
    h.boot(70, "reboot: new nonce")
    h.rx(80, sp, "pre-reboot frame: bad tag")
    yield h

    h = HostScript("corruption", "corrupted, forged, reflected and over-long frames",
                   TEST_KEY, _nonces(5))
    _armed(h)
    good = bytearray(p.build_raw(p.SETPOINT, m.pack_setpoint(m.Setpoint(0, 0, 500, 1000)),
                                 50, 99, h.sk))
    flipped = bytearray(good)
    flipped[7] ^= 0x04
    h.rx(30, p.cobs_encode(bytes(flipped)) + b"\0", "one bit flipped: bad CRC")
    h.rx(40, h.setpoint(0, 0, 500, 1000, key=bytes(32 * [7])), "wrong key: bad tag")
    h.rx(50, h.heartbeat(flags=p.FLAG_FROM_DEVICE), "device-direction flag: bad frame")
    h.rx(60, bytes(range(1, 90)) + b"\0", "over-long run: bad frame")
    h.rx(70, b"\x05\x01\x00", "truncated COBS: bad frame")
    h.rx(80, h.frame(p.STATUS, bytes(21)),
         "a device-only message from the host: bad frame at the type step")
    h.rx(85, h.frame(p.KEY, bytes(35)), "KEY from the host: bad frame at the type step")
    h.rx(90, h.heartbeat(), "the stream resyncs: accepted")
    yield h

    h = HostScript("commands", "COMMAND: true retries de-duplicated, other seq reuse refused",
                   TEST_KEY, _nonces(6))
    _armed(h)
    h.rx(30, h.command(m.OP_CONFIG, 500, 1000, 800, 200), "config while armed: refused")
    h.rx(40, h.command(m.OP_BRAKE, seq=77), "brake: SAFE")
    h.rx(50, h.heartbeat())
    h.rx(60, h.command(m.OP_BRAKE, seq=77, flags=p.FLAG_RETRY), "retry: ACK again, no redo")
    h.rx(62, h.command(m.OP_ARM, seq=77, flags=p.FLAG_RETRY),
         "ARM reusing the BRAKE's seq with the retry flag: seq reused, not executed")
    h.rx(64, h.command(m.OP_BRAKE, seq=77), "the same BRAKE without the retry flag: seq reused")
    h.rx(70, h.command(m.OP_CONFIG, 1200, 1000, 800, 200), "steer limit 1200: bad args")
    h.rx(80, h.command(m.OP_CONFIG, 500, 2000, 800, 200), "config while safe: ok")
    h.rx(90, h.command(9), "unknown op: bad args")
    h.rx(100, h.command(m.OP_ARM, seq=90))
    h.rx(105, h.command(m.OP_BRAKE, seq=90),
         "BRAKE reusing the ARM's seq: seq reused, refused, ARM result not replayed")
    h.rx(107, h.command(m.OP_ARM, 1, seq=90, flags=p.FLAG_RETRY),
         "retry flag but other arguments: seq reused")
    h.rx(110, h.setpoint(0, -1000, 1000, 500), "new limits: steer -500, throttle 800")
    h.rx(200, h.heartbeat())
    h.rx(300, h.heartbeat())
    h.tick(360, "steering at the -500 limit after 250 ms at 2000 per second")
    h.rx(370, h.command(m.OP_DISARM), "disarm: SAFE, FAULT disarmed")
    yield h

    host_pub = keyx.public_key(HOST_SECRET)
    rnd = _nonces(7, 1) + [_secret(1), _secret(2)] + _nonces(7, 3)[1:]
    h = HostScript("provision", "provisioning needs the button at boot; X25519, key never sent",
                   None, rnd, provision_button=True)
    h.boot(0, "button held: HELLO says unprovisioned, provisioning mode")
    h.rx(5, h.join())
    h.rx(10, h.heartbeat())
    h.rx(20, h.command(m.OP_ARM), "unprovisioned: arm refused")
    h.rx(30, h.frame(p.PROVISION, bytes(32)), "low-order public key: bad args, no key")
    h.rx(40, h.frame(p.PROVISION, host_pub),
         "key agreed: KEY with the device public key, HELLO under the new key")
    h.follow(3, h.agreed_key(2))
    h.rx(45, h.join())
    h.rx(50, h.frame(p.PROVISION, host_pub), "second PROVISION in one button boot: refused")
    h.rx(60, h.heartbeat())
    h.rx(70, h.command(m.OP_ARM), "armed with the agreed key")
    yield h

    h = HostScript("provision_needs_button", "no button at boot: PROVISION refused",
                   None, _nonces(10))
    h.boot(0)
    h.rx(5, h.join())
    h.rx(10, h.frame(p.PROVISION, host_pub), "refused: no physical presence")
    h.rx(20, h.heartbeat())
    h.rx(30, h.command(m.OP_ARM), "still cannot arm")
    yield h

    rnd = _nonces(11, 1) + [_secret(3)] + _nonces(11, 2)[1:]
    h = HostScript("rekey", "key rotation under the current key, by X25519, only while SAFE",
                   TEST_KEY, rnd)
    _armed(h)
    h.rx(30, h.frame(p.REKEY, host_pub), "REKEY while armed: refused")
    h.rx(40, h.command(m.OP_BRAKE), "brake: SAFE")
    old = h.heartbeat(counter=100)
    h.rx(50, h.frame(p.REKEY, host_pub), "key agreed: KEY, then HELLO under the new key")
    h.follow(2, h.agreed_key(1))
    h.rx(60, old, "a frame under the old key: bad tag")
    h.rx(65, h.join())
    h.rx(70, h.heartbeat())
    h.rx(80, h.command(m.OP_ARM), "armed under the rotated key")
    yield h

    h = HostScript("counter_wrap", "STATUS counters wrap at 65536 (they never saturate)",
                   TEST_KEY, _nonces(12), counters=65534)
    h.boot(0)
    h.rx(5, h.join())
    bad = bytearray(p.build_raw(p.HEARTBEAT, m.pack_heartbeat(), 1, 90, h.sk))
    bad[-1] ^= 0x01
    for i in range(3):
        h.rx(10 + i, p.cobs_encode(bytes(bad)) + b"\0", f"bad CRC number {i + 1}")
    h.rx(20, h.setpoint(0, 0, 0, 100), "STATUS carries the wrapped counters")
    yield h

    h = HostScript("watchdog_reset", "after a hardware watchdog reset the fault says so",
                   TEST_KEY, _nonces(8), boot_fault=m.FAULT_WATCHDOG_RESET)
    h.boot(5)
    h.rx(8, h.join())
    h.rx(10, h.heartbeat())
    h.rx(20, h.frame(p.SETPOINT, m.pack_setpoint(m.Setpoint(0, 0, 500, 500))),
         "setpoint while safe: refused")
    yield h


def write_vectors(directory: Path = VECTOR_DIR,
                  write: Callable[[Path, str], None] | None = None) -> list[Path]:
    """Regenerate every vector file; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for script in scenarios():
        path = directory / f"{script.name}.json"
        text = json.dumps(script.build(), indent=1) + "\n"
        if write is None:
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(text)
            tmp.replace(path)
        else:
            write(path, text)
        paths.append(path)
    return paths


def load_vectors(directory: Path = VECTOR_DIR) -> list[dict[str, Any]]:
    return [json.loads(f.read_text()) for f in sorted(directory.glob("*.json"))]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite actuator/vectors/*.json")
    args = parser.parse_args(argv)
    if args.write:
        for path in write_vectors():
            print(path)
    else:
        for v in load_vectors():
            ok = run_script(to_script(v)) == expected_lines(v)
            print(f"{v['name']:16s} {'ok' if ok else 'MISMATCH'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
