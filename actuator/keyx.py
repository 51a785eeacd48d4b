"""X25519 key agreement for PROVISION and REKEY (RFC 7748), on ``cryptography``.

The host sends its public key, the device answers with its own (KEY frame), and both
derive the device key with ``protocol.derive_device_key``; the key never crosses the
wire. The firmware does the same with Monocypher's ``crypto_x25519``.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from . import protocol as p

PUBLIC_LEN = 32


def public_key(secret: bytes) -> bytes:
    """The 32-byte X25519 public key of a 32-byte secret (clamped as RFC 7748 says)."""
    return X25519PrivateKey.from_private_bytes(secret).public_key().public_bytes_raw()


def shared_secret(secret: bytes, peer_public: bytes) -> bytes | None:
    """X25519(secret, peer_public); None when the peer's point gives the all-zero secret."""
    try:
        return X25519PrivateKey.from_private_bytes(secret).exchange(
            X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:  # low-order point: the result would be all zeros
        return None


def agree(secret: bytes, own_public: bytes, peer_public: bytes, *, host: bool) -> bytes | None:
    """The device key both ends derive; ``host`` says which public key is whose."""
    shared = shared_secret(secret, peer_public)
    if shared is None:
        return None
    host_pub, dev_pub = (own_public, peer_public) if host else (peer_public, own_public)
    return p.derive_device_key(shared, host_pub, dev_pub)
