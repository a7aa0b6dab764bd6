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
    """ASGI middleware: checks the API key, refuses requests beyond `max_requests` in progress
    (counted once their body has arrived; health checks and /metrics exempt), rejects slow, oversized or non-UTF-8 bodies before
    parsing, has every body read as JSON, stops a request whose client has gone; counts and times
    requests."""

    PATHS = ("/search", "/v1/embeddings", "/rerank", "/v1/rerank", "/v1/models", "/health", "/healthz", "/info",
             "/metrics", "/docs", "/redoc", "/openapi.json", "/admin/reload")
    OPEN = ("/health", "/healthz")  # for load balancers: no key, no max_requests, and they say nothing but "ok"
    # Not held to max_requests either (but keyed): monitoring must see an overload, not a scrape failed by it
    UNLIMITED = OPEN + ("/metrics",)
    # The API's description, open as vLLM keeps it: a browser loading /docs sends no key for the
    # page's schema and scripts, so with a key they would not load
    DOCS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
    DOCS_ASSETS = "/static-offline-docs/"

    def __init__(self, app, max_body_bytes: int, metrics: ServeMetrics, api_key: str = "", body_timeout_s: float = 10.0,
                 max_requests: int = 256):
        self.app, self.max_body_bytes, self.metrics = app, max_body_bytes, metrics
        self.api_key, self.body_timeout_s = api_key.encode(), body_timeout_s
        self.max_requests, self.in_progress = max_requests, 0

    def authorized(self, scope) -> bool:
        path = scope["path"]
        if not self.api_key or path in self.OPEN or path in self.DOCS or path.startswith(self.DOCS_ASSETS):
            return True
        scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)  # constant time

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.responses import JSONResponse

        t0, status, finished = time.perf_counter(), [0], [False]
        holds = scope["path"] not in self.UNLIMITED  # counts toward max_requests (health, metrics: whatever the load)

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                finished[0] = True  # from now on uvicorn's receive() says http.disconnect: not a client gone
            await send(message)

        try:
            if not self.authorized(scope):
                return await JSONResponse(error_body(401, "missing or wrong API key (send Authorization: Bearer KEY)"),
                                          401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send_counted)
            # the body first: a client still sending it (up to body_timeout_s) holds a connection,
            # which max_connections bounds, but not one of the max_requests the model's work is held to
            body, problem = await self._read_body(scope, receive)
            if body is None:  # the client went away mid-body
                status[0] = 499
                return
            if problem:
                return await JSONResponse(error_body(*problem), problem[0])(scope, receive, send_counted)
            if holds and self.in_progress >= self.max_requests:
                message = f"server busy: {self.in_progress} requests in progress (max_requests={self.max_requests})"
                return await JSONResponse(error_body(503, message), 503, headers={"Retry-After": "1"})(
                    scope, receive, send_counted)
            self.in_progress += holds
            try:
                await self._serve(scope, body, receive, send_counted, status, finished)
            finally:
                self.in_progress -= holds
        finally:
            path = scope["path"] if scope["path"] in self.PATHS else (
                "/v1/models/{model}" if scope["path"].startswith("/v1/models/") else "other")  # ids: no label each
            self.metrics.requests.labels(path, str(status[0] or 500)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - t0)

    async def _serve(self, scope, body: bytes, receive, send, status: list, finished: list) -> None:
        """Run the app on the body read, while watching the client: one gone before its answer
        cancels the app (the batcher then drops its queued texts) and counts as 499 (nginx's
        "client closed")."""
        if body and not is_json(dict(scope["headers"]).get(b"content-type")):
            # curl -d sends application/x-www-form-urlencoded, other clients text/plain or nothing,
            # and FastAPI then leaves the body unparsed (every field "missing"): read it as JSON
            # whatever the header says, as vLLM does; a body that is not JSON is a 422 as before.
            # Such requests need no CORS preflight, so a web page can make a browser send one to
            # a local server (it cannot read the answer); an api_key stops that
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                     + [(b"content-type", b"application/json")]}

        async def watch():  # after the body, the client's next message is http.disconnect (or the response done)
            while (message := await receive())["type"] != "http.disconnect":
                pass
            return message

        watcher, replayed = asyncio.ensure_future(watch()), False

        async def replay():
            nonlocal replayed
            if replayed:  # one reader of the client: the app hears what the watcher hears
                return await asyncio.shield(watcher)
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        app = asyncio.ensure_future(self.app(scope, replay, send))
        try:
            await asyncio.wait((app, watcher), return_when=asyncio.FIRST_COMPLETED)
            if not app.done() and not finished[0]:  # the client left before its answer
                app.cancel()
                status[0] = 499
                await asyncio.wait((app,))  # its cancellation, not raised here: the request is over
                return
            await app
        finally:
            watcher.cancel()
            app.cancel()  # this task cancelled (server shutdown): the app too; a no-op once it is done

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
            return b"", (422, f"request body is not valid UTF-8 (byte {e.start}); JSON must be UTF-8")
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
    # proxy_headers: a client at forwarded_allow_ips (a proxy on this machine) is replaced by the
    # one its X-Forwarded-For names, so /admin/reload's loopback rule sees the real client; said
    # here, not left to uvicorn's defaults (FORWARDED_ALLOW_IPS in the environment would widen it).
    # h11_max_incomplete_event_size: a request line and headers still incomplete after 16 KiB
    # buffered (sent in pieces) are a 400; a larger header block that arrives whole passes
    return uvicorn.Config(app, host=host, port=port, log_level=log_level,
                          http=_header_timeout_protocol(cfg.header_timeout_s),
                          timeout_keep_alive=cfg.keep_alive_s, limit_concurrency=cfg.max_connections,
                          proxy_headers=True, forwarded_allow_ips="127.0.0.1",
                          h11_max_incomplete_event_size=16 * 1024)


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

