"""Strict skips: a skip is allowed only where the machine lacks hardware.

A test may skip itself only when it carries one of the hardware markers (``gpu``, ``trt``,
``hw``). Any other skip (a missing package, a missing tool, an ``importorskip`` of the
project's own code, a module that skips at import) hides a test that CI meant to run, so
with strict skips on it becomes a failure that names the test and its skip reason.

On with ``ROADSHIELD_STRICT_SKIPS=1`` (``make test``, hence CI, sets it) or
``pytest --strict-skips``; loaded from ``tests/conftest.py``.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest

HARDWARE_MARKERS = ("gpu", "trt", "hw")
ENV = "ROADSHIELD_STRICT_SKIPS"
HINT = (f"only tests marked {'/'.join(HARDWARE_MARKERS)} may skip (the machine lacks the "
        "hardware); install what the test needs (pip install -e '.[cpu,cloud,dev]'), or mark "
        "the test with the hardware it really needs")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--strict-skips", action="store_true", default=False,
                     help=f"fail any skip of a test not marked {'/'.join(HARDWARE_MARKERS)} "
                          f"(also on with {ENV}=1)")


def strict_skips_on(config: pytest.Config) -> bool:
    return bool(config.getoption("--strict-skips")) or os.environ.get(ENV, "") not in ("", "0")


def skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    """The reason pytest stored for a skip (its longrepr is (path, line, "Skipped: ..."))."""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        path, line, message = longrepr
        return f"{message} ({path}:{line + 1 if isinstance(line, int) else line})"
    return str(longrepr)


def _fail(report: Any, what: str) -> None:
    reason = skip_reason(report)
    report.outcome = "failed"
    report.longrepr = f"{what} was skipped outside the hardware markers: {reason}\n  hint: {HINT}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail") or not strict_skips_on(item.config):
        return
    if any(item.get_closest_marker(name) is not None for name in HARDWARE_MARKERS):
        return
    _fail(report, item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, None]:
    # a module that skips while importing (module-level importorskip) hides all its tests
    outcome = yield
    report: pytest.CollectReport = outcome.get_result()
    if report.skipped and strict_skips_on(collector.config):
        if any(collector.get_closest_marker(name) is not None for name in HARDWARE_MARKERS):
            return
        _fail(report, f"{collector.nodeid} (every test in it)")
