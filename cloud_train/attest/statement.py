"""in-toto Statement v1 and SLSA provenance v1 documents, and their DSSE files.

A stage statement::

    {"_type": "https://in-toto.io/Statement/v1",
     "subject": [{"name": "<stage>/<file>", "digest": {"sha256": "<hex>"}}, ...],
     "predicateType": "https://roadshield.dev/attestation/stage/v1",
     "predicate": {"stage": "<stage>", "inputs": [<resource>, ...],
                   "parameters": {...}, "summary": {...},
                   "invariants": {"may_change": "...", "keeps": "..."}}}

Subjects are the stage's outputs, inputs are what it read, both by sha256 of the bytes.
An attestation file (``<stage>.intoto.jsonl``) holds one DSSE envelope per line, payload
type ``application/vnd.in-toto+json``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from roadshield_base.fileio import atomic_write_bytes
from roadshield_base.trust import TrustError, canonical_json, dsse_sign

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STAGE_PREDICATE = "https://roadshield.dev/attestation/stage/v1"
SLSA_PROVENANCE = "https://slsa.dev/provenance/v1"
TRAIN_BUILD_TYPE = "https://roadshield.dev/build/train/v1"
BUILDER_ID = "https://roadshield.dev/builders/cloud_train/trainer"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def resource(name: str, sha256: str) -> dict[str, Any]:
    """An in-toto ResourceDescriptor naming a file by its sha256."""
    return {"name": name, "digest": {"sha256": sha256}}


def resources(digests: Mapping[str, str]) -> list[dict[str, Any]]:
    """ResourceDescriptors for ``name -> sha256``, sorted by name."""
    return [resource(n, digests[n]) for n in sorted(digests)]


def digest_map(items: Any, what: str) -> dict[str, str]:
    """``name -> sha256`` from a list of ResourceDescriptors; TrustError if malformed."""
    out: dict[str, str] = {}
    if not isinstance(items, list):
        raise TrustError(f"{what} is not a list of resources", "regenerate the attestation")
    for item in items:
        try:
            name, sha = str(item["name"]), str(item["digest"]["sha256"])
        except (KeyError, TypeError) as err:
            raise TrustError(f"{what} has a malformed entry {item!r}",
                             "each entry needs name and digest.sha256") from err
        if not _HEX64.match(sha):
            raise TrustError(f"{what}: {name} has digest {sha!r}, not 64 hex digits",
                             "digests are lower-case hex sha256")
        if name in out:
            raise TrustError(f"{what} names {name} twice", "each file is listed once")
        out[name] = sha
    return out


def stage_statement(stage: str, outputs: Mapping[str, str], inputs: Mapping[str, str],
                    parameters: Mapping[str, Any],
                    summary: Mapping[str, Any] | None = None,
                    invariants: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The Statement a preprocessing stage signs (outputs/inputs: name -> sha256;
    ``invariants``: the stage's entry of ``policy.DECLARED``)."""
    return {"_type": STATEMENT_TYPE, "subject": resources(outputs),
            "predicateType": STAGE_PREDICATE,
            "predicate": {"stage": stage, "inputs": resources(inputs),
                          "parameters": dict(parameters), "summary": dict(summary or {}),
                          "invariants": dict(invariants or {})}}


def slsa_statement(subjects: Mapping[str, str], external_parameters: Mapping[str, Any],
                   resolved_dependencies: Mapping[str, str],
                   internal_parameters: Mapping[str, Any] | None = None,
                   metadata: Mapping[str, Any] | None = None,
                   builder_id: str = BUILDER_ID) -> dict[str, Any]:
    """A SLSA provenance v1 Statement for a training run (subjects: name -> sha256)."""
    return {"_type": STATEMENT_TYPE, "subject": resources(subjects),
            "predicateType": SLSA_PROVENANCE,
            "predicate": {
                "buildDefinition": {
                    "buildType": TRAIN_BUILD_TYPE,
                    "externalParameters": dict(external_parameters),
                    "internalParameters": dict(internal_parameters or {}),
                    "resolvedDependencies": resources(resolved_dependencies)},
                "runDetails": {"builder": {"id": builder_id},
                               "metadata": dict(metadata or {})}}}


def sign_statement(statement: Mapping[str, Any], keys: list[Any]) -> dict[str, Any]:
    """A DSSE envelope (payload type application/vnd.in-toto+json) over the statement."""
    return dsse_sign(PAYLOAD_TYPE, canonical_json(statement), keys)


def parse_statement(payload: bytes, what: str,
                    predicate_type: str | None = None) -> dict[str, Any]:
    """Decode and shape-check a Statement v1 payload; TrustError naming ``what`` if bad."""
    try:
        st = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TrustError(f"{what}: payload is not UTF-8 JSON ({err})",
                         "regenerate the attestation") from err
    if not isinstance(st, dict) or st.get("_type") != STATEMENT_TYPE:
        raise TrustError(f"{what}: _type is not {STATEMENT_TYPE}",
                         "the envelope must hold an in-toto Statement v1")
    if predicate_type is not None and st.get("predicateType") != predicate_type:
        raise TrustError(f"{what}: predicateType {st.get('predicateType')!r}, expected "
                         f"{predicate_type!r}", "the envelope holds another kind of statement")
    if not isinstance(st.get("predicate"), dict):
        raise TrustError(f"{what}: predicate is missing", "regenerate the attestation")
    digest_map(st.get("subject"), f"{what} subject")
    return st


def write_attestation(path: str | os.PathLike[str], envelopes: list[Mapping[str, Any]]) -> Path:
    """Write envelopes as JSON lines, atomically."""
    data = b"".join(canonical_json(dict(e)) + b"\n" for e in envelopes)
    atomic_write_bytes(path, data)
    return Path(path)


def read_attestation(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The envelopes of a ``.intoto.jsonl`` file; TrustError if unreadable or not JSON."""
    try:
        lines = Path(path).read_bytes().decode("utf-8").splitlines()
        envs = [json.loads(line) for line in lines if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TrustError(f"cannot read attestation {path}: {err}",
                         "re-run the stage to write it again") from err
    if not envs or not all(isinstance(e, dict) for e in envs):
        raise TrustError(f"attestation {path} holds no envelope", "re-run the stage")
    return envs
