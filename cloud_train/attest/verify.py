"""Verify a pipeline folder before training: hashes, signatures, chain and data drift.

First the gate: ``gate/gate_export.intoto.jsonl`` (the export statement decode read) must be
signed by the gate key the policy names; a pipeline that does not start at a gate export
fails. With ``raw_dir`` (the export folder) its files are re-hashed against the statement.

Then, in order, for each stage (decode, normalise, augment, shard):

1. ``<stage>/<stage>.intoto.jsonl`` exists and holds one DSSE envelope whose signature is by
   the key the root-signed policy names for that stage (a re-signed stage fails here);
2. the payload is an in-toto Statement v1 for that stage;
3. every subject file exists and its sha256 matches; no unattested file sits in the folder
   (a changed constant, flipped labels, a dropped class or a swapped file fail here);
4. the chain: the stage's recorded inputs are exactly the previous stage's subjects (names
   and digests); decode's are exactly the gate export's files and its statement;
5. the statement repeats the stage's declaration from ``policy.DECLARED``.

Every file is read once: the bytes hashed are the bytes checked, and the shard stage's
verified bytes stay in the report (``VerifyReport.files``), from which
``verified_training_data`` decodes what training uses, so a file swapped on disk after
verification is never read.

Then, on the stages whose files verified, the data checks: class lists agree, the recorded
normalisation constants match the pixels (1%), shard rows equal the augment rows they name,
every class still has samples, each stage kept what it is declared to keep
(``invariants``: decode's labels are the gate's, normalise passes its files on, augment is
replayed from its signed parameters; with ``raw_dir`` decode is replayed too), and
``drift.compare`` between consecutive stages.
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

from cloud_train.attest import drift, invariants
from cloud_train.attest.policy import DECLARED, GATE, STAGES, StagePolicy, load_policy
from cloud_train.attest.stages import (
    ATTESTATION_SUFFIX,
    GATE_DIR,
    attestation_path,
    channel_stats,
    gate_statement_path,
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
    check: str  # missing | signature | statement | hash | unattested | chain | data |
    #             invariant | drift
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
    #: each stage's signed parameters, and the gate export's labels by file
    parameters: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False,
                                                 compare=False)
    gate_labels: dict[str, int] | None = field(default=None, repr=False, compare=False)

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


def _check_gate(out: Path, policy: StagePolicy, rep: VerifyReport, raw_dir: Path | None
                ) -> dict[str, str] | None:
    """The gate export statement decode read: signed by the policy's gate key (and, with
    ``raw_dir``, matching the export folder's files). Returns what decode's inputs must be:
    the export's files and the statement itself, by sha256; None if it cannot be trusted."""
    from cloud_train.ingest.export import EXPORT_FILE, ExportError, read_export

    path = gate_statement_path(out)
    rel = f"{GATE_DIR}/{path.name}"
    add = rep.findings.append
    if not path.is_file() or path.is_symlink():
        add(Finding(GATE, rel, "missing", "the pipeline does not start at a gate export: run "
                    "`roadshield data export` and preprocess its folder"))
        return None
    try:
        trusted = policy.trusted(GATE)
    except RoadshieldError as err:
        add(Finding(GATE, rel, "signature", str(err).splitlines()[0]))
        return None
    folder = path.parent
    extra = sorted(p.name for p in folder.iterdir() if p.name != path.name)
    if extra:
        add(Finding(GATE, f"{GATE_DIR}/{extra[0]}", "unattested",
                    "only the export statement belongs in the gate folder"))
    try:
        export = read_export(folder, trusted)
    except ExportError as err:
        add(Finding(GATE, rel, "signature", str(err).splitlines()[0]))
        return None
    rep.attestations[rel] = sha256_hex(export.raw)
    rep.keyids[GATE] = export.keyid
    rep.gate_labels = export.labels_by_file()
    if raw_dir is not None:
        theirs = raw_dir / EXPORT_FILE
        if not theirs.is_file() or theirs.read_bytes() != export.raw:
            add(Finding(GATE, str(theirs), "chain", "the raw folder's export statement is not "
                        "the one decode read"))
        for name, sha in sorted(export.subjects.items()):
            f = raw_dir / name
            got = sha256_hex(f.read_bytes()) if f.is_file() and not f.is_symlink() else "-"
            if got != sha:
                add(Finding(GATE, name, "chain", f"raw file in {raw_dir} "
                            + ("is missing" if got == "-" else f"has sha256 {_short(got)}, "
                               f"the export statement records {_short(sha)}")))
    return {**export.subjects, rel: sha256_hex(export.raw)}


def _check_stage(out: Path, stage: str, policy: StagePolicy, rep: VerifyReport,
                 prev: dict[str, str] | None
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
    if st["predicate"].get("invariants") != DECLARED[stage]:
        add(Finding(stage, rel, "invariant", "statement declares "
                    f"{st['predicate'].get('invariants')!r}, not the policy's declaration "
                    f"{DECLARED[stage]!r} for stage {stage}"))
    params = st["predicate"].get("parameters")
    rep.parameters[stage] = params if isinstance(params, dict) else {}
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
        _check_chain(stage, inputs, prev, rep,
                     "the gate export's signed files" if stage == STAGES[0] else "")
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


def _invariant_checks(files: dict[str, dict[str, bytes] | None], rep: VerifyReport,
                      raw_dir: Path | None) -> None:
    """Each stage against what ``policy.DECLARED`` lets it change (see ``invariants``)."""
    def add(stage: str, problems: list[str]) -> None:
        rep.findings.extend(Finding(stage, f"{stage}/", "invariant", p) for p in problems)

    dec, norm, aug = files.get("decode"), files.get("normalise"), files.get("augment")
    if dec is not None and rep.gate_labels is not None:
        add("decode", invariants.check_decode(dec, rep.gate_labels))
        if raw_dir is not None:
            from cloud_train.gtsrb import load_gtsrb

            size = int(rep.parameters.get("decode", {}).get("size", 32))
            try:
                data = load_gtsrb(raw_dir, "train", size=size, progress=False)
                names = [p.relative_to(raw_dir).as_posix() for p in data.paths]
                add("decode", invariants.replay_decode(dec, data.images, names))
            except (RoadshieldError, ValueError) as err:
                add("decode", [f"cannot decode the raw export again: {err}"])
    if dec is not None and norm is not None:
        add("normalise", invariants.check_passed_on(dec, norm, "decode", "normalise"))
    if norm is not None and aug is not None:
        add("augment", invariants.check_augment(norm, aug, rep.parameters.get("augment", {})))


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
    raw = Path(raw_dir) if raw_dir else None
    files: dict[str, dict[str, bytes] | None] = {}
    prev = _check_gate(out, policy, rep, raw)
    for stage in STAGES:
        subjects, files[stage] = _check_stage(out, stage, policy, rep, prev)
        prev = subjects if subjects is not None else {}
        if stage == STAGES[-1] and subjects:
            rep.outputs = subjects
            rep.files = dict(files[stage] or {})
    _data_checks(files, rep, thresholds or drift.DriftThresholds())
    _invariant_checks(files, rep, raw)
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
