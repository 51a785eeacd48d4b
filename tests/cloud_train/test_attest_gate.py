"""SLSA provenance for a training run, and the CLI (exit codes 0 / 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cloud_train.attest.cli import add_attest_parsers
from cloud_train.attest.policy import load_stage_key
from cloud_train.attest.statement import SLSA_PROVENANCE
from cloud_train.attest.tamper import run_attack
from cloud_train.attest.training_gate import (
    provenance_for_training,
    verify_training_provenance,
)
from cloud_train.attest.verify import VerifyError, require_verified, verify_pipeline
from cloud_train.ingest.export import sign_folder_as_export
from cloud_train.render import render_dataset
from roadshield_base.trust import TrustError


def _run(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="roadshield data")
    add_attest_parsers(parser.add_subparsers(dest="data_cmd", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gate")
    render_dataset(root / "raw", 2, 0, seed=3, progress=False)
    assert _run(["keys", "init", str(root / "keys")]) == 0
    sign_folder_as_export(root / "raw", load_stage_key(root / "keys", "gate"))
    assert _run(["preprocess", str(root / "raw"), "--out", str(root / "out"),
                 "--keys", str(root / "keys"), "--shards", "2"]) == 0
    return {"root": root, "keys": root / "keys", "out": root / "out"}


def test_cli_verify_exit_codes_and_json(world, capsys):
    capsys.readouterr()
    assert _run(["verify", str(world["out"]), "--policy", str(world["keys"]), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and doc["images"] == 56 and len(doc["drift"]) == 3
    _, bad = run_attack("swapped_file", world["out"], world["root"] / "atk")
    assert _run(["verify", str(bad), "--policy", str(world["keys"])]) == 2
    assert "stage shard: shard/shard-00000.npz" in capsys.readouterr().out


def test_cli_keys_init_refuses_to_overwrite(world):
    from roadshield_base.errors import ConfigError

    with pytest.raises(ConfigError, match="already exists"):
        _run(["keys", "init", str(world["keys"])])


def test_provenance_records_checkpoint_config_and_pipeline(world):
    rep = require_verified(world["out"], world["keys"])
    ckpt = "ab" * 32
    env = provenance_for_training(ckpt, rep, {"epochs": 3, "lr": 0.05},
                                  load_stage_key(world["keys"], "trainer"))
    st = verify_training_provenance(env, world["keys"], checkpoint_sha256=ckpt)
    assert st["predicateType"] == SLSA_PROVENANCE
    bd = st["predicate"]["buildDefinition"]
    assert bd["externalParameters"]["train_config"] == {"epochs": 3, "lr": 0.05}
    deps = {d["name"] for d in bd["resolvedDependencies"]}
    assert "pipeline/shard/shard-00001.npz" in deps
    assert "pipeline/decode/decode.intoto.jsonl" in deps
    assert st["predicate"]["runDetails"]["builder"]["id"].startswith("https://")
    with pytest.raises(TrustError, match="does not name checkpoint"):
        verify_training_provenance(env, world["keys"], checkpoint_sha256="cd" * 32)


def test_provenance_refuses_a_failed_report_and_a_foreign_signer(world):
    _, bad = run_attack("changed_normalisation_constant", world["out"], world["root"] / "atk2")
    with pytest.raises(VerifyError):
        provenance_for_training("ab" * 32, verify_pipeline(bad, world["keys"]), {},
                                load_stage_key(world["keys"], "trainer"))
    env = provenance_for_training("ab" * 32, verify_pipeline(world["out"], world["keys"]), {},
                                  load_stage_key(world["keys"], "shard"))
    with pytest.raises(TrustError, match="no valid signature"):
        verify_training_provenance(env, world["keys"])
