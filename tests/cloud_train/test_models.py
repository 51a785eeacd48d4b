"""Model registry, shapes, parameter budgets and the in-model normalisation."""

from __future__ import annotations

import pytest
import torch

from cloud_train.models import (
    Normalize,
    count_parameters,
    create_model,
    list_models,
    register_model,
)
from roadshield_base.errors import ConfigError


def test_registry_lists_the_built_in_models() -> None:
    assert {"signnet", "signnet_tiny"} <= set(list_models())
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize("name", ["signnet", "signnet_tiny"])
@pytest.mark.parametrize("size", [32, 48])
def test_logit_shape_for_32_and_48_pixel_inputs(name: str, size: int) -> None:
    model = create_model(name, num_classes=14, input_size=size).eval()
    with torch.no_grad():
        out = model(torch.rand(3, 3, size, size))
    assert out.shape == (3, 14) and out.dtype == torch.float32
    assert model.input_size == (3, size, size)
    assert model.arch == name and model.num_classes == 14


def test_parameter_budgets() -> None:
    # teacher roughly 0.2-0.6M, student 30-60k (43 GTSRB classes, the larger head)
    assert 200_000 <= count_parameters(create_model("signnet", 43)) <= 600_000
    assert 30_000 <= count_parameters(create_model("signnet_tiny", 43)) <= 60_000


def test_unknown_model_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        create_model("resnet9000", 10)
    assert "resnet9000" in str(info.value)
    for name in list_models():
        assert name in info.value.hint


@pytest.mark.parametrize("kw", [{"num_classes": 1}, {"num_classes": 10, "depth": 3},
                                {"num_classes": 10, "input_size": 8},
                                {"num_classes": 10, "dropout": 1.5}])
def test_bad_arguments_are_config_errors(kw: dict) -> None:
    with pytest.raises(ConfigError):
        create_model("signnet", **kw)


def test_registering_a_name_twice_is_refused() -> None:
    def signnet(num_classes: int) -> torch.nn.Module:
        return torch.nn.Linear(1, num_classes)

    with pytest.raises(ConfigError, match="twice"):
        register_model(signnet)


def test_normalize_is_the_first_module_and_its_buffers_are_saved() -> None:
    model = create_model("signnet_tiny", 5, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    first = next(model.children())
    assert isinstance(first, Normalize)
    state = model.state_dict()
    assert torch.equal(state["normalize.mean"].flatten(), torch.tensor([0.5, 0.5, 0.5]))
    assert torch.equal(state["normalize.std"].flatten(), torch.tensor([0.25, 0.25, 0.25]))
    # (0.75 - 0.5) / 0.25 = 1 and (0.25 - 0.5) / 0.25 = -1, worked by hand
    x = torch.tensor([0.75, 0.25, 0.5]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    assert torch.equal(first(x)[0, :, 0, 0], torch.tensor([1.0, -1.0, 0.0]))


def test_normalisation_changes_the_output() -> None:
    torch.manual_seed(0)
    a = create_model("signnet_tiny", 5).eval()
    b = create_model("signnet_tiny", 5, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)).eval()
    b.load_state_dict({k: v for k, v in a.state_dict().items() if "normalize" not in k},
                      strict=False)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(a(x), b(x))


def test_bad_normalisation_constants_are_refused() -> None:
    with pytest.raises(ConfigError):
        Normalize((0.5, 0.5), (0.2, 0.2))
    with pytest.raises(ConfigError):
        Normalize((0.5, 0.5, 0.5), (0.2, 0.0, 0.2))
