"""The host link against the simulator through real pseudo-terminals (bounded timeouts).

Behaviour only: how fast the board reaches its safe state is measured by
``scripts/bench_actuator.py``, not asserted here.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import serial

from actuator import messages as m
from actuator import protocol as p
from actuator.interface import ActuatorCommand
from actuator.keys import load_key, save_key
from actuator.link import SerialLink, open_serial
from actuator.provision import provision_device, rotate_key
from actuator.scenarios import TEST_KEY
from actuator.serial_actuator import SerialActuator, command_to_setpoint
from actuator.simulator import PtySimulator
from roadshield_base.errors import ActuatorError


@pytest.fixture
def sim():
    with PtySimulator(TEST_KEY) as s:
        yield s


def test_connects_on_hello_and_round_trips_a_setpoint(sim):
    with SerialLink(sim.port, TEST_KEY, hello_timeout_s=3.0) as link:
        assert link.state.connected and link.state.firmware == "2.0.0"
        assert link.arm().result == m.RESULT_OK
        t0 = time.monotonic()
        seq = link.send_setpoint(100, 0, 600, 1000)
        st = link.wait_status(lambda s: s.sp_seq == seq, 2.0, after=t0)
        assert st is not None and (st.state, st.brake, st.throttle) == (m.STATE_ARMED, 100, 600)
        assert sim.snapshot()["thr"] == 600


def wait_for(cond, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_device_brakes_after_host_silence_and_the_link_follows(sim):
    with SerialLink(sim.port, TEST_KEY) as link:
        for trial in range(3):
            assert wait_for(lambda n=trial + 1: link.state.sessions == n, 2.0)
            time.sleep(0.02)  # a heartbeat in this session, so ARM is fresh
            assert link.arm().result == m.RESULT_OK
            link.send_setpoint(0, 0, 500, 60_000)
            time.sleep(0.06)
            link.heartbeat_enabled = False
            silent_from = link.last_heartbeat_t
            assert wait_for(lambda t=silent_from: sim.safe_since(t) is not None, 2.0)
            snap = sim.snapshot()
            assert (snap["state"], snap["fault"], snap["brake"], snap["thr"]) == \
                (m.STATE_SAFE, m.FAULT_LINK_TIMEOUT, 1000, 0)
            link.heartbeat_enabled = True


def test_latched_after_timeout_until_explicit_rearm(sim):
    with SerialLink(sim.port, TEST_KEY) as link:
        link.arm()
        sessions = link.state.sessions
        link.heartbeat_enabled = False
        time.sleep(0.4)
        link.heartbeat_enabled = True
        deadline = time.monotonic() + 2.0
        while link.state.sessions == sessions and time.monotonic() < deadline:
            time.sleep(0.01)
        t0 = time.monotonic()
        link.send_setpoint(0, 0, 500, 1000)
        st = link.wait_status(lambda s: True, 2.0, after=t0)
        assert st is not None and st.state == m.STATE_SAFE
        assert st.fault == m.FAULT_LINK_TIMEOUT and st.brake == 1000
        time.sleep(0.06)  # a fresh heartbeat in the new session
        assert link.arm().result == m.RESULT_OK


def test_serial_actuator_maps_commands_and_safe_stop(sim):
    with SerialActuator(sim.port, TEST_KEY, max_speed_kmh=50.0) as act:
        t0 = time.monotonic()
        act.send(ActuatorCommand(30.0, 0.0, 0.7, 500, "speed_limit_30"))
        st = act.link.wait_status(lambda s: s.throttle == 600, 2.0, after=t0)
        assert st is not None and st.brake == 0
        assert sim.snapshot()["target"] == 0  # steering is neutral-limited on the host
        act.safe_stop("test")
        snap = sim.snapshot()
        assert (snap["state"], snap["fault"], snap["brake"]) == (0, m.FAULT_HOST_BRAKE, 1000)
        with pytest.raises(ActuatorError, match="latched"):
            act.send(ActuatorCommand(30.0, 0.0))


def test_host_never_asks_more_than_the_policy_limit():
    sp = command_to_setpoint(ActuatorCommand(120.0, 0.25, -1.0, 70_000), max_speed_kmh=40.0)
    assert (sp.throttle, sp.brake, sp.steering, sp.ttl_ms) == (1000, 250, 0, 65535)
    sp = command_to_setpoint(ActuatorCommand(10.0, 0.0, 0.5), 40.0, steering_limit=0.2)
    assert (sp.throttle, sp.steering) == (250, 200)


def test_key_mismatch_gives_one_clear_message(sim):
    with pytest.raises(ActuatorError, match="key mismatch") as err:
        SerialLink(sim.port, bytes(range(50, 82)), hello_timeout_s=1.0).open()
    assert "provision" in err.value.hint


def test_device_that_never_says_hello():
    master, slave = os.openpty()
    try:
        with pytest.raises(ActuatorError, match="no HELLO") as err:
            SerialLink(os.ttyname(slave), TEST_KEY, hello_timeout_s=0.3).open()
        assert "firmware" in err.value.hint
    finally:
        os.close(master)
        os.close(slave)


def test_missing_port(tmp_path):
    with pytest.raises(ActuatorError, match="does not exist") as err:
        open_serial(str(tmp_path / "ttyACM9"))
    assert "ls /dev/ttyACM" in err.value.hint


def test_busy_port(sim):
    first = open_serial(sim.port)
    try:
        with pytest.raises(ActuatorError, match="busy") as err:
            open_serial(sim.port)
        assert "ModemManager" in err.value.hint
    finally:
        first.close()


def test_permission_denied_names_udev_rule_and_dialout(monkeypatch):
    def deny(*a, **kw):
        raise serial.SerialException(errno.EACCES, "could not open port /dev/ttyACM0: "
                                                   "[Errno 13] Permission denied")
    monkeypatch.setattr(serial, "Serial", deny)
    with pytest.raises(ActuatorError, match="permission denied") as err:
        open_serial("/dev/ttyACM0")
    assert "dialout" in err.value.hint and "99-roadshield-actuator.rules" in err.value.hint


def test_replayed_hello_does_not_replace_the_live_session(sim):
    # a genuine HELLO recorded from an earlier session, nonce and tag valid: the host
    # joins it but the board never confirms, so the live session stays
    old_nonce = b"\x42" * 8
    hello = p.build_frame(p.HELLO, m.pack_hello(m.Hello(2, 0, 0, 1, old_nonce)), 1, 1,
                          p.derive_hello_key(TEST_KEY, old_nonce), p.FLAG_FROM_DEVICE)
    with SerialLink(sim.port, TEST_KEY) as link:
        sessions, nonce = link.state.sessions, link.state.nonce
        with sim.lock:
            sim._write([hello])  # as if a man in the middle injected it
        assert wait_for(lambda: link.state.unconfirmed_hellos == 1, 3.0)
        st = link.state
        assert st.connected and st.sessions == sessions and st.nonce == nonce
        assert link.arm().result == m.RESULT_OK  # the live session still works
        assert sim.snapshot()["bad_tag"] >= 1  # the JOIN for the replay did not verify


def test_an_ack_for_another_op_is_not_taken_as_the_answer(sim, monkeypatch):
    with SerialLink(sim.port, TEST_KEY) as link:
        time.sleep(0.06)
        original = link._on_frame

        def swap_op(encoded, now):  # the board "answers" BRAKE with an ACK of op ARM
            original(encoded, now)
            with link._cond:
                for seq, ack in list(link._acks.items()):
                    if isinstance(ack, m.Ack) and ack.op == m.OP_BRAKE:
                        link._acks[seq] = m.Ack(seq, m.OP_ARM, m.RESULT_OK)

        monkeypatch.setattr(link, "_on_frame", swap_op)
        with pytest.raises(ActuatorError, match="not the brake sent"):
            link.brake()


def test_provision_needs_the_button_and_agrees_the_key(tmp_path):
    key_file = tmp_path / "board.key"
    sim_key_file = tmp_path / "sim-eeprom.key"
    with PtySimulator(None, key_file=sim_key_file) as s:
        with pytest.raises(ActuatorError, match="not in provisioning mode") as err:
            provision_device(s.port, key_file, hello_timeout_s=3.0)
        assert "D2" in err.value.hint and not key_file.exists()
    with PtySimulator(None, key_file=sim_key_file, provision_button=True) as s:
        res = provision_device(s.port, key_file, hello_timeout_s=3.0)
        assert res.key_file == key_file and load_key(key_file) == load_key(sim_key_file)
        assert oct(key_file.stat().st_mode & 0o777) == "0o600"
        with pytest.raises(ActuatorError, match="already exists"):
            provision_device(s.port, key_file, hello_timeout_s=1.0)
        with pytest.raises(ActuatorError, match="provisioning button"):
            provision_device(s.port, tmp_path / "second.key", hello_timeout_s=1.0)
        with SerialLink(s.port, load_key(key_file)) as link:
            time.sleep(0.06)
            assert link.arm().result == m.RESULT_OK


def test_rotate_key_over_the_pty(tmp_path):
    key_file, sim_key_file = tmp_path / "board.key", tmp_path / "sim-eeprom.key"
    save_key(key_file, TEST_KEY)
    with PtySimulator(TEST_KEY, key_file=sim_key_file) as s:
        rotate_key(s.port, key_file, hello_timeout_s=3.0)
        new_key = load_key(key_file)
        assert new_key != TEST_KEY and new_key == load_key(sim_key_file)
        with pytest.raises(ActuatorError, match="key mismatch"):
            SerialLink(s.port, TEST_KEY, hello_timeout_s=0.5).open()
        with SerialLink(s.port, new_key) as link:
            time.sleep(0.06)
            assert link.arm().result == m.RESULT_OK
            with pytest.raises(ActuatorError, match="refused REKEY"):
                link.rotate_key()  # armed: keys rotate only in the safe state


def _start_sim(link: Path, key_file: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-m", "actuator.simulator", "--link", str(link),
                             "--key-file", str(key_file)], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    assert "simulator on" in line, line
    return proc


def test_reconnects_after_the_simulator_is_killed_and_restarted(tmp_path):
    link_path, key_file = tmp_path / "ttyACM0", tmp_path / "dev.key"
    save_key(key_file, TEST_KEY)
    proc = _start_sim(link_path, key_file)
    try:
        with SerialLink(str(link_path), TEST_KEY, hello_timeout_s=3.0) as link:
            assert link.arm().result == m.RESULT_OK
            first_nonce = link.state.nonce
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=5)
            deadline = time.monotonic() + 3.0
            while link.state.connected and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not link.state.connected
            proc = _start_sim(link_path, key_file)
            assert link.wait_connected(5.0)
            assert link.state.nonce != first_nonce and link.state.reconnects >= 1
            assert link.state.device_state == m.STATE_SAFE  # a fresh board boots safe
            time.sleep(0.06)
            assert link.arm().result == m.RESULT_OK
    finally:
        proc.kill()
        proc.wait(timeout=5)
