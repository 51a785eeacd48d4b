"""White-box RP2 / EOT optimisation of a printable sticker against a torch model.

The sticker is a fixed mask (``shapes.sticker_mask``) and its colours, parameterised as
``sigmoid(theta)`` on a ``cells x cells`` grid over the sign's 128 px art square (blocks
of 128 / cells art pixels: printable, and still resolvable by a camera at a distance).
Each step renders ``batch`` views drawn from an ``EotPool`` and takes an Adam step on

    task + nps_weight * non_printability + tv_weight * total_variation

(Eykholt et al. 2018, eq. 3, with the expectation of Athalye et al. 2018). task is the
cross-entropy of the attacker's target (targeted), or the clamped margin of the sign's
own class over the best other class (untargeted: pushes every view to some wrong class
with a margin of ``kappa``). Before the main run, ``positions`` candidate centres on the
sign's face get a short run each and the best one (lowest loss over the whole pool) is
kept: where a sticker sits matters as much as its colours.

Success is measured on a second pool of views drawn with another seed (never optimised
on), with the colours rounded to the 8-bit values the PNG stores.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cloud_train.attacks import eval_mode
from cloud_train.sign_art import ART_SIZE
from cloud_train.sticker.eot import EotPool
from cloud_train.sticker.shapes import (
    candidate_centres,
    check_area,
    check_shape,
    non_printability,
    sticker_mask,
    total_variation,
)
from roadshield_base.errors import ConfigError

#: (step, steps, loss) after every optimisation step
Progress = Callable[[int, int, float], None]
#: what a defence does to the model input before the model, for adaptive attacks:
#: (batch [N, 3, S, S] in [0, 1], generator) -> batch, differentiable (or BPDA)
Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass
class StickerConfig:
    """Settings of one optimisation; ``target`` None means untargeted."""

    sign: int
    target: int | None = None
    shape: str = "bars"
    area: float = 0.15
    steps: int = 300
    batch: int = 24
    lr: float = 0.3
    cells: int = 32
    nps_weight: float = 0.25
    tv_weight: float = 0.05
    kappa: float = 5.0
    pool: int = 96
    eval_pool: int = 64
    positions: int = 4
    search_steps: int = 30
    jpeg_p: float = 0.25
    seed: int = 0

    def check(self) -> None:
        check_shape(self.shape)
        check_area(self.area)
        if self.target is not None and self.target == self.sign:
            raise ConfigError("the sticker's target is the sign's own class",
                              "name another class, or leave the target out (untargeted)")
        for name in ("steps", "batch", "pool", "eval_pool", "positions", "search_steps"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"sticker option {name}={getattr(self, name)} must be >= 1",
                                  "use a positive count")
        if self.cells < 1 or ART_SIZE % self.cells:
            raise ConfigError(f"cells={self.cells} does not divide the {ART_SIZE} px art",
                              "use 8, 16, 32, 64 or 128")
        if not self.lr > 0 or self.nps_weight < 0 or self.tv_weight < 0 or self.kappa < 0:
            raise ConfigError("sticker lr must be > 0 and the weights and kappa >= 0",
                              "e.g. lr 0.3, nps_weight 0.25, tv_weight 0.05, kappa 5")


@dataclass
class StickerResult:
    """colours: 128 x 128 x 3 uint8 RGB; mask: 128 x 128 bool; success: shares of the
    held-out views the sticker wins (``success``) and wins with probability >= 0.6
    (``confident``), overall and by the sign's distance in the frame."""

    colours: np.ndarray
    mask: np.ndarray
    centre: tuple[float, float]
    config: dict[str, Any]
    success: float
    confident: float
    by_distance: dict[str, float]
    clean_success: float
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self, history: bool = False) -> dict[str, Any]:
        """JSON-able figures (no arrays); the per-step history only when asked."""
        out = asdict(self)
        del out["colours"], out["mask"]
        if not history:
            del out["history"]
        out["centre"] = [round(c, 2) for c in self.centre]
        return out


def task_loss(logits: torch.Tensor, sign: int, target: int | None,
              kappa: float) -> torch.Tensor:
    """Mean over views: CE of the target, or the sign's clamped margin (untargeted)."""
    if target is not None:
        return F.cross_entropy(logits, torch.full((len(logits),), target, dtype=torch.long))
    own = logits[:, sign]
    other = logits.clone()
    other[:, sign] = -float("inf")
    return (own - other.max(dim=1).values).clamp_min(-kappa).mean()


def wins(probs: np.ndarray, sign: int, target: int | None) -> np.ndarray:
    """bool [N]: the view is read as the target (targeted) or as anything but the sign."""
    pred = probs.argmax(axis=1)
    return pred == target if target is not None else pred != sign


def _colours(theta: torch.Tensor) -> torch.Tensor:
    """[3, cells, cells] logits -> [3, 128, 128] colours in [0, 1] (nearest upsampling)."""
    rep = ART_SIZE // theta.shape[-1]
    return torch.sigmoid(theta).repeat_interleave(rep, 1).repeat_interleave(rep, 2)


