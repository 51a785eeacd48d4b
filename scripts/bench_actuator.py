#!/usr/bin/env python3
"""Actuator-link benchmark: fuzzing, safe-state latency, round trip, key-agreement cost.

Usage: python scripts/bench_actuator.py [--fuzz-frames 100000] [--trials 100]
           [--round-trips 1000] [--no-firmware] [--json out.json]
Prints (and optionally writes as JSON):
* fuzzed frames sent to the simulated device and how many it acted on (target 0);
* the time from the host's last HEARTBEAT to the device's entry into its safe state,
  over ``--trials`` silences on the pty (target: every trial in [250, 300) ms: not
  before the 250 ms link timeout, and within 50 ms of it);
* SETPOINT -> STATUS-reflecting-it round trip over the pty, median and p99;
* PROVISION (X25519 key agreement) and REKEY round trips against the simulator;
* the firmware's cost: the C core built for this machine with gcc (object sizes with
  ``size``, X25519 time per call); with avr-gcc, the same objects and the whole sketch
  for an ATmega2560 (flash / static RAM, with a no-op Servo stand-in, since the
  Arduino Servo library is not vendored here) against the Arduino AVR core in
  ``/usr/share/arduino`` when installed; with simavr, X25519's time and stack on a
  simulated 16 MHz ATmega2560. What is a host figure and what is an AVR figure is said
  in each key.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIRMWARE = ROOT / "actuator" / "firmware"
ARDUINO_AVR = Path("/usr/share/arduino/hardware/arduino/avr")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def wait_for(cond, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def bench_fuzz(frames: int) -> dict:
    from actuator.fuzz import fuzz

    t0 = time.perf_counter()
    report = fuzz(frames=frames, seed=0)
    return {"frames": report.frames, "acted_on": report.acted_on,
            "by_kind": report.by_kind, "rejected_as": report.rejected_as,
            "seconds": round(time.perf_counter() - t0, 2)}


def bench_pty(trials: int, round_trips: int) -> dict:
    from actuator import messages as m
    from actuator.link import SerialLink
    from actuator.scenarios import TEST_KEY
    from actuator.simulator import PtySimulator

    latencies: list[float] = []
    rtts: list[float] = []
    with PtySimulator(TEST_KEY) as sim, SerialLink(sim.port, TEST_KEY) as link:
        time.sleep(0.05)
        link.arm()
        for _ in range(round_trips):
            t0 = time.monotonic()
            seq = link.send_setpoint(0, 0, 500, 1000)
            st = link.wait_status(lambda s, q=seq: s.sp_seq == q, 1.0, after=t0)
            if st is None:
                raise SystemExit(f"no STATUS for SETPOINT seq {seq} within 1 s")
            rtts.append((time.monotonic() - t0) * 1e3)
        for i in range(trials):
            if not wait_for(lambda n=i + 1: link.state.sessions >= n, 2.0):
                raise SystemExit(f"trial {i}: the link did not follow the device's new session")
            time.sleep(0.02)  # one heartbeat in this session makes ARM fresh
            if link.arm().result != m.RESULT_OK:
                raise SystemExit(f"trial {i}: the device refused to arm")
            link.send_setpoint(0, 0, 500, 60_000)
            time.sleep(0.05)
            link.heartbeat_enabled = False
            silent_from = link.last_heartbeat_t
            if not wait_for(lambda t=silent_from: sim.safe_since(t) is not None, 2.0):
                raise SystemExit(f"trial {i}: the device never reached its safe state")
            safe_t = sim.safe_since(silent_from)
            if safe_t is None:
                raise SystemExit(f"trial {i}: no safe-state entry recorded")
            latencies.append((safe_t - silent_from) * 1e3)
            link.heartbeat_enabled = True
    return {"safe_state_trials": len(latencies),
            "safe_state_best_ms": round(min(latencies), 2),
            "safe_state_worst_ms": round(max(latencies), 2),
            "safe_state_median_ms": round(statistics.median(latencies), 2),
            "safe_state_under_300ms": sum(v < 300 for v in latencies),
            "safe_state_in_250_300ms": sum(250 <= v < 300 for v in latencies),
            "round_trips": len(rtts), "round_trip_median_ms": round(statistics.median(rtts), 3),
            "round_trip_p99_ms": round(percentile(rtts, 99), 3)}


def bench_key_agreement(rounds: int) -> dict:
    """PROVISION then REKEY round trips (X25519 on both ends) against the pty simulator."""
    from actuator.provision import provision_device, rotate_key
    from actuator.simulator import PtySimulator

    prov: list[float] = []
    rot: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(rounds):
            key_file = Path(tmp) / f"board{i}.key"
            with PtySimulator(None, provision_button=True) as sim:
                t0 = time.monotonic()
                provision_device(sim.port, key_file, hello_timeout_s=3.0)
                prov.append((time.monotonic() - t0) * 1e3)
                t0 = time.monotonic()
                rotate_key(sim.port, key_file, hello_timeout_s=3.0)
                rot.append((time.monotonic() - t0) * 1e3)
    return {"rounds": rounds, "provision_median_ms": round(statistics.median(prov), 1),
            "rekey_median_ms": round(statistics.median(rot), 1)}


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600, **kw)


def _size(tool: str, path: Path) -> dict:
    text, data, bss = _run([tool, str(path)]).stdout.splitlines()[1].split()[:3]
    return {"text": int(text), "data": int(data), "bss": int(bss)}


def bench_firmware_host() -> dict:
    """The C core built with this machine's gcc: object sizes and X25519 time (host CPU)."""
    gcc, size = shutil.which("gcc"), shutil.which("size")
    if gcc is None or size is None:
        return {"skipped": "gcc / size not installed"}
    out: dict = {"note": "host x86-64 objects and CPU; not the board's figures"}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("rs_link", "rs_sha256", "monocypher"):
            obj = Path(tmp) / f"{name}.o"
            _run([gcc, "-std=c99", "-Os", "-c", str(FIRMWARE / f"{name}.c"), "-o", str(obj)])
            out[f"{name}_host_Os"] = _size(size, obj)
        runner = Path(tmp) / "vector_runner"
        _run([gcc, "-std=c99", "-O2", "-o", str(runner), str(FIRMWARE / "host" / "vector_runner.c"),
              *(str(FIRMWARE / f"{n}.c") for n in ("rs_link", "rs_sha256", "monocypher"))])
        res = _run([str(runner)], input="bench 500\n")
        out["x25519_us_host"] = float(res.stdout.split()[1])
    return out


