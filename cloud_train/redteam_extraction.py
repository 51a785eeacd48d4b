"""``roadshield redteam extraction``: stealing the sign model through the protected service.

The victim (``--victim model.onnx``, e.g. ``runs/latest/model.onnx`` from ``roadshield demo``;
without it a ``signnet`` trained on the synthetic signs at the scale, kept under
``OUT/work/victim``) is served by the real ``roadshield serve`` on loopback
(``cloud_train.redteam_extraction_client``), and every attacker spends its own API key over
HTTP. Two services, both with the DAWN watermark at its default rate:

- ``open``: PRADA off. Keys ``undefended`` (full softmax, no limits), ``label`` (label only),
  ``noise`` (noisy probabilities), ``budget`` (softmax under the scale's budget and token
  bucket);
- ``prada``: PRADA on with the service's settings (a ``--prada-delta`` may override the
  threshold). Keys ``prada`` (softmax; PRADA's alarm cuts it to labels), ``full`` (every
  layer: noisy probabilities, PRADA's cut, the budget and the token bucket), and the benign
  clients ``benign-0..9`` (top-1 answers, the budget, no rate limit).

Per defence two attacks (``cloud_train.redteam_extraction_attacks``), each with its own key
and the same starting clone: ``natural`` (Knockoff Nets' random strategy on natural crops
rendered from seeds the victim never trained on) and ``synthetic`` (Papernot et al.'s
Jacobian-based augmentation from 10 natural crops per class at the quick scale, lambda 0.1,
sign flipped every 3 rounds). Figures per run: the clone's agreement with the victim and
its clean accuracy on held-out natural crops against the queries answered, the queries to
90 % agreement (at the schedule's resolution: it doubles), when PRADA alarmed (the
service's own record), the client's refusals and waits, and the watermark's p-value on the
clone and on an independent model (the clone's architecture trained on the true labels of
separate crops), both replayed by the code behind ``roadshield watermark verify`` on the
watermark rows of that run's key (at most 200 queries). The benign clients (ten at the
quick scale) send crops of the synthetic world to the PRADA service: their false alarms,
and the clean accuracy of their answers against the victim's own. The watermark's cost to
honest users is also measured offline on ``cost_crops`` fresh crops with the service's key,
rate and labelling function (``watermark_sample``).

Targets (``cloud_train.redteam_extraction_report.check_targets``) and their reading are in
that module; exit 3 names each missed one.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from cloud_train.progress import step_ticker
from cloud_train.redteam_cli import check_scale_and_seed
from cloud_train.report_files import write_report
from roadshield_base.errors import ConfigError

SCHEMA = "roadshield.redteam.extraction/v1"
MODES = ("natural", "synthetic")
JACOBIAN_LAMBDA = 0.1  # Papernot et al. 2017's step
JACOBIAN_TAU = 3  # rounds between flips of the step's sign
WATERMARK_QUERIES = 200
# seeds of the rendered crops, apart from the victim's training seed (``seed``)
POOL_SEED, EVAL_SEED, INDEPENDENT_SEED, BENIGN_SEED, COST_SEED = (70_000, 80_000, 90_000,
                                                                  100_000, 110_000)
BENIGN_BATCH = 10  # a benign client's crops per request: PRADA tests every 10 images


@dataclass(frozen=True)
class Scale:
    """Sizes of one run; per-class counts are over the 14 synthetic classes.

    first_queries: the first point of the schedule and the Jacobian seeds (a multiple of
    14); max_queries: an unlimited attacker's plan; budget / rate / burst: the limited
    keys' budget (images), refill (images/s) and bucket; the benign clients each send
    ``budget`` crops under the same budget; batch: images per attacker request;
    cost_crops: the crops on which the watermark's cost is measured offline."""

    victim_arch: str
    victim_per_class: int
    victim_epochs: int
    victim_batch: int
    pool_per_class: int
    eval_per_class: int
    first_queries: int
    max_queries: int
    budget: int
    rate: float
    burst: float
    batch: int
    benign_clients: int
    cost_crops: int
    clone_arch: str
    epochs: int
    wall_cap_s: float


