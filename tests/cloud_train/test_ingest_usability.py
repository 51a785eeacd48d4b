"""What a person running the gate sees: exit codes that separate a few held samples from a
suspect batch, a fair test for a single-class batch, messages naming key and file, decoder
warnings tied to their sample, and the held sample ids in --json."""

from __future__ import annotations

import argparse
import json

import cv2
import numpy as np
import pytest
from ingest_world import gate_world

from cloud_train.ingest import attacks as A
from cloud_train.ingest import batch as bfmt
from cloud_train.ingest.cli import add_ingest_parsers
from cloud_train.ingest.gate import (
    ingest,
    read_journal,
)
from cloud_train.ingest.screens import image_features, ks_2samp, ks_2samp_weighted
from roadshield_base.trust import generate_private_key, key_id


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return gate_world(tmp_path_factory.mktemp("usability"))


def _cli():
    parser = argparse.ArgumentParser()
    add_ingest_parsers(parser.add_subparsers(dest="data_cmd", required=True))

    def run(*argv):
        args = parser.parse_args([str(a) for a in argv])
        return args.func(args)

    return run


# ---------------------------------------------------------------- exit codes
def test_a_few_held_samples_exit_3_not_suspect(world, tmp_path):
    imgs, labels = world["imgs"].copy(), world["labels"]
    imgs[5] = 0  # one flat black image: held, nothing else wrong with the batch
    A.clean(tmp_path / "b", imgs, labels, "acme", world["prov"], "few-held")
    s = ingest(tmp_path / "b", world["store"], reference=world["ref"])
    assert "few-held-000005" in {q["id"] for q in s["quarantined_samples"]}
    assert s["quarantined"] <= 5
    assert s["status"] == "QUARANTINED_SOME" and s["exit_code"] == 3


def test_many_held_samples_make_the_batch_suspect(world, tmp_path):
    imgs, labels = world["imgs"].copy(), world["labels"]
    imgs[:8] = 0  # more than max(5, 2 %) held
    A.clean(tmp_path / "b", imgs, labels, "acme", world["prov"], "many-held")
    s = ingest(tmp_path / "b", world["store"], reference=world["ref"])
    assert s["status"] == "SUSPECT" and s["exit_code"] == 4


def test_cli_help_documents_both_exit_codes(capsys):
    with pytest.raises(SystemExit):
        _cli()("ingest", "--help")
    out = capsys.readouterr().out
    assert "  3  some samples held" in out and "  4  the batch is SUSPECT" in out


# ---------------------------------------------------------------- class-conditional test
def test_weighted_ks_equals_ks_for_equal_weights():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 200), rng.normal(0.2, 1, 300)
    assert ks_2samp_weighted(a, b, np.full(300, 7.0)) == pytest.approx(ks_2samp(a, b))


def test_a_clean_single_class_batch_is_judged_against_its_class(world, tmp_path):
    imgs, labels = A.render_images(60, seed=11)
    one = labels == 3  # a camera that saw only one kind of sign
    imgs, labels = imgs[one], labels[one]
    feats = image_features(imgs)
    assert world["ref"].batch_shift(feats)["shifted"]  # against the mixture: "shifted"
    assert not world["ref"].batch_shift(feats, labels)["shifted"]
    A.clean(tmp_path / "b", imgs, labels, "acme", world["prov"], "one-class")
    s = ingest(tmp_path / "b", world["store"], reference=world["ref"])
    assert s["ks"]["class_conditional"] and not s["ks"]["shifted"]
    assert "BATCH_DISTRIBUTION_SHIFT" not in s["reason_counts"]
    assert s["quarantined"] <= 0.1 * s["received"], s["reason_counts"]


def test_a_shifted_single_class_batch_is_still_caught(world):
    imgs, labels = A.render_images(60, seed=12)
    one = labels == 3
    dark = (imgs[one] * 0.35).astype(np.uint8)
    assert world["ref"].batch_shift(image_features(dark), labels[one])["shifted"]


# ---------------------------------------------------------------- messages
def test_signature_invalid_names_the_key_and_the_file(world, tmp_path, capsys):
    evil = generate_private_key()
    b = A.forged_signature(tmp_path / "f", world["imgs"][:4], world["labels"][:4], "acme",
                           evil, "forged-msg")
    s = ingest(b.path, world["store"], reference=world["ref"])
    assert s["batch_reasons"] == ["SIGNATURE_INVALID"]
    assert key_id(evil) in s["error"] and key_id(world["prov"]) in s["error"]
    assert str(b.path / "index.sig") in s["error"] and "index.jsonl" in s["error"]
    # a signature by the registered key over other bytes names the key and the index
    r = A.replayed_signature(tmp_path / "r", A.clean(tmp_path / "c", world["imgs"][:4],
                                                     world["labels"][:4], "acme",
                                                     world["prov"], "msg-ok").path)
    s = ingest(r.path, world["store"], reference=world["ref"])
    assert s["batch_reasons"] == ["SIGNATURE_INVALID"]
    assert key_id(world["prov"]) in s["error"] and str(r.path / "index.jsonl") in s["error"]
    capsys.readouterr()
    assert _cli()("ingest", r.path, "--store", world["store"]) == 2
    assert key_id(world["prov"]) in capsys.readouterr().out


def test_decoder_warnings_name_their_sample(world, tmp_path, capsys):
    out = tmp_path / "w"
    bfmt.make_batch(out, world["imgs"][:4], world["labels"][:4], "acme", world["prov"], "warn")
    rows = [json.loads(x) for x in (out / "index.jsonl").read_text().splitlines()]
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3)).astype(np.uint8)
    ok, enc = cv2.imencode(".png", noise)
    cut = enc.tobytes()[:-30]  # libpng reports the truncated stream on stderr
    (out / rows[2]["file"]).write_bytes(cut)
    rows[2]["sha256"] = bfmt.sha256_hex(cut)
    data = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
    (out / "index.jsonl").write_bytes(data)
    bfmt.sign_index(out, world["prov"], "acme", data)
    capsys.readouterr()
    _cli()("ingest", out, "--store", world["store"])
    err = capsys.readouterr().err
    assert f"warning: sample {rows[2]['id']} ({rows[2]['file']}, index line 3):" in err
    rec = next(r for r in read_journal(world["store"]) if r["id"] == rows[2]["id"])
    assert rec["decoder_warnings"] and "libpng" in rec["decoder_warnings"][0]


def test_json_summary_lists_the_quarantined_sample_ids(world, tmp_path, capsys):
    imgs = world["imgs"][:10].copy()
    imgs[[2, 7]] = 255
    A.clean(tmp_path / "b", imgs, world["labels"][:10], "acme", world["prov"], "ids-json")
    capsys.readouterr()
    code = _cli()("ingest", tmp_path / "b", "--store", world["store"], "--json")
    s = json.loads(capsys.readouterr().out)
    held = {q["id"]: q for q in s["quarantined_samples"]}
    assert {"ids-json-000002", "ids-json-000007"} <= set(held) and code == s["exit_code"]
    assert held["ids-json-000002"]["line"] == 3 and held["ids-json-000002"]["reasons"]
