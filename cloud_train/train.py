"""Standard and fast adversarial training, chosen by trainer name.

``fast_at`` follows Wong, Rice and Kolter 2020 ("Fast is better than free:
revisiting adversarial training"): each batch is attacked with one FGSM step of
size ``alpha = 1.25 * eps`` from a uniform random start in ``[-eps, eps]``, the
perturbed images are clamped to the valid range [0, 1], and the learning rate
follows one cycle (linear ramp up to ``lr`` over the first 40% of the steps, then
linearly down to zero). Both trainers use the same SGD optimiser and schedule, so
their costs and results compare directly.

Catastrophic overfitting (FGSM training suddenly losing all PGD robustness) is
guarded against simply: after every epoch of an adversarial trainer, PGD accuracy
is measured on a small fixed batch (from ``val`` when given, else the first
training batch, as in the paper's early-stopping check) and the weights of the
best epoch are kept. Training does not stop early; a patience-based early-stopping
scheme is left for later.

Determinism: ``torch.manual_seed(cfg.seed)`` is set at the start; with a seeded
loader (``cloud_train.tensors.make_loader``) and the same initial weights (seed torch
before ``create_model``), runs on the CPU repeat bit for bit. CUDA runs may differ in
the last bits (cuDNN picks kernels at run time).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from cloud_train.attacks import eval_mode, pgd_linf
from cloud_train.tensors import to_tensor
from roadshield.errors import ConfigError

log = logging.getLogger(__name__)

#: step(model, x, y, config, eps in force at this step) -> (loss to minimise, logits whose
#: argmax is reported as training accuracy: of the clean or of the attacked batch)
StepFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, "TrainConfig", float],
                  tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Trainer:
    name: str
    step: StepFn
    adversarial: bool


_TRAINERS: dict[str, Trainer] = {}


def register_trainer(name: str, adversarial: bool) -> Callable[[StepFn], StepFn]:
    """Register a per-batch step ``step(model, x, y, cfg, eps) -> (loss, logits)``."""
    def deco(fn: StepFn) -> StepFn:
        if name in _TRAINERS:
            raise ConfigError(f"trainer {name!r} is registered twice", "use a unique name")
        _TRAINERS[name] = Trainer(name, fn, adversarial)
        return fn
    return deco


def _load_builtin_trainers() -> None:
    # PGD-AT, TRADES and ROA live in their own module, which imports this one; importing it
    # at call time registers them without an import cycle.
    import cloud_train.robust_trainers  # noqa: F401


def list_trainers() -> list[str]:
    _load_builtin_trainers()
    return sorted(_TRAINERS)


@dataclass
class TrainConfig:
    """Training settings; every value is checked on construction (ConfigError).

    ``lr`` is the peak of the one-cycle schedule. ``eps`` and ``alpha`` are L-inf
    radii in [0, 1] image units; ``alpha=None`` means 1.25 * eps (the paper's choice).
    ``guard_size`` examples with a ``guard_steps``-step PGD form the
    catastrophic-overfitting check of adversarial trainers (0 turns it off).
    ``device``: "auto" (CUDA when present), "cpu", "cuda" or "cuda:N".

    Multi-step trainers: ``pgd_steps`` inner steps of size ``pgd_alpha`` (None: 2.5 * eps /
    steps, Madry et al.) for ``pgd_at`` and ``trades``; ``trades_beta`` weighs TRADES'
    robustness term; ``roa_height`` x ``roa_width`` pixels is the ROA rectangle, searched
    on a grid of ``roa_stride`` pixels among the ``roa_candidates`` positions with the largest
    input gradient, then filled by ``pgd_steps`` steps.
    """

    trainer: str = "standard"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    weight_decay: float = 5e-4
    momentum: float = 0.9
    eps: float = 8 / 255
    alpha: float | None = None
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"
    guard_size: int = 256
    guard_steps: int = 5
    guard_tolerance: float = 0.05
    eps_warmup_epochs: int = 0
    pgd_steps: int = 7
    pgd_alpha: float | None = None
    trades_beta: float = 6.0
    roa_height: int = 7
    roa_width: int = 7
    roa_stride: int = 2
    roa_candidates: int = 10

    def __post_init__(self) -> None:
        def need(ok: bool, what: str, hint: str) -> None:
            if not ok:
                raise ConfigError(f"invalid training config: {what}", hint)

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        _load_builtin_trainers()
        need(self.trainer in _TRAINERS, f"unknown trainer {self.trainer!r}",
             f"choose one of: {', '.join(list_trainers())}")
        need(is_int(self.epochs) and self.epochs >= 1, f"epochs={self.epochs!r}", "use >= 1")
        need(is_int(self.batch_size) and self.batch_size >= 1,
             f"batch_size={self.batch_size!r}", "use >= 1, e.g. 128")
        need(self.lr > 0 and np.isfinite(self.lr), f"lr={self.lr!r}", "use a positive rate")
        need(self.weight_decay >= 0, f"weight_decay={self.weight_decay!r}", "use >= 0")
        need(0 <= self.momentum < 1, f"momentum={self.momentum!r}", "use a value in [0, 1)")
        need(0.0 <= self.eps <= 1.0, f"eps={self.eps!r} is outside [0, 1]",
             "eps is in image units: 8/255 = 0.031 is the usual budget")
        need(self.alpha is None or 0.0 < self.alpha <= 1.0, f"alpha={self.alpha!r}",
             "use None (1.25 * eps) or a step in (0, 1]")
        need(is_int(self.seed) and self.seed >= 0, f"seed={self.seed!r}", "use an int >= 0")
        need(is_int(self.num_workers) and self.num_workers >= 0,
             f"num_workers={self.num_workers!r}", "use >= 0")
        need(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
             f"device={self.device!r}", "use auto, cpu, cuda or cuda:N")
        need(is_int(self.guard_size) and self.guard_size >= 0,
             f"guard_size={self.guard_size!r}", "use >= 0 (0 turns the guard off)")
        need(is_int(self.guard_steps) and self.guard_steps >= 1,
             f"guard_steps={self.guard_steps!r}", "use >= 1")
        need(0 <= self.guard_tolerance <= 1, f"guard_tolerance={self.guard_tolerance!r}",
             "use a fraction in [0, 1]")
        need(is_int(self.eps_warmup_epochs) and 0 <= self.eps_warmup_epochs <= self.epochs,
             f"eps_warmup_epochs={self.eps_warmup_epochs!r}",
             f"use 0 (no warm-up) up to epochs={self.epochs}")
        need(is_int(self.pgd_steps) and self.pgd_steps >= 1, f"pgd_steps={self.pgd_steps!r}",
             "use >= 1 (7-10 is usual for training)")
        need(self.pgd_alpha is None or 0.0 < self.pgd_alpha <= 1.0,
             f"pgd_alpha={self.pgd_alpha!r}", "use None (2.5 * eps / pgd_steps) or (0, 1]")
        need(0.0 <= self.trades_beta <= 100.0 and np.isfinite(self.trades_beta),
             f"trades_beta={self.trades_beta!r}", "use a weight in [0, 100]; 6 is the paper's")
        for side in ("roa_height", "roa_width", "roa_stride", "roa_candidates"):
            v = getattr(self, side)
            need(is_int(v) and v >= 1, f"{side}={v!r}", "use a whole number of pixels >= 1")
        if _TRAINERS[self.trainer].adversarial:
            need(self.eps > 0, f"trainer {self.trainer!r} with eps=0",
                 "adversarial training needs eps > 0; use trainer='standard' instead")

    @property
    def step_size(self) -> float:
        """FGSM step of fast_at: ``alpha`` or 1.25 * eps."""
        return self.alpha if self.alpha is not None else 1.25 * self.eps

    @property
    def pgd_step_size(self) -> float:
        """Inner step of the multi-step trainers: ``pgd_alpha`` or 2.5 * eps / pgd_steps."""
        return self.pgd_alpha if self.pgd_alpha is not None else 2.5 * self.eps / self.pgd_steps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown training config keys {unknown}",
                              "remove them or update the code that wrote them")
        return cls(**d)


@dataclass
class EpochStats:
    """One epoch. ``train_acc``/``loss`` are on the inputs trained on (adversarial for
    fast_at); ``seconds`` counts only the optimisation pass, ``eval_seconds`` the checks."""

    epoch: int
    loss: float
    train_acc: float
    lr: float
    seconds: float
    val_acc: float | None = None
    guard_pgd_acc: float | None = None
    eval_seconds: float = 0.0


@dataclass
class TrainHistory:
    trainer: str
    epochs: list[EpochStats] = field(default_factory=list)
    kept_epoch: int | None = None  # epoch whose weights the model holds at the end
    device: str = "cpu"

    @property
    def seconds_per_epoch(self) -> float:
        return float(np.mean([e.seconds for e in self.epochs])) if self.epochs else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"trainer": self.trainer, "kept_epoch": self.kept_epoch, "device": self.device,
                "seconds_per_epoch": self.seconds_per_epoch,
                "epochs": [dataclasses.asdict(e) for e in self.epochs]}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available",
                          "use device='cpu' or 'auto'")
    return torch.device(name)


@register_trainer("standard", adversarial=False)
def _standard_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   cfg: TrainConfig, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(x)
    return F.cross_entropy(logits, y), logits


@register_trainer("fast_at", adversarial=True)
def _fast_at_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  cfg: TrainConfig, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    alpha = cfg.step_size * eps / cfg.eps  # the step keeps its ratio to eps during warm-up
    # uniform start inside the ball, kept so that x + delta stays in [0, 1]
    delta = torch.empty_like(x).uniform_(-eps, eps)
    delta = ((x + delta).clamp(0.0, 1.0) - x).requires_grad_(True)
    loss = F.cross_entropy(model(x + delta), y)
    (grad,) = torch.autograd.grad(loss, delta)
    delta = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
    x_adv = (x + delta).clamp(0.0, 1.0)
    logits = model(x_adv)
    return F.cross_entropy(logits, y), logits


def eps_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The eps of training step ``step`` (0-based): a linear ramp from 0 to ``cfg.eps`` over
    ``eps_warmup_epochs``, then ``cfg.eps``. Starting small lets the model learn the
    fine details (numerals, glyphs) before the full budget makes them hard to see."""
    warm = cfg.eps_warmup_epochs * steps_per_epoch
    return cfg.eps if warm == 0 else cfg.eps * min(1.0, (step + 1) / warm)


def _one_cycle(total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at step t: linear 0 -> 1 over 40% of the steps, then -> 0."""
    peak = max(1.0, 0.4 * total_steps)
    return lambda t: float(np.interp(t + 1, [0, peak, total_steps], [0.0, 1.0, 0.0]))


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    with eval_mode(model), torch.no_grad():
        hits = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
                   for i in range(0, len(x), batch))
    return hits / max(1, len(x))


def _as_xy(val: tuple[Any, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = val
    return to_tensor(x).to(device), torch.as_tensor(np.asarray(y), dtype=torch.int64).to(device)


def train(model: nn.Module, train_loader: DataLoader, cfg: TrainConfig,
          val: tuple[Any, Any] | None = None, progress: bool = True) -> TrainHistory:
    """Train ``model`` in place and return its per-epoch history.

    ``train_loader`` yields ``(x, y)``: x float32 [B, 3, H, W] RGB in [0, 1], y int64 [B]
    (see ``cloud_train.tensors.make_loader``). ``val`` is ``(images, labels)`` with
    images as uint8 N x H x W x 3 RGB arrays or float NCHW tensors in [0, 1]; its clean
    accuracy is reported each epoch. The model ends in eval mode on the config's device,
    holding the kept epoch's weights.
    """
    trainer = _TRAINERS[cfg.trainer]
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ConfigError("the training loader yields no batches",
                          "check the dataset size against batch_size and drop_last")
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _one_cycle(cfg.epochs * steps_per_epoch))
    val_xy = _as_xy(val, device) if val is not None else None
    guard = _guard_batch(cfg, trainer, train_loader, val_xy, device)
    history = TrainHistory(trainer=cfg.trainer, device=str(device))
    kept_state: dict[str, torch.Tensor] | None = None
    best_guard = -1.0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        loss_sum, hits, seen = 0.0, 0, 0
        bar = tqdm(train_loader, desc=f"{cfg.trainer} epoch {epoch}/{cfg.epochs}",
                   disable=not progress, leave=True, dynamic_ncols=True)
        for x, y in bar:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss, logits = trainer.step(model, x, y, cfg, eps_at(cfg, sched.last_epoch,
                                                                 steps_per_epoch))
            if not torch.isfinite(loss):
                raise ConfigError(f"training diverged at epoch {epoch} (loss {float(loss)})",
                                  f"lower the learning rate (now {cfg.lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(y)
            hits += int((logits.argmax(1) == y).sum())
            seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{hits / seen:.3f}")
        bar.close()
        stats = EpochStats(epoch, loss_sum / seen, hits / seen, opt.param_groups[0]["lr"],
                           time.perf_counter() - t0)
        t1 = time.perf_counter()
        if val_xy is not None:
            stats.val_acc = _accuracy(model, *val_xy)
        if guard is not None:
            stats.guard_pgd_acc = _guard_accuracy(model, guard, cfg, epoch)
            if stats.guard_pgd_acc >= best_guard - cfg.guard_tolerance:
                kept_state = copy.deepcopy(model.state_dict())
                history.kept_epoch = epoch
            best_guard = max(best_guard, stats.guard_pgd_acc)
        stats.eval_seconds = time.perf_counter() - t1
        history.epochs.append(stats)
        log.info("%s epoch %d/%d: loss %.4f, train acc %.3f, val acc %s, guard PGD acc %s, "
                 "%.1f s", cfg.trainer, epoch, cfg.epochs, stats.loss, stats.train_acc,
                 "-" if stats.val_acc is None else f"{stats.val_acc:.3f}",
                 "-" if stats.guard_pgd_acc is None else f"{stats.guard_pgd_acc:.3f}",
                 stats.seconds)
    if kept_state is not None and history.kept_epoch != cfg.epochs:
        log.info("restoring the weights of epoch %d (best guard PGD accuracy)",
                 history.kept_epoch)
        model.load_state_dict(kept_state)
    if history.kept_epoch is None:
        history.kept_epoch = cfg.epochs
    model.eval()
    return history


def _guard_batch(cfg: TrainConfig, trainer: Trainer, loader: DataLoader,
                 val_xy: tuple[torch.Tensor, torch.Tensor] | None,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not trainer.adversarial or cfg.guard_size == 0:
        return None
    if val_xy is not None:
        return val_xy[0][:cfg.guard_size], val_xy[1][:cfg.guard_size]
    x, y = next(iter(loader))
    return x[:cfg.guard_size].to(device), y[:cfg.guard_size].to(device)


def _guard_accuracy(model: nn.Module, guard: tuple[torch.Tensor, torch.Tensor],
                    cfg: TrainConfig, epoch: int) -> float:
    x, y = guard
    # its own RNG stream, so the check does not shift the training randomness
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed * 1000 + epoch)
        # step 2.5 * eps / steps (Madry et al.) lets a short PGD still cross the whole ball
        x_adv = pgd_linf(model, x, y, eps=cfg.eps, alpha=min(1.0, 2.5 * cfg.eps / cfg.guard_steps),
                         steps=cfg.guard_steps)
    return _accuracy(model, x_adv, y)
