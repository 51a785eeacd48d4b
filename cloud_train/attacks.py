"""White-box L-inf evasion attacks chosen by name.

Inputs and outputs are float32 NCHW RGB in [0, 1]; ``eps`` and ``alpha`` are in
the same [0, 1] units (8/255 is eight grey levels). Every attack is untargeted
(it pushes the loss of the true label up), keeps ``|x_adv - x| <= eps`` per pixel
and ``x_adv`` inside [0, 1], runs the model in eval mode (so batch-norm uses its
running statistics and dropout is off) and puts every submodule back in the
train/eval mode it had before. Results are detached.

References: FGSM, Goodfellow et al. 2015 ("Explaining and harnessing adversarial
examples"); PGD, Madry et al. 2018 ("Towards deep learning models resistant to
adversarial attacks").
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from roadshield_base.errors import ConfigError

AttackFn = Callable[..., torch.Tensor]
_ATTACKS: dict[str, AttackFn] = {}


def register_attack(fn: AttackFn) -> AttackFn:
    """Register ``fn(model, x, y, **params) -> x_adv`` under its function name."""
    if fn.__name__ in _ATTACKS:
        raise ConfigError(f"attack {fn.__name__!r} is registered twice", "rename the function")
    _ATTACKS[fn.__name__] = fn
    return fn


def _load_builtin_attacks() -> None:
    # The strong evaluation attacks (APGD, Square, PGD-L2), the ROA rectangle and the RP2
    # sticker live in their own modules, which import this one; importing them here at call
    # time registers them without a cycle.
    import cloud_train.roa  # noqa: F401
    import cloud_train.sticker.digital  # noqa: F401
    import cloud_train.strong_attacks  # noqa: F401


def list_attacks() -> list[str]:
    """Names accepted by :func:`create_attack`, sorted."""
    _load_builtin_attacks()
    return sorted(_ATTACKS)


def create_attack(name: str, **kw: Any) -> Callable[[nn.Module, torch.Tensor, torch.Tensor],
                                                     torch.Tensor]:
    """The attack ``name`` with its parameters bound: call it as ``attack(model, x, y)``.

    Parameters are checked now (unknown names, eps out of [0, 1], steps < 1 ->
    ConfigError), not at the first batch.
    """
    _load_builtin_attacks()
    if name not in _ATTACKS:
        raise ConfigError(f"unknown attack {name!r}", f"choose one of: {', '.join(list_attacks())}")
    fn = _ATTACKS[name]
    params = inspect.signature(fn).parameters
    allowed = [p for p in params if p not in ("model", "x", "y")]
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        raise ConfigError(f"attack {name!r} has no parameter(s) {unknown}",
                          f"its parameters are: {', '.join(allowed)}")
    missing = [p for p in allowed if params[p].default is inspect.Parameter.empty and p not in kw]
    if missing:
        raise ConfigError(f"attack {name!r} needs parameter(s) {missing}",
                          "pass them as keyword arguments, e.g. eps=8/255")
    full = {p: kw.get(p, params[p].default) for p in allowed}
    # an attack without an L-inf radius (e.g. a patch attack) still has its steps checked
    validate_params(**{"eps": 0.0, **{k: v for k, v in full.items()
                                      if k in ("eps", "alpha", "steps", "restarts")}})
    bound = functools.partial(fn, **kw)
    bound.__name__ = name  # type: ignore[attr-defined]
    return bound


def validate_params(eps: float, alpha: float | None = None, steps: int | None = None,
                    restarts: int | None = None) -> None:
    """ConfigError unless eps in [0, 1], alpha in (0, 1], steps >= 1 and restarts >= 1."""
    if not isinstance(eps, (int, float)) or not 0.0 <= float(eps) <= 1.0:
        raise ConfigError(f"eps must be in [0, 1] (image units), got {eps!r}",
                          "8/255 = 0.0314 is the usual L-inf budget; 8 pixel levels is 8/255")
    if alpha is not None and (not isinstance(alpha, (int, float)) or not 0.0 < alpha <= 1.0):
        raise ConfigError(f"alpha (step size) must be in (0, 1], got {alpha!r}",
                          "use about eps/4, e.g. 2/255 for eps=8/255")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ConfigError(f"steps must be an integer >= 1, got {steps!r}", "use e.g. 10")
    if restarts is not None and (not isinstance(restarts, int) or restarts < 1):
        raise ConfigError(f"restarts must be an integer >= 1, got {restarts!r}", "use 1 or more")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode, then restore each submodule's own training flag."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def _input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d(cross-entropy summed over the batch)/dx; summing keeps per-example gradients unscaled."""
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    return grad


@register_attack
def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """One signed-gradient step of size ``eps``: ``clamp(x + eps * sign(grad), 0, 1)``.

    x: float32 [N, 3, H, W] in [0, 1]; y: int64 [N]. Returns x_adv, same shape, detached.
    """
    validate_params(eps)
    if eps == 0:
        return x.detach().clone()
    with eval_mode(model):
        grad = _input_grad(model, x, y)
    return (x.detach() + eps * grad.sign()).clamp_(0.0, 1.0)


@register_attack
def pgd_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
             alpha: float = 2 / 255, steps: int = 10, random_start: bool = True,
             restarts: int = 1) -> torch.Tensor:
    """Projected gradient descent in the L-inf ball of radius ``eps`` around x.

    ``steps`` signed-gradient steps of size ``alpha``, each followed by projection
    onto the eps-ball and onto [0, 1]. With ``random_start`` each run starts from a
    uniform point in the ball; with ``restarts > 1`` the attack keeps, per example,
    the run with the highest loss (a misclassified example always beats a correct one).
    Randomness comes from torch's global generator (seed it for repeatable results).

    x: float32 [N, 3, H, W] in [0, 1]; y: int64 [N]. Returns x_adv, same shape, detached.
    """
    validate_params(eps, alpha, steps, restarts)
    x = x.detach()
    if eps == 0:
        return x.clone()
    best = x.clone()
    best_score = torch.full((len(x),), -float("inf"), device=x.device)
    with eval_mode(model):
        for _ in range(restarts):
            if random_start:
                delta = torch.empty_like(x).uniform_(-eps, eps)
                x_adv = (x + delta).clamp_(0.0, 1.0)
            else:
                x_adv = x.clone()
            for _ in range(steps):
                grad = _input_grad(model, x_adv, y)
                x_adv = x_adv + alpha * grad.sign()
                x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)
            with torch.no_grad():
                logits = model(x_adv)
                loss = F.cross_entropy(logits, y, reduction="none")
                # wrong predictions rank above every correct one, then by loss
                score = loss + (logits.argmax(1) != y).float() * 1e6
            better = score > best_score
            best[better] = x_adv[better]
            best_score = torch.where(better, score, best_score)
    return best.detach()
