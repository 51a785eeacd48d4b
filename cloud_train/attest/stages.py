"""The four preprocessing stages; each writes its outputs and a signed attestation.

Layout of a pipeline folder (every array file is NumPy ``.npy``/``.npz``, no pickles)::

    decode/     images.npy (N x S x S x 3 uint8 RGB), labels.npy (int64 ClassIds),
                classes.json, decode.intoto.jsonl
    normalise/  images.npy, labels.npy, classes.json (passed on unchanged),
                stats.json (per-channel RGB mean/std of pixels in [0, 1]), normalise.intoto.jsonl
    augment/    images.npy, labels.npy (originals then ``copies`` seeded variants of each),
                classes.json, stats.json, augment.intoto.jsonl
    shard/      shard-00000.npz ... (images, labels, index into augment's rows; seeded
                shuffle), classes.json, stats.json, shard.intoto.jsonl

Normalisation itself happens inside the model (project convention: model input is float32
RGB in [0, 1]); the normalise stage computes the constants the model embeds and passes the
pixels on, so every stage's inputs are exactly the previous stage's outputs. A stage hashes
the bytes it reads and records them as its inputs; its outputs are its subjects.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cloud_train.attest.policy import DECLARED, GATE, STAGES, load_policy, load_stage_key
from cloud_train.attest.statement import sign_statement, stage_statement, write_attestation
from roadshield_base.errors import ConfigError, DatasetError
from roadshield_base.trust import canonical_json, key_id, sha256_hex

ATTESTATION_SUFFIX = ".intoto.jsonl"


def attestation_path(out_dir: str | os.PathLike[str], stage: str) -> Path:
    return Path(out_dir) / stage / f"{stage}{ATTESTATION_SUFFIX}"


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.ascontiguousarray(v) for k, v in arrays.items()})
    return buf.getvalue()


def load_npy(data: bytes, what: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DatasetError(f"{what} is not a readable .npy array: {err}",
                           "re-run the pipeline") from err


def load_npz(data: bytes, what: str) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, KeyError) as err:
        raise DatasetError(f"{what} is not a readable .npz archive: {err}",
                           "re-run the pipeline") from err


@dataclass(frozen=True)
class StageResult:
    """What one stage wrote: outputs (name -> sha256, names relative to the pipeline folder)."""

    stage: str
    outputs: dict[str, str]
    inputs: dict[str, str]
    attestation: Path
    keyid: str


def _read_stage(out_dir: Path, stage: str) -> tuple[dict[str, bytes], dict[str, str]]:
    """Every output file of ``stage`` (attestation excluded) as bytes, and their digests."""
    folder = out_dir / stage
    if not folder.is_dir():
        raise DatasetError(f"stage folder {folder} is missing", "run the earlier stages first")
    files = {f"{stage}/{p.name}": p.read_bytes() for p in sorted(folder.iterdir())
             if p.is_file() and not p.name.endswith(ATTESTATION_SUFFIX)}
    return files, {n: sha256_hex(b) for n, b in files.items()}


def _write_stage(out_dir: Path, stage: str, files: Mapping[str, bytes],
                 inputs: Mapping[str, str], parameters: Mapping[str, Any], key: Any,
                 summary: Mapping[str, Any] | None = None) -> StageResult:
    """Write ``files`` (bare names) and the signed statement into a fresh folder, then swap it
    in for ``out_dir/stage`` so a crash leaves the old folder or the new one."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{stage}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        outputs = {}
        for name, data in files.items():
            (tmp / name).write_bytes(data)
            outputs[f"{stage}/{name}"] = sha256_hex(data)
        env = sign_statement(stage_statement(stage, outputs, inputs, parameters, summary,
                                             DECLARED[stage]), [key])
        att = write_attestation(tmp / f"{stage}{ATTESTATION_SUFFIX}", [env])
        os.chmod(att, 0o644)  # public evidence, readable like the outputs it covers
        if hasattr(os, "sync"):
            os.sync()  # one sync for the whole folder before it is renamed into place
        final = out_dir / stage
        old = out_dir / f".{stage}.old-{uuid.uuid4().hex[:8]}"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return StageResult(stage, outputs, dict(inputs), attestation_path(out_dir, stage),
                       key_id(key))


def _bare(files: Mapping[str, bytes]) -> dict[str, bytes]:
    return {n.split("/", 1)[1]: b for n, b in files.items()}


def channel_stats(images: np.ndarray) -> dict[str, list[float]]:
    """Per-channel mean and std (RGB order) of uint8 N x H x W x 3 pixels scaled to [0, 1]."""
    chans = np.ascontiguousarray(images.reshape(-1, 3).T, dtype=np.float64) / 255.0
    mean = chans.mean(axis=1)
    std = np.sqrt(np.maximum((chans * chans).mean(axis=1) - mean * mean, 0.0))
    return {"mean": [round(float(v), 6) for v in mean], "std": [round(float(v), 6) for v in std]}


