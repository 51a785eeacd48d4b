"""Strong evaluation attacks: PGD-L2, Auto-PGD (L-inf, CE or DLR loss) and Square (L-inf).

Same conventions as ``cloud_train.attacks`` (where they are registered by name):
inputs and outputs are float32 NCHW RGB in [0, 1], ``eps`` is in the same units
(8/255 is eight grey levels; for ``pgd_l2`` it is an L2 radius over the whole
image), every attack is untargeted, returns a detached ``x_adv`` inside [0, 1] and
inside the eps ball, runs the model in eval mode and restores each submodule's
mode afterwards. Points the model already gets wrong are returned unchanged and
cost no queries; restarts only re-attack the points that are still correct.

References: Auto-PGD and the DLR loss, Croce & Hein 2020 ("Reliable evaluation of
adversarial robustness with an ensemble of diverse parameter-free attacks");
Square Attack, Andriushchenko et al. 2020 ("Square Attack: a query-efficient
black-box adversarial attack via random search"); the step-size schedule and
the p schedule follow the authors' public implementations (auto-attack).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cloud_train.attacks import eval_mode, register_attack, validate_params
from roadshield_base.errors import ConfigError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``z_y - max_{i != y} z_i`` per sample, float [N]; negative means misclassified."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], -float("inf"))
    return z_y - others.max(1).values


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference-of-logits-ratio loss per sample, float [N] (Croce & Hein 2020, eq. 5).

    ``DLR = -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)``, where ``z_pi1 >=
    z_pi2 >= z_pi3`` are the sorted logits. The attack maximises it; the ratio makes
    it invariant to shifting and rescaling the logits. Needs at least 3 classes.
    """
    if logits.shape[1] < 3:
        raise ConfigError(f"the DLR loss needs at least 3 classes, got {logits.shape[1]}",
                          "use loss='ce' for a model with fewer classes")
    top = logits.sort(1, descending=True).values
    return -margin(logits, y) / (top[:, 0] - top[:, 2] + 1e-12)


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1) == y


