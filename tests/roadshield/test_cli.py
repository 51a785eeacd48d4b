"""The command line: fast help, lazy tiers, and one clear message per bad input."""

from __future__ import annotations

import ast
import subprocess
import sys

import numpy as np
import pytest

from roadshield.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "roadshield.cli", *args],
                          capture_output=True, text=True, timeout=120)


def test_help_imports_only_the_parsers_of_each_tier():
    code = ("import sys; from roadshield.cli import build_parser; build_parser(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'cloud_train', 'distill', 'onnxruntime', 'cv2', 'numpy', 'sklearn', "
            "'edge_runtime', 'actuator')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # each tier contributes at most its package and its argparse-only ``cli`` module
    assert ast.literal_eval(out.stdout) == [
        "actuator", "actuator.cli", "cloud_train", "cloud_train.attest",
        "cloud_train.attest.cli", "cloud_train.cli", "cloud_train.ingest",
        "cloud_train.ingest.cli", "cloud_train.redteam_cli", "cloud_train.splits",
        "cloud_train.splits.cli", "cloud_train.sticker", "cloud_train.sticker.cli", "distill",
        "distill.cli", "edge_runtime", "edge_runtime.cli"]


def test_each_tier_registers_its_own_verbs_beside_their_handlers():
    """The command only gathers the tiers' parsers; every handler lives in its tier."""
    import argparse
    import importlib

    from roadshield.cli import TIER_PARSERS, TIER_VERBS

    assert set(TIER_PARSERS) == set(TIER_VERBS)
    for module, verbs in TIER_VERBS.items():
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers(dest="command")
        importlib.import_module(module).add_parsers(sub)
        assert set(sub.choices) == set(verbs), module
        tier = module.split(".")[0]
        for leaf in _leaf_parsers(sub):
            handler = leaf.get_default("func")
            assert handler is not None and handler.__module__.split(".")[0] == tier, leaf.prog


def test_a_command_line_builds_only_the_tier_of_its_verb():
    code = ("import sys; from roadshield.cli import build_parser; "
            "a = build_parser(sys.argv[1:]).parse_args(sys.argv[1:]); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('cloud_train', "
            "'distill', 'edge_runtime', 'actuator', 'serve'))); print(a.batch, a.store)")
    line = ["data", "ingest", "b", "--store", "s"]
    out = subprocess.run([sys.executable, "-c", code, *line], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert {m.split(".")[0] for m in ast.literal_eval(out[0])} == {"cloud_train"}
    assert out[1] == "b s"
    from roadshield.cli import build_parser

    full, narrow = build_parser().parse_args(line), build_parser(line).parse_args(line)
    assert vars(full) == vars(narrow)


@pytest.mark.parametrize("words", [["--help"], ["nope"], ["-q"]])
def test_without_a_known_verb_every_verb_is_offered(words, capsys):
    with pytest.raises(SystemExit):
        main(words)
    said = capsys.readouterr()
    for verb in ("data", "edge", "serve", "distill", "actuator", "demo"):
        assert verb in said.out + said.err


def _leaf_parsers(sub) -> list:
    """Every parser below ``sub`` that has no subcommands of its own."""
    import argparse

    leaves = []
    for parser in sub.choices.values():
        nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        leaves += [leaf for a in nested for leaf in _leaf_parsers(a)] if nested else [parser]
    return leaves


@pytest.mark.parametrize("stage", ["data", "train", "eval", "distill", "edge", "actuator",
                                   "attack", "redteam", "demo"])
def test_every_stage_has_help(stage, capsys):
    with pytest.raises(SystemExit) as exc:
        main([stage, "--help"])
    assert exc.value.code == 0
    assert "usage: roadshield" in capsys.readouterr().out


def test_missing_dataset_is_one_clear_error(tmp_path):
    missing = tmp_path / "no-such-data"
    res = run_cli("data", "info", str(missing))
    assert res.returncode == 2
    assert str(missing) in res.stderr and "Traceback" not in res.stderr
    assert "roadshield data synth" in res.stderr


def test_unreadable_image_names_the_file(tmp_path):
    assert run_cli("data", "synth", "--out", str(tmp_path), "--train-per-class", "1",
                   "--test-per-class", "1").returncode == 0
    victim = sorted((tmp_path / "gtsrb").rglob("*.ppm"))[0]
    victim.write_bytes(b"not an image")
    res = run_cli("data", "info", str(tmp_path))
    assert res.returncode == 2 and victim.name in res.stderr and "Traceback" not in res.stderr


def test_corrupt_onnx_is_one_clear_error(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(np.random.default_rng(0).bytes(256))
    res = run_cli("edge", "run", "--allow-unsigned", "--model", str(bad), "--source", "synthetic://?frames=2")
    assert res.returncode == 2
    assert str(bad) in res.stderr and "Traceback" not in res.stderr


def test_camera_that_cannot_open_is_one_clear_error(tiny_onnx):
    res = run_cli("edge", "run", "--allow-unsigned", "--model", str(tiny_onnx), "--source",
                  "/dev/video99")
    assert res.returncode == 2
    assert "/dev/video99" in res.stderr and "Traceback" not in res.stderr


def test_out_of_range_epsilon_fails_before_training(tmp_path):
    res = run_cli("train", "--data", str(tmp_path), "--out", str(tmp_path / "m.safetensors"),
                  "--eps", "3")
    assert res.returncode == 2 and "eps" in res.stderr and "Traceback" not in res.stderr


def test_edge_backends_lists_onnxruntime_as_available():
    res = run_cli("edge", "backends")
    assert res.returncode == 0
    assert any(line.startswith("onnxruntime") and "available" in line
               for line in res.stdout.splitlines())


def test_bad_trainer_option_fails_before_training(tmp_path):
    res = run_cli("train", "--data", str(tmp_path), "--out", str(tmp_path / "m.safetensors"),
                  "--trainer", "trades", "--trades-beta", "-1")
    assert res.returncode == 2 and "trades_beta" in res.stderr and "Traceback" not in res.stderr


HIDE_CLOUD = (
    "import importlib.abc, sys\n"
    "class Hide(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] in ('cloud_train', 'distill'):\n"
    "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
    "sys.meta_path.insert(0, Hide())\n"
    "from roadshield.cli import main\n")


def test_a_device_install_without_the_cloud_tier_still_offers_its_own_verbs():
    code = HIDE_CLOUD + "sys.exit(main(sys.argv[1:]))"
    help_out = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True,
                              text=True, timeout=120)
    assert help_out.returncode == 0, help_out.stderr
    assert "edge" in help_out.stdout and "actuator" in help_out.stdout
    assert "distill" not in help_out.stdout and "redteam" not in help_out.stdout
    train = subprocess.run([sys.executable, "-c", code, "train"], capture_output=True,
                           text=True, timeout=120)
    assert train.returncode == 2 and "invalid choice: 'train'" in train.stderr
    assert "Traceback" not in train.stderr
