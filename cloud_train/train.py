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
(or accuracy under the trainer's own ``guard_attack``, e.g. stickers for ROA)
is measured on a small fixed batch (from ``val`` when given, else the first
training batch, as in the paper's early-stopping check) and the weights of the
best epoch are kept. Training does not stop early; a patience-based early-stopping
scheme is left for later.

Determinism: ``torch.manual_seed(cfg.seed)`` is set at the start; with a seeded
loader (``cloud_train.tensors.make_loader``) and the same initial weights (seed torch
before ``create_model``), runs on the CPU repeat bit for bit. CUDA runs may differ in
the last bits (cuDNN picks kernels at run time).

Several processes (torchrun): pass ``dist`` (``cloud_train.distributed.setup``). The
loader's global batches are sharded over the ranks, batch norm uses global-batch
statistics, the model is wrapped in DistributedDataParallel, and the loss, accuracy,
validation and guard figures are summed over the ranks, so every rank holds the same
history; only rank 0 shows progress, logs and writes the training state. The loss of a
step must be a mean over its batch: a rank's loss is weighted by its share of the global
batch, so the averaged gradient is the gradient of the global-batch mean.

Resuming: with ``state_path`` rank 0 writes the training state
(``cloud_train.train_state``) atomically after every epoch; ``resume`` continues from
one, giving on the CPU the same final weights as an uninterrupted run, and
``stop_after_epoch`` ends a call early on purpose (time-boxed or preemptible jobs).

Mixed precision and channels-last (``amp``, ``channels_last``; None = auto = on with
CUDA, off on the CPU): the step, attacks inside trainers included, runs under
``torch.autocast`` (float16) with a GradScaler; asking for either on the CPU is a
ConfigError, not a silent no-op. Input-gradient attacks sum their loss over the batch
(``fast_at`` here, ``pgd_linf``, TRADES and ROA alike): per-example gradients keep their
size instead of shrinking by 1/B, where float16 would flush the small ones to zero and
the sign step would lose them. The per-epoch checks always run in float32.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from roadshield_base.errors import ConfigError

if TYPE_CHECKING:
    from cloud_train.distributed import DistContext
    from cloud_train.train_state import TrainState

log = logging.getLogger(__name__)

#: step(model, x, y, config, eps in force at this step) -> (loss to minimise, logits whose
#: argmax is reported as training accuracy: of the clean or of the attacked batch)
StepFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, "TrainConfig", float],
                  tuple[torch.Tensor, torch.Tensor]]
# the guard's attack: ``attack(model, x, y, cfg) -> x_adv``, in the trainer's threat model
GuardAttack = Callable[[nn.Module, torch.Tensor, torch.Tensor, "TrainConfig"], torch.Tensor]


@dataclass(frozen=True)
class Trainer:
    name: str
    step: StepFn
    adversarial: bool
    guard_attack: GuardAttack | None = None  # None: L-inf PGD at cfg.eps
    # a distillation step also takes ``teacher=`` (a frozen model in eval mode)
    needs_teacher: bool = False


_TRAINERS: dict[str, Trainer] = {}


