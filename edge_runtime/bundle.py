"""Signed model bundles: the device checks the signature, then runs the bytes it checked.

A bundle is one folder written by ``roadshield distill bundle``: the model file(s),
``metadata.json`` and ``model.sig``. ``model.sig`` is the OpenSSF model-signing format in
its key mode: a Sigstore bundle (JSON, media type
``application/vnd.dev.sigstore.bundle.v0.3+json``) whose ``dsseEnvelope`` carries an
in-toto Statement v1 (payload type ``application/vnd.in-toto+json``, predicate type
``https://model_signing/signature/v1.0``). The statement's one subject is the bundle's
name with a sha256 over every file's digest; ``predicate.resources`` lists each file
(``name`` relative to the folder, ``algorithm`` "sha256", ``digest`` hex) and
``predicate.serialization`` how the folder was hashed (method "files"). The signature is
ECDSA (P-256 with SHA-256, P-384 with SHA-384, P-521 with SHA-512) over the DSSE
pre-authentication encoding of the payload; ``verificationMaterial.publicKey.hint`` is
the sha256 (hex) of the signer's public key in SubjectPublicKeyInfo PEM.

Verification needs only ``cryptography``, so the device carries no Sigstore client. It
reads every file of the folder once into memory, hashes those bytes and hands the very
same bytes on (:class:`VerifiedBundle`); nothing is reopened between check and use. A
file the signature does not list, a listed file that is missing, a symlink or any other
kind of entry is refused, as is a signature by another key.

A trusted key may expire: given as a trust file (JSON, format ``roadshield.trust-key/v1``:
``public_key`` the PEM, ``not_before`` and ``not_after`` in UTC as
``YYYY-MM-DDTHH:MM:SSZ``) rather than a bare PEM, it is refused outside that window, so a
retired or leaked signing key stops working on the device when its time is up.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from roadshield_base.trust import TrustError, pae

SIGNATURE_FILE = "model.sig"
METADATA_FILE = "metadata.json"
BUNDLE_FORMAT = "roadshield.bundle/v1"
TRUST_FILE_FORMAT = "roadshield.trust-key/v1"
SIGSTORE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
# a bundle is a few model files and their metadata: anything bigger is not one of ours
MAX_BUNDLE_BYTES = 2 << 30
MAX_SIGNATURE_BYTES = 1 << 20
_SIGN_HINT = "sign it again with `roadshield distill bundle`, or ask its publisher for the " \
             "public key it was signed with"


@dataclass(frozen=True)
class VerifiedBundle:
    """What a bundle held once its signature checked out.

    files: every signed file's bytes by its name in the bundle (the bytes that were
    hashed); metadata: ``metadata.json`` decoded; root_digest: the subject's sha256 (hex),
    which names the whole bundle in logs; key_hint: sha256 of the signer's public key."""

    root: Path
    files: Mapping[str, bytes]
    metadata: Mapping[str, Any]
    root_digest: str
    key_hint: str
    digests: Mapping[str, str] = field(default_factory=dict)

    def model_bytes(self, role: str = "model") -> bytes:
        """The bytes of the model ``metadata.json`` names under ``role`` ("model", "int8")."""
        models = self.metadata.get("models")
        name = models.get(role) if isinstance(models, Mapping) else None
        if not isinstance(name, str) or name not in self.files:
            raise TrustError(f"bundle {self.root} has no signed '{role}' model",
                             f"its metadata lists: {sorted(models) if models else 'none'}")
        return self.files[name]

    def model_name(self, role: str = "model") -> str:
        self.model_bytes(role)  # the same checks
        return str(self.metadata["models"][role])


