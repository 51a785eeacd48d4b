"""The sd_notify protocol against a real AF_UNIX datagram socket standing in for systemd:
READY after the first frame, WATCHDOG pings at half of WATCHDOG_USEC, STATUS, STOPPING;
the abstract-namespace form; nothing at all without NOTIFY_SOCKET. The message format is
sd_notify(3)'s: newline-separated KEY=value lines in one datagram."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_loop import ListSource, frame, make_loop

from edge_runtime.frames import Frame
from edge_runtime.sdnotify import Notifier, socket_address, watchdog_interval
from roadshield_base.errors import ConfigError


def _fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().split("\n"))


class Systemd:
    """The receiving end: a datagram socket bound where NOTIFY_SOCKET points."""

    def __init__(self, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"roadshield-test-{os.getpid()}-{id(self)}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            # a short folder: AF_UNIX paths stop at 107 bytes, pytest's tmp_path may not
            self.folder = tempfile.mkdtemp(prefix="sdn")
            self.address = os.path.join(self.folder, "notify")
            self.sock.bind(self.address)
        self.sock.setblocking(False)

    def received(self) -> list[dict[str, str]]:
        out = []
        while True:
            try:
                out.append(_fields(self.sock.recv(4096)))
            except BlockingIOError:
                return out

    def close(self) -> None:
        self.sock.close()
        if not self.address.startswith("@"):
            os.unlink(self.address)
            os.rmdir(self.folder)


@pytest.fixture
def systemd() -> Iterator[Systemd]:
    receiver = Systemd()
    yield receiver
    receiver.close()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# --- the protocol ---------------------------------------------------------------------------

def test_socket_addresses_and_watchdog_settings_from_the_environment() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@sd-notify") == b"\0sd-notify"
    for bad in ("run/notify", "@", "vsock:2:1234"):
        with pytest.raises(ConfigError):
            socket_address(bad)
    # sd_watchdog_enabled(3): ping at half the timeout, and only in the named process
    assert watchdog_interval({"WATCHDOG_USEC": "10000000"}) == 5.0
    assert watchdog_interval({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())}) \
        == 5.0
    assert watchdog_interval({"WATCHDOG_USEC": "10000000",
                              "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert watchdog_interval({}) is None
    for bad in ("0", "-5", "ten"):
        with pytest.raises(ConfigError, match="WATCHDOG_USEC"):
            watchdog_interval({"WATCHDOG_USEC": bad})


def test_ready_watchdog_at_half_the_timeout_and_stopping(systemd: Systemd) -> None:
    clock = Clock()
    notify = Notifier(systemd.address, watchdog_interval({"WATCHDOG_USEC": "1000000"}),
                      clock=clock)
    assert notify.enabled and notify.watchdog_s == 0.5
    assert notify.ready("loaded")
    pings_at = []
    for step in range(1, 31):  # one call every 0.1 s for 3 s
        clock.now = step / 10
        if notify.tick(lambda: f"t={clock.now:.1f}"):
            pings_at.append(clock.now)
    notify.stopping("bye")
    notify.close()
    assert pings_at == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
    got = systemd.received()
    assert got[0] == {"READY": "1", "STATUS": "loaded", "WATCHDOG": "1"}
    assert got[1:-1] == [{"WATCHDOG": "1", "STATUS": f"t={t:.1f}"} for t in pings_at]
    assert got[-1] == {"STOPPING": "1", "STATUS": "bye"}
    assert notify.sent == len(got)


def test_the_abstract_namespace_and_status_without_a_watchdog() -> None:
    receiver = Systemd(abstract=True)
    try:
        clock = Clock()
        notify = Notifier.from_env({"NOTIFY_SOCKET": receiver.address})
        notify._clock = clock
        assert notify.watchdog_s is None
        notify.ready("up")
        clock.now = 1.0
        assert not notify.tick(lambda: "early")  # STATUS only every STATUS_INTERVAL_S
        clock.now = 5.0
        assert notify.tick(lambda: "later")
        notify.close()
        assert receiver.received() == [{"READY": "1", "STATUS": "up"}, {"STATUS": "later"}]
    finally:
        receiver.close()


def test_without_notify_socket_nothing_is_sent_and_a_newline_is_refused(
        systemd: Systemd) -> None:
    quiet = Notifier.from_env({"WATCHDOG_USEC": "1000"})
    assert not quiet.enabled
    assert not quiet.ready("x") and not quiet.tick(lambda: "y") and not quiet.stopping("z")
    with pytest.raises(ConfigError, match="newline"):
        Notifier(systemd.address).send(STATUS="two\nlines")


def test_a_vanished_socket_is_logged_once_and_never_raised(
        systemd: Systemd, caplog: pytest.LogCaptureFixture) -> None:
    notify = Notifier(systemd.address, 1e-9)
    systemd.close()
    systemd.close = lambda: None  # type: ignore[method-assign]
    assert not notify.ready("a") and not notify.tick() and not notify.stopping("b")
    assert caplog.text.count("sd_notify") == 1


# --- from the edge loop ---------------------------------------------------------------------

class WatchedSource(ListSource):
    """Records what systemd had received before each frame was read."""

    def __init__(self, frames: list[Frame], systemd: Systemd) -> None:
        super().__init__(frames)
        self.systemd = systemd
        self.before: list[list[dict[str, str]]] = []

    def __iter__(self) -> Iterator[Frame]:
        for item in self.frames:
            self.before.append(self.systemd.received())
            yield item


def _run_loop(tmp_path: Path, systemd: Systemd, monkeypatch: pytest.MonkeyPatch,
              watchdog_usec: str, frames: int = 6) -> tuple[WatchedSource, list, object]:
    monkeypatch.setenv("NOTIFY_SOCKET", systemd.address)
    monkeypatch.setenv("WATCHDOG_USEC", watchdog_usec)
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    loop, _ = make_loop([frame(i, "red", "stop") for i in range(frames)], tmp_path)
    source = WatchedSource(loop.source.frames, systemd)  # type: ignore[attr-defined]
    loop.source = source
    report = loop.run(progress=True)
    return source, systemd.received(), report


def test_the_loop_is_ready_after_its_first_frame_and_feeds_the_watchdog_every_frame(
        tmp_path: Path, systemd: Systemd, monkeypatch: pytest.MonkeyPatch) -> None:
    # WATCHDOG_USEC=2: a ping is due every microsecond, so every frame sends one
    source, after, report = _run_loop(tmp_path, systemd, monkeypatch, "2")
    assert source.before[0] == []  # model loaded, but no frame yet: not ready
    ready = source.before[1]
    assert len(ready) == 1 and ready[0]["READY"] == "1" and ready[0]["WATCHDOG"] == "1"
    assert "colour-fake" in ready[0]["STATUS"]
    seen = [m for batch in source.before[2:] for m in batch] + after
    pings = [m for m in seen if m.get("WATCHDOG") == "1"]
    assert len(pings) == report.frames - 1  # frames 2..6; frame 1 pinged with READY
    assert all("frames" in m["STATUS"] and "fps" in m["STATUS"] for m in pings)
    assert seen[-1] == {"STOPPING": "1", "STATUS": "stopping after 6 frames"}


def test_the_loop_pings_no_faster_than_half_the_watchdog_timeout(
        tmp_path: Path, systemd: Systemd, monkeypatch: pytest.MonkeyPatch) -> None:
    # an hour's timeout: after READY (which pings), no frame is due another ping
    source, after, _ = _run_loop(tmp_path, systemd, monkeypatch, str(3600 * 10**6))
    messages = [m for batch in source.before for m in batch] + after
    assert [m.get("READY") for m in messages] == ["1", None]
    assert messages[-1]["STOPPING"] == "1"


def test_a_loop_that_fails_before_its_first_frame_never_says_ready(
        tmp_path: Path, systemd: Systemd, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", systemd.address)
    loop, actuator = make_loop([frame(0, "red", "stop")], tmp_path)
    loop.source = ListSource(loop.source.frames, interrupt_at=0)  # type: ignore[attr-defined]
    with pytest.raises(KeyboardInterrupt):
        loop.run(progress=False)
    assert systemd.received() == [{"STOPPING": "1",
                                   "STATUS": "stopping after 0 frames: KeyboardInterrupt"}]
    assert actuator.safe_stops  # the brake comes first, as without systemd
