"""The ingest gate: every sample of a source batch ends ACCEPTED, QUARANTINED or REJECTED.

Order of checks: source allow-list -> batch signature -> per-batch caps (rows, image bytes)
-> batch id not replayed by its source -> per-image sha256 -> duplicate content in the
batch -> schema and range (index fields, header size before decoding, decodable, size,
channels, dtype, label, capture time) -> statistical screen (class-conditional KS of the
batch vs the reference; Isolation Forest and range per sample) -> label consistency (kNN
share and posterior in a feature space learned from the trusted reference only; see
``cloud_train.ingest.reference``) -> the batch trigger screen (each class of the batch as a
whole against the reference: a pattern shared by many of its images, a correct-label
backdoor; ``cloud_train.ingest.batch_screens``). The summary's status and exit code separate
a few held samples (3) from a suspect batch (4); FORMAT.md states the rule.

The checks of each row run in index order in one thread; the images are then decoded, and
the screens run, on a small thread pool (one thread per core), their results gathered in
index order, so the decisions, the journal and the stored objects are the same as with one
thread (``ingest(..., workers=1)``).

The store (a folder) holds ``root.pub`` and ``sources.json`` (the signed registry),
``reference/`` (trusted images, labels, the cached label-screen network and everything
fitted on them, restored without refitting; see ``cloud_train.ingest.reference``),
``objects/<index sha256>.pack`` (accepted and quarantined image bytes, appended, each
distinct content once per store; each record names pack, offset, length and sha256, and
``duplicate_of`` when an earlier batch stored the bytes),
``journal/<index sha256>.jsonl`` (one decision per line, append-only: batch id, index
line, sample id, file, label, sha256, capture time, decision, reason codes, object),
``batches/<source>/<batch id>.json`` (which index a source's batch id was first seen
with; a store from before ids were per source has ``batches/<batch id>.json``, read for the
source it names) and
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
from typing import TYPE_CHECKING, Any

from cloud_train.ingest import batch as bfmt
from cloud_train.ingest.registry import REGISTRY_NAME, load_registry
from cloud_train.signs import SYNTHETIC_CLASSES

if TYPE_CHECKING:  # NumPy, OpenCV, the screens, threads: loaded once a batch passes its checks
    from concurrent.futures import Future

    import numpy as np

    from cloud_train.ingest.reference import Reference, ScreenConfig
    from cloud_train.ingest.workers import Pool
from roadshield_base.errors import DatasetError
from roadshield_base.fileio import atomic_write_bytes, atomic_write_json
from roadshield_base.trust import TrustError, load_public_key, sha256_hex, verify

EXIT_ACCEPTED, EXIT_REJECTED, EXIT_QUARANTINED, EXIT_SUSPECT = 0, 2, 3, 4
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
    import numpy as np

    from cloud_train.ingest.reference import Reference
    from cloud_train.ingest.screens import to_feature_size

    imgs = np.stack([to_feature_size(np.asarray(i)) for i in images_rgb])
    ref = Reference(imgs, np.asarray(labels), n_classes, config)
    ref.save(store_paths(store)["reference"])
    return ref


def _record(rb: bfmt.RawBatch, row: bfmt.IndexRow, decision: str, reasons: list[str],
            obj: dict[str, Any] | None = None) -> dict[str, Any]:
    f = row.fields
    return {"batch_id": rb.batch_id, "index_sha256": rb.index_sha256, "line": row.line,
            "source": str((rb.signature or {}).get("source", "")),
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


_encode = json.JSONEncoder(sort_keys=True).encode  # json.dumps(rec, sort_keys=True), one encoder


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
        os.write(self.fd, _encode(rec).encode() + b"\n")  # one write per line
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

    def add(self, data: bytes, digest: str = "") -> dict[str, Any]:
        """Append ``data`` (``digest``: its sha256 when already known)."""
        offset = os.lseek(self.fd, 0, os.SEEK_END)
        os.write(self.fd, data)
        return {"object": digest or sha256_hex(data), "pack": self.name, "offset": offset,
                "length": len(data)}

    def sync(self) -> None:
        os.fsync(self.fd)

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


# Reason codes that point at a crafted batch rather than a provider's slip: one of them makes
# the whole batch SUSPECT (exit 4), however few samples carry it.
ATTACK_CODES = frozenset({"HASH_MISMATCH", "PATH_ESCAPE", "DECOMPRESSION_BOMB", "HEADER_MISMATCH",
                          "FILE_TOO_LARGE", "DUPLICATE_ID", "DUPLICATE_CONTENT",
                          "BATCH_DISTRIBUTION_SHIFT", "TRIGGER_CLUSTER"})
SUSPECT_SHARE = 0.02   # held share above which a batch is SUSPECT (clean batches: about 0.5 %)
SUSPECT_MIN_HELD = 5   # ... but never for fewer held samples than this (small batches)


def _summary(rb: bfmt.RawBatch | None, records: Sequence[dict[str, Any]],
             batch_reasons: list[str], extra: dict[str, Any]) -> dict[str, Any]:
    records = sorted(records, key=lambda r: int(r["line"]))
    counts = Counter(r["decision"] for r in records)
    reasons = Counter(code for r in records for code in r["reasons"])
    held = counts["QUARANTINED"]
    if counts["REJECTED"] or batch_reasons:
        status = "REJECTED"
    elif (ATTACK_CODES & set(reasons)
          or held > max(SUSPECT_MIN_HELD, SUSPECT_SHARE * len(records))):
        status = "SUSPECT"
    else:
        status = "QUARANTINED_SOME" if held else "ACCEPTED"
    code = {"REJECTED": EXIT_REJECTED, "SUSPECT": EXIT_SUSPECT,
            "QUARANTINED_SOME": EXIT_QUARANTINED}.get(status, EXIT_ACCEPTED)
    return {"batch_id": rb.batch_id if rb else "", "index_sha256": rb.index_sha256 if rb else "",
            "source": str((rb.signature or {}).get("source", "")) if rb else "",
            "status": status, "exit_code": code, "received": len(records),
            "accepted": counts["ACCEPTED"], "quarantined": held,
            "rejected": counts["REJECTED"], "batch_reasons": batch_reasons,
            "reason_counts": dict(sorted(reasons.items())),
            "quarantined_samples": [{"id": r["id"], "line": r["line"], "file": r["file"],
                                     "reasons": r["reasons"]}
                                    for r in records if r["decision"] == "QUARANTINED"],
            "duplicates_in_store": sum(bool(r.get("duplicate_of")) for r in records),
            "decoder_warnings": [{"id": r["id"], "line": r["line"], "file": r["file"],
                                  "text": w} for r in records
                                 for w in r.get("decoder_warnings", [])],
            **extra}


def _ledger(p: dict[str, Path], source: str, batch_id: str) -> dict[str, Any] | None:
    """The first index seen for ``batch_id`` from ``source``; None if the id is new.

    Batch ids are namespaced per source (``batches/<source>/<batch id>.json``). A store
    written before that keeps ``batches/<batch id>.json``; such a record still counts for
    the source it names, and for no other one.
    """
    for path in (p["batches"] / source / f"{batch_id}.json", p["batches"] / f"{batch_id}.json"):
        if path.is_file():
            rec = json.loads(path.read_text())
            if path.parent.name == source or rec.get("source") == source:
                return dict(rec)
    return None


def _batch_check(rb: bfmt.RawBatch, p: dict[str, Path], max_rows: int, max_bytes: int,
                 resolve: bfmt.Resolver) -> tuple[list[str], str]:
    """Source allow-list, signature, caps and replay: any reason rejects the whole batch.

    Returns (reason codes, a message naming the file, source and key involved).
    """
    sig_file = rb.root / bfmt.SIG_NAME
    if rb.signature is None:
        return ["SIGNATURE_MISSING"], f"{sig_file}: {rb.signature_error or 'missing'}"
    try:
        root_pub = load_public_key(p["root_pub"])
        sources = load_registry(p["registry"], root_pub)
    except TrustError as err:
        return ["REGISTRY_UNTRUSTED"], f"source registry {p['registry']}: {err}"
    name, keyid = str(rb.signature.get("source")), str(rb.signature.get("keyid"))
    src = sources.get(name)
    if src is None:
        return ["SOURCE_UNKNOWN"], (f"{sig_file} names source {name!r} (key {keyid}), which is "
                                    f"not in the registry {p['registry']}")
    if not src.active:
        return ["SOURCE_REVOKED"], (f"{sig_file}: source {name!r} (key {src.keyid}) was "
                                    f"revoked at {src.revoked}")
    index_file = rb.root / rb.index_name
    if keyid != src.keyid:
        return ["SIGNATURE_INVALID"], (f"{sig_file} was made with key {keyid}, but source "
                                       f"{name!r} is registered with key {src.keyid} "
                                       f"(signed file {index_file})")
    try:
        verify(src.key(), rb.index_bytes, base64.b64decode(str(rb.signature["signature"])),
               "batch index")
    except (TrustError, ValueError):
        return ["SIGNATURE_INVALID"], (f"{sig_file}: the signature over {index_file} "
                                       f"(sha256 {rb.index_sha256[:16]}) does not verify with "
                                       f"source {name!r}'s key {src.keyid}")
    if not _SAFE.match(rb.batch_id):
        return ["BATCH_ID_INVALID"], (f"{index_file}: batch_id {rb.batch_id!r} is not one "
                                      "[A-Za-z0-9._-]{1,64} shared by every line")
    row_sources = {r.fields.get("source") for r in rb.rows if not r.parse_error}
    if row_sources - {src.name}:
        return ["SOURCE_MISMATCH"], (f"{index_file}: rows name sources "
                                     f"{sorted(map(str, row_sources - {src.name}))}, the "
                                     f"signature {src.name!r}")
    over = bfmt.batch_limits(rb.root, rb.rows, max_rows, max_bytes, resolve)
    if over:
        return ["BATCH_TOO_LARGE"], over
    first = _ledger(p, src.name, rb.batch_id)
    if first is not None:
        if first.get("index_sha256") != rb.index_sha256:
            return ["REPLAYED_BATCH_ID"], (f"{index_file}: source {src.name!r} already used "
                                           f"batch id {rb.batch_id!r} for index "
                                           f"{str(first.get('index_sha256'))[:16]}")
    else:
        atomic_write_json(p["batches"] / src.name / f"{rb.batch_id}.json",
                          {"batch_id": rb.batch_id, "index_sha256": rb.index_sha256,
                           "source": src.name})
    return [], ""


def _stored_objects(p: dict[str, Path], skip: str) -> dict[str, dict[str, Any]]:
    """Where each object (image sha256) already lies in the store and the record that first
    stored it, from every journal but ``skip`` (the batch being ingested)."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(p["journal"].glob("*.jsonl")):
        if path.stem == skip:
            continue
        for rec in read_records(path).values():
            if rec.get("pack") and rec["object"] not in out:
                out[rec["object"]] = {**_where(rec),
                                      "first": f"{rec['index_sha256']}:{rec['line']}"}
    return out


