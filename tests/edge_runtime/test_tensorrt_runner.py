"""TensorRTRunner against a fake ``tensorrt`` module (put into sys.modules) and the
emulated CUDA launcher: the TensorRT 10 calls, their order, shapes, names and device
addresses, the data path host -> device -> engine -> host, and every error path.

The fake engine has input "input" float32 (-1, 3, 16, 16) with profile 1 / 4 / 8 and
output "logits" float32 (-1, 5). Its "inference" reads the input buffer from emulated
device memory and writes, per row, the mean of each RGB plane, the row's max and the
batch size, so a test can tell exactly which bytes the engine saw.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_runtime.runners.base import RunnerStateError
from edge_runtime.runners.engine_meta import EngineInfo, engine_model_info, write_sidecar
from edge_runtime.runners.registry import create_runner, list_runners, pick_runner, probe_runner
from edge_runtime.runners.tensorrt_runner import TensorRTRunner
from kernels.emulator import EmulatedLauncher
from kernels.loader import DeviceArray
from roadshield_base.errors import (
    BackendUnavailableError,
    ConfigError,
    ModelLoadError,
    RoadshieldError,
)

TRT_VERSION = "10.3.0.30"
GPU = "Orin (emulated)"
ENGINE_BYTES = b"fake serialized engine: input (-1,3,16,16) -> logits (-1,5)"
IN_SHAPE = (-1, 3, 16, 16)
PROFILE = [(1, 3, 16, 16), (4, 3, 16, 16), (8, 3, 16, 16)]


class FakeTRT:
    """The parts of the TensorRT 10 runtime API the runner uses, recording every call."""

    def __init__(self, launcher: EmulatedLauncher | None = None) -> None:
        self.launcher = launcher
        self.log: list[tuple[Any, ...]] = []
        self.output_shape: tuple[int, ...] = (-1, 5)
        self.execute_ok = True
        self.module = self._module()

    def _module(self) -> types.ModuleType:
        fake = self
        mod = types.ModuleType("tensorrt")
        mod.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
        mod.__version__ = TRT_VERSION

        class Logger:
            WARNING, VERBOSE = "WARNING", "VERBOSE"

            def __init__(self, severity: str) -> None:
                fake.log.append(("Logger", severity))

        class TensorIOMode:
            INPUT, OUTPUT = "INPUT", "OUTPUT"

        class DataType:
            FLOAT = "FLOAT"

        class Runtime:
            def __init__(self, logger: Logger) -> None:
                fake.log.append(("Runtime",))

            def deserialize_cuda_engine(self, data: bytes) -> Any:
                fake.log.append(("deserialize_cuda_engine", bytes(data)))
                return Engine() if bytes(data) == ENGINE_BYTES else None

        class Engine:
            num_io_tensors = 2

            def get_tensor_name(self, index: int) -> str:
                fake.log.append(("get_tensor_name", index))
                return ("input", "logits")[index]

            def get_tensor_mode(self, name: str) -> str:
                return TensorIOMode.INPUT if name == "input" else TensorIOMode.OUTPUT

            def get_tensor_shape(self, name: str) -> tuple[int, ...]:
                return IN_SHAPE if name == "input" else fake.output_shape

            def get_tensor_dtype(self, name: str) -> str:
                return DataType.FLOAT

            def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple]:
                fake.log.append(("get_tensor_profile_shape", name, profile))
                return list(PROFILE)

            def create_execution_context(self) -> Any:
                fake.log.append(("create_execution_context",))
                return Context()

        class Context:
            def __init__(self) -> None:
                self.shape: tuple[int, ...] = ()
                self.address: dict[str, int] = {}

            def set_input_shape(self, name: str, shape: Any) -> bool:
                shape = tuple(int(d) for d in shape)
                fake.log.append(("set_input_shape", name, shape))
                ok = all(lo <= d <= hi for d, lo, hi in zip(shape, PROFILE[0], PROFILE[2],
                                                            strict=True))
                if ok:
                    self.shape = shape
                return ok

            def get_tensor_shape(self, name: str) -> tuple[int, ...]:
                if name == "input":
                    return self.shape
                return (self.shape[0], *fake.output_shape[1:])

            def set_tensor_address(self, name: str, address: int) -> bool:
                fake.log.append(("set_tensor_address", name, address))
                self.address[name] = address
                return True

            def execute_async_v3(self, stream_handle: int) -> bool:
                fake.log.append(("execute_async_v3", stream_handle))
                if not fake.execute_ok:
                    return False
                dev = fake.launcher
                assert dev is not None
                n = self.shape[0]
                x = dev.region(self.address["input"], n * 3 * 16 * 16 * 4).view(np.float32)
                x = x.reshape(n, 3, 16 * 16)
                out = np.concatenate([x.mean(2), x.max((1, 2))[:, None],
                                      np.full((n, 1), n, np.float32)], 1).astype(np.float32)
                dev.region(self.address["logits"], out.nbytes)[:] = out.reshape(-1).view(np.uint8)
                return True

        mod.Logger, mod.Runtime, mod.TensorIOMode, mod.DataType = (Logger, Runtime,
                                                                  TensorIOMode, DataType)
        mod.nptype = lambda dtype: np.float32
        return mod

    def names(self) -> list[str]:
        return [entry[0] for entry in self.log]


def expected_logits(x: np.ndarray) -> np.ndarray:
    """What the fake engine computes for the batch ``x``."""
    flat = x.reshape(len(x), 3, -1)
    return np.concatenate([flat.mean(2), flat.max((1, 2))[:, None],
                           np.full((len(x), 1), len(x), np.float32)], 1).astype(np.float32)


def write_engine(folder: Path, *, version: str = TRT_VERSION, gpu: str = GPU,
                 capability: str = "8.7", data: bytes = ENGINE_BYTES) -> Path:
    """An engine file and its sidecar (class names etc. as the exporter writes them)."""
    path = folder / "tiny.engine"
    path.write_bytes(data)
    write_sidecar(path, EngineInfo(
        tensorrt_version=version, gpu_name=gpu, compute_capability=capability,
        engine_sha256=hashlib.sha256(data).hexdigest(), onnx_sha256="0" * 64, precision="fp16",
        workspace_bytes=1 << 30, input_name="input", output_name="logits",
        profiles={"input": [list(p) for p in PROFILE]},
        model_metadata={"class_names": '["a", "b", "c", "d", "e"]', "input_size": "16",
                        "arch": "tiny_cnn"}))
    return path


@pytest.fixture
def dev() -> EmulatedLauncher:
    return EmulatedLauncher(GPU, (8, 7))


@pytest.fixture
def trt(monkeypatch: pytest.MonkeyPatch, dev: EmulatedLauncher) -> Iterator[FakeTRT]:
    fake = FakeTRT(dev)
    monkeypatch.setitem(sys.modules, "tensorrt", fake.module)
    yield fake


@pytest.fixture
def engine(tmp_path: Path) -> Path:
    return write_engine(tmp_path)


def _batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, 16, 16), dtype=np.float32)


# --- loading ----------------------------------------------------------------------------------

def test_activate_makes_the_tensorrt_10_calls_in_order(trt: FakeTRT, dev: EmulatedLauncher,
                                                       engine: Path) -> None:
    runner = TensorRTRunner(engine, launcher=dev)
    runner.activate()
    assert trt.names()[:4] == ["Logger", "Runtime", "deserialize_cuda_engine",
                               "create_execution_context"]
    assert ("deserialize_cuda_engine", ENGINE_BYTES) in trt.log
    assert [e for e in trt.log if e[0] == "get_tensor_name"] == [("get_tensor_name", 0),
                                                                 ("get_tensor_name", 1)]
    assert ("get_tensor_profile_shape", "input", 0) in trt.log
    # the context is shaped at the profile maximum before output sizes are read
    assert ("set_input_shape", "input", (8, 3, 16, 16)) in trt.log
    allocs = [c for c in dev.calls if c[0] == "alloc"]
    assert [c[2] for c in allocs] == [8 * 3 * 16 * 16 * 4, 8 * 5 * 4]
    bound = [e for e in trt.log if e[0] == "set_tensor_address"]
    assert bound == [("set_tensor_address", "input", allocs[0][1]),
                     ("set_tensor_address", "logits", allocs[1][1])]
    assert runner.input_names == ["input"] and runner.output_names == ["logits"]
    assert runner.input_specs[0].shape == (None, 3, 16, 16)
    buf = runner.input_buffer()
    assert (buf.address, buf.shape, buf.dtype) == (allocs[0][1], (8, 3, 16, 16), np.float32)
    runner.deactivate()
    assert dev.memory == {} and ("destroy_stream", runner_stream_handle(dev)) in dev.calls
    assert not dev.closed  # a shared launcher stays open


def runner_stream_handle(dev: EmulatedLauncher) -> int:
    return next(c[1] for c in dev.calls if c[0] == "create_stream")


def test_infer_host_batch_copies_in_runs_and_copies_out(trt: FakeTRT, dev: EmulatedLauncher,
                                                        engine: Path) -> None:
    x = _batch(3)
    with TensorRTRunner(engine, launcher=dev) as runner:
        trt.log.clear()
        dev.calls.clear()
        out = runner.infer({"input": x})
        stream = runner.stream.handle
        buf = runner.input_buffer().address
    np.testing.assert_allclose(out["logits"], expected_logits(x), rtol=1e-6)
    assert out["logits"].shape == (3, 5) and out["logits"].dtype == np.float32
    assert trt.log == [("set_input_shape", "input", (3, 3, 16, 16)), ("execute_async_v3", stream)]
    kinds = [c[0] for c in dev.calls]
    assert kinds[:3] == ["htod", "dtoh", "sync"]
    assert dev.calls[0] == ("htod", buf, x.nbytes, stream)
    assert dev.calls[1][2:] == (3 * 5 * 4, stream) and dev.calls[2] == ("sync", stream)


def test_device_feed_in_the_runners_buffer_skips_the_host_copy(trt: FakeTRT,
                                                               dev: EmulatedLauncher,
                                                               engine: Path) -> None:
    x = _batch(2, seed=1)
    with TensorRTRunner(engine, launcher=dev) as runner:
        buf = runner.input_buffer()
        dev.copy_htod(buf.address, x)  # stands in for the fused-preprocess kernel
        dev.calls.clear()
        trt.log.clear()
        out = runner.infer({"input": DeviceArray(buf.address, (2, 3, 16, 16), np.float32)})
    np.testing.assert_allclose(out["logits"], expected_logits(x), rtol=1e-6)
    assert "htod" not in [c[0] for c in dev.calls]
    assert [e[0] for e in trt.log] == ["set_input_shape", "execute_async_v3"]


def test_foreign_device_pointer_is_bound_for_one_call(trt: FakeTRT, dev: EmulatedLauncher,
                                                      engine: Path) -> None:
    x = _batch(4, seed=2)
    foreign = dev.to_device(x)
    with TensorRTRunner(engine, launcher=dev) as runner:
        own = runner.input_buffer().address
        trt.log.clear()
        out = runner.infer({"input": DeviceArray(foreign, x.shape, np.float32)})
        assert [e for e in trt.log if e[0] == "set_tensor_address"] == [
            ("set_tensor_address", "input", foreign), ("set_tensor_address", "input", own)]
        again = runner.infer({"input": x[:1]})  # host feeds use the own buffer again
    np.testing.assert_allclose(out["logits"], expected_logits(x), rtol=1e-6)
    np.testing.assert_allclose(again["logits"], expected_logits(x[:1]), rtol=1e-6)


def test_owned_launcher_is_created_and_closed(trt: FakeTRT, dev: EmulatedLauncher,
                                              engine: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import edge_runtime.runners.tensorrt_runner as mod

    made: list[tuple] = []

    def factory(binding: str | None, device: int) -> EmulatedLauncher:
        made.append((binding, device))
        return dev

    monkeypatch.setattr(mod, "create_launcher", factory)
    with TensorRTRunner(engine, binding="cuda-python", device=0) as runner:
        runner.infer({"input": _batch(1)})
    assert made == [("cuda-python", 0)] and dev.closed


# --- errors -----------------------------------------------------------------------------------

def test_bad_feeds_are_config_errors(trt: FakeTRT, dev: EmulatedLauncher, engine: Path) -> None:
    with TensorRTRunner(engine, launcher=dev) as runner:
        with pytest.raises(ConfigError, match="outside the engine's profile"):
            runner.infer({"input": _batch(9)})
        with pytest.raises(ConfigError, match="dtype float64"):
            runner.infer({"input": _batch(2).astype(np.float64)})
        with pytest.raises(ConfigError, match="do not match"):
            runner.infer({"image": _batch(2)})
        with pytest.raises(ConfigError, match="device input"):
            runner.infer({"input": DeviceArray(runner.input_buffer().address, (2, 3, 16),
                                               np.float32)})
        with pytest.raises(ConfigError, match="no input 'logits'"):
            runner.input_buffer("logits")
        trt.execute_ok = False
        with pytest.raises(RoadshieldError, match="execute_async_v3 failed"):
            runner.infer({"input": _batch(2)})
    with pytest.raises(RunnerStateError, match="not active"):
        runner.infer({"input": _batch(1)})


@pytest.mark.parametrize("change,match", [
    ({"version": "10.0.1.6"}, "built with TensorRT 10.0.1.6; this machine has 10.3.0.30"),
    ({"gpu": "NVIDIA H200"}, "built for NVIDIA H200"),
    ({"capability": "9.0"}, r"sm 9.0"),
])
def test_engine_for_another_tensorrt_or_gpu_is_refused(trt: FakeTRT, dev: EmulatedLauncher,
                                                       tmp_path: Path, change: dict,
                                                       match: str) -> None:
    path = write_engine(tmp_path, **change)
    with pytest.raises(ModelLoadError, match=match) as info:
        TensorRTRunner(path, launcher=dev).activate()
    assert "rebuild the engine" in info.value.hint
    assert "Runtime" not in trt.names()  # refused before TensorRT sees the bytes
    assert dev.memory == {}


def test_tampered_or_sidecarless_engine_is_refused(trt: FakeTRT, dev: EmulatedLauncher,
                                                   engine: Path) -> None:
    engine.write_bytes(ENGINE_BYTES + b"!")
    with pytest.raises(ModelLoadError, match="sidecar records"):
        TensorRTRunner(engine, launcher=dev).activate()
    engine.with_name("tiny.engine.json").unlink()
    with pytest.raises(ModelLoadError, match="has no sidecar"):
        TensorRTRunner(engine, launcher=dev).activate()
    # verify=False loads without the sidecar; TensorRT itself then rejects the bytes
    with pytest.raises(ModelLoadError, match="could not deserialize"):
        TensorRTRunner(engine, launcher=dev, verify=False).activate()
    assert dev.memory == {}


def test_data_dependent_output_shape_is_refused(trt: FakeTRT, dev: EmulatedLauncher,
                                                engine: Path) -> None:
    trt.output_shape = (-1, -1)
    runner = TensorRTRunner(engine, launcher=dev)
    with pytest.raises(ModelLoadError, match="data-dependent"):
        runner.activate()
    assert not runner.is_active and dev.memory == {}


def test_missing_file_and_shared_launcher_rules(trt: FakeTRT, dev: EmulatedLauncher,
                                                engine: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        TensorRTRunner(tmp_path / "none.engine")
    runner = TensorRTRunner(engine, launcher=dev)
    with runner:
        with pytest.raises(RunnerStateError, match="another CUDA launcher"):
            runner.share_launcher(EmulatedLauncher())
        runner.share_launcher(dev)  # the same one is fine


def test_without_tensorrt_the_backend_is_unavailable(monkeypatch: pytest.MonkeyPatch,
                                                     engine: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import raises ImportError
    assert "tensorrt" in list_runners()
    avail = probe_runner("tensorrt")
    assert not avail.usable and "not installed" in avail.detail
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed") as info:
        create_runner("tensorrt", engine)
    assert "JetPack" in info.value.hint
    stubs_only = types.ModuleType("tensorrt")  # what tensorrt-stubs alone imports as
    monkeypatch.setitem(sys.modules, "tensorrt", stubs_only)
    with pytest.raises(BackendUnavailableError, match="has no Runtime"):
        create_runner("tensorrt", engine)
    with pytest.raises(BackendUnavailableError, match="no backend"):
        pick_runner(engine)


def test_auto_picks_tensorrt_for_engines(trt: FakeTRT, engine: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",  # a CUDA binding is "installed"
                        lambda name, *a: (importlib.machinery.ModuleSpec(name, None)
                                          if name in ("pycuda", "cuda") else real(name, *a)))
    name, avail = pick_runner(engine)
    assert name == "tensorrt" and avail.priority == 50 and TRT_VERSION in avail.detail
    runner = create_runner("auto", engine, launcher=EmulatedLauncher(GPU))
    assert isinstance(runner, TensorRTRunner)
    with pytest.raises(ConfigError, match="loads"):
        create_runner("tensorrt", engine.with_suffix(".onnx"))


def test_tensorrt_without_a_cuda_binding_is_not_usable(trt: FakeTRT,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("pycuda", "cuda") else real(name, *a))
    avail = probe_runner("tensorrt")
    assert not avail.usable and "neither pycuda nor cuda-python" in avail.detail


def test_engine_model_info_comes_from_the_sidecar(engine: Path) -> None:
    info = engine_model_info(engine)
    assert info.class_names == ("a", "b", "c", "d", "e") and info.input_size == 16
    assert info.input_name == "input" and info.output_name == "logits"
    assert info.sha256 == hashlib.sha256(ENGINE_BYTES).hexdigest()
