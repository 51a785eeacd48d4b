"""The INT8-vs-float benchmark end to end on a toy model and toy data: the JSON's structure,
sane figures, and a clear refusal of bad input before any work."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
import torch
from script_loader import load_script
from toy_data import toy_shapes, used_model

from cloud_train import gtsrb
from cloud_train.checkpoint import save_checkpoint

NAMES = ["red_disc", "blue_square", "green_triangle", "yellow_cross"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_script("bench_int8")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("int8")
    # untrained: the figures need only be sane, and training would double the file's time
    model = used_model("signnet_tiny", NAMES)
    ckpt = root / "toy.safetensors"
    save_checkpoint(model, ckpt, {"class_names": NAMES})
    for split, seed, n in (("train", 10, 80), ("test", 11, 48)):
        x, y = toy_shapes(n, seed=seed)
        gtsrb.write_split(x, y, NAMES, root / "data", split)
    return ckpt, root / "data"


def test_the_benchmark_writes_sane_figures_for_all_three_models(bench, inputs, tmp_path,
                                                                capsys):
    ckpt, data = inputs
    out = tmp_path / "out"
    rc = bench.main(["--checkpoint", str(ckpt), "--data", str(data), "--out", str(out),
                     "--n-eval", "8", "--apgd-steps", "2", "--square-queries", "3",
                     "--sticker-steps", "1", "--latency-runs", "2"])
    assert rc == 0
    report = json.loads((out / "int8.json").read_text())
    names = {"float", "int8", "int8_all"}
    assert set(report["models"]) == names
    assert all(len(m["sha256"]) == 64 and m["bytes"] > 0 for m in report["models"].values())
    assert report["models"]["int8"]["quantize_report"]["float_nodes"]
    assert not report["models"]["int8_all"]["quantize_report"]["float_nodes"]
    assert report["clean"]["n"] == 48 and report["clean"]["float"]["agreement"] == 1.0
    for name in names:
        assert 0 <= report["clean"][name]["acc"] <= 1
        r = report["robust"]["models"][name]
        accs = [r[f"{a}_acc"] for a in ("clean", "apgd_ce", "apgd_dlr", "transfer_apgd_ce",
                                        "transfer_apgd_dlr", "square", "worst")]
        assert all(0 <= a <= 1 for a in accs)
        assert r["worst_acc"] <= min(accs[:-1])
    assert report["robust"]["n"] == 8
    assert report["sticker"]["applicable"] is False and "stop" in report["sticker"]["reason"]
    rows = report["latency"]["rows"]
    assert len(rows) == 3 * 2 * 2
    assert all(r["ratio_to_float"] > 0 and r["p90_ms"] >= r["median_ms"] > 0 for r in rows)
    for name in ("int8", "int8_all"):
        assert set(report["targets"][name]) == {"clean", "robust_worst_case"}
    assert report["versions"]["onnxruntime"] and report["cpu"]
    printed = capsys.readouterr().out
    assert "INT8 (stem float): clean drop" in printed and "not applicable" in printed
    assert (out / "int8.md").read_text().strip() == printed.strip()


def test_classes_that_differ_are_refused_before_any_work(bench, inputs, tmp_path, capsys):
    ckpt, _ = inputs
    x, y = toy_shapes(8, seed=3)
    for split in ("train", "test"):
        gtsrb.write_split(x, y, ["a", "b", "c", "d"], tmp_path / "other", split)
    out = tmp_path / "out"
    rc = bench.main(["--checkpoint", str(ckpt), "--data", str(tmp_path / "other"),
                     "--out", str(out)])
    assert rc == 2 and not out.exists()
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "names other classes" in err


def test_a_checkpoint_with_a_non_square_input_is_refused(bench, inputs, tmp_path, capsys):
    from cloud_train.models import create_model

    _, data = inputs
    ckpt = tmp_path / "wide.safetensors"
    save_checkpoint(create_model("signnet_tiny", 4, input_size=(32, 48)), ckpt,
                    {"class_names": NAMES})
    rc = bench.main(["--checkpoint", str(ckpt), "--data", str(data), "--out", str(tmp_path)])
    assert rc == 2 and "3 x 32 x 48" in capsys.readouterr().err


def test_straight_through_runs_the_onnx_model_forward_and_the_float_gradient_back(bench):
    float_model = torch.nn.Linear(4, 3)
    shifted = torch.nn.Linear(4, 3)
    with torch.no_grad():
        shifted.weight.copy_(float_model.weight * 2)
        shifted.bias.copy_(float_model.bias)
    st = bench.StraightThrough(shifted, float_model)
    x = torch.randn(5, 4, requires_grad=True)
    out = st(x)
    assert torch.allclose(out, shifted(x))
    out.sum().backward()
    expected = float_model.weight.sum(0).expand(5, 4)
    assert torch.allclose(x.grad, expected)
