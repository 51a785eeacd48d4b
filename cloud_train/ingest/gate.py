"""The ingest gate: every sample of a source batch ends ACCEPTED, QUARANTINED or REJECTED.

Order of checks: source allow-list -> batch signature -> batch id not replayed -> per-image
sha256 -> schema and range (index fields, decodable, size, channels, dtype, label, capture
time) -> statistical screen (KS of the batch vs the reference; Isolation Forest and range
per sample) -> label consistency (kNN share and posterior in a feature space learned from
the trusted reference only; see ``cloud_train.ingest.reference``).

The store (a folder) holds ``root.pub`` and ``sources.json`` (the signed registry),
``reference/`` (trusted images, labels and the cached label-screen network),
``objects/<index sha256>.pack`` (accepted and quarantined image bytes, appended; each
record names offset, length and sha256),
``journal/<index sha256>.jsonl`` (one decision per line, append-only: batch id, index
line, sample id, file, label, sha256, capture time, decision, reason codes, object),
``batches/<batch id>.json`` (which index a batch id was first seen with) and
``releases.jsonl``. A decision is appended as one whole line per write, after the image
bytes it points at, so after ``kill -9`` a rerun finds every finished decision, skips it
and decides the rest identically: received = accepted + quarantined + rejected holds
at every point.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from cloud_train.ingest import batch as bfmt
from cloud_train.ingest.reference import Reference, ScreenConfig
from cloud_train.ingest.registry import REGISTRY_NAME, load_registry
from cloud_train.ingest.screens import (
    check_image,
    image_features,
    row_label,
    to_feature_size,
    validate_row,
)
from cloud_train.signs import SYNTHETIC_CLASSES
from roadshield_base.errors import DatasetError
from roadshield_base.fileio import atomic_write_bytes, atomic_write_json
from roadshield_base.trust import TrustError, load_public_key, sha256_hex, verify

EXIT_ACCEPTED, EXIT_REJECTED, EXIT_QUARANTINED = 0, 2, 3
MAX_FILE_BYTES = 8 << 20
MAX_PIXELS = 1 << 20
_SAFE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def store_paths(store: str | os.PathLike[str]) -> dict[str, Path]:
    s = Path(store)
    return {"root": s, "root_pub": s / "root.pub", "registry": s / REGISTRY_NAME,
            "reference": s / "reference", "objects": s / "objects", "journal": s / "journal",
            "batches": s / "batches", "releases": s / "releases.jsonl", "unpack": s / "unpack"}


def init_store(store: str | os.PathLike[str], root_public: Any) -> Path:
    """Create a store that trusts ``root_public`` for its source registry."""
    from roadshield_base.trust import save_public_key

    p = store_paths(store)
    for k in ("objects", "journal", "batches"):
        p[k].mkdir(parents=True, exist_ok=True)
    if not p["root_pub"].exists():
        save_public_key(root_public, p["root_pub"])
    return p["root"]


def build_reference(store: str | os.PathLike[str], images_rgb: np.ndarray,
                    labels: np.ndarray | Sequence[int], n_classes: int,
                    config: ScreenConfig | None = None) -> Reference:
    """Fit and save the trusted reference from n x H x W x 3 uint8 RGB images (each resized
    to 32 x 32); this trains the label screen's network once and caches it in the store."""
    imgs = np.stack([to_feature_size(np.asarray(i)) for i in images_rgb])
    ref = Reference(imgs, np.asarray(labels), n_classes, config)
    ref.save(store_paths(store)["reference"])
    return ref


def _record(rb: bfmt.RawBatch, row: bfmt.IndexRow, decision: str, reasons: list[str],
            obj: dict[str, Any] | None = None) -> dict[str, Any]:
    f = row.fields
    return {"batch_id": rb.batch_id, "index_sha256": rb.index_sha256, "line": row.line,
            "id": row.sample_id, "file": str(f.get("file", "")), "label": f.get("label"),
            "sha256": str(f.get("sha256", "")), "capture_time": f.get("capture_time"),
            "decision": decision, "reasons": reasons,
            **(obj or {"object": "", "pack": ""})}


def read_records(path: Path) -> dict[int, dict[str, Any]]:
    """Decision records of one journal by index line; torn or garbled lines are skipped."""
    done: dict[int, dict[str, Any]] = {}
    if path.exists():
        for raw in path.read_bytes().split(b"\n"):
            try:
                rec = json.loads(raw)
                done[int(rec["line"])] = rec
            except (ValueError, KeyError, TypeError):
                continue
    return done


