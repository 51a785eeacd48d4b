"""Training on several processes started by torchrun: launch checks, the process group,
sharded batches, batch norm over the global batch, and the few collectives training needs.

Launch (one machine, N processes; ``--batch-size`` is the GLOBAL batch, each process
trains on ``batch_size / N`` of it)::

    torchrun --standalone --nproc_per_node N -m roadshield.cli train --data D --out M \\
        --batch-size 128 --world-size N

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`read_launch_env` checks them before any work starts. Without them
the same command runs as one process. The backend is gloo on the CPU and NCCL on CUDA
(one GPU per process: ``cuda:LOCAL_RANK``).

Same results as one process: every rank walks the same seeded sequence of global
batches and keeps its contiguous share of each (:class:`ShardedBatchSampler`); the
augmentation of a global batch is drawn for the whole batch, so an example is cropped
and jittered alike whichever rank holds it; batch norm normalises with the statistics
of the global batch (``cloud_train.sync_norm``: torch's ``SyncBatchNorm`` on CUDA, a
gloo-capable equivalent on the CPU), and DDP averages the gradients. A
standard-trainer run of N processes therefore follows the one-process run with the same
global batch up to float rounding (summation order). Draws made inside a step -- dropout
masks, the random starts of attacks -- come from each rank's own generator, so runs
with them agree in distribution only.
"""

from __future__ import annotations

import gc
import inspect
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Sampler

from cloud_train.tensors import _BatchSampler, _BatchSet
from roadshield_base.errors import ConfigError

log = logging.getLogger(__name__)

LAUNCH_HINT = "launch with: torchrun --standalone --nproc_per_node N -m roadshield.cli train ..."


