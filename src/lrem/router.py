"""Reasoning router: decide per query whether generating a CoT is worth its cost.

    from lrem.router import Router
    router = Router(margin=0.02, long_query_words=8)   # or Router(share=0.3): a reasoning budget
    scores, _ = index.search(direct_embeddings, k=router.depth)   # (n, depth), best first
    router.decide(queries, scores)                                  # [True, False, ...]

Reasoning costs a generation per query (on this CPU ~5x the time of a direct embedding), and the
paper's gains sit on hard queries (Q&A, "dupe", negation, knowledge). The router uses signals that
are free once the direct embedding has been searched:

1. Score margin: top-1 minus top-`depth` direct score. A small margin means the direct
   embedding sees many near-equal items (an ambiguous query): reason.
2. Query length: long, descriptive queries ("something to keep a drink cold on a hike") are the
   ones whose words differ from item titles: reason when a query has >= `long_query_words` words.

`Searcher.search(mode="auto")`, `lrem eval -s NAME=IDX:auto` and `lrem serve` (mode=auto) share
this object, so the quality and the share of queries reasoned are measured by the same code that
serves. Score scales differ between models (the untrained base model's top-1 vs top-10 margins
all lie within 0.006..0.011 on WordNet; a trained embedder spreads them wider), so an absolute
margin does not carry over: `share` turns the margin into a budget (reason on the most ambiguous
X% of recent queries), and `Router.calibrate` fixes a margin from a sample of queries.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np

MIN_SAMPLES = 20  # with `share`, the fixed margin is used until this many margins were seen


@dataclass
class Router:
    """Reason when the direct retrieval is ambiguous or the query is long.

    Args:
        margin: reason when top-1 - top-`depth` direct cosine score < margin (0 turns it off).
        share: 0: use the fixed `margin`. Otherwise reason on about this share (0..1) of queries:
            the margin becomes the `share`-quantile of the last `window` margins seen (a budget
            that holds whatever the model's score scale).
        long_query_words: reason when the query has at least this many words (0 turns it off).
        depth: how deep the direct scores go (the margin's second rank).
        window: how many recent margins the `share` quantile is taken over.
    """

    margin: float = 0.02
    share: float = 0.0
    long_query_words: int = 0
    depth: int = 10
    window: int = 1000
    _recent: deque = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.margin < 0 or not 0 <= self.share <= 1 or self.long_query_words < 0 or self.depth < 2 or self.window < 1:
            raise ValueError(f"{self}: need margin >= 0, 0 <= share <= 1, long_query_words >= 0, depth >= 2, window >= 1")
        self._recent = deque(maxlen=self.window)

    def threshold(self) -> float:
        """The margin below which a query reasons now (adapts when `share` is set)."""
        if self.share >= 1:
            return float("inf")
        if self.share > 0 and len(self._recent) >= MIN_SAMPLES:
            return float(np.quantile(np.asarray(self._recent), self.share))
        return self.margin

    def describe(self) -> dict:
        """Settings and current threshold, for logs and /info."""
        return {"margin": self.margin, "share": self.share, "long_query_words": self.long_query_words,
                "depth": self.depth, "threshold": self.threshold(), "margins_seen": len(self._recent)}

    def margins(self, direct_scores: np.ndarray) -> np.ndarray:
        """Top-1 minus top-`depth` score per query (n,); with fewer hits, minus the last one.

        >>> Router(depth=3).margins(np.array([[0.9, 0.5, 0.4, 0.1], [0.8, 0.79, 0.78, 0.7]])).round(2).tolist()
        [0.5, 0.02]
        """
        s = np.asarray(direct_scores, dtype=np.float64)  # (n, >= 1), best first
        if s.ndim != 2 or s.shape[1] == 0:
            raise ValueError(f"direct_scores must be (n_queries, k >= 1), got shape {s.shape}")
        return s[:, 0] - s[:, min(self.depth, s.shape[1]) - 1]

    def decide(self, queries: list[str], direct_scores: np.ndarray) -> list[bool]:
        """True where the query should be reasoned about.  direct_scores (n, >= depth), best first.

        >>> Router(margin=0.05, long_query_words=4, depth=2).decide(
        ...     ["mug", "cup", "a thing to hold hot tea"], np.array([[0.9, 0.5], [0.9, 0.88], [0.9, 0.1]]))
        [False, True, True]
        """
        if len(queries) != len(direct_scores):
            raise ValueError(f"{len(queries)} queries for {len(direct_scores)} rows of scores")
        m = self.margins(direct_scores)
        if self.share > 0:
            self._recent.extend(m.tolist())
        ambiguous = m < self.threshold()
        long = [self.long_query_words > 0 and len(q.split()) >= self.long_query_words for q in queries]
        return [bool(a or b) for a, b in zip(ambiguous, long)]

    def calibrate(self, direct_scores: np.ndarray, share: float) -> "Router":
        """A copy with a fixed margin that routes about `share` (0..1) of these queries by margin.

        >>> r = Router(depth=2).calibrate(np.array([[1, .9], [1, .8], [1, .7], [1, .6]]), share=0.5)
        >>> round(r.margin, 3)
        0.25
        """
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"share={share}; expected a fraction in [0, 1]")
        m = np.sort(self.margins(direct_scores))
        if share == 0.0 or len(m) == 0:
            return replace(self, margin=0.0, share=0.0)
        if share == 1.0:
            return replace(self, margin=float(m[-1]) + 1e-6, share=0.0)
        i = int(round(share * len(m)))  # margins below m[i] are routed: i of them
        lo, hi = m[max(i - 1, 0)], m[min(i, len(m) - 1)]
        return replace(self, margin=float((lo + hi) / 2), share=0.0)
