"""`roadshield data open-sealed` end to end, and temporal splits timed by the ingest journal."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import torch

from cloud_train.checkpoint import save_checkpoint
from cloud_train.gtsrb import load_gtsrb, write_split
from cloud_train.models import create_model
from cloud_train.render import render_dataset
from cloud_train.splits.final_eval import predict
from cloud_train.splits.sealed import verify_log
from roadshield.cli import main
from roadshield_base.trust import generate_private_key, load_private_key, save_private_key

CLASSES = ("stop", "yield", "no_entry")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("final")
    render_dataset(d / "data", 4, 4, seed=3, classes=CLASSES, progress=False)
    test = load_gtsrb(d / "data", "test")  # read before sealing: sealing removes it
    save_private_key(generate_private_key(), d / "log.pem")
    assert main(["data", "seal", str(d / "data"), "--key", str(d / "held.key"), "--new-key",
                 "--out", str(d / "sealed"), "--log-key", str(d / "log.pem")]) == 0
    names = list(test.class_names)
    torch.manual_seed(0)
    for tag, n in (("a", 3), ("b", 3), ("wide", 4)):
        model = create_model("signnet_tiny", n)
        save_checkpoint(model, d / f"{tag}.safetensors",
                        {"class_names": names if n == 3 else [*names, "extra"]})
    return {"dir": d, "test": test}


def _open(w: dict, ckpt: str, out: str, *extra: str) -> int:
    d = w["dir"]
    return main(["data", "open-sealed", str(d / "sealed"), "--key", str(d / "held.key"),
                 "--checkpoint", str(d / f"{ckpt}.safetensors"), "--log-key",
                 str(d / "log.pem"), "--out", str(d / out), "--pgd-steps", "2", *extra])


def _log(w: dict) -> list[dict]:
    d = w["dir"]
    return verify_log(d / "sealed" / "openings.jsonl", load_private_key(d / "log.pem"))


def test_open_sealed_evaluates_once_writes_auditable_files_and_refuses_twice(world, capsys):
    d = world["dir"]
    capsys.readouterr()
    assert _open(world, "a", "eval_a", "--json") == 0
    metrics = json.loads(capsys.readouterr().out)
    pred = json.loads((d / "eval_a" / "predictions.json").read_text())
    test = world["test"]
    from cloud_train.checkpoint import load_checkpoint

    model, meta = load_checkpoint(d / "a.safetensors")
    want = predict(model, test.images)
    ids = [p.resolve().relative_to((d / "data").resolve()).as_posix() for p in test.paths]
    assert [r["id"] for r in pred["rows"]] == ids
    assert [r["label"] for r in pred["rows"]] == test.labels.tolist()
    assert [r["prediction"] for r in pred["rows"]] == want.tolist()
    assert metrics["n"] == 12 and metrics["model_sha256"] == meta["sha256"]
    assert metrics["accuracy"] == pytest.approx(float((want == test.labels).mean()))
    assert metrics["clean_acc"] == pytest.approx(metrics["accuracy"])
    assert main(["data", "audit", str(d / "eval_a" / "predictions.json"),
                 str(d / "eval_a" / "metrics.json")]) == 0
    log = _log(world)
    assert [(e["event"], e["model_sha256"]) for e in log] == [("sealed", ""),
                                                              ("open", meta["sha256"])]
    assert metrics["opening_log_head"] != "0" * 64

    # the same model again: refused, logged, nothing new written
    before = (d / "eval_a" / "predictions.json").read_bytes()
    assert _open(world, "a", "eval_a") == 2
    assert "already opened" in capsys.readouterr().err
    assert _log(world)[-1]["event"] == "refused"
    assert (d / "eval_a" / "predictions.json").read_bytes() == before
    # forcing works and is logged as such
    assert _open(world, "a", "eval_a_forced", "--force") == 0
    assert _log(world)[-1]["event"] == "forced_open"
    forced = json.loads((d / "eval_a_forced" / "metrics.json").read_text())
    assert forced["forced"] is True and forced["accuracy"] == metrics["accuracy"]


def test_a_model_for_other_classes_is_refused_before_the_set_is_opened(world, capsys):
    n_before = len(_log(world)) if (world["dir"] / "sealed" / "openings.jsonl").exists() else 0
    assert _open(world, "wide", "eval_wide") == 2
    assert "the set was not opened" in capsys.readouterr().err
    n_after = len(_log(world)) if (world["dir"] / "sealed" / "openings.jsonl").exists() else 0
    assert n_after == n_before
    assert not (world["dir"] / "eval_wide" / "predictions.json").exists()


def test_seal_removes_the_plaintext_split_and_every_reader_refuses_it(world, capsys):
    from cloud_train.gtsrb import SealedSplitError

    d = world["dir"]
    assert not (d / "data" / "gtsrb" / "GTSRB" / "Final_Test").exists()
    assert not list((d / "data").rglob("GT-final_test.csv"))
    assert load_gtsrb(d / "data", "train").labels.size == 12  # train is untouched
    with pytest.raises(SealedSplitError, match="sealed"):
        load_gtsrb(d / "data", "test")
    capsys.readouterr()
    # `eval --data` without the key is refused, before any model runs
    assert main(["eval", "--checkpoint", str(d / "a.safetensors"), "--data",
                 str(d / "data")]) == 2
    assert "sealed" in capsys.readouterr().err
    # sealing again does not re-seal (nothing is left to seal) and says where the set is
    assert main(["data", "seal", str(d / "data"), "--key", str(d / "held.key"), "--out",
                 str(d / "sealed2"), "--log-key", str(d / "log.pem")]) == 0
    assert "already sealed" in capsys.readouterr().out and not (d / "sealed2").exists()


def test_the_sealed_set_keeps_the_original_files(world):
    from cloud_train.splits.sealed import _decrypt, load_key

    d = world["dir"]
    data, _, _ = _decrypt(d / "sealed", load_key(d / "held.key"))
    names = sorted(data.files)
    assert len(names) == 13 and names[0].endswith("GT-final_test.csv")
    assert all(n.startswith("gtsrb/") for n in names)


# --- temporal split with capture times from the ingest journal ------------------------------

def _store_with_batch(d: Path, times: list[str]) -> tuple[Path, np.ndarray, np.ndarray]:
    from cloud_train.ingest import attacks as A
    from cloud_train.ingest.batch import make_batch
    from cloud_train.ingest.gate import build_reference, ingest, init_store, store_paths
    from cloud_train.ingest.reference import ScreenConfig
    from cloud_train.ingest.registry import add_source

    root, prov = generate_private_key(), generate_private_key()
    store = d / "store"
    init_store(store, root.public_key())
    add_source(store_paths(store)["registry"], root, "acme", prov.public_key(),
               "2026-01-01T00:00:00Z")
    ri, rl = A.render_images(12, seed=1)
    build_reference(store, ri, rl, 14, ScreenConfig(embed_epochs=1, embed_min_steps=10))
    imgs, labels = A.render_images(len(times) // 14, seed=5)
    make_batch(d / "batch", imgs, labels, "acme", prov, "timed", capture_times=times)
    ingest(d / "batch", store, now=datetime(2026, 2, 1, tzinfo=timezone.utc))
    return store, imgs, labels


def test_temporal_split_reads_capture_times_from_the_ingest_store(tmp_path, capsys):
    from cloud_train.ingest.store import accepted_samples

    t0 = datetime(2025, 6, 1, tzinfo=timezone.utc)
    n = 28
    times = [(t0 + timedelta(days=i)).strftime("%Y-%m-%dT%H:%M:%SZ") for i in range(n)]
    store, imgs, labels = _store_with_batch(tmp_path, times)
    ok = sorted(int(r["id"].rsplit("-", 1)[1]) for r in accepted_samples(store))
    assert len(ok) >= n // 2  # a 12-per-class reference quarantines a few clean ones
    data = tmp_path / "data"
    write_split(imgs[ok], labels[ok], tuple(str(c) for c in range(14)), data, "train")
    cut = t0 + timedelta(days=14)
    out = tmp_path / "split"
    assert main(["data", "split", str(data), "--out", str(out), "--temporal", cut.isoformat(),
                 "--store", str(store), "--crossing", "drop"]) == 0
    manifest = json.loads((out / "gtsrb" / "split_manifest.json").read_text())
    assert manifest["times_from"] == f"ingest store {store}"
    loaded = load_gtsrb(data, "train")
    day = {p.resolve().as_posix(): ok[i] for i, p in enumerate(loaded.paths)}
    for s in manifest["samples"]:
        k = day[Path(s["path"]).resolve().as_posix()]  # index k was captured on day k
        if s["split"] != "dropped":  # a near-duplicate cluster crossing the cut is dropped
            assert s["split"] == ("train" if k < 14 else "test"), (k, s)
    splits = [s["split"] for s in manifest["samples"]]
    assert splits.count("train") >= 4 and splits.count("test") >= 4, splits

    # an image the gate never accepted cannot be split by the store's times
    stranger = np.full((1, 32, 32, 3), 77, np.uint8)
    write_split(np.concatenate([imgs[ok], stranger]), np.concatenate([labels[ok], [0]]),
                tuple(str(c) for c in range(14)), data, "train")
    capsys.readouterr()
    assert main(["data", "split", str(data), "--out", str(tmp_path / "s2"), "--temporal",
                 cut.isoformat(), "--store", str(store)]) == 2
    assert "match no accepted sample" in capsys.readouterr().err
    # the CSV route still works, and the two sources exclude each other
    csv = tmp_path / "t.csv"
    csv.write_text("".join(f"{p.resolve().relative_to(data.resolve()).as_posix()};"
                           f"{1000 + i}\n" for i, p in enumerate(load_gtsrb(data, "train")
                                                                  .paths)))
    assert main(["data", "split", str(data), "--out", str(tmp_path / "s3"), "--temporal",
                 "1010", "--times", str(csv)]) == 0
    with pytest.raises(SystemExit):
        main(["data", "split", str(data), "--out", str(tmp_path / "s4"), "--temporal", "1010",
              "--times", str(csv), "--store", str(store)])
