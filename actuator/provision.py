"""Keying a board over USB: first provisioning (physical presence) and key rotation.

Neither sends the key: the host and the board run an X25519 key agreement and both
derive the device key from it (``actuator.keyx``, PROTOCOL.md "Keys").

* ``provision_device``: the board must have booted with its provisioning button held
  (reference board: D2 to GND; simulator: ``--provision-button``). In that mode it keys
  its session with the all-zero factory key, cannot arm, and accepts one PROVISION; the
  agreed key replaces any key it held. Without the button it refuses PROVISION.
* ``rotate_key``: under the current key, while the board is SAFE, a REKEY agrees a new
  key; the key file is replaced atomically once the board has answered.

Only public keys cross the wire, so a passive listener learns nothing; an active
attacker on the cable during provisioning could still sit in the middle, which is why
provisioning needs the button (someone at the board) and happens once.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from roadshield_base.errors import ActuatorError

from .keys import load_key, save_key
from .link import SerialLink

BUTTON_HINT = ("hold the provisioning button (reference board: D2 to GND) while you reset "
               "or power the board, then run provision again; see actuator/README.md")


@dataclass(frozen=True)
class ProvisionResult:
    port: str
    key_file: Path
    firmware: str


def provision_device(port: str, key_file: str | os.PathLike[str], *,
                     hello_timeout_s: float = 5.0,
                     agree_timeout_s: float = 30.0) -> ProvisionResult:
    """Agree a key with a board in provisioning mode and save it to ``key_file``."""
    path = Path(key_file)
    if path.exists():
        raise ActuatorError(f"key file {path} already exists; refusing to overwrite it",
                            "pick a new file name (the agreed key is written there)")
    link = SerialLink(port, None, hello_timeout_s=hello_timeout_s)
    try:
        link.open()
    except ActuatorError as err:
        if "key mismatch" in str(err):
            raise ActuatorError(f"the board on {port} is provisioned and was not booted "
                                "with its provisioning button held", BUTTON_HINT) from err
        raise
    try:
        if not link.state.provision_mode:
            raise ActuatorError(f"the board on {port} is not in provisioning mode",
                                BUTTON_HINT)
        sessions = link.state.sessions
        key = link.provision(agree_timeout_s)
        save_key(path, key)  # at once: the board already holds it
        if not _wait_new_session(link, sessions, hello_timeout_s):
            raise ActuatorError(f"the board on {port} agreed a key (saved to {path}) but did "
                                "not come back with a session under it",
                                "power-cycle it and run `roadshield actuator status`")
        return ProvisionResult(port, path, link.state.firmware)
    finally:
        link.close()


def rotate_key(port: str, key_file: str | os.PathLike[str], *, hello_timeout_s: float = 5.0,
               agree_timeout_s: float = 30.0) -> ProvisionResult:
    """Replace the board's key (and ``key_file``) by a new agreement under the current key."""
    path = Path(key_file)
    with SerialLink(port, load_key(path), hello_timeout_s=hello_timeout_s) as link:
        sessions = link.state.sessions
        key = link.rotate_key(agree_timeout_s)
        save_key(path, key)  # the old key is dead on the board from here on
        if not _wait_new_session(link, sessions, hello_timeout_s):
            raise ActuatorError(f"the board on {port} rotated its key (saved to {path}) but "
                                "did not come back with a session under it",
                                "power-cycle it and run `roadshield actuator status`")
        return ProvisionResult(port, path, link.state.firmware)


def _wait_new_session(link: SerialLink, sessions: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = link.state
        if st.connected and st.sessions > sessions and st.provisioned \
                and not st.provision_mode:
            return True
        time.sleep(0.01)
    return False
