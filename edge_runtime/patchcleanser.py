"""PatchCleanser double masking, wrapped around any runner.

Xiang, Mahloujifar and Mittal, "PatchCleanser: Certifiably Robust Defense against
Adversarial Patches for Any Image Classifier", USENIX Security 2022.

Masks. For a square input of side S, a patch of up to ``patch_share`` of the crop's area
(side p = ceil(sqrt(patch_share) * S) pixels) and k masks per axis, the stride is
s = ceil((S - p + 1) / k) and the mask side m = p + s - 1. Masks start at 0, s, 2s, ...
along each axis, the last one clipped to S - m so it touches the far edge: k * k square
masks in all. Every p x p patch lies wholly inside at least one of them (the paper's
R-covering property). Masked pixels take a fill value (0.5 grey by default).

Double masking (the paper's Algorithm 1), per crop:

1. one-mask round: classify the crop under each mask. If all k * k labels agree, done.
2. otherwise, for each "disagreer" (a mask whose label is not the majority label), classify
   the crop under that mask together with each mask in turn. A disagreer whose k * k
   two-mask labels all equal its own label wins.
3. when no disagreer wins the paper returns the majority label; here the majority label
   must hold more than half of the one-mask labels, otherwise the crop abstains (the edge
   loop reports it as the class "unknown", which the policy treats cautiously).

Certification (the paper's Theorem 1): a crop is certified when every two-mask label (all
unordered pairs, a mask with itself included) equals the output label. Because of the
strict-majority rule of step 3, certified here means that no patch inside the budget can
make the crop yield another label: an attacked crop yields the same label or abstains.

``PatchCleanserRunner`` runs round 1 for all crops of a batch in one call of the inner
runner and round 2 for the crops that need it in one more call (``max_batch`` splits a
call into chunks for engines with a small maximum batch). With ``certify=True`` it
classifies every pair at once, k^4 / 2 images per crop, and derives both rounds from
them: one call per batch.

On the command line a defence is a spec string: ``"patchcleanser"`` or
``"patchcleanser:share=0.1,k=6"`` (options: share, k, fill, certify, batch);
``parse_defence`` reads it and ``create_defence`` wraps a runner with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from roadshield_base.errors import ConfigError, RoadshieldError

from .model_info import ModelInfo
from .runners.base import BaseRunner, named_array

#: Label of a crop that abstained.
ABSTAIN = -1
#: Added to every vote share before the log, so scores stay finite.
SHARE_EPS = 1e-6
DEFAULT_SHARE = 0.1
DEFAULT_K = 6
DEFAULT_FILL = 0.5


@dataclass(frozen=True)
class MaskGeometry:
    """Sizes in pixels of a mask set: input side, patch side p, stride s, mask side m, and
    the start of each mask along one axis (k values, the last one S - m)."""

    size: int
    patch: int
    stride: int
    mask: int
    positions: tuple[int, ...]


def _check_options(patch_share: float, k: int, fill: float = DEFAULT_FILL,
                   certify: bool = False, max_batch: int | None = None) -> None:
    if isinstance(patch_share, bool) or not isinstance(patch_share, (int, float)) \
            or not 0.0 < patch_share < 0.5:
        raise ConfigError(f"patch share {patch_share!r} is outside (0, 0.5)",
                          "give the largest patch as a share of the crop's area, below half of "
                          "it, e.g. 0.1")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
        raise ConfigError(f"k={k!r} must be an integer >= 2",
                          "use k masks per axis, e.g. 6 (k * k masks in all)")
    if isinstance(fill, bool) or not isinstance(fill, (int, float)) \
            or not 0.0 <= fill <= 1.0:
        raise ConfigError(f"fill={fill!r} is outside [0, 1]",
                          "inputs are RGB in [0, 1]; use 0.5 for grey")
    if not isinstance(certify, bool):
        raise ConfigError(f"certify={certify!r} must be true or false", "use certify=true")
    if max_batch is not None and (isinstance(max_batch, bool)
                                  or not isinstance(max_batch, (int, np.integer))
                                  or max_batch < 1):
        raise ConfigError(f"batch={max_batch!r} must be an integer >= 1",
                          "give the inner model's largest batch, or leave it out")


def mask_geometry(size: int, patch_share: float, k: int) -> MaskGeometry:
    """The mask set's sizes for a size x size input (see the module docstring)."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ConfigError(f"input size {size!r} must be a positive integer",
                          "use the model's square input side in pixels")
    _check_options(patch_share, k)
    # round first: sqrt(0.04) * 50 is 10.000000000000002, which must stay a 10 px patch
    patch = min(size, math.ceil(round(math.sqrt(patch_share) * size, 9)))
    stride = math.ceil((size - patch + 1) / k)
    mask = patch + stride - 1
    positions = tuple(min(i * stride, size - mask) for i in range(int(k)))
    return MaskGeometry(int(size), patch, stride, mask, positions)


