"""Poisoned and forged source batches for red-teaming the ingest gate (stage 1).

Each builder writes a batch folder and returns an ``AttackBatch`` naming the poisoned
sample ids, so ``score`` can count what the gate stopped and what it wrongly stopped.
Images are n x 32 x 32 x 3 uint8 RGB; labels are class indices.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cloud_train.ingest.batch import make_batch, read_batch, sign_index
from cloud_train.ingest.gate import ingest
from cloud_train.render import image_rng, render_sign
from cloud_train.signs import SYNTHETIC_CLASSES


@dataclass
class AttackBatch:
    name: str
    path: Path
    ids: list[str]
    bad_ids: set[str] = field(default_factory=set)
    expect_rejected: bool = False


def render_images(per_class: int, seed: int, split: str = "train",
                  n_classes: int = len(SYNTHETIC_CLASSES)) -> tuple[np.ndarray, np.ndarray]:
    """per_class renders of each synthetic class: (n x 32 x 32 x 3 uint8 RGB, n labels)."""
    imgs, labels = [], []
    for c in range(n_classes):
        for i in range(per_class):
            imgs.append(render_sign(c, image_rng(seed, split, c, i)))
            labels.append(c)
    return np.stack(imgs), np.array(labels)


def _ids(batch_id: str, n: int) -> list[str]:
    return [f"{batch_id}-{i:06d}" for i in range(n)]


def _pick(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    return rng.choice(n, size=max(1, round(n * rate)), replace=False)


def clean(out: Path, images: np.ndarray, labels: np.ndarray, source: str, key: Any,
          batch_id: str) -> AttackBatch:
    make_batch(out, images, labels, source, key, batch_id)
    return AttackBatch("clean", out, _ids(batch_id, len(labels)))


def label_flip(out: Path, images: np.ndarray, labels: np.ndarray, source: str, key: Any,
               batch_id: str, rate: float, seed: int = 0) -> AttackBatch:
    """``rate`` of the labels moved to a random other class."""
    rng = np.random.default_rng(seed)
    lab = labels.copy()
    idx = _pick(len(lab), rate, rng)
    n_classes = int(labels.max()) + 1
    lab[idx] = (lab[idx] + rng.integers(1, n_classes, len(idx))) % n_classes
    make_batch(out, images, lab, source, key, batch_id)
    ids = _ids(batch_id, len(lab))
    return AttackBatch(f"label_flip_{rate:.0%}", out, ids, {ids[i] for i in idx})


def add_trigger(img: np.ndarray, size: int = 4) -> np.ndarray:
    """BadNets trigger: a size x size black/white checkerboard in the bottom-right corner."""
    out = img.copy()
    yy, xx = np.mgrid[:size, :size]
    patch = np.where(((yy + xx) % 2 == 0)[..., None], 255, 0).astype(np.uint8)
    out[-size - 1:-1, -size - 1:-1] = patch
    return out


def badnets(out: Path, images: np.ndarray, labels: np.ndarray, source: str, key: Any,
            batch_id: str, rate: float = 0.01, target: int = 0, seed: int = 0) -> AttackBatch:
    """``rate`` of non-target images get the trigger and the target label."""
    rng = np.random.default_rng(seed)
    cand = np.flatnonzero(labels != target)
    idx = rng.choice(cand, size=max(1, round(len(labels) * rate)), replace=False)
    imgs, lab = images.copy(), labels.copy()
    for i in idx:
        imgs[i] = add_trigger(imgs[i])
        lab[i] = target
    make_batch(out, imgs, lab, source, key, batch_id)
    ids = _ids(batch_id, len(lab))
    return AttackBatch(f"badnets_{rate:.0%}", out, ids, {ids[i] for i in idx})


def ood_junk(out: Path, images: np.ndarray, labels: np.ndarray, source: str, key: Any,
             batch_id: str, rate: float = 0.03, seed: int = 0) -> AttackBatch:
    """``rate`` of the images replaced by junk: uniform noise, flat colour or stripes."""
    rng = np.random.default_rng(seed)
    idx = _pick(len(labels), rate, rng)
    imgs = images.copy()
    for j, i in enumerate(idx):
        kind = j % 3
        if kind == 0:
            imgs[i] = rng.integers(0, 256, imgs[i].shape, dtype=np.uint8)
        elif kind == 1:
            imgs[i] = rng.integers(0, 256, 3, dtype=np.uint8)
        else:
            imgs[i] = np.where((np.arange(32) // 2 % 2 == 0)[None, :, None], 255, 0)
    make_batch(out, imgs, labels, source, key, batch_id)
    ids = _ids(batch_id, len(labels))
    return AttackBatch("ood_junk", out, ids, {ids[i] for i in idx})


def unknown_source(out: Path, images: np.ndarray, labels: np.ndarray, key: Any,
                   batch_id: str) -> AttackBatch:
    """A well-formed batch from a provider the registry does not list."""
    make_batch(out, images, labels, "unlisted-provider", key, batch_id)
    return AttackBatch("unknown_source", out, _ids(batch_id, len(labels)), expect_rejected=True)


def forged_signature(out: Path, images: np.ndarray, labels: np.ndarray, source: str,
                     forger_key: Any, batch_id: str) -> AttackBatch:
    """A batch claiming a registered source but signed with the attacker's key."""
    make_batch(out, images, labels, source, forger_key, batch_id)
    return AttackBatch("forged_signature", out, _ids(batch_id, len(labels)),
                       expect_rejected=True)


