"""Reasoning router: decide per query whether generating a CoT is worth its cost.

    from lrem.router import Router, LearnedRouter
    router = Router(margin=0.02, long_query_words=8)   # or Router(share=0.3): a reasoning budget
    router = LearnedRouter.load("runs/coldstart/router.json")   # fitted by `lrem router fit`
    scores, _ = index.search(direct_embeddings, k=router.depth)   # (n, depth), best first
    router.decide(queries, scores)                                  # [True, False, ...]

Reasoning costs a generation per query (on this CPU ~5x the time of a direct embedding), and the
paper reasons only for difficult queries. Both routers use signals that are free once the direct
embedding has been searched (`FEATURES`: the direct scores' top-1, top-1 minus top-2 gap, top-1
minus top-`depth` margin and mean of the top `depth`, and the query's words, characters, digits
and whether it is a question).

`LearnedRouter` (the one to use once fitted): a logistic regression on those features that
predicts P(reasoning beats direct) for a query, fitted by `fit_router` (`lrem router fit`) on a
sample of a split's queries: each is searched in both modes against an index of the catalog,
and its label is whether the reciprocal rank of its first relevant item in the top k is higher
after reasoning (ties: direct, the cheaper). It reasons where that probability exceeds its
`threshold`, or, with `share`, on that share of recent queries with the highest probabilities.
Saved as `router.json` in the model folder (`ROUTER_FILE`), it is loaded with the model
(`LREM.from_pretrained` -> `model.router`) and used by `Searcher.search(mode="auto")`, `lrem eval
-s NAME=IDX:auto` and `lrem serve`. It belongs to the weights it was fitted with: a model saved
again (`save_pretrained`, training) is written without it, and it should be refitted.

`Router` (the fallback when the model folder has no router.json): reason when the direct
retrieval is ambiguous (top-1 minus top-`depth` score below `margin`) or the query is long (>=
`long_query_words` words). Score scales differ between models (the untrained base model's top-1
vs top-10 margins all lie within 0.006..0.011 on WordNet; a trained embedder spreads them wider),
so an absolute margin does not carry over: `share` turns the margin into a budget (reason on the
most ambiguous X% of recent queries), and `Router.calibrate` fixes a margin from a sample.

This module holds the margin `Router`; the learned router is `lrem.router_learned`, its fitting
`lrem.router_fit`, and what both routers share `lrem.router_base` (all importable from here).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .router_base import (DEPTH, FEATURES, MIN_SAMPLES, QUESTION_WORDS, WINDOW, Budget, check_scores, finite,
                          query_features)
from .router_fit import fit_router, judged_sample, reciprocal_rank, router_target
from .router_learned import FORMAT, ROUTER_FILE, VERSION, LearnedRouter, fit_logistic, learn_router, load_router

# The names this module had before the learned router and its fitting moved out
# (`from lrem.router import LearnedRouter`, ...)
__all__ = ["MIN_SAMPLES", "ROUTER_FILE", "FORMAT", "VERSION", "FEATURES", "QUESTION_WORDS", "query_features",
           "fit_logistic", "Router", "LearnedRouter", "load_router", "reciprocal_rank", "learn_router", "fit_router",
           "router_target", "judged_sample"]


@dataclass
class Router(Budget):
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
    depth: int = DEPTH
    window: int = WINDOW

    def __post_init__(self):
        # `not margin >= 0`: a NaN margin compares False with every margin, so nothing would reason
        if (not self.margin >= 0 or not 0 <= self.share <= 1 or self.long_query_words < 0 or self.depth < 2
                or self.window < 1):
            raise ValueError(f"{self}: need margin >= 0, 0 <= share <= 1, long_query_words >= 0, depth >= 2, window >= 1")
        self.reset_window()

    def threshold(self) -> float:
        """The margin below which a query reasons now (adapts when `share` is set)."""
        if self.share >= 1:
            return float("inf")
        adaptive = self.recent_quantile(self.share) if self.share > 0 else None
        return self.margin if adaptive is None else adaptive

    def describe(self) -> dict:
        """Settings and current threshold (None with share 1: every query reasons), for logs and /info."""
        return {"kind": "margin", "margin": self.margin, "share": self.share,
                "long_query_words": self.long_query_words, "depth": self.depth, "threshold": finite(self.threshold()),
                "margins_seen": self.seen()}

    def margins(self, direct_scores: np.ndarray) -> np.ndarray:
        """Top-1 minus top-`depth` score per query (n,); with fewer hits, minus the last one.

        >>> Router(depth=3).margins(np.array([[0.9, 0.5, 0.4, 0.1], [0.8, 0.79, 0.78, 0.7]])).round(2).tolist()
        [0.5, 0.02]
        """
        s = check_scores(direct_scores)
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
            self.remember(m.tolist())
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
