"""The source registry: the allow-list of data providers and their Ed25519 public keys.

Stored as one DSSE envelope (``sources.json``) signed by the project's root key, so a
provider can only be added or revoked by whoever holds that key; the gate verifies the
envelope with the root *public* key before trusting any entry. Revoking keeps the entry
(with the time) so old decisions stay explainable; nothing is ever removed.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from roadshield_base.errors import ConfigError
from roadshield_base.fileio import atomic_write_json
from roadshield_base.trust import (
    TrustError,
    dsse_sign,
    dsse_verify,
    key_id,
    load_public_key,
    public_bytes,
)

PAYLOAD_TYPE = "application/vnd.roadshield.sources+json"
REGISTRY_NAME = "sources.json"


@dataclass(frozen=True)
class Source:
    name: str
    keyid: str
    public_key: str  # base64 of the raw 32-byte Ed25519 public key
    added: str
    revoked: str = ""

    @property
    def active(self) -> bool:
        return not self.revoked

    def key(self) -> Any:
        return load_public_key(base64.b64decode(self.public_key))


def load_registry(path: str | os.PathLike[str], root_public: Any) -> dict[str, Source]:
    """Sources by name from a registry file signed by ``root_public``; TrustError if not."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        envelope = json.loads(path.read_bytes())
    except (OSError, ValueError) as err:
        raise TrustError(f"source registry {path} is unreadable: {err}",
                         "restore it from a backup, or re-create it with `data sources add`"
                         ) from err
    payload = dsse_verify(envelope, {key_id(root_public): root_public}, PAYLOAD_TYPE,
                          what=f"source registry {path}")
    out = {}
    for entry in json.loads(payload)["sources"]:
        src = Source(**entry)
        out[src.name] = src
    return out


def _save(path: Path, sources: dict[str, Source], root_key: Any) -> None:
    payload = json.dumps({"sources": [vars(s) for s in sorted(sources.values(),
                                                                 key=lambda s: s.name)]},
                         sort_keys=True).encode()
    atomic_write_json(path, dsse_sign(PAYLOAD_TYPE, payload, [root_key]))


def add_source(path: str | os.PathLike[str], root_key: Any, name: str, public_key: Any,
               now: str) -> Source:
    """Allow ``name`` with ``public_key``; re-adding a revoked name with a new key is allowed."""
    path = Path(path)
    if (not name or not all(c.isalnum() or c in "._-" for c in name) or len(name) > 64
            or not name.strip(".")):  # "." and ".." would name folders outside the ledger
        raise ConfigError(f"source name {name!r} is not allowed",
                          "use 1-64 letters, digits, '.', '_' or '-'")
    sources = load_registry(path, root_key.public_key())
    old = sources.get(name)
    if old is not None and old.active:
        raise ConfigError(f"source {name!r} is already registered (key {old.keyid})",
                          "revoke it first to rotate its key")
    sources[name] = Source(name, key_id(public_key),
                           base64.b64encode(public_bytes(public_key)).decode(), now)
    _save(path, sources, root_key)
    return sources[name]


def revoke_source(path: str | os.PathLike[str], root_key: Any, name: str, now: str) -> Source:
    """Mark ``name`` revoked: its batches are rejected from now on."""
    path = Path(path)
    sources = load_registry(path, root_key.public_key())
    if name not in sources:
        raise ConfigError(f"source {name!r} is not in the registry {path}",
                          "list the sources with `roadshield data sources list`")
    old = sources[name]
    sources[name] = Source(old.name, old.keyid, old.public_key, old.added, old.revoked or now)
    _save(path, sources, root_key)
    return sources[name]


def list_sources(path: str | os.PathLike[str], root_public: Any) -> list[Source]:
    return sorted(load_registry(path, root_public).values(), key=lambda s: s.name)
