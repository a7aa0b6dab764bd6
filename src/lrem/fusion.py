"""Hybrid search: fuse the rankings of several retrievers by reciprocal rank fusion.

Lexical BM25 finds exact part numbers, brands and rare words that a dense model blurs; the dense
model finds what the words do not say. Reciprocal rank fusion (Cormack, Clarke and Buettcher,
SIGIR 2009) adds, for each item, `weight / (rrf_k + rank)` over the rankings that hold it. It
needs no score calibration between retrievers, which is why Elasticsearch, OpenSearch, Vespa and
Milvus use it for hybrid search, with the same `rrf_k` = 60.

    >>> [(item, round(score, 4)) for item, score in rrf([["a", "b", "c"], ["c", "a"]])]
    [('a', 0.0325), ('c', 0.0323), ('b', 0.0161)]
    >>> [i for i, _ in rrf([["a", "b"], ["b", "c"]], weights=[1.0, 3.0])]
    ['b', 'c', 'a']
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from lrem.search_types import Hit, Retriever, SearchResult, check_k, query_batch

RRF_K = 60  # the constant of the paper above, and the default of the engines that use it
FUSION_DEPTH = 100  # hits taken from each retriever before fusing
LEXICAL_WEIGHT = 1.0  # hybrid search's weight of BM25's ranks against the dense ranks' 1: plain RRF


def rrf(rankings: Sequence[Sequence[str]], weights: Sequence[float] | None = None,
        rrf_k: float = RRF_K) -> list[tuple[str, float]]:
    """Fuse ranked item-id lists (best first) into one: (item_id, score) pairs, score desc.

    Ties keep the order in which the items were first met (first ranking first, best rank
    first), so the result is deterministic. An item a ranking repeats (chunks of one product)
    counts once there, at its best rank, and the items after it move up.
    """
    weights = [1.0] * len(rankings) if weights is None else list(weights)
    if len(weights) != len(rankings):
        raise ValueError(f"{len(weights)} weights for {len(rankings)} rankings")
    parts: dict[str, list[float]] = {}
    for weight, ranking in zip(weights, rankings):
        for rank, item in enumerate(dict.fromkeys(ranking), 1):
            parts.setdefault(item, []).append(weight / (rrf_k + rank))
    # fsum is exactly rounded, so equal rank sets tie whatever order the rankings added them in
    scores = {item: math.fsum(p) for item, p in parts.items()}
    first = {item: n for n, item in enumerate(scores)}
    return sorted(scores.items(), key=lambda kv: (-kv[1], first[kv[0]]))


@dataclass
class FusedRetriever:
    """A `Retriever` whose ranking is the RRF of its parts' top `depth` hits.

    A result's CoT is the first part's that has one (the reasoning LREM system's).
    `weights` default to 1 each.
    """

    parts: list[Retriever]
    weights: list[float] | None = None
    rrf_k: float = RRF_K
    depth: int = FUSION_DEPTH

    def __post_init__(self):
        if len(self.parts) < 2:
            raise ValueError("fusion needs at least two retrievers")
        if self.weights is not None and (len(self.weights) != len(self.parts) or not all(map(_weight_ok, self.weights))):
            raise ValueError(f"need {len(self.parts)} finite weights, none negative; got {self.weights}")
        if not _weight_ok(self.rrf_k):  # a negative constant divides by zero (or flips signs) at the top ranks
            raise ValueError(f"rrf_k={self.rrf_k}; need a finite number >= 0")

    def search(self, queries: list[str] | str, k: int = 10) -> list[SearchResult] | SearchResult:
        """The fused top k per query; one query as a string gives its result alone (as `Searcher.search`)."""
        queries, one = query_batch(queries)  # the parts are retrievers: they take lists
        k = check_k(k)
        runs = [part.search(queries, k=max(k, self.depth)) for part in self.parts]
        fused = [fuse([run[n] for run in runs], k, self.weights, self.rrf_k) for n in range(len(queries))]
        return fused[0] if one else fused

    def describe(self) -> dict:
        """For the eval report: the parts' models and indexes, a mode naming each weighed part
        ("rrf: 1*bm25 + 1*direct"), and each part's own description."""
        parts = [p.describe() if hasattr(p, "describe") else {} for p in self.parts]
        weights = self.weights or [1.0] * len(parts)
        names = [d.get("mode") or d.get("retriever") or type(p).__name__ for p, d in zip(self.parts, parts)]
        joined = {key: " + ".join(dict.fromkeys(str(d[key]) for d in parts if d.get(key))) for key in ("model", "index")}
        return {**joined, "mode": "rrf: " + " + ".join(f"{w:g}*{n}" for w, n in zip(weights, names)),
                "fusion": {"rrf_k": self.rrf_k, "depth": self.depth, "weights": weights}, "parts": parts}

    @property
    def reasoned_share(self) -> float | None:
        """The LREM part's share of queries that generated a CoT (None when no part is an LREM one)."""
        shares = [p.reasoned_share for p in self.parts if hasattr(p, "reasoned_share")]
        return max(shares) if shares else None


def fuse(results: Sequence[SearchResult], k: int, weights: Sequence[float] | None = None,
         rrf_k: float = RRF_K) -> SearchResult:
    """One query's results from several retrievers -> their RRF top `k` (score = the RRF score).
    Its CoT is the first part's that reasoned (a non-empty CoT), else the first part's."""
    fused = rrf([r.item_ids for r in results], weights, rrf_k)[:k]
    cot = next((r.cot for r in results if r.cot), next((r.cot for r in results if r.cot is not None), None))
    return SearchResult(hits=[Hit(item, score) for item, score in fused], cot=cot)


def parse_fused(spec: str) -> list[tuple[float, str]] | None:
    """An eval system spec "PART+PART[+...]", each PART optionally "WEIGHT*PART" -> [(weight, part)];
    None for a spec that is not a fusion. A part is bm25, minilm or MODEL:MODE; a "+" inside one
    (a path, a weight such as 1e+2) stays in it.

    >>> parse_fused("bm25+runs/idx:direct")
    [(1.0, 'bm25'), (1.0, 'runs/idx:direct')]
    >>> parse_fused("0.5*bm25+runs/a+b:reason")
    [(0.5, 'bm25'), (1.0, 'runs/a+b:reason')]
    >>> parse_fused("minilm") is None, parse_fused("model:cots=runs/a+b.jsonl") is None
    (True, True)
    """
    parts, piece = [], ""
    for chunk in spec.split("+"):
        piece = f"{piece}+{chunk}" if piece else chunk
        weighed = _weighed(piece, spec)
        if weighed is not None:
            parts.append(weighed)
            piece = ""
    if piece:  # a tail that is no part on its own belongs to the last part (a file name with a '+')
        if not parts:
            return None
        weight, last = parts.pop()
        parts.append((weight, f"{last}+{piece}"))
    return parts if len(parts) > 1 else None


def _weighed(piece: str, spec: str) -> tuple[float, str] | None:
    """(weight, part) when `piece` is a whole part (bm25, minilm or MODEL:MODE, maybe after
    "WEIGHT*"), else None."""
    weight, star, rest = piece.partition("*")
    if not star or ":" in weight:
        weight, rest = "1", piece
    if not (rest in ("bm25", "minilm") or (":" in rest and rest.rpartition(":")[2])):
        return None
    try:
        value = float(weight)
    except ValueError:
        if ":" in rest:  # MODEL:MODE whose model path holds a '*'
            return 1.0, piece
        raise ValueError(f"fused system {spec!r}: {weight!r} before '*' is not a weight") from None
    if not _weight_ok(value):
        raise ValueError(f"fused system {spec!r}: weight {weight} must be finite and >= 0")
    return value, rest


def _weight_ok(weight: float) -> bool:
    return math.isfinite(weight) and weight >= 0
