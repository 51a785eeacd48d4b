#!/usr/bin/env python3
"""Service benchmark on loopback: the gateway's added latency, and an honest key's latency
while another key floods.

Usage: python scripts/bench_serve.py [--model runs/latest/model.onnx] [--requests 400]
           [--flood-seconds 20] [--json]
       python scripts/bench_serve.py --prada [--model ...] [--clients 10] [--per-client 1000]

Two servers run as subprocesses on 127.0.0.1, each on uvicorn with one worker:
- "defended": `roadshield serve` with the default settings (API keys, rate limits, budgets,
  PRADA, the watermark, the top1 policy, SQLite commits before each answer);
- "bare": the same runner behind a FastAPI route that parses the same v2 JSON and answers
  the same top-1 tensors, with no authentication, store, PRADA or watermark.
The gateway's overhead is the difference of their median latencies for one-image queries
sent one after another (interleaved, so both see the same machine load). Then a flooding
process sends one-image queries as fast as one connection allows, ignoring Retry-After,
for --flood-seconds, while the honest key sends --requests paced queries; its p99 is
compared with its unloaded p99. The flood stops by itself. Without --model an untrained
signnet is exported (timing does not depend on the weights).

--prada runs no server: it feeds PRADA (serve/prada.py, in batches of 10 as a client would
send them) with the model's predicted classes for --clients benign clients, each sending
--per-client crops of the synthetic camera's world (cloud_train.render.render_sign, random
classes), and for 3 synthetic-query streams shaped like Jacobian augmentation (10 crops as
seeds, then rounds of x + 0.1 * sign(g), g a random direction), and reports when each
alarmed and the lowest W; it also counts the watermark's share of the benign answers.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def untrained_model(folder: Path) -> Path:
    import torch

    from cloud_train.models import create_model
    from cloud_train.signs import SYNTHETIC_CLASSES
    from distill.export import export_onnx

    torch.manual_seed(0)
    model = create_model("signnet", num_classes=len(SYNTHETIC_CLASSES)).eval()
    return export_onnx(model, SYNTHETIC_CLASSES, folder / "model.onnx")


def bare_server(port: int, model: str) -> None:
    """The comparison server: parse, infer, answer top-1; nothing else."""
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    from edge_runtime.runners.registry import create_runner
    from serve.policy import answer, softmax
    from serve.tensors import BadRequest, parse_infer_request

    runner = create_runner("auto", model)
    runner.activate()
    info = runner.model_info
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    async def live(request: Request) -> JSONResponse:
        return JSONResponse({"live": True})

    # plain routes: the annotations are strings here, which FastAPI's injection cannot read
    async def infer(request: Request) -> JSONResponse:
        body = await request.body()
        try:
            req = parse_infer_request(body, input_name=info.input_name, size=info.input_size,
                                      max_batch=64)
        except BadRequest as err:
            return JSONResponse({"error": err.reason}, status_code=400)
        probs = softmax(runner.infer({info.input_name: req.images})[info.output_name])
        n = len(probs)
        outputs = answer("top1", probs, info.class_names, wrong=[None] * n,
                         images_u8=[b""] * n, noise_key=b"", sigma=0.0, decimals=2,
                         requested=None)
        return JSONResponse({"model_name": "roadsign", "model_version": "1",
                             "outputs": outputs})

    app.add_route("/v2/health/live", live, methods=["GET"])
    app.add_route("/v2/models/roadsign/infer", infer, methods=["POST"])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def flood(port: int, token: str, seconds: float, size: int, out: str) -> None:
    """One key at full speed on one connection, ignoring Retry-After, for ``seconds``."""
    import httpx

    body = _body(np.random.default_rng(1), size)
    counts: dict[str, int] = {}
    end = time.monotonic() + seconds
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
        while time.monotonic() < end:
            try:
                r = c.post("/v2/models/roadsign/infer", content=body,
                           headers={"X-API-Key": token, "Content-Type": "application/json"})
                status = str(r.status_code)
            except httpx.TransportError:
                status = "transport error"
            counts[status] = counts.get(status, 0) + 1
    Path(out).write_text(json.dumps(counts))


def _body(rng: np.random.Generator, size: int) -> bytes:
    x = rng.random((1, 3, size, size), dtype=np.float32)
    return json.dumps({"inputs": [{"name": "input", "shape": [1, 3, size, size],
                                   "datatype": "FP32", "data": x.reshape(-1).tolist()}]}
                      ).encode()


def _wait_live(port: int, proc: subprocess.Popen) -> None:
    import httpx

    end = time.monotonic() + 180
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=1).is_success:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server on port {port} did not come up")


def _stats(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"median_ms": float(np.median(a)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "n": len(a)}


def prada_report(model: Path, clients: int, per_client: int) -> dict:
    """PRADA on benign crop streams and on synthetic-query streams (see the docstring)."""
    import secrets

    from cloud_train.render import render_sign
    from edge_runtime.runners.registry import create_runner
    from serve.config import ServeConfig
    from serve.prada import PradaState
    from serve.watermark import quantise, wrong_label

    runner = create_runner("auto", model)
    runner.activate()
    info = runner.model_info
    size, n_classes = info.input_size, len(info.class_names)

    def predict(x: np.ndarray) -> list[int]:
        return [int(c) for c in runner.infer({info.input_name: x})[info.output_name]
                .argmax(axis=1)]

    def crops(rng: np.random.Generator, n: int) -> np.ndarray:
        return (np.stack([render_sign(int(rng.integers(n_classes)), rng, size)
                          for _ in range(n)]).transpose(0, 3, 1, 2).astype(np.float32) / 255)

    def run(stream: np.ndarray) -> dict:
        state, first, ws = PradaState(), None, []
        for i in range(0, len(stream), 10):
            batch = stream[i:i + 10]
            update = state.observe([quantise(x) for x in batch], predict(batch))
            state.apply(update)
            if update.test is not None:
                ws.append(update.test[1])
                if update.test[2] and first is None:
                    first = update.test[0]
        return {"first_alarm_at": first, "min_w": min(ws) if ws else None,
                "last_w": ws[-1] if ws else None, "queries": len(stream)}

    key = secrets.token_bytes(32)
    rate = ServeConfig().watermark_rate
    benign, marked, total = [], 0, 0
    for k in range(clients):
        stream = crops(np.random.default_rng(1000 + k), per_client)
        benign.append(run(stream))
        ys = predict(stream)
        marked += sum(wrong_label(key, size, quantise(x), y, n_classes, rate) is not None
                      for x, y in zip(stream, ys, strict=True))
        total += len(stream)
    attacks = []
    for k in range(3):
        rng = np.random.default_rng(k)
        points = list(crops(rng, 10))
        stream = list(points)
        while len(stream) < 2000:
            new = [np.clip(x + 0.1 * np.sign(rng.standard_normal(x.shape)), 0, 1)
                   .astype(np.float32) for x in points]
            stream += new
            points += new
        attacks.append(run(np.stack(stream[:2000])))
    runner.deactivate()
    return {"model": str(model), "benign": benign, "synthetic_query_attacks": attacks,
            "benign_flagged": sum(b["first_alarm_at"] is not None for b in benign),
            "attacks_flagged_before_2000": sum(a["first_alarm_at"] is not None for a in attacks),
            "watermark_share_of_benign_answers": marked / total}


def in_process(state: Path, model: Path, token: str, size: int, n: int) -> dict:
    """The gateway's work without HTTP: Service.infer (auth done) against parse + infer +
    softmax, interleaved, one-image bodies; medians in ms."""
    from serve.auth import check_key
    from serve.policy import softmax
    from serve.server import build_service
    from serve.tensors import parse_infer_request

    service = build_service(state, model)
    info = service.info
    rng = np.random.default_rng(7)
    bare, full = [], []
    for _ in range(n + 20):
        body, other = _body(rng, size), _body(rng, size)
        t0 = time.perf_counter()
        req = parse_infer_request(body, input_name=info.input_name, size=size, max_batch=64)
        softmax(service.runner.infer({info.input_name: req.images})[info.output_name])
        t1 = time.perf_counter()
        status, _, _ = service.infer(check_key(service.store, token), other)
        t2 = time.perf_counter()
        if status != 200:
            raise RuntimeError(f"in-process service answered {status}")
        bare.append((t1 - t0) * 1e3)
        full.append((t2 - t1) * 1e3)
    service.runner.deactivate()
    service.store.close()
    return {"bare_median_ms": float(np.median(bare[20:])),
            "service_median_ms": float(np.median(full[20:])),
            "overhead_median_ms": float(np.median(full[20:]) - np.median(bare[20:]))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--flood-seconds", type=float, default=20.0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--prada", action="store_true", help="PRADA on crops and synthetic queries")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--per-client", type=int, default=1000)
    ap.add_argument("--bare", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--flood", nargs=4, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare is not None:
        bare_server(args.bare, args.model)
        return 0
    if args.flood is not None:
        port, token, seconds, out = args.flood
        flood(int(port), token, float(seconds), int(os.environ["BENCH_SIZE"]), out)
        return 0

    if args.prada:
        tmp = Path(tempfile.mkdtemp(prefix="bench_prada_"))
        model = Path(args.model) if args.model else untrained_model(tmp)
        report = prada_report(model, args.clients, args.per_client)
        if args.json:
            print(json.dumps(report, indent=2))
            return 0
        print(f"PRADA on {model}")
        for k, b in enumerate(report["benign"]):
            print(f"  benign client {k}: first alarm {b['first_alarm_at']}, min W "
                  f"{b['min_w']:.3f}, last W {b['last_w']:.3f} ({b['queries']} crops)")
        for k, a in enumerate(report["synthetic_query_attacks"]):
            print(f"  synthetic-query stream {k}: first alarm {a['first_alarm_at']}, min W "
                  f"{a['min_w']:.3f}")
        print(f"  benign clients flagged {report['benign_flagged']} of {len(report['benign'])};"
              f" synthetic-query streams flagged before 2000 queries "
              f"{report['attacks_flagged_before_2000']} of 3")
        print(f"  watermark share of benign answers "
              f"{100 * report['watermark_share_of_benign_answers']:.2f} %")
        return 0

    import httpx

    from edge_runtime.model_info import read_model_info
    from serve.auth import make_key
    from serve.pki import init_ca
    from serve.server import open_store

    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    model = Path(args.model) if args.model else untrained_model(tmp)
    size = read_model_info(model).input_size
    state = tmp / "state"
    init_ca(state)
    store = open_store(state)
    tokens = {}
    for key_id, rate, burst in (("honest", 1000.0, 1000.0), ("flooder", 20.0, 64.0),
                                ("inproc", 1e6, 1e6)):
        new = make_key(key_id)
        store.add_key(key_id, policy="top1", budget=10_000_000, rate=rate, burst=burst,
                      now=time.time(), salt=new.salt, secret_hash=new.secret_hash)
        tokens[key_id] = new.token
    store.close()
    inproc = in_process(state, model, tokens["inproc"], size, args.requests)
    ports = {"defended": _free_port(), "bare": _free_port()}
    env = {**os.environ, "BENCH_SIZE": str(size)}
    procs = {
        "defended": subprocess.Popen([sys.executable, "-m", "roadshield.cli", "-q", "serve",
                                      "--dir", str(state), "--model", str(model),
                                      "--port", str(ports["defended"])], cwd=ROOT, env=env),
        "bare": subprocess.Popen([sys.executable, __file__, "--bare", str(ports["bare"]),
                                  "--model", str(model)], cwd=ROOT, env=env)}
    try:
        for name, proc in procs.items():
            _wait_live(ports[name], proc)
        rng = np.random.default_rng(0)
        clients = {name: httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
                   for name, port in ports.items()}
        headers = {"X-API-Key": tokens["honest"], "Content-Type": "application/json"}
        lat: dict[str, list[float]] = {"defended": [], "bare": []}
        for i in range(args.requests + 20):
            for name in ("bare", "defended"):
                body = _body(rng, size)
                t0 = time.perf_counter()
                r = clients[name].post("/v2/models/roadsign/infer", content=body,
                                       headers=headers)
                dt = (time.perf_counter() - t0) * 1e3
                if r.status_code != 200:
                    raise RuntimeError(f"{name} answered {r.status_code}: {r.text}")
                if i >= 20:  # warm-up
                    lat[name].append(dt)
        unloaded = {name: _stats(ms) for name, ms in lat.items()}
        counts_file = tmp / "flood.json"
        flooder = subprocess.Popen([sys.executable, __file__, "--flood",
                                    str(ports["defended"]), tokens["flooder"],
                                    str(args.flood_seconds), str(counts_file)], cwd=ROOT,
                                   env=env)
        time.sleep(1.0)
        loaded: list[float] = []
        end = time.monotonic() + args.flood_seconds - 2.0
        while time.monotonic() < end and len(loaded) < args.requests:
            body = _body(rng, size)
            t0 = time.perf_counter()
            r = clients["defended"].post("/v2/models/roadsign/infer", content=body,
                                         headers=headers)
            loaded.append((time.perf_counter() - t0) * 1e3)
            if r.status_code != 200:
                raise RuntimeError(f"honest key refused under flood: {r.status_code}")
            time.sleep(0.01)
        flooder.wait(timeout=args.flood_seconds + 60)
        flood_counts = json.loads(counts_file.read_text())
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(timeout=30)
    under_flood = _stats(loaded)
    result = {
        "model": str(model), "input_size": size, "cpus": os.cpu_count(),
        "in_process": inproc,
        "unloaded": unloaded,
        "gateway_overhead_median_ms": unloaded["defended"]["median_ms"]
        - unloaded["bare"]["median_ms"],
        "honest_under_flood": under_flood,
        "p99_ratio_under_flood": under_flood["p99_ms"] / unloaded["defended"]["p99_ms"],
        "flood_statuses": flood_counts,
        "flood_rate_per_s": sum(flood_counts.values()) / args.flood_seconds,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print("service benchmark (loopback, one-image queries, one uvicorn worker each)")
    print(f"  in-process: parse+infer {inproc['bare_median_ms']:.2f} ms, Service.infer "
          f"{inproc['service_median_ms']:.2f} ms, overhead {inproc['overhead_median_ms']:.2f} ms")
    for name, s in unloaded.items():
        print(f"  {name:9s} median {s['median_ms']:6.2f} ms  p90 {s['p90_ms']:6.2f} ms  "
              f"p99 {s['p99_ms']:6.2f} ms  (n={s['n']})")
    print(f"  gateway overhead (median, defended - bare)  "
          f"{result['gateway_overhead_median_ms']:.2f} ms")
    print(f"  honest key under flood: median {under_flood['median_ms']:.2f} ms  p99 "
          f"{under_flood['p99_ms']:.2f} ms  = {result['p99_ratio_under_flood']:.2f}x its "
          f"unloaded p99 (n={under_flood['n']})")
    print(f"  flood: {result['flood_rate_per_s']:.0f} requests/s, statuses {flood_counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
