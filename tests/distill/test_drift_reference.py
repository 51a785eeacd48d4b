"""The drift reference built from a clean stream into the model's metadata, and the edge
loop watching a stream against it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cloud_train.models import create_model
from distill.drift_reference import (
    build_drift_reference,
    frames_needed,
    write_drift_reference,
)
from distill.export import export_onnx
from edge_runtime.drift import REFERENCE_KEY, DriftConfig, DriftReference
from edge_runtime.loop import build_loop
from edge_runtime.model_info import read_model_info
from roadshield.cli import main as cli_main
from roadshield_base.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAMES = ["stop", "yield", "no_entry", "priority_road", "speed_limit_30"]
SMALL = DriftConfig(frame_window=30, dark_window=15, crop_window=10, check_every=5,
                    calibration_folds=2)
CLEAN = "synthetic://?seed=5&frames=80&sticker_rate=0"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    net = create_model("signnet_tiny", len(NAMES)).eval()
    return export_onnx(net, NAMES, tmp_path_factory.mktemp("drift") / "tiny.onnx")


def test_frames_needed_follows_the_longest_window() -> None:
    assert frames_needed(SMALL) == 2 * (30 + 5)
    assert frames_needed(DriftConfig()) == 4 * (1200 + 15)


def test_build_write_and_watch(exported: Path, tmp_path: Path) -> None:
    reference = build_drift_reference(exported, CLEAN, config=SMALL, progress=False)
    assert reference.frames == 80 and reference.crops > 10
    assert reference.config == SMALL and reference.num_classes == len(NAMES)
    model = tmp_path / "model.onnx"
    model.write_bytes(exported.read_bytes())
    write_drift_reference(model, reference)
    stored = DriftReference.from_json(read_model_info(model).metadata[REFERENCE_KEY])
    assert stored.to_json() == reference.to_json()
    # edge run --drift loads the same reference and tests every statistic as it goes
    loop = build_loop("synthetic://?seed=9&frames=60&sticker_rate=0", model, drift=True,
                      decision_log=tmp_path / "log.jsonl")
    monitor = loop.monitoring.drift
    assert monitor is not None and monitor.reference.to_json() == reference.to_json()
    report = loop.run(progress=False)
    assert report.monitor is not None and report.monitor["drift"] is True
    tested = {name for name in report.monitor["series"] if name.startswith("drift:")}
    assert "drift:frame_brightness" in tested and "drift:frame_dark" in tested


def test_too_short_a_stream_is_refused(exported: Path) -> None:
    with pytest.raises(ConfigError, match="needs >= 70 frames, max_frames is 40"):
        build_drift_reference(exported, CLEAN, config=SMALL, max_frames=40, progress=False)
    with pytest.raises(ConfigError, match="gave 50 frames; a drift reference needs >= 70"):
        build_drift_reference(exported, "synthetic://?seed=5&frames=50&sticker_rate=0",
                              config=SMALL, progress=False)


def test_edge_run_without_a_reference_says_how_to_make_one(
        exported: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["edge", "run", "--allow-unsigned", "--model", str(exported), "--source",
                     "synthetic://?frames=5", "--drift"])
    assert code == 2
    assert "distill drift-reference" in capsys.readouterr().err


def test_the_command_writes_the_reference(exported: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(exported.read_bytes())
    code = cli_main(["distill", "drift-reference", "--model", str(model), "--source",
                     "synthetic://?seed=5&frames=300&sticker_rate=0", "--max-frames", "200"])
    assert code == 2  # the default windows need 4,860 frames
    assert "needs >= 4860 frames" in capsys.readouterr().err
    assert REFERENCE_KEY not in read_model_info(model).metadata
