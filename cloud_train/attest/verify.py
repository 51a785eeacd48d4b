"""Verify a pipeline folder before training: hashes, signatures, chain and data drift.

Checks, in order, for each stage (decode, normalise, augment, shard):

1. ``<stage>/<stage>.intoto.jsonl`` exists and holds one DSSE envelope whose signature is by
   the key the root-signed policy names for that stage (a re-signed stage fails here);
2. the payload is an in-toto Statement v1 for that stage;
3. every subject file exists and its sha256 matches; no unattested file sits in the folder
   (a changed constant, flipped labels, a dropped class or a swapped file fail here);
4. the chain: the stage's recorded inputs are exactly the previous stage's subjects (names
   and digests); with ``raw_dir`` the decode inputs are re-hashed too.

Every file is read once: the bytes hashed are the bytes checked, and the shard stage's
verified bytes stay in the report (``VerifyReport.files``), from which
``verified_training_data`` decodes what training uses, so a file swapped on disk after
verification is never read.

Then, on the stages whose files verified, the data checks: class lists agree, the recorded
normalisation constants match the pixels (1%), shard rows equal the augment rows they name,
every class still has samples, and ``drift.compare`` between consecutive stages.
"""

from __future__ import annotations

import base64
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cloud_train.attest import drift
from cloud_train.attest.policy import STAGES, StagePolicy, load_policy
from cloud_train.attest.stages import (
    ATTESTATION_SUFFIX,
    attestation_path,
    channel_stats,
    load_npz,
    read_arrays,
    training_data_from_bytes,
)
from cloud_train.attest.statement import (
    PAYLOAD_TYPE,
    STAGE_PREDICATE,
    digest_map,
    parse_statement,
    read_attestation,
)
from roadshield_base.errors import RoadshieldError
from roadshield_base.trust import TrustError, dsse_verify, sha256_hex

_HINT = ("do not train on this folder: re-run `roadshield data preprocess` from trusted "
         "inputs with the stage keys, then verify again")


class VerifyError(RoadshieldError):
    """A pipeline folder failed verification; the message names stage, file and mismatch."""


@dataclass(frozen=True)
class Finding:
    stage: str
    file: str
    check: str  # missing | signature | statement | hash | unattested | chain | data | drift
    message: str

    def __str__(self) -> str:
        return f"stage {self.stage}: {self.file}: {self.message} [{self.check}]"


@dataclass
class VerifyReport:
    """The outcome of ``verify_pipeline``; ``ok`` only if there are no findings."""

    out_dir: Path
    findings: list[Finding] = field(default_factory=list)
    drift: list[drift.DriftResult] = field(default_factory=list)
    keyids: dict[str, str] = field(default_factory=dict)
    attestations: dict[str, str] = field(default_factory=dict)  # file -> sha256
    outputs: dict[str, str] = field(default_factory=dict)  # the shard stage's subjects
    images: int = 0
    seconds: float = 0.0
    #: the shard stage's file bytes, exactly as hashed ("shard/<file>" -> bytes); empty
    #: unless every shard subject matched its attested digest
    files: dict[str, bytes] = field(default_factory=dict, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "ok": self.ok, "images": self.images,
                "seconds": round(self.seconds, 4), "keyids": self.keyids,
                "findings": [asdict(f) for f in self.findings],
                "drift": [d.to_dict() for d in self.drift],
                "attestations": self.attestations, "outputs": self.outputs}

    def text(self) -> str:
        head = (f"pipeline {self.out_dir}: {'VERIFIED' if self.ok else 'FAILED'} "
                f"({self.images} images, {self.seconds:.2f} s)")
        lines = [head, *(f"  - {f}" for f in self.findings)]
        for d in self.drift:
            lines.append(f"  drift {d.src}->{d.dst}: mean {d.max_mean_rel:.2%} "
                         f"({d.mean_feature}), KS {d.max_ks:.3f} ({d.ks_feature})"
                         + (f"  FLAGGED: {d.reason}" if d.flagged else ""))
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        if not self.ok:
            raise VerifyError(f"pipeline {self.out_dir} failed verification with "
                              f"{len(self.findings)} problem(s):\n"
                              + "\n".join(f"  - {f}" for f in self.findings), _HINT)


def _short(sha: str) -> str:
    return sha[:16] + "..."


def _unverified_payload(env: dict[str, Any]) -> bytes | None:
    try:
        return base64.b64decode(env["payload"], validate=True)
    except (KeyError, TypeError, ValueError):
        return None


