"""The gate's parallel path (decoding and screens on a thread pool) decides, journals and
stores exactly what the one-worker path does."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest
from ingest_world import gate_world

from cloud_train.ingest import attacks as A
from cloud_train.ingest import batch as bfmt
from cloud_train.ingest.gate import ingest, store_paths


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return gate_world(tmp_path_factory.mktemp("parallel"), clean_per_class=10)


def _mixed_batch(world, out):
    """Clean renders with a few of everything: flipped labels, a trigger, a truncated PNG
    (a libpng warning), the same bytes twice, a missing file, an oversized image."""
    imgs, labels = world["imgs"].copy(), world["labels"].copy()
    labels[[3, 40, 77]] = (labels[[3, 40, 77]] + 5) % 14
    imgs[[10, 11]] = A.add_trigger(imgs[10]), A.add_trigger(imgs[11])
    bfmt.make_batch(out, imgs, labels, "acme", world["prov"], "mixed")
    rows = [json.loads(x) for x in (out / "index.jsonl").read_text().splitlines()]
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3)).astype(np.uint8)
    cut = cv2.imencode(".png", noise)[1].tobytes()[:-30]
    (out / rows[20]["file"]).write_bytes(cut)
    rows[20]["sha256"] = bfmt.sha256_hex(cut)
    rows[21]["file"], rows[21]["sha256"] = rows[22]["file"], rows[22]["sha256"]
    rows[30]["file"] = "images/missing.png"
    big = cv2.imencode(".png", np.zeros((600, 20, 3), np.uint8))[1].tobytes()
    (out / rows[50]["file"]).write_bytes(big)
    rows[50]["sha256"] = bfmt.sha256_hex(big)
    data = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
    (out / "index.jsonl").write_bytes(data)
    bfmt.sign_index(out, world["prov"], "acme", data)
    return out, rows


def _files(store):
    p = store_paths(store)
    return {f"{k}/{f.name}": f.read_bytes() for k in ("journal", "objects")
            for f in sorted(p[k].iterdir())}


@pytest.mark.parametrize("workers", [2, 3])
def test_parallel_and_one_worker_paths_agree(world, tmp_path, workers):
    batch, rows = _mixed_batch(world, tmp_path / "b")
    runs = {}
    for w in (1, workers):
        store = tmp_path / f"store{w}"
        shutil.copytree(world["store"], store)
        summary = ingest(batch, store, workers=w)
        runs[w] = (summary, _files(store))
    (one, one_files), (par, par_files) = runs[1], runs[workers]
    assert par == one
    assert par_files == one_files  # the same journal lines and pack bytes, in the same order
    assert one["received"] == len(rows) and one["reason_counts"]["DUPLICATE_CONTENT"] == 1
    assert {"FILE_MISSING", "UNDECODABLE", "BAD_SIZE"} <= set(one["reason_counts"])
    # the decoder's warning is still tied to its own sample when decoding ran in parallel
    warned = [w["id"] for w in par["decoder_warnings"]]
    assert warned == [rows[20]["id"]] and "libpng" in par["decoder_warnings"][0]["text"]


def test_batch_caps_count_each_file_once_however_it_is_named(tmp_path):
    root = tmp_path / "batch"
    (root / "images").mkdir(parents=True)
    (root / "images" / "a.png").write_bytes(b"x" * 100)
    (root / "images" / "b.png").write_bytes(b"y" * 50)
    (root / "images" / "link.png").symlink_to(root / "images" / "a.png")
    rows = [bfmt.IndexRow(i + 1, {"file": f}) for i, f in enumerate(
        ["images/a.png", "images/link.png", "images/./a.png", "images/b.png", "../x"])]
    assert bfmt.batch_limits(root, rows, max_bytes=150) == ""
    assert "151" not in bfmt.batch_limits(root, rows, max_bytes=149)
    assert "150 bytes of images in 2 files" in bfmt.batch_limits(root, rows, max_bytes=149)
