"""Batch format, safe reading, schema checks and the NumPy KS test."""

from __future__ import annotations

import io
import json
import tarfile
from datetime import datetime, timezone

import cv2
import numpy as np
import pytest

from cloud_train.ingest import batch as bfmt
from cloud_train.ingest.rows import validate_row
from cloud_train.ingest.screens import image_features, ks_2samp
from roadshield_base.trust import generate_private_key

NOW = datetime(2026, 6, 1, tzinfo=timezone.utc)


def _imgs(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_make_and_read_batch_roundtrip(tmp_path):
    key = generate_private_key()
    imgs = _imgs(3)
    bfmt.make_batch(tmp_path / "b", imgs, [0, 1, 2], "acme", key, "b1")
    rb = bfmt.read_batch(tmp_path / "b")
    assert rb.batch_id == "b1" and len(rb.rows) == 3 and rb.signature["source"] == "acme"
    row = rb.rows[1].fields
    data = (tmp_path / "b" / row["file"]).read_bytes()
    back = bfmt.decode_image(data, 1 << 20)
    np.testing.assert_array_equal(back, imgs[1])  # PNG is lossless, RGB order kept
    assert row["label"] == 1 and set(row) == set(bfmt.INDEX_FIELDS)


def test_csv_index_roundtrip(tmp_path):
    bfmt.make_batch(tmp_path / "b", _imgs(2), [3, 4], "acme", generate_private_key(), "b2",
                    fmt="csv")
    rb = bfmt.read_batch(tmp_path / "b")
    assert rb.index_name == "index.csv" and [r.fields["label"] for r in rb.rows] == ["3", "4"]
    assert validate_row(rb.rows[0].fields, 14, datetime.now(timezone.utc),
                        bfmt.INDEX_FIELDS) == []


def test_non_utf8_and_bad_json_lines_become_rows():
    data = b'{"id": "a"}\n\xff\xfe bad\nnot json\n[1]\n'
    rows = bfmt.parse_index("index.jsonl", data)
    assert [r.parse_error.split(":")[0] for r in rows] == [
        "", "INDEX_NOT_UTF8", "INDEX_BAD_JSON", "INDEX_BAD_JSON"]
    assert rows[1].sample_id == "line-2"


def test_image_dims_from_headers_without_decoding():
    img = np.zeros((20, 30, 3), np.uint8)
    for ext in (".png", ".jpg", ".ppm"):
        ok, enc = cv2.imencode(ext, img)
        assert ok and bfmt.image_dims(enc.tobytes()) == (30, 20), ext
    assert bfmt.image_dims(b"GIF89a....") is None


def test_decompression_bomb_is_refused_before_decode():
    # a real 20000 x 20000 PNG header with a tiny (invalid) body: never handed to the decoder
    ok, enc = cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))
    data = bytearray(enc.tobytes())
    data[16:24] = (20000).to_bytes(4, "big") * 2
    assert bfmt.decode_image(bytes(data), 1 << 20) == "DECOMPRESSION_BOMB"
    assert bfmt.decode_image(b"", 1 << 20) == "EMPTY_FILE"
    assert bfmt.decode_image(enc.tobytes()[:40], 1 << 20) == "UNDECODABLE"
    ok, grey = cv2.imencode(".png", np.zeros((8, 8), np.uint8))
    assert bfmt.decode_image(grey.tobytes(), 1 << 20) == "BAD_CHANNELS"


def test_safe_path_confines_files(tmp_path):
    root = tmp_path / "batch"
    (root / "images").mkdir(parents=True)
    (root / "images" / "a.png").write_bytes(b"x")
    (tmp_path / "secret").write_bytes(b"s")
    (root / "images" / "link.png").symlink_to(tmp_path / "secret")
    (root / "images" / "inner.png").symlink_to(root / "images" / "a.png")
    assert bfmt.safe_path(root, "images/a.png") == (root / "images" / "a.png").resolve()
    assert bfmt.safe_path(root, "images/link.png") == "PATH_ESCAPE"
    assert bfmt.safe_path(root, "../secret") == "PATH_ESCAPE"
    assert bfmt.safe_path(root, str(tmp_path / "secret")) == "PATH_ESCAPE"
    assert bfmt.safe_path(root, "images/missing.png") == "FILE_MISSING"
    assert isinstance(bfmt.safe_path(root, "images/inner.png"), type(root))


def test_the_gates_reader_confines_files_exactly_as_safe_path(tmp_path):
    from datetime import datetime, timezone

    from cloud_train.ingest.gate import _Reader

    root = tmp_path / "batch"
    (root / "images" / "sub").mkdir(parents=True)
    (root / "images" / "a.png").write_bytes(b"x")
    (root / "images" / "sub" / "b.png").write_bytes(b"y")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "secret").write_bytes(b"s")
    (root / "images" / "link.png").symlink_to(tmp_path / "out" / "secret")
    (root / "images" / "inner.png").symlink_to(root / "images" / "a.png")
    (root / "escape").symlink_to(tmp_path / "out")  # a directory leading out
    (root / "inside").symlink_to(root / "images")  # a directory staying in
    reader = _Reader(bfmt.Resolver(root), 14, datetime.now(timezone.utc))
    names = ["images/a.png", "images/sub/b.png", "images/./a.png", "images/link.png",
             "images/inner.png", "escape/secret", "inside/a.png", "images/missing.png",
             "images", "images/sub", "../out/secret", str(tmp_path / "out" / "secret"), "",
             "nodir/a.png"]
    for _ in range(2):  # the second pass reads the directory cache
        for rel in names:
            assert reader.where(rel) == bfmt.safe_path(root, rel), rel


