"""The source batch format: images, an index, and a detached Ed25519 signature over the index.

A batch is a folder (or a ``.tar`` / ``.tar.gz`` of one) holding::

    index.jsonl   one JSON object per line (or index.csv with a header row), fields:
                  batch_id, id, file, label, source, capture_time, sha256
    index.sig     JSON {"source", "keyid", "signature"}: base64 Ed25519 signature over
                  the exact bytes of the index file
    images/...    the image files (PNG, JPEG or binary PPM), paths relative to the batch

``label`` is an integer index into the class list, ``capture_time`` ISO 8601 UTC
(``2026-01-31T12:00:00Z``), ``sha256`` the hex digest of the image file's bytes.
See FORMAT.md beside this file for a provider's own script.

Reading is defensive: an index line that is not UTF-8 or not JSON becomes a row with a
``parse_error`` (never dropped); file paths are confined to the batch (no ``..``, no
absolute paths, no symlink leaving it); image dimensions are read from the header and
checked against a pixel limit before anything is decoded.
"""

from __future__ import annotations

import base64
import csv
import functools
import io
import json
import os
import struct
import sys
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from stat import S_ISREG
from typing import TYPE_CHECKING, Any

from roadshield_base.errors import DatasetError
from roadshield_base.fileio import atomic_write_bytes
from roadshield_base.trust import key_id, sha256_hex, sign

if TYPE_CHECKING:  # imported where images are decoded: a rejected batch never loads them
    import numpy as np

INDEX_FIELDS = ("batch_id", "id", "file", "label", "source", "capture_time", "sha256")
INDEX_NAMES = ("index.jsonl", "index.csv")
SIG_NAME = "index.sig"
# Per-batch caps: a batch over any of them is rejected whole (BATCH_TOO_LARGE) before an
# image is read, so one batch can hold at most this much in memory and on disk.
MAX_INDEX_BYTES = 8 << 20      # the index file (about 25,000 typical rows)
MAX_BATCH_ROWS = 10_000        # index rows
MAX_BATCH_BYTES = 256 << 20    # image bytes: the distinct files the rows name
MAX_TAR_BYTES = MAX_BATCH_BYTES + MAX_INDEX_BYTES + (1 << 20)


class BatchLimitError(DatasetError):
    """A batch over a per-batch cap (index bytes, rows, image bytes, tar size)."""


@dataclass
class IndexRow:
    """One index record as read: ``fields`` are raw values; ``parse_error`` if unreadable."""

    line: int
    fields: dict[str, Any] = field(default_factory=dict)
    parse_error: str = ""

    @property
    def sample_id(self) -> str:
        sid = self.fields.get("id")
        return str(sid) if isinstance(sid, (str, int)) and str(sid) else f"line-{self.line}"


@dataclass
class RawBatch:
    """A batch as read from disk, before any check: index bytes, signature file, rows."""

    root: Path
    index_name: str
    index_bytes: bytes
    signature: dict[str, Any] | None
    signature_error: str
    rows: list[IndexRow]

    @functools.cached_property
    def index_sha256(self) -> str:
        return sha256_hex(self.index_bytes)

    @functools.cached_property
    def batch_id(self) -> str:
        ids = {str(r.fields.get("batch_id")) for r in self.rows if r.fields.get("batch_id")}
        return ids.pop() if len(ids) == 1 else ""


def parse_index(name: str, data: bytes) -> list[IndexRow]:
    """Rows of ``index.jsonl`` / ``index.csv`` bytes; bad lines become rows with parse_error."""
    rows: list[IndexRow] = []
    lines = data.split(b"\n")
    if name.endswith(".csv"):
        header: list[str] | None = None
        for n, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8").rstrip("\r")
            except UnicodeDecodeError as err:
                rows.append(IndexRow(n, parse_error=f"INDEX_NOT_UTF8: {err}"))
                continue
            try:
                values = next(csv.reader(io.StringIO(text)), [])
            except csv.Error as err:
                rows.append(IndexRow(n, parse_error=f"INDEX_BAD_ROW: {err}"))
                continue
            if header is None:
                header = [v.strip() for v in values]
                continue
            if len(values) != len(header):
                rows.append(IndexRow(n, dict(zip(header, values, strict=False)),
                                     f"INDEX_BAD_ROW: {len(values)} values for "
                                     f"{len(header)} columns"))
                continue
            rows.append(IndexRow(n, dict(zip(header, values, strict=True))))
        return rows
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            rows.append(IndexRow(n, parse_error=f"INDEX_NOT_UTF8: {err}"))
            continue
        except json.JSONDecodeError as err:
            rows.append(IndexRow(n, parse_error=f"INDEX_BAD_JSON: {err}"))
            continue
        if not isinstance(obj, dict):
            rows.append(IndexRow(n, parse_error="INDEX_BAD_JSON: a line is not an object"))
            continue
        rows.append(IndexRow(n, obj))
    return rows


