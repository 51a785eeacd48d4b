"""`roadshield serve keys ...` and the serve tier's place in the layers."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import pytest

import serve
from roadshield.cli import main
from serve.auth import check_key
from serve.server import open_store


def test_keys_init_add_issue_list_revoke(tmp_path, capsys):
    state = tmp_path / "state"
    assert main(["serve", "keys", "init", "--dir", str(state)]) == 0
    for name in ("ca.pem", "ca.key", "server.pem", "server.key", "secrets.json"):
        assert (state / name).is_file()
    assert (state / "ca.key").stat().st_mode & 0o077 == 0
    assert main(["serve", "keys", "init", "--dir", str(state)]) == 2  # no silent overwrite
    capsys.readouterr()
    assert main(["serve", "keys", "add", "--dir", str(state), "--id", "alice", "--policy",
                 "label", "--budget", "50", "--rate", "2", "--burst", "4"]) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("rs1.alice.")
    assert main(["serve", "keys", "issue", "--dir", str(state), "--id", "alice"]) == 0
    assert "sha256" in capsys.readouterr().out
    assert main(["serve", "keys", "list", "--dir", str(state), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == [{"id": "alice", "policy": "label", "cut": None, "used": 0, "budget": 50,
                     "rate": 2.0, "burst": 4.0, "strikes": 0, "revoked": False,
                     "api_key": True, "certificate": True}]
    store = open_store(state)
    assert check_key(store, token).key_id == "alice"
    store.close()
    assert main(["serve", "keys", "revoke", "--dir", str(state), "--id", "alice"]) == 0
    assert main(["serve", "keys", "revoke", "--dir", str(state), "--id", "nobody"]) == 2
    assert main(["serve", "keys", "add", "--dir", str(state), "--id", "bad/id"]) == 2


def test_serve_without_a_model_is_a_clear_error(tmp_path, capsys):
    assert main(["serve", "--dir", str(tmp_path)]) == 2
    assert "--model" in capsys.readouterr().err


@pytest.mark.slow
def test_serve_imports_neither_torch_nor_the_cloud_tier():
    mods = sorted(m.name for m in pkgutil.walk_packages(serve.__path__, "serve."))
    assert {"serve.app", "serve.prada", "serve.watermark", "serve.cli"} <= set(mods)
    code = (f"import importlib, sys\nfor m in {mods!r}: importlib.import_module(m)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'torchvision', 'cloud_train', 'distill', 'roadshield'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
