"""The detectors' red-team rows: ROC AUC, detection at a fixed false-positive rate, the
"either" combination, the stratified sample, the adaptive attack's loss and the rows'
bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cloud_train.redteam_detectors import (
    EITHER,
    TorchDetectors,
    adaptive_pgd,
    attack_row,
    better_iterate,
    combined_scores,
    detector_figures,
    or_flags,
    roc_auc,
    stratified,
    strongest,
    threshold_for_fpr,
    wrong_class_targets,
)
from distill.detector_fit import fit_mahalanobis, threshold_at_fpr
from edge_runtime.detectors import DetectorSet, FeatureSqueezing, MahalanobisDetector
from roadshield_base.errors import ConfigError

# --- ROC AUC --------------------------------------------------------------------------------


def test_auc_of_hand_cases():
    assert roc_auc([3, 4], [1, 2]) == 1.0
    assert roc_auc([1, 2], [3, 4]) == 0.0
    # pairs: 0.8 beats 0.5 and 0.1, 0.4 beats 0.1 only: 3 of 4
    assert roc_auc([0.8, 0.4], [0.5, 0.1]) == 0.75
    # a tie counts one half: (0.5 + 1) / 2
    assert roc_auc([1.0], [1.0, 0.0]) == 0.75
    assert roc_auc([2, 2], [2, 2, 2]) == 0.5
    # an infinite score (non-finite logits) ranks above every finite one
    assert roc_auc([np.inf, 0.0], [1e30, -1.0]) == 0.75
    assert roc_auc([], [1.0]) is None and roc_auc([1.0], []) is None


def test_auc_agrees_with_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    pos = rng.integers(0, 8, 60).astype(float)  # integer scores: many ties
    neg = rng.integers(0, 6, 90).astype(float)
    want = roc_auc_score(np.r_[np.ones(60), np.zeros(90)], np.r_[pos, neg])
    assert roc_auc(pos, neg) == pytest.approx(want, abs=1e-12)


def test_auc_refuses_nan():
    with pytest.raises(ConfigError):
        roc_auc([np.nan], [1.0])


# --- detection at a fixed false-positive rate ------------------------------------------------


def test_threshold_for_fpr_flags_at_most_five_percent_and_matches_the_fit_rule():
    rng = np.random.default_rng(0)
    for n in (20, 99, 100, 257):
        clean = rng.normal(size=n)
        t = threshold_for_fpr(clean, 0.05)
        assert t == threshold_at_fpr(clean, 0.05)
        assert int((clean > t).sum()) == int(np.floor(0.05 * n))
    # ties at the threshold are not flagged: the rate falls below 5 %, never above
    tied = np.r_[np.zeros(90), np.ones(10)]
    assert int((tied > threshold_for_fpr(tied)).sum()) == 0
    assert threshold_for_fpr([]) is None


def test_detection_at_the_fitted_threshold_and_at_five_percent_on_these_clean_images():
    clean = {"squeeze": np.arange(100.0)}
    pos = {"squeeze": np.array([94.5, 95.5, 200.0, 10.0])}
    f = detector_figures(pos, clean, {"squeeze": 150.0})["squeeze"]
    # fitted threshold 150: one positive of four, no clean image
    assert (f["detected"], f["n"], f["detection"]) == (1, 4, 0.25)
    assert (f["false_positives"], f["fpr"]) == (0, 0.0)
    # re-set on the clean scores: 94 is the threshold that flags exactly 5 of 100
    assert f["threshold_at_fpr"] == 94.0 and f["fpr_at_threshold"] == 0.05
    assert f["detection_at_fpr"] == 0.75
    # 94.5 beats 95 clean scores, 95.5 beats 96, 200 all, 10 beats 10 and ties one
    assert f["auc"] == pytest.approx((95 + 96 + 100 + 10.5) / 400)
    # a fitted threshold below the clean scores: the measured FPR says so
    low = detector_figures(pos, clean, {"squeeze": 49.5})["squeeze"]
    assert low["fpr"] == 0.5 and low["detection"] == 0.75


def test_either_flags_what_any_detector_flags_and_its_score_crosses_one_there():
    th = {"squeeze": 0.5, "mahalanobis": 100.0}
    s = {"squeeze": np.array([0.6, 0.1, 0.1, 0.5]),
         "mahalanobis": np.array([10.0, 150.0, 20.0, 100.0])}
    assert or_flags(s, th).tolist() == [True, True, False, False]
    assert (combined_scores(s, th) > 1).tolist() == [True, True, False, False]
    clean = {"squeeze": np.array([0.0, 0.2]), "mahalanobis": np.array([1.0, 120.0])}
    e = detector_figures(s, clean, th)[EITHER]
    assert (e["detected"], e["false_positives"], e["threshold"]) == (2, 1, None)
    # a threshold of zero still flags exactly the positive scores
    zero = {"squeeze": 0.0, "mahalanobis": 100.0}
    z = {"squeeze": np.array([0.0, 1e-6]), "mahalanobis": np.array([1.0, 1.0])}
    assert (combined_scores(z, zero) > 1).tolist() == or_flags(z, zero).tolist()


def test_figures_with_nothing_to_count_are_none():
    th = {"squeeze": 0.5}
    f = detector_figures({"squeeze": np.zeros(0)}, {"squeeze": np.array([0.1, 0.9])}, th)
    for k in ("squeeze", EITHER):
        assert f[k]["detection"] is None and f[k]["detection_at_fpr"] is None
        assert f[k]["auc"] is None and f[k]["fpr"] == 0.5


# --- bookkeeping ------------------------------------------------------------------------------


def test_stratified_sample_spreads_over_classes():
    labels = np.repeat(np.arange(4), [10, 10, 10, 2])
    idx = stratified(labels, 13, seed=1)
    counts = np.bincount(labels[idx], minlength=4)
    # 13 // 4 = 3 each, one class gets the extra one; class 3 has only 2
    assert counts[3] == 2 and sorted(counts[:3].tolist()) in ([3, 3, 4], [3, 3, 3])
    assert len(set(idx.tolist())) == len(idx)
    assert stratified(labels, 13, seed=1).tolist() == idx.tolist()
    assert stratified(labels, 0, seed=1).size == 0


def test_the_strongest_run_has_the_highest_evasion_then_success_then_smaller_lambda():
    runs = [{"lambda": 0.3, "evasion": 0.2, "success": 1.0},
            {"lambda": 1.0, "evasion": 0.5, "success": 0.6},
            {"lambda": 3.0, "evasion": 0.5, "success": 0.7},
            {"lambda": 10.0, "evasion": 0.5, "success": 0.7}]
    assert strongest(runs)["lambda"] == 3.0
    assert strongest([]) is None


class _FakeScorer:
    thresholds = {"squeeze": 0.5, "mahalanobis": 10.0}

    def __init__(self, preds, scores):
        self.preds, self.scores = preds, scores

    def score(self, x):
        return self.preds, self.scores


def test_an_attack_row_counts_only_the_successful_examples():
    y = np.array([0, 1, 2, 3])
    scorer = _FakeScorer(np.array([1, 1, 0, 0]),  # images 0, 2 and 3 are fooled
                         {"squeeze": np.array([0.9, 0.9, 0.1, 0.1]),
                          "mahalanobis": np.array([1.0, 1.0, 50.0, 1.0])})
    clean = {"squeeze": np.array([0.1, 0.2]), "mahalanobis": np.array([1.0, 2.0])}
    row = attack_row(scorer, torch.zeros(4, 3, 2, 2), y, clean)
    assert (row["images"], row["successful"], row["success"]) == (4, 3, 0.75)
    d = row["detectors"]
    assert (d["squeeze"]["detected"], d["mahalanobis"]["detected"]) == (1, 1)
    assert (d[EITHER]["detected"], d[EITHER]["n"]) == (2, 3)


# --- the adaptive attack on a tiny random model -----------------------------------------------


def _toy(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat colour patches with noise; the class is the quadrant of (red, green)."""
    c = torch.rand(n, 3, 1, 1, generator=gen)
    x = (c + 0.15 * torch.rand(n, 3, 16, 16, generator=gen) - 0.075).clamp(0, 1)
    return x, (c[:, 0, 0, 0] > 0.5).long() * 2 + (c[:, 1, 0, 0] > 0.5).long()


