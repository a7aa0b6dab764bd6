"""Plain result types shared by every retriever (BM25, MiniLM, the LREM dense searcher).

A retriever takes a batch of query strings and returns one `SearchResult` per query: its hits
sorted by score, best first, plus the chain of thought it reasoned with (None when it doesn't
reason). `lrem.evaluate` scores any object with this `search` method the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

# The query modes `lrem.search.Searcher` accepts: the one list that the CLI's help and checks
# and the searcher's validation use (here, not in lrem.search, so the CLI reads it without torch).
MODES = ("reason", "direct", "auto", "grounded", "grounded-direct", "empty-cot", "query-cot", "random-cot")
# grounded: a direct search first, then the query reasons with its top-K titles in the prompt and is
# embedded again (issue 22); grounded-direct: the same without the reasoning (the no-generation ablation)
GROUNDED_MODES = {"grounded": "reason", "grounded-direct": "direct"}
DEFAULT_CANDIDATES_K = 10  # K for a model not trained grounded (`PromptConfig.candidates_k` 0)


def top_k(scores, k: int):
    """Positions of the `k` highest of `scores` (1-D), best first, equal scores in position order
    (as a stable sort gives, and FAISS's Flat), also those tied at the k-th place.

    >>> import numpy as np
    >>> top_k(np.array([1.0, 3.0, 3.0, 2.0, 3.0]), 2).tolist()
    [1, 2]
    """
    import numpy as np  # here: the CLI reads this module for its help, without numpy

    k = min(k, len(scores))
    if k <= 0:
        return np.zeros(0, np.int64)
    if k < len(scores):  # the k-th best, then all that reach it: argpartition alone keeps any of the tied
        near = np.flatnonzero(scores >= np.partition(scores, len(scores) - k)[len(scores) - k])
    else:
        near = np.arange(len(scores))
    return near[np.argsort(-scores[near], kind="stable")[:k]]


def grounded_inputs(kind: str, texts: list) -> tuple[list[str], list | None]:
    """An embed call's (queries, candidates): a grounded kind's texts are (query, titles) pairs.

    >>> grounded_inputs("grounded", [("mug", ("tea mug", "cup"))])
    (['mug'], [['tea mug', 'cup']])
    """
    if kind not in GROUNDED_MODES:
        return list(texts), None
    return [q for q, _ in texts], [list(c) for _, c in texts]


def check_k(k) -> int:
    """k as an int (numpy integers too), or a ValueError unless it is a whole number >= 1 (a bool
    is not one, though Python counts True as 1)."""
    import operator

    if isinstance(k, bool):
        raise ValueError(f"k={k!r}; must be an integer >= 1")
    try:
        k = operator.index(k)
    except TypeError:
        raise ValueError(f"k={k!r}; must be an integer >= 1") from None
    if k < 1:
        raise ValueError(f"k={k}; must be an integer >= 1")
    return k


def query_batch(queries) -> tuple[list, bool]:
    """(the queries as a list, whether one string was given): a retriever's `search` takes a list,
    or one query as a string and then returns its result alone (as `SentenceTransformer.encode`
    treats a string), never one query per character.

    >>> query_batch("mug"), query_batch(("mug", "cup"))
    ((['mug'], True), (['mug', 'cup'], False))
    """
    if isinstance(queries, str):
        return [queries], True
    return list(queries), False


@dataclass(frozen=True)
class Hit:
    """One retrieved item: its catalog id and the retriever's score (higher is better)."""

    item_id: str
    score: float


@dataclass
class SearchResult:
    """Ranked hits for one query, best first; `cot` is the reasoning used, None if none."""

    hits: list[Hit] = field(default_factory=list)
    cot: str | None = None

    @property
    def item_ids(self) -> list[str]:
        """The ranked item ids, best first."""
        return [h.item_id for h in self.hits]


@runtime_checkable
class Retriever(Protocol):
    """Anything that can rank catalog items for a batch of queries."""

    def search(self, queries: list[str], k: int = 10) -> list[SearchResult]:
        """Return one SearchResult per query (same order), at most `k` hits each, score desc."""
        ...
