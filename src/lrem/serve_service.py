"""What `lrem serve`'s endpoints call: `SearchService` (cache, batcher, router and searcher) and
its Prometheus metrics. No web framework in here: the HTTP layer is `lrem.serve`.

A query's text is looked up in the cache of (kind, text) -> (CoT, embedding); misses go to the
`Batcher`, whose one worker runs the model. `Searcher.route` decides which embeddings a query
needs (the same direct -> route -> reason steps as `lrem eval`'s auto mode).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import time

import numpy as np

from ._defaults import QUERY_BATCH
from .batching import Batcher, EmbeddingCache
from .fusion import FUSION_DEPTH, fuse
from .rerank import rank_by_cosine
from .search_types import GROUNDED_MODES, grounded_inputs
from .serve_config import ServeConfig
from .vectordb import redact


HYBRID_OFF = "hybrid search is off on this server; start it with --set hybrid=true"
WARM_KINDS = ("direct", "reason")  # what `auto` asks for: the direct embedding, and the reasoned one if routed
CACHED_KINDS = WARM_KINDS  # what the server caches: query embeddings that depend on the query text only


def cache_model_id(searcher) -> str:
    """What a cache file's entries belong to (a file of another is not loaded): the weights, by
    their fingerprint, and the prompts, which shape a CoT and an embedding as much. Not the model's
    path or name: the same weights named another way (an index rebuilt from another folder, a
    reload) keep their cache."""
    from .index_base import model_fingerprint

    model = searcher.model
    prompts = hashlib.sha1(json.dumps(model.config.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
    return f"{model_fingerprint(model)}|dim={model.dim}|prompts={prompts}"


def warm_cache(searcher, queries: list[str], path, kinds=WARM_KINDS, batch_size: int = QUERY_BATCH,
               save_every_s: float = 60.0, show_progress: bool = True) -> dict:
    """Precompute the query cache of `lrem serve` (`cache_path`) for `queries`, say the head of a
    query log: each query's CoT and embedding for each of `kinds`, keyed as the server keys them
    (`normalize_query`). Queries the file at `path` already holds are skipped, and the file is
    rewritten (atomically) every `save_every_s`, so a killed run resumes. The file's first queries
    are stored newest, so a server whose `cache_size` is smaller keeps those: list the most
    frequent first. Returns counts. A folder, a file that is no lrem cache, or another model's
    cache at `path` is a ValueError: the caller named this file, so nothing is moved aside."""
    from tqdm.auto import tqdm

    from ._text import normalize_query

    for kind in kinds:
        if kind not in WARM_KINDS:
            raise ValueError(f"cache kind {kind!r}; expected one of {', '.join(WARM_KINDS)}")
    texts = list(dict.fromkeys(normalize_query(q) for q in queries))  # the server's keys, each once
    model_id, model = cache_model_id(searcher), searcher.model
    cache, said = EmbeddingCache(max(1, len(texts) * len(kinds))), []
    EmbeddingCache.check_file(path)  # refused, not moved aside as a server's cache would be
    resumed = cache.load(path, model_id, dim=model.dim, log=said.append)
    if said:  # another model's cache: check_file passed, and the model id holds the dim, so nothing moved
        raise ValueError(f"{said[0].split(';')[0]}: pass another path, or delete it")
    todo = [(kind, t) for kind in kinds for t in texts if cache.get((kind, t)) is None]
    saved = time.monotonic()
    with tqdm(total=len(texts) * len(kinds), initial=len(texts) * len(kinds) - len(todo), desc="cache", unit="q",
              disable=not show_progress) as bar:
        for kind in kinds:
            mine = [t for k, t in todo if k == kind]
            for s in range(0, len(mine), batch_size):
                batch = mine[s:s + batch_size]
                enc = model.encode_queries(batch, mode=kind, batch_size=len(batch), truncate=searcher.truncate)
                for t, cot, emb in zip(batch, enc.cots, enc.embeddings):
                    cache.put((kind, t), (cot, emb))
                bar.update(len(batch))
                if time.monotonic() - saved > save_every_s:
                    cache.save(path, model_id)
                    saved = time.monotonic()
    final = EmbeddingCache(cache.max_entries)  # the file's first queries newest: a smaller server cache keeps them
    for t in reversed(texts):
        for kind in kinds:
            final.put((kind, t), cache.get((kind, t)))
    final.save(path, model_id)
    return {"queries": len(texts), "computed": len(todo), "resumed": resumed, "entries": len(final)}


class ServeMetrics:
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
        self.queries = Counter("lrem_queries", "Queries embedded, by endpoint (search, embeddings, rerank), requested "
                               "mode and mode used.", ["endpoint", "mode", "mode_used"],
                               registry=r)
        self.truncated = Counter("lrem_truncated_inputs", "Texts cut to the model's token limit when embedded, by "
                                 "side (query, item).", ["side"], registry=r)
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


class SearchService:
    """What the endpoints call: cache, batcher, router and index around one `Searcher`."""

    def __init__(self, searcher, config: ServeConfig):
        self.searcher, self.config = searcher, config
        self.router = config.router(getattr(searcher.model, "router", None))
        self.model_id = cache_model_id(searcher)
        self.cache = EmbeddingCache(config.cache_size)
        self.n_auto = self.n_auto_reasoned = 0
        self.batcher = Batcher(self._encode, config.max_batch, config.max_wait_ms, config.max_queue,
                               on_result=self._computed)
        self.metrics = ServeMetrics(self)
        self.batcher.on_batch = self.metrics.observe_batch
        if config.hybrid:
            searcher.lexical()  # BM25 over the titles, built now, not at the first hybrid query
        self._reloading = asyncio.Lock()
        self._reloads: set[asyncio.Task] = set()  # reloads under way, their clients gone or not

    @property
    def reasoned_share(self) -> float:
        return self.n_auto_reasoned / self.n_auto if self.n_auto else 0.0

    def _encode(self, kind: str, texts: list[str]) -> tuple[list[str], np.ndarray]:
        """Runs in the model thread: one model call for a batch of texts of one kind. Texts the
        model cuts to its token limit are counted here, where they are embedded: once per text
        computed, not per request (a cache hit or a next page cuts nothing)."""
        model = self.searcher.model
        side = "item" if kind == "item" else "query"
        cut = model.truncated[side]  # the model counts what it cuts; this thread is its only caller
        if kind == "item":
            cots, emb = [""] * len(texts), model.encode_items(texts, batch_size=len(texts))
        else:
            texts, cands = grounded_inputs(kind, texts)  # a grounded kind's texts: (query, titles) pairs
            enc = model.encode_queries(texts, mode=GROUNDED_MODES.get(kind, kind), batch_size=len(texts),
                                       candidates=cands)
            cots, emb = enc.cots, enc.embeddings
        self.metrics.truncated.labels(side).inc(model.truncated[side] - cut)
        return cots, emb

    def _computed(self, kind: str, text: str, cot: str, row: np.ndarray) -> None:
        """The batcher's `on_result`: every query embedding computed goes into the cache, its
        callers gone or not (the only writer of the cache while serving). Not cached: a grounded
        kind's text (a query and its first-stage titles, which depend on the index), and items
        (rerank candidates and lrem-item inputs would push the head queries out)."""
        if kind in CACHED_KINDS:
            self.cache.put((kind, text), (cot, row))

    async def embed(self, kind: str, text: str) -> tuple[str, np.ndarray, bool]:
        """(cot, embedding, from_cache) for one normalised text: from the cache, else the batcher
        (whose `on_result` caches it)."""
        if kind not in CACHED_KINDS:
            cot, emb = await self.batcher.submit(kind, text)
            return cot, emb, False
        hit = self.cache.get((kind, text))
        self.metrics.cache.labels(kind, "miss" if hit is None else "hit").inc()
        if hit is not None:
            return hit[0], hit[1], True
        cot, emb = await self.batcher.submit(kind, text)
        return cot, emb, False

    async def query(self, text: str, mode: str, k: int, lexical_weight: float | None = None,
                    where: dict | None = None, endpoint: str = "search") -> dict:
        """Embed (direct, reason, or direct then routed: `Searcher.route`), search; a
        `SearchResponse` as a dict, plus the embedding the items were found with. `lexical_weight`
        not None: hybrid search, the dense top `FUSION_DEPTH` fused with BM25's (`lrem.fusion`).
        `where`: a filter (`ItemIndex.allowed`) both keep to. `endpoint`: the metrics' label of
        the caller (an auto or grounded query embedded for /v1/embeddings or rerank searches too)."""
        if lexical_weight is not None and not self.config.hybrid:
            raise ValueError(HYBRID_OFF)
        t_start, hits, searcher = time.perf_counter(), [], self.searcher  # one index per query, reloads or not
        depth = k if lexical_weight is None else max(k, FUSION_DEPTH)

        async def embed(kind: str, texts: list[str]) -> tuple[list[str], np.ndarray]:
            rows = [await self.embed(kind, t) for t in texts]  # one text: the batcher batches across requests
            hits.extend(hit for _, _, hit in rows)
            return [cot for cot, _, _ in rows], np.stack([emb for _, emb, _ in rows])  # (n, dim)

        routed = await searcher.route([text], depth, mode, embed=embed, router=self.router,
                                      offload=asyncio.to_thread, where=where)  # FAISS off the event loop
        [result], [reasoned], timings = routed.results, routed.reasoned, dict(routed.timings_ms)
        if lexical_weight is not None:
            t0 = time.perf_counter()
            allowed = searcher.index.allowed(where) if where else None
            [lexical] = await asyncio.to_thread(searcher.lexical().search, [text], depth, allowed)
            timings["lexical"] = round(1000.0 * (time.perf_counter() - t0), 3)
            result = fuse([result, lexical], k, [1.0, lexical_weight])
        mode_used = mode if mode in GROUNDED_MODES else "reason" if reasoned else "direct"
        if mode == "auto":
            self.n_auto += 1
            self.n_auto_reasoned += reasoned
        self.metrics.queries.labels(endpoint, mode, mode_used).inc()
        title = searcher.index.title
        items = [{"item_id": h.item_id, "title": title(h.item_id), "score": h.score} for h in result.hits]
        return {"query": text, "cot": result.cot, "mode_used": mode_used, "cached": all(hits), "items": items,
                "embedding": routed.embeddings[0],
                "timings_ms": {**timings, "total": round(1000.0 * (time.perf_counter() - t_start), 3)}}

    async def embed_query(self, text: str, mode: str, endpoint: str) -> tuple[str, np.ndarray, str]:
        """(cot, embedding, mode used) of a normalised query in any mode: direct and reason from the
        cache or the batcher; auto and grounded search the index first (`query`). `endpoint`:
        the caller, for the metrics."""
        if mode in ("direct", "reason"):
            cot, emb, _ = await self.embed(mode, text)
            self.metrics.queries.labels(endpoint, mode, mode).inc()
            return cot, emb, mode
        r = await self.query(text, mode, 1, endpoint=endpoint)
        return r["cot"], r["embedding"], r["mode_used"]

    async def rerank(self, query: str, mode: str, texts: list[str] | None = None,
                     item_ids: list[str] | None = None) -> dict:
        """Score given candidates against a query: the query embedded as `mode` asks (as in
        `query`; auto routes on the index's scores), the candidates either `texts` embedded as
        items (through the batcher, all at once, and not cached: a rerank's candidates would push
        the head queries out) or items of the served index by id (their stored vectors, no model
        call). Returns {cot, mode_used, order: [(candidate index, cosine)] best first (ties in
        request order), titles (of item_ids, from the same index as their vectors, whatever a
        reload does meanwhile; else None), timings_ms}. A ValueError or KeyError says what is
        wrong with the candidates (an unknown id; an index whose codes lost the vectors)."""
        t_start, searcher, titles = time.perf_counter(), self.searcher, None
        if item_ids is not None:
            vectors_of = getattr(searcher.index, "vectors_of", None)
            vectors = None if vectors_of is None else await asyncio.to_thread(vectors_of, item_ids)
            if vectors is None:
                raise ValueError("this index does not keep its items' vectors as added (compressed codes): send "
                                 "the candidates as texts")
            titles = [searcher.index.title(i) for i in item_ids]
        cot, q, mode_used = await self.embed_query(query, mode, "rerank")
        t_query = time.perf_counter()
        if item_ids is None:
            rows = await asyncio.gather(*(self.batcher.submit("item", t) for t in texts))  # batched, not one by one
            vectors = np.stack([emb for _, emb in rows]) if rows else np.zeros((0, len(q)), np.float32)
        return {"cot": cot, "mode_used": mode_used, "order": rank_by_cosine(q, vectors), "titles": titles,
                "timings_ms": {"query": round(1000.0 * (t_query - t_start), 3),
                               "total": round(1000.0 * (time.perf_counter() - t_start), 3)}}

    async def reload(self) -> dict:
        """Read the served index folder again (say, after `lrem index --update`) and serve it from
        the next query on; queries under way finish on the index they started with. The index must
        hold this model's embeddings (its model fingerprint), else a ValueError and the old one stays.
        The query cache stays: query embeddings depend on the model, not on the items."""
        from .index import open_index
        from .search import Searcher, other_weights

        path = getattr(self.searcher, "index_dir", None)
        if not path:
            raise ValueError("this server was not started from an index folder (lrem serve --index): nothing to reload")

        def load():
            index = open_index(path, mmap=self.config.mmap_index)
            other = other_weights(index, self.searcher.model)
            if other:
                raise ValueError(f"{path}: its items were embedded by other weights (model fingerprint {other[0]}, "
                                 f"the served model's {other[1]}); restart the server to serve another model")
            fresh = Searcher(self.searcher.model, index, router=self.searcher.router, truncate=self.searcher.truncate)
            fresh.index_dir = path
            if self.config.hybrid:
                fresh.lexical()
            return fresh

        async def swap() -> dict:
            async with self._reloading:  # one reload at a time
                t0, before = time.perf_counter(), len(self.searcher.index.item_ids)
                fresh = await asyncio.to_thread(load)
                self.searcher = fresh
            # redacted: a milvus: spec may hold a password
            return {"index": redact(str(path)), "items": len(fresh.index.item_ids), "previous_items": before,
                    "last_update": (fresh.index.meta.get("updates") or [None])[-1],
                    "seconds": round(time.perf_counter() - t0, 3)}

        # A reload once asked for is carried out whoever waits for it: a client that gives up (curl -m,
        # a proxy's timeout) cancels only its wait, not the swap (the index would be read, then dropped)
        task = asyncio.ensure_future(swap())
        self._reloads.add(task)  # a strong reference: the loop keeps only weak ones to tasks
        task.add_done_callback(self._reload_done)
        return await asyncio.shield(task)

    def _reload_done(self, task: asyncio.Task) -> None:
        self._reloads.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a failed reload nobody waited for is no "never retrieved" warning

    async def finish_reloads(self) -> None:
        """Wait for reloads under way (at shutdown: their clients may be gone)."""
        if self._reloads:
            await asyncio.wait(set(self._reloads))
