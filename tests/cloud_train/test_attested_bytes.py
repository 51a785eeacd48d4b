"""Attested training trains on the bytes it verified: a shard swapped on disk between the
verification and the decoding (a time-of-check / time-of-use race) is never read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import cloud_train.attest.stages as stages
import cloud_train.attest.verify as verify
from cloud_train import pipeline
from cloud_train.attest.policy import load_stage_key, make_stage_keys
from cloud_train.attest.stages import run_pipeline
from cloud_train.attest.tamper import flip_labels_in_shard
from cloud_train.attest.verify import VerifyError, require_verified
from cloud_train.ingest.export import sign_folder_as_export
from cloud_train.render import render_dataset
from roadshield_base.errors import DatasetError

SIZE = 32  # run_pipeline's default decode size


@pytest.fixture(scope="module")
def attested(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("attested_bytes")
    render_dataset(root / "raw", train_per_class=2, test_per_class=0, progress=False)
    make_stage_keys(root / "keys")
    sign_folder_as_export(root / "raw", load_stage_key(root / "keys", "gate"))
    run_pipeline(root / "raw", root / "pipe", root / "keys", n_shards=2, progress=False)
    return root / "pipe", root / "keys"


@pytest.fixture
def pipe(attested: tuple[Path, Path], tmp_path: Path) -> Path:
    """A private copy of the pipeline folder, for a test that swaps files in it."""
    import shutil

    shutil.copytree(attested[0], tmp_path / "pipe")
    return tmp_path / "pipe"


def _swap_after_verification(monkeypatch: pytest.MonkeyPatch, pipe: Path) -> list[Path]:
    """Make the verification pass on the genuine files, then swap shard 0 for one with
    flipped labels (well-formed, so decoding it would succeed); returns the paths read
    from disk after the swap."""
    real = verify.verify_pipeline
    read_after: list[Path] = []

    def verify_then_swap(*args: Any, **kwargs: Any) -> verify.VerifyReport:
        report = real(*args, **kwargs)
        assert report.ok, report.text()
        flip_labels_in_shard(pipe)
        real_read = Path.read_bytes

        def recording_read(self: Path) -> bytes:
            read_after.append(self)
            return real_read(self)

        monkeypatch.setattr(Path, "read_bytes", recording_read)
        return report

    monkeypatch.setattr(verify, "verify_pipeline", verify_then_swap)
    return read_after


def test_training_data_comes_from_the_verified_bytes(attested: tuple[Path, Path], pipe: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    keys = attested[1]
    genuine = stages.load_training_data(pipe)
    read_after = _swap_after_verification(monkeypatch, pipe)
    images, labels, class_names, report = pipeline._training_data(pipe, SIZE, keys)
    reads = list(read_after)
    swapped = stages.load_training_data(pipe)  # what a second read would have given
    assert not np.array_equal(swapped["labels"], genuine["labels"])
    np.testing.assert_array_equal(labels, genuine["labels"])
    np.testing.assert_array_equal(images, genuine["images"])
    assert class_names == genuine["class_names"] and report.ok
    # nothing of the pipeline folder was read again between the check and the use
    assert not [p for p in reads if pipe in p.parents]
    # the swapped file no longer verifies: the next run refuses it
    monkeypatch.undo()
    with pytest.raises(VerifyError, match="hash"):
        require_verified(pipe, keys)


def test_the_second_read_is_gone_from_the_training_gate(attested: tuple[Path, Path],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def second_read(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("training re-read the pipeline folder after verifying it")

    monkeypatch.setattr(stages, "load_training_data", second_read)
    pipe, keys = attested
    images, labels, class_names, report = pipeline._training_data(pipe, SIZE, keys)
    assert images.shape[1:] == (SIZE, SIZE, 3) and len(labels) == report.images
    assert set(report.files) >= {"shard/classes.json", "shard/stats.json"}
    assert "files" not in report.to_dict()  # the bytes stay out of the JSON report


def test_decoding_needs_the_shard_files(attested: tuple[Path, Path]) -> None:
    from cloud_train.attest.stages import training_data_from_bytes
    from cloud_train.attest.verify import verified_training_data

    data, report = verified_training_data(*attested)
    again = training_data_from_bytes(report.files)
    np.testing.assert_array_equal(again["labels"], data["labels"])
    with pytest.raises(DatasetError, match="no shards"):
        training_data_from_bytes({})
    without_stats = {k: v for k, v in report.files.items() if k != "shard/stats.json"}
    with pytest.raises(DatasetError, match="stats.json"):
        training_data_from_bytes(without_stats)
