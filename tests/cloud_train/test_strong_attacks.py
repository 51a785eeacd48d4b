"""PGD-L2, Auto-PGD, Square, the worst-case evaluation and its gradient-masking checks."""

from __future__ import annotations

import pytest
import torch
from toy_data import trained_toy_model

from cloud_train.attacks import create_attack, list_attacks, pgd_linf
from cloud_train.robust_eval import sanity_checks, strong_evaluate
from cloud_train.strong_attacks import apgd, dlr_loss, margin, pgd_l2, square
from roadshield_base.errors import ConfigError

#: a standardly trained toy model is robust at 8/255 but not at 32/255 (see test_attacks.py)
EPS = 32 / 255
EPS_LIST = [8 / 255, 16 / 255, 32 / 255]


@pytest.fixture(scope="module")
def trained() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """signnet_tiny trained (standard) on toy shapes, in eval mode, with 64 held-out images."""
    return trained_toy_model(64)


class Quantised(torch.nn.Module):
    """Rounds its input to 8-bit levels before the real model: torch.round's gradient is zero,
    so every gradient-based attack sees a flat loss (gradient masking), yet the decision
    function is almost the same as the real model's."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.round(x * 255) / 255)


class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits):  # type: ignore[override]
        return logits.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        raise RuntimeError("a gradient-free attack called backward")


class NoGradients(torch.nn.Module):
    """Fails the test on any backward pass, and records whether autograd was on."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.grad_enabled_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.grad_enabled_calls += int(torch.is_grad_enabled())
        return _NoBackward.apply(self.model(x))


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_registered_by_name() -> None:
    assert {"apgd", "square", "pgd_l2", "fgsm", "pgd_linf"} <= set(list_attacks())


@pytest.mark.parametrize("name", ["apgd_ce", "apgd_dlr", "square", "pgd_l2"])
def test_stay_in_the_ball_and_the_image_range(trained, name) -> None:
    model, x, y = trained
    eps = 16 / 255
    if name.startswith("apgd"):
        x_adv = apgd(model, x, y, eps, steps=5, loss=name[5:])
    elif name == "square":
        x_adv = square(model, x, y, eps, queries=20)
    else:
        eps = 1.0  # L2 radius over a 3 x 32 x 32 image
        x_adv = pgd_l2(model, x, y, eps, alpha=0.25, steps=5)
    assert x_adv.shape == x.shape and x_adv.dtype == torch.float32 and not x_adv.requires_grad
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    delta = (x_adv - x).flatten(1)
    dist = delta.norm(dim=1) if name == "pgd_l2" else delta.abs().amax(1)
    assert float(dist.max()) <= eps + 1e-5
    assert float(dist.max()) > eps / 2  # it did move


@pytest.mark.parametrize("eps", [24 / 255, 32 / 255])
def test_apgd_is_at_least_as_strong_as_tuned_pgd(trained, eps) -> None:
    # same 20-step budget; PGD gets the best of four step sizes, APGD needs none.
    # APGD-CE and APGD-DLR are used together, as strong_evaluate uses them.
    model, x, y = trained
    acc_pgd = []
    for alpha in (2 / 255, eps / 10, eps / 4, eps / 2):
        torch.manual_seed(0)
        acc_pgd.append(accuracy(model, pgd_linf(model, x, y, eps, alpha=alpha, steps=20), y))
    with torch.no_grad():
        survive_ce = model(apgd(model, x, y, eps, steps=20, loss="ce")).argmax(1) == y
        survive_dlr = model(apgd(model, x, y, eps, steps=20, loss="dlr")).argmax(1) == y
    assert float((survive_ce & survive_dlr).float().mean()) <= min(acc_pgd)
    # each loss alone is a real attack too
    clean = accuracy(model, x, y)
    assert float(survive_ce.float().mean()) < clean - 0.5
    assert float(survive_dlr.float().mean()) < clean - 0.5


def test_misclassified_points_are_left_alone_and_modes_restored(trained) -> None:
    model, x, y = trained
    wrong = (y + 1) % 4  # every point is "already misclassified" against these labels
    model.train()
    model.head.eval()
    try:
        assert torch.equal(apgd(model, x[:8], wrong[:8], EPS, steps=3), x[:8])
        assert torch.equal(square(model, x[:8], wrong[:8], EPS, queries=5), x[:8])
        assert torch.equal(pgd_l2(model, x[:8], wrong[:8], 0.5, 0.1, 3), x[:8])
        assert model.training and model.features.training and not model.head.training
    finally:
        model.eval()


def test_square_breaks_the_model_without_gradients(trained) -> None:
    model, x, y = trained
    guarded = NoGradients(model)
    x_adv = square(guarded, x, y, EPS, queries=300)  # autograd left on: square must turn it off
    assert guarded.grad_enabled_calls == 0
    acc_square = accuracy(model, x_adv, y)
    assert acc_square < accuracy(model, x, y) - 0.2
    assert torch.equal(square(model, x, y, EPS, queries=300), x_adv)  # seeded: repeatable


