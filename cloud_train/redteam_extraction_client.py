"""The service side of ``roadshield redteam extraction``: the protected query service
started on loopback, and the HTTP client every attacker and benign client uses.

Each service is ``roadshield serve`` in its own process (uvicorn, one worker, 127.0.0.1, an
ephemeral port) over a fresh state folder: ``serve keys init``'s CA and secrets, a
``serve.json`` with the service's settings, and one API key per client, added to the store
as ``serve keys add`` adds them. Nothing of the gateway is bypassed: every query pays
authentication, the budget and the token bucket, PRADA, the watermark and the output policy,
and is committed to SQLite before its answer leaves.

``KeyClient`` speaks the v2 JSON protocol (serve/PROTOCOL.md) for one key. It honours
``Retry-After``: it sleeps as told, then paces its requests to the rate that answer implies,
so waiting clients are not struck again; it gives up when the next wait would pass its
wall-clock cap. A 429 naming the images left of the budget is answered with a request of
that many; a bare budget 429 or a 403 (PRADA switched the key off) ends the client.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cloud_train.redteam_extraction_attacks import Answer, AttackStopped
from roadshield_base.errors import ConfigError
from roadshield_base.fileio import atomic_write_json

UNLIMITED = 1_000_000_000  # budget and rate of a key the run does not limit
_LEFT = re.compile(r"\((\d+) images left")
# every uint8 value as the shortest decimal that round(255 * x) maps back to it exactly
_DECIMALS = [f"{v / 255:.3f}".rstrip("0").rstrip(".") or "0" for v in range(256)]


@dataclass(frozen=True)
class KeySpec:
    """One API key: its output policy, budget (images), token rate (images/s), burst."""

    key_id: str
    policy: str
    budget: int = UNLIMITED
    rate: float = float(UNLIMITED)
    burst: float = float(UNLIMITED)


@dataclass(frozen=True)
class ServiceSpec:
    """One service: a name (its state folder), its serve.json settings, its keys."""

    name: str
    settings: dict[str, Any]
    keys: tuple[KeySpec, ...]


@dataclass
class RunningService:
    spec: ServiceSpec
    folder: Path
    port: int
    tokens: dict[str, str]
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _prepare(spec: ServiceSpec, folder: Path) -> dict[str, str]:
    """A fresh state folder for ``spec``; returns the API key of every key id."""
    from serve.auth import make_key
    from serve.config import config_from_dict
    from serve.pki import init_ca
    from serve.server import CONFIG_NAME, open_store

    config_from_dict(spec.settings, f"{spec.name} settings")  # a bad setting fails here
    if folder.exists():  # the run's own scratch state: budgets must start full
        shutil.rmtree(folder)
    init_ca(folder)
    atomic_write_json(folder / CONFIG_NAME, spec.settings)
    store = open_store(folder)
    tokens = {}
    try:
        for k in spec.keys:
            new = make_key(k.key_id)
            store.add_key(k.key_id, policy=k.policy, budget=k.budget, rate=k.rate,
                          burst=k.burst, now=time.time(), salt=new.salt,
                          secret_hash=new.secret_hash)
            tokens[k.key_id] = new.token
    finally:
        store.close()
    return tokens


def _wait_live(svc: RunningService, timeout: float) -> None:
    import httpx

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if svc.proc.poll() is not None:
            log = (svc.folder / "serve.log").read_text(errors="replace")[-2000:]
            raise ConfigError(f"the {svc.spec.name} service exited with {svc.proc.returncode}",
                              f"its log ends: {log}")
        try:
            if httpx.get(f"{svc.url}/v2/health/live", timeout=1).is_success:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise ConfigError(f"the {svc.spec.name} service did not answer within {timeout:.0f} s",
                      f"see {svc.folder / 'serve.log'}")


@contextmanager
def running_services(work: Path, model: Path, specs: Sequence[ServiceSpec],
                     start_timeout: float = 180.0) -> Iterator[dict[str, RunningService]]:
    """Start every service of ``specs`` on loopback (state in ``work/NAME``, log in
    ``work/NAME/serve.log``); stop them all when the block ends."""
    started: dict[str, RunningService] = {}
    try:
        for spec in specs:
            folder = work / spec.name
            tokens = _prepare(spec, folder)
            port = _free_port()
            log = open(folder / "serve.log", "wb")  # the child process writes it
            proc = subprocess.Popen(
                [sys.executable, "-m", "roadshield.cli", "-q", "serve", "--dir", str(folder),
                 "--model", str(model), "--port", str(port)],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
            log.close()
            started[spec.name] = RunningService(spec, folder, port, tokens, proc)
        for svc in started.values():
            _wait_live(svc, start_timeout)
        yield started
    finally:
        for svc in started.values():
            svc.proc.terminate()
        for svc in started.values():
            try:
                svc.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                svc.proc.kill()
                svc.proc.wait(timeout=30)


def request_body(images: np.ndarray, input_name: str) -> bytes:
    """The v2 JSON request for uint8 ``N x S x S x 3`` RGB images (values sent as x / 255
    with three decimals: the service's uint8 rounding gives back the same bytes)."""
    n, s = images.shape[0], images.shape[1]
    flat = images.transpose(0, 3, 1, 2).reshape(-1)
    data = ",".join([_DECIMALS[v] for v in flat.tolist()])
    head = json.dumps({"name": input_name, "shape": [n, 3, s, s], "datatype": "FP32"})
    return ('{"inputs": [' + head[:-1] + ', "data": [' + data + "]}]}").encode()


@dataclass
class ClientStats:
    """What one key's client saw: requests sent and answered, images answered, refusals,
    seconds slept on Retry-After, when answers lost their probabilities, why it stopped."""

    requests: int = 0
    answered: int = 0
    rate_limited: int = 0
    waited_s: float = 0.0
    budget_refusals: int = 0
    probabilities_lost_at: int | None = None
    stopped: str = ""
    statuses: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "waited_s": round(self.waited_s, 2)}


