"""From dataset arrays to model batches.

Datasets arrive as ``N x H x W x 3`` uint8 **RGB** arrays with int64 labels. Models
take float32 ``N x 3 x H x W`` RGB in [0, 1]. The loader keeps the images as one
uint8 tensor and builds each batch with a single indexing operation; augmentation
then runs on the whole batch at once (no per-sample PIL work), which keeps an epoch
cheap on a two-core machine.

Determinism: shuffling and augmentation draw from generators seeded by ``seed``.
Every batch gets its own augmentation seed, drawn in the main process, so the
batches are the same whatever ``num_workers`` is.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from roadshield_base.errors import ConfigError, DatasetError


def check_arrays(images: np.ndarray, labels: np.ndarray | Sequence[int] | None = None) -> None:
    """Raise DatasetError unless ``images`` is N x H x W x 3 uint8 (and labels has N entries)."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 \
            or images.shape[-1] != 3:
        desc = f"{type(images).__name__} {getattr(images, 'dtype', '')} " \
               f"{getattr(images, 'shape', '')}"
        raise DatasetError(f"images must be an N x H x W x 3 uint8 RGB array, got {desc}",
                           "load images with the dataset loaders, which return uint8 RGB")
    if labels is not None and len(labels) != len(images):
        raise DatasetError(f"{len(images)} images but {len(labels)} labels",
                           "pass one label per image")


def to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC RGB array -> float32 NCHW RGB in [0, 1]; a float NCHW tensor passes through.

    A float tensor must already be NCHW with 3 channels and values in [0, 1].
    """
    if isinstance(images, torch.Tensor):
        if images.dtype == torch.uint8:
            raise DatasetError("got a uint8 tensor; pass uint8 images as a NumPy NHWC array",
                               "or convert them to float NCHW in [0, 1] first")
        if images.ndim != 4 or images.shape[1] != 3:
            raise DatasetError(f"float images must be N x 3 x H x W, got {tuple(images.shape)}",
                               "permute NHWC tensors with x.permute(0, 3, 1, 2)")
        if images.numel() and (float(images.min()) < 0.0 or float(images.max()) > 1.0):
            raise DatasetError("float images must lie in [0, 1]",
                               "divide uint8 pixel values by 255 and do not normalise them")
        return images.float()
    check_arrays(images)
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)


@dataclass(frozen=True)
class Augment:
    """Light, label-preserving augmentation for sign crops, applied to a whole batch.

    Random crop after padding by ``pad`` pixels (edge pixels replicated) and a small
    brightness / contrast / saturation jitter. No flips: mirroring turns a "turn left"
    sign into "turn right". ``pad=None`` means one eighth of the image side.
    """

    pad: int | None = None
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2

    def __call__(self, x: torch.Tensor, gen: torch.Generator,
                 rows: torch.Tensor | None = None, total: int | None = None) -> torch.Tensor:
        """x: float32 [B, 3, H, W] in [0, 1] -> a new tensor of the same shape, in [0, 1].

        ``rows``/``total``: x holds rows ``rows`` (int64 [B]) of a batch of ``total`` images
        (a shard of a global batch, see ``cloud_train.distributed``). The random draws are
        made for all ``total`` images and the shard keeps its own rows, so an example gets
        the same crop and jitter whichever process augments it.
        """
        b, _, h, w = x.shape
        n = b if total is None else total
        if rows is not None and (len(rows) != b or (b and int(rows.max()) >= n)):
            raise ConfigError(f"augmentation rows {rows.tolist()[:8]} do not fit a shard of "
                              f"{b} images out of {n}", "pass one row index < total per image")
        pad = max(1, round(min(h, w) / 8)) if self.pad is None else self.pad
        # every draw for the whole batch first, in a fixed order: the stream never depends
        # on which rows this call keeps
        oy = ox = None
        if pad > 0:
            oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
            ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen)

        def factor(amount: float) -> torch.Tensor | None:
            if not amount:
                return None
            return 1.0 + (torch.rand(n, 1, 1, 1, generator=gen) * 2.0 - 1.0) * amount

        fb, fc, fs = factor(self.brightness), factor(self.contrast), factor(self.saturation)
        if rows is not None:
            oy, ox, fb, fc, fs = (None if t is None else t[rows] for t in (oy, ox, fb, fc, fs))
        if oy is not None and ox is not None:
            xp = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="replicate")
            win_rows = (oy[:, None] + torch.arange(h))[:, :, None]  # [B, H, 1]
            win_cols = (ox[:, None] + torch.arange(w))[:, None, :]  # [B, 1, W]
            # advanced indexing gathers each sample's own window: result [B, H, W, C]
            x = xp.permute(0, 2, 3, 1)[torch.arange(b)[:, None, None], win_rows, win_cols]
            x = x.permute(0, 3, 1, 2).contiguous()
        if fb is not None:
            x = x * fb
        gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])  # ITU-R BT.601 luma
        if fc is not None:
            mean = gray.mean(dim=(2, 3), keepdim=True)
            x = (x - mean) * fc + mean
        if fs is not None:
            x = (x - gray) * fs + gray
        return x.clamp_(0.0, 1.0)


class _BatchSampler(Sampler):
    """Yields ``(indices, augmentation_seed)`` per batch from one seeded generator."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, drop_last: bool,
                 seed: int) -> None:
        self.n, self.batch_size, self.shuffle, self.drop_last = n, batch_size, shuffle, drop_last
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        order = torch.randperm(self.n, generator=self.gen) if self.shuffle else torch.arange(self.n)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            seed = int(torch.randint(0, 2**62, (1,), generator=self.gen))
            yield idx, seed


