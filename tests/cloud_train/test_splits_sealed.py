"""Sealed held-out set: encryption at rest, one opening per model, a signed hash-chained log."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from cloud_train.splits.sealed import (
    SealedSetError,
    generate_key,
    load_key,
    log_head,
    open_sealed,
    seal,
    verify_log,
)
from roadshield_base.errors import ConfigError
from roadshield_base.trust import TrustError, generate_private_key

MODEL_A = "a" * 64
MODEL_B = "b" * 64


@pytest.fixture()
def sealed(tmp_path: Path) -> dict:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, 12)
    key_path = generate_key(tmp_path / "held_out.key")
    key = load_key(key_path)
    signer = generate_private_key()
    out = seal(tmp_path / "sealed", images, labels, [f"s{i}" for i in range(12)], key,
               {"split_manifest_sha256": "c" * 64}, log_signer=signer,
               log=tmp_path / "openings.jsonl")
    return {"dir": out, "key": key, "key_path": key_path, "images": images, "labels": labels,
            "log": tmp_path / "openings.jsonl", "signer": signer}


def test_key_file_is_private_and_never_overwritten(sealed: dict) -> None:
    assert stat.S_IMODE(os.stat(sealed["key_path"]).st_mode) == 0o600
    with pytest.raises(ConfigError):
        generate_key(sealed["key_path"])
    os.chmod(sealed["key_path"], 0o644)
    with pytest.raises(ConfigError):
        load_key(sealed["key_path"])


def test_plaintext_is_not_stored(sealed: dict) -> None:
    blob = (sealed["dir"] / "sealed.bin").read_bytes()
    assert sealed["images"][0].tobytes()[:64] not in blob
    assert b"images" not in blob  # npz member names would show in a plain zip


def test_open_once_then_refused_then_forced(sealed: dict) -> None:
    s = sealed
    data = open_sealed(s["dir"], s["key"], MODEL_A, s["log"], s["signer"])
    assert np.array_equal(data.images, s["images"]) and np.array_equal(data.labels, s["labels"])
    assert data.ids[3] == "s3" and data.manifest["split_manifest_sha256"] == "c" * 64
    with pytest.raises(SealedSetError):
        open_sealed(s["dir"], s["key"], MODEL_A, s["log"], s["signer"])
    open_sealed(s["dir"], s["key"], MODEL_B, s["log"], s["signer"])  # another model may open
    open_sealed(s["dir"], s["key"], MODEL_A, s["log"], s["signer"], force=True)
    events = [(e["event"], e["model_sha256"][:1]) for e in verify_log(s["log"], s["signer"])]
    assert events == [("sealed", ""), ("open", "a"), ("refused", "a"), ("open", "b"),
                      ("forced_open", "a")]
    assert log_head(s["log"]) != "0" * 64


def test_tampered_log_line_is_detected(sealed: dict) -> None:
    s = sealed
    open_sealed(s["dir"], s["key"], MODEL_A, s["log"], s["signer"])
    open_sealed(s["dir"], s["key"], MODEL_B, s["log"], s["signer"])
    lines = s["log"].read_bytes().splitlines()
    entry = json.loads(lines[1])
    entry["model_sha256"] = "d" * 64  # hide which model saw the data
    s["log"].write_bytes(b"\n".join([lines[0], json.dumps(entry).encode(), lines[2]]) + b"\n")
    with pytest.raises(TrustError, match="line 2"):
        verify_log(s["log"], s["signer"])
    with pytest.raises(TrustError):  # a tampered log blocks any further opening
        open_sealed(s["dir"], s["key"], "e" * 64, s["log"], s["signer"])


def test_deleted_log_line_breaks_the_chain(sealed: dict) -> None:
    s = sealed
    for m in (MODEL_A, MODEL_B, "f" * 64):
        open_sealed(s["dir"], s["key"], m, s["log"], s["signer"])
    lines = s["log"].read_bytes().splitlines()
    s["log"].write_bytes(b"\n".join([lines[0], lines[1], lines[3]]) + b"\n")
    with pytest.raises(TrustError, match="line 3"):
        verify_log(s["log"], s["signer"])


def test_log_signed_by_another_key_fails(sealed: dict) -> None:
    s = sealed
    open_sealed(s["dir"], s["key"], MODEL_A, s["log"], s["signer"])
    with pytest.raises(TrustError):
        verify_log(s["log"], generate_private_key().public_key())


# ---------------------------------------------------------------- the pinned log
def test_reopening_with_another_log_file_is_refused(sealed: dict, tmp_path: Path) -> None:
    s = sealed
    open_sealed(s["dir"], s["key"], MODEL_A, s["log"], s["signer"])
    fresh = tmp_path / "elsewhere" / "openings.jsonl"  # an empty log would forget model A
    with pytest.raises(SealedSetError, match="pinned"):
        open_sealed(s["dir"], s["key"], MODEL_A, fresh, s["signer"])
    assert not fresh.exists()
    # the pinned path with other contents (the log swapped for a fresh one) is refused too
    s["log"].rename(tmp_path / "kept.jsonl")
    with pytest.raises(SealedSetError, match="no 'sealed' entry"):
        open_sealed(s["dir"], s["key"], MODEL_A, s["log"], s["signer"])


def test_reopening_with_another_log_key_is_refused(sealed: dict, tmp_path: Path) -> None:
    s = sealed
    open_sealed(s["dir"], s["key"], MODEL_A, s["log"], s["signer"])
    other = generate_private_key()
    with pytest.raises(SealedSetError, match="pinned"):
        open_sealed(s["dir"], s["key"], MODEL_A, tmp_path / "other.jsonl", other)
    with pytest.raises(SealedSetError, match="pinned"):
        open_sealed(s["dir"], s["key"], MODEL_A, s["log"], other)


def test_the_pin_is_authenticated_with_the_data(sealed: dict) -> None:
    s = sealed
    meta = json.loads((s["dir"] / "manifest.json").read_text())
    assert meta["opening_log"]["path"].endswith("openings.jsonl")
    meta["opening_log"]["keyid"] = "0" * 16  # repointing the pin breaks decryption
    (s["dir"] / "manifest.json").write_text(json.dumps(meta))
    with pytest.raises(TrustError, match="authentication"):
        open_sealed(s["dir"], s["key"], MODEL_A, s["log"], s["signer"])


def test_a_set_sealed_without_a_pin_is_refused(tmp_path: Path) -> None:
    key = load_key(generate_key(tmp_path / "k"))
    out = seal(tmp_path / "old", np.zeros((2, 4, 4, 3), np.uint8), np.zeros(2), ["a", "b"],
               key)
    with pytest.raises(SealedSetError, match="re-seal"):
        open_sealed(out, key, MODEL_A, tmp_path / "log.jsonl", generate_private_key())


def test_original_files_travel_inside_the_seal(tmp_path: Path) -> None:
    key = load_key(generate_key(tmp_path / "k"))
    files = {"GTSRB/Final_Test/Images/00000.ppm": b"P6 1 1 255\n\x01\x02\x03",
             "GT-final_test.csv": b"Filename;ClassId\n"}
    signer = generate_private_key()
    out = seal(tmp_path / "s", np.zeros((1, 1, 1, 3), np.uint8), np.zeros(1), ["a"], key,
               log_signer=signer, files=files)
    assert (out / "openings.jsonl").is_file()  # the default log sits in the sealed folder
    data = open_sealed(out, key, MODEL_A, out / "openings.jsonl", signer)
    assert data.files == files


def test_tampered_ciphertext_or_manifest_is_detected(sealed: dict) -> None:
    s = sealed
    blob = bytearray((s["dir"] / "sealed.bin").read_bytes())
    blob[-40] ^= 1
    (s["dir"] / "sealed.bin").write_bytes(bytes(blob))
    with pytest.raises(TrustError, match="authentication"):
        open_sealed(s["dir"], s["key"], MODEL_A, s["log"], s["signer"])
    blob[-40] ^= 1
    (s["dir"] / "sealed.bin").write_bytes(bytes(blob))
    meta = json.loads((s["dir"] / "manifest.json").read_text())
    meta["split_manifest_sha256"] = "0" * 64
    (s["dir"] / "manifest.json").write_text(json.dumps(meta))
    with pytest.raises(TrustError, match="authentication"):
        open_sealed(s["dir"], s["key"], MODEL_A, s["log"], s["signer"])
    # failed openings hand out nothing and log nothing (the one line is the "sealed" entry)
    assert len(s["log"].read_bytes().splitlines()) == 1


def test_wrong_key_and_bad_digest(sealed: dict) -> None:
    s = sealed
    with pytest.raises(TrustError):
        open_sealed(s["dir"], os.urandom(32), MODEL_A, s["log"], s["signer"])
    with pytest.raises(ConfigError):
        open_sealed(s["dir"], s["key"], "not-a-digest", s["log"], s["signer"])