class KeyClient:
    """One key's client of a running service: ``client(images) -> Answer``.

    class_names: the victim's classes in its output order (the sign classes are public;
    the probabilities come in this order); wall_cap_s: the client gives up (AttackStopped)
    rather than wait past this many seconds from its creation."""

    def __init__(self, url: str, token: str, class_names: Sequence[str], input_name: str,
                 model_name: str = "roadsign", wall_cap_s: float = float("inf")) -> None:
        import httpx

        self.http = httpx.Client(base_url=url, timeout=120.0)
        self.path = f"/v2/models/{model_name}/infer"
        self.headers = {"Authorization": f"Bearer {token}",
                        "Content-Type": "application/json"}
        self.index = {name: i for i, name in enumerate(class_names)}
        self.input_name = input_name
        self.clock, self.sleep = time.monotonic, time.sleep
        self.deadline = self.clock() + wall_cap_s
        self.pace = 0.0  # seconds per image the service's Retry-After implied
        self.next_at = 0.0
        self.stats = ClientStats()
        self._had_probabilities = False

    def close(self) -> None:
        self.http.close()

    def _wait(self, seconds: float) -> None:
        if seconds <= 0:
            return
        if self.clock() + seconds > self.deadline:
            self.stats.stopped = "wall-clock cap"
            raise AttackStopped(f"wall-clock cap (the service asked for a {seconds:.0f} s "
                                "wait past it)")
        self.sleep(seconds)
        self.stats.waited_s += seconds

    def __call__(self, images: np.ndarray) -> Answer:
        if self.stats.stopped:
            raise AttackStopped(self.stats.stopped)
        while True:
            self._wait(self.next_at - self.clock())
            body = request_body(images, self.input_name)
            r = self.http.post(self.path, content=body, headers=self.headers)
            self.stats.requests += 1
            key = str(r.status_code)
            self.stats.statuses[key] = self.stats.statuses.get(key, 0) + 1
            if r.status_code == 200:
                self.next_at = self.clock() + self.pace * len(images)
                return self._answer(r.json(), len(images))
            reason = r.json().get("error", "") if r.content else ""
            if r.status_code == 429 and "retry-after" in r.headers:
                wait = float(r.headers["retry-after"])
                self.stats.rate_limited += 1
                # pace by what the service said: this wait covers this many images
                self.pace = max(self.pace, wait / len(images))
                self._wait(wait)
                continue
            if r.status_code == 429:
                self.stats.budget_refusals += 1
                left = _LEFT.search(reason)
                if left and 0 < int(left.group(1)) < len(images):
                    images = images[:int(left.group(1))]
                    continue
                self.stats.stopped = "budget exhausted"
                raise AttackStopped(self.stats.stopped)
            if r.status_code == 403:
                self.stats.stopped = "key switched off (403)"
                raise AttackStopped(self.stats.stopped)
            raise ConfigError(f"the service answered {r.status_code}: {reason or r.text[:200]}",
                              "this is a bug of the red team's client or of the service")

    def _answer(self, doc: dict[str, Any], n: int) -> Answer:
        outputs = {o["name"]: o for o in doc["outputs"]}
        labels = np.array([self.index[name] for name in outputs["label"]["data"]],
                          dtype=np.int64)
        probs = None
        if "probabilities" in outputs:
            probs = np.asarray(outputs["probabilities"]["data"], dtype=np.float32).reshape(
                n, -1)
        if probs is None and self._had_probabilities and \
                self.stats.probabilities_lost_at is None:
            self.stats.probabilities_lost_at = self.stats.answered  # PRADA's cut, seen
        self._had_probabilities = self._had_probabilities or probs is not None
        self.stats.answered += n
        return Answer(labels, probs)


def key_usage(folder: Path) -> dict[str, dict[str, Any]]:
    """Per key as the service's store holds it: images answered, the cut, strikes."""
    from serve.server import open_store

    store = open_store(folder)
    try:
        return {r.key_id: {"used": r.used, "cut": r.cut or None, "strikes": r.bucket.strikes}
                for r in store.list_keys()}
    finally:
        store.close()


def prada_record(folder: Path, key_id: str) -> dict[str, Any]:
    """PRADA's tests of one key from the store: when it first alarmed (queries), the
    lowest and the last W, the number of tests."""
    from serve.server import open_store

    store = open_store(folder)
    try:
        tests = store.prada_tests(key_id)
    finally:
        store.close()
    first = next((n for n, _, alarm in tests if alarm), None)
    ws = [w for _, w, _ in tests]
    return {"alarm_at": first, "tests": len(tests),
            "min_w": round(min(ws), 4) if ws else None,
            "last_w": round(ws[-1], 4) if ws else None}
