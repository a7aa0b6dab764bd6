"""Search: an LREM model over an item index, with the query modes of the paper and its ablations.

    from lrem.search import Searcher
    s = Searcher.load("runs/idx")                       # the index knows which model built it
    [r] = s.search(["a device for pulling corks"], k=10, mode="reason")
    r.cot, [(h.item_id, h.score) for h in r.hits]

Modes: `reason` (generate a CoT, then embed), `direct` (`<think></think><emb>`, no CoT), `auto`
(direct first; the router picks the queries reasoning should help, and only those reason: the
model folder's learned router (`router.json`, `lrem router fit`) when it has one, else the
margin `lrem.router.Router`), and the paper's ablations with a fixed CoT: `empty-cot` (same
sequence as direct), `query-cot` (the query repeated as its CoT) and `random-cot` (phrases from
random catalog titles, seeded by the query).
"""
from __future__ import annotations

import hashlib
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

import numpy as np

from ._defaults import QUERY_BATCH
from ._text import check_query
from .fusion import LEXICAL_WEIGHT, FusedRetriever, parse_fused
from .index import ItemIndex, check_k, open_index
from .index_base import model_fingerprint
from .model import LREM, as_batch
from .router import LearnedRouter, Router
from .search_types import (DEFAULT_CANDIDATES_K, GROUNDED_MODES, MODES, Hit, Retriever, SearchResult,
                           grounded_inputs, query_batch)

__all__ = ["MODES", "Hit", "Retriever", "Routed", "SearchResult", "Searcher", "random_cot"]


def random_cot(query: str, titles: list[str], n_phrases: int = 3) -> str:
    """A CoT of `n_phrases` phrases from random catalog titles, the same for the same query.

    >>> random_cot("mug", ["corkscrew, bottle screw", "spatula"], 2) == random_cot("mug", ["corkscrew, bottle screw", "spatula"], 2)
    True
    """
    rng = random.Random(int(hashlib.sha1(query.encode()).hexdigest()[:12], 16))
    picks = rng.sample(titles, min(n_phrases, len(titles)))
    return ", ".join(t.split(",")[0].strip() for t in picks)


def check_search(queries: list[str], k: int) -> int:
    """The same query rules as the server (`lrem._text.check_query`), and k >= 1 (returned as an
    int: a numpy integer is one too)."""
    k = check_k(k)
    for n, q in enumerate(queries, 1):
        check_query(q, f"query {n}" if len(queries) > 1 else "query")
    return k


def other_weights(index, model) -> tuple[str, str] | None:
    """(the fingerprint the index's items were embedded by, `model`'s) where they differ, else
    None; an index that records none is trusted (an older lrem's)."""
    built_by = index.meta.get("model_fingerprint")
    if built_by and built_by != (now := model_fingerprint(model)):
        return built_by, now
    return None


