"""The Jetson set-up: the systemd unit (checked by ``systemd-analyze verify`` where it is
installed, and always against the directives systemd 249, JetPack 6's, knows), its
sandbox and watchdog settings, the environment file it reads, and ``setup.sh --dry-run``
(each step printed, nothing done; the actuator key installed 0600 for the service user).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
JETSON = ROOT / "scripts" / "jetson"
UNIT = JETSON / "roadshield-edge.service"
ENV_FILE = JETSON / "roadshield-edge.env"
SETUP = JETSON / "setup.sh"
R36 = "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, " \
      "DATE: Wed Jan  8 01:49:37 UTC 2025\n"

#: every directive the unit may use, with the systemd version that added it (from the
#: systemd.unit(5) / systemd.service(5) / systemd.exec(5) / systemd.resource-control(5)
#: "Added in version" notes and NEWS); JetPack 6 (Ubuntu 22.04) runs systemd 249
SYSTEMD_249 = 249
DIRECTIVES: dict[str, dict[str, int]] = {
    "Unit": {"Description": 1, "Documentation": 201, "Wants": 1, "After": 1,
             "StartLimitIntervalSec": 230, "StartLimitBurst": 230},
    "Service": {
        "Type": 1, "NotifyAccess": 1, "EnvironmentFile": 1, "Environment": 1,
        "ExecStartPre": 1, "ExecStart": 1, "TimeoutStartSec": 1, "WatchdogSec": 1,
        "Restart": 1, "RestartSec": 1, "KillSignal": 1, "TimeoutStopSec": 1,
        "SuccessExitStatus": 1, "User": 1, "Group": 1, "SupplementaryGroups": 1, "UMask": 1,
        "NoNewPrivileges": 187, "CapabilityBoundingSet": 1, "AmbientCapabilities": 229,
        "ProtectSystem": 232, "ProtectHome": 214, "PrivateTmp": 1, "BindPaths": 233,
        "ReadOnlyPaths": 231, "ReadWritePaths": 231, "ProtectKernelTunables": 232,
        "ProtectKernelModules": 232, "ProtectKernelLogs": 244, "ProtectControlGroups": 232,
        "ProtectClock": 245, "ProtectHostname": 242, "ProtectProc": 247,
        "RestrictSUIDSGID": 242, "RestrictRealtime": 231, "RestrictNamespaces": 233,
        "LockPersonality": 235, "RemoveIPC": 232, "MemoryDenyWriteExecute": 231,
        "SystemCallArchitectures": 213, "SystemCallFilter": 187, "SystemCallErrorNumber": 209,
        "RestrictAddressFamilies": 211, "IPAddressDeny": 235, "IPAddressAllow": 235,
        "PrivateDevices": 209, "DevicePolicy": 1, "DeviceAllow": 1},
    "Install": {"WantedBy": 1},
}


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """A unit file as {section: [(key, value), ...]}: comments dropped, continuation lines
    (a trailing backslash) joined, repeated keys kept in order."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith(("#", ";"))):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        if current is None or "=" not in line:
            raise AssertionError(f"not a unit-file line: {raw!r}")
        key, value = line.split("=", 1)
        current.append((key.strip(), value.strip()))
    return sections


@pytest.fixture(scope="module")
def unit() -> dict[str, list[tuple[str, str]]]:
    return parse_unit(UNIT.read_text())


def values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def one(unit: dict[str, list[tuple[str, str]]], key: str, section: str = "Service") -> str:
    found = values(unit, section, key)
    assert len(found) == 1, (key, found)
    return found[0]


def check_directives(text: str) -> list[str]:
    """What systemd 249 would not understand: unknown sections, unknown or newer keys."""
    problems = []
    for section, entries in parse_unit(text).items():
        known = DIRECTIVES.get(section)
        if known is None:
            problems.append(f"unknown section [{section}]")
            continue
        for key, _ in entries:
            if key not in known:
                problems.append(f"[{section}] {key}: not a directive this test knows")
            elif known[key] > SYSTEMD_249:
                problems.append(f"[{section}] {key}: needs systemd {known[key]}")
    return problems


