"""Black-box sticker search: only the car's model scores, no gradients.

Whoever stickers a real sign has no gradients of the car's model; at best they can query
a copy of it (or the service in front of it) for scores. This is a score-based random
search in the spirit of the Square attack (Andriushchenko et al. 2020), moved to the
sticker's colour grid and the printer palette: the sticker starts as random palette
stripes; every iteration paints one random square of grid cells with one random palette
colour and keeps the change if the loss over a fixed set of ``views`` EOT views does not
get worse. The square's side shrinks on Square's schedule as the budget is spent.

Every rendered view sent to the model is one query. Progress is checked on held-out
views every ``check_every`` iterations; those checks are the experimenter's, not the
attacker's, and are reported apart from the attack's query count.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cloud_train.sign_art import ART_SIZE
from cloud_train.sticker.eot import EotPool
from cloud_train.sticker.optimise import wins
from cloud_train.sticker.shapes import PRINTER_PALETTE
from roadshield_base.errors import ConfigError

#: float32 [N, 3, S, S] RGB in [0, 1] -> probabilities [N, C]
Query = Callable[[np.ndarray], np.ndarray]


@dataclass
class BlackBoxResult:
    """colours: 128 x 128 x 3 uint8; curve: (attack queries, held-out success) pairs;
    queries_to_half: attack queries when held-out success first reached 50 % (None: never)."""

    colours: np.ndarray
    mask: np.ndarray
    queries: int
    success: float
    curve: list[tuple[int, float]] = field(default_factory=list)
    queries_to_half: int | None = None
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {"queries": self.queries, "success": self.success,
                "curve": [[q, s] for q, s in self.curve],
                "queries_to_half": self.queries_to_half, "seconds": round(self.seconds, 2)}


def _square_share(progress: float) -> float:
    """Share of the grid one square covers, by budget spent (Square's piecewise schedule)."""
    for edge, share in ((0.05, 0.3), (0.2, 0.15), (0.4, 0.08), (0.6, 0.04), (0.8, 0.02)):
        if progress < edge:
            return share
    return 0.01


def _loss(probs: np.ndarray, sign: int, target: int | None) -> float:
    """-log p(target), or log p(sign) for untargeted: lower is better for the attacker."""
    p = np.clip(probs, 1e-12, 1.0)
    return float(-np.log(p[:, target]).mean() if target is not None
                 else np.log(p[:, sign]).mean())


def blackbox_sticker(query: Query, pool: EotPool, held_out: EotPool, mask: np.ndarray,
                     sign: int, target: int | None, budget: int = 20000, views: int = 16,
                     cells: int = 16, check_every: int = 25, seed: int = 0,
                     palette: np.ndarray = PRINTER_PALETTE) -> BlackBoxResult:
    """Search palette colours for the sticker ``mask`` (128 x 128 bool) by queries only.

    budget: attack queries (rendered views) to spend; views: views per loss evaluation
    (each candidate costs that many queries). Returns the best sticker found.
    """
    if budget < views or views < 1 or cells < 1 or ART_SIZE % cells:
        raise ConfigError(f"black-box budget {budget} / views {views} / cells {cells}",
                          "use budget >= views >= 1 and cells dividing 128 (e.g. 16)")
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    idx = rng.choice(len(pool), size=min(views, len(pool)), replace=False).tolist()
    m = torch.from_numpy(mask.astype(np.float32))[None]
    rep = ART_SIZE // cells

    def render(grid: np.ndarray, p: EotPool, which: list[int] | None, g: torch.Generator
               ) -> np.ndarray:
        full = np.repeat(np.repeat(grid, rep, 0), rep, 1).astype(np.float32) / 255.0
        c = torch.from_numpy(full).permute(2, 0, 1)
        with torch.no_grad():
            return p.render(c, m, which, generator=g).numpy()

    stripes = palette[rng.integers(0, len(palette), cells)]
    grid = np.repeat(stripes[None], cells, axis=0).astype(np.uint8)  # vertical stripes
    fixed = torch.Generator().manual_seed(seed + 1)  # the same noise for every candidate

    def evaluate(g: np.ndarray) -> float:
        fixed.manual_seed(seed + 1)
        return _loss(query(render(g, pool, idx, fixed)), sign, target)

    best = evaluate(grid)
    spent = len(idx)
    curve: list[tuple[int, float]] = []
    to_half = None
    it = 0
    while spent + len(idx) <= budget:
        side = max(1, round(math.sqrt(_square_share(spent / budget)) * cells))
        y, x = (int(v) for v in rng.integers(0, cells - side + 1, 2))
        cand = grid.copy()
        cand[y:y + side, x:x + side] = palette[int(rng.integers(0, len(palette)))]
        loss = evaluate(cand)
        spent += len(idx)
        if loss <= best:
            grid, best = cand, loss
        it += 1
        if it % check_every == 0 or spent + len(idx) > budget:
            won = wins(query(render(grid, held_out, None, gen)), sign, target)
            curve.append((spent, round(float(won.mean()), 4)))
            if to_half is None and won.mean() >= 0.5:
                to_half = spent
    colours = np.repeat(np.repeat(grid, rep, 0), rep, 1).astype(np.uint8)
    colours[~mask] = 0
    success = curve[-1][1] if curve else 0.0
    return BlackBoxResult(colours, mask.copy(), spent, success, curve, to_half,
                          time.perf_counter() - t0)


def nes_sticker(query: Query, pool: EotPool, held_out: EotPool, mask: np.ndarray,
                sign: int, target: int | None, budget: int = 40000, views: int = 8,
                samples: int = 10, sigma: float = 0.5, lr: float = 0.3, cells: int = 32,
                check_every: int = 5, seed: int = 0) -> BlackBoxResult:
    """Natural evolution strategies (Ilyas et al. 2018, "Black-box adversarial attacks with
    limited queries and information") on the sticker's colour logits: each step scores
    ``samples`` antithetic pairs of Gaussian perturbations (scale ``sigma``) on ``views``
    fresh EOT views, estimates the gradient of the loss from the scores alone and takes
    an Adam step of ``lr``. A step costs 2 * samples * views queries.
    """
    per_step = 2 * samples * views
    if budget < per_step or views < 1 or samples < 1 or cells < 1 or ART_SIZE % cells \
            or not sigma > 0 or not lr > 0:
        raise ConfigError(f"NES budget {budget} / views {views} / samples {samples} / cells "
                          f"{cells}", "use budget >= 2 * samples * views and cells dividing "
                          "128 (e.g. 32)")
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    m = torch.from_numpy(mask.astype(np.float32))[None]
    rep = ART_SIZE // cells
    theta = torch.zeros(3, cells, cells)
    opt = torch.optim.Adam([theta.requires_grad_(True)], lr=lr)

    def colours(t: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(t).repeat_interleave(rep, 1).repeat_interleave(rep, 2)

    def score(t: torch.Tensor, idx: list[int], noise_seed: int) -> float:
        g = torch.Generator().manual_seed(noise_seed)
        with torch.no_grad():
            x = pool.render(colours(t), m, idx, generator=g).numpy()
        return _loss(query(x), sign, target)

    spent, step = 0, 0
    curve: list[tuple[int, float]] = []
    to_half = None
    while spent + per_step <= budget:
        idx = rng.choice(len(pool), size=min(views, len(pool)), replace=False).tolist()
        noise_seed = int(rng.integers(0, 2**31))
        grad = torch.zeros_like(theta)
        base = theta.detach()
        for _ in range(samples):
            u = torch.randn(base.shape, generator=gen)
            diff = score(base + sigma * u, idx, noise_seed) - score(base - sigma * u, idx,
                                                                    noise_seed)
            grad += diff * u
        spent += per_step
        opt.zero_grad()
        theta.grad = grad / (2 * samples * sigma)
        opt.step()
        step += 1
        if step % check_every == 0 or spent + per_step > budget:
            with torch.no_grad():
                x = held_out.render(colours(theta.detach()), m, generator=gen).numpy()
            won = wins(query(x), sign, target)
            curve.append((spent, round(float(won.mean()), 4)))
            if to_half is None and won.mean() >= 0.5:
                to_half = spent
    final = (colours(theta.detach()).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    final[~mask] = 0
    success = curve[-1][1] if curve else 0.0
    return BlackBoxResult(final, mask.copy(), spent, success, curve, to_half,
                          time.perf_counter() - t0)
