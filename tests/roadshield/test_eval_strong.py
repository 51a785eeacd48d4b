"""`roadshield eval --strong`: worst-case robust accuracy and the sanity checks, text and JSON."""

from __future__ import annotations

import json

import pytest

from cloud_train import pipeline
from cloud_train.checkpoint import save_checkpoint
from cloud_train.signs import SYNTHETIC_CLASSES
from roadshield.cli import main
from tests.toy_data import used_model


@pytest.fixture(scope="module")
def data_and_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("strong")
    pipeline.synth_dataset(root, train_per_class=1, test_per_class=2, progress=False)
    ckpt = root / "m.safetensors"
    save_checkpoint(used_model("signnet_tiny", SYNTHETIC_CLASSES), ckpt,
                    {"class_names": list(SYNTHETIC_CLASSES)})
    return root, ckpt


def test_strong_eval_reports_each_attack_and_the_sanity_checks(data_and_checkpoint, capsys):
    root, ckpt = data_and_checkpoint
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(root), "--strong",
                 "--apgd-steps", "3", "--square-queries", "6", "--pgd-steps", "2",
                 "--limit", "12", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    strong = metrics["strong_eval"]["strong"]
    assert strong["n"] == metrics["n"] == 12
    assert "robust_mask" not in strong
    worst = strong["robust_acc"]
    assert all(worst <= strong[f"{a}_acc"] <= strong["clean_acc"] for a in strong["attacks"])
    sanity = metrics["strong_eval"]["sanity"]
    assert {"monotonic", "unbounded", "more_steps", "black_box_not_stronger"} <= set(sanity)
    assert sanity["all_passed"] == all(v["passed"] for v in sanity.values() if isinstance(v, dict))


def test_strong_eval_text_names_the_worst_case(data_and_checkpoint, capsys):
    root, ckpt = data_and_checkpoint
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(root), "--strong",
                 "--apgd-steps", "2", "--square-queries", "3", "--pgd-steps", "1",
                 "--limit", "6"]) == 0
    out = capsys.readouterr().out
    assert "worst case" in out and "sanity unbounded" in out


def test_limit_below_one_is_refused(data_and_checkpoint, capsys):
    root, ckpt = data_and_checkpoint
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(root), "--limit", "0"]) == 2
    assert "limit" in capsys.readouterr().err