def _build_sketch(avr_gcc: str, tmp: Path, mcu: str) -> Path:
    """The whole sketch against the Arduino AVR core, with a no-op Servo stand-in."""
    variant, board = ("mega", "ARDUINO_AVR_MEGA2560") if mcu == "atmega2560" else \
        ("standard", "ARDUINO_AVR_UNO")
    (tmp / "servo").mkdir(exist_ok=True)
    (tmp / "servo" / "Servo.h").write_text(
        "#pragma once\nclass Servo { public: void attach(int) {} void write(int) {}\n"
        "  void writeMicroseconds(int) {} };\n")
    core = ARDUINO_AVR / "cores" / "arduino"
    flags = [f"-mmcu={mcu}", "-DF_CPU=16000000L", "-DARDUINO=10819", f"-D{board}",
             "-DARDUINO_ARCH_AVR", "-Os", "-ffunction-sections", "-fdata-sections",
             f"-I{core}", f"-I{ARDUINO_AVR / 'variants' / variant}",
             f"-I{ARDUINO_AVR / 'libraries' / 'EEPROM' / 'src'}", f"-I{tmp / 'servo'}",
             f"-I{FIRMWARE}"]
    cxx = [avr_gcc.replace("avr-gcc", "avr-g++"), *flags, "-std=gnu++11", "-fno-exceptions",
           "-fno-threadsafe-statics"]
    objs = []
    for src in sorted(core.iterdir()):
        obj = tmp / f"core_{src.name}.o"
        if src.suffix == ".c":
            _run([avr_gcc, *flags, "-std=gnu11", "-c", str(src), "-o", str(obj)])
        elif src.suffix == ".cpp" and src.name != "WString.cpp":  # unused, and needs float.h
            _run([*cxx, "-c", str(src), "-o", str(obj)])
        elif src.suffix == ".S":
            _run([avr_gcc, *flags, "-x", "assembler-with-cpp", "-c", str(src), "-o", str(obj)])
        else:
            continue
        objs.append(str(obj))
    for name in ("rs_link", "rs_sha256", "monocypher"):
        obj = tmp / f"fw_{name}.o"
        _run([avr_gcc, *flags, "-std=gnu11", "-c", str(FIRMWARE / f"{name}.c"), "-o", str(obj)])
        objs.append(str(obj))
    sketch = tmp / "sketch.o"
    _run([*cxx, "-x", "c++", "-include", "Arduino.h", "-c",
          str(FIRMWARE / "roadshield_actuator.ino"), "-o", str(sketch)])
    elf = tmp / f"sketch_{mcu}.elf"
    _run([avr_gcc, f"-mmcu={mcu}", "-Os", "-Wl,--gc-sections", "-o", str(elf), str(sketch),
          *objs, "-lm"])
    return elf


