"""ONNX and torch.export artifacts: graph validity, metadata, dynamic batch, parity."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import toy_data

from cloud_train.checkpoint import load_checkpoint, save_checkpoint
from distill.export import (
    INPUT_FORMAT,
    PT2_META_FILE,
    check_parity,
    export_onnx,
    export_torch_program,
    read_onnx_metadata,
)
from roadshield_base.errors import ConfigError, ModelLoadError

NAMES = ["stop", "yield", "no_entry", "priority_road", "speed_limit_30", "turn_left_ahead"]


def used_model(arch: str, size: int, seed: int = 0) -> torch.nn.Module:
    return toy_data.used_model(arch, NAMES, size, seed)


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    return used_model("signnet", 32)


@pytest.fixture(scope="module")
def exported(teacher, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "signnet.onnx"
    return export_onnx(teacher, NAMES, out, source_sha256="cd" * 32)


def fixed_batch(n: int, size: int) -> np.ndarray:
    return np.random.default_rng(0).random((n, 3, size, size), dtype=np.float32)


def test_graph_passes_the_checker_and_has_the_named_io(exported: Path) -> None:
    proto = onnx.load(str(exported))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits", "features"]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert {op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")} == {17}
    # normalisation is the first thing the graph does: Sub then Div before any Conv
    ops = [n.op_type for n in proto.graph.node if n.op_type not in ("Identity", "Constant")]
    assert ops[:3] == ["Sub", "Div", "Conv"]
    assert [p.name for p in exported.parent.iterdir()] == [exported.name]  # no temp files


def test_metadata(exported: Path, teacher) -> None:
    meta = read_onnx_metadata(exported)
    assert meta["class_names"] == NAMES and meta["num_classes"] == len(NAMES)
    assert meta["input_size"] == 32 and meta["arch"] == "signnet"
    assert meta["input_format"] == INPUT_FORMAT == "float32 NCHW RGB [0,1]"
    assert meta["normalization"] == "inside graph"
    assert meta["normalization_mean"] == pytest.approx(teacher.normalize.mean.flatten().tolist())
    assert meta["source_sha256"] == "cd" * 32
    raw = {p.key: p.value for p in onnx.load(str(exported)).metadata_props}
    assert json.loads(raw["class_names"]) == NAMES and raw["input_size"] == "32"


@pytest.mark.parametrize("batch", [1, 7])
def test_dynamic_batch_in_onnxruntime(exported: Path, teacher, batch: int) -> None:
    sess = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    x = fixed_batch(batch, 32)
    (logits,) = sess.run(["logits"], {"input": x})
    assert logits.shape == (batch, len(NAMES)) and logits.dtype == np.float32
    with torch.no_grad():
        ref = teacher(torch.from_numpy(x)).numpy()
    assert np.max(np.abs(logits - ref)) <= 1e-4


def test_parity_on_a_fixed_batch(exported: Path, teacher) -> None:
    diff = check_parity(teacher, exported, fixed_batch(16, 32), atol=1e-4)
    assert 0.0 <= diff <= 1e-4


def test_parity_check_catches_another_model(exported: Path) -> None:
    other = used_model("signnet", 32, seed=1)
    with pytest.raises(ModelLoadError, match="differs"):
        check_parity(other, exported, fixed_batch(4, 32))


def test_export_leaves_the_callers_model_alone(tmp_path: Path) -> None:
    model = used_model("signnet_tiny", 48)
    model.train()
    path = export_onnx(model, NAMES, tmp_path / "student.onnx")
    assert model.training  # exported from a copy in eval mode
    assert read_onnx_metadata(path)["input_size"] == 48
    model.eval()
    assert check_parity(model, path, fixed_batch(3, 48)) <= 1e-4


def test_checkpoint_to_onnx_records_the_source_sha256(tmp_path: Path) -> None:
    model = used_model("signnet_tiny", 32)
    digest = save_checkpoint(model, tmp_path / "m.safetensors", {"class_names": NAMES})
    loaded, meta = load_checkpoint(tmp_path / "m.safetensors", digest)
    path = export_onnx(loaded, meta["class_names"], tmp_path / "m.onnx", source_sha256=digest)
    info = read_onnx_metadata(path)
    assert info["source_sha256"] == digest and info["arch"] == "signnet_tiny"


def test_export_errors(teacher, tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        export_onnx(teacher, NAMES[:2], tmp_path / "a.onnx")
    with pytest.raises(ConfigError):
        export_onnx(teacher, NAMES, tmp_path / "a.onnx", input_size=(3, 32, 48))
    with pytest.raises(ConfigError):
        export_onnx(teacher, NAMES, tmp_path / "a.onnx", opset=9)
    with pytest.raises(ModelLoadError):
        read_onnx_metadata(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00not protobuf\xff" * 10)
    with pytest.raises(ModelLoadError):
        read_onnx_metadata(tmp_path / "junk.onnx")
    assert not (tmp_path / "a.onnx").exists()


def test_torch_program_loads_without_roadshield_and_matches(teacher, tmp_path: Path) -> None:
    path = export_torch_program(teacher, tmp_path / "signnet.pt2", 32, class_names=NAMES,
                                source_sha256="ef" * 32)
    extra = {PT2_META_FILE: ""}
    program = torch.export.load(str(path), extra_files=extra)
    assert list(program.graph_signature.user_inputs) == ["input"]
    meta = json.loads(extra[PT2_META_FILE])
    assert meta["class_names"] == NAMES and meta["input_size"] == 32
    assert meta["source_sha256"] == "ef" * 32
    module = program.module()
    for batch in (1, 7):
        x = torch.from_numpy(fixed_batch(batch, 32))
        with torch.no_grad():
            assert torch.allclose(module(x), teacher(x), atol=1e-5, rtol=0)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    # a fresh interpreter in which the cloud-tier packages cannot be imported runs it too
    script = ("import sys; sys.modules.update(cloud_train=None, distill=None)\n"
              "import torch\n"
              f"m = torch.export.load({str(path)!r}).module()\n"
              "print(tuple(m(torch.rand(3, 3, 32, 32)).shape))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"(3, {len(NAMES)})"
