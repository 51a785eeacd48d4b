"""PRADA (Juuti et al. 2019): the rule on synthetic streams, its persistence, and the cut it
makes through the service.

The extraction stream is shaped like Jacobian-based augmentation (Papernot et al. 2017):
a few seed images, then rounds in which every earlier point x gives x + lambda * sign(g)
(lambda = 0.1; g a random direction standing in for the substitute's gradient, which only
sets which corner of the step box is taken, not the step's length). Benign streams draw
independent images from one distribution.
"""

from __future__ import annotations

import numpy as np
import pytest
from serve_helpers import add_key, client_for, infer_body

from serve.prada import PradaState, shapiro_w
from serve.watermark import quantise

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx`")


def jbda_stream(n: int, seed: int, size: int = 16, seeds: int = 10, step: float = 0.1
                ) -> np.ndarray:
    rng = np.random.default_rng(seed)
    points = list(np.clip(rng.normal(0.5, 0.2, (seeds, 3, size, size)), 0, 1)
                  .astype(np.float32))
    stream = list(points)
    while len(stream) < n:
        new = [np.clip(x + step * np.sign(rng.standard_normal(x.shape)), 0, 1)
               .astype(np.float32) for x in points]
        stream += new
        points += new
    return np.stack(stream[:n])


def benign_stream(n: int, seed: int, size: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(0.5, 0.2, (n, 3, size, size)), 0, 1).astype(np.float32)


def run(stream: np.ndarray, classes: np.ndarray, batch: int = 10) -> PradaState:
    state = PradaState()
    for i in range(0, len(stream), batch):
        update = state.observe([quantise(x) for x in stream[i:i + batch]],
                               [int(c) for c in classes[i:i + batch]])
        state.apply(update)
        if state.alarm:
            break
    return state


def test_shapiro_w_matches_scipy_and_flags_a_two_point_mixture():
    from scipy.stats import shapiro

    rng = np.random.default_rng(0)
    normal = rng.normal(5.0, 1.0, 300)
    assert shapiro_w(normal) == shapiro(normal).statistic
    assert shapiro_w(normal) > 0.99
    mixture = np.concatenate([rng.normal(2.7, 0.01, 270), rng.normal(9.0, 1.0, 30)])
    assert shapiro_w(mixture) < 0.6
    assert shapiro_w([1.0] * 200) == 0.0


def test_no_test_before_100_distances_then_every_10_queries():
    state = PradaState()
    stream = benign_stream(150, seed=1)
    tested_at = []
    for i in range(0, 150, 5):
        update = state.observe([quantise(x) for x in stream[i:i + 5]], [0] * 5)
        state.apply(update)
        if update.test is not None:
            tested_at.append(update.test[0])
    # one class: query k has k-1 earlier ones, so 100 distances exist from query 101 on
    assert tested_at == [110, 120, 130, 140, 150]
    assert len(state.distances) == 149


def test_distance_is_to_the_earlier_queries_of_the_same_predicted_class():
    state = PradaState()
    a = np.zeros((3, 2, 2), np.float32)
    b = np.full((3, 2, 2), 0.5, np.float32)
    c = np.full((3, 2, 2), 1.0, np.float32)
    update = state.observe([quantise(a), quantise(c), quantise(b)], [0, 1, 0])
    # b's class 0 holds a only: ||b - a|| over 12 values of 128/255
    assert [s for s, _ in update.distances] == [2]
    np.testing.assert_allclose(update.distances[0][1], np.sqrt(12) * 128 / 255, rtol=1e-6)


def test_jbda_streams_alarm_before_2000_queries_and_benign_streams_never():
    for seed in range(3):
        stream = jbda_stream(2000, seed)
        state = run(stream, np.zeros(len(stream), int))
        assert state.alarm and state.seq < 2000, (seed, state.last_w)
    for seed in range(10):
        stream = benign_stream(1000, seed=100 + seed)
        classes = np.random.default_rng(seed).integers(0, 5, len(stream))
        state = run(stream, classes)
        assert not state.alarm and state.last_w > 0.95, (seed, state.last_w)


def test_alarm_cuts_the_key_to_label_only_and_survives_a_restart(make_service, state_dir,
                                                                  tiny_onnx):
    service = make_service(watermark_rate=0.0, prada_on_alarm="label")
    client = client_for(service)
    attacker = add_key(service, "attacker", policy="softmax")
    honest = add_key(service, "honest", policy="softmax")
    headers = {"Authorization": f"Bearer {attacker}"}
    attack = jbda_stream(400, seed=0)
    served = 0
    for i in range(0, len(attack), 20):
        r = client.post("/v2/models/roadsign/infer", json=infer_body(attack[i:i + 20]),
                        headers=headers)
        assert r.status_code == 200
        served += 20
        if [t["name"] for t in r.json()["outputs"]] == ["label"]:
            break
    assert service.store.get_key("attacker").cut == "label"
    assert served < 400
    tests = service.store.prada_tests("attacker")
    assert tests[-1][2] and tests[-1][1] < 0.9
    benign = benign_stream(300, seed=7)
    for i in range(0, 300, 20):
        r = client.post("/v2/models/roadsign/infer", json=infer_body(benign[i:i + 20]),
                        headers={"Authorization": f"Bearer {honest}"})
        assert [t["name"] for t in r.json()["outputs"]] == ["label", "probabilities"]
    assert service.store.get_key("honest").cut == ""
    # a new process rebuilds PRADA's state from the store
    from serve.server import build_service

    again = build_service(state_dir, tiny_onnx, service.config)
    try:
        status = again.prada_status("attacker")
        assert status["alarm"] and status["queries"] == served
        assert again.prada_status("honest")["distances"] == len(
            service.store.prada_history("honest")[1])
    finally:
        again.runner.deactivate()
        again.store.close()


def test_alarm_can_switch_the_key_off(make_service):
    service = make_service(watermark_rate=0.0, prada_on_alarm="off")
    client = client_for(service)
    token = add_key(service, "attacker", policy="top1")
    attack = jbda_stream(400, seed=1)
    statuses = []
    for i in range(0, len(attack), 20):
        r = client.post("/v2/models/roadsign/infer", json=infer_body(attack[i:i + 20]),
                        headers={"X-API-Key": token})
        statuses.append(r.status_code)
        if r.status_code != 200:
            break
    assert statuses[-1] == 403 and r.json() == {"error": "forbidden"}


def _vec(value: float) -> bytes:
    return quantise(np.full((3, 4, 4), value, np.float32))


def test_a_query_within_the_class_threshold_is_measured_but_not_kept():
    state = PradaState()
    state.apply(state.observe([_vec(0.0), _vec(0.5), _vec(1.0)], [0, 0, 0]))
    grown = state.classes[0]
    # kept: 0 (founds the set), 128 (d1 to 0 over 48 values), 255 (d2 to 128); D_G = [0, d1, d2]
    set_distances = [0.0, np.sqrt(48) * 128 / 255, np.sqrt(48) * 127 / 255]
    assert grown.points.n == 3
    np.testing.assert_allclose(grown.threshold, np.mean(set_distances) - np.std(set_distances),
                               rtol=1e-6)
    near = state.observe([_vec(0.52)], [0])  # closer to 0.5 than the threshold
    state.apply(near)
    assert near.distances[0][1] < grown.threshold
    assert grown.points.n == 3 and state.class_distances[0][-1] == near.distances[0][1]
    far = state.observe([quantise(np.zeros((3, 4, 4), np.float32) + np.eye(4)[None])], [1])
    state.apply(far)
    assert state.classes[1].points.n == 1 and far.distances == []


def test_the_test_sample_drops_outliers_and_waits_for_small_classes():
    from serve.prada import shapiro_sample

    rng = np.random.default_rng(0)
    normal = list(rng.normal(5.0, 0.1, 200))
    sample = shapiro_sample([normal + [50.0], [1.0] * 9], class_min=10)
    assert len(sample) == 200 and 50.0 not in sample and 1.0 not in sample
    assert len(shapiro_sample([[2.0] * 120], class_min=10)) == 120  # equal values: none dropped


def test_revert_puts_the_state_back_exactly():
    stream = benign_stream(160, seed=3)
    classes = np.random.default_rng(3).integers(0, 3, len(stream))
    images = [quantise(x) for x in stream]
    state = PradaState()
    state.apply(state.observe(images[:120], list(classes[:120])))
    before = (state.seq, list(state.distances), {c: (s.points.n, list(s.set_distances),
                                                     s.threshold)
                                                 for c, s in state.classes.items()})
    first = state.observe(images[120:], list(classes[120:]))
    state.revert(first)
    after = (state.seq, list(state.distances), {c: (s.points.n, list(s.set_distances),
                                                    s.threshold)
                                                for c, s in state.classes.items()})
    assert after == before
    again = state.observe(images[120:], list(classes[120:]))
    assert again == first and again.test is not None


def test_a_request_the_store_refuses_or_fails_leaves_prada_as_it_was(make_service,
                                                                     monkeypatch):
    service = make_service(watermark_rate=0.0)
    client = client_for(service)
    headers = {"X-API-Key": add_key(service, "k", policy="softmax")}
    stream = benign_stream(60, seed=5)
    url = "/v2/models/roadsign/infer"
    assert client.post(url, json=infer_body(stream[:20]), headers=headers).status_code == 200
    seen = service.prada_status("k")
    kept = service.store.charge
    # the store's late refusal (a race on the budget), then a failing commit
    monkeypatch.setattr(service.store, "charge", lambda *a, **k: "budget")
    assert client.post(url, json=infer_body(stream[20:40]), headers=headers).status_code == 429
    assert service.prada_status("k") == seen

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(service.store, "charge", broken)
    with pytest.raises(OSError):  # TestClient re-raises what the server would answer as 500
        client.post(url, json=infer_body(stream[20:40]), headers=headers)
    assert service.prada_status("k") == seen
    monkeypatch.setattr(service.store, "charge", kept)
    assert client.post(url, json=infer_body(stream[20:40]), headers=headers).status_code == 200
    assert service.prada_status("k")["queries"] == 40
