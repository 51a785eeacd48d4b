"""The crops a model would see on the device, taken from a trusted clean stream.

Thresholds and references fitted on a dataset's images miss what the camera adds (the
locator's boxes, the scene's light, blur and noise), so the device would flag or alarm on a
clean road. ``stream_crops`` runs the edge loop's own locator and preprocessing over a clean
stream (a recorded drive, a folder of frames, the synthetic camera) and yields each frame
with the model-input batch of its located signs. An optional ``transform`` changes each
camera frame first (the red team's weather and exposure changes), so the locator and the
crops see the changed frame as the device would.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator

import numpy as np

from edge_runtime.frames import Frame


def crop_cutter(model: str | os.PathLike[str], max_rois: int = 3
                ) -> Callable[[np.ndarray], np.ndarray | None]:
    """image (H x W x 3 uint8 BGR) -> float32 (N, 3, S, S) model-input crops of its located
    signs, or None when none was located: the edge loop's HSV locator and preprocessing."""
    from edge_runtime.locate import create_locator
    from edge_runtime.model_info import read_model_info
    from edge_runtime.preprocess import preprocess_batch

    size = read_model_info(model).input_size
    locator = create_locator("hsv")

    def cut(image: np.ndarray) -> np.ndarray | None:
        boxes = [c.box for c in locator(image)[:max_rois]]
        return preprocess_batch(image, boxes, size) if boxes else None
    return cut


def stream_crops(model: str | os.PathLike[str], source: str, *, max_frames: int | None = None,
                 max_rois: int = 3, progress: bool = True, desc: str = "clean stream",
                 transform: Callable[[int, np.ndarray], np.ndarray] | None = None
                 ) -> Iterator[tuple[Frame, np.ndarray | None]]:
    """(frame, float32 (N, 3, S, S) crops or None when no sign was located) per frame of
    ``source``, cut exactly as ``edge run`` cuts them for ``model`` (any scheme the
    ``roadshield.sources`` entry points install, ``synthetic://`` among them).

    transform: (frame index, H x W x 3 uint8 BGR image) -> image of the same kind, applied
    to each frame before the locator; the yielded frame carries the transformed image."""
    from tqdm import tqdm  # type: ignore[import-untyped]

    from edge_runtime.sources import open_source

    cut = crop_cutter(model, max_rois)
    src = open_source(source)
    try:
        total = getattr(src, "frame_count", None)
        with tqdm(total=min(total or max_frames or 0, max_frames or total or 0) or None,
                  disable=not progress, unit="frame", desc=desc) as bar:
            for count, frame in enumerate(src):
                if max_frames is not None and count >= max_frames:
                    return
                if transform is not None:
                    frame = dataclasses.replace(frame, image=transform(frame.index, frame.image))
                yield frame, cut(frame.image)
                bar.update(1)
    finally:
        src.close()


def clean_crops(model: str | os.PathLike[str], source: str, *, max_frames: int | None = None,
                progress: bool = True) -> np.ndarray:
    """Every crop of ``stream_crops``, stacked: float32 (N, 3, S, S)."""
    parts = [b for _, b in stream_crops(model, source, max_frames=max_frames,
                                        progress=progress) if b is not None]
    if not parts:
        from roadshield_base.errors import ConfigError

        raise ConfigError(f"the stream {source} located no sign",
                          "use a clean drive past signs, e.g. synthetic://?frames=2000")
    return np.concatenate(parts)
