"""A sealed held-out set: encrypted at rest, opened once per model, every opening logged.

Layout of a sealed folder::

    manifest.json   what is sealed (count, class names, split manifest digest, ...); its
                    canonical JSON is the AES-GCM associated data, so editing it breaks
                    decryption
    sealed.bin      b"RSSEAL1\\n" + 12-byte nonce + AES-256-GCM(ciphertext + tag) of an .npz
                    holding images (N x H x W x 3 uint8 RGB), labels (int64) and ids (str)

The .npz may also hold the original files of the sealed split (``file_names``,
``file_offsets``, ``file_bytes``: names, n + 1 offsets and the concatenated bytes), so that
sealing can remove the plaintext split without losing anything (``splits.cli.data_seal``).

The manifest pins the opening log at sealing time (``opening_log``: its path, relative to
the sealed folder when inside it, and the log key's id and raw public key, base64), and the
log's first entry for this set (event "sealed") names the set's sealed and manifest digests.
Since the manifest is the AES-GCM associated data, the pin cannot be changed without
re-sealing. The 256-bit key lives in its own file (mode 0600). ``open_sealed`` is the only
reader: it refuses any log but the pinned one and any log key but the pinned one, verifies
the log, refuses a second opening for the same model digest unless forced, and appends a
signed entry before handing the data over. A set sealed without a pin (before the pin
existed) is refused: re-seal it. The final evaluation
(``final_eval.evaluate_sealed``, ``roadshield data open-sealed``) is its caller.

Opening log: JSON lines, each the canonical JSON of {seq, time, event, model_sha256,
sealed_sha256, manifest_sha256, prev, keyid, sig}, where prev is the sha256 of the previous
line's bytes (64 zeros for the first) and sig the Ed25519 signature
(roadshield_base.trust.sign) over the canonical JSON of every other field. ``verify_log`` checks
the chain and every signature; it cannot see lines cut off the end, so keep the latest line's
digest (``log_head``) alongside the reported results. A line torn by a crash mid-write
fails verification and blocks further openings until someone restores the log: the safe
side for a set that must not be peeked at unrecorded.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from roadshield_base.errors import ConfigError, DatasetError, RoadshieldError
from roadshield_base.fileio import atomic_write_bytes, atomic_write_json
from roadshield_base.trust import (
    TrustError,
    canonical_json,
    key_id,
    load_public_key,
    public_bytes,
    sha256_hex,
    sign,
    verify,
)

MAGIC = b"RSSEAL1\n"
NONCE_BYTES = 12
GENESIS = "0" * 64
LOG_NAME = "openings.jsonl"


class SealedSetError(RoadshieldError):
    """The sealed set was refused (already opened for this model) or cannot be opened."""


def generate_key(path: str | os.PathLike[str]) -> Path:
    """Write a fresh 256-bit AES key (raw 32 bytes) with mode 0600; refuses to overwrite."""
    path = Path(path)
    if path.exists():
        raise ConfigError(f"key file {path} already exists", "choose a new path; keys are "
                          "never overwritten, or the sealed sets they lock would be lost")
    atomic_write_bytes(path, os.urandom(32))  # mkstemp creates the file 0600
    os.chmod(path, 0o600)
    return path


def load_key(path: str | os.PathLike[str]) -> bytes:
    """The 32-byte key; refuses a key file readable by group or others."""
    path = Path(path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        key = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read key file {path}: {err}", "check the path") from err
    if mode & 0o077:
        raise ConfigError(f"key file {path} has mode {oct(mode)}", f"chmod 600 {path}")
    if len(key) != 32:
        raise ConfigError(f"key file {path} holds {len(key)} bytes, not 32",
                          "use a key made by generate_key")
    return key


def _aesgcm(key: bytes) -> Any:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


@dataclass
class SealedSet:
    """Decrypted held-out data. images: N x H x W x 3 uint8 RGB; labels: int64 (N,);
    files: the original files sealed with them, by name (empty if none were)."""

    images: np.ndarray
    labels: np.ndarray
    ids: list[str]
    manifest: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)


def _pin(out: Path, log: Path, signer: Any) -> dict[str, Any]:
    out_abs, log_abs = out.resolve(), log.resolve()
    path = (log_abs.relative_to(out_abs).as_posix() if log_abs.is_relative_to(out_abs)
            else str(log_abs))
    pub = signer.public_key()
    return {"path": path, "keyid": key_id(pub),
            "public_key": base64.b64encode(public_bytes(pub)).decode()}


def _pinned_path(sealed_dir: Path, pin: dict[str, Any]) -> Path:
    p = Path(str(pin.get("path", "")))
    return (p if p.is_absolute() else sealed_dir / p).resolve()


def seal(out_dir: str | os.PathLike[str], images: np.ndarray, labels: np.ndarray,
         ids: list[str], key: bytes, manifest: dict[str, Any] | None = None, *,
         log_signer: Any = None, log: str | os.PathLike[str] | None = None,
         files: dict[str, bytes] | None = None) -> Path:
    """Encrypt a held-out set into ``out_dir`` (manifest.json + sealed.bin). ``manifest``
    (e.g. the split manifest digest and class names) is bound as associated data.

    ``log_signer`` (the Ed25519 private key that will sign the opening log) pins the log
    ``log`` (default ``out_dir/openings.jsonl``) and that key in the manifest and writes the
    log's "sealed" entry; without it the set cannot be opened (``open_sealed`` refuses an
    unpinned set). ``files``: original file bytes by name, sealed with the arrays.
    """
    images = np.ascontiguousarray(images, np.uint8)
    labels = np.asarray(labels, np.int64)
    if images.ndim != 4 or len(images) != len(labels) or len(ids) != len(labels):
        raise DatasetError(f"cannot seal {images.shape} images, {len(labels)} labels, "
                           f"{len(ids)} ids", "give N x H x W x 3 images and N labels and ids")
    out = Path(out_dir)
    log_path = Path(log) if log is not None else out / LOG_NAME
    arrays: dict[str, np.ndarray] = {"images": images, "labels": labels,
                                     "ids": np.asarray(ids, dtype=str)}
    if files:
        names = sorted(files)
        sizes = np.array([len(files[n]) for n in names], np.int64)
        arrays.update(file_names=np.asarray(names, dtype=str),
                      file_offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
                      file_bytes=np.frombuffer(b"".join(files[n] for n in names), np.uint8))
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    plain = buf.getvalue()
    meta = dict(manifest or {})
    meta.update({"count": len(labels), "format": "RSSEAL1", "plaintext_sha256": sha256_hex(plain)})
    if log_signer is not None:
        meta["opening_log"] = _pin(out, log_path, log_signer)
    nonce = os.urandom(NONCE_BYTES)
    blob = MAGIC + nonce + _aesgcm(key).encrypt(nonce, plain, canonical_json(meta))
    atomic_write_json(out / "manifest.json", meta)
    atomic_write_bytes(out / "sealed.bin", blob)
    if log_signer is not None:
        with _locked(log_path):
            verify_log(log_path, log_signer)  # never extend a log that does not verify
            _append(log_path, log_signer, {"event": "sealed", "model_sha256": "",
                                           "sealed_sha256": sha256_hex(blob),
                                           "manifest_sha256": sha256_hex(canonical_json(meta))})
    return out


def _decrypt(path: Path, key: bytes) -> tuple[SealedSet, str, str]:
    from cryptography.exceptions import InvalidTag

    try:
        meta = json.loads((path / "manifest.json").read_text())
        blob = (path / "sealed.bin").read_bytes()
    except (OSError, ValueError) as err:
        raise DatasetError(f"cannot read sealed set {path}: {err}",
                           "point at a folder written by seal()") from err
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + NONCE_BYTES + 16:
        raise TrustError(f"{path / 'sealed.bin'} is not a sealed set", "re-seal the data")
    nonce = blob[len(MAGIC):len(MAGIC) + NONCE_BYTES]
    try:
        plain = _aesgcm(key).decrypt(nonce, blob[len(MAGIC) + NONCE_BYTES:],
                                     canonical_json(meta))
    except InvalidTag as err:
        raise TrustError(f"sealed set {path} fails authentication",
                         "the ciphertext or manifest.json was altered, or the key is wrong"
                         ) from err
    with np.load(io.BytesIO(plain), allow_pickle=False) as z:
        files: dict[str, bytes] = {}
        if "file_names" in z.files:
            offs, raw = z["file_offsets"], z["file_bytes"].tobytes()
            files = {str(n): raw[int(offs[i]):int(offs[i + 1])]
                     for i, n in enumerate(z["file_names"])}
        data = SealedSet(z["images"], z["labels"], [str(x) for x in z["ids"]], meta, files)
    return data, sha256_hex(blob), sha256_hex(canonical_json(meta))


def _lines(log: Path) -> list[bytes]:
    if not log.exists():
        return []
    return [ln for ln in log.read_bytes().split(b"\n") if ln]


def verify_log(log: str | os.PathLike[str], public_key: Any) -> list[dict[str, Any]]:
    """Entries of an opening log after checking the hash chain and every signature.

    Raises TrustError naming the first bad line (1-based). ``public_key`` may also be the
    signer's private key.
    """
    pub = public_key.public_key() if hasattr(public_key, "private_bytes") else public_key
    entries: list[dict[str, Any]] = []
    prev = GENESIS
    for n, line in enumerate(_lines(Path(log)), start=1):
        try:
            entry = json.loads(line)
            sig = base64.b64decode(entry.pop("sig"), validate=True)
        except (ValueError, KeyError, TypeError) as err:
            raise TrustError(f"{log} line {n} is not a log entry ({err})",
                             "the log was edited; restore it from a backup") from err
        if entry.get("prev") != prev or entry.get("seq") != n:
            raise TrustError(f"{log} line {n} breaks the hash chain",
                             "a line was changed, removed or inserted before it")
        verify(pub, canonical_json(entry), sig, what=f"{log} line {n}")
        entries.append(entry)
        prev = sha256_hex(line)
    return entries


def log_head(log: str | os.PathLike[str]) -> str:
    """sha256 of the last line (GENESIS for an empty log): record it with the results."""
    lines = _lines(Path(log))
    return sha256_hex(lines[-1]) if lines else GENESIS


def _append(log: Path, signer: Any, fields: dict[str, Any]) -> dict[str, Any]:
    lines = _lines(log)
    entry = dict(fields, seq=len(lines) + 1, time=time.time(),
                 prev=sha256_hex(lines[-1]) if lines else GENESIS, keyid=key_id(signer))
    entry["sig"] = base64.b64encode(sign(signer, canonical_json(entry))).decode()
    log.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, canonical_json(entry) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return entry


def _check_pin(path: Path, meta: dict[str, Any], log: Path, signer: Any, sealed_sha: str,
               manifest_sha: str) -> list[dict[str, Any]]:
    """The verified entries of ``log`` if it is the log pinned at sealing, signed by the
    pinned key, holding this set's "sealed" entry; SealedSetError otherwise."""
    pin = meta.get("opening_log")
    if not isinstance(pin, dict):
        raise SealedSetError(f"sealed set {path} pins no opening log (it was sealed before "
                             "sets pinned their log), so any log could be passed",
                             "re-seal it: roadshield data seal ROOT --key KEY --log-key "
                             "LOG_KEY --out DIR")
    given = key_id(signer.public_key() if hasattr(signer, "private_bytes") else signer)
    if given != pin.get("keyid"):
        raise SealedSetError(f"log key {given} is not the key {pin.get('keyid')} pinned when "
                             f"{path} was sealed", "sign the opening log with the pinned key")
    if log.resolve() != _pinned_path(path, pin):
        raise SealedSetError(f"opening log {log} is not the log {pin.get('path')} pinned when "
                             f"{path} was sealed", "pass the pinned log (--log)")
    entries = verify_log(log, load_public_key(base64.b64decode(str(pin["public_key"]))))
    if not any(e.get("event") == "sealed" and e.get("sealed_sha256") == sealed_sha
               and e.get("manifest_sha256") == manifest_sha for e in entries):
        raise SealedSetError(f"opening log {log} holds no 'sealed' entry for {path}",
                             "the log was replaced or the set re-sealed without it; restore "
                             "the log from a backup")
    return entries