@dataclass
class _Snapshot:
    """A private byte-for-byte copy of a raw train split (see ``_snapshot_train``)."""

    root: Path
    names: dict[str, str]  # copy's path -> file name relative to the raw folder
    digests: dict[str, str]  # name -> sha256 of the bytes read (and copied)
    metadata: list[str]  # names of the GT-NNNNN.csv files and classes.csv
    renames: dict[str, str]  # copy's folder/file -> the raw one, for error messages


def _snapshot_train(raw: Path, work: Path) -> _Snapshot:
    """Copy, byte for byte, what ``load_gtsrb`` reads for the train split into ``work``.

    Each file is read once; its sha256 is taken from those bytes and the same bytes are
    written to the copy, which is then the only thing decoded. A file swapped in ``raw``
    after it was read can therefore not reach the outputs under another file's digest.
    """
    from cloud_train.gtsrb import CLASSES_CSV, locate_gtsrb

    layout = locate_gtsrb(raw)
    if layout.train_dir is None:
        raise DatasetError(f"no training images under {layout.gtsrb} (expected Training/ or "
                           "Final_Training/Images/)", "point at a GTSRB-layout dataset")
    train = work / "GTSRB" / "Training"
    snap = _Snapshot(work, {}, {}, [], {str(train): str(layout.train_dir)})

    def copy(src: Path, dst: Path) -> str:
        data = src.read_bytes()
        dst.write_bytes(data)  # a scratch copy, deleted after decoding: no fsync needed
        name = Path(os.path.relpath(src, raw)).as_posix()
        snap.names[str(dst)] = name
        snap.digests[name] = sha256_hex(data)
        return name

    train.mkdir(parents=True)
    for d in sorted(layout.train_dir.iterdir()):
        if d.is_dir():  # the loader checks folder names and CSV listings on the copy
            (train / d.name).mkdir()
            for f in sorted(d.iterdir()):
                if f.is_file():
                    name = copy(f, train / d.name / f.name)
                    if f.name.startswith("GT-") and f.suffix == ".csv":
                        snap.metadata.append(name)
    if layout.classes_csv is not None:
        snap.metadata.append(copy(layout.classes_csv, work / CLASSES_CSV))
        snap.renames[str(work / CLASSES_CSV)] = str(layout.classes_csv)
    return snap


GATE_DIR = "gate"  # the pipeline's copy of the gate export statement decode read


def gate_statement_path(out_dir: str | os.PathLike[str]) -> Path:
    from cloud_train.ingest.export import EXPORT_FILE

    return Path(out_dir) / GATE_DIR / EXPORT_FILE


def _check_export_files(export: Any, snap: _Snapshot, raw: Path) -> None:
    """Every file decode read must be one the gate exported, byte for byte, and every
    exported file must be read: ExportError naming the first few differences."""
    from cloud_train.ingest.export import ExportError

    extra = sorted(n for n in snap.digests if n not in export.subjects)
    changed = sorted(n for n in snap.digests
                     if n in export.subjects and export.subjects[n] != snap.digests[n])
    lost = sorted(n for n in export.subjects if n not in snap.digests)
    if extra or changed or lost:
        raise ExportError(
            f"{raw} is not what the gate exported: {len(extra)} file(s) it did not export "
            f"{extra[:3]}, {len(changed)} changed since {changed[:3]}, {len(lost)} missing "
            f"{lost[:3]}",
            "preprocess only an untouched `roadshield data export` folder; re-export from "
            "the gate's store if it was changed")


