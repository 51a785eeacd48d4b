"""GTSRB-layout datasets: render, load, torchvision agreement, official layout, bad inputs."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from cloud_train import render as render_mod
from cloud_train.gtsrb import COLUMNS, load_gtsrb, locate_gtsrb, write_split
from cloud_train.render import image_rng, render_dataset, render_sign_roi
from cloud_train.signs import GTSRB_CLASS_NAMES, SYNTHETIC_CLASSES
from roadshield_base.errors import ConfigError, DatasetError

TRAIN_PER_CLASS, TEST_PER_CLASS = 3, 2


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    summary = render_dataset(root, TRAIN_PER_CLASS, TEST_PER_CLASS, seed=0, progress=False)
    assert summary.root == root / "gtsrb"
    assert summary.train_images == 14 * TRAIN_PER_CLASS
    assert summary.test_images == 14 * TEST_PER_CLASS
    return root


def test_round_trip_labels_names_and_pixels(synth: Path) -> None:
    train = load_gtsrb(synth, "train")
    assert train.images.shape == (14 * TRAIN_PER_CLASS, 32, 32, 3)
    assert train.images.dtype == np.uint8 and train.labels.dtype == np.int64
    assert train.class_names == SYNTHETIC_CLASSES
    assert train.labels.tolist() == [k for k in range(14) for _ in range(TRAIN_PER_CLASS)]
    # Files are lossless (PPM), so every image is exactly the crop its rng renders.
    for j in (0, 7, 41):
        k, i = divmod(j, TRAIN_PER_CLASS)
        expected, _ = render_sign_roi(k, image_rng(0, "train", k, i), 32)
        assert np.array_equal(train.images[j], expected)
    test = load_gtsrb(synth, "test")
    assert np.bincount(test.labels).tolist() == [TEST_PER_CLASS] * 14
    assert test.labels.tolist() != sorted(test.labels.tolist())  # shuffled, like GTSRB's


@pytest.mark.parametrize("sub", ["", "gtsrb", "gtsrb/GTSRB"])
def test_root_may_point_at_any_level(synth: Path, sub: str) -> None:
    ref = load_gtsrb(synth, "test")
    got = load_gtsrb(synth / sub if sub else synth, "test")
    assert np.array_equal(got.images, ref.images) and np.array_equal(got.labels, ref.labels)
    assert got.class_names == SYNTHETIC_CLASSES


@pytest.mark.parametrize("split", ["train", "test"])
def test_torchvision_reads_the_same_dataset(synth: Path, split: str) -> None:
    import torchvision

    ours = load_gtsrb(synth, split)
    theirs = torchvision.datasets.GTSRB(str(synth), split=split)
    assert len(theirs) == len(ours)
    labels = [theirs[i][1] for i in range(len(theirs))]
    assert labels == ours.labels.tolist()
    for i in (0, len(theirs) - 1):
        assert np.array_equal(np.asarray(theirs[i][0]), ours.images[i])


def test_resize_and_roi_crop(synth: Path) -> None:
    big = load_gtsrb(synth, "train", size=48)
    assert big.images.shape[1:] == (48, 48, 3)
    cropped = load_gtsrb(synth, "train", size=32, crop_roi=True)
    full = load_gtsrb(synth, "train", size=32)
    assert cropped.images.shape == full.images.shape
    assert not np.array_equal(cropped.images, full.images)


def test_class_subset_renders_the_same_images(tmp_path: Path, synth: Path) -> None:
    render_dataset(tmp_path, 2, 1, seed=0, classes=("stop", "yield"), progress=False)
    sub = load_gtsrb(tmp_path, "train")
    assert sub.class_names == ("stop", "yield") and sub.labels.tolist() == [0, 0, 1, 1]
    full = load_gtsrb(synth, "train")
    stop = SYNTHETIC_CLASSES.index("stop")
    assert np.array_equal(sub.images[0], full.images[stop * TRAIN_PER_CLASS])


def test_failed_render_keeps_the_old_dataset(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    render_dataset(tmp_path, 1, 1, classes=("stop",), progress=False)
    before = load_gtsrb(tmp_path, "train")
    calls = {"n": 0}
    real = render_mod.render_sign_roi

    def flaky(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(render_mod, "render_sign_roi", flaky)
    with pytest.raises(RuntimeError):
        render_dataset(tmp_path, 5, 1, classes=("stop", "yield"), progress=False)
    after = load_gtsrb(tmp_path, "train")
    assert after.class_names == ("stop",) and np.array_equal(after.images, before.images)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gtsrb"]  # no temp folder left


def test_write_split_adds_a_split_and_torchvision_reads_it(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 20, 24, 3), dtype=np.uint8)
    names = ("a", "b", "c")
    write_split(imgs, [2, 0, 1, 2, 0], names, tmp_path, "test")
    write_split(imgs[:3], [0, 1, 2], names, tmp_path, "train", rois=[(2, 3, 18, 19)] * 3)
    test = load_gtsrb(tmp_path, "test", size=20)
    assert test.class_names == names and test.labels.tolist() == [2, 0, 1, 2, 0]
    train = load_gtsrb(tmp_path, "train", size=16, crop_roi=True)  # the ROI is 16 x 16
    assert train.labels.tolist() == [0, 1, 2]
    assert np.array_equal(train.images[1], imgs[1, 3:19, 2:18])
    import torchvision

    tv = torchvision.datasets.GTSRB(str(tmp_path), split="test")
    assert [tv[i][1] for i in range(len(tv))] == [2, 0, 1, 2, 0]
    assert np.array_equal(np.asarray(tv[0][0]), imgs[0])
    with pytest.raises(DatasetError, match="classes.csv"):
        write_split(imgs, [0] * 5, ("x", "y"), tmp_path, "test")


def _ppm(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), rgb[..., ::-1].copy())


def _csv(path: Path, rows: list[tuple]) -> None:
    lines = [";".join(COLUMNS)] + [";".join(str(v) for v in r) for r in rows]
    path.write_text("\r\n".join(lines) + "\r\n")  # the official files use CRLF


def _official(root: Path) -> Path:
    """A miniature of the official archives: Final_Training, Final_Test, CSVs, a readme."""
    gt = root / "GTSRB"
    rng = np.random.default_rng(1)
    for cid in (0, 1, 2):
        folder = gt / "Final_Training" / "Images" / f"{cid:05d}"
        rows = []
        for i in range(2):
            h, w = 30 + i * 6, 34 + cid * 3
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            img[5:h - 5, 5:w - 5] = (10 * cid, 200, 30)  # the "sign" is inside the ROI
            name = f"00000_{i:05d}.ppm"
            _ppm(folder / name, img)
            rows.append((name, w, h, 5, 5, w - 6, h - 6, cid))
        _csv(folder / f"GT-{cid:05d}.csv", rows)
    (gt / "Readme.txt").write_text("official readme\n")
    images = gt / "Final_Test" / "Images"
    rows = []
    for i, cid in enumerate((2, 0, 1, 1)):
        _ppm(images / f"{i:05d}.ppm", rng.integers(0, 256, (40, 44, 3), dtype=np.uint8))
        rows.append((f"{i:05d}.ppm", 44, 40, 4, 4, 39, 35, cid))
    # The image archive has a label-less CSV beside the images; labels come in another zip.
    (images / "GT-final_test.test.csv").write_text(
        "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2\n00000.ppm;44;40;4;4;39;35\n")
    _csv(root / "GT-final_test.csv", rows)
    return root


def test_official_layout_is_read(tmp_path: Path) -> None:
    root = _official(tmp_path)
    train = load_gtsrb(root, "train", size=32)
    assert train.images.shape == (6, 32, 32, 3)
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert train.class_names == GTSRB_CLASS_NAMES
    roi = load_gtsrb(root / "GTSRB", "train", size=16, crop_roi=True)
    assert np.abs(roi.images[2].astype(int) - (10, 200, 30)).max() <= 1  # only the "sign"
    test = load_gtsrb(root, "test", size=32)
    assert test.labels.tolist() == [2, 0, 1, 1]
    layout = locate_gtsrb(root)
    assert layout.test_csv == root / "GT-final_test.csv" and layout.classes_csv is None


# ------------------------------------------------------------------------------ bad inputs


def _bad(root: Path, split: str = "train", needle: str | Path | None = None) -> None:
    with pytest.raises(DatasetError) as err:
        load_gtsrb(root, split)
    assert str(needle if needle is not None else root) in str(err.value)
    assert err.value.hint


def test_missing_folder_and_empty_folder(tmp_path: Path) -> None:
    _bad(tmp_path / "nope")
    _bad(tmp_path)  # exists, holds nothing
    (tmp_path / "gtsrb" / "GTSRB" / "Training").mkdir(parents=True)
    _bad(tmp_path, "train", "holds no images")
    _bad(tmp_path, "test", tmp_path / "gtsrb" / "GTSRB")


def test_missing_and_broken_csvs(tmp_path: Path) -> None:
    root = _official(tmp_path)
    folder = root / "GTSRB" / "Final_Training" / "Images" / "00001"
    gt = folder / "GT-00001.csv"
    text = gt.read_bytes()
    gt.unlink()
    _bad(root, "train", gt)
    gt.write_bytes(text.replace(b";30;", b";thirty;", 1))
    _bad(root, "train", f"{gt}:2")
    gt.write_bytes(text.replace(b"Roi.X2;", b"RoiX2;"))
    _bad(root, "train", gt)
    gt.write_bytes(text.replace(b";1\r\n", b";7\r\n", 1))  # label disagrees with its folder
    _bad(root, "train", gt)
    gt.write_bytes(text.replace(b";5;5;", b";5;500;", 1))  # ROI outside the image
    _bad(root, "train", gt)
    gt.write_bytes(text)
    load_gtsrb(root, "train")  # repaired
    (root / "GT-final_test.csv").unlink()
    _bad(root, "test", "GT-final_test.csv")


def test_unreadable_missing_stray_and_mis_sized_images(tmp_path: Path) -> None:
    root = _official(tmp_path)
    folder = root / "GTSRB" / "Final_Training" / "Images" / "00002"
    img = folder / "00000_00001.ppm"
    good = img.read_bytes()
    img.write_bytes(b"P6 not really an image")
    _bad(root, "train", img)
    img.unlink()
    _bad(root, "train", img)
    img.write_bytes(good)
    stray = folder / "extra.ppm"
    stray.write_bytes(good)
    _bad(root, "train", stray)
    stray.unlink()
    other = root / "GTSRB" / "Final_Training" / "Images" / "00000" / "00000_00000.ppm"
    _ppm(other, np.zeros((10, 10, 3), np.uint8))
    _bad(root, "train", other)
    (root / "GTSRB" / "Final_Training" / "Images" / "misc").mkdir()
    _bad(root, "train", "misc")


def test_bad_classes_csv_and_unnamed_class(tmp_path: Path) -> None:
    root = _official(tmp_path)
    classes = root / "classes.csv"
    classes.write_text("ClassId;Name\n0;a\n2;c\n")
    _bad(root, "train", classes)
    classes.write_text("ClassId;Name\n0;a\n1;b\n")  # class 2 has images but no name
    _bad(root, "train", "00002")


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_gtsrb(tmp_path, "val")
    with pytest.raises(ConfigError):
        load_gtsrb(tmp_path, "train", size=0)
