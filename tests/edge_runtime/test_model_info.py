"""read_model_info on exported ONNX files, and the feed checks runners share."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from edge_runtime.model_info import ModelInfo, TensorSpec, check_feed, read_model_info
from roadshield_base.errors import ConfigError, ModelLoadError


def _with_metadata(src: Path, dst: Path, **changes: str | None) -> Path:
    """Copy an ONNX file, setting (str) or removing (None) metadata entries."""
    proto = onnx.load(str(src))
    meta = {p.key: p.value for p in proto.metadata_props}
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, meta)
    onnx.save(proto, str(dst))
    return dst


def _check_info(info: ModelInfo, path: Path, tiny: SimpleNamespace) -> None:
    assert info.class_names == tiny.classes and info.num_classes == 5
    assert info.input_size == tiny.size and info.arch == tiny.arch
    assert (info.input_name, info.output_name) == ("input", "logits")
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info.metadata["source_sha256"] == "0" * 64
    assert json.loads(info.metadata["normalization_mean"])[0] == pytest.approx(0.485)


def test_reads_what_the_exporter_writes(tiny_onnx: Path, tiny: SimpleNamespace) -> None:
    _check_info(read_model_info(tiny_onnx), tiny_onnx, tiny)


def test_falls_back_to_onnxruntime_without_onnx(tiny_onnx: Path, tiny: SimpleNamespace,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)
    _check_info(read_model_info(tiny_onnx), tiny_onnx, tiny)


@pytest.mark.parametrize("use_onnx", [True, False], ids=["onnx", "onnxruntime"])
def test_missing_metadata_says_how_to_export(tiny_model: object, tiny: SimpleNamespace,
                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             use_onnx: bool) -> None:
    bare = tiny.export_onnx(tiny_model, tmp_path / "bare.onnx", None)
    if not use_onnx:
        monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ModelLoadError, match=r"bare.onnx lacks metadata \['class_names'") as info:
        read_model_info(bare)
    assert "roadshield distill export" in info.value.hint


@pytest.mark.parametrize("changes, match", [
    ({"arch": None}, r"lacks metadata \['arch'\]"),
    ({"class_names": "stop, yield"}, "not JSON"),
    ({"class_names": json.dumps({"0": "stop"})}, "not a list of strings"),
    ({"class_names": json.dumps(["a", "b"])}, "outputs 5 logits but names 2 classes"),
    ({"input_size": "big"}, "not an integer"),
    ({"input_size": "0"}, "input_size metadata"),
])
def test_bad_metadata_is_rejected(tiny_onnx: Path, tmp_path: Path, changes: dict,
                                  match: str) -> None:
    path = _with_metadata(tiny_onnx, tmp_path / "edited.onnx", **changes)
    with pytest.raises(ModelLoadError, match=match):
        read_model_info(path)


def test_unreadable_files(tmp_path: Path, tiny_pt2: Path) -> None:
    with pytest.raises(ModelLoadError, match="missing.onnx does not exist"):
        read_model_info(tmp_path / "missing.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(np.random.default_rng(1).bytes(2048))
    with pytest.raises(ModelLoadError, match="corrupt.onnx"):
        read_model_info(corrupt)
    with pytest.raises(ModelLoadError, match="not an .onnx file"):
        read_model_info(tiny_pt2)


SPECS = [TensorSpec("input", (None, 3, 16, 16))]


def test_check_feed_accepts_and_makes_contiguous() -> None:
    x = np.zeros((2, 16, 16, 3), np.float32).transpose(0, 3, 1, 2)  # NCHW view of NHWC data
    out = check_feed({"input": x}, SPECS, "r")["input"]
    assert out.flags.c_contiguous and out.shape == (2, 3, 16, 16)


@pytest.mark.parametrize("feed, match, hint", [
    ([1], "expected a dict", "infer"),
    ({"input": np.zeros((1, 3, 16, 16), np.float32), "extra": np.zeros(1)},
     r"unexpected \['extra'\]", "feed exactly"),
    ({"input": np.zeros((1, 3, 16, 16), np.uint8)}, "dtype uint8, expected float32",
     "preprocess"),
    ({"input": np.zeros((3, 16, 16), np.float32)}, r"\(rank 3\), expected rank 4", "batch axis"),
    ({"input": np.zeros((1, 16, 16, 3), np.float32)}, "channels is 16, expected 3", "NCHW"),
    ({"input": np.zeros((1, 3, 32, 32), np.float32)}, "height is 32, expected 16", "S x S"),
])
def test_check_feed_errors(feed: object, match: str, hint: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        check_feed(feed, SPECS, "r")  # type: ignore[arg-type]
    assert hint in info.value.hint
