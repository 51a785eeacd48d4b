"""Clean, FGSM and PGD accuracy of a classifier, and a printable summary.

Robust accuracy is measured with white-box L-inf attacks from
``cloud_train.attacks`` at radius ``eps`` (image units in [0, 1]).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from cloud_train.attacks import eval_mode, fgsm, pgd_linf, validate_params
from cloud_train.tensors import to_tensor
from roadshield_base.errors import ConfigError, DatasetError


def eval_tensors(model: nn.Module, images: np.ndarray | torch.Tensor,
                 labels: np.ndarray | torch.Tensor | Sequence[int],
                 device: str | torch.device | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.device]:
    """Images and labels as tensors on ``device`` (default: the model's), checked to be a
    non-empty set with one label per image (DatasetError otherwise)."""
    x = to_tensor(images)
    # a tensor may live on the GPU already (NumPy cannot read it there)
    y = labels.to(torch.int64) if isinstance(labels, torch.Tensor) \
        else torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if len(x) != len(y) or len(x) == 0:
        raise DatasetError(f"{len(x)} images and {len(y)} labels",
                           "pass a non-empty set with one label per image")
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    return x.to(device), y.to(device), device


def evaluate(model: nn.Module, images: np.ndarray | torch.Tensor,
             labels: np.ndarray | torch.Tensor | Sequence[int], eps: float = 8 / 255,
             pgd_steps: int = 10, pgd_alpha: float = 2 / 255, batch_size: int = 256,
             seed: int = 0, device: str | torch.device | None = None) -> dict[str, Any]:
    """Accuracy of ``model`` on clean inputs, under FGSM and under PGD (random start).

    images: uint8 N x H x W x 3 RGB array, or float32 N x 3 x H x W tensor in [0, 1].
    labels: N integer class indices. ``device`` defaults to the model's own.
    Returns ``clean_acc``, ``fgsm_acc``, ``pgd_acc`` (fractions in [0, 1]), ``n``,
    ``eps``, ``pgd_steps``, ``pgd_alpha`` and the wall-clock ``seconds_clean``,
    ``seconds_fgsm``, ``seconds_pgd`` and ``seconds`` (total). PGD's random start
    is drawn from a generator seeded with ``seed``, so results repeat on the CPU.
    """
    validate_params(eps, pgd_alpha, pgd_steps)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}", "use e.g. 256")
    x_all, y_all, device = eval_tensors(model, images, labels, device)
    hits = {"clean": 0, "fgsm": 0, "pgd": 0}
    secs = {"clean": 0.0, "fgsm": 0.0, "pgd": 0.0}
    with eval_mode(model), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(0, len(x_all), batch_size):
            x, y = x_all[i:i + batch_size], y_all[i:i + batch_size]
            t = time.perf_counter()
            with torch.no_grad():
                hits["clean"] += int((model(x).argmax(1) == y).sum())
            secs["clean"] += time.perf_counter() - t
            for name in ("fgsm", "pgd"):
                t = time.perf_counter()
                x_adv = fgsm(model, x, y, eps) if name == "fgsm" else \
                    pgd_linf(model, x, y, eps, pgd_alpha, pgd_steps)
                with torch.no_grad():
                    hits[name] += int((model(x_adv).argmax(1) == y).sum())
                secs[name] += time.perf_counter() - t
    n = len(y_all)
    return {"clean_acc": hits["clean"] / n, "fgsm_acc": hits["fgsm"] / n,
            "pgd_acc": hits["pgd"] / n, "n": n, "eps": float(eps), "pgd_steps": pgd_steps,
            "pgd_alpha": float(pgd_alpha), "seconds_clean": secs["clean"],
            "seconds_fgsm": secs["fgsm"], "seconds_pgd": secs["pgd"],
            "seconds": sum(secs.values())}


def format_table(results: Mapping[str, Any] | Mapping[str, Mapping[str, Any]],
                 title: str | None = None) -> str:
    """Fixed-width text table of one :func:`evaluate` result or a ``{name: result}`` mapping.

    Accuracies print as percentages; eps prints in 1/255 units, as people quote it.
    """
    rows = cast(Mapping[str, Mapping[str, Any]],
                {"model": results} if "clean_acc" in results else results)
    header = ("model", "n", "eps", "clean %", "FGSM %", "PGD %", "PGD steps", "seconds")
    lines = [header]
    for name, r in rows.items():
        lines.append((str(name), str(r["n"]), f"{r['eps'] * 255:.1f}/255",
                      f"{100 * r['clean_acc']:.1f}", f"{100 * r['fgsm_acc']:.1f}",
                      f"{100 * r['pgd_acc']:.1f}", str(r["pgd_steps"]), f"{r['seconds']:.1f}"))
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    out = [title] if title else []
    for j, row in enumerate(lines):
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
