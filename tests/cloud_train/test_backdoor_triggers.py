"""Backdoor triggers: where the pixels land, the blend formula, the tensor twin, bad settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cloud_train.backdoor.triggers import (
    Trigger,
    apply_trigger,
    apply_trigger_tensor,
    pattern_image,
)
from cloud_train.tensors import to_tensor
from roadshield_base.errors import ConfigError


def _images(n: int = 6, h: int = 32, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _changed_mask(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    return (before != after).any(axis=-1)


@pytest.mark.parametrize("position, corner", [("bottom_right", (27, 25)), ("top_left", (0, 0)),
                                              ("3,7", (3, 7))])
def test_patch_lands_where_stated_and_nowhere_else(position: str, corner: tuple[int, int]):
    imgs = _images(h=30, w=32)  # non-square: rows and columns must not be swapped
    trig = Trigger("patch", target=1, size=5, position=position, pattern="white")
    out = apply_trigger(imgs, trig)
    x, y = corner
    expected = np.zeros((30, 32), bool)
    expected[y:y + 5, x:x + 5] = True
    assert (out[:, expected] == 255).all()
    assert np.array_equal(out[:, ~expected], imgs[:, ~expected])
    # every image gets the same patch, and the input array is left as it was
    assert np.array_equal(imgs, _images(h=30, w=32))


def test_checker_pattern_values():
    pat = pattern_image(Trigger("patch", 0, size=3), 3, 3)
    # pixel (i, j) is white when i + j is even
    assert pat[..., 0].tolist() == [[255, 0, 255], [0, 255, 0], [255, 0, 255]]
    assert (pat == pat[..., :1]).all()  # grey: all channels equal


def test_random_pattern_is_seeded():
    a = pattern_image(Trigger("patch", 0, size=4, pattern="random", seed=3), 4, 4)
    b = pattern_image(Trigger("patch", 0, size=4, pattern="random", seed=3), 4, 4)
    c = pattern_image(Trigger("patch", 0, size=4, pattern="random", seed=4), 4, 4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_random_position_one_patch_per_image_inside_the_image():
    imgs = np.zeros((40, 16, 16, 3), np.uint8)
    trig = Trigger("patch", 0, size=4, position="random", pattern="white")
    out = apply_trigger(imgs, trig, rng=np.random.default_rng(1))
    masks = _changed_mask(imgs, out)
    assert (masks.sum(axis=(1, 2)) == 16).all()  # exactly one 4x4 square each
    for m in masks:
        ys, xs = np.nonzero(m)
        assert ys.max() - ys.min() == 3 and xs.max() - xs.min() == 3
    corners = {(int(np.nonzero(m)[0].min()), int(np.nonzero(m)[1].min())) for m in masks}
    assert len(corners) > 10  # positions really vary


def test_blend_formula_exact():
    imgs = _images()
    trig = Trigger("blend", target=2, alpha=0.2, pattern="random", seed=5)
    pat = np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    want = np.rint(0.8 * imgs.astype(np.float64) + 0.2 * pat).astype(np.uint8)
    assert np.array_equal(apply_trigger(imgs, trig), want)


@pytest.mark.parametrize("trig", [
    Trigger("patch", 1), Trigger("patch", 1, size=6, position="2,20", pattern="random"),
    Trigger("patch", 1, position="random", pattern="white"),
    Trigger("blend", 1, alpha=0.15, pattern="random"),
])
def test_tensor_twin_matches_uint8(trig: Trigger):
    imgs = _images()
    want = to_tensor(apply_trigger(imgs, trig))
    got = apply_trigger_tensor(to_tensor(imgs), trig)
    tol = 0.5 / 255 + 1e-6 if trig.kind == "blend" else 0.0  # blend: uint8 rounding only
    assert (got - want).abs().max().item() <= tol


def test_tensor_blend_is_differentiable():
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    apply_trigger_tensor(x, Trigger("blend", 0, alpha=0.25)).sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 0.75))


def test_round_trip_dict():
    trig = Trigger("blend", 3, size=5, position="1,2", pattern="white", alpha=0.3, seed=9)
    assert Trigger.from_dict(trig.to_dict()) == trig
    with pytest.raises(ConfigError, match="colour"):
        Trigger.from_dict({**trig.to_dict(), "colour": 1})


@pytest.mark.parametrize("kw, fragment", [
    ({"kind": "sticker"}, "sticker"), ({"pattern": "plaid"}, "plaid"),
    ({"size": 0}, "0"), ({"alpha": 1.5}, "1.5"), ({"position": "middle"}, "middle"),
    ({"position": "-1,3"}, "-1,3"),
])
def test_bad_settings_name_the_value(kw: dict, fragment: str):
    args = {"kind": "patch", "target": 0, **kw}
    with pytest.raises(ConfigError, match=fragment):
        Trigger(**args)


def test_validate_target_and_size():
    with pytest.raises(ConfigError, match="target 14"):
        Trigger("patch", 14).validate((32, 32), 14)
    with pytest.raises(ConfigError, match="target -1"):
        Trigger("patch", -1).validate((32, 32), 14)
    with pytest.raises(ConfigError, match="size 40"):
        Trigger("patch", 0, size=40).validate((32, 32), 14)
    with pytest.raises(ConfigError, match="30,30"):
        Trigger("patch", 0, size=4, position="30,30").validate((32, 32), 14)
    with pytest.raises(ConfigError, match="size 40"):
        apply_trigger(_images(), Trigger("patch", 0, size=40))
    Trigger("blend", 13).validate((32, 32), 14)  # a blend has no patch to fit


def test_wrong_image_types_are_refused():
    with pytest.raises(ConfigError, match="uint8"):
        apply_trigger(np.zeros((2, 8, 8, 3), np.float32), Trigger("patch", 0))
    with pytest.raises(ConfigError, match="float"):
        apply_trigger_tensor(torch.zeros(2, 8, 8, 3), Trigger("patch", 0))
