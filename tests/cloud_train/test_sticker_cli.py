"""``roadshield attack sticker``: one clear message and exit code 2 for each bad input, and
end-to-end runs (white-box on a checkpoint, black-box on its ONNX export) whose reported
figures are re-measured from the files they wrote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cloud_train.signs import SYNTHETIC_CLASSES

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "roadshield.cli", "attack", "sticker", *args],
                          capture_output=True, text=True, timeout=120)


def one_error(err: str) -> str:
    """The single error message of a refused command (its hint may follow on a line)."""
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("roadshield: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Untrained signnet_tiny checkpoints: one on the 14 synthetic classes, one on 5 others."""
    import torch

    from cloud_train.checkpoint import save_checkpoint
    from cloud_train.models import create_model

    root = tmp_path_factory.mktemp("sticker_cli")
    torch.manual_seed(0)
    synthetic = root / "synthetic.safetensors"
    save_checkpoint(create_model("signnet_tiny", len(SYNTHETIC_CLASSES)), synthetic,
                    {"class_names": list(SYNTHETIC_CLASSES)})
    other = root / "other.safetensors"
    save_checkpoint(create_model("signnet_tiny", 5), other,
                    {"class_names": ["stop", "yield", "no_entry", "speed_limit_30",
                                     "priority_road"]})
    return {"synthetic": synthetic, "other": other}


# --------------------------------------------------------------------------- early refusals

@pytest.mark.parametrize(("args", "needle"), [
    (["--sign", "banana"], "unknown sign class 'banana'"),
    (["--sign", "stop", "--target", "banana"], "unknown target class 'banana'"),
    (["--sign", "stop", "--target", "Stop"], "is the sign itself"),
    (["--sign", "speed limit 30", "--target", "speed_limit_30"], "is the sign itself"),
    (["--sign", "stop", "--sign-mm", "0"], "--sign-mm"),
    (["--sign", "stop", "--sign-mm=-600"], "--sign-mm"),
    (["--sign", "stop", "--sign-mm", "nan"], "--sign-mm"),
])
def test_bad_sign_target_or_size_is_one_clear_error(checkpoints, tmp_path, args, needle) -> None:
    res = run_cli("--model", str(checkpoints["synthetic"]), "--out", str(tmp_path / "out"),
                  *args)
    assert res.returncode == 2
    assert needle in one_error(res.stderr)
    assert not (tmp_path / "out").exists()


def test_missing_model_is_one_clear_error(tmp_path) -> None:
    for name in ("nope.safetensors", "nope.onnx"):
        missing = tmp_path / name
        res = run_cli("--model", str(missing), "--sign", "stop", "--out", str(tmp_path / "o"))
        assert res.returncode == 2
        msg = one_error(res.stderr)
        assert str(missing) in msg and "does not exist" in msg


def test_model_with_another_suffix_is_one_clear_error(tmp_path) -> None:
    model = tmp_path / "model.pt"
    model.write_bytes(b"not a checkpoint")
    res = run_cli("--model", str(model), "--sign", "stop", "--out", str(tmp_path / "o"))
    assert res.returncode == 2
    msg = one_error(res.stderr)
    assert str(model) in msg and ".safetensors" in msg and ".onnx" in msg


# ------------------------------------------------------------- refusals after loading the model

