"""Prometheus metrics for the edge loop, served over HTTP (``edge run --metrics-port N``).

Exports:
* ``EdgeMetrics`` - the loop's collectors in a registry of their own (so two loops, or two
  tests, never collide) and, once started, an HTTP server for ``/metrics``;
* ``actuator_link_state(actuator)`` - ``(up, state)`` of whatever actuator the loop
  drives, the arguments of ``EdgeMetrics.actuator``;
* ``PREFIX``, ``LATENCY_BUCKETS_S``, ``SCORE_BUCKETS`` - the name prefix and the default
  histogram buckets.

``prometheus_client`` is imported only when an ``EdgeMetrics`` is built, so the rest of
``edge_runtime`` imports without it; without it, asking for metrics raises
``BackendUnavailableError`` with the install hint.
"""

from __future__ import annotations

import errno
import math
from collections.abc import Mapping, Sequence
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from roadshield_base.errors import BackendUnavailableError, ConfigError

if TYPE_CHECKING:
    import threading
    from wsgiref.simple_server import WSGIServer

    from prometheus_client import Counter, Gauge, Histogram

PREFIX = "roadshield_edge_"
#: Stage latency buckets in seconds: 0.1 ms .. 1 s, about three per decade.
LATENCY_BUCKETS_S: tuple[float, ...] = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                                        0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
#: Detector score buckets: detectors differ in scale (an L1 squeeze distance is about 0..2,
#: a Mahalanobis distance reaches hundreds), so the default spans 1e-3 .. 1e3.
SCORE_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                    1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0,
                                    1000.0)
_PORT_HINT = "pass a port in 1..65535, or 0 to pick a free one"


def _prometheus() -> ModuleType:
    try:
        import prometheus_client
    except ImportError as err:
        raise BackendUnavailableError(
            "edge metrics need the prometheus_client package, which is not installed",
            "pip install prometheus_client") from err
    return prometheus_client


def _check_port(port: object) -> int | None:
    if port is None:
        return None
    if isinstance(port, bool) or not isinstance(port, int | np.integer):
        raise ConfigError(f"metrics port {port!r} is not an integer", _PORT_HINT)
    if not 0 <= int(port) <= 65535:
        raise ConfigError(f"metrics port {port} is outside 0..65535", _PORT_HINT)
    return int(port)


def _check_buckets(buckets: Sequence[float]) -> tuple[float, ...]:
    bounds = tuple(float(b) for b in buckets)
    if (not bounds or not all(math.isfinite(b) for b in bounds)
            or any(a >= b for a, b in zip(bounds, bounds[1:], strict=False))):
        raise ConfigError(f"histogram buckets {list(buckets)} are not finite and increasing",
                          "pass upper bounds in increasing order, e.g. (0.1, 1, 10); "
                          "+Inf is added on its own")
    return bounds


def _bind_error(err: OSError, port: int, host: str) -> ConfigError:
    """The one clear error for a metrics server that could not bind."""
    where = f"{host}:{port}"
    if err.errno == errno.EADDRINUSE:
        return ConfigError(f"metrics port {port} on {host} is already in use",
                           f"stop what holds it (`ss -ltnp 'sport = :{port}'` shows it), pick "
                           "another --metrics-port, or pass 0 to pick a free one")
    if err.errno == errno.EACCES:
        return ConfigError(f"no permission to serve metrics on {where}",
                           "ports below 1024 need privileges: use one >= 1024, e.g. 9108")
    return ConfigError(f"cannot serve metrics on {where}: {err}",
                       "use 127.0.0.1 (this machine), 0.0.0.0 (every interface) or an "
                       "address this machine owns")


def _label(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{what} {value!r} is not a non-empty string",
                          f"pass the {what} as a name, e.g. as the loop reports it")
    return value


