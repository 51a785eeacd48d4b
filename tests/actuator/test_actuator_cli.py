"""``roadshield actuator ...`` parser and handlers, as the main command registers them."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from actuator.cli import add_parsers
from actuator.keys import save_key
from actuator.scenarios import TEST_KEY


def parse(argv):
    parser = argparse.ArgumentParser(prog="roadshield")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_parser_has_the_five_subcommands():
    assert parse(["actuator", "simulate", "--link", "/tmp/x"]).link == "/tmp/x"
    assert parse(["actuator", "simulate", "--provision-button"]).provision_button
    assert not parse(["actuator", "simulate"]).provision_button
    args = parse(["actuator", "provision", "--port", "/dev/ttyACM0", "--key-file", "k"])
    assert args.port == "/dev/ttyACM0" and args.agree_timeout == 30.0
    args = parse(["actuator", "rotate", "--port", "p", "--key-file", "k"])
    assert args.func.__name__ == "rotate"
    assert parse(["actuator", "status", "--port", "p", "--key-file", "k"]).json is False
    assert parse(["actuator", "fuzz", "--frames", "10"]).frames == 10


def test_fuzz_command_prints_json(capsys):
    args = parse(["actuator", "fuzz", "--frames", "800", "--seed", "3", "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["frames"] == 800 and out["acted_on"] == 0


def test_simulate_and_status_end_to_end(tmp_path, capsys):
    key_file, link = tmp_path / "dev.key", tmp_path / "tty"
    save_key(key_file, TEST_KEY)
    proc = subprocess.Popen([sys.executable, "-c",
                             "import sys; from actuator.cli import *; import argparse;"
                             "p = argparse.ArgumentParser(); "
                             "add_parsers(p.add_subparsers(dest='c'));"
                             "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))",
                             "actuator", "simulate", "--link", str(link), "--key-file",
                             str(key_file), "--duration", "20"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert "simulator on" in (proc.stdout.readline() if proc.stdout else "")
        deadline = time.monotonic() + 5
        while not link.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        args = parse(["actuator", "status", "--port", str(link), "--key-file", str(key_file),
                      "--json"])
        assert args.func(args) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["connected"] and info["provisioned"] and info["state"] == "safe"
        assert info["firmware"] == "2.0.0" and not info["provision_mode"]
    finally:
        proc.terminate()
        proc.wait(timeout=5)
