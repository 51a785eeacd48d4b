"""The training gate's evidence: a SLSA provenance v1 statement for a training run.

``provenance_for_training`` takes the report of a passed ``require_verified`` and records
the checkpoint (subject), the training config (externalParameters) and, as
resolvedDependencies, every final shard file and every stage attestation by sha256; it is
signed with the trainer key the stage policy names.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cloud_train.attest.policy import TRAINER, StagePolicy, load_policy
from cloud_train.attest.statement import (
    PAYLOAD_TYPE,
    SLSA_PROVENANCE,
    digest_map,
    parse_statement,
    sign_statement,
    slsa_statement,
    write_attestation,
)
from cloud_train.attest.verify import VerifyError, VerifyReport
from roadshield_base.errors import ConfigError
from roadshield_base.trust import TrustError, dsse_verify

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def provenance_for_training(checkpoint_sha256: str, verified_report: VerifyReport,
                            train_config: Mapping[str, Any], trainer_key: Any,
                            checkpoint_name: str = "checkpoint.safetensors",
                            started_on: str | None = None) -> dict[str, Any]:
    """A DSSE envelope over the SLSA provenance v1 statement of one training run.

    Raises VerifyError if the report did not pass (training must not have started) and
    ConfigError for a malformed checkpoint digest.
    """
    if not verified_report.ok:
        raise VerifyError(f"pipeline {verified_report.out_dir} did not pass verification; "
                          "no provenance is issued for a model trained on it",
                          "run require_verified before training and fix what it reports")
    if not _HEX64.match(checkpoint_sha256):
        raise ConfigError(f"checkpoint digest {checkpoint_sha256!r} is not 64 hex digits",
                          "pass roadshield_base.fileio.file_sha256(checkpoint)")
    deps = {f"pipeline/{n}": s for n, s in verified_report.outputs.items()}
    deps.update({f"pipeline/{n}": s for n, s in verified_report.attestations.items()})
    statement = slsa_statement(
        {checkpoint_name: checkpoint_sha256},
        external_parameters={"train_config": dict(train_config),
                             "pipeline": str(verified_report.out_dir)},
        resolved_dependencies=deps,
        internal_parameters={"stage_keyids": dict(verified_report.keyids),
                             "python": platform.python_version()},
        metadata={"invocationId": checkpoint_sha256[:16], "startedOn": started_on or _now(),
                  "finishedOn": _now()})
    return sign_statement(statement, [trainer_key])


def write_provenance(path: str | os.PathLike[str], envelope: Mapping[str, Any]) -> Path:
    """Write the envelope as a one-line ``.intoto.jsonl`` file (atomic)."""
    return write_attestation(path, [envelope])


def verify_training_provenance(envelope: Mapping[str, Any],
                               policy: StagePolicy | str | os.PathLike[str],
                               checkpoint_sha256: str | None = None) -> dict[str, Any]:
    """The statement if signed by the policy's trainer key (and naming the checkpoint)."""
    if not isinstance(policy, StagePolicy):
        policy = load_policy(policy)
    payload = dsse_verify(envelope, policy.trusted(TRAINER), PAYLOAD_TYPE,
                          what="training provenance")
    st = parse_statement(payload, "training provenance", SLSA_PROVENANCE)
    if checkpoint_sha256 is not None and \
            checkpoint_sha256 not in digest_map(st["subject"], "provenance subject").values():
        raise TrustError(f"training provenance does not name checkpoint {checkpoint_sha256}",
                         "the provenance belongs to another checkpoint")
    return st
