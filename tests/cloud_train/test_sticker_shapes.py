"""Sticker masks on a sign's face, their candidate places, and the printability terms.

Expected values come from the sign art itself (``sign_rgba``'s alpha > 127 is the plate),
from OpenCV (connected components, the distance transform), and from the min form of the
non-printability score (Sharif et al. 2016) and total variation worked out by hand.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from cloud_train.sign_art import sign_rgba
from cloud_train.signs import SYNTHETIC_CLASSES
from cloud_train.sticker.shapes import (
    AREA_RANGE,
    PRINTER_PALETTE,
    SHAPES,
    candidate_centres,
    non_printability,
    plate_masks,
    snap_to_palette,
    sticker_mask,
    total_variation,
)
from roadshield_base.errors import ConfigError

STOP = SYNTHETIC_CLASSES.index("stop")
LIMIT_30 = SYNTHETIC_CLASSES.index("speed_limit_30")
YIELD = SYNTHETIC_CLASSES.index("yield")


def plate_of(class_index: int) -> np.ndarray:
    """The sign's face straight from the art: alpha > 127."""
    return sign_rgba(class_index)[..., 3] > 127


def inner_centroid(class_index: int) -> tuple[float, float]:
    ys, xs = np.nonzero(plate_masks(class_index)[1])
    return float(xs.mean()), float(ys.mean())


