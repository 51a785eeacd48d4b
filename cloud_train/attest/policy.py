"""Stage keys and the root-signed trust policy naming the expected key per stage.

``make_stage_keys(DIR)`` writes ``root.key``, ``gate.key`` (the ingest gate's export key),
one ``<stage>.key`` per stage and ``trainer.key`` (PKCS#8 PEM, mode 0600, each with a
``.pub`` beside it) and
``policy.json``: a DSSE envelope (payload type ``application/vnd.roadshield.stage-policy+json``)
signed by the root key over::

    {"version": 1, "root_keyid": "...",
     "stages": {"decode": {"keyid": "...", "public_key": "<base64 raw 32 bytes>"}, ...},
     "trainer": {"keyid": "...", "public_key": "..."},
     "gate": {"keyid": "...", "public_key": "..."}}

Verification needs only ``policy.json`` and the root public key (``root.key.pub``); pin the
root key id where the policy file itself could be swapped.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from roadshield_base.errors import ConfigError
from roadshield_base.fileio import atomic_write_json
from roadshield_base.trust import (
    TrustError,
    canonical_json,
    dsse_sign,
    dsse_verify,
    generate_private_key,
    key_id,
    load_private_key,
    load_public_key,
    public_bytes,
    save_private_key,
)

STAGES = ("decode", "normalise", "augment", "shard")
TRAINER = "trainer"
GATE = "gate"  # signs the ingest gate's exports, the only input stage 2 reads
POLICY_TYPE = "application/vnd.roadshield.stage-policy+json"
POLICY_FILE = "policy.json"
ROOT_KEY = "root.key"
# What each stage may change and must keep (cloud_train.attest.invariants checks it); every
# stage statement repeats its entry, and verify refuses one that declares anything else.
DECLARED: dict[str, dict[str, str]] = {
    "decode": {"may_change": "pixels: decoded and resized from the gate export's files",
               "keeps": "one row per exported sample, with the gate's label for its file"},
    "normalise": {"may_change": "adds stats.json",
                  "keeps": "images, labels, rows and classes byte for byte"},
    "augment": {"may_change": "appends seeded, replayable variants of every row",
                "keeps": "original rows and labels; each variant has its original's label"},
    "shard": {"may_change": "row order and the split into files",
              "keeps": "every augment row exactly once, with its label and pixels"},
}
# the largest augmentation a signed augment statement may claim
AUGMENT_LIMITS = {"copies": 4, "max_shift_px": 4, "gain": 0.2}


@dataclass(frozen=True)
class StagePolicy:
    """Who may sign what. keyids: stage (or "trainer") -> key id; keys: key id -> public key."""

    keyids: dict[str, str]
    keys: dict[str, Any] = field(repr=False)
    root_keyid: str
    path: Path | None = None

    def trusted(self, role: str) -> dict[str, Any]:
        """``{keyid: public key}`` holding only the key expected for ``role``."""
        kid = self.keyids.get(role)
        if kid is None:
            raise ConfigError(f"the stage policy {self.path} names no key for {role!r}",
                              "recreate the keys with `roadshield data keys init DIR`")
        return {kid: self.keys[kid]}


def _entry(key: Any) -> dict[str, str]:
    return {"keyid": key_id(key), "public_key": base64.b64encode(public_bytes(key)).decode()}


def make_stage_keys(keys_dir: str | os.PathLike[str], overwrite: bool = False) -> StagePolicy:
    """Create root, gate, stage and trainer keys in ``keys_dir`` and the root-signed
    policy.json.

    Refuses (ConfigError) to replace existing keys unless ``overwrite``.
    """
    keys_dir = Path(keys_dir)
    if (keys_dir / POLICY_FILE).exists() and not overwrite:
        raise ConfigError(f"{keys_dir / POLICY_FILE} already exists",
                          "use another folder, or pass overwrite=True to rotate every key")
    keys_dir.mkdir(parents=True, exist_ok=True)
    root = generate_private_key()
    save_private_key(root, keys_dir / ROOT_KEY)
    body: dict[str, Any] = {"version": 1, "root_keyid": key_id(root), "stages": {}}
    for role in (*STAGES, TRAINER, GATE):
        key = generate_private_key()
        save_private_key(key, keys_dir / f"{role}.key")
        if role in (TRAINER, GATE):
            body[role] = _entry(key)
        else:
            body["stages"][role] = _entry(key)
    atomic_write_json(keys_dir / POLICY_FILE, dsse_sign(POLICY_TYPE, canonical_json(body), [root]))
    return load_policy(keys_dir)


def load_stage_key(keys_dir: str | os.PathLike[str], role: str) -> Any:
    """The private key of ``role`` (a stage name, "trainer" or "gate") from ``keys_dir``."""
    path = Path(keys_dir) / f"{role}.key"
    if not path.is_file():
        raise ConfigError(f"no key for {role!r} at {path}",
                          "create the keys with `roadshield data keys init DIR`")
    return load_private_key(path)


def load_policy(path: str | os.PathLike[str], root_public_key: Any = None,
                root_keyid: str | None = None) -> StagePolicy:
    """Load and verify a stage policy (a keys folder or its policy.json).

    The root key defaults to ``root.key.pub`` beside the policy; ``root_keyid`` pins it.
    Raises TrustError if the policy is not signed by that root key or is malformed.
    """
    path = Path(path)
    file = path / POLICY_FILE if path.is_dir() else path
    if root_public_key is None:
        root_public_key = load_public_key(file.parent / (ROOT_KEY + ".pub"))
    if root_keyid is not None and key_id(root_public_key) != root_keyid:
        raise TrustError(f"root key {key_id(root_public_key)} is not the pinned {root_keyid}",
                         "use the project's root public key")
    try:
        envelope = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TrustError(f"cannot read stage policy {file}: {err}",
                         "create one with `roadshield data keys init DIR`") from err
    payload = dsse_verify(envelope, {key_id(root_public_key): root_public_key}, POLICY_TYPE,
                          what=f"stage policy {file}")
    try:
        body = json.loads(payload)
        entries = {**{s: body["stages"][s] for s in STAGES}, TRAINER: body[TRAINER]}
        if GATE in body:  # policies made before exports existed name no gate key
            entries[GATE] = body[GATE]
        keyids, keys = {}, {}
        for role, entry in entries.items():
            pub = load_public_key(base64.b64decode(entry["public_key"], validate=True))
            if key_id(pub) != entry["keyid"]:
                raise ValueError(f"{role} keyid {entry['keyid']} does not match its key")
            keyids[role], keys[key_id(pub)] = key_id(pub), pub
    except (KeyError, TypeError, ValueError) as err:
        raise TrustError(f"stage policy {file} is malformed: {err}",
                         "recreate it with `roadshield data keys init DIR`") from err
    return StagePolicy(keyids, keys, key_id(root_public_key), file)
