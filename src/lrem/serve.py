"""HTTP search and embedding service: `lrem serve --index runs/idx [--config serve.yaml]`.

    from lrem.search import Searcher
    from lrem.serve import ServeConfig, create_app
    app = create_app(Searcher.load("runs/idx"), ServeConfig(max_batch=32))
    # uvicorn.run(app, host="127.0.0.1", port=8000); then:
    # curl -H 'content-type: application/json' -d '{"query": "a drink stronger than tea", "k": 5}' \
    #      localhost:8000/search

Endpoints: `POST /search`, `POST /v1/embeddings` (OpenAI's embeddings API: point an OpenAI
client's `base_url` at `http://host:port/v1`), `POST /rerank` (TEI's) and `POST /v1/rerank`
(Cohere's and Jina's: score a first stage's candidates, say Elasticsearch's), `GET /v1/models`
(with the model card's facts), `GET /info` (model, index and settings), `GET /metrics` (Prometheus text), the OpenAPI schema at
`/openapi.json` (browsable at `/docs` and `/redoc`, their assets served by lrem: they work
offline), and `GET /health` (or `/healthz`: liveness only). Request bodies are JSON whatever
their content-type says (curl's `-d` says form encoding). With an API key (`api_key`, or the
environment variable LREM_API_KEY) every endpoint but /health, /healthz and the API's docs
(/docs, /redoc, /openapi.json) wants `Authorization: Bearer KEY` and answers 401 without it.

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
import json
import logging
import signal
import threading
import time
import uuid
from pathlib import Path

import numpy as np
from starlette.requests import Request  # at module level: FastAPI reads the endpoints' annotations here

from ._text import check_query, normalize_query
from .batching import Overloaded
from .index_base import check_filter
from .serve_config import ROUTER_KINDS, ServeConfig
from .serve_http import RequestGuard, listen, uvicorn_config
from .serve_log import QueryLog
from .serve_schemas import (EMBEDDING_MODELS, CohereRerankRequest, CohereRerankResponse, EmbeddingData,
                            EmbeddingRequest, EmbeddingResponse, EmbeddingUsage, RerankHit, RerankRequest, SearchItem,
                            SearchRequest, SearchResponse, error_body)
from .serve_service import HYBRID_OFF, SearchService
from .vectordb import redact

# The names this module had before its parts moved out (`from lrem.serve import ServeConfig`, ...)
__all__ = ["ROUTER_KINDS", "EMBEDDING_MODELS", "ServeConfig", "SearchService", "SearchRequest",
           "SearchItem", "SearchResponse", "EmbeddingRequest", "EmbeddingData", "EmbeddingUsage", "EmbeddingResponse",
           "error_body", "normalize_query", "clean", "shorten", "create_app", "uvicorn_config", "background_server",
           "serve"]


def clean(text: str, what: str, max_chars: int, query: bool = True) -> str:
    """A valid text for the model, or an HTTP 422 that names the problem and the limit
    (the rules of `lrem search`: `lrem._text.check_query`); queries come back normalised.

    >>> clean("  Wine  Opener ", "query", max_chars=512)
    'wine opener'
    """
    from fastapi import HTTPException

    try:
        check_query(text, what, max_chars, limit="max_query_chars" if query else "max_item_chars")
    except ValueError as e:
        raise HTTPException(422, str(e)) from None
    return normalize_query(text) if query else text


def shorten(embedding: np.ndarray, dimensions: int) -> np.ndarray:
    """The first `dimensions` values of a unit vector, scaled back to unit length: how
    Matryoshka-trained embeddings are shortened (OpenAI's `dimensions`). lrem's models are not
    trained for it, so retrieval quality below the full size is untested.

    >>> shorten(np.array([0.6, 0.0, 0.8]), 2).tolist()
    [1.0, 0.0]
    """
    head = embedding[:dimensions]
    return head / max(float(np.linalg.norm(head)), 1e-12)  # an all-zero head stays zero


def seen_tokens(model, texts: list[str], side: str) -> int:
    """Tokens of `texts` the model is given (API usage): a text over the side's token limit is cut
    to it, so it counts at most the limit."""
    from .prompts import SIDES

    limit = getattr(model.config, SIDES[side])
    return sum(min(n, limit) for n in model.token_counts(texts))


def unparsable(error: BaseException) -> str:
    """Why a body that json.loads refused with other than a JSONDecodeError is not JSON lrem reads
    (FastAPI answers those with a bare 400).

    >>> unparsable(RecursionError("maximum recursion depth exceeded"))
    'request body is not JSON lrem can read: its arrays or objects are nested too deep'
    """
    import sys

    if isinstance(error, RecursionError):
        why = "its arrays or objects are nested too deep"
    elif isinstance(error, ValueError) and "digits" in str(error):  # Python's int_max_str_digits
        why = f"a number is too long (over {sys.get_int_max_str_digits()} digits)"
    else:
        why = f"{type(error).__name__}: {error}"
    return f"request body is not JSON lrem can read: {why}"


def _problem(error: dict) -> str:
    """One validation error as text: where, then what (an unparsable body says why and where:
    FastAPI's own message is "body.0: JSON decode error").

    >>> _problem({"type": "missing", "loc": ("body", "query"), "msg": "Field required"})
    'body.query: Field required'
    """
    if error["type"] == "json_invalid":
        why = error.get("ctx", {}).get("error", error["msg"])
        return (f"request body is not JSON ({why} at character {error['loc'][-1]}); bodies are read as JSON "
                "whatever their content-type")
    return f"{'.'.join(map(str, error['loc']))}: {error['msg']}"


# ---------------------------------------------------------------- the app

def create_app(searcher, config: ServeConfig | None = None):
    """A FastAPI app serving `searcher` (an `lrem.search.Searcher`); the model loads nothing more.

    The batcher starts and the cache file (if any) is read in the app's lifespan, so the app
    must run under an ASGI server (uvicorn) or a lifespan-aware test client.
    """
    from fastapi import HTTPException
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from fastapi_offline import FastAPIOffline
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .card import card_facts
    from .model import LREM_CONFIG

    cfg = config or ServeConfig()
    cfg.check_paths(getattr(searcher, "index_dir", None))  # as `serve` does, for apps made in Python
    service = SearchService(searcher, cfg)
    query_log = QueryLog(cfg.query_log, cfg.query_log_max_mb, cfg.query_log_backups) if cfg.query_log else None

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if cfg.cache_path:
            service.cache.load(cfg.cache_path, service.model_id, dim=searcher.model.dim)
        if query_log is not None:
            query_log.start()
        service.batcher.start()
        yield
        await service.finish_reloads()
        await service.batcher.stop()
        if query_log is not None:
            query_log.stop()
        if cfg.cache_path:
            try:
                service.cache.save(cfg.cache_path, service.model_id)
            except OSError as e:  # a cache is disposable: one line, not uvicorn's "shutdown failed" traceback
                logging.getLogger("lrem").warning(f"cache {cfg.cache_path}: not saved ({e})")

    # FastAPIOffline: FastAPI whose /docs and /redoc load Swagger UI and ReDoc from files it ships
    # (served under /static-offline-docs), not from a CDN, so they work on a machine offline.
    # validatorUrl None: Swagger UI would otherwise send the schema's URL to validator.swagger.io
    app = FastAPIOffline(title="lrem", lifespan=lifespan, description=__doc__.split("\n\n")[-1],
                         summary="LREM search and OpenAI-compatible embeddings: reason about a query, then embed it.",
                         swagger_ui_parameters={"validatorUrl": None})
    app.state.service = service
    app.add_middleware(RequestGuard, max_body_bytes=cfg.max_body_bytes, metrics=service.metrics, api_key=cfg.key(),
                       body_timeout_s=cfg.body_timeout_s, max_requests=cfg.max_requests)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        message = "; ".join(_problem(e) for e in exc.errors())
        return JSONResponse(error_body(422, message, errors=errors), 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI's "There was an error parsing the body"
            return JSONResponse(error_body(422, unparsable(exc.__cause__)), 422)
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
        depth = req.offset + req.k  # the ranking is cut at depth, then the page taken from it
        if depth > cfg.max_k:
            what = f"offset + k = {depth}" if req.offset else f"k={req.k}"
            raise HTTPException(422, f"{what}; the limit is {cfg.max_k} (max_k)")
        query = clean(req.query, "query", cfg.max_query_chars)
        if req.hybrid and not cfg.hybrid:
            raise HTTPException(400, HYBRID_OFF)
        if req.filter:
            try:  # a field the index lacks: a 422 naming the ones it has
                check_filter(req.filter, service.searcher.index.filter_fields)
            except ValueError as e:
                raise HTTPException(422, f"filter: {e}") from None
        result = await limited(service.query(query, req.mode, depth, req.lexical_weight if req.hybrid else None,
                                             req.filter))
        del result["embedding"]
        result["items"] = result["items"][req.offset :]
        if req.min_score is not None:  # after the search: the cache keeps whole top-k lists
            result["items"] = [it for it in result["items"] if it["score"] >= req.min_score]
        if query_log is not None:
            query_log.write({"query": query, "mode": req.mode, "k": req.k, "offset": req.offset, "filter": req.filter,
                             "hybrid": req.hybrid, "lexical_weight": req.lexical_weight, "min_score": req.min_score},
                            result)
        return result

    def checked(texts: list[str], side: str, truncate: bool, what: str) -> list[str]:
        """1 to max_inputs valid texts (queries normalised), or a 422 naming the first bad one; a
        text over the side's token limit is a 422 unless `truncate` (then the model cuts it, and
        `SearchService` counts it where it is embedded)."""
        if not 1 <= len(texts) <= cfg.max_inputs:
            raise HTTPException(422, f"{what} has {len(texts)} texts; send 1 to {cfg.max_inputs} (max_inputs)")
        max_chars = cfg.max_query_chars if side == "query" else cfg.max_item_chars
        texts = [clean(t, f"{what}[{i}]", max_chars, query=side == "query") for i, t in enumerate(texts)]
        over = searcher.model.overlong(texts, side)
        if over and not truncate:
            (i, n), limit = over[0], ("max_item_tokens" if side == "item" else "max_query_tokens")
            raise HTTPException(422, f"{what}[{i}] has {n} tokens; the limit is {getattr(searcher.model.config, limit)} "
                                     f"({limit}); send truncate=true to cut it")
        return texts

    async def scored(query: str, mode: str, texts: list[str] | None, item_ids: list[str] | None) -> dict:
        """`SearchService.rerank` (and the normalised query) with its candidate errors as 422s."""
        query = clean(query, "query", cfg.max_query_chars)
        try:
            return {"query": query, **await limited(service.rerank(query, mode, texts, item_ids))}
        except KeyError as e:
            raise HTTPException(422, f"item_ids: {e.args[0]}") from None
        except ValueError as e:
            raise HTTPException(422, str(e)) from None

    @app.post("/rerank", response_model=list[RerankHit], response_model_exclude_none=True)
    async def rerank(req: RerankRequest) -> list[dict]:
        """TEI's rerank: each candidate's cosine with the query (embedded as `mode` asks), best
        first. Candidates are `texts`, embedded as items, or lrem's `item_ids` of the served index."""
        if (req.texts is None) == (req.item_ids is None):
            raise HTTPException(422, "send the candidates as texts or as item_ids (one of the two)")
        if req.truncation_direction.lower() == "left":
            raise HTTPException(422, "truncation_direction=Left: lrem cuts a text at its end (Right) only")
        texts = None if req.texts is None else checked(req.texts, "item", bool(req.truncate), "texts")
        if req.item_ids is not None and not 1 <= len(req.item_ids) <= cfg.max_inputs:
            raise HTTPException(422, f"item_ids has {len(req.item_ids)} ids; send 1 to {cfg.max_inputs} (max_inputs)")
        result = await scored(req.query, req.mode, texts, req.item_ids)
        if not req.return_text:
            return [{"index": i, "score": s} for i, s in result["order"]]
        shown = texts if texts is not None else result["titles"]  # from the index the vectors came from
        return [{"index": i, "score": s, "text": shown[i]} for i, s in result["order"]]

    @app.post("/v1/rerank", response_model=CohereRerankResponse, response_model_exclude_none=True)
    async def rerank_v1(req: CohereRerankRequest) -> dict:
        """Cohere's and Jina's rerank API (as vLLM serves it): `documents` scored against the query
        by cosine, best first; `model` names how the query is embedded (a query model of
        /v1/embeddings). lrem adds the query's `cot` and `mode_used`."""
        name = req.model or "lrem-query-auto"
        mode = EMBEDDING_MODELS.get(name)
        if mode in (None, "item"):
            queries = [m for m, kind in EMBEDDING_MODELS.items() if kind != "item"]
            raise HTTPException(404, f"model {name!r} does not rank; use one of {', '.join(queries)}")
        docs = [d if isinstance(d, str) else d.get("text") for d in req.documents]  # {"text", "id", ...}: the text
        for i, d in enumerate(docs):
            if not isinstance(d, str):
                raise HTTPException(422, f"documents[{i}]: a document is a text or an object with a text")
        docs = checked(docs, "item", req.truncate, "documents")
        result = await scored(req.query, mode, docs, None)
        n_tokens = seen_tokens(searcher.model, [result["query"]], "query") + seen_tokens(searcher.model, docs, "item")
        top = result["order"][:req.top_n or None]  # 0 or none: all, as vLLM
        return {"id": uuid.uuid4().hex, "model": name, "cot": result["cot"], "mode_used": result["mode_used"],
                "usage": {"total_tokens": n_tokens},
                "results": [{"index": i, "relevance_score": s, **({"document": {"text": docs[i]}}
                                                                  if req.return_documents else {})} for i, s in top]}

    @app.post("/v1/embeddings", response_model=EmbeddingResponse)
    async def embeddings(req: EmbeddingRequest) -> dict:
        """OpenAI-compatible embeddings: `model` picks lrem-query-reason, -direct, -auto, -grounded,
        -grounded-direct or lrem-item."""
        kind = EMBEDDING_MODELS.get(req.model)
        if kind is None:
            raise HTTPException(404, f"model {req.model!r} does not exist; use one of {', '.join(EMBEDDING_MODELS)}")
        texts = [req.input] if isinstance(req.input, str) else req.input
        dim = searcher.model.dim
        if req.dimensions is not None and not 1 <= req.dimensions <= dim:
            raise HTTPException(400, f"dimensions={req.dimensions}; this model gives 1 to {dim} (its full size)")
        texts = checked(texts, "item" if kind == "item" else "query", req.truncate, "input")

        async def one(text):
            if kind == "item":
                return (await service.embed(kind, text))[:2]
            return (await service.embed_query(text, kind, "embeddings"))[:2]

        done = await limited(asyncio.gather(*(one(t) for t in texts)))
        if req.dimensions not in (None, dim):
            done = [(cot, shorten(emb, req.dimensions)) for cot, emb in done]
        n_tokens = seen_tokens(searcher.model, texts, "item" if kind == "item" else "query")
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

    @app.get("/v1/models/{model}", responses={404: {"description": "No such model."}})
    async def model_entry(model: str) -> dict:
        """One entry of /v1/models (what the openai client's `models.retrieve` asks for)."""
        for entry in (await models())["data"]:
            if entry["id"] == model:
                return entry
        raise HTTPException(404, f"model {model!r} does not exist; use one of {', '.join(EMBEDDING_MODELS)}")

    @app.get("/health")
    @app.get("/healthz")
    async def health() -> dict:
        """Liveness only (no key needed, nothing about the deployment): {"status": "ok"}."""
        return {"status": "ok"}

    for path in ("/health", "/healthz"):  # HEAD too, as some load balancers check; kept out of the schema
        app.add_api_route(path, health, methods=["HEAD"], include_in_schema=False)

    @app.post("/admin/reload", responses={403: {"description": "No api_key is set and the client is not on this machine."},
                                         409: {"description": "The index cannot be reloaded (the message says why); "
                                                               "the old one stays in service."}})
    async def reload(request: Request) -> dict:
        """Read the index folder again (after `lrem index --update`) and serve it from the next query on."""
        if not cfg.key() and not is_loopback(request.client.host if request.client else ""):
            raise HTTPException(403, "POST /admin/reload: without an api_key only this machine's clients (loopback) "
                                     "may reload; set api_key to reload from elsewhere")
        try:
            return await service.reload()
        except (ValueError, OSError) as e:
            raise HTTPException(409, str(e)) from None

    @app.get("/info")
    async def info() -> dict:
        """What is served: model, index size, cache, router and settings (the API key hidden)."""
        index = service.searcher.index  # the one served now (POST /admin/reload replaces it)
        return {"model": searcher.model.source, "dim": searcher.model.dim,
                "items": len(index.item_ids), "factory": index.meta.get("factory"),
                "filter_fields": index.filter_fields,
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


def is_loopback(host: str) -> bool:
    """Whether a client address is this machine's loopback (127.0.0.0/8, ::1); False for anything
    that is not an IP address."""
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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


def load_searcher(index_dir: str | Path, config: ServeConfig, log=print):
    """The `Searcher` `lrem serve` serves: the index folder and its model, the index read into
    memory unless `mmap_index` (as `SearchService.reload` reads it again)."""
    from .search import Searcher

    return Searcher.load(index_dir, log=log, mmap=config.mmap_index)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve(index_dir: str | Path, config: ServeConfig, log=print) -> None:
    """Load the index and its model, then serve until interrupted (what `lrem serve` runs)."""
    import faulthandler

    import uvicorn

    faulthandler.enable()  # a fatal signal (SIGBUS from a mapped index overwritten in place) says where, on stderr
    config.check_paths(index_dir)  # before the port and the model: a minute's load, then a refusal, helps no one
    config.key()  # a blank key refused now, too
    sock = listen(config.host, config.port)
    # SIGTERM (docker stop, Kubernetes, systemd) is a normal stop, as Ctrl-C: uvicorn drains the
    # requests in flight, then raises the signal again once its own handler is gone, which by
    # default kills the process (exit 143 after a clean shutdown); here it ends as SIGINT does
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main else None
    try:
        searcher = load_searcher(index_dir, config, log)
        log(f"serving {redact(str(index_dir))} ({len(searcher.index.item_ids)} items, model {searcher.model.source}) "
            f"on http://{config.host}:{sock.getsockname()[1]}  settings: {json.dumps(config.public())}")
        server = uvicorn.Server(uvicorn_config(create_app(searcher, config), config.host, config.port))
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # as uvicorn.run: Ctrl-C is a normal stop
        return
    finally:
        sock.close()
        if main:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    if not server.started:
        raise SystemExit(3)  # uvicorn has logged why (port in use, ...), and exits 3 itself so
