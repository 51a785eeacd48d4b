"""Writing the per-device key into a new board, once, over USB.

A board leaves the flasher unprovisioned: it keys its sessions with the all-zero
factory key and refuses to arm. ``provision_device`` opens the port with the factory
key, sends PROVISION with a fresh 32-byte key, waits for the ACK, then checks that the
board comes back with a HELLO that verifies under the new key. A provisioned board
refuses PROVISION; re-flashing the firmware (which erases its EEPROM) is the only way
to provision it again.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from roadshield_base.errors import ActuatorError

from . import messages as m
from .keys import generate_key, load_key, save_key
from .link import SerialLink


@dataclass(frozen=True)
class ProvisionResult:
    port: str
    key_file: Path
    firmware: str
    generated: bool


def provision_device(port: str, key_file: str | os.PathLike[str], *, generate: bool = False,
                     hello_timeout_s: float = 5.0) -> ProvisionResult:
    """Write the key in ``key_file`` (created first when ``generate``) into the board."""
    path = Path(key_file)
    created = taken = False
    if generate:
        if path.exists():
            raise ActuatorError(f"key file {path} already exists; refusing to overwrite it",
                                "drop --generate to write that key, or pick a new file name")
        key = generate_key()
        save_key(path, key)  # saved before the board has it: a key is never lost
        created = True
    else:
        key = load_key(path)
    try:
        link = SerialLink(port, None, hello_timeout_s=hello_timeout_s)
        try:
            link.open()
        except ActuatorError as err:
            if "key mismatch" in str(err):
                raise ActuatorError(f"the board on {port} is already provisioned",
                                    "keys are written once: use its existing key file, or "
                                    "re-flash the firmware to erase it and provision again"
                                    ) from err
            raise
        try:
            ack = link.provision(key)
            if ack.result != m.RESULT_OK:
                raise ActuatorError(f"the board on {port} refused the key",
                                    "it is already provisioned; re-flash to erase it")
            taken = True
            link.key = key  # the board re-keys at once and announces a new HELLO
            if not link.wait_connected(hello_timeout_s) or not _wait_new_session(link,
                                                                              hello_timeout_s):
                raise ActuatorError(f"the board on {port} took the key but did not come back "
                                    "with a HELLO under it",
                                    "power-cycle it and run `roadshield actuator status`")
            firmware = link.state.firmware
        finally:
            link.close()
    except BaseException:
        if created and not taken:
            path.unlink(missing_ok=True)  # the board never took it
        raise
    return ProvisionResult(port, path, firmware, created)


def _wait_new_session(link: SerialLink, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = link.state
        if st.connected and st.provisioned:
            return True
        time.sleep(0.01)
    return False