def systemd_analyze_verify(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify`` on the unit inside a throwaway root holding this host's
    system units and a stub for each program the unit starts (verify checks they exist)."""
    root = tmp_path / "root"
    for system in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if system.is_dir():
            shutil.copytree(system, root / "usr/lib/systemd/system", symlinks=True,
                            dirs_exist_ok=True)
            break
    parsed = parse_unit(UNIT.read_text())
    for key in ("ExecStartPre", "ExecStart"):
        for command in values(parsed, "Service", key):
            program = root / command.split()[0].lstrip("-@:+!").lstrip("/")
            program.parent.mkdir(parents=True, exist_ok=True)
            program.write_text("#!/bin/sh\n")
            program.chmod(0o755)
    target = root / "etc/systemd/system" / UNIT.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(UNIT, target)
    # --man=no: the Documentation= man pages need not be installed where this runs
    return subprocess.run(["systemd-analyze", "verify", "--man=no", f"--root={root}",
                           UNIT.name], capture_output=True, text=True, timeout=60)


# --- the unit -------------------------------------------------------------------------------

def test_every_directive_is_one_systemd_249_knows() -> None:
    assert check_directives(UNIT.read_text()) == []
    # the check itself catches a typo and a directive newer than JetPack 6's systemd
    DIRECTIVES["Service"]["ProtectFoo"] = 999
    try:
        bad = UNIT.read_text().replace("UMask=0077", "UMask=0077\nProtectFoo=yes\nProtectBar=1")
        assert check_directives(bad) == ["[Service] ProtectFoo: needs systemd 999",
                                         "[Service] ProtectBar: not a directive this test knows"]
    finally:
        del DIRECTIVES["Service"]["ProtectFoo"]


def test_the_unit_verifies(tmp_path: Path, record_property: pytest.RecordProperty) -> None:
    """``systemd-analyze verify`` where systemd is installed (CI, a Jetson); elsewhere the
    directive check above stands in, so the test never skips."""
    if shutil.which("systemd-analyze") is None:
        record_property("checked_with", "directive list (no systemd-analyze)")
        assert check_directives(UNIT.read_text()) == []
        return
    record_property("checked_with", "systemd-analyze verify")
    result = systemd_analyze_verify(tmp_path)
    # verify exits 0 even for an unknown key or a bad value; it warns on stderr instead
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_systemd_analyze_reports_what_the_unit_must_not_hold(tmp_path: Path) -> None:
    """The verify check above can fail: a misspelt directive and a bad value are reported."""
    if shutil.which("systemd-analyze") is None:
        assert check_directives("[Service]\nWatchdogSek=10s\n") != []
        return
    good = UNIT.read_text()
    broken = tmp_path / "broken" / UNIT.name
    broken.parent.mkdir()
    broken.write_text(good.replace("WatchdogSec=10s", "WatchdogSek=10s\nRestartSec=soon"))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(broken)],
                            capture_output=True, text=True, timeout=60)
    assert "WatchdogSek" in result.stderr and "soon" in result.stderr


def test_the_loop_is_a_watched_notify_service_that_restarts_on_failure(unit) -> None:
    assert one(unit, "Type") == "notify" and one(unit, "NotifyAccess") == "main"
    assert one(unit, "WatchdogSec") == "10s" and one(unit, "Restart") == "on-failure"
    assert one(unit, "StartLimitBurst", "Unit") == "5"
    assert one(unit, "StartLimitIntervalSec", "Unit") == "10min"
    # SIGINT is KeyboardInterrupt in Python: the loop brakes, then exits 130 (a clean stop)
    assert one(unit, "KillSignal") == "SIGINT" and one(unit, "SuccessExitStatus") == "130"
    assert values(unit, "Install", "WantedBy") == ["multi-user.target"]


def test_the_sandbox(unit) -> None:
    assert (one(unit, "User"), one(unit, "Group")) == ("roadshield", "roadshield")
    assert set(one(unit, "SupplementaryGroups").split()) == {"dialout", "video"}
    for key, value in {"ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
                       "NoNewPrivileges": "yes", "CapabilityBoundingSet": "",
                       "AmbientCapabilities": "", "DevicePolicy": "closed",
                       "PrivateDevices": "no", "RestrictSUIDSGID": "yes"}.items():
        assert one(unit, key) == value, key
    read_only = one(unit, "ReadOnlyPaths").split()
    assert "/var/lib/roadshield/bundle" in read_only and "/etc/roadshield" in read_only
    assert one(unit, "ReadWritePaths").split() == ["/var/lib/roadshield/engines",
                                                   "/var/log/roadshield"]


def test_only_the_jetson_nodes_the_loop_needs_may_be_opened(unit) -> None:
    allowed = [value.split() for value in values(unit, "Service", "DeviceAllow")]
    assert all(len(a) == 2 and a[1] == "rw" for a in allowed)
    nodes = {a[0] for a in allowed}
    assert {"/dev/nvmap", "/dev/nvhost-ctrl-gpu", "/dev/nvhost-gpu", "/dev/nvhost-as-gpu",
            "/dev/nvgpu/igpu0/ctrl"} <= nodes  # the GPU
    assert "char-video4linux" in nodes  # /dev/video*
    assert {"char-ttyACM", "char-ttyUSB"} <= nodes  # the actuator behind its udev symlink
    # path specifications take no globs (systemd.resource-control(5)): each is one node
    assert not [n for n in nodes if n.startswith("/dev/") and any(c in n for c in "*?[")]


def test_the_unit_and_its_environment_file_agree(unit) -> None:
    env = dict(line.split("=", 1) for line in ENV_FILE.read_text().splitlines()
               if line and not line.startswith("#"))
    commands = " ".join(values(unit, "Service", "ExecStart"))
    used = set(re.findall(r"\$\{?(ROADSHIELD_\w+)\}?", commands))
    assert used and used <= set(env), used - set(env)
    assert env["ROADSHIELD_ENGINE_CACHE"] in one(unit, "ReadWritePaths").split()
    assert env["ROADSHIELD_BUNDLE"] in one(unit, "ReadOnlyPaths").split()
    assert "/var/log/roadshield/" in env["ROADSHIELD_EDGE_ARGS"]  # a writable log folder
    assert one(unit, "EnvironmentFile") == "/etc/roadshield/edge.env"
    assert "roadshield-prepare-engine" in one(unit, "ExecStartPre")


# --- setup.sh -------------------------------------------------------------------------------

def run_setup(tmp_path: Path, *args: str, release: str = R36,
              path_prefix: Path | None = None) -> subprocess.CompletedProcess[str]:
    release_file = tmp_path / "nv_tegra_release"
    release_file.write_text(release)
    env = {**os.environ, "NV_TEGRA_RELEASE": str(release_file)}
    if path_prefix is not None:
        env["PATH"] = f"{path_prefix}:{env['PATH']}"
    return subprocess.run(["bash", str(SETUP), *args], capture_output=True, text=True,
                          env=env, timeout=60)


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "model.sig").write_text("{}")
    (tmp_path / "bundle.pub").write_text("public key")
    (tmp_path / "board.key").write_text("secret")
    return {"bundle": bundle, "trust": tmp_path / "bundle.pub", "key": tmp_path / "board.key"}


def test_dry_run_prints_every_step_and_changes_nothing(tmp_path: Path,
                                                       inputs: dict[str, Path]) -> None:
    before = {p: p.exists() for p in map(Path, ("/etc/roadshield", "/opt/roadshield",
                                                 "/var/lib/roadshield",
                                                 "/etc/systemd/system/roadshield-edge.service"))}
    result = run_setup(tmp_path, "--dry-run", "--bundle", str(inputs["bundle"]),
                       "--trust-key", str(inputs["trust"]), "--actuator-key", str(inputs["key"]))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "L4T R36.4.3" in out
    steps = [line[2:] for line in out.splitlines() if line.startswith("+ ")]
    expected = [
        r"useradd --system --user-group --groups dialout,video --shell /usr/sbin/nologin .* "
        r"roadshield$",
        r"python3 -m venv --system-site-packages /opt/roadshield/venv$",
        rf"/opt/roadshield/venv/bin/python -m pip install --upgrade 'numpy>=1.24,<2' "
        rf"'{re.escape(str(ROOT))}\[jetson\]'$",
        r"env PATH=.* ROADSHIELD_KERNEL_BUILD=/opt/roadshield/kernels .* -m kernels.build$",
        rf"install -m 0644 -o root -g root {re.escape(str(UNIT))} "
        r"/etc/systemd/system/roadshield-edge.service$",
        r"install -m 0644 -o root -g root .*/actuator/99-roadshield-actuator.rules "
        r"/etc/udev/rules.d/99-roadshield-actuator.rules$",
        r"install -d -m 0750 -o root -g roadshield /etc/roadshield$",
        r"install -m 0640 -o root -g roadshield .*/bundle.pub /etc/roadshield/bundle.pub$",
        rf"install -m 0600 -o roadshield -g roadshield {re.escape(str(inputs['key']))} "
        r"/etc/roadshield/actuator.key$",
        r"install -d -m 0700 -o roadshield -g roadshield /var/lib/roadshield/engines$",
        r"install -d -m 0750 -o roadshield -g roadshield /var/log/roadshield$",
        rf"cp -R {re.escape(str(inputs['bundle']))} /var/lib/roadshield/bundle.new$",
        r"mv /var/lib/roadshield/bundle.new /var/lib/roadshield/bundle$",
        r"udevadm control --reload$",
        r"systemctl daemon-reload$",
        r"systemctl enable roadshield-edge.service$",
    ]
    positions = []
    for pattern in expected:
        hits = [i for i, step in enumerate(steps) if re.match(pattern, step)]
        assert len(hits) == 1, (pattern, steps)
        positions.append(hits[0])
    assert positions == sorted(positions)  # in this order
    assert not [s for s in steps if s.startswith("systemctl restart")]  # no --start
    assert {p: p.exists() for p in before} == before


def test_dry_run_with_an_existing_user_only_adds_the_groups(tmp_path: Path) -> None:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "id").write_text('#!/bin/sh\n[ "$1" = -u ] && echo 1000 || exit 0\n')
    (fake_bin / "id").chmod(0o755)
    result = run_setup(tmp_path, "--dry-run", "--start", path_prefix=fake_bin)
    assert result.returncode == 0, result.stderr
    steps = [line[2:] for line in result.stdout.splitlines() if line.startswith("+ ")]
    assert "usermod --append --groups dialout,video --shell /usr/sbin/nologin roadshield" \
        in steps
    assert not [s for s in steps if s.startswith("useradd")]
    assert "not root: fine for a dry run" in result.stdout
    assert steps[-1] == "systemctl restart roadshield-edge.service"


@pytest.mark.parametrize("release, message", [
    ("# R35 (release), REVISION: 5.0, GCID: 1\n", "L4T R35.5.0 is not JetPack 6"),
    ("Ubuntu 22.04\n", "cannot read the L4T release"),
])
def test_only_jetpack_6_is_set_up(tmp_path: Path, release: str, message: str) -> None:
    result = run_setup(tmp_path, "--dry-run", release=release)
    assert result.returncode == 2 and message in result.stderr
    assert "+ " not in result.stdout  # it stopped before the first step


def test_bad_arguments_stop_before_any_step(tmp_path: Path) -> None:
    result = run_setup(tmp_path, "--dry-run", "--bundle", str(tmp_path))
    assert result.returncode == 2 and "not a signed bundle" in result.stderr
    result = run_setup(tmp_path, "--dry-run", "--frobnicate")
    assert result.returncode == 2 and "unknown option --frobnicate" in result.stderr


def test_the_scripts_are_valid_shell(tmp_path: Path) -> None:
    """shellcheck where it is installed; ``bash -n`` (syntax) everywhere."""
    assert subprocess.run(["bash", "-n", str(SETUP)], capture_output=True, text=True,
                          timeout=30).returncode == 0
    broken = tmp_path / "broken.sh"
    broken.write_text(SETUP.read_text().replace("fi\n", "", 1))
    assert subprocess.run(["bash", "-n", str(broken)], capture_output=True,
                          timeout=30).returncode != 0
    if shutil.which("shellcheck") is not None:
        result = subprocess.run(["shellcheck", "--shell=bash", str(SETUP)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout
