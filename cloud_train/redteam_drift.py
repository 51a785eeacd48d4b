"""Drift scenario rows of ``roadshield redteam inference``: does the drift monitor
(``edge_runtime.drift``) alarm when the road changes, and how often does it alarm on a
clean one?

Every stream is the synthetic camera seen as the device sees it: the edge loop's locator and
preprocessing (``distill.stream.stream_crops``) and the ONNX model with the input detectors
fitted into it (``distill.drift_reference.crop_scorer``). Each frame goes to
``DriftMonitor.observe_frame``, its crops with their softmax and detector scores to
``observe_crops``, and ``poll`` collects the alarms switched on ("on" events). Seeds follow
from ``seed``: base = 1000 (seed + 1).

1. Reference: ``build_drift_reference`` on a clean drive (seed base, no sticker) of
   ``reference_frames`` frames, at least ``frames_needed(config)``: 4 x (1200 + 15) = 4,860
   for the default ``DriftConfig``.
2. False alarms: ``clean_frames`` frames of other clean drives (seeds base + 2, base + 3,
   ..., at most ``CLEAN_DRIVE_FRAMES`` each, a fresh monitor per drive); every "on" event
   is a false alarm, reported as a count, per 10,000 frames and by statistic. A monitor
   tests nothing before its windows fill, so a drive's first ``frame_window`` frames count
   as clean frames without any chance to alarm.
3. Scenarios: one drive (seed base + 1) of ``scenario_frames`` frames per scenario, clean
   before frame ``onset``, changed from it on:

   - ``control``: no change (what the scenario drive does unchanged: an alarm here is a
     false alarm, and a scenario alarming no sooner than it proves nothing);
   - ``brightness_gain``: every pixel times a gain ramping linearly from 1 to 1.15;
   - ``brightness_lift``: + up to 15 % of full scale (38 grey levels, Albumentations'
     brightness_by_max convention);
   - ``fog``: a Gaussian blur (sigma up to 2 px) blended toward grey 200 (share up to 0.35);
   - ``sticker_campaign``: the red team's printed sticker (``sticker_dir``) on 30 % of the
     signs of its class;
   - ``random_stickers``: the synthetic camera's random stickers on 30 % of all signs;
   - ``one_class``: a road with stop signs only.

   Frame changes act on the camera frame (uint8 BGR, rounded and clipped) before the
   locator cuts the crops; their strength ramps linearly over ``RAMP_FRAMES`` frames from
   the onset, then holds. The sticker scenarios and the one-class road splice two renders of
   the same seed: the clean drive before the onset, then the drive rendered with the
   camera's options (``sticker=...&sticker_rate=0.3``, ``sticker_rate=0.3``,
   ``classes=stop``) from frame ``onset`` on (its earlier frames are read and dropped), so
   the road changes at the onset (mid-encounter when one is under way).

   Per scenario: ``alarmed`` (an "on" event at or after the onset), ``frames_to_alarm``
   (the first such event's frame minus the onset), ``first_statistics`` (every statistic
   switched on at that frame) and ``false_alarm_before_onset``. A window must fill before
   its first test, so when ``onset`` < ``frame_window`` (or the crop window fills after the
   onset) ``frames_to_alarm`` includes that wait.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import numpy as np

from distill.drift_reference import Scorer, build_drift_reference, crop_scorer
from distill.stream import stream_crops
from edge_runtime.drift import DriftConfig, DriftEvent, DriftMonitor, DriftReference
from edge_runtime.frames import Frame
from roadshield_base.errors import ConfigError

RAMP_FRAMES = 150
GAIN = 1.15
LIFT = round(0.15 * 255)  # 38 grey levels
FOG_GREY, FOG_SHARE, FOG_SIGMA = 200.0, 0.35, 2.0
STICKER_RATE = 0.3
ONE_CLASS = "stop"
CLEAN_DRIVE_FRAMES = 5000

#: change(strength in (0, 1], H x W x 3 uint8 BGR frame) -> the changed frame
Change = Callable[[float, np.ndarray], np.ndarray]
Stream = Iterable[tuple[Frame, np.ndarray | None]]


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def gain(factor: float) -> Change:
    """Multiplicative brightness: x (1 + strength (factor - 1))."""
    return lambda t, img: _to_uint8(img.astype(np.float32) * (1 + t * (factor - 1)))


def lift(levels: float) -> Change:
    """Additive brightness: + strength * levels grey levels."""
    return lambda t, img: _to_uint8(img.astype(np.float32) + t * levels)


def fog(grey: float = FOG_GREY, share: float = FOG_SHARE, sigma: float = FOG_SIGMA) -> Change:
    """A Gaussian blur of sigma strength * sigma, then a blend toward ``grey``."""
    import cv2

    def change(t: float, img: np.ndarray) -> np.ndarray:
        blurred = cv2.GaussianBlur(img, (0, 0), t * sigma).astype(np.float32)
        return _to_uint8(blurred * (1 - t * share) + grey * t * share)
    return change


@dataclass(frozen=True)
class Scenario:
    """A change of the road from the onset on: a frame ``change`` (ramped) and / or other
    synthetic-camera ``options`` (the drive re-rendered with them)."""

    name: str
    description: str
    change: Change | None = None
    options: tuple[tuple[str, str], ...] = ()


def default_scenarios(sticker_dir: str | os.PathLike[str]) -> tuple[Scenario, ...]:
    """The red team's scenarios, the unchanged control first (module docstring)."""
    ramp = f"ramped over {RAMP_FRAMES} frames"
    return (
        Scenario("control", "no change"),
        Scenario("brightness_gain", f"frame x{GAIN:g}, {ramp}", gain(GAIN)),
        Scenario("brightness_lift", f"frame +{LIFT} grey levels (15 % of full scale), {ramp}",
                 lift(LIFT)),
        Scenario("fog", f"blur sigma {FOG_SIGMA:g} px and {100 * FOG_SHARE:g} % blend toward "
                 f"grey {FOG_GREY:g}, {ramp}", fog()),
        Scenario("sticker_campaign", f"printed sticker '{Path(sticker_dir).name}' on "
                 f"{100 * STICKER_RATE:g} % of the signs of its class",
                 options=(("sticker", str(sticker_dir)), ("sticker_rate", str(STICKER_RATE)))),
        Scenario("random_stickers", f"random stickers on {100 * STICKER_RATE:g} % of all signs",
                 options=(("sticker_rate", str(STICKER_RATE)),)),
        Scenario("one_class", f"only {ONE_CLASS} signs", options=(("classes", ONE_CLASS),)))