def test_dlr_and_margin_match_hand_computed_values() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0, -1.0], [0.5, 4.0, 1.0, 2.0]])
    y = torch.tensor([0, 0])
    # row 0: true class is the top logit; sorted 3, 2, 1, -1 -> -(3 - 2) / (3 - 1) = -0.5
    # row 1: true logit 0.5, best other 4; sorted 4, 2, 1 -> -(0.5 - 4) / (4 - 1) = 7/6
    assert margin(logits, y).tolist() == pytest.approx([1.0, -3.5])
    assert dlr_loss(logits, y).tolist() == pytest.approx([-0.5, 3.5 / 3.0])
    # scale and shift invariance (the point of the ratio)
    assert dlr_loss(7 * logits + 3, y).tolist() == pytest.approx([-0.5, 3.5 / 3.0])
    with pytest.raises(ConfigError, match="3 classes"):
        dlr_loss(logits[:, :2], y)


def test_worst_case_is_at_most_each_single_attack(trained) -> None:
    model, x, y = trained
    r = strong_evaluate(model, x, y, eps=EPS, apgd_steps=20, square_queries=200, batch_size=32)
    assert r["clean_acc"] == pytest.approx(accuracy(model, x, y))
    for name in ("apgd_ce", "apgd_dlr", "square"):
        assert r["robust_acc"] <= r[f"{name}_acc"] <= r["clean_acc"]
    assert r["robust_acc"] < r["clean_acc"] - 0.5
    assert r["robust_acc"] == pytest.approx(sum(r["robust_mask"]) / r["n"])
    again = strong_evaluate(model, x, y, eps=EPS, apgd_steps=20, square_queries=200,
                            batch_size=32)
    assert again["robust_mask"] == r["robust_mask"]


def test_sanity_checks_pass_on_a_trained_model(trained) -> None:
    model, x, y = trained
    s = sanity_checks(model, x, y, EPS_LIST, square_queries=200)
    assert s["all_passed"], s
    accs = s["monotonic"]["pgd_acc"]
    assert accs[0] > accs[-1] + 0.3  # the measured curve actually falls
    assert s["unbounded"]["pgd_acc"] <= 0.05


def test_sanity_checks_catch_gradient_masking(trained) -> None:
    model, x, y = trained
    masked = Quantised(model).eval()
    assert accuracy(masked, x, y) == pytest.approx(accuracy(model, x, y), abs=0.05)
    # gradient-based attacks see a zero gradient and get nowhere
    assert accuracy(masked, apgd(masked, x, y, EPS, steps=10), y) >= accuracy(masked, x, y) - 0.05
    s = sanity_checks(masked, x, y, EPS_LIST, square_queries=200)
    assert not s["all_passed"]
    assert not s["unbounded"]["passed"]
    assert not s["black_box_not_stronger"]["passed"]
    # while the gradient-free attack still breaks it
    assert s["black_box_not_stronger"]["square_acc"] < accuracy(masked, x, y) - 0.2


@pytest.mark.parametrize("kw", [{"eps": -0.1}, {"eps": 1.5}, {"eps": 0.1, "steps": 0},
                                {"eps": 0.1, "restarts": 0}])
def test_apgd_config_errors(trained, kw) -> None:
    model, x, y = trained
    with pytest.raises(ConfigError):
        apgd(model, x[:2], y[:2], **kw)
    with pytest.raises(ConfigError):
        create_attack("apgd", **kw)


@pytest.mark.parametrize("call", [
    lambda m, x, y: square(m, x, y, eps=2.0),
    lambda m, x, y: square(m, x, y, eps=0.1, queries=0),
    lambda m, x, y: square(m, x, y, eps=0.1, p_init=0.0),
    lambda m, x, y: apgd(m, x, y, eps=0.1, loss="hinge"),
    lambda m, x, y: pgd_l2(m, x, y, eps=-1.0, alpha=0.1, steps=3),
    lambda m, x, y: pgd_l2(m, x, y, eps=0.5, alpha=0.1, steps=0),
    lambda m, x, y: strong_evaluate(m, x, y, eps=1.5),
    lambda m, x, y: strong_evaluate(m, x, y, apgd_steps=0),
    lambda m, x, y: strong_evaluate(m, x, y, square_queries=0),
    lambda m, x, y: strong_evaluate(m, x, y, attacks=("cw",)),
    lambda m, x, y: sanity_checks(m, x, y, []),
    lambda m, x, y: sanity_checks(m, x, y, [2.0]),
    lambda m, x, y: sanity_checks(m, x, y, [0.1], steps=0),
])
def test_other_config_errors(trained, call) -> None:
    model, x, y = trained
    with pytest.raises(ConfigError):
        call(model, x[:2], y[:2])


def test_strong_attacks_are_in_the_registry_without_an_explicit_import():
    import subprocess
    import sys

    code = ("from cloud_train.attacks import list_attacks, create_attack; "
            "print(sorted(set(list_attacks()) & {'apgd', 'square', 'pgd_l2'})); "
            "create_attack('apgd', eps=8/255)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "['apgd', 'pgd_l2', 'square']"
