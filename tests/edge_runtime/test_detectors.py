"""Feature squeezing and Mahalanobis detectors: scores, flags, metadata format and errors
(NumPy only: a fake runner stands in for the model)."""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import pytest
import toy_data

from edge_runtime.detectors import (
    DEFAULT_SQUEEZERS,
    METADATA_KEY,
    DetectorSet,
    FeatureSqueezing,
    MahalanobisDetector,
    decode_array,
    detectors_from_metadata,
    detectors_to_metadata,
    detectors_to_object,
    encode_array,
    parse_detectors,
    softmax,
)
from edge_runtime.sanitize_ops import bitdepth, median
from roadshield_base.errors import ConfigError

C, D = 4, 6


def random_pd(d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d))
    return (a @ a.T + 0.5 * np.eye(d)).astype(np.float32)


def random_means(c: int, d: int, seed: int, offset: float = 0.0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(c, d)) + offset).astype(np.float32)


def direct_scores(f: np.ndarray, means: np.ndarray, p: np.ndarray) -> np.ndarray:
    """min_c (f - mu_c)^T P (f - mu_c), straight from the definition in float64."""
    f, means, p = (np.asarray(a, np.float64) for a in (f, means, p))
    return np.array([min(float((x - m) @ p @ (x - m)) for m in means) for x in f])


class LinearRunner(toy_data.fake_runner_base()):  # type: ignore[misc]
    """A fake model: logits = flattened pixels @ W, features = flattened pixels @ V."""

    def __init__(self, side: int, classes: int = C, dim: int = D, features: bool = True):
        super().__init__()
        rng = np.random.default_rng(7)
        self.w = rng.normal(size=(3 * side * side, classes)).astype(np.float32)
        self.v = rng.normal(size=(3 * side * side, dim)).astype(np.float32) / side
        self.features = features
        self.fed: list[int] = []

    @property
    def output_names(self) -> list[str]:
        return ["logits", "features"] if self.features else ["logits"]

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = feed["input"].reshape(len(feed["input"]), -1)
        self.calls += 1
        self.fed.append(len(x))
        out = {"logits": x @ self.w}
        if self.features:
            out["features"] = x @ self.v
        return out


def noisy_batch(n: int, side: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, side, side), dtype=np.float32)


# --- Mahalanobis ---------------------------------------------------------------------------

@pytest.mark.parametrize("seed, c, d, offset", [(0, 4, 6, 0.0), (1, 1, 3, 0.0),
                                                (2, 10, 16, 0.0), (3, 5, 8, 1e6)])
def test_mahalanobis_equals_the_direct_formula(seed: int, c: int, d: int, offset: float) -> None:
    means, p = random_means(c, d, seed, offset), random_pd(d, seed + 100)
    rng = np.random.default_rng(seed + 200)
    f = (means[rng.integers(0, c, 9)] + rng.normal(size=(9, d))).astype(np.float32)
    got = MahalanobisDetector(means, p).score(f)
    assert got.dtype == np.float32 and got.shape == (9,)
    # the offset case puts the means far from the origin, where an uncentred
    # |a|^2 - 2ab + |b|^2 would lose the distances to cancellation
    np.testing.assert_allclose(got, direct_scores(f, means, p), rtol=2e-5, atol=1e-5)


def test_mahalanobis_scores_zero_at_a_class_mean_and_takes_the_nearest_class() -> None:
    means, p = random_means(C, D, 0), random_pd(D, 1)
    det = MahalanobisDetector(means, p)
    np.testing.assert_allclose(det.score(means), 0.0, atol=1e-4)
    far = means[:1] + 10.0
    assert det.score(far)[0] > 100.0
    assert det.score(np.zeros((0, D), np.float32)).shape == (0,)


def test_mahalanobis_non_finite_features_score_inf_and_flag() -> None:
    det = MahalanobisDetector(random_means(C, D, 0), random_pd(D, 1), threshold=1e9)
    f = random_means(3, D, 5)
    f[1, 2] = np.nan
    scores = det.score(f)
    assert np.isinf(scores[1]) and np.isfinite(scores[[0, 2]]).all()
    assert det.flags(scores).tolist() == [False, True, False]