_WHERE = ("object", "pack", "offset", "length")


def _where(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: rec[k] for k in _WHERE}


class _Sample:
    """What the reader knows of one row before its image is decoded."""

    __slots__ = ("row", "reasons", "data", "digest", "decode")

    def __init__(self, row: bfmt.IndexRow, reasons: list[str], data: bytes = b"",
                 digest: str = "", decode: bool = False) -> None:
        self.row, self.reasons, self.data, self.digest = row, reasons, data, digest
        self.decode = decode


_DECODE_CHUNK = 64  # images per decoding task: few enough tasks that queueing costs little


def _decode(data: bytes) -> tuple[np.ndarray | str, list[str], np.ndarray | None]:
    """(decoded image or reason code, size reasons, 32 x 32 image or None) of image bytes."""
    from cloud_train.ingest.screens import check_image, to_feature_size

    img = bfmt.decode_image(data, MAX_PIXELS)
    if isinstance(img, str):
        return img, [], None
    size = check_image(img)
    return img, size, (None if size else to_feature_size(img))


def _decode_chunk(datas: list[bytes]) -> list[tuple[Any, list[str], Any]]:
    return [_decode(d) for d in datas]


def _decode_all(datas: list[bytes], pool: Pool
                ) -> tuple[list[tuple[Any, list[str], Any]], list[list[str]]]:
    """``_decode`` of every item, in input order, and the decoder warnings of each.

    Native decoders write warnings to file descriptor 2, which is process-wide: the chunks
    are decoded in parallel under one capture, and only if anything was written are the
    images decoded again one at a time, each under its own capture, to name its sample
    (decoding is deterministic, so the second pass gives the same results)."""
    cap = bfmt.StderrCapture()
    try:
        with cap:
            futs = [pool.submit(_decode_chunk, datas[i:i + _DECODE_CHUNK])
                    for i in range(0, len(datas), _DECODE_CHUNK)]
            out = [r for f in futs for r in f.result()]
        if not cap.size:
            return out, [[] for _ in datas]
        out, warnings = [], []
        for d in datas:
            with cap:
                out.append(_decode(d))
            warnings.append([w for w in cap.text.splitlines() if w.strip()])
        return out, warnings
    finally:
        cap.close()


