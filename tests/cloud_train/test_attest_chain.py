"""The chain starts at the gate: stage 2 reads only a signed gate export, verify refuses a
pipeline that does not start at one, and each stage keeps what it is declared to keep even
when its genuine key signs something else."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cloud_train.attest.policy import load_policy, load_stage_key, make_stage_keys
from cloud_train.attest.stages import (
    _read_stage,
    _write_stage,
    attestation_path,
    augment_stage,
    gate_statement_path,
    normalise_stage,
    npy_bytes,
    run_pipeline,
    shard_stage,
)
from cloud_train.attest.statement import digest_map, sign_statement, write_attestation
from cloud_train.attest.tamper import run_attack
from cloud_train.attest.verify import VerifyError, verified_training_data, verify_pipeline
from cloud_train.ingest.export import EXPORT_FILE, ExportError, sign_folder_as_export
from cloud_train.render import render_dataset
from roadshield.cli import main as roadshield_main
from roadshield_base.trust import generate_private_key


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chain")
    render_dataset(root / "raw", 3, 0, seed=4, progress=False)
    make_stage_keys(root / "keys")
    sign_folder_as_export(root / "raw", load_stage_key(root / "keys", "gate"))
    run_pipeline(root / "raw", root / "out", root / "keys", seed=0, n_shards=2)
    return {"root": root, "raw": root / "raw", "keys": root / "keys", "out": root / "out"}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _statement(out: Path, stage: str) -> dict:
    env = json.loads(attestation_path(out, stage).read_text().splitlines()[0])
    return json.loads(base64.b64decode(env["payload"]))


def _rest(out: Path, keys: Path, after: str = "decode") -> None:
    """Re-run the stages after ``after`` with their genuine keys."""
    steps = {"normalise": lambda: normalise_stage(out, load_stage_key(keys, "normalise")),
             "augment": lambda: augment_stage(out, load_stage_key(keys, "augment"), seed=0),
             "shard": lambda: shard_stage(out, load_stage_key(keys, "shard"), 0, 2)}
    names = list(steps)
    for name in names[names.index(after) + 1 if after in names else 0:]:
        steps[name]()


def test_the_clean_chain_verifies_and_records_the_gate(world):
    rep = verify_pipeline(world["out"], world["keys"], raw_dir=world["raw"])
    assert rep.ok, rep.text()
    assert rep.keyids["gate"] == load_policy(world["keys"]).keyids["gate"]
    assert gate_statement_path(world["out"]).read_bytes() == \
        (world["raw"] / EXPORT_FILE).read_bytes()
    inputs = digest_map(_statement(world["out"], "decode")["predicate"]["inputs"], "in")
    assert "gate/gate_export.intoto.jsonl" in inputs
    rows = json.loads((world["out"] / "decode" / "rows.json").read_text())
    assert len(rows) == 42 and all(r.startswith("gtsrb/GTSRB/Training/") for r in rows)


def test_a_folder_the_gate_did_not_export_is_refused_before_any_stage(world, tmp_path):
    raw = _copy(world["raw"], tmp_path / "raw")
    (raw / EXPORT_FILE).unlink()
    with pytest.raises(ExportError, match="is not a gate export"):
        run_pipeline(raw, tmp_path / "out", world["keys"])
    assert not (tmp_path / "out" / "decode").exists()
    code = roadshield_main(["data", "preprocess", str(raw), "--out", str(tmp_path / "o2"),
                            "--keys", str(world["keys"])])
    assert code == 2


def test_a_poisoned_file_slipped_into_an_export_is_refused(world, tmp_path):
    raw = _copy(world["raw"], tmp_path / "raw")
    folder = raw / "gtsrb" / "GTSRB" / "Training" / "00001"
    victim = sorted(folder.glob("*.ppm"))[0]
    shutil.copyfile(victim, folder / "99999_00000.ppm")
    csv = folder / "GT-00001.csv"
    line = csv.read_text().splitlines()[1].split(";")
    line[0] = "99999_00000.ppm"
    csv.write_text(csv.read_text() + ";".join(line) + "\n")
    with pytest.raises(ExportError, match=r"1 file\(s\) it did not export.*99999_00000.ppm"):
        run_pipeline(raw, tmp_path / "out", world["keys"])


def test_a_relabelled_export_file_is_refused(world, tmp_path):
    raw = _copy(world["raw"], tmp_path / "raw")
    csv = raw / "gtsrb" / "GTSRB" / "Training" / "00002" / "GT-00002.csv"
    csv.write_text(csv.read_text().replace(";2\n", ";2 \n", 1))
    with pytest.raises(ExportError, match="changed since"):
        run_pipeline(raw, tmp_path / "out", world["keys"])


def test_an_export_signed_by_another_key_is_refused(world, tmp_path):
    raw = _copy(world["raw"], tmp_path / "raw")
    sign_folder_as_export(raw, generate_private_key())
    with pytest.raises(ExportError, match="does not verify against the gate key"):
        run_pipeline(raw, tmp_path / "out", world["keys"])


def test_verify_and_training_refuse_a_pipeline_that_does_not_start_at_the_gate(world, tmp_path):
    out = _copy(world["out"], tmp_path / "out")
    shutil.rmtree(out / "gate")
    rep = verify_pipeline(out, world["keys"])
    assert [(f.stage, f.check) for f in rep.findings] == [("gate", "missing")], rep.text()
    with pytest.raises(VerifyError, match="does not start at a gate export"):
        verified_training_data(out, world["keys"])


def test_another_valid_export_in_the_gate_folder_breaks_the_chain(world, tmp_path):
    other = tmp_path / "other"
    render_dataset(other, 3, 0, seed=9, progress=False)
    sign_folder_as_export(other, load_stage_key(world["keys"], "gate"))
    out = _copy(world["out"], tmp_path / "out")
    shutil.copyfile(other / EXPORT_FILE, gate_statement_path(out))
    rep = verify_pipeline(out, world["keys"])
    assert not rep.ok
    assert {f.check for f in rep.findings if f.stage == "decode"} >= {"chain"}, rep.text()


@pytest.mark.parametrize("attack", ["insider_label_swap", "insider_backdoor"])
def test_insiders_with_the_genuine_augment_key_are_refused(world, tmp_path, attack):
    res, bad = run_attack(attack, world["out"], tmp_path, world["keys"])
    rep = verify_pipeline(bad, world["keys"])
    inv = [f for f in rep.findings if f.check == "invariant"]
    assert inv and all(f.stage == "augment" for f in inv), rep.text()
    # signatures, hashes and the chain all pass: only the declared invariants object
    assert not [f for f in rep.findings if f.check in ("signature", "hash", "chain")]
    if attack == "insider_label_swap":
        assert any("another label than their original" in f.message for f in inv)
    with pytest.raises(VerifyError):
        verified_training_data(bad, world["keys"])


def test_a_statement_declaring_more_freedom_is_refused(world, tmp_path):
    out = _copy(world["out"], tmp_path / "out")
    st = _statement(out, "augment")
    st["predicate"]["invariants"] = {"may_change": "labels", "keeps": "nothing"}
    env = sign_statement(st, [load_stage_key(world["keys"], "augment")])
    write_attestation(attestation_path(out, "augment"), [env])
    rep = verify_pipeline(out, world["keys"])
    assert [(f.stage, f.check) for f in rep.findings] == [("augment", "invariant")], rep.text()


def test_augment_beyond_the_declared_limits_is_refused(world, tmp_path):
    out = _copy(world["out"], tmp_path / "out")
    augment_stage(out, load_stage_key(world["keys"], "augment"), seed=0, max_shift=12)
    _rest(out, world["keys"], "augment")
    rep = verify_pipeline(out, world["keys"])
    assert any("exceed the declared limits" in f.message for f in rep.findings), rep.text()


def _resign_decode(out: Path, keys: Path, images: np.ndarray | None = None,
                   labels: np.ndarray | None = None) -> None:
    files, _ = _read_stage(out, "decode")
    st = _statement(out, "decode")
    new = {n.split("/", 1)[1]: b for n, b in files.items()}
    if images is not None:
        new["images.npy"] = npy_bytes(images)
    if labels is not None:
        new["labels.npy"] = npy_bytes(labels)
    _write_stage(out, "decode", new, digest_map(st["predicate"]["inputs"], "in"),
                 st["predicate"]["parameters"], load_stage_key(keys, "decode"))
    _rest(out, keys)


def test_decode_with_its_genuine_key_cannot_relabel(world, tmp_path):
    out = _copy(world["out"], tmp_path / "out")
    labels = np.load(out / "decode" / "labels.npy")
    labels[:3] = (labels[:3] + 1) % 14
    _resign_decode(out, world["keys"], labels=labels)
    rep = verify_pipeline(out, world["keys"])
    hits = [f for f in rep.findings if f.stage == "decode" and f.check == "invariant"]
    assert hits and "3 rows carry another label than the gate gave" in hits[0].message


def test_decode_pixels_planted_with_its_genuine_key_are_caught_by_the_raw_replay(world, tmp_path):
    from cloud_train.ingest.attacks import add_trigger

    out = _copy(world["out"], tmp_path / "out")
    images = np.load(out / "decode" / "images.npy")
    images[:2] = [add_trigger(im) for im in images[:2]]
    _resign_decode(out, world["keys"], images=images)
    assert not [f for f in verify_pipeline(out, world["keys"]).findings
                if f.check != "drift"]  # without the export, pixels cannot be replayed
    rep = verify_pipeline(out, world["keys"], raw_dir=world["raw"])
    assert any(f.stage == "decode" and "decoding the raw export again" in f.message
               for f in rep.findings), rep.text()
