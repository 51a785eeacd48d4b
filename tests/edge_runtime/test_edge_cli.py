"""``roadshield edge run`` as a device runs it: a ``.pt2`` program through the torch
backend with the metadata the program carries, and no ``--source`` on an install without
the cloud tier (the device's own camera, or one clear error naming ``--source``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

import edge_runtime.sources as sources
from edge_runtime.runners.onnxruntime_runner import OnnxRuntimeRunner
from edge_runtime.runners.torch_runner import TorchRunner
from roadshield.cli import main
from roadshield_base.errors import CameraError, ModelLoadError
from roadshield_base.fileio import file_sha256

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def program(tiny_model: Any, tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model exported as ``distill export --pt2`` writes it (class names inside)."""
    from distill.export import export_torch_program

    folder = tmp_path_factory.mktemp("pt2")
    return export_torch_program(tiny_model, folder / "tiny.pt2", tiny.size,
                                class_names=tiny.classes, source_sha256="ab" * 32)


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five 320 x 240 frames, a red sign in the first three."""
    folder = tmp_path_factory.mktemp("frames")
    for i in range(5):
        img = np.full((240, 320, 3), 115, np.uint8)
        if i < 3:
            cv2.circle(img, (160, 110), 25, (30, 30, 200), -1, cv2.LINE_AA)
        assert cv2.imwrite(str(folder / f"{i}.png"), img)
    return folder


# -- item: .pt2 programs run, their metadata from the runner ----------------------------------
def test_the_exporter_and_the_torch_runner_name_the_same_metadata_file() -> None:
    from distill.export import PT2_META_FILE as written
    from edge_runtime.runners.torch_runner import PT2_META_FILE

    assert PT2_META_FILE == written


def test_torch_runner_reports_the_programs_metadata(program: Path, tiny_onnx: Path,
                                                    tiny: Any) -> None:
    with TorchRunner(program, device="cpu") as runner:
        info = runner.model_info
    with OnnxRuntimeRunner(tiny_onnx, intra_op_threads=1) as ort_runner:
        onnx_info = ort_runner.model_info
    assert info.class_names == onnx_info.class_names == tuple(tiny.classes)
    assert info.input_size == onnx_info.input_size == tiny.size
    assert (info.input_name, info.output_name) == ("input", "logits")
    assert info.arch == "TinyNet" and info.sha256 == file_sha256(program)
    assert info.metadata["normalization"] == "inside graph"
    assert json.loads(info.metadata["normalization_mean"]) == pytest.approx(
        json.loads(tiny.metadata["normalization_mean"]))
    assert info.metadata["source_sha256"] == "ab" * 32
    assert onnx_info.sha256 == file_sha256(tiny_onnx)


def test_a_program_without_metadata_says_how_to_export(tiny_pt2: Path) -> None:
    with TorchRunner(tiny_pt2, device="cpu") as runner:
        with pytest.raises(ModelLoadError, match="carries no roadshield_meta.json") as err:
            _ = runner.model_info
    assert "distill export --pt2" in err.value.hint


def test_edge_run_runs_a_pt2_program_end_to_end(program: Path, frames: Path, tmp_path: Path,
                                                tiny: Any,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "decisions.jsonl"
    rc = main(["-q", "edge", "run", "--allow-unsigned", "--model", str(program),
               "--source", str(frames),
               "--max-frames", "4", "--decision-log", str(log), "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["frames"] == 4 and report["runner"] == "torch:cpu"
    assert report["frames_with_detection"] == 3
    assert report["stages"]["infer"]["count"] == 3
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == report["decisions"] >= 3
    assert {p["class_name"] for line in lines for p in line["predictions"]} <= set(tiny.classes)


def test_edge_run_refuses_a_pt2_without_metadata_in_one_line(
        tiny_pt2: Path, frames: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["-q", "edge", "run", "--allow-unsigned", "--model", str(tiny_pt2),
               "--source", str(frames)])
    err = capsys.readouterr().err
    assert rc == 2 and "roadshield_meta.json" in err and "Traceback" not in err


# -- item: the default source is the device's camera ------------------------------------------
def test_default_camera_prefers_csi_then_v4l2(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    video0 = tmp_path / "video0"
    monkeypatch.setattr(sources, "V4L2_DEFAULT", str(video0))
    monkeypatch.setattr(sources, "_gstreamer_available", lambda: True)
    monkeypatch.setattr(sources, "_nvargus_present", lambda: True)
    assert sources.default_camera() == "csi://0"
    monkeypatch.setattr(sources, "_nvargus_present", lambda: False)
    with pytest.raises(CameraError, match="no camera found") as err:
        sources.default_camera()
    assert "--source" in err.value.hint and "csi://" in err.value.hint
    assert "v4l2://" in err.value.hint
    video0.touch()
    assert sources.default_camera() == str(video0)
    monkeypatch.setattr(sources, "_gstreamer_available", lambda: False)
    monkeypatch.setattr(sources, "_nvargus_present", lambda: True)
    assert sources.default_camera() == str(video0)  # no GStreamer: no CSI capture


def test_source_help_names_the_device_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["edge", "run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "this device's camera" in text and "csi://0" in text and "/dev/video0" in text
    assert "synthetic://?frames=120" not in text.split("Default:")[1]


#: run in a fresh interpreter where the cloud tier and distill cannot be imported, as on a
#: device install; the command gathers only the tiers present there
DEVICE_INSTALL = textwrap.dedent("""
    import importlib.abc, sys
    HIDDEN = ("cloud_train", "distill")

    class Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HIDDEN:
                raise ImportError(f"No module named {name!r} (device install)", name=name)
            return None

    sys.meta_path.insert(0, Hide())
    import edge_runtime.sources as sources
    sources.V4L2_DEFAULT = sys.argv[1]
    sources._gstreamer_available = lambda: False
    import roadshield.cli as cli
    cli.TIER_PARSERS = tuple(m for m in cli.TIER_PARSERS if m.split(".")[0] not in HIDDEN)
    code = cli.main(["-q", "edge", "run", *sys.argv[2:]])
    assert not [m for m in sys.modules if m.split(".")[0] in HIDDEN + ("torch",)]
    sys.exit(code)