def synthetic_uri(seed: int, frames: int, options: Sequence[tuple[str, str]] = ()) -> str:
    """A synthetic drive; clean (sticker_rate 0) unless ``options`` say otherwise."""
    query = {"seed": str(seed), "frames": str(frames), "sticker_rate": "0", **dict(options)}
    return "synthetic://?" + urlencode(query)


def ramped(change: Change, onset: int) -> Callable[[int, np.ndarray], np.ndarray]:
    """A ``stream_crops`` transform: frames before ``onset`` as they are, then ``change``
    at a strength rising linearly to 1 over ``RAMP_FRAMES`` frames."""
    def transform(index: int, image: np.ndarray) -> np.ndarray:
        if index < onset:
            return image
        return change(min(1.0, (index - onset + 1) / RAMP_FRAMES), image)
    return transform


def scenario_stream(model: str | os.PathLike[str], scenario: Scenario, seed: int,
                    frames: int, onset: int, progress: bool = True) -> Stream:
    """The scenario's (frame, crops) stream (module docstring, 3)."""
    transform = ramped(scenario.change, onset) if scenario.change else None
    desc = f"drift: {scenario.name}"
    if not scenario.options:
        return stream_crops(model, synthetic_uri(seed, frames), transform=transform,
                            progress=progress, desc=desc)
    after = islice(stream_crops(model, synthetic_uri(seed, frames, scenario.options),
                                transform=transform, progress=progress, desc=desc), onset, None)
    if onset == 0:
        return after
    return chain(stream_crops(model, synthetic_uri(seed, onset), progress=progress,
                              desc=f"{desc} (clean)"), after)