class EdgeMetrics:
    """The edge loop's metrics; ``start()`` serves them on ``http://host:port/metrics``.

    port: the TCP port, 0 for a free one (``self.port`` is the bound one once started), or
        None to collect without serving (``render()`` still gives the exposition text).
    host: the address to bind; the default keeps the endpoint on this machine.
    score_buckets: upper bounds of the detector score histogram.

    Every recording method is cheap (a few counter increments), so the loop may call them
    on every frame. A context manager: ``with EdgeMetrics(9108) as m:`` starts and closes.
    """

    def __init__(self, port: int | None, host: str = "127.0.0.1", *,
                 score_buckets: Sequence[float] = SCORE_BUCKETS) -> None:
        self._requested_port = _check_port(port)
        if not isinstance(host, str) or not host:
            raise ConfigError(f"metrics host {host!r} is not an address",
                              "use 127.0.0.1 (this machine) or 0.0.0.0 (every interface)")
        self.host = host
        bounds = _check_buckets(score_buckets)
        pc = _prometheus()
        self.registry = pc.CollectorRegistry(auto_describe=True)
        reg = self.registry

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return pc.Counter(PREFIX + name, doc, labels, registry=reg)

        def gauge(name: str, doc: str, *labels: str) -> Gauge:
            return pc.Gauge(PREFIX + name, doc, labels, registry=reg)

        self._frames = counter("frames_total", "Frames run through the edge loop.")
        self._crops = counter("crops_classified_total", "Sign crops sent to the classifier.")
        self._abstained = counter("crops_abstained_total",
                                  "Classified crops the defence abstained on (class unknown).")
        self._latency: Histogram = pc.Histogram(
            PREFIX + "stage_latency_seconds", "Time spent per frame in each loop stage.",
            ("stage",), unit="seconds", registry=reg, buckets=LATENCY_BUCKETS_S)
        self._decisions = counter("decisions_total", "Policy decisions by action.", "action")
        self._commands = counter("commands_sent_total",
                                 "Actuator commands sent for a policy decision.")
        self._keepalives = counter("keepalives_sent_total",
                                   "Standing commands re-sent to keep the actuator's TTL.")
        self._flags = counter("detector_flags_total", "Crops a detector flagged, by detector.",
                              "detector")
        self._scores: Histogram = pc.Histogram(
            PREFIX + "detector_score", "Detector score per crop, by detector.", ("detector",),
            registry=reg, buckets=bounds)
        self._drift_value = gauge("drift_value", "Latest value of each drift statistic.",
                                  "statistic")
        self._drift_threshold = gauge("drift_threshold",
                                      "Alarm threshold of each drift statistic.", "statistic")
        self._drift_alarm = gauge("drift_alarm",
                                  "1 while a drift statistic is in alarm, else 0.", "statistic")
        self._drift_raised = counter("drift_alarms_total",
                                     "Drift alarms raised (each 0 -> 1 change), by statistic.",
                                     "statistic")
        self._actuator_up = gauge("actuator_up", "1 while the actuator link is up, else 0.")
        self._actuator_state = gauge(
            "actuator_state", "1 for the actuator link's current state, 0 for the others.",
            "state")
        self._cautious = gauge("policy_cautious", "1 while the policy is in its cautious mode.")
        # labelled children, cached: labels() takes a lock and builds a key on every call
        self._children: dict[tuple[Any, str], Any] = {}
        self._alarm_on: dict[str, bool] = {}
        self._state: str | None = None
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    # -- serving -----------------------------------------------------------------------
    def start(self) -> EdgeMetrics:
        """Serve ``/metrics``; a no-op when already serving or when port is None.

        A port already in use (or an address that cannot be bound) raises ConfigError.
        """
        if self._requested_port is None or self._server is not None:
            return self
        pc = _prometheus()
        try:
            server, thread = pc.start_http_server(self._requested_port, addr=self.host,
                                                  registry=self.registry)
        except OSError as err:  # socket.gaierror (unknown host name) is one too
            raise _bind_error(err, self._requested_port, self.host) from err
        self._server, self._thread = server, thread
        self.port = int(server.server_address[1])
        return self

    @property
    def serving(self) -> bool:
        return self._server is not None

    @property
    def url(self) -> str | None:
        """``http://host:port/metrics`` while serving, else None."""
        if self._server is None:
            return None
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def render(self) -> str:
        """The current exposition text, as a scrape would get it."""
        return str(_prometheus().generate_latest(self.registry).decode("utf-8"))

    def close(self) -> None:
        """Stop serving and free the port; recording still works afterwards. Idempotent."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            try:
                server.shutdown()
            finally:
                server.server_close()
        if thread is not None:
            thread.join(timeout=5.0)

    def __enter__(self) -> EdgeMetrics:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- recording ---------------------------------------------------------------------
    def _child(self, metric: Any, label: str) -> Any:
        key = (metric, label)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(label)
        return child

    def frame(self, stage_ms: Mapping[str, float]) -> None:
        """One frame done; ``stage_ms`` maps stage name -> its time this frame, milliseconds.

        Give only the stages that ran this frame (the loop's ``STAGES`` names).
        """
        observed = []
        for stage, ms in stage_ms.items():
            value = float(ms)
            if not (math.isfinite(value) and value >= 0.0):
                # one NaN or inf would poison the histogram's sum for the rest of the run
                raise ConfigError(f"stage '{stage}' took {ms} ms, not a finite time >= 0",
                                  "pass time.perf_counter() differences in milliseconds")
            observed.append((_label(stage, "stage name"), value / 1e3))
        for stage, seconds in observed:
            self._child(self._latency, stage).observe(seconds)
        self._frames.inc()

    def crops(self, n: int, abstained: int = 0) -> None:
        """``n`` crops classified in one batch, ``abstained`` of them abstained on."""
        if (not isinstance(n, int | np.integer) or not isinstance(abstained, int | np.integer)
                or not 0 <= abstained <= n):
            raise ConfigError(f"crops(n={n}, abstained={abstained}) needs 0 <= abstained <= n",
                              "count the abstain flags of this batch's crops only")
        self._crops.inc(n)
        if abstained:
            self._abstained.inc(abstained)

    def decision(self, action: str, sent: bool, keepalive: bool) -> None:
        """One policy decision; ``sent``: its command went out; ``keepalive``: a standing
        command was re-sent instead."""
        self._child(self._decisions, _label(action, "decision action")).inc()
        if sent:
            self._commands.inc()
        if keepalive:
            self._keepalives.inc()

    def detector(self, name: str, scores: np.ndarray, flags: np.ndarray) -> None:
        """One batch through detector ``name``: (N,) scores and (N,) flags (True = flagged).

        Non-finite scores count in neither the histogram nor its sum, but their flags
        count.
        """
        label = _label(name, "detector name")
        s = np.asarray(scores, dtype=np.float64)
        f = np.asarray(flags)
        if s.ndim != 1 or f.shape != s.shape:
            raise ConfigError(f"detector '{label}' gave scores {s.shape} and flags {f.shape}",
                              "pass one score and one flag per crop, both shaped (N,)")
        self._child(self._flags, label).inc(int(np.count_nonzero(f)))
        hist = self._child(self._scores, label)
        for value in s[np.isfinite(s)].tolist():
            hist.observe(value)

    def drift(self, state: Mapping[str, Mapping[str, Any]]) -> None:
        """The drift monitor's state: ``{statistic: {"value", "threshold", "alarm"}}``.

        "threshold" may be left out; an alarm counts as raised when it turns on.
        """
        rows = []
        for stat, entry in state.items():
            if not isinstance(entry, Mapping) or "value" not in entry or "alarm" not in entry:
                raise ConfigError(f"drift statistic '{stat}' is {entry!r}",
                                  'give each statistic {"value": float, "threshold": float, '
                                  '"alarm": bool}')
            threshold = entry.get("threshold")
            rows.append((_label(stat, "drift statistic"), float(entry["value"]),
                         None if threshold is None else float(threshold),
                         bool(entry["alarm"])))
        for stat, value, threshold, alarm in rows:
            self._child(self._drift_value, stat).set(value)
            if threshold is not None:
                self._child(self._drift_threshold, stat).set(threshold)
            self._child(self._drift_alarm, stat).set(1.0 if alarm else 0.0)
            raised = self._child(self._drift_raised, stat)  # shows 0 before the first alarm
            if alarm and not self._alarm_on.get(stat, False):
                raised.inc()
            self._alarm_on[stat] = alarm

    def actuator(self, up: bool, state: str) -> None:
        """The actuator link: ``up`` (1/0) and its state name, one-hot in
        ``actuator_state`` (see ``actuator_link_state``)."""
        self._actuator_up.set(1.0 if up else 0.0)
        if state != self._state:
            new = self._child(self._actuator_state, _label(state, "actuator state"))
            if self._state is not None:
                self._child(self._actuator_state, self._state).set(0.0)
            new.set(1.0)
            self._state = state

    def cautious(self, on: bool) -> None:
        """Whether the policy is in its cautious mode."""
        self._cautious.set(1.0 if on else 0.0)


def actuator_link_state(actuator: object) -> tuple[bool, str]:
    """``(up, state)`` for ``EdgeMetrics.actuator``, from what the actuator exposes.

    An actuator with a serial link (``SerialActuator``): up while the link has a session
    with the board; state "closed" when the link is shut, "disconnected" while it has no
    session, else the board's own state: "armed", or "safe" (latched, refusing commands).
    Any other actuator (``RecordingActuator``): "closed" once its ``closed`` flag is set,
    else "in_process", up.
    """
    link = getattr(actuator, "link", None)
    if link is not None:
        if not getattr(link, "is_open", True):
            return False, "closed"
        st = link.state
        if not st.connected:
            return False, "disconnected"
        from actuator.messages import STATE_NAMES  # loaded with the link already

        return True, STATE_NAMES.get(st.device_state, str(st.device_state))
    if getattr(actuator, "closed", False):
        return False, "closed"
    return True, "in_process"
