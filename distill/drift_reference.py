"""The drift monitor's reference, built at export time from a clean stream.

``build_drift_reference`` runs the model the way the device will (the edge loop's locator
and preprocessing, and the input detectors when the model carries them) over a trusted,
clean stream (a recorded drive, a folder of frames, the synthetic camera) and
feeds every frame and crop to ``edge_runtime.drift.ReferenceBuilder``; ``write_drift_reference``
stores the reference's JSON in the ONNX model's ``metadata_props`` under
``drift_reference``, where ``edge run --drift`` reads it. ``crop_scorer`` is the model part
of that run, for anything else that must feed a monitor what the device computes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from distill.export import write_metadata
from distill.stream import stream_crops
from edge_runtime.drift import REFERENCE_KEY, DriftConfig, DriftReference, ReferenceBuilder
from roadshield_base.errors import ConfigError


def frames_needed(config: DriftConfig) -> int:
    """The fewest frames a reference takes: each calibration fold must hold whole windows."""
    window = max(config.frame_window, config.dark_window)
    return config.calibration_folds * (window + config.check_every)


#: score(batch) -> (softmax probabilities (N, C), {detector name: (N,) scores})
Scorer = Callable[[np.ndarray], tuple[np.ndarray, dict[str, np.ndarray]]]


@contextmanager
def crop_scorer(model: str | os.PathLike[str], detect: bool = True) -> Iterator[Scorer]:
    """A scorer of crop batches on one ONNX Runtime session of ``model``, as the device runs
    it: with ``detect`` and detectors fitted into the model's metadata, their scores come
    from the same call (an empty dict otherwise)."""
    from edge_runtime.detectors import METADATA_KEY as DETECTORS_KEY
    from edge_runtime.detectors import detectors_from_metadata
    from edge_runtime.loop import softmax
    from edge_runtime.model_info import read_model_info
    from edge_runtime.runners.onnxruntime_runner import OnnxRuntimeRunner

    info = read_model_info(model)
    names: list[str] = []
    if detect and DETECTORS_KEY in info.metadata:
        fitted = json.loads(info.metadata[DETECTORS_KEY])
        names = [name for name, section in (("squeeze", "feature_squeezing"),
                                            ("mahalanobis", "mahalanobis")) if section in fitted]
    detectors = detectors_from_metadata(info.metadata, info.features_name, names)
    with OnnxRuntimeRunner(model) as runner:
        def score(batch: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
            if detectors:
                logits, scores = detectors.infer(runner, batch, info.input_name,
                                                 info.output_name)
                return softmax(logits), scores
            return softmax(runner.infer({info.input_name: batch})[info.output_name]), {}

        yield score


def build_drift_reference(model: str | os.PathLike[str], source: str, *,
                          config: DriftConfig | None = None, detect: bool = True,
                          max_frames: int | None = None, progress: bool = True
                          ) -> DriftReference:
    """Run ``model`` over the clean stream ``source`` and build the drift reference.

    detect: also record the scores of the detectors fitted into the model (when it carries
    any), so the device watches their distribution too. ConfigError, before any frame is
    read, when ``max_frames`` is below ``frames_needed(config)``, and after the stream when
    it gave fewer frames.
    """
    from edge_runtime.model_info import read_model_info

    config = config or DriftConfig()
    need = frames_needed(config)
    if max_frames is not None and max_frames < need:
        raise ConfigError(f"a drift reference needs >= {need} frames, max_frames is "
                          f"{max_frames}", f"allow {need} frames or more (several drives' "
                          "worth is better)")
    builder = ReferenceBuilder(config.brightness_stride)
    with crop_scorer(model, detect) as score:
        for frame, batch in stream_crops(model, source, max_frames=max_frames,
                                         progress=progress, desc="drift reference"):
            builder.observe_frame(frame.image)
            if batch is None:
                continue
            probs, scores = score(batch)
            builder.observe_crops(batch, probs, scores or None)
    if builder.frames < need:
        raise ConfigError(f"the reference stream {source} gave {builder.frames} frames; a "
                          f"drift reference needs >= {need}", "record a longer clean drive")
    return builder.build(len(read_model_info(model).class_names), config)


def write_drift_reference(model: str | os.PathLike[str], reference: DriftReference) -> Path:
    """Store ``reference`` in the model's metadata (checked by a round trip first)."""
    text = reference.to_json()
    DriftReference.from_json(text)
    return write_metadata(model, REFERENCE_KEY, text)
