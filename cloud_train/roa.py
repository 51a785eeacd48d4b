"""The rectangular occlusion attack (ROA): a sticker-like adversarial patch, registered as ``roa``.

Wu, Tong and Vorobeychik 2020 ("Defending against physically realizable attacks on image
classification", ICLR) model a physical sticker as a ``height x width`` rectangle whose
pixels may take any value in [0, 1] (no L-inf bound inside it) and which leaves every
other pixel untouched. The attack has two parts, both vectorised over the batch:

1. Position, by the paper's gradient-based search: the input gradient of the loss on the
   clean image is squared and summed over channels; every position on a ``stride`` grid
   is ranked by that sum inside the rectangle (one box filter); the top ``candidates``
   positions are then scored exactly, by the loss with the rectangle filled with mid-grey,
   and each example keeps its worst one.
2. Content: ``steps`` signed-gradient steps of size ``alpha`` on the pixels inside the
   rectangle, clamped to [0, 1], from mid-grey (the paper's start) or a uniform random fill.

Step size: from a grey start every pixel is at most 0.5 from either end of [0, 1], so the
rectangle is an L-inf ball of radius 0.5 around grey; ``alpha=None`` takes Madry et al.'s
rule for that radius, ``2.5 * 0.5 / steps`` (0.18 for the 7 training steps, 0.042 = 10.6/255
for the 30 evaluation steps), so even a short attack can drive any pixel to either end.

Conventions as in ``cloud_train.attacks``: inputs and outputs are float32 NCHW RGB in [0, 1],
untargeted, model run in eval mode and its modes restored, results detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cloud_train.attacks import eval_mode, register_attack, validate_params
from roadshield_base.errors import ConfigError

GREY = 0.5  # the paper fills candidate rectangles with mid-grey (127.5 / 255)
RADIUS = 0.5  # farthest any pixel is from grey: the "eps" of the step-size rule


def default_alpha(steps: int) -> float:
    """Step of the in-rectangle PGD when none is given: ``2.5 * 0.5 / steps``, at most 1."""
    return min(1.0, 2.5 * RADIUS / steps)


def check_rectangle(height: int, width: int, stride: int, candidates: int,
                    image_hw: tuple[int, int] | None = None) -> None:
    """ConfigError unless the sizes are whole numbers >= 1 and the rectangle fits the image."""
    for name, v in (("height", height), ("width", width), ("stride", stride),
                    ("candidates", candidates)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"ROA {name} must be a whole number >= 1, got {v!r}",
                              "sizes and stride are in pixels, e.g. height=7 width=7 stride=2")
    if image_hw is not None and (height > image_hw[0] or width > image_hw[1]):
        raise ConfigError(f"ROA rectangle {height} x {width} (height x width) does not fit in "
                          f"the {image_hw[0]} x {image_hw[1]} image",
                          f"use a rectangle at most {image_hw[0]} x {image_hw[1]} pixels, "
                          "e.g. 7 x 7 for 32 x 32 signs")


def grid_positions(image_hw: tuple[int, int], height: int, width: int,
                   stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-left corners on the ``stride`` grid: (tops [ny], lefts [nx]), int64 pixels.

    Rows 0, stride, 2*stride, ... up to ``H - height`` (the last fitting row is always
    included, so the rectangle can touch the bottom edge), the same for columns.
    """
    def axis(size: int, side: int) -> torch.Tensor:
        pos = torch.arange(0, size - side + 1, stride)
        if int(pos[-1]) != size - side:
            pos = torch.cat([pos, torch.tensor([size - side])])
        return pos

    return axis(image_hw[0], height), axis(image_hw[1], width)


def rectangle_mask(tops: torch.Tensor, lefts: torch.Tensor, height: int, width: int,
                   image_hw: tuple[int, int]) -> torch.Tensor:
    """bool [N, 1, H, W]: True inside each example's rectangle (tops, lefts: int64 [N])."""
    rows = torch.arange(image_hw[0], device=tops.device)
    cols = torch.arange(image_hw[1], device=tops.device)
    in_rows = (rows >= tops[:, None]) & (rows < tops[:, None] + height)  # [N, H]
    in_cols = (cols >= lefts[:, None]) & (cols < lefts[:, None] + width)  # [N, W]
    return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