def public_key_hint(public_key: Any) -> str:
    """sha256 (hex) of ``public_key`` as SubjectPublicKeyInfo PEM: the bundle's key hint."""
    from cryptography.hazmat.primitives import serialization

    pem = public_key.public_bytes(serialization.Encoding.PEM,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def load_trust_key(path: str | os.PathLike[str], now: datetime | None = None) -> Any:
    """An elliptic-curve public key the device trusts to sign bundles: a PEM file, or a trust
    file (``bundle.trust.json`` from ``distill keygen --valid-days``) that carries the PEM
    with the window it is valid in; outside that window (``now``, default the clock) the
    key is refused."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TrustError(f"trust key {path} does not exist",
                         "copy the publisher's bundle.pub (from `roadshield distill keygen`) "
                         "to the device") from None
    if data.lstrip().startswith(b"{"):
        data = check_trust_file(data, path, now)
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as err:
        raise TrustError(f"trust key {path} is not a PEM public key: {err}",
                         "pass the .pub file, not the private key") from err
    if not isinstance(key, ec.EllipticCurvePublicKey) or \
            key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        raise TrustError(f"trust key {path} is not a P-256, P-384 or P-521 key",
                         "bundles are signed with the elliptic-curve keys model-signing uses")
    return key


def trust_file(public_pem: bytes, not_before: datetime, not_after: datetime) -> bytes:
    """The trust file's bytes: ``format``, ``public_key`` (the PEM), ``not_before`` and
    ``not_after`` (UTC, ``YYYY-MM-DDTHH:MM:SSZ``), sorted keys, one trailing newline."""
    return (json.dumps({"format": TRUST_FILE_FORMAT, "public_key": public_pem.decode("ascii"),
                        "not_before": _utc_text(not_before), "not_after": _utc_text(not_after)},
                       indent=2, sort_keys=True) + "\n").encode()


def check_trust_file(data: bytes, path: Path, now: datetime | None = None) -> bytes:
    """The PEM a trust file carries, once its window holds ``now``; TrustError otherwise."""
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("format") != TRUST_FILE_FORMAT:
            raise ValueError(f"format is not {TRUST_FILE_FORMAT!r}")
        pem, start, end = (doc[k] for k in ("public_key", "not_before", "not_after"))
        if not isinstance(pem, str):
            raise ValueError("public_key is not a string")
        not_before, not_after = _parse_utc(start), _parse_utc(end)
    except (ValueError, KeyError, TypeError) as err:
        raise TrustError(f"trust file {path} is malformed: {err}",
                         "use the bundle.trust.json `roadshield distill keygen --valid-days` "
                         "wrote") from None
    now = now or datetime.now(timezone.utc)
    if not not_before < not_after:
        raise TrustError(f"trust file {path}: not_before {start} is not before not_after {end}",
                         "make a new key with `roadshield distill keygen --valid-days N`")
    if now < not_before:
        raise TrustError(f"trust key {path} is not valid before {start} (the clock says "
                         f"{_utc_text(now)})", "check the device's clock")
    if now >= not_after:
        raise TrustError(f"trust key {path} expired on {end}: bundles it signed no longer run",
                         "install the publisher's current trust file and a bundle signed "
                         "with that key")
    return pem.encode("ascii")


def _utc_text(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_utc(text: Any) -> datetime:
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a time")
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


def _hash_for(public_key: Any) -> Any:
    from cryptography.hazmat.primitives import hashes

    return {256: hashes.SHA256, 384: hashes.SHA384, 521: hashes.SHA512}[
        public_key.curve.key_size]()


def _read_signature(root: Path) -> dict[str, Any]:
    sig_path = root / SIGNATURE_FILE
    if sig_path.is_symlink() or not sig_path.is_file():
        raise TrustError(f"{root} is not a signed bundle: {SIGNATURE_FILE} is missing",
                         _SIGN_HINT)
    if sig_path.stat().st_size > MAX_SIGNATURE_BYTES:
        raise TrustError(f"{sig_path} is larger than any signature", _SIGN_HINT)
    try:
        bundle = json.loads(sig_path.read_bytes())
    except ValueError as err:
        raise TrustError(f"{sig_path} is not JSON: {err}", _SIGN_HINT) from err
    media = bundle.get("mediaType") if isinstance(bundle, dict) else None
    if media != SIGSTORE_MEDIA_TYPE:
        raise TrustError(f"{sig_path} is not a Sigstore bundle v0.3 (mediaType {media!r})",
                         _SIGN_HINT)
    return bundle


def _strict_b64(text: str) -> bytes:
    """Base64 that decodes only from its one canonical spelling (a changed padding bit or a
    second spelling of the same bytes is refused)."""
    data = base64.b64decode(text, validate=True)
    if base64.b64encode(data).decode() != text:
        raise ValueError("not canonical base64")
    return data


def _verified_statement(bundle: dict[str, Any], public_key: Any, where: Path) -> dict[str, Any]:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ec

    material = bundle.get("verificationMaterial")
    hint = ((material or {}).get("publicKey") or {}).get("hint", "") \
        if isinstance(material, dict) else ""
    if hint and hint != public_key_hint(public_key):
        raise TrustError(f"{where} was signed by another key (key hint {hint[:16]}...)",
                         "pass the public key of whoever signed it with --trust-key; a "
                         "bundle signed by an unknown key is never run")
    env = bundle.get("dsseEnvelope")
    if not isinstance(env, dict) or env.get("payloadType") != IN_TOTO_PAYLOAD_TYPE:
        raise TrustError(f"{where} holds no in-toto DSSE envelope", _SIGN_HINT)
    # the parts the signature does not cover must be exactly what key mode writes, so no
    # byte of the file can change unnoticed
    sig_entries = env.get("signatures")
    if set(bundle) != {"mediaType", "verificationMaterial", "dsseEnvelope"} or \
            material != {"publicKey": {"hint": public_key_hint(public_key)},
                         "tlogEntries": []} or \
            set(env) != {"payload", "payloadType", "signatures"} or \
            not isinstance(sig_entries, list) or not sig_entries or \
            any(not isinstance(e, dict) or set(e) - {"sig", "keyid"} or
                e.get("keyid", "") != "" for e in sig_entries):
        raise TrustError(f"{where}'s {SIGNATURE_FILE} is not in the shape model-signing's "
                         "key mode writes (a field was added, removed or renamed)", _SIGN_HINT)
    try:
        payload = _strict_b64(env["payload"])
        sigs = [_strict_b64(e["sig"]) for e in sig_entries]
    except (KeyError, TypeError, ValueError) as err:
        raise TrustError(f"{where}'s envelope is malformed: {err}", _SIGN_HINT) from err
    signed = pae(IN_TOTO_PAYLOAD_TYPE, payload)
    for sig in sigs:
        try:
            public_key.verify(sig, signed, ec.ECDSA(_hash_for(public_key)))
            break
        except InvalidSignature:
            continue
    else:
        raise TrustError(f"{where}'s signature does not verify with the trusted key",
                         "the signature or the statement was altered, or another key "
                         "signed it; never run it")
    try:
        statement = json.loads(payload)
    except ValueError as err:
        raise TrustError(f"{where}'s signed statement is not JSON: {err}", _SIGN_HINT) from err
    if not isinstance(statement, dict) or statement.get("_type") != STATEMENT_TYPE or \
            statement.get("predicateType") != PREDICATE_TYPE:
        raise TrustError(f"{where}'s statement is not a model-signing v1.0 statement",
                         _SIGN_HINT)
    return statement


def _resources(statement: dict[str, Any], where: Path) -> tuple[dict[str, str], str, set[str]]:
    """(name -> sha256 hex, root digest, ignored top-level names) of a verified statement."""
    try:
        predicate = statement["predicate"]
        serial = predicate["serialization"]
        subjects = statement["subject"]
        root_digest = subjects[0]["digest"]["sha256"]
        listed = [(r["name"], r["algorithm"], r["digest"]) for r in predicate["resources"]]
        ignored = {str(p) for p in serial.get("ignore_paths", [])}
    except (KeyError, IndexError, TypeError) as err:
        raise TrustError(f"{where}'s statement lacks {err}", _SIGN_HINT) from err
    if len(subjects) != 1 or serial.get("method") != "files" or \
            serial.get("hash_type") != "sha256" or serial.get("allow_symlinks"):
        raise TrustError(f"{where} was hashed as {serial.get('method')}/"
                         f"{serial.get('hash_type')} (symlinks allowed: "
                         f"{serial.get('allow_symlinks')}); the device checks files/sha256 "
                         "without symlinks", _SIGN_HINT)
    hasher = hashlib.sha256()
    digests: dict[str, str] = {}
    for name, algorithm, digest in listed:
        if algorithm != "sha256" or not isinstance(name, str) or name in digests:
            raise TrustError(f"{where} lists {name!r} twice or with {algorithm}", _SIGN_HINT)
        hasher.update(bytes.fromhex(digest))
        digests[name] = digest
    if hasher.hexdigest() != root_digest:
        raise TrustError(f"{where}'s file list does not add up to its signed root digest",
                         _SIGN_HINT)
    return digests, root_digest, ignored


def _read_files(root: Path, ignored: set[str]) -> dict[str, bytes]:
    """Every regular file under ``root`` (names relative, '/'-separated), read once."""
    files: dict[str, bytes] = {}
    total = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = Path(dirpath).relative_to(root)
        for name in sorted(dirnames + filenames):
            rel = (rel_dir / name).as_posix()
            if rel == SIGNATURE_FILE or rel.split("/")[0] in ignored:
                continue
            path = Path(dirpath) / name
            if path.is_symlink() or not (path.is_dir() or path.is_file()):
                raise TrustError(f"{path} is a link or special file inside a bundle",
                                 "a bundle holds regular files only")
            if path.is_file():
                data = path.read_bytes()
                total += len(data)
                if total > MAX_BUNDLE_BYTES:
                    raise TrustError(f"{root} holds more than {MAX_BUNDLE_BYTES >> 20} MiB",
                                     "a bundle holds a model and its metadata only")
                files[rel] = data
        dirnames[:] = [d for d in dirnames if (rel_dir / d).as_posix().split("/")[0]
                       not in ignored]
    return files


def verify_bundle(root: str | os.PathLike[str], trust_key: str | os.PathLike[str] | Any
                  ) -> VerifiedBundle:
    """Check ``root``'s signature with ``trust_key`` (a path to a PEM public key, or the
    key) and return its files' verified bytes; raise TrustError on anything unsigned,
    altered, extra, missing or signed by another key."""
    root = Path(root)
    if not root.is_dir():
        raise TrustError(f"bundle {root} is not a folder",
                         "pass the folder `roadshield distill bundle` wrote")
    key = trust_key if hasattr(trust_key, "verify") else load_trust_key(trust_key)
    statement = _verified_statement(_read_signature(root), key, root)
    digests, root_digest, ignored = _resources(statement, root)
    files = _read_files(root, ignored)
    unsigned = sorted(set(files) - set(digests))
    missing = sorted(set(digests) - set(files))
    if unsigned or missing:
        raise TrustError(f"bundle {root} does not match its signature: "
                         + "; ".join(part for part in (
                             f"not signed: {', '.join(unsigned)}" if unsigned else "",
                             f"missing: {', '.join(missing)}" if missing else "") if part),
                         "remove what was added, or rebuild and sign the bundle")
    altered = sorted(n for n, data in files.items()
                     if hashlib.sha256(data).hexdigest() != digests[n])
    if altered:
        raise TrustError(f"bundle {root} was altered after signing: {', '.join(altered)}",
                         "never run it; fetch the bundle again from its publisher")
    try:
        metadata = json.loads(files[METADATA_FILE])
    except KeyError:
        raise TrustError(f"bundle {root} has no {METADATA_FILE}", _SIGN_HINT) from None
    except ValueError as err:
        raise TrustError(f"{root / METADATA_FILE} is not JSON: {err}", _SIGN_HINT) from err
    if not isinstance(metadata, dict) or metadata.get("format") != BUNDLE_FORMAT:
        raise TrustError(f"{root / METADATA_FILE} is not a {BUNDLE_FORMAT} manifest",
                         "rebuild the bundle with this version of roadshield")
    return VerifiedBundle(root=root, files=files, metadata=metadata, root_digest=root_digest,
                          key_hint=public_key_hint(key), digests=digests)


def bundle_model(root: str | os.PathLike[str], trust_key: str | os.PathLike[str] | Any,
                 role: str = "model") -> tuple[Any, dict[str, Any]]:
    """Verify ``root`` and return its ``role`` model as the verified bytes (a ``ModelBytes``,
    which the runners load without reopening the file) and what vouched for it (the loop
    report's ``model_trust``)."""
    from edge_runtime.runners.base import ModelBytes

    bundle = verify_bundle(root, trust_key)
    name = bundle.model_name(role)
    model = ModelBytes(bundle.root / name, bundle.model_bytes(role),
                       origin=f"bundle {bundle.root} (key {bundle.key_hint[:16]})")
    return model, {"signed": True, "bundle": str(bundle.root), "model": name,
                   "sha256": model.sha256, "root_digest": bundle.root_digest,
                   "key_hint": bundle.key_hint}
