"""Worst-case robust accuracy over strong attacks, and sanity checks on the evaluation itself.

:func:`strong_evaluate` follows the AutoAttack idea (Croce & Hein 2020): an example
counts as robust only if it survives every attack of a diverse set (APGD with the
cross-entropy loss, APGD with the DLR loss, and the gradient-free Square Attack).
:func:`sanity_checks` runs the checks from Carlini et al. 2019 ("On evaluating
adversarial robustness") that expose gradient masking: accuracy must fall as eps
grows, an unbounded attack must reach ~0%, more steps must not help the model, and a
black-box attack must not beat the white-box one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from cloud_train.attacks import eval_mode, pgd_linf, validate_params
from cloud_train.evaluate import eval_tensors
from cloud_train.strong_attacks import apgd, square
from roadshield_base.errors import ConfigError

ATTACKS = ("apgd_ce", "apgd_dlr", "square")


def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]
                          for i in range(0, len(x), batch_size)])


def strong_evaluate(model: nn.Module, images: np.ndarray | torch.Tensor,
                    labels: np.ndarray | torch.Tensor | Sequence[int], eps: float = 8 / 255,
                    apgd_steps: int = 100, square_queries: int = 1000, restarts: int = 1,
                    attacks: Sequence[str] = ATTACKS, batch_size: int = 256, seed: int = 0,
                    device: str | torch.device | None = None) -> dict[str, Any]:
    """Per-example worst case over ``attacks`` at L-inf radius ``eps`` (image units).

    images: uint8 N x H x W x 3 RGB array, or float32 N x 3 x H x W tensor in [0, 1];
    labels: N class indices. Every attack sees every clean-correct example, so each
    single-attack accuracy is reported as well; ``robust_acc`` counts the examples
    that are clean-correct and survive all of them (so it is <= each single one).
    Returns ``clean_acc``, ``<attack>_acc`` for each attack, ``robust_acc`` (fractions),
    ``robust_mask`` (list of N bools), ``n``, ``eps``, ``apgd_steps``,
    ``square_queries``, ``restarts``, ``attacks`` and ``seconds`` per attack and total.
    """
    validate_params(eps, steps=apgd_steps, restarts=restarts)
    if not isinstance(square_queries, int) or square_queries < 1:
        raise ConfigError(f"square_queries must be an integer >= 1, got {square_queries!r}",
                          "use e.g. 1000")
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown or not attacks:
        raise ConfigError(f"unknown or no attacks {list(attacks)!r}",
                          f"choose from: {', '.join(ATTACKS)}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}", "use e.g. 256")
    x, y, _ = eval_tensors(model, images, labels, device)
    run = {"apgd_ce": lambda xb, yb: apgd(model, xb, yb, eps, apgd_steps, "ce", restarts, seed),
           "apgd_dlr": lambda xb, yb: apgd(model, xb, yb, eps, apgd_steps, "dlr", restarts, seed),
           "square": lambda xb, yb: square(model, xb, yb, eps, square_queries, seed=seed)}
    result: dict[str, Any] = {"n": len(y), "eps": float(eps), "apgd_steps": apgd_steps,
                              "square_queries": square_queries, "restarts": restarts,
                              "attacks": list(attacks)}
    with eval_mode(model):
        clean = _correct(model, x, y, batch_size)
        robust = clean.clone()
        total = 0.0
        for name in attacks:
            t = time.perf_counter()
            survived = clean.clone()
            for i in range(0, len(x), batch_size):
                xb, yb = x[i:i + batch_size], y[i:i + batch_size]
                survived[i:i + len(xb)] &= _correct(model, run[name](xb, yb), yb, batch_size)
            result[f"{name}_acc"] = float(survived.float().mean())
            result[f"seconds_{name}"] = time.perf_counter() - t
            total += result[f"seconds_{name}"]
            robust &= survived
    result.update(clean_acc=float(clean.float().mean()), robust_acc=float(robust.float().mean()),
                  robust_mask=robust.tolist(), seconds=total)
    return result


def _pgd_acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
             seed: int, batch_size: int) -> float:
    """PGD-L-inf accuracy with step eps/4 and a seeded random start (torch's global RNG is
    forked, so callers' random state is untouched)."""
    hits = 0
    with torch.random.fork_rng(devices=[] if x.device.type == "cpu" else [x.device.index or 0]):
        torch.manual_seed(seed)
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            x_adv = pgd_linf(model, xb, yb, eps, alpha=max(eps / 4, 1e-6), steps=steps)
            hits += int(_correct(model, x_adv, yb, batch_size).sum())
    return hits / len(y)


def sanity_checks(model: nn.Module, images: np.ndarray | torch.Tensor,
                  labels: np.ndarray | torch.Tensor | Sequence[int], eps_list: Sequence[float],
                  steps: int = 10, more_steps: int = 50, square_queries: int = 300,
                  tolerance: float = 0.02, unbounded_max_acc: float = 0.05, seed: int = 0,
                  batch_size: int = 256, device: str | torch.device | None = None
                  ) -> dict[str, Any]:
    """Measure four signs of a trustworthy robustness evaluation, each pass/fail with numbers.

    - ``monotonic``: PGD accuracy (``steps`` steps) never rises by more than ``tolerance``
      as eps grows through ``eps_list`` (sorted).
    - ``unbounded``: PGD at eps=1 leaves at most ``unbounded_max_acc`` accuracy.
    - ``more_steps``: PGD with ``more_steps`` steps is no more than ``tolerance`` above
      PGD with ``steps`` steps, at the largest eps in ``eps_list``.
    - ``black_box_not_stronger``: Square (``square_queries`` queries, no gradients) is
      no more than ``tolerance`` below that PGD accuracy; a black-box attack beating
      white-box PGD means the gradients are masked.

    Returns ``{check: {"passed": bool, ...measured values}}`` plus ``clean_acc`` and
    ``all_passed``. images / labels as for :func:`strong_evaluate`.
    """
    if not eps_list:
        raise ConfigError("eps_list is empty", "pass radii such as [2/255, 8/255, 16/255]")
    for e in eps_list:
        validate_params(e)
    validate_params(0.0, steps=steps)
    validate_params(0.0, steps=more_steps)
    if not 0.0 <= tolerance < 1.0 or not 0.0 <= unbounded_max_acc < 1.0:
        raise ConfigError(f"tolerance {tolerance} / unbounded_max_acc {unbounded_max_acc} "
                          "must be in [0, 1)", "use e.g. 0.02 and 0.05")
    x, y, _ = eval_tensors(model, images, labels, device)
    eps_sorted = sorted(float(e) for e in eps_list)
    with eval_mode(model):
        clean = float(_correct(model, x, y, batch_size).float().mean())
        accs = [_pgd_acc(model, x, y, e, steps, seed, batch_size) for e in eps_sorted]
        chain = [clean, *accs]
        rises = [b - a for a, b in zip(chain, chain[1:], strict=False)]
        unbounded = _pgd_acc(model, x, y, 1.0, steps, seed, batch_size)
        e_max = eps_sorted[-1]
        many = _pgd_acc(model, x, y, e_max, more_steps, seed, batch_size)
        hits = 0
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            hits += int(_correct(model, square(model, xb, yb, e_max, square_queries, seed=seed),
                                 yb, batch_size).sum())
        sq = hits / len(y)
    checks: dict[str, Any] = {
        "clean_acc": clean,
        "monotonic": {"passed": max(rises) <= tolerance, "eps": eps_sorted, "pgd_acc": accs,
                      "max_rise": max(rises)},
        "unbounded": {"passed": unbounded <= unbounded_max_acc, "eps": 1.0,
                      "pgd_acc": unbounded, "max_allowed": unbounded_max_acc},
        "more_steps": {"passed": many <= accs[-1] + tolerance, "eps": e_max,
                       f"pgd_{steps}_acc": accs[-1], f"pgd_{more_steps}_acc": many},
        "black_box_not_stronger": {"passed": sq >= min(accs[-1], many) - tolerance,
                                   "eps": e_max, "square_acc": sq,
                                   "pgd_acc": min(accs[-1], many)},
    }
    checks["all_passed"] = all(v["passed"] for v in checks.values() if isinstance(v, dict))
    return checks


def strong_report(model: nn.Module, images: np.ndarray | torch.Tensor,
                  labels: np.ndarray | torch.Tensor | Sequence[int], eps: float = 8 / 255,
                  apgd_steps: int = 100, square_queries: int = 1000, seed: int = 0,
                  device: str | torch.device | None = None) -> dict[str, Any]:
    """:func:`strong_evaluate` at ``eps`` plus :func:`sanity_checks` around it (eps/2, eps,
    2 eps), as one JSON-able dict ``{"strong": ..., "sanity": ...}`` (no per-example mask).

    The checks run with every strong evaluation because a robust accuracy is only worth
    quoting when the attacks behind it are shown to work."""
    strong = strong_evaluate(model, images, labels, eps=eps, apgd_steps=apgd_steps,
                             square_queries=square_queries, seed=seed, device=device)
    strong.pop("robust_mask")
    sanity = sanity_checks(model, images, labels, [eps / 2, eps, min(1.0, 2 * eps)],
                           square_queries=max(1, square_queries // 3), seed=seed, device=device)
    return {"strong": strong, "sanity": sanity}


def format_strong(report: dict[str, Any]) -> str:
    """A few lines of text for a :func:`strong_report` result."""
    s = report["strong"]
    lines = [f"strong evaluation at eps {s['eps'] * 255:.1f}/255 on {s['n']} examples "
             f"({s['seconds']:.1f} s): clean {100 * s['clean_acc']:.1f} %, "
             + ", ".join(f"{a} {100 * s[f'{a}_acc']:.1f} %" for a in s["attacks"])
             + f", worst case {100 * s['robust_acc']:.1f} %"]
    for name, check in report["sanity"].items():
        if isinstance(check, dict):
            values = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                               for k, v in check.items() if k != "passed")
            lines.append(f"  sanity {name}: {'pass' if check['passed'] else 'FAIL'} ({values})")
    verdict = "all passed" if report["sanity"]["all_passed"] else \
        "SOME FAILED: treat the robust accuracy as an upper bound (gradient masking?)"
    lines.append(f"  sanity checks: {verdict}")
    return "\n".join(lines)
