"""The edge loop's watch over its own inputs: detectors, drift, caution and metrics.

``Monitoring`` gathers what the loop may run beside the classifier: a ``DetectorSet``
(``edge_runtime.detectors``: a flagged crop does not vote), a ``DriftMonitor``
(``edge_runtime.drift``), a ``CautionGate`` (``edge_runtime.caution``: too many flags of
late and the policy goes cautious) and ``EdgeMetrics`` (``edge_runtime.metrics``). It keeps
the run's counts and the series a plot shows, and turns them into the loop report's
``monitor`` section:

``{"detectors": [names], "thresholds": {name: t}, "scored": crops scored,
"flagged": crops flagged by any detector, "flagged_by": {name: n}, "flag_rate": flagged /
scored or None, "drift": whether a drift monitor ran, "drift_events": [DriftEvent dicts],
"drift_alarms": [statistics alarmed at the end],
"caution_events": [{"frame", "state": "on" | "off", "reason"}],
"series": {"score:NAME": [[frame, score], ...], "drift:STATISTIC": [[frame, value,
threshold], ...], "flag_rate": [[frame, rate], ...]}}``

Each series keeps at most ``SERIES_POINTS`` points: when full it drops every other point
and from then on keeps every second one (then every fourth, ...), so a long run still
plots end to end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .caution import CautionGate
    from .detectors import DetectorSet
    from .drift import DriftEvent, DriftMonitor
    from .metrics import EdgeMetrics

SERIES_POINTS = 2000


class Series:
    """Points of one quantity over the run, thinned by halves to stay under ``limit``."""

    def __init__(self, limit: int = SERIES_POINTS) -> None:
        self.limit = limit
        self.points: list[list[float]] = []
        self._stride = 1
        self._seen = 0

    def add(self, *point: float) -> None:
        if self._seen % self._stride == 0:
            self.points.append([round(float(v), 6) for v in point])
            if len(self.points) > self.limit:
                self.points = self.points[::2]
                self._stride *= 2
        self._seen += 1


@dataclass
class Monitoring:
    """What watches the loop's inputs; every part optional."""

    detectors: DetectorSet | None = None
    drift: DriftMonitor | None = None
    caution: CautionGate | None = None
    metrics: EdgeMetrics | None = None
    scored: int = 0
    flagged: int = 0
    flagged_by: dict[str, int] = field(default_factory=dict)
    drift_events: list[dict[str, Any]] = field(default_factory=list)
    caution_events: list[dict[str, Any]] = field(default_factory=list)
    series: dict[str, Series] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return any(p is not None for p in (self.detectors, self.drift, self.caution,
                                           self.metrics))

    def reset(self) -> None:
        """Clear the run's counts and series (a new ``run`` starts from nothing)."""
        self.scored = self.flagged = 0
        self.flagged_by = {}
        self.drift_events, self.caution_events = [], []
        self.series = {}

    def _series(self, name: str) -> Series:
        if name not in self.series:
            self.series[name] = Series()
        return self.series[name]

    def detected(self, frame: int, scores: dict[str, np.ndarray], flags: np.ndarray) -> None:
        """Count one frame's crops, their scores and flags (any detector)."""
        assert self.detectors is not None
        self.scored += len(flags)
        self.flagged += int(flags.sum())
        for name, values in scores.items():
            own = getattr(self.detectors, name).flags(values)
            self.flagged_by[name] = self.flagged_by.get(name, 0) + int(own.sum())
            for v in values:
                self._series(f"score:{name}").add(frame, v if np.isfinite(v) else -1.0)
            if self.metrics is not None:
                self.metrics.detector(name, values, own)

    def caution_update(self, frame: int, flags: np.ndarray) -> tuple[bool, str | None]:
        """Feed the caution gate; (changed, reason) as ``CautionGate.update``."""
        if self.caution is None:
            return False, None
        changed, reason = self.caution.update(flags)
        self._series("flag_rate").add(frame, self.caution.rate)
        if changed:
            self.caution_events.append({"frame": frame, "state": "on" if reason else "off",
                                        "reason": reason})
        if self.metrics is not None:
            self.metrics.cautious(self.caution.active)
        return changed, reason

    def drift_poll(self) -> list[DriftEvent]:
        """The drift alarms switched since the last poll; also records and exports them."""
        if self.drift is None:
            return []
        events = self.drift.poll()
        self.drift_events.extend(e.to_dict() for e in events)
        if self.metrics is not None:
            self.metrics.drift(self.drift.state())
        return events

    def summary(self) -> dict[str, Any]:
        """The loop report's ``monitor`` section (see the module docstring)."""
        series = {name: s.points for name, s in self.series.items()}
        if self.drift is not None:
            for record in self.drift.history:
                series.setdefault(f"drift:{record.statistic}", []).append(
                    [record.frame, round(float(record.value), 6),
                     round(float(record.threshold), 6)])
        names = list(self.detectors.names) if self.detectors is not None else []
        return {"detectors": names,
                "thresholds": dict(self.detectors.thresholds) if self.detectors else {},
                "scored": self.scored, "flagged": self.flagged,
                "flagged_by": {n: self.flagged_by.get(n, 0) for n in names},
                "flag_rate": round(self.flagged / self.scored, 6) if self.scored else None,
                "drift": self.drift is not None, "drift_events": list(self.drift_events),
                "drift_alarms": self.drift.alarms if self.drift is not None else [],
                "caution_events": list(self.caution_events), "series": series}