@pytest.fixture(scope="module")
def tiny():
    """A tiny SignNet trained a few steps on the toy task, its detectors fitted on toy images
    (thresholds at the clean median, so both sides of them are populated)."""
    import torch.nn.functional as F

    from cloud_train.models import create_model

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = create_model("signnet_tiny", 4, input_size=16)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    model.train()
    for _ in range(60):
        x, y = _toy(64, gen)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    fit, fit_y = _toy(128, gen)
    with torch.no_grad():
        feats = model.embed(fit).numpy()
    means, precision = fit_mahalanobis(feats, fit_y.numpy(), 4, shrinkage=0.1)
    maha = MahalanobisDetector(means, precision)
    squeeze = FeatureSqueezing()
    clean, _ = _toy(64, gen)
    with torch.no_grad():
        maha.threshold = float(np.median(maha.score(model.embed(clean).numpy())))
        big = torch.from_numpy(squeeze.expand(clean.numpy()))
        squeeze.threshold = float(np.median(squeeze.scores_from_logits(model(big).numpy(), 64)))
    x, _ = _toy(24, gen)
    with torch.no_grad():
        y = model(x).argmax(1)  # attack what the model reads
    numpy_set = DetectorSet(squeeze, maha)
    return model, TorchDetectors(numpy_set), numpy_set, x, y


