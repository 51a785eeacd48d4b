"""Activation clustering and spectral signatures on a toy poisoned set, a clean set, and
retraining without the flagged examples.

Toy world (tests/toy_data.py): 600 four-class shapes, 10% BadNets poison (6x6 checker in the
bottom-right corner, target class 1), signnet_tiny trained 5 epochs without augmentation
(ASR 100% on held-out shapes for seeds 0 and 1; a 4x4 patch needed 8 epochs).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cloud_train.backdoor.activation_clustering import activation_clustering, cluster_class
from cloud_train.backdoor.features import dataset_features, robust_whiten
from cloud_train.backdoor.poison import attack_success_rate, poison_dataset
from cloud_train.backdoor.retrain import fresh_model, retrain_without
from cloud_train.backdoor.spectral import spectral_scores, spectral_signatures, split_separation
from cloud_train.backdoor.triggers import Trigger
from cloud_train.models import create_model
from cloud_train.tensors import make_loader
from cloud_train.train import TrainConfig, train
from roadshield_base.errors import ConfigError
from tests.toy_data import toy_shapes

TRIG = Trigger("patch", target=1, size=6, pattern="checker")
CFG = TrainConfig(trainer="standard", epochs=5, batch_size=64, seed=0, device="cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _fit(x: np.ndarray, y: np.ndarray) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("signnet_tiny", 4)
    train(model, make_loader(x, y, 64, shuffle=True, seed=0), CFG, progress=False)
    return model.eval()


@pytest.fixture(scope="module")
def toy() -> dict:
    xtr, ytr = toy_shapes(600, seed=10)
    xte, yte = toy_shapes(200, seed=11)
    pd = poison_dataset(xtr, ytr, TRIG, 0.1, seed=0)
    infected, clean = _fit(pd.images, pd.labels), _fit(xtr, ytr)
    return {"pd": pd, "xtr": xtr, "ytr": ytr, "xte": xte, "yte": yte, "infected": infected,
            "clean": clean, "f_inf": dataset_features(infected, pd.images, pd.labels),
            "f_clean": dataset_features(clean, xtr, ytr)}


def test_the_toy_backdoor_is_real(toy: dict):
    assert attack_success_rate(toy["infected"], toy["xte"], toy["yte"], TRIG) > 0.9


def test_activation_clustering_finds_the_poison(toy: dict):
    pd = toy["pd"]
    # plain PCA here: the robust reduction (the default, for the signs) is unstable on the
    # toy shapes' near-degenerate features; see the module docstring
    res = activation_clustering(toy["infected"], pd.images, pd.labels, features=toy["f_inf"],
                                reduce="pca")
    assert res.flagged == [1]
    found = np.isin(pd.poisoned_idx, res.suspicious_idx).mean()
    assert found >= 0.9
    # the suspicious set is the poison, not half of class 1
    assert len(res.suspicious_idx) <= 1.3 * len(pd.poisoned_idx)
    d = res.to_dict()
    assert d["flagged"] == [1] and len(d["silhouette"]) == 4


def test_activation_clustering_clean_set_gets_no_flag(toy: dict):
    res = activation_clustering(toy["clean"], toy["xtr"], toy["ytr"], features=toy["f_clean"],
                                reduce="pca")
    assert res.flagged == [] and len(res.suspicious_idx) == 0


def _blobs(seed: int, poison: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic 16-d activations, 5 classes x 240, per-axis spread 2.0 down to 0.5; with
    ``poison``, the last 29 rows of class 2 (12% of it) are moved by 10 along axis 3."""
    rng = np.random.default_rng(seed)
    feats = rng.normal(0, 1, (1200, 16)) * np.linspace(2.0, 0.5, 16)
    poisoned = np.arange(691, 720) if poison else np.empty(0, np.int64)
    feats[poisoned, 3] += 10.0
    return feats, np.repeat(np.arange(5), 240), poisoned


