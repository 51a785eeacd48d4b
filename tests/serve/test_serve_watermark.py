"""The DAWN-style watermark (Szyller et al. 2021): selection by a keyed hash, a keyed wrong
label that repeats, and `roadshield watermark verify` on a clone and an independent model.

The clone is a 1-nearest-neighbour model (an ONNX graph) over every image the attacker
asked, labelled with the service's answers: the extreme of a clone that fits its training
set, and fast. The independent model is the tiny network with another seed.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from serve_helpers import add_key, client_for, images, infer_body

from roadshield.cli import main
from serve.watermark import binomial_tail, quantise, verify, wrong_label

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx`")


def test_selection_share_and_wrong_labels():
    key = b"k" * 32
    rng = np.random.default_rng(0)
    blobs = [rng.bytes(768) for _ in range(40_000)]
    picks = [wrong_label(key, 16, b, 2, 5, 0.004) for b in blobs]
    chosen = [w for w in picks if w is not None]
    # 40 000 draws at 0.4 %: mean 160, sd 12.6
    assert 110 < len(chosen) < 210
    assert 2 not in chosen and set(chosen) == {0, 1, 3, 4}
    assert [wrong_label(key, 16, b, 2, 5, 0.004) for b in blobs[:500]] == picks[:500]
    assert wrong_label(b"other" * 7, 16, blobs[0], 2, 5, 0.0) is None


def test_binomial_tail_is_the_upper_tail():
    assert binomial_tail(0, 10, 0.25) == 1.0
    assert binomial_tail(10, 10, 0.25) == pytest.approx(0.25 ** 10)
    assert binomial_tail(3, 3, 0.5) == pytest.approx(0.125)


def nearest_neighbour_onnx(path: Path, templates: np.ndarray, labels: np.ndarray,
                           num_classes: int, metadata: dict[str, str]) -> Path:
    """An ONNX 1-NN classifier: input "input" [N, 3, S, S], output "logits" [N, C] one-hot
    of the nearest template's label."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    flat = templates.reshape(len(templates), -1).astype(np.float32)
    inits = [numpy_helper.from_array(flat.T.copy(), "t_t"),
             numpy_helper.from_array((flat ** 2).sum(axis=1).astype(np.float32), "t_sq"),
             numpy_helper.from_array(np.float32(2.0).reshape(()), "two"),
             numpy_helper.from_array(np.eye(num_classes, dtype=np.float32)[labels], "onehot")]
    nodes = [helper.make_node("Flatten", ["input"], ["x"], axis=1),
             helper.make_node("MatMul", ["x", "t_t"], ["xt"]),
             helper.make_node("Mul", ["xt", "two"], ["xt2"]),
             helper.make_node("Sub", ["xt2", "t_sq"], ["score"]),
             helper.make_node("ArgMax", ["score"], ["idx"], axis=1, keepdims=0),
             helper.make_node("Gather", ["onehot", "idx"], ["logits"], axis=0)]
    size = templates.shape[-1]
    graph = helper.make_graph(
        nodes, "nn_clone",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_classes])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, metadata)
    onnx.save(model, str(path))
    return path


