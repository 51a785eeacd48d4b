"""What each preprocessing stage may change, and the checks that hold it to that.

A stage key proves who signed, not that the signer did only its job: an insider with the
augment key could swap labels or plant a triggered backdoor and sign the result. The
declarations (``policy.DECLARED``) are part of the verifier, not of the stage (a stage cannot
declare itself more freedom); each stage statement repeats its declaration (``invariants``)
and ``verify`` checks both the repetition and the data against the previous stage's signed
outputs:

- decode: one row per sample of the gate export, each row's label the gate's label for the
  file it came from (``decode/rows.json`` names the file of every row); the pixels are
  replayed from the export when ``verify --raw`` is given;
- normalise: adds ``stats.json`` and passes every other file on byte for byte;
- augment: the original rows and their labels first, unchanged, then ``copies`` variants
  whose labels are their originals' and whose pixels are replayed from the statement's seed
  and parameters (bounded below), so any other pixel is caught;
- shard: every augment row exactly once with its label and pixels (checked in verify).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from cloud_train.attest.policy import AUGMENT_LIMITS
from cloud_train.attest.stages import augment_images, load_npy
from roadshield_base.errors import RoadshieldError

PASSED_ON = ("images.npy", "labels.npy", "rows.json", "classes.json")


def rows_json(files: list[str]) -> bytes:
    return json.dumps(files, separators=(",", ":")).encode()


def _rows(files: dict[str, bytes], stage: str) -> list[str]:
    try:
        rows = json.loads(files[f"{stage}/rows.json"])
    except (KeyError, ValueError) as err:
        raise ValueError(f"{stage}/rows.json is missing or unreadable") from err
    if not isinstance(rows, list) or not all(isinstance(r, str) for r in rows):
        raise ValueError(f"{stage}/rows.json is not a list of file names")
    return rows


def check_decode(files: dict[str, bytes], gate_labels: dict[str, int]) -> list[str]:
    """Problems with decode's rows against the gate export (file -> label)."""
    try:
        rows = _rows(files, "decode")
        labels = load_npy(files["decode/labels.npy"], "decode/labels.npy")
    except (ValueError, KeyError, RoadshieldError) as err:
        return [str(err).splitlines()[0]]
    out = []
    if len(rows) != len(labels):
        return [f"rows.json names {len(rows)} files for {len(labels)} rows"]
    if sorted(rows) != sorted(gate_labels):
        extra = sorted(set(rows) - set(gate_labels))
        lost = sorted(set(gate_labels) - set(rows))
        dup = len(rows) - len(set(rows))
        out.append(f"rows do not match the export's samples one to one: {len(extra)} not "
                   f"exported {extra[:2]}, {len(lost)} exported but absent {lost[:2]}, "
                   f"{dup} repeated")
    wrong = [i for i, (f, y) in enumerate(zip(rows, labels.tolist(), strict=True))
             if f in gate_labels and gate_labels[f] != y]
    if wrong:
        i = wrong[0]
        out.append(f"{len(wrong)} rows carry another label than the gate gave their file "
                   f"(row {i}: {rows[i]} labelled {int(labels[i])}, the gate said "
                   f"{gate_labels[rows[i]]})")
    return out


def check_passed_on(prev: dict[str, bytes], cur: dict[str, bytes], src: str, dst: str,
                    names: tuple[str, ...] = PASSED_ON) -> list[str]:
    """Files ``dst`` must pass on from ``src`` byte for byte."""
    return [f"{dst}/{n} differs from {src}/{n}, which this stage must pass on unchanged"
            for n in names if prev.get(f"{src}/{n}") != cur.get(f"{dst}/{n}")]


def check_augment(prev: dict[str, bytes], cur: dict[str, bytes],
                  params: dict[str, Any]) -> list[str]:
    """Replay augment from its signed parameters on normalise's rows and compare."""
    out = check_passed_on(prev, cur, "normalise", "augment",
                          ("rows.json", "classes.json", "stats.json"))
    try:
        seed, copies = int(params["seed"]), int(params["copies"])
        shift, gain = int(params["max_shift_px"]), float(params["gain"])
    except (KeyError, TypeError, ValueError):
        return out + [f"parameters {params} lack seed, copies, max_shift_px or gain"]
    over = {k: v for k, v in (("copies", copies), ("max_shift_px", shift), ("gain", gain))
            if not 0 <= v <= AUGMENT_LIMITS[k]}
    if over:
        return out + [f"parameters {over} exceed the declared limits {AUGMENT_LIMITS}"]
    try:
        images = load_npy(prev["normalise/images.npy"], "normalise/images.npy")
        labels = load_npy(prev["normalise/labels.npy"], "normalise/labels.npy")
        aimages = load_npy(cur["augment/images.npy"], "augment/images.npy")
        alabels = load_npy(cur["augment/labels.npy"], "augment/labels.npy")
    except (KeyError, RoadshieldError) as err:
        return out + [str(err).splitlines()[0]]
    n = len(labels)
    if aimages.shape != (n * (copies + 1), *images.shape[1:]) or len(alabels) != len(aimages):
        return out + [f"{len(alabels)} rows of shape {aimages.shape[1:]}, but {copies} "
                      f"copies of {n} rows of shape {images.shape[1:]} make {n * (copies + 1)}"]
    relabelled = np.flatnonzero(alabels != np.tile(labels, copies + 1))
    if len(relabelled):
        i = int(relabelled[0])
        out.append(f"{len(relabelled)} rows carry another label than their original (row "
                   f"{i}: {int(alabels[i])}, its original row {i % n}: {int(labels[i % n])})")
    rng = np.random.default_rng((seed, 3))  # as augment_stage draws it
    parts = [images] + [augment_images(images, rng, shift, gain) for _ in range(copies)]
    changed = np.flatnonzero(np.any(aimages != np.concatenate(parts), axis=(1, 2, 3)))
    if len(changed):
        i = int(changed[0])
        what = "original" if i < n else "variant"
        out.append(f"{len(changed)} rows' pixels differ from the replay of the signed "
                   f"parameters (first: row {i}, an {what} of row {i % n})")
    return out


def replay_decode(files: dict[str, bytes], raw_images: np.ndarray, raw_files: list[str]
                  ) -> list[str]:
    """Decode's pixels against the raw export decoded again (``verify --raw``)."""
    try:
        rows = _rows(files, "decode")
        images = load_npy(files["decode/images.npy"], "decode/images.npy")
    except (ValueError, KeyError, RoadshieldError) as err:
        return [str(err).splitlines()[0]]
    where = {f: i for i, f in enumerate(raw_files)}
    if images.shape[1:] != raw_images.shape[1:] or any(f not in where for f in rows):
        return ["decode's rows cannot be matched to the raw export's images"]
    changed = [i for i, f in enumerate(rows) if not np.array_equal(images[i],
                                                                     raw_images[where[f]])]
    if changed:
        return [f"{len(changed)} rows' pixels differ from decoding the raw export again "
                f"(row {changed[0]}: {rows[changed[0]]})"]
    return []