def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from roadshield.cli import main

    code = main(["attack", "sticker", "--no-progress", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("args", "needle"), [
    (["--area", "0.5"], "sticker area 0.5"),
    (["--area", "0"], "sticker area 0.0"),
    (["--steps", "0"], "steps=0"),
    (["--positions", "0"], "positions=0"),
])
def test_bad_option_is_one_clear_error(checkpoints, tmp_path, capsys, args, needle) -> None:
    code, err = run_main(["--model", str(checkpoints["synthetic"]), "--sign", "stop",
                          "--out", str(tmp_path / "out"), *args], capsys)
    assert code == 2 and needle in one_error(err)
    assert not (tmp_path / "out").exists()


def test_unknown_shape_is_one_clear_error(checkpoints, tmp_path, capsys) -> None:
    code, err = run_main(["--model", str(checkpoints["synthetic"]), "--sign", "stop",
                          "--shape", "star", "--steps", "1", "--positions", "1",
                          "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    msg = one_error(err)
    assert "unknown sticker shape 'star'" in msg


@pytest.mark.slow
def test_model_on_other_classes_is_refused_before_the_run(checkpoints, tmp_path,
                                                          capsys) -> None:
    code, err = run_main(["--model", str(checkpoints["other"]), "--sign", "stop",
                          "--target", "roundabout", "--steps", "1", "--positions", "1",
                          "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "synthetic sign classes" in one_error(err)


# --------------------------------------------------------------------------- end to end

def sticker_from_files(out: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(colours 128 x 128 x 3 uint8, mask 128 x 128 bool, sticker.json) read back."""
    from cloud_train.sticker.placement import load_placed_sticker

    placed = load_placed_sticker(out)
    colours = np.zeros((128, 128, 3), np.uint8)
    mask = np.zeros((128, 128), bool)
    x0, y0, x1, y1 = placed.box_art
    ink = placed.rgba_art[..., 3] > 0
    mask[y0:y1, x0:x1] = ink
    colours[y0:y1, x0:x1][ink] = placed.rgba_art[..., :3][ink]
    return colours, mask, json.loads((out / "sticker.json").read_text())


@pytest.mark.slow
def test_whitebox_run_writes_the_sticker_and_its_figures(checkpoints, tmp_path,
                                                         capsys) -> None:
    from cloud_train.checkpoint import load_checkpoint
    from cloud_train.sticker.eot import EotPool
    from cloud_train.sticker.optimise import measure, torch_predictor
    from cloud_train.sticker.shapes import plate_masks
    from roadshield.cli import main

    out = tmp_path / "sticker"
    code = main(["attack", "sticker", "--model", str(checkpoints["synthetic"]),
                 "--sign", "stop", "--target", "speed limit 100", "--steps", "2",
                 "--positions", "1", "--dpi", "50", "--out", str(out), "--no-progress",
                 "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    for name in ("sticker.png", "sticker.pdf", "preview.png", "sticker.json", "attack.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "attack.json").read_text())
    assert report == printed
    assert report["mode"] == "white-box"
    teacher, onnx = report["teacher"], report["onnx"]
    for figures in (teacher, onnx):
        for key in ("success", "confident", "clean_success"):
            assert 0.0 <= figures[key] <= 1.0
    assert len(teacher["history"]) == 2 and teacher["config"]["steps"] == 2
    assert onnx["model"] == "temporary export" and onnx["views"] == 64

    colours, mask, doc = sticker_from_files(out)
    assert doc["sign"] == "stop" and doc["target"] == "speed_limit_100"
    assert doc["shape"] == "bars" and doc["sign_mm"] == 600.0
    stop = SYNTHETIC_CLASSES.index("stop")
    assert mask.any() and not (mask & ~plate_masks(stop)[1]).any()
    assert mask.sum() / plate_masks(stop)[0].sum() == pytest.approx(0.15, rel=0.05)

    # the teacher's figures again, from the files: same held-out views, same noise
    model, _ = load_checkpoint(checkpoints["synthetic"])
    held_out = EotPool(stop, 64, seed=1000, input_size=32, jpeg_p=0.25)
    again = measure(torch_predictor(model), held_out, colours, mask, stop,
                    SYNTHETIC_CLASSES.index("speed_limit_100"), seed=0)
    for key in ("success", "confident", "clean_success", "by_distance"):
        assert again[key] == teacher[key], key


def test_blackbox_run_on_onnx_writes_the_sticker(checkpoints, tmp_path, capsys) -> None:
    from cloud_train.checkpoint import load_checkpoint
    from cloud_train.sticker.shapes import PRINTER_PALETTE
    from distill.export import export_onnx
    from roadshield.cli import main

    model, meta = load_checkpoint(checkpoints["synthetic"])
    onnx = export_onnx(model, meta["class_names"], tmp_path / "m.onnx",
                       source_sha256=meta["sha256"])
    out = tmp_path / "bb"
    code = main(["attack", "sticker", "--model", str(onnx), "--sign", "stop",
                 "--shape", "square", "--area", "0.1", "--budget", "48", "--dpi", "50",
                 "--search", "square", "--out", str(out), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mode"] == "black-box (square)"
    assert report["blackbox"]["queries"] <= 48
    colours, mask, doc = sticker_from_files(out)
    assert doc["sign"] == "stop" and doc["target"] is None and doc["shape"] == "square"
    palette = {tuple(c) for c in PRINTER_PALETTE.tolist()}
    assert {tuple(c) for c in colours[mask].tolist()} <= palette


def test_nes_blackbox_run_spends_whole_steps_of_its_budget(checkpoints, tmp_path,
                                                           capsys) -> None:
    from cloud_train.checkpoint import load_checkpoint
    from distill.export import export_onnx
    from roadshield.cli import main

    model, meta = load_checkpoint(checkpoints["synthetic"])
    onnx = export_onnx(model, meta["class_names"], tmp_path / "m.onnx",
                       source_sha256=meta["sha256"])
    # one NES step: 10 antithetic pairs on 8 views = 160 queries; 300 buys one step only
    code = main(["attack", "sticker", "--model", str(onnx), "--sign", "stop", "--target",
                 "yield", "--budget", "300", "--dpi", "50", "--out", str(tmp_path / "nes"),
                 "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mode"] == "black-box (nes)" and report["blackbox"]["queries"] == 160
    assert report["blackbox"]["curve"][-1][0] == 160