def read_batch(root: str | os.PathLike[str]) -> RawBatch:
    """Read the index and signature of the batch folder ``root`` (nothing is decoded)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"batch {root} is not a folder",
                           "pass a batch folder or a .tar of one (see FORMAT.md)")
    found = [n for n in INDEX_NAMES if (root / n).is_file() and not (root / n).is_symlink()]
    if len(found) != 1:
        raise DatasetError(f"batch {root} needs exactly one of {INDEX_NAMES}, found {found}",
                           "write index.jsonl (or index.csv) at the top of the batch")
    size = (root / found[0]).stat().st_size
    if size > MAX_INDEX_BYTES:
        raise BatchLimitError(f"index {root / found[0]} is {size} bytes, over the cap of "
                              f"{MAX_INDEX_BYTES} bytes per batch",
                              f"split the batch into batches of at most {MAX_BATCH_ROWS} rows")
    data = (root / found[0]).read_bytes()
    sig, err = None, ""
    sig_path = root / SIG_NAME
    try:
        obj = json.loads(sig_path.read_bytes().decode("utf-8"))
        if not isinstance(obj, dict) or not {"source", "keyid", "signature"} <= set(obj):
            raise ValueError("expected source, keyid and signature")
        sig = obj
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        err = f"{SIG_NAME}: {e}"
    return RawBatch(root, found[0], data, sig, err, parse_index(found[0], data))


def extract_tar(tar_path: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Unpack a batch tar into ``dest`` keeping only regular files with safe relative names.

    Members that are links, devices, absolute or ``..`` paths are skipped (their index rows
    then fail with FILE_MISSING, so they are reported, never silently used).
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    total = 0
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            for m in tar:
                name = Path(m.name)
                if not m.isfile() or name.is_absolute() or ".." in name.parts:
                    continue
                total += m.size
                if total > MAX_TAR_BYTES:
                    raise BatchLimitError(f"{tar_path} unpacks to more than {MAX_TAR_BYTES} "
                                          "bytes, over the per-batch cap",
                                          "split the batch into smaller tars")
                src = tar.extractfile(m)
                if src is not None:
                    out = dest / name
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(src.read())
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DatasetError(f"cannot read batch tar {tar_path}: {err}",
                           "check the file is a complete .tar or .tar.gz") from err
    return dest


def batch_limits(root: Path, rows: Sequence[IndexRow], max_rows: int = MAX_BATCH_ROWS,
                 max_bytes: int = MAX_BATCH_BYTES, resolve: Resolver | None = None) -> str:
    """'' if the batch is within the caps, else a message saying which cap and by how much.

    Bytes are the sizes of the distinct files the rows name (as ``safe_path`` resolves them),
    so rows that share one file count it once.
    """
    if len(rows) > max_rows:
        return (f"batch {root} has {len(rows)} index rows, over the cap of {max_rows} per "
                f"batch; split it into batches of at most {max_rows} rows")
    files: dict[str, int] = {}
    resolve = resolve or Resolver(root)
    for row in rows:
        if row.parse_error:
            continue
        where, size = resolve(str(row.fields.get("file", "")))
        if size >= 0 and where not in files:
            files[where] = size
    total = sum(files.values())
    if total > max_bytes:
        return (f"batch {root} names {total} bytes of images in {len(files)} files, over the "
                f"cap of {max_bytes} bytes per batch; split it into smaller batches")
    return ""


def read_capped(path: str, limit: int) -> bytes:
    """The bytes of the file at ``path``, at most ``limit + 1`` of them (a file that grew
    past ``limit`` after its size was checked is read no further)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks, left = [], limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def safe_path(root: Path, rel: str) -> Path | str:
    """The file ``rel`` inside ``root``, or a reason code if it would leave the batch."""
    p = Path(rel)
    if not rel or p.is_absolute() or ".." in p.parts:
        return "PATH_ESCAPE"
    full = root / p
    try:
        resolved = full.resolve(strict=True)
    except (OSError, RuntimeError):
        return "FILE_MISSING"
    if not resolved.is_relative_to(root.resolve()):
        return "PATH_ESCAPE"
    if not resolved.is_file():
        return "FILE_MISSING"
    return resolved


