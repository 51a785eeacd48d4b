"""The signed bundle: written with model-signing's key mode, checked on the device without
it, refused when unsigned, altered, padded or signed by another key; the upstream
``model_signing verify`` accepts the same folder."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from distill.bundle import generate_bundle_keys, write_bundle
from edge_runtime.bundle import verify_bundle
from roadshield_base.errors import ConfigError
from roadshield_base.trust import TrustError


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return generate_bundle_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def bundle(tiny_onnx: Path, keys: tuple[Path, Path], tmp_path: Path) -> Path:
    evaluation = tmp_path / "eval.json"
    evaluation.write_text(json.dumps({"clean_acc": 0.97}))
    write_bundle(tmp_path / "b", tiny_onnx, key=keys[0], evaluation=evaluation)
    return tmp_path / "b"


def test_a_bundle_verifies_and_hands_on_the_bytes_it_hashed(bundle, tiny_onnx, keys):
    verified = verify_bundle(bundle, keys[1])
    assert sorted(verified.files) == ["evaluation.json", "metadata.json", "model.onnx"]
    assert verified.model_bytes() == tiny_onnx.read_bytes()
    meta = verified.metadata
    assert meta["format"] == "roadshield.bundle/v1" and meta["models"] == {"model": "model.onnx"}
    assert meta["evaluation"] == "evaluation.json" and meta["class_names"]
    assert len(verified.root_digest) == 64


def test_the_upstream_model_signing_verifier_accepts_the_same_bundle(bundle, keys):
    out = subprocess.run([sys.executable, "-m", "model_signing", "verify", "key", str(bundle),
                          "--signature", str(bundle / "model.sig"),
                          "--public_key", str(keys[1])],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr + out.stdout
    assert "Verification succeeded" in out.stdout


def test_an_altered_model_is_refused_by_name(bundle, keys):
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit
    (bundle / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(TrustError, match="altered after signing: model.onnx"):
        verify_bundle(bundle, keys[1])


def test_an_added_file_and_a_removed_file_are_refused(bundle, keys, tmp_path):
    padded = tmp_path / "padded"
    shutil.copytree(bundle, padded)
    (padded / "model.int8.onnx").write_bytes(b"\x00")
    with pytest.raises(TrustError, match="not signed: model.int8.onnx"):
        verify_bundle(padded, keys[1])
    (bundle / "evaluation.json").unlink()
    with pytest.raises(TrustError, match="missing: evaluation.json"):
        verify_bundle(bundle, keys[1])


def test_a_symlink_inside_the_bundle_is_refused(bundle, keys, tmp_path):
    target = tmp_path / "elsewhere.onnx"
    (bundle / "model.onnx").rename(target)
    (bundle / "model.onnx").symlink_to(target)
    with pytest.raises(TrustError, match="link or special file"):
        verify_bundle(bundle, keys[1])


def test_another_key_and_an_unsigned_folder_are_refused(bundle, tmp_path, tiny_onnx):
    _, other_pub = generate_bundle_keys(tmp_path / "other")
    with pytest.raises(TrustError, match="signed by another key"):
        verify_bundle(bundle, other_pub)
    (bundle / "model.sig").unlink()
    with pytest.raises(TrustError, match="model.sig is missing"):
        verify_bundle(bundle, other_pub)


def test_a_forged_statement_fails_the_signature_and_a_dropped_key_hint_the_shape(bundle, keys):
    sig = json.loads((bundle / "model.sig").read_text())
    statement = json.loads(base64.b64decode(sig["dsseEnvelope"]["payload"]))
    statement["predicate"]["resources"] = statement["predicate"]["resources"][:1]
    sig["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    (bundle / "model.sig").write_text(json.dumps(sig))
    with pytest.raises(TrustError, match="does not verify with the trusted key"):
        verify_bundle(bundle, keys[1])
    sig["verificationMaterial"]["publicKey"]["hint"] = ""
    (bundle / "model.sig").write_text(json.dumps(sig))
    with pytest.raises(TrustError, match="not in the shape model-signing's key mode writes"):
        verify_bundle(bundle, keys[1])


def test_every_single_byte_change_anywhere_in_the_bundle_is_refused(bundle, keys, tmp_path):
    """Twenty random one-byte changes in each file, the signature's unsigned parts
    included (a renamed field, a second spelling of the same base64)."""
    import numpy as np

    rng = np.random.default_rng(7)
    names = sorted(p.name for p in bundle.iterdir())
    assert {"model.onnx", "model.sig", "metadata.json"} <= set(names)
    for name in names:
        for _ in range(20):
            victim = tmp_path / "v"
            shutil.rmtree(victim, ignore_errors=True)
            shutil.copytree(bundle, victim)
            data = bytearray((victim / name).read_bytes())
            at = int(rng.integers(len(data)))
            data[at] ^= int(rng.integers(1, 256))
            (victim / name).write_bytes(bytes(data))
            with pytest.raises(TrustError):
                verify_bundle(victim, keys[1])
    sig = (bundle / "model.sig").read_text()
    key_field = sig.index('"hint"')
    for renamed in (sig[:key_field + 1] + "H" + sig[key_field + 2:],
                    sig.replace('"tlogEntries"', '"tlogEntriez"')):
        (tmp_path / "v" / "model.sig").write_text(renamed)
        with pytest.raises(TrustError, match="not in the shape"):
            verify_bundle(tmp_path / "v", keys[1])


def test_bad_inputs_to_the_writer_are_refused_before_anything_is_written(tiny_onnx, keys,
                                                                         tmp_path):
    with pytest.raises(ConfigError, match="already exists"):
        write_bundle(tmp_path, tiny_onnx, key=keys[0])
    with pytest.raises(ConfigError, match="does not exist"):
        write_bundle(tmp_path / "x", tiny_onnx, key=tmp_path / "nokey")
    with pytest.raises(ConfigError, match="go together"):
        write_bundle(tmp_path / "x", tiny_onnx, key=keys[0], provenance=tiny_onnx)
    with pytest.raises(ConfigError, match="already holds a bundle key"):
        generate_bundle_keys(keys[0].parent)
    assert not (tmp_path / "x").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".x.")] == []


def _provenance_for(checkpoint_sha256: str, keys_dir: Path, out: Path) -> Path:
    from cloud_train.attest.policy import load_stage_key, make_stage_keys
    from cloud_train.attest.training_gate import provenance_for_training, write_provenance
    from cloud_train.attest.verify import VerifyReport

    if not (keys_dir / "policy.json").exists():
        make_stage_keys(keys_dir)
    report = VerifyReport(out_dir=keys_dir, outputs={"shard/train.npz": "ab" * 32},
                          attestations={"shard.intoto.jsonl": "cd" * 32})
    envelope = provenance_for_training(checkpoint_sha256, report, {"trainer": "fast_at"},
                                       load_stage_key(keys_dir, "trainer"))
    return write_provenance(out, envelope)


def test_the_provenance_goes_in_only_for_its_own_checkpoint(tiny_onnx, keys, tmp_path):
    from distill.export import write_metadata

    sha = "12" * 32
    model = tmp_path / "m.onnx"
    shutil.copyfile(tiny_onnx, model)
    write_metadata(model, "source_sha256", sha)
    prov = _provenance_for(sha, tmp_path / "stage_keys", tmp_path / "ck.intoto.jsonl")
    write_bundle(tmp_path / "b", model, key=keys[0], provenance=prov,
                 policy=tmp_path / "stage_keys" / "policy.json")
    verified = verify_bundle(tmp_path / "b", keys[1])
    link = verified.metadata["provenance"]
    assert link["checkpoint_sha256"] == sha and link["file"] in verified.files
    assert link["training_data"] == {"pipeline/shard/train.npz": "ab" * 32,
                                     "pipeline/shard.intoto.jsonl": "cd" * 32}
    assert link["train_config"] == {"trainer": "fast_at"}

    other = _provenance_for("34" * 32, tmp_path / "stage_keys", tmp_path / "other.intoto.jsonl")
    with pytest.raises(ConfigError, match="does not vouch for this model"):
        write_bundle(tmp_path / "b2", model, key=keys[0], provenance=other,
                     policy=tmp_path / "stage_keys" / "policy.json")


# -- edge run: the device runs only what the signature covers ---------------------------------


def _edge(*args: str) -> tuple[int, str, str]:
    import contextlib
    import io

    from roadshield.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["-q", "edge", "run", "--source", "synthetic://?frames=3&width=160&height=120",
                   "--json", *args])
    return rc, out.getvalue(), err.getvalue()


def test_edge_run_runs_a_verified_bundle_and_reports_who_signed_it(bundle, keys, tiny_onnx):
    rc, out, _ = _edge("--bundle", str(bundle), "--trust-key", str(keys[1]))
    assert rc == 0
    report = json.loads(out)
    trust = report["model_trust"]
    assert trust["signed"] and trust["model"] == "model.onnx"
    assert trust["sha256"] == hashlib.sha256(tiny_onnx.read_bytes()).hexdigest()
    assert report["frames"] == 3 and report["runner"].startswith("onnxruntime")


def test_edge_run_hands_the_runner_the_bytes_it_verified(bundle, keys, monkeypatch):
    """A model swapped on disk after the check is never what runs: the runner gets the
    checked bytes and never opens the file."""
    import edge_runtime.bundle as bundle_mod
    from edge_runtime.runners.onnxruntime_runner import OnnxRuntimeRunner

    real_verify = bundle_mod.verify_bundle

    def verify_then_swap(root, key):
        verified = real_verify(root, key)
        (Path(root) / "model.onnx").write_bytes(b"not a model any more")
        return verified

    monkeypatch.setattr(bundle_mod, "verify_bundle", verify_then_swap)
    loaded: list[object] = []
    real_init = OnnxRuntimeRunner.__init__

    def spy(self, model_path, *a, **kw):  # type: ignore[no-untyped-def]
        loaded.append(model_path)
        real_init(self, model_path, *a, **kw)

    monkeypatch.setattr(OnnxRuntimeRunner, "__init__", spy)
    rc, out, _ = _edge("--bundle", str(bundle), "--trust-key", str(keys[1]))
    assert rc == 0 and json.loads(out)["frames"] == 3
    assert [type(m).__name__ for m in loaded] == ["ModelBytes"]


def test_edge_run_refuses_what_is_not_signed_by_the_trusted_key(bundle, keys, tmp_path,
                                                                tiny_onnx, capsys):
    _, other_pub = generate_bundle_keys(tmp_path / "other")
    rc, _, err = _edge("--bundle", str(bundle), "--trust-key", str(other_pub))
    assert rc == 2 and "signed by another key" in err and "Traceback" not in err
    rc, _, err = _edge("--bundle", str(bundle))
    assert rc == 2 and "needs --trust-key" in err
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[100] ^= 0xFF
    (bundle / "model.onnx").write_bytes(bytes(data))
    rc, _, err = _edge("--bundle", str(bundle), "--trust-key", str(keys[1]))
    assert rc == 2 and "altered after signing: model.onnx" in err


def test_a_bare_model_runs_only_with_allow_unsigned_and_says_so(tiny_onnx, caplog):
    rc, _, err = _edge("--model", str(tiny_onnx))
    assert rc == 2 and "bare, unsigned model file" in err and "--allow-unsigned" in err
    with caplog.at_level("WARNING"):
        rc, out, _ = _edge("--model", str(tiny_onnx), "--allow-unsigned")
    assert rc == 0
    assert json.loads(out)["model_trust"] == {
        "signed": False, "model": str(tiny_onnx), "allow_unsigned": True,
        "sha256": hashlib.sha256(tiny_onnx.read_bytes()).hexdigest()}
    assert any("UNSIGNED MODEL" in r.getMessage() for r in caplog.records)


def test_a_trust_file_holds_the_key_only_inside_its_window(tiny_onnx, tmp_path):
    from datetime import datetime, timedelta, timezone

    from distill.bundle import TRUST_FILE
    from edge_runtime.bundle import load_trust_key

    priv, pub = generate_bundle_keys(tmp_path / "k", valid_days=30)
    trust = priv.with_name(TRUST_FILE)
    doc = json.loads(trust.read_text())
    assert doc["format"] == "roadshield.trust-key/v1" and doc["public_key"] == pub.read_text()
    start = datetime.strptime(doc["not_before"], "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=timezone.utc)
    assert doc["not_after"] == (start + timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    write_bundle(tmp_path / "b", tiny_onnx, key=priv)
    assert verify_bundle(tmp_path / "b", trust).key_hint  # the trust file works as --trust-key
    later = start + timedelta(days=30, seconds=1)
    with pytest.raises(TrustError, match="expired on"):
        load_trust_key(trust, now=later)
    with pytest.raises(TrustError, match="not valid before"):
        load_trust_key(trust, now=start - timedelta(minutes=1))
    assert load_trust_key(trust, now=start + timedelta(days=29)) is not None


def test_an_expired_key_is_refused_on_the_device_and_at_signing(tiny_onnx, tmp_path, capsys):
    from distill.bundle import TRUST_FILE

    priv, _ = generate_bundle_keys(tmp_path / "k", valid_days=1)
    write_bundle(tmp_path / "b", tiny_onnx, key=priv)
    trust = priv.with_name(TRUST_FILE)
    doc = json.loads(trust.read_text())
    doc["not_before"], doc["not_after"] = "2020-01-01T00:00:00Z", "2021-01-01T00:00:00Z"
    trust.write_text(json.dumps(doc))
    rc, _, err = _edge("--bundle", str(tmp_path / "b"), "--trust-key", str(trust))
    assert rc == 2 and "expired on 2021-01-01T00:00:00Z" in err and "Traceback" not in err
    with pytest.raises(ConfigError, match="will not sign.*expired"):
        write_bundle(tmp_path / "b2", tiny_onnx, key=priv)
    assert not (tmp_path / "b2").exists()
    other, _ = generate_bundle_keys(tmp_path / "other", valid_days=1)
    shutil.copy(other.with_name(TRUST_FILE), trust)
    with pytest.raises(ConfigError, match="trust file of another key"):
        write_bundle(tmp_path / "b3", tiny_onnx, key=priv)


@pytest.mark.parametrize("text, match", [
    ("{}", "malformed"),
    ('{"format": "roadshield.trust-key/v1", "public_key": "x", "not_before": "2020-01-01",'
     ' "not_after": "2030-01-01T00:00:00Z"}', "malformed"),
    ('{"format": "roadshield.trust-key/v1", "public_key": "x", '
     '"not_before": "2030-01-01T00:00:00Z", "not_after": "2020-01-01T00:00:00Z"}',
     "is not before not_after"),
    ('{"format": "roadshield.trust-key/v1", "public_key": "not a pem", '
     '"not_before": "2020-01-01T00:00:00Z", "not_after": "2999-01-01T00:00:00Z"}',
     "not a PEM public key"),
])
def test_a_malformed_trust_file_is_refused_with_its_reason(tmp_path, text, match):
    from edge_runtime.bundle import load_trust_key

    (tmp_path / "t.json").write_text(text)
    with pytest.raises(TrustError, match=match):
        load_trust_key(tmp_path / "t.json")
    with pytest.raises(ConfigError, match="valid-days"):
        generate_bundle_keys(tmp_path / "k", valid_days=0)
