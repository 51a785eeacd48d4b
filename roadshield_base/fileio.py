"""Crash-safe file writes and content addressing, shared by every tier.

A reader sees either the old file or the new one, never half of it: data goes to a
temporary file in the same folder, is flushed and fsynced, then renamed over the target.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from roadshield_base.errors import ModelLoadError


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int | None = None
                       ) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename).

    mode: file permissions, set before any byte is written (0o600 for secrets), so no
    reader ever sees the content under looser permissions. By default a new file gets
    what ``open`` would give it (0o666 less the umask), not the temp file's 0o600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode if mode is not None else _default_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """``obj`` as indented, key-sorted JSON, written atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks; ModelLoadError if unreadable."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as err:
        raise ModelLoadError(f"cannot read {path}: {err.strerror or err}",
                             "check the path and its permissions") from err
    return h.hexdigest()
