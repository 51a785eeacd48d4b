"""edge_runtime.metrics: what a scrape of /metrics reports, ports, and the error paths."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.error
import urllib.request
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from actuator.interface import RecordingActuator  # noqa: E402
from edge_runtime.metrics import (  # noqa: E402
    LATENCY_BUCKETS_S,
    PREFIX,
    EdgeMetrics,
    actuator_link_state,
)
from roadshield_base.errors import BackendUnavailableError, ConfigError  # noqa: E402

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> tuple[Samples, dict[str, Metric]]:
    """(sample (name, labels) -> value, family name -> family) of an exposition text."""
    samples: Samples = {}
    families: dict[str, Metric] = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = family
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, families


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.status == 200
        return parse(resp.read().decode("utf-8"))[0]


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(PREFIX + name, frozenset(labels.items()))]


def feed(m: EdgeMetrics) -> None:
    m.frame({"read": 0.3, "locate": 2.0, "frame": 12.0})
    m.frame({"read": 0.2, "locate": 40.0, "infer": 3.0, "frame": 50.0})
    m.crops(3, abstained=1)
    m.crops(2)
    m.decision("hold", sent=False, keepalive=False)
    m.decision("stop", sent=True, keepalive=False)
    m.decision("none", sent=False, keepalive=True)
    m.decision("none", sent=False, keepalive=False)
    m.detector("squeeze", np.array([0.004, 0.3, np.nan]), np.array([False, True, True]))
    m.detector("mahalanobis", np.array([12.0, 700.0]), np.array([False, False]))
    for alarm in (False, True, True, False, True):  # two 0 -> 1 changes
        m.drift({"confidence_mean": {"value": 0.9, "threshold": 0.6, "alarm": alarm},
                 "psi": {"value": 0.05, "threshold": 0.2, "alarm": False}})
    m.actuator(True, "armed")
    m.actuator(False, "disconnected")
    m.cautious(True)


def test_scrape_reports_every_recorded_value() -> None:
    with EdgeMetrics(0) as m:
        assert m.serving and m.port is not None and m.port > 0
        assert m.url == f"http://127.0.0.1:{m.port}/metrics"
        feed(m)
        s = scrape(m.url)
    assert value(s, "frames_total") == 2
    assert value(s, "crops_classified_total") == 5
    assert value(s, "crops_abstained_total") == 1
    lat = "stage_latency_seconds"
    assert value(s, lat + "_count", stage="read") == 2
    assert value(s, lat + "_sum", stage="read") == pytest.approx(0.0005)
    assert value(s, lat + "_bucket", stage="read", le="0.00025") == 1  # the 0.2 ms one
    assert value(s, lat + "_bucket", stage="read", le="0.0005") == 2
    assert value(s, lat + "_bucket", stage="locate", le="0.025") == 1
    assert value(s, lat + "_bucket", stage="locate", le="+Inf") == 2
    assert value(s, lat + "_count", stage="infer") == 1
    assert (PREFIX + lat + "_count", frozenset({("stage", "annotate")})) not in s
    assert value(s, "decisions_total", action="none") == 2
    assert value(s, "decisions_total", action="stop") == 1
    assert value(s, "decisions_total", action="hold") == 1
    assert value(s, "commands_sent_total") == 1
    assert value(s, "keepalives_sent_total") == 1
    assert value(s, "detector_flags_total", detector="squeeze") == 2
    assert value(s, "detector_flags_total", detector="mahalanobis") == 0
    assert value(s, "detector_score_count", detector="squeeze") == 2  # NaN left out
    assert value(s, "detector_score_sum", detector="squeeze") == pytest.approx(0.304)
    assert value(s, "detector_score_bucket", detector="squeeze", le="0.005") == 1
    assert value(s, "detector_score_bucket", detector="mahalanobis", le="500.0") == 1
    assert value(s, "drift_value", statistic="confidence_mean") == pytest.approx(0.9)
    assert value(s, "drift_threshold", statistic="psi") == pytest.approx(0.2)
    assert value(s, "drift_alarm", statistic="confidence_mean") == 1
    assert value(s, "drift_alarm", statistic="psi") == 0
    assert value(s, "drift_alarms_total", statistic="confidence_mean") == 2
    assert value(s, "drift_alarms_total", statistic="psi") == 0
    assert value(s, "actuator_up") == 0
    assert value(s, "actuator_state", state="disconnected") == 1
    assert value(s, "actuator_state", state="armed") == 0
    assert value(s, "policy_cautious") == 1


def test_families_follow_prometheus_conventions() -> None:
    m = EdgeMetrics(None)
    feed(m)
    _, families = parse(m.render())
    kinds = {name: f.type for name, f in families.items() if not name.endswith("_created")}
    assert all(name.startswith(PREFIX) for name in kinds)
    assert all(f.documentation for f in families.values())
    assert kinds[PREFIX + "stage_latency_seconds"] == "histogram"
    assert kinds[PREFIX + "detector_score"] == "histogram"
    for counter in ("frames", "crops_classified", "crops_abstained", "decisions",
                    "commands_sent", "keepalives_sent", "detector_flags", "drift_alarms"):
        assert kinds[PREFIX + counter] == "counter", counter
    for gauge in ("drift_value", "drift_threshold", "drift_alarm", "actuator_up",
                  "actuator_state", "policy_cautious"):
        assert kinds[PREFIX + gauge] == "gauge", gauge
    samples, _ = parse(m.render())
    bounds = sorted(float(dict(labels)["le"]) for (name, labels) in samples
                    if name == PREFIX + "stage_latency_seconds_bucket"
                    and ("stage", "read") in labels)
    assert bounds == [*LATENCY_BUCKETS_S, float("inf")]
    assert bounds[0] == pytest.approx(1e-4) and bounds[-2] == pytest.approx(1.0)


def test_port_in_use_is_one_config_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        m = EdgeMetrics(port)
        with pytest.raises(ConfigError, match=f"port {port} .*already in use") as err:
            m.start()
        assert "--metrics-port" in err.value.hint
        assert not m.serving and m.url is None
        with pytest.raises(ConfigError, match="already in use"), EdgeMetrics(port):
            pass


@pytest.mark.parametrize("port", [-1, 65536, 1.5, "9108", True])
def test_bad_port_is_config_error(port: object) -> None:
    with pytest.raises(ConfigError, match="metrics port") as err:
        EdgeMetrics(port)  # type: ignore[arg-type]
    assert "0 to pick a free one" in err.value.hint


def test_bad_host_and_buckets_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="host"):
        EdgeMetrics(0, host="")
    with pytest.raises(ConfigError, match="cannot serve metrics on 203.0.113.7"):
        EdgeMetrics(0, host="203.0.113.7").start()  # TEST-NET-3: no machine owns it
    for buckets in ((), (1.0, 0.5), (0.1, float("nan"))):
        with pytest.raises(ConfigError, match="buckets"):
            EdgeMetrics(None, score_buckets=buckets)


def test_custom_score_buckets_are_used() -> None:
    m = EdgeMetrics(None, score_buckets=(1.0, 2.0))
    m.detector("squeeze", np.array([1.5, 3.0]), np.array([True, False]))
    s, _ = parse(m.render())
    assert value(s, "detector_score_bucket", detector="squeeze", le="1.0") == 0
    assert value(s, "detector_score_bucket", detector="squeeze", le="2.0") == 1
    assert value(s, "detector_score_bucket", detector="squeeze", le="+Inf") == 2


def test_close_frees_the_port_and_stops_the_thread() -> None:
    m = EdgeMetrics(0).start()
    port, url = m.port, m.url
    assert url is not None
    thread = m._thread
    assert thread is not None and thread.is_alive()
    scrape(url)
    m.close()
    assert not thread.is_alive()
    assert not m.serving and m.url is None
    m.close()  # a second close is harmless
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=5)
    m.frame({"read": 1.0})  # recording still works without a server
    with EdgeMetrics(port) as again:  # the same port binds again
        assert again.port == port
        assert value(scrape(url), "frames_total") == 0


def test_two_instances_keep_their_own_values() -> None:
    import prometheus_client

    with EdgeMetrics(0) as a, EdgeMetrics(0) as b:
        assert a.port != b.port
        a.frame({"read": 1.0})
        a.frame({"read": 1.0})
        b.frame({"read": 1.0})
        b.decision("stop", sent=True, keepalive=False)
        assert a.url is not None and b.url is not None
        sa, sb = scrape(a.url), scrape(b.url)
    assert value(sa, "frames_total") == 2 and value(sb, "frames_total") == 1
    assert value(sa, "commands_sent_total") == 0 and value(sb, "commands_sent_total") == 1
    # nothing leaks into the process-wide registry
    assert prometheus_client.REGISTRY.get_sample_value(PREFIX + "frames_total") is None


def test_port_none_collects_without_serving() -> None:
    m = EdgeMetrics(None)
    assert m.start() is m and not m.serving and m.port is None and m.url is None
    m.crops(4, abstained=4)
    s, _ = parse(m.render())
    assert value(s, "crops_abstained_total") == 4
    m.close()


def test_bad_inputs_raise_and_record_nothing() -> None:
    m = EdgeMetrics(None)
    with pytest.raises(ConfigError, match="'infer' took nan ms"):
        m.frame({"read": 1.0, "infer": float("nan")})
    with pytest.raises(ConfigError, match="finite time"):
        m.frame({"read": -0.5})
    with pytest.raises(ConfigError, match="abstained"):
        m.crops(2, abstained=3)
    with pytest.raises(ConfigError, match="abstained"):
        m.crops(2.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="decision action"):
        m.decision("", sent=False, keepalive=False)
    with pytest.raises(ConfigError, match=r"scores \(3,\) and flags \(2,\)"):
        m.detector("squeeze", np.zeros(3), np.zeros(2, dtype=bool))
    with pytest.raises(ConfigError, match="drift statistic 'psi'"):
        m.drift({"kl": {"value": 0.1, "alarm": False}, "psi": {"value": 0.1}})
    with pytest.raises(ConfigError, match="actuator state"):
        m.actuator(True, "")
    s, _ = parse(m.render())
    assert value(s, "frames_total") == 0
    assert value(s, "crops_classified_total") == 0
    assert not any(name.startswith(PREFIX + "stage_latency") for name, _ in s)
    assert not any(name.startswith(PREFIX + "drift_value") for name, _ in s)


def test_drift_threshold_is_optional() -> None:
    m = EdgeMetrics(None)
    m.drift({"kl": {"value": 0.4, "alarm": True}})
    s, _ = parse(m.render())
    assert value(s, "drift_value", statistic="kl") == pytest.approx(0.4)
    assert value(s, "drift_alarms_total", statistic="kl") == 1
    assert not any(name == PREFIX + "drift_threshold" for name, _ in s)


def test_actuator_link_state() -> None:
    from actuator.link import DeviceState
    from actuator.messages import STATE_ARMED, STATE_SAFE

    rec = RecordingActuator()
    assert actuator_link_state(rec) == (True, "in_process")
    rec.close()
    assert actuator_link_state(rec) == (False, "closed")

    def serial(is_open: bool, **state: Any) -> SimpleNamespace:
        return SimpleNamespace(link=SimpleNamespace(is_open=is_open, state=DeviceState(**state)))

    assert actuator_link_state(serial(True, connected=True, device_state=STATE_ARMED)) \
        == (True, "armed")
    assert actuator_link_state(serial(True, connected=True, device_state=STATE_SAFE)) \
        == (True, "safe")
    assert actuator_link_state(serial(True, connected=False)) == (False, "disconnected")
    assert actuator_link_state(serial(False, connected=True)) == (False, "closed")


def test_missing_prometheus_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import now fails
    with pytest.raises(BackendUnavailableError, match="prometheus_client") as err:
        EdgeMetrics(0)
    assert "pip install prometheus_client" in err.value.hint


def test_edge_runtime_imports_without_prometheus_client() -> None:
    code = ("import sys; sys.modules['prometheus_client'] = None\n"
            "import edge_runtime.metrics, edge_runtime.loop\n"
            "from roadshield_base.errors import BackendUnavailableError\n"
            "try:\n    edge_runtime.metrics.EdgeMetrics(0)\n"
            "except BackendUnavailableError:\n    print('unavailable')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "unavailable"
