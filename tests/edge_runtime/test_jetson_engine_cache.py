"""Engines built on the device and cached per TensorRT version and GPU: the layout, the
index the device writes, and the TensorRT runner loading a verified bundle's model only as
an engine that index lists, with bytes matching the recorded digest (the bytes hashed are
the bytes deserialized). The runtime is test_tensorrt_runner's fake TensorRT 10 module on
the emulated CUDA launcher; the build is a fake builder here, and the real
``distill.engine.build_engine`` on test_engine's fake TensorRT builder in the
prepare-engine tests."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import stat
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from test_tensorrt_runner import ENGINE_BYTES, GPU, PROFILE, TRT_VERSION, FakeTRT

import edge_runtime.engine_cache as engine_cache
from edge_runtime.engine_cache import (
    DEFAULT_ROOT,
    INDEX_FILE,
    EngineCache,
    EngineKey,
    gpu_slug,
)
from edge_runtime.runners.base import ModelBytes
from edge_runtime.runners.engine_meta import EngineInfo
from edge_runtime.runners.registry import create_runner
from edge_runtime.runners.tensorrt_runner import TensorRTRunner
from kernels.emulator import EmulatedLauncher
from roadshield_base.errors import ConfigError, ModelLoadError
from roadshield_base.trust import TrustError

TESTS = Path(__file__).resolve().parents[1]
ONNX = b"signed onnx bytes of the sign classifier"
CLASSES = '["a", "b", "c", "d", "e"]'


class FakeBuilder:
    """Builds ENGINE_BYTES from whatever ONNX file it is handed, recording the calls."""

    def __init__(self, version: str = TRT_VERSION, tamper: bool = False) -> None:
        self.calls: list[dict[str, Any]] = []
        self.version = version
        self.tamper = tamper  # change the staged ONNX before "parsing" it

    def __call__(self, onnx_path: Path, engine_path: Path, *, gpu: tuple[str, tuple[int, int]],
                 timing_cache: Path, **options: Any) -> EngineInfo:
        if self.tamper:
            onnx_path.write_bytes(b"other bytes")
        data = onnx_path.read_bytes()
        self.calls.append({"onnx": data, "gpu": gpu, "timing_cache": timing_cache, **options})
        engine_path.write_bytes(ENGINE_BYTES)
        return EngineInfo(
            tensorrt_version=self.version, gpu_name=gpu[0],
            compute_capability=f"{gpu[1][0]}.{gpu[1][1]}",
            engine_sha256=hashlib.sha256(ENGINE_BYTES).hexdigest(),
            onnx_sha256=hashlib.sha256(data).hexdigest(), precision="fp16",
            workspace_bytes=1 << 30, input_name="input", output_name="logits",
            profiles={"input": [list(p) for p in PROFILE]},
            model_metadata={"class_names": CLASSES, "input_size": "16", "arch": "tiny_cnn"})


@pytest.fixture
def model() -> ModelBytes:
    return ModelBytes(Path("/var/lib/roadshield/bundle/model.onnx"), ONNX,
                      origin="bundle /var/lib/roadshield/bundle (key 2c1455ac)")


@pytest.fixture
def key(model: ModelBytes) -> EngineKey:
    return EngineKey(TRT_VERSION, GPU, (8, 7), model.sha256)


@pytest.fixture
def cache(tmp_path: Path) -> EngineCache:
    return EngineCache(tmp_path / "engines")


@pytest.fixture
def built(cache: EngineCache, model: ModelBytes, key: EngineKey) -> Path:
    cache.build(model, key, FakeBuilder(), max_batch=8)
    return cache.engine_path(key)


@pytest.fixture
def dev() -> EmulatedLauncher:
    return EmulatedLauncher(GPU, (8, 7))


@pytest.fixture
def trt(monkeypatch: pytest.MonkeyPatch, dev: EmulatedLauncher) -> FakeTRT:
    fake = FakeTRT(dev)
    monkeypatch.setitem(sys.modules, "tensorrt", fake.module)
    return fake


def _deserialized(trt: FakeTRT) -> list[bytes]:
    return [entry[1] for entry in trt.log if entry[0] == "deserialize_cuda_engine"]


# --- the cache ------------------------------------------------------------------------------

def test_keys_name_the_tensorrt_version_the_gpu_and_the_signed_model(key: EngineKey) -> None:
    assert gpu_slug("Orin (nvgpu)") == "orin-nvgpu" and gpu_slug("???") == "gpu"
    assert key.relpath == f"10.3.0.30/orin-emulated-sm87/{key.model_sha256}.engine"
    with pytest.raises(ConfigError, match="not a sha256"):
        EngineKey(TRT_VERSION, GPU, (8, 7), "A" * 64)
    with pytest.raises(ConfigError, match="cannot name a cache folder"):
        EngineKey("../10.3", GPU, (8, 7), key.model_sha256)
    assert EngineCache.from_env({}).root == DEFAULT_ROOT
    assert EngineCache.from_env({"ROADSHIELD_ENGINE_CACHE": "/srv/e"}).root == Path("/srv/e")


def test_the_first_start_builds_and_indexes_the_second_finds_it(
        cache: EngineCache, model: ModelBytes, key: EngineKey) -> None:
    builder = FakeBuilder()
    data, info, was_built = cache.ensure(model, key, builder, precision="auto", max_batch=8)
    assert was_built and data == ENGINE_BYTES and len(builder.calls) == 1
    call = builder.calls[0]
    assert call["onnx"] == ONNX and call["gpu"] == (GPU, (8, 7))
    assert call["timing_cache"] == cache.root / key.folder / "timing.cache"
    assert (call["precision"], call["max_batch"]) == ("auto", 8)
    path = cache.engine_path(key)
    assert path.read_bytes() == ENGINE_BYTES
    index = json.loads((cache.root / INDEX_FILE).read_text())
    entry = index["engines"][key.relpath]
    assert entry["onnx_sha256"] == model.sha256 == hashlib.sha256(ONNX).hexdigest()
    assert entry["engine_sha256"] == hashlib.sha256(ENGINE_BYTES).hexdigest()
    assert entry["origin"] == model.origin and entry["tensorrt_version"] == TRT_VERSION
    # private to the service: the index and engine 0600, the cache root 0700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((cache.root / INDEX_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE(cache.root.stat().st_mode) == 0o700
    assert not list((cache.root / ".staging").iterdir())  # the staged copy is gone
    again, _, was_built = cache.ensure(model, key, builder)
    assert not was_built and again == ENGINE_BYTES and len(builder.calls) == 1


def test_another_tensorrt_version_or_gpu_gets_its_own_engine(
        cache: EngineCache, model: ModelBytes, key: EngineKey, built: Path) -> None:
    other = EngineKey("10.7.0.23", GPU, (8, 7), model.sha256)
    with pytest.raises(ModelLoadError, match="no engine .* TensorRT 10.7.0.23") as err:
        cache.load(other)
    assert "roadshield-prepare-engine" in err.value.hint
    with pytest.raises(ModelLoadError, match=r"sm 9\.0"):
        cache.load(EngineKey(TRT_VERSION, "H200", (9, 0), model.sha256))
    cache.build(model, other, FakeBuilder(version="10.7.0.23"))
    assert sorted(cache.entries()) == sorted([key.relpath, other.relpath])


def test_an_engine_built_from_other_bytes_than_the_signed_model_is_refused(
        cache: EngineCache, model: ModelBytes, key: EngineKey) -> None:
    with pytest.raises(TrustError, match="not the signed model"):
        cache.build(model, key, FakeBuilder(tamper=True))
    assert cache.entries() == {} and not cache.engine_path(key).exists()
    with pytest.raises(ModelLoadError, match="runtime has TensorRT"):
        cache.build(model, key, FakeBuilder(version="10.7.0.23"))
    assert cache.entries() == {}


# --- the runner loads only what the index lists ---------------------------------------------

def test_the_runner_runs_a_bundle_model_as_the_engine_the_device_built(
        trt: FakeTRT, dev: EmulatedLauncher, cache: EngineCache, model: ModelBytes,
        key: EngineKey, built: Path) -> None:
    runner = create_runner("tensorrt", model, engine_cache=cache, launcher=dev)
    assert isinstance(runner, TensorRTRunner)
    with runner:
        assert _deserialized(trt) == [ENGINE_BYTES]
        assert runner.engine_path == built
        info = runner.model_info
        assert info.class_names == ("a", "b", "c", "d", "e") and info.input_size == 16
        x = np.random.default_rng(0).random((2, 3, 16, 16), dtype=np.float32)
        assert runner.infer({"input": x})["logits"].shape == (2, 5)
    with pytest.raises(ConfigError, match="cannot load a model from memory"):
        create_runner("torch", model)


def test_an_engine_the_device_did_not_index_is_never_deserialized(
        trt: FakeTRT, dev: EmulatedLauncher, cache: EngineCache, model: ModelBytes,
        key: EngineKey) -> None:
    planted = cache.engine_path(key)  # the right name, the right bytes, but no index entry
    planted.parent.mkdir(mode=0o700, parents=True)
    planted.write_bytes(ENGINE_BYTES)
    with pytest.raises(ModelLoadError, match="no engine .* built on this device"):
        TensorRTRunner(model, engine_cache=cache, launcher=dev).activate()
    assert _deserialized(trt) == []


def test_an_engine_altered_after_the_build_is_refused(
        trt: FakeTRT, dev: EmulatedLauncher, cache: EngineCache, model: ModelBytes,
        key: EngineKey, built: Path) -> None:
    built.write_bytes(ENGINE_BYTES + b"\x00")
    with pytest.raises(TrustError, match="altered|device built"):
        TensorRTRunner(model, engine_cache=cache, launcher=dev).activate()
    assert _deserialized(trt) == []


def test_the_bytes_hashed_are_the_bytes_deserialized(
        trt: FakeTRT, dev: EmulatedLauncher, cache: EngineCache, model: ModelBytes,
        key: EngineKey, built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    read = EngineCache._read_private

    def read_then_swap(self: EngineCache, path: Path, what: str) -> bytes | None:
        data = read(self, path, what)
        if path == built:  # the file changes right after the check read it
            path.write_bytes(b"swapped in after the check")
        return data

    monkeypatch.setattr(EngineCache, "_read_private", read_then_swap)
    with TensorRTRunner(model, engine_cache=cache, launcher=dev):
        pass
    assert _deserialized(trt) == [ENGINE_BYTES]


def test_an_index_entry_for_another_model_is_refused(
        cache: EngineCache, model: ModelBytes, key: EngineKey, built: Path) -> None:
    index = cache.root / INDEX_FILE
    doc = json.loads(index.read_text())
    doc["engines"][key.relpath]["onnx_sha256"] = "1" * 64
    index.write_text(json.dumps(doc))
    with pytest.raises(TrustError, match="built from model 111111111111"):
        cache.load(key)


@pytest.mark.parametrize("text, message", [
    ("{", "is not JSON"),
    ('{"format": "other/1", "engines": {}}', "is not a roadshield-engine-cache/1 index"),
    ('{"format": "roadshield-engine-cache/1", "engines": {"x.engine": 1}}', "is not a"),
])
def test_a_malformed_index_is_refused(cache: EngineCache, key: EngineKey, built: Path,
                                      text: str, message: str) -> None:
    (cache.root / INDEX_FILE).write_text(text)
    with pytest.raises(ModelLoadError, match=message):
        cache.load(key)


def test_a_cache_someone_else_can_write_is_refused(
        cache: EngineCache, model: ModelBytes, key: EngineKey, built: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    index = cache.root / INDEX_FILE
    index.chmod(0o620)
    with pytest.raises(TrustError, match="writable by group or others"):
        cache.load(key)
    index.chmod(0o600)
    cache.root.chmod(0o777)
    with pytest.raises(TrustError, match="engine cache folder .* writable"):
        cache.load(key)
    cache.root.chmod(0o700)
    owner = built.stat().st_uid
    monkeypatch.setattr(engine_cache, "_trusted_uids", lambda: {owner + 1})
    with pytest.raises(TrustError, match=f"belongs to uid {owner}"):
        cache.load(key)


def test_a_symlinked_engine_is_refused(cache: EngineCache, model: ModelBytes, key: EngineKey,
                                       built: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.engine"
    elsewhere.write_bytes(ENGINE_BYTES)
    built.unlink()
    built.symlink_to(elsewhere)
    with pytest.raises(TrustError, match="symlink"):
        cache.load(key)


def test_bad_runner_settings_are_refused(trt: FakeTRT, cache: EngineCache, model: ModelBytes,
                                         tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="verify=False"):
        TensorRTRunner(model, engine_cache=cache, verify=False)
    engine = tmp_path / "x.engine"
    engine.write_bytes(ENGINE_BYTES)
    with pytest.raises(ConfigError, match="engine_cache applies"):
        TensorRTRunner(engine, engine_cache=cache)
    assert TensorRTRunner(model)._cache.root == EngineCache.from_env().root  # type: ignore[union-attr]


# --- the prepare-engine helper (the unit's ExecStartPre) ------------------------------------

def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def prepare_engine() -> ModuleType:
    return _load(TESTS.parent / "scripts" / "jetson" / "prepare_engine.py",
                 "roadshield_prepare_engine")


@pytest.fixture(scope="module")
def signed(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from distill.bundle import generate_bundle_keys, write_bundle

    folder = tmp_path_factory.mktemp("signed")
    private, public = generate_bundle_keys(folder / "keys")
    write_bundle(folder / "bundle", tiny_onnx, key=private)
    return folder / "bundle", public


@pytest.fixture
def builder_trt(monkeypatch: pytest.MonkeyPatch) -> Any:
    """test_engine's fake TensorRT builder, with the timing-cache calls a build makes."""
    fake = _load(TESTS / "distill" / "test_engine.py", "distill_engine_fakes").FakeBuilderTRT()
    config_cls = type(fake.module.Builder.create_builder_config(None))

    class Cache:
        def serialize(self) -> bytes:
            return b"timing cache"

    config_cls.create_timing_cache = lambda self, data: Cache()
    config_cls.set_timing_cache = lambda self, cache, ignore_mismatch: True
    config_cls.get_timing_cache = lambda self: Cache()
    monkeypatch.setitem(sys.modules, "tensorrt", fake.module)
    monkeypatch.setattr("distill.engine.detect_gpu", lambda launcher=None: ("Orin", (8, 7)))
    fake.log.clear()
    return fake


