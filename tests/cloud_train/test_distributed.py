"""Training on several processes: two gloo processes on the CPU must train the model one
process trains with the same global batch; the batch sharding, the launch checks and the
batch norm over the global batch are also checked on their own."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from toy_data import toy_shapes

from cloud_train import train_loop
from cloud_train.checkpoint import load_checkpoint
from cloud_train.distributed import (
    DistContext,
    ShardedBatchSampler,
    check_global_batch,
    rank_device,
    read_launch_env,
    resolve_backend,
    setup,
    shard_bounds,
    shard_loader,
    teardown,
)
from cloud_train.models import create_model
from cloud_train.render import render_dataset
from cloud_train.sync_norm import GlobalBatchNorm, sync_batchnorm, unsync_batchnorm
from cloud_train.tensors import make_loader
from cloud_train.train import TrainConfig, train
from cloud_train.train_state import load_train_state
from roadshield_base.errors import ConfigError

#: 8 full global batches of 32 and a last one of 27, which splits 14 / 13 over two ranks
N_TRAIN, BATCH, EPOCHS = 283, 32, 2
#: two ranks sum their gradients in another order than one process does: the weights differ
#: by ~1e-8 per SGD step, until a rounding difference flips a ReLU or max-pool decision and
#: the gap jumps; measured here after 2 epochs: 7.0e-05 (1-process threads = 1). Per-rank
#: batch norm (no synchronisation), the nearest wrong implementation, is 0.36 away.
ATOL = 5e-4


def _env(**kw: object) -> dict[str, str]:
    base = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29500"}
    return {k: str(v) for k, v in {**base, **kw}.items() if v is not None}


_ENV = _env()


def _data() -> tuple:
    x, y = toy_shapes(N_TRAIN, seed=30)
    xv, yv = toy_shapes(100, seed=31)
    return x, y, xv, yv


def _fit(ctx: DistContext | None, epochs: int = EPOCHS, trainer: str = "standard",
         **kw) -> tuple[torch.nn.Module, dict]:
    x, y, xv, yv = _data()
    torch.manual_seed(0)
    # no dropout: its masks are drawn per rank, so only a model without it can match bit
    # for bit (see cloud_train.distributed)
    model = create_model("signnet_tiny", 4, dropout=0.0)
    cfg = TrainConfig(trainer=trainer, epochs=epochs, batch_size=BATCH, device="cpu",
                      eps=16 / 255, guard_size=64)
    loader = make_loader(x, y, BATCH, shuffle=True, augment=True, seed=0)
    history = train(model, loader, cfg, val=(xv, yv), progress=False, dist=ctx, **kw)
    return model, history.to_dict()


def _check_global_batchnorm(ctx: DistContext) -> None:
    """Forward and input/weight gradients of GlobalBatchNorm on this rank's share match
    nn.BatchNorm2d on the whole batch."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(10, 3, 4, 4, generator=gen) * 2 + 1
    weight = torch.randn(3, generator=gen)
    ref = torch.nn.BatchNorm2d(3)
    mine = GlobalBatchNorm(3)
    for bn in (ref, mine):
        bn.weight.data.copy_(weight)
    xr = x.clone().requires_grad_(True)
    expected = ref(xr)  # one forward: each one in training mode moves the running stats
    (expected * torch.arange(10.0).view(10, 1, 1, 1)).sum().backward()
    lo, hi = shard_bounds(10, ctx.rank, ctx.world_size)
    xs = x[lo:hi].clone().requires_grad_(True)
    out = mine(xs)
    (out * torch.arange(float(lo), float(hi)).view(-1, 1, 1, 1)).sum().backward()
    torch.testing.assert_close(out, expected[lo:hi].detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xs.grad, xr.grad[lo:hi], atol=1e-5, rtol=1e-5)
    # DDP sums parameter gradients over the ranks: do it by hand here
    grad = ctx.all_reduce_sum(mine.weight.grad)
    torch.testing.assert_close(grad, ref.weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mine.running_var, ref.running_var, atol=1e-6, rtol=1e-6)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    env = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    ctx = setup(device="cpu", expected_world_size=world, batch_size=BATCH, environ=env)
    try:
        assert ctx.distributed and ctx.backend == "gloo" and ctx.rank == rank
        _check_global_batchnorm(ctx)
        model, history = _fit(ctx)
        assert type(model.features[0][1]) is torch.nn.BatchNorm2d  # swapped back
        stopped, _ = _fit(ctx, stop_after_epoch=1, state_path=f"{out}/state")
        resumed, resumed_history = _fit(ctx, resume=f"{out}/state", state_path=f"{out}/state")
        fast, fast_history = _fit(ctx, epochs=1, trainer="fast_at")
        # the control: per-rank batch-norm statistics, as plain DDP would have them
        real_sync = train_loop.sync_batchnorm
        train_loop.sync_batchnorm = lambda model, device: 0
        try:
            unsynced, _ = _fit(ctx)
        finally:
            train_loop.sync_batchnorm = real_sync
        torch.save({"model": model.state_dict(), "history": history,
                    "resumed": resumed.state_dict(), "resumed_history": resumed_history,
                    "fast_history": fast_history, "unsynced": unsynced.state_dict()},
                   f"{out}/rank{rank}.pt")
    finally:
        teardown(ctx)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank ran
    try:
        single, single_history = _fit(None)
    finally:
        torch.set_num_threads(threads)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    return {"ranks": ranks, "single": single.state_dict(), "single_history": single_history,
            "state": out / "state"}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_two_processes_train_the_model_one_process_trains(two_ranks) -> None:
    r0, r1 = two_ranks["ranks"]
    diff = _max_diff(r0["model"], two_ranks["single"])
    assert diff <= ATOL, f"2-process vs 1-process max abs weight difference {diff:.3e}"
    # the tolerance tells right from wrong: without synchronised batch norm it fails
    assert _max_diff(r0["unsynced"], two_ranks["single"]) > 100 * ATOL
    assert _max_diff(r0["model"], r1["model"]) == 0.0  # the ranks agree exactly
    h1, h2 = two_ranks["single_history"], r0["history"]
    assert h2["world_size"] == 2 and h1["world_size"] == 1
    assert [e["val_acc"] for e in h2["epochs"]] == [e["val_acc"] for e in h1["epochs"]]
    assert [e["train_acc"] for e in h2["epochs"]] == [e["train_acc"] for e in h1["epochs"]]
    assert [e["loss"] for e in h2["epochs"]] == pytest.approx(
        [e["loss"] for e in h1["epochs"]], abs=1e-5)