class _Reader:
    """Reads and decodes the rows of one batch; a file named by several rows is read once,
    and content seen earlier in this batch is not decoded again (DUPLICATE_CONTENT)."""

    def __init__(self, resolve: bfmt.Resolver, n_classes: int, now: datetime) -> None:
        self.root, self.n_classes, self.now = resolve.root, n_classes, now
        self.seen_ids: set[str] = set()
        self.seen_content: set[str] = set()
        self.files: dict[str, tuple[bytes, str]] = {}  # bytes and sha256 of each file read
        self.resolve = resolve

    def where(self, rel: str) -> Path | str:
        """``batch.safe_path(root, rel)`` (see ``batch.Resolver``)."""
        where, size = self.resolve(rel)
        return Path(where) if size >= 0 else where

    def check(self, row: bfmt.IndexRow) -> _Sample:
        """Every check of one row up to decoding its image, in the order the gate runs them."""
        from cloud_train.ingest.rows import validate_row

        if row.parse_error:
            return _Sample(row, [row.parse_error.split(":")[0]])
        f = row.fields
        if row.sample_id in self.seen_ids:
            return _Sample(row, ["DUPLICATE_ID"])
        self.seen_ids.add(row.sample_id)
        where, size = self.resolve(str(f.get("file", "")))
        if size < 0:
            return _Sample(row, [where])
        if size > MAX_FILE_BYTES:
            return _Sample(row, ["FILE_TOO_LARGE"])
        cached = self.files.get(where)
        if cached is None:
            data = bfmt.read_capped(where, MAX_FILE_BYTES)
            if len(data) > MAX_FILE_BYTES:  # it grew after the size check
                return _Sample(row, ["FILE_TOO_LARGE"])
            cached = self.files[where] = (data, sha256_hex(data))
        data, digest = cached
        if digest != str(f.get("sha256", "")).lower():
            return _Sample(row, ["HASH_MISMATCH"], data, digest)
        reasons = validate_row(f, self.n_classes, self.now, bfmt.INDEX_FIELDS)
        if digest in self.seen_content:  # a second row with the same bytes: never decoded
            return _Sample(row, reasons + ["DUPLICATE_CONTENT"], data, digest)
        self.seen_content.add(digest)
        return _Sample(row, reasons, data, digest, decode=True)

    def read(self, rows: Sequence[bfmt.IndexRow], pool: Pool
             ) -> list[tuple[Any, ...]]:
        """(row, reasons, image bytes, 32 x 32 RGB image or None, decoder warnings, sha256)
        per row, in index order."""
        return self.decode([self.check(row) for row in rows], pool)

    def decode(self, checked: list[_Sample], pool: Pool
               ) -> list[tuple[Any, ...]]:
        """``read``'s rows from ``check``'s: the images to decode are decoded in parallel
        chunks, the results gathered in index order."""
        todo = [c for c in checked if c.decode]
        decoded, warnings = _decode_all([c.data for c in todo], pool)
        self.files.clear()
        images: dict[int, tuple[Any, list[str]]] = {
            id(c): (d, w) for c, d, w in zip(todo, decoded, warnings, strict=True)}
        out = []
        for c in checked:
            if not c.decode:
                out.append((c.row, c.reasons, c.data, None, [], c.digest))
                continue
            (img, size, small), warn = images[id(c)]
            if isinstance(img, str):
                out.append((c.row, c.reasons + [img], c.data, None, warn, c.digest))
                continue
            reasons = c.reasons + size
            out.append((c.row, reasons, c.data, None if reasons else small, warn, c.digest))
        return out


