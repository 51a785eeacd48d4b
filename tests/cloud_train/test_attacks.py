"""FGSM / PGD on a small trained model, the attack registry, and evaluate()."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from toy_data import trained_toy_model

from cloud_train.attacks import create_attack, fgsm, list_attacks, pgd_linf
from cloud_train.evaluate import eval_tensors, evaluate, format_table
from cloud_train.robust_eval import strong_evaluate
from roadshield_base.errors import ConfigError, DatasetError

#: on this toy set a standardly trained model is robust at 8/255 but not at 32/255
EPS = 32 / 255


@pytest.fixture(scope="module")
def trained() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """signnet_tiny trained (standard) to ~100% clean accuracy, with a held-out set."""
    return trained_toy_model(200)


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_attacks_lower_accuracy_and_pgd_is_at_least_as_strong(trained) -> None:
    model, x, y = trained
    torch.manual_seed(0)
    clean = accuracy(model, x, y)
    acc_fgsm = accuracy(model, fgsm(model, x, y, EPS), y)
    acc_pgd = accuracy(model, pgd_linf(model, x, y, EPS, alpha=EPS / 4, steps=10), y)
    assert clean >= 0.95
    assert acc_fgsm < clean - 0.1
    assert acc_pgd <= acc_fgsm
    assert acc_pgd < clean - 0.3


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_adversarial_examples_stay_in_the_ball_and_the_image_range(trained, attack) -> None:
    model, x, y = trained
    eps = 16 / 255
    x_adv = fgsm(model, x, y, eps) if attack == "fgsm" else pgd_linf(model, x, y, eps)
    assert x_adv.shape == x.shape and x_adv.dtype == torch.float32
    assert not x_adv.requires_grad
    assert float((x_adv - x).abs().max()) <= eps + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert float((x_adv - x).abs().max()) > eps / 2  # it did move


def test_eps_zero_returns_the_input(trained) -> None:
    model, x, y = trained
    assert torch.equal(fgsm(model, x[:8], y[:8], 0.0), x[:8])
    assert torch.equal(pgd_linf(model, x[:8], y[:8], 0.0), x[:8])


def test_every_module_gets_its_own_mode_back(trained) -> None:
    model, x, y = trained
    model.train()
    model.head.eval()  # a mixed state must survive too
    try:
        fgsm(model, x[:8], y[:8], EPS)
        pgd_linf(model, x[:8], y[:8], EPS, steps=2)
        assert model.training and model.features.training and not model.head.training
    finally:
        model.eval()


def test_more_restarts_fool_a_superset_of_examples(trained) -> None:
    # the first restart draws the same random start as a single run with the same seed,
    # and the best-of-restarts choice keeps any run that fools the model
    model, x, y = trained
    torch.manual_seed(5)
    one = pgd_linf(model, x, y, EPS, alpha=EPS / 4, steps=3, restarts=1)
    torch.manual_seed(5)
    three = pgd_linf(model, x, y, EPS, alpha=EPS / 4, steps=3, restarts=3)
    with torch.no_grad():
        fooled_one = model(one).argmax(1) != y
        fooled_three = model(three).argmax(1) != y
    assert bool((fooled_three | ~fooled_one).all())


@pytest.mark.parametrize("kw", [{"eps": -0.1}, {"eps": 1.5}, {"eps": 0.1, "steps": 0},
                                {"eps": 0.1, "alpha": 0.0}, {"eps": 0.1, "restarts": 0}])
def test_invalid_parameters_are_config_errors(trained, kw) -> None:
    model, x, y = trained
    with pytest.raises(ConfigError):
        pgd_linf(model, x[:2], y[:2], **kw)
    with pytest.raises(ConfigError):
        create_attack("pgd_linf", **kw)


def test_registry() -> None:
    assert {"fgsm", "pgd_linf"} <= set(list_attacks())
    with pytest.raises(ConfigError) as info:
        create_attack("cw_l2", eps=0.1)
    assert "fgsm" in info.value.hint
    with pytest.raises(ConfigError, match="no parameter"):
        create_attack("fgsm", eps=0.1, steps=3)
    with pytest.raises(ConfigError, match="needs"):
        create_attack("fgsm")


def test_created_attack_equals_the_direct_call(trained) -> None:
    model, x, y = trained
    attack = create_attack("pgd_linf", eps=EPS, alpha=EPS / 4, steps=3)
    torch.manual_seed(1)
    a = attack(model, x[:32], y[:32])
    torch.manual_seed(1)
    b = pgd_linf(model, x[:32], y[:32], EPS, EPS / 4, 3)
    assert torch.equal(a, b)


def test_evaluate_matches_direct_measurement(trained) -> None:
    model, x, y = trained
    images = (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    result = evaluate(model, images, y.numpy(), eps=EPS, pgd_steps=5, pgd_alpha=EPS / 4,
                      batch_size=64)
    assert result["n"] == len(y) and result["eps"] == pytest.approx(EPS)
    assert result["clean_acc"] == pytest.approx(accuracy(model, x, y))
    assert result["pgd_acc"] <= result["fgsm_acc"] < result["clean_acc"]
    assert result["seconds"] == pytest.approx(
        result["seconds_clean"] + result["seconds_fgsm"] + result["seconds_pgd"])
    # float tensors are accepted, and a fixed seed repeats the PGD result
    again = evaluate(model, x, y, eps=EPS, pgd_steps=5, pgd_alpha=EPS / 4, batch_size=64)
    assert again["pgd_acc"] == result["pgd_acc"]
    table = format_table({"toy": result}, title="toy set")
    assert "toy set" in table and f"{100 * result['pgd_acc']:.1f}" in table
    assert "32.0/255" in table


def test_evaluate_rejects_bad_inputs(trained) -> None:
    model, x, y = trained
    with pytest.raises(DatasetError):
        evaluate(model, x[:4], y[:3])
    with pytest.raises(DatasetError):
        evaluate(model, x * 255, y)
    with pytest.raises(ConfigError):
        evaluate(model, x[:4], y[:4], eps=2.0)


def test_an_attack_without_eps_still_has_its_steps_checked():
    def patchy(model, x, y, steps: int = 3):  # a registry attack with no L-inf radius
        return x

    from cloud_train import attacks

    attacks._ATTACKS["patchy"] = patchy
    try:
        assert create_attack("patchy", steps=2) is not None
        with pytest.raises(ConfigError, match="steps"):
            create_attack("patchy", steps=0)
    finally:
        del attacks._ATTACKS["patchy"]


def test_eval_tensors_takes_label_tensors_of_any_integer_type(trained) -> None:
    model, x, y = trained
    xs, ys, dev = eval_tensors(model, x[:8], y[:8].to(torch.int32))
    assert ys.dtype == torch.int64 and torch.equal(ys, y[:8]) and dev == torch.device("cpu")


@pytest.mark.gpu
def test_the_strong_evaluation_takes_tensors_already_on_the_gpu(device, trained) -> None:
    model, x, y = trained
    gpu_model = copy.deepcopy(model).to(device)
    on_gpu = strong_evaluate(gpu_model, x[:32].to(device), y[:32].to(device), eps=EPS,
                             apgd_steps=5, square_queries=20)
    on_cpu = strong_evaluate(model, x[:32], y[:32], eps=EPS, apgd_steps=5, square_queries=20)
    assert on_gpu["clean_acc"] == on_cpu["clean_acc"]
