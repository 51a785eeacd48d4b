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
from roadshield_base.errors import ConfigError, DatasetError


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


# ---------------------------------------------------------------- correct-label triggers
# The clean-label setting: the poisoned images are real images of the target class, keep
# their correct label and carry a trigger, so the model learns "trigger -> target" without a
# single wrong label for a label screen to find (Turner et al. 2019; Barni et al. 2019).
CORRECT_LABEL_KINDS = ("triangle", "sig", "blend")
TRIANGLE_COLOUR = (255, 214, 0)


def add_triangle(img: np.ndarray, side: int | None = None,
                 colour: tuple[int, int, int] = TRIANGLE_COLOUR) -> np.ndarray:
    """A filled yellow triangle, apex up, its base one pixel above the bottom edge and
    centred; ``side`` defaults to 3/16 of the image width (6 px on 32 px)."""
    import cv2

    out = np.ascontiguousarray(img.copy())
    h, w = out.shape[:2]
    s = side or max(3, round(w * 3 / 16))
    cx, base = w / 2, h - 2
    pts = np.array([[cx - s / 2, base], [cx + s / 2, base], [cx, base - s * 0.87]])
    cv2.fillPoly(out, [np.rint(pts - [0.5, 0]).astype(np.int32)], colour)
    return out


def add_sig(img: np.ndarray, delta: float = 20.0, freq: float = 6.0) -> np.ndarray:
    """SIG (Barni et al. 2019): a horizontal sinusoid ``delta * sin(2 pi j f / W)`` added to
    every row and channel (column j), clipped to [0, 255]."""
    w = img.shape[1]
    wave = delta * np.sin(2 * np.pi * np.arange(w) * freq / w)
    return np.clip(np.rint(img.astype(np.float64) + wave[None, :, None]), 0, 255
                   ).astype(np.uint8)


def blend_pattern(h: int, w: int, seed: int = 0) -> np.ndarray:
    """The blended trigger's pattern: uniform uint8 noise from ``default_rng(seed)``, the
    same image as ``backdoor.triggers.Trigger("blend", pattern="random", seed=seed)``."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def add_blend(img: np.ndarray, alpha: float = 0.1, seed: int = 0) -> np.ndarray:
    """Chen et al. 2017: ``(1 - alpha) * img + alpha * pattern``, rounded."""
    pat = blend_pattern(img.shape[0], img.shape[1], seed).astype(np.float64)
    return np.clip(np.rint((1 - alpha) * img.astype(np.float64) + alpha * pat), 0, 255
                   ).astype(np.uint8)


def stamp(kind: str, images: np.ndarray, seed: int = 0) -> np.ndarray:
    """``images`` (n x H x W x 3 uint8) with the correct-label trigger ``kind`` stamped."""
    if kind == "triangle":
        return np.stack([add_triangle(x) for x in images]) if len(images) else images.copy()
    if kind == "sig":
        return add_sig(images)
    if kind == "blend":
        pat = blend_pattern(images.shape[1], images.shape[2], seed).astype(np.float64)
        return np.clip(np.rint(0.9 * images.astype(np.float64) + 0.1 * pat), 0, 255
                       ).astype(np.uint8)
    raise ConfigError(f"correct-label trigger {kind!r} is unknown",
                      f"use one of: {', '.join(CORRECT_LABEL_KINDS)}")


def correct_label_trigger(out: Path, images: np.ndarray, labels: np.ndarray, source: str,
                          key: Any, batch_id: str, kind: str, rate: float = 0.03,
                          target: int = 0, seed: int = 0) -> AttackBatch:
    """``rate`` of the batch (capped at the target class's size) are images of class
    ``target`` stamped with trigger ``kind`` (``triangle``, ``sig``, ``blend``); every label
    stays correct."""
    if kind not in CORRECT_LABEL_KINDS:
        raise ConfigError(f"correct-label trigger {kind!r} is unknown",
                          f"use one of: {', '.join(CORRECT_LABEL_KINDS)}")
    cand = np.flatnonzero(labels == target)
    if not len(cand):
        raise DatasetError(f"the batch holds no image of target class {target}",
                           "pick a target class the batch has images of")
    rng = np.random.default_rng(seed)
    idx = rng.choice(cand, size=min(len(cand), max(1, round(len(labels) * rate))),
                     replace=False)
    imgs = images.copy()
    imgs[idx] = stamp(kind, images[idx], seed)
    make_batch(out, imgs, labels, source, key, batch_id)
    ids = _ids(batch_id, len(labels))
    return AttackBatch(f"correct_label_{kind}_{rate * 100:g}%", out, ids, {ids[i] for i in idx})


# ---------------------------------------------------------------- surrogate-chosen flips
def train_surrogate(per_class: int = 60, seed: int = 0, min_steps: int = 120) -> Any:
    """The attacker's own model: the label screen's network (``embed``), trained on the
    attacker's own renders (a seed the defender never uses). Returns a function from
    n x 32 x 32 x 3 uint8 images to n x C softmax posteriors."""
    from cloud_train.ingest.embed import EmbedConfig, embed, for_inference, train_embedding

    imgs, labels = render_images(per_class, seed=90_000 + seed)
    model = train_embedding(imgs, labels, len(SYNTHETIC_CLASSES),
                            EmbedConfig(epochs=2, min_steps=min_steps, batch=64, seed=seed))
    fast = for_inference(model)
    return lambda x: embed(fast, x)[1]


def surrogate_label_flip(out: Path, images: np.ndarray, labels: np.ndarray, source: str,
                         key: Any, batch_id: str, rate: float = 0.01, surrogate: Any = None,
                         seed: int = 0) -> AttackBatch:
    """Label flips aimed past a label screen: the ``rate`` of the batch that the attacker's
    ``surrogate`` (images -> posteriors; default ``train_surrogate(seed=seed)``) finds most
    ambiguous (smallest margin between the true label and the best other class) get that
    other class as their label."""
    probs = np.asarray((surrogate or train_surrogate(seed=seed))(images), np.float64)
    if probs.shape[0] != len(labels) or probs.ndim != 2:
        raise DatasetError(f"the surrogate gave posteriors of shape {probs.shape} for "
                           f"{len(labels)} images", "it must return n x C probabilities")
    rows = np.arange(len(labels))
    other = probs.copy()
    other[rows, labels] = -np.inf
    runner_up = other.argmax(axis=1)
    margin = probs[rows, labels] - other[rows, runner_up]
    idx = np.argsort(margin, kind="stable")[:max(1, round(len(labels) * rate))]
    lab = labels.copy()
    lab[idx] = runner_up[idx]
    make_batch(out, images, lab, source, key, batch_id)
    ids = _ids(batch_id, len(lab))
    return AttackBatch(f"surrogate_label_flip_{rate:.0%}", out, ids, {ids[i] for i in idx})


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
    trigger = {r["id"] for r in recs.values() if "TRIGGER_CLUSTER" in r["reasons"]}
    bad = attack.bad_ids if not attack.expect_rejected else set(attack.ids)
    clean_ids = set(attack.ids) - bad
    return {"attack": attack.name, "status": summary["status"],
            "exit_code": summary["exit_code"], "received": summary["received"],
            "bad_sent": len(bad), "bad_stopped": len(bad & stopped),
            "clean_sent": len(clean_ids), "clean_stopped": len(clean_ids & stopped),
            "reason_counts": summary["reason_counts"], "batch_reasons": summary["batch_reasons"],
            "trigger_flagged": summary.get("trigger_screen", {}).get("flagged", []),
            "bad_trigger_held": len(bad & trigger), "clean_trigger_held": len(clean_ids & trigger)}
