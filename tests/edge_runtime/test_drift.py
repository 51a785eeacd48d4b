"""Drift monitor: the tests against scipy, the reference format, calibration and hysteresis."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from scipy import stats  # the reference implementation; declared in the dev extra

from edge_runtime.drift import (
    CROP_STATISTICS,
    FRAME_BRIGHTNESS,
    FRAME_DARK,
    FRAME_STATISTICS,
    PREDICTED_CLASS,
    DriftConfig,
    DriftEvent,
    DriftMonitor,
    DriftReference,
    ReferenceBuilder,
    crop_statistics,
    frame_brightness,
    frame_statistics,
    kolmogorov_sf,
    ks_2samp,
    ks_critical,
    ks_pvalue,
    ks_to_sketch,
    psi,
    sketch,
    wasserstein_1d,
    wasserstein_to_sketch,
)
from roadshield_base.errors import ConfigError

NUM_CLASSES = 4
SMALL = DriftConfig(frame_window=40, dark_window=20, crop_window=30, check_every=5, on_after=2,
                    off_after=3)


def gray(level: float) -> np.ndarray:
    """A tiny uint8 BGR frame whose brightness is round(level * 255) / 255 exactly."""
    return np.full((4, 4, 3), int(round(level * 255)), dtype=np.uint8)


def crops(rng: np.random.Generator, n: int, shift: float = 0.0
          ) -> tuple[np.ndarray, np.ndarray]:
    batch = np.clip(rng.uniform(0.2, 0.7, size=(n, 3, 1, 1)) + shift
                    + rng.normal(0, 0.05, size=(n, 3, 2, 2)), 0, 1).astype(np.float32)
    probs = rng.dirichlet(np.ones(NUM_CLASSES) * 0.5, size=n).astype(np.float32)
    return batch, probs


def feed(target: Any, rng: np.random.Generator, frames: int, shift: float = 0.0,
         start: int = 0) -> None:
    """i.i.d. frames (brightness uniform in [0.3, 0.6] + shift) with 0-2 crops each."""
    monitor = isinstance(target, DriftMonitor)
    for i in range(start, start + frames):
        image = gray(min(1.0, rng.uniform(0.3, 0.6) + shift))
        n = int(rng.integers(0, 3))
        batch, probs = crops(rng, n, shift)
        if monitor:
            target.observe_frame(i, image)
            target.observe_crops(i, batch, probs)
        else:
            target.observe_frame(image)
            target.observe_crops(batch, probs)


@pytest.fixture(scope="module")
def reference() -> DriftReference:
    builder = ReferenceBuilder(brightness_stride=SMALL.brightness_stride)
    feed(builder, np.random.default_rng(0), 2000)
    return builder.build(NUM_CLASSES, SMALL)


# -- the tests against scipy ---------------------------------------------------------------
@pytest.mark.parametrize("n,m,shift,seed", [(30, 40, 0.0, 0), (200, 150, 0.3, 1),
                                            (1000, 900, 0.05, 2), (25, 2000, 0.8, 3)])
def test_ks_matches_scipy(n: int, m: int, shift: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=n), rng.normal(shift, 1.0, size=m)
    d, p = ks_2samp(a, b)
    ref = stats.ks_2samp(a, b, method="asymp")
    assert d == pytest.approx(ref.statistic, abs=1e-12)
    # scipy's 'asymp' is the exact one-sample law at round(n_e); Stephens' form is close
    assert p == pytest.approx(ref.pvalue, abs=0.01)
    en = n * m / (n + m)
    lam = (math.sqrt(en) + 0.12 + 0.11 / math.sqrt(en)) * d
    assert p == pytest.approx(stats.kstwobign.sf(lam), rel=1e-9, abs=1e-15)


def test_ks_with_ties_matches_scipy() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.integers(0, 5, 80).astype(float), rng.integers(1, 6, 60).astype(float)
    assert ks_2samp(a, b)[0] == pytest.approx(stats.ks_2samp(a, b).statistic, abs=1e-12)


@pytest.mark.parametrize("lam", [0.05, 0.3, 0.8, 1.17, 1.19, 1.5, 2.5, 4.0])
def test_kolmogorov_sf_matches_scipy(lam: float) -> None:
    assert kolmogorov_sf(lam) == pytest.approx(stats.kstwobign.sf(lam), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("alpha,n,m", [(0.05, 300, 20000), (0.05 / 9, 120, 8000),
                                       (1e-4, 40, 40)])
def test_ks_critical_inverts_the_pvalue(alpha: float, n: int, m: int) -> None:
    d = ks_critical(alpha, n, m)
    assert ks_pvalue(d, n, m) == pytest.approx(alpha, rel=1e-6)
    assert ks_pvalue(d * 1.01, n, m) < alpha < ks_pvalue(d * 0.99, n, m)


def test_ks_to_sketch_is_exact_for_a_uniform_sketch() -> None:
    # quantiles of U(0, 1) at linspace(0, 1, K) make the sketch CDF exactly F(x) = x
    sample = np.random.default_rng(5).uniform(-0.1, 0.9, 150)
    q = np.linspace(0.0, 1.0, 201)
    assert ks_to_sketch(sample, q) == pytest.approx(
        stats.kstest(sample, "uniform").statistic, abs=1e-12)


def test_ks_to_sketch_of_a_large_sample_matches_two_sample_ks() -> None:
    rng = np.random.default_rng(6)
    ref, window = rng.gamma(2.0, size=200_000), rng.gamma(2.3, size=300)
    assert ks_to_sketch(window, sketch(ref)) == pytest.approx(
        stats.ks_2samp(window, ref).statistic, abs=0.01)


def test_ks_to_sketch_handles_a_point_mass() -> None:
    # a reference with 60% of its mass at 1.0 (a saturated confidence) has tied quantiles
    rng = np.random.default_rng(7)
    ref = np.where(rng.random(100_000) < 0.6, 1.0, rng.uniform(0.3, 1.0, 100_000))
    q = sketch(ref)
    for window in (np.ones(50), rng.uniform(0.3, 1.0, 50), ref[:50]):
        assert ks_to_sketch(window, q) == pytest.approx(
            stats.ks_2samp(window, ref).statistic, abs=0.012)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wasserstein_matches_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=int(rng.integers(5, 400))), rng.exponential(size=333)
    assert wasserstein_1d(a, b) == pytest.approx(stats.wasserstein_distance(a, b), rel=1e-10)


@pytest.mark.parametrize("k,n", [(201, 90), (3, 4), (2, 7)])
def test_wasserstein_to_sketch_is_exact_for_a_uniform_sketch(k: int, n: int) -> None:
    # few quantiles make long intervals where the two CDFs cross
    sample = np.random.default_rng(8).uniform(0.2, 1.3, n)
    q = np.linspace(0.0, 1.0, k)
    grid = np.linspace(-0.5, 2.0, 2_000_001)  # |F_n(x) - F(x)| integrated numerically
    f_n = np.searchsorted(np.sort(sample), grid, "right") / sample.size
    numeric = np.trapezoid(np.abs(f_n - np.clip(grid, 0, 1)), grid)
    assert wasserstein_to_sketch(sample, q) == pytest.approx(numeric, abs=1e-5)


def test_wasserstein_to_sketch_by_hand() -> None:
    # U(0, 1) against {0.25, 0.75}: |u - Q(u)| integrates to 4 triangles of 1/32
    assert wasserstein_to_sketch(np.array([0.25, 0.75]), np.array([0.0, 1.0])) == \
        pytest.approx(0.125, abs=1e-15)


def test_wasserstein_to_sketch_of_a_large_sample_matches_scipy() -> None:
    rng = np.random.default_rng(9)
    ref, window = rng.normal(size=200_000), rng.normal(0.4, 1.2, 500)
    assert wasserstein_to_sketch(window, sketch(ref)) == pytest.approx(
        stats.wasserstein_distance(window, ref), abs=0.01)


def test_psi_by_hand() -> None:
    ref, window = np.array([50, 30, 20, 0]), np.array([25, 25, 25, 25])
    e = [0.5, 0.3, 0.2, 1e-4]  # the empty reference bin counts with epsilon
    a = [0.25, 0.25, 0.25, 0.25]
    expected = sum((ai - ei) * math.log(ai / ei) for ai, ei in zip(a, e, strict=True))
    assert psi(ref, window, 1e-4) == pytest.approx(expected, rel=1e-12)
    assert psi(ref, ref) == pytest.approx(0.0, abs=1e-12)
    assert psi(ref, window) > psi(ref, np.array([45, 30, 20, 5])) > 0


# -- the statistics ------------------------------------------------------------------------
def test_frame_brightness_weights_channels_as_luma() -> None:
    image = np.zeros((16, 16, 3), np.uint8)
    image[..., 0] = 255  # blue, in BGR order
    assert frame_brightness(image, 4) == pytest.approx(0.114)
    image[::8, ::8, 2] = 255  # red on exactly the pixels stride 8 samples
    assert frame_brightness(image, 8) == pytest.approx(0.114 + 0.299)
    with pytest.raises(ConfigError):
        frame_brightness(np.zeros((4, 4), np.uint8))


def test_crop_statistics() -> None:
    batch = np.zeros((2, 3, 2, 2), np.float32)
    batch[0, 0] = 1.0  # all red
    batch[1, :, 0, 0] = 0.8
    probs = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]], np.float32)
    s = crop_statistics(batch, probs)
    assert s["crop_r"].tolist() == pytest.approx([1.0, 0.2])
    assert s["crop_b"].tolist() == pytest.approx([0.0, 0.2])
    assert s["crop_brightness"][0] == pytest.approx(0.299)
    assert s["crop_spread"][0] == pytest.approx(np.std([1] * 4 + [0] * 8))
    assert s["confidence"].tolist() == pytest.approx([0.7, 0.5])
    assert s[PREDICTED_CLASS].tolist() == [1, 0]


# -- configuration -------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["frame_window", "crop_window"])
@pytest.mark.parametrize("value", [1, 0, -5])
def test_a_window_below_two_is_refused(field: str, value: int) -> None:
    with pytest.raises(ConfigError, match=field) as info:
        DriftConfig(**{field: value})
    assert "at least 2" in info.value.hint


@pytest.mark.parametrize("kwargs", [{"check_every": 0}, {"on_after": 0}, {"alpha": 0.0},
                                    {"alpha": 1.5}, {"margin": 0.5}, {"psi_epsilon": 0.0},
                                    {"calibration_folds": 1}, {"frame_window": 2.5},
                                    {"wasserstein_threshold": float("nan")}])
def test_bad_config_is_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        DriftConfig(**kwargs)


def test_the_monitor_needs_the_reference_windows(reference: DriftReference) -> None:
    with pytest.raises(ConfigError, match="frame_window=50"):
        DriftMonitor(reference, DriftConfig(frame_window=50, dark_window=20, crop_window=30,
                                            check_every=5))
    # hysteresis may differ from the reference's
    DriftMonitor(reference, DriftConfig(frame_window=40, dark_window=20, crop_window=30,
                                        check_every=5, on_after=5, off_after=1))


def test_the_builder_needs_enough_frames() -> None:
    builder = ReferenceBuilder(brightness_stride=SMALL.brightness_stride)
    feed(builder, np.random.default_rng(1), 100)
    with pytest.raises(ConfigError, match="needs >= 180"):
        builder.build(NUM_CLASSES, SMALL)


def test_the_builder_checks_the_class_count() -> None:
    builder = ReferenceBuilder()
    feed(builder, np.random.default_rng(1), 10)
    with pytest.raises(ConfigError, match="num_classes=3"):
        builder.build(3, SMALL)


# -- the reference and its JSON ------------------------------------------------------------
def test_reference_contents(reference: DriftReference) -> None:
    names = set(reference.statistics)
    assert names == {*FRAME_STATISTICS, *CROP_STATISTICS, PREDICTED_CLASS}
    frame = reference.statistics[FRAME_BRIGHTNESS]
    assert frame.count == 2000 and frame.test == "ks"
    assert frame.quantiles is not None and frame.quantiles.size == 201
    assert frame.quantiles[0] >= 0.29 and frame.quantiles[-1] <= 0.61
    cls = reference.statistics[PREDICTED_CLASS]
    assert cls.test == "psi" and cls.class_counts is not None
    assert int(cls.class_counts.sum()) == reference.crops == cls.count
    for ref in reference.statistics.values():
        # the calibration tested held-out windows, and the threshold obeys the rule
        assert ref.calibration_windows > 10
        assert ref.threshold == pytest.approx(max(ref.nominal_threshold,
                                                  SMALL.margin * ref.calibrated_max))
    m = len(names)
    assert frame.nominal_threshold == pytest.approx(ks_critical(0.05 / m, 40, 2000))


def test_wasserstein_beyond_the_ks_row_limit() -> None:
    config = DriftConfig(frame_window=40, dark_window=20, crop_window=30, check_every=5,
                         ks_max_rows=35)
    builder = ReferenceBuilder(brightness_stride=config.brightness_stride)
    feed(builder, np.random.default_rng(2), 600)
    ref = builder.build(NUM_CLASSES, config)
    assert ref.statistics[FRAME_BRIGHTNESS].test == "wasserstein"  # 40 rows > 35
    assert ref.statistics["crop_r"].test == "ks"  # 30 rows <= 35
    assert ref.statistics[FRAME_BRIGHTNESS].nominal_threshold == 0.1


def test_calibration_replays_the_runtime_rule() -> None:
    # 2 folds of 10 frames; one crop on frames 0, 1, 2 of each fold; windows of 2 rows,
    # checks after every 2nd frame. A crop window is tested once full and only when a crop
    # arrived since its last test; the crops of the checked frame come after the check.
    config = DriftConfig(frame_window=2, dark_window=2, crop_window=2, check_every=2,
                         calibration_folds=2)
    rng = np.random.default_rng(16)

    def stream(target: Any, frames: range) -> None:
        for i in frames:
            image = gray(rng.uniform(0.3, 0.6))
            batch, probs = crops(rng, 1 if i % 10 < 3 else 0)
            if isinstance(target, DriftMonitor):
                target.observe_frame(i, image)
                target.observe_crops(i, batch, probs)
            else:
                target.observe_frame(image)
                target.observe_crops(batch, probs)

    builder = ReferenceBuilder(brightness_stride=config.brightness_stride)
    stream(builder, range(20))
    ref = builder.build(NUM_CLASSES, config)
    assert ref.statistics["crop_r"].calibration_windows == 2  # frames 3 and 13
    assert ref.statistics[FRAME_BRIGHTNESS].calibration_windows == 10  # frames 1, 3, .., 19
    monitor = DriftMonitor(ref)
    stream(monitor, range(10))  # one fold's worth at run time
    tested = [(h.frame, h.statistic) for h in monitor.history]
    assert [f for f, name in tested if name == "crop_r"] == [3]
    assert [f for f, name in tested if name == FRAME_BRIGHTNESS] == [1, 3, 5, 7, 9]


def test_json_round_trip(reference: DriftReference) -> None:
    text = reference.to_json()
    back = DriftReference.from_json(text)
    assert back.to_json() == text
    assert back.config == reference.config
    data = json.loads(text)
    assert data["format"] == "roadshield.drift_reference" and data["version"] == 1
    assert len(text) < 40_000  # compact enough for ONNX metadata
    # both behave the same on the same stream
    outputs = []
    for ref in (reference, back):
        monitor = DriftMonitor(ref)
        feed(monitor, np.random.default_rng(3), 300, shift=0.15)
        outputs.append([e.to_dict() for e in monitor.poll()])
    assert outputs[0] and outputs[0] == outputs[1]


def _stat(name: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda d: d["statistics"][name]


MALFORMED: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
    ("format", lambda d: d.update(format="other")),
    ("version", lambda d: d.update(version=2)),
    ("num_classes", lambda d: d.update(num_classes=0)),
    ("frames", lambda d: d.update(frames=-1)),
    ("crops", lambda d: d.update(crops="many")),
    ("quantile_count", lambda d: d.update(quantile_count=2)),
    ("lacks the field", lambda d: d.pop("statistics")),
    ("unknown field", lambda d: d.update(extra=1)),
    ("config", lambda d: d["config"].update(frame_window=1)),
    ("config lacks", lambda d: d["config"].pop("alpha")),
    ("statistics is a list", lambda d: d.update(statistics=[])),
    ("statistics lacks", lambda d: d["statistics"].pop("crop_g")),
    ("statistics.bogus", lambda d: d["statistics"].update(bogus=d["statistics"]["crop_r"])),
    ("crop_r.kind", lambda d: _stat("crop_r")(d).update(kind="categorical")),
    ("crop_r.source", lambda d: _stat("crop_r")(d).update(source="frame")),
    ("crop_r.test", lambda d: _stat("crop_r")(d).update(test="psi")),
    ("crop_r.count", lambda d: _stat("crop_r")(d).update(count=1)),
    ("crop_r.std", lambda d: _stat("crop_r")(d).update(std=-0.1)),
    ("crop_r.mean", lambda d: _stat("crop_r")(d).update(mean=None)),
    ("crop_r.threshold", lambda d: _stat("crop_r")(d).update(threshold=0)),
    ("crop_r.nominal_threshold", lambda d: _stat("crop_r")(d).update(nominal_threshold=True)),
    ("crop_r.calibrated_max", lambda d: _stat("crop_r")(d).update(calibrated_max=-1)),
    ("crop_r.calibration_windows",
     lambda d: _stat("crop_r")(d).update(calibration_windows=0)),
    ("crop_r.quantiles", lambda d: _stat("crop_r")(d).update(quantiles=[0.1] * 200)),
    ("crop_r.quantiles", lambda d: _stat("crop_r")(d)["quantiles"].reverse()),
    ("crop_r.quantiles", lambda d: _stat("crop_r")(d)["quantiles"].__setitem__(3, "x")),
    ("crop_r lacks", lambda d: _stat("crop_r")(d).pop("quantiles")),
    ("predicted_class.class_counts",
     lambda d: _stat(PREDICTED_CLASS)(d)["class_counts"].append(0)),
    ("predicted_class.class_counts",
     lambda d: _stat(PREDICTED_CLASS)(d)["class_counts"].__setitem__(0, 10**6)),
    ("predicted_class has unknown",
     lambda d: _stat(PREDICTED_CLASS)(d).update(quantiles=[0.0] * 201)),
]


@pytest.mark.parametrize("where,corrupt", MALFORMED, ids=[f"{i}-{m[0]}"
                                                          for i, m in enumerate(MALFORMED)])
def test_each_malformed_field_is_one_config_error(
        reference: DriftReference, where: str, corrupt: Callable[[dict[str, Any]], None]
) -> None:
    data = json.loads(reference.to_json())
    corrupt(data)
    with pytest.raises(ConfigError) as info:
        DriftReference.from_json(json.dumps(data))
    message = str(info.value).splitlines()[0]
    assert message.startswith("drift_reference")
    for part in where.split():
        assert part in message
    assert info.value.hint


@pytest.mark.parametrize("text", ["not json", "[1, 2]", "null"])
def test_a_reference_that_is_no_object_is_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="drift_reference"):
        DriftReference.from_json(text)


def test_a_nan_threshold_is_refused(reference: DriftReference) -> None:
    text = reference.to_json().replace('"threshold":', '"threshold":NaN,"x":', 1)
    data = json.loads(text)
    for body in data["statistics"].values():
        body.pop("x", None)
    with pytest.raises(ConfigError, match="threshold"):
        DriftReference.from_json(json.dumps(data))


# -- the monitor ---------------------------------------------------------------------------
def hand_reference(threshold: float, config: DriftConfig) -> DriftReference:
    """Frame brightness uniform on [0.4, 0.6] (exact sketch) with a fixed KS threshold."""
    builder = ReferenceBuilder(brightness_stride=config.brightness_stride)
    feed(builder, np.random.default_rng(0), 1000)
    ref = builder.build(NUM_CLASSES, config)
    frame = ref.statistics[FRAME_BRIGHTNESS]
    frame.quantiles = np.linspace(0.4, 0.6, 201)
    frame.threshold = threshold
    return ref


def test_hysteresis_on_a_synthetic_series() -> None:
    # windows of 2 frames checked every 2 frames: a check fails iff both frames are bright
    # (D = 1 > 0.9); a mid-grey window has D = 0.5 and passes
    config = DriftConfig(frame_window=2, dark_window=2, crop_window=2, check_every=2,
                         on_after=3, off_after=2)
    monitor = DriftMonitor(hand_reference(0.9, config))
    checks = "FFPFFFPFPPFFP"  # on at the 6th check (3 fails in a row), off at the 10th
    for k, kind in enumerate(checks):
        for i in (2 * k, 2 * k + 1):
            monitor.observe_frame(i, gray(0.98 if kind == "F" else 0.5))
        if k == 6:
            mid = monitor.poll()
            assert monitor.state()[FRAME_BRIGHTNESS]["alarm"]
    events = mid + monitor.poll()
    assert [(e.statistic, e.frame, e.state) for e in events] == [
        (FRAME_BRIGHTNESS, 11, "on"), (FRAME_BRIGHTNESS, 19, "off")]
    on = events[0]
    assert on.test == "ks" and on.value == pytest.approx(1.0) and on.threshold == 0.9
    assert on.p_value is not None and 0 <= on.p_value < 0.5
    assert isinstance(on, DriftEvent) and on.to_dict()["state"] == "on"
    assert monitor.poll() == []  # poll hands each event out once
    state = monitor.state()[FRAME_BRIGHTNESS]
    mid_grey = (128 / 255 - 0.4) / 0.2  # the sketch's CDF at the grey frames
    assert state == {"value": pytest.approx(mid_grey), "threshold": 0.9, "alarm": False}
    assert math.isnan(monitor.state()["crop_r"]["value"])  # never tested: no crops came
    history = [h for h in monitor.history if h.statistic == FRAME_BRIGHTNESS]
    assert [h.frame for h in history] == [2 * k + 1 for k in range(len(checks))]
    assert [h.value > 0.9 for h in history] == [c == "F" for c in checks]


def test_history_is_bounded() -> None:
    config = DriftConfig(frame_window=2, dark_window=2, crop_window=2, check_every=1,
                         history_size=5)
    monitor = DriftMonitor(hand_reference(0.9, config))
    for i in range(50):
        monitor.observe_frame(i, gray(0.5))
    assert len(monitor.history) == 5 and monitor.history[-1].frame == 49


def test_no_alarm_on_iid_samples_from_the_reference(reference: DriftReference) -> None:
    monitor = DriftMonitor(reference)
    feed(monitor, np.random.default_rng(11), 4000)
    assert monitor.poll() == [] and monitor.alarms == []
    tested = {h.statistic for h in monitor.history}
    assert tested == set(reference.statistics)  # every statistic was really tested


def test_an_alarm_on_a_shifted_series(reference: DriftReference) -> None:
    monitor = DriftMonitor(reference)
    feed(monitor, np.random.default_rng(12), 300)
    assert monitor.poll() == []
    feed(monitor, np.random.default_rng(13), 300, shift=0.15, start=300)
    events = monitor.poll()
    on = {e.statistic: e.frame for e in events if e.state == "on"}
    assert FRAME_BRIGHTNESS in on and "crop_brightness" in on
    assert on[FRAME_BRIGHTNESS] < 300 + 2 * SMALL.frame_window
    assert PREDICTED_CLASS not in on and "confidence" not in on  # the shift left these alone


def test_the_dark_level_is_a_low_percentile_of_luma() -> None:
    frame = np.zeros((40, 40, 3), np.uint8)
    frame[:, 4:] = 200  # a tenth of the columns black: the 5th percentile is black
    stats = frame_statistics(frame, stride=1)
    assert stats[FRAME_DARK] == 0.0
    assert stats[FRAME_BRIGHTNESS] == pytest.approx(0.9 * 200 / 255, rel=1e-5)
    frame[:] = 60
    frame[:, :1] = 0  # 2.5 % black: below the percentile, so it reads the lifted level
    assert frame_statistics(frame, stride=1)[FRAME_DARK] == pytest.approx(60 / 255, rel=1e-5)


def test_a_lifted_black_level_alarms_in_the_short_window() -> None:
    """Scenes at random exposure gain keep black at black; an added offset lifts it."""
    config = DriftConfig(frame_window=200, dark_window=20, crop_window=30, check_every=5,
                         calibration_folds=2, brightness_stride=1)

    def scene(rng: np.random.Generator, lift: int) -> np.ndarray:
        frame = np.zeros((16, 16, 3), np.uint8)
        frame[4:] = int(rng.integers(60, 220))  # a quarter black, the rest at some exposure
        return np.clip(frame.astype(np.int16) + lift, 0, 255).astype(np.uint8)

    rng = np.random.default_rng(21)
    builder = ReferenceBuilder(brightness_stride=1)
    for _ in range(600):
        builder.observe_frame(scene(rng, 0))
        builder.observe_crops(*crops(rng, 1))
    monitor = DriftMonitor(builder.build(NUM_CLASSES, config))
    for i in range(300):
        monitor.observe_frame(i, scene(rng, 38 if i >= 100 else 0))
        monitor.observe_crops(i, *crops(rng, 1))
    on = [e for e in monitor.poll() if e.state == "on"]
    assert [e.statistic for e in on][:1] == [FRAME_DARK]
    assert 100 <= on[0].frame < 100 + 2 * config.dark_window


def test_scores_are_watched_by_name() -> None:
    builder = ReferenceBuilder(brightness_stride=SMALL.brightness_stride)
    rng = np.random.default_rng(14)
    for _ in range(2000):
        builder.observe_frame(gray(rng.uniform(0.3, 0.6)))
        batch, probs = crops(rng, int(rng.integers(0, 3)))
        builder.observe_crops(batch, probs, {"squeeze": rng.normal(size=len(batch))})
    ref = builder.build(NUM_CLASSES, SMALL)
    assert ref.statistics["score:squeeze"].source == "score"
    assert DriftReference.from_json(ref.to_json()).statistics["score:squeeze"].count > 100
    monitor = DriftMonitor(ref)
    for i in range(600):
        monitor.observe_frame(i, gray(rng.uniform(0.3, 0.6)))
        batch, probs = crops(rng, 1)
        monitor.observe_crops(i, batch, probs, {"squeeze": rng.normal(3.0, 1.0, size=1),
                                                "unknown": np.zeros(1)})
    assert "score:squeeze" in [e.statistic for e in monitor.poll() if e.state == "on"]
    with pytest.raises(ConfigError, match="squeeze"):
        monitor.observe_crops(0, *crops(rng, 2), {"squeeze": np.zeros(3)})


def test_crop_inputs_are_checked(reference: DriftReference) -> None:
    monitor = DriftMonitor(reference)
    batch, probs = crops(np.random.default_rng(15), 2)
    with pytest.raises(ConfigError, match="classes"):
        monitor.observe_crops(0, batch, probs[:, :3])
    with pytest.raises(ConfigError, match="probabilities"):
        monitor.observe_crops(0, batch, probs[:1])
    with pytest.raises(ConfigError, match="crops shaped"):
        monitor.observe_crops(0, batch[:, :2], probs)
    monitor.observe_crops(0, batch[:0], probs[:0])  # a frame without crops is fine
