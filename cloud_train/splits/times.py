"""Capture times for a temporal split: from a CSV, or from the ingest gate's journal.

Both return float64 seconds since the epoch (UTC), one per dataset image, in the order of
the ``paths`` / ``images`` given.

- ``times_from_csv``: lines ``path;time`` (ISO 8601 or epoch seconds), paths relative to
  the dataset root; a header line starting with ``path;`` is skipped.
- ``times_from_store``: the capture times the gate recorded for accepted samples (released
  quarantine counts as accepted). A dataset image is matched to a record by the sha256 of
  its decoded pixels after the same resize ``load_gtsrb`` applies (``cv2.INTER_AREA`` to
  size x size, RGB), so a sample converted from the batch's PNG to the dataset's PPM still
  matches. An image no accepted record matches is an error: the split would otherwise
  hold data that never passed the gate. When identical pixels were accepted more than once,
  the latest capture time counts, so a copy seen after the cut never lands in train.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np

from roadshield_base.errors import ConfigError, DatasetError


def parse_time(text: str) -> float:
    """Epoch seconds from epoch seconds or ISO 8601 (naive means UTC)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as err:
        raise ConfigError(f"cannot read time {text!r}", "use ISO 8601 or epoch seconds") from err
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()


def times_from_csv(path: str | os.PathLike[str], base: Path,
                   paths: Sequence[Path]) -> np.ndarray:
    """Capture time of each of ``paths`` from a ``path;time`` CSV (paths relative to
    ``base``); DatasetError naming the first image without a time."""
    table: dict[str, float] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip() or line.lower().startswith("path;"):
            continue
        try:
            name, when = line.rsplit(";", 1)
        except ValueError as err:
            raise DatasetError(f"{path} line {n} is not 'path;time'", "fix the line") from err
        table[name.strip()] = parse_time(when)
    rel = [p.resolve().relative_to(base.resolve()).as_posix() for p in paths]
    missing = [r for r in rel if r not in table]
    if missing:
        raise DatasetError(f"{path} has no capture time for {len(missing)} images "
                           f"(first: {missing[0]})", "give every image a time")
    return np.array([table[r] for r in rel], np.float64)


def _record_pixels(data: bytes, size: int) -> np.ndarray | None:
    """A stored sample's pixels as ``load_gtsrb`` would return them (size x size RGB)."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        return None
    if bgr.shape[:2] != (size, size):
        bgr = cv2.resize(bgr, (size, size), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(bgr[..., ::-1])


def times_from_store(store: str | os.PathLike[str], images: np.ndarray,
                     paths: Sequence[Path]) -> np.ndarray:
    """Capture time of each dataset image from the ingest store's accepted records.

    images: N x S x S x 3 uint8 RGB as loaded by ``load_gtsrb`` (S is taken from them);
    paths: the N files, for error messages. See the module doc for the matching rule.
    """
    from cloud_train.ingest.gate import read_object
    from cloud_train.ingest.store import accepted_samples
    from cloud_train.splits.dedup import pixel_sha256

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] != images.shape[2] or len(images) != len(paths):
        raise DatasetError(f"{images.shape} images for {len(paths)} paths",
                           "pass N x S x S x 3 images loaded by load_gtsrb and their paths")
    records = accepted_samples(store)
    if not records:
        raise DatasetError(f"the ingest store {store} holds no accepted samples",
                           "ingest the dataset's batches with `roadshield data ingest` first")
    size = int(images.shape[1])
    latest: dict[str, float] = {}
    for rec in records:
        when = rec.get("capture_time")
        if not when:
            raise DatasetError(f"journal record {rec['id']} of batch {rec['batch_id']} in "
                               f"{store} has no capture time", "records written before capture "
                               "times were journaled lack it: re-ingest the batch into a "
                               "fresh store, or pass --times CSV")
        pixels = _record_pixels(read_object(store, rec), size)
        if pixels is None:
            continue
        key = pixel_sha256(pixels)
        latest[key] = max(latest.get(key, -np.inf), parse_time(str(when)))
    keys = [pixel_sha256(img) for img in images]
    missing = [i for i, k in enumerate(keys) if k not in latest]
    if missing:
        raise DatasetError(f"{len(missing)} of {len(keys)} dataset images match no accepted "
                           f"sample in the ingest store {store} (first: {paths[missing[0]]})",
                           "split only data that passed the gate, or pass --times CSV")
    return np.array([latest[k] for k in keys], np.float64)
