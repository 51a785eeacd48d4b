"""The training loop behind ``cloud_train.train.train``: set-up (devices, sharding, DDP,
precision, resumption), one optimisation pass per epoch, the per-epoch checks, and the
training state of ``cloud_train.train_state`` written after an epoch or put back before
the next. Imported by ``train()`` when it runs (this module imports ``cloud_train.train``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from cloud_train import train_checks
from cloud_train.distributed import (
    DistContext,
    rank_seed,
    sampler_generator,
    shard_loader,
    wrap_model,
)
from cloud_train.sync_norm import sync_batchnorm, unsync_batchnorm
from cloud_train.train import (
    _TRAINERS,
    EpochStats,
    StepFn,
    TrainConfig,
    TrainHistory,
    _one_cycle,
    eps_at,
    resolve_device,
    resolve_precision,
)
from cloud_train.train_state import (
    TrainState,
    capture_rng,
    check_resumable,
    load_train_state,
    model_identity,
    restore_rng,
    save_train_state,
)
from roadshield_base.errors import ConfigError, RoadshieldError

log = logging.getLogger("cloud_train.train")


def run_epoch(net: nn.Module, loader: DataLoader, step: StepFn, cfg: TrainConfig,
              opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
              scaler: torch.amp.GradScaler, ctx: DistContext, epoch: int, steps_per_epoch: int,
              amp: bool, channels_last: bool, progress: bool) -> EpochStats:
    """One pass over ``loader`` (this rank's shares when distributed); figures are summed
    over the ranks, so every rank returns the same EpochStats."""
    device = ctx.device
    # a rank's share of a global batch is weighted by its size, so that DDP's average of
    # the per-rank mean losses is the mean over the global batch, uneven shares included
    sizes = loader.sampler.global_batch_sizes() if ctx.distributed else None  # type: ignore
    fmt = torch.channels_last if channels_last else torch.preserve_format
    net.train()
    t0 = time.perf_counter()
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    bar = tqdm(loader, desc=f"{cfg.trainer} epoch {epoch}/{cfg.epochs}",
               disable=not (progress and ctx.is_main), leave=True, dynamic_ncols=True)
    for i, (x, y) in enumerate(bar):
        x = x.to(device, non_blocking=True, memory_format=fmt)
        y = y.to(device, non_blocking=True)
        autocast = torch.autocast(device.type, dtype=torch.float16) if amp \
            else contextlib.nullcontext()
        with autocast:
            loss, logits = step(net, x, y, cfg, eps_at(cfg, sched.last_epoch, steps_per_epoch))
        n = torch.tensor(float(len(y)), dtype=torch.float64, device=device)
        figures = ctx.all_reduce_sum(torch.stack([
            loss.detach().double() * n, (logits.detach().argmax(1) == y).sum().double(), n]))
        if not bool(torch.isfinite(figures[0])):  # the same verdict on every rank
            raise ConfigError(f"training diverged at epoch {epoch} (loss "
                              f"{float(figures[0] / figures[2])})",
                              f"lower the learning rate (now {cfg.lr})")
        if sizes is not None and len(y) * ctx.world_size != sizes[i]:
            loss = loss * (len(y) * ctx.world_size / sizes[i])
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        totals += figures
        if not bar.disable:
            loss_sum, hits, seen = totals.tolist()
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{hits / seen:.3f}")
    bar.close()
    loss_sum, hits, seen = totals.tolist()
    return EpochStats(epoch, loss_sum / seen, hits / seen, opt.param_groups[0]["lr"],
                      time.perf_counter() - t0)


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def write_state(path: Any, ctx: DistContext, *, epoch: int, cfg: TrainConfig, model: nn.Module,
                opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
                scaler: torch.amp.GradScaler, history: TrainHistory,
                kept_state: dict[str, torch.Tensor] | None, best_guard: float,
                loader: DataLoader, steps_per_epoch: int) -> None:
    """Rank 0 writes the state after ``epoch``; every rank returns once it is on disk, or
    every rank raises if rank 0 could not write it."""
    rng = ctx.gather_objects(capture_rng(ctx.device))  # every rank's generators
    error: BaseException | None = None
    if ctx.is_main:
        gen = sampler_generator(loader)
        state = TrainState(
            epoch=epoch, config=cfg.to_dict(), model_meta=model_identity(model),
            model=_cpu(model.state_dict()), optimizer=opt.state_dict(),
            scheduler=sched.state_dict(), scaler=scaler.state_dict(),
            history=history.to_dict(), kept_state=None if kept_state is None else _cpu(kept_state),
            best_guard=best_guard, rng=rng, sampler_rng=None if gen is None else gen.get_state(),
            steps_per_epoch=steps_per_epoch, world_size=ctx.world_size)
        try:
            save_train_state(state, path)
        except (OSError, RoadshieldError) as err:
            error = err
    if not ctx.all_ok(error is None):
        raise ConfigError(f"could not write the training state {path}"
                          + (f": {error}" if error is not None else " (rank 0 failed)"),
                          "check that the folder is writable and has space") from error


def restore_state(state: TrainState, ctx: DistContext, model: nn.Module,
                  opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
                  scaler: torch.amp.GradScaler, history: TrainHistory, amp: bool
                  ) -> tuple[dict[str, torch.Tensor] | None, float]:
    """Load weights, optimizer, scheduler, scaler and history from ``state`` (checked by
    ``check_resumable``); returns ``(kept_state, best_guard)``."""
    model.load_state_dict(state.model)
    opt.load_state_dict(state.optimizer)
    sched.load_state_dict(state.scheduler)
    if amp and state.scaler:  # a state from a float32 run has no scale yet: start afresh
        scaler.load_state_dict(state.scaler)
    history.epochs = [EpochStats(**e) for e in state.history["epochs"]]
    history.kept_epoch = state.history.get("kept_epoch")
    history.resumed_from = state.epoch
    kept = None if state.kept_state is None else copy.deepcopy(state.kept_state)
    return kept, float(state.best_guard)


def restore_streams(state: TrainState, ctx: DistContext, loader: DataLoader) -> None:
    """Put back this rank's random generators and the loader's batch order generator;
    call it last before the first resumed epoch."""
    gen = sampler_generator(loader)
    if gen is not None and state.sampler_rng is not None:
        gen.set_state(state.sampler_rng)
    if state.world_size == ctx.world_size:
        restore_rng(state.rng[ctx.rank], ctx.device)
    elif ctx.is_main:
        log.warning("the training state was written by %d process(es), this run has %d: the "
                    "batch order continues exactly, the per-process random streams (dropout, "
                    "attack starts) start afresh", state.world_size, ctx.world_size)


def run_training(model: nn.Module, train_loader: DataLoader, cfg: TrainConfig,
                 val: tuple[Any, Any] | None, progress: bool, *, dist: DistContext | None,
                 resume: TrainState | str | Path | None, state_path: str | Path | None,
                 stop_after_epoch: int | None, teacher: nn.Module | None = None
                 ) -> TrainHistory:
    """The body of ``cloud_train.train.train`` (see there)."""
    if dist is None and torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        log.warning("a process group of %d is running but train() got no dist context: "
                    "this process trains alone (pass dist=cloud_train.distributed.setup())",
                    torch.distributed.get_world_size())
    ctx = dist if dist is not None else DistContext(device=resolve_device(cfg.device))
    trainer = _TRAINERS[cfg.trainer]
    step = trainer.step
    if trainer.needs_teacher != (teacher is not None):
        raise ConfigError(f"trainer {cfg.trainer!r} "
                          + ("needs a teacher model" if trainer.needs_teacher
                             else "takes no teacher model"),
                          "distillation trainers run through `roadshield distill train "
                          "--teacher ...`; the others through `roadshield train`")
    if len(train_loader) == 0:
        raise ConfigError("the training loader yields no batches",
                          "check the dataset size against batch_size and drop_last")
    device = ctx.device
    amp, channels_last = resolve_precision(cfg, device)
    loader = shard_loader(train_loader, ctx.rank, ctx.world_size) if ctx.distributed \
        else train_loader
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ConfigError(f"no global batch holds {ctx.world_size} examples",
                          "use more data or fewer processes")
    if stop_after_epoch is not None and (not isinstance(stop_after_epoch, int)
                                         or stop_after_epoch < 1):
        raise ConfigError(f"stop_after_epoch={stop_after_epoch!r}", "use None or an epoch >= 1")
    state = resume if isinstance(resume, TrainState) or resume is None \
        else load_train_state(resume)
    if state is not None:
        check_resumable(state, model, cfg.to_dict(), steps_per_epoch)
    ctx.check_same([cfg.to_dict(), steps_per_epoch, None if state is None else state.epoch],
                   "the training config, batches per epoch or resumed epoch")
    if ctx.is_main:
        log.info("training %s on %s x %d process(es): mixed precision %s, channels-last %s",
                 cfg.trainer, device, ctx.world_size, "on" if amp else "off",
                 "on" if channels_last else "off")
    torch.manual_seed(rank_seed(cfg.seed, ctx.rank))
    model.to(device)
    if teacher is not None:
        teacher = teacher.to(device).eval().requires_grad_(False)
        step = functools.partial(trainer.step, teacher=teacher)
    if channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    val_xy = train_checks.as_xy(val, device) if val is not None else None
    # from the unsharded loader, before its order is restored: the same batch on every rank
    guard = train_checks.guard_batch(cfg.guard_size if trainer.adversarial else 0,
                                     train_loader, val_xy, device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _one_cycle(cfg.epochs * steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    history = TrainHistory(trainer=cfg.trainer, device=str(device), world_size=ctx.world_size,
                           amp=amp, channels_last=channels_last)
    kept_state: dict[str, torch.Tensor] | None = None
    best_guard = -1.0
    if state is not None:
        kept_state, best_guard = restore_state(state, ctx, model, opt, sched, scaler,
                                               history, amp)
    if ctx.distributed:
        sync_batchnorm(model, device)
    net = wrap_model(model, ctx)
    if state is not None:
        restore_streams(state, ctx, train_loader)
    first = 1 if state is None else state.epoch + 1
    last = cfg.epochs if stop_after_epoch is None else min(cfg.epochs, stop_after_epoch)
    try:
        for epoch in range(first, last + 1):
            stats = run_epoch(net, loader, step, cfg, opt, sched, scaler, ctx, epoch,
                              steps_per_epoch, amp, channels_last, progress)
            t1 = time.perf_counter()
            if val_xy is not None:
                stats.val_acc = train_checks.accuracy(model, *val_xy, ctx)
            if guard is not None:
                stats.guard_pgd_acc = train_checks.guard_accuracy(
                    model, guard, cfg, epoch, ctx,
                    trainer.guard_attack or train_checks.pgd_guard_attack)
                if stats.guard_pgd_acc >= best_guard - cfg.guard_tolerance:
                    kept_state = copy.deepcopy(model.state_dict())
                    history.kept_epoch = epoch
                best_guard = max(best_guard, stats.guard_pgd_acc)
            stats.eval_seconds = time.perf_counter() - t1
            history.epochs.append(stats)
            if ctx.is_main:
                log.info("%s epoch %d/%d: loss %.4f, train acc %.3f, val acc %s, guard PGD acc "
                         "%s, %.1f s", cfg.trainer, epoch, cfg.epochs, stats.loss,
                         stats.train_acc, "-" if stats.val_acc is None else f"{stats.val_acc:.3f}",
                         "-" if stats.guard_pgd_acc is None else f"{stats.guard_pgd_acc:.3f}",
                         stats.seconds)
            if state_path is not None:
                write_state(state_path, ctx, epoch=epoch, cfg=cfg, model=model, opt=opt,
                            sched=sched, scaler=scaler, history=history, kept_state=kept_state,
                            best_guard=best_guard, loader=train_loader,
                            steps_per_epoch=steps_per_epoch)
    finally:
        del net  # drops DDP's hooks on the parameters
        if ctx.distributed:
            unsync_batchnorm(model)
    history.completed = last == cfg.epochs
    if history.completed:
        if kept_state is not None and history.kept_epoch != cfg.epochs:
            if ctx.is_main:
                log.info("restoring the weights of epoch %d (best guard PGD accuracy)",
                         history.kept_epoch)
            model.load_state_dict(kept_state)
        if history.kept_epoch is None:
            history.kept_epoch = cfg.epochs
    elif ctx.is_main:
        log.info("stopped after epoch %d of %d%s", last, cfg.epochs,
                 f"; continue with resume={state_path}" if state_path else "")
    model.eval()
    return history
