"""Neural Cleanse (Wang et al. 2019, "Neural Cleanse: identifying and mitigating backdoor
attacks in neural networks", IEEE S&P): reverse-engineer the smallest trigger per class and
flag classes whose trigger is abnormally small.

For each candidate target class ``t`` a mask ``m`` (H x W) and a pattern ``p`` (3 x H x W),
both ``tanh(w) / 2 + 0.5`` of free parameters so they stay in [0, 1], are optimised with Adam
(betas 0.5 / 0.9, as in the authors' code; the step size decays from ``lr`` to 5% of it on a
cosine, so the masks settle instead of jittering around the cost balance) so that the
stamped image ``(1 - m) * x + m * p`` is classified as ``t`` on the defender's clean images,
minimising ``CE(f(x'), t) + cost * |m|_1``. Images whose true class is ``t`` are left out of
the loss and of the success rate (they need no trigger).

Cost schedule (section IV.B of the paper, ``cost_multiplier`` 2 as in the authors' code):
``cost`` starts at ``init_cost``; after ``patience`` consecutive steps whose mini-batch attack
success is >= ``success_threshold`` (99%) it is multiplied by ``cost_multiplier``, after
``patience`` consecutive steps below it is divided by ``cost_multiplier ** 1.5``. The best
mask is the one with the smallest L1 norm among the steps that reached the success threshold
on ``patience`` mini-batches in a row (a single lucky batch of 32 says little about the rate on
the whole set); the last mask when none did, and its ``attack_success`` then shows it. A
class stops early once its cost has gone both up and down and its best norm has not dropped
by 1% for ``early_stop`` steps (the paper's early stop; 0 turns it off).

Restarts: ``restarts`` independent random starts per class, each the full optimisation; the
class keeps the smallest mask among the starts that held the success threshold (the most
successful last mask when none did). The same procedure runs on every class. Why: the
optimisation ends in whichever basin its random start leads to. On signnet_tiny trained on
the 14 synthetic signs with a 1% BadNets poison (4 x 4 checker, mask L1 16), six single
starts of 300 steps on the target class of each of 5 seeds ended at L1 15-47, and one
unlucky start (L1 50, anomaly index 1.75) hid the backdoor. With 2 starts (300 steps, early
stop 80) the target's index over seeds 0..9 was 4.18, 3.47, 2.74, 3.60, 5.67, 0.43, 4.41,
3.98, 3.59 and 2.13 (9/10 flagged; seed 5's target still ended at L1 66), the largest on
the clean models 1.51, 1.70, 1.48, 1.99, 1.08, 1.90, 1.12, 2.70, 1.84 and 2.11 (2/10 false
flags, above the 1/10 aimed at), at about 90 s per model on one CPU thread. What did not
help (same 30 starts): a small initial mask (uniform in [0, 0.1]), cost multiplier 1.5,
init cost 1e-2 (the target's norms stayed within noise of the defaults); 3 starts of 150
steps left every norm larger (clean medians 77-99 against 60-75) and missed seed 2's target
in all three. Nor did two penalties added to the loss (seeds 5..9, 2 starts): the mask's
total variation at weight 0.5 (targets 4/5, clean models flagged 2/5) and TABOR's blocking
term, cross-entropy of the true class with the masked pixels blanked, at weight 1 (targets
4/4, clean models flagged 3/4, 1.8x the time).

False flags: seeds 10..19 (same settings) flagged 10/10 targets and 4/10 clean models
(largest indices 2.35, 2.96, 2.21, 3.28). The classes a clean model flags are natural easy
targets: 9 (pedestrians) in three of the four, then 8 and 2; in seeds 0..9, 3 twice and 9:
speed limits and red warning triangles, which share their outline with siblings and differ
only by a glyph. Over the 20 seeds no threshold meets both aims (target >= 90%, clean
models <= 10%): 19/20 and 6/20 at 2, 17/20 and 3/20 at 2.5, 13/20 and 1/20 at 3. With 14
classes the rule flags a clean model 38% of the time if the norms were normal draws
(:func:`null_flag_rate`).

Detection (section IV.C): with the per-class norms ``l``, ``MAD = median(|l - median(l)|)``
and the anomaly index of class k is ``(median(l) - l_k) / (1.4826 * MAD)`` (1.4826 makes the
MAD a consistent estimator of the standard deviation under normality). Only the small-norm
side counts: a class is flagged when its index exceeds ``threshold`` (2, the paper's: an
index above 2 marks an outlier with more than 95% probability under normality).

Vectorised: several target classes share each forward pass (the same mini-batch of clean
images stamped with each class's own mask), classes that stopped early leave the batch, and
the passes run on a copy of the model with batch norm folded into the convolutions.
Images are uint8 ``N x H x W x 3`` RGB; masks and patterns are float in [0, 1].
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from cloud_train.attacks import eval_mode
from cloud_train.backdoor.nc_optimise import (
    ReverseOpts,
    frozen_copy,
    reverse_rows,
    success_rates,
)
from roadshield_base.errors import ConfigError

MAD_CONSISTENCY = 1.4826  # 1 / Phi^-1(3/4): MAD -> standard deviation for normal data
DEFAULT_STEPS = 300
DEFAULT_LR = 0.1
DEFAULT_BATCH = 32
DEFAULT_RESTARTS = 1
__all__ = ["NeuralCleanseResult", "anomaly_indices", "check_clean_data", "flag_classes",
           "frozen_copy", "model_classes", "neural_cleanse", "null_flag_rate"]


@dataclass
class NeuralCleanseResult:
    """Per analysed class (row r is class ``classes[r]``; all classes unless a subset was
    asked for): reversed-trigger L1 norm, anomaly index, mask (``C x H x W``) and pattern
    (``C x 3 x H x W``, RGB), both float32 in [0, 1], and the reversed trigger's attack
    success on the clean images used. ``flagged`` holds class indices, most anomalous first."""

    norms: list[float]
    anomaly_index: list[float]
    flagged: list[int]
    masks: np.ndarray
    patterns: np.ndarray
    attack_success: list[float]
    seconds: float
    classes: list[int] = field(default_factory=list)
    steps_run: list[int] = field(default_factory=list)
    threshold: float = 2.0
    settings: dict[str, Any] = field(default_factory=dict)

    def row(self, cls: int) -> int:
        """Row of class ``cls`` in the per-class arrays (ConfigError if it was not analysed)."""
        order = self.classes or list(range(len(self.norms)))
        if cls not in order:
            raise ConfigError(f"class {cls} was not analysed by this Neural Cleanse run",
                              f"analysed classes: {order}")
        return order.index(cls)

    def trigger(self, cls: int) -> tuple[np.ndarray, np.ndarray]:
        """``(mask H x W, pattern 3 x H x W)`` reversed for class ``cls``."""
        r = self.row(cls)
        return self.masks[r], self.patterns[r]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary: every per-class figure, no masks or patterns."""
        return {"classes": list(self.classes or range(len(self.norms))),
                "norms": [float(v) for v in self.norms],
                "anomaly_index": [float(v) for v in self.anomaly_index],
                "flagged": [int(c) for c in self.flagged],
                "attack_success": [float(v) for v in self.attack_success],
                "steps_run": [int(v) for v in self.steps_run],
                "threshold": float(self.threshold), "seconds": float(self.seconds),
                "settings": dict(self.settings)}


