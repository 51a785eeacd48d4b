"""Signed preprocessing stages: formats, the policy, and verification of clean runs."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from cloud_train.attest import drift
from cloud_train.attest.policy import STAGES, load_policy, load_stage_key, make_stage_keys
from cloud_train.attest.stages import attestation_path, load_training_data, run_pipeline
from cloud_train.attest.statement import PAYLOAD_TYPE, STAGE_PREDICATE, STATEMENT_TYPE
from cloud_train.attest.verify import VerifyError, require_verified, verify_pipeline
from cloud_train.ingest.export import sign_folder_as_export
from cloud_train.render import render_dataset
from roadshield_base.trust import TrustError, generate_private_key, save_private_key, sha256_hex


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("attest")
    render_dataset(root / "raw", 3, 0, seed=1, progress=False)
    make_stage_keys(root / "keys")
    sign_folder_as_export(root / "raw", load_stage_key(root / "keys", "gate"))
    run_pipeline(root / "raw", root / "out", root / "keys", seed=0)
    return {"raw": root / "raw", "keys": root / "keys", "out": root / "out", "root": root}


def _statement(out: Path, stage: str) -> dict:
    env = json.loads(attestation_path(out, stage).read_text().splitlines()[0])
    assert env["payloadType"] == PAYLOAD_TYPE
    return json.loads(base64.b64decode(env["payload"]))


def test_each_stage_writes_an_in_toto_statement_chained_to_the_previous(world):
    prev = None
    for stage in STAGES:
        st = _statement(world["out"], stage)
        assert st["_type"] == STATEMENT_TYPE and st["predicateType"] == STAGE_PREDICATE
        assert st["predicate"]["stage"] == stage
        subjects = {s["name"]: s["digest"]["sha256"] for s in st["subject"]}
        assert all(n.startswith(stage + "/") for n in subjects)
        inputs = {s["name"]: s["digest"]["sha256"] for s in st["predicate"]["inputs"]}
        if prev is not None:
            assert inputs == prev
        prev = subjects
    assert _statement(world["out"], "augment")["predicate"]["parameters"]["seed"] == 0
    decode_inputs = _statement(world["out"], "decode")["predicate"]["inputs"]
    assert any(i["name"].endswith(".ppm") for i in decode_inputs)


def test_normalise_records_the_pixel_constants(world):
    data = load_training_data(world["out"])
    dec = np.load(world["out"] / "decode" / "images.npy")
    want = dec.reshape(-1, 3).astype(np.float64).mean(0) / 255.0
    np.testing.assert_allclose(data["mean"], want, atol=1e-5)
    assert data["images"].dtype == np.uint8 and len(data["images"]) == 2 * len(dec)
    assert len(data["class_names"]) == 14


def test_clean_runs_verify_without_false_alarms(world):
    for seed in range(3):
        out = world["root"] / f"clean{seed}"
        run_pipeline(world["raw"], out, world["keys"], seed=seed, n_shards=3)
        rep = verify_pipeline(out, world["keys"], raw_dir=world["raw"])
        assert rep.ok, rep.text()
        assert [(d.src, d.dst) for d in rep.drift] == list(zip(STAGES, STAGES[1:], strict=False))
        assert not any(d.flagged for d in rep.drift)
    assert require_verified(world["out"], world["keys"]).images == 84


def test_changed_raw_input_is_caught_when_raw_dir_is_given(world, tmp_path):
    import shutil

    raw = tmp_path / "raw"
    shutil.copytree(world["raw"], raw)
    ppm = sorted(raw.rglob("*.ppm"))[0]
    ppm.write_bytes(ppm.read_bytes()[:-1] + b"\x00")
    rep = verify_pipeline(world["out"], world["keys"], raw_dir=raw)
    assert not rep.ok
    assert any(f.stage == "gate" and f.check == "chain" and f.file.endswith(ppm.name)
               for f in rep.findings)


def test_policy_must_be_signed_by_the_root_key(world, tmp_path):
    pol = load_policy(world["keys"])
    assert set(pol.keyids) == {*STAGES, "trainer", "gate"}
    other = generate_private_key()
    save_private_key(other, tmp_path / "other.key")
    with pytest.raises(TrustError, match="no valid signature"):
        load_policy(world["keys"] / "policy.json",
                    root_public_key=other.public_key())
    with pytest.raises(TrustError, match="pinned"):
        load_policy(world["keys"], root_keyid="0" * 16)


def test_missing_attestation_fails_the_gate(world, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(world["out"], out)
    attestation_path(out, "augment").unlink()
    with pytest.raises(VerifyError, match=r"stage augment: augment/augment.intoto.jsonl"):
        require_verified(out, world["keys"])


def test_ks_statistic_matches_scipy():
    from scipy.stats import ks_2samp

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=300), rng.normal(0.2, 1.1, size=450)
    assert drift.ks_statistic(a, b) == pytest.approx(ks_2samp(a, b).statistic, abs=1e-12)


def test_a_fifteen_percent_feature_shift_is_flagged_and_noise_is_not(world):
    images = np.load(world["out"] / "decode" / "images.npy")
    labels = np.load(world["out"] / "decode" / "labels.npy")
    shifted = np.clip(images.astype(np.float32) * 1.15, 0, 255).astype(np.uint8)
    res = drift.compare("a", "b", images, labels, shifted, labels, 14)
    assert res.flagged and "mean drifted" in res.reason
    same = drift.compare("a", "b", images, labels, images[::-1], labels[::-1], 14)
    assert not same.flagged and same.max_ks == 0.0
    gone = drift.compare("a", "b", images, labels, images[labels != 3], labels[labels != 3], 14)
    assert gone.flagged and gone.missing_classes == (3,)


def test_a_file_swapped_after_decode_read_it_is_named_by_verify(world, tmp_path, monkeypatch):
    """The decode stage records the digest of the bytes it decoded: a raw file replaced
    between reading and hashing (the loader has returned, the stage has not finished) cannot
    slip in under its digest; verify against the raw folder names the file."""
    import shutil

    import cloud_train.gtsrb as gtsrb
    from cloud_train.attest.policy import load_stage_key
    from cloud_train.attest.stages import decode_stage

    raw = tmp_path / "raw"
    shutil.copytree(world["raw"], raw)
    ppms = sorted(raw.rglob("*.ppm"))
    victim, other = ppms[0], ppms[-1]
    original = victim.read_bytes()
    real_load = gtsrb.load_gtsrb

    def load_then_swap(*args, **kwargs):
        data = real_load(*args, **kwargs)
        victim.write_bytes(other.read_bytes())  # the swap, after the pixels were decoded
        return data

    monkeypatch.setattr(gtsrb, "load_gtsrb", load_then_swap)
    out = tmp_path / "out"
    decode_stage(raw, out, load_stage_key(world["keys"], "decode"),
                 load_policy(world["keys"]).trusted("gate"))
    monkeypatch.undo()

    name = victim.relative_to(raw).as_posix()
    inputs = {i["name"]: i["digest"]["sha256"]
              for i in _statement(out, "decode")["predicate"]["inputs"]}
    assert inputs[name] == sha256_hex(original) != sha256_hex(victim.read_bytes())
    # the decoded row is the original image, as recorded
    ref = real_load(world["raw"], "train")
    row = [p.relative_to(world["raw"]).as_posix() for p in ref.paths].index(name)
    np.testing.assert_array_equal(np.load(out / "decode" / "images.npy")[row], ref.images[row])
    run_pipeline_rest(out, world["keys"])
    rep = verify_pipeline(out, world["keys"], raw_dir=raw)
    assert not rep.ok
    hits = [f for f in rep.findings if f.stage == "gate" and name in f.file + f.message]
    assert hits and hits[0].check == "chain", rep.text()
    assert not list(out.glob(".decode-snapshot-*"))  # the scratch copy is gone


def run_pipeline_rest(out: Path, keys: Path) -> None:
    from cloud_train.attest.policy import load_stage_key
    from cloud_train.attest.stages import augment_stage, normalise_stage, shard_stage

    normalise_stage(out, load_stage_key(keys, "normalise"))
    augment_stage(out, load_stage_key(keys, "augment"), seed=0)
    shard_stage(out, load_stage_key(keys, "shard"), seed=0)