def decode_stage(raw_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], key: Any,
                 gate_keys: Mapping[str, Any], size: int = 32,
                 progress: bool = True) -> StageResult:
    """Decode and resize the training split of a gate export to size x size uint8 RGB.

    ``raw_dir`` must be a folder `roadshield data export` wrote: its statement must verify
    against ``gate_keys`` (the policy's gate key, ``{keyid: public key}``) and every file
    decode reads must be one it exported, byte for byte (ExportError otherwise, before
    anything is written). Inputs recorded: every file read, by the sha256 of the very bytes
    that were decoded (see ``_snapshot_train``), named relative to ``raw_dir``, and the
    export statement as ``gate/gate_export.intoto.jsonl``, which is copied into the pipeline
    folder. ``decode/rows.json`` names the exported file of every row. ``progress`` shows
    the loader's progress bar on large folders.
    """
    from cloud_train.attest.invariants import rows_json
    from cloud_train.gtsrb import load_gtsrb
    from cloud_train.ingest.export import ExportError, read_export
    from roadshield_base.fileio import atomic_write_bytes

    raw, out = Path(raw_dir), Path(out_dir)
    export = read_export(raw, dict(gate_keys))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".decode-snapshot-", dir=out))  # private, mode 0700
    try:
        snap = _snapshot_train(raw, work)
        _check_export_files(export, snap, raw)
        try:
            data = load_gtsrb(work, "train", size=size, progress=progress)
        except DatasetError as err:  # name the caller's files, not the scratch copy
            msg = str(err.args[0])
            for copied, real in snap.renames.items():
                msg = msg.replace(copied, real)
            raise DatasetError(msg, err.hint) from err
        rows = [snap.names[str(p)] for p in data.paths]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    gate_labels = export.labels_by_file()
    wrong = [f for f, y in zip(rows, data.labels.tolist(), strict=True)
             if gate_labels.get(f) != y]
    if wrong or len(rows) != len(gate_labels):
        raise ExportError(f"{raw}: {len(wrong)} images carry another label than the export "
                          f"statement gives them ({wrong[:3]}), or rows are missing",
                          "re-export from the gate's store")
    gate_copy = gate_statement_path(out)
    gate_copy.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(gate_copy, export.raw)
    inputs = {**snap.digests, f"{GATE_DIR}/{gate_copy.name}": sha256_hex(export.raw)}
    files = {"images.npy": npy_bytes(data.images),
             "labels.npy": npy_bytes(data.labels.astype(np.int64)),
             "classes.json": canonical_json(list(data.class_names)),
             "rows.json": rows_json(rows)}
    return _write_stage(out, "decode", files, inputs,
                        {"size": int(size), "split": "train", "interpolation": "INTER_AREA",
                         "colour_order": "RGB", "gate_keyid": export.keyid},
                        key, {"images": len(data), "classes": len(data.class_names)})


def read_arrays(files: Mapping[str, bytes], stage: str) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) from a decode/normalise/augment stage's files."""
    images = load_npy(files[f"{stage}/images.npy"], f"{stage}/images.npy")
    labels = load_npy(files[f"{stage}/labels.npy"], f"{stage}/labels.npy")
    return images, labels


def normalise_stage(out_dir: str | os.PathLike[str], key: Any) -> StageResult:
    """Compute per-channel mean/std over decode's images (stats.json) and pass the data on."""
    out = Path(out_dir)
    files, inputs = _read_stage(out, "decode")
    images, _ = read_arrays(files, "decode")
    stats = {**channel_stats(images), "units": "RGB pixels scaled to [0, 1]",
             "pixels": int(images.shape[0] * images.shape[1] * images.shape[2])}
    new = {**_bare(files), "stats.json": canonical_json(stats)}
    return _write_stage(out, "normalise", new, inputs, {"statistic": "per-channel mean/std"},
                        key, {"mean": stats["mean"], "std": stats["std"]})


def augment_images(images: np.ndarray, rng: np.random.Generator, max_shift: int = 2,
                   gain: float = 0.1) -> np.ndarray:
    """One seeded variant of each uint8 N x H x W x 3 image: a shift of up to ``max_shift``
    pixels (reflected border) and a brightness gain drawn from [1 - gain, 1 + gain]."""
    n, h, w, _ = images.shape
    s = int(max_shift)
    padded = np.pad(images, ((0, 0), (s, s), (s, s), (0, 0)), mode="reflect")
    dy, dx = rng.integers(0, 2 * s + 1, size=(2, n))
    gains = np.asarray(rng.uniform(1.0 - gain, 1.0 + gain, size=n), np.float32)
    out = np.empty_like(images)
    for i in range(n):
        crop = padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w].astype(np.float32) * gains[i]
        out[i] = np.clip(np.rint(crop), 0, 255).astype(np.uint8)
    return out


def augment_stage(out_dir: str | os.PathLike[str], key: Any, seed: int, copies: int = 1,
                  max_shift: int = 2, gain: float = 0.1) -> StageResult:
    """Append ``copies`` seeded variants of every image (labels repeated); originals first."""
    if copies < 0 or max_shift < 0 or not 0 <= gain < 1:
        raise ConfigError(f"augment copies={copies}, max_shift={max_shift}, gain={gain}",
                          "use copies >= 0, max_shift >= 0 and 0 <= gain < 1")
    out = Path(out_dir)
    files, inputs = _read_stage(out, "normalise")
    images, labels = read_arrays(files, "normalise")
    rng = np.random.default_rng((int(seed), 3))
    parts = [images] + [augment_images(images, rng, max_shift, gain) for _ in range(copies)]
    new = {**_bare(files), "images.npy": npy_bytes(np.concatenate(parts)),
           "labels.npy": npy_bytes(np.tile(labels, copies + 1))}
    params = {"seed": int(seed), "copies": int(copies), "max_shift_px": int(max_shift),
              "gain": float(gain), "border": "reflect"}
    return _write_stage(out, "augment", new, inputs, params, key,
                        {"images": len(labels) * (copies + 1)})