def test_extract_tar_skips_links_and_escapes(tmp_path):
    tar_path = tmp_path / "b.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name, data in (("index.jsonl", b"{}\n"), ("../evil", b"e"), ("images/a.png", b"a")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("images/l.png")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
    out = bfmt.extract_tar(tar_path, tmp_path / "x")
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert names == ["images/a.png", "index.jsonl"]
    assert not (tmp_path / "evil").exists()


@pytest.mark.parametrize("change, code", [
    ({"label": 14}, "LABEL_OUT_OF_RANGE"), ({"label": -1}, "LABEL_OUT_OF_RANGE"),
    ({"label": "stop"}, "BAD_LABEL_TYPE"), ({"label": True}, "BAD_LABEL_TYPE"),
    ({"capture_time": "2030-01-01T00:00:00Z"}, "CAPTURE_TIME_FUTURE"),
    ({"capture_time": "1970-01-01T00:00:00Z"}, "CAPTURE_TIME_TOO_OLD"),
    ({"capture_time": "2026-01-01T00:00:00+02:00"}, "CAPTURE_TIME_NOT_UTC"),
    ({"capture_time": "yesterday"}, "CAPTURE_TIME_UNPARSABLE"),
    ({"sha256": "abc"}, "BAD_SHA256"), ({"id": "a/b"}, "BAD_ID"),
    ({"extra": 1}, "INDEX_EXTRA_FIELD"), ({"source": None}, "INDEX_MISSING_FIELD"),
])
def test_validate_row_codes(change, code):
    row = {"batch_id": "b", "id": "s1", "file": "images/s1.png", "label": 3, "source": "acme",
           "capture_time": "2026-05-01T10:00:00Z", "sha256": "0" * 64}
    assert validate_row(row, 14, NOW, bfmt.INDEX_FIELDS) == []
    assert validate_row({**row, **change}, 14, NOW, bfmt.INDEX_FIELDS) == [code]


def test_ks_matches_scipy():
    from scipy.stats import ks_2samp as ref  # the reference implementation (dev extra)

    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 400), rng.normal(0.3, 1, 300)
    d, p = ks_2samp(a, b)
    r = ref(a, b, method="asymp")
    assert d == pytest.approx(r.statistic, abs=1e-12)
    assert p == pytest.approx(r.pvalue, rel=0.1)
    d0, p0 = ks_2samp(a, a)
    assert d0 == 0.0 and p0 == 1.0


def test_features_are_deterministic_and_shaped():
    imgs = _imgs(5)
    f1, f2 = image_features(imgs), image_features(imgs.copy())
    assert f1.shape == (5, 859) and f1.dtype == np.float32
    np.testing.assert_array_equal(f1, f2)
    json.dumps(f1.tolist())  # finite numbers
    assert np.isfinite(f1).all()


def test_format_md_provider_script_produces_a_valid_batch(tmp_path):
    """The script in FORMAT.md, run as a provider would, yields a batch the reader accepts."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    from roadshield_base.trust import key_id, load_public_key, save_private_key, verify

    md = (Path(bfmt.__file__).parent / "FORMAT.md").read_text()
    script = re.search(r"```python\n(.*?)```", md, re.S).group(1)
    (tmp_path / "provider.py").write_text(script)
    key = generate_private_key()
    pem = save_private_key(key, tmp_path / "acme.pem")
    files = []
    for i in range(2):
        ok, enc = cv2.imencode(".png", _imgs(2)[i])
        (tmp_path / f"s{i}.png").write_bytes(enc.tobytes())
        files.append(f"{i}:{tmp_path / f's{i}.png'}")
    subprocess.run([sys.executable, str(tmp_path / "provider.py"), str(tmp_path / "b"), "acme",
                    str(pem), "pb1", *files], check=True, timeout=60)
    rb = bfmt.read_batch(tmp_path / "b")
    assert rb.batch_id == "pb1" and [r.fields["label"] for r in rb.rows] == [0, 1]
    assert rb.signature["keyid"] == key_id(key)
    verify(load_public_key(f"{pem}.pub"), rb.index_bytes,
           __import__("base64").b64decode(rb.signature["signature"]))
    assert all(validate_row(r.fields, 14, datetime.now(timezone.utc), bfmt.INDEX_FIELDS) == []
               for r in rb.rows)


def test_parse_index_never_crashes_or_drops_lines():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=400), st.sampled_from(["index.jsonl", "index.csv"]))
    def check(data, name):
        rows = bfmt.parse_index(name, data)
        nonempty = [ln for ln in data.split(b"\n") if ln.strip()]
        # every non-empty line is a row (csv: the first readable line is the header)
        assert len(rows) in (len(nonempty), len(nonempty) - 1)
        for r in rows:
            assert isinstance(r.fields, dict) and isinstance(r.sample_id, str)

    check()


def test_read_capped_stops_one_byte_past_the_limit(tmp_path):
    f = tmp_path / "grown.png"
    f.write_bytes(b"a" * 3000)
    assert bfmt.read_capped(str(f), 5000) == b"a" * 3000
    assert bfmt.read_capped(str(f), 3000) == b"a" * 3000
    assert bfmt.read_capped(str(f), 1000) == b"a" * 1001  # over: the caller refuses it


def test_the_caps_and_the_reader_share_one_resolution_per_file(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x" * 10)
    resolve = bfmt.Resolver(tmp_path)
    first = resolve("a.png")
    (tmp_path / "a.png").write_bytes(b"x" * 20)  # the answer stays the one the caps saw
    assert resolve("a.png") == first == (str(tmp_path / "a.png"), 10)