def _not_pd() -> np.ndarray:
    p = random_pd(D, 1).astype(np.float64)
    w, v = np.linalg.eigh(p)
    w[0] = -1.0
    return ((v * w) @ v.T).astype(np.float32)


@pytest.mark.parametrize("means, precision, threshold, match", [
    (random_means(C, D, 0), _not_pd(), None, "not positive definite"),
    (random_means(C, D, 0), np.zeros((D, D), np.float32), None, "not positive definite"),
    (random_means(C, D, 0), random_pd(D, 1) + np.triu(np.ones((D, D), np.float32), 1),
     None, "not symmetric"),
    (random_means(C, D, 0), random_pd(D + 1, 1), None, r"shape \(7, 7\)"),
    (random_means(C, D, 0)[0], random_pd(D, 1), None, "means has shape"),
    (np.zeros((0, D), np.float32), random_pd(D, 1), None, "means has shape"),
    (np.full((C, D), np.nan, np.float32), random_pd(D, 1), None, "means holds NaN"),
    (random_means(C, D, 0), np.full((D, D), np.inf, np.float32), None, "precision holds NaN"),
    (random_means(C, D, 0), [["a"] * D] * D, None, "not a numeric array"),
    (random_means(C, D, 0), random_pd(D, 1), float("nan"), "not a finite number"),
    (random_means(C, D, 0), random_pd(D, 1), True, "not a finite number"),
    (random_means(C, D, 0), random_pd(D, 1), "3", "not a finite number"),
])
def test_mahalanobis_rejects_bad_parameters(means: Any, precision: Any, threshold: Any,
                                            match: str) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        MahalanobisDetector(means, precision, threshold)
    assert err.value.hint


def test_mahalanobis_rejects_features_of_the_wrong_width() -> None:
    det = MahalanobisDetector(random_means(C, D, 0), random_pd(D, 1))
    for bad in (np.zeros((2, D + 1), np.float32), np.zeros(D, np.float32)):
        with pytest.raises(ConfigError, match=r"expected \(N, 6\)"):
            det.score(bad)


# --- feature squeezing ---------------------------------------------------------------------

def test_expand_stacks_each_squeezed_copy_after_the_batch() -> None:
    fs = FeatureSqueezing()
    x = noisy_batch(3)
    big = fs.expand(x)
    assert big.shape == (9, 3, 8, 8) and big.dtype == np.float32 and fs.copies == 3
    np.testing.assert_array_equal(big[:3], x)
    np.testing.assert_array_equal(big[3:6], bitdepth(x, bits=5))
    np.testing.assert_array_equal(big[6:], median(x, k=3))


def test_squeezing_scores_zero_when_the_squeezed_copies_are_identical() -> None:
    # flat images at 5-bit levels: bit-depth reduction and a median leave them as they are
    levels = np.random.default_rng(0).integers(0, 32, (4, 3, 1, 1)) / np.float32(31.0)
    x = np.broadcast_to(levels, (4, 3, 8, 8)).astype(np.float32)
    fs = FeatureSqueezing()
    np.testing.assert_array_equal(fs.expand(x)[4:8], x)
    with LinearRunner(8) as runner:
        scores = fs.score(runner, x)
        assert runner.fed == [12]  # one runner call for the batch and both copies
    assert scores.tolist() == [0.0] * 4
    with LinearRunner(8) as runner:
        noisy = fs.score(runner, noisy_batch(4))
    assert (noisy > 0.0).all() and (noisy <= 2.0).all()