class Searcher:
    """An LREM model and the item index it built; `search` embeds queries and asks FAISS.

    Args:
        model: the LREM model that embedded the items (query and item sides must match).
        index: the item index.
        router: decides which queries reason in `auto` mode (default: the model's learned router,
            `model.router`, when its folder has a router.json; else `Router()`).
    """

    def __init__(self, model: LREM, index: ItemIndex, router: Router | LearnedRouter | None = None,
                 truncate: bool = True):
        if index.index.d != model.dim:
            raise ValueError(f"index dim {index.index.d} != model dim {model.dim} (was the index built with "
                             f"another model than {model.source or 'this one'}?)")
        self.model = model
        self.index = index
        self.router = router or getattr(model, "router", None) or Router()
        if isinstance(self.router, LearnedRouter):  # a router.json copied beside other weights misroutes silently
            self.router.check_fitted_on(lambda: model_fingerprint(model),
                                        f"{model.source}/router.json" if self.router is getattr(model, "router", None)
                                        else "router")
        self.truncate = truncate  # queries over the model's max_query_tokens: cut and counted, or an error

    @classmethod
    def load(cls, index_dir, model: LREM | str | None = None, runtime: str = "auto", mmap: bool = True,
             **model_kwargs) -> "Searcher":
        """Load an index folder (or a `milvus:URI/COLLECTION`, `lrem.vectordb`) and (unless given)
        the model recorded in its `meta.json` (the collection's metadata). `runtime`: see
        `LREM.from_pretrained`; "auto" runs an LREM folder on the CPU without importing
        transformers (the same embeddings and CoTs, a cold start ~3 s shorter). `mmap`: see
        `ItemIndex.load` (a long-lived server reads the index into memory instead)."""
        index = open_index(index_dir, mmap=mmap)
        where = ""
        if model is None:
            model, where = index.meta.get("model"), f"{index_dir}/meta.json: "
            if not model or not isinstance(model, str):
                raise ValueError(f"{where}names no model (field 'model': {model!r}); pass one")
        if isinstance(model, str):
            try:
                model = LREM.from_pretrained(model, runtime=runtime, **model_kwargs)
            except (OSError, ValueError) as e:
                raise ValueError(f"{where}{e}") from e
        try:
            searcher = cls(model, index)
        except ValueError as e:
            raise ValueError(f"{index_dir}: {e}") from None
        other = other_weights(index, model)
        if other:
            built_by, now = other
            msg = (f"{index_dir}: its items were embedded by other weights than this {model.source!r} "
                   f"(model fingerprint {built_by}, now {now})")
            if where:  # the model the index names has changed (e.g. a newer built-in): its scores would be wrong
                raise ValueError(f"{msg}; rebuild the index (`lrem index --model {model.source} ...`)")
            warnings.warn(msg + "; scores compare queries and items of different models")
        searcher.index_dir = str(index_dir)  # recorded in eval reports
        return searcher

    def cots_for(self, queries: list[str], mode: str) -> list[str] | None:
        """The fixed CoTs of a mode (None: `reason`, the model writes them)."""
        if mode == "reason":
            return None
        if mode in GROUNDED_MODES:
            raise ValueError(f"mode {mode!r} has no fixed CoTs: it searches twice (`Searcher.search`)")
        if mode in ("direct", "empty-cot"):
            return [""] * len(queries)
        if mode == "query-cot":
            return list(queries)
        if mode == "random-cot":
            return [random_cot(q, self.index.titles) for q in queries]
        raise ValueError(f"mode={mode!r}; expected one of {MODES}")

    def search(self, queries: list[str] | str, k: int = 10, mode: str | None = None,
               cots: list[str] | str | None = None, batch_size: int = QUERY_BATCH, show_progress: bool = False,
               where: dict | None = None) -> list[SearchResult] | SearchResult:
        """Top-k items per query, best first, with the CoT each query was embedded after.
        `mode`: one of MODES; by default `auto` (as `lrem search` and `lrem serve`: the router
        reasons where it expects a gain), or `reason` where `cots` are given (embedded after
        those CoTs). `where`: only items matching this filter ({field: value or values},
        `ItemIndex.allowed`). One query as a string gives its SearchResult alone (as
        `LREM.encode_queries` gives its encoding), no queries []."""
        queries, one = as_batch(queries, "queries")
        if one and cots is not None:
            if not isinstance(cots, str):  # wrapped, a list became one "CoT" that failed at .strip()
                raise ValueError(f"one query (a string) takes one CoT as a string, got {type(cots).__name__}")
            cots = [cots]
        k = check_search(queries, k)
        mode = mode or ("reason" if cots is not None else "auto")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; expected one of {MODES}")
        if cots is not None and (mode == "auto" or mode in GROUNDED_MODES):
            raise ValueError(f"cots with mode={mode!r}: that mode writes its own CoTs; give cots with mode='reason'")
        if not queries:
            results = []
        elif mode == "auto":
            results = self.search_auto(queries, k, batch_size=batch_size, show_progress=show_progress, where=where)[0]
        elif mode in GROUNDED_MODES and cots is None:
            results = _run_now(self.route(queries, k, mode, embed=self.embedder(batch_size, show_progress),
                                          where=where)).results
        else:
            cots = cots if cots is not None else self.cots_for(queries, mode)
            enc = self.model.encode_queries(queries, mode="reason", cots=cots, batch_size=batch_size,
                                            show_progress=show_progress, truncate=self.truncate)
            scores, ids = self.index_search(enc.embeddings, k, where)
            results = _results(scores, ids, enc.cots, k)
        return results[0] if one else results

    def index_search(self, emb: np.ndarray, k: int, where: dict | None = None) -> tuple[np.ndarray, list[list[str]]]:
        """The index's top k for embeddings (n, dim), filtered by `where` when given."""
        if not where:
            return self.index.search(emb, k)
        return self.filterable().search(emb, k, where=where)

    def filterable(self) -> ItemIndex:
        """The index, where it can filter (an lrem index folder); else the ValueError saying so."""
        if not hasattr(self.index, "allowed"):
            raise ValueError("this index cannot filter: filters need an lrem index folder (items.jsonl keeps the "
                             "fields) or a Milvus collection lrem made")
        return self.index

    def candidates(self, queries: list[str] | str, k: int | None = None, batch_size: int = QUERY_BATCH,
                   show_progress: bool = False) -> list[list[str]] | list[str]:
        """A grounded query's first stage: the titles of each query's top-`k` items in a direct
        search (default: the model's `candidates_k`, else `DEFAULT_CANDIDATES_K`), best first.
        One query as a string gives its titles alone."""
        queries, one = as_batch(queries, "queries")
        if not queries:
            return []
        enc = self.model.encode_queries(queries, mode="direct", batch_size=batch_size, show_progress=show_progress,
                                        truncate=self.truncate)
        _, ids = self.index.search(enc.embeddings, k or self.candidates_k)
        titles = [[self.index.title(i) for i in row] for row in ids]
        return titles[0] if one else titles

    @property
    def candidates_k(self) -> int:
        """K of the grounded modes: the model's own (`PromptConfig.candidates_k`), else the default."""
        return self.model.config.candidates_k or DEFAULT_CANDIDATES_K

    def search_auto(self, queries: list[str] | str, k: int = 10, router: Router | LearnedRouter | None = None,
                    batch_size: int = QUERY_BATCH, show_progress: bool = False,
                    where: dict | None = None) -> tuple[list[SearchResult], list[bool]] | tuple[SearchResult, bool]:
        """`auto` mode: embed every query directly, search, let the router (default `self.router`)
        pick the queries reasoning should help (from the direct scores and the query), and reason
        for those only (`route`, which `lrem serve` runs too).

        Returns the results (cot "" where no reasoning ran) and, per query, whether it reasoned;
        for one query as a string, its result and that flag alone.
        """
        queries, one = as_batch(queries, "queries")
        k = check_search(queries, k)
        if not queries:
            return [], []
        routed = _run_now(self.route(queries, k, "auto", embed=self.embedder(batch_size, show_progress),
                                     router=router, where=where))
        return (routed.results[0], routed.reasoned[0]) if one else (routed.results, routed.reasoned)

    def embedder(self, batch_size: int = QUERY_BATCH, show_progress: bool = False) -> Embed:
        """`route`'s default `embed`: this searcher's model, in batches of `batch_size`. A
        coroutine that never waits, so `search_auto` runs `route` without an event loop."""
        async def embed(kind: str, texts: list) -> tuple[list[str], np.ndarray]:
            texts, cands = grounded_inputs(kind, texts)
            enc = self.model.encode_queries(texts, mode=GROUNDED_MODES.get(kind, kind), batch_size=batch_size,
                                            truncate=self.truncate, candidates=cands,
                                            show_progress=show_progress and kind != "direct")
            return enc.cots, enc.embeddings

        return embed

    async def route(self, queries: list[str], k: int = 10, mode: str = "auto", embed: Embed | None = None,
                    router: Router | LearnedRouter | None = None, offload: Offload | None = None,
                    where: dict | None = None) -> Routed:
        """Direct -> route -> reason, the one place it is written: `search_auto` (eval) and
        `lrem serve` both run it, so they cannot disagree.

        `direct`: embed without a CoT, search. `reason`: generate a CoT, embed, search. `auto`:
        embed directly, search max(k, router.depth) deep, let the router (default `self.router`)
        decide from those scores and the query text, and reason (embed and search again) only
        where it says. `grounded` / `grounded-direct`: embed directly, search `candidates_k`
        deep, then embed each query again with those titles in its prompt (after reasoning /
        without) and search. Queries and k are the caller's to check (`check_search`, serve's
        request checks).

        Args:
            embed: `await embed(kind, texts) -> (cots, embeddings (n, dim))`, kind "direct",
                "reason", or a grounded mode, whose texts are (query, candidate titles) pairs
                (`grounded_inputs`); default `self.embedder()`. serve's goes through its cache and batcher.
            router: the router of `auto` (default `self.router`).
            offload: `await offload(fn, *args)` runs the FAISS search (serve: `asyncio.to_thread`,
                so the event loop stays free); default: here.
            where: a filter every search keeps to (`ItemIndex.allowed`), the grounded first stage too.
        """
        if mode not in ROUTE_MODES:
            raise ValueError(f"mode={mode!r}; expected one of {ROUTE_MODES}")
        embed, router, timings = embed or self.embedder(), router or self.router, {}

        async def embedded(kind: str, texts: list[str]) -> tuple[list[str], np.ndarray]:
            t0 = time.perf_counter()
            cots, emb = await embed(kind, texts)
            timings[kind] = _ms(t0)
            return cots, emb

        async def searched(emb: np.ndarray, depth: int) -> tuple[np.ndarray, list[list[str]]]:
            t0 = time.perf_counter()
            found = await offload(self.index_search, emb, depth, where) if offload else self.index_search(emb, depth, where)
            timings["index"] = timings.get("index", 0.0) + _ms(t0)
            return found

        reason = [mode == "reason"] * len(queries)
        results: list[SearchResult] = []
        emb = None
        if mode in GROUNDED_MODES:
            _, emb = await embedded("direct", queries)
            _, ids = await searched(emb, self.candidates_k)
            title = self.index.title
            cots, emb = await embedded(mode, [(q, tuple(title(i) for i in row)) for q, row in zip(queries, ids)])
            scores, ids = await searched(emb, k)
            return Routed(_results(scores, ids, cots, k), [mode == "grounded"] * len(queries), emb, timings)
        if mode != "reason":
            cots, emb = await embedded("direct", queries)
            scores, ids = await searched(emb, max(k, router.depth) if mode == "auto" else k)  # (n, depth) best first
            results = _results(scores, ids, cots, k)
            if mode == "auto" and scores.shape[1]:  # a filter nothing matches leaves nothing to reason about
                # a filter matching fewer items than the router's depth gives them all back either way, and
                # its padded scores (`fill_missing`) are outside what the router was fitted on: direct
                reason = [r and not (where and len(row) < router.depth)
                          for r, row in zip(router.decide(queries, scores), ids)]
        picked = [j for j, r in enumerate(reason) if r]
        if picked:
            cots, reasoned = await embedded("reason", [queries[j] for j in picked])
            scores, ids = await searched(reasoned, k)
            if emb is None:
                emb, results = reasoned, _results(scores, ids, cots, k)
            else:
                emb = np.array(emb)  # (n, dim), a copy: the rows given by `embed` may be cached
                emb[picked] = reasoned
                for j, res in zip(picked, _results(scores, ids, cots, k)):
                    results[j] = res
        return Routed(results, reason, emb, timings)

    def retriever(self, mode: str, router: Router | LearnedRouter | None = None,
                  where: dict | None = None) -> Retriever:
        """This searcher fixed to one mode (and filter), as a `Retriever` for `lrem.evaluate`
        (`router`: for auto)."""
        if mode != "auto" and mode not in GROUNDED_MODES:
            self.cots_for([], mode)  # validates the mode now, not at the first query
        return _ModeRetriever(self, mode, router, where)

    def lexical(self) -> Retriever:
        """BM25 over this index's titles, built on the first call and kept: the lexical half of
        hybrid search (`hybrid`, `lrem search --hybrid`, serve's `hybrid`)."""
        if getattr(self, "_lexical", None) is None:
            from .baselines import BM25Retriever

            self._lexical = BM25Retriever(dict(zip(self.index.item_ids, self.index.titles)), show_progress=False)
        return self._lexical

    def hybrid(self, mode: str, lexical_weight: float = LEXICAL_WEIGHT, router: Router | LearnedRouter | None = None,
               where: dict | None = None) -> FusedRetriever:
        """Hybrid search: this searcher in `mode` and BM25 over the index's titles, fused by
        reciprocal rank fusion (`lrem.fusion`), BM25's ranks weighed by `lexical_weight`; both
        kept to the filter `where`, if any."""
        lexical = self.lexical() if not where else _Restricted(self.lexical(), self.filterable().allowed(where))
        return FusedRetriever([self.retriever(mode, router, where), lexical], weights=[1.0, lexical_weight])


