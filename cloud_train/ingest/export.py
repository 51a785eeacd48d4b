"""The gate's signed export: the only folder stage 2's first stage reads.

``roadshield data export --store STORE --out DIR --keys KEYS`` writes::

    DIR/gtsrb/...                  the accepted samples (and released ones), GTSRB layout:
                                   GTSRB/Training/NNNNN/*.ppm, GT-NNNNN.csv, classes.csv
    DIR/gate_export.intoto.jsonl   one DSSE envelope, payload type
                                   application/vnd.in-toto+json, over an in-toto Statement v1

The Statement: ``subject`` = every file under ``DIR/gtsrb`` by sha256, named relative to
DIR (``gtsrb/GTSRB/Training/00003/00000_00001.ppm``); ``predicateType``
``https://roadshield.dev/attestation/gate-export/v1``; ``predicate`` = ``{"classes": [...],
"samples": [{"file", "id", "source", "batch_id", "object" (sha256 of the bytes the gate
judged and stored), "label", "decision" (ACCEPTED or RELEASED), "reasons"}], "held":
{decision: count of records not exported}, "gate": {the store's registry, root key and
reference digests and the reference's screen configuration}}``. It is signed by the gate
key that the root-signed stage policy names (role ``gate``, ``KEYS/gate.key``).

Every exported image is re-encoded losslessly from the pixels the gate decoded, so what
stage 2 reads is exactly what the gate screened.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloud_train.attest.statement import PAYLOAD_TYPE, STATEMENT_TYPE, digest_map, resources
from roadshield_base.errors import ConfigError, DatasetError
from roadshield_base.trust import (
    TrustError,
    canonical_json,
    dsse_sign,
    dsse_verify,
    key_id,
    sha256_hex,
)

EXPORT_FILE = "gate_export.intoto.jsonl"
EXPORT_PREDICATE = "https://roadshield.dev/attestation/gate-export/v1"
GATE_ROLE = "gate"
_HINT = ("stage 2 reads only what the ingest gate exported: ingest the batches with "
         "`roadshield data ingest`, then `roadshield data export --store STORE --out DIR "
         "--keys KEYS` and preprocess DIR")


class ExportError(DatasetError):
    """A folder is not an intact, correctly signed gate export."""


@dataclass(frozen=True)
class GateExport:
    """A verified export: ``subjects`` name -> sha256 (names relative to the export folder),
    ``samples`` as the predicate lists them, ``keyid`` of the gate key that signed it and
    the envelope's bytes (``raw``) as read."""

    root: Path
    subjects: dict[str, str]
    samples: list[dict[str, Any]]
    classes: list[str]
    keyid: str
    raw: bytes

    def labels_by_file(self) -> dict[str, int]:
        return {s["file"]: int(s["label"]) for s in self.samples}


def _gate_config(store: Path) -> dict[str, Any]:
    from cloud_train.ingest.gate import store_paths

    p = store_paths(store)

    def digest(path: Path) -> str:
        return sha256_hex(path.read_bytes()) if path.is_file() else ""

    ref = p["reference"] / "reference.json"
    try:
        screen = json.loads(ref.read_text()).get("config", {}) if ref.is_file() else {}
    except (OSError, ValueError):
        screen = {}
    return {"registry_sha256": digest(p["registry"]), "root_pub_sha256": digest(p["root_pub"]),
            "reference_sha256": digest(ref), "screen_config": screen}


def _decode(data: bytes, what: str) -> Any:
    import cv2
    import numpy as np

    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise DatasetError(f"stored object {what} no longer decodes",
                           "the store is damaged: restore it from a backup")
    return np.ascontiguousarray(bgr[..., ::-1])


def export_store(store: str | os.PathLike[str], out: str | os.PathLike[str], key: Any,
                 class_names: list[str] | tuple[str, ...] | None = None) -> GateExport:
    """Write the store's accepted and released samples to ``out`` with the signed statement.

    ``key``: the gate's private key. Refuses an ``out`` that exists (an export is written
    once) and a store with nothing to export.
    """
    from cloud_train.gtsrb import SplitWriter, staged_dataset
    from cloud_train.ingest.gate import read_journal, read_object
    from cloud_train.ingest.store import accepted_samples, releases
    from cloud_train.signs import SYNTHETIC_CLASSES
    from roadshield_base.fileio import atomic_write_bytes

    store, out = Path(store), Path(out)
    names = list(class_names or SYNTHETIC_CLASSES)
    if out.exists():
        raise ConfigError(f"{out} exists", "export into a new folder; an export is written once")
    records = accepted_samples(store)
    if not records:
        raise DatasetError(f"store {store} holds no accepted samples",
                           "ingest batches with `roadshield data ingest` first")
    released = releases(store)
    out.mkdir(parents=True)
    samples: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    with staged_dataset(out, names) as stage:
        writer = SplitWriter(stage, "train", len(names))
        for rec in records:
            ident = (rec["source"], rec["id"])
            if ident in seen:  # a sample id counts once per source
                continue
            seen.add(ident)
            label = int(rec["label"])
            path = writer.add(_decode(read_object(store, rec), rec["object"]), label)
            key_ = f"{rec['index_sha256']}:{rec['line']}"
            samples.append({
                "file": (Path("gtsrb") / path.relative_to(stage)).as_posix(), "id": rec["id"],
                "source": rec["source"], "batch_id": rec["batch_id"], "object": rec["object"],
                "label": label, "reasons": list(rec.get("reasons", [])),
                "decision": "RELEASED" if key_ in released else "ACCEPTED"})
        writer.close()
    subjects = {p.relative_to(out).as_posix(): sha256_hex(p.read_bytes())
                for p in sorted((out / "gtsrb").rglob("*")) if p.is_file()}
    held = Counter(r["decision"] for r in read_journal(store))
    held["ACCEPTED"] = 0
    held["QUARANTINED"] -= sum(s["decision"] == "RELEASED" for s in samples)
    statement = export_statement(subjects, samples, names, _gate_config(store),
                                 {k: v for k, v in sorted(held.items()) if v})
    env = dsse_sign(PAYLOAD_TYPE, canonical_json(statement), [key])
    atomic_write_bytes(out / EXPORT_FILE, json.dumps(env, sort_keys=True).encode() + b"\n")
    return read_export(out, {key_id(key): key.public_key()})


