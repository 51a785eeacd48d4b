"""Shared vectors: the Python simulator and the C core (built here with gcc) agree."""

from __future__ import annotations

import hashlib
import hmac
import shutil
import subprocess
from pathlib import Path

import pytest

from actuator import scenarios

FIRMWARE = Path(scenarios.__file__).resolve().parent / "firmware"
VECTORS = scenarios.load_vectors()


@pytest.fixture(scope="module")
def c_runner(tmp_path_factory) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed: the C core cannot be built for the host "
                    "(apt-get install gcc)")
    out = tmp_path_factory.mktemp("c_core") / "vector_runner"
    srcs = [FIRMWARE / "host" / "vector_runner.c", FIRMWARE / "rs_link.c",
            FIRMWARE / "rs_sha256.c", FIRMWARE / "monocypher.c"]
    cmd = [gcc, "-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-pedantic", "-o", str(out),
           *map(str, srcs)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60)
    return out


def run_c(runner: Path, script: list[str]) -> list[str]:
    res = subprocess.run([str(runner)], input="\n".join(script) + "\n", capture_output=True,
                         text=True, timeout=30, check=True)
    return res.stdout.splitlines()


def test_there_are_vectors_for_every_safety_rule():
    names = {v["name"] for v in VECTORS}
    assert {"boot_hello", "join", "arm_setpoint", "link_timeout", "replay", "corruption",
            "commands", "provision", "provision_needs_button", "rekey", "counter_wrap",
            "watchdog_reset"} <= names


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: v["name"])
def test_python_simulator_matches_the_vector(vector):
    assert scenarios.run_script(scenarios.to_script(vector)) == \
        scenarios.expected_lines(vector)


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: v["name"])
def test_c_core_matches_the_vector(c_runner, vector):
    assert run_c(c_runner, scenarios.to_script(vector)) == scenarios.expected_lines(vector)


def test_vector_files_are_what_the_scenarios_generate(tmp_path):
    written = {p.name: p.read_text() for p in scenarios.write_vectors(tmp_path)}
    stored = {p.name: p.read_text() for p in scenarios.VECTOR_DIR.glob("*.json")}
    assert written == stored


def test_c_crc_and_hmac_against_reference_values(c_runner):
    lines = dict(line.split(" ", 1) for line in run_c(c_runner, ["selftest"]))
    assert lines["crc"] == "6f91"
    assert lines["sha256"] == hashlib.sha256(b"abc").hexdigest()  # FIPS 180-2 example
    assert lines["hmac"] == hmac.new(b"key", b"The quick brown fox jumps over the lazy dog",
                                     hashlib.sha256).hexdigest()
    # RFC 7748 section 6.1 (Alice's public key, the shared secret): Monocypher as built here
    assert lines["x25519_public"] == \
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    assert lines["x25519_shared"] == \
        "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"


def test_vectors_check_the_safety_outcomes():
    # the expected states are not just "whatever Python did": spot-check the rules
    by_name = {v["name"]: v for v in VECTORS}
    steps = {s["note"]: s for s in by_name["link_timeout"]["steps"] if s["note"]}
    assert steps["250 ms since the last heartbeat: still armed"]["expect_state"]["state"] == 1
    timeout = steps["timeout: FAULT, SAFE, HELLO with a new nonce"]["expect_state"]
    assert (timeout["state"], timeout["fault"], timeout["brake"]) == (0, 2, 1000)
    replay = {s["note"]: s["expect_state"] for s in by_name["replay"]["steps"]}
    assert replay["pre-reboot frame: bad tag"]["bad_tag"] == 1
    assert replay["same bytes again: replay"]["replay"] == 1
    cmds = {s["note"]: s for s in by_name["commands"]["steps"]}
    reuse = cmds["BRAKE reusing the ARM's seq: seq reused, refused, ARM result not replayed"]
    assert reuse["expect_state"]["state"] == 1 and reuse["expect_state"]["dup"] == 1
    wrap = [s["expect_state"]["bad_crc"] for s in by_name["counter_wrap"]["steps"]
            if s["note"].startswith("bad CRC")]
    assert wrap == [65535, 0, 1]
    prov = {s["note"]: s["expect_state"] for s in by_name["provision_needs_button"]["steps"]}
    assert prov["refused: no physical presence"]["prov"] == 0


def _raw_frames(step):
    from actuator import protocol as p

    return [p.cobs_decode(bytes.fromhex(f)[:-1]) for f in step["expect_tx"]]


def test_provision_vector_keeps_the_key_off_the_wire():
    by_name = {v["name"]: v for v in VECTORS}
    steps = by_name["provision"]["steps"]
    wire = b"".join(bytes.fromhex(s["data"]) for s in steps if s["op"] == "rx")
    wire += b"".join(raw for s in steps for raw in _raw_frames(s))
    agreed = scenarios.HostScript("x", "", None, [bytes.fromhex(r)
                                                  for r in by_name["provision"]["random"]])
    key = agreed.agreed_key(2)
    assert key not in wire and key[:8] not in wire


@pytest.mark.parametrize("button", [False, True])
def test_arduino_sketch_builds_and_boots_safe_on_a_stub_board(tmp_path, button):
    gcc, gxx = shutil.which("gcc"), shutil.which("g++")
    if gcc is None or gxx is None:
        pytest.skip("gcc / g++ are not installed: the sketch cannot be checked on the host")
    objs = []
    for src in ("rs_link.c", "rs_sha256.c", "monocypher.c"):
        obj = tmp_path / src.replace(".c", ".o")
        subprocess.run([gcc, "-std=c99", "-Wall", "-Wextra", "-Werror", "-c",
                        str(FIRMWARE / src), "-o", str(obj)], check=True, timeout=60)
        objs.append(str(obj))
    exe = tmp_path / "sketch"
    stubs = FIRMWARE / "host" / "arduino_stubs"
    subprocess.run([gxx, "-std=c++11", "-Wall", "-Wextra", "-Werror", "-DARDUINO_ARCH_AVR",
                    "-I", str(stubs), "-I", str(FIRMWARE), "-include", "Arduino.h",
                    "-x", "c++", str(FIRMWARE / "roadshield_actuator.ino"),
                    "-x", "c++", str(stubs / "stub_board.cpp"), "-x", "none", *objs,
                    "-o", str(exe)], check=True, capture_output=True, text=True, timeout=60)
    out = subprocess.run([str(exe), *(["button"] if button else [])], capture_output=True,
                         text=True, timeout=30, check=True)
    fields = dict(kv.split("=") for kv in out.stdout.split())
    # hardware watchdog armed and kicked every loop; HELLO at boot + every 200 ms;
    # throttle held at 0 with no host; the boot counter written to EEPROM; the HELLO
    # says "provisioning mode" (flags bit 1) exactly when D2 was held at boot
    assert fields == {"watchdog": "1", "kicks": "1000", "frames": "6", "throttle_pwm": "0",
                      "eeprom_boots": "1", "hello_flags": "2" if button else "0"}
