"""Training on an attested pipeline: it starts only after verify passes and leaves provenance."""

from __future__ import annotations

import json

import pytest

from cloud_train import pipeline
from cloud_train.attest.policy import load_stage_key, make_stage_keys
from cloud_train.attest.stages import run_pipeline
from cloud_train.attest.tamper import change_normalisation_constant
from cloud_train.attest.training_gate import verify_training_provenance
from cloud_train.attest.verify import VerifyError
from cloud_train.ingest.export import sign_folder_as_export
from cloud_train.render import render_dataset


@pytest.fixture
def attested(tmp_path):
    render_dataset(tmp_path / "raw", train_per_class=4, test_per_class=1, progress=False)
    keys = tmp_path / "keys"
    make_stage_keys(keys)
    sign_folder_as_export(tmp_path / "raw", load_stage_key(keys, "gate"))
    run_pipeline(tmp_path / "raw", tmp_path / "pipe", keys, n_shards=2)
    return tmp_path / "pipe", keys


def test_training_on_a_verified_pipeline_writes_signed_provenance(attested, tmp_path):
    pipe, keys = attested
    out = tmp_path / "model.safetensors"
    result = pipeline.train_checkpoint(pipe, out, arch="signnet_tiny", trainer="standard",
                                       epochs=1, batch_size=32, progress=False,
                                       attested_keys=keys)
    assert result.provenance == tmp_path / "model.safetensors.intoto.jsonl"
    envelope = json.loads(result.provenance.read_text().splitlines()[0])
    statement = verify_training_provenance(envelope, keys, checkpoint_sha256=result.sha256)
    assert statement["predicateType"] == "https://slsa.dev/provenance/v1"


def test_a_tampered_pipeline_stops_training_before_it_starts(attested, tmp_path):
    pipe, keys = attested
    change_normalisation_constant(pipe)
    out = tmp_path / "model.safetensors"
    with pytest.raises(VerifyError, match="normalise"):
        pipeline.train_checkpoint(pipe, out, arch="signnet_tiny", trainer="standard",
                                  epochs=1, progress=False, attested_keys=keys)
    assert not out.exists()