@contextlib.contextmanager
def _locked(log: Path) -> Iterator[None]:
    """Hold an exclusive lock beside the log, so two evaluations cannot both pass the
    "not opened yet" check before either writes its line (POSIX; elsewhere no lock)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log.with_name(log.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def open_sealed(path: str | os.PathLike[str], key: bytes, model_sha256: str,
                log: str | os.PathLike[str], signer: Any, force: bool = False) -> SealedSet:
    """Decrypt the sealed set for the final evaluation of model ``model_sha256``.

    ``log`` and ``signer`` must be the log and key pinned when the set was sealed, and the
    log must verify and hold the set's "sealed" entry (SealedSetError otherwise, also for a
    set sealed without a pin; nothing is logged then). A second opening for the same model
    digest raises SealedSetError (and is logged as "refused") unless ``force``, which is
    logged as "forced_open". Tampered ciphertext or manifest raises TrustError.
    """
    path, log = Path(path), Path(log)
    if len(model_sha256) != 64 or any(c not in "0123456789abcdef" for c in model_sha256):
        raise ConfigError(f"model digest {model_sha256!r} is not a sha256 hex digest",
                          "pass the sha256 of the model file")
    with _locked(log):
        data, sealed_sha, manifest_sha = _decrypt(path, key)
        entries = _check_pin(path, data.manifest, log, signer, sealed_sha, manifest_sha)
        fields = {"model_sha256": model_sha256, "sealed_sha256": sealed_sha,
                  "manifest_sha256": manifest_sha}
        opened = [e for e in entries if e.get("model_sha256") == model_sha256
                  and e.get("sealed_sha256") == sealed_sha
                  and e.get("event") in ("open", "forced_open")]
        if opened and not force:
            _append(log, signer, dict(fields, event="refused"))
            raise SealedSetError(f"sealed set {path} was already opened for model "
                                 f"{model_sha256[:16]} (log line {opened[0]['seq']})",
                                 "evaluate a new model, or pass force=True (it is logged)")
        _append(log, signer, dict(fields, event="forced_open" if opened else "open"))
    return data
