"""The rectangular occlusion attack: stronger than a random sticker, confined to its rectangle,
inside [0, 1], the gradient search against an exhaustive one, and its size checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from toy_data import trained_toy_model

from cloud_train.attacks import create_attack, list_attacks
from cloud_train.roa import (
    GREY,
    default_alpha,
    fill_rectangle,
    grid_positions,
    rectangle_mask,
    roa,
    search_positions,
)
from roadshield_base.errors import ConfigError

N = 100


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def toy() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    return trained_toy_model(N)  # standard training, ~100 % clean accuracy on 32 x 32 shapes


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def changed_box(x: torch.Tensor, x_adv: torch.Tensor) -> list[tuple[int, int]]:
    """Per example, the height and width of the box around every changed pixel (0, 0: none)."""
    out = []
    for diff in (x_adv != x).any(1):
        rows, cols = diff.any(1).nonzero(), diff.any(0).nonzero()
        out.append((0, 0) if len(rows) == 0 else
                   (int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1))
    return out


def test_roa_is_registered_and_created_by_name(toy) -> None:
    model, x, y = toy
    assert "roa" in list_attacks()
    attack = create_attack("roa", height=5, width=6, steps=2)
    x_adv = attack(model, x[:8], y[:8])
    assert x_adv.shape == x[:8].shape and not x_adv.requires_grad
    with pytest.raises(ConfigError, match="steps"):
        create_attack("roa", steps=0)
    with pytest.raises(ConfigError, match="alpha"):
        create_attack("roa", alpha=2.0)


def test_roa_beats_a_random_sticker_of_the_same_size(toy) -> None:
    # measured on this model (200 images): clean 100 %, random 9 x 9 fill 98-99 %, ROA 9 x 9
    # with 10 steps 13 %; 7 x 7: random 100 %, ROA 66 %
    model, x, y = toy
    assert accuracy(model, x, y) >= 0.95
    gen = torch.Generator().manual_seed(0)
    tops = torch.randint(0, 32 - 9 + 1, (len(x),), generator=gen)
    lefts = torch.randint(0, 32 - 9 + 1, (len(x),), generator=gen)
    random_sticker = torch.where(rectangle_mask(tops, lefts, 9, 9, (32, 32)),
                                 torch.rand(x.shape, generator=gen), x)
    random_acc = accuracy(model, random_sticker, y)
    roa_acc = accuracy(model, roa(model, x, y, height=9, width=9, steps=10), y)
    assert random_acc >= 0.9
    assert roa_acc <= random_acc - 0.5


def test_only_the_rectangle_changes_and_pixels_stay_in_range(toy) -> None:
    model, x, y = toy
    for h, w, start in ((9, 9, False), (4, 11, True), (32, 1, False)):
        x_adv = roa(model, x[:20], y[:20], height=h, width=w, steps=3, random_start=start)
        assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
        boxes = changed_box(x[:20], x_adv)
        assert all(bh <= h and bw <= w for bh, bw in boxes), boxes
        assert sum(bh > 0 for bh, _ in boxes) >= 15  # the attack does change most images


def test_fill_leaves_the_outside_bit_for_bit_and_respects_eps(toy) -> None:
    model, x, y = toy
    tops, lefts = torch.arange(8) * 3, torch.arange(8)
    mask = rectangle_mask(tops, lefts, 6, 5, (32, 32))
    for eps, start in ((1.0, True), (8 / 255, False)):
        x_adv = fill_rectangle(model.eval(), x[:8], y[:8], mask, steps=4, alpha=0.2, eps=eps,
                               random_start=start)
        outside = ~mask.expand_as(x_adv)
        assert torch.equal(x_adv[outside], x[:8][outside])
        assert float((x_adv - x[:8]).abs().max()) <= eps + 1e-6
        assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


def test_rectangle_mask_matches_slicing() -> None:
    tops, lefts = torch.tensor([0, 3, 25]), torch.tensor([0, 20, 26])
    mask = rectangle_mask(tops, lefts, 7, 6, (32, 32))
    assert mask.shape == (3, 1, 32, 32) and mask.dtype == torch.bool
    for i in range(3):
        want = torch.zeros(32, 32, dtype=torch.bool)
        want[int(tops[i]):int(tops[i]) + 7, int(lefts[i]):int(lefts[i]) + 6] = True
        assert torch.equal(mask[i, 0], want)


def test_grid_positions_reach_the_far_edges() -> None:
    tops, lefts = grid_positions((32, 30), 7, 6, 2)
    assert tops.tolist() == [*range(0, 26, 2), 25]  # 32 - 7 = 25 is off the stride-2 grid
    assert lefts.tolist() == list(range(0, 25, 2))  # 30 - 6 = 24 is on it
    assert grid_positions((16, 16), 16, 16, 3)[0].tolist() == [0]


def test_gradient_search_with_every_candidate_is_exhaustive(toy) -> None:
    model, x, y = toy
    x, y = x[:12], y[:12]
    h = w = 8
    model.eval()
    ys, xs = grid_positions((32, 32), h, w, 4)
    tops, lefts = search_positions(model, x, y, h, w, stride=4, candidates=len(ys) * len(xs))
    grey = torch.full_like(x, GREY)

    def grey_loss(t: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            xg = torch.where(rectangle_mask(t, left, h, w, (32, 32)), grey, x)
            return F.cross_entropy(model(xg), y, reduction="none")

    every = torch.stack([grey_loss(torch.full((12,), int(t)), torch.full((12,), int(left)))
                         for t in ys for left in xs])  # [positions, N], found by brute force
    assert torch.allclose(grey_loss(tops, lefts), every.max(0).values)
    # with fewer candidates the pick is never better than the exhaustive optimum
    tops2, lefts2 = search_positions(model, x, y, h, w, stride=4, candidates=3)
    assert bool((grey_loss(tops2, lefts2) <= every.max(0).values + 1e-6).all())


def test_attack_restores_modes_and_leaves_batch_norm_alone(toy) -> None:
    model, x, y = toy
    model.train()
    try:
        stats = {k: v.clone() for k, v in model.state_dict().items()}
        roa(model, x[:8], y[:8], steps=2)
        assert model.training and all(m.training for m in model.modules())
        assert all(torch.equal(stats[k], v) for k, v in model.state_dict().items())
    finally:
        model.eval()


def test_grey_start_is_deterministic(toy) -> None:
    model, x, y = toy
    a = roa(model, x[:10], y[:10], steps=3)
    b = roa(model, x[:10], y[:10], steps=3)
    assert torch.equal(a, b)


def test_default_step_follows_the_madry_rule() -> None:
    assert default_alpha(7) == pytest.approx(2.5 * 0.5 / 7)
    assert default_alpha(1) == 1.0  # capped: one step may cross the whole range


@pytest.mark.parametrize("kw, match", [
    ({"height": 33}, "33 x 7"),
    ({"width": 40}, "7 x 40"),
    ({"height": 0}, "height"),
    ({"width": -2}, "width"),
    ({"stride": 0}, "stride"),
    ({"candidates": 0}, "candidates"),
    ({"height": 2.5}, "height"),
    ({"steps": 0}, "steps"),
    ({"eps": 1.5}, "eps"),
])
def test_bad_rectangles_raise_config_error(toy, kw, match) -> None:
    model, x, y = toy
    with pytest.raises(ConfigError, match=match) as err:
        roa(model, x[:2], y[:2], **kw)
    assert err.value.hint


def test_rectangle_larger_than_the_image_names_both_sizes(toy) -> None:
    model, x, y = toy
    with pytest.raises(ConfigError, match=r"10 x 10 .* 8 x 8 image"):
        roa(model, x[:2, :, :8, :8], y[:2], height=10, width=10)