def test_a_resumed_two_process_run_ends_where_the_straight_one_does(two_ranks) -> None:
    for rank in two_ranks["ranks"]:
        assert _max_diff(rank["resumed"], rank["model"]) == 0.0
        assert rank["resumed_history"]["resumed_from"] == 1
    state = load_train_state(two_ranks["state"])
    assert state.world_size == 2 and len(state.rng) == 2 and state.epoch == EPOCHS


def test_an_adversarial_trainer_runs_under_ddp_with_the_same_figures_on_every_rank(
        two_ranks) -> None:
    h0, h1 = (r["fast_history"] for r in two_ranks["ranks"])
    assert h0 == {**h1, "epochs": h0["epochs"], "seconds_per_epoch": h0["seconds_per_epoch"]}
    for a, b in zip(h0["epochs"], h1["epochs"], strict=True):
        assert {k: v for k, v in a.items() if "seconds" not in k} == \
            {k: v for k, v in b.items() if "seconds" not in k}
        assert 0.0 <= a["guard_pgd_acc"] <= 1.0 and a["loss"] > 0


@pytest.mark.slow
def test_the_train_command_runs_unchanged_under_torchrun(tmp_path) -> None:
    render_dataset(tmp_path / "d", train_per_class=3, test_per_class=1, progress=False)
    out = tmp_path / "m.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "roadshield.cli", "-q", "train", "--data", str(tmp_path / "d" / "gtsrb"),
           "--out", str(out), "--arch", "signnet_tiny", "--trainer", "standard", "--epochs", "1",
           "--batch-size", "16", "--world-size", "2", "--device", "cpu"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("checkpoint ") == 1 and "on 2 process(es)" in run.stdout  # rank 0
    _, meta = load_checkpoint(out)
    assert len(meta["class_names"]) == 14
    assert load_train_state(f"{out}.trainstate").world_size == 2


@pytest.mark.parametrize("argv,environ,match", [
    (["--world-size", "2"], {}, "not started by torchrun"),
    (["--world-size", "3"], _ENV, "WORLD_SIZE=2"),
    (["--batch-size", "33"], _ENV, "does not split evenly"),
    (["--backend", "nccl", "--device", "cpu"], {}, "nccl needs CUDA"),
    (["--resume", "missing.trainstate"], {}, "does not exist"),
    (["--amp", "on", "--device", "cpu"], {}, "amp=True needs a CUDA device"),
])
def test_the_train_command_refuses_bad_launches_before_loading_data(
        argv, environ, match, monkeypatch, tmp_path, capsys) -> None:
    from roadshield.cli import main

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    # --data does not exist: an error about it would mean the launch was not checked first
    code = main(["-q", "train", "--data", "absent", "--out", "m.safetensors", *argv])
    assert code == 2
    assert match in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# ---- sharding ----------------------------------------------------------------------------