def _store_objects(pack: _Pack, checked: Sequence[tuple[Any, ...]], done: dict[int, Any],
                   stored: dict[str, dict[str, Any]]
                   ) -> dict[int, tuple[dict[str, Any], str]]:
    """Append the bytes of every unfinished row to ``pack``, each distinct content once in
    the store as a whole; returns per row position (object location, the record that
    first stored those bytes in an earlier batch, or "")."""
    out: dict[int, tuple[dict[str, Any], str]] = {}
    for i, (row, _, data, _, _, digest) in enumerate(checked):
        if row.line in done or not data:
            continue
        if digest in stored:
            out[i] = (_where(stored[digest]), stored[digest].get("first", ""))
        else:
            out[i] = (pack.add(data, digest), "")
            stored[digest] = out[i][0]
    pack.sync()  # on disk before any decision that points at them is written
    return out


def _index_labels(rows: Sequence[bfmt.IndexRow]) -> list[int]:
    """The integer labels the index gives: the classes the trigger screen will most likely
    see, to prepare its reference side while the rows are checked."""
    out = []
    for row in rows:
        label = row.fields.get("label")
        if isinstance(label, int) and not isinstance(label, bool):
            out.append(label)
        elif isinstance(label, str) and label.strip().isdigit():
            out.append(int(label))  # CSV carries numbers as text
    return out