def _check_stage(out: Path, stage: str, policy: StagePolicy, rep: VerifyReport,
                 prev: dict[str, str] | None, raw_dir: Path | None
                 ) -> tuple[dict[str, str] | None, dict[str, bytes] | None]:
    """Checks 1-4 for one stage; returns (subjects, file bytes if every hash matched)."""
    att = attestation_path(out, stage)
    rel = f"{stage}/{att.name}"
    add = rep.findings.append
    if not att.is_file():
        add(Finding(stage, rel, "missing", "attestation file is missing"))
        return None, None
    rep.attestations[rel] = sha256_hex(att.read_bytes())
    try:
        envs = read_attestation(att)
    except TrustError as err:
        add(Finding(stage, rel, "statement", str(err).splitlines()[0]))
        return None, None
    if len(envs) != 1:
        add(Finding(stage, rel, "statement", f"holds {len(envs)} envelopes, expected 1"))
    env = envs[0]
    expected = policy.keyids[stage]
    rep.keyids[stage] = expected
    try:
        payload: bytes | None = dsse_verify(env, policy.trusted(stage), PAYLOAD_TYPE, what=rel)
    except TrustError:
        signers = [s.get("keyid") for s in env.get("signatures", []) if isinstance(s, dict)]
        add(Finding(stage, rel, "signature",
                    f"signed by key(s) {signers}, but the policy expects {expected} for stage "
                    f"{stage} (or the signature does not verify)"))
        payload = _unverified_payload(env)  # read on, to report the rest, but never trust it
        if payload is None:
            return None, None
    try:
        st = parse_statement(payload, rel, STAGE_PREDICATE)
        subjects = digest_map(st["subject"], f"{rel} subject")
        inputs = digest_map(st["predicate"].get("inputs"), f"{rel} inputs")
    except TrustError as err:
        add(Finding(stage, rel, "statement", str(err).splitlines()[0]))
        return None, None
    if st["predicate"].get("stage") != stage:
        add(Finding(stage, rel, "statement",
                    f"statement is for stage {st['predicate'].get('stage')!r}"))
    files: dict[str, bytes] | None = {}
    for name, sha in subjects.items():
        parts = name.split("/")
        if len(parts) != 2 or parts[0] != stage or parts[1] in ("", ".", ".."):
            add(Finding(stage, name, "statement", "subject lies outside the stage folder"))
            files = None
            continue
        path = out / name
        if not path.is_file() or path.is_symlink():
            add(Finding(stage, name, "missing", "attested output file is missing"))
            files = None
            continue
        data = path.read_bytes()
        got = sha256_hex(data)
        if got != sha:
            add(Finding(stage, name, "hash", f"sha256 is {_short(got)} but the signed "
                        f"attestation records {_short(sha)} (file changed after signing)"))
            files = None
        elif files is not None:
            files[name] = data
    folder = out / stage
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        name = f"{stage}/{p.name}"
        if name not in subjects and not p.name.endswith(ATTESTATION_SUFFIX):
            add(Finding(stage, name, "unattested", "file is not a subject of the attestation"))
    if prev is not None:
        _check_chain(stage, inputs, prev, rep)
    elif stage == STAGES[0] and raw_dir is not None:
        raw = {n: sha256_hex((raw_dir / n).read_bytes()) if (raw_dir / n).is_file() else "-"
               for n in inputs}
        _check_chain(stage, inputs, raw, rep, source=f"raw folder {raw_dir}")
    return subjects, files


def _check_chain(stage: str, inputs: dict[str, str], prev: dict[str, str], rep: VerifyReport,
                 source: str = "") -> None:
    i = STAGES.index(stage)
    source = source or f"stage {STAGES[i - 1]}'s signed outputs"
    for name in sorted(set(inputs) | set(prev)):
        if name not in inputs:
            msg = f"output of {source} is not among this stage's recorded inputs"
        elif name not in prev:
            msg = f"recorded input is not among {source}"
        elif inputs[name] != prev[name]:
            msg = (f"recorded input digest {_short(inputs[name])} differs from {source} "
                   f"({_short(prev[name])})")
        else:
            continue
        rep.findings.append(Finding(stage, name, "chain", msg))


def _stage_data(stage: str, files: dict[str, bytes]) -> tuple[np.ndarray, np.ndarray]:
    if stage != "shard":
        return read_arrays(files, stage)
    parts = [load_npz(files[n], n) for n in sorted(files) if n.endswith(".npz")]
    return (np.concatenate([p["images"] for p in parts]),
            np.concatenate([p["labels"] for p in parts]))


def _check_shard_rows(files: dict[str, bytes], aug: tuple[np.ndarray, np.ndarray],
                      rep: VerifyReport) -> None:
    images, labels = aug
    seen = []
    for name in sorted(n for n in files if n.endswith(".npz")):
        z = load_npz(files[name], name)
        idx = z.get("index")
        if idx is None or idx.min(initial=0) < 0 or idx.max(initial=-1) >= len(labels):
            rep.findings.append(Finding("shard", name, "data", "row index is missing or out "
                                        "of range of the augment stage's rows"))
            return
        bad = int(np.sum((z["labels"] != labels[idx])
                         | np.any(z["images"] != images[idx], axis=(1, 2, 3))))
        if bad:
            rep.findings.append(Finding("shard", name, "data", f"{bad} of {len(idx)} rows "
                                        "differ from the augment rows they name"))
        seen.append(idx)
    allidx = np.sort(np.concatenate(seen)) if seen else np.empty(0, np.int64)
    if not np.array_equal(allidx, np.arange(len(labels))):
        rep.findings.append(Finding("shard", "shard/*.npz", "data", "shards do not hold each "
                                    f"augment row exactly once ({len(allidx)} rows for "
                                    f"{len(labels)})"))