def bench_firmware_avr(simulate: bool) -> dict:
    """Flash / RAM for an ATmega2560 with avr-gcc, and X25519 time in simavr."""
    avr_gcc = shutil.which("avr-gcc")
    if avr_gcc is None:
        return {"skipped": "avr-gcc not installed (apt-get install gcc-avr avr-libc)"}
    avr_size = shutil.which("avr-size") or "avr-size"
    out: dict = {"compiler": _run([avr_gcc, "--version"]).stdout.splitlines()[0]}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        for name in ("rs_link", "rs_sha256"):
            obj = tmp / f"{name}.o"
            _run([avr_gcc, "-mmcu=atmega2560", "-Os", "-std=gnu11", "-c",
                  str(FIRMWARE / f"{name}.c"), "-o", str(obj)])
            out[f"{name}_avr_Os_object"] = _size(avr_size, obj)
        if (ARDUINO_AVR / "cores" / "arduino").is_dir():
            elf = _build_sketch(avr_gcc, tmp, "atmega2560")
            sizes = _size(avr_size, elf)
            # the part of the linked sketch that is Monocypher (X25519 and what it calls)
            nm = shutil.which("avr-nm") or "avr-nm"
            mono = {ln.split()[-1] for ln in _run([nm, str(tmp / "fw_monocypher.o")]).stdout
                    .splitlines() if ln.split() and ln.split()[-2] in "tTdDbBrR"}
            x25519 = sum(int(ln.split()[1], 16) for ln in
                         _run([nm, "-S", str(elf)]).stdout.splitlines()
                         if len(ln.split()) == 4 and ln.split()[3] in mono)
            out["sketch_atmega2560"] = {"flash": sizes["text"] + sizes["data"],
                                        "static_ram": sizes["data"] + sizes["bss"],
                                        "monocypher_flash": x25519,
                                        "flash_of": 253952, "ram_of": 8192,
                                        "servo_library": "not counted (no-op stand-in)"}
        else:
            out["sketch_atmega2560"] = "skipped: Arduino AVR core not in /usr/share/arduino"
        simavr = shutil.which("simavr")
        if simulate and simavr is not None:
            elf = tmp / "x25519_timing.elf"
            _run([avr_gcc, "-mmcu=atmega2560", "-Os", "-DF_CPU=16000000UL",
                  "-ffunction-sections", "-fdata-sections", "-Wl,--gc-sections", "-o", str(elf),
                  str(FIRMWARE / "host" / "avr_x25519_timing.c"), str(FIRMWARE / "monocypher.c")])
            proc = subprocess.Popen([simavr, "-m", "atmega2560", "-f", "16000000", str(elf)],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            lines: list[str] = []
            try:
                for line in proc.stdout or []:
                    lines.append(re.sub(r"\x1b\[[0-9;]*m", "", line).strip().rstrip("."))
                    if lines[-1].startswith("done"):
                        break
            finally:
                proc.kill()
                proc.wait(timeout=10)
            vals = {ln.split()[0]: int(ln.split()[-1]) for ln in lines
                    if ln.split() and ln.split()[-1].isdigit()}
            out["simavr_atmega2560_16MHz"] = {
                "x25519_public_key_s": round(vals["public_key"] * 1024 / 16e6, 3),
                "x25519_shared_s": round(vals["shared"] * 1024 / 16e6, 3),
                "stack_bytes_peak": vals["stack_bytes"]}
        else:
            out["simavr_atmega2560_16MHz"] = "skipped: simavr not installed or --no-simavr"
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fuzz-frames", type=int, default=100_000)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--round-trips", type=int, default=1000)
    parser.add_argument("--key-agreements", type=int, default=5)
    parser.add_argument("--no-firmware", action="store_true",
                        help="skip the firmware size / X25519 figures")
    parser.add_argument("--no-simavr", action="store_true",
                        help="skip the simavr run (about 30 s of this machine's time)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    result = {"fuzz": bench_fuzz(args.fuzz_frames), "pty": bench_pty(args.trials,
                                                                     args.round_trips),
              "key_agreement": bench_key_agreement(args.key_agreements)}
    if not args.no_firmware:
        result["firmware_host"] = bench_firmware_host()
        result["firmware_avr"] = bench_firmware_avr(not args.no_simavr)
    fz, pty, ka = result["fuzz"], result["pty"], result["key_agreement"]
    print(f"fuzz: {fz['frames']} frames, acted on {fz['acted_on']} ({fz['seconds']} s)")
    print(f"safe state after host silence, {pty['safe_state_trials']} pty trials: "
          f"best {pty['safe_state_best_ms']} ms, worst {pty['safe_state_worst_ms']} ms, "
          f"median {pty['safe_state_median_ms']} ms, "
          f"{pty['safe_state_in_250_300ms']}/{pty['safe_state_trials']} in [250, 300) ms")
    print(f"SETPOINT -> STATUS round trip over the pty ({pty['round_trips']}): median "
          f"{pty['round_trip_median_ms']} ms, p99 {pty['round_trip_p99_ms']} ms")
    print(f"key agreement against the simulator ({ka['rounds']}): PROVISION median "
          f"{ka['provision_median_ms']} ms, REKEY median {ka['rekey_median_ms']} ms")
    for section in ("firmware_host", "firmware_avr"):
        if section in result:
            print(f"{section}: {json.dumps(result[section])}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    ok = fz["acted_on"] == 0 and \
        pty["safe_state_in_250_300ms"] == pty["safe_state_trials"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
