"""The gateway's logic, independent of HTTP: a runner, the store, the config, the secrets.

``Service.infer(record, body)`` takes an authenticated key and a request body and returns
``(status, json body, headers)``. Order (serve/PROTOCOL.md, "A request's path"): rate and
budget preflight (429, no parsing), parsing and checks (400), replay (409), inference,
PRADA, watermark, the output policy, then one committed transaction, then the answer.
A refused request writes nothing, except a rate-limit strike.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_runtime.model_info import ModelInfo
from edge_runtime.runners.base import BaseRunner
from serve import ratelimit
from serve.config import ServeConfig
from serve.policy import POLICY_OUTPUTS, answer, softmax
from serve.prada import PradaState
from serve.store import Charge, KeyRecord, Store
from serve.tensors import BadRequest, parse_infer_request
from serve.watermark import quantise, watermark_row, wrong_label

log = logging.getLogger(__name__)

Reply = tuple[int, dict[str, Any], dict[str, str]]
PRUNE_EVERY = 1000


@dataclass(frozen=True)
class Secrets:
    watermark_key: bytes
    noise_key: bytes


def error(status: int, reason: str, headers: dict[str, str] | None = None) -> Reply:
    return status, {"error": reason}, headers or {}


class Service:
    """One model behind the gateway. Thread-safe: inference runs outside the lock, PRADA's
    update and the commit inside it."""

    def __init__(self, runner: BaseRunner, store: Store, config: ServeConfig,
                 secrets: Secrets, clock: Callable[[], float] = time.time) -> None:
        if not runner.is_active:
            runner.activate()
        self.runner = runner
        self.info: ModelInfo = runner.model_info
        self.store = store
        self.config = config
        self.secrets = secrets
        self.clock = clock
        self.backoff = ratelimit.Backoff(config.backoff_base_s, config.backoff_max_s,
                                         config.strike_forget_s)
        self._lock = threading.Lock()
        self._infer_lock = threading.Lock()
        self._prada: dict[str, PradaState] = {}
        self._answered = 0

    # metadata -------------------------------------------------------------------------

    def policy_of(self, record: KeyRecord) -> str:
        return "label" if record.cut == "label" else record.policy

    def model_metadata(self, record: KeyRecord) -> dict[str, Any]:
        """/v2/models/{name}: the input, and the outputs this key's policy gives."""
        size, classes = self.info.input_size, len(self.info.class_names)
        shapes = {"label": [-1], "confidence": [-1], "probabilities": [-1, classes]}
        types = {"label": "BYTES", "confidence": "FP32", "probabilities": "FP32"}
        return {"name": self.config.model_name, "versions": ["1"], "platform": "roadshield",
                "inputs": [{"name": self.info.input_name, "datatype": "FP32",
                            "shape": [-1, 3, size, size]}],
                "outputs": [{"name": n, "datatype": types[n], "shape": shapes[n]}
                            for n in POLICY_OUTPUTS[self.policy_of(record)]]}

    # the query path -------------------------------------------------------------------

    def preflight(self, record: KeyRecord) -> Reply | None:
        """429 before anything is parsed: the key is blocked, out of tokens or of budget."""
        now = self.clock()
        if record.used >= record.budget:
            return error(429, "query budget exhausted")
        if not ratelimit.admit(record.bucket, 1, now):
            return self._strike(record, 1, now)
        return None

    def _strike(self, record: KeyRecord, cost: int, now: float) -> Reply:
        bucket = ratelimit.strike(record.bucket, now, self.backoff)
        self.store.save_bucket(record.key_id, bucket)
        wait = ratelimit.retry_after(bucket, cost, now)
        return error(429, f"rate limit: retry after {wait} s", {"Retry-After": str(wait)})

    def infer(self, record: KeyRecord, body: bytes, preflighted: bool = False) -> Reply:
        """Answer one authenticated request body (bytes already size-checked);
        ``preflighted``: the caller already ran ``preflight`` for this record."""
        refused = None if preflighted else self.preflight(record)
        if refused is not None:
            return refused
        cfg = self.config
        try:
            request = parse_infer_request(body, input_name=self.info.input_name,
                                          size=self.info.input_size, max_batch=cfg.max_batch)
        except BadRequest as err:
            return error(err.status, err.reason)
        policy = self.policy_of(record)
        if request.outputs is not None:
            offered = POLICY_OUTPUTS[policy]
            unknown = [n for n in request.outputs if n not in offered]
            if unknown:
                return error(400, f"outputs {unknown} are not offered to this key; it may ask "
                                  f"for {list(offered)}")
        replay_since = self.clock() - cfg.replay_window_s
        if request.request_id is not None and self.store.request_id_seen(
                record.key_id, request.request_id, replay_since):
            return error(409, f"request id {request.request_id!r} was already used by this "
                              "key (a replay); send a new id")
        n = request.images.shape[0]
        if record.used + n > record.budget:
            return error(429, f"query budget exhausted ({record.budget - record.used} images "
                              f"left, the request has {n})")
        with self._infer_lock:
            outputs = self.runner.infer({self.info.input_name: request.images})
        probs = softmax(np.asarray(outputs[self.info.output_name]))
        predicted = [int(c) for c in probs.argmax(axis=1)]
        images_u8 = [quantise(img) for img in request.images]
        size, classes = self.info.input_size, len(self.info.class_names)
        wrong = [wrong_label(self.secrets.watermark_key, size, u8, y, classes,
                             cfg.watermark_rate) for u8, y in zip(images_u8, predicted,
                                                                  strict=True)]
        outputs_json = answer(policy, probs, self.info.class_names, wrong=wrong,
                              images_u8=images_u8, noise_key=self.secrets.noise_key,
                              sigma=cfg.noise_sigma, decimals=cfg.top1_decimals,
                              requested=request.outputs)
        with self._lock:
            fresh = self.store.get_key(record.key_id) or record
            now = self.clock()
            if not ratelimit.admit(fresh.bucket, n, now):
                return self._strike(fresh, n, now)
            prada = self._prada_state(record.key_id) if cfg.prada_enabled else None
            update = prada.observe(images_u8, predicted) if prada is not None else None
            try:  # PRADA has advanced: keep it only if the store kept the same update
                cut = None
                if update is not None and update.test is not None and update.test[2] \
                        and not prada.alarm:  # type: ignore[union-attr]
                    cut = cfg.prada_on_alarm
                    log.warning("PRADA alarm for key %s after %d queries (W = %.3f): cut to %s",
                                record.key_id, update.test[0], update.test[1], cut)
                charge = Charge(
                    cost=n, bucket=ratelimit.take(fresh.bucket, n, now),
                    request_id=request.request_id,
                    points=update.points if update else (), first_seq=update.first_seq
                    if update else 0, distances=update.distances if update else (),
                    test=update.test if update else None, cut=cut,
                    watermark=[watermark_row(size, u8, y, w) for u8, y, w
                               in zip(images_u8, predicted, wrong, strict=True) if w is not None])
                why = self.store.charge(record.key_id, charge, now, replay_since)
            except BaseException:
                if prada is not None and update is not None:
                    prada.revert(update)
                raise
            if prada is not None and update is not None:
                (prada.revert if why else prada.apply)(update)
            if why:
                return self._late_refusal(why)
            self._answered += 1
            if self._answered % PRUNE_EVERY == 0:  # forget request ids past the window
                self.store.prune_request_ids(replay_since)
        body_json = {"model_name": cfg.model_name, "model_version": "1", "outputs": outputs_json}
        if request.request_id is not None:
            body_json["id"] = request.request_id
        return 200, body_json, {}

    def _late_refusal(self, why: str) -> Reply:
        if why == "replay":
            return error(409, "request id was already used by this key (a replay); send a "
                              "new id")
        if why == "budget":
            return error(429, "query budget exhausted")
        if why == "rate":
            return error(429, "rate limit: retry after 1 s", {"Retry-After": "1"})
        return error(403, "forbidden")

    def _prada_state(self, key_id: str) -> PradaState:
        state = self._prada.get(key_id)
        if state is None:
            points, _ = self.store.prada_history(key_id)
            alarm = any(a for _, _, a in self.store.prada_tests(key_id))
            cfg = self.config
            state = PradaState.from_history(points, alarm, delta=cfg.prada_delta,
                                            min_distances=cfg.prada_min_distances,
                                            test_every=cfg.prada_test_every)
            self._prada[key_id] = state
        return state

    def prada_status(self, key_id: str) -> dict[str, Any]:
        """PRADA's view of a key: queries seen, distances, last W, alarm."""
        with self._lock:
            state = self._prada_state(key_id)
            return {"queries": state.seq, "distances": len(state.distances),
                    "last_w": state.last_w, "alarm": state.alarm}
