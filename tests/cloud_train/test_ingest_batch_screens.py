"""The batch trigger screen: correct-label triggers found per class against the reference,
clean batches (a mixed one, a single-class one) left alone, and the pieces it rests on.

Scale: a reference of 80 renders per class and batches of 40 per class (3 % of the batch is
17 images of one class). The full-size figures come from ``scripts/bench_ingest.py
--attacks`` and ``roadshield redteam data``; the floors here leave room for small samples.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from ingest_world import gate_world

from cloud_train.ingest import attacks as A
from cloud_train.ingest import batch_screens as S
from cloud_train.ingest import forest
from cloud_train.ingest.batch import read_batch
from cloud_train.ingest.gate import ingest, read_records, store_paths
from cloud_train.render import image_rng, render_sign
from roadshield_base.errors import ConfigError, DatasetError

# surrogate flips held: 2 of 17 here for surrogate seeds 1-3 (this world's label network is
# small: 30 batches of 32); 12 of 14 at `roadshield redteam data --scale quick`
FLIP_FLOOR = 0.05


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = gate_world(tmp_path_factory.mktemp("batch_screens"))
    w["bimgs"], w["blabels"] = A.render_images(40, seed=31)
    return w


def _held(world, atk):
    s = ingest(atk.path, world["store"], reference=world["ref"])
    recs = read_records(store_paths(world["store"])["journal"] / f"{s['index_sha256']}.jsonl")
    held = {r["id"] for r in recs.values() if "TRIGGER_CLUSTER" in r["reasons"]}
    return s, held


# ---------------------------------------------------------------- the attacks, end to end
@pytest.mark.parametrize("kind,target,floor", [
    ("triangle", 3, 0.9), ("blend", 8, 0.9),
    # SIG's stripes are weaker in the residual of high-contrast images: 821 of 840 held at
    # full size (scripts/bench_ingest.py --attacks --cl-targets all)
    ("sig", 5, 0.8)])
def test_correct_label_triggers_at_3_percent_are_held(world, kind, target, floor):
    imgs, labels = world["bimgs"], world["blabels"]
    atk = A.correct_label_trigger(world["dir"] / f"cl-{kind}", imgs, labels, "acme",
                                  world["prov"], f"cl-{kind}", kind, 0.03, target=target)
    assert len(atk.bad_ids) == round(0.03 * len(labels)) == 17
    s, held = _held(world, atk)
    assert len(held & atk.bad_ids) / len(atk.bad_ids) >= floor, s["trigger_screen"]
    clean = set(atk.ids) - atk.bad_ids
    assert len(held & clean) / len(clean) <= 0.01
    assert s["status"] == "SUSPECT" and s["exit_code"] == 4  # an attack reason
    assert s["trigger_screen"]["flagged"] == [target]
    row = next(r for r in s["trigger_screen"]["classes"] if r["class"] == target)
    assert row["lambda"] >= row["threshold"] and row["held"] == len(held)


def test_the_recovered_trigger_lies_where_the_triangle_was_stamped(world):
    imgs, labels = world["bimgs"], world["blabels"]
    atk = A.correct_label_trigger(world["dir"] / "box", imgs, labels, "acme", world["prov"],
                                  "box", "triangle", 0.03, target=11)
    s, _ = _held(world, atk)
    row = next(r for r in s["trigger_screen"]["classes"] if r["class"] == 11)
    r0, c0, r1, c1 = row["trigger_box"]
    # add_triangle: a 6 px triangle on the bottom rows 24-30, columns 13-19
    assert r0 >= 20 and r1 <= 32 and c0 >= 9 and c1 <= 23, row["trigger_box"]


def test_a_clean_batch_and_a_clean_single_class_batch_are_not_held(world):
    clean = A.clean(world["dir"] / "clean", world["bimgs"], world["blabels"], "acme",
                    world["prov"], "clean")
    s, held = _held(world, clean)
    assert not held and s["trigger_screen"]["flagged"] == [] and s["status"] != "SUSPECT"
    assert len(s["trigger_screen"]["classes"]) == 14
    # one camera that sees only stop signs: 200 of class 6, compared with that class only
    imgs = np.stack([render_sign(6, image_rng(77, "train", 6, i)) for i in range(200)])
    one = A.clean(world["dir"] / "stops", imgs, np.full(200, 6), "acme", world["prov"],
                  "stops")
    s, held = _held(world, one)
    assert not held and s["status"] in ("ACCEPTED", "QUARANTINED_SOME"), s["reason_counts"]
    assert s["quarantined"] <= 0.02 * 200, s["reason_counts"]


def test_surrogate_flips_go_to_the_most_ambiguous_samples(world):
    imgs, labels = world["bimgs"], world["blabels"]
    # the attacker's own network, trained on its own renders (small, for speed)
    surrogate = A.train_surrogate(per_class=20, seed=1, min_steps=40)
    post = surrogate(imgs)
    atk = A.surrogate_label_flip(world["dir"] / "sflip", imgs, labels, "acme", world["prov"],
                                 "sflip", 0.03, surrogate=surrogate)
    idx = sorted(atk.ids.index(i) for i in atk.bad_ids)
    rows = np.arange(len(labels))
    other = post.copy()
    other[rows, labels] = -1
    margin = post[rows, labels] - other.max(axis=1)
    assert idx == sorted(np.argsort(margin, kind="stable")[:17].tolist())
    sent = {r.sample_id: r.fields["label"] for r in read_batch(atk.path).rows}
    assert all(sent[atk.ids[i]] == other[i].argmax() != labels[i] for i in idx)
    r = A.score(atk, world["store"], world["ref"])
    assert r["bad_stopped"] >= FLIP_FLOOR * r["bad_sent"], r
    assert r["clean_stopped"] <= 0.02 * r["clean_sent"], r


# ---------------------------------------------------------------- the pieces
def test_residuals_are_the_image_minus_its_opencv_gaussian_blur():
    imgs, _ = A.render_images(2, seed=3)
    got = S.residuals(imgs)
    for i, img in enumerate(imgs):  # the reference: OpenCV, one image at a time
        f = img.astype(np.float32)
        r = (f - cv2.GaussianBlur(f, (5, 5), 1.0, borderType=cv2.BORDER_REFLECT_101)).ravel()
        np.testing.assert_allclose(got[i], r / np.linalg.norm(r), atol=1e-6)
    with pytest.raises(DatasetError, match="32 x 32"):
        S.residuals(np.zeros((2, 16, 16, 3), np.uint8))


@pytest.mark.parametrize("max_exact", [400, 16])  # exact, and the randomised subspace
def test_contrast_recovers_a_direction_shared_by_some_rows(max_exact):
    rng = np.random.default_rng(0)
    d, m = 3072, 30

    def unit(x):
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    planted = unit(rng.standard_normal((1, d)))[0]
    b = rng.standard_normal((120, d))
    b[:m] = b[:m] / np.linalg.norm(b[:m], axis=1, keepdims=True) * 0.7 * np.sqrt(d) \
        + planted * np.sqrt(d)  # the shared part is about 2/3 of those rows' energy
    r = unit(rng.standard_normal((200, d)))
    cfg = S.TriggerScreenConfig(max_exact=max_exact, subspace=64)
    with S.single_thread_native():
        lam, v = S.contrast(unit(b), r, cfg)
        lam0, _ = S.contrast(unit(rng.standard_normal((120, d))), r, cfg)
    assert abs(float(v @ planted)) > 0.95
    assert 0.5 * m < lam < m and lam0 < 3, (lam, lam0)  # lambda counts rows times share


def test_calibration_and_config_checks():
    imgs, labels = A.render_images(16, seed=4)
    cal = S.calibrate(imgs, labels)
    assert {n for _, n, _ in cal["points"]} == {8} and cal["k"] > 0
    assert all(lam <= S.null_lambda(cal["k"], n) + 1e-9 for _, n, lam in cal["points"])
    five = np.concatenate([np.flatnonzero(labels == c)[:5] for c in range(14)])
    with pytest.raises(DatasetError, match="16 or more"):
        S.calibrate(imgs[five], labels[five])
    with pytest.raises(ConfigError):
        S.TriggerScreenConfig(margin=0.5).check()


def test_isolation_forest_arrays_score_like_scikit_learn():
    from sklearn.ensemble import IsolationForest

    rng = np.random.default_rng(1)
    x = rng.standard_normal((600, 20)).astype(np.float32)
    f = IsolationForest(n_estimators=25, random_state=0).fit(x)
    y = np.vstack([rng.standard_normal((50, 20)), 5 * rng.standard_normal((5, 20))])
    np.testing.assert_allclose(forest.score_samples(forest.to_arrays(f), y),
                               f.score_samples(y), rtol=0, atol=1e-12)
    with pytest.raises(DatasetError):
        forest.score_samples({}, y)


def test_neighbours_are_the_exact_top_k(world):
    ref = world["ref"]
    emb = ref._embed(world["bimgs"][:200])[0]
    got = ref._neighbours(emb, block=8)
    sims = emb @ ref.fit_emb.T
    kth = np.sort(sims, axis=1)[:, -ref.cfg.k]
    picked = np.take_along_axis(sims, got, axis=1)
    assert got.shape == (200, ref.cfg.k) and (picked >= kth[:, None] - 1e-6).all()


def test_a_cached_reference_screens_without_torch_or_scikit_learn(world, tmp_path):
    folder = store_paths(world["store"])["reference"]
    meta = json.loads((folder / "reference.json").read_text())
    assert {"derived_sha256", "derived_of", "embed_sha256"} <= set(meta)
    np.save(tmp_path / "x.npy", world["bimgs"][:60])
    np.save(tmp_path / "y.npy", world["blabels"][:60])
    code = ("import sys, numpy as np; from cloud_train.ingest.reference import Reference; "
            f"r = Reference.load({str(folder)!r}); x = np.load({str(tmp_path / 'x.npy')!r}); "
            f"y = np.load({str(tmp_path / 'y.npy')!r}); "
            "from cloud_train.ingest.screens import image_features; "
            "r.screen(image_features(x), y, x); r.trigger_screen(x, y); "
            "print(r.label_threshold, 'torch' in sys.modules, 'sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    engine = world["ref"]._embed.engine
    assert float(out[0]) == pytest.approx(world["ref"].label_threshold, abs=1e-6)
    assert out[2] == "False" and out[1] == str(engine == "torch"), (out, engine)


def test_an_altered_fitted_state_is_refitted_not_trusted(world, tmp_path):
    import shutil

    from cloud_train.ingest.reference import DERIVED_NAME, Reference
    from roadshield_base.trust import sha256_hex

    folder = tmp_path / "reference"
    shutil.copytree(store_paths(world["store"])["reference"], folder)
    path = folder / DERIVED_NAME
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    ref = Reference.load(folder)  # refitted from the images (the network's cache still fits)
    assert not ref.embed_trained and ref._features is not None
    meta = json.loads((folder / "reference.json").read_text())
    assert meta["derived_sha256"] == sha256_hex(path.read_bytes()) != sha256_hex(bytes(data))
    assert ref.label_threshold == pytest.approx(world["ref"].label_threshold, abs=1e-6)
    assert ref.trigger_null["k"] == pytest.approx(world["ref"].trigger_null["k"])
    assert Reference.load(folder)._features is None  # the rewritten state is used again


def test_attack_builders():
    img = np.full((32, 32, 3), 40, np.uint8)
    tri = A.add_triangle(img)
    changed = np.argwhere((tri != img).any(axis=2))
    assert changed[:, 0].min() >= 24 and changed[:, 0].max() == 30  # bottom rows
    assert abs(changed[:, 1].mean() - 15.5) <= 1  # centred
    assert (tri[changed[:, 0], changed[:, 1]] == A.TRIANGLE_COLOUR).all()
    sig = A.add_sig(img).astype(int) - 40  # Barni et al.: 20 sin(2 pi j 6 / 32)
    np.testing.assert_array_equal(sig[5, :, 1], np.rint(20 * np.sin(2 * np.pi * np.arange(32)
                                                                       * 6 / 32)))
    from cloud_train.backdoor.triggers import Trigger, apply_trigger

    imgs, labels = A.render_images(1, seed=5)
    np.testing.assert_array_equal(  # the same blend as stage 3's trigger
        A.stamp("blend", imgs, seed=3),
        apply_trigger(imgs, Trigger("blend", 0, alpha=0.1, pattern="random", seed=3)))
    with pytest.raises(ConfigError):
        A.stamp("glitter", imgs)
    with pytest.raises(DatasetError, match="target class 20"):
        A.correct_label_trigger(Path("/nonexistent"), imgs, labels, "acme", None, "x", "sig",
                                target=20)
