"""Who is asking: API keys (salted hashes only) and client certificates, per the config.

Key format: ``rs1.<key_id>.<secret>``; key_id is 1-64 of ``[A-Za-z0-9_-]``, secret 32
random bytes in unpadded base64url. The store keeps ``salt`` (16 random bytes) and
``sha256("roadshield-serve-key-v1" || salt || secret)``: the secret is 256 random bits, so
a fast hash is as good as a slow one against guessing, and keeps authentication in
microseconds. A request carries the key as ``Authorization: Bearer <key>`` or
``X-API-Key: <key>``.

Every refusal has the same two bodies: 401 ``{"error": "unauthorized"}`` (no, malformed,
unknown or wrong credentials) and 403 ``{"error": "forbidden"}`` (revoked, suspended, or a
certificate not issued to this identity); nothing about the model.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from serve.store import KeyRecord, Store

KEY_PREFIX = "rs1"
KEY_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_HASH_DOMAIN = b"roadshield-serve-key-v1"
_DUMMY_SALT = b"\0" * 16


class AuthFailure(Exception):
    """A refused identity: status 401 or 403; the body never says more than the status."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status

    @property
    def body(self) -> dict[str, str]:
        return {"error": "unauthorized" if self.status == 401 else "forbidden"}


@dataclass(frozen=True)
class NewKey:
    """A freshly made key: ``token`` is shown once; the rest is what the store keeps."""

    key_id: str
    token: str
    salt: bytes
    secret_hash: bytes


def hash_secret(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(_HASH_DOMAIN + salt + secret.encode()).digest()


def make_key(key_id: str) -> NewKey:
    """A new random key for ``key_id`` (ValueError for a malformed id)."""
    if not KEY_ID_PATTERN.match(key_id):
        raise ValueError(f"key id {key_id!r} must be 1-64 of A-Z a-z 0-9 _ -")
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    salt = secrets.token_bytes(16)
    return NewKey(key_id, f"{KEY_PREFIX}.{key_id}.{secret}", salt, hash_secret(salt, secret))


def parse_token(token: str) -> tuple[str, str] | None:
    """(key_id, secret) of a well-formed key, else None."""
    parts = token.strip().split(".")
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not KEY_ID_PATTERN.match(parts[1]):
        return None
    if not parts[2] or len(parts[2]) > 128:
        return None
    return parts[1], parts[2]


def token_from_headers(headers: Mapping[str, str]) -> str | None:
    """The key a request carries (Authorization: Bearer, else X-API-Key), or None."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value:
            return value
    return headers.get("x-api-key") or None


def check_key(store: Store, token: str | None) -> KeyRecord:
    """The record a valid, live API key names; AuthFailure(401/403) otherwise."""
    parsed = parse_token(token) if token else None
    if parsed is None:
        raise AuthFailure(401)
    key_id, secret = parsed
    record = store.get_key(key_id)
    stored_salt = record.salt if record is not None and record.salt else _DUMMY_SALT
    # hash even for an unknown id, so timing does not tell which ids exist
    digest = hash_secret(stored_salt, secret)
    if record is None or record.secret_hash is None:
        raise AuthFailure(401)
    if not hmac.compare_digest(digest, record.secret_hash):
        raise AuthFailure(401)
    return _live(record)


def check_cert(store: Store, cert_sha256: str | None) -> KeyRecord:
    """The record a client certificate was issued to; AuthFailure otherwise.

    The TLS handshake already refused certificates from another CA and expired ones; here
    a certificate of the right CA that is not the one issued to a live identity is 403."""
    if cert_sha256 is None:
        raise AuthFailure(401)
    record = store.key_by_cert(cert_sha256)
    if record is None:
        raise AuthFailure(403)
    return _live(record)


def authenticate(store: Store, mode: str, headers: Mapping[str, str],
                 cert_sha256: str | None) -> KeyRecord:
    """Apply the config's auth mode ("keys", "mtls", "both") to one request."""
    if mode == "keys":
        return check_key(store, token_from_headers(headers))
    if mode == "mtls":
        return check_cert(store, cert_sha256)
    by_cert = check_cert(store, cert_sha256)
    by_key = check_key(store, token_from_headers(headers))
    if by_cert.key_id != by_key.key_id:
        raise AuthFailure(403)
    return by_key


def _live(record: KeyRecord) -> KeyRecord:
    if record.revoked or record.cut == "off":
        raise AuthFailure(403)
    return record
