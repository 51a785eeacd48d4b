"""The service's own certificate authority, its server certificate and client certificates.

``serve keys init`` writes into the state folder: ``ca.pem`` / ``ca.key`` (the CA, ECDSA
P-256, 10 years), ``server.pem`` / ``server.key`` (serverAuth, SANs from --host-name and
--ip, 1 year), ``secrets.json`` (the watermark and noise keys, 32 random bytes each, hex).
``serve keys issue`` writes ``<id>.pem`` / ``<id>.key`` (clientAuth, CN = key id) and
records the certificate's sha256 (of its DER bytes) with the key. Private keys are
written 0600 and unencrypted: the folder is the service's secret.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import secrets
from collections.abc import Sequence
from pathlib import Path

from roadshield_base.errors import ConfigError
from roadshield_base.fileio import atomic_write_bytes


def _crypto():  # noqa: ANN202 - cryptography's modules, imported when certificates are made
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    return x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _write_key(path: Path, key: object) -> None:
    _, _, serialization, _, _, _ = _crypto()
    atomic_write_bytes(path, key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()), mode=0o600)


def _pem(cert: object) -> bytes:
    _, _, serialization, _, _, _ = _crypto()
    return cert.public_bytes(serialization.Encoding.PEM)  # type: ignore[attr-defined]


def init_ca(folder: str | Path, host_names: Sequence[str] = ("localhost",),
            ips: Sequence[str] = ("127.0.0.1",), force: bool = False) -> dict[str, Path]:
    """Make the CA, the server certificate and the secrets in ``folder``; refuses to
    overwrite an existing CA unless ``force``. Returns the paths written."""
    x509, hashes, _, ec, eku, oid = _crypto()
    folder = Path(folder)
    if (folder / "ca.key").exists() and not force:
        raise ConfigError(f"{folder} already holds a CA",
                          "pass --force to replace it (every issued certificate dies)")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(oid.COMMON_NAME, "roadshield serve CA")])
    now = _now()
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=3650))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    server_key = ec.generate_private_key(ec.SECP256R1())
    try:
        sans = [x509.DNSName(h) for h in host_names] + [
            x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    except ValueError as err:
        raise ConfigError(f"bad --ip: {err}", "give addresses like 127.0.0.1") from err
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(oid.COMMON_NAME,
                                                          (list(host_names) or ["server"])[0])]))
              .issuer_name(ca_name).public_key(server_key.public_key())
              .serial_number(x509.random_serial_number())
              .not_valid_before(now - dt.timedelta(minutes=5))
              .not_valid_after(now + dt.timedelta(days=365))
              .add_extension(x509.SubjectAlternativeName(sans), critical=False)
              .add_extension(x509.ExtendedKeyUsage([eku.SERVER_AUTH]), critical=False)
              .sign(ca_key, hashes.SHA256()))
    paths = {name: folder / name for name in ("ca.pem", "ca.key", "server.pem", "server.key",
                                              "secrets.json")}
    _write_key(paths["ca.key"], ca_key)
    atomic_write_bytes(paths["ca.pem"], _pem(ca))
    _write_key(paths["server.key"], server_key)
    atomic_write_bytes(paths["server.pem"], _pem(server))
    if not paths["secrets.json"].exists() or force:
        secrets_doc = {"watermark_key": secrets.token_hex(32), "noise_key": secrets.token_hex(32)}
        atomic_write_bytes(paths["secrets.json"], json.dumps(secrets_doc).encode(), mode=0o600)
    return paths


def issue_client_cert(folder: str | Path, key_id: str, out: str | Path, *, days: float = 365,
                      not_before: dt.datetime | None = None) -> tuple[Path, Path, str]:
    """Sign a client certificate (CN = key_id) with the CA in ``folder``; write
    ``out/<key_id>.pem`` and ``.key``. Returns (cert path, key path, sha256 of the DER)."""
    x509, hashes, serialization, ec, eku, oid = _crypto()
    folder, out = Path(folder), Path(out)
    try:
        ca_key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), None)
        ca = x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes())
    except (OSError, ValueError) as err:
        raise ConfigError(f"no usable CA in {folder}: {err}",
                          "run `roadshield serve keys init --dir DIR` first") from err
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or _now() - dt.timedelta(minutes=5)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(oid.COMMON_NAME, key_id)]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([eku.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = out / f"{key_id}.pem", out / f"{key_id}.key"
    _write_key(key_path, key)
    atomic_write_bytes(cert_path, _pem(cert))
    return cert_path, key_path, cert_sha256_der(cert.public_bytes(serialization.Encoding.DER))


def cert_sha256_der(der: bytes) -> str:
    """The fingerprint the store keeps: hex sha256 of the certificate's DER bytes."""
    return hashlib.sha256(der).hexdigest()


def load_secrets(folder: str | Path) -> dict[str, bytes]:
    """The watermark and noise keys of ``folder/secrets.json`` as bytes."""
    path = Path(folder) / "secrets.json"
    try:
        doc = json.loads(path.read_text())
        return {"watermark_key": bytes.fromhex(doc["watermark_key"]),
                "noise_key": bytes.fromhex(doc["noise_key"])}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"cannot read the service secrets {path}: {err}",
                          "run `roadshield serve keys init --dir DIR` first") from err
