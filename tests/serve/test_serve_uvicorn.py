"""The service on a real uvicorn server on loopback: tritonclient's HTTP client as the
client, mutual TLS with real certificates, and a kill -9 that loses no count."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from serve_helpers import add_key, images, infer_body, wait_until

from serve.pki import init_ca, issue_client_cert
from serve.server import uvicorn_config
from serve.store import Store

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(service, folder: Path, tls: bool | None = None) -> Iterator[int]:
    """uvicorn serving ``service`` in a thread; yields the port."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn_config(service, folder, "127.0.0.1", port, tls))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, timeout=30)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_tritonclient_speaks_to_the_service(make_service, state_dir, tiny):
    import tritonclient.http as tc
    from tritonclient.utils import InferenceServerException

    service = make_service(watermark_rate=0.0)
    token = add_key(service, "alice", policy="top1")
    x = images(2, seed=5)
    with running(service, state_dir) as port:
        client = tc.InferenceServerClient(url=f"127.0.0.1:{port}")
        auth = {"Authorization": f"Bearer {token}"}
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("roadsign", headers=auth)
        meta = client.get_model_metadata("roadsign", headers=auth)
        assert meta["inputs"][0]["shape"] == [-1, 3, tiny.size, tiny.size]
        inp = tc.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=False)
        outputs = [tc.InferRequestedOutput(n, binary_data=False)
                   for n in ("label", "confidence")]
        result = client.infer("roadsign", [inp], outputs=outputs, headers=auth,
                              request_id="t-1")
        labels = [v.decode() if isinstance(v, bytes) else str(v)
                  for v in result.as_numpy("label")]
        assert all(name in tiny.classes for name in labels) and len(labels) == 2
        assert result.as_numpy("confidence").shape == (2,)
        with pytest.raises(InferenceServerException) as refused:
            client.infer("roadsign", [inp], outputs=outputs)
        assert "401" in str(refused.value.status()) or "unauthorized" in str(refused.value)
        with pytest.raises(InferenceServerException, match="replay"):
            client.infer("roadsign", [inp], outputs=outputs, headers=auth, request_id="t-1")
        client.close()
    assert service.store.get_key("alice").used == 2


def _client(state: Path, cert: Path | None, key: Path | None, port: int) -> httpx.Client:
    ctx = ssl.create_default_context(cafile=str(state / "ca.pem"))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=ctx, timeout=10)


def _infer(client: httpx.Client, **headers: str) -> httpx.Response:
    return client.post("/v2/models/roadsign/infer", json=infer_body(images(1)),
                       headers=headers)


def test_mutual_tls_accepts_issued_certificates_and_refuses_the_rest(
        make_service, state_dir, tmp_path):
    service = make_service(auth="mtls", watermark_rate=0.0)
    clock = service.clock
    for key_id in ("alice", "bob", "mallory"):
        service.store.add_key(key_id, policy="label", budget=100, rate=100.0, burst=100.0,
                              now=clock())
    alice = issue_client_cert(state_dir, "alice", tmp_path / "alice")
    service.store.set_cert("alice", alice[2])
    bob = issue_client_cert(state_dir, "bob", tmp_path / "bob")
    service.store.set_cert("bob", bob[2])
    stale = issue_client_cert(state_dir, "mallory", tmp_path / "stale")  # never recorded
    expired = issue_client_cert(state_dir, "alice", tmp_path / "expired", days=1,
                                not_before=dt.datetime.now(dt.timezone.utc)
                                - dt.timedelta(days=10))
    other_ca = tmp_path / "other_ca"
    init_ca(other_ca)
    foreign = issue_client_cert(other_ca, "alice", tmp_path / "foreign")
    with running(service, state_dir) as port:
        with _client(state_dir, alice[0], alice[1], port) as c:
            r = _infer(c)
            assert r.status_code == 200, r.text
        for cert, key, _ in (foreign, expired):  # refused in the TLS handshake
            with _client(state_dir, cert, key, port) as c, pytest.raises(httpx.TransportError):
                _infer(c)
        with _client(state_dir, None, None, port) as c, pytest.raises(httpx.TransportError):
            _infer(c)
        with _client(state_dir, stale[0], stale[1], port) as c:
            r = _infer(c)
            assert r.status_code == 403 and r.json() == {"error": "forbidden"}
        service.store.revoke("bob")
        with _client(state_dir, bob[0], bob[1], port) as c:
            assert _infer(c).status_code == 403
        with _client(state_dir, alice[0], alice[1], port) as c:  # still up, nothing changed
            assert _infer(c).status_code == 200
    assert service.store.get_key("alice").used == 2
    assert service.store.get_key("bob").used == 0


