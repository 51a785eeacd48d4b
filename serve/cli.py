"""The ``serve`` and ``watermark`` verbs.

    roadshield serve --dir DIR --model model.onnx [--host 127.0.0.1] [--port 8000]
        [--auth keys|mtls|both] [--tls] [--config serve.json]
    roadshield serve keys init --dir DIR [--host-name localhost] [--ip 127.0.0.1] [--force]
    roadshield serve keys add --dir DIR --id ID [--policy label|top1|noisy|softmax]
        [--budget N] [--rate R] [--burst B] [--no-secret]
    roadshield serve keys issue --dir DIR --id ID [--out FOLDER] [--days 365]
    roadshield serve keys revoke --dir DIR --id ID
    roadshield serve keys list --dir DIR [--json]
    roadshield watermark verify --suspect model.onnx --dir DIR [--key secrets.json]
        [--client ID] [--max-queries 200] [--json]

``add_parsers`` imports argparse only; handlers import the service when they run.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parsers(sub: Any) -> None:
    """Add ``serve`` (with ``keys``) and ``watermark`` to ``sub`` (from add_subparsers)."""
    serve = sub.add_parser("serve", help="the protected query service (KServe v2 REST)")
    serve.add_argument("--dir", default="serve_state", help="the service's state folder")
    serve.add_argument("--model", help="the model file (.onnx)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--auth", choices=("keys", "mtls", "both"), default=None,
                       help="override the config's auth mode")
    serve.add_argument("--tls", action="store_true",
                       help="serve HTTPS with DIR/server.pem even under auth 'keys'")
    serve.add_argument("--config", default=None, help="settings (JSON; default DIR/serve.json)")
    serve.set_defaults(func=serve_run)
    ssub = serve.add_subparsers(dest="serve_cmd")
    keys = ssub.add_parser("keys", help="API keys, the CA and client certificates")
    ksub = keys.add_subparsers(dest="keys_cmd", required=True)
    init = ksub.add_parser("init", help="make the CA, the server certificate and secrets")
    init.add_argument("--dir", default="serve_state")
    init.add_argument("--host-name", action="append", default=None,
                      help="DNS name in the server certificate (repeatable; localhost)")
    init.add_argument("--ip", action="append", default=None,
                      help="IP address in the server certificate (repeatable; 127.0.0.1)")
    init.add_argument("--force", action="store_true", help="replace an existing CA")
    init.set_defaults(func=keys_init)
    add = ksub.add_parser("add", help="add a key; prints the API key once")
    add.add_argument("--dir", default="serve_state")
    add.add_argument("--id", required=True, dest="key_id")
    add.add_argument("--policy", choices=("label", "top1", "noisy", "softmax"), default=None)
    add.add_argument("--budget", type=int, default=None, help="images in total")
    add.add_argument("--rate", type=float, default=None, help="images per second")
    add.add_argument("--burst", type=float, default=None, help="bucket size in images")
    add.add_argument("--no-secret", action="store_true",
                     help="a certificate-only identity (auth mtls): no API key")
    add.set_defaults(func=keys_add)
    issue = ksub.add_parser("issue", help="issue a client certificate for a key")
    issue.add_argument("--dir", default="serve_state")
    issue.add_argument("--id", required=True, dest="key_id")
    issue.add_argument("--out", default=None, help="folder for ID.pem / ID.key (default DIR)")
    issue.add_argument("--days", type=float, default=365.0)
    issue.set_defaults(func=keys_issue)
    revoke = ksub.add_parser("revoke", help="revoke a key and its certificate")
    revoke.add_argument("--dir", default="serve_state")
    revoke.add_argument("--id", required=True, dest="key_id")
    revoke.set_defaults(func=keys_revoke)
    lst = ksub.add_parser("list", help="keys, their policies and counts")
    lst.add_argument("--dir", default="serve_state")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=keys_list)

    wm = sub.add_parser("watermark", help="the service's DAWN watermark")
    wsub = wm.add_subparsers(dest="watermark_cmd", required=True)
    verify = wsub.add_parser("verify", help="replay the watermark against a suspect model")
    verify.add_argument("--suspect", required=True, help="the suspect model (.onnx)")
    verify.add_argument("--dir", default="serve_state", help="the service's state folder")
    verify.add_argument("--key", default=None,
                        help="the watermark key: secrets.json or a file of 64 hex digits "
                             "(default DIR/secrets.json)")
    verify.add_argument("--client", default=None, help="only this key's watermark queries")
    verify.add_argument("--max-queries", type=int, default=200)
    verify.add_argument("--backend", default="auto")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(func=watermark_verify)


def _config(args: argparse.Namespace) -> Any:
    from pathlib import Path

    from serve.config import load_config
    from serve.server import CONFIG_NAME

    path = getattr(args, "config", None) or Path(args.dir) / CONFIG_NAME
    return load_config(path, auth=getattr(args, "auth", None))


def serve_run(args: argparse.Namespace) -> int:
    from roadshield_base.errors import ConfigError
    from serve.server import build_service, serve_forever

    if not args.model:
        raise ConfigError("serve needs --model", "roadshield serve --dir DIR --model m.onnx")
    service = build_service(args.dir, args.model, _config(args))
    serve_forever(service, args.dir, args.host, args.port, tls=args.tls or None)
    return 0


def keys_init(args: argparse.Namespace) -> int:
    from serve.pki import init_ca

    paths = init_ca(args.dir, args.host_name or ["localhost"], args.ip or ["127.0.0.1"],
                    force=args.force)
    for name, path in paths.items():
        print(f"{name:12s} {path}")
    return 0


def keys_add(args: argparse.Namespace) -> int:
    import time

    from roadshield_base.errors import ConfigError
    from serve.auth import make_key
    from serve.server import open_store

    cfg = _config(args)
    d = cfg.defaults
    try:
        new = make_key(args.key_id)
    except ValueError as err:
        raise ConfigError(str(err), "use letters, digits, _ and -") from err
    store = open_store(args.dir, cfg)
    store.add_key(args.key_id, policy=args.policy or d.policy,
                  budget=d.budget if args.budget is None else args.budget,
                  rate=args.rate or d.rate, burst=args.burst or d.burst, now=time.time(),
                  salt=None if args.no_secret else new.salt,
                  secret_hash=None if args.no_secret else new.secret_hash)
    store.close()
    if not args.no_secret:
        print(new.token)
    return 0


def keys_issue(args: argparse.Namespace) -> int:
    from roadshield_base.errors import ConfigError
    from serve.pki import issue_client_cert
    from serve.server import open_store

    store = open_store(args.dir, _config(args))
    if store.get_key(args.key_id) is None:
        store.close()
        raise ConfigError(f"no key {args.key_id!r}",
                          "add it first: `serve keys add --id ID` (--no-secret for mTLS only)")
    cert, key, sha = issue_client_cert(args.dir, args.key_id, args.out or args.dir,
                                       days=args.days)
    store.set_cert(args.key_id, sha)
    store.close()
    print(f"certificate {cert}\nkey         {key}\nsha256      {sha}")
    return 0


def keys_revoke(args: argparse.Namespace) -> int:
    from serve.server import open_store

    store = open_store(args.dir, _config(args))
    store.revoke(args.key_id)
    store.close()
    print(f"revoked {args.key_id}")
    return 0


def keys_list(args: argparse.Namespace) -> int:
    from serve.server import open_store

    store = open_store(args.dir, _config(args))
    rows = [{"id": r.key_id, "policy": r.policy, "cut": r.cut or None, "used": r.used,
             "budget": r.budget, "rate": r.bucket.rate, "burst": r.bucket.burst,
             "strikes": r.bucket.strikes, "revoked": r.revoked,
             "api_key": r.secret_hash is not None, "certificate": r.cert_sha256 is not None}
            for r in store.list_keys()]
    store.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'id':20s} {'policy':8s} {'cut':6s} {'used':>8s} {'budget':>8s} {'revoked':8s}")
    for r in rows:
        print(f"{r['id']:20s} {r['policy']:8s} {r['cut'] or '-':6s} {r['used']:8d} "
              f"{r['budget']:8d} {'yes' if r['revoked'] else 'no':8s}")
    return 0


def read_watermark_key(path: str) -> bytes:
    """The watermark key from secrets.json or from a file of 64 hex digits."""
    from pathlib import Path

    from roadshield_base.errors import ConfigError

    try:
        text = Path(path).read_text().strip()
        if text.startswith("{"):
            return bytes.fromhex(json.loads(text)["watermark_key"])
        return bytes.fromhex(text)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"cannot read a watermark key from {path}: {err}",
                          "pass DIR/secrets.json written by `serve keys init`") from err


def watermark_verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from edge_runtime.runners.registry import create_runner
    from serve.config import MAX_WATERMARK_RATE
    from serve.server import open_store
    from serve.watermark import verify

    key = read_watermark_key(args.key or str(Path(args.dir) / "secrets.json"))
    store = open_store(args.dir)
    rows = store.watermark_rows(args.client)
    store.close()
    with create_runner(args.backend, args.suspect) as runner:
        info = runner.model_info

        def predict(x: np.ndarray) -> np.ndarray:
            return runner.infer({info.input_name: x})[info.output_name].argmax(axis=1)

        verdict = verify(rows, key, info.num_classes, predict, rate=MAX_WATERMARK_RATE,
                         max_queries=args.max_queries)
    result = {"suspect": str(args.suspect), "client": args.client, **verdict.as_dict()}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"watermark queries replayed  {verdict.queries}\n"
              f"suspect gave the wrong label {verdict.agree}\n"
              f"suspect gave the true label  {verdict.agree_true}\n"
              f"images tested (not the true) {verdict.tested}\n"
              f"chance agreement (1/(C-1))   {verdict.chance:.4f}\n"
              f"p-value                      {verdict.p_value:.3g}")
    return 0
