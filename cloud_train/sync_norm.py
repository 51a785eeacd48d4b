"""Batch norm over the global batch of several training processes.

DDP averages gradients, but plain batch norm would normalise each rank's share of the
batch with that share's own statistics, so N processes would train a different model
than one process with the same global batch. :func:`sync_batchnorm` swaps every
batch-norm layer for one that uses the global batch's statistics: torch's
``nn.SyncBatchNorm`` on CUDA, :class:`GlobalBatchNorm` on the CPU (``SyncBatchNorm``
refuses CPU tensors); :func:`unsync_batchnorm` puts the original classes back, sharing
the same parameters and buffers, so checkpoints and exports never see the swap.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from roadshield_base.errors import ConfigError


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks whose backward sums the incoming gradients over the ranks: each
    rank's input feeds every rank's output, so its gradient gathers all their terms."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics cover every rank's share of the global batch.

    Works with gloo on the CPU, where ``nn.SyncBatchNorm`` refuses CPU tensors. Sums are
    exchanged by an all-reduce whose backward all-reduces the incoming gradients, so every
    rank's gradient holds the terms of the other ranks' losses, as in one process. Outside
    training, or without a process group of several ranks, it is plain batch norm.
    Parameter and buffer names are those of ``nn.BatchNorm2d``.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ConfigError(f"batch norm expects [N, C, ...] input, got {tuple(x.shape)}",
                              "feed batches, not single vectors")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() // c], dtype=x.dtype, device=x.device)
        sums = _AllReduceSum.apply(torch.cat([x.sum(dim=dims), count]))
        n = sums[c]
        mean = sums[:c] / n
        centred = x - mean.view(shape)
        var = _AllReduceSum.apply(centred.square().sum(dim=dims)) / n  # biased, as BN normalises
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None \
                and self.running_var is not None and self.num_batches_tracked is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None \
                    else 1.0 / float(self.num_batches_tracked)
                total = float(n)
                # running variance is the unbiased estimate, as in nn.BatchNorm2d
                unbiased = var.detach() * (total / max(total - 1.0, 1.0))
                self.running_mean.mul_(1.0 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1.0 - m).add_(unbiased, alpha=m)
        return out


def _swap_norms(module: nn.Module, make: Any) -> int:
    swapped = 0
    for name, child in module.named_children():
        new = make(child)
        if new is None:
            swapped += _swap_norms(child, make)
            continue
        new.weight, new.bias = child.weight, child.bias
        new.running_mean, new.running_var = child.running_mean, child.running_var
        new.num_batches_tracked = child.num_batches_tracked
        new.train(child.training)
        setattr(module, name, new)
        swapped += 1
    return swapped


def _copy_args(bn: Any) -> tuple[Any, ...]:
    return bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats


def sync_batchnorm(model: nn.Module, device: torch.device) -> int:
    """Replace (in place) every batch-norm layer under ``model`` by one that normalises
    with global-batch statistics: ``nn.SyncBatchNorm`` on CUDA, :class:`GlobalBatchNorm`
    elsewhere. Parameters and buffers are shared, not copied. Returns the count."""
    def make(m: nn.Module) -> nn.Module | None:
        if not isinstance(m, nn.modules.batchnorm._BatchNorm) \
                or isinstance(m, (nn.SyncBatchNorm, GlobalBatchNorm)):
            return None
        new = nn.SyncBatchNorm(*_copy_args(m)) if device.type == "cuda" \
            else GlobalBatchNorm(*_copy_args(m))
        vars(new)["restore_class"] = type(m)
        return new
    return _swap_norms(model, make)


def unsync_batchnorm(model: nn.Module) -> int:
    """Undo :func:`sync_batchnorm`: the original batch-norm classes, same tensors."""
    def make(m: nn.Module) -> nn.Module | None:
        cls = vars(m).get("restore_class")
        return cls(*_copy_args(m)) if cls is not None else None
    return _swap_norms(model, make)