# route's callables: embed(kind, texts) -> (cots, embeddings (n, dim)); offload(fn, *args) -> fn(*args)
Embed = Callable[[str, list[str]], Awaitable[tuple[list[str], np.ndarray]]]
Offload = Callable[..., Awaitable]
ROUTE_MODES = ("direct", "reason", "auto", *GROUNDED_MODES)  # the modes `Searcher.route` runs (serve's modes)


@dataclass
class Routed:
    """What `Searcher.route` found for a batch of queries."""

    results: list[SearchResult]  # top-k per query, best first; cot "" where no reasoning ran
    reasoned: list[bool]  # per query: whether it reasoned
    embeddings: np.ndarray  # (n, dim): the embedding each query's results were searched with
    timings_ms: dict[str, float]  # direct, reason: embedding (serve: incl. queueing); index: the searches


def _results(scores: np.ndarray, ids: list[list[str]], cots: list[str], k: int) -> list[SearchResult]:
    """FAISS rows (scores (n, >= k), ids) cut to the top k, as results."""
    return [SearchResult([Hit(i, float(s)) for i, s in zip(row_ids[:k], row_scores[:k])], cot)
            for row_ids, row_scores, cot in zip(ids, scores, cots)]


def _ms(t0: float) -> float:
    return round(1000.0 * (time.perf_counter() - t0), 3)


