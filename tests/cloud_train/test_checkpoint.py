"""Checkpoints: bit-exact round trip, sha256 addressing, and every way a file can be wrong."""

from __future__ import annotations

import copy
import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
import toy_data
from safetensors.torch import save_file

from cloud_train.checkpoint import load_checkpoint, save_checkpoint
from cloud_train.train import TrainConfig
from roadshield_base.errors import ConfigError, ModelLoadError
from roadshield_base.fileio import file_sha256

NAMES = ["stop", "yield", "no_entry", "priority_road", "speed_limit_30"]


def used_model(arch: str = "signnet", size: int = 32) -> torch.nn.Module:
    return toy_data.used_model(arch, NAMES, size)


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    return used_model()


@pytest.fixture
def saved(teacher: torch.nn.Module, tmp_path: Path) -> tuple[torch.nn.Module, Path, str]:
    model = copy.deepcopy(teacher)
    path = tmp_path / "ckpt" / "model.safetensors"
    digest = save_checkpoint(model, path, {"class_names": NAMES,
                                           "train_config": TrainConfig(trainer="fast_at"),
                                           "dataset_sha256": "ab" * 32})
    return model, path, digest


def test_round_trip_is_bit_exact(saved) -> None:
    model, path, digest = saved
    loaded, meta = load_checkpoint(path, expected_sha256=digest)
    assert not loaded.training
    ref, got = model.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    x = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert meta["arch"] == "signnet" and meta["num_classes"] == len(NAMES)
    assert meta["class_names"] == NAMES and meta["input_size"] == (3, 32, 32)
    assert TrainConfig.from_dict(meta["train_config"]) == TrainConfig(trainer="fast_at")
    assert meta["dataset_sha256"] == "ab" * 32 and meta["created"].endswith("+00:00")
    assert meta["sha256"] == digest


def test_48_pixel_student_round_trips(tmp_path: Path) -> None:
    model = used_model("signnet_tiny", 48)
    digest = save_checkpoint(model, tmp_path / "s.safetensors", {"class_names": NAMES})
    loaded, meta = load_checkpoint(tmp_path / "s.safetensors", digest)
    assert meta["input_size"] == (3, 48, 48) and loaded.input_size == (3, 48, 48)
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_returned_digest_is_the_file_sha256_and_no_temp_file_is_left(saved) -> None:
    _, path, digest = saved
    assert digest == file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_file_is_plain_safetensors_not_pickle(saved) -> None:
    _, path, _ = saved
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    assert header["__metadata__"]["arch"] == "signnet"
    assert json.loads(header["__metadata__"]["class_names"]) == NAMES
    assert not data.startswith(b"\x80") and b"PK\x03\x04" not in data[:4]


def test_sha256_mismatch(saved) -> None:
    _, path, digest = saved
    wrong = ("0" if digest[0] != "0" else "1") + digest[1:]
    with pytest.raises(ModelLoadError) as info:
        load_checkpoint(path, expected_sha256=wrong)
    assert str(path) in str(info.value) and "sha256" in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "header", "tail"])
def test_corrupt_files(saved, damage: str) -> None:
    _, path, _ = saved
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytearray(b"not a checkpoint at all")
    elif damage == "header":
        data[12:20] = b"\xff" * 8  # inside the JSON header
    else:
        data = data[:-3]  # weights cut short: the header no longer matches the data
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def _rewrite_metadata(path: Path, **changes: str) -> None:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(changes)
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("changes", [
    {"arch": "signnet_tiny"},  # weights of signnet, recorded as the student
    {"num_classes": "7", "class_names": json.dumps(NAMES + ["a", "b"])},  # head too small
    {"arch": "vgg99"},  # unknown architecture
    {"class_names": json.dumps(NAMES[:3])},  # names do not match the outputs
    {"format": "something-else/1"},
    {"num_classes": "five"},  # not JSON
    {"input_size": "[3, 32]"},  # wrong shape
    {"model_kwargs": json.dumps({"input_size": 32, "width": 2})},  # the factory refuses it
])
def test_weights_that_do_not_fit_the_recorded_model(saved, changes) -> None:
    _, path, _ = saved
    _rewrite_metadata(path, **changes)
    with pytest.raises(ModelLoadError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_save_validates_class_names(tmp_path: Path) -> None:
    model = used_model("signnet_tiny")
    with pytest.raises(ConfigError):
        save_checkpoint(model, tmp_path / "a.safetensors", {"class_names": NAMES[:2]})
    with pytest.raises(ConfigError):
        save_checkpoint(model, tmp_path / "a.safetensors", {})
    with pytest.raises(ConfigError):
        save_checkpoint(model, tmp_path / "a.safetensors",
                        {"class_names": NAMES, "arch": "signnet"})
    assert not list(tmp_path.iterdir())


def test_saving_again_replaces_the_file_atomically(saved) -> None:
    model, path, digest = saved
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    new = save_checkpoint(model, path, {"class_names": NAMES})
    assert new != digest and file_sha256(path) == new
    assert [p.name for p in path.parent.iterdir()] == [path.name]
