"""What every HTTP request passes through around its route: the `Guard` middleware (Host/Origin check,
body-size limit, API key, request id, JSON access log, HTTP metrics) and the error handlers that answer
every failure in OpenAI's `{"error": {...}}` form.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ernie45.serve.request import EngineError
from ernie45.serve.state import APIError, ServerConfig, ServerState

log = logging.getLogger("ernie45.serve")
access_log = logging.getLogger("ernie45.serve.access")

OPEN_PATHS = ("/health", "/metrics")  # reachable without the API key, as in vLLM
HTTP_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})  # metric labels


class Guard:
    """Pure ASGI middleware: body-size limit, API key, request id, JSON access log and HTTP metrics.

    Pure ASGI (not BaseHTTPMiddleware) so streaming responses pass through untouched.
    """

    def __init__(self, app, state: ServerState):
        self.app, self.st = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        cfg = self.st.config
        headers = dict(scope["headers"])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex
        status = 500
        received = 0

        too_large = False  # the body outgrew the limit while the app read it: answer 413, whatever the app says

        started = False

        async def send_with_id(message) -> None:
            nonlocal status, started
            if too_large:
                return
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"x-request-id", rid.encode("latin-1"))],
                }
            await send(message)

        async def receive_limited():
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cfg.max_body_bytes:
                    too_large = True
                    raise _BodyTooLarge
            return message

        try:
            length = headers.get(b"content-length")
            error = None
            if not _host_allowed(headers, cfg):
                error = APIError(
                    403,
                    "this Host/Origin is not allowed (a loopback server without an API key answers only "
                    "loopback names; add others with --allowed-hosts)",
                    "permission_error",
                    code="host_not_allowed",
                )
            elif length is not None and (not length.isdigit() or int(length) > cfg.max_body_bytes):
                error = _too_large(cfg.max_body_bytes)
            elif cfg.api_key and scope["path"] not in OPEN_PATHS and not _authorized(headers, cfg.api_key):
                error = APIError(
                    401,
                    "invalid or missing API key (send Authorization: Bearer <key>)",
                    "authentication_error",
                    code="invalid_api_key",
                )
            try:
                if error is None:
                    await self.app(scope, receive_limited, send_with_id)
            except _BodyTooLarge:
                pass
            if too_large:
                error, too_large = _too_large(cfg.max_body_bytes), False
            if error is not None and not started:
                await error.response()(scope, receive, send_with_id)
        finally:
            route = getattr(scope.get("route"), "path", "other")
            method = scope["method"] if scope["method"] in HTTP_METHODS else "OTHER"
            self.st.metrics.http.labels(method, route, str(status)).inc()
            client = scope.get("client")
            access_log.info(
                json.dumps(
                    {
                        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "request_id": rid,
                        "client": f"{client[0]}:{client[1]}" if client else None,
                        "method": scope["method"][:16],
                        "path": scope["path"][:256],
                        "status": status,
                        "duration_ms": round((time.perf_counter() - start) * 1000, 2),
                    }
                )
            )


class _BodyTooLarge(Exception):
    pass


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body too large (limit {limit} bytes)", code="request_too_large")


def _host_allowed(headers: dict[bytes, bytes], cfg: ServerConfig) -> bool:
    """DNS-rebinding guard for a keyless server bound to loopback: a browser page on another site can make
    requests to 127.0.0.1 under its own host name, so only loopback names (and --allowed-hosts) may appear in
    Host and Origin. Servers with an API key or bound elsewhere answer any host."""
    if cfg.api_key or cfg.allowed_hosts is None:
        return True
    for name, value in ((b"host", headers.get(b"host")), (b"origin", headers.get(b"origin"))):
        if value is None:
            continue
        text = value.decode("latin-1").strip().lower()
        if name == b"origin":
            if text == "null":
                return False
            text = text.split("://", 1)[-1]
        host = text.rsplit("]", 1)[0].lstrip("[") if text.startswith("[") else text.split(":", 1)[0]
        if host not in cfg.allowed_hosts:
            return False
    return True


def _authorized(headers: dict[bytes, bytes], key: str) -> bool:
    auth = headers.get(b"authorization", b"").decode("latin-1")
    scheme, _, token = auth.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(EngineError)
    async def engine_error(_: Request, e: EngineError) -> JSONResponse:
        return APIError(e.status, e.message, e.type, code=e.code).response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return _validation_error(e.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return APIError(e.status_code, str(e.detail), type_).response()

    @app.exception_handler(Exception)
    async def crash(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return APIError(500, "internal server error", "server_error").response()


def _validation_error(errors: list[dict]) -> APIError:
    """The first pydantic error as a 400 naming the parameter, e.g. param="max_tokens"."""
    err = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    if err.get("type") == "json_invalid":
        return APIError(
            400, f"the request body is not valid JSON: {err.get('ctx', {}).get('error', '')}".strip()
        )
    # pydantic names union members and validators in the location ("str", "list[int]", "function-after[...]").
    loc = [x for x in loc if not ("[" in x or x in ("str", "int", "float", "bool"))]
    param = ".".join(loc) or None
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    if param and not msg.startswith(param):
        msg = f"{param}: {msg}"
    if param is None and ":" in msg:  # a model-level check that names its field ("stop: ...")
        param = msg.split(":", 1)[0]
    return APIError(400, msg, param=param)
