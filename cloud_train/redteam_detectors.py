"""Detector rows of ``roadshield redteam inference``: how much of the attack the input
detectors of ``edge_runtime.detectors`` see, and what is left once the attacker knows them.

Everything is scored the way the edge scores it: the NumPy ``DetectorSet`` read from the
teacher's ONNX metadata (fitted by ``distill.detector_fit`` on the *train* split, thresholds
at its nominal false-positive rate, 5 %) on the outputs of the exported ONNX model run by
``OnnxRuntimeRunner`` on the CPU. A crop is flagged by a detector when its score is
strictly greater than the fitted threshold; "either" flags it when any detector does (the
``DetectorSet``'s OR). Attacks are white-box on the torch teacher the ONNX file was exported
from; an adversarial example is *successful* when the ONNX model's argmax is not its label.

Protocol:

1. Clean images: ``images`` of the data set's **test** split (never seen by the detectors'
   fit or calibration), stratified: ``images // C`` per class, the remainder one more each
   to the first classes of a seeded permutation; a class with fewer test images gives all
   it has. The images are loaded at the model's input size as float32 ``v / 255``. Only
   those the ONNX model classifies right are kept: they are the clean set of every
   figure below and the starting points of every attack.
2. Non-adaptive attacks on the kept images, untargeted, L-inf: FGSM, PGD
   (``cloud_train.attacks.pgd_linf``: ``pgd_steps`` steps of ``2.5 * eps / pgd_steps``, one
   random start seeded with ``seed``) and APGD-CE (``cloud_train.strong_attacks.apgd``,
   ``apgd_steps`` steps, one restart, seed ``seed``), each at eps 2, 4 and 8/255. The
   adversarial images stay float32 (not rounded to 8 bits).
3. Figures per detector and for "either", successful adversarial examples (positives) vs
   the kept clean images (negatives):
   ``detection`` (``detected`` of ``n``): share of positives flagged at the fitted
   threshold; ``fpr`` (``false_positives`` of ``clean``): share of clean images flagged at
   the fitted threshold, **measured** here (the fit calibrates on train-split images the
   model trained on, so it may run above the nominal rate); ``detection_at_fpr``: share of
   positives flagged at a threshold **re-set on these clean images** so that at most
   ``floor(0.05 * clean)`` of them are flagged (``distill.detector_fit.threshold_at_fpr``'s
   rule; ``fpr_at_threshold`` is the clean rate it gives, at most 5 %); ``auc``: ROC AUC of
   positives vs negatives (the Mann-Whitney statistic: P(positive score > clean score) plus
   half the ties). For "either" the score behind the re-set threshold and the AUC is
   ``max_k s_k / t_k`` over the detectors' scores s_k and fitted thresholds t_k (a
   threshold <= 0 counts as the smallest positive float32): at 1 it flags exactly what the
   OR flags. Every figure is None when it has nothing to count.
4. The sticker: the edge loop (``edge_runtime.loop.build_loop`` with the onnxruntime
   backend and ``detect="squeeze,mahalanobis"``) runs over the clean drive and each
   stickered drive of ``cloud_train.demo_drives.drive_sources(seed + 1, clean_frames,
   sticker_frames, folder)``, locating and classifying every frame (``EdgeLoop.classify``)
   and reading the crop of the sign (the first candidate with IoU >= 0.5 to the frame's
   truth box, among the ``max_rois`` classified, as ``TruthScorer`` matches them) with its
   probabilities and detector scores from ``EdgeLoop.last_crops``. Negatives: every such
   crop of the clean drive. Positives: the stickered crops read as the sticker's target
   (``sticker.json``; a sticker without a target: read as anything but its sign), and,
   separately, all stickered crops.
5. Adaptive attacks (Carlini & Wagner 2017; Tramer et al. 2020), at eps 8/255 on a
   stratified subset of ``adaptive_images`` kept images, one per attacked set: squeezing,
   Mahalanobis, and both. Each is PGD from the clean image, ``adaptive_steps`` signed
   steps of ``2.5 * eps / adaptive_steps`` *minimising*
   ``CE(logits, t) + lambda * sum_k s_k(x) / t_k`` over the attacked detectors, t the
   clean image's highest-scoring wrong class (fixed), t_k the fitted thresholds. The
   torch scores are the detectors' own formulas: Mahalanobis ``min_c (f - mu_c)^T P (f -
   mu_c)`` on ``SignNet.embed`` with the means and precision decoded from the metadata;
   feature squeezing the max L1 distance of the softmax of x and of each squeezed copy,
   the squeezers run exactly (the same NumPy sanitizers) in the forward pass and as the
   identity in the backward pass (BPDA, Athalye et al. 2018). Every iterate (the start and
   after each step) is judged with the torch scores; per image the attack returns the best
   one: misclassified and unflagged by the attacked detectors first, then misclassified,
   then any; ties go to the lowest ``sum_k s_k / t_k``. The returned images are then
   scored like any other (ONNX model, NumPy detectors). Per lambda: ``success``,
   the detection left among the successful ones (figures of 3.) and ``evasion``: share of
   the attacked images that end misclassified **and** unflagged by the attacked
   detectors at the fitted thresholds (``evaded`` of ``images``; ``evasion_either``: by
   neither detector). The **strongest** attack of a set is the lambda with the highest
   evasion (ties: the higher success, then the smaller lambda): what the attacker wants is
   a wrong label the defence does not flag. ``evasion_any_lambda``: share of the images
   that at least one lambda got through (an attacker choosing lambda per image, as
   Carlini & Wagner's search does).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edge_runtime.detectors import (
    DETECTOR_NAMES,
    MAHALANOBIS,
    SQUEEZE,
    DetectorSet,
    detectors_from_metadata,
)
from roadshield_base.errors import ConfigError

SCHEMA = "roadshield-redteam-detectors/1"
EITHER = "either"
FPR = 0.05
EPS_255 = (2, 4, 8)
ATTACKS = ("fgsm", "pgd", "apgd")
ADAPTIVE_EPS_255 = 8
#: the attacked detectors of each adaptive attack
ADAPTIVE_SETS: dict[str, tuple[str, ...]] = {SQUEEZE: (SQUEEZE,), MAHALANOBIS: (MAHALANOBIS,),
                                             "both": (SQUEEZE, MAHALANOBIS)}
DEFAULT_LAMBDAS = (0.03, 0.1, 0.3, 1.0, 3.0)
DETECT_SPEC = ",".join(DETECTOR_NAMES)
IOU = 0.5
ONNX_BATCH = 256

Scores = dict[str, np.ndarray]


# --- figures (NumPy) ------------------------------------------------------------------------

def roc_auc(positives: Sequence[float] | np.ndarray,
            negatives: Sequence[float] | np.ndarray) -> float | None:
    """ROC AUC of positive vs negative scores (higher = more suspicious): the share of
    (positive, negative) pairs with the positive scoring higher, ties counting one half.
    Infinite scores are ordered like any other; None when either side is empty."""
    pos = np.asarray(positives, dtype=np.float64).ravel()
    neg = np.sort(np.asarray(negatives, dtype=np.float64).ravel())
    if not pos.size or not neg.size:
        return None
    if np.isnan(pos).any() or np.isnan(neg).any():
        raise ConfigError("a detector score is NaN", "NaN scores cannot be ranked")
    below = np.searchsorted(neg, pos, side="left")
    at_or_below = np.searchsorted(neg, pos, side="right")
    wins = below.sum() + 0.5 * (at_or_below - below).sum()
    return float(wins / (pos.size * neg.size))


def threshold_for_fpr(clean: Sequence[float] | np.ndarray, fpr: float = FPR) -> float | None:
    """The threshold at which at most ``floor(fpr * n)`` of the n clean scores are greater
    (``distill.detector_fit.threshold_at_fpr``'s rule; an infinite score sorts last)."""
    s = np.sort(np.asarray(clean, dtype=np.float64).ravel())
    if not s.size:
        return None
    m = min(int(np.floor(float(fpr) * s.size + 1e-9)), s.size - 1)
    return float(s[s.size - 1 - m])


def _share(count: int, of: int) -> float | None:
    return count / of if of else None


def combined_scores(scores: Mapping[str, np.ndarray], thresholds: Mapping[str, float]
                    ) -> np.ndarray:
    """``max_k s_k / t_k`` over the detectors in ``thresholds``: > 1 exactly where a
    detector flags (a threshold <= 0 is taken as the smallest positive float32)."""
    tiny = float(np.finfo(np.float32).tiny)
    parts = [np.asarray(scores[k], np.float64) / max(float(t), tiny)
             for k, t in thresholds.items()]
    return np.max(parts, axis=0)


def or_flags(scores: Mapping[str, np.ndarray], thresholds: Mapping[str, float]) -> np.ndarray:
    """Flagged by any detector in ``thresholds``: score > its threshold."""
    return np.logical_or.reduce([np.asarray(scores[k]) > t for k, t in thresholds.items()])


def _one(pos_scores: np.ndarray, neg_scores: np.ndarray, pos_flags: np.ndarray,
         neg_flags: np.ndarray, threshold: float | None) -> dict[str, Any]:
    reset = threshold_for_fpr(neg_scores)
    pos_reset = int((pos_scores > reset).sum()) if reset is not None else 0
    neg_reset = int((neg_scores > reset).sum()) if reset is not None else 0
    n, clean = len(pos_scores), len(neg_scores)
    return {"n": n, "detected": int(pos_flags.sum()), "detection": _share(int(pos_flags.sum()), n),
            "clean": clean, "false_positives": int(neg_flags.sum()),
            "fpr": _share(int(neg_flags.sum()), clean), "threshold": threshold,
            "threshold_at_fpr": reset,
            "detection_at_fpr": _share(pos_reset, n) if reset is not None else None,
            "fpr_at_threshold": _share(neg_reset, clean),
            "auc": roc_auc(pos_scores, neg_scores)}


def detector_figures(positives: Mapping[str, np.ndarray], negatives: Mapping[str, np.ndarray],
                     thresholds: Mapping[str, float]) -> dict[str, dict[str, Any]]:
    """Figures (module docstring, 3.) of each detector in ``thresholds`` and of "either"
    for positive vs negative scores by detector name."""
    names = list(thresholds)
    out = {}
    for k in names:
        p, q = np.asarray(positives[k], np.float64), np.asarray(negatives[k], np.float64)
        out[k] = _one(p, q, p > thresholds[k], q > thresholds[k], float(thresholds[k]))
    p_all = {k: np.asarray(positives[k]) for k in names}
    q_all = {k: np.asarray(negatives[k]) for k in names}
    out[EITHER] = _one(combined_scores(p_all, thresholds), combined_scores(q_all, thresholds),
                       or_flags(p_all, thresholds), or_flags(q_all, thresholds), None)
    return out


def _subset(scores: Scores, mask: np.ndarray) -> Scores:
    return {k: v[mask] for k, v in scores.items()}


def stratified(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Sorted indices of ``count`` items spread over the classes of ``labels``:
    ``count // C`` per class (C the classes present), one more each for the first
    ``count % C`` classes of a seeded permutation, random within a class; a class with
    fewer items gives them all."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if count < 1 or not classes.size:
        return np.zeros(0, np.int64)
    rng = np.random.default_rng(seed)
    extra = set(rng.permutation(classes)[: count % classes.size].tolist())
    picked = []
    for c in classes:
        want = count // classes.size + (int(c) in extra)
        members = np.flatnonzero(labels == c)
        picked.append(rng.permutation(members)[:want])
    return np.sort(np.concatenate(picked)).astype(np.int64)


def strongest(runs: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The run with the highest evasion, then the higher success, then the smaller lambda."""
    if not runs:
        return None
    return max(runs, key=lambda r: (r["evasion"] or 0.0, r["success"] or 0.0, -r["lambda"]))


# --- the ONNX model and the NumPy detectors ---------------------------------------------------

class OnnxScorer:
    """The exported model and its fitted detectors, scored as the edge scores them."""

    def __init__(self, onnx: Path) -> None:
        from edge_runtime.model_info import read_model_info
        from edge_runtime.runners.onnxruntime_runner import OnnxRuntimeRunner

        self.info = read_model_info(onnx)
        self.detectors: DetectorSet = detectors_from_metadata(
            self.info.metadata, self.info.features_name, DETECTOR_NAMES)
        missing = [k for k, t in self.detectors.thresholds.items() if t is None]
        if missing:
            raise ConfigError(f"{onnx}: detectors {missing} have no threshold",
                              "fit them with distill.detector_fit.fit_from_dataset")
        self.thresholds: dict[str, float] = {k: float(t) for k, t in
                                             self.detectors.thresholds.items() if t is not None}
        self.runner = OnnxRuntimeRunner(onnx, providers=["cpu"])

    def __enter__(self) -> OnnxScorer:
        self.runner.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.runner.deactivate()

    def score(self, x: np.ndarray | torch.Tensor) -> tuple[np.ndarray, Scores]:
        """(argmax labels (N,), {detector: (N,) scores}) of a float32 N x 3 x S x S batch."""
        a = np.ascontiguousarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor)
                                 else x, dtype=np.float32)
        preds, parts = [], {k: [] for k in self.thresholds}
        for start in range(0, len(a), ONNX_BATCH):
            logits, scores = self.detectors.infer(self.runner, a[start:start + ONNX_BATCH],
                                                  self.info.input_name, self.info.output_name)
            preds.append(np.asarray(logits).argmax(1))
            for k in parts:
                parts[k].append(scores[k])
        if not len(a):
            return np.zeros(0, np.int64), {k: np.zeros(0, np.float32) for k in parts}
        return np.concatenate(preds), {k: np.concatenate(v) for k, v in parts.items()}


# --- torch: the detectors' scores, differentiable -----------------------------------------

class _Bpda(torch.autograd.Function):
    """A squeezer exactly in the forward pass (NumPy), the identity in the backward pass."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fn: Callable[[np.ndarray], np.ndarray]
                ) -> torch.Tensor:
        out = fn(np.ascontiguousarray(x.detach().cpu().numpy(), np.float32))
        return torch.from_numpy(np.ascontiguousarray(out, np.float32)).to(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class TorchDetectors:
    """The fitted detectors as torch functions of the teacher's input (for the adaptive
    attacks): squeezers from ``detectors.squeeze``, means and precision from
    ``detectors.mahalanobis``, thresholds as fitted."""

    def __init__(self, detectors: DetectorSet) -> None:
        if detectors.squeeze is None or detectors.mahalanobis is None:
            raise ConfigError("the adaptive attacks need both detectors",
                              "fit squeeze and mahalanobis into the model's metadata")
        self.squeezers = list(detectors.squeeze.squeezers)
        self.means = torch.from_numpy(detectors.mahalanobis.means.astype(np.float32))
        self.precision = torch.from_numpy(detectors.mahalanobis.precision.astype(np.float32))
        self.thresholds = {k: float(t) for k, t in detectors.thresholds.items()
                           if t is not None}

    def scores(self, model: nn.Module, x: torch.Tensor, names: Sequence[str]
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(logits (N, C) of x, {name: (N,) score}) for the detectors ``names``; model in
        eval mode, with ``embed`` and ``classify``."""
        n = len(x)
        rows = [x]
        if SQUEEZE in names:
            rows += [_Bpda.apply(x, s) for s in self.squeezers]
        feats = model.embed(torch.cat(rows))
        logits_all = model.classify(feats)
        out: dict[str, torch.Tensor] = {}
        if SQUEEZE in names:
            p = logits_all.softmax(1).view(len(rows), n, -1)
            out[SQUEEZE] = (p[1:] - p[0]).abs().sum(2).amax(0)
        if MAHALANOBIS in names:
            d = feats[:n, None, :] - self.means[None]
            out[MAHALANOBIS] = torch.einsum("ncd,de,nce->nc", d, self.precision, d).amin(1)
        return logits_all[:n], out

    def normalised(self, scores: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``sum_k s_k / t_k`` (N,) over the scores given."""
        tiny = float(np.finfo(np.float32).tiny)
        return torch.stack([s / max(self.thresholds[k], tiny) for k, s in scores.items()]
                           ).sum(0)

    def flagged(self, scores: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([s > self.thresholds[k] for k, s in scores.items()]).any(0)


def wrong_class_targets(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each image's highest-scoring class other than its label."""
    from cloud_train.attacks import eval_mode

    with torch.no_grad(), eval_mode(model):
        return model(x).scatter(1, y[:, None], -float("inf")).argmax(1)


def better_iterate(rank: torch.Tensor, norm: torch.Tensor, best_rank: torch.Tensor,
                   best_norm: torch.Tensor) -> torch.Tensor:
    """Where an iterate beats the best so far: a higher rank (2: misclassified and
    unflagged, 1: misclassified, 0: neither), or the same rank with a lower
    ``sum_k s_k / t_k``."""
    return (rank > best_rank) | ((rank == best_rank) & (norm < best_norm))


def adaptive_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor,
                 dets: TorchDetectors, names: Sequence[str], lam: float, eps: float,
                 steps: int, alpha: float) -> torch.Tensor:
    """PGD minimising ``CE(logits, target) + lam * sum_k s_k / t_k`` over the detectors
    ``names`` in the L-inf ball; returns per image the best iterate (module docstring, 5.)."""
    from cloud_train.attacks import eval_mode

    if not names or any(k not in dets.thresholds for k in names):
        raise ConfigError(f"cannot attack detectors {list(names)}",
                          f"name some of {sorted(dets.thresholds)}")
    x = x.detach()
    if not len(x):
        return x.clone()
    x_adv = x.clone()
    best = x.clone()
    best_rank = torch.full((len(x),), -1, dtype=torch.long)
    best_norm = torch.full((len(x),), float("inf"))
    with eval_mode(model):
        for i in range(steps + 1):
            x_adv.requires_grad_(True)
            logits, scores = dets.scores(model, x_adv, names)
            norm = dets.normalised(scores)
            with torch.no_grad():
                fooled = logits.argmax(1) != y
                rank = fooled.long() + (fooled & ~dets.flagged(scores)).long()
                better = better_iterate(rank, norm, best_rank, best_norm)
                best[better] = x_adv.detach()[better]
                best_rank = torch.where(better, rank, best_rank)
                best_norm = torch.where(better, norm.detach(), best_norm)
            if i == steps:
                break
            loss = F.cross_entropy(logits, target, reduction="sum") + lam * norm.sum()
            (grad,) = torch.autograd.grad(loss, x_adv)
            with torch.no_grad():
                x_adv = x_adv.detach() - alpha * grad.sign()
                x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)
    return best.detach()


# --- the rows -----------------------------------------------------------------------------

def _attack(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
            pgd_steps: int, apgd_steps: int, seed: int) -> torch.Tensor:
    from cloud_train.attacks import fgsm, pgd_linf
    from cloud_train.strong_attacks import apgd

    if name == "fgsm":
        return fgsm(model, x, y, eps)
    if name == "pgd":
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return pgd_linf(model, x, y, eps, alpha=min(1.0, 2.5 * eps / pgd_steps),
                            steps=pgd_steps)
    if name == "apgd":
        return apgd(model, x, y, eps, steps=apgd_steps, seed=seed)
    raise ConfigError(f"unknown attack {name!r}", f"use one of {', '.join(ATTACKS)}")


def _clean_images(scorer: OnnxScorer, data_dir: Path, images: int, seed: int
                  ) -> tuple[np.ndarray, np.ndarray, int, Scores]:
    """(kept images float32 NCHW, their labels, how many were sampled, their clean scores)."""
    from cloud_train.gtsrb import load_gtsrb
    from distill.detector_fit import to_batch

    info = scorer.info
    data = load_gtsrb(data_dir, "test", size=info.input_size, progress=False)
    if tuple(data.class_names) != tuple(info.class_names):
        raise ConfigError(f"{data_dir} names other classes than the model",
                          "score the model on the data set it was trained on")
    idx = stratified(data.labels, images, seed)
    x = to_batch(data.images[idx])
    y = data.labels[idx].astype(np.int64)
    preds, scores = scorer.score(x)
    keep = preds == y
    return x[keep], y[keep], len(idx), _subset(scores, keep)


def attack_row(scorer: OnnxScorer, x_adv: torch.Tensor, y: np.ndarray, clean: Scores
               ) -> dict[str, Any]:
    """Success of the adversarial images ``x_adv`` of labels ``y`` and the figures of the
    successful ones against the ``clean`` scores."""
    preds, scores = scorer.score(x_adv)
    ok = preds != y
    return {"images": len(y), "successful": int(ok.sum()), "success": _share(int(ok.sum()), len(y)),
            "detectors": detector_figures(_subset(scores, ok), clean, scorer.thresholds)}


def _drive_crops(onnx: Path, source: str) -> list[dict[str, Any]]:
    """The sign's crop in each frame of ``source`` where the loop located and classified
    it: truth class, stickered or not, the class read and the detector scores."""
    from collections import defaultdict

    from edge_runtime.locate import box_iou
    from edge_runtime.loop import build_loop

    out = []
    times: dict[str, list[float]] = defaultdict(list)
    # the loop activated its runner when it was built and releases it on exit
    with build_loop(source, onnx, backend="onnxruntime", detect=DETECT_SPEC) as loop:
        for frame in loop.source:
            truth = frame.truth
            if truth is None:
                continue
            candidates = loop.locator(frame.image)
            hits = [i for i, c in enumerate(candidates) if box_iou(c.box, truth.box) >= IOU]
            if not hits or hits[0] >= loop.max_rois:
                continue
            loop.classify(frame.image, candidates, times, frame.index)
            crops = loop.last_crops
            assert crops is not None  # classify just ran
            _, probs, scores = crops
            i = hits[0]
            out.append({"truth": truth.class_name, "stickered": bool(truth.stickered),
                        "read": loop.class_names[int(probs[i].argmax())],
                        "scores": {k: float(v[i]) for k, v in scores.items()}})
    return out


def _crop_scores(crops: Sequence[Mapping[str, Any]], names: Sequence[str]) -> Scores:
    return {k: np.array([c["scores"][k] for c in crops], np.float64) for k in names}


def _sticker_rows(onnx: Path, scorer: OnnxScorer, sticker_dirs: Mapping[str, Path], seed: int,
                  clean_frames: int, sticker_frames: int, tick: Callable[[str], None]
                  ) -> dict[str, Any]:
    from cloud_train.demo_drives import drive_sources

    names = list(scorer.thresholds)
    first = next(iter(sticker_dirs.values()))
    clean = [c for c in _drive_crops(onnx, drive_sources(seed + 1, clean_frames,
                                                         sticker_frames, first)["clean"])
             if not c["stickered"]]
    tick("sticker: clean drive crops")
    neg = _crop_scores(clean, names)
    rows = []
    for folder, path in sticker_dirs.items():
        meta = json.loads((Path(path) / "sticker.json").read_text())
        sign, target = meta["sign"], meta.get("target")
        source = drive_sources(seed + 1, clean_frames, sticker_frames, Path(path))["stickered"]
        stuck = [c for c in _drive_crops(onnx, source) if c["stickered"] and c["truth"] == sign]
        won = [c for c in stuck if (c["read"] == target if target else c["read"] != sign)]
        rows.append({"name": folder, "sign": sign, "target": target, "crops": len(stuck),
                     "successful": len(won), "success": _share(len(won), len(stuck)),
                     "detectors_successful": detector_figures(_crop_scores(won, names), neg,
                                                              scorer.thresholds),
                     "detectors_all": detector_figures(_crop_scores(stuck, names), neg,
                                                       scorer.thresholds)})
        tick(f"sticker: {folder} drive crops")
    right = sum(c["read"] == c["truth"] for c in clean)
    return {"clean_crops": len(clean), "clean_accuracy": _share(right, len(clean)),
            "clean_fpr": {k: v["fpr"] for k, v in detector_figures(neg, neg, scorer.thresholds)
                          .items()},
            "drives": rows}


def _adaptive_rows(model: nn.Module, scorer: OnnxScorer, x: torch.Tensor, y: np.ndarray,
                   clean: Scores, *, steps: int, lambdas: Sequence[float],
                   tick: Callable[[str], None]) -> dict[str, Any]:
    dets = TorchDetectors(scorer.detectors)
    eps = ADAPTIVE_EPS_255 / 255
    alpha = min(1.0, 2.5 * eps / steps)
    yt = torch.from_numpy(y)
    target = wrong_class_targets(model, x, yt)
    sets: dict[str, Any] = {}
    for set_name, attacked in ADAPTIVE_SETS.items():
        runs = []
        any_lambda = np.zeros(len(y), bool)
        for lam in lambdas:
            x_adv = adaptive_pgd(model, x, yt, target, dets, attacked, float(lam), eps, steps,
                                 alpha)
            preds, scores = scorer.score(x_adv)
            ok = preds != y
            seen = or_flags(scores, {k: scorer.thresholds[k] for k in attacked})
            seen_any = or_flags(scores, scorer.thresholds)
            evaded = int((ok & ~seen).sum())
            any_lambda |= ok & ~seen
            runs.append({"lambda": float(lam), "images": len(y), "successful": int(ok.sum()),
                         "success": _share(int(ok.sum()), len(y)),
                         "evaded": evaded, "evasion": _share(evaded, len(y)),
                         "evaded_either": int((ok & ~seen_any).sum()),
                         "evasion_either": _share(int((ok & ~seen_any).sum()), len(y)),
                         "detectors": detector_figures(_subset(scores, ok), clean,
                                                       scorer.thresholds)})
            tick(f"adaptive vs {set_name}, lambda {lam:g}")
        best = strongest(runs)
        sets[set_name] = {"attacked": list(attacked), "runs": runs,
                          "strongest_lambda": None if best is None else best["lambda"],
                          "evaded_any_lambda": int(any_lambda.sum()),
                          "evasion_any_lambda": _share(int(any_lambda.sum()), len(y))}
    return {"eps": eps, "eps_255": ADAPTIVE_EPS_255, "steps": steps, "alpha": alpha,
            "images": len(y), "lambdas": [float(v) for v in lambdas], "sets": sets}


def detector_rows(teacher_ckpt: Path, teacher_onnx: Path, data_dir: Path,
                  sticker_dirs: dict[str, Path], *, images: int, seed: int, apgd_steps: int,
                  pgd_steps: int, progress: bool, adaptive_images: int | None = None,
                  adaptive_steps: int | None = None,
                  lambdas: Sequence[float] = DEFAULT_LAMBDAS, clean_frames: int = 450,
                  sticker_frames: int = 300) -> dict[str, Any]:
    """The detector figures of the module docstring's protocol, as a JSON-ready dict.

    teacher_onnx: the teacher exported with its "features" output and fitted detectors in
    its metadata; teacher_ckpt: the checkpoint it was exported from (the attacks run on
    it). data_dir: the GTSRB-layout data set (its test split is read). sticker_dirs:
    sticker folders by name (each with its sticker.json), driven past as the red team's
    stickered drives. adaptive_images / adaptive_steps default to ``images`` /
    ``pgd_steps``.
    """
    from cloud_train.checkpoint import load_checkpoint
    from cloud_train.progress import step_ticker

    for what, v in (("images", images), ("pgd_steps", pgd_steps), ("apgd_steps", apgd_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{what}={v!r} must be a positive integer", "e.g. 200")
    if not sticker_dirs:
        raise ConfigError("no sticker folders to drive past", "pass e.g. {'targeted': DIR}")
    if not lambdas or any(not math.isfinite(float(v)) or float(v) < 0 for v in lambdas):
        raise ConfigError(f"lambdas {list(lambdas)} must be finite and >= 0", "e.g. (1.0, 3.0)")
    n_adaptive = images if adaptive_images is None else adaptive_images
    a_steps = pgd_steps if adaptive_steps is None else adaptive_steps
    for what, v in (("adaptive_images", n_adaptive), ("adaptive_steps", a_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{what}={v!r} must be a positive integer", "e.g. 50")
    model, _ = load_checkpoint(teacher_ckpt)
    if not (hasattr(model, "embed") and hasattr(model, "classify")):
        raise ConfigError(f"{teacher_ckpt} has no embed/classify",
                          "the detectors' rows need a SignNet teacher")
    total = 1 + len(ATTACKS) * len(EPS_255) + 1 + len(sticker_dirs) \
        + len(ADAPTIVE_SETS) * len(lambdas)
    with OnnxScorer(Path(teacher_onnx)) as scorer, \
            step_ticker(total, "detector rows", progress) as tick:
        x_np, y, sampled, clean = _clean_images(scorer, Path(data_dir), images, seed)
        tick("clean test images")
        x, yt = torch.from_numpy(x_np), torch.from_numpy(y)
        rows = []
        for attack in ATTACKS:
            for e in EPS_255:
                x_adv = _attack(attack, model, x, yt, e / 255, pgd_steps, apgd_steps, seed) \
                    if len(y) else x
                rows.append({"attack": attack, "eps": e / 255, "eps_255": e,
                             **attack_row(scorer, x_adv, y, clean)})
                tick(f"{attack} at {e}/255")
        stickers = _sticker_rows(Path(teacher_onnx), scorer, sticker_dirs, seed, clean_frames,
                                 sticker_frames, tick)
        sub = stratified(y, n_adaptive, seed + 1)
        adaptive = _adaptive_rows(model, scorer, x[sub], y[sub], clean, steps=a_steps,
                                  lambdas=lambdas, tick=tick)
    return {"schema": SCHEMA, "model": str(teacher_onnx), "data": str(data_dir),
            "fpr_nominal": scorer.detectors.fpr, "thresholds": scorer.thresholds,
            "detectors": list(scorer.thresholds),
            "clean": {"split": "test", "requested": images, "sampled": sampled, "kept": len(y),
                      "accuracy": _share(len(y), sampled),
                      "fpr": {k: v["fpr"] for k, v in
                              detector_figures(clean, clean, scorer.thresholds).items()}},
            "sizes": {"pgd_steps": pgd_steps, "apgd_steps": apgd_steps,
                      "adaptive_images": n_adaptive, "adaptive_steps": a_steps,
                      "clean_frames": clean_frames, "sticker_frames": sticker_frames},
            "attacks": rows, "stickers": stickers, "adaptive": adaptive}