def anomaly_indices(norms: Sequence[float] | np.ndarray) -> np.ndarray:
    """``(median - l_k) / (1.4826 * MAD)`` per norm: positive below the median. A 2-D array
    is read as one model's norms per row (each row its own median and MAD).

    When more than half the norms are equal the MAD is 0; the scale then falls back to a
    tiny positive value, so equal norms get 0 and smaller ones a huge (finite) index.
    """
    values = np.asarray(norms, dtype=np.float64)
    if values.size == 0:
        return values
    med = np.median(values, axis=-1, keepdims=True)
    scale = MAD_CONSISTENCY * np.median(np.abs(values - med), axis=-1, keepdims=True)
    scale = np.maximum(scale, 1e-12 * np.maximum(1.0, np.abs(med)))
    return (med - values) / scale


def flag_classes(norms: Sequence[float], classes: Sequence[int],
                 threshold: float) -> tuple[np.ndarray, list[int]]:
    """Anomaly indices and the classes whose index exceeds ``threshold``, most anomalous first."""
    idx = anomaly_indices(norms)
    order = np.argsort(-idx, kind="stable")
    return idx, [int(classes[i]) for i in order if idx[i] > threshold]


def null_flag_rate(num_classes: int, threshold: float = 2.0, draws: int = 20_000,
                   seed: int = 0) -> float:
    """How often the MAD rule flags some class of a model without any backdoor when its
    per-class norms are independent draws of one normal distribution (seeded Monte Carlo).

    The rule's false-flag rate depends only on the class count and the shape of the natural
    norms' distribution, not their scale: with 14 classes at threshold 2 it is 0.38 for
    normal norms, 0.15 for uniform and 0.09 for right-skewed (lognormal, sigma 0.5) ones
    (200,000 draws each). A report shows it beside the false flags measured on clean models.
    """
    if not _is_int(num_classes) or num_classes < 3:
        raise ConfigError(f"null_flag_rate num_classes={num_classes!r} must be an integer >= 3",
                          "the median absolute deviation needs at least 3 norms")
    threshold = _positive("threshold", threshold, "use 2.0 (the paper's anomaly threshold)")
    draws = _count("draws", draws, "use e.g. 20000 Monte Carlo draws")
    norms = np.random.default_rng(seed).standard_normal((draws, int(num_classes)))
    return float((anomaly_indices(norms).max(axis=1) > threshold).mean())


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _positive(name: str, v: Any, hint: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) \
            or not np.isfinite(v) or v <= 0:
        raise ConfigError(f"neural_cleanse {name}={v!r} must be a positive number", hint)
    return float(v)