def export_statement(subjects: dict[str, str], samples: list[dict[str, Any]],
                     classes: list[str], gate: dict[str, Any],
                     held: dict[str, int]) -> dict[str, Any]:
    """The in-toto Statement of a gate export (see the module docstring)."""
    return {"_type": STATEMENT_TYPE, "subject": resources(subjects),
            "predicateType": EXPORT_PREDICATE,
            "predicate": {"classes": list(classes), "samples": samples, "held": held,
                          "gate": gate}}


def find_export(raw: str | os.PathLike[str]) -> Path:
    """The export statement of folder ``raw``; ExportError naming the folder if absent."""
    raw = Path(raw)
    path = raw / EXPORT_FILE
    if path.is_file() and not path.is_symlink():
        return path
    hint = _HINT
    for up in (raw.parent, raw.parent.parent):
        if (up / EXPORT_FILE).is_file():
            hint = f"point at the export folder {up}, which holds {EXPORT_FILE}"
    raise ExportError(f"{raw} is not a gate export: {EXPORT_FILE} is missing", hint)


def read_export(raw: str | os.PathLike[str], trusted: dict[str, Any]) -> GateExport:
    """Verify and parse the export statement of ``raw`` against ``trusted`` ({keyid: public
    key}: the gate key of the stage policy). Checks the signature and the statement's shape,
    not the files (the reader hashes the bytes it reads against ``subjects``)."""
    path = find_export(raw)
    data = path.read_bytes()
    try:
        env = json.loads(data)
        payload = dsse_verify(env, trusted, PAYLOAD_TYPE, what=str(path))
        st = json.loads(payload)
        if st.get("_type") != STATEMENT_TYPE or st.get("predicateType") != EXPORT_PREDICATE:
            raise TrustError(f"{path} is not a gate-export statement", _HINT)
        subjects = digest_map(st["subject"], f"{path} subject")
        pred = st["predicate"]
        samples, classes = list(pred["samples"]), [str(c) for c in pred["classes"]]
        for s in samples:
            if s["file"] not in subjects or not 0 <= int(s["label"]) < len(classes):
                raise TrustError(f"{path}: sample {s.get('id')!r} names a file or label the "
                                 "export does not hold", _HINT)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ExportError(f"{path} is malformed: {err}", _HINT) from err
    except TrustError as err:
        signers = [s.get("keyid") for s in env.get("signatures", []) if isinstance(s, dict)] \
            if isinstance(env, dict) else []
        raise ExportError(f"{path} does not verify against the gate key "
                          f"{', '.join(trusted) or '(none)'} of the stage policy (signed by "
                          f"{', '.join(map(str, signers)) or 'nobody'}): "
                          f"{str(err).splitlines()[0]}", _HINT) from err
    files = [s["file"] for s in samples]
    if len(set(files)) != len(files):
        raise ExportError(f"{path} lists a file twice", _HINT)
    return GateExport(Path(raw), subjects, samples, classes, next(iter(trusted)), data)


def sign_folder_as_export(root: str | os.PathLike[str], key: Any, source: str = "direct"
                          ) -> GateExport:
    """Sign an existing GTSRB-layout folder ``root/gtsrb`` (train split) as a gate export in
    which every sample was accepted, for red teams, benchmarks and tests that stand in for
    the gate. Whoever holds the gate key can vouch for any folder this way: that is why the
    key stays with the gate and the policy names it alone."""
    from cloud_train.gtsrb import _entries, locate_gtsrb, read_class_names
    from cloud_train.signs import GTSRB_CLASS_NAMES
    from roadshield_base.fileio import atomic_write_bytes

    root = Path(root)
    layout = locate_gtsrb(root)
    if layout.train_dir is None:
        raise DatasetError(f"no training split under {root}", _HINT)
    names = list(read_class_names(layout.classes_csv) if layout.classes_csv
                 else GTSRB_CLASS_NAMES)
    # exactly what the decode stage reads: the train split's files and classes.csv
    files = [p for p in sorted(layout.train_dir.rglob("*")) if p.is_file()]
    files += [layout.classes_csv] if layout.classes_csv else []
    subjects = {p.relative_to(root).as_posix(): sha256_hex(p.read_bytes()) for p in files}
    samples = []
    for path, _, cid in _entries(layout, "train"):
        rel = path.relative_to(root).as_posix()
        samples.append({"file": rel, "id": rel, "source": source, "batch_id": "",
                        "object": subjects[rel], "label": int(cid), "reasons": [],
                        "decision": "ACCEPTED"})
    statement = export_statement(subjects, samples, names, {"stand_in": source}, {})
    env = dsse_sign(PAYLOAD_TYPE, canonical_json(statement), [key])
    atomic_write_bytes(root / EXPORT_FILE, json.dumps(env, sort_keys=True).encode() + b"\n")
    return read_export(root, {key_id(key): key.public_key()})
