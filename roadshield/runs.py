"""Run folders: ``runs/<id>/`` holds everything one run wrote; ``runs/latest`` points at the newest.

A run is built in a hidden ``runs/.<id>.partial`` folder and renamed into place
only once it has finished, and ``latest`` is swapped atomically after that, so a
crash or an error never leaves a half-written run behind ``runs/latest``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from roadshield_base.errors import ConfigError


def new_run_id() -> str:
    """Sortable, collision-resistant id such as ``20261129-081502-3fa2``."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def point_latest(runs_dir: Path, run_dir: Path) -> None:
    """Make ``runs_dir/latest`` a relative symlink to ``run_dir``, replacing it atomically."""
    link = runs_dir / "latest"
    tmp = runs_dir / f".latest.{secrets.token_hex(4)}"
    tmp.symlink_to(run_dir.name, target_is_directory=True)
    os.replace(tmp, link)


@contextmanager
def staged_run(runs_dir: str | Path, run_id: str | None = None) -> Iterator[Path]:
    """Yield a partial run folder; publish it as ``runs/<id>`` and ``runs/latest`` on success.

    On any exception the partial folder is kept as ``runs/.<id>.failed`` for
    inspection (nothing is deleted) and ``latest`` still points at the old run.
    """
    runs = Path(runs_dir)
    runs.mkdir(parents=True, exist_ok=True)
    rid = run_id or new_run_id()
    final = runs / rid
    if final.exists():
        raise ConfigError(f"run folder {final} already exists", "pick another run id")
    partial = runs / f".{rid}.partial"
    partial.mkdir()
    try:
        yield partial
    except BaseException:
        failed = runs / f".{rid}.failed"
        shutil.rmtree(failed, ignore_errors=True)
        os.replace(partial, failed)
        raise
    os.replace(partial, final)
    point_latest(runs, final)