def test_prepare_engine_verifies_the_bundle_then_builds_once_from_the_signed_bytes(
        prepare_engine: ModuleType, signed: tuple[Path, Path], builder_trt: Any,
        tiny_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    bundle, public = signed
    monkeypatch.setenv("ROADSHIELD_BUNDLE", str(bundle))
    monkeypatch.setenv("ROADSHIELD_TRUST_KEY", str(public))
    monkeypatch.setenv("ROADSHIELD_ENGINE_CACHE", str(tmp_path / "engines"))
    assert prepare_engine.main(["--max-batch", "4"]) == 0
    assert capsys.readouterr().out.startswith("built ")
    signed_sha = hashlib.sha256(tiny_onnx.read_bytes()).hexdigest()
    parsed = [entry[1] for entry in builder_trt.log if entry[0] == "parse"]
    assert parsed == [signed_sha]  # TensorRT parsed exactly the signed model's bytes
    cache = EngineCache(tmp_path / "engines")
    key = EngineKey(builder_trt.module.__version__, "Orin", (8, 7), signed_sha)
    data, info = cache.load(key)
    assert hashlib.sha256(data).hexdigest() == info.engine_sha256
    assert info.profiles["input"][2][0] == 4 and info.onnx_sha256 == signed_sha
    assert prepare_engine.main([]) == 0  # the second start builds nothing
    assert capsys.readouterr().out.startswith("found ")
    assert [e[0] for e in builder_trt.log].count("build_serialized_network") == 1


def test_prepare_engine_refuses_an_altered_bundle_and_builds_nothing(
        prepare_engine: ModuleType, signed: tuple[Path, Path], builder_trt: Any,
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    bundle, public = signed
    altered = Path(shutil.copytree(bundle, tmp_path / "altered"))
    (altered / "model.onnx").write_bytes((altered / "model.onnx").read_bytes() + b"\0")
    code = prepare_engine.main(["--bundle", str(altered), "--trust-key", str(public),
                                "--cache", str(tmp_path / "engines")])
    assert code == 2 and "altered after signing" in capsys.readouterr().err
    assert builder_trt.log == [] and not (tmp_path / "engines").exists()
    # another backend needs no engine at all
    assert prepare_engine.main(["--backend", "onnxruntime"]) == 0
    assert "no TensorRT engine" in capsys.readouterr().out
