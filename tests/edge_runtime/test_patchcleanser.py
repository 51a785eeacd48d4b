"""PatchCleanser double masking: the mask set's covering property, Algorithm 1's cases, the
runner wrapper's calls and certificates, the spec parser, and the "unknown" sighting through
the policy, the loop, the annotator and the report.

Expected values come from the paper (Xiang et al., USENIX Security 2022: mask set, Algorithm
1, Theorem 1) worked by hand on fake models that read pixel regions, so which masks hide
what is known exactly. Sizes: S = 16, share 0.1, k = 3 gives a 6 px patch, stride 4, 9 px
masks at rows/columns 0, 4 and 7 (mask i * 3 + j at row position i, column position j).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from toy_data import fake_runner_base

from actuator.interface import RecordingActuator
from edge_runtime.annotate import annotate
from edge_runtime.frames import Frame, FrameSource, SignTruth
from edge_runtime.locate import Candidate, FullFrameLocator
from edge_runtime.loop import EdgeLoop, build_loop, softmax
from edge_runtime.patchcleanser import (
    ABSTAIN,
    PatchCleanserRunner,
    create_defence,
    double_masking,
    format_defence,
    is_certified,
    mask_geometry,
    mask_set,
    masked_batch,
    parse_defence,
)
from edge_runtime.policy import UNKNOWN, Decision, Observation, Prediction, Rule, SignRulesPolicy
from edge_runtime.report import format_loop_report
from roadshield_base.errors import ConfigError

S = 16
CLASSES = ("stop", "ahead_only", "priority_road")

Labeller = Callable[[np.ndarray], np.ndarray]


def bright(x: np.ndarray, rows: slice, cols: slice) -> np.ndarray:
    """(N,) bool: every pixel of the region is bright (> 0.75; the 0.5 fill is not)."""
    return x[:, :, rows, cols].min(axis=(1, 2, 3)) > 0.75


def corner(x: np.ndarray) -> np.ndarray:
    """Class 1 when the 3 x 3 top-left corner is bright, else 0: only mask 0 hides it."""
    return bright(x, slice(0, 3), slice(0, 3)).astype(np.int64)


def corner_unless_far_corner(x: np.ndarray) -> np.ndarray:
    """Class 1 when the top-left corner is hidden and the bottom-right one is not, else 0.

    On a bright crop only mask 0 says 1; mask 8 hides the bottom-right corner, so the pair
    (0, 8) says 0 and the disagreer fails."""
    hidden = ~bright(x, slice(0, 3), slice(0, 3))
    return (hidden & bright(x, slice(13, 16), slice(13, 16))).astype(np.int64)


def columns(x: np.ndarray) -> np.ndarray:
    """0 when column 0 is hidden, else 2 when column 15 is, else 1.

    On a bright crop: masks at column position 0 say 0, at 4 say 1, at 7 say 2 (3 each)."""
    left = ~bright(x, slice(None), slice(0, 1))
    right = ~bright(x, slice(None), slice(15, 16))
    return np.where(left, 0, np.where(right, 2, 1)).astype(np.int64)


def any_bright_patch(x: np.ndarray, p: int = 6) -> np.ndarray:
    """Class 1 when some p x p window is all bright: fooled by a bright p x p patch."""
    lo = x.min(axis=1)
    windows = np.lib.stride_tricks.sliding_window_view(lo, (p, p), axis=(1, 2))
    return (windows.min(axis=(-1, -2)) > 0.75).any(axis=(1, 2)).astype(np.int64)


class RegionRunner(fake_runner_base()):
    """Logits (N, 3) from a labelling function of the (N, 3, S, S) input; records batches."""

    name = "region-fake"

    def __init__(self, labeller: Labeller) -> None:
        super().__init__()
        self.labeller = labeller
        self.batches: list[int] = []

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = feed["input"]
        assert x.dtype == np.float32 and x.shape[1:] == (3, S, S)
        self.calls += 1
        self.batches.append(len(x))
        logits = np.full((len(x), len(CLASSES)), -4.0, np.float32)
        logits[np.arange(len(x)), self.labeller(x)] = 4.0
        return {"logits": logits}


def crops(*values: float) -> np.ndarray:
    """float32 (N, 3, S, S) crops of uniform brightness."""
    return np.stack([np.full((3, S, S), v, np.float32) for v in values])


def defend(labeller: Labeller, **kw: object) -> tuple[PatchCleanserRunner, RegionRunner]:
    inner = RegionRunner(labeller)
    return PatchCleanserRunner(inner, S, 0.1, 3, **kw), inner  # type: ignore[arg-type]


# -- the mask set ---------------------------------------------------------------------------
def test_geometry_follows_the_paper() -> None:
    # p = ceil(sqrt(0.1) * 16) = 6, s = ceil((16 - 6 + 1) / 3) = 4, m = p + s - 1 = 9
    assert mask_geometry(16, 0.1, 3) == mask_geometry(16, 0.1, 3)
    geo = mask_geometry(16, 0.1, 3)
    assert (geo.patch, geo.stride, geo.mask, geo.positions) == (6, 4, 9, (0, 4, 7))
    # 224 px, k = 6: p = 71, s = ceil(154 / 6) = 26, m = 96, last start clipped 130 -> 128
    geo = mask_geometry(224, 0.1, 6)
    assert (geo.patch, geo.stride, geo.mask) == (71, 26, 96)
    assert geo.positions == (0, 26, 52, 78, 104, 128)
    assert mask_geometry(50, 0.04, 6).patch == 10  # sqrt(0.04) * 50 is 10.000000000000002


@pytest.mark.parametrize(("size", "share", "k"), [(16, 0.1, 3), (16, 0.1, 6), (24, 0.05, 4),
                                                  (32, 0.2, 2), (20, 0.49, 5), (13, 0.01, 7)])
def test_every_patch_lies_inside_a_mask(size: int, share: float, k: int) -> None:
    geo = mask_geometry(size, share, k)
    masks = mask_set(size, share, k)
    assert masks.shape == (k * k, size, size) and masks.dtype == bool
    p = geo.patch
    assert p * p >= share * size * size > (p - 1) ** 2  # the smallest square of that area

    def covered(ms: np.ndarray) -> np.ndarray:
        # (size - p + 1, size - p + 1): the p x p patch at (row, col) lies inside some mask
        win = np.lib.stride_tricks.sliding_window_view(ms, (p, p), axis=(1, 2))
        return win.all(axis=(-1, -2)).any(axis=0)

    assert covered(masks).all()  # exhaustively, every position
    # and the mask side is the least that covers: one pixel less leaves a patch uncovered
    smaller = masks.copy()
    for i, y in enumerate(geo.positions):
        for j, x in enumerate(geo.positions):
            smaller[i * k + j] = False
            smaller[i * k + j, y:y + geo.mask - 1, x:x + geo.mask - 1] = True
    assert not covered(smaller).all()


def test_masked_batch_fills_the_union_of_two_masks() -> None:
    masks = mask_set(S, 0.1, 3)
    x = crops(0.0, 1.0)
    out = masked_batch(x, masks, np.array([[1, 0, 0], [0, 0, 8], [1, 4, 4]]), fill=0.25)
    assert out.dtype == np.float32 and out.shape == (3, 3, S, S)
    assert np.array_equal(out[0, 0] == 0.25, masks[0])
    assert np.array_equal(out[1, 2] == 0.25, masks[0] | masks[8])
    assert (out[2][:, ~masks[4]] == 1.0).all()
    assert (x[0] == 0.0).all()  # the input is untouched


# -- Algorithm 1, pure ----------------------------------------------------------------------
def test_double_masking_cases() -> None:
    agree = double_masking(np.zeros(9, int), np.full((9, 9), -1))
    assert (agree.label, agree.case, agree.majority_share) == (0, "agree", 1.0)
    one = np.array([2, 1, 1, 1, 1, 1, 1, 1, 1])
    pairs = np.ones((9, 9), int)
    pairs[0] = 2  # every pair with mask 0 says 2: the disagreer wins
    won = double_masking(one, pairs)
    assert (won.label, won.case, won.majority) == (2, "disagreer", 1)
    pairs[0, 5] = 1  # one pair against it: back to the (strict) majority
    fallback = double_masking(one, pairs)
    assert (fallback.label, fallback.case) == (1, "majority")
    assert fallback.majority_share == pytest.approx(8 / 9)
    split = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2])
    tie = double_masking(split, np.zeros((9, 9), int))  # no disagreer can win, no majority
    assert (tie.label, tie.case, tie.abstained) == (ABSTAIN, "abstain", True)
    # 5 of 9 is a strict majority, 4 of 8 is not
    assert double_masking(np.array([0] * 5 + [1] * 4), np.zeros((9, 9), int)).label == 0
    assert double_masking(np.array([0] * 4 + [1] * 4), np.zeros((8, 8), int)).label == ABSTAIN


def test_double_masking_asks_for_the_disagreers_rows_only() -> None:
    asked: list[list[int]] = []

    def rows(disagreers: np.ndarray) -> np.ndarray:
        asked.append(disagreers.tolist())
        return np.full((len(disagreers), 9), 3)

    assert double_masking(np.full(9, 3), rows).case == "agree" and asked == []
    one = np.array([3, 3, 0, 3, 3, 3, 3, 0, 3])
    assert double_masking(one, rows).label == 3 and asked == [[2, 7]]
    with pytest.raises(ConfigError, match="two-mask labels"):
        double_masking(one, np.full((9, 9), -1))  # the disagreers' pairs were not computed


def test_is_certified() -> None:
    assert is_certified(1, np.ones((4, 4), int))
    off = np.ones((4, 4), int)
    off[2, 3] = off[3, 2] = 0
    assert not is_certified(1, off) and not is_certified(ABSTAIN, np.full((4, 4), -1))


# -- the runner -----------------------------------------------------------------------------
def test_agreement_is_one_call_and_scores_are_vote_shares() -> None:
    runner, inner = defend(corner)
    with runner:
        out = runner.infer({"input": crops(0.0, 0.0)})
    assert inner.batches == [18]  # both crops' 9 one-mask images in one call
    assert sorted(out) == ["abstain", "logits"]  # no "certified" without certify
    assert out["logits"].dtype == np.float32 and out["logits"].shape == (2, 3)
    assert np.allclose(softmax(out["logits"]), [[1, 0, 0]] * 2, atol=1e-5)
    assert not out["abstain"].any()
    assert runner.stats() == {"calls": 1, "images": 18, "crops": 2, "second_round_crops": 0,
                              "abstained": 0, "certified": 0}


def test_a_disagreer_wins_the_second_round_in_one_more_call() -> None:
    # A bright crop fools the bare corner model into class 1; mask 0 hides the corner, and
    # every pair with mask 0 says 0: the disagreer's label wins.
    runner, inner = defend(corner)
    with runner:
        out = runner.infer({"input": crops(0.0, 1.0)})
    # round 1: 2 x 9 images; round 2: the bright crop only, mask 0 with each of 8 others
    assert inner.batches == [18, 8]
    assert out["logits"].argmax(axis=1).tolist() == [0, 0]
    assert softmax(out["logits"])[1, 0] == pytest.approx(1.0, abs=1e-5)  # all 9 pairs agree
    assert runner.stats()["second_round_crops"] == 1


def test_majority_fallback_and_abstain() -> None:
    runner, inner = defend(corner_unless_far_corner)
    with runner:
        out = runner.infer({"input": crops(1.0)})
    assert inner.batches == [9, 8]
    assert out["logits"].argmax(axis=1).tolist() == [0] and not out["abstain"][0]
    assert softmax(out["logits"])[0].tolist() == pytest.approx([8 / 9, 1 / 9, 0], abs=1e-5)
    runner, inner = defend(columns)
    with runner:
        out = runner.infer({"input": crops(1.0, 0.0)})
    # the dark crop: column 0 is never bright, so every mask says 0 and it agrees
    assert out["abstain"].tolist() == [True, False]
    assert softmax(out["logits"])[0].tolist() == pytest.approx([1 / 3] * 3, abs=1e-5)
    assert runner.stats()["abstained"] == 1 and len(inner.batches) == 2


def test_certification() -> None:
    runner, inner = defend(corner, certify=True)
    with runner:
        out = runner.infer({"input": crops(0.0, 1.0)})
    assert inner.batches == [2 * 45]  # every unordered pair, 9 * 10 / 2, in one call
    assert out["logits"].argmax(axis=1).tolist() == [0, 0]
    # dark: every pair says 0. bright: pairs without mask 0 say 1, so no certificate.
    assert out["certified"].tolist() == [True, False] and out["certified"].dtype == bool
    assert runner.stats()["certified"] == 1 and "certified" in runner.output_names


def test_a_certified_crop_cannot_be_patched_into_another_label() -> None:
    # Theorem 1: a bright 6 x 6 patch anywhere fools the bare model, yet the defended
    # output of a certified crop stays its label or abstains.
    runner, _ = defend(any_bright_patch, certify=True)
    with runner:
        clean = runner.infer({"input": crops(0.0)})
    assert clean["certified"].tolist() == [True]
    attacked = []
    for row in range(S - 6 + 1):
        for col in range(S - 6 + 1):
            img = crops(0.0)[0]
            img[:, row:row + 6, col:col + 6] = 1.0
            attacked.append(img)
    batch = np.stack(attacked)
    assert (any_bright_patch(batch) == 1).all()
    runner, _ = defend(any_bright_patch)
    with runner:
        out = runner.infer({"input": batch})
    labels = np.where(out["abstain"], ABSTAIN, out["logits"].argmax(axis=1))
    assert set(labels.tolist()) <= {0, ABSTAIN} and (labels == 0).any()


def test_max_batch_splits_calls_without_changing_results() -> None:
    whole, _ = defend(corner)
    split, inner = defend(corner, max_batch=5)
    x = crops(0.0, 1.0)
    with whole, split:
        a, b = whole.infer({"input": x}), split.infer({"input": x})
    assert inner.batches == [5, 5, 5, 3, 5, 3]
    assert np.array_equal(a["logits"], b["logits"]) and split.stats()["calls"] == 6


def test_runner_contract() -> None:
    runner, inner = defend(corner)
    assert runner.name == "patchcleanser(region-fake)"
    assert runner.input_names == ["input"] and runner.output_names == ["logits", "abstain"]
    with runner:
        assert inner.is_active
        with pytest.raises(ConfigError, match=r"expected float32 \(N, 3, 16, 16\)"):
            runner.infer({"input": np.zeros((1, 3, 20, 20), np.float32)})
        empty = runner.infer({"input": np.zeros((0, 3, S, S), np.float32)})
        assert empty["abstain"].shape == (0,) and inner.batches == []
    assert not inner.is_active  # it activated the inner runner, so it released it
    inner.activate()
    with runner:
        pass
    assert inner.is_active  # an inner runner activated elsewhere stays active
    inner.deactivate()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"patch_share": 0.5}, "outside"), ({"patch_share": 0.0}, "outside"),
    ({"k": 1}, "k=1"), ({"k": 2.5}, "k=2.5"), ({"fill": 1.5}, "fill"),
    ({"certify": "yes"}, "certify"), ({"max_batch": 0}, "batch")])
def test_bad_settings_are_config_errors(kwargs: dict[str, object], match: str) -> None:
    options: dict[str, object] = {"patch_share": 0.1, "k": 3, **kwargs}
    with pytest.raises(ConfigError, match=match) as err:
        PatchCleanserRunner(RegionRunner(corner), S, **options)  # type: ignore[arg-type]
    assert err.value.hint


# -- the spec -------------------------------------------------------------------------------
def test_parse_defence() -> None:
    assert parse_defence("patchcleanser") == {"name": "patchcleanser", "patch_share": 0.1,
                                              "k": 6, "fill": 0.5, "certify": False,
                                              "max_batch": None}
    opts = parse_defence(" PatchCleanser: share=0.2, k=4, certify=yes, batch=64, fill=0 ")
    assert opts == {"name": "patchcleanser", "patch_share": 0.2, "k": 4, "fill": 0.0,
                    "certify": True, "max_batch": 64}
    assert format_defence(opts) == "patchcleanser:share=0.2,k=4,fill=0,certify=true,batch=64"
    assert parse_defence(format_defence(opts)) == opts
    runner = create_defence("patchcleanser:share=0.1,k=3", RegionRunner(corner), S)
    assert isinstance(runner, PatchCleanserRunner)
    assert runner.spec == "patchcleanser:share=0.1,k=3" and runner.geometry.mask == 9


@pytest.mark.parametrize(("spec", "match"), [
    ("", "unknown defence"), ("derandomized", "unknown defence 'derandomized'"),
    ("patchcleanser:share=0.5", r"outside \(0, 0.5\)"), ("patchcleanser:share=-0.1", "outside"),
    ("patchcleanser:stride=3", "unknown option 'stride'"), ("patchcleanser:k=six", "integer"),
    ("patchcleanser:k=1", "k=1"), ("patchcleanser:share", "no value"),
    ("patchcleanser:k=3,k=4", "twice"), ("patchcleanser:certify=maybe", "true or false"),
    ("patchcleanser:share=nan", "not a number")])
def test_bad_specs_are_config_errors(spec: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        parse_defence(spec)
    assert err.value.hint


def test_cli_refuses_a_bad_defence_with_exit_2(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from roadshield.cli import main

    code = main(["-q", "edge", "run", "--allow-unsigned", "--model",
                 str(tmp_path / "absent.onnx"), "--source", str(tmp_path), "--defence",
                 "patchcleanser:share=0.7"])
    assert code == 2 and "outside (0, 0.5)" in capsys.readouterr().err


# -- policy, loop, annotation, report -------------------------------------------------------
def test_policy_slows_down_for_three_unknown_sightings() -> None:
    policy = SignRulesPolicy(slow_kmh=20, slow_brake=0.3)
    assert policy.rule_for(UNKNOWN) == Rule("slow", 20.0, 0.3)
    unknown = Prediction((0, 0, 10, 10), -1, UNKNOWN, 0.34)  # below the 0.6 gate: votes anyway
    decisions = [policy.decide(Observation((unknown,), t * 0.1)) for t in range(3)]
    assert [d.action for d in decisions] == ["hold", "hold", "slow"]
    command = decisions[2].command
    assert command is not None and (command.speed_cap_kmh, command.brake) == (20.0, 0.3)
    # a stop sign in the same frame is still the most restrictive
    stop = Prediction((20, 0, 30, 10), 0, "stop", 0.9)
    assert policy.decide(Observation((unknown, stop), 0.3)).class_name == "unknown"
    mixed = SignRulesPolicy()
    picks = [mixed.decide(Observation((unknown, stop), t * 0.1)) for t in range(3)]
    assert picks[-1].action == "stop"


def test_prediction_dict_carries_certified_only_when_checked() -> None:
    assert "certified" not in Prediction((0, 0, 1, 1), 0, "stop", 0.9).to_dict()
    assert Prediction((0, 0, 1, 1), 0, "stop", 0.9, certified=True).to_dict()["certified"]


class ListSource(FrameSource):
    def __init__(self, frames: list[Frame]) -> None:
        self.uri = "list://patchcleanser"
        self.frames = frames
        self.frame_count = len(frames)

    def __iter__(self) -> Iterator[Frame]:
        return iter(self.frames)

    def close(self) -> None:
        pass


def loop_with(runner: PatchCleanserRunner, value: float, truth: SignTruth,
              tmp_path: Path) -> tuple[EdgeLoop, RecordingActuator]:
    """Four 32 x 32 frames whose (full-frame) crop is a uniform ``value``."""
    def preprocess(frame: np.ndarray, boxes: list[tuple[int, int, int, int]],
                   size: int) -> np.ndarray:
        return np.full((len(boxes), 3, size, size), value, np.float32)

    frames = [Frame(np.zeros((32, 32, 3), np.uint8), i, i * 0.1, truth) for i in range(4)]
    actuator = RecordingActuator()
    loop = EdgeLoop(ListSource(frames), FullFrameLocator(), preprocess, runner, CLASSES, S,
                    SignRulesPolicy(clear_after_s=1.0), actuator,
                    decision_log=tmp_path / "decisions.jsonl")
    return loop, actuator


def test_loop_turns_abstains_into_unknown_and_counts_them(tmp_path: Path) -> None:
    runner, inner = defend(columns)
    loop, actuator = loop_with(runner, 1.0, SignTruth("stop", (0, 0, 32, 32), True), tmp_path)
    report = loop.run(progress=False)
    records = [json.loads(line) for line in
               (tmp_path / "decisions.jsonl").read_text().splitlines()]
    assert {r["predictions"][0]["class_name"] for r in records} == {UNKNOWN}
    assert records[0]["predictions"][0]["class_index"] == -1
    assert records[0]["predictions"][0]["confidence"] == pytest.approx(1 / 3, abs=1e-4)
    assert [r["action"] for r in records] == ["hold", "hold", "slow", "keep"]
    assert [(c.command.speed_cap_kmh, c.command.brake) for c in actuator.commands] == [
        (20.0, 0.3)]
    assert report.defence == "patchcleanser:share=0.1,k=3"
    assert report.runner == "patchcleanser(region-fake)"
    # per frame: 9 one-mask images, then the 36 pairs of 9 masks less the 3 pairs among
    # the masks that voted with the majority (neither is a disagreer)
    assert report.defence_stats == {"calls": 8, "images": 4 * 9 + 4 * 33, "crops": 4,
                                    "second_round_crops": 4, "abstained": 4, "certified": 0}
    truth = report.truth
    assert truth is not None and truth["abstained"] == 4
    assert truth["stickered"] == {"classified": 4, "correct": 0, "accuracy": 0.0,
                                  "abstained": 4, "abstain_rate": 1.0,
                                  "read_as": {"unknown": 4}}
    assert truth["clean"]["abstained"] == 0 and truth["clean"]["abstain_rate"] is None
    assert not inner.is_active
    text = format_loop_report(report.to_dict())
    assert "patchcleanser:share=0.1,k=3" in text and "abstained, stickered" in text
    assert "4 of 4 (100.0 %)" in text
    json.dumps(report.to_dict())


def test_loop_keeps_certificates(tmp_path: Path) -> None:
    runner, _ = defend(corner, certify=True)
    loop, _ = loop_with(runner, 0.0, SignTruth("stop", (0, 0, 32, 32), False), tmp_path)
    report = loop.run(progress=False)
    truth = report.truth
    assert truth is not None
    assert truth["clean"] == {"classified": 4, "correct": 4, "accuracy": 1.0, "abstained": 0,
                              "abstain_rate": 0.0, "certified": 4, "certified_correct": 4,
                              "read_as": {"stop": 4}}
    records = [json.loads(line) for line in
               (tmp_path / "decisions.jsonl").read_text().splitlines()]
    assert all(r["predictions"][0]["certified"] for r in records)
    assert "certified, clean" in format_loop_report(report.to_dict())


def test_annotate_marks_unknown_and_certified_signs() -> None:
    img = np.full((120, 160, 3), 115, np.uint8)
    box = (40, 40, 100, 100)
    decision = Decision("hold", UNKNOWN, 0.4, None, "test")
    unknown = annotate(img, [Candidate(box, 1.0, "frame")],
                       [Prediction(box, -1, UNKNOWN, 0.4)], decision)
    sign = annotate(img, [], [Prediction(box, 0, "stop", 0.9)], decision)
    certified = annotate(img, [], [Prediction(box, 0, "stop", 0.9, certified=True)], decision)
    red = (unknown == (40, 40, 230)).all(axis=2)
    assert red[box[1]:box[3], box[0]].all() and not (sign == (40, 40, 230)).all(axis=2).any()
    assert (certified != sign).any()  # the "cert" marker


# -- a real backend -------------------------------------------------------------------------
def test_wraps_the_onnx_runtime_runner(tiny_onnx: Path, tiny: object) -> None:
    from edge_runtime.runners.onnxruntime_runner import OnnxRuntimeRunner

    size = tiny.size  # type: ignore[attr-defined]
    inner = OnnxRuntimeRunner(tiny_onnx, intra_op_threads=1)
    runner = PatchCleanserRunner(inner, size, 0.1, 2, certify=True)
    x = np.random.default_rng(0).random((3, 3, size, size), dtype=np.float32)
    masks = mask_set(size, 0.1, 2)
    with runner:
        out = runner.infer({"input": x})
        first, second = np.triu_indices(4)
        pairs = np.empty((3, 4, 4), np.int64)
        for c in range(3):
            jobs = np.stack([np.full(first.size, c), first, second], axis=1)
            labels = inner.infer({"input": masked_batch(x, masks, jobs)})["logits"].argmax(1)
            pairs[c, first, second] = pairs[c, second, first] = labels
    assert runner.name == "patchcleanser(onnxruntime:CPUExecutionProvider)"
    assert out["logits"].shape == (3, len(tiny.classes))  # type: ignore[attr-defined]
    for c in range(3):
        result = double_masking(np.diagonal(pairs[c]), pairs[c])
        assert out["abstain"][c] == result.abstained
        if not result.abstained:
            assert out["logits"][c].argmax() == result.label
        assert out["certified"][c] == is_certified(result.label, pairs[c])
    assert runner.stats()["calls"] == 1 and not inner.is_active


def test_build_loop_with_a_defence(tiny_onnx: Path, tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(3):
        img = np.full((240, 320, 3), 115, np.uint8)
        cv2.circle(img, (160, 110), 25, (30, 30, 200), -1, cv2.LINE_AA)
        assert cv2.imwrite(str(folder / f"{i}.png"), img)
    with pytest.raises(ConfigError, match="unknown option"):
        build_loop(str(folder), tmp_path / "absent.onnx", defence="patchcleanser:m=3")
    with build_loop(str(folder), tiny_onnx, defence="patchcleanser:k=2") as loop:
        assert isinstance(loop.runner, PatchCleanserRunner)
        report = loop.run(progress=False)
    assert report.defence == "patchcleanser:share=0.1,k=2" and report.frames == 3
    assert report.runner.startswith("patchcleanser(onnxruntime")
    assert report.defence_stats is not None and report.defence_stats["crops"] >= 3
