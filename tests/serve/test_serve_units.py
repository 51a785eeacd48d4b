"""The pure parts of the gateway: token bucket and backoff, the noisy policy, key hashing,
config checks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roadshield_base.errors import ConfigError
from serve import ratelimit
from serve.auth import hash_secret, make_key, parse_token
from serve.config import ServeConfig, load_config
from serve.policy import answer, noisy_probabilities, softmax


def test_bucket_refills_at_rate_up_to_burst():
    b = ratelimit.Bucket(rate=2.0, burst=4.0, tokens=0.0, tokens_at=100.0)
    assert not ratelimit.admit(b, 1, 100.2)
    assert ratelimit.admit(b, 1, 100.5)  # 0.5 s * 2 /s = 1 token
    assert ratelimit.refill(b, 1000.0).tokens == 4.0
    taken = ratelimit.take(b, 3, 102.0)
    assert taken.tokens == pytest.approx(1.0) and taken.tokens_at == 102.0


def test_backoff_doubles_caps_and_is_forgotten():
    backoff = ratelimit.Backoff(base_s=1.0, max_s=5.0, forget_s=60.0)
    b = ratelimit.Bucket(rate=1.0, burst=1.0, tokens=0.0, tokens_at=0.0)
    blocks = []
    for _ in range(5):
        b = ratelimit.strike(b, 0.0, backoff)
        blocks.append(b.blocked_until)
    assert blocks == [1.0, 2.0, 4.0, 5.0, 5.0]
    for _ in range(2000):  # a client that never stops: the block stays at the cap
        b = ratelimit.strike(b, 0.0, backoff)
    assert b.blocked_until == 5.0 and b.strikes == 2005
    later = ratelimit.strike(b, 1000.0, backoff)  # long after: strikes start over
    assert later.strikes == 1 and later.blocked_until == 1001.0
    assert ratelimit.retry_after(later, 1, 1000.0) == 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-20, 20), min_size=2, max_size=20), st.floats(0.0, 5.0),
       st.integers(0, 2**63))
def test_noise_keeps_the_argmax_and_sums_to_one(logits, sigma, seed):
    p = softmax(np.array([logits]))[0]
    q = noisy_probabilities(p, sigma, seed)
    assert np.isclose(q.sum(), 1.0)
    assert q[np.argmax(p)] == q.max()
    np.testing.assert_array_equal(q, noisy_probabilities(p, sigma, seed))


def test_key_tokens_round_trip_and_hash_with_salt():
    new = make_key("alice")
    key_id, secret = parse_token(new.token)
    assert key_id == "alice" and hash_secret(new.salt, secret) == new.secret_hash
    assert hash_secret(b"\1" * 16, secret) != new.secret_hash
    for bad in ("", "rs1.alice", "rs2.alice.x", "rs1.al ice.x", "rs1.alice."):
        assert parse_token(bad) is None
    with pytest.raises(ValueError):
        make_key("no/slash")


def test_config_refuses_a_large_watermark_and_unknown_settings(tmp_path):
    with pytest.raises(ConfigError, match="0.5 %"):
        ServeConfig(watermark_rate=0.01)
    with pytest.raises(ConfigError, match="auth"):
        ServeConfig(auth="password")
    path = tmp_path / "serve.json"
    path.write_text('{"auth": "mtls", "defaults": {"policy": "label"}, "colour": 1}')
    with pytest.raises(ConfigError, match="colour"):
        load_config(path)
    path.write_text('{"auth": "mtls", "defaults": {"policy": "label", "budget": 5}}')
    cfg = load_config(path, auth="both")
    assert cfg.auth == "both" and cfg.defaults.policy == "label" and cfg.defaults.budget == 5


def test_a_watermarked_answer_is_consistent_under_every_policy():
    p = softmax(np.array([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, 0.5]]))
    names = ("a", "b", "c", "d")
    for policy in ("label", "top1", "noisy", "softmax"):
        out = {t["name"]: t for t in answer(policy, p, names, wrong=[2, None],
                                            images_u8=[b"x", b"y"], noise_key=b"k",
                                            sigma=1.0, decimals=2, requested=None)}
        assert out["label"]["data"] == ["c", "b"]
        if "probabilities" in out:
            q = np.array(out["probabilities"]["data"]).reshape(2, 4)
            assert list(q.argmax(axis=1)) == [2, 1]
        if "confidence" in out:
            assert out["confidence"]["data"] == pytest.approx(np.round(p.max(axis=1), 2))