def shard_stage(out_dir: str | os.PathLike[str], key: Any, seed: int,
                n_shards: int = 4) -> StageResult:
    """Shuffle augment's rows (seeded) into ``n_shards`` .npz files (images, labels, index)."""
    out = Path(out_dir)
    files, inputs = _read_stage(out, "augment")
    images, labels = read_arrays(files, "augment")
    if not 1 <= n_shards <= len(labels):
        raise ConfigError(f"{n_shards} shards for {len(labels)} images",
                          "use between 1 and the number of images")
    order = np.random.default_rng((int(seed), 4)).permutation(len(labels))
    new = {n: b for n, b in _bare(files).items() if n in ("classes.json", "stats.json")}
    for k, idx in enumerate(np.array_split(order, n_shards)):
        new[f"shard-{k:05d}.npz"] = npz_bytes(images=images[idx], labels=labels[idx],
                                              index=idx.astype(np.int64))
    return _write_stage(out, "shard", new, inputs, {"seed": int(seed), "shards": int(n_shards)},
                        key, {"images": int(len(labels))})


def run_pipeline(raw_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                 keys_dir: str | os.PathLike[str], seed: int = 0, size: int = 32,
                 n_shards: int = 4, copies: int = 1, progress: bool = True
                 ) -> list[StageResult]:
    """Run decode -> normalise -> augment -> shard on a gate export, each signed with its key
    from ``keys_dir``; the export must verify against the gate key of ``keys_dir``'s policy.

    ``progress`` is passed to the decode stage's loader."""
    keys = {s: load_stage_key(keys_dir, s) for s in STAGES}
    gate_keys = load_policy(keys_dir).trusted(GATE)
    return [decode_stage(raw_dir, out_dir, keys["decode"], gate_keys, size, progress),
            normalise_stage(out_dir, keys["normalise"]),
            augment_stage(out_dir, keys["augment"], seed, copies),
            shard_stage(out_dir, keys["shard"], seed, n_shards)]


def shard_names(out_dir: str | os.PathLike[str]) -> list[str]:
    return sorted(p.name for p in (Path(out_dir) / "shard").glob("shard-*.npz"))


def training_data_from_bytes(files: Mapping[str, bytes], where: str = "shard"
                             ) -> dict[str, Any]:
    """Decode the shard stage's data from its file bytes (names "shard/<file>", as
    ``VerifyReport.files`` holds them): images (N x S x S x 3 uint8 RGB), labels (int64),
    class_names, mean/std (RGB, [0, 1] units). Nothing is read from disk, so what is
    decoded is exactly what was hashed."""
    names = sorted(n for n in files if n.startswith("shard/shard-") and n.endswith(".npz"))
    if not names:
        raise DatasetError(f"no shards in {where}", "run `roadshield data preprocess` first")
    missing = [n for n in ("shard/stats.json", "shard/classes.json") if n not in files]
    if missing:
        raise DatasetError(f"{where} lacks {missing}", "run `roadshield data preprocess` again")
    parts = [load_npz(files[n], n) for n in names]
    try:
        stats = json.loads(files["shard/stats.json"])
        classes = json.loads(files["shard/classes.json"])
        mean, std = tuple(stats["mean"]), tuple(stats["std"])
    except (ValueError, KeyError, TypeError) as err:
        raise DatasetError(f"{where}: stats.json / classes.json are malformed: {err}",
                           "run `roadshield data preprocess` again") from err
    return {"images": np.concatenate([p["images"] for p in parts]),
            "labels": np.concatenate([p["labels"] for p in parts]),
            "class_names": tuple(classes), "mean": mean, "std": std}


def load_training_data(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The shard stage's data read from ``out_dir`` WITHOUT verification, for inspecting a
    folder (same fields as ``training_data_from_bytes``). Training never uses it: it takes
    ``cloud_train.attest.verify.verified_training_data``, which decodes the very bytes the
    verification hashed (a file swapped after verification is never read)."""
    folder = Path(out_dir) / "shard"
    files = {f"shard/{p.name}": p.read_bytes() for p in sorted(folder.glob("*"))
             if p.is_file() and not p.name.endswith(ATTESTATION_SUFFIX)} \
        if folder.is_dir() else {}
    return training_data_from_bytes(files, str(folder))
