"""The HTTP plumbing of `lrem serve` below FastAPI: `RequestGuard` (ASGI middleware: API key,
body limits, JSON bodies, request metrics) and the uvicorn settings that bound what slow or idle
clients can hold (`uvicorn_config`)."""
from __future__ import annotations

import asyncio
import hmac
import time
from typing import TYPE_CHECKING

from .serve_schemas import error_body

if TYPE_CHECKING:
    from .serve_service import ServeMetrics


def is_json(content_type: bytes | None) -> bool:
    """Whether a content-type header names JSON (application/json, or application/*+json).

    >>> is_json(b"Application/JSON; charset=utf-8"), is_json(b"application/x-www-form-urlencoded")
    (True, False)
    """
    media = (content_type or b"").split(b";")[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


class RequestGuard:
    """ASGI middleware: checks the API key, rejects slow, oversized or non-UTF-8 bodies before
    parsing, has every body read as JSON; counts and times requests."""

    PATHS = ("/search", "/v1/embeddings", "/rerank", "/v1/rerank", "/v1/models", "/health", "/healthz", "/info",
             "/metrics", "/docs", "/redoc", "/openapi.json", "/admin/reload")
    OPEN = ("/health", "/healthz")  # for load balancers: no key, and they say nothing but "ok"

    def __init__(self, app, max_body_bytes: int, metrics: ServeMetrics, api_key: str = "", body_timeout_s: float = 10.0):
        self.app, self.max_body_bytes, self.metrics = app, max_body_bytes, metrics
        self.api_key, self.body_timeout_s = api_key.encode(), body_timeout_s

    def authorized(self, scope) -> bool:
        if not self.api_key or scope["path"] in self.OPEN:
            return True
        scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)  # constant time

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.responses import JSONResponse

        t0, status = time.perf_counter(), [0]

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if not self.authorized(scope):
                return await JSONResponse(error_body(401, "missing or wrong API key (send Authorization: Bearer KEY)"),
                                          401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send_counted)
            body, problem = await self._read_body(scope, receive)
            if body is None:  # the client went away mid-body: counted as 499 (nginx's "client closed")
                status[0] = 499
                return
            if problem:
                return await JSONResponse(error_body(*problem), problem[0])(scope, receive, send_counted)
            if body and not is_json(dict(scope["headers"]).get(b"content-type")):
                # curl -d sends application/x-www-form-urlencoded, other clients text/plain or nothing,
                # and FastAPI then leaves the body unparsed (every field "missing"): read it as JSON
                # whatever the header says, as vLLM does; a body that is not JSON is a 422 as before.
                # Such requests need no CORS preflight, so a web page can make a browser send one to
                # a local server (it cannot read the answer); an api_key stops that
                scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                         + [(b"content-type", b"application/json")]}
            replayed = False

            async def replay():
                nonlocal replayed
                if replayed:
                    return await receive()
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}

            await self.app(scope, replay, send_counted)
        finally:
            path = scope["path"] if scope["path"] in self.PATHS else "other"
            self.metrics.requests.labels(path, str(status[0] or 500)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - t0)

    async def _read_body(self, scope, receive) -> tuple[bytes | None, tuple[int, str] | None]:
        limit = self.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return b"", (413, f"request body is {declared.decode('latin-1')} bytes; the limit is {limit} (max_body_bytes)")
        body, more = b"", True
        try:
            async with asyncio.timeout(self.body_timeout_s):  # a client trickling its body holds a connection
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None, None
                    body += message.get("body", b"")
                    more = message.get("more_body", False)
                    if len(body) > limit:
                        return b"", (413, f"request body is over {limit} bytes (max_body_bytes)")
        except TimeoutError:
            return b"", (408, f"request body not received within {self.body_timeout_s} s (body_timeout_s)")
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            return b"", (400, f"request body is not valid UTF-8 (byte {e.start}); JSON must be UTF-8")
        return body, None


def listen(host: str, port: int):
    """A listening socket on host:port, or a ValueError that names them: `lrem serve` binds before
    it loads the model, so a port in use is one line at once, not a traceback after the load."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restart over TIME_WAIT
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror} (choose another --port)") from None
    sock.set_inheritable(True)
    return sock


def uvicorn_config(app, host: str, port: int, log_level: str = "info"):
    """uvicorn settings that bound what slow or idle clients can hold (see `ServeConfig`)."""
    import uvicorn

    cfg = app.state.service.config
    return uvicorn.Config(app, host=host, port=port, log_level=log_level,
                          http=_header_timeout_protocol(cfg.header_timeout_s),
                          timeout_keep_alive=cfg.keep_alive_s, limit_concurrency=cfg.max_connections,
                          h11_max_incomplete_event_size=16 * 1024)  # headers above 16 KiB: 400


def _header_timeout_protocol(header_timeout_s: float):
    """uvicorn's h11 protocol, plus a deadline for each request's headers: uvicorn has none, so a
    client sending half a request line would hold its connection for ever."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm_header_timer()  # the next request on this connection gets its own deadline

        def connection_lost(self, exc):
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()
            super().connection_lost(exc)

        def _arm_header_timer(self):
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()
            self._header_timer = self.loop.call_later(header_timeout_s, self._header_timeout)

        def _header_timeout(self):
            # IDLE: h11 has not yet seen a whole request line and headers since the timer started
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutH11