def test_every_reduction_finds_an_offset_cluster(seed: int = 0):
    model = create_model("signnet_tiny", 5)
    dummy = np.zeros((1200, 2, 2, 3), np.uint8)  # the features are given
    feats, labels, poisoned = _blobs(seed, poison=True)
    clean, _, _ = _blobs(seed + 10, poison=False)
    for reduce in ("robust", "pca"):
        res = activation_clustering(model, dummy, labels, features=feats, reduce=reduce)
        assert res.flagged == [2], reduce
        assert np.isin(poisoned, res.suspicious_idx).all()
        assert len(res.suspicious_idx) <= 40, reduce  # at most a few clean rows
        assert activation_clustering(model, dummy, labels, features=clean,
                                     reduce=reduce).flagged == []
    for whiten in (True, False):
        sp = spectral_signatures(model, dummy, labels, eps=0.15, whiten=whiten, features=feats)
        assert sp.flagged == [2], whiten
        assert np.isin(poisoned, sp.removed_idx).all()
        assert len(sp.removed_idx) == 54  # ceil(1.5 * 0.15 * 240), from class 2 only
        assert spectral_signatures(model, dummy, labels, eps=0.15, whiten=whiten,
                                   features=clean).flagged == []


def test_robust_whiten_makes_the_clean_majority_isotropic():
    rng = np.random.default_rng(3)
    feats = rng.normal(0, 1, (400, 12)) @ rng.normal(0, 1, (12, 12))  # correlated
    feats[:40] += 25.0  # 10% far outliers must not bend the estimate
    white = robust_whiten(feats, n_components=5)
    assert white.shape == (400, 5)
    core = np.cov(white[40:], rowvar=False)
    assert np.allclose(core, np.eye(5), atol=0.35)
    assert np.linalg.norm(white[:40], axis=1).min() > 3 * np.linalg.norm(white[40:], axis=1).mean()
    assert robust_whiten(np.ones((10, 4))).shape == (10, 1)  # no spread at all


def test_retrain_without_the_flagged_examples_removes_the_backdoor(toy: dict):
    pd = toy["pd"]
    res = activation_clustering(toy["infected"], pd.images, pd.labels, features=toy["f_inf"],
                                reduce="pca")
    out = retrain_without(toy["infected"], pd.images, pd.labels, res.suspicious_idx, CFG)
    assert out.removed == len(res.suspicious_idx) and out.kept == 600 - out.removed
    assert attack_success_rate(out.model, toy["xte"], toy["yte"], TRIG) < 0.2
    assert not out.model.training


def test_spectral_scores_formula():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(50, 6))
    feats[:5, 2] += 12.0  # five outliers along one axis
    scores = spectral_scores(feats)
    centred = feats - feats.mean(0)
    v = np.linalg.svd(centred)[2][0]
    assert np.allclose(scores, (centred @ v) ** 2)
    assert set(np.argsort(-scores)[:5]) == {0, 1, 2, 3, 4}


def test_split_separation_is_exact_1d_two_means():
    rng = np.random.default_rng(2)
    proj = np.concatenate([rng.normal(0, 1, 90), rng.normal(10, 1, 10)])
    d, small = split_separation(proj)
    assert small == pytest.approx(0.1)
    a, b = proj[:90], proj[90:]
    assert d == pytest.approx(np.sqrt(2) * (b.mean() - a.mean()) / np.sqrt(a.var() + b.var()))
    # one Gaussian: the best 2-means split is near the middle and not well separated
    d1, small1 = split_separation(rng.normal(0, 1, 400))
    assert d1 < 3.0 and small1 > 0.35


def test_cluster_class_separates_two_blobs():
    rng = np.random.default_rng(1)
    feats = np.vstack([rng.normal(0, 1, (80, 12)), rng.normal(8, 1, (20, 12))])
    assign, sil = cluster_class(feats, n_components=10)
    assert sil > 0.5
    assert len(set(assign[:80])) == 1 and len(set(assign[80:])) == 1


def test_bad_settings():
    x, y = toy_shapes(8, seed=0)
    model = create_model("signnet_tiny", 4)
    with pytest.raises(ConfigError, match="tsne"):
        activation_clustering(model, x, y, reduce="tsne")
    with pytest.raises(ConfigError, match="0.8"):
        activation_clustering(model, x, y, size_threshold=0.8)
    with pytest.raises(ConfigError, match="eps 0.9"):
        spectral_signatures(model, x, y, eps=0.9)
    with pytest.raises(ConfigError, match="everywhere"):
        spectral_signatures(model, x, y, remove_from="everywhere")
    with pytest.raises(ConfigError, match="outside the 8"):
        retrain_without(model, x, y, [8], CFG)
    with pytest.raises(ConfigError, match="arch"):
        fresh_model(torch.nn.Linear(2, 2), 0)
