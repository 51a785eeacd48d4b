"""The v2 REST service in-process (FastAPI TestClient over httpx): health, metadata, the
output policies, authentication, budgets, rate limits with backoff, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from serve_helpers import FakeClock, add_key, client_for, images, infer_body

from serve.policy import softmax

INFER = "/v2/models/roadsign/infer"
# starlette's TestClient still drives the app through httpx, which it now calls deprecated
pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx`")


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _used(service, key_id: str) -> int:
    return service.store.get_key(key_id).used


def test_health_needs_no_key_and_the_model_routes_do(make_service):
    service = make_service()
    client = client_for(service)
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    for path in ("/v2", "/v2/models/roadsign", "/v2/models/roadsign/ready"):
        r = client.get(path)
        assert r.status_code == 401 and r.json() == {"error": "unauthorized"}
    # no docs or schema routes that could describe the model
    assert client.get("/openapi.json").status_code == 404
    assert client.get("/docs").status_code == 404


def test_metadata_lists_only_the_outputs_of_the_keys_policy(make_service, tiny):
    service = make_service()
    client = client_for(service)
    label = add_key(service, "l", policy="label")
    noisy = add_key(service, "n", policy="noisy")
    meta = client.get("/v2/models/roadsign", headers=_auth(label)).json()
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32",
                               "shape": [-1, 3, tiny.size, tiny.size]}]
    assert [o["name"] for o in meta["outputs"]] == ["label"]
    meta = client.get("/v2/models/roadsign/versions/1", headers=_auth(noisy)).json()
    assert [o["name"] for o in meta["outputs"]] == ["label", "probabilities"]
    assert client.get("/v2/models/roadsign/ready", headers=_auth(noisy)).json()["ready"]
    assert client.get("/v2/models/other", headers=_auth(noisy)).status_code == 404


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer nonsense"}, {"X-API-Key": "rs1.nobody.abc"},
    {"Authorization": "Basic dXNlcjpwYXNz"}])
def test_missing_malformed_or_unknown_keys_get_the_same_401(make_service, headers):
    service = make_service()
    client = client_for(service)
    for path in (INFER, "/v2/models/secret-name/infer"):
        r = client.post(path, json=infer_body(images(1)), headers=headers)
        assert r.status_code == 401
        assert r.json() == {"error": "unauthorized"}
        assert "roadsign" not in r.text and "stop" not in r.text


def test_a_wrong_secret_is_401_and_a_revoked_key_403(make_service):
    service = make_service()
    client = client_for(service)
    token = add_key(service, "alice")
    wrong = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    r = client.post(INFER, json=infer_body(images(1)), headers=_auth(wrong))
    assert r.status_code == 401 and r.json() == {"error": "unauthorized"}
    assert client.post(INFER, json=infer_body(images(1)), headers=_auth(token)).status_code \
        == 200
    service.store.revoke("alice")
    r = client.post(INFER, json=infer_body(images(1)), headers={"X-API-Key": token})
    assert r.status_code == 403 and r.json() == {"error": "forbidden"}


def test_the_store_keeps_only_a_salted_hash_of_the_key(make_service):
    service = make_service()
    token = add_key(service, "alice")
    secret = token.split(".")[2]
    raw = service.store.path.read_bytes()
    for suffix in ("-wal", ""):
        path = service.store.path.with_name(service.store.path.name + suffix)
        if path.exists():
            raw += path.read_bytes()
    assert secret.encode() not in raw
    record = service.store.get_key("alice")
    assert len(record.salt) == 16 and len(record.secret_hash) == 32


def test_policies_label_top1_noisy_softmax(make_service, tiny_model, tiny):
    import torch

    service = make_service(top1_decimals=2, noise_sigma=1.0, watermark_rate=0.0)
    client = client_for(service)
    x = images(6, seed=3)
    with torch.no_grad():
        p = softmax(tiny_model(torch.from_numpy(x)).numpy())
    names = [tiny.classes[i] for i in p.argmax(axis=1)]
    out = {}
    for policy in ("label", "top1", "noisy", "softmax"):
        token = add_key(service, policy, policy=policy)
        r = client.post(INFER, json=infer_body(x), headers=_auth(token))
        assert r.status_code == 200, r.text
        out[policy] = {t["name"]: t for t in r.json()["outputs"]}
        assert out[policy]["label"]["data"] == names
        assert out[policy]["label"]["datatype"] == "BYTES"
    assert list(out["label"]) == ["label"]
    conf = np.array(out["top1"]["confidence"]["data"])
    np.testing.assert_allclose(conf, np.round(p.max(axis=1), 2), atol=1e-6)
    soft = np.array(out["softmax"]["probabilities"]["data"]).reshape(6, -1)
    np.testing.assert_allclose(soft, p, atol=1e-6)
    noisy = np.array(out["noisy"]["probabilities"]["data"]).reshape(6, -1)
    assert (noisy.argmax(axis=1) == p.argmax(axis=1)).all()  # the argmax is kept
    np.testing.assert_allclose(noisy.sum(axis=1), 1.0, atol=1e-5)
    assert np.abs(noisy - p).max() > 0.01  # and the rest is perturbed
    # deterministic per image: asking again gives the same noisy answer
    again = client.post(INFER, json=infer_body(x), headers=_auth(add_key(service, "n2",
                                                                         policy="noisy")))
    assert again.json()["outputs"][1]["data"] == out["noisy"]["probabilities"]["data"]


def test_requested_outputs_are_filtered_and_others_refused(make_service):
    service = make_service()
    client = client_for(service)
    token = add_key(service, "alice", policy="top1")
    r = client.post(INFER, json=infer_body(images(1), outputs=["confidence"]),
                    headers=_auth(token))
    assert [t["name"] for t in r.json()["outputs"]] == ["confidence"]
    r = client.post(INFER, json=infer_body(images(1), outputs=["probabilities"]),
                    headers=_auth(token))
    assert r.status_code == 400 and "not offered" in r.json()["error"]
    assert _used(service, "alice") == 1


def test_budget_counts_images_and_runs_out(make_service):
    service = make_service()
    client = client_for(service)
    token = add_key(service, "alice", budget=5)
    assert client.post(INFER, json=infer_body(images(3)), headers=_auth(token)).status_code \
        == 200
    r = client.post(INFER, json=infer_body(images(3)), headers=_auth(token))
    assert r.status_code == 429 and "budget" in r.json()["error"]
    assert client.post(INFER, json=infer_body(images(2)), headers=_auth(token)).status_code \
        == 200
    r = client.post(INFER, json=infer_body(images(1)), headers=_auth(token))
    assert r.status_code == 429 and "Retry-After" not in r.headers
    assert _used(service, "alice") == 5


def test_rate_limit_429_with_retry_after_and_exponential_backoff(make_service):
    clock = FakeClock()
    service = make_service(clock=clock, backoff_base_s=1.0, backoff_max_s=60.0)
    client = client_for(service)
    token = add_key(service, "alice", rate=1.0, burst=2.0)
    body = infer_body(images(1))
    assert [client.post(INFER, json=body, headers=_auth(token)).status_code
            for _ in range(2)] == [200, 200]
    waits = []
    for _ in range(4):  # hammering while blocked: each refusal doubles the block
        r = client.post(INFER, json=body, headers=_auth(token))
        assert r.status_code == 429
        waits.append(int(r.headers["Retry-After"]))
    assert waits == [1, 2, 4, 8]
    assert service.store.get_key("alice").bucket.strikes == 4
    clock.now += 8.0  # a client that waits as told is served again
    assert client.post(INFER, json=body, headers=_auth(token)).status_code == 200
    assert _used(service, "alice") == 3


def test_a_replayed_request_id_is_409_and_not_counted(make_service):
    service = make_service()
    client = client_for(service)
    token = add_key(service, "alice")
    body = infer_body(images(2), request_id="req-1")
    first = client.post(INFER, json=body, headers=_auth(token))
    assert first.status_code == 200 and first.json()["id"] == "req-1"
    r = client.post(INFER, json=body, headers=_auth(token))
    assert r.status_code == 409 and "replay" in r.json()["error"]
    assert _used(service, "alice") == 2


def _raw(client, token, content: bytes, **headers: str):
    return client.post(INFER, content=content,
                       headers={"Content-Type": "application/json", **_auth(token), **headers})


BAD_BODIES = {
    "malformed JSON": (b'{"inputs": [', "malformed JSON"),
    "not an object": (b"[1, 2]", "JSON object"),
    "truncated": (json.dumps(infer_body(images(1))).encode()[:-40], "malformed JSON"),
    "NaN": (json.dumps(infer_body(np.full((1, 3, 16, 16), 0.25, np.float32)))
            .replace("0.25", "NaN", 1).encode(), "malformed JSON"),
    "huge number": (json.dumps(infer_body(np.full((1, 3, 16, 16), 0.25, np.float32)))
                    .replace("0.25", "1e400", 1).encode(), "non-finite"),
    "wrong rank": (json.dumps({"inputs": [{"name": "input", "shape": [3, 16, 16],
                                           "datatype": "FP32", "data": [0.0] * 768}]}).encode(),
                   "shape"),
    "wrong size": (json.dumps(infer_body(images(1, size=8))).encode(), "shape"),
    "wrong dtype": (json.dumps(infer_body(images(1))).replace("FP32", "INT8").encode(),
                    "datatype"),
    "data too short": (json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 16, 16],
                                               "datatype": "FP32", "data": [0.5] * 10}]}
                                  ).encode(), "holds 10 values"),
    "strings": (json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 16, 16],
                                        "datatype": "FP32", "data": ["a"] * 768}]}).encode(),
                "numbers"),
    "out of range": (json.dumps(infer_body(images(1) * 3)).encode(), "[0, 1]"),
    "wrong input name": (json.dumps(infer_body(images(1))).replace('"input"', '"x"').encode(),
                         "named"),
    "batch too large": (json.dumps(infer_body(images(65))).encode(), "N <= 64"),
    "not UTF-8": (b"\xff\xfe{}", "UTF-8"),
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_bad_input_is_a_clear_4xx_counts_nothing_and_the_service_stays_up(make_service, case):
    service = make_service()
    client = client_for(service)
    token = add_key(service, "alice", rate=1000.0, burst=1000.0)
    content, reason = BAD_BODIES[case]
    r = _raw(client, token, content)
    assert r.status_code == 400, r.text
    assert reason in r.json()["error"]
    record = service.store.get_key("alice")
    assert record.used == 0 and record.bucket.strikes == 0
    assert record.bucket.tokens == 1000.0  # no rate token spent either
    ok = client.post(INFER, json=infer_body(images(1)), headers=_auth(token))
    assert ok.status_code == 200 and _used(service, "alice") == 1


def test_a_100_mb_body_is_refused_before_parsing(make_service):
    service = make_service()
    client = client_for(service)
    token = add_key(service, "alice")
    r = _raw(client, token, b"[" + b"0," * (50 << 20) + b"0]")
    assert r.status_code == 413 and "over the limit" in r.json()["error"]

    def chunks():  # no Content-Length: the streamed body is cut off at the limit
        for _ in range(100):
            yield b" " * (1 << 20)

    r = client.post(INFER, content=chunks(), headers=_auth(token))
    assert r.status_code == 413
    assert _used(service, "alice") == 0
    assert client.post(INFER, json=infer_body(images(1)), headers=_auth(token)).status_code \
        == 200


def test_the_binary_tensor_extension_is_refused_with_a_hint(make_service):
    service = make_service()
    client = client_for(service)
    token = add_key(service, "alice")
    r = _raw(client, token, b"{}", **{"Inference-Header-Content-Length": "2"})
    assert r.status_code == 400 and "binary_data=False" in r.json()["error"]
