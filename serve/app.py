"""The HTTP face of the service: FastAPI routes of the Open Inference Protocol (v2 REST).

Routes: GET /v2/health/live, GET /v2/health/ready (no credentials; they say nothing about
the model), GET /v2, GET /v2/models/{name}[/versions/1], GET /v2/models/{name}[/versions/1]
/ready, POST /v2/models/{name}[/versions/1]/infer. Errors are ``{"error": reason}``.
The client certificate is read from the ASGI TLS extension
(``scope["extensions"]["tls"]["client_cert_chain"][0]``, PEM), which serve/server.py fills.
"""

from __future__ import annotations

import ssl
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from serve.auth import AuthFailure, authenticate
from serve.pki import cert_sha256_der
from serve.service import Service
from serve.store import KeyRecord


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None
          ) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


def peer_cert_sha256(scope: dict[str, Any]) -> str | None:
    """sha256 of the client certificate's DER bytes from the ASGI TLS extension, or None."""
    chain = scope.get("extensions", {}).get("tls", {}).get("client_cert_chain") or []
    if not chain:
        return None
    try:
        return cert_sha256_der(ssl.PEM_cert_to_DER_cert(chain[0]))
    except ValueError:
        return None


async def read_body(request: Request, limit: int) -> bytes | JSONResponse:
    """The body, or a 413 as soon as it passes ``limit`` bytes (nothing past it is kept)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            return _json(400, {"error": "Content-Length is not a number"})
        if int(declared) > limit:
            return _json(413, {"error": f"body of {declared} bytes is over the limit of "
                                        f"{limit} bytes"})
    chunks: list[bytes] = []
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                return _json(413, {"error": f"body is over the limit of {limit} bytes"})
            chunks.append(chunk)
    except ClientDisconnect:
        return _json(400, {"error": "the request was truncated (the client disconnected "
                                    "before the whole body arrived)"})
    body = b"".join(chunks)
    if declared is not None and len(body) != int(declared):
        return _json(400, {"error": f"the request was truncated: {len(body)} of {declared} "
                                    "bytes"})
    return body


def create_app(service: Service) -> FastAPI:
    """The ASGI application for ``service`` (no docs or OpenAPI routes: nothing to leak)."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    cfg = service.config
    app.state.service = service

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        reason = "not found" if exc.status_code == 404 else str(exc.detail).lower()
        return _json(exc.status_code, {"error": reason})

    async def identify(request: Request) -> KeyRecord | JSONResponse:
        headers = {k: v for k, v in request.headers.items()}
        try:
            return authenticate(service.store, cfg.auth, headers,
                                peer_cert_sha256(request.scope))
        except AuthFailure as err:
            extra = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
            return _json(err.status, err.body, extra)

    def known(name: str, version: str | None) -> JSONResponse | None:
        if name != cfg.model_name or version not in (None, "1"):
            return _json(404, {"error": "not found"})
        return None

    @app.get("/v2/health/live")
    async def live() -> Response:
        return _json(200, {"live": True})

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        return _json(200, {"ready": service.runner.is_active})

    @app.get("/v2")
    async def server_metadata(request: Request) -> Response:
        who = await identify(request)
        if isinstance(who, JSONResponse):
            return who
        return _json(200, {"name": "roadshield", "version": "1", "extensions": []})

    # the model routes are plain Starlette routes (path parameters read from the request):
    # FastAPI's parameter injection would only add work on every query
    def path_args(request: Request) -> tuple[str, str | None]:
        return request.path_params["name"], request.path_params.get("version")

    async def model_metadata(request: Request) -> Response:
        name, version = path_args(request)
        who = await identify(request)
        if isinstance(who, JSONResponse):
            return who
        return known(name, version) or _json(200, service.model_metadata(who))

    async def model_ready(request: Request) -> Response:
        name, version = path_args(request)
        who = await identify(request)
        if isinstance(who, JSONResponse):
            return who
        return known(name, version) or _json(200, {"name": name,
                                                   "ready": service.runner.is_active})

    async def infer(request: Request) -> Response:
        name, version = path_args(request)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cfg.max_body_bytes:
            return _json(413, {"error": f"body of {declared} bytes is over the limit of "
                                        f"{cfg.max_body_bytes} bytes"})
        headers = {k: v for k, v in request.headers.items()}
        cert = peer_cert_sha256(request.scope)

        def gate() -> KeyRecord | JSONResponse:
            # authentication and the rate/budget preflight: SQLite reads of microseconds
            # (a strike is one small commit), run on the event loop, since a trip to the
            # thread pool would cost more than the work
            try:
                who = authenticate(service.store, cfg.auth, headers, cert)
            except AuthFailure as err:
                extra = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
                return _json(err.status, err.body, extra)
            missing = known(name, version)
            if missing is not None:
                return missing
            if headers.get("inference-header-content-length") is not None:
                return _json(400, {"error": "the binary tensor extension is not supported; "
                                            "send JSON tensors (binary_data=False)"})
            early = service.preflight(who)
            return who if early is None else _json(*early)

        who = gate()
        if isinstance(who, JSONResponse):
            return who
        body = await read_body(request, cfg.max_body_bytes)
        if isinstance(body, JSONResponse):
            return body
        # parsing, inference and the commit run in the thread pool, so the event loop keeps
        # refusing a flooding key's requests (429 costs no parsing) while a query is answered
        status, payload, headers = await anyio.to_thread.run_sync(service.infer, who, body,
                                                                  True)
        return _json(status, payload, headers)

    for suffix in ("", "/versions/{version}"):
        base = "/v2/models/{name}" + suffix
        app.add_route(base, model_metadata, methods=["GET"])
        app.add_route(base + "/ready", model_ready, methods=["GET"])
        app.add_route(base + "/infer", infer, methods=["POST"])
    return app