def mask_set(size: int, patch_share: float, k: int) -> np.ndarray:
    """The k * k masks for a size x size input: bool (k * k, size, size), True = masked.

    Mask ``i * k + j`` starts at row ``positions[i]`` and column ``positions[j]``.
    """
    geo = mask_geometry(size, patch_share, k)
    masks = np.zeros((len(geo.positions) ** 2, size, size), dtype=bool)
    for i, y in enumerate(geo.positions):
        for j, x in enumerate(geo.positions):
            masks[i * len(geo.positions) + j, y:y + geo.mask, x:x + geo.mask] = True
    return masks


def masked_batch(images: np.ndarray, masks: np.ndarray, jobs: np.ndarray,
                 fill: float = DEFAULT_FILL) -> np.ndarray:
    """The images the model sees: one per job.

    images: float32 (N, 3, S, S); masks: bool (M, S, S); jobs: int (J, 3) rows of (crop,
    first mask, second mask), second == first for a one-mask image. Returns float32
    (J, 3, S, S) with the union of both masks set to ``fill``.
    """
    hide = masks[jobs[:, 1]] | masks[jobs[:, 2]]
    return np.where(hide[:, None], np.float32(fill), images[jobs[:, 0]]).astype(np.float32,
                                                                                copy=False)


@dataclass(frozen=True)
class DoubleMaskingResult:
    """One crop's decision.

    label: the class index, or ``ABSTAIN`` (-1). case: "agree" (all one-mask labels agree),
    "disagreer" (a disagreer won the second round), "majority" (strict majority fallback)
    or "abstain". majority: the most frequent one-mask label (ties: the lowest index);
    majority_share: its share of the one-mask labels, in (0, 1].
    """

    label: int
    case: str
    majority: int
    majority_share: float

    @property
    def abstained(self) -> bool:
        return self.label == ABSTAIN


TwoMaskLabels = np.ndarray | Callable[[np.ndarray], np.ndarray]


def majority_label(one_mask_labels: np.ndarray) -> tuple[int, int]:
    """(most frequent label, its count) of int labels (K,); ties go to the lowest label."""
    counts = np.bincount(np.asarray(one_mask_labels, dtype=np.int64))
    top = int(counts.argmax())
    return top, int(counts[top])


def double_masking(one_mask_labels: np.ndarray,
                   two_mask_labels: TwoMaskLabels) -> DoubleMaskingResult:
    """The paper's Algorithm 1 with an abstain instead of a weak majority.

    one_mask_labels: int (K,), the label under each mask.
    two_mask_labels: either an int (K, K) array whose row i holds the labels under mask i
        together with each mask (only the disagreers' rows are read; -1 marks a pair not
        computed), or a callable taking the disagreers' mask indices (D,) and returning
        their int (D, K) two-mask labels (called only when the masks disagree).
    """
    one = np.asarray(one_mask_labels, dtype=np.int64).reshape(-1)
    if one.size == 0 or (one < 0).any():
        raise ConfigError("double masking needs one non-negative label per mask",
                          "pass the argmax of the model's scores under each mask")
    top, count = majority_label(one)
    share = count / one.size
    if count == one.size:
        return DoubleMaskingResult(top, "agree", top, share)
    disagreers = np.flatnonzero(one != top)
    if callable(two_mask_labels):
        rows = np.asarray(two_mask_labels(disagreers), dtype=np.int64)
    else:
        rows = np.asarray(two_mask_labels, dtype=np.int64)[disagreers]
    if rows.shape != (disagreers.size, one.size) or (rows < 0).any():
        raise ConfigError(f"two-mask labels for disagreers {disagreers.tolist()} are missing "
                          f"or shaped {rows.shape}", "classify each disagreer's mask together "
                          f"with every one of the {one.size} masks")
    for mask_index, row in zip(disagreers, rows, strict=True):
        if (row == one[mask_index]).all():
            return DoubleMaskingResult(int(one[mask_index]), "disagreer", top, share)
    if 2 * count > one.size:
        return DoubleMaskingResult(top, "majority", top, share)
    return DoubleMaskingResult(ABSTAIN, "abstain", top, share)