def watch(reference: DriftReference, score: Scorer, stream: Stream
          ) -> tuple[int, list[DriftEvent]]:
    """A fresh monitor over ``stream``: (frames seen, alarms switched on, oldest first)."""
    monitor = DriftMonitor(reference)
    frames, on = 0, []
    for frame, batch in stream:
        monitor.observe_frame(frame.index, frame.image)
        if batch is not None:
            probs, scores = score(batch)
            monitor.observe_crops(frame.index, batch, probs, scores)
        on += [e for e in monitor.poll() if e.state == "on"]
        frames += 1
    return frames, on


def scenario_row(scenario: Scenario, onset: int, frames: int, on: Sequence[DriftEvent]
                 ) -> dict[str, Any]:
    """One scenario's figures from its "on" events (module docstring, 3)."""
    after = [e for e in on if e.frame >= onset]
    first = min((e.frame for e in after), default=None)
    return {"name": scenario.name, "description": scenario.description, "onset": onset,
            "frames": frames, "alarmed": first is not None,
            "frames_to_alarm": None if first is None else first - onset,
            "first_statistics": sorted({e.statistic for e in after if e.frame == first}),
            "false_alarm_before_onset": any(e.frame < onset for e in on)}


def _drives(total: int) -> Iterator[int]:
    """Lengths of the clean drives that make up ``total`` frames."""
    while total > 0:
        yield min(total, CLEAN_DRIVE_FRAMES)
        total -= CLEAN_DRIVE_FRAMES


def _check_sizes(clean_frames: int, scenario_frames: int, onset: int) -> None:
    if clean_frames < 1 or scenario_frames < 1:
        raise ConfigError(f"drift scenarios need frames: clean_frames={clean_frames}, "
                          f"scenario_frames={scenario_frames}", "pass whole numbers >= 1")
    if not 0 <= onset < scenario_frames:
        raise ConfigError(f"drift onset {onset} is outside the {scenario_frames}-frame "
                          "scenario", "pass 0 <= onset < scenario_frames")


def drift_scenarios(model_onnx: str | os.PathLike[str], *, seed: int, reference_frames: int,
                    clean_frames: int, scenario_frames: int, onset: int,
                    sticker_dir: str | os.PathLike[str], config: DriftConfig | None = None,
                    progress: bool = True, scenarios: Sequence[Scenario] | None = None
                    ) -> dict[str, Any]:
    """The drift rows (module docstring): reference, false alarms and scenarios, JSON-able.

    config: the reference's (None: the monitor's defaults); scenarios: None for
    ``default_scenarios(sticker_dir)``.
    """
    from edge_runtime.sources import open_source

    _check_sizes(clean_frames, scenario_frames, onset)
    t0 = time.perf_counter()
    base = 1000 * (seed + 1)
    todo = tuple(scenarios) if scenarios is not None else default_scenarios(sticker_dir)
    for sc in todo:  # a bad sticker folder fails here, not after the reference
        open_source(synthetic_uri(base + 1, scenario_frames, sc.options)).close()
    source = synthetic_uri(base, reference_frames)
    reference = build_drift_reference(model_onnx, source, config=config,
                                      max_frames=reference_frames, progress=progress)
    with crop_scorer(model_onnx) as score:
        seen, false_on, seeds = 0, list[DriftEvent](), list[int]()
        for k, n in enumerate(_drives(clean_frames)):
            seeds.append(base + 2 + k)
            frames, on = watch(reference, score, stream_crops(
                model_onnx, synthetic_uri(seeds[-1], n), progress=progress,
                desc=f"drift: clean drive {k + 1}"))
            seen, false_on = seen + frames, false_on + on
        rows = []
        for sc in todo:
            frames, on = watch(reference, score, scenario_stream(
                model_onnx, sc, base + 1, scenario_frames, onset, progress))
            rows.append(scenario_row(sc, onset, frames, on))
    return {
        "reference": {"frames": reference.frames, "crops": reference.crops, "seed": base,
                      "source": source},
        "config": asdict(reference.config),
        "false_alarms": {"frames": seen, "alarms": len(false_on),
                         "per_10k": 1e4 * len(false_on) / seen if seen else None,
                         "statistics": dict(sorted(Counter(e.statistic
                                                           for e in false_on).items())),
                         "seeds": seeds},
        "scenarios": rows, "seconds": round(time.perf_counter() - t0, 2)}