def test_squeezing_score_by_hand() -> None:
    fs = FeatureSqueezing(threshold=0.4)
    logits = np.array([[0.0, 0.0],          # image 0: p = (1/2, 1/2)
                       [5.0, 5.0],          # image 1: p = (1/2, 1/2)
                       [np.log(3.0), 0.0],  # image 0, bitdepth: (3/4, 1/4): L1 = 1/2
                       [5.0, 5.0],          # image 1, bitdepth: unchanged
                       [0.0, 0.0],          # image 0, median: unchanged
                       [0.0, np.log(4.0)]],  # image 1, median: (1/5, 4/5): L1 = 3/5
                      np.float32)
    scores = fs.scores_from_logits(logits, 2)
    np.testing.assert_allclose(scores, [0.5, 0.6], rtol=1e-6)
    assert fs.flags(scores).tolist() == [True, True]
    assert FeatureSqueezing(threshold=0.55).flags(scores).tolist() == [False, True]


def test_squeezing_non_finite_logits_score_inf() -> None:
    logits = np.zeros((6, 3), np.float32)
    logits[5, 0] = np.inf  # image 1's median copy
    scores = FeatureSqueezing().scores_from_logits(logits, 2)
    assert scores[0] == 0.0 and np.isinf(scores[1])


def test_softmax_is_stable_for_large_logits() -> None:
    p = softmax(np.array([[1000.0, 1000.0, -1000.0]], np.float32))
    np.testing.assert_allclose(p, [[0.5, 0.5, 0.0]])