class _Journal:
    """Append-only decision lines; a torn last line (crash mid-write) is ignored on read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done = read_records(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # a crash may leave half a line: start a new line so the next record stays whole
        needs_nl = path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if needs_nl:
            os.write(self.fd, b"\n")

    def add(self, rec: dict[str, Any]) -> None:
        os.write(self.fd, json.dumps(rec, sort_keys=True).encode() + b"\n")  # one write per line
        self.done[int(rec["line"])] = rec

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)


class _Pack:
    """Append-only pack of image bytes for one batch; records point at (offset, length).

    A crash can leave unreferenced bytes at the tail; a rerun appends after them, so a
    referenced range is never rewritten.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.name = path.name
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def add(self, data: bytes) -> dict[str, Any]:
        offset = os.lseek(self.fd, 0, os.SEEK_END)
        os.write(self.fd, data)
        return {"object": sha256_hex(data), "pack": self.name, "offset": offset,
                "length": len(data)}

    def close(self) -> None:
        os.fsync(self.fd)  # the bytes reach the disk before the journal is synced
        os.close(self.fd)


def read_object(store: str | os.PathLike[str], rec: dict[str, Any]) -> bytes:
    """The stored image bytes of a decision record, checked against its sha256."""
    if not rec.get("pack"):
        raise DatasetError(f"sample {rec.get('id')} has no stored bytes ({rec.get('reasons')})",
                           "only samples whose image file could be read are kept")
    path = store_paths(store)["objects"] / Path(str(rec["pack"])).name
    with open(path, "rb") as f:
        f.seek(int(rec["offset"]))
        data = f.read(int(rec["length"]))
    if sha256_hex(data) != rec["object"]:
        raise DatasetError(f"stored bytes of sample {rec.get('id')} in {path} are corrupt",
                           "restore the store from a backup")
    return data


def _summary(rb: bfmt.RawBatch | None, records: Sequence[dict[str, Any]],
             batch_reasons: list[str], extra: dict[str, Any]) -> dict[str, Any]:
    counts = Counter(r["decision"] for r in records)
    reasons = Counter(code for r in records for code in r["reasons"])
    status = ("REJECTED" if counts["REJECTED"] or batch_reasons else
              "QUARANTINED_SOME" if counts["QUARANTINED"] else "ACCEPTED")
    code = {"REJECTED": EXIT_REJECTED, "QUARANTINED_SOME": EXIT_QUARANTINED}.get(status, 0)
    return {"batch_id": rb.batch_id if rb else "", "index_sha256": rb.index_sha256 if rb else "",
            "status": status, "exit_code": code, "received": len(records),
            "accepted": counts["ACCEPTED"], "quarantined": counts["QUARANTINED"],
            "rejected": counts["REJECTED"], "batch_reasons": batch_reasons,
            "reason_counts": dict(sorted(reasons.items())), **extra}


def _batch_check(rb: bfmt.RawBatch, p: dict[str, Path]) -> list[str]:
    """Source allow-list, signature and replay: any reason here rejects the whole batch."""
    if rb.signature is None:
        return ["SIGNATURE_MISSING"]
    try:
        root_pub = load_public_key(p["root_pub"])
        sources = load_registry(p["registry"], root_pub)
    except TrustError:
        return ["REGISTRY_UNTRUSTED"]
    src = sources.get(str(rb.signature.get("source")))
    if src is None:
        return ["SOURCE_UNKNOWN"]
    if not src.active:
        return ["SOURCE_REVOKED"]
    try:
        if rb.signature.get("keyid") != src.keyid:
            raise TrustError("key id mismatch")
        verify(src.key(), rb.index_bytes, base64.b64decode(str(rb.signature["signature"])),
               "batch index")
    except (TrustError, ValueError):
        return ["SIGNATURE_INVALID"]
    if not _SAFE.match(rb.batch_id):
        return ["BATCH_ID_INVALID"]
    row_sources = {r.fields.get("source") for r in rb.rows if not r.parse_error}
    if row_sources - {src.name}:
        return ["SOURCE_MISMATCH"]
    ledger = p["batches"] / f"{rb.batch_id}.json"
    if ledger.exists():
        first = json.loads(ledger.read_text())
        if first.get("index_sha256") != rb.index_sha256:
            return ["REPLAYED_BATCH_ID"]
    else:
        atomic_write_json(ledger, {"batch_id": rb.batch_id, "index_sha256": rb.index_sha256,
                                   "source": src.name})
    return []