SCALES = {
    # tiny: the plumbing in seconds (a weak victim, too few queries for any target)
    "tiny": Scale(victim_arch="signnet_tiny", victim_per_class=30, victim_epochs=12,
                  victim_batch=32, pool_per_class=8, eval_per_class=8, first_queries=28,
                  max_queries=112, budget=48, rate=40.0, burst=32.0, batch=16,
                  benign_clients=3, cost_crops=500, clone_arch="signnet_tiny", epochs=6,
                  wall_cap_s=60.0),
    "quick": Scale(victim_arch="signnet", victim_per_class=300, victim_epochs=8,
                   victim_batch=128, pool_per_class=160, eval_per_class=40, first_queries=140,
                   max_queries=2240, budget=256, rate=20.0, burst=64.0, batch=64,
                   benign_clients=10, cost_crops=20_000,
                   clone_arch="signnet_tiny", epochs=12, wall_cap_s=300.0),
}


@dataclass(frozen=True)
class Defence:
    """One defence configuration: the service it runs on, the key's output policy, and
    whether the key has the scale's budget and token bucket."""

    name: str
    service: str
    policy: str
    limited: bool
    what: str


DEFENCES = (
    Defence("undefended", "open", "softmax", False, "full softmax, no limits"),
    Defence("label", "open", "label", False, "label only"),
    Defence("noise", "open", "noisy", False, "noisy probabilities"),
    Defence("budget", "open", "softmax", True, "softmax under a budget and a rate limit"),
    Defence("prada", "prada", "softmax", False, "softmax; PRADA's alarm cuts it to labels"),
    Defence("full", "prada", "noisy", True, "noise, PRADA's cut, budget and rate limit"),
)


def _victim(victim: str | None, work: Path, sc: Scale, scale: str, seed: int,
            tick: Any) -> tuple[Path, bool]:
    """The victim's ONNX file and whether this run trained it."""
    from cloud_train import pipeline

    if victim is not None:
        return Path(victim), False
    folder = work / "victim"
    onnx = folder / f"{scale}-seed{seed}.onnx"
    if not onnx.is_file():
        data = folder / f"data-{scale}-seed{seed}"
        if not (data / "gtsrb").is_dir():
            pipeline.synth_dataset(data, sc.victim_per_class, 1, seed=seed, progress=False)
        ckpt = folder / f"{scale}-seed{seed}.safetensors"
        pipeline.train_checkpoint(data, ckpt, arch=sc.victim_arch, trainer="standard",
                                  epochs=sc.victim_epochs, batch_size=sc.victim_batch,
                                  seed=seed, progress=False, lr=0.05, device="cpu")
        pipeline.export_checkpoint(ckpt, onnx)
    tick("victim trained")
    return onnx, True


def check_victim(path: Path) -> Any:
    """The victim's ModelInfo; ModelLoadError for a file that is not an exported model,
    ConfigError for one outside the synthetic sign world (classes, 32 px input)."""
    from cloud_train.signs import SYNTHETIC_CLASSES
    from edge_runtime.model_info import read_model_info

    info = read_model_info(path)
    if tuple(info.class_names) != tuple(SYNTHETIC_CLASSES) or info.input_size != 32:
        raise ConfigError(f"victim {path} classifies {len(info.class_names)} classes at "
                          f"{info.input_size} px; the red team's crops are the "
                          f"{len(SYNTHETIC_CLASSES)} synthetic classes at 32 px",
                          "pass a model trained on the synthetic signs (roadshield demo "
                          "writes runs/latest/model.onnx)")
    return info


def _services(sc: Scale, budget: int, prada_delta: float | None) -> list[Any]:
    from cloud_train.redteam_extraction_client import KeySpec, ServiceSpec

    def key(d: Defence, mode: str) -> KeySpec:
        if d.limited:
            return KeySpec(f"{d.name}-{mode}", d.policy, budget, sc.rate, sc.burst)
        return KeySpec(f"{d.name}-{mode}", d.policy)

    prada: dict[str, Any] = {} if prada_delta is None else {"prada_delta": prada_delta}
    benign = tuple(KeySpec(f"benign-{k}", "top1", budget) for k in range(sc.benign_clients))
    return [
        ServiceSpec("open", {"prada_enabled": False},
                    tuple(key(d, m) for d in DEFENCES if d.service == "open" for m in MODES)),
        ServiceSpec("prada", prada, tuple(key(d, m) for d in DEFENCES if d.service == "prada"
                                          for m in MODES) + benign)]


