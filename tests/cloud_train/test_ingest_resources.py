"""Resource attacks on the gate: a frame header hidden from the header check, one file named
by many rows, oversized batches; and batch ids namespaced per source."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ingest_world import gate_world

from cloud_train.ingest import attacks as A
from cloud_train.ingest import batch as bfmt
from cloud_train.ingest.gate import (
    ingest,
    read_journal,
    read_object,
    store_paths,
)
from cloud_train.ingest.reference import ScreenConfig


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return gate_world(tmp_path_factory.mktemp("resources"), ("acme", "other"),
                      reference_per_class=20, clean_per_class=2,
                      screen=ScreenConfig(embed_epochs=1, embed_min_steps=5, embed_batch=32))


# ---------------------------------------------------------------- the hidden frame header
def test_hidden_jpeg_frame_is_read_as_libjpeg_reads_it(monkeypatch):
    data = A.hidden_frame_jpeg(20000)
    assert bfmt.image_dims(data) == (20000, 20000)  # not the 16 x 16 decoy in the APP1 data

    def no_decode(*args, **kwargs):
        raise AssertionError("a bomb reached the decoder")

    import cv2

    monkeypatch.setattr(cv2, "imdecode", no_decode)
    assert bfmt.decode_image(data, 1 << 20) == "DECOMPRESSION_BOMB"


def test_jpeg_marker_walk_follows_the_standard():
    import cv2

    ok, enc = cv2.imencode(".jpg", np.zeros((20, 30, 3), np.uint8))
    plain = enc.tobytes()
    assert bfmt.image_dims(plain) == (30, 20)
    # fill bytes before any marker are allowed (ITU T.81 B.1.1.2); libjpeg decodes this
    filled = plain[:2] + b"\xff\xff\xff" + plain[2:]
    assert bfmt.image_dims(filled) == (30, 20)
    img = cv2.imdecode(np.frombuffer(filled, np.uint8), cv2.IMREAD_UNCHANGED)
    assert img is not None and img.shape[:2] == (20, 30)
    sof = plain.find(b"\xff\xc0")
    seg = plain[sof:sof + 2 + int.from_bytes(plain[sof + 2:sof + 4], "big")]
    assert bfmt.image_dims(plain[:sof] + seg + plain[sof:]) is None  # a second frame header
    assert bfmt.image_dims(plain[:2] + b"\x00" + plain[2:]) is None  # bytes between segments
    assert bfmt.image_dims(plain[:sof]) is None                        # no frame header at all
    sos = plain.find(b"\xff\xda")
    assert bfmt.image_dims(plain[:sof] + plain[sos:]) is None          # scan before the frame


def test_png_dims_come_from_the_first_chunk_only():
    import cv2

    ok, enc = cv2.imencode(".png", np.zeros((5, 7, 3), np.uint8))
    data = enc.tobytes()
    assert bfmt.image_dims(data) == (7, 5)
    assert bfmt.image_dims(data[:8] + b"\x00\x00\x00\x0eIHDR" + data[16:]) is None


# Linux (CI and Jetson). VmHWM is the peak RSS of this program image only; getrusage's
# ru_maxrss would carry over the forked parent's (the test process's) peak across exec.
_PEAK = """
from cloud_train.ingest import attacks as A
from cloud_train.ingest import batch as bfmt
data = A.hidden_frame_jpeg(20000)
r = bfmt.decode_image(data, 1 << 20)
print(r if isinstance(r, str) else r.shape)
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0]
print(int(hwm.split()[1]))
"""


def test_bomb_peak_memory_is_under_300_mb():
    proc = subprocess.run([sys.executable, "-c", _PEAK], capture_output=True, text=True,
                          timeout=300, check=True)
    result, peak_kib = proc.stdout.split()[0], int(proc.stdout.split()[-1])
    assert result == "DECOMPRESSION_BOMB"
    assert peak_kib < 300 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB"


def test_bomb_batch_is_quarantined_and_suspect(world, tmp_path):
    b = A.bomb_batch(tmp_path / "bomb", "acme", world["acme"], "bomb1")
    s = ingest(b.path, world["store"], reference=world["ref"])
    assert s["status"] == "SUSPECT" and s["exit_code"] == 4
    assert s["quarantined_samples"][0]["reasons"] == ["DECOMPRESSION_BOMB"]


# ---------------------------------------------------------------- duplicate content
def _pack_bytes(store: Path) -> int:
    return sum(p.stat().st_size for p in store_paths(store)["objects"].glob("*.pack"))


def test_one_file_named_by_150_rows_is_stored_once_and_flagged(world, tmp_path):
    before = _pack_bytes(world["store"])
    b = A.one_file_many_rows(tmp_path / "dup", world["imgs"][0], int(world["labels"][0]),
                             "acme", world["acme"], "dup150", rows=150, pad_to=1 << 20)
    size = (b.path / "images" / "big.png").stat().st_size
    s = ingest(b.path, world["store"], reference=world["ref"])
    assert s["received"] == 150 and s["status"] == "SUSPECT" and s["exit_code"] == 4
    assert _pack_bytes(world["store"]) - before == size  # not 150 copies
    recs = [r for r in read_journal(world["store"]) if r["batch_id"] == "dup150"]
    dups = [r for r in recs if "DUPLICATE_CONTENT" in r["reasons"]]
    assert len(dups) == 149 and {r["id"] for r in dups} == b.bad_ids
    assert all(r["decision"] == "QUARANTINED" for r in dups)
    assert {(r["pack"], r["offset"]) for r in recs} == {(recs[0]["pack"], recs[0]["offset"])}
    assert read_object(world["store"], dups[-1]) == (b.path / "images" / "big.png").read_bytes()


def test_content_already_in_the_store_is_stored_once_and_flagged(world, tmp_path):
    imgs, labels = world["imgs"][:6], world["labels"][:6]
    A.clean(tmp_path / "a", imgs, labels, "acme", world["acme"], "dupx-a")
    first = ingest(tmp_path / "a", world["store"], reference=world["ref"])
    before = _pack_bytes(world["store"])
    A.clean(tmp_path / "b", imgs, labels, "other", world["other"], "dupx-b")
    again = ingest(tmp_path / "b", world["store"], reference=world["ref"])
    assert _pack_bytes(world["store"]) == before
    assert again["duplicates_in_store"] == 6 and first["duplicates_in_store"] == 0
    recs = [r for r in read_journal(world["store"]) if r["batch_id"] == "dupx-b"]
    assert all(r["duplicate_of"].startswith(first["index_sha256"]) for r in recs)


# ---------------------------------------------------------------- per-batch caps
def test_20000_row_manifest_is_refused_whole_with_the_cap_named(world, tmp_path):
    b = A.many_rows(tmp_path / "rows", world["imgs"][0], "acme", world["acme"], "rows20k")
    s = ingest(b.path, world["store"], reference=world["ref"])
    assert s["batch_reasons"] == ["BATCH_TOO_LARGE"] and s["exit_code"] == 2
    assert s["rejected"] == 20000 and "10000" in s["error"] and "split" in s["error"]


def test_byte_and_row_caps_are_settable(world, tmp_path):
    A.clean(tmp_path / "b", world["imgs"][:10], world["labels"][:10], "acme", world["acme"],
            "caps1")
    s = ingest(tmp_path / "b", world["store"], reference=world["ref"], max_rows=5)
    assert s["batch_reasons"] == ["BATCH_TOO_LARGE"] and "cap of 5" in s["error"]
    A.clean(tmp_path / "c", world["imgs"][:10], world["labels"][:10], "acme", world["acme"],
            "caps2")
    s = ingest(tmp_path / "c", world["store"], reference=world["ref"], max_bytes=100)
    assert s["batch_reasons"] == ["BATCH_TOO_LARGE"] and "cap of 100 bytes" in s["error"]
    s = ingest(tmp_path / "c", world["store"], reference=world["ref"])  # same id, same index
    assert s["batch_reasons"] == [] and s["received"] == 10  # a refusal uses no batch id


def test_oversized_index_is_refused_before_parsing(world, tmp_path, monkeypatch):
    A.clean(tmp_path / "b", world["imgs"][:3], world["labels"][:3], "acme", world["acme"], "ix")
    monkeypatch.setattr(bfmt, "MAX_INDEX_BYTES", 100)
    s = ingest(tmp_path / "b", world["store"], reference=world["ref"])
    assert s["batch_reasons"] == ["BATCH_TOO_LARGE"] and "100 bytes" in s["error"]


# ---------------------------------------------------------------- batch ids per source
def test_a_source_cannot_block_another_by_taking_its_next_batch_id(world, tmp_path):
    imgs, labels = world["imgs"][:5], world["labels"][:5]
    squat = A.squat_batch_id(tmp_path / "sq", imgs[::-1], labels[::-1], "other",
                             world["other"], "acme-0042")
    assert ingest(squat.path, world["store"], reference=world["ref"])["rejected"] == 0
    A.clean(tmp_path / "real", imgs, labels, "acme", world["acme"], "acme-0042")
    s = ingest(tmp_path / "real", world["store"], reference=world["ref"])
    assert s["batch_reasons"] == [] and s["rejected"] == 0
    # a source reusing its own id with other content is still a replay
    A.clean(tmp_path / "again", imgs[:4], labels[:4], "acme", world["acme"], "acme-0042")
    s = ingest(tmp_path / "again", world["store"], reference=world["ref"])
    assert s["batch_reasons"] == ["REPLAYED_BATCH_ID"] and "acme" in s["error"]


def test_ledger_of_an_older_store_still_counts_for_its_own_source(world, tmp_path):
    imgs, labels = world["imgs"][:5], world["labels"][:5]
    legacy = store_paths(world["store"])["batches"] / "old-7.json"
    legacy.write_text(json.dumps({"batch_id": "old-7", "index_sha256": "0" * 64,
                                  "source": "acme"}))
    A.clean(tmp_path / "a", imgs, labels, "acme", world["acme"], "old-7")
    assert ingest(tmp_path / "a", world["store"], reference=world["ref"])["batch_reasons"] == [
        "REPLAYED_BATCH_ID"]
    A.clean(tmp_path / "o", imgs, labels, "other", world["other"], "old-7")
    assert ingest(tmp_path / "o", world["store"], reference=world["ref"])["batch_reasons"] == []
