"""Duplicate clustering: exactness of the banded index, recall on planted variants, and the
false-merge rate among distinct rendered signs."""

from __future__ import annotations

import numpy as np
import pytest

from cloud_train.render import image_rng, render_sign
from cloud_train.splits import dedup as D
from cloud_train.splits.variants import REQUIRED_KINDS, VARIANTS, make_variant
from roadshield_base.errors import ConfigError, DatasetError


@pytest.fixture(scope="module")
def renders() -> np.ndarray:
    return np.stack([render_sign(i % 14, image_rng(7, "train", i % 14, i)) for i in range(600)])


def test_pixel_sha256_ignores_container_but_not_pixels() -> None:
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    assert D.pixel_sha256(a) == D.pixel_sha256(b)
    b[0, 0, 0] = 1
    assert D.pixel_sha256(a) != D.pixel_sha256(b)
    assert D.pixel_sha256(a) != D.pixel_sha256(a.reshape(2, 8, 3))


def test_near_pairs_matches_brute_force_when_bands_exceed_threshold() -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 300, dtype=np.uint64)
    # plant neighbours at 1..8 bits from random bases
    flips = [np.bitwise_or.reduce(np.uint64(1) << rng.choice(64, k, replace=False)
                                  .astype(np.uint64)) for k in rng.integers(1, 9, 300)]
    h = np.concatenate([base, base ^ np.array(flips, np.uint64)])
    d = D.hamming(h[:, None], h[None, :])
    ii, jj = np.nonzero(np.triu(d <= 6, k=1))
    brute = set(zip(ii.tolist(), jj.tolist(), strict=True))
    found = {tuple(p) for p in D.near_pairs(h, threshold=6).tolist()}
    assert found == brute and len(brute) > 100


def test_shifted_hash_centre_is_plain_phash(renders: np.ndarray) -> None:
    s = D.shifted_phashes(renders[:40])
    assert s.shape == (40, 49)
    assert np.array_equal(s[:, 24], D.phash(renders[:40]))


def test_planted_variants_are_caught_per_kind(renders: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    src = renders[:300]
    recall = {}
    for kind in VARIANTS:
        var = np.stack([make_variant(kind, im, rng) for im in src])
        res = D.dedup(np.concatenate([src, var]))
        recall[kind] = float((res.cluster[:300] == res.cluster[300:]).mean())
    print("recall per kind:", recall)
    for kind in REQUIRED_KINDS:
        assert recall[kind] >= 0.99, (kind, recall)


def test_false_merge_rate_among_distinct_renders(renders: np.ndarray) -> None:
    res = D.dedup(renders)
    sizes = np.bincount(res.cluster)
    merged = float((sizes[res.cluster] > 1).mean())
    pair_rate = len(res.near_pairs) / (len(renders) * (len(renders) - 1) / 2)
    print(f"distinct renders merged: {merged:.3f}, pair rate {pair_rate:.2e}")
    # without the pixel check ~10% of these renders merge (same-class signs share their
    # low frequencies); with it the bench measures 0.85% on 2,000 renders
    assert pair_rate < 2e-5 and merged < 0.02
    unchecked = D.dedup(renders, verify=False)
    assert unchecked.candidates > 10 * max(len(res.near_pairs), 1)


def test_distinct_textures_never_merge() -> None:
    rng = np.random.default_rng(2)
    imgs = rng.integers(0, 256, (500, 32, 32, 3), dtype=np.uint8)
    res = D.dedup(imgs)
    assert res.n_clusters == 500 and not len(res.near_pairs)


def test_exact_duplicates_cluster_and_summary() -> None:
    rng = np.random.default_rng(3)
    imgs = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    res = D.dedup(np.concatenate([imgs, imgs[:3]]))
    assert res.n_clusters == 10 and len(res.exact_pairs) == 3
    assert sorted(len(g) for g in res.groups()) == [2, 2, 2]
    assert res.summary()["images_in_duplicate_clusters"] == 6


def test_mixed_sizes_are_hashed_after_resizing(renders: np.ndarray) -> None:
    import cv2

    big = [cv2.resize(im, (40, 40), interpolation=cv2.INTER_LINEAR) for im in renders[:20]]
    res = D.dedup(list(renders[:20]) + big)
    assert (res.cluster[:20] == res.cluster[20:]).all()


def test_bad_inputs_are_typed_errors() -> None:
    with pytest.raises(DatasetError):
        D.dedup(np.zeros((3, 32, 32), np.uint8))
    with pytest.raises(ConfigError):
        D.near_pairs(np.zeros(3, np.uint64), threshold=64)


def test_union_find_labels_are_dense_and_ordered() -> None:
    uf = D.UnionFind(6)
    uf.union(4, 1)
    uf.union(5, 3)
    assert uf.labels().tolist() == [0, 1, 2, 3, 1, 3]


def test_links_do_not_depend_on_image_order(renders: np.ndarray) -> None:
    rng = np.random.default_rng(4)
    imgs = np.concatenate([renders, np.stack([make_variant("jpeg", im, rng)
                                              for im in renders[:100]])])
    perm = rng.permutation(len(imgs))
    a = {tuple(p) for p in D.dedup(imgs).near_pairs.tolist()}
    b = {tuple(sorted((int(perm[i]), int(perm[j]))))
         for i, j in D.dedup(imgs[perm]).near_pairs.tolist()}
    assert a == b and len(a) >= 100