def test_auth_both_needs_the_certificate_and_key_of_one_identity(
        make_service, state_dir, tmp_path):
    service = make_service(auth="both", watermark_rate=0.0)
    alice_key = add_key(service, "alice")
    bob_key = add_key(service, "bob")
    alice = issue_client_cert(state_dir, "alice", tmp_path)
    service.store.set_cert("alice", alice[2])
    with running(service, state_dir) as port, _client(state_dir, alice[0], alice[1], port) as c:
        assert _infer(c, **{"X-API-Key": alice_key}).status_code == 200
        assert _infer(c, **{"X-API-Key": bob_key}).status_code == 403
        assert _infer(c).status_code == 401


def _start(state: Path, model: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "roadshield.cli", "-q", "serve",
                             "--dir", str(state), "--model", str(model), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def _live(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=1).status_code \
            == 200
    except httpx.TransportError:
        return False


def test_kill_9_loses_no_count(state_dir, tiny_onnx):
    store = Store(state_dir / "serve.db")
    from serve.auth import make_key

    new = make_key("alice")
    store.add_key("alice", policy="top1", budget=100_000, rate=10_000.0, burst=10_000.0,
                  now=0.0, salt=new.salt, secret_hash=new.secret_hash)
    store.close()
    port = free_port()
    proc = _start(state_dir, tiny_onnx, port)
    answered = 0
    stop = threading.Event()

    def hammer() -> None:
        nonlocal answered
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as c:
            rng = np.random.default_rng(0)
            while not stop.is_set():
                x = rng.random((1, 3, 16, 16), dtype=np.float32)
                try:
                    r = c.post("/v2/models/roadsign/infer", json=infer_body(x),
                               headers={"X-API-Key": new.token})
                except httpx.TransportError:
                    return
                if r.status_code == 200:
                    answered += 1

    try:
        wait_until(lambda: _live(port), timeout=120)
        worker = threading.Thread(target=hammer)
        worker.start()
        wait_until(lambda: answered >= 60, timeout=120)
        proc.send_signal(signal.SIGKILL)  # mid-stream, no shutdown of any kind
        proc.wait(timeout=30)
        stop.set()
        worker.join(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    got = answered
    proc = _start(state_dir, tiny_onnx, port)
    try:
        wait_until(lambda: _live(port), timeout=120)
        store = Store(state_dir / "serve.db")
        used = store.get_key("alice").used
        points, _ = store.prada_history("alice")
        store.close()
        # every answer a client received was counted; at most the one in flight more
        assert got <= used <= got + 1
        assert len(points) == used
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as c:
            r = c.post("/v2/models/roadsign/infer", json=infer_body(images(1)),
                       headers={"X-API-Key": new.token})
            assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    store = Store(state_dir / "serve.db")
    assert store.get_key("alice").used == used + 1
    store.close()


def test_a_truncated_upload_counts_nothing_and_the_service_stays_up(make_service, state_dir):
    service = make_service(watermark_rate=0.0)
    token = add_key(service, "alice")
    body = infer_body(images(1))
    payload = json.dumps(body).encode()
    with running(service, state_dir) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            head = (f"POST /v2/models/roadsign/infer HTTP/1.1\r\nHost: x\r\n"
                    f"X-API-Key: {token}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(payload)}\r\n\r\n").encode()
            s.sendall(head + payload[: len(payload) // 2])
            s.shutdown(socket.SHUT_WR)  # the client stops half-way
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        # uvicorn drops the connection of a client that hung up mid-body, so the 400 the
        # service returns may never be written; what matters is that nothing is counted
        assert answer == b"" or answer.startswith(b"HTTP/1.1 400"), answer[:200]
        r = httpx.post(f"http://127.0.0.1:{port}/v2/models/roadsign/infer", json=body,
                       headers={"X-API-Key": token}, timeout=10)
        assert r.status_code == 200
    assert service.store.get_key("alice").used == 1