def register_trainer(name: str, adversarial: bool, guard_attack: GuardAttack | None = None,
                     needs_teacher: bool = False) -> Callable[[StepFn], StepFn]:
    """Register a per-batch step ``step(model, x, y, cfg, eps) -> (loss, logits)``.

    ``needs_teacher``: the step is ``step(model, x, y, cfg, eps, teacher=...)``, a
    distillation step, and ``train`` must be given the teacher.

    ``guard_attack`` is the attack the catastrophic-overfitting guard measures an
    adversarial trainer against; None means L-inf PGD at ``cfg.eps``. A trainer with another
    threat model (e.g. stickers) passes its own, so the kept epoch is the one most robust to
    the attack it trains against."""
    def deco(fn: StepFn) -> StepFn:
        if name in _TRAINERS:
            raise ConfigError(f"trainer {name!r} is registered twice", "use a unique name")
        _TRAINERS[name] = Trainer(name, fn, adversarial, guard_attack, needs_teacher)
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

    ``masked`` (training for PatchCleanser): each example is covered by one grey square of
    ``mask_size`` pixels, or by two with probability ``mask_double_rate``; ``mask_size=None``
    takes the side of PatchCleanser's masks for the input size (14 px at 32 x 32, see
    ``cloud_train.robust_trainers.patchcleanser_mask_side``).

    ``amp`` (float16 autocast + GradScaler) and ``channels_last``: None = on with CUDA, off
    on the CPU; True on a CPU device is refused when training starts.
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
    mask_size: int | None = None
    mask_double_rate: float = 0.5
    kd_temperature: float = 1.0
    kd_alpha: float = 1.0
    amp: bool | None = None
    channels_last: bool | None = None

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
        need(self.mask_size is None or (is_int(self.mask_size) and self.mask_size >= 1),
             f"mask_size={self.mask_size!r}",
             "use None (PatchCleanser's mask side for the input size) or pixels >= 1")
        need(isinstance(self.mask_double_rate, (int, float))
             and not isinstance(self.mask_double_rate, bool)
             and 0.0 <= self.mask_double_rate <= 1.0,
             f"mask_double_rate={self.mask_double_rate!r}",
             "use a probability in [0, 1]; 0.5 mixes one and two masks evenly")
        need(isinstance(self.kd_temperature, (int, float)) and 0 < self.kd_temperature <= 100,
             f"kd_temperature={self.kd_temperature!r}",
             "use a softmax temperature in (0, 100]; 1 is RSLAD's, 30 ARD's on CIFAR-10")
        need(isinstance(self.kd_alpha, (int, float)) and 0.0 <= self.kd_alpha <= 1.0,
             f"kd_alpha={self.kd_alpha!r}",
             "use a weight in [0, 1] between the teacher's term and the labels' term")
        for flag in ("amp", "channels_last"):
            v = getattr(self, flag)
            need(v is None or isinstance(v, bool), f"{flag}={v!r}",
                 "use None (auto: on with CUDA), True or False")
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
    """Per-epoch figures of a run (the same on every rank). ``completed`` is False when the
    call stopped early (``stop_after_epoch``); ``resumed_from`` is the epoch a resumed run
    continued after."""

    trainer: str
    epochs: list[EpochStats] = field(default_factory=list)
    kept_epoch: int | None = None  # epoch whose weights the model holds at the end
    device: str = "cpu"
    world_size: int = 1
    amp: bool = False
    channels_last: bool = False
    completed: bool = True
    resumed_from: int | None = None

    @property
    def seconds_per_epoch(self) -> float:
        return float(np.mean([e.seconds for e in self.epochs])) if self.epochs else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"trainer": self.trainer, "kept_epoch": self.kept_epoch, "device": self.device,
                "world_size": self.world_size, "amp": self.amp,
                "channels_last": self.channels_last, "completed": self.completed,
                "resumed_from": self.resumed_from, "seconds_per_epoch": self.seconds_per_epoch,
                "epochs": [dataclasses.asdict(e) for e in self.epochs]}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available",
                          "use device='cpu' or 'auto'")
    return torch.device(name)


def resolve_precision(cfg: TrainConfig, device: torch.device) -> tuple[bool, bool]:
    """``(amp, channels_last)`` in force on ``device``: auto (None) follows CUDA; asking for
    either on another device is a ConfigError (they would be a slow no-op there)."""
    cuda = device.type == "cuda"
    for flag in ("amp", "channels_last"):
        if getattr(cfg, flag) is True and not cuda:
            raise ConfigError(f"{flag}=True needs a CUDA device, this run trains on {device}",
                              "leave it on auto (on with CUDA, off on the CPU) or set False")
    return (cuda if cfg.amp is None else cfg.amp,
            cuda if cfg.channels_last is None else cfg.channels_last)


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
    # summed: the sign is that of the mean's gradient, and under float16 autocast the
    # per-example gradients keep their size instead of underflowing at 1/B of it
    loss = F.cross_entropy(model(x + delta), y, reduction="sum")
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


def train(model: nn.Module, train_loader: DataLoader, cfg: TrainConfig,
          val: tuple[Any, Any] | None = None, progress: bool = True, *,
          dist: DistContext | None = None, resume: TrainState | str | Path | None = None,
          state_path: str | Path | None = None,
          stop_after_epoch: int | None = None, teacher: nn.Module | None = None
          ) -> TrainHistory:
    """Train ``model`` in place and return its per-epoch history.

    ``train_loader`` yields ``(x, y)``: x float32 [B, 3, H, W] RGB in [0, 1], y int64 [B]
    (see ``cloud_train.tensors.make_loader``; B is the global batch). ``val`` is
    ``(images, labels)`` with images as uint8 N x H x W x 3 RGB arrays or float NCHW
    tensors in [0, 1]; its clean accuracy is reported each epoch.

    ``dist``: this process's place in a torchrun launch (``cloud_train.distributed.setup``);
    None trains in this process alone on ``cfg.device``. ``state_path``: where rank 0
    writes the training state after every epoch. ``resume``: a state (or its path) to
    continue from; a state of another model, other settings or other data is refused
    before any work. ``stop_after_epoch``: return after that epoch (the history then says
    ``completed=False`` and the model holds that epoch's weights).

    ``teacher``: the model a distillation trainer (registered with ``needs_teacher``)
    learns from; it is frozen, kept in eval mode and moved to the training device.

    The model ends in eval mode on the device, holding the kept epoch's weights.
    """
    from cloud_train.train_loop import run_training

    return run_training(model, train_loader, cfg, val, progress, dist=dist, resume=resume,
                        state_path=state_path, stop_after_epoch=stop_after_epoch,
                        teacher=teacher)
