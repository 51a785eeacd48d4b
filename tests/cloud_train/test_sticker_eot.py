"""The sticker's EOT pool: views drawn from the synthetic camera's world, and the torch
renderer that puts a sticker on them.

The reference for the renderer is the real camera pipeline run on the same draws:
``cloud_train.scenes`` (``scene_background``, ``place_sign``, ``camera_finish``), the
device's sign locator (``edge_runtime.locate.locate_signs``) and its crop step
(``edge_runtime.preprocess.preprocess_batch``). JPEG's reference is OpenCV's codec.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from cloud_train.scenes import camera_finish, place_sign, scene_background, scene_lut
from cloud_train.signs import SYNTHETIC_CLASSES
from cloud_train.sticker.eot import EotPool, EotSample, _JpegBPDA
from cloud_train.sticker.shapes import sticker_mask
from edge_runtime.locate import box_iou, locate_signs
from edge_runtime.preprocess import preprocess_batch
from roadshield_base.errors import ConfigError

STOP = SYNTHETIC_CLASSES.index("stop")
LIMIT_30 = SYNTHETIC_CLASSES.index("speed_limit_30")
COUNT = 6

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pool() -> EotPool:
    return EotPool(STOP, COUNT, seed=0, jpeg_p=0.0)


def camera_crops(class_index: int, count: int, seed: int, frame: tuple[int, int] = (640, 480),
                 far_px: float = 24.0, near_px: float = 120.0, size: int = 32
                 ) -> tuple[list[np.ndarray], list[tuple[int, int, int, int]], list[float], int]:
    """The crops the car classifies for the pool's draws, made by the real pipeline.

    Follows the pool's random draws (the generator seeded with (seed, 77, class), four
    child seeds, the distance, the sign size range) and renders each frame with
    ``place_sign`` and ``camera_finish``; a frame where the locator misses the sign is
    skipped as the pool skips it. Returns (crops [3, S, S] float32, boxes in the frame,
    sign sizes, missed).
    """
    rng = np.random.default_rng((seed, 77, class_index))
    width, height = frame
    crops, boxes, sizes, missed = [], [], [], 0
    while len(crops) < count:
        seeds = [int(v) for v in rng.integers(0, 2**62, 4)]
        img, layout = scene_background(np.random.default_rng(seeds[0]), width, height)
        t = rng.uniform()
        lo, hi = far_px * rng.uniform(0.9, 1.15), near_px * rng.uniform(0.85, 1.0)
        px = 1.0 / ((1 - t) / lo + t / hi)
        lut = scene_lut(np.random.default_rng(seeds[1]))
        truth, _ = place_sign(img, layout, class_index, px, seeds[2])
        frame_bgr = camera_finish(img, lut, np.random.default_rng(seeds[3]))
        hits = [c.box for c in locate_signs(frame_bgr) if box_iou(c.box, truth) >= 0.5]
        if not hits:
            missed += 1
            continue
        crops.append(preprocess_batch(frame_bgr, [hits[0]], size)[0])
        boxes.append(hits[0])
        sizes.append(px)
    return crops, boxes, sizes, missed


@pytest.fixture(scope="module")
def reference() -> tuple[list[np.ndarray], list[tuple[int, int, int, int]], list[float], int]:
    return camera_crops(STOP, COUNT, seed=0)


def blank() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(3, 128, 128), torch.zeros(1, 128, 128)


def mask_tensor(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(mask.astype(np.float32))[None]


# --------------------------------------------------------------------------- the pool

def test_pool_draws_the_asked_number_of_views(pool) -> None:
    assert len(pool) == COUNT and len(pool.samples) == COUNT
    assert all(isinstance(s, EotSample) for s in pool.samples)
    assert pool.missed >= 0


def test_every_box_lies_inside_its_window(pool) -> None:
    for smp in pool.samples:
        _, h, w = smp.background.shape
        x0, y0, x1, y1 = smp.box
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert smp.grid.shape == (1, h, w, 2)
        assert smp.lut.shape == (3, 256) and smp.kernel.shape == (3, 3)
        assert smp.kernel.sum() == pytest.approx(1.0, abs=1e-5)
        assert 1 <= smp.noise_std <= 4 and smp.level in (0, 1, 2)
        assert 24 * 0.9 <= smp.sign_px <= 120


def test_pool_follows_the_real_draws(pool, reference) -> None:
    _, boxes, sizes, missed = reference
    assert [s.sign_px for s in pool.samples] == pytest.approx(sizes)
    assert pool.missed == missed
    for smp, (x0, y0, x1, y1) in zip(pool.samples, boxes, strict=True):
        assert (smp.box[2] - smp.box[0], smp.box[3] - smp.box[1]) == (x1 - x0, y1 - y0)


def test_blank_render_matches_the_camera_pipeline(pool, reference) -> None:
    crops, *_ = reference
    c, m = blank()
    got = pool.render(c, m, generator=torch.Generator().manual_seed(0), jitter=False).numpy()
    want = np.stack(crops)
    assert got.shape == want.shape
    for i, smp in enumerate(pool.samples):
        diff = np.abs(got[i] - want[i]) * 255
        # the residual is the sensor noise drawn twice (std 1-4 grey levels), and a little
        # interpolation: far below what a different view differs by
        assert diff.mean() < 4.0, (i, smp.noise_std, diff.mean())
        other = np.abs(got[i] - want[(i + 1) % len(want)]).mean() * 255
        assert other > 4 * diff.mean()


def test_blank_render_matches_the_camera_pipeline_for_another_sign() -> None:
    pool = EotPool(LIMIT_30, 3, seed=5, input_size=24, jpeg_p=0.0)
    crops, *_ = camera_crops(LIMIT_30, 3, seed=5, size=24)
    c, m = blank()
    got = pool.render(c, m, generator=torch.Generator().manual_seed(1), jitter=False).numpy()
    assert np.abs(got - np.stack(crops)).mean() * 255 < 4.0


def test_same_seed_same_views_other_seed_other_views(pool) -> None:
    again = EotPool(STOP, 2, seed=0, jpeg_p=0.0)
    other = EotPool(STOP, 2, seed=1, jpeg_p=0.0)
    for a, b in zip(pool.samples[:2], again.samples, strict=True):
        assert a.box == b.box and torch.equal(a.grid, b.grid)
    assert [s.sign_px for s in other.samples] != [s.sign_px for s in again.samples]


@pytest.mark.parametrize("kw", [
    {"count": 0}, {"input_size": 4}, {"far_px": 2.0}, {"far_px": 130.0},
    {"far_px": 60.0, "near_px": 40.0}, {"jpeg_p": -0.1}, {"jpeg_p": 1.5},
])
def test_bad_pool_arguments_are_refused(kw) -> None:
    args = {"count": 2, **kw}
    with pytest.raises(ConfigError):
        EotPool(STOP, **args)


# --------------------------------------------------------------------------- rendering

def test_render_shape_dtype_and_range(pool) -> None:
    colours = torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(0))
    m = mask_tensor(sticker_mask(STOP, "bars", 0.15))
    x = pool.render(colours, m, generator=torch.Generator().manual_seed(0))
    assert x.shape == (COUNT, 3, 32, 32) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    some = pool.render(colours, m, [4, 1], generator=torch.Generator().manual_seed(0))
    assert some.shape == (2, 3, 32, 32)
    assert not torch.equal(some[0], some[1])


def test_render_is_reproducible_with_the_same_generator(pool) -> None:
    colours = torch.full((3, 128, 128), 0.2)
    m = mask_tensor(sticker_mask(STOP, "square", 0.1))
    a = pool.render(colours, m, generator=torch.Generator().manual_seed(3))
    b = pool.render(colours, m, generator=torch.Generator().manual_seed(3))
    c = pool.render(colours, m, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sticker_changes_the_render_only_where_the_sign_is(pool) -> None:
    c, zero = blank()
    m = mask_tensor(sticker_mask(STOP, "square", 0.15))
    clean = pool.render(c, zero, generator=torch.Generator().manual_seed(0), jitter=False)
    black = pool.render(c, m, generator=torch.Generator().manual_seed(0), jitter=False)
    diff = (black - clean).abs().mean(dim=1)  # [N, S, S]
    for d in diff:
        centre, rim = d[12:20, 12:20].mean(), torch.cat([d[:3].flatten(), d[-3:].flatten()])
        assert centre > 0.1  # a black square over the red middle of the stop sign
        assert rim.mean() < 0.03  # the scene around the sign keeps its noise only


def test_gradients_reach_the_sticker_colours_only_under_the_mask(pool) -> None:
    mask = sticker_mask(STOP, "bars", 0.15)
    colours = torch.full((3, 128, 128), 0.5, requires_grad=True)
    x = pool.render(colours, mask_tensor(mask), generator=torch.Generator().manual_seed(0))
    x.sum().backward()
    grad = colours.grad.abs().sum(dim=0).numpy()
    assert (grad[~mask] == 0).all()
    assert grad[mask].sum() > 0
    # the views warp the art down to 24-120 px: not every art pixel is sampled, but most are
    assert (grad[mask] > 0).mean() > 0.5


def test_gradients_pass_jpeg_views(pool) -> None:
    jpeg = EotPool(STOP, 2, seed=0, jpeg_p=1.0)
    mask = sticker_mask(STOP, "square", 0.15)
    colours = torch.full((3, 128, 128), 0.5, requires_grad=True)
    jpeg.render(colours, mask_tensor(mask), generator=torch.Generator().manual_seed(0)).sum(
    ).backward()
    grad = colours.grad.abs().sum(dim=0).numpy()
    assert grad[mask].sum() > 0 and (grad[~mask] == 0).all()


def test_levels_blend_the_sticker_into_the_art(pool) -> None:
    mask = sticker_mask(STOP, "square", 0.15)
    colours = torch.zeros(3, 128, 128)
    colours[2] = 1.0  # pure blue
    top, half, quarter = pool.levels(colours, mask_tensor(mask))
    assert top.shape == (4, 128, 128) and half.shape == (4, 64, 64) and quarter.shape == (
        4, 32, 32)
    assert (top[:3, mask] == torch.tensor([[0.0], [0.0], [255.0]])).all()
    assert torch.equal(top[:3, ~mask], pool.art_rgb[:, ~mask])
    assert torch.equal(top[3], pool.art_alpha[0])
    # each level is the 2 x 2 mean of the one above (INTER_AREA halving)
    np.testing.assert_allclose(
        half.permute(1, 2, 0).numpy(),
        cv2.resize(top.permute(1, 2, 0).numpy(), (64, 64), interpolation=cv2.INTER_AREA),
        atol=1e-3)


# --------------------------------------------------------------------------- JPEG BPDA

def test_jpeg_forward_is_opencv_and_backward_is_the_identity() -> None:
    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8), (5, 5), 2)
    x = torch.from_numpy(img.astype(np.float32)).permute(2, 0, 1).requires_grad_(True)
    y = _JpegBPDA.apply(x, 60)
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(img[..., ::-1]),
                           [cv2.IMWRITE_JPEG_QUALITY, 60])
    want = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]
    assert ok and y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_array_equal(y.detach().permute(1, 2, 0).numpy(), want)
    assert not torch.equal(y.detach(), x.detach())  # JPEG is lossy
    g = torch.randn(3, 24, 24, generator=torch.Generator().manual_seed(0))
    y.backward(g)
    assert torch.equal(x.grad, g)
