"""The optimisation behind Neural Cleanse (:mod:`cloud_train.backdoor.neural_cleanse`): one
mask and pattern per row (a row is a candidate target class, or one restart of it),
optimised together on shared mini-batches of the defender's clean images.

Tensors: images float ``N x 3 x H x W`` RGB in [0, 1]; masks ``K x H x W`` and patterns
``K x 3 x H x W`` in [0, 1], both ``tanh(w) / 2 + 0.5`` of free parameters.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

LR_FLOOR = 0.05  # the Adam step size decays (cosine) from lr to LR_FLOOR * lr over the steps


def frozen_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` for input-gradient work: weights frozen, every
    ``Conv2d`` directly followed by a ``BatchNorm2d`` in an ``nn.Sequential`` folded into one
    conv (exact in eval mode), channels-last memory. On 2 CPU cores this makes a forward +
    input-gradient pass of signnet_tiny about 3x faster and of signnet about 1.3x; the
    caller's model is not touched."""
    copy_ = copy.deepcopy(model).eval()
    for seq in copy_.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) \
                    and bn.track_running_stats and bn.running_mean is not None:
                seq[i] = fuse_conv_bn_eval(conv, bn)
                seq[i + 1] = nn.Identity()
    for prm in copy_.parameters():
        prm.requires_grad_(False)
    return copy_.to(memory_format=torch.channels_last)


@dataclass(frozen=True)
class ReverseOpts:
    """Settings of one optimisation (see ``neural_cleanse`` for their meaning)."""

    steps: int
    lr: float
    init_cost: float
    batch_size: int
    success_threshold: float
    patience: int
    multiplier: float
    early_stop: int


def _squash(w: torch.Tensor) -> torch.Tensor:
    return torch.tanh(w) / 2 + 0.5


def _unsquash(v: torch.Tensor) -> torch.Tensor:
    # the authors' inverse: atanh((v - 0.5) * (2 - eps)) keeps atanh finite at 0 and 1
    return torch.atanh((v - 0.5) * (2 - 1e-6))