def test_verify_recognises_the_clone_and_not_an_independent_model(
        make_service, state_dir, tiny, tiny_model, tmp_path, capsys):
    import torch

    # a fixed key: which of the fixed queries are marked is then fixed too (a fresh key
    # marks 20.5 of 4096 on average and, about once in a hundred, fewer than 10)
    secrets_file = state_dir / "secrets.json"
    doc = json.loads(secrets_file.read_text())
    secrets_file.write_text(json.dumps({**doc, "watermark_key": "5a" * 32}))
    service = make_service(watermark_rate=0.005, prada_enabled=False)
    client = client_for(service)
    token = add_key(service, "thief", policy="label", budget=100_000, burst=100_000)
    queries = images(4096, seed=11)
    labels = []
    for i in range(0, len(queries), 64):
        r = client.post("/v2/models/roadsign/infer", json=infer_body(queries[i:i + 64]),
                        headers={"X-API-Key": token})
        labels += r.json()["outputs"][0]["data"]
    rows = service.store.watermark_rows("thief")
    share = len(rows) / len(queries)
    assert 10 <= len(rows) and share < 0.008
    # each watermarked answer is the stored wrong label, and a repeat gets it again
    by_sha = {r[1]: r for r in rows}
    marked = [i for i, x in enumerate(queries)
              if hashlib.sha256(quantise(x)).hexdigest() in by_sha]
    assert len(marked) == len(rows)
    for i in marked:
        row = by_sha[hashlib.sha256(quantise(queries[i])).hexdigest()]
        assert labels[i] == tiny.classes[row[5]] != tiny.classes[row[4]]
    again = client.post("/v2/models/roadsign/infer", json=infer_body(queries[marked[:3]]),
                        headers={"X-API-Key": token}).json()["outputs"][0]["data"]
    assert again == [labels[i] for i in marked[:3]]

    index = {name: i for i, name in enumerate(tiny.classes)}
    clone = nearest_neighbour_onnx(tmp_path / "clone.onnx", queries,
                                   np.array([index[n] for n in labels]), len(tiny.classes),
                                   tiny.metadata)
    torch.manual_seed(123)
    other = copy.deepcopy(tiny_model)  # same architecture, other weights
    with torch.no_grad():
        for p in other.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    independent = tiny.export_onnx(other, tmp_path / "independent.onnx", tiny.metadata)

    verdicts = {}
    for name, model in (("clone", clone), ("independent", independent)):
        assert main(["watermark", "verify", "--suspect", str(model), "--dir", str(state_dir),
                     "--client", "thief", "--json"]) == 0
        verdicts[name] = json.loads(capsys.readouterr().out)
    assert verdicts["clone"]["queries"] == len(rows) <= 200
    assert verdicts["clone"]["agree"] == len(rows)
    assert verdicts["clone"]["p_value"] < 1e-6
    assert verdicts["independent"]["p_value"] > 0.01
    assert verdicts["clone"]["chance"] == pytest.approx(1 / (len(tiny.classes) - 1))


def marked_rows(key: bytes, n: int, y: int, classes: int, seed: int) -> list[tuple]:
    """``n`` stored-row tuples of random 4 x 4 images that ``key`` marks, model label ``y``."""
    rng = np.random.default_rng(seed)
    rows: list[tuple] = []
    while len(rows) < n:
        u = rng.integers(0, 256, 3 * 4 * 4, dtype=np.uint8).tobytes()
        w = wrong_label(key, 4, u, y, classes, 0.005)
        if w is not None:
            rows.append(("c", str(len(rows)), "[3, 4, 4]", u, y, w))
    return rows


def test_verify_skips_rows_another_key_did_not_make():
    key = b"a" * 32
    rows = marked_rows(key, 5, y=0, classes=3, seed=1)
    verdict = verify(rows, b"b" * 32, 3, lambda x: np.zeros(len(x), int))
    assert verdict.queries == 0 and verdict.skipped == 5 and verdict.p_value == 1.0
    verdict = verify(rows, key, 3, lambda x: np.zeros(len(x), int))
    assert verdict.queries == 5 and verdict.agree == 0 and verdict.agree_true == 5


def test_the_p_value_counts_only_the_images_where_the_suspect_did_not_say_y():
    key = b"k" * 32
    rows = marked_rows(key, 12, y=1, classes=5, seed=2)
    wrongs = np.array([r[5] for r in rows])
    # 6 answers w, 4 answer y (where w cannot be said), 2 answer another wrong class
    other = [min({0, 2, 3} - {int(w)}) for w in wrongs[10:]]
    answers = np.concatenate([wrongs[:6], [1] * 4, other])
    verdict = verify(rows, key, 5, lambda x: answers[:len(x)], batch=64)
    assert (verdict.queries, verdict.agree, verdict.agree_true, verdict.tested) == (12, 6, 4, 8)
    assert verdict.p_value == pytest.approx(binomial_tail(6, 8, 0.25))
