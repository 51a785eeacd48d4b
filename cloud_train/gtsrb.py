"""Read and write datasets in the GTSRB layouts.

Layouts read (``root`` may be the folder holding ``gtsrb/``, ``gtsrb/`` itself, or ``GTSRB/``):

- torchvision's (also what ``render_dataset`` writes)::

      gtsrb/GTSRB/Training/NNNNN/*.ppm + GT-NNNNN.csv
      gtsrb/GTSRB/Final_Test/Images/*.ppm
      gtsrb/GT-final_test.csv
      gtsrb/classes.csv            (optional: ClassId;Name, written by this kit)

- the official GTSRB archives: ``GTSRB/Final_Training/Images/NNNNN/`` for training, and
  ``GT-final_test.csv`` next to ``gtsrb/``, ``GTSRB/`` or the test images.

CSV files are ';' separated with the GTSRB columns
``Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId``; ROI corners are inclusive.
Training labels are the folder's ClassId; torchvision labels by sorted folder position, so the
two agree when the folders run 00000, 00001, ... without gaps (what this kit writes).
"""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from cloud_train.signs import GTSRB_CLASS_NAMES
from roadshield_base.errors import ConfigError, DatasetError

COLUMNS = ("Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId")
TEST_CSV = "GT-final_test.csv"
CLASSES_CSV = "classes.csv"
TRACK_LEN = 30  # images per "track" in file names, as in real GTSRB (names only)
_HINT = "render one with `roadshield data synth --out DIR` or unpack GTSRB there"
_BAR_MIN = 3000  # show a progress bar for loads at least this big
# Left beside GTSRB/ by `roadshield data seal` in place of the test split it encrypted.
SEALED_MARKER = "SEALED_TEST.json"


class SealedSplitError(DatasetError):
    """The split was sealed: it is read only through the sealed set, with its key."""


def sealed_marker(root: str | Path) -> Path | None:
    """The marker saying the test split under ``root`` was sealed, or None."""
    root = Path(root)
    near = [root, root / "gtsrb", root.parent if root.name in ("GTSRB", "gtsrb") else root]
    return next((d / SEALED_MARKER for d in near if (d / SEALED_MARKER).is_file()), None)


@dataclass
class LabeledImages:
    """Images with labels. images: N x S x S x 3 uint8 RGB; labels: int64 (N,) ClassIds;
    class_names[k] names ClassId k; paths[i] is the file image i came from."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    paths: list[Path]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class GtsrbLayout:
    """Where the parts of a GTSRB-layout dataset are; ``None`` for parts that are absent."""

    gtsrb: Path
    train_dir: Path | None
    test_dir: Path | None
    test_csv: Path | None
    classes_csv: Path | None


def _first(paths: Sequence[Path], want_dir: bool) -> Path | None:
    return next((p for p in paths if (p.is_dir() if want_dir else p.is_file())), None)


def locate_gtsrb(root: str | Path) -> GtsrbLayout:
    """Find the GTSRB folders under ``root``; DatasetError if there is no GTSRB/ folder."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist", _HINT)
    marks = ("Training", "Final_Training", "Final_Test")
    gt = _first([root / "gtsrb" / "GTSRB", root / "GTSRB", root / "gtsrb"], want_dir=True)
    if gt is None or not any((gt / m).is_dir() for m in marks):
        gt = root if any((root / m).is_dir() for m in marks) else None
    if gt is None:
        raise DatasetError(f"no GTSRB dataset under {root} (looked for gtsrb/GTSRB/Training, "
                           "GTSRB/Final_Training/Images and GTSRB/Final_Test/Images)", _HINT)
    base = gt.parent
    near = [base, gt, root]
    test_dir = _first([gt / "Final_Test" / "Images"], want_dir=True)
    csvs = [d / TEST_CSV for d in near] + ([test_dir / TEST_CSV] if test_dir else [])
    return GtsrbLayout(
        gtsrb=gt,
        train_dir=_first([gt / "Training", gt / "Final_Training" / "Images"], want_dir=True),
        test_dir=test_dir,
        test_csv=_first(csvs, want_dir=False),
        classes_csv=_first([d / CLASSES_CSV for d in near], want_dir=False),
    )