class _BatchSet(Dataset):
    """Indexed by a whole batch: ``(indices, seed)`` -> ``(float images, int64 labels)``.

    A shard of a global batch is keyed ``(indices, seed, rows, total)``: the shard's
    dataset indices, the global batch's augmentation seed, the shard's positions in the
    global batch and the global batch size (see :meth:`Augment.__call__`).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: Augment | None):
        self.images, self.labels, self.augment = images, labels, augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[Any, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        idx, seed = key[0], key[1]
        rows, total = (key[2], key[3]) if len(key) == 4 else (None, None)
        x = self.images[idx].float().div_(255.0)
        if self.augment is not None:
            x = self.augment(x, torch.Generator().manual_seed(seed), rows=rows, total=total)
        return x, self.labels[idx]


def make_loader(images: np.ndarray, labels: np.ndarray | Sequence[int], batch_size: int = 128,
                shuffle: bool = False, augment: bool | Augment = False, seed: int = 0,
                num_workers: int = 0, drop_last: bool = False) -> DataLoader:
    """DataLoader over uint8 NHWC RGB ``images`` and integer ``labels``.

    Yields ``(x, y)``: x float32 ``[B, 3, H, W]`` RGB in [0, 1], y int64 ``[B]``.
    ``augment=True`` uses :class:`Augment` defaults; pass an ``Augment`` to tune it.
    Each pass over the loader reshuffles; two loaders built with the same seed yield
    identical batch sequences.
    """
    check_arrays(images, labels)
    if len(images) == 0:
        raise DatasetError("the image array is empty", "check the dataset path and split")
    if batch_size < 1 or num_workers < 0:
        raise ConfigError(f"batch_size must be >= 1 and num_workers >= 0, got "
                          f"{batch_size} / {num_workers}", "use e.g. batch_size=128")
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
    aug = Augment() if augment is True else (augment or None)
    sampler = _BatchSampler(len(x), batch_size, shuffle, drop_last, seed)
    return DataLoader(_BatchSet(x, y, aug), sampler=sampler, batch_size=None,
                      num_workers=num_workers, persistent_workers=num_workers > 0)