def _project_linf(x_adv: torch.Tensor, x: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm shaped [N, 1, 1, 1] for broadcasting."""
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)


def _project_l2(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    delta = x_adv - x
    delta = delta * (eps / _flat_norm(delta)).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0)


def _loss_and_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   loss_fn: LossFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample loss [N], d(sum of losses)/dx [N,3,H,W] and the logits, all detached."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        loss = loss_fn(logits, y)
        (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad.detach(), logits.detach()


@register_attack
def pgd_l2(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float,
           steps: int, random_start: bool = True, restarts: int = 1) -> torch.Tensor:
    """Projected gradient descent in the L2 ball of radius ``eps`` (per image) around x.

    Each step moves ``alpha`` along the L2-normalised gradient of the cross-entropy,
    then projects onto the ball and onto [0, 1]. A random start is a uniform
    direction at a uniform radius in [0, eps]. Restarts keep the first run that
    fools each example; otherwise the highest-loss point. Randomness comes from
    torch's global generator. x: float32 [N, 3, H, W] in [0, 1]; y: int64 [N].
    """
    validate_params(eps, alpha, steps, restarts)
    x = x.detach()
    out = x.clone()
    if eps == 0:
        return out
    with eval_mode(model):
        todo = _correct(model, x, y).nonzero().squeeze(1)
        best_loss = torch.full((len(x),), -float("inf"), device=x.device)
        for _ in range(restarts):
            if len(todo) == 0:
                break
            xs, ys = x[todo], y[todo]
            if random_start:
                d = torch.randn_like(xs)
                r = torch.rand(len(xs), 1, 1, 1, device=x.device) * eps
                x_adv = (xs + d / _flat_norm(d) * r).clamp(0.0, 1.0)
            else:
                x_adv = xs.clone()
            for _ in range(steps):
                _, grad, _ = _loss_and_grad(model, x_adv, ys, _ce)
                x_adv = _project_l2(x_adv + alpha * grad / _flat_norm(grad), xs, eps)
            with torch.no_grad():
                logits = model(x_adv)
                loss = _ce(logits, ys) + (logits.argmax(1) != ys).float() * 1e6
            better = loss > best_loss[todo]
            out[todo[better]] = x_adv[better]
            best_loss[todo[better]] = loss[better]
            todo = todo[loss < 1e6]  # only still-correct examples get another restart
    return out.detach()


def _checkpoints(steps: int) -> tuple[int, int, int]:
    """First checkpoint interval, its decrease per checkpoint, and its floor (0.22, 0.03, 0.06)."""
    return max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)


def _apgd_run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
              loss_fn: LossFn, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One Auto-PGD run on examples the model gets right; returns (x_adv, fooled [N] bool).

    x_adv is the first misclassified point for fooled examples, else the highest-loss one.
    """
    t = 2 * torch.rand(x.shape, generator=gen, device=x.device) - 1
    x_adv = _project_linf(x + eps * t / t.flatten(1).abs().amax(1).view(-1, 1, 1, 1), x, eps)
    loss, grad, logits = _loss_and_grad(model, x_adv, y, loss_fn)
    fooled = logits.argmax(1) != y
    x_fooled = x_adv.clone()
    x_best, grad_best, loss_best = x_adv.clone(), grad.clone(), loss.clone()
    step = torch.full((len(x), 1, 1, 1), 2.0 * eps, device=x.device)
    interval, decrease, floor = _checkpoints(steps)
    since_check, increases = 0, torch.zeros(len(x), device=x.device)
    loss_prev = loss.clone()
    best_at_check = loss_best.clone()
    reduced_at_check = torch.ones(len(x), dtype=torch.bool, device=x.device)
    x_old = x_adv.clone()
    for i in range(steps):
        momentum = 0.75 if i > 0 else 1.0
        z = _project_linf(x_adv + step * grad.sign(), x, eps)
        x_new = _project_linf(x_adv + momentum * (z - x_adv) + (1 - momentum) * (x_adv - x_old),
                              x, eps)
        x_old, x_adv = x_adv, x_new
        loss, grad, logits = _loss_and_grad(model, x_adv, y, loss_fn)
        now_fooled = (logits.argmax(1) != y) & ~fooled
        x_fooled[now_fooled] = x_adv[now_fooled]
        fooled |= now_fooled
        increases += (loss > loss_prev).float()
        loss_prev = loss
        up = loss > loss_best
        x_best[up], grad_best[up], loss_best[up] = x_adv[up], grad[up], loss[up]
        since_check += 1
        if since_check == interval:
            # halve where fewer than 75% of the steps raised the loss, or where the
            # previous checkpoint kept its step and the best loss did not improve
            halve = increases <= 0.75 * interval
            halve |= ~reduced_at_check & (best_at_check >= loss_best)
            reduced_at_check, best_at_check = halve.clone(), loss_best.clone()
            step[halve] /= 2.0
            x_adv[halve], grad[halve] = x_best[halve], grad_best[halve]
            since_check, increases = 0, torch.zeros_like(increases)
            interval = max(interval - decrease, floor)
    return torch.where(fooled.view(-1, 1, 1, 1), x_fooled, x_best), fooled


@register_attack
def apgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 100,
         loss: str = "ce", restarts: int = 1, seed: int = 0) -> torch.Tensor:
    """Auto-PGD in the L-inf ball (Croce & Hein 2020); needs no step size.

    Starts at a random point of the ball with step ``2 * eps``; each iteration takes
    a signed-gradient step and mixes it with the previous move (momentum 0.75). At
    checkpoints (22% of the budget, then shrinking intervals, at least 6%) an
    example's step halves and it restarts from its best point when its loss rose on
    at most 75% of the steps since the last checkpoint, or when its best loss
    stalled with an unchanged step. ``loss``: ``"ce"`` (cross-entropy) or ``"dlr"``
    (:func:`dlr_loss`, scale-invariant; needs >= 3 classes). Random starts come from
    a generator seeded with ``seed`` (restart r uses ``seed + r``).
    x: float32 [N, 3, H, W] in [0, 1]; y: int64 [N]. Returns x_adv, detached.
    """
    validate_params(eps, steps=steps, restarts=restarts)
    losses: dict[str, LossFn] = {"ce": _ce, "dlr": dlr_loss}
    if loss not in losses:
        raise ConfigError(f"apgd loss must be 'ce' or 'dlr', got {loss!r}",
                          "use 'ce' (cross-entropy) or 'dlr' (difference of logits ratio)")
    x = x.detach()
    out = x.clone()
    if eps == 0:
        return out
    with eval_mode(model):
        todo = _correct(model, x, y).nonzero().squeeze(1)
        for r in range(restarts):
            if len(todo) == 0:
                break
            gen = torch.Generator(device=x.device).manual_seed(seed + r)
            x_adv, fooled = _apgd_run(model, x[todo], y[todo], eps, steps, losses[loss], gen)
            # a fooled point always wins; among the rest keep the first run's best point
            keep = fooled if r > 0 else torch.ones_like(fooled)
            out[todo[keep]] = x_adv[keep]
            todo = todo[~fooled]
    return _project_linf(out, x, eps).detach()