_SCREEN_CHUNK = 256  # images per features or label-screen task: small enough to balance


def _screen(ref: Reference, checked: Sequence[tuple[Any, ...]], pool: Pool,
            trigger_ready: Future[Any] | None = None
            ) -> tuple[dict[str, Any], dict[str, Any], dict[int, list[str]]]:
    """The screens over the decodable samples of ``checked`` (rows as ``_Reader.read``
    gives them): (KS result, trigger screen report, screen reason codes by row position).

    One list of tasks, worked through by this thread and the pool's (``Tasks.run``),
    longest first: the trigger screen (the batch by class), then per chunk of images their
    features with the Isolation Forest and range flags, the KS test once every chunk's
    features are there, then per chunk the label screen. Each image's features, flags and
    label score are its own, so chunks give what the whole batch at once would. The
    trigger screen first waits for ``trigger_ready`` (its reference side, computed ahead)
    while the other threads start on the features."""
    import numpy as np

    from cloud_train.ingest.batch_screens import REASON as TRIGGER_REASON
    from cloud_train.ingest.rows import row_label
    from cloud_train.ingest.screens import image_features
    from cloud_train.ingest.workers import Tasks

    good = [i for i, c in enumerate(checked) if c[3] is not None]
    stat: dict[str, Any] = {"shifted": False}
    trigger: dict[str, Any] = {"classes": [], "flagged": []}
    screens: dict[int, list[str]] = {}
    if not good:
        return stat, trigger, screens
    small = np.stack([checked[i][3] for i in good])
    labels = np.array([row_label(checked[i][0].fields) for i in good])
    spans = [slice(s, s + _SCREEN_CHUNK) for s in range(0, len(small), _SCREEN_CHUNK)]

    def features(part: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        feats = image_features(small[part])
        return (feats, *ref.sample_flags(feats))

    def trigger_screen() -> tuple[np.ndarray, dict[str, Any]]:
        if trigger_ready is not None:
            trigger_ready.result()
        return ref.trigger_screen(small, labels)

    tasks = Tasks()
    trig = tasks.add(trigger_screen)
    feat = [tasks.add(lambda part=part: features(part)) for part in spans]
    ks = tasks.add(lambda: ref.batch_shift(np.concatenate([tasks.result(i)[0] for i in feat]),
                                           labels))
    agree = [tasks.add(lambda part=part: ref.label_scores(small[part], labels[part]))
             for part in spans]
    tasks.run(pool)
    trig_held, trigger = tasks.result(trig)
    stat = tasks.result(ks)
    flags = [tasks.result(i) for i in feat]
    per_sample = ref.reasons(np.concatenate([f[1] for f in flags]),
                             np.concatenate([f[2] for f in flags]),
                             np.concatenate([tasks.result(i) for i in agree]))
    for i, reasons, t in zip(good, per_sample, trig_held, strict=True):
        screens[i] = (reasons + ([TRIGGER_REASON] if t else [])
                      + (["BATCH_DISTRIBUTION_SHIFT"] if stat["shifted"] else []))
    return stat, trigger, screens


def ingest(batch_path: str | os.PathLike[str], store: str | os.PathLike[str],
           class_names: Sequence[str] = SYNTHETIC_CLASSES,
           now: datetime | None = None, reference: Reference | None = None,
           max_rows: int = bfmt.MAX_BATCH_ROWS, max_bytes: int = bfmt.MAX_BATCH_BYTES,
           workers: int | None = None) -> dict[str, Any]:
    """Run the gate on one batch folder or tar; returns the summary (see ``_summary``).

    ``reference`` skips loading (and refitting) the store's screening reference.
    ``max_rows`` / ``max_bytes`` are the per-batch caps (see FORMAT.md). ``workers``: threads
    for decoding and screening (default: one per usable core, at most 4; 1 runs everything
    in this thread); the decisions, the journal and the stored objects do not depend on it.
    """
    p = store_paths(store)
    now = now or datetime.now(timezone.utc)
    src = Path(batch_path)
    try:
        if src.is_file():
            src = bfmt.extract_tar(src, p["unpack"] / sha256_hex(src.read_bytes())[:32])
        rb = bfmt.read_batch(src)
    except bfmt.BatchLimitError as err:
        return _summary(None, [], ["BATCH_TOO_LARGE"], {"error": str(err)})
    except DatasetError as err:
        return _summary(None, [], ["BATCH_UNREADABLE"], {"error": str(err)})
    journal = _Journal(p["journal"] / f"{rb.index_sha256}.jsonl")
    resolve = bfmt.Resolver(src)  # one lstat per file, shared by the caps and the reader
    try:
        batch_reasons, message = _batch_check(rb, p, max_rows, max_bytes, resolve)
        if batch_reasons:
            for row in rb.rows:
                if row.line not in journal.done:
                    journal.add(_record(rb, row, "REJECTED", batch_reasons))
            return _summary(rb, list(journal.done.values()), batch_reasons, {"error": message})
        from cloud_train.ingest.batch_screens import single_thread_native
        from cloud_train.ingest.reference import Reference
        from cloud_train.ingest.workers import make_pool

        pool, background = make_pool(workers), make_pool(1 if workers == 1 else 2)
        pack = _Pack(p["objects"] / f"{rb.index_sha256}.pack")
        try:
            # one native thread per task: the gate's own threads fill the cores
            with single_thread_native():
                # the reference loads (file reads and hashes, mostly outside the GIL) while this
                # thread checks the rows; it is ready before any image is decoded, so nothing
                # it might log lands in the decoders' stderr capture
                loading = background.submit(lambda: reference or Reference.load(p["reference"]))
                labels = _index_labels(rb.rows)
                warm = background.submit(lambda: loading.result().prepare_trigger(labels))
                reader = _Reader(resolve, len(class_names), now)
                rows = [reader.check(row) for row in rb.rows]
                ref = loading.result()
                stored_f = background.submit(_stored_objects, p, rb.index_sha256)
                background.submit(ref.embed_ready)
                checked = reader.decode(rows, pool)
                stored = stored_f.result()
                # objects of this batch's finished rows (a rerun after a crash) are stored already
                for rec in journal.done.values():
                    if rec.get("pack"):
                        stored.setdefault(rec["object"], _where(rec))
                # the image bytes go to the pack while the screens run; decisions follow them
                objects = background.submit(_store_objects, pack, checked, journal.done, stored)
                stat, trigger, screens = _screen(ref, checked, pool, trigger_ready=warm)
                where = objects.result()
        finally:
            pool.shutdown()
            background.shutdown()
            pack.close()
        for i, (row, reasons, _, _, warnings, _) in enumerate(checked):
            if row.line in journal.done:
                continue
            reasons = reasons + screens.get(i, [])
            obj, first = where.get(i, (None, ""))
            rec = _record(rb, row, "QUARANTINED" if reasons else "ACCEPTED", reasons, obj)
            if first:  # the same bytes came in an earlier batch: judged again, flagged
                rec["duplicate_of"] = first
            if warnings:
                rec["decoder_warnings"] = warnings
            journal.add(rec)
        return _summary(rb, list(journal.done.values()), [], {"ks": stat,
                                                              "trigger_screen": trigger})
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
