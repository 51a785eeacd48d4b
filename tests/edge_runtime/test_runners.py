"""The runner contract, checked the same way on every backend that runs here,
plus the ONNX Runtime provider choice, the torch device choice and the registry."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edge_runtime.runners import registry
from edge_runtime.runners.base import BaseRunner, RunnerStateError
from edge_runtime.runners.onnxruntime_runner import (
    CPU_EP,
    CUDA_EP,
    TENSORRT_EP,
    OnnxRuntimeRunner,
    _prepare_trt_cache,
    select_providers,
    trt_cache_dir,
)
from edge_runtime.runners.registry import create_runner
from edge_runtime.runners.torch_runner import TorchRunner, resolve_device
from roadshield_base.errors import BackendUnavailableError, ConfigError, ModelLoadError

# How each CPU backend is fed the tiny model: ONNX file, .pt2 file or module. The list is
# fixed, not what this machine offers: a backend missing here fails its cases instead of
# dropping them (CI installs both).
SOURCES = {"onnxruntime": ("onnx",), "torch": ("pt2", "module")}
CASES = [pytest.param((name, src), id=f"{name}-{src}")
         for name, sources in SOURCES.items() for src in sources]


@pytest.fixture(params=CASES)
def runner(request: pytest.FixtureRequest, tiny_onnx: Path, tiny_pt2: Path,
           tiny_model: object) -> BaseRunner:
    name, src = request.param
    model = {"onnx": tiny_onnx, "pt2": tiny_pt2, "module": tiny_model}[src]
    kwargs = {"device": "cpu"} if name == "torch" else {}
    return create_runner(name, model, **kwargs)


def _batch(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, size, size), dtype=np.float32)


# --- the contract, on every backend --------------------------------------------------------

def test_both_cpu_backends_can_run_here() -> None:
    # CI installs onnxruntime and torch: a probe that says no is a broken install
    for name in SOURCES:
        avail = registry.probe_runner(name)
        assert avail.usable, f"backend {name} cannot run here: {avail.detail}"
    assert set(SOURCES) <= set(registry.available_runners())


def test_infer_while_inactive_raises(runner: BaseRunner) -> None:
    with pytest.raises(RunnerStateError, match="not active"):
        runner.infer({"input": _batch(1)})


def test_double_activate_raises(runner: BaseRunner) -> None:
    runner.activate()
    try:
        with pytest.raises(RunnerStateError, match="already active"):
            runner.activate()
    finally:
        runner.deactivate()
    assert not runner.is_active


def test_context_manager_activates_and_releases(runner: BaseRunner) -> None:
    with runner as active:
        assert active is runner and runner.is_active
        first = runner.infer({"input": _batch(2)})["logits"]
    assert not runner.is_active
    with pytest.raises(RunnerStateError):
        runner.infer({"input": _batch(2)})
    with runner:  # a runner can be activated again after it was released
        np.testing.assert_array_equal(runner.infer({"input": _batch(2)})["logits"], first)


@pytest.mark.parametrize("batch", [1, 5])
def test_names_and_shapes(runner: BaseRunner, batch: int) -> None:
    with runner:
        assert runner.input_names == ["input"]
        assert runner.output_names == ["logits"]
        out = runner.infer({"input": _batch(batch)})
    assert list(out) == ["logits"]
    assert out["logits"].shape == (batch, 5) and out["logits"].dtype == np.float32
    assert np.isfinite(out["logits"]).all()


@pytest.mark.parametrize("bad, match", [
    ({"image": _batch(1)}, "missing"),
    ({"input": _batch(1).astype(np.float64)}, "dtype float64"),
    ({"input": _batch(1)[0]}, "rank"),
    ({"input": np.zeros((1, 4, 16, 16), np.float32)}, "channels is 4, expected 3"),
    ({"input": _batch(1).tolist()}, "numpy array"),
])
def test_bad_feed_is_a_config_error(runner: BaseRunner, bad: dict, match: str) -> None:
    with runner, pytest.raises(ConfigError, match=match):
        runner.infer(bad)


def test_backends_agree_on_the_same_weights(tiny_onnx: Path, tiny_pt2: Path,
                                            tiny_model: object) -> None:
    x = _batch(5, seed=3)
    outputs = {}
    for label, runner in [("onnxruntime", OnnxRuntimeRunner(tiny_onnx)),
                          ("torch-pt2", TorchRunner(tiny_pt2, device="cpu")),
                          ("torch-module", TorchRunner(tiny_model, device="cpu"))]:
        with runner:
            outputs[label] = runner.infer({"input": x})["logits"]
    for label, logits in outputs.items():
        np.testing.assert_allclose(logits, outputs["onnxruntime"], atol=1e-4, rtol=0,
                                   err_msg=label)


# --- ONNX Runtime: providers, errors, names ------------------------------------------------

@pytest.mark.parametrize("offered, expected", [
    (["AzureExecutionProvider", CUDA_EP, TENSORRT_EP, CPU_EP], [TENSORRT_EP, CUDA_EP, CPU_EP]),
    ([CUDA_EP, CPU_EP], [CUDA_EP, CPU_EP]),
    (["AzureExecutionProvider", CPU_EP], [CPU_EP]),
])
def test_default_provider_order(monkeypatch: pytest.MonkeyPatch, tiny_onnx: Path,
                                offered: list[str], expected: list[str]) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: offered)
    assert OnnxRuntimeRunner(tiny_onnx).providers == expected


def test_provider_options_put_the_trt_cache_beside_the_model(monkeypatch: pytest.MonkeyPatch,
                                                             tiny_onnx: Path) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: [TENSORRT_EP, CUDA_EP, CPU_EP])
    entries = dict(OnnxRuntimeRunner(tiny_onnx, device_id=1).provider_entries())
    trt = entries[TENSORRT_EP]
    # no engine cache: ONNX Runtime would load any engine file found there unchecked
    assert trt["trt_fp16_enable"] is True and trt["trt_engine_cache_enable"] is False
    assert "trt_engine_cache_path" not in trt
    assert Path(trt["trt_timing_cache_path"]) == tiny_onnx.parent / "tiny.ort_trt_cache"
    assert trt["device_id"] == 1 and entries[CUDA_EP] == {"device_id": 1}
    assert entries[CPU_EP] == {}


def test_trt_cache_is_dropped_when_it_cannot_be_created(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    model = tmp_path / "m.onnx"
    trt_cache_dir(model).write_text("a file where the cache folder should go")
    entries = [(TENSORRT_EP, {"trt_engine_cache_enable": False,
                              "trt_timing_cache_enable": True, "trt_fp16_enable": True,
                              "trt_timing_cache_path": str(trt_cache_dir(model))})]
    with caplog.at_level(logging.WARNING):
        (name, options), = _prepare_trt_cache(entries)
    assert options == {"trt_fp16_enable": True}
    assert "timed again" in caplog.text


def test_a_bundles_timing_cache_stays_out_of_the_signed_folder(
        monkeypatch: pytest.MonkeyPatch, tiny_onnx: Path, tmp_path: Path) -> None:
    from edge_runtime.runners.base import ModelBytes

    monkeypatch.setattr(ort, "get_available_providers", lambda: [TENSORRT_EP, CPU_EP])
    monkeypatch.setenv("ROADSHIELD_ENGINE_CACHE", str(tmp_path / "engines"))
    model = ModelBytes(tmp_path / "bundle" / "model.onnx", tiny_onnx.read_bytes(), "test")
    trt = dict(OnnxRuntimeRunner(model).provider_entries())[TENSORRT_EP]
    where = Path(trt["trt_timing_cache_path"])
    assert where.parent == tmp_path / "engines" / "ort-timing"
    assert where.name == f"{model.sha256[:16]}.ort_trt_cache"


def test_provider_aliases_and_unavailable_requests() -> None:
    assert select_providers(["cpu"], [CPU_EP]) == [CPU_EP]
    assert select_providers(["trt", "cuda", "CPUExecutionProvider"],
                            [TENSORRT_EP, CUDA_EP, CPU_EP]) == [TENSORRT_EP, CUDA_EP, CPU_EP]
    with pytest.raises(BackendUnavailableError, match="'cuda'.*not in this onnxruntime build"):
        select_providers(["cuda"], [CPU_EP])
    with pytest.raises(ConfigError):
        select_providers([], [CPU_EP])


def test_session_name_and_log_say_which_provider_runs(tiny_onnx: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    runner = OnnxRuntimeRunner(tiny_onnx, intra_op_threads=1)
    with caplog.at_level(logging.INFO), runner:
        assert runner.name == "onnxruntime:CPUExecutionProvider"
    assert "uses ['CPUExecutionProvider']" in caplog.text


def test_provider_fallback_is_logged(monkeypatch: pytest.MonkeyPatch, tiny_onnx: Path,
                                     tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The build is CPU-only: claiming CUDA makes onnxruntime itself fall back to the CPU.
    model = tmp_path / "copy.onnx"
    model.write_bytes(tiny_onnx.read_bytes())
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA_EP, CPU_EP])
    runner = OnnxRuntimeRunner(model)
    with pytest.warns(UserWarning), caplog.at_level(logging.INFO), runner:
        assert runner.name == "onnxruntime:CPUExecutionProvider"
        assert runner.infer({"input": _batch(1)})["logits"].shape == (1, 5)
    assert "fell back to CPUExecutionProvider" in caplog.text


def test_corrupt_onnx_is_a_model_load_error(tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    runner = OnnxRuntimeRunner(bad)
    with pytest.raises(ModelLoadError, match="corrupt.onnx") as info:
        runner.activate()
    assert "roadshield distill export" in info.value.hint
    assert not runner.is_active


def test_missing_onnx_and_missing_onnxruntime(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path, tiny_onnx: Path) -> None:
    with pytest.raises(ModelLoadError, match="nope.onnx"):
        OnnxRuntimeRunner(tmp_path / "nope.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(BackendUnavailableError) as info:
        OnnxRuntimeRunner(tiny_onnx)
    assert "pip install onnxruntime" in info.value.hint and "Jetson" in info.value.hint


# --- torch ---------------------------------------------------------------------------------

def test_resolve_device() -> None:
    assert resolve_device("auto", cuda_available=False) == "cpu"
    assert resolve_device("auto", cuda_available=True) == "cuda"
    assert resolve_device("cuda:1", cuda_available=True) == "cuda:1"
    with pytest.raises(BackendUnavailableError, match="CUDA is not available"):
        resolve_device("cuda", cuda_available=False)
    with pytest.raises(ConfigError, match="tpu"):
        resolve_device("tpu", cuda_available=True)


def test_torch_runner_rejects_bad_models(tmp_path: Path, tiny_onnx: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelLoadError, match="not a .pt2"):
        TorchRunner(tiny_onnx)
    bad = tmp_path / "corrupt.pt2"
    bad.write_bytes(b"not a zip archive")
    with pytest.raises(ModelLoadError, match="corrupt.pt2"):
        TorchRunner(bad, device="cpu").activate()
    with pytest.raises(ConfigError):
        TorchRunner(42)  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(BackendUnavailableError, match="torch is not installed"):
        TorchRunner(bad)


def test_static_batch_program_runs_sample_by_sample(tiny_model: object,
                                                    tmp_path: Path) -> None:
    program = torch.export.export(tiny_model, (torch.rand(1, 3, 16, 16),))
    path = tmp_path / "static.pt2"
    torch.export.save(program, str(path))
    x = _batch(5, seed=7)
    with TorchRunner(path, device="cpu") as static, TorchRunner(tiny_model, device="cpu") as ref:
        np.testing.assert_allclose(static.infer({"input": x})["logits"],
                                   ref.infer({"input": x})["logits"], atol=1e-5, rtol=0)


@pytest.mark.gpu
def test_torch_cuda_matches_cpu(device: str, tiny_pt2: Path) -> None:
    x = _batch(5, seed=11)
    with TorchRunner(tiny_pt2, device=device) as gpu, TorchRunner(tiny_pt2, device="cpu") as cpu:
        assert gpu.name == "torch:cuda"
        np.testing.assert_allclose(gpu.infer({"input": x})["logits"],
                                   cpu.infer({"input": x})["logits"], atol=1e-4, rtol=0)


# --- registry ------------------------------------------------------------------------------

def test_unknown_backend_lists_the_known_ones(tiny_onnx: Path) -> None:
    with pytest.raises(ConfigError, match="unknown backend 'tensorflow'") as info:
        create_runner("tensorflow", tiny_onnx)
    for name in ("auto", "onnxruntime", "torch"):
        assert name in info.value.hint


def test_auto_picks_onnxruntime_cpu_on_a_cpu_machine(tiny_onnx: Path, tiny_pt2: Path,
                                                     caplog: pytest.LogCaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # a CPU-only machine, also where a GPU answers (auto rightly prefers that one there)
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU_EP])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with caplog.at_level(logging.INFO, logger="edge_runtime.runners.registry"):
        runner = create_runner("auto", tiny_onnx)
    assert isinstance(runner, OnnxRuntimeRunner) and runner.providers == [CPU_EP]
    assert "auto backend for tiny.onnx: onnxruntime (CPUExecutionProvider only" in caplog.text
    assert isinstance(create_runner("auto", tiny_pt2), TorchRunner)
    assert registry.available_runners() == ["onnxruntime", "torch"]  # CPU ORT (20) > CPU torch


def test_auto_prefers_a_gpu_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA_EP, CPU_EP])
    name, avail = registry.pick_runner("model.onnx")
    assert name == "onnxruntime" and avail.priority == registry.PRIORITY_ORT_GPU


def test_auto_takes_the_highest_priority_backend(monkeypatch: pytest.MonkeyPatch,
                                                 tiny_onnx: Path) -> None:
    def better(path: Path, **kw: object) -> BaseRunner:
        return OnnxRuntimeRunner(path, intra_op_threads=1)

    monkeypatch.setattr(registry, "_RUNNERS", dict(registry._RUNNERS))
    registry.register_runner("better", better, suffixes=(".onnx",),
                             probe=lambda: registry.Availability(True, 99, "test"))
    registry.register_runner("broken", better, suffixes=(".onnx",),
                             probe=lambda: registry.Availability(False, 200, "not here"))
    assert registry.pick_runner(tiny_onnx)[0] == "better"
    assert create_runner("auto", tiny_onnx).intra_op_threads == 1
    assert "broken" in registry.list_runners() and "broken" not in registry.available_runners()


def test_registry_rejects_files_a_backend_cannot_load(tiny_onnx: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="use backend 'onnxruntime'"):
        create_runner("torch", tiny_onnx)
    with pytest.raises(ConfigError, match="no backend loads .h5"):
        create_runner("auto", tmp_path / "model.h5")
    with pytest.raises(ConfigError, match="needs a model file"):
        create_runner("auto", object())
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(BackendUnavailableError, match="onnxruntime is not installed"):
        create_runner("auto", tiny_onnx)


def test_edge_runtime_imports_without_torch() -> None:
    code = ("import sys; sys.modules['torch'] = None\n"
            "import edge_runtime.runners.registry as r, edge_runtime.preprocess, "
            "edge_runtime.model_info\n"
            "print(r.available_runners())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['onnxruntime']"