def _world(sc: Scale, seed: int) -> dict[str, np.ndarray]:
    """The attacker's pool (shuffled), the Jacobian seeds, the held-out evaluation crops
    and the independent model's training crops (uint8 N x 32 x 32 x 3, int labels)."""
    from cloud_train.ingest.attacks import render_images

    pool, pool_y = render_images(sc.pool_per_class, seed=POOL_SEED + seed, split="train")
    order = np.random.default_rng(seed).permutation(len(pool))
    pool, pool_y = pool[order], pool_y[order]
    per_class = sc.first_queries // len(np.unique(pool_y))
    seeds = np.concatenate([pool[pool_y == c][:per_class] for c in np.unique(pool_y)])
    xe, ye = render_images(sc.eval_per_class, seed=EVAL_SEED + seed, split="test")
    xi, yi = render_images(sc.pool_per_class, seed=INDEPENDENT_SEED + seed, split="train")
    return {"pool": pool, "seeds": seeds, "eval": xe, "eval_y": ye, "indep": xi,
            "indep_y": yi}


def _predict_fn(runner: Any) -> Any:
    info = runner.model_info

    def predict(x: np.ndarray) -> np.ndarray:
        logits = np.asarray(runner.infer({info.input_name: x})[info.output_name])
        return np.asarray(logits.argmax(axis=1), dtype=np.int64)

    return predict


def _labels_of(predict: Any, images_u8: np.ndarray) -> np.ndarray:
    x = images_u8.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    return np.concatenate([predict(x[i:i + 256]) for i in range(0, len(x), 256)])


def _attack(d: Defence, mode: str, svc: Any, info: Any, world: dict[str, np.ndarray],
            judge: Any, sc: Scale, seed: int) -> tuple[dict[str, Any], Any]:
    """One extraction run through ``svc`` with the key ``{defence}-{mode}``; returns its
    row and the clone."""
    from cloud_train.redteam_extraction_attacks import (
        Clone,
        CloneRecipe,
        jacobian,
        knockoff,
        queries_to,
        schedule,
    )
    from cloud_train.redteam_extraction_client import KeyClient

    key_id = f"{d.name}-{mode}"
    client = KeyClient(svc.url, svc.tokens[key_id], info.class_names, info.input_name,
                       wall_cap_s=sc.wall_cap_s)
    clone = Clone(CloneRecipe(sc.clone_arch, sc.epochs),
                  len(info.class_names), seed)
    t0 = time.perf_counter()
    try:
        if mode == "natural":
            curve = knockoff(client, world["pool"], schedule(sc.first_queries, sc.max_queries),
                             clone, judge, sc.batch)
        else:
            curve = jacobian(client, world["seeds"], sc.max_queries, clone, judge, sc.batch,
                             JACOBIAN_LAMBDA, JACOBIAN_TAU, np.random.default_rng(seed))
    finally:
        client.close()
    last = curve.points[-1]
    row = {"defence": d.name, "what": d.what, "mode": mode, "service": d.service,
           "key": key_id, "policy": d.policy, "limited": d.limited,
           "curve": curve.points, "queries": last["queries"],
           "agreement": last["agreement"], "accuracy": last["accuracy"],
           "queries_to_90": queries_to(curve, 0.90),
           "queries_to_70": queries_to(curve, 0.70),
           "stopped": curve.stopped or "plan spent",
           "soft_answers": clone.soft, "client": client.stats.as_dict(),
           "seconds": round(time.perf_counter() - t0, 2)}
    return row, clone


def _benign(svc: Any, info: Any, victim_predict: Any, sc: Scale, budget: int,
            seed: int) -> list[dict[str, Any]]:
    """The benign clients: each sends ``budget`` crops of random classes (rendered as the
    synthetic world renders its signs) in requests of ten; returns per client the crops'
    true classes, the answers' labels and the victim's own labels."""
    from cloud_train.redteam_extraction_attacks import AttackStopped
    from cloud_train.redteam_extraction_client import KeyClient
    from cloud_train.render import render_sign

    rows = []
    classes = len(info.class_names)
    for k in range(sc.benign_clients):
        rng = np.random.default_rng((BENIGN_SEED, seed, k))
        truth = rng.integers(classes, size=budget)
        crops = np.stack([render_sign(int(c), rng, info.input_size) for c in truth])
        client = KeyClient(svc.url, svc.tokens[f"benign-{k}"], info.class_names,
                           info.input_name, wall_cap_s=sc.wall_cap_s)
        served: list[np.ndarray] = []
        try:
            for i in range(0, len(crops), BENIGN_BATCH):
                served.append(client(crops[i:i + BENIGN_BATCH]).labels)
        except AttackStopped:
            pass  # counted: the client's stats say why, and fewer answers come back
        finally:
            client.close()
        answers = np.concatenate(served) if served else np.zeros(0, np.int64)
        own = _labels_of(victim_predict, crops)
        n = len(answers)
        rows.append({"client": f"benign-{k}", "sent": int(len(crops)), "answered": n,
                     "correct_served": int((answers == truth[:n]).sum()),
                     "correct_victim": int((own[:n] == truth[:n]).sum()),
                     "changed": int((answers != own[:n]).sum()),
                     "client_stats": client.stats.as_dict()})
    return rows