def _data_checks(files: dict[str, dict[str, bytes] | None], rep: VerifyReport,
                 th: drift.DriftThresholds) -> None:
    add = rep.findings.append
    ok = {s: f for s, f in files.items() if f is not None}
    try:
        classes = {s: json.loads(f[f"{s}/classes.json"]) for s, f in ok.items()}
        stats = {s: json.loads(f[f"{s}/stats.json"]) for s, f in ok.items() if s != "decode"}
        data = {s: _stage_data(s, f) for s, f in ok.items()}
    except (KeyError, ValueError, RoadshieldError) as err:
        add(Finding("?", "?", "data", f"cannot read stage data: {str(err).splitlines()[0]}"))
        return
    names = next(iter(classes.values()), [])
    for s, c in classes.items():
        if c != names:
            add(Finding(s, f"{s}/classes.json", "data", "class list differs from the "
                        "previous stages'"))
    for s, st in stats.items():
        if "normalise" in data and s == "normalise":
            fresh = channel_stats(data["normalise"][0])
            for k in ("mean", "std"):
                rel = np.abs(np.subtract(st[k], fresh[k])) / np.maximum(np.abs(fresh[k]), 1e-6)
                if rel.max() > th.constants_rel:
                    add(Finding(s, f"{s}/stats.json", "data", f"recorded {k} {st[k]} is "
                                f"{rel.max():.1%} off the pixels' {fresh[k]}"))
        elif "normalise" in stats and st != stats["normalise"]:
            add(Finding(s, f"{s}/stats.json", "data", "normalisation constants differ from "
                        "the normalise stage's"))
    if "augment" in data and "shard" in ok:
        _check_shard_rows(ok["shard"], data["augment"], rep)
    if "shard" in data:
        counts = np.bincount(data["shard"][1].astype(np.int64), minlength=len(names))
        empty = [f"{k} ({names[k]})" for k in range(len(names)) if counts[k] == 0]
        if empty:
            add(Finding("shard", "shard/*.npz", "data", f"classes with no samples: {empty}"))
        rep.images = int(len(data["shard"][1]))
    feats = {s: drift.stage_features(d[0]) for s, d in data.items()}
    for a, b in zip(STAGES, STAGES[1:], strict=False):
        if a in data and b in data:
            res = drift.compare_features(a, b, feats[a], data[a][1], feats[b], data[b][1],
                                         len(names), th)
            rep.drift.append(res)
            if res.flagged:
                add(Finding(b, f"{b}/ (data passed on from {a})", "drift", res.reason))


def verify_pipeline(out_dir: str | os.PathLike[str], policy: StagePolicy | str | os.PathLike[str],
                    raw_dir: str | os.PathLike[str] | None = None,
                    thresholds: drift.DriftThresholds | None = None) -> VerifyReport:
    """Run every check on a pipeline folder; never raises for a failed check (see ``ok``).

    ``policy``: a StagePolicy or a keys folder / policy.json (verified against its root key).
    """
    t0 = time.perf_counter()
    if not isinstance(policy, StagePolicy):
        policy = load_policy(policy)
    out = Path(out_dir)
    rep = VerifyReport(out)
    files: dict[str, dict[str, bytes] | None] = {}
    prev: dict[str, str] | None = None
    for i, stage in enumerate(STAGES):
        subjects, files[stage] = _check_stage(out, stage, policy, rep, prev if i else None,
                                              Path(raw_dir) if raw_dir else None)
        prev = subjects if subjects is not None else {}
        if stage == STAGES[-1] and subjects:
            rep.outputs = subjects
            rep.files = dict(files[stage] or {})
    _data_checks(files, rep, thresholds or drift.DriftThresholds())
    rep.seconds = time.perf_counter() - t0
    return rep


def require_verified(out_dir: str | os.PathLike[str],
                     policy: StagePolicy | str | os.PathLike[str]) -> VerifyReport:
    """The report if every check passed, else VerifyError."""
    rep = verify_pipeline(out_dir, policy)
    rep.raise_if_failed()
    return rep


def verified_training_data(out_dir: str | os.PathLike[str],
                           policy: StagePolicy | str | os.PathLike[str]
                           ) -> tuple[dict[str, Any], VerifyReport]:
    """The gate training calls: verify ``out_dir``, then decode the training data from the
    bytes the verification hashed (``VerifyReport.files``), never from a second read.

    Returns (data, report); data as ``stages.training_data_from_bytes`` gives it (images
    N x S x S x 3 uint8 RGB, labels int64, class_names, mean/std). Raises VerifyError
    when any check fails.
    """
    rep = require_verified(out_dir, policy)
    if not rep.files:  # a passed verification always holds them; refuse rather than re-read
        raise VerifyError(f"pipeline {out_dir} verified without the shard stage's bytes",
                          _HINT)
    return training_data_from_bytes(rep.files, f"{out_dir}/shard"), rep