def _run(model: nn.Module, pool: EotPool, mask: torch.Tensor, cfg: StickerConfig, steps: int,
         gen: torch.Generator, history: list[dict[str, float]] | None = None,
         progress: Progress | None = None,
         transform: Transform | None = None) -> tuple[torch.Tensor, float]:
    """Adam on the colours for ``steps``; returns (theta, final loss over the whole pool)."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        return model(transform(x, gen) if transform is not None else x)

    theta = (torch.randn(3, cfg.cells, cfg.cells, generator=gen) * 0.5).requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=cfg.lr)
    for step in range(steps):
        idx = torch.randperm(len(pool), generator=gen)[:cfg.batch].tolist()
        colours = _colours(theta)
        logits = forward(pool.render(colours, mask, idx, generator=gen))
        task = task_loss(logits, cfg.sign, cfg.target, cfg.kappa)
        nps = non_printability(colours, mask)
        tv = total_variation(colours, mask)
        loss = task + cfg.nps_weight * nps + cfg.tv_weight * tv
        opt.zero_grad()
        loss.backward()
        opt.step()
        if history is not None:
            won = wins(logits.detach().softmax(1).numpy(), cfg.sign, cfg.target)
            history.append({"step": step, "task": round(task.item(), 4),
                            "nps": round(nps.item(), 4), "tv": round(tv.item(), 4),
                            "batch_success": round(float(won.mean()), 4)})
        if progress is not None:
            progress(step + 1, steps, loss.item())
    with torch.no_grad():
        logits = forward(pool.render(_colours(theta), mask, generator=gen))
        final = float(task_loss(logits, cfg.sign, cfg.target, cfg.kappa))
    return theta.detach(), final


def measure(predict: Callable[[torch.Tensor], np.ndarray], pool: EotPool, colours: np.ndarray,
            mask: np.ndarray, sign: int, target: int | None,
            seed: int = 0) -> dict[str, Any]:
    """Success of an 8-bit sticker on every view of ``pool`` for a predictor returning
    probabilities [N, C]; also without the sticker (the clean control) and by distance."""
    gen = torch.Generator().manual_seed(seed)
    c = torch.from_numpy(colours.astype(np.float32) / 255.0).permute(2, 0, 1)
    m = torch.from_numpy(mask.astype(np.float32))[None]
    with torch.no_grad():
        probs = predict(pool.render(c, m, generator=gen))
        clean = predict(pool.render(c, torch.zeros_like(m), generator=gen, jitter=False))
    won = wins(probs, sign, target)
    best = probs.max(axis=1)
    px = np.array([s.sign_px for s in pool.samples])
    bins = {"24-48 px": (0, 48), "48-80 px": (48, 80), "80-120+ px": (80, 1e9)}
    by_distance = {k: round(float(won[(px >= lo) & (px < hi)].mean()), 4)
                   for k, (lo, hi) in bins.items() if ((px >= lo) & (px < hi)).any()}
    return {"success": round(float(won.mean()), 4),
            "confident": round(float((won & (best >= 0.6)).mean()), 4),
            "by_distance": by_distance,
            "clean_success": round(float(wins(clean, sign, target).mean()), 4),
            "views": len(pool)}


def torch_predictor(model: nn.Module) -> Callable[[torch.Tensor], np.ndarray]:
    def predict(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return model(x).softmax(1).numpy()
    return predict


def optimise_sticker(model: nn.Module, cfg: StickerConfig, progress: Progress | None = None,
                     pool: EotPool | None = None,
                     transform: Transform | None = None) -> StickerResult:
    """Optimise a sticker for ``cfg.sign`` against ``model`` (white-box); see the module
    docstring. The model's input side is read from ``model.input_size`` (default 32).

    transform: a defence's input step put in the loop (adaptive attacks): random
    PatchCleanser masks as an expectation, a sanitizer as BPDA. The held-out success is
    measured on the bare model; a defended stack is measured on the stream.
    """
    cfg.check()
    t0 = time.perf_counter()
    size = int(getattr(model, "input_size", (3, 32, 32))[-1])
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    pool = pool or EotPool(cfg.sign, cfg.pool, seed=cfg.seed, input_size=size,
                           jpeg_p=cfg.jpeg_p)
    history: list[dict[str, float]] = []
    flags = [(p, p.requires_grad) for p in model.parameters()]
    with eval_mode(model):
        for p, _ in flags:
            p.requires_grad_(False)
        try:
            centres = candidate_centres(cfg.sign, cfg.positions, cfg.shape, cfg.area)
            if not centres:
                raise ConfigError(f"a {cfg.shape} sticker of {cfg.area:.0%} of the face does "
                                  "not fit on this sign", "use a smaller area or another shape")
            best: tuple[float, tuple[float, float]] | None = None
            if len(centres) > 1:
                for centre in centres:
                    mask = sticker_mask(cfg.sign, cfg.shape, cfg.area, centre)
                    m = torch.from_numpy(mask.astype(np.float32))[None]
                    _, loss = _run(model, pool, m, cfg, cfg.search_steps, gen,
                                   transform=transform)
                    if best is None or loss < best[0]:
                        best = (loss, centre)
            centre = best[1] if best is not None else centres[0]
            mask = sticker_mask(cfg.sign, cfg.shape, cfg.area, centre)
            m = torch.from_numpy(mask.astype(np.float32))[None]
            theta, _ = _run(model, pool, m, cfg, cfg.steps, gen, history, progress, transform)
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
        colours = (_colours(theta).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
        colours[~mask] = 0
        held_out = EotPool(cfg.sign, cfg.eval_pool, seed=cfg.seed + 1000, input_size=size,
                           jpeg_p=cfg.jpeg_p)
        figures = measure(torch_predictor(model), held_out, colours, mask, cfg.sign,
                          cfg.target, seed=cfg.seed)
    return StickerResult(colours, mask, centre, asdict(cfg), figures["success"],
                         figures["confident"], figures["by_distance"], figures["clean_success"],
                         history, time.perf_counter() - t0)