def _watermark_sample(folder: Path, predict: Any, info: Any, rate: float, n: int,
                      seed: int) -> dict[str, Any]:
    """The watermark's cost on ``n`` fresh crops of random classes: the selection and the
    wrong label come from the same function and key as the service's answers, so this is
    what honest users would be served, measured on more crops than the benign clients send
    (their own answers scatter by about sqrt(rate / answers) around the rate)."""
    from cloud_train.render import render_sign
    from serve.cli import read_watermark_key
    from serve.watermark import quantise, wrong_label

    key = read_watermark_key(str(folder / "secrets.json"))
    rng = np.random.default_rng((COST_SEED, seed))
    truth = rng.integers(len(info.class_names), size=n)
    crops = np.stack([render_sign(int(c), rng, info.input_size) for c in truth])
    own = _labels_of(predict, crops)
    served = own.copy()
    for i, crop in enumerate(crops.transpose(0, 3, 1, 2).astype(np.float32) / 255.0):
        w = wrong_label(key, info.input_size, quantise(crop), int(own[i]),
                        len(info.class_names), rate)
        if w is not None:
            served[i] = w
    return {"crops": n, "seed": [COST_SEED, seed], "marked": int((served != own).sum()),
            "correct_victim": int((own == truth).sum()),
            "correct_served": int((served == truth).sum())}


def _export(model: Any, class_names: Any, path: Path) -> Path:
    from distill.export import export_onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    return export_onnx(model, class_names, path, features=False)


def _verify(folder: Path, key_id: str, suspect: Path) -> dict[str, Any]:
    """``roadshield watermark verify --suspect SUSPECT --dir FOLDER --client KEY_ID
    --max-queries 200``, in process: the same key file, rows, rate and verdict."""
    from edge_runtime.runners.registry import create_runner
    from serve.cli import read_watermark_key
    from serve.config import MAX_WATERMARK_RATE
    from serve.server import open_store
    from serve.watermark import verify

    key = read_watermark_key(str(folder / "secrets.json"))
    store = open_store(folder)
    try:
        rows = store.watermark_rows(key_id)
    finally:
        store.close()
    with create_runner("auto", suspect) as runner:
        verdict = verify(rows, key, runner.model_info.num_classes, _predict_fn(runner),
                         rate=MAX_WATERMARK_RATE, max_queries=WATERMARK_QUERIES)
    return {"rows": len(rows), **verdict.as_dict()}


