"""``roadshield actuator simulate|provision|rotate|status|fuzz``.

``add_parsers(subparsers)`` adds the subcommand to the main parser; handlers
import their modules only when they run, so ``roadshield --help`` stays fast and a
machine without pyserial can still simulate and fuzz.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parsers(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``actuator`` with its five subcommands to ``subparsers`` (from add_subparsers)."""
    act = subparsers.add_parser("actuator", help="the serial actuator link: simulate, provision,"
                                                 " rotate, status, fuzz")
    asub = act.add_subparsers(dest="actuator_cmd", required=True)

    sim = asub.add_parser("simulate", help="run the device simulator on a pseudo-terminal")
    sim.add_argument("--link", default=None,
                     help="symlink to the pty, a stable path for --serial (e.g. /tmp/rs-tty)")
    sim.add_argument("--key-file", default=None,
                     help="device key (hex); a missing file = an unprovisioned board")
    sim.add_argument("--duration", type=float, default=None, help="stop after N seconds")
    sim.add_argument("--provision-button", action="store_true",
                     help="boot with the provisioning button held: accept one PROVISION")
    sim.set_defaults(func=simulate)

    prov = asub.add_parser("provision", help="agree a key with a board booted with its "
                                             "provisioning button held (X25519)")
    prov.add_argument("--port", required=True, help="/dev/ttyACM0, /dev/ttyUSB0, a pty")
    prov.add_argument("--key-file", required=True,
                      help="new file the agreed key is written to (never overwritten)")
    prov.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for HELLO")
    prov.add_argument("--agree-timeout", type=float, default=30.0,
                      help="seconds the board may take for X25519 (several on an AVR)")
    prov.set_defaults(func=provision)

    rot = asub.add_parser("rotate", help="replace the board's key under the current one "
                                         "(board must be safe)")
    rot.add_argument("--port", required=True)
    rot.add_argument("--key-file", required=True, help="current key; replaced by the new one")
    rot.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for HELLO")
    rot.add_argument("--agree-timeout", type=float, default=30.0,
                     help="seconds the board may take for X25519 (several on an AVR)")
    rot.set_defaults(func=rotate)

    st = asub.add_parser("status", help="connect, and print the board's state")
    st.add_argument("--port", required=True)
    st.add_argument("--key-file", required=True)
    st.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for HELLO")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=status)

    fz = asub.add_parser("fuzz", help="fuzz the simulated device; 0 frames must be acted on")
    fz.add_argument("--frames", type=int, default=100_000)
    fz.add_argument("--seed", type=int, default=0)
    fz.add_argument("--json", action="store_true")
    fz.set_defaults(func=fuzz)
    return act


def simulate(args: argparse.Namespace) -> int:
    from actuator.simulator import simulate as run

    return run(args)


def provision(args: argparse.Namespace) -> int:
    from actuator.provision import provision_device

    res = provision_device(args.port, args.key_file, hello_timeout_s=args.timeout,
                           agree_timeout_s=args.agree_timeout)
    print(f"provisioned the board on {res.port} (firmware {res.firmware}); its key is in "
          f"{res.key_file}: keep that file, the board accepts no other")
    return 0


def rotate(args: argparse.Namespace) -> int:
    from actuator.provision import rotate_key

    res = rotate_key(args.port, args.key_file, hello_timeout_s=args.timeout,
                     agree_timeout_s=args.agree_timeout)
    print(f"rotated the key of the board on {res.port} (firmware {res.firmware}); the new "
          f"key replaced {res.key_file}")
    return 0


def status(args: argparse.Namespace) -> int:
    import time

    from actuator.keys import load_key
    from actuator.link import SerialLink

    with SerialLink(args.port, load_key(args.key_file), hello_timeout_s=args.timeout) as link:
        time.sleep(0.3)  # a few device heartbeats carry its state
        info = link.state.to_dict()
    info["port"] = args.port
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"{args.port}: firmware {info['firmware']}, "
              f"{'provisioned' if info['provisioned'] else 'unprovisioned'}, "
              f"state {info['state']} (fault: {info['fault']}), "
              f"{info['sessions']} session(s), rejected from device {info['rx_rejected']}")
    return 0


def fuzz(args: argparse.Namespace) -> int:
    from actuator.fuzz import fuzz as run

    report = run(args.frames, args.seed)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(f"fuzzed frames: {report.frames}, acted on: {report.acted_on}, "
              f"valid frames accepted: {report.valid_accepted}/{report.valid_sent}")
        print(f"  by kind: {report.by_kind}")
        print(f"  rejected as: {report.rejected_as}")
    return 0 if report.acted_on == 0 else 1
