"""Helpers of the service tests (imported by conftest.py and the test files)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from serve.auth import make_key


class FakeClock:
    """A settable clock for the rate limiter (seconds)."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def add_key(service: Any, key_id: str, policy: str = "top1", budget: int = 10_000,
            rate: float = 1000.0, burst: float = 1000.0) -> str:
    """Add a key to the service's store; returns the API key."""
    new = make_key(key_id)
    service.store.add_key(key_id, policy=policy, budget=budget, rate=rate, burst=burst,
                          now=service.clock(), salt=new.salt, secret_hash=new.secret_hash)
    return new.token


def client_for(service: Any) -> Any:
    from fastapi.testclient import TestClient

    from serve.app import create_app

    return TestClient(create_app(service))


def infer_body(images: np.ndarray, request_id: str | None = None,
               outputs: list[str] | None = None) -> dict[str, Any]:
    """A v2 JSON inference request for float32 [N, 3, S, S] images."""
    body: dict[str, Any] = {"inputs": [{"name": "input", "shape": list(images.shape),
                                        "datatype": "FP32",
                                        "data": images.reshape(-1).tolist()}]}
    if request_id is not None:
        body["id"] = request_id
    if outputs is not None:
        body["outputs"] = [{"name": n} for n in outputs]
    return body


def images(n: int, seed: int = 0, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, size, size), dtype=np.float32)


def wait_until(check: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll ``check`` until it is true; AssertionError after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"not true within {timeout} s")
