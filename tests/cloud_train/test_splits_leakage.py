"""Leakage attacks against the detector, and the `roadshield data` split verbs end to end."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from cloud_train.gtsrb import load_gtsrb, write_split
from cloud_train.render import image_rng, render_dataset, render_sign
from cloud_train.splits.audit import write_metrics, write_predictions
from cloud_train.splits.cli import add_split_parsers
from cloud_train.splits.leakage import (
    check_leakage,
    future_dated_attack,
    leakage_attack,
    plant_future_dated,
)
from cloud_train.splits.variants import LEAK_TARGETS, make_variant


def _renders(n: int, seed: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    labels = np.arange(n) % 14
    imgs = np.stack([render_sign(int(k), image_rng(seed, split, int(k), i))
                     for i, k in enumerate(labels)])
    return imgs, labels


def test_planted_test_rows_and_variants_are_caught() -> None:
    tr_x, tr_y = _renders(400, 11, "train")
    te_x, te_y = _renders(200, 11, "test")
    res = leakage_attack(tr_x, tr_y, te_x, te_y, per_kind=100, seed=0)
    print(res)
    for kind, target in LEAK_TARGETS.items():
        assert res["kinds"][kind]["recall"] >= target, (kind, res["kinds"][kind])
    assert res["clean_wrongly_flagged"] == 0


def test_clean_split_has_no_false_leaks_and_mirrored_crops_leak() -> None:
    """Distinct renders of the same 14 signs on both sides: no test row may be joined to a
    train row. Then mirrors and 90% crops of test rows copied into train are reported from
    both sides, by index."""
    tr_x, _ = _renders(2100, 13, "train")  # the red team's quick sizes: 150 / 30 per class
    te_x, _ = _renders(420, 13, "test")
    rep = check_leakage(tr_x, te_x)
    print(f"clean split: {len(rep.leaked_test)} of {rep.n_test} test rows joined to train")
    assert rep.clean and not len(rep.leaked_test)
    rng = np.random.default_rng(3)
    copies = [make_variant(k, te_x[i], rng) for k in ("hflip", "crop90") for i in range(40)]
    rep = check_leakage(np.concatenate([tr_x, np.stack(copies)]), te_x)
    caught_train = np.isin(2100 + np.arange(80), rep.leaked_train)
    assert caught_train[:40].mean() >= 0.95 and caught_train[40:].mean() >= 0.95
    assert set(rep.leaked_test.tolist()) <= set(range(40)) and len(rep.leaked_test) >= 38
    assert np.all(rep.leaked_train >= 2100)  # no clean train row flagged
    assert rep.to_dict()["leaked_test"] == rep.leaked_test.tolist()


def test_future_dated_samples_are_caught() -> None:
    tr_x, _ = _renders(60, 12, "train")
    te_x, _ = _renders(30, 12, "test")
    cutoff = 1_700_000_000.0
    times = cutoff - (1 + np.arange(60)) * 3600.0
    times, idx = plant_future_dated(times, cutoff, 6, seed=0)
    rep = check_leakage(tr_x, te_x, train_times=times, cutoff=cutoff)
    assert rep.future_train.tolist() == idx.tolist()
    assert not rep.clean
    res = future_dated_attack(tr_x, te_x, cutoff - (1 + np.arange(60)) * 3600.0, cutoff, 6)
    assert res["caught"] == res["sent"] == 6 and res["clean_wrongly_flagged"] == 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_split_parsers(p.add_subparsers(dest="cmd", required=True))
    return p


def _run(*argv: str) -> int:
    args = _parser().parse_args(list(argv))
    return int(args.func(args))


@pytest.fixture(scope="module")
def leaky(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("leaky")
    render_dataset(root, 12, 4, seed=5, classes=("stop", "yield", "no_entry"), progress=False)
    train, test = load_gtsrb(root, "train"), load_gtsrb(root, "test")
    imgs = np.concatenate([train.images, test.images[:3]])  # three test rows copied into train
    labels = np.concatenate([train.labels, test.labels[:3]])
    write_split(imgs, labels, train.class_names, root, "train")
    return root


def test_cli_dedup_flags_leak_and_split_removes_it(leaky: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    assert _run("dedup", str(leaky), "--json") == 3
    assert '"clusters_spanning_train_test"' in capsys.readouterr().out
    out = tmp_path / "resplit"
    assert _run("split", str(leaky), "--out", str(out), "--test-fraction", "0.25") == 0
    assert (out / "gtsrb" / "split_manifest.json").is_file()
    assert _run("dedup", str(out)) == 0


def test_cli_temporal_split(leaky: Path, tmp_path: Path) -> None:
    train, test = load_gtsrb(leaky, "train"), load_gtsrb(leaky, "test")
    paths = list(train.paths) + list(test.paths)
    times = tmp_path / "times.csv"
    times.write_text("path;time\n" + "".join(
        f"{p.resolve().relative_to(leaky.resolve()).as_posix()};{1000 + i}\n"
        for i, p in enumerate(paths)))
    out = tmp_path / "temporal"
    assert _run("split", str(leaky), "--out", str(out), "--temporal", "1030",
                "--times", str(times)) == 0
    assert len(load_gtsrb(out, "train")) + len(load_gtsrb(out, "test")) == len(paths)


def test_cli_seal_and_audit(leaky: Path, tmp_path: Path) -> None:
    import shutil

    from roadshield_base.trust import generate_private_key, save_private_key

    data = tmp_path / "data"  # sealing removes the plaintext test split: seal a copy
    shutil.copytree(leaky, data)
    key = tmp_path / "k.key"
    log_key = save_private_key(generate_private_key(), tmp_path / "log.pem")
    assert _run("seal", str(data), "--key", str(key), "--new-key", "--out",
                str(tmp_path / "sealed"), "--log-key", str(log_key)) == 0
    assert (tmp_path / "sealed" / "sealed.bin").is_file()
    assert (tmp_path / "sealed" / "openings.jsonl").is_file()
    pred, met = tmp_path / "p.json", tmp_path / "m.json"
    write_predictions(pred, ["a", "b", "c"], [0, 1, 2], [0, 1, 1], "a" * 64, 3)
    write_metrics(met, pred)
    assert _run("audit", str(pred), str(met)) == 0
    met.write_text(met.read_text().replace('"accuracy": 0.6666666666666666', '"accuracy": 1.0'))
    assert _run("audit", str(pred), str(met), "--json") == 3
