"""CPU sanitizers against their references (kernels.sanitize_reference, cv2.medianBlur,
cv2.imencode), the registry and chain spec, bad inputs, and the edge loop with a chain."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from toy_data import fake_runner_base

from actuator.interface import RecordingActuator
from edge_runtime.frames import Frame, FrameSource
from edge_runtime.locate import FullFrameLocator
from edge_runtime.loop import EdgeLoop, build_loop
from edge_runtime.policy import SignRulesPolicy
from edge_runtime.preprocess import preprocess_batch
from edge_runtime.sanitize import (
    DEFAULT_CHAIN,
    SanitizeChain,
    SanitizeError,
    bitdepth,
    build_chain,
    create_sanitizer,
    jpeg,
    list_sanitizers,
    median,
    parse_chain,
    resize_pad,
)
from kernels.sanitize_reference import (
    bitdepth_reference,
    jpeg_dct_reference,
    median_reference,
    resize_pad_params,
    resize_pad_reference,
)
from roadshield_base.errors import ConfigError

ODD_SHAPES = [(1, 1, 3), (7, 9, 3), (4095, 1, 3), (1, 40, 3), (48, 64, 3)]


def _image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _batch(n: int = 6, h: int = 11, w: int = 13, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, h, w), dtype=np.float32)


def _per_image(batch: np.ndarray, fn) -> np.ndarray:
    """Apply an H x W x C reference to each N x 3 x H x W row."""
    return np.stack([fn(im.transpose(1, 2, 0)).transpose(2, 0, 1) for im in batch])


# --- each op against its reference -----------------------------------------------------------

@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("mode", ["round", "truncate"])
def test_bitdepth_is_bit_exact(shape, mode):
    img = _image(shape, 1)
    batch = _batch(3, *shape[:2])
    for bits in range(1, 9):
        np.testing.assert_array_equal(bitdepth(img, bits, mode),
                                      bitdepth_reference(img, bits, mode))
        np.testing.assert_array_equal(bitdepth(batch, bits, mode),
                                      bitdepth_reference(batch, bits, mode))


def test_bitdepth_clips_out_of_range_floats():
    x = np.array([-0.2, 0.3, 1.7], np.float32).reshape(1, 3, 1, 1)
    np.testing.assert_array_equal(bitdepth(x, 1).ravel(), [0.0, 0.0, 1.0])


@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("k", [3, 5])
def test_median_is_bit_exact_with_opencv_and_reference(shape, k):
    img = _image(shape, 2)
    np.testing.assert_array_equal(median(img, k), cv2.medianBlur(img, k))
    np.testing.assert_array_equal(median(img, k), median_reference(img, k))
    batch = _batch(4, *shape[:2])
    np.testing.assert_array_equal(median(batch, k),
                                  _per_image(batch, lambda im: median_reference(im, k)))


def test_median_of_a_crop_view_replicates_the_crop_edge():
    frame = _image((40, 50, 3), 3)
    crop = frame[10:20, 5:25]  # a non-contiguous view
    np.testing.assert_array_equal(median(crop), median_reference(np.ascontiguousarray(crop), 3))


@pytest.mark.parametrize("chroma", ["444", "420"])
def test_jpeg_codec_is_the_opencv_round_trip(chroma):
    img = _image((30, 41, 3), 4)
    factor = getattr(cv2, f"IMWRITE_JPEG_SAMPLING_FACTOR_{chroma}")
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 60,
                                         cv2.IMWRITE_JPEG_SAMPLING_FACTOR, factor])
    assert ok
    np.testing.assert_array_equal(jpeg(img, 60, chroma=chroma), cv2.imdecode(buf, 1))


def test_jpeg_batch_matches_per_image_and_dct_matches_reference():
    batch = _batch(5, 17, 9)
    images = np.stack([np.rint(im.transpose(1, 2, 0)[..., ::-1] * 255).astype(np.uint8)
                       for im in batch])
    for method in ("codec", "dct"):
        out = jpeg(batch, 70, method=method)
        assert out.shape == batch.shape and out.dtype == np.float32
        expected = np.stack([jpeg(im, 70, method=method) for im in images])
        np.testing.assert_array_equal(np.rint(out * 255).astype(np.uint8),
                                      expected[..., ::-1].transpose(0, 3, 1, 2))
    # the fast DCT path reorders float64 sums: equal to the reference but at rounding ties
    # (see test_sanitize_ops)
    diff = np.abs(jpeg(images[0], 70, method="dct").astype(int)
                  - jpeg_dct_reference(images[0], 70))
    assert diff.max() <= 2 and (diff == 0).mean() >= 0.999


@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_resize_pad_matches_reference_and_replays(shape):
    img = _image(shape, 5)
    params = resize_pad_params(7, 3, shape[0], shape[1], 1)[0]
    out = resize_pad(img, seed=7, frame_index=3, fill=0.5)
    assert out.shape == img.shape and out.dtype == np.uint8
    ref = resize_pad_reference(img, params, fill=0.5)
    assert np.abs(out.astype(int) - ref).max() <= 1  # OpenCV's 11-bit fixed point
    np.testing.assert_array_equal(out, resize_pad(img, seed=7, frame_index=3, fill=0.5))


def test_resize_pad_batch_per_row_draws():
    batch = _batch(100, 32, 32)  # more rows of one size than one cv2.resize call takes
    out = resize_pad(batch, seed=1, frame_index=9, min_frac=0.8)
    params = resize_pad_params(1, 9, 32, 32, 100, 0.8)
    ref = np.stack([resize_pad_reference(im.transpose(1, 2, 0), p).transpose(2, 0, 1)
                    for im, p in zip(batch, params, strict=True)])
    np.testing.assert_allclose(out, ref, atol=1e-5)
    np.testing.assert_array_equal(out, resize_pad(batch, seed=1, frame_index=9, min_frac=0.8))
    assert not np.array_equal(out, resize_pad(batch, seed=1, frame_index=10, min_frac=0.8))
    assert not np.array_equal(out, resize_pad(batch, seed=2, frame_index=9, min_frac=0.8))
    nh, nw, top, left = params[0]
    assert (out[0, :, :top] == 0).all() and (out[0, :, top + nh:] == 0).all()


def test_ops_never_modify_their_input():
    img, batch = _image((20, 20, 3), 6), _batch()
    img0, batch0 = img.copy(), batch.copy()
    for op in (bitdepth, median, jpeg, resize_pad):
        op(img)
        op(batch)
    np.testing.assert_array_equal(img, img0)
    np.testing.assert_array_equal(batch, batch0)


def test_empty_batch_passes_through():
    empty = np.zeros((0, 3, 8, 8), np.float32)
    for op in (bitdepth, median, jpeg, resize_pad):
        assert op(empty).shape == (0, 3, 8, 8)


# --- bad inputs ------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, match", [
    (np.zeros((8, 8, 3), np.float64), "dtype float64"),
    (np.zeros((8, 8, 3), np.int16), "dtype int16"),
    (np.zeros((8, 8, 4), np.uint8), "not H x W x 3"),
    (np.zeros((8, 8), np.uint8), "not H x W x 3"),
    (np.zeros((0, 5, 3), np.uint8), "empty"),
    (np.zeros((2, 4, 8, 8), np.float32), "not N x 3 x H x W"),
    (np.zeros((8, 8, 3), np.float32), "not N x 3 x H x W"),
    (np.zeros((1, 3, 0, 4), np.float32), "no pixels"),
    (np.full((1, 3, 2, 2), np.nan, np.float32), "NaN"),
    (np.full((1, 3, 2, 2), np.inf, np.float32), "NaN or infinity"),
    ([[1, 2, 3]], "not a numpy array"),
])
def test_bad_inputs_raise_clear_errors(bad, match):
    for op in (bitdepth, median, jpeg, resize_pad):
        with pytest.raises(SanitizeError, match=match):
            op(bad)


@pytest.mark.parametrize("call", [
    lambda x: bitdepth(x, 0), lambda x: bitdepth(x, 5, "floor"), lambda x: median(x, 4),
    lambda x: jpeg(x, 0), lambda x: jpeg(x, 50, method="dct", chroma="420"),
    lambda x: resize_pad(x, min_frac=1.5), lambda x: resize_pad(x, fill=2.0),
    lambda x: resize_pad(x, seed=-1)])
def test_bad_settings_raise(call):
    with pytest.raises(SanitizeError):
        call(_image((8, 8, 3)))


# --- registry and chain spec -----------------------------------------------------------------

def test_registry_names():
    assert {"bitdepth", "median", "jpeg", "resize_pad", "preprocess"} <= set(list_sanitizers())
    step = create_sanitizer("median", k="5")
    assert step.options == {"k": 5} and step.spec == "median:k=5"


def test_parse_chain_forms():
    assert parse_chain("bitdepth:bits=5,median:k=3") == [("bitdepth", {"bits": "5"}),
                                                        ("median", {"k": "3"})]
    assert parse_chain("resize_pad:seed=3,min_frac=0.9, preprocess") == [
        ("resize_pad", {"seed": "3", "min_frac": "0.9"}), ("preprocess", {})]
    assert parse_chain(["jpeg:quality=60:method=dct", "median"]) == [
        ("jpeg", {"quality": "60", "method": "dct"}), ("median", {})]


@pytest.mark.parametrize("spec, match", [
    ("blur:k=3", "unknown sanitizer"), ("median:size=3", "no option size"),
    ("bitdepth:bits=five", "not of type int"), ("bitdepth:bits=9", "bits=9"),
    ("median,,jpeg", "empty step"), ("k=3,median", "has no step"),
    ("median:k", "not key=value"), ("preprocess,median,preprocess", "twice"),
    ("jpeg:quality=0", "quality")])
def test_bad_specs_raise_config_errors(spec, match):
    with pytest.raises(ConfigError, match=match):
        build_chain(spec)


def test_chain_spec_round_trip_and_split():
    chain = build_chain("resize_pad:seed=3,min_frac=0.9,preprocess,bitdepth:bits=4")
    assert isinstance(chain, SanitizeChain)
    assert [s.name for s in chain.crop_steps] == ["resize_pad"]
    assert [s.name for s in chain.batch_steps] == ["bitdepth"]
    assert build_chain(chain.spec).spec == chain.spec
    assert build_chain(None) is None and build_chain("") is None
    assert build_chain("median").spec == "median,preprocess"


def test_default_chain_equals_the_steps_done_by_hand():
    frame = _image((480, 640, 3), 8)
    boxes = [(100, 120, 164, 184), (600, 450, 700, 500)]  # the second is clamped
    out = build_chain(DEFAULT_CHAIN)(frame, boxes, 32, frame_index=0)
    for i, (x0, y0, x1, y1) in enumerate([(100, 120, 164, 184), (600, 450, 640, 480)]):
        crop = cv2.medianBlur(bitdepth_reference(frame[y0:y1, x0:x1], 5), 3)
        expected = preprocess_batch(crop, [(0, 0, x1 - x0, y1 - y0)], 32)
        np.testing.assert_array_equal(out[i], expected[0])


def test_chain_batch_steps_and_edge_cases():
    frame = _image((60, 80, 3), 9)
    chain = build_chain("preprocess,resize_pad:seed=2")
    out = chain(frame, [(0, 0, 30, 30)], 16, frame_index=4)
    np.testing.assert_array_equal(out, resize_pad(preprocess_batch(frame, [(0, 0, 30, 30)], 16),
                                                  seed=2, frame_index=4))
    assert build_chain("median")(frame, [], 16).shape == (0, 3, 16, 16)
    with pytest.raises(SanitizeError, match="outside"):
        build_chain("median")(frame, [(100, 100, 120, 120)], 16)


# --- the loop --------------------------------------------------------------------------------

class ListSource(FrameSource):
    def __init__(self, frames: list[np.ndarray]) -> None:
        self.uri = "list://sanitize"
        self.frames = frames

    def __iter__(self) -> Iterator[Frame]:
        for i, image in enumerate(self.frames):
            yield Frame(image, i, i / 15.0)


class RecordingRunner(fake_runner_base()):
    """Keeps every batch it is fed; logits from the batch mean."""

    name = "recording-fake"

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[np.ndarray] = []

    def activate_impl(self) -> None:
        self.batches = []

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = feed["input"]
        self.batches.append(x.copy())
        m = x.mean(axis=(1, 2, 3))
        return {"logits": np.stack([m, -m], axis=1).astype(np.float32)}


def test_loop_with_a_random_chain_replays(tmp_path: Path) -> None:
    frames = [_image((48, 64, 3), s) for s in range(5)]
    runs = []
    for _ in range(2):
        runner = RecordingRunner()
        loop = EdgeLoop(ListSource(frames), FullFrameLocator(0.5), preprocess_batch, runner,
                        ("stop", "yield"), 16, SignRulesPolicy(), RecordingActuator(),
                        sanitizers=build_chain("resize_pad:seed=5,bitdepth:bits=4"))
        report = loop.run(progress=False)
        runs.append(runner.batches)
    assert report.sanitize == "resize_pad:seed=5,bitdepth:bits=4,preprocess"
    assert report.stages["sanitize"]["count"] == 5
    assert len(runs[0]) == 5 and all(np.array_equal(a, b) for a, b in zip(*runs, strict=True))
    assert not np.array_equal(runs[0][0], runs[0][1])


def test_build_loop_runs_a_chain_on_synthetic_frames(tiny_onnx: Path, tmp_path: Path) -> None:
    from cloud_train.synthetic_camera import register

    register()
    log = tmp_path / "decisions.jsonl"
    with build_loop("synthetic://?frames=6&width=160&height=120", tiny_onnx,
                    backend="onnxruntime", locator="full", decision_log=log,
                    sanitize="bitdepth:bits=5,median:k=3") as loop:
        report = loop.run(progress=False)
    assert report.frames == 6 and report.sanitize == "bitdepth:bits=5,median:k=3,preprocess"
    assert report.stages["sanitize"]["count"] == 6 and report.stages["infer"]["count"] == 6
    assert len(log.read_text().splitlines()) == report.decisions
    with pytest.raises(ConfigError, match="unknown sanitizer"):
        build_loop("synthetic://?frames=1", tmp_path / "missing.onnx", sanitize="blur")


def test_cli_edge_run_takes_a_sanitize_chain(tiny_onnx: Path, capsys) -> None:
    from roadshield.cli import main

    rc = main(["-q", "edge", "run", "--allow-unsigned", "--model", str(tiny_onnx), "--source",
               "synthetic://?frames=3&width=160&height=120", "--backend", "onnxruntime",
               "--sanitize", "median:k=3,jpeg:quality=80", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sanitize"] == "median:k=3,jpeg:quality=80,preprocess"
