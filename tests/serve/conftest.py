"""Fixtures of the service tests: a state folder with its CA and secrets and a service on
the tiny ONNX model with a fake clock (helpers in serve_helpers.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from serve_helpers import FakeClock

from serve.config import ServeConfig
from serve.pki import init_ca
from serve.server import build_service


@pytest.fixture(scope="session")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, server certificate and secrets (shared: add no keys here)."""
    folder = tmp_path_factory.mktemp("serve_ca")
    init_ca(folder)
    return folder


@pytest.fixture
def state_dir(ca_dir: Path, tmp_path: Path) -> Path:
    """A fresh state folder with copies of the session's CA and secrets (no database)."""
    folder = tmp_path / "state"
    folder.mkdir()
    for name in ("ca.pem", "ca.key", "server.pem", "server.key", "secrets.json"):
        (folder / name).write_bytes((ca_dir / name).read_bytes())
    return folder


@pytest.fixture
def make_service(state_dir: Path, tiny_onnx: Path) -> Iterator[Callable[..., Any]]:
    """make_service(**config) -> a Service on the tiny model with a FakeClock."""
    made: list[Any] = []

    def make(clock: FakeClock | None = None, **settings: Any) -> Any:
        service = build_service(state_dir, tiny_onnx, ServeConfig(**settings))
        service.clock = clock or FakeClock()
        made.append(service)
        return service

    yield make
    for service in made:
        service.runner.deactivate()
        service.store.close()


