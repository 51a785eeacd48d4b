"""The label screen's learned feature space: trained on trusted data only, cached, no pickles."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors import safe_open

from cloud_train.checkpoint import state_dicts_equal
from cloud_train.ingest import attacks as A
from cloud_train.ingest import reference as refmod
from cloud_train.ingest.embed import EMBED_NAME, EmbedConfig, embed, train_embedding
from cloud_train.ingest.gate import build_reference
from cloud_train.ingest.reference import Reference, ScreenConfig
from roadshield_base.errors import ConfigError, DatasetError
from roadshield_base.trust import sha256_hex

CFG = ScreenConfig(embed_epochs=6, embed_min_steps=60, embed_batch=32)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    store = tmp_path_factory.mktemp("embed")
    imgs, labels = A.render_images(30, seed=2)
    ref = build_reference(store, imgs, labels, 14, CFG)
    return {"store": store, "folder": store / "reference", "ref": ref, "imgs": imgs,
            "labels": labels}


def test_the_cache_is_a_safetensors_checkpoint_named_by_its_sha256(built):
    folder = built["folder"]
    meta = json.loads((folder / "reference.json").read_text())
    data = (folder / EMBED_NAME).read_bytes()
    assert meta["embed_sha256"] == sha256_hex(data)
    assert meta["embed_trained_on"] == built["ref"].embed_digest
    with safe_open(str(folder / EMBED_NAME), "pt") as f:  # a plain tensor file, no pickle
        assert json.loads(f.metadata()["trained_on"]) == built["ref"].embed_digest
        assert f.metadata()["arch"] == "signnet_tiny"
    assert b"\x80\x04" not in data[:8]  # no pickle protocol header


def test_load_uses_the_cache_and_never_retrains(built, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("retrained although the cache matches")

    monkeypatch.setattr(refmod, "train_embedding", boom)
    ref = Reference.load(built["folder"])
    assert not ref.embed_trained
    assert state_dicts_equal(ref.embedding, built["ref"].embedding)
    assert ref.label_threshold == pytest.approx(built["ref"].label_threshold)


def test_an_altered_cache_is_retrained_and_rewritten(built, tmp_path):
    import shutil

    folder = tmp_path / "reference"
    shutil.copytree(built["folder"], folder)
    path = folder / EMBED_NAME
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # one weight byte
    path.write_bytes(bytes(data))
    ref = Reference.load(folder)
    assert ref.embed_trained
    meta = json.loads((folder / "reference.json").read_text())
    assert meta["embed_sha256"] == sha256_hex(path.read_bytes())
    assert state_dicts_equal(ref.embedding, built["ref"].embedding)  # seeded: same weights
    assert not Reference.load(folder).embed_trained  # the rewritten cache is used


def test_a_reference_without_images_must_be_rebuilt(built, tmp_path):
    import shutil

    folder = tmp_path / "old"
    shutil.copytree(built["folder"], folder)
    meta = json.loads((folder / "reference.json").read_text())
    del meta["images_sha256"]
    (folder / "reference.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="predates the learned label screen"):
        Reference.load(folder)


def test_learned_scores_separate_true_from_flipped_labels(built):
    ref = built["ref"]
    imgs, labels = A.render_images(6, seed=11)
    flipped = (labels + 1 + np.arange(len(labels)) % 13) % 14
    good, bad = ref.label_scores(imgs, labels), ref.label_scores(imgs, flipped)
    assert good.shape == bad.shape == (len(labels),)
    assert ((good >= 0) & (good <= 1)).all()
    # even this small network (60 batches of 32 from 336 images) ranks a true label above a
    # flipped one for most pairs; the default one is measured by scripts/bench_ingest.py
    assert (good[:, None] > bad[None, :]).mean() >= 0.85
    assert (bad < ref.label_threshold).mean() >= 0.6
    assert (good < ref.label_threshold).mean() <= 0.05


def test_embed_shapes_and_config_checks(built):
    feats, probs = embed(built["ref"].embedding, built["imgs"][:5])
    assert feats.shape == (5, 64) and probs.shape == (5, 14)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    with pytest.raises(ConfigError):
        train_embedding(built["imgs"], built["labels"], 14, EmbedConfig(epochs=0))


def test_a_reference_array_is_read_as_a_view_of_its_bytes_and_never_unpickled():
    import io

    for arr in (np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
                np.asfortranarray(np.arange(12.0).reshape(3, 4)), np.zeros((0, 5), np.int64)):
        data = refmod._npy_bytes(arr)
        view = refmod._npy_view(data)
        assert view.dtype == arr.dtype and np.array_equal(view, arr)
        assert not view.flags.writeable  # the bytes that were hashed, not a copy
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="objects"):
        refmod._npy_view(buf.getvalue())
    with pytest.raises(ValueError):  # cut short
        refmod._npy_view(refmod._npy_bytes(np.arange(100))[:-8])