def test_the_torch_scores_are_the_numpy_detectors_scores(tiny):
    model, dets, numpy_set, x, _ = tiny
    with torch.no_grad():
        logits, s = dets.scores(model, x, ("squeeze", "mahalanobis"))
        big = torch.from_numpy(numpy_set.squeeze.expand(x.numpy()))
        want_sq = numpy_set.squeeze.scores_from_logits(model(big).numpy(), len(x))
        want_m = numpy_set.mahalanobis.score(model.embed(x).numpy())
    np.testing.assert_allclose(s["squeeze"].numpy(), want_sq, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(s["mahalanobis"].numpy(), want_m, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(logits.numpy(), model(x).detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("name", ["mahalanobis", "squeeze"])
def test_the_detector_term_lowers_the_detector_score(tiny, name):
    model, dets, _, x, y = tiny
    target = wrong_class_targets(model, x, y)
    eps = 8 / 255
    out = {lam: adaptive_pgd(model, x, y, target, dets, (name,), lam, eps, steps=10,
                             alpha=eps / 4) for lam in (0.0, 30.0)}
    with torch.no_grad():
        score = {lam: dets.scores(model, v, (name,))[1][name].mean().item()
                 for lam, v in out.items()}
        start = dets.scores(model, x, (name,))[1][name].mean().item()
    assert score[30.0] < score[0.0]
    assert score[30.0] < start
    for v in out.values():  # inside the eps ball and the image range
        assert (v - x).abs().max().item() <= eps + 1e-6
        assert v.min().item() >= 0.0 and v.max().item() <= 1.0


def test_an_iterate_is_kept_by_rank_then_by_the_lowest_detector_term():
    best_rank = torch.tensor([2, 1, 1, 0, -1])
    best_norm = torch.tensor([0.5, 3.0, 3.0, 9.0, float("inf")])
    rank = torch.tensor([1, 2, 1, 0, 0])
    norm = torch.tensor([0.1, 9.0, 2.0, 9.5, 50.0])
    # a fooled-but-flagged iterate never replaces an unflagged one, whatever its score; an
    # unflagged one replaces a flagged one; same rank: the lower score wins
    assert better_iterate(rank, norm, best_rank, best_norm).tolist() == [
        False, True, True, False, True]


def test_the_adaptive_attack_returns_no_iterate_worse_than_its_start(tiny):
    model, dets, _, x, y = tiny
    target = wrong_class_targets(model, x, y)
    assert (target != y).all()
    eps = 16 / 255
    names = ("squeeze", "mahalanobis")

    def judged(v):
        with torch.no_grad():
            logits, s = dets.scores(model, v, names)
            fooled = logits.argmax(1) != y
            return (fooled.long() + (fooled & ~dets.flagged(s)).long(),
                    dets.normalised(s))

    rank0, norm0 = judged(x)
    adv = adaptive_pgd(model, x, y, target, dets, names, 1.0, eps, steps=8, alpha=eps / 4)
    rank, norm = judged(adv)
    # the start is an iterate: each image comes back at least as good (rank, then score)
    assert ((rank > rank0) | ((rank == rank0) & (norm <= norm0 + 1e-5))).all()
    assert not torch.equal(adv, x)
    # no steps: the start comes back
    same = adaptive_pgd(model, x, y, target, dets, names, 1.0, eps, steps=0, alpha=eps)
    assert torch.equal(same, x)
    with pytest.raises(ConfigError):
        adaptive_pgd(model, x, y, target, dets, (), 1.0, eps, steps=1, alpha=eps)


@pytest.mark.parametrize("bad", [{"images": 0}, {"pgd_steps": 0}, {"adaptive_steps": 0},
                                 {"lambdas": ()}, {"lambdas": (-1.0,)}, {"sticker_dirs": {}}])
def test_detector_rows_refuses_bad_sizes_before_reading_anything(tmp_path, bad):
    from cloud_train.redteam_detectors import detector_rows

    kw = {"images": 4, "seed": 0, "apgd_steps": 2, "pgd_steps": 2, "progress": False,
          "sticker_dirs": {"targeted": tmp_path}, **bad}
    with pytest.raises(ConfigError):
        detector_rows(tmp_path / "none.safetensors", tmp_path / "none.onnx", tmp_path, **kw)