def _p_schedule(p_init: float, it: int, queries: int) -> float:
    """Fraction of pixels a Square window covers at query ``it`` (halving schedule,
    rescaled to a 10000-query budget as in the reference implementation)."""
    it = int(it / queries * 10000)
    for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32),
                       (4000, 64), (6000, 128), (8000, 256), (10000, 512)):
        if it <= bound:
            return p_init / div
    return p_init / 512


def _random_sign(shape: tuple[int, ...], gen: torch.Generator, device: torch.device
                 ) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=gen, device=device).float() * 2 - 1


@register_attack
def square(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, queries: int = 1000,
           p_init: float = 0.8, seed: int = 0) -> torch.Tensor:
    """Square Attack in the L-inf ball (Andriushchenko et al. 2020): random search, no gradients.

    Starts from vertical stripes of +-eps (one sign per column and channel), then per
    query proposes a square window of side ``round(sqrt(p * H * W))`` whose pixels
    all move to ``x +- eps`` (one random sign per channel) and keeps it when it lowers
    the margin ``z_y - max_{i != y} z_i``. ``p`` starts at ``p_init`` and halves on
    the reference schedule. Each example stops once misclassified; ``queries`` is
    the per-example budget of forward passes (the initial stripes count as one).
    The model runs under ``torch.no_grad()``. Randomness comes from a generator
    seeded with ``seed``. x: float32 [N, 3, H, W] in [0, 1]; y: int64 [N].
    """
    validate_params(eps)
    if not isinstance(queries, int) or queries < 1:
        raise ConfigError(f"queries must be an integer >= 1, got {queries!r}",
                          "use e.g. 1000 (5000 in the AutoAttack standard set)")
    if not isinstance(p_init, (int, float)) or not 0.0 < p_init <= 1.0:
        raise ConfigError(f"p_init must be in (0, 1], got {p_init!r}", "use 0.8 (the default)")
    x = x.detach()
    out = x.clone()
    if eps == 0:
        return out
    gen = torch.Generator(device=x.device).manual_seed(seed)
    with eval_mode(model), torch.no_grad():
        todo = (model(x).argmax(1) == y).nonzero().squeeze(1)
        if len(todo) == 0:
            return out
        xs, ys = x[todo], y[todo]
        n, c, h, w = xs.shape
        x_best = _project_linf(xs + eps * _random_sign((n, c, 1, w), gen, x.device), xs, eps)
        m_best = margin(model(x_best), ys)
        for it in range(1, queries):
            active = (m_best > 0).nonzero().squeeze(1)
            if len(active) == 0:
                break
            xa, xb = xs[active], x_best[active]
            s = min(max(int(round(math.sqrt(_p_schedule(p_init, it, queries) * h * w))), 1),
                    h - 1)
            vh, vw = (int(v) for v in torch.randint(0, h - s + 1, (2,), generator=gen,
                                                    device=x.device))
            delta = xb - xa
            win = (slice(None), slice(None), slice(vh, vh + s), slice(vw, vw + s))
            new = eps * _random_sign((len(active), c, 1, 1), gen, x.device)
            for _ in range(10):  # resample channels whose window would not change
                same = ((xa[win] + new).clamp(0, 1) - xb[win]).abs().sum((-2, -1)) < 1e-7
                if not bool(same.any()):
                    break
                redo = eps * _random_sign((len(active), c, 1, 1), gen, x.device)
                new = torch.where(same[..., None, None], redo, new)
            delta[win] = new
            x_new = _project_linf(xa + delta, xa, eps)
            m_new = margin(model(x_new), ys[active])
            better = m_new < m_best[active]
            x_best[active[better]] = x_new[better]
            m_best[active[better]] = m_new[better]
        out[todo] = x_best
    return out.detach()
