"""Every mid-pipeline tampering attack is caught, and the error names stage, file, mismatch."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud_train.attest.policy import load_stage_key, make_stage_keys
from cloud_train.attest.stages import run_pipeline
from cloud_train.attest.tamper import ATTACKS, run_attack
from cloud_train.attest.verify import VerifyError, require_verified, verify_pipeline
from cloud_train.ingest.export import sign_folder_as_export
from cloud_train.render import render_dataset

# attack -> (stage, file fragment, check) the first finding must name
EXPECTED = {
    "changed_normalisation_constant": ("normalise", "normalise/stats.json", "hash"),
    "flipped_labels_in_shard": ("shard", "shard/shard-00000.npz", "hash"),
    "dropped_class": ("shard", "shard/shard-0000", "hash"),
    "swapped_file": ("shard", "shard/shard-00000.npz", "hash"),
    "resigned_with_unknown_key": ("shard", "shard/shard.intoto.jsonl", "signature"),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tamper")
    render_dataset(root / "raw", 3, 0, seed=2, progress=False)
    make_stage_keys(root / "keys")
    sign_folder_as_export(root / "raw", load_stage_key(root / "keys", "gate"))
    for seed in range(2):
        run_pipeline(root / "raw", root / f"clean{seed}", root / "keys", seed=seed)
    return {"root": root, "keys": root / "keys"}


def test_attack_list_covers_the_issue():
    assert set(ATTACKS) == set(EXPECTED)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("attack", sorted(EXPECTED))
def test_attack_is_detected_and_named(world, attack, seed):
    clean = world["root"] / f"clean{seed}"
    assert verify_pipeline(clean, world["keys"]).ok
    result, tampered = run_attack(attack, clean, world["root"] / f"atk{seed}")
    rep = verify_pipeline(tampered, world["keys"])
    assert not rep.ok
    stage, file, check = EXPECTED[attack]
    first = rep.findings[0]
    assert (first.stage, first.check) == (stage, check) and file in first.file, rep.text()
    assert result.stage == stage
    with pytest.raises(VerifyError, match=f"stage {stage}: {file}"):
        require_verified(tampered, world["keys"])


def test_hash_mismatch_message_gives_both_digests(world):
    _, tampered = run_attack("flipped_labels_in_shard", world["root"] / "clean0",
                             world["root"] / "msg")
    msg = str(verify_pipeline(tampered, world["keys"]).findings[0])
    assert "sha256 is" in msg and "attestation records" in msg


def test_insider_shift_with_genuine_keys_is_caught_by_replay_and_drift(world):
    _, tampered = run_attack("insider_feature_shift", world["root"] / "clean0",
                             world["root"] / "insider", world["keys"])
    rep = verify_pipeline(tampered, world["keys"])
    assert sorted(f.check for f in rep.findings) == ["drift", "invariant"], rep.text()
    assert all(f.stage == "augment" for f in rep.findings)
    assert any("mean drifted" in f.message for f in rep.findings)


def test_an_extra_file_in_a_stage_folder_is_reported(world, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(world["root"] / "clean0", out)
    shutil.copyfile(out / "shard" / "shard-00000.npz", out / "shard" / "shard-00009.npz")
    rep = verify_pipeline(out, world["keys"])
    assert [(f.check, f.file) for f in rep.findings] == [("unattested", "shard/shard-00009.npz")]
