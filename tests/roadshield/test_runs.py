"""Run folders publish atomically: runs/latest only ever names a complete run."""

from __future__ import annotations

import json
import os

import pytest

from roadshield.runs import staged_run
from roadshield_base.errors import ConfigError
from roadshield_base.fileio import atomic_write_json


def test_successful_run_is_published_and_latest_points_at_it(tmp_path):
    with staged_run(tmp_path, "r1") as run:
        assert run.name == ".r1.partial"
        (run / "x.txt").write_text("1")
    assert (tmp_path / "r1" / "x.txt").read_text() == "1"
    assert os.readlink(tmp_path / "latest") == "r1"
    with staged_run(tmp_path, "r2") as run:
        (run / "x.txt").write_text("2")
    assert (tmp_path / "latest" / "x.txt").read_text() == "2"


def test_failed_run_keeps_latest_and_is_kept_for_inspection(tmp_path):
    with staged_run(tmp_path, "good") as run:
        (run / "x.txt").write_text("good")
    with pytest.raises(RuntimeError), staged_run(tmp_path, "bad") as run:
        (run / "x.txt").write_text("half")
        raise RuntimeError("crash in the middle")
    assert os.readlink(tmp_path / "latest") == "good"
    assert not (tmp_path / "bad").exists()
    assert (tmp_path / ".bad.failed" / "x.txt").read_text() == "half"


def test_existing_run_id_is_refused(tmp_path):
    (tmp_path / "same").mkdir()
    with pytest.raises(ConfigError, match="already exists"), staged_run(tmp_path, "same"):
        pass


def test_atomic_write_json_leaves_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"b": 1})
    assert json.loads((tmp_path / "a.json").read_text()) == {"b": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_writes_get_ordinary_permissions_unless_asked(tmp_path):
    from roadshield_base.fileio import atomic_write_bytes

    umask = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "plain", b"x")
        atomic_write_bytes(tmp_path / "secret", b"k", mode=0o600)
    finally:
        os.umask(umask)
    assert (tmp_path / "plain").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "secret").stat().st_mode & 0o777 == 0o600