def _sample(root: Path, row: bfmt.IndexRow, n_classes: int, now: datetime,
            seen: set[str]) -> tuple[list[str], bytes, np.ndarray | None]:
    """Hash, schema and range checks of one row: (reasons, image bytes, RGB image)."""
    if row.parse_error:
        return [row.parse_error.split(":")[0]], b"", None
    f = row.fields
    if row.sample_id in seen:
        return ["DUPLICATE_ID"], b"", None
    seen.add(row.sample_id)
    where = bfmt.safe_path(root, str(f.get("file", "")))
    if isinstance(where, str):
        return [where], b"", None
    if where.stat().st_size > MAX_FILE_BYTES:
        return ["FILE_TOO_LARGE"], b"", None
    data = where.read_bytes()
    if sha256_hex(data) != str(f.get("sha256", "")).lower():
        return ["HASH_MISMATCH"], data, None
    reasons = validate_row(f, n_classes, now, bfmt.INDEX_FIELDS)
    img = bfmt.decode_image(data, MAX_PIXELS)
    if isinstance(img, str):
        return reasons + [img], data, None
    reasons += check_image(img)
    return reasons, data, (None if reasons else img)


def ingest(batch_path: str | os.PathLike[str], store: str | os.PathLike[str],
           class_names: Sequence[str] = SYNTHETIC_CLASSES,
           now: datetime | None = None, reference: Reference | None = None
           ) -> dict[str, Any]:
    """Run the gate on one batch folder or tar; returns the summary (see ``_summary``).

    ``reference`` skips loading (and refitting) the store's screening reference.
    """
    p = store_paths(store)
    now = now or datetime.now(timezone.utc)
    src = Path(batch_path)
    if src.is_file():
        src = bfmt.extract_tar(src, p["unpack"] / sha256_hex(src.read_bytes())[:32])
    try:
        rb = bfmt.read_batch(src)
    except DatasetError as err:
        return _summary(None, [], ["BATCH_UNREADABLE"], {"error": str(err)})
    journal = _Journal(p["journal"] / f"{rb.index_sha256}.jsonl")
    try:
        batch_reasons = _batch_check(rb, p)
        if batch_reasons:
            for row in rb.rows:
                if row.line not in journal.done:
                    journal.add(_record(rb, row, "REJECTED", batch_reasons))
            return _summary(rb, list(journal.done.values()), batch_reasons, {})
        ref = reference or Reference.load(p["reference"])
        seen: set[str] = set()
        checked = [(row, *_sample(src, row, len(class_names), now, seen)) for row in rb.rows]
        decoded = {i: c[3] for i, c in enumerate(checked) if c[3] is not None}
        good = list(decoded)
        stat: dict[str, Any] = {"shifted": False}
        screens: dict[int, list[str]] = {}
        if good:
            small = np.stack([to_feature_size(decoded[i]) for i in good])
            feats = image_features(small)
            labels = np.array([row_label(checked[i][0].fields) for i in good])
            stat = ref.batch_shift(feats)
            for i, reasons in zip(good, ref.screen(feats, labels, small), strict=True):
                screens[i] = reasons + (["BATCH_DISTRIBUTION_SHIFT"] if stat["shifted"] else [])
        pack = _Pack(p["objects"] / f"{rb.index_sha256}.pack")
        try:
            for i, (row, reasons, data, _) in enumerate(checked):
                if row.line in journal.done:
                    continue
                reasons = reasons + screens.get(i, [])
                obj = pack.add(data) if data else None
                journal.add(_record(rb, row, "QUARANTINED" if reasons else "ACCEPTED", reasons,
                                    obj))
        finally:
            pack.close()
        return _summary(rb, list(journal.done.values()), [], {"ks": stat})
    finally:
        journal.close()


def read_journal(store: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every decision record in the store, in journal order."""
    out: list[dict[str, Any]] = []
    for path in sorted(store_paths(store)["journal"].glob("*.jsonl")):
        out.extend(read_records(path).values())
    return out


def write_summary(path: str | os.PathLike[str], summary: dict[str, Any]) -> None:
    atomic_write_bytes(path, json.dumps(summary, indent=2, sort_keys=True).encode() + b"\n")