def replayed_signature(out: Path, signed_batch: Path, flip: int = 1) -> AttackBatch:
    """An old, validly signed index.sig reused over an index whose labels were changed."""
    shutil.copytree(signed_batch, out)
    rb = read_batch(out)
    lines = rb.index_bytes.decode().splitlines()
    for i in range(min(flip, len(lines))):
        rec = json.loads(lines[i])
        rec["label"] = (int(rec["label"]) + 1) % len(SYNTHETIC_CLASSES)
        lines[i] = json.dumps(rec, sort_keys=True)
    (out / rb.index_name).write_bytes(("\n".join(lines) + "\n").encode())
    return AttackBatch("replayed_signature", out, [r.sample_id for r in rb.rows],
                       expect_rejected=True)


def replayed_batch_id(out: Path, images: np.ndarray, labels: np.ndarray, source: str,
                      key: Any, old_batch_id: str) -> AttackBatch:
    """New content, validly signed, reusing an already-ingested batch id."""
    make_batch(out, images, labels, source, key, old_batch_id)
    return AttackBatch("replayed_batch_id", out, _ids(old_batch_id, len(labels)),
                       expect_rejected=True)


# ---------------------------------------------------------------- resource attacks
def hidden_frame_jpeg(side: int = 20000, small: np.ndarray | None = None) -> bytes:
    """A JPEG whose real frame header says ``side`` x ``side`` behind a 0xFF fill byte and
    an APP1 segment, with a decoy 16 x 16 frame header inside the APP1 data where a parser
    that reads the fill byte as a marker lands. The scan data is that of a small image, so
    libjpeg decodes it to ``side`` x ``side`` (the rest filled): a decompression bomb."""
    import cv2

    img = small if small is not None else np.full((16, 16, 3), 128, np.uint8)
    ok, enc = cv2.imencode(".jpg", np.ascontiguousarray(img[..., ::-1]))
    data = bytearray(enc.tobytes())
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = side.to_bytes(2, "big") * 2  # height, width
    decoy_sof = bytes(data[sof:sof + 2 + int.from_bytes(data[sof + 2:sof + 4], "big")])
    decoy_sof = decoy_sof[:5] + (16).to_bytes(2, "big") * 2 + decoy_sof[9:]
    length = 60000
    app1 = bytearray(b"Exif\x00\x00".ljust(length - 2, b"\x00"))
    # a reader taking the fill byte for a marker reads 0xE1 and the length's high byte as a
    # segment length and jumps to 2 + 2 + that from the start of the file
    decoy_at = 4 + ((0xE1 << 8) | (length >> 8)) - 7  # offset inside the APP1 payload
    app1[decoy_at:decoy_at + len(decoy_sof)] = decoy_sof
    return bytes(data[:2] + b"\xff\xff\xe1" + length.to_bytes(2, "big") + app1 + data[2:])


def padded_png(img: np.ndarray, total_bytes: int) -> bytes:
    """A valid PNG of ``img`` (RGB) padded with a private ancillary chunk to ``total_bytes``."""
    import zlib

    import cv2

    ok, enc = cv2.imencode(".png", np.ascontiguousarray(img[..., ::-1]))
    data = enc.tobytes()
    n = max(0, total_bytes - len(data) - 12)
    body = b"prVt" + bytes(n)
    chunk = n.to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")
    return data[:33] + chunk + data[33:]  # after IHDR (8 signature + 25 IHDR bytes)


