"""Building a service from its state folder and running it on uvicorn, with TLS and mTLS.

State folder (``--dir``): ``serve.db`` (SQLite), ``serve.json`` (optional settings),
``ca.pem`` / ``ca.key`` / ``server.pem`` / ``server.key`` / ``secrets.json`` (from
``serve keys init``). Under auth "mtls" or "both" uvicorn requires a client certificate
signed by ``ca.pem`` (ssl.CERT_REQUIRED): another CA's or an expired certificate fails the
TLS handshake (alert "unknown ca" / "certificate expired") before any HTTP is read.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

from roadshield_base.errors import ConfigError
from serve.config import ServeConfig, load_config
from serve.pki import load_secrets
from serve.service import Secrets, Service
from serve.store import Store

DB_NAME = "serve.db"
CONFIG_NAME = "serve.json"


def open_store(folder: str | Path, config: ServeConfig | None = None) -> Store:
    return Store(Path(folder) / DB_NAME, sync=config.sync if config else "normal")


def build_service(folder: str | Path, model: str | Path, config: ServeConfig | None = None,
                  **runner_kw: Any) -> Service:
    """The Service for ``model`` with the state in ``folder`` (runner activated)."""
    from edge_runtime.runners.registry import create_runner

    folder = Path(folder)
    config = config or load_config(folder / CONFIG_NAME)
    keys = load_secrets(folder)
    runner = create_runner(config.backend, model, **runner_kw)
    runner.activate()
    return Service(runner, open_store(folder, config), config,
                   Secrets(keys["watermark_key"], keys["noise_key"]))


def _peer_cert_protocol() -> type:
    """uvicorn's h11 protocol, adding the ASGI TLS extension (the client certificate, PEM)
    to every request's scope on a TLS connection that presented one."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class PeerCertH11Protocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            ssl_object = transport.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            if not der:
                return
            tls = {"client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)],
                   "tls_version": None, "cipher_suite": None, "client_cert_error": None}
            inner = self.app

            async def app(scope: dict, receive: Any, send: Any) -> None:
                scope.setdefault("extensions", {})["tls"] = tls
                await inner(scope, receive, send)

            self.app = app

    return PeerCertH11Protocol


def uvicorn_config(service: Service, folder: str | Path, host: str = "127.0.0.1",
                   port: int = 8000, tls: bool | None = None, log_level: str = "warning"
                   ) -> Any:
    """The uvicorn.Config for ``service``; TLS is on when ``tls`` or the auth needs it."""
    import uvicorn

    from serve.app import create_app

    folder = Path(folder)
    needs_client_cert = service.config.auth in ("mtls", "both")
    use_tls = needs_client_cert if tls is None else tls or needs_client_cert
    kwargs: dict[str, Any] = {}
    if use_tls:
        for name in ("server.pem", "server.key", "ca.pem"):
            if not (folder / name).is_file():
                raise ConfigError(f"TLS needs {folder / name}",
                                  "run `roadshield serve keys init --dir DIR` first")
        kwargs.update(ssl_certfile=str(folder / "server.pem"),
                      ssl_keyfile=str(folder / "server.key"))
        if needs_client_cert:
            kwargs.update(ssl_cert_reqs=ssl.CERT_REQUIRED, ssl_ca_certs=str(folder / "ca.pem"))
    return uvicorn.Config(create_app(service), host=host, port=port, http=_peer_cert_protocol(),
                          log_level=log_level, access_log=False, lifespan="off", **kwargs)


def serve_forever(service: Service, folder: str | Path, host: str, port: int,
                  tls: bool | None = None) -> None:
    import uvicorn

    uvicorn.Server(uvicorn_config(service, folder, host, port, tls, "info")).run()
