"""The features output of the export, and fitting the detectors on it in the cloud tier."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from cloud_train import gtsrb
from cloud_train.models import create_model
from distill.detector_fit import (
    fit_detectors,
    fit_from_dataset,
    fit_mahalanobis,
    split_fit_calibration,
    threshold_at_fpr,
    track_clusters,
    write_detectors,
)
from distill.export import check_parity, export_onnx, read_onnx_metadata
from edge_runtime.detectors import DetectorSet, detectors_from_metadata
from edge_runtime.model_info import read_model_info
from edge_runtime.runners.onnxruntime_runner import OnnxRuntimeRunner
from roadshield.cli import main as cli_main
from roadshield_base.errors import ConfigError, DatasetError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAMES = ["stop", "yield", "no_entry", "priority_road", "speed_limit_30"]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    net = create_model("signnet_tiny", len(NAMES))
    net.train()
    with torch.no_grad():  # move the BN statistics off their defaults
        net(torch.rand(8, 3, 32, 32))
    return net.eval()


@pytest.fixture(scope="module")
def exported(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(model, NAMES, tmp_path_factory.mktemp("det") / "tiny.onnx")


def images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
            np.arange(n) % len(NAMES))


def to_nchw(x: np.ndarray) -> np.ndarray:
    return (x.transpose(0, 3, 1, 2) / np.float32(255.0)).astype(np.float32)


# --- the features output -------------------------------------------------------------------

def test_export_adds_a_features_output_equal_to_embed(exported: Path,
                                                      model: torch.nn.Module) -> None:
    proto = onnx.load(str(exported))
    assert [o.name for o in proto.graph.output] == ["logits", "features"]
    for out in proto.graph.output:  # dynamic batch on both
        assert out.type.tensor_type.shape.dim[0].dim_param
    meta = read_onnx_metadata(exported)
    assert meta["features_output"] == "features" and meta["features_dim"] == 64
    assert meta["num_classes"] == len(NAMES)
    # the trunk is in the graph once (classify(embed(x)) was traced, not forward and embed)
    assert sum(n.op_type == "Conv" for n in proto.graph.node) == 4
    x = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
    sess = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    logits, feats = sess.run(["logits", "features"], {"input": x})
    with torch.no_grad():
        xt = torch.from_numpy(x)
        np.testing.assert_allclose(feats, model.embed(xt).numpy(), atol=1e-5)
        np.testing.assert_allclose(logits, model(xt).numpy(), atol=1e-5)
    assert check_parity(model, exported, x) <= 1e-4
    info = read_model_info(exported)
    assert (info.output_name, info.features_name, info.num_classes) == \
        ("logits", "features", len(NAMES))


@pytest.mark.parametrize("arch, dim", [("signnet_tiny", 64), ("signnet", 128)])
def test_embed_is_the_input_of_the_head(arch: str, dim: int) -> None:
    torch.manual_seed(1)
    net = create_model(arch, 7).eval()
    x = torch.rand(2, 3, 32, 32)
    seen: list[torch.Tensor] = []
    handle = net.head.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    with torch.no_grad():
        logits = net(x)
        feats = net.embed(x)
    handle.remove()
    assert feats.shape == (2, dim)
    torch.testing.assert_close(feats, seen[0].flatten(1))  # the pooled last conv stage
    torch.testing.assert_close(net.classify(feats), logits)


def test_features_false_and_models_without_embed_export_logits_only(
        model: torch.nn.Module, tmp_path: Path, tiny_onnx: Path) -> None:
    path = export_onnx(model, NAMES, tmp_path / "plain.onnx", features=False)
    assert [o.name for o in onnx.load(str(path)).graph.output] == ["logits"]
    assert "features_dim" not in read_onnx_metadata(path)
    assert read_model_info(path).features_name is None
    assert read_model_info(tiny_onnx).features_name is None


def test_model_info_finds_the_features_through_onnxruntime_too(
        exported: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "onnx", None)
    info = read_model_info(exported)
    assert (info.output_name, info.features_name) == ("logits", "features")


def test_a_classify_that_disagrees_with_forward_is_refused(model: torch.nn.Module,
                                                          tmp_path: Path) -> None:
    import copy

    other = copy.deepcopy(model)
    other.classify = lambda f: torch.zeros(len(f), len(NAMES))
    with pytest.raises(ConfigError, match="differs from forward"):
        export_onnx(other, NAMES, tmp_path / "bad.onnx")


# --- statistics ----------------------------------------------------------------------------

def test_fit_mahalanobis_is_the_shrunk_pooled_covariance() -> None:
    rng = np.random.default_rng(0)
    y = np.arange(60) % 3
    f = rng.normal(size=(60, 5)) + 3.0 * y[:, None]
    means, precision = fit_mahalanobis(f, y, 3, shrinkage=0.1)
    want_means = np.stack([f[y == c].mean(axis=0) for c in range(3)])
    np.testing.assert_allclose(means, want_means, rtol=1e-5, atol=1e-6)
    centred = f - want_means[y]
    cov = centred.T @ centred / 60
    shrunk = 0.9 * cov + 0.1 * np.trace(cov) / 5 * np.eye(5)
    np.testing.assert_allclose(precision, np.linalg.inv(shrunk), rtol=1e-4)
    assert means.dtype == precision.dtype == np.float32
    np.testing.assert_array_equal(precision, precision.T)


def test_fit_mahalanobis_shrinkage_makes_few_samples_invertible() -> None:
    rng = np.random.default_rng(1)
    f, y = rng.normal(size=(6, 20)), np.arange(6) % 2  # N < D
    _, precision = fit_mahalanobis(f, y, 2)
    assert np.linalg.eigvalsh(precision.astype(np.float64)).min() > 0
    with pytest.raises(ConfigError, match="singular|not positive definite") as err:
        fit_mahalanobis(f, y, 2, shrinkage=0.0)
    assert "shrinkage" in err.value.hint


@pytest.mark.parametrize("kw, match", [
    ({"labels": np.array([0, 0, 0, 0])}, r"classes \[1\] have no fit images"),
    ({"labels": np.array([0, 1, 2, 1])}, "outside 0..1"),
    ({"labels": np.array([0, 1])}, "labels of shape"),
    ({"labels": np.array([0.0, 1.0, 0.0, 1.0])}, "dtype float64"),
    ({"features": np.full((4, 3), np.nan)}, "NaN"),
    ({"features": np.ones((4, 3))}, "do not vary"),
    ({"shrinkage": 1.0}, "shrinkage=1.0"),
    ({"num_classes": 0}, "num_classes=0"),
])
def test_fit_mahalanobis_errors(kw: dict, match: str) -> None:
    args = {"features": np.random.default_rng(0).normal(size=(4, 3)),
            "labels": np.array([0, 1, 0, 1]), "num_classes": 2, **kw}
    with pytest.raises(ConfigError, match=match):
        fit_mahalanobis(args["features"], args["labels"], args["num_classes"],
                        args.get("shrinkage", 0.01))


def test_threshold_at_fpr_flags_that_share_of_distinct_clean_scores() -> None:
    scores = np.random.default_rng(0).permutation(np.arange(100.0))
    t = threshold_at_fpr(scores, 0.05)
    assert t == 94.0 and int((scores > t).sum()) == 5
    assert int((scores > threshold_at_fpr(scores, 0.1)).sum()) == 10
    small = np.array([3.0, 1.0, 2.0])
    assert threshold_at_fpr(small, 0.05) == 3.0  # 0.15 of a score: nothing may be flagged


def test_threshold_at_fpr_ties_stay_below_the_rate() -> None:
    scores = np.array([1.0] * 10 + [2.0] * 10)
    t = threshold_at_fpr(scores, 0.3)  # 6 may be flagged, but 10 are tied at the top
    assert t == 2.0 and int((scores > t).sum()) == 0


@pytest.mark.parametrize("scores, fpr, match", [
    ([], 0.05, "non-empty"), ([[1.0, 2.0]], 0.05, "non-empty 1-D"),
    ([1.0, np.inf], 0.05, "not finite"), ([1.0, 2.0], 0.0, "fpr=0.0"),
    ([1.0, 2.0], 1.0, "fpr=1.0"),
])
def test_threshold_at_fpr_errors(scores: list, fpr: float, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        threshold_at_fpr(np.array(scores), fpr)


# --- fit, write, read back -----------------------------------------------------------------

@pytest.fixture(scope="module")
def fitted(exported: Path) -> dict:
    fit_x, fit_y = images(100, 1)
    cal_x, _ = images(200, 2)
    return fit_detectors(exported, fit_x, fit_y, cal_x, fpr=0.05, batch=64, progress=False)


def test_fit_gives_the_documented_object(fitted: dict) -> None:
    assert set(fitted) == {"version", "fpr", "feature_squeezing", "mahalanobis"}
    assert fitted["fpr"] == 0.05
    assert fitted["feature_squeezing"]["squeezers"] == ["bitdepth:bits=5", "median:k=3"]
    maha = fitted["mahalanobis"]
    assert (maha["classes"], maha["dim"], maha["features_output"]) == (len(NAMES), 64,
                                                                        "features")
    assert maha["threshold"] > 0 and fitted["feature_squeezing"]["threshold"] > 0


def test_thresholds_give_the_fpr_on_the_calibration_images(exported: Path,
                                                           fitted: dict) -> None:
    info = read_model_info(exported)
    det = detectors_from_metadata({"detectors": json.dumps(fitted)}, info.features_name)
    cal_x, _ = images(200, 2)
    with OnnxRuntimeRunner(exported, providers=["cpu"]) as runner:
        _, scores = det.infer(runner, to_nchw(cal_x))
    held = {"squeeze": det.squeeze, "mahalanobis": det.mahalanobis}
    for name, s in scores.items():
        rate = float(np.mean(held[name].flags(s)))
        # 10 of 200 above the threshold; allow one either side for batch-size rounding
        assert 9 / 200 <= rate <= 11 / 200, (name, rate)
    both = float(np.mean(det.flags(scores)))
    assert 0.05 <= both <= 0.11  # the union flags at least as many as either detector


def test_write_and_read_back(exported: Path, fitted: dict, tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(exported.read_bytes())
    os.chmod(path, 0o640)
    before = read_model_info(path)
    write_detectors(path, fitted)
    after = read_model_info(path)
    assert after.sha256 != before.sha256 and (path.stat().st_mode & 0o777) == 0o640
    assert {k: v for k, v in after.metadata.items() if k != "detectors"} == dict(before.metadata)
    assert json.loads(after.metadata["detectors"]) == fitted
    det = detectors_from_metadata(after.metadata, after.features_name)
    assert det.thresholds == {"squeeze": fitted["feature_squeezing"]["threshold"],
                              "mahalanobis": fitted["mahalanobis"]["threshold"]}
    # writing again replaces the entry instead of adding a second one
    write_detectors(path, {**fitted, "fpr": 0.1})
    props = [p.key for p in onnx.load(str(path)).metadata_props]
    assert props.count("detectors") == 1
    assert detectors_from_metadata(read_model_info(path).metadata, "features").fpr == 0.1
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temp file left


def test_write_refuses_an_object_for_another_model(exported: Path, fitted: dict,
                                                   tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(exported.read_bytes())
    wrong = json.loads(json.dumps(fitted))
    wrong["mahalanobis"]["classes"] = 4
    with pytest.raises(ConfigError, match="classes is 4"):
        write_detectors(path, wrong)
    with pytest.raises(ConfigError, match="holds no detector"):
        write_detectors(path, {"version": 1, "fpr": 0.05})
    assert path.read_bytes() == exported.read_bytes()


def test_mahalanobis_needs_the_features_output(tiny_onnx: Path) -> None:
    x = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    with pytest.raises(ConfigError, match="no features output") as err:
        fit_detectors(tiny_onnx, x, np.arange(4) % 5, x, progress=False)
    assert "export" in err.value.hint
    only = fit_detectors(tiny_onnx, x, np.arange(4) % 5, x, names="squeeze", progress=False)
    assert set(only) == {"version", "fpr", "feature_squeezing"}


def test_fit_rejects_images_of_another_size(exported: Path) -> None:
    x = np.zeros((4, 48, 48, 3), np.uint8)
    with pytest.raises(ConfigError, match="the model takes 32 x 32"):
        fit_detectors(exported, x, np.arange(4), x, progress=False)


# --- a GTSRB-layout dataset ----------------------------------------------------------------

def test_split_keeps_tracks_whole_and_parts_disjoint() -> None:
    labels = np.repeat(np.arange(3), 120)  # 4 tracks of 30 per class
    paths = [Path(f"{c:05d}/{(i % 120) // 30:05d}_{i % 30:05d}.ppm")
             for i, c in enumerate(labels)]
    fit, cal = split_fit_calibration(labels, paths, 0.25, seed=3)
    assert not set(fit) & set(cal) and len(fit) + len(cal) == 360
    track = [(int(labels[i]), paths[i].stem[:5]) for i in range(360)]
    assert not {track[i] for i in fit} & {track[i] for i in cal}
    assert len(cal) == 90 and set(labels[cal]) == {0, 1, 2}
    again = split_fit_calibration(labels, paths, 0.25, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((fit, cal), again, strict=True))
    fit, cal = split_fit_calibration(labels, paths, 0.25, seed=3, limit_per_class=8)
    assert np.bincount(labels[fit]).tolist() == [6] * 3
    assert np.bincount(labels[cal]).tolist() == [2] * 3


def test_a_class_with_one_track_is_split_image_by_image() -> None:
    labels = np.array([0] * 10 + [1] * 10)
    paths = [Path(f"00000_{i:05d}.ppm") for i in range(20)]
    clusters = track_clusters(labels, paths)
    assert len(set(clusters.tolist())) == 20
    fit, cal = split_fit_calibration(labels, paths, 0.2)
    assert np.bincount(labels[cal]).tolist() == [2, 2]


@pytest.mark.parametrize("kw, match", [({"calib_share": 1.0}, "calib_share"),
                                       ({"limit_per_class": 1}, "limit_per_class")])
def test_split_errors(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        split_fit_calibration(np.zeros(4, np.int64), [Path(f"{i}.ppm") for i in range(4)],
                              **kw)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    x, y = images(150, 5)
    root = tmp_path_factory.mktemp("gtsrb")
    gtsrb.write_split(x, y, NAMES, root, "train")
    return root


def test_fit_from_dataset_reads_only_the_train_split(exported: Path, dataset: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    splits: list[str] = []
    real = gtsrb.load_gtsrb

    def spy(root, split="train", **kw):  # type: ignore[no-untyped-def]
        splits.append(split)
        return real(root, split, **kw)

    monkeypatch.setattr(gtsrb, "load_gtsrb", spy)
    obj = fit_from_dataset(exported, dataset, calib_share=0.4, seed=1, progress=False)
    assert splits == ["train"]
    assert obj["mahalanobis"]["classes"] == len(NAMES)
    det = detectors_from_metadata({"detectors": json.dumps(obj)}, "features")
    assert isinstance(det, DetectorSet) and det.names == ("squeeze", "mahalanobis")


def test_fit_from_dataset_needs_the_models_classes(exported: Path,
                                                   tmp_path: Path) -> None:
    x, y = images(20, 6)
    gtsrb.write_split(x, y % 4, NAMES[:4], tmp_path, "train")
    with pytest.raises(DatasetError, match="names 4 classes, the model 5"):
        fit_from_dataset(exported, tmp_path, progress=False)


def test_command_line_dry_run_then_write(exported: Path, dataset: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(exported.read_bytes())
    def main(*extra: str) -> int:
        return cli_main(["distill", "detectors", "--model", str(path), "--data", str(dataset),
                         *extra])

    assert main("--dry-run", "--detectors", "squeeze") == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["written"] is False and set(printed["thresholds"]) == {"feature_squeezing"}
    assert "detectors" not in read_model_info(path).metadata
    assert main("--fpr", "0.1") == 0
    meta = read_model_info(path).metadata
    assert json.loads(meta["detectors"])["fpr"] == 0.1
    assert main("--detectors", "lid") == 2
    assert "unknown detector" in capsys.readouterr().err
