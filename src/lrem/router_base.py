"""What both routers of `auto` mode build on (`lrem.router`): the signals they decide from, free
once the direct embedding has been searched (`FEATURES`, `query_features`), and the `share`
budget (`Budget`: a window of recent values and one of its quantiles)."""
from __future__ import annotations

import math
from collections import deque
from dataclasses import replace

import numpy as np

MIN_SAMPLES = 20  # with `share`, the fixed margin (threshold) is used until this many queries were seen
DEPTH = 10  # how deep the direct scores a router reads go (the top-1 minus top-DEPTH margin), by default
WINDOW = 1000  # recent values the `share` quantile is taken over, by default

# The features a learned router may use, all free once the direct embedding has been searched.
FEATURES = {
    "top1": "direct top-1 score",
    "gap": "direct top-1 minus top-2 score",
    "margin": "direct top-1 minus top-`depth` score",
    "mean": "mean of the direct top-`depth` scores",
    "words": "words in the query",
    "chars": "characters in the query",
    "digits": "digits in the query",
    "question": "1 if the query is a question (ends with '?' or starts with a question word), else 0",
}
QUESTION_WORDS = frozenset("what which who whom whose where when why how can could does do did is are should "
                           "will would".split())


def check_scores(direct_scores) -> np.ndarray:
    s = np.asarray(direct_scores, dtype=np.float64)  # (n, >= 1), best first
    if s.ndim != 2 or s.shape[1] == 0:
        raise ValueError(f"direct_scores must be (n_queries, k >= 1), got shape {s.shape}")
    return s


def query_features(queries: list[str], direct_scores: np.ndarray, depth: int = DEPTH,
                   names=tuple(FEATURES)) -> np.ndarray:
    """The named `FEATURES` of each query, (n, len(names)) float64.  direct_scores (n, >= 1), best
    first; with fewer than `depth` columns, the last one stands for top-`depth`.

    >>> query_features(["mug", "how do I open a 1990 wine?"], np.array([[0.9, 0.5, 0.4], [0.8, 0.79, 0.7]]),
    ...                depth=3).round(2).tolist()
    [[0.9, 0.4, 0.5, 0.6, 1.0, 3.0, 0.0, 0.0], [0.8, 0.01, 0.1, 0.76, 7.0, 26.0, 4.0, 1.0]]
    """
    s = check_scores(direct_scores)
    if len(queries) != len(s):
        raise ValueError(f"{len(queries)} queries for {len(s)} rows of scores")
    unknown = [n for n in names if n not in FEATURES]
    if unknown:
        raise ValueError(f"unknown router feature(s) {', '.join(map(repr, unknown))}; known: {', '.join(FEATURES)}")
    d = min(depth, s.shape[1])
    words = [q.split() for q in queries]
    cols = {
        "top1": s[:, 0],
        "gap": s[:, 0] - s[:, min(1, s.shape[1] - 1)],
        "margin": s[:, 0] - s[:, d - 1],
        "mean": s[:, :d].mean(axis=1),
        "words": [len(w) for w in words],
        "chars": [len(q) for q in queries],
        "digits": [sum(c.isdigit() for c in q) for q in queries],
        "question": [float(q.rstrip().endswith("?") or (bool(w) and w[0].lower() in QUESTION_WORDS))
                     for q, w in zip(queries, words)],
    }
    return np.stack([np.asarray(cols[n], dtype=np.float64) for n in names], axis=1).reshape(len(s), len(names))


def sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))  # = 1 / (1 + e^-z): no overflow, and tiny values stay distinct


def finite(x: float) -> float | None:
    """x, or None for the infinite cut of share 1 (JSON has no infinity: /info must stay valid)."""
    return x if math.isfinite(x) else None


class Budget:
    """The `share` budget both routers keep: a window of recent values and one of its quantiles.

    A router (a dataclass with `share` and `window` fields) calls `reset_window` in its
    `__post_init__`, `remember` with the values it decides on, and `recent_quantile` for its cut;
    the window itself is this class's own."""

    def reset_window(self) -> None:
        """An empty window of the last `window` values."""
        self._recent = deque(maxlen=self.window)

    def remember(self, values) -> None:
        """Add these values (margins or probabilities) to the window."""
        self._recent.extend(values)

    def seen(self) -> int:
        """How many values the window holds."""
        return len(self._recent)

    def recent_quantile(self, q: float) -> float | None:
        """The q-quantile of the recent values, None until MIN_SAMPLES were seen."""
        return float(np.quantile(np.asarray(self._recent), q)) if len(self._recent) >= MIN_SAMPLES else None

    def with_share(self, share: float):
        """A copy with this reasoning budget (0: its fixed margin or threshold) and a fresh window."""
        return replace(self, share=share)

