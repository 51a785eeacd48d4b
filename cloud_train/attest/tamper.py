"""Mid-pipeline tampering attacks on a finished pipeline folder (for tests and red-teaming).

Each attack edits the folder in place the way an attacker with write access (but without
the stage keys) would, leaving files well-formed so a training loop would still run, and
returns a TamperResult saying what it changed. The ``insider_*`` attacks are made *with* the
genuine augment and shard keys: hashes, signatures and chain all pass, and only the data
checks can object: the stage invariants (augment keeps labels and is replayable from its
signed parameters) and the drift check between stages.
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


def _resign_augment(out: Path, keys_dir: str | os.PathLike[str], images: np.ndarray,
                    labels: np.ndarray) -> None:
    """Write augment's images and labels anew, sign with the genuine augment key (same
    inputs and parameters as before), then re-run shard with its genuine key."""
    files, _ = _read_stage(out, "augment")
    st = _statement(out, "augment")
    new = {n.split("/", 1)[1]: b for n, b in files.items()}
    new["images.npy"], new["labels.npy"] = npy_bytes(images), npy_bytes(labels)
    _write_stage(out, "augment", new, digest_map(st["predicate"]["inputs"], "i"),
                 st["predicate"]["parameters"], load_stage_key(keys_dir, "augment"))
    params = _statement(out, "shard")["predicate"]["parameters"]
    shard_stage(out, load_stage_key(keys_dir, "shard"), int(params["seed"]), int(params["shards"]))


def insider_feature_shift(out_dir: str | os.PathLike[str], keys_dir: str | os.PathLike[str],
                          shift: float = 0.15) -> TamperResult:
    """With the genuine augment and shard keys, re-run those stages with every pixel scaled by
    ``1 + shift``: hashes, signatures and chain verify."""
    out = Path(out_dir)
    images, labels = read_arrays(_read_stage(out, "augment")[0], "augment")
    shifted = np.clip(np.rint(images.astype(np.float32) * (1.0 + shift)), 0, 255)
    _resign_augment(out, keys_dir, shifted.astype(np.uint8), labels)
    return TamperResult("insider_feature_shift", "augment", ("augment/images.npy",),
                        f"pixels scaled by {1 + shift:.2f} and re-signed with the genuine keys")


def insider_label_swap(out_dir: str | os.PathLike[str], keys_dir: str | os.PathLike[str],
                       n: int = 20, classes: tuple[int, int] | None = None) -> TamperResult:
    """With the genuine augment key, swap the labels of ``n`` rows of one class with ``n`` of
    another (class counts stay equal), re-sign augment and re-run shard."""
    out = Path(out_dir)
    images, labels = read_arrays(_read_stage(out, "augment")[0], "augment")
    counts = np.bincount(labels)
    a, b = classes or tuple(int(c) for c in np.argsort(-counts, kind="stable")[:2])
    k = min(n, int(counts[a]), int(counts[b]))
    ia, ib = np.flatnonzero(labels == a)[:k], np.flatnonzero(labels == b)[:k]
    swapped = labels.copy()
    swapped[ia], swapped[ib] = b, a
    _resign_augment(out, keys_dir, images, swapped)
    return TamperResult("insider_label_swap", "augment", ("augment/labels.npy",),
                        f"{k} labels {a} <-> {b} swapped (class counts kept) and re-signed "
                        "with the genuine keys")


def insider_backdoor(out_dir: str | os.PathLike[str], keys_dir: str | os.PathLike[str],
                     rate: float = 0.05, target: int = 0) -> TamperResult:
    """With the genuine augment key, stamp a 4 px checkerboard trigger on ``rate`` of the
    rows and relabel them ``target`` (BadNets), re-sign augment and re-run shard."""
    from cloud_train.ingest.attacks import add_trigger

    out = Path(out_dir)
    images, labels = read_arrays(_read_stage(out, "augment")[0], "augment")
    rng = np.random.default_rng(0)
    pick = rng.choice(np.flatnonzero(labels != target),
                      max(1, int(rate * len(labels))), replace=False)
    images, labels = images.copy(), labels.copy()
    for i in pick:
        images[i] = add_trigger(images[i])
    labels[pick] = target
    _resign_augment(out, keys_dir, images, labels)
    return TamperResult("insider_backdoor", "augment",
                        ("augment/images.npy", "augment/labels.npy"),
                        f"{len(pick)} rows triggered and relabelled {target}, re-signed with "
                        "the genuine keys")


INSIDER: dict[str, Callable[[Path, str | os.PathLike[str]], TamperResult]] = {
    "insider_feature_shift": insider_feature_shift,
    "insider_label_swap": insider_label_swap,
    "insider_backdoor": insider_backdoor,
}


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
    if name in INSIDER:
        if keys_dir is None:
            raise ConfigError(f"{name} needs the stage keys", "pass keys_dir")
        return INSIDER[name](dst, keys_dir), dst
    if name not in ATTACKS:
        raise ConfigError(f"unknown tampering attack {name!r}",
                          "choose from: " + ", ".join([*ATTACKS, *INSIDER]))
    return ATTACKS[name](dst), dst


def poison_export(raw_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                  rate: float = 0.03, target: int = 0, keep_statement: bool = True,
                  seed: int = 0) -> list[str]:
    """Copy a gate export to ``out_dir`` and slip in BadNets poison the gate never saw: a
    triggered copy of ``rate`` of the training images, filed (file and CSV row) under class
    ``target``. ``keep_statement=False`` also drops the export statement, giving a plain
    GTSRB folder (the gate-bypass attack). Returns the added files, relative to ``out_dir``."""
    import cv2

    from cloud_train.gtsrb import _entries, locate_gtsrb
    from cloud_train.ingest.attacks import add_trigger
    from cloud_train.ingest.export import EXPORT_FILE

    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(raw_dir, out)
    if not keep_statement:
        (out / EXPORT_FILE).unlink(missing_ok=True)
    layout = locate_gtsrb(out)
    entries = [e for e in _entries(layout, "train") if e[2] != target]
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(entries), max(1, round(rate * len(entries))), replace=False)
    folder = layout.train_dir / f"{target:05d}"  # type: ignore[operator]
    csv = folder / f"GT-{target:05d}.csv"
    added = []
    for k, i in enumerate(sorted(pick)):
        bgr = cv2.imread(str(entries[i][0]), cv2.IMREAD_COLOR)
        poisoned = add_trigger(bgr)
        name = f"99999_{k:05d}.ppm"
        cv2.imwrite(str(folder / name), poisoned)
        h, w = poisoned.shape[:2]
        with open(csv, "a") as f:
            f.write(f"{name};{w};{h};0;0;{w - 1};{h - 1};{target}\n")
        added.append((folder / name).relative_to(out).as_posix())
    return added
