"""`roadshield data export`: the gate's accepted samples, signed, feed stage 2; what the gate
held does not."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
from ingest_world import gate_world

from cloud_train.attest.policy import load_policy, make_stage_keys
from cloud_train.attest.stages import run_pipeline
from cloud_train.attest.verify import verified_training_data
from cloud_train.ingest import attacks as A
from cloud_train.ingest.export import EXPORT_FILE, EXPORT_PREDICATE, read_export
from cloud_train.ingest.gate import ingest
from cloud_train.ingest.store import accepted_samples, quarantined
from roadshield.cli import main as roadshield_main
from roadshield_base.errors import ConfigError


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    w = gate_world(tmp_path_factory.mktemp("export"), clean_per_class=3)
    d = w["dir"]
    good = A.clean(d / "good", w["imgs"], w["labels"], "acme", w["prov"], "g1")
    assert ingest(good.path, w["store"], reference=w["ref"])["accepted"] >= 0.9 * len(w["labels"])
    junk = A.ood_junk(d / "junk", w["imgs"], w["labels"], "acme", w["prov"], "j1", 0.2)
    ingest(junk.path, w["store"], reference=w["ref"])
    make_stage_keys(d / "keys")
    assert roadshield_main(["data", "export", "--store", str(w["store"]), "--out",
                            str(d / "exp"), "--keys", str(d / "keys")]) == 0
    return {**w, "keys": d / "keys", "exp": d / "exp", "junk": junk}


def test_the_export_lists_every_accepted_sample_and_no_held_one(world):
    exp = read_export(world["exp"], load_policy(world["keys"]).trusted("gate"))
    ids = {s["id"] for s in exp.samples}
    held = {r["id"] for r in quarantined(world["store"])}
    assert held and not ids & held
    assert not ids & world["junk"].bad_ids
    assert ids == {r["id"] for r in accepted_samples(world["store"])}
    assert all(s["source"] == "acme" and s["decision"] == "ACCEPTED" for s in exp.samples)
    env = json.loads((world["exp"] / EXPORT_FILE).read_text())
    st = json.loads(base64.b64decode(env["payload"]))
    assert st["predicateType"] == EXPORT_PREDICATE
    assert st["predicate"]["held"].get("QUARANTINED", 0) == len(held)
    assert st["predicate"]["gate"]["reference_sha256"]


def test_the_export_feeds_the_pipeline_and_training_reads_the_gates_labels(world, tmp_path):
    run_pipeline(world["exp"], tmp_path / "pipe", world["keys"], n_shards=2, progress=False)
    data, rep = verified_training_data(tmp_path / "pipe", world["keys"])
    exp = read_export(world["exp"], load_policy(world["keys"]).trusted("gate"))
    assert rep.ok and len(data["labels"]) == 2 * len(exp.samples)  # originals + one copy
    assert np.array_equal(np.bincount(data["labels"], minlength=14) // 2,
                          np.bincount([s["label"] for s in exp.samples], minlength=14))


def test_export_refuses_an_existing_folder_and_an_empty_store(world, tmp_path):
    from cloud_train.attest.policy import load_stage_key
    from cloud_train.ingest.export import export_store
    from cloud_train.ingest.gate import init_store
    from roadshield_base.errors import DatasetError
    from roadshield_base.trust import generate_private_key

    key = load_stage_key(world["keys"], "gate")
    with pytest.raises(ConfigError, match="exists"):
        export_store(world["store"], world["exp"], key)
    empty = init_store(tmp_path / "empty", generate_private_key().public_key())
    with pytest.raises(DatasetError, match="no accepted samples"):
        export_store(empty, tmp_path / "x", key)
    assert not Path(tmp_path / "x").exists()
