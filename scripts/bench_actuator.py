#!/usr/bin/env python3
"""Actuator-link benchmark: fuzzing, safe-state latency and round trip over a real pty.

Usage: python scripts/bench_actuator.py [--fuzz-frames 100000] [--trials 100]
           [--round-trips 1000] [--json out.json]
Prints (and optionally writes as JSON):
* fuzzed frames sent to the simulated device and how many it acted on (target 0);
* the time from the host's last HEARTBEAT to the device's entry into its safe state,
  over ``--trials`` silences on the pty (target: every trial under 300 ms);
* SETPOINT -> STATUS-reflecting-it round trip over the pty, median and p99.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


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
            "safe_state_worst_ms": round(max(latencies), 2),
            "safe_state_median_ms": round(statistics.median(latencies), 2),
            "safe_state_under_300ms": sum(v < 300 for v in latencies),
            "round_trips": len(rtts), "round_trip_median_ms": round(statistics.median(rtts), 3),
            "round_trip_p99_ms": round(percentile(rtts, 99), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fuzz-frames", type=int, default=100_000)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--round-trips", type=int, default=1000)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    result = {"fuzz": bench_fuzz(args.fuzz_frames), "pty": bench_pty(args.trials,
                                                                     args.round_trips)}
    fz, pty = result["fuzz"], result["pty"]
    print(f"fuzz: {fz['frames']} frames, acted on {fz['acted_on']} ({fz['seconds']} s)")
    print(f"safe state after host silence, {pty['safe_state_trials']} pty trials: "
          f"worst {pty['safe_state_worst_ms']} ms, median {pty['safe_state_median_ms']} ms, "
          f"{pty['safe_state_under_300ms']}/{pty['safe_state_trials']} under 300 ms")
    print(f"SETPOINT -> STATUS round trip over the pty ({pty['round_trips']}): median "
          f"{pty['round_trip_median_ms']} ms, p99 {pty['round_trip_p99_ms']} ms")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    ok = fz["acted_on"] == 0 and pty["safe_state_under_300ms"] == pty["safe_state_trials"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
