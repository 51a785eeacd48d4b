"""Static INT8 quantization to Q/DQ: the graph TensorRT's explicit quantization reads
(symmetric INT8, per-channel weights), the float model's metadata kept, and the INT8
model measured against the float one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from toy_data import toy_shapes, trained_toy_model

from cloud_train import gtsrb
from distill.export import export_onnx, read_onnx_metadata
from distill.quantize import quantize_from_dataset, quantize_qdq, stratified_sample
from roadshield.cli import main as cli_main
from roadshield_base.errors import ConfigError, DatasetError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAMES = ["red_disc", "blue_square", "green_triangle", "yellow_cross"]


@pytest.fixture(scope="module")
def float_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, _, _ = trained_toy_model(n_test=8)
    return export_onnx(model, NAMES, tmp_path_factory.mktemp("q") / "toy.onnx")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gtsrb")
    for split, seed, n in (("train", 10, 200), ("test", 11, 120)):
        x, y = toy_shapes(n, seed=seed)
        gtsrb.write_split(x, y, NAMES, root, split)
    return root


@pytest.fixture(scope="module")
def quantized(float_model: Path, dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("q8") / "toy.int8.onnx"
    report = quantize_from_dataset(float_model, out, dataset, per_class=16, progress=False)
    return out, report


def test_the_int8_model_is_a_symmetric_per_channel_qdq_graph(quantized):
    out, _ = quantized
    proto = onnx.load(str(out))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    conv_weights = [n.input[1] for n in proto.graph.node if n.op_type == "Conv"]
    assert conv_weights
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear" and node.output[0] in conv_weights:
            q, scale = inits[node.input[0]], inits[node.input[1]]
            assert q.dtype == np.int8 and scale.shape == (q.shape[0],)  # one per channel
    zero_points = [inits[n.input[2]] for n in proto.graph.node
                   if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)


def _conv_inputs_from_dequantize(path: Path) -> list[bool]:
    """Per Conv node in graph order: whether its activation input comes from a
    DequantizeLinear (i.e. the conv runs in INT8)."""
    proto = onnx.load(str(path))
    dq = {n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    return [n.input[0] in dq for n in proto.graph.node if n.op_type == "Conv"]


def test_the_stem_stays_float_by_default_and_is_quantized_on_request(quantized, float_model,
                                                                     tmp_path):
    out, report = quantized
    convs = _conv_inputs_from_dequantize(out)
    assert len(convs) >= 2 and convs[0] is False and all(convs[1:])
    assert len(report.float_nodes) == 1
    assert json.loads(read_onnx_metadata(out)["quantization"])["float_nodes"] == \
        list(report.float_nodes)
    x = np.random.default_rng(0).random((16, 3, 32, 32), dtype=np.float32)
    _, kept = quantize_qdq(float_model, tmp_path / "all.onnx", x, float_stem=False)
    assert kept == () and all(_conv_inputs_from_dequantize(tmp_path / "all.onnx"))


def test_the_float_models_metadata_is_kept_and_the_measurement_added(quantized, float_model):
    out, report = quantized
    meta, ref = read_onnx_metadata(out), read_onnx_metadata(float_model)
    assert {k: v for k, v in meta.items() if k != "quantization"} == ref
    recorded = json.loads(meta["quantization"])
    assert recorded["format"] == "QDQ" and recorded["calibration_images"] == 64
    assert recorded["top1_agreement"] == report.top1_agreement
    assert [o.name for o in onnx.load(str(out)).graph.output] == \
        [o.name for o in onnx.load(str(float_model)).graph.output]


def test_int8_keeps_the_float_models_answers(quantized):
    _, report = quantized
    assert report.test_images == 120 and report.float_accuracy > 0.9
    assert report.top1_agreement >= 0.95
    assert report.int8_accuracy >= report.float_accuracy - 0.05
    assert report.int8_bytes < report.float_bytes


def test_stratified_sample_takes_each_class_alike():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 7)
    idx = stratified_sample(labels, 4, seed=0)
    assert np.bincount(labels[idx]).tolist() == [4, 3, 4]
    assert np.array_equal(idx, stratified_sample(labels, 4, seed=0))


def test_bad_input_is_refused(float_model, dataset, tmp_path):
    x = np.zeros((2, 3, 32, 32), np.float32)
    with pytest.raises(ConfigError, match="unknown calibration method"):
        quantize_qdq(float_model, tmp_path / "q.onnx", x, method="kl")
    with pytest.raises(ConfigError, match="calibration images"):
        quantize_qdq(float_model, tmp_path / "q.onnx", x[:, :, :, :, None])
    with pytest.raises(ConfigError, match="overwrite the float model"):
        quantize_from_dataset(float_model, float_model, dataset, progress=False)
    other = tmp_path / "other"
    xs, ys = toy_shapes(8, seed=1)
    gtsrb.write_split(xs, ys, ["a", "b", "c", "d"], other, "train")
    with pytest.raises(DatasetError, match="other classes"):
        quantize_from_dataset(float_model, tmp_path / "q.onnx", other, progress=False)


def test_the_command_prints_the_measurement(float_model, dataset, tmp_path, capsys):
    out = tmp_path / "cli.int8.onnx"
    assert cli_main(["distill", "quantize", "--model", str(float_model), "--data",
                     str(dataset), "--out", str(out), "--per-class", "8", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["calibration_images"] == 32 and out.is_file()
