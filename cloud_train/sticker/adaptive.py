"""Defences put inside the sticker's optimisation loop: the adaptive attacks.

A defence evaluated only against a sticker made without it proves little (Carlini and
Wagner 2017; Tramer et al. 2020). These transforms let ``optimise_sticker`` see what the
defended car sees:

- ``patch_mask_transform``: PatchCleanser's masks as part of the expectation (EOT over the
  mask set): every view is covered by one random mask of the set, and a share of them by
  a second one. A sticker that keeps the target under every one-mask view wins the
  defence's first round outright.
- ``sanitizer_transform``: a sanitizer chain's batch steps (bit depth, median, JPEG, ...)
  run forward exactly as on the device and passed through as the identity backward
  (BPDA, Athalye et al. 2018), since rounding, sorting and JPEG have no useful gradient.
"""

from __future__ import annotations

import numpy as np
import torch

from cloud_train.sticker.optimise import Transform
from roadshield_base.errors import ConfigError


def patch_mask_transform(size: int, patch_share: float = 0.1, k: int = 6, fill: float = 0.5,
                         two_mask_p: float = 0.3) -> Transform:
    """Cover each view with a random PatchCleanser mask (and a second with ``two_mask_p``)."""
    from edge_runtime.patchcleanser import mask_set

    if not 0.0 <= two_mask_p <= 1.0:
        raise ConfigError(f"two_mask_p {two_mask_p} outside [0, 1]", "use e.g. 0.3")
    masks = torch.from_numpy(mask_set(size, patch_share, k))[:, None]  # [K, 1, S, S]

    def apply(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n = len(x)
        first = masks[torch.randint(0, len(masks), (n,), generator=gen)]
        second = masks[torch.randint(0, len(masks), (n,), generator=gen)]
        both = torch.rand(n, generator=gen)[:, None, None, None] < two_mask_p
        covered = first | (second & both)
        return torch.where(covered, torch.full_like(x, fill), x)

    return apply


class _Bpda(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, fn: object) -> torch.Tensor:  # type: ignore[override]
        out = fn(x.detach().cpu().numpy().astype(np.float32))  # type: ignore[operator]
        return torch.from_numpy(np.ascontiguousarray(out, np.float32)).to(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


def sanitizer_transform(spec: str) -> Transform:
    """The batch steps of the sanitizer chain ``spec`` (e.g. "preprocess,bitdepth:bits=5,
    median:k=3"), forward on NumPy, identity backward. ConfigError if the chain has crop
    steps (they run before the resize, outside the model input this transform sees)."""
    from edge_runtime.sanitize import build_chain

    chain = build_chain(spec)
    if chain is None or chain.crop_steps or not chain.batch_steps:
        raise ConfigError(f"sanitizer chain {spec!r} has no batch steps, or has crop steps",
                          'name the steps after "preprocess", e.g. '
                          '"preprocess,bitdepth:bits=5,median:k=3"')

    def apply(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return _Bpda.apply(x, chain.sanitize_batch)

    return apply


def chain_transforms(*steps: Transform | None) -> Transform | None:
    """The transforms in order (None entries skipped); None when there are none."""
    live = [t for t in steps if t is not None]
    if not live:
        return None

    def apply(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        for t in live:
            x = t(x, gen)
        return x

    return apply