class Resolver:
    """``safe_path(root, rel)`` for many files of one batch, with each directory resolved
    once: a regular file (not a symlink) lies in its directory's real path; anything else
    (symlinks, missing files, odd names) takes ``safe_path``'s full resolution.

    ``resolve(rel)`` returns (the file's real path as a string, its size in bytes), or
    (``safe_path``'s reason code, -1), the same answer each time a batch asks for ``rel``.
    Strings, not ``Path`` objects: building a ``Path`` costs more than the ``lstat``.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.real_root = os.path.realpath(root)
        self.real_dirs: dict[str, str] = {}
        self.known: dict[str, tuple[str, int]] = {}  # the caps and the reader ask alike

    def __call__(self, rel: str) -> tuple[str, int]:
        found = self.known.get(rel)
        if found is None:
            found = self.known[rel] = self._resolve(rel)
        return found

    def _resolve(self, rel: str) -> tuple[str, int]:
        if not rel or os.path.isabs(rel) or ".." in rel.split("/"):
            return self._slow(rel)
        head, name = os.path.split(rel)
        real = self.real_dirs.get(head)
        if real is None:
            real = self.real_dirs[head] = os.path.realpath(os.path.join(self.root, head))
        if real != self.real_root and not real.startswith(self.real_root + os.sep):
            return self._slow(rel)
        full = os.path.join(real, name)
        try:
            st = os.lstat(full)
        except OSError:
            return self._slow(rel)
        return (full, st.st_size) if S_ISREG(st.st_mode) else self._slow(rel)

    def _slow(self, rel: str) -> tuple[str, int]:
        where = safe_path(self.root, rel)
        return (str(where), where.stat().st_size) if isinstance(where, Path) else (where, -1)


# PNG: libpng reads the signature and then requires IHDR as the first chunk (13 bytes; a bad
# CRC stops it), so these are the only dimensions it will decode.
_PNG_SIG = b"\x89PNG\r\n\x1a\n"
# JPEG markers as libjpeg's jdmarker.c (read_markers) treats them before the first scan:
# the SOF types it decodes, the segments it skips by their length, the markers without a
# length. Every other marker makes libjpeg stop with an error, so it is refused here too.
_JPEG_SOF_DECODED = frozenset({0xC0, 0xC1, 0xC2, 0xC9, 0xCA})
_JPEG_SOF_ANY = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xCC}
_JPEG_SKIPPED = frozenset(range(0xE0, 0xF0)) | {0xFE, 0xDB, 0xC4, 0xCC, 0xDD, 0xDC}
_JPEG_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}
_JPEG_SOS = 0xDA


def _png_dims(data: bytes) -> tuple[int, int] | None:
    if len(data) < 33 or data[8:16] != b"\x00\x00\x00\rIHDR":
        return None
    w, h = struct.unpack(">II", data[16:24])
    return int(w), int(h)


def _jpeg_dims(data: bytes) -> tuple[int, int] | None:
    """(width, height) of the frame header libjpeg would use, walking the marker stream as
    jdmarker.c does up to the first scan: any number of 0xFF fill bytes before a marker
    (T.81 B.1.1.2), length-skipped segments, standalone RSTn / TEM. Whatever libjpeg would
    only warn about (bytes between segments) or stop on (a second SOF, an unknown marker,
    SOS before SOF, a truncated segment) is refused (None), so the two readings never differ.
    """
    n, i, dims = len(data), 2, None
    while True:
        if i >= n or data[i] != 0xFF:
            return None
        while i < n and data[i] == 0xFF:
            i += 1
        if i >= n:
            return None
        marker = data[i]
        i += 1
        if marker in _JPEG_STANDALONE:
            continue
        if marker not in _JPEG_SOF_ANY and marker not in _JPEG_SKIPPED and marker != _JPEG_SOS:
            return None  # 0x00 (stuffing), a second SOI, EOI before the image, unknown
        if i + 2 > n:
            return None
        seg = (data[i] << 8) | data[i + 1]
        if seg < 2 or i + seg > n:
            return None
        if marker == _JPEG_SOS:
            return dims  # the header ends at the first scan; None if no frame came before it
        if marker in _JPEG_SOF_ANY:
            if dims is not None or marker not in _JPEG_SOF_DECODED or seg < 8:
                return None
            h, w = struct.unpack(">HH", data[i + 3:i + 7])
            dims = (int(w), int(h))
        i += seg


def image_dims(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, JPEG or binary PPM header, read the way the decoder reads
    it, without decoding; None if the header is not one the gate accepts."""
    if data[:8] == _PNG_SIG:
        return _png_dims(data)
    if data[:3] == b"\xff\xd8\xff":
        return _jpeg_dims(data)
    if data[:2] == b"P6" and data[2:3].isspace():
        parts = data[3:64].split(maxsplit=3)
        try:
            return int(parts[0]), int(parts[1])  # a '#' comment is refused by int()
        except (IndexError, ValueError):
            return None
    return None


