"""distill.engine.build_engine against a fake ``tensorrt`` builder (put into sys.modules):
the TensorRT 10 build calls in order with their arguments, the engine and sidecar
written atomically, and the error paths. The ONNX is the tiny exported classifier
(conftest ``tiny_onnx``: input "input" [N, 3, 16, 16], output "logits" [N, 5])."""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
import shutil
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from distill.engine import build_engine
from edge_runtime.runners.engine_meta import (
    check_engine,
    engine_model_info,
    read_sidecar,
    sidecar_path,
)
from roadshield.cli import main as roadshield_main
from roadshield_base.errors import BackendUnavailableError, ConfigError, ModelLoadError

VERSION = "10.3.0.30"
GPU = ("Orin", (8, 7))
SERIALIZED = b"\x00serialized engine bytes\xff" * 7


class FakeBuilderTRT:
    """The TensorRT 10 builder API the build uses, recording every call."""

    def __init__(self, fast_fp16: bool = True, fp16_flag: bool = True,
                 input_shape: tuple[int, ...] = (-1, 3, 16, 16)) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.parse_errors: list[str] = []
        self.build_result: Any = SERIALIZED
        fake = self
        mod = types.ModuleType("tensorrt")
        mod.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
        mod.__version__ = VERSION

        class Logger:
            WARNING, VERBOSE = "WARNING", "VERBOSE"

            def __init__(self, severity: str) -> None:
                fake.log.append(("Logger", severity))

        class MemoryPoolType:
            WORKSPACE = "WORKSPACE"

        class BuilderFlag:
            pass

        if fp16_flag:
            BuilderFlag.FP16 = "FP16"

        class Tensor:
            name = "input"
            shape = input_shape

        class Network:
            num_inputs = 1

            def get_input(self, index: int) -> Tensor:
                return Tensor()

        class Error:
            def __init__(self, text: str) -> None:
                self.text = text

            def desc(self) -> str:
                return self.text

        class OnnxParser:
            def __init__(self, network: Network, logger: Logger) -> None:
                fake.log.append(("OnnxParser", type(network).__name__))

            def parse(self, data: bytes, path: str) -> bool:
                fake.log.append(("parse", hashlib.sha256(data).hexdigest(), path))
                return not fake.parse_errors

            @property
            def num_errors(self) -> int:
                return len(fake.parse_errors)

            def get_error(self, index: int) -> Error:
                return Error(fake.parse_errors[index])

        class Profile:
            def set_shape(self, name: str, low: Any, opt: Any, high: Any) -> None:
                fake.log.append(("set_shape", name, tuple(low), tuple(opt), tuple(high)))

        class Config:
            def set_memory_pool_limit(self, pool: str, size: int) -> None:
                fake.log.append(("set_memory_pool_limit", pool, size))

            def set_flag(self, flag: str) -> None:
                fake.log.append(("set_flag", flag))

            def add_optimization_profile(self, profile: Profile) -> int:
                fake.log.append(("add_optimization_profile",))
                return 0

        class Builder:
            platform_has_fast_fp16 = fast_fp16

            def __init__(self, logger: Logger) -> None:
                fake.log.append(("Builder",))

            def create_network(self, flags: int) -> Network:
                fake.log.append(("create_network", flags))
                return Network()

            def create_builder_config(self) -> Config:
                fake.log.append(("create_builder_config",))
                return Config()

            def create_optimization_profile(self) -> Profile:
                fake.log.append(("create_optimization_profile",))
                return Profile()

            def build_serialized_network(self, network: Network, config: Config) -> Any:
                fake.log.append(("build_serialized_network",))
                return fake.build_result

        for name, value in dict(Logger=Logger, MemoryPoolType=MemoryPoolType,
                                BuilderFlag=BuilderFlag, OnnxParser=OnnxParser,
                                Builder=Builder, Runtime=object, Dims=tuple).items():
            setattr(mod, name, value)
        self.module = mod

    def names(self) -> list[str]:
        return [entry[0] for entry in self.log]


@pytest.fixture
def onnx_copy(tiny_onnx: Path, tmp_path: Path) -> Path:
    return Path(shutil.copy(tiny_onnx, tmp_path / "tiny.onnx"))


def _install(monkeypatch: pytest.MonkeyPatch, **kw: Any) -> FakeBuilderTRT:
    fake = FakeBuilderTRT(**kw)
    monkeypatch.setitem(sys.modules, "tensorrt", fake.module)
    return fake


