"""``synthetic://`` camera: a drive past road signs, rendered on the fly with ground truth.

URI: ``synthetic://?seed=0&frames=120&sticker_rate=0.3&width=640&height=480&fps=15
&classes=stop,yield&sticker=PATH&max_frames=N`` (every key optional).

The stream is a sequence of encounters. Each starts with about a second of empty road, then
one sign approaches for 8-20 frames, growing from ~24 px to ~120 px (its size follows
1 / distance at constant speed) and moving out from the vanishing point. Each encounter
picks a class from ``classes`` and, with probability ``sticker_rate``, puts a sticker on the
sign (a random one from ``make_sticker``, or the PNG given by ``sticker``). Everything
follows from ``seed``: iterating again gives the same frames, byte for byte.

``sticker=PATH`` takes two kinds of sticker:

- a print folder from ``cloud_train.sticker.printout.write_sticker``: PATH is the folder,
  its ``sticker.json`` or the PNG that json names (a PNG with a ``sticker.json`` beside it
  is read as part of that folder, and must be the PNG it names). Only encounters of the
  json's ``sign`` class carry it (each with probability ``sticker_rate``), stuck exactly
  where the json places it, so it moves and turns with the sign; every other class stays
  clean.
- any other image (a PNG with alpha, or opaque): stuck on signs of every class at a
  random place on the face, covering 10-25% of the plate.

A frame's ``truth.stickered`` is True only when a sticker was drawn on its sign.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from cloud_train.scenes import (
    camera_finish,
    load_sticker,
    make_sticker,
    place_sign,
    scene_background,
    scene_lut,
)
from cloud_train.signs import SYNTHETIC_CLASSES
from cloud_train.sticker.placement import STICKER_JSON, PlacedSticker, load_placed_sticker
from edge_runtime.frames import Frame, FrameSource, SignTruth, register_source
from roadshield_base.errors import CameraError, RoadshieldError

_KEYS = ("seed", "frames", "sticker_rate", "width", "height", "fps", "classes", "sticker",
         "max_frames")


@dataclass(frozen=True)
class Encounter:
    """One sign passed on the drive: ``gap`` empty frames, then ``length`` frames of it."""

    class_index: int
    gap: int
    length: int
    start_px: float
    end_px: float
    stickered: bool


class SyntheticCamera(FrameSource):
    """A FrameSource of rendered road frames (H x W x 3 uint8 BGR) with SignTruth attached.

    Frame.truth is None on empty-road frames; Frame.timestamp is index / fps seconds.
    """

    def __init__(self, uri: str = "synthetic://") -> None:
        self.uri = uri
        parts = urlsplit(uri)
        if parts.scheme != "synthetic" or parts.netloc or parts.path not in ("", "/"):
            raise CameraError(f"'{uri}' is not a synthetic camera URI",
                              "write it as synthetic://?seed=0&frames=120")
        try:
            query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
        except ValueError as e:
            raise CameraError(f"cannot parse the query of '{uri}': {e}",
                              "write key=value pairs joined by '&'") from e
        for key, values in query.items():
            if key not in _KEYS:
                raise CameraError(f"unknown option '{key}' in '{uri}'",
                                  "options: " + ", ".join(_KEYS))
            if len(values) != 1:
                raise CameraError(f"option '{key}' is given {len(values)} times in '{uri}'",
                                  "give each option once")
        q = {k: v[0] for k, v in query.items()}
        self.seed = self._number(q, "seed", int, 0, lo=0)
        frames = self._number(q, "frames", int, 120, lo=1)
        max_frames = self._number(q, "max_frames", int, 0, lo=0)
        self.frames = min(frames, max_frames) if max_frames else frames
        self.sticker_rate = self._number(q, "sticker_rate", float, 0.3, lo=0, hi=1)
        self.width = self._number(q, "width", int, 640, lo=64, hi=8192)
        self.height = self._number(q, "height", int, 480, lo=48, hi=8192)
        self.fps = self._number(q, "fps", float, 15.0, lo=1e-3, hi=1000)
        names = [c.strip() for c in q.get("classes", "").split(",") if c.strip()]
        bad = [c for c in names if c not in SYNTHETIC_CLASSES]
        if bad:
            raise CameraError(f"unknown sign classes {bad} in '{uri}'",
                              "choose from: " + ", ".join(SYNTHETIC_CLASSES))
        self.classes = tuple(SYNTHETIC_CLASSES.index(c) for c in names) or tuple(
            range(len(SYNTHETIC_CLASSES)))
        self._sticker: np.ndarray | None = None
        self._placed: PlacedSticker | None = None
        if q.get("sticker"):
            try:
                self._load_sticker(q["sticker"])
            except RoadshieldError as e:
                raise CameraError(f"sticker in '{uri}': {e.args[0]}", e.hint) from e
        self._max_px = float(min(120.0, self.height * 0.3, self.width * 0.22))
        self._closed = False

    def _number(self, q: dict[str, str], key: str, kind: type, default: float,
                lo: float | None = None, hi: float | None = None) -> Any:
        """q[key] parsed as ``kind`` within [lo, hi], or ``default``; CameraError if bad."""
        if key not in q:
            return default
        try:
            value = kind(q[key])
        except ValueError:
            value = None
        if value is None or (lo is not None and value < lo) or (hi is not None and value > hi) \
                or value != value:
            rng = f"{lo if lo is not None else '-inf'}..{hi if hi is not None else 'inf'}"
            raise CameraError(f"bad value {key}={q[key]!r} in '{self.uri}'",
                              f"{key} takes a {kind.__name__} in {rng}")
        return value

    def _load_sticker(self, path: str) -> None:
        """A placed sticker when a sticker.json goes with ``path``, else a plain image."""
        p = Path(path)
        if p.is_dir() or p.suffix.lower() == ".json" or (p.parent / STICKER_JSON).is_file():
            self._placed = load_placed_sticker(p)
            return
        sticker = load_sticker(p)
        if not (sticker[..., 3] > 0).any():
            raise CameraError(f"sticker image {p} is fully transparent",
                              "give an image with the sticker's pixels at alpha 255")
        self._sticker = sticker

    @property
    def frame_count(self) -> int:
        """Frames one iteration yields."""
        return self.frames

    def encounters(self) -> Iterator[Encounter]:
        """The drive's plan, encounter after encounter (endless; the same for a seed)."""
        rng = np.random.default_rng((self.seed, 0))
        hi = self._max_px
        lo = min(24.0, hi / 3)
        while True:
            cls = int(self.classes[int(rng.integers(0, len(self.classes)))])
            gap = int(rng.integers(12, 25))  # 0.8-1.6 s of empty road at 15 fps
            length = int(rng.integers(8, 21))
            start_px = float(lo * rng.uniform(0.9, 1.15))
            end_px = float(hi * rng.uniform(0.85, 1.0))
            hit = bool(rng.random() < self.sticker_rate)
            # A placed sticker belongs to one sign class; the draw happens regardless, so
            # the plan is the same with or without it.
            if self._placed is not None and cls != self._placed.class_index:
                hit = False
            yield Encounter(cls, gap, length, start_px, end_px, hit)

    def __iter__(self) -> Iterator[Frame]:
        if self._closed:
            raise CameraError(f"camera source '{self.uri}' is closed", "open it again")
        index = 0
        for e_idx, enc in enumerate(self.encounters()):
            bg, layout = scene_background(np.random.default_rng((self.seed, 1, e_idx)),
                                          self.width, self.height)
            lut = scene_lut(np.random.default_rng((self.seed, 4, e_idx)))
            sticker, placed = None, None
            if enc.stickered and self._placed is not None:
                placed = self._placed
            elif enc.stickered:
                sticker = self._sticker if self._sticker is not None else make_sticker(
                    np.random.default_rng((self.seed, 2, e_idx)))
            pose_seed = int(np.random.default_rng((self.seed, 5, e_idx)).integers(0, 2**62))
            name = SYNTHETIC_CLASSES[enc.class_index]
            for k in range(enc.gap + enc.length):
                if index >= self.frames or self._closed:
                    return
                frame = bg.copy()
                truth = None
                if k >= enc.gap:
                    t = (k - enc.gap) / max(1, enc.length - 1)
                    px = 1.0 / ((1 - t) / enc.start_px + t / enc.end_px)  # 1/size is linear in t
                    # The same placement rng each frame keeps the sticker where it was stuck.
                    box, _ = place_sign(frame, layout, enc.class_index, px, pose_seed, sticker,
                                        np.random.default_rng((self.seed, 3, e_idx)),
                                        placed=placed)
                    truth = SignTruth(name, box, stickered=enc.stickered)
                image = camera_finish(frame, lut, np.random.default_rng((self.seed, 6, index)))
                yield Frame(image=image, index=index, timestamp=index / self.fps, truth=truth)
                index += 1

    def close(self) -> None:
        self._closed = True


def register() -> None:
    """Make ``synthetic://`` URIs open a SyntheticCamera (edge_runtime's source registry)."""
    register_source("synthetic", SyntheticCamera)