def _count(name: str, v: Any, hint: str, low: int = 1) -> int:
    if not _is_int(v) or v < low:
        raise ConfigError(f"neural_cleanse {name}={v!r} must be an integer >= {low}", hint)
    return int(v)


def model_classes(model: nn.Module, image_hw: tuple[int, int]) -> int:
    """The model's class count: its ``num_classes`` attribute, else one forward pass."""
    n = getattr(model, "num_classes", None)
    if _is_int(n) and n >= 2:
        return int(n)
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    with eval_mode(model), torch.no_grad():
        return int(model(torch.zeros(1, 3, *image_hw, device=device)).shape[1])


def check_clean_data(images: Any, labels: Any, num_classes: int | None,
                     who: str) -> np.ndarray:
    """Validate defender data (ConfigError); returns the labels as int64."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 \
            or images.shape[-1] != 3:
        desc = f"{type(images).__name__} {getattr(images, 'dtype', '')} " \
               f"{getattr(images, 'shape', '')}"
        raise ConfigError(f"{who} needs N x H x W x 3 uint8 RGB images, got {desc}",
                          "pass the clean images as the dataset loaders return them")
    if len(images) == 0:
        raise ConfigError(f"{who} got an empty image array",
                          "pass the clean images the defender holds (a few hundred)")
    lab = np.asarray(labels)
    if lab.ndim != 1 or len(lab) != len(images) or not np.issubdtype(lab.dtype, np.integer):
        raise ConfigError(f"{who} needs one integer label per image, got labels of shape "
                          f"{lab.shape} and dtype {lab.dtype} for {len(images)} images",
                          "pass int64 class indices")
    if num_classes is not None and (lab.min() < 0 or lab.max() >= num_classes):
        raise ConfigError(f"{who}: labels span {int(lab.min())}..{int(lab.max())} but the "
                          f"model has {num_classes} classes", "pass labels of the model's classes")
    return lab.astype(np.int64)


def neural_cleanse(model: nn.Module, images: np.ndarray, labels: np.ndarray, *,
                   steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR, init_cost: float = 1e-3,
                   batch_size: int = DEFAULT_BATCH, threshold: float = 2.0,
                   classes: Sequence[int] | None = None, seed: int = 0,
                   progress: bool = False, success_threshold: float = 0.99,
                   patience: int = 5, cost_multiplier: float = 2.0,
                   early_stop: int = 0, class_chunk: int | None = None,
                   restarts: int = DEFAULT_RESTARTS) -> NeuralCleanseResult:
    """Reverse-engineer a trigger per class of ``model`` and flag the anomalous ones.

    images: uint8 ``N x H x W x 3`` RGB clean images the defender holds (a few hundred);
    labels: their int classes. ``steps`` Adam steps per class on mini-batches of
    ``batch_size`` images at learning rate ``lr``; cost schedule and early stop as in the
    module docstring. ``restarts`` independent random starts per class; the class keeps the
    smallest mask among those that held the success threshold (module docstring).
    ``classes``: the candidate targets (default: all). ``class_chunk`` rows (class, restart)
    share a forward pass (default: as many as fit ``512 // batch_size``).
    Runs on the model's device on a frozen eval-mode copy (:func:`frozen_copy`); ``model``
    itself is not modified. Deterministic for ``seed`` on the CPU. ``progress``
    prints one line per class on stderr. Raises ConfigError for bad inputs before any work.
    """
    steps = _count("steps", steps, "use e.g. 300 Adam steps per class")
    batch_size = _count("batch_size", batch_size, "use e.g. 32 images per step")
    patience = _count("patience", patience, "use e.g. 5 steps")
    early_stop = _count("early_stop", early_stop, "use e.g. 100 steps, or 0 for none", low=0)
    seed = _count("seed", seed, "use an integer >= 0", low=0)
    restarts = _count("restarts", restarts, "use e.g. 3 random starts per class")
    lr = _positive("lr", lr, "use e.g. 0.1 (Adam on the tanh parameters)")
    init_cost = _positive("init_cost", init_cost, "use e.g. 1e-3 (the paper's)")
    threshold = _positive("threshold", threshold, "use 2.0 (the paper's anomaly threshold)")
    if not isinstance(success_threshold, (int, float)) or not 0 < success_threshold <= 1:
        raise ConfigError(f"neural_cleanse success_threshold={success_threshold!r} is outside "
                          "(0, 1]", "use 0.99 (the paper's)")
    if _positive("cost_multiplier", cost_multiplier, "use 2.0") <= 1.0:
        raise ConfigError(f"neural_cleanse cost_multiplier={cost_multiplier!r} must be > 1",
                          "use 2.0 (the authors' code) or 1.5")
    if not isinstance(images, np.ndarray) or images.ndim != 4:
        check_clean_data(images, labels, None, "neural_cleanse")
    hw = (int(images.shape[1]), int(images.shape[2]))
    num_classes = model_classes(model, hw) if len(images) else 0
    lab = check_clean_data(images, labels, num_classes, "neural_cleanse")
    targets = list(range(num_classes)) if classes is None else list(classes)
    if not targets or len(set(targets)) != len(targets) \
            or any(not _is_int(c) or not 0 <= c < num_classes for c in targets):
        raise ConfigError(f"neural_cleanse classes={classes!r} must be distinct class indices "
                          f"in 0..{num_classes - 1}", "pass None to scan every class")
    targets = [int(c) for c in targets]
    lonely = [c for c in targets if not (lab != c).any()]
    if lonely:
        raise ConfigError(f"neural_cleanse: every clean image belongs to class {lonely[0]}, "
                          "so no trigger towards it can be measured",
                          "pass clean images of several classes")
    chunk = class_chunk if class_chunk is not None else max(1, 512 // batch_size)
    chunk = _count("class_chunk", chunk, "use e.g. 14 classes per forward pass")

    t0 = time.perf_counter()
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2)
    x = x.float().div_(255.0)
    y = torch.from_numpy(lab).to(device)
    opts = ReverseOpts(steps, lr, init_cost, batch_size, success_threshold, patience,
                       float(cost_multiplier), early_stop)
    gen = torch.Generator().manual_seed(seed)
    frozen = frozen_copy(model)
    rows = [c for _ in range(restarts) for c in targets]  # restart r of class c: row r*T + i
    row_m = torch.zeros(len(rows), *hw, device=device)
    row_p = torch.zeros(len(rows), 3, *hw, device=device)
    ran: list[int] = []
    reached: list[bool] = []
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        m, p, r_ran, r_ok = reverse_rows(frozen, x, y, part, num_classes, opts, gen)
        row_m[start:start + len(part)], row_p[start:start + len(part)] = m, p
        ran += r_ran
        reached += r_ok
    row_norm = row_m.flatten(1).sum(1).double().cpu().numpy()
    masks = np.zeros((len(targets), *hw), np.float32)
    patterns = np.zeros((len(targets), 3, *hw), np.float32)
    success: list[float] = []
    steps_run: list[int] = []
    for i, c in enumerate(targets):
        mine = [r * len(targets) + i for r in range(restarts)]
        ok = [j for j in mine if reached[j]]
        if ok:  # the smallest mask that held the success threshold
            pick = min(ok, key=lambda j: row_norm[j])
            rate = success_rates(frozen, x, y, [c], row_m[pick:pick + 1],
                                 row_p[pick:pick + 1], batch_size * 8)[0]
        else:  # none did: the most successful last mask, its rate tells
            rates = success_rates(frozen, x, y, [c] * len(mine), row_m[mine], row_p[mine],
                                  batch_size * 8)
            pick, rate = mine[int(np.argmax(rates))], float(max(rates))
        masks[i], patterns[i] = row_m[pick].cpu().numpy(), row_p[pick].cpu().numpy()
        success.append(rate)
        steps_run.append(sum(ran[j] for j in mine))
        if progress:
            print(f"neural cleanse class {c}: mask L1 {float(masks[i].sum()):.1f}, attack "
                  f"success {rate:.3f}, {steps_run[-1]} steps ({len(mine)} starts)",
                  file=sys.stderr, flush=True)
    norms = [float(v) for v in masks.reshape(len(targets), -1).sum(1)]
    index, flagged = flag_classes(norms, targets, threshold)
    settings = {"steps": steps, "lr": lr, "init_cost": init_cost, "batch_size": batch_size,
                "seed": seed, "success_threshold": float(success_threshold),
                "patience": patience, "cost_multiplier": float(cost_multiplier),
                "early_stop": early_stop, "restarts": restarts, "images": int(len(images))}
    return NeuralCleanseResult(norms=norms, anomaly_index=[float(v) for v in index],
                               flagged=flagged, masks=masks, patterns=patterns,
                               attack_success=success, seconds=time.perf_counter() - t0,
                               classes=targets, steps_run=steps_run, threshold=threshold,
                               settings=settings)