def read_class_names(path: Path) -> tuple[str, ...]:
    """Names from a ``ClassId;Name`` file; ids must run 0..n-1."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f, delimiter=";", skipinitialspace=True))
        pairs = sorted((int(r["ClassId"]), r["Name"].strip()) for r in rows)
    except (OSError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise DatasetError(f"cannot read class names from {path}: {e}",
                           "it must be ';' separated with columns ClassId;Name") from e
    if not pairs or [i for i, _ in pairs] != list(range(len(pairs))):
        raise DatasetError(f"{path} must list ClassIds 0..n-1 once each",
                           "fix the file or delete it to use the 43 GTSRB names")
    return tuple(n for _, n in pairs)


def _read_csv(path: Path) -> list[tuple[str, int, int, tuple[int, int, int, int], int]]:
    """Rows of a GTSRB CSV as (filename, width, height, roi, class_id); DatasetError if bad."""
    try:
        f = open(path, newline="")
    except OSError as e:
        raise DatasetError(f"cannot open {path}: {e}", _HINT) from e
    rows = []
    with f:
        reader = csv.DictReader(f, delimiter=";", skipinitialspace=True)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{path} lacks columns {missing}",
                               "use the GTSRB header " + ";".join(COLUMNS))
        for line, r in enumerate(reader, start=2):
            try:
                nums = [int(r[c]) for c in COLUMNS[1:]]
                name = r["Filename"].strip()
                if not name:
                    raise ValueError("empty Filename")
            except (TypeError, ValueError, AttributeError) as e:
                raise DatasetError(f"bad row at {path}:{line}: {e}",
                                   "every row needs a file name and 7 integers") from e
            w, h, x1, y1, x2, y2, cid = nums
            if w < 1 or h < 1 or cid < 0 or not (0 <= x1 <= x2 < w and 0 <= y1 <= y2 < h):
                raise DatasetError(f"bad row at {path}:{line}: size {w}x{h}, "
                                   f"ROI ({x1},{y1})-({x2},{y2}), ClassId {cid}",
                                   "ROI corners are inclusive and must lie inside the image")
            rows.append((name, w, h, (x1, y1, x2, y2), cid))
    return rows


def _entries(layout: GtsrbLayout, split: str) -> list[tuple[Path, tuple, int]]:
    """(path, (w, h, roi), class_id) for every image of ``split``, in torchvision's order."""
    out: list[tuple[Path, tuple, int]] = []
    if split == "train":
        if layout.train_dir is None:
            raise DatasetError(f"no training images under {layout.gtsrb} (expected Training/ or "
                               "Final_Training/Images/)", _HINT)
        for d in sorted(p for p in layout.train_dir.iterdir() if p.is_dir()):
            if not (len(d.name) == 5 and d.name.isdigit()):
                raise DatasetError(f"unexpected folder {d}", "class folders are named 00000, "
                                   "00001, ...; move other folders out of Training/")
            gt = d / f"GT-{d.name}.csv"
            if not gt.is_file():
                raise DatasetError(f"missing {gt}", "each class folder needs its GT-NNNNN.csv")
            rows = _read_csv(gt)
            listed = {r[0] for r in rows}
            stray = sorted(p.name for p in d.glob("*.ppm") if p.name not in listed)
            if stray:
                raise DatasetError(f"{d / stray[0]} is not listed in {gt}",
                                   "add a row for it or remove the file")
            for name, w, h, roi, cid in sorted(rows):
                if cid != int(d.name):
                    raise DatasetError(f"{gt} gives {name} ClassId {cid} in folder {d.name}",
                                       "a class folder holds only its own class")
                out.append((d / name, (w, h, roi), cid))
    else:
        if layout.test_dir is None:
            raise DatasetError(f"no test images under {layout.gtsrb} "
                               "(expected Final_Test/Images/)", _HINT)
        if layout.test_csv is None:
            raise DatasetError(f"missing {TEST_CSV} for {layout.test_dir}",
                               f"put the GTSRB test labels ({TEST_CSV}) in "
                               f"{layout.gtsrb.parent}")
        for name, w, h, roi, cid in _read_csv(layout.test_csv):
            out.append((layout.test_dir / name, (w, h, roi), cid))
    return out


