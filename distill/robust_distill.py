"""Teacher -> student distillation steps, registered as trainers of ``cloud_train.train``.

Each is ``step(student, x, y, cfg, eps, teacher=...) -> (loss, logits)`` and runs in the
same loop as every other trainer (SGD, one-cycle schedule, eps warm-up, the
catastrophic-overfitting guard for the adversarial ones, torchrun). x is float32
[B, 3, H, W] RGB in [0, 1], y int64 [B]; the teacher is frozen and in eval mode; attacks
run on the student in eval mode. ``KL(p, q)`` below is ``sum p (log p - log q)`` summed
over classes and averaged over the batch (``F.kl_div(log q, p, reduction="batchmean")``);
``S_T`` and ``T_T`` are the student's and teacher's softmax at temperature T.

- ``kd``, Hinton, Vinyals and Dean 2015: ``alpha * T^2 * KL(T_T(x), S_T(x)) + (1 - alpha) *
  CE(S(x), y)``, no adversary.
- ``ard``, Goldblum et al. 2020 ("Adversarially Robust Distillation", AAAI): x_adv by PGD
  on the student maximising ``CE(S(x'), y)`` (``cfg.pgd_steps`` steps, as ``pgd_at``), then
  ``alpha * T^2 * KL(T_T(x), S_T(x_adv)) + (1 - alpha) * CE(S(x), y)``: the student's answer
  on the attacked image is pulled to the teacher's on the clean one.
- ``rslad``, Zi et al. 2021 ("Revisiting Adversarial Robustness Distillation: Robust Soft
  Labels Make Student Better", ICCV): x_adv by PGD from ``x + 0.001 * N(0, 1)`` maximising
  ``KL(T(x), S(x'))``, then ``5/6 * KL(T(x), S(x_adv)) + 1/6 * KL(T(x), S(x))`` at
  temperature 1: the teacher's soft labels replace the hard ones everywhere.

``cfg.kd_temperature`` is T and ``cfg.kd_alpha`` alpha (defaults 1 and 1: RSLAD as
published; ARD's CIFAR-10 setting was T = 30, alpha = 1, ``distill train`` passes them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cloud_train.attacks import eval_mode, pgd_linf
from cloud_train.robust_trainers import inner_step
from cloud_train.train import TrainConfig, register_trainer

METHODS = ("kd", "ard", "rslad")


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """``KL(T_T || S_T)``, batch mean (the teacher's softmax is the target distribution)."""
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.softmax(teacher_logits / temperature, dim=1), reduction="batchmean")


def rslad_adversary(student: nn.Module, x: torch.Tensor, teacher_logits: torch.Tensor,
                    eps: float, alpha: float, steps: int) -> torch.Tensor:
    """PGD-L-inf from ``x + 0.001 * N(0, 1)`` maximising ``KL(T(x) || S(x'))``."""
    x_adv = (x.detach() + 0.001 * torch.randn_like(x)).clamp_(0.0, 1.0)
    target = teacher_logits.detach()
    with eval_mode(student):
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = soft_kl(student(x_adv), target)
            grad, = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach() + alpha * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)
    return x_adv.detach()


@register_trainer("kd", adversarial=False, needs_teacher=True)
def kd_step(student: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, eps: float,
            *, teacher: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain knowledge distillation on clean images."""
    with torch.no_grad():
        t_logits = teacher(x)
    logits = student(x)
    t, a = cfg.kd_temperature, cfg.kd_alpha
    loss = a * t * t * soft_kl(logits, t_logits, t) + (1 - a) * F.cross_entropy(logits, y)
    return loss, logits


@register_trainer("ard", adversarial=True, needs_teacher=True)
def ard_step(student: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, eps: float,
             *, teacher: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """ARD; the logits returned are the student's on the attacked batch."""
    x_adv = pgd_linf(student, x, y, eps=eps, alpha=inner_step(cfg, eps), steps=cfg.pgd_steps,
                     random_start=True)
    with torch.no_grad():
        t_logits = teacher(x)
    adv_logits = student(x_adv)
    t, a = cfg.kd_temperature, cfg.kd_alpha
    loss = a * t * t * soft_kl(adv_logits, t_logits, t)
    if a < 1.0:  # the clean pass costs a forward and backward: only when it counts
        loss = loss + (1 - a) * F.cross_entropy(student(x), y)
    return loss, adv_logits


@register_trainer("rslad", adversarial=True, needs_teacher=True)
def rslad_step(student: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
               eps: float, *, teacher: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """RSLAD; the logits returned are the student's on the attacked batch."""
    with torch.no_grad():
        t_logits = teacher(x)
    x_adv = rslad_adversary(student, x, t_logits, eps, inner_step(cfg, eps), cfg.pgd_steps)
    adv_logits = student(x_adv)
    loss = 5 / 6 * soft_kl(adv_logits, t_logits) + 1 / 6 * soft_kl(student(x), t_logits)
    return loss, adv_logits