def run_extraction_redteam(out_dir: str | os.PathLike[str], scale: str = "quick",
                           seed: int = 0, victim: str | None = None, budget: int | None = None,
                           prada_delta: float | None = None,
                           progress: bool = True) -> dict[str, Any]:
    """Run every defence against both extraction attacks through the real service; write
    redteam_extraction.{json,md,png} into ``out_dir`` and return the result. The services'
    state folders (keys, PRADA's record, the watermark rows) stay under OUT/work/serve and
    the clones under OUT/work/clones, so ``roadshield watermark verify`` can re-check."""
    import torch

    sc, seed = check_scale_and_seed(scale, seed, SCALES)
    budget = sc.budget if budget is None else int(budget)
    if budget < sc.batch:
        raise ConfigError(f"budget {budget} is below one request of {sc.batch} images",
                          f"pass --budget >= {sc.batch}")
    from serve.config import config_from_dict

    for spec in _services(sc, budget, prada_delta):  # a bad setting fails before any work
        config_from_dict(spec.settings, f"the {spec.name} service's settings")
    if victim is not None:
        check_victim(Path(victim))
    # one torch thread: the services answer on the other core, and the clones' small
    # batches on two threads of a busy 2-core machine mostly wait on each other (a 6-epoch
    # fit of 224 crops: 0.9 s on one thread, 15.6 s on two, measured under load)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(Path(out_dir), scale, sc, seed, victim, budget, prada_delta, progress)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, scale: str, sc: Scale, seed: int, victim: str | None, budget: int,
         prada_delta: float | None, progress: bool) -> dict[str, Any]:
    from cloud_train.redteam_extraction_attacks import Answer, Clone, CloneRecipe, Judge
    from cloud_train.redteam_extraction_client import (
        key_usage,
        prada_record,
        running_services,
    )
    from cloud_train.redteam_extraction_report import chart_png, check_targets, markdown
    from edge_runtime.runners.registry import create_runner
    from serve.config import config_from_dict

    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    steps = 3 + len(DEFENCES) * len(MODES) + 3
    t0 = time.perf_counter()
    started = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    with step_ticker(steps, "redteam extraction", progress) as tick:
        victim_path, trained = _victim(victim, work, sc, scale, seed, tick)
        info = check_victim(victim_path)
        if not trained:
            tick("victim given")
        world = _world(sc, seed)
        specs = _services(sc, budget, prada_delta)
        with create_runner("auto", victim_path) as runner:
            predict = _predict_fn(runner)
            judge = Judge(world["eval"], _labels_of(predict, world["eval"]), world["eval_y"])
            tick("crops rendered")
            rows, clones = [], {}
            with running_services(work / "serve", victim_path, specs) as svcs:
                tick("services up")
                for d in DEFENCES:
                    for mode in MODES:
                        row, clones[row["key"]] = _attack(d, mode, svcs[d.service], info,
                                                          world, judge, sc, seed)
                        rows.append(row)
                        tick(f"{d.name} / {mode}: {100 * row['agreement']:.0f} % agreement")
                benign = _benign(svcs["prada"], info, predict, sc, budget, seed)
                rate = config_from_dict(specs[1].settings).watermark_rate
                cost_sample = _watermark_sample(work / "serve" / "prada", predict, info, rate,
                                                sc.cost_crops, seed)
                tick("benign clients")
        indep = Clone(CloneRecipe(sc.clone_arch, sc.epochs),
                      len(info.class_names), seed + 1)
        indep.add(world["indep"], Answer(world["indep_y"], None))  # true labels, one-hot
        indep.fit()
        ind_agree, ind_acc = judge(indep.model)
        indep_onnx = _export(indep.model, info.class_names, work / "clones" / "independent.onnx")
        tick("independent model trained")
        folders = {s.name: work / "serve" / s.name for s in specs}
        usage = {name: key_usage(f) for name, f in folders.items()}
        for row in rows:
            folder = folders[row["service"]]
            onnx = _export(clones[row["key"]].model, info.class_names,
                           work / "clones" / f"{row['key']}.onnx")
            row["clone_onnx"] = str(onnx)
            row["store"] = usage[row["service"]][row["key"]]
            row["prada"] = prada_record(folder, row["key"]) if row["service"] == "prada" \
                else None
            row["watermark"] = {"clone": _verify(folder, row["key"], onnx),
                                "independent": _verify(folder, row["key"], indep_onnx),
                                "command": f"roadshield watermark verify --suspect {onnx} "
                                           f"--dir {folder} --client {row['key']}"}
        for b in benign:
            b["prada"] = prada_record(folders["prada"], b["client"])
            b["store"] = usage["prada"][b["client"]]
        tick("watermarks verified")
    result: dict[str, Any] = {
        "schema": SCHEMA, "scale": scale, "seed": seed, "sizes": asdict(sc),
        "budget": budget, "started": started, "cpu_count": os.cpu_count(),
        "victim": {"path": str(victim_path), "sha256": info.sha256, "arch": info.arch,
                   "trained_here": trained,
                   "accuracy": round(float((judge.victim == judge.truth).mean()), 4)},
        "eval_crops": int(len(judge.truth)),
        "services": {s.name: {"settings": s.settings, "folder": str(folders[s.name])}
                     for s in specs},
        "jacobian": {"lambda": JACOBIAN_LAMBDA, "tau": JACOBIAN_TAU,
                     "seeds": int(len(world["seeds"]))},
        "watermark_rate": rate, "watermark_sample": cost_sample,
        "runs": rows, "benign": benign,
        "independent": {"onnx": str(indep_onnx), "agreement": round(ind_agree, 4),
                        "accuracy": round(ind_acc, 4), "train_crops": int(len(world["indep"]))}}
    check_targets(result)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    write_report(out, "redteam_extraction", result, chart_png, markdown)
    return result
