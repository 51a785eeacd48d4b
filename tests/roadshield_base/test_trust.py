"""Ed25519 signatures and DSSE envelopes (PAE as in the DSSE v1 specification)."""

from __future__ import annotations

import base64
import json

import pytest

from roadshield_base.trust import (
    TrustError,
    canonical_json,
    dsse_sign,
    dsse_verify,
    generate_private_key,
    key_id,
    load_private_key,
    load_public_key,
    pae,
    sign,
    verify,
)


def test_pae_matches_the_dsse_specification_example():
    # DSSE v1 protocol document: PAE("http://example.com/HelloWorld", "hello world")
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world")


def test_detached_signature_round_trip_and_tamper(tmp_path):
    key = generate_private_key()
    sig = sign(key, b"index bytes")
    verify(key.public_key(), b"index bytes", sig)
    with pytest.raises(TrustError, match="does not verify"):
        verify(key.public_key(), b"index bytes!", sig)
    with pytest.raises(TrustError, match="does not verify"):
        verify(generate_private_key().public_key(), b"index bytes", sig)


def test_key_files_round_trip_with_private_mode(tmp_path):
    key = generate_private_key()
    from roadshield_base.trust import save_private_key

    path = save_private_key(key, tmp_path / "stage.key")
    assert (path.stat().st_mode & 0o777) == 0o600
    assert key_id(load_private_key(path)) == key_id(key)
    assert key_id(load_public_key(tmp_path / "stage.key.pub")) == key_id(key)
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(TrustError, match="junk.pem"):
        load_private_key(tmp_path / "junk.pem")


def test_dsse_envelope_verifies_only_with_a_trusted_key_and_type():
    key, other = generate_private_key(), generate_private_key()
    body = canonical_json({"_type": "https://in-toto.io/Statement/v1", "subject": []})
    env = dsse_sign("application/vnd.in-toto+json", body, [key])
    trusted = {key_id(key): key.public_key()}
    assert dsse_verify(env, trusted, "application/vnd.in-toto+json") == body
    with pytest.raises(TrustError, match="no valid signature"):
        dsse_verify(env, {key_id(other): other.public_key()})
    with pytest.raises(TrustError, match="payload type"):
        dsse_verify(env, trusted, "application/json")
    forged = json.loads(json.dumps(env))
    forged["payload"] = base64.b64encode(body.replace(b"[]", b"[1]")).decode()
    with pytest.raises(TrustError, match="no valid signature"):
        dsse_verify(forged, trusted)
    with pytest.raises(TrustError, match="not a DSSE envelope"):
        dsse_verify({"payload": "x"}, trusted)
