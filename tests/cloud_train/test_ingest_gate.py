"""The gate end to end: registry, rejections, bad input, journal, quarantine store, CLI."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from ingest_world import gate_world

from cloud_train.ingest import attacks as A
from cloud_train.ingest import batch as bfmt
from cloud_train.ingest import store as qstore
from cloud_train.ingest.cli import add_ingest_parsers
from cloud_train.ingest.gate import (
    ingest,
    init_store,
    read_journal,
    read_object,
    store_paths,
)
from cloud_train.ingest.reference import Reference
from cloud_train.ingest.registry import add_source, list_sources, revoke_source
from roadshield_base.errors import ConfigError
from roadshield_base.trust import TrustError, generate_private_key, save_private_key


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return gate_world(tmp_path_factory.mktemp("gate"))


def _balance(s):
    assert s["received"] == s["accepted"] + s["quarantined"] + s["rejected"]


def test_clean_batch_is_accepted_and_rerun_is_idempotent(world, tmp_path):
    b = A.clean(tmp_path / "b", world["imgs"], world["labels"], "acme", world["prov"], "ok1")
    s = ingest(b.path, world["store"], reference=world["ref"])
    _balance(s)
    assert s["status"] in ("ACCEPTED", "QUARANTINED_SOME") and s["rejected"] == 0
    assert s["received"] == len(world["labels"]) and s["quarantined"] <= 2
    before = len(read_journal(world["store"]))
    again = ingest(b.path, world["store"], reference=world["ref"])
    assert again == s and len(read_journal(world["store"])) == before


def test_tar_batch_is_accepted(world, tmp_path):
    import tarfile

    b = A.clean(tmp_path / "b", world["imgs"][:10], world["labels"][:10], "acme",
                world["prov"], "tar1")
    with tarfile.open(tmp_path / "b.tar.gz", "w:gz") as tar:
        tar.add(b.path, arcname=".")
    s = ingest(tmp_path / "b.tar.gz", world["store"], reference=world["ref"])
    _balance(s)
    assert s["received"] == 10 and s["rejected"] == 0


@pytest.mark.parametrize("attack", ["unknown", "forged", "replay_sig", "replay_id", "nosig"])
def test_bad_sources_are_rejected_whole(world, tmp_path, attack):
    imgs, labels = world["imgs"][:14], world["labels"][:14]
    good = A.clean(tmp_path / "good", imgs, labels, "acme", world["prov"], f"r-{attack}")
    assert ingest(good.path, world["store"], reference=world["ref"])["rejected"] == 0
    evil = generate_private_key()
    if attack == "unknown":
        b = A.unknown_source(tmp_path / "b", imgs, labels, evil, f"u-{attack}")
    elif attack == "forged":
        b = A.forged_signature(tmp_path / "b", imgs, labels, "acme", evil, f"f-{attack}")
    elif attack == "replay_sig":
        b = A.replayed_signature(tmp_path / "b", good.path)
    elif attack == "replay_id":
        b = A.replayed_batch_id(tmp_path / "b", imgs[::-1], labels[::-1], "acme",
                                world["prov"], f"r-{attack}")
    else:
        b = A.clean(tmp_path / "b", imgs, labels, "acme", world["prov"], f"n-{attack}")
        (b.path / bfmt.SIG_NAME).unlink()
    s = ingest(b.path, world["store"], reference=world["ref"])
    _balance(s)
    assert s["status"] == "REJECTED" and s["exit_code"] == 2 and s["rejected"] == 14
    expected = {"unknown": "SOURCE_UNKNOWN", "forged": "SIGNATURE_INVALID",
                "replay_sig": "SIGNATURE_INVALID", "replay_id": "REPLAYED_BATCH_ID",
                "nosig": "SIGNATURE_MISSING"}[attack]
    assert s["batch_reasons"] == [expected]


def test_registry_is_signed_and_revocation_rejects(world, tmp_path):
    root = generate_private_key()
    store = tmp_path / "s"
    init_store(store, root.public_key())
    reg = store_paths(store)["registry"]
    prov = generate_private_key()
    add_source(reg, root, "p1", prov.public_key(), "2026-01-01T00:00:00Z")
    with pytest.raises(ConfigError):
        add_source(reg, root, "p1", prov.public_key(), "2026-01-02T00:00:00Z")
    with pytest.raises(ConfigError):
        add_source(reg, root, "../x", prov.public_key(), "2026-01-02T00:00:00Z")
    with pytest.raises(TrustError):  # someone else's root key cannot edit the registry
        add_source(reg, generate_private_key(), "p2", prov.public_key(), "2026-01-02T00:00:00Z")
    (store / "reference").symlink_to(world["store"] / "reference")
    b = A.clean(tmp_path / "b", world["imgs"][:5], world["labels"][:5], "p1", prov, "rv1")
    assert ingest(b.path, store, reference=world["ref"])["rejected"] == 0
    revoke_source(reg, root, "p1", "2026-02-01T00:00:00Z")
    assert [s.active for s in list_sources(reg, root.public_key())] == [False]
    b2 = A.clean(tmp_path / "b2", world["imgs"][:5], world["labels"][:5], "p1", prov, "rv2")
    assert ingest(b2.path, store, reference=world["ref"])["batch_reasons"] == ["SOURCE_REVOKED"]
    # a registry edited without the root key is not trusted at all
    env = json.loads(reg.read_text())
    env["payload"] = env["payload"][:-4] + "AAA="
    reg.write_text(json.dumps(env))
    assert ingest(b2.path, store, reference=world["ref"])["batch_reasons"] == [
        "REGISTRY_UNTRUSTED"]


def _bad_input_batch(world, tmp_path):
    """A signed batch with one row of each kind of bad input; returns (path, id->code)."""
    out = tmp_path / "bad"
    imgs, labels = world["imgs"][:14], world["labels"][:14]
    bfmt.make_batch(out, imgs, labels, "acme", world["prov"], "badin")
    rows = [json.loads(x) for x in (out / "index.jsonl").read_text().splitlines()]
    (out / rows[0]["file"]).write_bytes((out / rows[0]["file"]).read_bytes()[:50])  # truncated
    rows[0]["sha256"] = bfmt.sha256_hex((out / rows[0]["file"]).read_bytes())
    (out / rows[1]["file"]).write_bytes(b"")  # zero bytes
    rows[1]["sha256"] = bfmt.sha256_hex(b"")
    ok, enc = cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))
    bomb = bytearray(enc.tobytes())
    bomb[16:24] = (30000).to_bytes(4, "big") * 2
    (out / rows[2]["file"]).write_bytes(bytes(bomb))
    rows[2]["sha256"] = bfmt.sha256_hex(bytes(bomb))
    del rows[3]["capture_time"]
    rows[4]["camera"] = "x"
    (tmp_path / "outside.png").write_bytes((out / rows[5]["file"]).read_bytes())
    (out / rows[5]["file"]).unlink()
    (out / rows[5]["file"]).symlink_to(tmp_path / "outside.png")
    rows[6]["label"] = 99
    (out / rows[7]["file"]).write_bytes(b"\x89PNG tampered")  # hash no longer matches
    rows[8]["file"] = "../outside.png"
    data = b"".join(json.dumps(r).encode() + b"\n" for r in rows) + b"\xff\xfe\xfa\n"
    (out / "index.jsonl").write_bytes(data)
    bfmt.sign_index(out, world["prov"], "acme", data)
    codes = {rows[0]["id"]: "UNDECODABLE", rows[1]["id"]: "EMPTY_FILE",
             rows[2]["id"]: "DECOMPRESSION_BOMB", rows[3]["id"]: "INDEX_MISSING_FIELD",
             rows[4]["id"]: "INDEX_EXTRA_FIELD", rows[5]["id"]: "PATH_ESCAPE",
             rows[6]["id"]: "LABEL_OUT_OF_RANGE", rows[7]["id"]: "HASH_MISMATCH",
             rows[8]["id"]: "PATH_ESCAPE", "line-15": "INDEX_NOT_UTF8"}
    return out, codes


def test_bad_input_is_quarantined_with_a_reason_never_dropped(world, tmp_path):
    path, codes = _bad_input_batch(world, tmp_path)
    s = ingest(path, world["store"], reference=world["ref"])
    _balance(s)
    # hash mismatches, path escapes and a bomb are attack reasons: the batch is suspect
    assert s["received"] == 15 and s["status"] == "SUSPECT" and s["exit_code"] == 4
    assert {q["id"] for q in s["quarantined_samples"]} >= set(codes)
    recs = {r["id"]: r for r in read_journal(world["store"]) if r["batch_id"] == "badin"}
    for sid, code in codes.items():
        assert recs[sid]["decision"] == "QUARANTINED" and code in recs[sid]["reasons"], sid
    assert sum(r["decision"] == "QUARANTINED" for r in recs.values()) >= len(codes)


def test_unreadable_batch_is_rejected_not_crashed(world, tmp_path):
    (tmp_path / "empty").mkdir()
    s = ingest(tmp_path / "empty", world["store"])
    assert s["status"] == "REJECTED" and s["batch_reasons"] == ["BATCH_UNREADABLE"]


_KILLER = """
import os, signal, sys
from cloud_train.ingest import gate
n = {"k": 0}
add = gate._Journal.add
def add_then_die(self, rec):
    add(self, rec)
    n["k"] += 1
    if n["k"] == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
