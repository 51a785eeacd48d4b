"""The poisoning attacks against the gate's screens, at a scale that runs in seconds.

The full-size figures (2,100-sample batches, reference of 8,400, the default network) come from
``scripts/bench_ingest.py --attacks``; here the bounds leave room for small-sample noise.
"""

from __future__ import annotations

import numpy as np
import pytest

from cloud_train.ingest import attacks as A
from cloud_train.ingest.gate import build_reference, init_store, store_paths
from cloud_train.ingest.reference import Reference, ScreenConfig
from cloud_train.ingest.registry import add_source
from roadshield_base.trust import generate_private_key


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("attacks")
    root, prov = generate_private_key(), generate_private_key()
    store = d / "store"
    init_store(store, root.public_key())
    add_source(store_paths(store)["registry"], root, "acme", prov.public_key(),
               "2026-01-01T00:00:00Z")
    imgs, labels = A.render_images(150, seed=1)
    # a lighter network than the default (120 batches of 64): seconds, not a minute
    build_reference(store, imgs, labels, 14,
                    ScreenConfig(embed_epochs=1, embed_min_steps=120, embed_batch=64))
    batch_imgs, batch_labels = A.render_images(50, seed=9)
    return {"dir": d, "store": store, "prov": prov, "imgs": batch_imgs, "labels": batch_labels,
            "ref": Reference.load(store / "reference")}


def _score(world, attack):
    return A.score(attack, world["store"], world["ref"])


def test_add_trigger_is_a_small_corner_patch():
    img = np.full((32, 32, 3), 100, np.uint8)
    out = A.add_trigger(img)
    changed = np.argwhere((out != img).any(axis=2))
    assert changed.min(axis=0).tolist() == [27, 27] and changed.max(axis=0).tolist() == [30, 30]
    assert set(np.unique(out[27:31, 27:31])) == {0, 255}


@pytest.mark.parametrize("kind", ["flip3", "badnets", "junk"])
def test_poisoned_samples_are_quarantined(world, kind):
    d, imgs, labels, prov = world["dir"], world["imgs"], world["labels"], world["prov"]
    if kind == "flip3":
        atk = A.label_flip(d / kind, imgs, labels, "acme", prov, kind, 0.03, seed=1)
        floor = 0.85  # full size: 63/63 (bench); here 21 flips and a smaller reference
    elif kind == "badnets":
        atk = A.badnets(d / kind, imgs, labels, "acme", prov, kind, 0.03, seed=1)
        floor = 0.95
    else:
        atk = A.ood_junk(d / kind, imgs, labels, "acme", prov, kind, 0.03, seed=1)
        floor = 0.95
    r = _score(world, atk)
    assert r["received"] == len(labels) and r["bad_sent"] == len(atk.bad_ids) > 0
    assert r["bad_stopped"] / r["bad_sent"] >= floor, r
    assert r["clean_stopped"] / r["clean_sent"] <= 0.03, r


def test_clean_batch_has_few_false_quarantines(world):
    atk = A.clean(world["dir"] / "clean", world["imgs"], world["labels"], "acme", world["prov"],
                  "clean")
    r = _score(world, atk)
    assert r["status"] != "REJECTED" and r["clean_stopped"] / r["clean_sent"] <= 0.03, r


def test_ks_flags_a_shifted_batch_not_a_clean_one(world):
    ref = world["ref"]
    from cloud_train.ingest.screens import image_features

    clean = ref.batch_shift(image_features(world["imgs"]))
    dark = ref.batch_shift(image_features((world["imgs"] * 0.35).astype(np.uint8)))
    assert not clean["shifted"] and dark["shifted"] and dark["max_ks"] >= 0.2, (clean, dark)
    d = world["dir"] / "dark"
    atk = A.clean(d, (world["imgs"] * 0.35).astype(np.uint8), world["labels"], "acme",
                  world["prov"], "dark")
    r = _score(world, atk)
    assert r["reason_counts"].get("BATCH_DISTRIBUTION_SHIFT") == r["received"]
