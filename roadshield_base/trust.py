"""Signatures every tier shares: Ed25519 keys, detached signatures and DSSE envelopes.

Keys are Ed25519 (the ``cryptography`` package). A key is named by its key id, the first
16 hex digits of the sha256 of its raw 32-byte public key, so logs and envelopes can
say which key signed without carrying the key. Private keys are stored as unencrypted
PKCS#8 PEM files with mode 0600, public keys as SubjectPublicKeyInfo PEM.

DSSE (the envelope in-toto uses): the signature covers
``PAE(type, body) = "DSSEv1" SP len(type) SP type SP len(body) SP body``, so a payload
cannot be re-labelled as another type without breaking the signature.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from roadshield_base.errors import RoadshieldError
from roadshield_base.fileio import atomic_write_bytes


class TrustError(RoadshieldError):
    """A signature, key or envelope is missing, malformed or does not verify."""


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as err:  # pragma: no cover - depends on the install
        raise TrustError("the 'cryptography' package is not installed",
                         "pip install cryptography") from err
    return serialization, ed25519


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes (sorted keys, no spaces, UTF-8) for hashing and signing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def generate_private_key() -> Any:
    """A new Ed25519 private key."""
    _, ed25519 = _crypto()
    return ed25519.Ed25519PrivateKey.generate()


def public_bytes(key: Any) -> bytes:
    """The raw 32-byte public key of a private or public Ed25519 key."""
    serialization, ed25519 = _crypto()
    pub = key.public_key() if isinstance(key, ed25519.Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Any) -> str:
    """First 16 hex digits of sha256(raw public key)."""
    return sha256_hex(public_bytes(key))[:16]


def save_private_key(key: Any, path: str | os.PathLike[str]) -> Path:
    """Write the private key as PKCS#8 PEM (mode 0600) and its public key beside it (.pub)."""
    serialization, _ = _crypto()
    path = Path(path)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    atomic_write_bytes(path, pem, mode=0o600)
    save_public_key(key.public_key(), path.with_suffix(path.suffix + ".pub"))
    return path


def save_public_key(key: Any, path: str | os.PathLike[str]) -> Path:
    serialization, _ = _crypto()
    pem = key.public_bytes(serialization.Encoding.PEM,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    atomic_write_bytes(path, pem)
    return Path(path)


def load_private_key(path: str | os.PathLike[str]) -> Any:
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as err:
        raise TrustError(f"cannot load private key {path}: {err}",
                         "check the path, or create one with generate_private_key()") from err
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise TrustError(f"{path} is not an Ed25519 private key", "use an Ed25519 key")
    return key


def load_public_key(path_or_pem: str | os.PathLike[str] | bytes) -> Any:
    """An Ed25519 public key from a PEM file, PEM bytes, or 32 raw bytes."""
    serialization, ed25519 = _crypto()
    try:
        if isinstance(path_or_pem, bytes):
            data = path_or_pem
        else:
            data = Path(path_or_pem).read_bytes()
        if len(data) == 32:
            return ed25519.Ed25519PublicKey.from_public_bytes(data)
        key = serialization.load_pem_public_key(data)
    except (OSError, ValueError, TypeError) as err:
        raise TrustError(f"cannot load public key {path_or_pem!r}: {err}",
                         "pass a PEM public key file or 32 raw bytes") from err
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise TrustError(f"{path_or_pem!r} is not an Ed25519 public key", "use an Ed25519 key")
    return key


def sign(key: Any, data: bytes) -> bytes:
    """Detached Ed25519 signature (64 bytes) over ``data``."""
    return bytes(key.sign(data))


def verify(public_key: Any, data: bytes, signature: bytes, what: str = "data") -> None:
    """Raise TrustError unless ``signature`` is ``public_key``'s signature over ``data``."""
    from cryptography.exceptions import InvalidSignature

    try:
        public_key.verify(signature, data)
    except (InvalidSignature, ValueError, TypeError) as err:
        raise TrustError(f"signature over {what} does not verify with key {key_id(public_key)}",
                         "the content was changed or signed by another key") from err


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def dsse_sign(payload_type: str, payload: bytes, keys: list[Any]) -> dict[str, Any]:
    """A DSSE envelope over ``payload`` signed by every key in ``keys``."""
    if not keys:
        raise TrustError("a DSSE envelope needs at least one signing key", "pass a key")
    msg = pae(payload_type, payload)
    return {"payloadType": payload_type,
            "payload": base64.b64encode(payload).decode(),
            "signatures": [{"keyid": key_id(k), "sig": base64.b64encode(sign(k, msg)).decode()}
                           for k in keys]}


def dsse_verify(envelope: Mapping[str, Any], trusted: Mapping[str, Any],
                payload_type: str | None = None, what: str = "envelope") -> bytes:
    """Return the payload if at least one signature is by a key in ``trusted`` (keyid -> key).

    Raises TrustError naming ``what`` for a malformed envelope, an unexpected payload type,
    or no valid signature from a trusted key.
    """
    try:
        ptype = str(envelope["payloadType"])
        payload = base64.b64decode(envelope["payload"], validate=True)
        sigs = list(envelope["signatures"])
    except (KeyError, TypeError, ValueError) as err:
        raise TrustError(f"{what} is not a DSSE envelope ({err})",
                         "expected payloadType, payload and signatures") from err
    if payload_type is not None and ptype != payload_type:
        raise TrustError(f"{what} has payload type {ptype!r}, expected {payload_type!r}",
                         "the envelope holds another kind of statement")
    msg = pae(ptype, payload)
    seen = []
    for entry in sigs:
        kid = str(entry.get("keyid", "")) if isinstance(entry, Mapping) else ""
        seen.append(kid)
        key = trusted.get(kid)
        if key is None:
            continue
        try:
            verify(key, msg, base64.b64decode(entry["sig"], validate=True), what)
        except (TrustError, KeyError, ValueError):
            continue
        return payload
    raise TrustError(f"{what} has no valid signature from a trusted key "
                     f"(signed by {seen or 'nobody'}, trusted {sorted(trusted)})",
                     "re-sign it with an expected key, or add the signer's key to the trust list")