@dataclass(frozen=True)
class LaunchEnv:
    """What torchrun told this process; ``world_size == 1`` and ``launched False`` when the
    variables are absent (a plain single-process run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    launched: bool = False


def _env_int(env: Mapping[str, str], key: str) -> int:
    raw = env[key]
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {key}={raw!r} is not an integer",
                          LAUNCH_HINT) from None


def read_launch_env(environ: Mapping[str, str] | None = None,
                    expected_world_size: int | None = None) -> LaunchEnv:
    """Read and check RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.

    ``expected_world_size`` (the CLI's ``--world-size``) must equal WORLD_SIZE, and asking
    for more than one process without torchrun's variables is an error. ConfigError names
    the variable and value at fault.
    """
    env = os.environ if environ is None else environ
    if expected_world_size is not None and (not isinstance(expected_world_size, int)
                                            or expected_world_size < 1):
        raise ConfigError(f"--world-size {expected_world_size!r} is not a process count",
                          "use an integer >= 1")
    present = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in env]
    if not present:
        if expected_world_size not in (None, 1):
            raise ConfigError(f"--world-size {expected_world_size} asks for several processes, "
                              "but WORLD_SIZE is not set: this process was not started by "
                              "torchrun", LAUNCH_HINT.replace("N", str(expected_world_size)))
        return LaunchEnv()
    missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k not in env]
    if missing:
        raise ConfigError(f"{', '.join(present)} set but {', '.join(missing)} missing",
                          LAUNCH_HINT)
    rank, world, local = (_env_int(env, k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if world < 1:
        raise ConfigError(f"WORLD_SIZE={world} is not a process count", LAUNCH_HINT)
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside 0..WORLD_SIZE-1 = 0..{world - 1}",
                          "every process needs a distinct rank below WORLD_SIZE; " + LAUNCH_HINT)
    local_world = _env_int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world
    if not 0 <= local < local_world:
        raise ConfigError(f"LOCAL_RANK={local} is outside 0..{local_world - 1}", LAUNCH_HINT)
    if expected_world_size is not None and expected_world_size != world:
        raise ConfigError(f"--world-size {expected_world_size} but torchrun started "
                          f"WORLD_SIZE={world} processes",
                          f"use --nproc_per_node {expected_world_size} (x nodes) or "
                          f"--world-size {world}")
    addr, port = env.get("MASTER_ADDR"), None
    if world > 1:
        if not addr or "MASTER_PORT" not in env:
            raise ConfigError("MASTER_ADDR / MASTER_PORT are not set for a multi-process run",
                              LAUNCH_HINT)
        port = _env_int(env, "MASTER_PORT")
        if not 0 < port < 65536:
            raise ConfigError(f"MASTER_PORT={port} is not a TCP port", "use 1..65535")
    return LaunchEnv(rank, world, local, addr, port, launched=True)


def check_global_batch(batch_size: int, world_size: int) -> int:
    """The per-process batch; ConfigError unless ``batch_size`` splits evenly."""
    if batch_size < world_size or batch_size % world_size:
        raise ConfigError(f"global batch size {batch_size} does not split evenly over "
                          f"{world_size} processes",
                          f"use a multiple of {world_size}, e.g. "
                          f"{max(1, round(batch_size / world_size)) * world_size}")
    return batch_size // world_size


def rank_device(device: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """This process's device: ``auto``/``cuda`` -> ``cuda:LOCAL_RANK`` when CUDA is present,
    ``auto`` -> CPU otherwise; ``cuda:N`` only for a single process."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not device.startswith("cuda") and device != "auto":
        raise ConfigError(f"device {device!r} is not auto, cpu, cuda or cuda:N", "use one of them")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available",
                          "use --device cpu (or auto)")
    if device.startswith("cuda:"):
        if world_size > 1:
            raise ConfigError(f"device {device!r} would put all {world_size} processes on "
                              "one GPU", "use --device cuda: each process takes cuda:LOCAL_RANK")
        return torch.device(device)
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} "
                          "GPU(s) are visible", "start at most one process per GPU")
    return torch.device("cuda", local_rank)


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` -> NCCL on CUDA, gloo on the CPU; NCCL without CUDA is a ConfigError."""
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ConfigError(f"backend nccl needs CUDA, but this process trains on {device}",
                              "use --backend gloo (or auto) on the CPU")
        if not dist.is_nccl_available():
            raise ConfigError("backend nccl requested but this torch build has no NCCL",
                              "install a CUDA build of torch or use --backend gloo")
        return "nccl"
    if backend == "gloo":
        return "gloo"
    raise ConfigError(f"unknown process-group backend {backend!r}", "use auto, gloo or nccl")


def rank_seed(seed: int, rank: int) -> int:
    """Seed of rank ``rank``'s global generator: ``seed`` itself on rank 0 (so one process
    draws exactly what a non-distributed run draws), independent streams elsewhere."""
    return seed if rank == 0 else int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


@dataclass
class DistContext:
    """Where this process stands; a world of 1 makes every collective a no-op."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over the ranks (a new tensor; ``t`` itself is left alone)."""
        out = t.detach().clone()
        if self.distributed:
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def gather_objects(self, obj: Any) -> list[Any]:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank (picklable objects)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_ok(self, ok: bool) -> bool:
        """True when ``ok`` holds on every rank: lets all ranks fail together when one does."""
        if not self.distributed:
            return ok
        flag = torch.tensor([1 if ok else 0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def check_same(self, values: Sequence[Any], what: str) -> None:
        """ConfigError on every rank unless ``values`` are equal on all of them."""
        seen = self.gather_objects(list(values))
        bad = [r for r, v in enumerate(seen) if v != seen[0]]
        if bad:
            raise ConfigError(f"{what} differs between processes: rank 0 has {seen[0]}, rank "
                              f"{bad[0]} has {seen[bad[0]]}",
                              "give every process the same data and the same settings")


def setup(device: str = "auto", backend: str = "auto", expected_world_size: int | None = None,
          batch_size: int | None = None, environ: Mapping[str, str] | None = None,
          timeout_s: float = 1800.0) -> DistContext:
    """Check the launch and, for several processes, join the process group.

    All checks (variables, ``--world-size``, global batch divisibility, device, backend)
    run before the group is initialised. ``environ`` defaults to ``os.environ``.
    """
    env = read_launch_env(environ, expected_world_size)
    if batch_size is not None:
        check_global_batch(batch_size, env.world_size)
    dev = rank_device(device, env.local_rank, env.world_size)
    name = resolve_backend(backend, dev)  # checked even for one process: nccl needs CUDA
    if env.world_size == 1:
        return DistContext(device=dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if not dist.is_initialized():
        # env:// joins torchrun's own rendezvous store (MASTER_PORT may be the agent's)
        kwargs: dict[str, Any] = {"init_method": "env://" if environ is None
                                  else f"tcp://{env.master_addr}:{env.master_port}"}
        if name == "nccl" and "device_id" in inspect.signature(dist.init_process_group).parameters:
            kwargs["device_id"] = dev  # binds the communicator to this rank's GPU now
        dist.init_process_group(name, rank=env.rank, world_size=env.world_size,
                                timeout=timedelta(seconds=timeout_s), **kwargs)
        owns = True
    elif dist.get_world_size() != env.world_size or dist.get_rank() != env.rank:
        raise ConfigError(f"a process group of {dist.get_world_size()} is already running "
                          f"as rank {dist.get_rank()}, the environment says rank {env.rank} "
                          f"of {env.world_size}", "start one training per process group")
    if env.rank == 0:
        log.info("process group: %d processes, backend %s, rank 0 on %s", env.world_size,
                 name, dev)
    return DistContext(env.rank, env.world_size, env.local_rank, dev, name, owns)


def teardown(ctx: DistContext) -> None:
    """Leave the process group if ``ctx`` created it."""
    if ctx.owns_group and dist.is_initialized():
        # a DistributedDataParallel wrapper left in a reference cycle would keep the group
        # alive until interpreter exit, where gloo's worker threads abort the process
        # (SIGABRT, "terminate called without an active exception"): free it first
        gc.collect()
        dist.destroy_process_group()
        ctx.owns_group = False


@contextmanager
def session(**kw: Any) -> Iterator[DistContext]:
    """:func:`setup` ... :func:`teardown`, also when the body raises."""
    ctx = setup(**kw)
    try:
        yield ctx
    finally:
        teardown(ctx)


# ---- batches ------------------------------------------------------------------------------

def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of an ``n``-example global batch that rank ``rank`` trains on:
    contiguous shares whose sizes differ by at most one (the first ``n % world`` get one
    more), in rank order, so the shares concatenate back to the global batch."""
    q, r = divmod(n, world_size)
    lo = rank * q + min(rank, r)
    return lo, lo + q + (1 if rank < r else 0)


class ShardedBatchSampler(Sampler):
    """Rank ``rank``'s share of every global batch of a ``make_loader`` batch sampler.

    Every rank iterates the same seeded global sampler and yields ``(indices, seed, rows,
    total)``: its share of the global batch's indices, the batch's augmentation seed, the
    share's rows in the global batch and the global batch size. A trailing global batch
    with fewer examples than ranks cannot give each rank an example and is skipped.
    """

    def __init__(self, base: _BatchSampler, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside 0..{world_size - 1}", LAUNCH_HINT)
        self.base, self.rank, self.world_size = base, rank, world_size

    def global_batch_sizes(self) -> list[int]:
        """Sizes of the global batches this sampler yields shares of, in order."""
        full, rest = divmod(self.base.n, self.base.batch_size)
        sizes = [self.base.batch_size] * full
        if rest and not self.base.drop_last:
            sizes.append(rest)
        return [s for s in sizes if s >= self.world_size]

    def __len__(self) -> int:
        return len(self.global_batch_sizes())

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, torch.Tensor, int]]:
        for idx, seed in self.base:
            n = len(idx)
            if n < self.world_size:
                continue  # the base still drew its seed: the stream stays aligned
            lo, hi = shard_bounds(n, self.rank, self.world_size)
            yield idx[lo:hi], seed, torch.arange(lo, hi), n


def shard_loader(loader: DataLoader, rank: int, world_size: int) -> DataLoader:
    """A loader over the same data yielding rank ``rank``'s share of each global batch of
    ``loader`` (built by ``cloud_train.tensors.make_loader``); the two share one sampler
    generator, so iterating either advances the other."""
    if not isinstance(loader.dataset, _BatchSet) or not isinstance(loader.sampler, _BatchSampler):
        raise ConfigError("training on several processes needs a loader built by "
                          "cloud_train.tensors.make_loader",
                          "build the loader with make_loader(images, labels, batch_size=...)")
    sampler = ShardedBatchSampler(loader.sampler, rank, world_size)
    skipped = len(loader.sampler) - len(sampler)
    if skipped and rank == 0:
        log.warning("the last global batch has fewer examples than the %d processes and is "
                    "skipped every epoch", world_size)
    return DataLoader(loader.dataset, sampler=sampler, batch_size=None,
                      num_workers=loader.num_workers,
                      persistent_workers=loader.num_workers > 0, pin_memory=loader.pin_memory)


def sampler_generator(loader: DataLoader) -> torch.Generator | None:
    """The generator that orders ``loader``'s batches, when it has its own."""
    sampler = loader.sampler
    base = getattr(sampler, "base", sampler)
    gen = getattr(base, "gen", None)
    return gen if isinstance(gen, torch.Generator) else None


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """``model`` itself for one process, else DistributedDataParallel around it.

    Buffers are not re-broadcast before each forward: with synchronised batch norm every
    rank computes the same running statistics, and the initial state is broadcast once.
    """
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    kwargs: dict[str, Any] = {}
    if ctx.device.type == "cuda":
        kwargs["device_ids"] = [ctx.device.index]
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    kwargs["forward_sync_buffers" if "forward_sync_buffers" in params
           else "broadcast_buffers"] = False
    return DistributedDataParallel(model, **kwargs)