def is_certified(label: int, pair_labels: np.ndarray) -> bool:
    """True when ``label`` is a class (not ABSTAIN) and every two-mask label, int (K, K)
    over all pairs (the diagonal is the one-mask round), equals it."""
    return label != ABSTAIN and bool((np.asarray(pair_labels) == label).all())


def vote_scores(one_mask_labels: np.ndarray, result: DoubleMaskingResult,
                num_classes: int) -> np.ndarray:
    """float32 (C,) scores whose softmax is the vote share of the round that decided.

    The scores are ``log(share + SHARE_EPS)`` (normalised), so the loop's confidence is the
    share of the masks agreeing with the winner: the one-mask round for "agree",
    "majority" and "abstain" (argmax: the majority label). A winning disagreer was
    confirmed by all K of its two-mask labels, so its row is that round's share: 1 for it.
    """
    if result.case == "disagreer":
        shares = np.zeros(num_classes, np.float64)
        shares[result.label] = 1.0
    else:
        one = np.asarray(one_mask_labels, dtype=np.int64).reshape(-1)
        shares = np.bincount(one, minlength=num_classes).astype(np.float64) / one.size
    shares = (shares + SHARE_EPS) / (1.0 + num_classes * SHARE_EPS)
    return np.log(shares).astype(np.float32)


# -- the command-line spec ------------------------------------------------------------------
_OPTIONS = {"share": "patch_share", "k": "k", "fill": "fill", "certify": "certify",
            "batch": "max_batch"}
_EXAMPLES = {"share": "0.1", "k": "6", "fill": "0.5", "certify": "true", "batch": "64"}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
DEFENCES = ("patchcleanser",)


def list_defences() -> list[str]:
    return sorted(DEFENCES)


def _value(key: str, text: str) -> Any:
    try:
        if key == "certify":
            if text.lower() in _TRUE + _FALSE:
                return text.lower() in _TRUE
            raise ValueError(text)
        if key in ("k", "batch"):
            return int(text)
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(text)
        return value
    except ValueError:
        kind = "true or false" if key == "certify" else \
            "an integer" if key in ("k", "batch") else "a number"
        raise ConfigError(f"defence option {key}={text!r} is not {kind}",
                          f"write e.g. {key}={_EXAMPLES[key]}") from None


def parse_defence(spec: str) -> dict[str, Any]:
    """Read a defence spec: ``"patchcleanser"`` or ``"patchcleanser:share=0.1,k=6"``.

    Returns {"name": "patchcleanser", "patch_share", "k", "fill", "certify", "max_batch"}
    (the ``PatchCleanserRunner`` keywords; defaults share 0.1, k 6, fill 0.5, no
    certification, no batch limit). Raises ConfigError for an unknown defence or option,
    a repeated option, a bad value, or a share outside (0, 0.5).
    """
    text = (spec or "").strip()
    name, _, rest = text.partition(":")
    name = name.strip().lower()
    if name not in DEFENCES:
        raise ConfigError(f"unknown defence {name or '(empty)'!r} in {spec!r}",
                          f"use one of: {', '.join(list_defences())}, e.g. "
                          '"patchcleanser:share=0.1,k=6"')
    options: dict[str, Any] = {"name": name, "patch_share": DEFAULT_SHARE, "k": DEFAULT_K,
                               "fill": DEFAULT_FILL, "certify": False, "max_batch": None}
    seen: set[str] = set()
    for item in (part.strip() for part in rest.split(",")):
        if not item:
            continue
        key, eq, value = (s.strip() for s in item.partition("="))
        key = key.lower()
        if key not in _OPTIONS:
            raise ConfigError(f"unknown option {key!r} for defence {name!r}",
                              f"use: {', '.join(_OPTIONS)}, e.g. share=0.1,k=6")
        if not eq or not value:
            raise ConfigError(f"defence option {key!r} has no value",
                              f"write it as {key}=VALUE, e.g. share=0.1")
        if key in seen:
            raise ConfigError(f"defence option {key!r} is given twice in {spec!r}",
                              "give each option once")
        seen.add(key)
        options[_OPTIONS[key]] = _value(key, value)
    _check_options(options["patch_share"], options["k"], options["fill"], options["certify"],
                   options["max_batch"])
    return options