@pytest.mark.parametrize("n,world", [(32, 2), (27, 2), (10, 3), (5, 5), (7, 4)])
def test_shares_are_contiguous_nearly_equal_and_cover_the_batch(n, world) -> None:
    bounds = [shard_bounds(n, r, world) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_sharded_loaders_rebuild_the_global_batches_exactly() -> None:
    x, y = toy_shapes(75, seed=3)
    def loader() -> torch.utils.data.DataLoader:
        return make_loader(x, y, 16, shuffle=True, augment=True, seed=7)
    whole = loader()
    shards = [shard_loader(loader(), r, 3) for r in range(3)]
    assert len(shards[0]) == len(whole) == 5  # 16, 16, 16, 16, 11
    assert shards[0].sampler.global_batch_sizes() == [16, 16, 16, 16, 11]
    for _ in range(2):  # the second epoch reshuffles alike
        for (xw, yw), *parts in zip(whole, *shards, strict=True):
            assert torch.equal(torch.cat([p[0] for p in parts]), xw)  # same crops and jitter
            assert torch.equal(torch.cat([p[1] for p in parts]), yw)


def test_a_last_batch_smaller_than_the_world_is_skipped_and_the_order_stays_aligned() -> None:
    x, y = toy_shapes(34, seed=3)  # batches of 16, 16, 2
    whole = list(make_loader(x, y, 16, shuffle=True, seed=1))
    base = make_loader(x, y, 16, shuffle=True, seed=1).sampler
    sampler = ShardedBatchSampler(base, 1, 3)
    assert len(sampler) == 2
    keys = list(sampler) + list(sampler)
    assert [len(k[0]) for k in keys] == [5, 5, 5, 5]
    assert keys[0][3] == 16 and torch.equal(keys[0][2], torch.arange(6, 11))
    assert torch.equal(torch.cat([whole[0][1][6:11], whole[1][1][6:11]]),
                       torch.as_tensor(y)[torch.cat([keys[0][0], keys[1][0]])])


def test_only_make_loader_loaders_can_be_sharded() -> None:
    ds = torch.utils.data.TensorDataset(torch.zeros(4, 3, 8, 8), torch.zeros(4))
    with pytest.raises(ConfigError, match="make_loader"):
        shard_loader(torch.utils.data.DataLoader(ds, batch_size=2), 0, 2)


# ---- launch checks -----------------------------------------------------------------------



def test_a_plain_launch_is_one_process() -> None:
    assert read_launch_env({}) == read_launch_env({}, expected_world_size=1)
    assert read_launch_env({}).world_size == 1
    env = read_launch_env(_env(RANK=1, LOCAL_RANK=1), expected_world_size=2)
    assert (env.rank, env.world_size, env.local_rank, env.master_port) == (1, 2, 1, 29500)


@pytest.mark.parametrize("environ,expected,match", [
    ({}, 2, "not started by torchrun"),
    (_env(), 4, "WORLD_SIZE=2"),
    (_env(RANK=2), None, "RANK=2 is outside"),
    (_env(RANK=-1), None, "RANK=-1"),
    (_env(WORLD_SIZE=0), None, "WORLD_SIZE=0"),
    (_env(RANK="one"), None, "not an integer"),
    (_env(LOCAL_RANK=None), None, "LOCAL_RANK missing"),
    (_env(LOCAL_RANK=3, LOCAL_WORLD_SIZE=2), None, "LOCAL_RANK=3"),
    (_env(MASTER_ADDR=None), None, "MASTER_ADDR"),
    (_env(MASTER_PORT=70000), None, "MASTER_PORT=70000"),
])
def test_bad_launches_are_refused_before_any_work(environ, expected, match) -> None:
    with pytest.raises(ConfigError, match=match):
        read_launch_env(environ, expected_world_size=expected)


def test_a_global_batch_must_split_evenly() -> None:
    assert check_global_batch(32, 2) == 16
    with pytest.raises(ConfigError, match="multiple of 3"):
        check_global_batch(32, 3)
    with pytest.raises(ConfigError, match="does not split"):
        setup(device="cpu", batch_size=30, environ=_env(WORLD_SIZE=4))
    with pytest.raises(ConfigError):
        check_global_batch(2, 4)


def test_nccl_and_cuda_without_a_gpu_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # a machine without CUDA, also where one answers (the check would otherwise skip there)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="nccl needs CUDA"):
        resolve_backend("nccl", torch.device("cpu"))
    for environ in (_env(), {}):  # several processes or one
        with pytest.raises(ConfigError, match="nccl needs CUDA"):
            setup(device="cpu", backend="nccl", environ=environ)
    with pytest.raises(ConfigError, match="CUDA is not available"):
        rank_device("cuda", 0, 2)
    assert resolve_backend("auto", torch.device("cpu")) == "gloo"
    with pytest.raises(ConfigError, match="unknown process-group backend"):
        resolve_backend("mpi2", torch.device("cpu"))


def test_batchnorm_swap_keeps_tensors_names_and_outputs() -> None:
    torch.manual_seed(0)
    model = create_model("signnet_tiny", 4, dropout=0.0)
    ref = copy.deepcopy(model)
    storage = {k: v.data_ptr() for k, v in model.state_dict().items()}
    assert sync_batchnorm(model, torch.device("cpu")) == 4
    assert isinstance(model.features[0][1], GlobalBatchNorm)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == storage
    # without a process group it is plain batch norm, in training and in eval mode
    x = torch.rand(6, 3, 32, 32)
    torch.testing.assert_close(model(x), ref(x), atol=0, rtol=0)
    torch.testing.assert_close(model.eval()(x), ref.eval()(x), atol=0, rtol=0)
    assert unsync_batchnorm(model) == 4
    assert type(model.features[0][1]) is torch.nn.BatchNorm2d
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == storage
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())