@pytest.mark.parametrize("squeezers, match", [
    (("blur",), "unknown sanitizer"),
    (("median:k=4",), "not supported"),
    (("bitdepth:bits=9",), "bits"),
    (("preprocess",), "not a squeezer"),
    (("bitdepth:bits=5,median:k=3",), "names 2 steps"),
    ((), "at least one squeezer"),
    ("", "empty step"),
    ([3], "not a list of spec strings"),
])
def test_bad_squeezers_are_config_errors(squeezers: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        FeatureSqueezing(squeezers)
    assert err.value.hint


def test_squeezers_as_one_chain_string_and_their_canonical_specs() -> None:
    fs = FeatureSqueezing("bitdepth:bits=4, median:k=5,jpeg:quality=60")
    assert fs.specs == ["bitdepth:bits=4", "median:k=5", "jpeg:quality=60"]
    assert FeatureSqueezing().specs == list(DEFAULT_SQUEEZERS)


@pytest.mark.parametrize("batch, match", [
    (np.zeros((8, 8, 3), np.uint8), "uint8 image"),
    (np.zeros((2, 8, 8, 3), np.float32), "not N x 3 x H x W"),
    (np.full((1, 3, 4, 4), np.nan, np.float32), "NaN"),
    (np.zeros((2, 3, 8, 8), np.float64), "dtype float64"),
])
def test_expand_rejects_what_is_not_a_model_batch(batch: np.ndarray, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        FeatureSqueezing().expand(batch)


def test_scores_from_logits_checks_the_row_count() -> None:
    with pytest.raises(ConfigError, match=r"logits of shape \(5, 3\) for 2 images"):
        FeatureSqueezing().scores_from_logits(np.zeros((5, 3), np.float32), 2)


# --- the set -------------------------------------------------------------------------------

def both(squeeze_t: float | None = 0.2, maha_t: float | None = 50.0) -> DetectorSet:
    return DetectorSet(FeatureSqueezing(threshold=squeeze_t),
                       MahalanobisDetector(random_means(C, D, 0), random_pd(D, 1), maha_t),
                       fpr=0.05)


def test_set_scores_both_from_one_runner_call() -> None:
    det = both()
    x = noisy_batch(5)
    with LinearRunner(8) as runner:
        logits, scores = det.infer(runner, x)
        assert runner.fed == [15]
        direct = runner.infer({"input": x})
    np.testing.assert_allclose(logits, direct["logits"], rtol=1e-6)
    assert set(scores) == {"squeeze", "mahalanobis"}
    np.testing.assert_allclose(scores["mahalanobis"],
                               det.mahalanobis.score(direct["features"]), rtol=1e-6)
    # flags are the OR of the two detectors' own flags
    want = det.squeeze.flags(scores["squeeze"]) | det.mahalanobis.flags(scores["mahalanobis"])
    assert det.flags(scores).tolist() == want.tolist()


def test_set_flags_or_of_the_detectors() -> None:
    det = both(squeeze_t=0.5, maha_t=10.0)
    scores = {"squeeze": np.array([0.1, 0.6, 0.1, 0.5], np.float32),
              "mahalanobis": np.array([1.0, 1.0, 11.0, 10.0], np.float32)}
    assert det.flags(scores).tolist() == [False, True, True, False]  # equal is not above


def test_set_without_squeezing_feeds_the_batch_alone() -> None:
    det = DetectorSet(mahalanobis=MahalanobisDetector(random_means(C, D, 0), random_pd(D, 1)))
    x = noisy_batch(2)
    assert det.expand(x) is x and det.names == ("mahalanobis",)
    with LinearRunner(8) as runner:
        _, scores = det.infer(runner, x)
    assert list(scores) == ["mahalanobis"] and runner.fed == [2]


@pytest.mark.parametrize("det, scores, match", [
    (both(squeeze_t=None), {"squeeze": np.zeros(2), "mahalanobis": np.zeros(2)},
     "no threshold"),
    (both(), {"squeeze": np.zeros(2)}, "no scores for"),
    (both(), {"squeeze": np.zeros(2), "mahalanobis": np.zeros(3)}, "differ"),
    (DetectorSet(), {}, "empty DetectorSet"),
])
def test_set_flag_errors(det: DetectorSet, scores: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        det.flags(scores)


def test_set_needs_the_features_output_for_mahalanobis() -> None:
    with LinearRunner(8, features=False) as runner, \
            pytest.raises(ConfigError, match="without the features output") as err:
        both().infer(runner, noisy_batch(2))
    assert "export" in err.value.hint


# --- spec and metadata ---------------------------------------------------------------------

@pytest.mark.parametrize("spec, want", [
    ("squeeze,mahalanobis", ("squeeze", "mahalanobis")),
    (" mahalanobis , squeeze,squeeze", ("mahalanobis", "squeeze")),
    ("squeeze", ("squeeze",)), ("", ()), ("  ", ()), (None, ()),
    (["mahalanobis"], ("mahalanobis",)),
])
def test_parse_detectors(spec: Any, want: tuple[str, ...]) -> None:
    assert parse_detectors(spec) == want


@pytest.mark.parametrize("spec", ["squeeze,lid", "squeeze,,mahalanobis", "Squeeze"])
def test_parse_detectors_rejects_unknown_names(spec: str) -> None:
    with pytest.raises(ConfigError, match="unknown detector") as err:
        parse_detectors(spec)
    assert "squeeze, mahalanobis" in err.value.hint


def model_meta(det: DetectorSet, **extra: str) -> dict[str, str]:
    return {"class_names": json.dumps(list("abcd")), "num_classes": str(C),
            "features_dim": str(D), METADATA_KEY: detectors_to_metadata(det), **extra}


def test_metadata_round_trip_is_exact() -> None:
    det = both(squeeze_t=0.123456789, maha_t=42.5)
    back = detectors_from_metadata(model_meta(det), "features")
    assert back.names == ("squeeze", "mahalanobis") and back.fpr == 0.05
    assert back.thresholds == {"squeeze": 0.123456789, "mahalanobis": 42.5}
    assert back.squeeze.specs == det.squeeze.specs
    np.testing.assert_array_equal(back.mahalanobis.means, det.mahalanobis.means)
    np.testing.assert_array_equal(back.mahalanobis.precision, det.mahalanobis.precision)
    f = random_means(5, D, 9)
    np.testing.assert_array_equal(back.mahalanobis.score(f), det.mahalanobis.score(f))


def test_metadata_is_the_documented_format() -> None:
    det = both(squeeze_t=0.25, maha_t=None)
    obj = json.loads(detectors_to_metadata(det))
    assert obj == detectors_to_object(det)
    assert set(obj) == {"version", "fpr", "feature_squeezing", "mahalanobis"}
    assert obj["version"] == 1 and obj["fpr"] == 0.05
    assert obj["feature_squeezing"] == {"squeezers": ["bitdepth:bits=5", "median:k=3"],
                                        "threshold": 0.25}
    maha = obj["mahalanobis"]
    assert {k: maha[k] for k in ("features_output", "classes", "dim", "threshold")} == \
        {"features_output": "features", "classes": C, "dim": D, "threshold": None}
    raw = base64.b64decode(maha["means"])  # little-endian float32, row-major
    assert len(raw) == 4 * C * D
    np.testing.assert_array_equal(np.frombuffer(raw, "<f4").reshape(C, D), det.mahalanobis.means)
    assert encode_array(np.array([[1.0, 2.0]])) == base64.b64encode(
        np.array([1.0, 2.0], "<f4").tobytes()).decode()


def test_only_the_named_detectors_are_read() -> None:
    meta = model_meta(both())
    assert detectors_from_metadata(meta, None, "squeeze").names == ("squeeze",)
    assert detectors_from_metadata(meta, "features", "mahalanobis").names == ("mahalanobis",)
    empty = detectors_from_metadata({}, None, "")
    assert not empty and empty.names == ()


def edit(path: tuple[str, ...], value: Any) -> dict[str, str]:
    """Model metadata whose detectors object has ``value`` at ``path`` (or the key
    removed when value is ``...``)."""
    obj = detectors_to_object(both())
    node = obj
    for key in path[:-1]:
        node = node[key]
    if value is ...:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    meta = model_meta(both())
    meta[METADATA_KEY] = json.dumps(obj)
    return meta


NOT_PD_B64 = encode_array(_not_pd())


@pytest.mark.parametrize("meta, features, match", [
    ({"num_classes": "4"}, "features", "has no 'detectors' metadata"),
    ({METADATA_KEY: "{not json"}, "features", "not JSON"),
    ({METADATA_KEY: "[1, 2]"}, "features", "not a JSON object"),
    (edit(("version",), 2), "features", "version 2 is not 1"),
    (edit(("version",), ...), "features", "version None"),
    (edit(("extra",), 1), "features", r"unknown keys \['extra'\] in the top level"),
    (edit(("fpr",), 1.5), "features", "fpr 1.5"),
    (edit(("feature_squeezing",), ...), "features", "no 'feature_squeezing' object"),
    (edit(("mahalanobis",), ...), "features", "no 'mahalanobis' object"),
    (edit(("feature_squeezing", "threshold"), ...), "features", r"lacks \['threshold'\]"),
    (edit(("feature_squeezing", "threshold"), "high"), "features", "not a finite number"),
    (edit(("feature_squeezing", "squeezers"), []), "features", "non-empty list"),
    (edit(("feature_squeezing", "squeezers"), ["median:k=4"]), "features", "not supported"),
    (edit(("mahalanobis", "means"), "@@@="), "features", "means is not valid base64"),
    (edit(("mahalanobis", "means"), 12), "features", "means is a int"),
    (edit(("mahalanobis", "precision"), encode_array(np.eye(D + 1))), "features",
     r"precision holds 196 bytes, expected 144"),
    (edit(("mahalanobis", "classes"), 3), "features", "classes is 3, the model's num_classes"),
    (edit(("mahalanobis", "dim"), 0), "features", "dim is 0, not a positive integer"),
    (edit(("mahalanobis", "classes"), True), "features", "not a positive integer"),
    (edit(("mahalanobis", "precision"), NOT_PD_B64), "features", "not positive definite"),
    (edit(("mahalanobis", "features_output"), "emb"), "features", "names the features "
     "output 'emb'"),
    (edit(("mahalanobis", "units"), 1), "features", r"unknown keys \['units'\] in mahalanobis"),
    (model_meta(both()), None, "has none"),
    (model_meta(both(), features_dim=str(D + 2)), "features", "the model's features_dim is 8"),
])
def test_bad_metadata_gets_one_clear_error(meta: dict[str, str], features: str | None,
                                           match: str) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        detectors_from_metadata(meta, features)
    assert err.value.hint


def test_decode_array_checks_the_byte_count() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(decode_array(encode_array(a), (2, 3), "a"), a)
    with pytest.raises(ConfigError, match="holds 24 bytes, expected 28"):
        decode_array(encode_array(a), (7,), "a")
