"""INT8 engines from Q/DQ models, the timing cache, and the engine's parity check.

The builder is the fake TensorRT 10 module of test_engine (the calls are recorded); the
parity check runs for real on the CPU with ONNX Runtime on both sides (float model
against its INT8 Q/DQ model), which is the same comparison an engine gets on the device."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_engine import GPU, SERIALIZED, FakeBuilderTRT

from distill.engine import build_engine, has_qdq
from distill.parity import compare_outputs, compare_runners, engine_parity, random_batches
from distill.quantize import quantize_qdq
from edge_runtime.runners.engine_meta import read_sidecar
from edge_runtime.runners.onnxruntime_runner import OnnxRuntimeRunner
from roadshield_base.errors import ConfigError, ModelLoadError

CACHE_BYTES = b"timing cache v1"


class CacheRecorder:
    """What the build did with the timing cache."""

    def __init__(self, accept: bool = True) -> None:
        self.accept = accept
        self.created_from: list[bytes] = []


def _install(monkeypatch: pytest.MonkeyPatch, recorder: CacheRecorder | None = None
             ) -> FakeBuilderTRT:
    fake = FakeBuilderTRT()
    fake.module.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
    config_cls = type(fake.module.Builder.create_builder_config(None))  # type: ignore[arg-type]
    fake.log.clear()
    rec = recorder or CacheRecorder()

    class Cache:
        def serialize(self) -> bytes:
            return CACHE_BYTES

    def create_timing_cache(self: Any, data: bytes) -> Cache:
        rec.created_from.append(bytes(data))
        return Cache()

    def set_timing_cache(self: Any, cache: Cache, ignore_mismatch: bool) -> bool:
        fake.log.append(("set_timing_cache", ignore_mismatch))
        return rec.accept

    config_cls.create_timing_cache = create_timing_cache
    config_cls.set_timing_cache = set_timing_cache
    config_cls.get_timing_cache = lambda self: Cache()
    monkeypatch.setitem(sys.modules, "tensorrt", fake.module)
    return fake


@pytest.fixture(scope="module")
def qdq_model(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    calib = rng.random((64, 3, 16, 16), dtype=np.float32)
    out = tmp_path_factory.mktemp("qdq") / "tiny.int8.onnx"
    quantize_qdq(tiny_onnx, out, calib, float_stem=False)
    return out


def test_a_qdq_model_builds_strongly_typed_without_precision_flags(qdq_model, tmp_path,
                                                                   monkeypatch):
    fake = _install(monkeypatch)
    model = Path(shutil.copy(qdq_model, tmp_path / "m.int8.onnx"))
    assert has_qdq(model.read_bytes())
    info = build_engine(model, precision="auto", gpu=GPU)
    assert ("create_network", 1 << 1) in fake.log
    assert not [e for e in fake.log if e[0] == "set_flag"]
    assert info.precision == "int8" == read_sidecar(model.with_suffix(".engine")).precision


def test_int8_needs_a_qdq_model_and_a_qdq_model_builds_only_int8(qdq_model, tiny_onnx,
                                                                 tmp_path, monkeypatch):
    _install(monkeypatch)
    assert not has_qdq(tiny_onnx.read_bytes())
    with pytest.raises(ConfigError, match="no Q/DQ nodes") as err:
        build_engine(tiny_onnx, tmp_path / "x.engine", precision="int8", gpu=GPU)
    assert "distill quantize" in err.value.hint
    with pytest.raises(ConfigError, match="builds as INT8 only"):
        build_engine(qdq_model, tmp_path / "y.engine", precision="fp16", gpu=GPU)
    assert not list(tmp_path.glob("*.engine"))


def test_the_timing_cache_is_read_before_and_written_after_the_build(tiny_onnx, tmp_path,
                                                                     monkeypatch):
    rec = CacheRecorder()
    fake = _install(monkeypatch, rec)
    cache = tmp_path / "tensorrt.timing.cache"
    build_engine(tiny_onnx, tmp_path / "a.engine", gpu=GPU, timing_cache=cache)
    assert rec.created_from == [b""] and cache.read_bytes() == CACHE_BYTES
    assert fake.names().index("set_timing_cache") < fake.names().index(
        "build_serialized_network")
    build_engine(tiny_onnx, tmp_path / "b.engine", gpu=GPU, timing_cache=cache)
    assert rec.created_from == [b"", CACHE_BYTES]  # the second build starts from the first's
    assert (tmp_path / "b.engine").read_bytes() == SERIALIZED


def test_a_timing_cache_from_elsewhere_is_refused(tiny_onnx, tmp_path, monkeypatch):
    _install(monkeypatch, CacheRecorder(accept=False))
    cache = tmp_path / "old.cache"
    cache.write_bytes(b"from another GPU")
    with pytest.raises(ConfigError, match="another TensorRT version or GPU") as err:
        build_engine(tiny_onnx, tmp_path / "c.engine", gpu=GPU, timing_cache=cache)
    assert "delete" in err.value.hint and not (tmp_path / "c.engine").exists()


def test_parity_of_the_int8_model_against_the_float_one_on_onnx_runtime(qdq_model, tiny_onnx):
    batches = random_batches("input", 16, batch=8, count=3, seed=1)
    with OnnxRuntimeRunner(tiny_onnx, providers=["CPUExecutionProvider"]) as ref, \
            OnnxRuntimeRunner(qdq_model, providers=["CPUExecutionProvider"]) as q8:
        same = compare_runners(ref, ref, batches, rtol=0.0, atol=0.0)
        loose = compare_runners(q8, ref, batches, rtol=0.5, atol=0.5)
        tight = compare_runners(q8, ref, batches, rtol=1e-6, atol=1e-6)
    assert same.passed and same.outputs[0].max_absdiff == 0.0
    (logits,) = [o for o in loose.outputs if o.name == "logits"]
    assert logits.shape == (24, 5) and logits.top1_agreement is not None
    assert loose.passed and not tight.passed and tight.outputs[0].mismatched > 0
    assert tight.outputs[0].max_absdiff == logits.max_absdiff > 0
    assert "MISMATCH" in tight.format() and json.dumps(tight.to_dict())


def test_compare_outputs_follows_the_stated_rule():
    ref = np.array([[1.0, -2.0], [0.0, 4.0]])
    cand = ref + np.array([[0.05, 0.0], [0.02, -0.5]])
    out = compare_outputs("logits", cand, ref, rtol=0.1, atol=0.03, logits=True)
    # |d| <= 0.03 + 0.1 |ref|: 0.05 <= 0.13 ok, 0.02 <= 0.03 ok, 0.5 <= 0.43 not
    assert out.mismatched == 1 and not out.passed
    assert out.max_absdiff == pytest.approx(0.5) and out.top1_agreement == 1.0
    assert compare_outputs("x", ref * np.nan, ref, 1.0, 1.0).mismatched == 4
    with pytest.raises(ModelLoadError, match="shape"):
        compare_outputs("x", ref[:1], ref, 0.1, 0.1)


def test_engine_parity_compares_the_engine_runner_with_onnx_runtime(tiny_onnx, monkeypatch):
    """The wiring, with ONNX Runtime standing in for the TensorRT runner."""
    made: list[tuple[str, str]] = []
    import edge_runtime.runners.registry as registry

    def fake_create(name: str, path: Any, **kw: Any) -> Any:
        made.append((name, Path(path).name))
        return OnnxRuntimeRunner(tiny_onnx, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(registry, "create_runner", fake_create)
    report = engine_parity(tiny_onnx, "m.engine", max_batch=4, count=2)
    assert made == [("onnxruntime", "tiny.onnx"), ("tensorrt", "m.engine")]
    assert report.passed and report.batches == 2 and report.outputs[0].shape == (8, 5)
