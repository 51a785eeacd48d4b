"""The sticker attacks: the RP2 / EOT optimisation against a torch model, its held-out
measurement, the score-only black-box search, and the digital ``rp2`` attack on crops.

Expected values come from the formulas: cross-entropy and the clamped margin worked out
by hand, a linear model whose best sticker is known in closed form, and fake models whose
answer is fixed by the colours they are shown.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cloud_train.attacks import create_attack, list_attacks
from cloud_train.models import create_model
from cloud_train.roa import GREY
from cloud_train.signs import SYNTHETIC_CLASSES
from cloud_train.sticker.blackbox import blackbox_sticker
from cloud_train.sticker.digital import crop_mask, rp2
from cloud_train.sticker.eot import EotPool
from cloud_train.sticker.optimise import (
    StickerConfig,
    measure,
    optimise_sticker,
    task_loss,
    torch_predictor,
    wins,
)
from cloud_train.sticker.shapes import (
    PRINTER_PALETTE,
    candidate_centres,
    plate_masks,
    sticker_mask,
)
from roadshield_base.errors import ConfigError

STOP = SYNTHETIC_CLASSES.index("stop")
LIMIT_100 = SYNTHETIC_CLASSES.index("speed_limit_100")
N_CLASSES = len(SYNTHETIC_CLASSES)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- the loss

def test_targeted_task_loss_is_the_cross_entropy_of_the_target() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 3.0]])
    # -log softmax(z)[1] per row, by hand
    rows = [math.log(math.exp(2) + 1 + math.exp(-1)) - 0.0,
            math.log(1 + math.e + math.exp(3)) - 1.0]
    got = task_loss(logits, sign=0, target=1, kappa=5.0)
    assert float(got) == pytest.approx(sum(rows) / 2, rel=1e-6)
    assert float(got) == pytest.approx(float(F.cross_entropy(logits, torch.tensor([1, 1]))))


def test_untargeted_task_loss_is_the_margin_clamped_at_minus_kappa() -> None:
    logits = torch.tensor([[5.0, 1.0, 0.0], [0.0, 10.0, 1.0], [1.0, 2.0, 0.0]],
                          requires_grad=True)
    # sign 0: margins 5 - 1 = 4, 0 - 10 = -10 -> clamped to -3, 1 - 2 = -1
    got = task_loss(logits, sign=0, target=None, kappa=3.0)
    assert float(got.detach()) == pytest.approx((4 - 3 - 1) / 3)
    got.backward()
    # the clamped view gives no gradient; the others push own down and the best other up
    assert torch.equal(logits.grad[1], torch.zeros(3))
    assert torch.allclose(logits.grad[0], torch.tensor([1.0, -1.0, 0.0]) / 3)
    assert torch.allclose(logits.grad[2], torch.tensor([1.0, -1.0, 0.0]) / 3)
    assert float(task_loss(logits.detach(), 0, None, kappa=0.0)) == pytest.approx((4 + 0 + 0) / 3)


def test_wins_targeted_and_untargeted() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.3, 0.5]])
    np.testing.assert_array_equal(wins(probs, sign=0, target=2), [False, False, True])
    np.testing.assert_array_equal(wins(probs, sign=0, target=None), [False, True, True])
    np.testing.assert_array_equal(wins(probs, sign=1, target=None), [True, False, True])


# --------------------------------------------------------------------------- the config

@pytest.mark.parametrize(("change", "word"), [
    ({"target": STOP}, "target"),
    ({"cells": 0}, "cells"), ({"cells": 3}, "cells"), ({"cells": 48}, "cells"),
    ({"cells": 256}, "cells"),
    ({"steps": 0}, "steps"), ({"batch": 0}, "batch"), ({"pool": 0}, "pool"),
    ({"eval_pool": -1}, "eval_pool"), ({"positions": 0}, "positions"),
    ({"lr": 0.0}, "lr"), ({"lr": float("nan")}, "lr"), ({"nps_weight": -0.1}, "weights"),
    ({"tv_weight": -1.0}, "weights"), ({"kappa": -1.0}, "kappa"),
    ({"area": 0.5}, "area"), ({"area": 0.0}, "area"),
])
def test_bad_config_is_refused(change, word) -> None:
    cfg = StickerConfig(sign=STOP, **{"target": LIMIT_100, **change})
    with pytest.raises(ConfigError, match=word):
        cfg.check()


def test_default_and_untargeted_configs_pass() -> None:
    StickerConfig(sign=STOP, target=LIMIT_100).check()
    StickerConfig(sign=STOP).check()
    for cells in (1, 8, 16, 32, 64, 128):
        StickerConfig(sign=STOP, cells=cells).check()


# --------------------------------------------------------------------------- white-box

SMALL = {"steps": 3, "positions": 2, "search_steps": 2, "pool": 6, "eval_pool": 6, "batch": 4}


@pytest.fixture(scope="module")
def tiny_run():
    """An untrained signnet_tiny in training mode with one BN layer in eval mode and the
    head's bias frozen, before and after a short targeted run."""
    torch.manual_seed(0)
    model = create_model("signnet_tiny", N_CLASSES)
    model.train()
    model.features[0][1].eval()
    model.head[2].bias.requires_grad_(False)
    modes = {name: m.training for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calls: list[tuple[int, int, float]] = []
    cfg = StickerConfig(sign=STOP, target=LIMIT_100, **SMALL)
    result = optimise_sticker(model, cfg, progress=lambda *a: calls.append(a))
    return model, modes, flags, state, cfg, result, calls


def test_optimise_returns_a_printable_sticker_on_the_plate(tiny_run) -> None:
    *_, cfg, result, _ = tiny_run
    assert result.colours.shape == (128, 128, 3) and result.colours.dtype == np.uint8
    assert result.mask.shape == (128, 128) and result.mask.dtype == np.bool_
    assert (result.colours[~result.mask] == 0).all()
    assert not (result.mask & ~plate_masks(STOP)[1]).any()
    centres = candidate_centres(STOP, cfg.positions, cfg.shape, cfg.area)
    assert result.centre in centres
    np.testing.assert_array_equal(result.mask,
                                  sticker_mask(STOP, cfg.shape, cfg.area, result.centre))


def test_optimise_reports_shares_and_a_history_per_step(tiny_run) -> None:
    *_, cfg, result, calls = tiny_run
    for share in (result.success, result.confident, result.clean_success,
                  *result.by_distance.values()):
        assert 0.0 <= share <= 1.0
    assert result.confident <= result.success
    assert len(result.history) == cfg.steps
    assert [h["step"] for h in result.history] == list(range(cfg.steps))
    assert all({"task", "nps", "tv", "batch_success"} <= set(h) for h in result.history)
    assert result.config == asdict(cfg) and result.seconds > 0
    # progress reports the main run only, once per step
    assert [c[:2] for c in calls] == [(s, cfg.steps) for s in range(1, cfg.steps + 1)]
    summary = result.summary()
    assert "colours" not in summary and "mask" not in summary
    json.dumps(summary)


def test_optimise_restores_the_training_mode_and_leaves_the_weights(tiny_run) -> None:
    model, modes, _, state, *_ = tiny_run
    assert {name: m.training for name, m in model.named_modules()} == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # BN statistics too: the model ran in eval mode


def test_optimise_restores_the_requires_grad_flags(tiny_run) -> None:
    model, _, flags, *_ = tiny_run
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags


class CentreColour(nn.Module):
    """Reads ``TARGET`` when the middle 4 x 4 pixels of the crop are bluer than red by more
    than 0.15, the sign otherwise (logit 1 against 20 * (blue - red - 0.1))."""

    def __init__(self, sign: int, target: int) -> None:
        super().__init__()
        self.sign, self.target = sign, target
        self.scale = nn.Parameter(torch.tensor(20.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x[:, :, 14:18, 14:18].mean(dim=(2, 3))
        score = self.scale * (c[:, 2] - c[:, 0] - 0.1)
        z = torch.zeros(len(x), N_CLASSES)
        z[:, self.sign] = 1.0
        return z + F.one_hot(torch.tensor(self.target), N_CLASSES).float() * score[:, None]


@pytest.mark.parametrize("target", [LIMIT_100, None])
def test_optimise_finds_the_colour_a_model_reads_as_the_target(target) -> None:
    model = CentreColour(STOP, LIMIT_100)
    cfg = StickerConfig(sign=STOP, target=target, shape="square", area=0.15, steps=10,
                        positions=1, pool=8, eval_pool=8, batch=4, jpeg_p=0.0)
    result = optimise_sticker(model, cfg)
    assert result.clean_success == 0.0  # a red sign: never the target without the sticker
    assert result.success >= 0.75
    r, _, b = result.colours[result.mask].astype(float).mean(axis=0)
    assert b > r + 50  # it learned blue
    assert model.scale.requires_grad


# --------------------------------------------------------------------------- measure

@pytest.fixture(scope="module")
def pool() -> EotPool:
    return EotPool(STOP, 8, seed=3, jpeg_p=0.0)


def fixed_answer(cls: int, p: float = 0.9):
    def predict(x: torch.Tensor) -> np.ndarray:
        probs = np.full((len(x), N_CLASSES), (1 - p) / (N_CLASSES - 1))
        probs[:, cls] = p
        return probs
    return predict


def some_sticker() -> tuple[np.ndarray, np.ndarray]:
    mask = sticker_mask(STOP, "bars", 0.1)
    colours = np.zeros((128, 128, 3), np.uint8)
    colours[mask] = (25, 80, 170)
    return colours, mask


def test_measure_with_a_model_that_always_reads_the_target(pool) -> None:
    colours, mask = some_sticker()
    got = measure(fixed_answer(LIMIT_100), pool, colours, mask, STOP, LIMIT_100)
    assert got["success"] == got["confident"] == got["clean_success"] == 1.0
    assert got["views"] == len(pool)
    assert set(got["by_distance"].values()) == {1.0}


def test_measure_with_a_model_that_always_reads_the_sign(pool) -> None:
    colours, mask = some_sticker()
    for target in (LIMIT_100, None):
        got = measure(fixed_answer(STOP), pool, colours, mask, STOP, target)
        assert got["success"] == got["confident"] == got["clean_success"] == 0.0


def test_measure_counts_confident_wins_only_from_probability_0_6(pool) -> None:
    colours, mask = some_sticker()
    got = measure(fixed_answer(LIMIT_100, p=0.55), pool, colours, mask, STOP, LIMIT_100)
    assert got["success"] == 1.0 and got["confident"] == 0.0
    got = measure(fixed_answer(LIMIT_100, p=0.6), pool, colours, mask, STOP, None)
    assert got["success"] == got["confident"] == 1.0


def test_measure_splits_success_by_distance(pool) -> None:
    px = np.array([s.sign_px for s in pool.samples])
    near = px >= 48  # the fake wins on the views where the sign is 48 px or more

    def predict(x: torch.Tensor) -> np.ndarray:
        probs = np.full((len(x), N_CLASSES), 0.01)
        probs[np.arange(len(x)), np.where(near, LIMIT_100, STOP)] = 0.9
        return probs

    colours, mask = some_sticker()
    got = measure(predict, pool, colours, mask, STOP, LIMIT_100)
    assert got["success"] == pytest.approx(round(near.mean(), 4))
    want = {}
    for key, lo, hi in (("24-48 px", 0, 48), ("48-80 px", 48, 80), ("80-120+ px", 80, 1e9)):
        sel = (px >= lo) & (px < hi)
        if sel.any():
            want[key] = round(float(near[sel].mean()), 4)
    assert got["by_distance"] == want
    assert want.get("24-48 px", 0.0) == 0.0 and want.get("80-120+ px", 1.0) == 1.0


def test_measure_shows_the_sticker_and_the_clean_control(pool) -> None:
    seen: list[torch.Tensor] = []

    def predict(x: torch.Tensor) -> np.ndarray:
        seen.append(x.clone())
        return fixed_answer(STOP)(x)

    colours, mask = some_sticker()
    measure(predict, pool, colours, mask, STOP, LIMIT_100)
    stickered, clean = seen
    assert stickered.shape == clean.shape == (len(pool), 3, 32, 32)
    # blue bars on a red sign: the middle of every crop is bluer with the sticker
    mid = (slice(None), slice(None), slice(8, 24), slice(8, 24))
    assert ((stickered[mid][:, 2] - clean[mid][:, 2]).mean(dim=(1, 2)) > 0).all()


def test_torch_predictor_returns_probabilities() -> None:
    model = CentreColour(STOP, LIMIT_100)
    probs = torch_predictor(model)(torch.rand(5, 3, 32, 32))
    assert probs.shape == (5, N_CLASSES)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


# --------------------------------------------------------------------------- black-box

VIEWS, HELD_OUT = 4, 5


@pytest.fixture(scope="module")
def bb_pools() -> tuple[EotPool, EotPool, np.ndarray]:
    pool = EotPool(STOP, 6, seed=0)
    held = EotPool(STOP, HELD_OUT, seed=1)
    c, zero = torch.zeros(3, 128, 128), torch.zeros(1, 128, 128)
    g = torch.Generator().manual_seed(0)
    clean = np.concatenate([pool.render(c, zero, generator=g, jitter=False).numpy(),
                            held.render(c, zero, generator=g, jitter=False).numpy()])
    return pool, held, clean


def darkened_red_reader(clean: np.ndarray, sign: int, target: int, calls: list[int]):
    """A fake scored model: finds which clean view a crop shows (nearest clean render) and
    reads the target once the sticker darkens its mean red by more than 0.045 (a black
    sticker of 15 % of the face does, random palette stripes mostly do not)."""
    def query(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        d = ((x[:, None] - clean[None]) ** 2).mean(axis=(2, 3, 4))
        drop = clean[d.argmin(axis=1), 0].mean(axis=(1, 2)) - x[:, 0].mean(axis=(1, 2))
        p = 1.0 / (1.0 + np.exp(-(drop - 0.045) * 300))
        probs = np.full((len(x), N_CLASSES), 1e-4)
        probs[:, target] = p
        probs[:, sign] = 1.0 - p
        return probs / probs.sum(axis=1, keepdims=True)
    return query


@pytest.fixture(scope="module")
def bb_run(bb_pools):
    pool, held, clean = bb_pools
    calls: list[int] = []
    mask = sticker_mask(STOP, "square", 0.15)
    result = blackbox_sticker(darkened_red_reader(clean, STOP, LIMIT_100, calls), pool, held,
                              mask, STOP, LIMIT_100, budget=203, views=VIEWS, cells=16,
                              check_every=3, seed=1)
    return result, calls, mask


def test_blackbox_spends_at_most_its_budget(bb_run) -> None:
    result, calls, _ = bb_run
    attack = [n for n in calls if n == VIEWS]
    assert set(calls) == {VIEWS, HELD_OUT}  # attack queries and held-out checks only
    assert sum(attack) == result.queries <= 203
    assert result.queries > 203 - VIEWS  # and it uses what it has


def test_blackbox_curve_and_queries_to_half(bb_run) -> None:
    result, _, _ = bb_run
    queries = [q for q, _ in result.curve]
    assert queries == sorted(set(queries)) and queries[-1] == result.queries
    assert all(0.0 <= s <= 1.0 for _, s in result.curve)
    assert result.success == result.curve[-1][1]
    assert result.success >= 0.8
    first = next(q for q, s in result.curve if s >= 0.5)
    assert result.queries_to_half == first
    json.dumps(result.summary())


def test_blackbox_sticker_is_palette_colours_on_the_mask(bb_run) -> None:
    result, _, mask = bb_run
    assert result.colours.shape == (128, 128, 3) and result.colours.dtype == np.uint8
    np.testing.assert_array_equal(result.mask, mask)
    assert (result.colours[~mask] == 0).all()
    palette = {tuple(c) for c in PRINTER_PALETTE.tolist()}
    assert {tuple(c) for c in result.colours[mask].tolist()} <= palette
    # it darkened the sticker: random palette colours average 142 in red
    assert result.colours[mask][:, 0].mean() < 100


def test_blackbox_that_never_wins_reports_no_half(bb_pools) -> None:
    pool, held, _ = bb_pools
    mask = sticker_mask(STOP, "square", 0.1)

    def query(x: np.ndarray) -> np.ndarray:
        return fixed_answer(STOP)(x)

    result = blackbox_sticker(query, pool, held, mask, STOP, None, budget=20, views=4,
                              check_every=2)
    assert result.success == 0.0 and result.queries_to_half is None
    assert all(s == 0.0 for _, s in result.curve) and result.queries <= 20


@pytest.mark.parametrize("kw", [{"budget": 3, "views": 4}, {"views": 0}, {"cells": 0},
                                {"cells": 12}])
def test_blackbox_bad_arguments_are_refused(bb_pools, kw) -> None:
    pool, held, _ = bb_pools
    args = {"budget": 100, "views": 4, **kw}
    with pytest.raises(ConfigError):
        blackbox_sticker(fixed_answer(STOP), pool, held, sticker_mask(STOP, "square", 0.1),
                         STOP, None, **args)


# --------------------------------------------------------------------------- digital rp2

SIZE = 16


def linear_model(v: torch.Tensor) -> nn.Module:
    """Logits (v.x, -v.x, 0): descending the cross-entropy of class 0 moves every free
    pixel towards sign(v), so the best sticker is known in closed form."""
    lin = nn.Linear(v.numel(), 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.stack([v.flatten(), -v.flatten(), torch.zeros(v.numel())]))
    return nn.Sequential(nn.Flatten(), lin).eval()


@pytest.fixture(scope="module")
def linear() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    v = torch.randn(3, SIZE, SIZE, generator=g)
    x = torch.rand(4, 3, SIZE, SIZE, generator=g)
    return linear_model(v), v, x


def test_rp2_is_registered() -> None:
    assert "rp2" in list_attacks()
    with pytest.raises(ConfigError, match="steps"):
        create_attack("rp2", steps=0)
    with pytest.raises(ConfigError, match="alpha"):
        create_attack("rp2", alpha=1.5)


def test_rp2_changes_only_the_sticker_pixels(linear) -> None:
    model, _, x = linear
    y = torch.ones(len(x), dtype=torch.long)
    x_adv = create_attack("rp2", shape="bars", area=0.15, steps=4)(model, x, y)
    mask = crop_mask(SIZE, "bars", 0.15).expand_as(x)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert torch.equal(x_adv[~mask], x[~mask])
    assert (x_adv[mask] != x[mask]).float().mean() > 0.9
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


def test_rp2_targeted_reaches_the_closed_form_sticker(linear) -> None:
    model, v, x = linear
    y = torch.ones(len(x), dtype=torch.long)
    x_adv = create_attack("rp2", shape="square", area=0.15, steps=5, target=0)(model, x, y)
    mask = crop_mask(SIZE, "square", 0.15)[0, 0]
    # 5 steps of 2.5 * 0.5 / 5 from grey: every pixel reaches 1 where v > 0, 0 where v < 0
    best = (v > 0).float()
    for i in range(len(x)):
        assert torch.equal(x_adv[i][:, mask], best[:, mask])
    with torch.no_grad():
        assert (model(x_adv)[:, 0] > model(x)[:, 0]).all()


def test_rp2_untargeted_lowers_the_true_logit(linear) -> None:
    model, v, x = linear
    y = torch.zeros(len(x), dtype=torch.long)
    x_adv = rp2(model, x, y, shape="circle", area=0.15, steps=5)
    mask = crop_mask(SIZE, "circle", 0.15)[0, 0]
    best = (v < 0).float()
    for i in range(len(x)):
        assert torch.equal(x_adv[i][:, mask], best[:, mask])
    with torch.no_grad():
        assert (model(x_adv)[:, 0] < model(x)[:, 0]).all()


def test_rp2_starts_from_grey_and_keeps_the_model_mode(linear) -> None:
    model, _, x = linear
    model.train()
    try:
        # one step of alpha 0.25 from grey: every sticker pixel ends at 0.25 or 0.75
        x_adv = rp2(model, x, torch.ones(len(x), dtype=torch.long), shape="square",
                    area=0.1, steps=1, alpha=0.25, target=0)
        assert model.training
    finally:
        model.eval()
    mask = crop_mask(SIZE, "square", 0.1).expand_as(x)
    values = set(torch.unique(x_adv[mask]).tolist())
    assert values <= {GREY - 0.25, GREY + 0.25}


def test_crop_mask_sits_on_the_central_face() -> None:
    m = crop_mask(32, "square", 0.1, face=0.75)
    assert m.shape == (1, 1, 32, 32) and m.dtype == torch.bool
    side = round(32 * 0.75)
    o = (32 - side) // 2
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[o:o + side, o:o + side] = True
    assert m[0, 0].any() and not (m[0, 0] & ~inside).any()
    # the share of the crop: 10 % of a round face (pi/4 of its square) of 24 x 24 px
    assert float(m.sum()) == pytest.approx(0.1 * math.pi / 4 * side * side, rel=0.25)


@pytest.mark.parametrize("kw", [{"shape": "star"}, {"area": 0.5}, {"area": 0.0},
                                {"face": 0.1}, {"face": 1.5}])
def test_rp2_bad_shape_area_or_face_is_refused(linear, kw) -> None:
    model, _, x = linear
    with pytest.raises(ConfigError):
        create_attack("rp2", steps=1, **kw)(model, x, torch.zeros(len(x), dtype=torch.long))


def test_rp2_needs_square_nchw_crops(linear) -> None:
    model, _, _ = linear
    with pytest.raises(ConfigError, match="square"):
        rp2(model, torch.rand(2, 3, SIZE, SIZE + 2), torch.zeros(2, dtype=torch.long), steps=1)
    with pytest.raises(ConfigError, match="square"):
        rp2(model, torch.rand(3, SIZE, SIZE), torch.zeros(3, dtype=torch.long), steps=1)


def test_rp2_on_an_empty_batch_returns_it(linear) -> None:
    model, _, _ = linear
    empty = torch.zeros(0, 3, SIZE, SIZE)
    assert rp2(model, empty, torch.zeros(0, dtype=torch.long), steps=1).shape == empty.shape


def test_nes_darkens_the_sticker_until_the_fake_model_reads_the_target(bb_pools) -> None:
    # the fake model reads the target once the sticker darkens the sign's red: the score
    # gradient NES estimates points to darker colours, so success must come within budget
    from cloud_train.sticker.blackbox import nes_sticker

    pool, held, clean = bb_pools
    calls: list[int] = []
    mask = sticker_mask(STOP, "square", 0.15)
    result = nes_sticker(darkened_red_reader(clean, STOP, LIMIT_100, calls), pool, held, mask,
                         STOP, LIMIT_100, budget=2 * 4 * 4 * 12, views=4, samples=4,
                         sigma=0.5, lr=0.5, cells=8, check_every=1, seed=0)
    assert result.queries == 2 * 4 * 4 * 12 == sum(n for n in calls if n == 4)
    assert result.curve[0][1] < 0.5 and result.success >= 0.5
    assert result.queries_to_half is not None and result.queries_to_half <= result.queries
    assert not result.colours[~mask].any()


def test_nes_bad_arguments_are_refused(bb_pools) -> None:
    from cloud_train.sticker.blackbox import nes_sticker

    pool, held, _ = bb_pools
    with pytest.raises(ConfigError):
        nes_sticker(fixed_answer(STOP), pool, held, sticker_mask(STOP, "square", 0.1), STOP,
                    None, budget=10, views=4, samples=4)