def format_defence(options: dict[str, Any]) -> str:
    """The canonical spec of ``parse_defence``'s options; parsing it gives them back."""
    parts = [f"share={options['patch_share']:.12g}", f"k={options['k']}"]
    if options.get("fill", DEFAULT_FILL) != DEFAULT_FILL:
        parts.append(f"fill={options['fill']:.12g}")
    if options.get("certify"):
        parts.append("certify=true")
    if options.get("max_batch") is not None:
        parts.append(f"batch={options['max_batch']}")
    return f"{options.get('name', 'patchcleanser')}:{','.join(parts)}"


def create_defence(spec: str, inner: BaseRunner, input_size: int, *,
                   input_name: str = "input", output_name: str = "logits") -> BaseRunner:
    """Wrap ``inner`` (taking {input_name: (N, 3, S, S)}) in the defence ``spec`` names."""
    options = parse_defence(spec)
    options.pop("name")
    return PatchCleanserRunner(inner, input_size, input_name=input_name,
                               output_name=output_name, **options)


# -- the runner -----------------------------------------------------------------------------
class PatchCleanserRunner(BaseRunner):
    """Double masking around ``inner``: the runner contract, with abstains and certificates.

    inner: any runner taking {input_name: float32 (N, 3, S, S) RGB in [0, 1]} and returning
        {output_name: (N, C) scores}. Activated and released here unless already active.
    input_size: S in pixels. patch_share: the largest patch as a share of the crop's area,
        in (0, 0.5). k: masks per axis (>= 2). fill: the masked pixels' value in [0, 1].
    certify: also certify each crop (k^4 / 2 images per crop instead of k^2 and a few).
    max_batch: the most images per call of ``inner`` (None: a whole round in one call).

    ``infer`` returns {output_name: float32 (N, C) scores (see ``vote_scores``), "abstain":
    bool (N,)} and, with certify, "certified": bool (N,). ``stats()`` counts the cost.
    """

    def __init__(self, inner: BaseRunner, input_size: int, patch_share: float = DEFAULT_SHARE,
                 k: int = DEFAULT_K, *, fill: float = DEFAULT_FILL, certify: bool = False,
                 input_name: str = "input", output_name: str = "logits",
                 max_batch: int | None = None) -> None:
        super().__init__()
        _check_options(patch_share, k, fill, certify, max_batch)
        self.inner = inner
        self.geometry = mask_geometry(input_size, patch_share, k)
        self.masks = mask_set(input_size, patch_share, k)
        self.input_size = int(input_size)
        self.patch_share = float(patch_share)
        self.k = int(k)
        self.fill = float(fill)
        self.certify = certify
        self.max_batch = None if max_batch is None else int(max_batch)
        self.input_name = input_name
        self.output_name = output_name
        self.name = f"patchcleanser({inner.name})"
        self._owns_inner = False
        self._classes: int | None = None  # C, known after the first call of ``inner``
        self.reset_stats()

    @property
    def spec(self) -> str:
        """The canonical spec string (``parse_defence`` reads it back)."""
        return format_defence({"name": "patchcleanser", "patch_share": self.patch_share,
                               "k": self.k, "fill": self.fill, "certify": self.certify,
                               "max_batch": self.max_batch})

    @property
    def input_names(self) -> list[str]:
        return [self.input_name]

    @property
    def model_info(self) -> ModelInfo:
        """The wrapped model's export metadata (the defence adds outputs, not a model)."""
        return self.inner.model_info

    @property
    def output_names(self) -> list[str]:
        return [self.output_name, "abstain"] + (["certified"] if self.certify else [])

    # -- cost counters -----------------------------------------------------------------
    def reset_stats(self) -> None:
        self.calls = 0  # calls of the inner runner
        self.images = 0  # masked images classified
        self.crops = 0
        self.second_round_crops = 0  # crops whose one-mask labels disagreed
        self.abstained = 0
        self.certified = 0

    def stats(self) -> dict[str, int]:
        """Counters since construction or ``reset_stats()``."""
        return {"calls": self.calls, "images": self.images, "crops": self.crops,
                "second_round_crops": self.second_round_crops, "abstained": self.abstained,
                "certified": self.certified}

    # -- the contract ------------------------------------------------------------------
    def activate_impl(self) -> None:
        if not self.inner.is_active:
            self.inner.activate()
            self._owns_inner = True
        self.name = f"patchcleanser({self.inner.name})"  # backends name their provider

    def deactivate_impl(self) -> None:
        owned, self._owns_inner = self._owns_inner, False
        if owned:
            self.inner.deactivate()

    def _check(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        x = np.asarray(named_array(feed, self.input_name, f"the input of {self.name}",
                                   "pass input_name= to the defence"))
        size = self.input_size
        if x.ndim != 4 or x.shape[1:] != (3, size, size) or x.dtype != np.float32:
            raise ConfigError(f"{self.name} got {x.dtype} {x.shape}, expected float32 "
                              f"(N, 3, {size}, {size})",
                              "feed the model's input size; the masks are sized for it")
        return x

    def _predict(self, x: np.ndarray, jobs: np.ndarray) -> np.ndarray:
        """Labels int (J,) of the masked images ``jobs`` describe (see ``masked_batch``)."""
        step = self.max_batch or max(len(jobs), 1)
        labels = []
        for start in range(0, len(jobs), step):
            batch = masked_batch(x, self.masks, jobs[start:start + step], self.fill)
            out = self.inner.infer({self.input_name: batch})
            scores = np.asarray(named_array(out, self.output_name,
                                            f"the output of runner {self.inner.name}",
                                            "pass output_name= to the defence"))
            scores = scores.reshape(len(batch), -1)
            if not np.isfinite(scores).all():
                raise RoadshieldError(f"runner {self.inner.name} returned non-finite scores",
                                      "check the model file and the input range [0, 1]")
            self._classes = scores.shape[1]
            labels.append(scores.argmax(axis=1))
            self.calls += 1
            self.images += len(batch)
        return np.concatenate(labels).astype(np.int64)

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = self._check(feed)
        n, count = len(x), len(self.masks)
        if n == 0:
            out = {self.output_name: np.zeros((0, self._classes or 0), np.float32),
                   "abstain": np.zeros(0, dtype=bool)}
            if self.certify:
                out["certified"] = np.zeros(0, dtype=bool)
            return out
        # pairs[c, i, j]: the label of crop c under masks i and j (-1: not computed)
        pairs = np.full((n, count, count), -1, dtype=np.int64)
        crops = np.arange(n)
        if self.certify:
            first, second = np.triu_indices(count)
            jobs = np.stack([np.repeat(crops, first.size), np.tile(first, n),
                             np.tile(second, n)], axis=1)
            labels = self._predict(x, jobs).reshape(n, first.size)
            pairs[:, first, second] = labels
            pairs[:, second, first] = labels
        else:
            diag = np.arange(count)
            jobs = np.stack([np.repeat(crops, count), np.tile(diag, n), np.tile(diag, n)],
                            axis=1)
            pairs[:, diag, diag] = self._predict(x, jobs).reshape(n, count)
            jobs = self._second_round_jobs(pairs)
            if len(jobs):
                labels = self._predict(x, jobs)
                pairs[jobs[:, 0], jobs[:, 1], jobs[:, 2]] = labels
                pairs[jobs[:, 0], jobs[:, 2], jobs[:, 1]] = labels
        classes = int(self._classes or 1)
        scores = np.empty((n, classes), np.float32)
        abstain = np.zeros(n, dtype=bool)
        certified = np.zeros(n, dtype=bool)
        for c in range(n):
            one = np.diagonal(pairs[c]).copy()
            result = double_masking(one, pairs[c])
            scores[c] = vote_scores(one, result, classes)
            abstain[c] = result.abstained
            certified[c] = self.certify and is_certified(result.label, pairs[c])
            self.second_round_crops += result.case != "agree"
        self.crops += n
        self.abstained += int(abstain.sum())
        self.certified += int(certified.sum())
        out = {self.output_name: scores, "abstain": abstain}
        if self.certify:
            out["certified"] = certified
        return out

    @staticmethod
    def _second_round_jobs(pairs: np.ndarray) -> np.ndarray:
        """int (J, 3) (crop, mask a, mask b), a < b: every pair with a disagreer's mask, for
        the crops whose one-mask labels (the diagonal of ``pairs``) disagree; each
        unordered pair once."""
        jobs: list[tuple[int, int, int]] = []
        count = pairs.shape[1]
        for c in range(len(pairs)):
            one = np.diagonal(pairs[c])
            top, votes = majority_label(one)
            if votes == count:
                continue
            wanted: set[tuple[int, int]] = set()
            for i in np.flatnonzero(one != top).tolist():
                wanted.update((min(i, j), max(i, j)) for j in range(count) if j != i)
            jobs.extend((c, a, b) for a, b in sorted(wanted))
        return np.asarray(jobs, dtype=np.int64).reshape(-1, 3)