def decode_image(data: bytes, max_pixels: int) -> np.ndarray | str:
    """H x W x 3 uint8 RGB, or a reason code (UNSUPPORTED_FORMAT, DECOMPRESSION_BOMB, ...).

    The pixel limit is applied to the header as the decoder reads it (``image_dims``), so a
    bomb is refused before any pixel buffer is allocated.
    """
    if not data:
        return "EMPTY_FILE"
    dims = image_dims(data)
    if dims is None:
        return "UNSUPPORTED_FORMAT"
    if dims[0] * dims[1] > max_pixels or dims[0] == 0 or dims[1] == 0:
        return "DECOMPRESSION_BOMB" if dims[0] * dims[1] > max_pixels else "BAD_DIMENSIONS"
    import cv2
    import numpy as np

    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        return "UNDECODABLE"
    if img.shape[:2] != (dims[1], dims[0]):
        return "HEADER_MISMATCH"  # the decoder used another frame than the header check saw
    if img.dtype != np.uint8:
        return "BAD_DTYPE"
    if img.ndim != 3 or img.shape[2] != 3:
        return "BAD_CHANNELS"
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


class StderrCapture:
    """Catch what native decoders (libjpeg, libpng, OpenCV's log) write to file descriptor
    2 while one image is decoded, so each warning can be tied to its sample.

    ``with cap: ...`` then ``cap.text`` holds what was written inside the block (its first
    4 KiB) and ``cap.size`` how many bytes. One spool file is reused; one capture at a time
    (fd 2 is process-wide).
    """

    def __init__(self) -> None:
        self._spool: Any = None
        self._saved = -1
        self.text = ""
        self.size = 0

    def __enter__(self) -> StderrCapture:
        if self._spool is None:
            import tempfile

            self._spool = tempfile.TemporaryFile()
        self._spool.seek(0)
        self._spool.truncate()
        sys.stderr.flush()
        self._saved = os.dup(2)
        os.dup2(self._spool.fileno(), 2)
        return self

    def __exit__(self, *exc: object) -> None:
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self.size = self._spool.seek(0, os.SEEK_END)
        self._spool.seek(0)
        self.text = self._spool.read(4096).decode("utf-8", "replace").strip()

    def close(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def make_batch(out: str | os.PathLike[str], images_rgb: np.ndarray | Sequence[np.ndarray],
               labels: np.ndarray | Sequence[int], source: str, key: Any, batch_id: str,
               capture_times: Sequence[str] | None = None, ids: Sequence[str] | None = None,
               fmt: str = "jsonl") -> Path:
    """Write a signed batch folder: images/<id>.png, index.jsonl (or .csv), index.sig.

    ``images_rgb`` are H x W x 3 uint8 RGB; ``key`` the provider's Ed25519 private key.
    """
    import cv2
    import numpy as np

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    now = utc_now_iso()
    rows = []
    for i, (img, label) in enumerate(zip(images_rgb, labels, strict=True)):
        sid = ids[i] if ids is not None else f"{batch_id}-{i:06d}"
        ok, png = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2BGR))
        if not ok:
            raise DatasetError(f"could not PNG-encode image {i} of batch {batch_id}",
                               "images must be H x W x 3 uint8")
        data = png.tobytes()
        rel = f"images/{sid}.png"
        (out / rel).write_bytes(data)
        rows.append({"batch_id": batch_id, "id": sid, "file": rel, "label": int(label),
                     "source": source,
                     "capture_time": capture_times[i] if capture_times is not None else now,
                     "sha256": sha256_hex(data)})
    write_index(out, rows, key, source, fmt)
    return out


def write_index(out: Path, rows: Sequence[dict[str, Any]], key: Any, source: str,
                fmt: str = "jsonl") -> bytes:
    """Write the index (jsonl or csv) and its detached signature; returns the index bytes."""
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(INDEX_FIELDS), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        data = buf.getvalue().encode()
    else:
        data = b"".join(json.dumps(r, sort_keys=True).encode() + b"\n" for r in rows)
    for name in INDEX_NAMES:
        (out / name).unlink(missing_ok=True)
    atomic_write_bytes(out / f"index.{fmt}", data)
    sign_index(out, key, source, data)
    return data


def sign_index(out: Path, key: Any, source: str, data: bytes) -> None:
    """(Re)write index.sig over ``data`` with ``key`` for ``source``."""
    sig = {"source": source, "keyid": key_id(key),
           "signature": base64.b64encode(sign(key, data)).decode()}
    atomic_write_bytes(Path(out) / SIG_NAME, json.dumps(sig, sort_keys=True).encode() + b"\n")