def search_positions(model: nn.Module, x: torch.Tensor, y: torch.Tensor, height: int,
                     width: int, stride: int = 2, candidates: int = 10
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's gradient-based search: (tops, lefts), int64 [N], one rectangle per example.

    Ranks grid positions by the squared input gradient summed inside the rectangle, then
    keeps, among the ``candidates`` best ranked, the one whose grey fill gives the highest
    loss. With ``candidates`` >= the number of grid positions this is the exhaustive search.
    The model must already be in the mode the attack wants (eval).
    """
    n, _, h, w = x.shape
    ys, xs = (t.to(x.device) for t in grid_positions((h, w), height, width, stride))
    x = x.detach()
    xg = x.clone().requires_grad_(True)
    loss = F.cross_entropy(model(xg), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, xg)
    energy = grad.pow(2).sum(1, keepdim=True)  # [N, 1, H, W]
    # box sums at every offset (stride 1), then the grid rows / columns picked out
    boxes = F.avg_pool2d(energy, (height, width), stride=1) * (height * width)
    scores = boxes[:, 0][:, ys][:, :, xs].flatten(1)  # [N, ny * nx]
    k = min(candidates, scores.shape[1])
    top = scores.topk(k, dim=1).indices  # [N, k]
    best_loss = torch.full((n,), -float("inf"), device=x.device)
    best_top = torch.zeros(n, dtype=torch.int64, device=x.device)
    best_left = torch.zeros_like(best_top)
    for j in range(k):
        cand_top, cand_left = ys[top[:, j] // len(xs)], xs[top[:, j] % len(xs)]
        mask = rectangle_mask(cand_top, cand_left, height, width, (h, w))
        cand_loss = _loss(model, torch.where(mask, torch.full_like(x, GREY), x), y)
        better = cand_loss > best_loss
        best_loss = torch.where(better, cand_loss, best_loss)
        best_top = torch.where(better, cand_top, best_top)
        best_left = torch.where(better, cand_left, best_left)
    return best_top, best_left


def fill_rectangle(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                   steps: int, alpha: float, eps: float = 1.0,
                   random_start: bool = False) -> torch.Tensor:
    """PGD on the pixels where ``mask`` (bool [N, 1, H, W]) is True; the rest stay ``x``.

    Every step adds ``alpha * sign(grad)`` inside the mask and clamps to [0, 1] (and to
    ``x +- eps`` when ``eps < 1``). Returns x_adv, detached; outside the mask it is ``x``
    bit for bit. The model must already be in eval mode.
    """
    x = x.detach()
    fill = torch.rand_like(x) if random_start else torch.full_like(x, GREY)
    lo, hi = (x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0)
    fill = torch.min(torch.max(fill, lo), hi)
    for _ in range(steps):
        fill.requires_grad_(True)
        loss = F.cross_entropy(model(torch.where(mask, fill, x)), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, fill)
        fill = torch.min(torch.max(fill.detach() + alpha * grad.sign(), lo), hi)
    return torch.where(mask, fill, x).detach()


@register_attack
def roa(model: nn.Module, x: torch.Tensor, y: torch.Tensor, height: int = 7, width: int = 7,
        stride: int = 2, candidates: int = 10, steps: int = 30, alpha: float | None = None,
        eps: float = 1.0, random_start: bool = False) -> torch.Tensor:
    """Rectangular occlusion attack: the worst ``height x width`` sticker per example.

    x: float32 [N, 3, H, W] RGB in [0, 1]; y: int64 [N]. Position by the gradient-based
    search over a ``stride``-pixel grid among ``candidates`` exactly scored positions,
    content by ``steps`` PGD steps of ``alpha`` (None: ``2.5 * 0.5 / steps``) from grey
    (or a uniform random fill with ``random_start``). ``eps`` bounds the change inside the
    rectangle; 1.0 (the default, as in the paper) leaves it unbounded. Returns x_adv,
    same shape, detached, in [0, 1], equal to x outside the rectangle.
    ConfigError for sizes < 1 or a rectangle larger than the image.
    """
    validate_params(eps, alpha, steps)
    alpha = default_alpha(steps) if alpha is None else alpha
    if x.ndim != 4:
        raise ConfigError(f"ROA needs images as N x 3 x H x W, got shape {tuple(x.shape)}",
                          "pass a float NCHW batch in [0, 1]")
    check_rectangle(height, width, stride, candidates, (x.shape[2], x.shape[3]))
    if len(x) == 0:
        return x.detach().clone()
    with eval_mode(model):
        tops, lefts = search_positions(model, x, y, height, width, stride, candidates)
        mask = rectangle_mask(tops, lefts, height, width, (x.shape[2], x.shape[3]))
        return fill_rectangle(model, x, y, mask, steps, float(alpha), eps, random_start)
