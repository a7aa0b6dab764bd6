"""Reranking: a first stage's candidates put in the order of an LREM embedding's cosine with the
query. It is how a shop keeps its engine (BM25 in Elasticsearch, say) and adds lrem on top:
`lrem serve`'s /rerank and /v1/rerank, and in `lrem eval` the system `FIRST>MODEL:MODE` (FIRST's
top `RERANK_DEPTH`, reordered) or `FIRST>N>MODEL:MODE` (its top N).

    >>> rank_by_cosine(np.array([1.0, 0.0]), np.array([[0.6, 0.8], [1.0, 0.0], [0.6, -0.8]]))
    [(1, 1.0), (0, 0.6), (2, 0.6)]
    >>> parse_rerank("bm25>runs/idx:direct"), parse_rerank("bm25>20>runs/idx:reason"), parse_rerank("bm25")
    (('bm25', 100, 'runs/idx:direct'), ('bm25', 20, 'runs/idx:reason'), None)
"""
from __future__ import annotations

import numpy as np

from lrem._defaults import QUERY_BATCH
from lrem.search_types import Hit, Retriever, SearchResult, check_k, query_batch

RERANK_DEPTH = 100  # candidates taken from the first stage, as hybrid search's FUSION_DEPTH
RERANK_MODES = ("direct", "reason", "empty-cot", "query-cot", "random-cot")  # one embedding per query, no routing


def rank_by_cosine(query: np.ndarray, vectors: np.ndarray) -> list[tuple[int, float]]:
    """(row, score) of `vectors` (n, dim) by inner product with `query` (dim,), best first, ties
    in row order (unit vectors: cosines)."""
    scores = vectors @ query
    return [(int(i), float(scores[i])) for i in np.argsort(-scores, kind="stable")]


def parse_rerank(spec: str) -> tuple[str, int, str] | None:
    """(first stage spec, depth, MODEL:MODE) of `FIRST>MODEL:MODE` or `FIRST>N>MODEL:MODE`; None
    for a spec that is no rerank; a ValueError for a malformed one."""
    parts = spec.split(">")
    if len(parts) == 1:
        return None
    if len(parts) == 2 and all(parts):
        return parts[0], RERANK_DEPTH, parts[1]
    if len(parts) == 3 and parts[0] and parts[2] and parts[1].isdigit() and int(parts[1]) > 0:
        return parts[0], int(parts[1]), parts[2]
    raise ValueError(f"rerank system {spec!r}: expected FIRST>MODEL:MODE or FIRST>N>MODEL:MODE (N > 0)")


class RerankRetriever:
    """A `Retriever`: `first`'s top `depth` per query, reordered by `searcher`'s model in `mode`
    (the query embedded once; the candidates' vectors read back from the searcher's index, so
    it must keep them: `lrem.index.keeps_vectors`, or a Milvus collection). Candidates the index
    lacks are dropped. Asked for more than `depth` (k > depth), the first stage's items past its
    top `depth` follow in its own order (Elasticsearch's rescore window), scored -2, -3, ... (below
    any cosine, so a run file sorted by score keeps that order)."""

    def __init__(self, first: Retriever, searcher, mode: str, depth: int = RERANK_DEPTH, batch_size: int = QUERY_BATCH):
        if mode not in RERANK_MODES:
            raise ValueError(f"rerank mode {mode!r}: one of {', '.join(RERANK_MODES)} (one embedding per query)")
        if not hasattr(searcher.index, "vectors_of"):
            raise ValueError("reranking reads the items' vectors from an lrem index folder or Milvus collection; "
                             "this index gives none")
        self.first, self.searcher, self.mode, self.depth, self.batch_size = first, searcher, mode, depth, batch_size

    def search(self, queries: list[str] | str, k: int = 10) -> list[SearchResult] | SearchResult:
        queries, one = query_batch(queries)
        k = check_k(k)
        # k past the depth: the tail keeps the first stage's order, else a deeper k would lose the
        # first stage's hits (a top-5 rerank scored at hitrate@10 below its first stage's)
        firsts = self.first.search(queries, k=max(k, self.depth))
        enc = self.searcher.model.encode_queries(queries, mode="reason", cots=self.searcher.cots_for(queries, self.mode),
                                                 batch_size=self.batch_size, truncate=self.searcher.truncate)
        index, out = self.searcher.index, []
        for first, q, cot in zip(firsts, enc.embeddings, enc.cots):
            ids = [i for i in first.item_ids[:self.depth] if i in index]
            vectors = index.vectors_of(ids)
            if vectors is None:
                raise ValueError(f"this index ({index.meta.get('factory')}) keeps compressed codes: its vectors "
                                 f"cannot rerank; use a Flat, HNSW-Flat or IVF-Flat index")
            hits = [Hit(ids[j], s) for j, s in rank_by_cosine(q, vectors)[:k]]
            tail = [i for i in first.item_ids[self.depth:] if i in index][:k - len(hits)]
            out.append(SearchResult(hits + [Hit(i, -1.0 - n) for n, i in enumerate(tail, 1)], cot))
        return out[0] if one else out

    @property
    def reasoned_share(self) -> float:
        """The share of queries that generated a CoT (the eval report's cost column): all where
        the reranker reasons, else the first stage's share (an LREM first stage in auto mode)."""
        if self.mode == "reason":
            return 1.0
        return getattr(self.first, "reasoned_share", None) or 0.0

    def describe(self) -> dict:
        """For the eval report: the model, the index, the mode, and the first stage's description."""
        first = self.first.describe() if hasattr(self.first, "describe") else {}
        name = first.get("mode") or first.get("retriever") or type(self.first).__name__
        return {"model": self.searcher.model.source, "index": getattr(self.searcher, "index_dir", None),
                "mode": f"rerank: {name} top {self.depth} by {self.mode}", "first": first}