def test_build_makes_the_calls_in_order_and_writes_engine_and_sidecar(
        onnx_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _install(monkeypatch)
    info = build_engine(onnx_copy, precision="auto", workspace_mib=512, max_batch=8,
                        opt_batch=4, gpu=GPU)
    onnx_sha = hashlib.sha256(onnx_copy.read_bytes()).hexdigest()
    assert fake.log == [
        ("Logger", "WARNING"), ("Builder",), ("create_network", 0), ("OnnxParser", "Network"),
        ("parse", onnx_sha, str(onnx_copy)), ("create_builder_config",),
        ("set_memory_pool_limit", "WORKSPACE", 512 << 20), ("set_flag", "FP16"),
        ("create_optimization_profile",),
        ("set_shape", "input", (1, 3, 16, 16), (4, 3, 16, 16), (8, 3, 16, 16)),
        ("add_optimization_profile",), ("build_serialized_network",)]
    engine = onnx_copy.with_suffix(".engine")
    assert engine.read_bytes() == SERIALIZED
    side = json.loads(sidecar_path(engine).read_text())
    assert side["tensorrt_version"] == VERSION and side["gpu_name"] == "Orin"
    assert side["compute_capability"] == "8.7" and side["precision"] == "fp16"
    assert side["onnx_sha256"] == onnx_sha
    assert side["engine_sha256"] == hashlib.sha256(SERIALIZED).hexdigest()
    assert side["profiles"] == {"input": [[1, 3, 16, 16], [4, 3, 16, 16], [8, 3, 16, 16]]}
    assert read_sidecar(engine) == info
    model = engine_model_info(engine)
    assert model.class_names == ("stop", "yield", "no_entry", "speed_limit_30", "priority_road")
    assert (model.input_size, model.input_name, model.output_name) == (16, "input", "logits")
    check_engine(engine, info, tensorrt_version=VERSION, gpu_name="Orin",
                 compute_capability=(8, 7))
    with pytest.raises(ModelLoadError, match="TensorRT 10.3.0.30; this machine has 10.4"):
        check_engine(engine, info, tensorrt_version="10.4.0.26", gpu_name="Orin")
    assert not list(engine.parent.glob(".*tmp"))  # atomic writes leave no temp files


@pytest.mark.parametrize("precision,fast,flag,expect", [
    ("auto", False, True, "fp32"), ("fp32", True, True, "fp32"), ("fp16", False, True, "fp16"),
    ("auto", True, False, "fp32")])  # no FP16 flag: TensorRT 11 takes types from the ONNX
def test_precision_choice(onnx_copy: Path, monkeypatch: pytest.MonkeyPatch, precision: str,
                          fast: bool, flag: bool, expect: str) -> None:
    fake = _install(monkeypatch, fast_fp16=fast, fp16_flag=flag)
    info = build_engine(onnx_copy, onnx_copy.with_name("x.plan"), precision=precision, gpu=GPU)
    assert info.precision == expect
    assert (("set_flag", "FP16") in fake.log) == (expect == "fp16")


def test_fp16_without_the_flag_is_refused(onnx_copy: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, fp16_flag=False)
    with pytest.raises(ConfigError, match="no FP16 builder flag") as info:
        build_engine(onnx_copy, precision="fp16", gpu=GPU)
    assert "FP16 (or Q/DQ) ONNX" in info.value.hint


def test_static_input_needs_no_profile(onnx_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _install(monkeypatch, input_shape=(2, 3, 16, 16))
    info = build_engine(onnx_copy, gpu=GPU)
    assert "create_optimization_profile" not in fake.names()
    assert info.profiles == {"input": [[2, 3, 16, 16]] * 3}


def test_failures_leave_the_old_engine_alone(onnx_copy: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    engine = onnx_copy.with_suffix(".engine")
    engine.write_bytes(b"previous engine")
    fake = _install(monkeypatch)
    fake.parse_errors = ["Unsupported ONNX op: Foo", "node 3: bad input"]
    with pytest.raises(ModelLoadError, match="Unsupported ONNX op: Foo; node 3: bad input"):
        build_engine(onnx_copy, gpu=GPU)
    fake.parse_errors = []
    fake.build_result = None
    with pytest.raises(ModelLoadError, match="failed to build") as info:
        build_engine(onnx_copy, gpu=GPU)
    assert "--workspace-mib" in info.value.hint
    assert engine.read_bytes() == b"previous engine" and not sidecar_path(engine).exists()


def test_bad_settings_and_inputs(onnx_copy: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, input_shape=(-1, 3, -1, -1))
    with pytest.raises(ConfigError, match="dynamic axes"):
        build_engine(onnx_copy, gpu=GPU)
    for kw in ({"min_batch": 0}, {"min_batch": 4, "max_batch": 2}, {"opt_batch": 9},
               {"precision": "int8"}, {"workspace_mib": 0}):
        with pytest.raises(ConfigError):
            build_engine(onnx_copy, gpu=GPU, **kw)
    bare = tmp_path / "bare.onnx"
    bare.write_bytes(b"not an onnx file")
    with pytest.raises(ModelLoadError):
        build_engine(bare, gpu=GPU)


def test_without_tensorrt_the_build_is_unavailable(onnx_copy: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed"):
        build_engine(onnx_copy, gpu=GPU)
    assert roadshield_main(["distill", "engine", str(onnx_copy)]) == 2
    assert "TensorRT is not installed" in capsys.readouterr().err