def one_file_many_rows(out: Path, image: np.ndarray, label: int, source: str, key: Any,
                       batch_id: str, rows: int = 150, pad_to: int = 8 << 20) -> AttackBatch:
    """``rows`` index rows all naming one padded PNG: without per-content storage the store
    grows by rows x pad_to bytes from a pad_to-byte batch."""
    from cloud_train.ingest.batch import sha256_hex, utc_now_iso, write_index

    (out / "images").mkdir(parents=True, exist_ok=True)
    data = padded_png(image, pad_to - 1024)
    (out / "images" / "big.png").write_bytes(data)
    ids = _ids(batch_id, rows)
    recs = [{"batch_id": batch_id, "id": sid, "file": "images/big.png", "label": int(label),
             "source": source, "capture_time": utc_now_iso(), "sha256": sha256_hex(data)}
            for sid in ids]
    write_index(out, recs, key, source)
    return AttackBatch("one_file_many_rows", out, ids, set(ids[1:]))


def bomb_batch(out: Path, source: str, key: Any, batch_id: str, side: int = 20000
               ) -> AttackBatch:
    """One row: the hidden-frame JPEG bomb (``hidden_frame_jpeg``)."""
    from cloud_train.ingest.batch import sha256_hex, utc_now_iso, write_index

    (out / "images").mkdir(parents=True, exist_ok=True)
    data = hidden_frame_jpeg(side)
    (out / "images" / "bomb.jpg").write_bytes(data)
    sid = f"{batch_id}-000000"
    write_index(out, [{"batch_id": batch_id, "id": sid, "file": "images/bomb.jpg", "label": 0,
                       "source": source, "capture_time": utc_now_iso(),
                       "sha256": sha256_hex(data)}], key, source)
    return AttackBatch("hidden_frame_bomb", out, [sid], {sid})


def many_rows(out: Path, image: np.ndarray, source: str, key: Any, batch_id: str,
              rows: int = 20000) -> AttackBatch:
    """An index of ``rows`` rows (all naming one small image): over the per-batch row cap."""
    from cloud_train.ingest.batch import sha256_hex, utc_now_iso, write_index

    (out / "images").mkdir(parents=True, exist_ok=True)
    data = padded_png(image, 0)
    (out / "images" / "a.png").write_bytes(data)
    ids = _ids(batch_id, rows)
    now = utc_now_iso()
    write_index(out, [{"batch_id": batch_id, "id": sid, "file": "images/a.png", "label": 0,
                       "source": source, "capture_time": now, "sha256": sha256_hex(data)}
                      for sid in ids], key, source)
    return AttackBatch("many_rows", out, ids, expect_rejected=True)


def squat_batch_id(out: Path, images: np.ndarray, labels: np.ndarray, squatter: str,
                   squatter_key: Any, victims_next_id: str) -> AttackBatch:
    """Source ``squatter`` sends a batch under another source's next batch id first."""
    make_batch(out, images, labels, squatter, squatter_key, victims_next_id)
    return AttackBatch("squat_batch_id", out, _ids(victims_next_id, len(labels)))


def resign(batch: Path, key: Any, source: str) -> None:
    """Sign a batch's current index again (a provider fixing its own batch)."""
    rb = read_batch(batch)
    sign_index(batch, key, source, rb.index_bytes)


def score(attack: AttackBatch, store: Path, reference: Any = None) -> dict[str, Any]:
    """Ingest the batch and count bad samples stopped and clean samples wrongly stopped.

    ``reference``: an already loaded ``screens.Reference`` (else the store's is loaded).
    """
    summary = ingest(attack.path, store, reference=reference)
    from cloud_train.ingest.gate import read_records, store_paths

    recs = read_records(store_paths(store)["journal"] / f"{summary['index_sha256']}.jsonl")
    stopped = {r["id"] for r in recs.values() if r["decision"] != "ACCEPTED"}
    bad = attack.bad_ids if not attack.expect_rejected else set(attack.ids)
    clean_ids = set(attack.ids) - bad
    return {"attack": attack.name, "status": summary["status"],
            "exit_code": summary["exit_code"], "received": summary["received"],
            "bad_sent": len(bad), "bad_stopped": len(bad & stopped),
            "clean_sent": len(clean_ids), "clean_stopped": len(clean_ids & stopped),
            "reason_counts": summary["reason_counts"], "batch_reasons": summary["batch_reasons"]}