def reverse_rows(model: nn.Module, x: torch.Tensor, y: torch.Tensor, part: list[int],
                 num_classes: int, o: ReverseOpts, gen: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor, list[int], list[bool]]:
    """Optimise one mask/pattern per row, row k targeting class ``part[k]`` (a class may
    appear in several rows: restarts). Returns the best masks ``K x H x W``, patterns
    ``K x 3 x H x W``, the steps each row ran, and whether each row held the success
    threshold for ``patience`` steps in a row (else its last mask is returned)."""
    k, device = len(part), x.device
    n, _, h, w = x.shape
    # random initial mask and pattern, as in the authors' code (seeded, drawn on the CPU)
    wm = _unsquash(torch.rand(k, 1, h, w, generator=gen)).to(device).requires_grad_(True)
    wp = _unsquash(torch.rand(k, 3, h, w, generator=gen)).to(device).requires_grad_(True)
    opt = torch.optim.Adam([wm, wp], lr=o.lr, betas=(0.5, 0.9))
    # cosine decay of the step size to LR_FLOOR * lr: at a constant rate the masks jitter
    # around the cost balance to the end and the best norm is a noisy minimum over that jitter
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + np.cos(np.pi * min(t, o.steps)
                                                                      / o.steps)))
    tgt = torch.tensor(part, device=device)
    cost = torch.full((k,), o.init_cost, dtype=torch.float64)
    up = torch.zeros(k, dtype=torch.int64)
    down = torch.zeros(k, dtype=torch.int64)
    went_up = torch.zeros(k, dtype=torch.bool)
    went_down = torch.zeros(k, dtype=torch.bool)
    best = torch.full((k,), float("inf"), dtype=torch.float64)
    ref = torch.full((k,), float("inf"), dtype=torch.float64)
    stale = torch.zeros(k, dtype=torch.int64)
    streak = torch.zeros(k, dtype=torch.int64)
    ran = torch.zeros(k, dtype=torch.int64)
    best_m = torch.zeros(k, h, w, device=device)
    best_p = torch.zeros(k, 3, h, w, device=device)
    active = torch.ones(k, dtype=torch.bool)
    for _ in range(o.steps):
        act = active.nonzero().flatten()
        if len(act) == 0:
            break
        act_d = act.to(device)
        idx = torch.randint(0, n, (o.batch_size,), generator=gen).to(device)
        xb, yb = x[idx], y[idx]
        m = _squash(wm[act_d])  # a x 1 x H x W
        p = _squash(wp[act_d])  # a x 3 x H x W
        xa = (1 - m).unsqueeze(1) * xb.unsqueeze(0) + (m * p).unsqueeze(1)
        xa = xa.flatten(0, 1).contiguous(memory_format=torch.channels_last)
        logits = model(xa).view(len(act), o.batch_size, num_classes)
        t = tgt[act_d]
        ce = F.cross_entropy(logits.flatten(0, 1), t.repeat_interleave(o.batch_size),
                             reduction="none").view(len(act), o.batch_size)
        keep = (yb.unsqueeze(0) != t.unsqueeze(1)).float()  # target-class images need no trigger
        count = keep.sum(1).clamp(min=1.0)
        l1 = m.flatten(1).sum(1)
        c = cost[act].to(device=device, dtype=l1.dtype)
        loss = ((ce * keep).sum(1) / count + c * l1).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            hit = ((logits.argmax(2) == t.unsqueeze(1)).float() * keep).sum(1) / count
            ok = (hit >= o.success_threshold).cpu() & (keep.sum(1) > 0).cpu()
            norm = l1.detach().double().cpu()
            streak[act] = torch.where(ok, streak[act] + 1, 0)
            # a mask counts once it has held the success rate for `patience` mini-batches in a
            # row: one lucky batch of 32 says little about the rate on the whole set
            improved = (streak[act] >= o.patience) & (norm < best[act])
            better = act[improved]
            rows = improved.nonzero().flatten().to(device)
            best[better] = norm[improved]
            best_m[better.to(device)] = m[rows, 0].detach()
            best_p[better.to(device)] = p[rows].detach()
            # early-stop clock: steps since the best norm last fell by more than 1%
            moved = best[act] < 0.99 * ref[act]
            stale[act] = torch.where(torch.isfinite(best[act]) & ~moved, stale[act] + 1, 0)
            ref[act] = torch.minimum(ref[act], best[act])
            ran[act] += 1
            up[act] = torch.where(ok, up[act] + 1, 0)
            down[act] = torch.where(ok, 0, down[act] + 1)
            raise_c = act[up[act] >= o.patience]
            lower_c = act[down[act] >= o.patience]
            cost[raise_c] *= o.multiplier
            cost[lower_c] /= o.multiplier ** 1.5
            went_up[raise_c] = True
            went_down[lower_c] = True
            up[raise_c] = 0
            down[lower_c] = 0
            if o.early_stop:
                done = act[went_up[act] & went_down[act] & (stale[act] >= o.early_stop)]
                active[done] = False
    # a class that never reached the success threshold keeps its last mask
    never = (~torch.isfinite(best)).nonzero().flatten().to(device)
    with torch.no_grad():
        best_m[never] = _squash(wm[never])[:, 0]
        best_p[never] = _squash(wp[never])
    return best_m, best_p, [int(v) for v in ran], [bool(v) for v in torch.isfinite(best)]


def success_rates(model: nn.Module, x: torch.Tensor, y: torch.Tensor, part: list[int],
             masks: torch.Tensor, patterns: torch.Tensor, batch: int) -> list[float]:
    """Fraction of the clean images outside class ``part[k]`` sent to it by trigger k."""
    out = []
    with torch.no_grad():
        for k, c in enumerate(part):
            xs = x[y != c]
            m, p = masks[k].unsqueeze(0), patterns[k]
            hits = 0
            for i in range(0, len(xs), batch):
                xa = ((1 - m) * xs[i:i + batch] + m * p).contiguous(
                    memory_format=torch.channels_last)
                hits += int((model(xa).argmax(1) == c).sum())
            out.append(hits / max(1, len(xs)))
    return out