def _run_now(coro):
    """The value of a coroutine that never waits (its awaits all return at once), without an
    event loop: how `search_auto` runs `route` with the model's embedder."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("route waited on something; run it in an event loop (await it)")


class _ModeRetriever:
    """A searcher fixed to one mode; counts how many queries it reasoned about (the cost)."""

    def __init__(self, searcher: Searcher, mode: str, router: Router | LearnedRouter | None = None,
                 where: dict | None = None):
        self.searcher, self.mode, self.router, self.where = searcher, mode, router, where
        self.n_queries = self.n_reasoned = 0

    def search(self, queries: list[str], k: int = 10) -> list[SearchResult]:
        queries = [queries] if isinstance(queries, str) else list(queries)  # a retriever answers lists
        if self.mode == "auto":
            results, routed = self.searcher.search_auto(queries, k, router=self.router, where=self.where)
            self.n_reasoned += sum(routed)
        else:
            results = self.searcher.search(queries, k=k, mode=self.mode, where=self.where)
            self.n_reasoned += len(queries) if GROUNDED_MODES.get(self.mode, self.mode) == "reason" else 0
        self.n_queries += len(queries)
        return results

    def describe(self) -> dict:
        """Model, index folder and mode (for auto: its share budget, if any, and which router), for the
        eval report."""
        mode = self.mode
        if mode == "auto":
            router = self.router or self.searcher.router
            mode += (f"@{router.share}" if router.share else "") + f" ({router.describe()['kind']} router)"
        return {"model": self.searcher.model.source, "mode": mode,
                "index": getattr(self.searcher, "index_dir", None) or "(items embedded in memory)"}

    @property
    def reasoned_share(self) -> float:
        """Share of the queries searched so far that generated a CoT (0 to 1)."""
        return self.n_reasoned / self.n_queries if self.n_queries else 0.0


# ---------------------------------------------------------------- systems from spec strings

def parse_system(arg: str) -> tuple[str, str]:
    """"NAME=SPEC" or "SPEC" -> (name, spec). SPEC: bm25 | minilm | MODEL:MODE.

    >>> parse_system("base=smollm2-135m-instruct:reason")
    ('base', 'smollm2-135m-instruct:reason')
    >>> parse_system("bm25")
    ('bm25', 'bm25')
    """
    name, sep, spec = arg.partition("=")
    return (name, spec) if sep else (arg, arg)


def system_parts(spec: str) -> list[str]:
    """The single systems (bm25, minilm, MODEL:MODE, run:FILE) a system spec is made of: a
    rerank's first stage and reranker, a fusion's parts."""
    from lrem.rerank import parse_rerank

    reranked = parse_rerank(spec)
    if reranked is not None:
        return system_parts(reranked[0]) + system_parts(reranked[2])
    fused = parse_fused(spec)
    return [spec] if fused is None else [p for _, part in fused for p in system_parts(part)]


def build_systems(specs: dict[str, str], ds, batch_size: int = QUERY_BATCH, log=print,
                  truncate: bool = True) -> dict[str, Retriever]:
    """Turn {name: spec} into retrievers over `ds.catalog` (titles).

    `MODEL:MODE`: MODEL is an index folder (from `lrem index`, over this catalog) or a model
    (folder, hub name, built-in name) whose items are embedded here, once per model, however
    many modes use it. MODE is one of `lrem.search.MODES`; `auto` routes with the searcher's
    router (the model folder's learned router.json, else a default `lrem.router.Router`),
    `auto@0.3` with the same router held to a reasoning budget of 30% (`with_share(0.3)`);
    `auto-margin` and `auto-margin@0.3` use the margin router whatever the model folder holds
    (to compare the two). The report records each LREM system's share of queries reasoned and
    its router. `truncate`: inputs over a model's token limits are cut and counted
    (`model.truncated`), or an error. `SPEC+SPEC[+...]` is hybrid search: the parts' rankings
    fused by reciprocal rank fusion (`lrem.fusion`), `WEIGHT*SPEC` weighing a part (default 1).
    `run:FILE` is a TREC run file's rankings (`lrem.runfile`: another engine's, or an earlier
    eval's runs/*.trec), by the dataset's query ids. `FIRST>MODEL:MODE` reranks FIRST's top
    `RERANK_DEPTH` (`FIRST>N>MODEL:MODE`: top N) by MODEL's embeddings in MODE (`lrem.rerank`).
    """
    from lrem.baselines import baseline_system
    from lrem.index import is_index_dir
    from lrem.rerank import RERANK_MODES, RerankRetriever, parse_rerank
    from lrem.runfile import RUN_PREFIX, RunFileRetriever, is_run_spec
    from lrem.vectordb import is_milvus_spec

    titles = {iid: item.title for iid, item in ds.catalog.items()}
    searchers: dict[str, Searcher] = {}
    baselines: dict[str, Retriever] = {}

    def system(name: str, spec: str) -> Retriever:
        reranked = parse_rerank(spec)
        if reranked is not None:
            first, depth, second = reranked
            model, _, mode = second.rpartition(":")
            if not model or mode not in RERANK_MODES or parse_fused(second) or is_run_spec(second):
                raise ValueError(f"system {name}={spec!r}: the reranker after '>' is MODEL:MODE, MODE one of "
                                 f"{', '.join(RERANK_MODES)} (one embedding per query)")
            system(name, second)  # loads (and checks) the model and index once, as any MODEL:MODE
            return RerankRetriever(system(name, first), searchers[model], mode, depth, batch_size)
        fused = parse_fused(spec)
        if fused is not None:
            return FusedRetriever([system(name, part) for _, part in fused], weights=[w for w, _ in fused])
        if spec in ("bm25", "minilm"):
            if spec not in baselines:
                baselines[spec] = baseline_system(spec, titles)
            return baselines[spec]
        if is_run_spec(spec):
            if spec not in baselines:
                baselines[spec] = RunFileRetriever(spec[len(RUN_PREFIX):], [(q, x.text) for q, x in ds.queries.items()],
                                                    titles)
            return baselines[spec]
        model, sep, mode = spec.rpartition(":")
        cot_file = mode[len("cots="):] if mode.startswith("cots=") else None
        mode, at, share = ("reason", "", "") if cot_file else mode.partition("@")
        margin = mode == "auto-margin"
        mode = "auto" if margin else mode
        if not sep or mode not in MODES or (at and (mode != "auto" or not _is_fraction(share))):
            raise ValueError(f"system {name}={spec!r}: expected bm25, minilm, MODEL:MODE with MODE in {MODES} "
                             f"(or auto@SHARE, SHARE in [0, 1]; auto-margin[@SHARE]: the margin router; "
                             f"cots=FILE: the CoTs a file gives), run:FILE (a TREC run), or a fusion of these joined by '+' "
                             f"(hybrid search, e.g. bm25+MODEL:direct; WEIGHT*SPEC weighs a part)")
        if model not in searchers:
            if is_index_dir(model) or is_milvus_spec(model):
                searcher = Searcher.load(model, log=log)
                searcher.truncate = truncate
                if set(searcher.index.item_ids) != set(titles):
                    raise ValueError(f"index {model} was built on another catalog than {ds.name}")
            else:
                lrem = LREM.from_pretrained(model, log=log)
                log(f"embedding {len(titles)} items with {model}")
                searcher = Searcher(lrem, ItemIndex.build(lrem, dict(ds.catalog), batch_size=batch_size,
                                                          truncate=truncate), truncate=truncate)
            searchers[model] = searcher
        if cot_file:
            return _GivenCotRetriever(searchers[model], load_cots(cot_file), cot_file)
        router = Router() if margin else None
        if at:
            router = (router or searchers[model].router).with_share(float(share))
        return searchers[model].retriever(mode, router)

    return {name: system(name, spec) for name, spec in specs.items()}


def load_cots(path) -> dict[str, str]:
    """query text -> CoT, from a JSONL of {"query": ..., "cot": ...} rows (e.g. a teacher's CoTs
    for the dev queries: `lrem construct`'s outcomes.jsonl)."""
    from .data import read_jsonl

    cots: dict[str, str] = {}
    for line, row in read_jsonl(Path(path)):
        if not isinstance(row.get("query"), str) or not isinstance(row.get("cot", ""), str):
            raise ValueError(f"{path}:{line}: need a string 'query' and a string 'cot'")
        cots[row["query"]] = row.get("cot") or ""
    return cots


@dataclass
class _Restricted:
    """A lexical retriever kept to some catalog positions (a filter's `ItemIndex.allowed`)."""

    lexical: object  # lrem.baselines.BM25Retriever over the index's items, in index order
    allowed: np.ndarray

    def search(self, queries: list[str], k: int = 10) -> list[SearchResult]:
        return self.lexical.search(queries, k, allowed=self.allowed)

    def describe(self) -> dict:
        return self.lexical.describe()


class _GivenCotRetriever(_ModeRetriever):
    """`MODEL:cots=FILE`: each query embedded after the CoT the file gives it (an empty one where
    it gives none), e.g. a teacher's CoTs: what the model would score if it reasoned as the teacher.
    Its reasoned share is 0: the CoTs were written elsewhere."""

    def __init__(self, searcher: Searcher, cots: dict[str, str], path: str):
        super().__init__(searcher, "reason")
        self.cots, self.path = cots, path

    def search(self, queries: list[str] | str, k: int = 10) -> list[SearchResult] | SearchResult:
        queries, one = query_batch(queries)  # one string: its result alone, not one CoT per character
        self.n_queries += len(queries)
        out = self.searcher.search(queries, k=k, mode="reason", cots=[self.cots.get(q, "") for q in queries])
        return out[0] if one else out

    def describe(self) -> dict:
        return {**super().describe(), "mode": f"cots={self.path}"}


def _is_fraction(text: str) -> bool:
    try:
        return 0.0 <= float(text) <= 1.0
    except ValueError:
        return False