def load_gtsrb(root: str | Path, split: str = "train", size: int = 32,
               crop_roi: bool = False, progress: bool = True) -> LabeledImages:
    """Load one split of a GTSRB-layout dataset, every image resized to size x size.

    Returns LabeledImages (images N x size x size x 3 uint8 RGB, int64 ClassIds). With
    ``crop_roi`` each image is first cut to its CSV ROI. Class names come from classes.csv
    when present, else the 43 GTSRB names. Resizing uses cv2.INTER_AREA. ``progress=False``
    hides the progress bar (shown otherwise for loads of at least 3,000 images).
    Raises DatasetError naming the path for missing folders/CSVs, bad rows, unreadable
    images or an empty split, and SealedSplitError (a DatasetError) for a test split that
    ``roadshield data seal`` sealed.
    """
    if split not in ("train", "test"):
        raise ConfigError(f"unknown split {split!r}", "use 'train' or 'test'")
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ConfigError(f"image size {size!r} is invalid", "use a positive number of pixels")
    marker = sealed_marker(root) if split == "test" else None
    if marker is not None:  # every reader of the data layer gets this refusal, eval included
        raise SealedSplitError(
            f"the test split of {root} was sealed ({marker}); it can only be read through "
            "the sealed set, with its key, once per model",
            "final evaluation: roadshield data open-sealed SEALED --key KEY --checkpoint CKPT "
            "--log-key LOG_KEY --out DIR; for everyday evaluation hold out part of train")
    layout = locate_gtsrb(root)
    names = (read_class_names(layout.classes_csv) if layout.classes_csv
             else GTSRB_CLASS_NAMES)
    entries = _entries(layout, split)
    if not entries:
        raise DatasetError(f"the {split} split under {layout.gtsrb} holds no images", _HINT)
    images = np.empty((len(entries), size, size, 3), np.uint8)
    labels = np.empty(len(entries), np.int64)
    quiet = not progress or len(entries) < _BAR_MIN
    for i, (path, (w, h, roi), cid) in enumerate(tqdm(
            entries, desc=f"load {split}", unit="img", disable=quiet)):
        if cid >= len(names):
            raise DatasetError(f"{path} has ClassId {cid} but only {len(names)} classes are named",
                               f"add the class to {CLASSES_CSV} or fix the label")
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR) if path.is_file() else None
        if bgr is None:
            raise DatasetError(f"cannot read image {path}",
                               "re-extract or re-render the dataset; the file is missing "
                               "or not an image")
        if bgr.shape[:2] != (h, w):
            raise DatasetError(f"{path} is {bgr.shape[1]}x{bgr.shape[0]} but its CSV row says "
                               f"{w}x{h}", "fix the CSV row or re-render the dataset")
        if crop_roi:
            x1, y1, x2, y2 = roi
            bgr = bgr[y1:y2 + 1, x1:x2 + 1]
        if bgr.shape[:2] != (size, size):
            bgr = cv2.resize(bgr, (size, size), interpolation=cv2.INTER_AREA)
        images[i] = bgr[..., ::-1]
        labels[i] = cid
    return LabeledImages(images, labels, tuple(names), [p for p, _, _ in entries])


# ----------------------------------------------------------------------------- writing


def resolve_base(root: str | Path) -> Path:
    """The ``gtsrb/`` folder a writer puts under ``root``."""
    return Path(root) / "gtsrb"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes, sync: bool = True) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        if sync:
            os.fsync(f.fileno())


def _sync_tree(folder: Path) -> None:
    """Make every file under ``folder`` durable before it is renamed into place.

    One os.sync() flushes thousands of small images far faster than an fsync per file
    (measured: ~1 ms each on ext4); where there is no os.sync, fsync each file.
    """
    if hasattr(os, "sync"):
        os.sync()
        return
    for p in folder.rglob("*"):
        if p.is_file():
            _fsync_path(p)


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    lines = [";".join(header)] + [";".join(str(v) for v in r) for r in rows]
    _write_bytes(path, ("\n".join(lines) + "\n").encode())


