"""Write the signed model bundle the device runs: ``roadshield distill bundle``.

The bundle is one folder (format in ``edge_runtime.bundle``):

- ``model.onnx``: the exported model (its ONNX metadata carries the class names, the
  input size, and the detectors and drift reference where they were fitted);
- ``model.int8.onnx``: the Q/DQ INT8 model, when one is given;
- ``evaluation.json``: the evaluation results, when given;
- ``provenance.intoto.jsonl``: the checkpoint's signed SLSA provenance, when given, which
  names the verified training data (the stage attestations' digests), the trainer's
  config and the checkpoint; it is checked against the stage policy and against the
  model's ``source_sha256`` before it goes in;
- ``metadata.json``: format ``roadshield.bundle/v1``, the file of each model role, the
  labels and input contract, which monitors the model carries, and the provenance link;
- ``model.sig``: the OpenSSF model-signing signature over all of the above, written by the
  ``model-signing`` library in its key mode (an ECDSA key from ``distill keygen``).

The folder is assembled and signed under a temporary name beside ``out`` and renamed into
place, so a crash leaves either no bundle or a whole signed one.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from edge_runtime.bundle import (
    BUNDLE_FORMAT,
    METADATA_FILE,
    SIGNATURE_FILE,
    check_trust_file,
    public_key_hint,
    trust_file,
)
from roadshield_base.errors import ConfigError
from roadshield_base.fileio import atomic_write_bytes, file_sha256
from roadshield_base.trust import TrustError

PRIVATE_KEY_FILE = "bundle.key"
PUBLIC_KEY_FILE = "bundle.pub"
TRUST_FILE = "bundle.trust.json"


@dataclass(frozen=True)
class BundleResult:
    out: Path
    files: dict[str, str]  # name -> sha256 hex
    key_hint: str


def generate_bundle_keys(out: str | os.PathLike[str], valid_days: float | None = None
                         ) -> tuple[Path, Path]:
    """A new P-256 signing key pair: ``bundle.key`` (PKCS#8 PEM, mode 0600) and
    ``bundle.pub`` (SubjectPublicKeyInfo PEM, the device's ``--trust-key``); with
    ``valid_days`` also ``bundle.trust.json``, the public key valid from now for that many
    days (a device given it as ``--trust-key`` refuses the key afterwards, and
    ``write_bundle`` refuses to sign with it). Refuses to overwrite an existing key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = Path(out)
    priv_path, pub_path = out / PRIVATE_KEY_FILE, out / PUBLIC_KEY_FILE
    if valid_days is not None and not 0 < valid_days <= 3660:
        raise ConfigError(f"--valid-days must be in (0, 3660], got {valid_days}",
                          "rotate signing keys at least every ten years, e.g. 365")
    if priv_path.exists() or pub_path.exists():
        raise ConfigError(f"{out} already holds a bundle key",
                          "keep it (devices trust its public half) or choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    atomic_write_bytes(priv_path, pem)
    os.chmod(priv_path, 0o600)
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    atomic_write_bytes(pub_path, public_pem)
    if valid_days is not None:
        start = datetime.now(timezone.utc).replace(microsecond=0)
        atomic_write_bytes(out / TRUST_FILE,
                           trust_file(public_pem, start, start + timedelta(days=valid_days)))
    return priv_path, pub_path


def _check_signing_window(key_path: Path, private_key: Any) -> None:
    """Refuse to sign with a key whose trust file (beside it) says it has expired or that
    belongs to another key: devices would refuse what it signs."""
    from cryptography.hazmat.primitives import serialization

    trust_path = key_path.with_name(TRUST_FILE)
    if not trust_path.is_file():
        return
    try:
        pem = check_trust_file(trust_path.read_bytes(), trust_path)
    except TrustError as err:
        raise ConfigError(f"will not sign with {key_path}: {err.args[0]}",
                          "make a new key with `roadshield distill keygen --valid-days N` "
                          "and give the devices its trust file") from None
    ours = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    if pem != ours:
        raise ConfigError(f"{trust_path} is the trust file of another key than {key_path}",
                          "keep each key's bundle.trust.json beside its bundle.key")


def _load_private_key(path: Path) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise ConfigError(f"signing key {path} does not exist",
                          "make one with `roadshield distill keygen --out KEYS`") from None
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{path} is not an unencrypted PEM private key: {err}",
                          "use the bundle.key `roadshield distill keygen` wrote") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path} is not an elliptic-curve key",
                          "model-signing's key mode signs with P-256/384/521 keys: use "
                          "`roadshield distill keygen`")
    return key