""")


def _device_run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", DEVICE_INSTALL, str(tmp_path / "video0"),
                           *args], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=env)


def test_without_a_camera_or_source_a_device_install_says_so(tiny_onnx: Path,
                                                              tmp_path: Path) -> None:
    res = _device_run(tmp_path, "--allow-unsigned", "--model", str(tiny_onnx))
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert "no camera found on this device" in res.stderr and "--source" in res.stderr
    assert "synthetic" not in res.stderr  # the missing tier's scheme is not offered


def test_without_a_source_a_device_install_opens_its_camera(tiny_onnx: Path,
                                                            tmp_path: Path) -> None:
    # a stand-in /dev/video0 that exists but is no camera: the error is the camera's own
    (tmp_path / "video0").touch()
    res = _device_run(tmp_path, "--allow-unsigned", "--model", str(tiny_onnx))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "video0" in res.stderr and "no camera found" not in res.stderr


def test_synthetic_source_on_a_device_install_is_not_installed(tiny_onnx: Path,
                                                               tmp_path: Path) -> None:
    res = _device_run(tmp_path, "--allow-unsigned", "--model", str(tiny_onnx), "--source",
                      "synthetic://?frames=3")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "'synthetic://' camera source is not installed here" in res.stderr
    assert "cloud_train.synthetic_camera" in res.stderr  # which plugin it would have been


def test_synthetic_source_stays_reachable_where_the_cloud_tier_is(
        tiny_onnx: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["-q", "edge", "run", "--allow-unsigned", "--model", str(tiny_onnx), "--source",
               "synthetic://?frames=3&width=160&height=120", "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["frames"] == 3


# -- the serial actuator is armed last, and released when arming fails -----------------------
def test_edge_run_arms_the_board_last_and_releases_everything_when_it_refuses(
        tiny_onnx: Path, frames: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import actuator.serial_actuator as serial_actuator
    import edge_runtime.loop as loop_mod
    from actuator.interface import RecordingActuator
    from roadshield_base.errors import ActuatorError

    events: list[str] = []

    class Board(RecordingActuator):
        def __init__(self, port: str, key: Any, *, max_speed_kmh: float, arm: bool) -> None:
            super().__init__()
            events.append(f"connect arm={arm}")

        def arm(self) -> None:
            events.append("arm")
            raise ActuatorError("the board on /dev/fake refused to arm (unprovisioned)",
                                "run `roadshield actuator provision`")

        def close(self) -> None:
            events.append("close board")
            super().close()

    real_own = loop_mod.own

    def own(stack: Any, what: str, close: Any) -> None:
        events.append(f"open {what}")

        def closing() -> None:
            events.append(f"close {what}")
            close()

        real_own(stack, what, closing)

    monkeypatch.setattr(serial_actuator, "SerialActuator", Board)
    monkeypatch.setattr(loop_mod, "own", own)
    rc = main(["-q", "edge", "run", "--allow-unsigned", "--model", str(tiny_onnx),
               "--source", str(frames),
               "--serial", "/dev/fake", "--serial-key", str(tmp_path / "board.key"),
               "--decision-log", str(tmp_path / "log.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and "refused to arm" in err and "Traceback" not in err
    assert events[0] == "connect arm=False"  # connected, not armed, before the model loads
    opened = [e[5:] for e in events if e.startswith("open ")]
    closed = [e[6:] for e in events if e.startswith("close ") and e != "close board"]
    assert events.index("arm") > events.index("open the camera source")
    assert closed == opened[::-1] and events[-1] == "close board"
