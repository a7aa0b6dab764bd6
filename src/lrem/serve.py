"""HTTP search and embedding service: `lrem serve --index runs/idx [--config serve.yaml]`.

    from lrem.search import Searcher
    from lrem.serve import ServeConfig, create_app
    app = create_app(Searcher.load("runs/idx"), ServeConfig(max_batch=16))
    # uvicorn.run(app, host="127.0.0.1", port=8000); then:
    # curl -H 'content-type: application/json' -d '{"query": "a drink stronger than tea", "k": 5}' \
    #      localhost:8000/search

Endpoints: `POST /search`, `POST /v1/embeddings` (OpenAI's embeddings API: point an OpenAI
client's `base_url` at `http://host:port/v1`), `GET /v1/models` (with the model card's facts),
`GET /info` (model, index and settings), `GET /metrics` (Prometheus text), the OpenAPI schema at
`/openapi.json` (browsable at `/docs` and `/redoc`, their assets served by lrem: they work
offline), and `GET /health` (or `/healthz`: liveness only). Request bodies are JSON whatever
their content-type says (curl's `-d` says form encoding). With an API key (`api_key`, or the
environment variable LREM_API_KEY) every endpoint but /health and /healthz wants
`Authorization: Bearer KEY` and answers 401 without it.

How a query is served: the text is normalised (NFKC, lower case, single spaces) and looked up in
an LRU cache of (kind, text) -> (CoT, embedding). Misses go to a `Batcher`: one worker drains
up to `max_batch` pending texts (waiting at most `max_wait_ms` for company), runs them through
the model in one call on a single model thread, and hands each caller its own row. In `auto`
mode the direct embedding is searched first and the router decides from its scores and the
query whether this query reasons; only those pay for generation. The router is the model
folder's learned one (`router.json` from `lrem router fit`, `lrem.router.LearnedRouter`) when it
has one and `router_kind` is "model", else the margin `lrem.router.Router`.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import os
import threading
import time
import unicodedata
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ._text import check_query
from .batching import Batcher, EmbeddingCache, Overloaded
from .router import LearnedRouter, Router

ROUTER_KINDS = ("model", "margin")

EMBEDDING_MODELS = {"lrem-query-reason": "reason", "lrem-query-direct": "direct", "lrem-query-auto": "auto",
                    "lrem-item": "item"}  # /v1/embeddings `model` -> what is embedded


@dataclass
class ServeConfig:
    """Settings of `lrem serve`; a YAML file of these keys (`--config`) and flags override them."""

    host: str = field(default="127.0.0.1", metadata={"help": "Interface to listen on (0.0.0.0: all)."})
    port: int = field(default=8000, metadata={"help": "TCP port."})
    # Batching
    max_batch: int = field(default=16, metadata={"help": "Most texts run through the model in one call."})
    max_wait_ms: float = field(default=5.0, metadata={"help": "How long a batch's first text waits for others."})
    max_queue: int = field(default=1024, metadata={"help": "Pending texts beyond this are refused (503)."})
    # Cache
    cache_size: int = field(default=10_000, metadata={"help": "LRU entries (kind, text) -> (CoT, embedding); 0: off."})
    cache_path: str = field(default="", metadata={"help": ".npz loaded at start, written at shutdown; '': none."})
    # Router (mode=auto)
    router_kind: str = field(default="model", metadata={
        "help": "model: the model folder's learned router (router.json, `lrem router fit`) when it has one, else "
                "the margin router; margin: the margin router (router_margin, router_long_words) always."})
    router_margin: float = field(default=0.02, metadata={"help": "Reason when top-1 minus top-10 direct score < this."})
    router_share: float = field(default=0.0, metadata={
        "help": "0: fixed router_margin (or the learned router's threshold). Else a budget: reason on about this "
                "share (0..1) of auto queries, the most ambiguous by margin or the likeliest to gain by the learned "
                "router, tracking that quantile of recent queries (score scales differ between models)."})
    router_long_words: int = field(default=0, metadata={"help": "Also reason for queries of >= this many words; 0: off."})
    # Limits: breaking one is a 4xx with a message naming the limit
    max_query_chars: int = field(default=512, metadata={"help": "Longest query or input text, in characters."})
    max_k: int = field(default=100, metadata={"help": "Most items one search returns."})
    max_inputs: int = field(default=64, metadata={"help": "Most texts in one /v1/embeddings call."})
    max_body_bytes: int = field(default=256 * 1024, metadata={"help": "Largest request body (413 above)."})
    request_timeout_s: float = field(default=30.0, metadata={"help": "Time one request may take (503 after)."})
    # Slow or idle clients: each holds a connection, so bound how long they may take
    header_timeout_s: float = field(default=10.0, metadata={
        "help": "Time a connection may take to send a request's headers (closed after)."})
    body_timeout_s: float = field(default=10.0, metadata={"help": "Time a client may take to send a body (408 after)."})
    max_connections: int = field(default=256, metadata={"help": "Open connections and requests beyond this get a 503."})
    keep_alive_s: int = field(default=5, metadata={"help": "Idle keep-alive connections are closed after this."})
    # Access
    api_key: str = field(default="", metadata={
        "help": "Require `Authorization: Bearer KEY` on every endpoint but /health(z); '': the environment "
                "variable LREM_API_KEY, if set, else no key."})

    def __post_init__(self):
        for f in fields(self):
            v, want = getattr(self, f.name), type(f.default)
            number = isinstance(v, (int, float)) and not isinstance(v, bool) and (want is float or isinstance(v, int))
            if not (isinstance(v, str) if want is str else number):
                raise ValueError(f"{f.name}={v!r}; expected {want.__name__}")
            if want is not str and v < 0:
                raise ValueError(f"{f.name}={v}; must be >= 0")
        for name in ("max_batch", "max_query_chars", "max_k", "max_inputs", "max_body_bytes", "max_queue",
                     "max_connections", "keep_alive_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; must be >= 1")
        for name in ("request_timeout_s", "header_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)}; must be > 0")
        if self.port > 65535:
            raise ValueError(f"port={self.port}; must be <= 65535")
        if self.router_kind not in ROUTER_KINDS:
            raise ValueError(f"router_kind={self.router_kind!r}; expected one of {', '.join(ROUTER_KINDS)}")
        self.router()  # checks the router settings

    @classmethod
    def from_yaml(cls, path: str | Path | None = None, sets: list[str] = (), **overrides) -> "ServeConfig":
        """Defaults, then the YAML file's keys, then `sets` ("key=value", value read as YAML), then
        `overrides` (None values are skipped).

        >>> ServeConfig.from_yaml(sets=["max_batch=4", "cache_path=/tmp/c.npz"], port=9000).max_batch
        4
        """
        import yaml

        from lrem._config import load_config

        values = {}
        for item in sets:
            key, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"--set {item!r}: expected KEY=VALUE")
            try:
                values[key.strip()] = yaml.safe_load(value) if value.strip() else ""
            except yaml.YAMLError as e:  # also a `!!python/...` tag, which safe_load refuses
                raise ValueError(f"--set {item!r}: not a YAML value ({getattr(e, 'problem', None) or e})") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return load_config(cls, path, values)

    def router(self, learned: LearnedRouter | None = None) -> Router | LearnedRouter:
        """The router of mode=auto: `learned` (the model's, if any) held to `router_share` when
        router_kind is "model", else the margin router of these settings."""
        if learned is not None and self.router_kind == "model":
            return learned.with_share(self.router_share)
        return Router(margin=self.router_margin, share=self.router_share, long_query_words=self.router_long_words)

    def key(self) -> str:
        """The API key in force: `api_key`, else $LREM_API_KEY, else '' (none)."""
        return self.api_key or os.environ.get("LREM_API_KEY", "")

    def public(self) -> dict:
        """The settings, with the API key hidden (for /info and logs)."""
        return {**asdict(self), "api_key": "(set)" if self.key() else ""}


def normalize_query(text: str) -> str:
    """The cache key and the text the model sees: NFKC, lower case, runs of whitespace -> one space.

    >>> normalize_query("  Ｗine   Opener\\n")
    'wine opener'
    """
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


# ---------------------------------------------------------------- request and response bodies

class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    query: str = Field(description="Search query, at most max_query_chars; normalised before use.",
                       examples=["a drink stronger than tea"])
    k: int = Field(10, ge=1, description="Items to return (at most max_k).")
    mode: Literal["auto", "reason", "direct"] = Field(
        "auto", description="reason: generate a CoT, then embed; direct: no CoT; auto: the router decides.")


class SearchItem(BaseModel):
    item_id: str
    title: str
    score: float = Field(description="Cosine similarity of query and item embeddings.")


class SearchResponse(BaseModel):
    query: str = Field(description="The normalised query that was embedded.")
    cot: str = Field(description="The reasoning the query was embedded after ('' when none).")
    mode_used: Literal["reason", "direct"]
    cached: bool = Field(description="True when every embedding came from the cache.")
    items: list[SearchItem]
    timings_ms: dict[str, float] = Field(description="direct, reason (embedding, incl. queueing), index, total.")


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(strict=True)
    input: str | list[str] = Field(description="A text or a list of at most max_inputs texts.")
    model: str = Field(description=f"One of {', '.join(EMBEDDING_MODELS)}.", examples=["lrem-query-reason"])
    encoding_format: Literal["float", "base64"] = Field("float", description="base64: little-endian float32.")
    dimensions: int | None = Field(None, description="1 to the model's dimension (GET /info: dim). Below it, the "
                                   "first `dimensions` values, renormalised to unit length (Matryoshka-style; "
                                   "retrieval quality below the full size is untested).")
    truncate: bool = Field(False, description="An input over the model's token limit (max_query_tokens or "
                           "max_item_tokens): false, a 422 naming the limit; true, cut to it (counted in /metrics).")
    user: str | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str
    cot: str = Field("", description="lrem extension: the reasoning a query was embedded after.")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


# ---------------------------------------------------------------- the service behind the endpoints

class _Metrics:
    """Prometheus metrics of one app (its own registry, so several apps can share a process)."""

    def __init__(self, service: "SearchService"):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("lrem_http_requests", "HTTP requests by path and status.", ["path", "status"], registry=r)
        self.latency = Histogram("lrem_http_request_seconds", "HTTP request latency by path.", ["path"], registry=r,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.batch_size = Histogram("lrem_batch_size", "Texts per model call, by kind (direct, reason, item).",
                                    ["kind"], buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.batch_seconds = Histogram("lrem_batch_seconds", "Time of one model call, by kind.", ["kind"], registry=r,
                                       buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.cache = Counter("lrem_cache_lookups", "Cache lookups by kind and result (hit, miss).",
                             ["kind", "result"], registry=r)
        self.queries = Counter("lrem_queries", "Searches by requested mode and mode used.", ["mode", "mode_used"],
                               registry=r)
        self.truncated = Counter("lrem_truncated_inputs", "Inputs cut to the model's token limit, by side "
                                 "(query, item).", ["side"], registry=r)
        Gauge("lrem_cache_hit_rate", "Cache hits / lookups since start.", registry=r).set_function(
            lambda: service.cache.hit_rate)
        Gauge("lrem_cache_entries", "Entries in the cache.", registry=r).set_function(lambda: len(service.cache))
        Gauge("lrem_router_reason_share", "Share of mode=auto queries the router sent to reasoning.",
              registry=r).set_function(lambda: service.reasoned_share)
        Gauge("lrem_queue_depth", "Texts waiting for the model.", registry=r).set_function(
            lambda: service.batcher.pending)

    def observe_batch(self, kind: str, n: int, seconds: float) -> None:
        self.batch_size.labels(kind).observe(n)
        self.batch_seconds.labels(kind).observe(seconds)


def error_body(status: int, message: str, **extra) -> dict:
    """Every error's JSON: FastAPI's `detail` plus OpenAI's `error` object (its clients read that)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    code = "invalid_api_key" if status == 401 else status
    return {"detail": message, "error": {"message": message, "type": kind, "param": None, "code": code}, **extra}


def shorten(embedding: np.ndarray, dimensions: int) -> np.ndarray:
    """The first `dimensions` values of a unit vector, scaled back to unit length: how
    Matryoshka-trained embeddings are shortened (OpenAI's `dimensions`). lrem's models are not
    trained for it, so retrieval quality below the full size is untested.

    >>> shorten(np.array([0.6, 0.0, 0.8]), 2).tolist()
    [1.0, 0.0]
    """
    head = embedding[:dimensions]
    return head / max(float(np.linalg.norm(head)), 1e-12)  # an all-zero head stays zero


def _problem(error: dict) -> str:
    """One validation error as text: where, then what (an unparsable body says why and where:
    FastAPI's own message is "body.0: JSON decode error")."""
    if error["type"] == "json_invalid":
        why = error.get("ctx", {}).get("error", error["msg"])
        return (f"request body is not JSON ({why} at character {error['loc'][-1]}); bodies are read as JSON "
                "whatever their content-type")
    return f"{'.'.join(map(str, error['loc']))}: {error['msg']}"


def _ms(t0: float) -> float:
    return round(1000.0 * (time.perf_counter() - t0), 3)


class SearchService:
    """What the endpoints call: cache, batcher, router and index around one `Searcher`."""

    def __init__(self, searcher, config: ServeConfig):
        self.searcher, self.config = searcher, config
        self.router = config.router(getattr(searcher.model, "router", None))
        model = searcher.model
        self.model_id = f"{model.source or type(model.lm).__name__}|dim={model.dim}|index={searcher.index.meta.get('model', '')}"
        self.cache = EmbeddingCache(config.cache_size)
        self.n_auto = self.n_auto_reasoned = 0
        self.batcher = Batcher(self._encode, config.max_batch, config.max_wait_ms, config.max_queue)
        self.metrics = _Metrics(self)
        self.batcher.on_batch = self.metrics.observe_batch

    @property
    def reasoned_share(self) -> float:
        return self.n_auto_reasoned / self.n_auto if self.n_auto else 0.0

    def _encode(self, kind: str, texts: list[str]) -> tuple[list[str], np.ndarray]:
        """Runs in the model thread: one model call for a batch of texts of one kind."""
        model = self.searcher.model
        if kind == "item":
            return [""] * len(texts), model.encode_items(texts, batch_size=len(texts))
        enc = model.encode_queries(texts, mode=kind, batch_size=len(texts))
        return enc.cots, enc.embeddings

    async def embed(self, kind: str, text: str) -> tuple[str, np.ndarray, bool]:
        """(cot, embedding, from_cache) for one normalised text."""
        hit = self.cache.get((kind, text))
        self.metrics.cache.labels(kind, "miss" if hit is None else "hit").inc()
        if hit is not None:
            return hit[0], hit[1], True
        cot, emb = await self.batcher.submit(kind, text)
        self.cache.put((kind, text), (cot, emb))
        return cot, emb, False

    async def query(self, text: str, mode: str, k: int) -> dict:
        """Embed (direct, reason, or direct then routed), search; a `SearchResponse` as a dict."""
        t_start, timings, cached, cot, mode_used = time.perf_counter(), {}, True, "", mode
        index = self.searcher.index
        if mode != "reason":
            t0 = time.perf_counter()
            cot, emb, cached = await self.embed("direct", text)
            timings["direct"] = _ms(t0)
            t0 = time.perf_counter()
            scores, ids = await asyncio.to_thread(index.search, emb[None], max(k, self.router.depth))
            timings["index"] = _ms(t0)
            if mode == "auto":
                mode_used = "reason" if self.router.decide([text], scores)[0] else "direct"
                self.n_auto += 1
                self.n_auto_reasoned += mode_used == "reason"
        if mode_used == "reason":
            t0 = time.perf_counter()
            cot, emb, hit = await self.embed("reason", text)
            cached = cached and hit
            timings["reason"] = _ms(t0)
            t0 = time.perf_counter()
            scores, ids = await asyncio.to_thread(index.search, emb[None], k)
            timings["index"] = timings.get("index", 0.0) + _ms(t0)
        self.metrics.queries.labels(mode, mode_used).inc()
        items = [{"item_id": i, "title": index.title(i), "score": float(s)} for i, s in zip(ids[0][:k], scores[0][:k])]
        return {"query": text, "cot": cot, "mode_used": mode_used, "cached": cached, "items": items,
                "embedding": emb, "timings_ms": {**timings, "total": _ms(t_start)}}

    def clean(self, text: str, what: str, query: bool = True) -> str:
        """A valid text for the model, or an HTTP 422 that names the problem and the limit
        (the rules of `lrem search`: `lrem._text.check_query`)."""
        from fastapi import HTTPException

        try:
            check_query(text, what, self.config.max_query_chars)
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        return normalize_query(text) if query else text


def _is_json(content_type: bytes | None) -> bool:
    """Whether a content-type header names JSON (application/json, or application/*+json).

    >>> _is_json(b"Application/JSON; charset=utf-8"), _is_json(b"application/x-www-form-urlencoded")
    (True, False)
    """
    media = (content_type or b"").split(b";")[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


class _Guard:
    """ASGI middleware: checks the API key, rejects slow, oversized or non-UTF-8 bodies before
    parsing, has every body read as JSON; counts and times requests."""

    PATHS = ("/search", "/v1/embeddings", "/v1/models", "/health", "/healthz", "/info", "/metrics", "/docs",
             "/redoc", "/openapi.json")
    OPEN = ("/health", "/healthz")  # for load balancers: no key, and they say nothing but "ok"

    def __init__(self, app, max_body_bytes: int, metrics: _Metrics, api_key: str = "", body_timeout_s: float = 10.0):
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
            if body and not _is_json(dict(scope["headers"]).get(b"content-type")):
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


# ---------------------------------------------------------------- the app

def create_app(searcher, config: ServeConfig | None = None):
    """A FastAPI app serving `searcher` (an `lrem.search.Searcher`); the model loads nothing more.

    The batcher starts and the cache file (if any) is read in the app's lifespan, so the app
    must run under an ASGI server (uvicorn) or a lifespan-aware test client.
    """
    from fastapi import HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from fastapi_offline import FastAPIOffline
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .card import card_facts
    from .model import LREM_CONFIG

    cfg = config or ServeConfig()
    service = SearchService(searcher, cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if cfg.cache_path:
            service.cache.load(cfg.cache_path, service.model_id, dim=searcher.model.dim)
        service.batcher.start()
        yield
        await service.batcher.stop()
        if cfg.cache_path:
            service.cache.save(cfg.cache_path, service.model_id)

    # FastAPIOffline: FastAPI whose /docs and /redoc load Swagger UI and ReDoc from files it ships
    # (served under /static-offline-docs), not from a CDN, so they work on a machine offline.
    # validatorUrl None: Swagger UI would otherwise send the schema's URL to validator.swagger.io
    app = FastAPIOffline(title="lrem", lifespan=lifespan, description=__doc__.split("\n\n")[-1],
                         summary="LREM search and OpenAI-compatible embeddings: reason about a query, then embed it.",
                         swagger_ui_parameters={"validatorUrl": None})
    app.state.service = service
    app.add_middleware(_Guard, max_body_bytes=cfg.max_body_bytes, metrics=service.metrics, api_key=cfg.key(),
                       body_timeout_s=cfg.body_timeout_s)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        message = "; ".join(_problem(e) for e in exc.errors())
        return JSONResponse(error_body(422, message, errors=errors), 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), exc.status_code, headers=exc.headers)

    async def limited(coro):
        """Await `coro` under request_timeout_s; overload and timeouts are 503s with a message."""
        try:
            async with asyncio.timeout(cfg.request_timeout_s):
                return await coro
        except TimeoutError:
            raise HTTPException(503, f"request took over {cfg.request_timeout_s} s (request_timeout_s)") from None
        except Overloaded as e:
            raise HTTPException(503, f"server busy: {e}", headers={"Retry-After": "1"}) from None

    @app.post("/search", response_model=SearchResponse, responses={422: {"description": "Invalid request."}})
    async def search(req: SearchRequest) -> dict:
        """Top-k catalog items for a query, with the CoT it was embedded after and timings."""
        if req.k > cfg.max_k:
            raise HTTPException(422, f"k={req.k}; the limit is {cfg.max_k} (max_k)")
        query = service.clean(req.query, "query")
        service.metrics.truncated.labels("query").inc(len(searcher.model.overlong([query], "query")))  # cut, counted
        result = await limited(service.query(query, req.mode, req.k))
        del result["embedding"]
        return result

    @app.post("/v1/embeddings", response_model=EmbeddingResponse)
    async def embeddings(req: EmbeddingRequest) -> dict:
        """OpenAI-compatible embeddings: `model` picks lrem-query-reason, -direct, -auto or lrem-item."""
        kind = EMBEDDING_MODELS.get(req.model)
        if kind is None:
            raise HTTPException(404, f"model {req.model!r} does not exist; use one of {', '.join(EMBEDDING_MODELS)}")
        texts = [req.input] if isinstance(req.input, str) else req.input
        if not 1 <= len(texts) <= cfg.max_inputs:
            raise HTTPException(422, f"input has {len(texts)} texts; send 1 to {cfg.max_inputs} (max_inputs)")
        dim = searcher.model.dim
        if req.dimensions is not None and not 1 <= req.dimensions <= dim:
            raise HTTPException(400, f"dimensions={req.dimensions}; this model gives 1 to {dim} (its full size)")
        texts = [service.clean(t, f"input[{i}]", query=kind != "item") for i, t in enumerate(texts)]
        side = "item" if kind == "item" else "query"
        over = searcher.model.overlong(texts, side)
        if over and not req.truncate:
            (i, n), limit = over[0], ("max_item_tokens" if side == "item" else "max_query_tokens")
            raise HTTPException(422, f"input[{i}] has {n} tokens; the limit is {getattr(searcher.model.config, limit)} "
                                     f"({limit}); send truncate=true to cut it")
        service.metrics.truncated.labels(side).inc(len(over))

        async def one(text):
            if kind == "auto":
                r = await service.query(text, "auto", 1)
                return r["cot"], r["embedding"]
            return (await service.embed(kind, text))[:2]

        done = await limited(asyncio.gather(*(one(t) for t in texts)))
        if req.dimensions not in (None, dim):
            done = [(cot, shorten(emb, req.dimensions)) for cot, emb in done]
        n_tokens = sum(len(ids) for ids in searcher.model.tokenizer(texts, add_special_tokens=False)["input_ids"])
        as_b64 = req.encoding_format == "base64"
        data = [{"index": i, "cot": cot,
                 "embedding": base64.b64encode(emb.astype("<f4").tobytes()).decode() if as_b64 else emb.tolist()}
                for i, (cot, emb) in enumerate(done)]
        return {"data": data, "model": req.model, "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    model_facts = card_facts(searcher.model)
    saved = Path(searcher.model.source) / LREM_CONFIG if searcher.model.source else None  # an LREM folder's
    created = int(saved.stat().st_mtime) if saved and saved.is_file() else 0  # when it was saved; 0: unknown

    @app.get("/v1/models")
    async def models() -> dict:
        """The embedding `model` names /v1/embeddings accepts (OpenAI's model list shape), each with
        what it embeds (`mode`, `input`), its token limit (`max_model_len`, as vLLM names it) and
        the model card's facts: base model, training stages and steps, dim, CoT budget, prompts."""
        def entry(name, kind):
            side = "item" if kind == "item" else "query"
            return {"id": name, "object": "model", "created": created, "owned_by": "lrem",
                    "root": model_facts["base_model"], "parent": None, "mode": kind, "input": side,
                    "max_model_len": model_facts[f"max_{side}_tokens"], **model_facts}

        return {"object": "list", "data": [entry(m, kind) for m, kind in EMBEDDING_MODELS.items()]}

    @app.get("/health")
    @app.get("/healthz")
    async def health() -> dict:
        """Liveness only (no key needed, nothing about the deployment): {"status": "ok"}."""
        return {"status": "ok"}

    @app.get("/info")
    async def info() -> dict:
        """What is served: model, index size, cache, router and settings (the API key hidden)."""
        return {"model": searcher.model.source, "dim": searcher.model.dim,
                "items": len(searcher.index.item_ids), "factory": searcher.index.meta.get("factory"),
                "cache": {"entries": len(service.cache), "hit_rate": service.cache.hit_rate},
                "router": service.router.describe(), "reasoned_share": service.reasoned_share,
                "queue": service.batcher.pending, "config": cfg.public()}

    @app.get("/metrics", response_class=PlainTextResponse, response_model=None)
    async def metrics():
        """Prometheus text format: requests, latency and batch-size histograms, cache hit rate,
        share of auto queries reasoned."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


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


@contextlib.contextmanager
def background_server(app, host: str = "127.0.0.1", port: int = 0, startup_timeout_s: float = 60.0):
    """Run `app` under uvicorn in a daemon thread (port 0: a free one); yields its base URL.

    >>> # with background_server(create_app(searcher)) as url: httpx.get(url + "/healthz")
    """
    import uvicorn

    server = uvicorn.Server(uvicorn_config(app, host, port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True, name="lrem-serve")
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def serve(index_dir: str | Path, config: ServeConfig, log=print) -> None:
    """Load the index and its model, then serve until interrupted (what `lrem serve` runs)."""
    import uvicorn

    from .search import Searcher

    searcher = Searcher.load(index_dir, log=log)
    log(f"serving {index_dir} ({len(searcher.index.item_ids)} items, model {searcher.model.source}) "
        f"on http://{config.host}:{config.port}  settings: {json.dumps(config.public())}")
    server = uvicorn.Server(uvicorn_config(create_app(searcher, config), config.host, config.port))
    try:
        server.run()
    except KeyboardInterrupt:  # as uvicorn.run: Ctrl-C is a normal stop
        pass
    if not server.started:
        raise SystemExit(3)  # uvicorn has logged why (port in use, ...), and exits 3 itself so