def components(mask: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(count without the background, stats rows, centroids) of 8-connected components."""
    n, _, stats, cents = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return n - 1, stats[1:], cents[1:]


# --------------------------------------------------------------------------- plate

@pytest.mark.parametrize("sign", [LIMIT_30, STOP, YIELD])
def test_inner_plate_is_the_face_shrunk_by_8_percent_of_the_side(sign) -> None:
    plate, inner = plate_masks(sign)
    np.testing.assert_array_equal(plate, plate_of(sign))
    assert inner.any() and not (inner & ~plate).any()
    # 8 % of 128 px, rounded down: 10 px from the outside of the face (OpenCV's exact L2
    # distance, padded so the square's border counts as outside)
    dist = cv2.distanceTransform(np.pad(plate, 1).astype(np.uint8), cv2.DIST_L2,
                                 cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    assert dist[inner].min() >= 9.5
    assert inner[dist > 11.5].all()


# --------------------------------------------------------------------------- masks

@pytest.mark.parametrize(("sign", "shape", "area"), [
    (STOP, "bars", 0.05), (STOP, "bars", 0.10), (STOP, "bars", 0.15),
    (STOP, "square", 0.10), (STOP, "square", 0.15), (STOP, "circle", 0.15),
    (LIMIT_30, "bars", 0.10), (LIMIT_30, "bars", 0.15), (LIMIT_30, "square", 0.05),
    (LIMIT_30, "square", 0.10), (LIMIT_30, "square", 0.15), (LIMIT_30, "circle", 0.15),
])
def test_mask_covers_the_asked_share_of_the_plate_on_the_inner_plate(sign, shape, area) -> None:
    mask = sticker_mask(sign, shape, area)
    assert mask.shape == (128, 128) and mask.dtype == np.bool_
    share = mask.sum() / plate_of(sign).sum()
    assert share == pytest.approx(area, rel=0.02)
    assert not (mask & ~plate_masks(sign)[1]).any()


def test_bars_are_two_separate_4_to_1_bars_either_side_of_the_centre() -> None:
    centre = inner_centroid(STOP)
    n, stats, cents = components(sticker_mask(STOP, "bars", 0.15))
    assert n == 2
    (x0, y0, w0, h0, a0), (x1, y1, w1, h1, a1) = stats.tolist()
    assert a0 == a1 == w0 * h0 == w1 * h1  # two equal, solid rectangles
    assert w0 == w1 and h0 == h1 and w0 / h0 == pytest.approx(4.0, abs=0.3)
    top, bottom = sorted(cents[:, 1])
    assert top < centre[1] < bottom
    assert cents[:, 0] == pytest.approx([centre[0]] * 2, abs=1.0)
    assert y1 - (y0 + h0) >= h0 * 0.9  # a gap of about one bar height between them


def test_square_is_one_solid_square_and_circle_one_disc() -> None:
    n, stats, cents = components(sticker_mask(STOP, "square", 0.15))
    (_, _, w, h, a), = stats.tolist()
    assert n == 1 and abs(w - h) <= 1 and a == w * h
    n, stats, cents = components(sticker_mask(STOP, "circle", 0.15))
    (_, _, w, h, a), = stats.tolist()
    assert n == 1 and abs(w - h) <= 1
    r = (w - 1) / 2  # OpenCV's disc of radius r spans 2r + 1 pixels and holds ~pi r^2 of them
    assert a == pytest.approx(math.pi * r * r, rel=0.03)
    assert cents[0] == pytest.approx(inner_centroid(STOP), abs=1.0)


def test_mask_is_centred_where_asked() -> None:
    centre = (64.0, 50.0)
    _, _, cents = components(sticker_mask(LIMIT_30, "square", 0.15, centre))
    assert cents[0] == pytest.approx(centre, abs=1.0)


def test_square_fits_at_a_whole_pixel_centre() -> None:
    # reference: a 35 x 35 px square centred on (64, 50) by hand lies on the inner plate of
    # the speed limit sign and covers 10 % of its face within 1 %
    _, inner = plate_masks(LIMIT_30)
    square = np.zeros((128, 128), bool)
    square[50 - 17:50 + 18, 64 - 17:64 + 18] = True
    assert not (square & ~inner).any()
    assert square.sum() / plate_of(LIMIT_30).sum() == pytest.approx(0.10, rel=0.01)
    mask = sticker_mask(LIMIT_30, "square", 0.10, (64.0, 50.0))
    assert mask.sum() / plate_of(LIMIT_30).sum() == pytest.approx(0.10, rel=0.02)


@pytest.mark.parametrize(("sign", "area"), [
    (LIMIT_30, 0.15),
    (LIMIT_30, 0.10),
])
def test_circle_is_the_nearest_disc_that_fits(sign, area) -> None:
    # reference: every disc OpenCV draws at the rounded centroid, the one whose pixel
    # count is nearest the asked share and that lies on the inner plate
    plate, inner = plate_masks(sign)
    want = area * plate_of(sign).sum()
    cx, cy = (round(c) for c in inner_centroid(sign))
    best = None
    for r in range(1, 64):
        disc = np.zeros((128, 128), np.uint8)
        cv2.circle(disc, (cx, cy), r, 1, -1)
        if (disc.astype(bool) & ~inner).any():
            break
        if best is None or abs(disc.sum() - want) < abs(best.sum() - want):
            best = disc.astype(bool)
    assert best is not None and abs(best.sum() - want) <= 0.05 * want
    np.testing.assert_array_equal(sticker_mask(sign, "circle", area), best)


def test_bars_fit_on_a_triangular_sign() -> None:
    # reference: two 4:1 bars drawn by hand at the centroid of the yield sign's inner plate
    # (18 art px unit: 36 x 9 px each) lie on its inner plate and cover ~10 % of its face
    _, inner = plate_masks(YIELD)
    cx, cy = inner_centroid(YIELD)
    bars = np.zeros((128, 128), np.uint8)
    for top in (cy - 13.5, cy + 4.5):
        cv2.rectangle(bars, (round(cx - 18), round(top)), (round(cx + 18) - 1,
                                                            round(top + 9) - 1), 1, -1)
    assert not (bars.astype(bool) & ~inner).any()
    assert bars.sum() / plate_of(YIELD).sum() == pytest.approx(0.10, rel=0.05)
    mask = sticker_mask(YIELD, "bars", 0.10)
    assert mask.sum() / plate_of(YIELD).sum() == pytest.approx(0.10, rel=0.02)


@pytest.mark.parametrize("shape", ["star", "", "BARS", None])
def test_unknown_shape_is_refused(shape) -> None:
    with pytest.raises(ConfigError, match="shape"):
        sticker_mask(STOP, shape, 0.1)


@pytest.mark.parametrize("area", [0.0, AREA_RANGE[0] / 2, AREA_RANGE[1] + 0.01, 1.0, -0.1,
                                  float("nan"), float("inf"), "0.1", None])
def test_area_out_of_range_is_refused(area) -> None:
    with pytest.raises(ConfigError, match="area"):
        sticker_mask(STOP, "square", area)


def test_area_range_ends_are_accepted() -> None:
    for area in AREA_RANGE:
        sticker_mask(LIMIT_30, "square", area)


@pytest.mark.parametrize("centre", [(0.0, 0.0), (64.0, 2.0), (127.0, 127.0), (-40.0, 64.0),
                                    (500.0, 64.0)])
def test_centre_off_the_face_is_refused(centre) -> None:
    with pytest.raises(ConfigError, match="not on the sign's face"):
        sticker_mask(LIMIT_30, "square", 0.05, centre)


@pytest.mark.parametrize(("sign", "shape", "area", "centre"), [
    (LIMIT_30, "square", 0.15, (30.0, 64.0)),   # on the face, too near its left rim
    (LIMIT_30, "square", 0.15, (64.0, 20.0)),   # too near the top
    (STOP, "bars", 0.30, (64.0, 30.0)),
])
def test_shape_that_cannot_fit_is_refused(sign, shape, area, centre) -> None:
    _, inner = plate_masks(sign)
    assert inner[round(centre[1]), round(centre[0])]  # the centre itself is fine
    with pytest.raises(ConfigError, match="does not fit"):
        sticker_mask(sign, shape, area, centre)


# --------------------------------------------------------------------------- centres

def test_candidate_centres_start_at_the_centroid_and_all_fit() -> None:
    got = candidate_centres(LIMIT_30, 6, "bars", 0.15)
    assert len(got) == 6
    assert got[0] == pytest.approx(inner_centroid(LIMIT_30))
    assert len(set(got)) == 6
    cx, cy = got[0]
    for x, y in got:
        assert math.hypot(x - cx, y - cy) in (0.0, pytest.approx(16.0), pytest.approx(28.0))
        sticker_mask(LIMIT_30, "bars", 0.15, (x, y))  # fits: no ConfigError
    assert candidate_centres(LIMIT_30, 1, "bars", 0.15) == got[:1]


def test_candidate_centres_leave_out_places_where_the_shape_cannot_fit() -> None:
    got = candidate_centres(LIMIT_30, 100, "bars", 0.15)
    cx, cy = inner_centroid(LIMIT_30)
    ring = [(cx + r * math.cos(k * math.pi / 4), cy + r * math.sin(k * math.pi / 4))
            for r in (16.0, 28.0) for k in range(8)]
    left_out = [p for p in ring if not any(math.dist(p, q) < 1e-6 for q in got)]
    assert 1 + len(ring) > len(got) > 1 and left_out
    for spot in left_out:
        with pytest.raises(ConfigError):
            sticker_mask(LIMIT_30, "bars", 0.15, spot)


def test_candidate_centres_on_a_small_face_offer_only_what_fits() -> None:
    priority = SYNTHETIC_CLASSES.index("priority_road")
    got = candidate_centres(priority, 4, "square", 0.3)
    assert got == [pytest.approx(inner_centroid(priority))]
    cx, cy = got[0]
    for k in range(8):
        a = k * math.pi / 4
        with pytest.raises(ConfigError):
            sticker_mask(priority, "square", 0.3, (cx + 16 * math.cos(a), cy + 16 * math.sin(a)))


# --------------------------------------------------------------------------- printability

def palette_image(colours: np.ndarray) -> torch.Tensor:
    """[3, 1, n] float colours in [0, 1] from n x 3 uint8."""
    return torch.from_numpy(colours.astype(np.float32) / 255.0).T[:, None, :].contiguous()


#: float32 distances through torch.cdist's matrix-product path: a few 1e-4 (0.1 grey level)
TOL = 1e-3


def test_non_printability_is_zero_for_palette_colours() -> None:
    colours = palette_image(PRINTER_PALETTE)
    mask = torch.ones(1, 1, len(PRINTER_PALETTE))
    assert float(non_printability(colours, mask)) == pytest.approx(0.0, abs=TOL)


def test_non_printability_is_positive_off_the_palette() -> None:
    rng = np.random.default_rng(0)
    colours = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert float(non_printability(colours, torch.ones(1, 8, 8))) > 0.01
    off = palette_image(np.clip(PRINTER_PALETTE.astype(int) + rng.choice([-9, 9], (30, 3)),
                                0, 255).astype(np.uint8))
    assert float(non_printability(off, torch.ones(1, 1, 30))) > TOL


def test_non_printability_on_two_pixels_by_hand() -> None:
    # pixel 0 is palette black (18, 18, 18); pixel 1 is pure white, whose nearest palette
    # colour is (245, 245, 242) at sqrt(10^2 + 10^2 + 13^2) = sqrt(369) grey levels
    colours = palette_image(np.array([[18, 18, 18], [255, 255, 255]], np.uint8))
    white = math.sqrt(369) / 255
    both = non_printability(colours, torch.ones(1, 1, 2))
    assert float(both) == pytest.approx(white / 2, abs=TOL)
    only_white = non_printability(colours, torch.tensor([[[0.0, 1.0]]]))
    assert float(only_white) == pytest.approx(white, abs=TOL)
    assert float(non_printability(colours, torch.tensor([[[1.0, 0.0]]]))) == pytest.approx(
        0.0, abs=TOL)


def test_non_printability_is_zero_for_an_empty_mask() -> None:
    colours = torch.rand(3, 4, 4)
    assert float(non_printability(colours, torch.zeros(1, 4, 4))) == 0.0


def test_non_printability_has_gradients_towards_the_palette() -> None:
    colours = palette_image(np.array([[255, 255, 255]], np.uint8)).requires_grad_(True)
    non_printability(colours, torch.ones(1, 1, 1)).backward()
    # moving white towards (245, 245, 242) lowers the score: the gradient points away from it
    assert (colours.grad[:, 0, 0] > 0).all()


def test_total_variation_of_a_flat_sticker_is_zero() -> None:
    colours = torch.full((3, 6, 6), 0.3)
    assert float(total_variation(colours, torch.ones(1, 6, 6))) == 0.0


def test_total_variation_by_hand() -> None:
    colours = torch.zeros(3, 2, 2)
    colours[0] = torch.tensor([[0.0, 0.0], [1.0, 0.5]])
    # all on: horizontal pairs |0-0| + |1-0.5| = 0.5, vertical |0-1| + |0-0.5| = 1.5;
    # 2.0 over 3 channels x 4 pixels
    assert float(total_variation(colours, torch.ones(1, 2, 2))) == pytest.approx(2.0 / 12)
    # top-right pixel off: only the pairs with both ends on count, |1-0.5| and |0-1|;
    # 1.5 over 3 channels x 3 pixels
    mask = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    assert float(total_variation(colours, mask)) == pytest.approx(1.5 / 9)


def test_total_variation_ignores_edges_leaving_the_mask() -> None:
    colours = torch.zeros(3, 4, 4)
    colours[:, :, 2:] = 1.0  # a hard edge between columns 1 and 2
    left = torch.zeros(1, 4, 4)
    left[:, :, :2] = 1.0
    assert float(total_variation(colours, left)) == 0.0
    assert float(total_variation(colours, torch.ones(1, 4, 4))) > 0


def test_snap_to_palette_maps_to_the_nearest_palette_colour() -> None:
    assert (snap_to_palette(PRINTER_PALETTE[None]) == PRINTER_PALETTE[None]).all()
    by_hand = np.array([[[0, 0, 0], [255, 255, 255], [203, 33, 38]]], np.uint8)
    np.testing.assert_array_equal(snap_to_palette(by_hand),
                                  [[[18, 18, 18], [245, 245, 242], [200, 30, 36]]])
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
    snapped = snap_to_palette(img)
    assert snapped.shape == img.shape and snapped.dtype == np.uint8
    pal = {tuple(c) for c in PRINTER_PALETTE.tolist()}
    assert {tuple(c) for c in snapped.reshape(-1, 3).tolist()} <= pal
    # nearest: no palette colour is closer than the chosen one
    d = ((img.reshape(-1, 1, 3).astype(int) - PRINTER_PALETTE[None].astype(int)) ** 2).sum(2)
    chosen = ((img.reshape(-1, 3).astype(int) - snapped.reshape(-1, 3).astype(int)) ** 2).sum(1)
    np.testing.assert_array_equal(chosen, d.min(1))


def test_shapes_constant_lists_every_drawable_shape() -> None:
    assert set(SHAPES) == {"bars", "square", "circle"}
    for shape in SHAPES:
        assert sticker_mask(LIMIT_30, shape, 0.15).any()
