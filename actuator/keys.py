"""Per-device link keys: 32 bytes, stored as one line of hex, readable by owner only.

A board's key comes from an X25519 agreement (``actuator.provision``); ``generate_key``
makes random keys for tests and simulators.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from roadshield_base.errors import ActuatorError
from roadshield_base.fileio import atomic_write_bytes

from .protocol import FACTORY_KEY, KEY_LEN


def generate_key() -> bytes:
    """32 bytes from the OS's CSPRNG, never the all-zero factory key."""
    while True:
        key = secrets.token_bytes(KEY_LEN)
        if key != FACTORY_KEY:
            return key


def load_key(path: str | os.PathLike[str]) -> bytes:
    """Read a key file (64 hex characters); raises ActuatorError naming the file."""
    path = Path(path)
    try:
        text = path.read_text().strip()
    except FileNotFoundError as err:
        raise ActuatorError(f"key file {path} does not exist",
                            "provision a board into it with `roadshield actuator provision "
                            f"--key-file {path} --port <port>` (boot the board with its "
                            "provisioning button held first)") from err
    except OSError as err:
        raise ActuatorError(f"cannot read key file {path}: {err}",
                            "check the file's permissions (it should be mode 600)") from err
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_LEN or key == FACTORY_KEY:
        raise ActuatorError(f"key file {path} does not hold a 32-byte key in hex",
                            "the file must hold 64 hex characters, as `provision` writes it")
    return key


def save_key(path: str | os.PathLike[str], key: bytes) -> None:
    """Write ``key`` as hex atomically (temp file, fsync, rename), mode 600."""
    if len(key) != KEY_LEN:
        raise ActuatorError(f"a key is {KEY_LEN} bytes, got {len(key)}",
                            "pass the 32-byte key an agreement produced")
    atomic_write_bytes(path, (key.hex() + "\n").encode(), mode=0o600)