def _swap_in(new: Path, final: Path) -> None:
    """Rename ``new`` to ``final``; an existing ``final`` is moved aside first, then deleted."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(new, final)
    _fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


class SplitWriter:
    """Writes one split's images and CSVs into a ``gtsrb/`` folder (torchvision layout).

    Train: GTSRB/Training/{cid:05d}/{track:05d}_{i:05d}.ppm with GT-{cid:05d}.csv, a folder
    for every class id < n_classes (torchvision needs each to exist). Test:
    GTSRB/Final_Test/Images/{i:05d}.ppm with gtsrb/GT-final_test.csv. Files are durable
    (synced) once ``close`` returns.
    """

    def __init__(self, base: Path, split: str, n_classes: int) -> None:
        if split not in ("train", "test"):
            raise ConfigError(f"unknown split {split!r}", "use 'train' or 'test'")
        self.base, self.split, self.n_classes, self.count = Path(base), split, n_classes, 0
        self._rows: dict[int, list[tuple]] = {c: [] for c in range(n_classes)}
        if split == "train":
            self._dir = self.base / "GTSRB" / "Training"
            for c in range(n_classes):
                (self._dir / f"{c:05d}").mkdir(parents=True, exist_ok=True)
        else:
            self._dir = self.base / "GTSRB" / "Final_Test" / "Images"
            self._dir.mkdir(parents=True, exist_ok=True)

    def add(self, image_rgb: np.ndarray, label: int,
            roi: tuple[int, int, int, int] | None = None) -> Path:
        """Write one H x W x 3 uint8 RGB image; roi (x0, y0, x1, y1) exclusive, default all."""
        label = int(label)
        if not 0 <= label < self.n_classes:
            raise ConfigError(f"label {label} is outside 0..{self.n_classes - 1}",
                              "give one class name per label")
        img = np.asarray(image_rgb)
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ConfigError(f"image has shape {img.shape} and dtype {img.dtype}",
                              "pass H x W x 3 uint8 RGB images")
        h, w = img.shape[:2]
        x0, y0, x1, y1 = roi if roi is not None else (0, 0, w, h)
        if self.split == "train":
            k = len(self._rows[label])
            name = f"{k // TRACK_LEN:05d}_{k % TRACK_LEN:05d}.ppm"
            path = self._dir / f"{label:05d}" / name
        else:
            name = f"{self.count:05d}.ppm"
            path = self._dir / name
        ok, buf = cv2.imencode(".ppm", np.ascontiguousarray(img[..., ::-1]))
        if not ok:
            raise DatasetError(f"cannot encode {path}", "check the image array")
        _write_bytes(path, buf.tobytes(), sync=False)  # the whole folder is synced on close
        self._rows[label].append((name, w, h, x0, y0, x1 - 1, y1 - 1, label))
        self.count += 1
        return path

    def close(self) -> None:
        """Write the CSVs and make every file durable (call once all images are added)."""
        if self.split == "train":
            for c, rows in self._rows.items():
                _write_csv(self._dir / f"{c:05d}" / f"GT-{c:05d}.csv", COLUMNS, rows)
        else:
            rows = sorted((r for rs in self._rows.values() for r in rs), key=lambda r: r[0])
            _write_csv(self.base / TEST_CSV, COLUMNS, rows)
        _sync_tree(self._dir)


def _fresh_dir(parent: Path, prefix: str) -> Path:
    """A new, uniquely named folder in ``parent`` (mode from the umask, unlike mkdtemp's 0700)."""
    path = parent / f"{prefix}{uuid.uuid4().hex[:12]}"
    path.mkdir()
    return path


def _write_classes(path: Path, class_names: Sequence[str]) -> None:
    _write_csv(path, ("ClassId", "Name"), list(enumerate(class_names)))


@contextlib.contextmanager
def staged_dataset(root: str | Path, class_names: Sequence[str]) -> Iterator[Path]:
    """Yield a temporary ``gtsrb/`` folder beside ``root/gtsrb``; on success write classes.csv
    and rename it into place (replacing an old one), on error delete it."""
    final = resolve_base(root)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_dir(final.parent, ".gtsrb.tmp-")
    try:
        yield tmp
        _write_classes(tmp / CLASSES_CSV, class_names)
        _swap_in(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_split(images_rgb: np.ndarray | Sequence[np.ndarray], labels: Sequence[int] | np.ndarray,
                class_names: Sequence[str], root: str | Path, split: str,
                rois: Sequence[tuple[int, int, int, int]] | None = None) -> Path:
    """Write images (each H x W x 3 uint8 RGB) as the ``split`` of ``root/gtsrb``.

    The other split of an existing dataset is kept; its classes.csv must match
    ``class_names`` (DatasetError otherwise). The split is staged in a temporary folder and
    renamed into place. rois: per-image (x0, y0, x1, y1) exclusive boxes, default the
    whole image. Returns the ``gtsrb/`` folder.
    """
    labels = [int(v) for v in labels]
    if len(labels) != len(images_rgb):
        raise ConfigError(f"{len(images_rgb)} images but {len(labels)} labels",
                          "give one label per image")
    if rois is not None and len(rois) != len(labels):
        raise ConfigError(f"{len(rois)} ROIs for {len(labels)} images", "give one ROI per image")
    names = tuple(class_names)

    def fill(base: Path) -> None:
        w = SplitWriter(base, split, len(names))
        for i, (img, lab) in enumerate(zip(images_rgb, labels, strict=True)):
            w.add(img, lab, None if rois is None else rois[i])
        w.close()

    final = resolve_base(root)
    if not final.exists():
        with staged_dataset(root, names) as stage:
            fill(stage)
        return final
    classes = final / CLASSES_CSV
    if classes.is_file() and read_class_names(classes) != names:
        raise DatasetError(f"{classes} names other classes than the ones being written",
                           "write into an empty folder or use the same class names")
    stage = _fresh_dir(final, f".{split}.tmp-")
    try:
        fill(stage)
        if not classes.is_file():
            _write_classes(stage / CLASSES_CSV, names)
            _swap_in(stage / CLASSES_CSV, classes)
        (final / "GTSRB").mkdir(exist_ok=True)
        if split == "train":
            _swap_in(stage / "GTSRB" / "Training", final / "GTSRB" / "Training")
        else:
            _swap_in(stage / "GTSRB" / "Final_Test", final / "GTSRB" / "Final_Test")
            _swap_in(stage / TEST_CSV, final / TEST_CSV)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return final