def _model_summary(model: Path) -> dict[str, Any]:
    from distill.export import read_onnx_metadata

    meta = read_onnx_metadata(model)
    if "class_names" not in meta or "input_size" not in meta:
        raise ConfigError(f"{model} lacks the class names or input size in its metadata",
                          "bundle a model written by `roadshield distill export`")
    return {"class_names": meta["class_names"], "input_size": meta["input_size"],
            "input_format": meta.get("input_format", ""), "arch": meta.get("arch", ""),
            "source_sha256": meta.get("source_sha256", ""),
            "monitors": {"detectors": "detectors" in meta,
                         "drift_reference": "drift_reference" in meta}}


def _provenance_link(path: Path, policy: Path, checkpoint_sha256: str) -> dict[str, Any]:
    """Verify the checkpoint's provenance and say what it names (data, trainer config)."""
    from cloud_train.attest.training_gate import verify_training_provenance

    if not checkpoint_sha256:
        raise ConfigError("the model does not record which checkpoint it came from "
                          "(source_sha256 is empty), so no provenance can be linked to it",
                          "export it again from the checkpoint with `distill export`")
    try:
        envelope = json.loads(path.read_text().splitlines()[0])
    except (OSError, IndexError, ValueError) as err:
        raise ConfigError(f"{path} is not a .intoto.jsonl provenance file: {err}",
                          "pass the <checkpoint>.intoto.jsonl `train --attested` wrote") from err
    try:
        statement = verify_training_provenance(envelope, policy, checkpoint_sha256)
    except TrustError as err:
        raise ConfigError(f"{path} does not vouch for this model: {err}",
                          "bundle the model with the provenance of its own checkpoint") from err
    build = statement["predicate"]["buildDefinition"]
    return {"file": "provenance.intoto.jsonl", "checkpoint_sha256": checkpoint_sha256,
            "payload_sha256": _sha256_text(envelope.get("payload", "")),
            "training_data": {d["name"]: d["digest"]["sha256"]
                              for d in build.get("resolvedDependencies", [])},
            "train_config": build.get("externalParameters", {}).get("train_config", {})}


def _sha256_text(payload_b64: str) -> str:
    import hashlib

    return hashlib.sha256(base64.b64decode(payload_b64)).hexdigest()


def write_bundle(out: str | os.PathLike[str], model: str | os.PathLike[str], *,
                 key: str | os.PathLike[str], int8: str | os.PathLike[str] | None = None,
                 evaluation: str | os.PathLike[str] | None = None,
                 provenance: str | os.PathLike[str] | None = None,
                 policy: str | os.PathLike[str] | None = None) -> BundleResult:
    """Assemble and sign the bundle folder ``out`` (which must not exist yet)."""
    import model_signing

    out, model = Path(out), Path(model)
    if out.exists():
        raise ConfigError(f"{out} already exists",
                          "bundles are immutable once signed: choose a new folder")
    if (provenance is None) != (policy is None):
        raise ConfigError("--provenance and --policy go together",
                          "the provenance is verified against the stage policy's trainer key")
    private_key = _load_private_key(Path(key))
    _check_signing_window(Path(key), private_key)
    summary = _model_summary(model)
    copies = {"model.onnx": model}
    models = {"model": "model.onnx"}
    if int8 is not None:
        _model_summary(Path(int8))  # the same contract
        copies["model.int8.onnx"] = Path(int8)
        models["int8"] = "model.int8.onnx"
    metadata: dict[str, Any] = {"format": BUNDLE_FORMAT, "models": models, **summary}
    if evaluation is not None:
        try:
            json.loads(Path(evaluation).read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"evaluation {evaluation} is not a readable JSON file: {err}",
                              "pass the JSON `roadshield eval --json` printed") from err
        copies["evaluation.json"] = Path(evaluation)
        metadata["evaluation"] = "evaluation.json"
    if provenance is not None and policy is not None:
        metadata["provenance"] = _provenance_link(Path(provenance), Path(policy),
                                                  summary["source_sha256"])
        copies["provenance.intoto.jsonl"] = Path(provenance)
    for name, src in copies.items():
        if not src.is_file():
            raise ConfigError(f"{src} ({name}) does not exist", "check the path")

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        # signed under the bundle's own name: the statement's subject is the folder's name
        work = staging / out.name
        work.mkdir()
        for name, src in copies.items():
            shutil.copyfile(src, work / name)
        (work / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
        (model_signing.signing.Config()
         .use_elliptic_key_signer(private_key=Path(key))
         .set_hashing_config(model_signing.hashing.Config()
                             .set_ignored_paths(paths=[SIGNATURE_FILE]))
         .sign(work, work / SIGNATURE_FILE))
        for path in work.iterdir():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        os.rename(work, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    files = {p.name: file_sha256(p) for p in sorted(out.iterdir()) if p.name != SIGNATURE_FILE}
    return BundleResult(out=out, files=files, key_hint=public_key_hint(private_key.public_key()))
