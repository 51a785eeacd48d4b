"""The per-epoch checks of ``cloud_train.train``: clean accuracy on the validation set and
the catastrophic-overfitting guard (PGD accuracy on a small fixed batch).

Both split their examples into fixed chunks (512 for accuracy, 64 for the guard) and
deal the chunks to the ranks in turn; each rank scores its chunks and the hit counts
are summed over the ranks. A chunk's result depends only on the chunk (the guard's
PGD random start is seeded per chunk), so the figures are the same whether one process
or several compute them. Checks run in float32 on the bare model in eval mode (no DDP,
no autocast): they measure, they do not train.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from cloud_train.attacks import eval_mode, pgd_linf
from cloud_train.distributed import DistContext
from cloud_train.tensors import to_tensor

VAL_CHUNK = 512
GUARD_CHUNK = 64


def my_chunks(n: int, chunk: int, ctx: DistContext | None) -> list[tuple[int, int, int]]:
    """``(chunk index, lo, hi)`` of the chunks of ``n`` examples this rank scores."""
    rank, world = (0, 1) if ctx is None else (ctx.rank, ctx.world_size)
    return [(i, lo, min(n, lo + chunk)) for i, lo in enumerate(range(0, n, chunk))
            if i % world == rank]


def _fraction(hits: int, n: int, ctx: DistContext | None, device: torch.device) -> float:
    total = torch.tensor([hits], dtype=torch.int64, device=device)
    if ctx is not None:
        total = ctx.all_reduce_sum(total)
    return int(total.item()) / max(1, n)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             ctx: DistContext | None = None, chunk: int = VAL_CHUNK) -> float:
    """Clean top-1 accuracy; x float32 [N, 3, H, W] in [0, 1], y int64 [N], on the model's
    device. Every rank must call it (the hit counts are summed over the ranks)."""
    hits = 0
    with eval_mode(model), torch.no_grad():
        for _, lo, hi in my_chunks(len(x), chunk, ctx):
            hits += int((model(x[lo:hi]).argmax(1) == y[lo:hi]).sum())
    return _fraction(hits, len(x), ctx, x.device)


def as_xy(val: tuple[Any, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` (uint8 NHWC RGB arrays or float NCHW tensors) as tensors."""
    x, y = val
    return to_tensor(x).to(device), torch.as_tensor(np.asarray(y), dtype=torch.int64).to(device)


def guard_batch(guard_size: int, loader: DataLoader,
                val_xy: tuple[torch.Tensor, torch.Tensor] | None,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The guard's fixed batch: the first ``guard_size`` validation examples, else the first
    ``guard_size`` of the loader's first (global) batch, as in Wong et al.'s early stop.
    ``loader`` must be the unsharded loader, so every rank takes the same batch."""
    if guard_size == 0:
        return None
    if val_xy is not None:
        return val_xy[0][:guard_size], val_xy[1][:guard_size]
    x, y = next(iter(loader))
    return x[:guard_size].to(device), y[:guard_size].to(device)


def pgd_guard_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: Any) -> torch.Tensor:
    """The default guard attack: ``cfg.guard_steps`` steps of L-inf PGD at ``cfg.eps``."""
    # step 2.5 * eps / steps (Madry et al.) lets a short PGD still cross the whole ball
    return pgd_linf(model, x, y, eps=cfg.eps, alpha=min(1.0, 2.5 * cfg.eps / cfg.guard_steps),
                    steps=cfg.guard_steps)


def guard_accuracy(model: nn.Module, guard: tuple[torch.Tensor, torch.Tensor], cfg: Any,
                   epoch: int, ctx: DistContext | None = None,
                   attack: Callable[..., torch.Tensor] = pgd_guard_attack) -> float:
    """Accuracy under ``attack(model, x, y, cfg)`` (default: ``cfg.guard_steps`` steps of
    L-inf PGD at ``cfg.eps``) on the guard batch.

    Each chunk's random start is seeded from ``(cfg.seed, epoch, chunk index)`` inside a
    forked generator, so the check neither depends on the rank count nor shifts the
    training randomness.
    """
    x, y = guard
    hits = 0
    fork = [x.device] if x.device.type == "cuda" else []
    for i, lo, hi in my_chunks(len(x), GUARD_CHUNK, ctx):
        with torch.random.fork_rng(devices=fork):
            seed = np.random.SeedSequence([cfg.seed, epoch, i]).generate_state(1)[0]
            torch.manual_seed(int(seed))
            x_adv = attack(model, x[lo:hi], y[lo:hi], cfg)
        with eval_mode(model), torch.no_grad():
            hits += int((model(x_adv).argmax(1) == y[lo:hi]).sum())
    return _fraction(hits, len(x), ctx, x.device)
