"""The quarantine store: list, inspect and release quarantined samples; nothing is deleted.

A release appends a line to ``releases.jsonl`` (who/why/when) and leaves the quarantine
record and its object in place; ``accepted_samples`` counts released samples as accepted.
"""

from __future__ import annotations

import json
import os
from typing import Any

from cloud_train.ingest.gate import read_journal, read_object, store_paths
from roadshield_base.errors import DatasetError


def releases(store: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Release records by ``<index_sha256>:<line>``."""
    path = store_paths(store)["releases"]
    out = {}
    if path.exists():
        for raw in path.read_bytes().split(b"\n"):
            try:
                rec = json.loads(raw)
                out[rec["key"]] = rec
            except (ValueError, KeyError, TypeError):
                continue
    return out


def _key(rec: dict[str, Any]) -> str:
    return f"{rec['index_sha256']}:{rec['line']}"


def quarantined(store: str | os.PathLike[str], include_released: bool = False
                ) -> list[dict[str, Any]]:
    """Quarantined records (each with a ``key`` and ``released`` flag)."""
    rel = releases(store)
    out = []
    for rec in read_journal(store):
        if rec["decision"] != "QUARANTINED":
            continue
        rec = {**rec, "key": _key(rec), "released": _key(rec) in rel}
        if include_released or not rec["released"]:
            out.append(rec)
    return out


def find(store: str | os.PathLike[str], ref: str) -> dict[str, Any]:
    """The quarantined record whose key, sample id or object sha256 is ``ref``."""
    hits = [r for r in quarantined(store, include_released=True)
            if ref in (r["key"], r["id"], r["object"])]
    if len(hits) != 1:
        raise DatasetError(f"{len(hits)} quarantined samples match {ref!r} in {store}",
                           "use the key printed by `roadshield data quarantine list`")
    return hits[0]


def export(store: str | os.PathLike[str], ref: str, out: str | os.PathLike[str]) -> str:
    """Write a quarantined sample's image bytes to ``out`` for inspection; returns the path."""
    from roadshield_base.fileio import atomic_write_bytes

    atomic_write_bytes(out, read_object(store, find(store, ref)))
    return str(out)


def release(store: str | os.PathLike[str], ref: str, reason: str, now: str) -> dict[str, Any]:
    """Release one quarantined sample into the accepted set (append-only, idempotent)."""
    rec = find(store, ref)
    read_object(store, rec)  # only samples whose bytes were kept, intact, can be released
    if rec["released"]:
        return rec
    line = {"key": rec["key"], "id": rec["id"], "object": rec["object"],
            "label": rec["label"], "reason": reason, "time": now}
    path = store_paths(store)["releases"]
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, json.dumps(line, sort_keys=True).encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return {**rec, "released": True}


def accepted_samples(store: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """ACCEPTED records plus released quarantined ones: what training may read."""
    rel = releases(store)
    return [r for r in read_journal(store)
            if r["decision"] == "ACCEPTED"
            or (r["decision"] == "QUARANTINED" and _key(r) in rel)]