gate._Journal.add = add_then_die
gate.ingest(sys.argv[1], sys.argv[2])
"""


def test_kill_9_mid_batch_then_rerun_balances(world, tmp_path):
    b = A.clean(tmp_path / "b", world["imgs"], world["labels"], "acme", world["prov"], "kill9")
    script = tmp_path / "killer.py"
    script.write_text(_KILLER)
    proc = subprocess.run([sys.executable, str(script), str(b.path), str(world["store"]), "17"],
                          capture_output=True, timeout=120, env={**os.environ})
    assert proc.returncode == -9
    partial = [r for r in read_journal(world["store"]) if r["batch_id"] == "kill9"]
    assert len(partial) == 17
    s = ingest(b.path, world["store"], reference=world["ref"])
    _balance(s)
    assert s["received"] == len(world["labels"])
    done = [r for r in read_journal(world["store"]) if r["batch_id"] == "kill9"]
    assert len(done) == len(world["labels"]) and done[:17] == partial
    assert ingest(b.path, world["store"], reference=world["ref"]) == s


def test_the_command_line_prints_everything_and_keeps_every_decision(world, tmp_path):
    """A command-line run ends without the interpreter's teardown: its summary, exit code
    and journal must all be whole; called in a process, ``main`` returns instead."""
    from roadshield.cli import main

    b = A.clean(tmp_path / "b", world["imgs"], world["labels"], "acme", world["prov"], "cli-x")
    proc = subprocess.run([sys.executable, "-m", "roadshield.cli", "-q", "data", "ingest",
                           str(b.path), "--store", str(world["store"]), "--json"],
                          capture_output=True, text=True, timeout=120)
    s = json.loads(proc.stdout)
    assert proc.returncode == s["exit_code"] and s["received"] == len(world["labels"])
    done = [r for r in read_journal(world["store"]) if r["batch_id"] == "cli-x"]
    assert len(done) == s["received"]
    again = main(["-q", "data", "ingest", str(b.path), "--store", str(world["store"])])
    assert again == s["exit_code"]  # the same batch again: every decision found, none redone


def test_quarantine_list_show_release_never_deletes(world, tmp_path):
    store = world["store"]
    imgs, labels = world["imgs"][:14].copy(), world["labels"][:14].copy()
    imgs[3] = 0  # flat black: out of range
    A.clean(tmp_path / "q", imgs, labels, "acme", world["prov"], "qrel")
    ingest(tmp_path / "q", store, reference=world["ref"])
    mine = [r for r in qstore.quarantined(store) if r["batch_id"] == "qrel"]
    assert "qrel-000003" in {r["id"] for r in mine}
    rec = qstore.find(store, "qrel-000003")
    png = Path(qstore.export(store, rec["key"], tmp_path / "x.png"))
    assert bfmt.sha256_hex(png.read_bytes()) == rec["sha256"]
    qstore.release(store, rec["key"], "checked by hand", "2026-06-01T00:00:00Z")
    assert "qrel-000003" not in {r["id"] for r in qstore.quarantined(store)}
    assert qstore.find(store, "qrel-000003")["released"]
    assert read_object(store, rec) == png.read_bytes()  # still there after the release
    assert "qrel-000003" in {r["id"] for r in qstore.accepted_samples(store)}


def test_cli_verbs(world, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_ingest_parsers(parser.add_subparsers(dest="data_cmd", required=True))
    root_pem = save_private_key(world["root"], tmp_path / "root.pem")
    prov2 = generate_private_key()
    prov_pem = save_private_key(prov2, tmp_path / "p2.pem")

    def run(*argv):
        args = parser.parse_args([str(a) for a in argv])
        return args.func(args)

    assert run("sources", "add", "cli-prov", "--public-key", f"{prov_pem}.pub", "--root-key",
               root_pem, "--store", world["store"]) == 0
    assert run("sources", "list", "--store", world["store"], "--json") == 0
    assert "cli-prov" in capsys.readouterr().out
    bfmt.make_batch(tmp_path / "b", world["imgs"][:14], world["labels"][:14], "cli-prov",
                    prov2, "cli1")
    code = run("ingest", tmp_path / "b", "--store", world["store"], "--json")
    s = json.loads(capsys.readouterr().out)
    assert code == s["exit_code"] and code in (0, 3) and s["received"] == 14
    assert run("sources", "revoke", "cli-prov", "--root-key", root_pem, "--store",
               world["store"]) == 0
    bfmt.make_batch(tmp_path / "b2", world["imgs"][:14], world["labels"][:14], "cli-prov",
                    prov2, "cli2")
    assert run("ingest", tmp_path / "b2", "--store", world["store"]) == 2
    assert run("quarantine", "list", "--store", world["store"], "--all") == 0


def test_cli_init_reference_and_show_export(world, tmp_path, capsys):
    from roadshield_base.trust import save_public_key

    parser = argparse.ArgumentParser()
    add_ingest_parsers(parser.add_subparsers(dest="data_cmd", required=True))

    def run(*argv):
        args = parser.parse_args([str(a) for a in argv])
        return args.func(args)

    pub = save_public_key(world["root"].public_key(), tmp_path / "root.pub")
    store = tmp_path / "s"
    assert run("sources", "init", "--root-pub", pub, "--store", store) == 0
    assert run("reference", "--store", store, "--synth-per-class", 12, "--embed-epochs", 1,
               "--embed-min-steps", 5) == 0
    assert Reference.load(store / "reference").features.shape == (168, 859)
    imgs = world["imgs"][:3].copy()
    imgs[1] = 255  # flat white: quarantined as out of range
    A.clean(tmp_path / "b", imgs, world["labels"][:3], "acme", world["prov"], "showx")
    ingest(tmp_path / "b", world["store"], reference=world["ref"])
    rec = next(r for r in qstore.quarantined(world["store"]) if r["id"] == "showx-000001")
    capsys.readouterr()
    assert run("quarantine", "show", rec["key"], "--store", world["store"], "--export",
               tmp_path / "q.png", "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["key"] == rec["key"] and shown["reasons"] == rec["reasons"]
    assert bfmt.sha256_hex((tmp_path / "q.png").read_bytes()) == rec["object"]
