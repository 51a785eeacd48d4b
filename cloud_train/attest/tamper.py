"""Mid-pipeline tampering attacks on a finished pipeline folder (for tests and red-teaming).

Each attack edits the folder in place the way an attacker with write access (but without
the stage keys) would, leaving files well-formed so a training loop would still run, and
returns a TamperResult saying what it changed. ``insider_feature_shift`` is the one attack
made *with* the genuine stage keys: hashes, signatures and chain all pass, and only the
distribution check between stages can catch it.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cloud_train.attest.policy import load_stage_key
from cloud_train.attest.stages import (
    _read_stage,
    _write_stage,
    attestation_path,
    load_npz,
    npy_bytes,
    npz_bytes,
    read_arrays,
    shard_names,
    shard_stage,
)
from cloud_train.attest.statement import (
    digest_map,
    parse_statement,
    read_attestation,
    sign_statement,
    stage_statement,
    write_attestation,
)
from roadshield_base.errors import ConfigError
from roadshield_base.fileio import atomic_write_bytes
from roadshield_base.trust import canonical_json, generate_private_key, sha256_hex


@dataclass(frozen=True)
class TamperResult:
    attack: str
    stage: str
    files: tuple[str, ...]
    description: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _statement(out: Path, stage: str) -> dict[str, Any]:
    """The (unverified) statement of ``stage``, as an attacker would read it."""
    att = attestation_path(out, stage)
    return parse_statement(base64.b64decode(read_attestation(att)[0]["payload"]), str(att))


def _rewrite_shard(path: Path, fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
                   ) -> None:
    z = load_npz(path.read_bytes(), str(path))
    atomic_write_bytes(path, npz_bytes(**fn(z)))


def change_normalisation_constant(out_dir: str | os.PathLike[str],
                                  factor: float = 1.15) -> TamperResult:
    """Scale the recorded per-channel mean by ``factor`` in every stats.json (valid JSON, the
    same keys, so training would embed the wrong constants without error)."""
    out = Path(out_dir)
    touched = []
    for stage in ("normalise", "augment", "shard"):
        path = out / stage / "stats.json"
        stats = json.loads(path.read_text())
        stats["mean"] = [round(v * factor, 6) for v in stats["mean"]]
        atomic_write_bytes(path, canonical_json(stats))
        touched.append(f"{stage}/stats.json")
    return TamperResult("changed_normalisation_constant", "normalise", tuple(touched),
                        f"per-channel mean scaled by {factor}")


def flip_labels_in_shard(out_dir: str | os.PathLike[str], shard: int = 0,
                         fraction: float = 0.3, seed: int = 0) -> TamperResult:
    """Move ``fraction`` of one shard's labels to the next class id."""
    out = Path(out_dir)
    name = shard_names(out)[shard]
    classes = json.loads((out / "shard" / "classes.json").read_text())
    rng = np.random.default_rng(seed)

    def flip(z: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        labels = z["labels"].copy()
        k = max(1, int(round(fraction * len(labels))))
        idx = rng.choice(len(labels), k, replace=False)
        labels[idx] = (labels[idx] + 1) % len(classes)
        return {**z, "labels": labels}

    _rewrite_shard(out / "shard" / name, flip)
    return TamperResult("flipped_labels_in_shard", "shard", (f"shard/{name}",),
                        f"{fraction:.0%} of the labels in {name} moved to the next class")


def drop_class(out_dir: str | os.PathLike[str], class_id: int | None = None) -> TamperResult:
    """Remove every sample of one class (default the last) from every shard."""
    out = Path(out_dir)
    classes = json.loads((out / "shard" / "classes.json").read_text())
    cid = len(classes) - 1 if class_id is None else int(class_id)
    names = shard_names(out)
    for name in names:
        _rewrite_shard(out / "shard" / name,
                       lambda z: {k: v[z["labels"] != cid] for k, v in z.items()})
    return TamperResult("dropped_class", "shard", tuple(f"shard/{n}" for n in names),
                        f"class {cid} ({classes[cid]}) removed from every shard")


def swap_files(out_dir: str | os.PathLike[str]) -> TamperResult:
    """Swap the contents of the first two shard files (or replace augment's images with
    decode's when there is a single shard)."""
    out = Path(out_dir)
    names = shard_names(out)
    if len(names) >= 2:
        a, b = out / "shard" / names[0], out / "shard" / names[1]
        da, db = a.read_bytes(), b.read_bytes()
        atomic_write_bytes(a, db)
        atomic_write_bytes(b, da)
        files = (f"shard/{names[0]}", f"shard/{names[1]}")
    else:
        shutil.copyfile(out / "decode" / "images.npy", out / "augment" / "images.npy")
        files = ("augment/images.npy",)
    return TamperResult("swapped_file", "shard" if len(names) >= 2 else "augment", files,
                        f"swapped {' and '.join(files)}")


def resign_with_unknown_key(out_dir: str | os.PathLike[str]) -> TamperResult:
    """Flip labels in shard 0, then rewrite the shard statement with the new digests and sign
    it with a fresh key that is not in the policy (hashes and chain then look consistent)."""
    out = Path(out_dir)
    flip_labels_in_shard(out, 0)
    att = attestation_path(out, "shard")
    st = _statement(out, "shard")
    outputs = {n: sha256_hex((out / n).read_bytes()) for n in digest_map(st["subject"], "s")}
    pred = st["predicate"]
    new = stage_statement("shard", outputs, digest_map(pred["inputs"], "i"),
                          pred["parameters"], pred.get("summary"))
    write_attestation(att, [sign_statement(new, [generate_private_key()])])
    return TamperResult("resigned_with_unknown_key", "shard",
                        (f"shard/{shard_names(out)[0]}", f"shard/{att.name}"),
                        "labels flipped, then the shard stage re-signed by an unknown key")


def insider_feature_shift(out_dir: str | os.PathLike[str], keys_dir: str | os.PathLike[str],
                          shift: float = 0.15) -> TamperResult:
    """With the genuine augment and shard keys, re-run those stages with every pixel scaled by
    ``1 + shift``: hashes, signatures and chain verify; only the drift check can object."""
    out = Path(out_dir)
    files, _ = _read_stage(out, "augment")
    st = _statement(out, "augment")
    images, _ = read_arrays(files, "augment")
    shifted = np.clip(np.rint(images.astype(np.float32) * (1.0 + shift)), 0, 255)
    new = {n.split("/", 1)[1]: b for n, b in files.items()}
    new["images.npy"] = npy_bytes(shifted.astype(np.uint8))
    _write_stage(out, "augment", new, digest_map(st["predicate"]["inputs"], "i"),
                 st["predicate"]["parameters"], load_stage_key(keys_dir, "augment"))
    params = _statement(out, "shard")["predicate"]["parameters"]
    shard_stage(out, load_stage_key(keys_dir, "shard"), int(params["seed"]), int(params["shards"]))
    return TamperResult("insider_feature_shift", "augment", ("augment/images.npy",),
                        f"pixels scaled by {1 + shift:.2f} and re-signed with the genuine keys")


ATTACKS: dict[str, Callable[[Path], TamperResult]] = {
    "changed_normalisation_constant": change_normalisation_constant,
    "flipped_labels_in_shard": flip_labels_in_shard,
    "dropped_class": drop_class,
    "swapped_file": swap_files,
    "resigned_with_unknown_key": resign_with_unknown_key,
}


def run_attack(name: str, clean_dir: str | os.PathLike[str], work_dir: str | os.PathLike[str],
               keys_dir: str | os.PathLike[str] | None = None) -> tuple[TamperResult, Path]:
    """Copy ``clean_dir`` to ``work_dir/name`` and apply attack ``name`` there."""
    dst = Path(work_dir) / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(clean_dir, dst)
    if name == "insider_feature_shift":
        if keys_dir is None:
            raise ConfigError("insider_feature_shift needs the stage keys", "pass keys_dir")
        return insider_feature_shift(dst, keys_dir), dst
    if name not in ATTACKS:
        raise ConfigError(f"unknown tampering attack {name!r}",
                          "choose from: " + ", ".join([*ATTACKS, "insider_feature_shift"]))
    return ATTACKS[name](dst), dst
