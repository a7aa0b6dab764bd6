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
"""
from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

MIN_SAMPLES = 20  # with `share`, the fixed margin (threshold) is used until this many queries were seen
ROUTER_FILE = "router.json"  # a learned router, in the model folder it was fitted for
FORMAT, VERSION = "lrem-router", 1

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


def _check_scores(direct_scores) -> np.ndarray:
    s = np.asarray(direct_scores, dtype=np.float64)  # (n, >= 1), best first
    if s.ndim != 2 or s.shape[1] == 0:
        raise ValueError(f"direct_scores must be (n_queries, k >= 1), got shape {s.shape}")
    return s


def query_features(queries: list[str], direct_scores: np.ndarray, depth: int = 10,
                   names=tuple(FEATURES)) -> np.ndarray:
    """The named `FEATURES` of each query, (n, len(names)) float64.  direct_scores (n, >= 1), best
    first; with fewer than `depth` columns, the last one stands for top-`depth`.

    >>> query_features(["mug", "how do I open a 1990 wine?"], np.array([[0.9, 0.5, 0.4], [0.8, 0.79, 0.7]]),
    ...                depth=3).round(2).tolist()
    [[0.9, 0.4, 0.5, 0.6, 1.0, 3.0, 0.0, 0.0], [0.8, 0.01, 0.1, 0.76, 7.0, 26.0, 4.0, 1.0]]
    """
    s = _check_scores(direct_scores)
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


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))  # = 1 / (1 + e^-z): no overflow, and tiny values stay distinct


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, max_iter: int = 100) -> tuple[np.ndarray, float]:
    """Weights (f,) and bias of an L2-penalised logistic regression of y (n,) in {0, 1} on x (n, f).

    Minimises sum(log(1 + e^z) - y z) + l2/2 |w|^2 over z = x w + b (the bias is not penalised):
    scikit-learn's `LogisticRegression(C=1/l2)`, solved with Newton's method and a backtracking
    step (a convex problem of a few features: it converges in about ten steps).

    >>> w, b = fit_logistic(np.array([[0.], [1.], [2.], [3.]]), np.array([0, 0, 1, 1]), l2=0.1)
    >>> bool(w[0] > 0), round(float(-b / w[0]), 2)   # the boundary lies between the classes
    (True, 1.5)
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or len(x) != len(y) or len(x) == 0:
        raise ValueError(f"x of shape {x.shape} and {len(y)} labels; expected (n, f) and n labels, n >= 1")
    if not l2 > 0:
        raise ValueError(f"l2={l2}; must be > 0 (without it, separable data has no finite fit)")
    n, f = x.shape
    a = np.hstack([x, np.ones((n, 1))])  # (n, f + 1): the last column is the bias
    penalty = np.r_[np.full(f, l2), 0.0]  # (f + 1,)

    def loss(w):
        z = a @ w
        return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * np.sum(penalty * w * w))

    w = np.zeros(f + 1)
    for _ in range(max_iter):
        p = _sigmoid(a @ w)  # (n,)
        grad = a.T @ (p - y) + penalty * w  # (f + 1,)
        hess = a.T @ (a * (p * (1 - p))[:, None]) + np.diag(penalty + 1e-9)  # (f + 1, f + 1)
        step = np.linalg.solve(hess, grad)
        t, before = 1.0, loss(w)
        while loss(w - t * step) > before and t > 1e-6:
            t /= 2
        w = w - t * step
        if np.max(np.abs(t * step)) < 1e-10:
            break
    return w[:f], float(w[f])


def _finite(x: float) -> float | None:
    """x, or None for the infinite cut of share 1 (JSON has no infinity: /info must stay valid)."""
    return x if math.isfinite(x) else None


class _Budget:
    """The `share` budget both routers keep: a window of recent values and one of its quantiles."""

    def _quantile(self, q: float) -> float | None:
        """The q-quantile of the recent values, None until MIN_SAMPLES were seen."""
        return float(np.quantile(np.asarray(self._recent), q)) if len(self._recent) >= MIN_SAMPLES else None

    def with_share(self, share: float):
        """A copy with this reasoning budget (0: its fixed margin or threshold) and a fresh window."""
        return replace(self, share=share)


@dataclass
class Router(_Budget):
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
        adaptive = self._quantile(self.share) if self.share > 0 else None
        return self.margin if adaptive is None else adaptive

    def describe(self) -> dict:
        """Settings and current threshold (None with share 1: every query reasons), for logs and /info."""
        return {"kind": "margin", "margin": self.margin, "share": self.share,
                "long_query_words": self.long_query_words, "depth": self.depth, "threshold": _finite(self.threshold()),
                "margins_seen": len(self._recent)}

    def margins(self, direct_scores: np.ndarray) -> np.ndarray:
        """Top-1 minus top-`depth` score per query (n,); with fewer hits, minus the last one.

        >>> Router(depth=3).margins(np.array([[0.9, 0.5, 0.4, 0.1], [0.8, 0.79, 0.78, 0.7]])).round(2).tolist()
        [0.5, 0.02]
        """
        s = _check_scores(direct_scores)
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


@dataclass
class LearnedRouter(_Budget):
    """Reason where a logistic regression on `FEATURES` gives P(reasoning beats direct) > threshold.

    Args:
        features: the names of the features used, in the order of `weights` (keys of `FEATURES`).
        mean, scale: each feature is standardised as (x - mean) / scale before the weights apply.
        weights, bias: the logistic regression: P = sigmoid(weights . standardised x + bias).
        threshold: reason where P > threshold (with share 0).
        share: 0: use `threshold`. Otherwise reason on about this share (0..1) of queries: those
            whose P is above the (1 - share)-quantile of the last `window` probabilities seen.
            A deployment setting (serve's `router_share`, eval's `auto@SHARE`), not saved.
        depth: how deep the direct scores go (the `margin` and `mean` features).
        fitted: how it was fitted (model, index, data, queries, label, held-out metrics).
    """

    features: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    bias: float
    threshold: float = 0.5
    share: float = 0.0
    depth: int = 10
    window: int = 1000
    fitted: dict = field(default_factory=dict, compare=False)
    _recent: deque = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        self.features = tuple(self.features)
        self.mean, self.scale, self.weights = (np.asarray(v, dtype=np.float64)
                                               for v in (self.mean, self.scale, self.weights))
        f = len(self.features)
        if f == 0 or len(set(self.features)) != f or any(n not in FEATURES for n in self.features):
            raise ValueError(f"features={list(self.features)}: need distinct names of {', '.join(FEATURES)}")
        for name in ("mean", "scale", "weights"):
            v = getattr(self, name)
            if v.shape != (f,) or not np.isfinite(v).all():
                raise ValueError(f"{name}: need {f} finite numbers (one per feature), got {v.tolist()}")
        if not (self.scale > 0).all() or not math.isfinite(self.bias):
            raise ValueError(f"scale must be > 0 and bias finite (scale {self.scale.tolist()}, bias {self.bias})")
        if not 0 <= self.threshold <= 1 or not 0 <= self.share <= 1 or self.depth < 2 or self.window < 1:
            raise ValueError(f"threshold={self.threshold}, share={self.share}, depth={self.depth}, window={self.window}: "
                             "need 0 <= threshold <= 1, 0 <= share <= 1, depth >= 2, window >= 1")
        self._recent = deque(maxlen=self.window)

    def proba(self, queries: list[str], direct_scores: np.ndarray) -> np.ndarray:
        """P(reasoning beats direct) per query (n,).  direct_scores (n, >= depth), best first."""
        return self._proba(query_features(queries, direct_scores, self.depth, self.features))

    def _proba(self, x: np.ndarray) -> np.ndarray:
        return _sigmoid(((x - self.mean) / self.scale) @ self.weights + self.bias)

    def cutoff(self) -> float:
        """The probability above which a query reasons now (adapts when `share` is set)."""
        if self.share >= 1:
            return -math.inf
        adaptive = self._quantile(1.0 - self.share) if self.share > 0 else None
        return self.threshold if adaptive is None else adaptive

    def decide(self, queries: list[str], direct_scores: np.ndarray) -> list[bool]:
        """True where the query should be reasoned about.  direct_scores (n, >= depth), best first."""
        p = self.proba(queries, direct_scores)
        if self.share > 0:
            self._recent.extend(p.tolist())
        return (p > self.cutoff()).tolist()

    def describe(self) -> dict:
        """Settings, current cutoff (None with share 1: every query reasons) and how it was fitted, for
        logs and /info."""
        return {"kind": "learned", "features": list(self.features), "threshold": self.threshold,
                "share": self.share, "depth": self.depth, "cutoff": _finite(self.cutoff()),
                "probabilities_seen": len(self._recent),
                "fitted": self.fitted}

    # ---- router.json ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        """What `router.json` holds (see `save`)."""
        return {"format": FORMAT, "version": VERSION, "kind": "logistic", "features": list(self.features),
                "mean": self.mean.tolist(), "scale": self.scale.tolist(), "weights": self.weights.tolist(),
                "bias": self.bias, "threshold": self.threshold, "depth": self.depth, "fitted": self.fitted}

    def save(self, path) -> None:
        """Write the router as JSON, atomically (a model folder's `router.json`, or any file)."""
        from ._io import write_json

        write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, d, where: str = "router") -> "LearnedRouter":
        """The router a `to_dict` dict describes; a ValueError starting with `where` says what is wrong."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"{where}: not an lrem router file (no \"format\": \"{FORMAT}\")")
        if d.get("version") != VERSION or d.get("kind") != "logistic":
            raise ValueError(f"{where}: version {d.get('version')!r}, kind {d.get('kind')!r}; this lrem reads "
                             f"version {VERSION}, kind 'logistic'")
        missing = [k for k in ("features", "mean", "scale", "weights", "bias", "threshold", "depth") if k not in d]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)}")
        try:
            return cls(d["features"], d["mean"], d["scale"], d["weights"], float(d["bias"]),
                       threshold=float(d["threshold"]), depth=int(d["depth"]), fitted=dict(d.get("fitted") or {}))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None

    @classmethod
    def load(cls, path) -> "LearnedRouter":
        """Read a router file; a ValueError names the file and what is wrong with it."""
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{path}: malformed JSON ({e})") from None
        return cls.from_dict(d, str(path))


def load_router(model_dir) -> LearnedRouter | None:
    """The learned router saved in a model folder (`ROUTER_FILE`), or None when it has none."""
    file = Path(model_dir) / ROUTER_FILE
    return LearnedRouter.load(file) if file.is_file() else None


# ---------------------------------------------------------------- fitting

def reciprocal_rank(ranked: list[str], relevant: set[str], k: int) -> float:
    """1 / rank of the first relevant item in the top k, else 0.

    >>> reciprocal_rank(["a", "b", "c"], {"c"}, 3), reciprocal_rank(["a", "b", "c"], {"c"}, 2)
    (0.3333333333333333, 0.0)
    """
    return next((1.0 / (i + 1) for i, d in enumerate(ranked[:k]) if d in relevant), 0.0)


def learn_router(x: np.ndarray, rr_direct: np.ndarray, rr_reason: np.ndarray, features=tuple(FEATURES),
                 holdout: float = 0.25, threshold: float = 0.5, l2: float = 1.0, seed: int = 0, depth: int = 10,
                 fitted: dict | None = None) -> LearnedRouter:
    """Fit a `LearnedRouter` on per-query features x (n, f) and the reciprocal ranks each mode got.

    Label: reasoning wins (rr_reason > rr_direct; ties go to direct, the cheaper). A seeded
    `holdout` share of the queries is held out; the router is fitted on the others (features
    standardised on them) and measured on the held-out ones: accuracy (and that of always
    answering the training majority), the share it would reason, and the mean reciprocal rank of
    direct, reason, routed (direct or reason as it decides) and the oracle (the better of the
    two per query). The router returned is the one measured; `fitted` records all of it.
    """
    x = np.asarray(x, dtype=np.float64)
    rr_direct, rr_reason = np.asarray(rr_direct, dtype=np.float64), np.asarray(rr_reason, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != len(features) or not len(x) == len(rr_direct) == len(rr_reason):
        raise ValueError(f"features {x.shape} for {len(features)} names, {len(rr_direct)} and {len(rr_reason)} "
                         "reciprocal ranks; expected (n, f), n and n")
    if not 0 <= holdout < 1:
        raise ValueError(f"holdout={holdout}; expected a fraction in [0, 1)")
    y = (rr_reason > rr_direct).astype(np.float64)  # (n,)
    order = np.random.default_rng(seed).permutation(len(y))
    n_held = int(round(holdout * len(y)))
    held, train = order[:n_held], order[n_held:]
    won = int(y[train].sum())
    if won in (0, len(train)):
        raise ValueError(f"reasoning beat direct on {won} of {len(train)} training queries: with one outcome only "
                         "there is nothing for a router to learn (use more queries, or keep the margin router)")
    mean = x[train].mean(axis=0)
    scale = x[train].std(axis=0)
    scale[scale == 0] = 1.0  # a constant feature: its weight is shrunk to 0 by the penalty
    weights, bias = fit_logistic((x[train] - mean) / scale, y[train], l2=l2)
    router = LearnedRouter(tuple(features), mean, scale, weights, bias, threshold=threshold, depth=depth)
    report = None
    if n_held:
        routed = router._proba(x[held]) > threshold
        majority = float(2 * won >= len(train))
        report = {"queries": n_held, "accuracy": float(np.mean(routed == y[held])),
                  "majority_accuracy": float(np.mean(y[held] == majority)),
                  "reasoned_share": float(np.mean(routed)), "reason_won_share": float(np.mean(y[held])),
                  "mrr_direct": float(rr_direct[held].mean()), "mrr_reason": float(rr_reason[held].mean()),
                  "mrr_routed": float(np.where(routed, rr_reason[held], rr_direct[held]).mean()),
                  "mrr_oracle": float(np.maximum(rr_reason[held], rr_direct[held]).mean())}
    router.fitted = {**(fitted or {}), "queries": len(y), "train_queries": len(train),
                     "reason_won": int(y.sum()), "l2": l2, "seed": seed, "holdout": holdout, "heldout": report}
    return router


def fit_router(searcher, queries: dict[str, str], qrels: dict[str, dict[str, int]], k: int = 10, depth: int = 10,
               holdout: float = 0.25, threshold: float = 0.5, l2: float = 1.0, seed: int = 0,
               batch_size: int = 32, data: str = "", show_progress: bool = False, log=print) -> LearnedRouter:
    """Search `queries` (id -> text; those with a relevant item in `qrels`) in both modes with an
    `lrem.search.Searcher`, and fit a router on when reasoning won (`learn_router`).

    The label is the reciprocal rank of the first relevant item in the top `k`; the features come
    from the direct search at depth max(k, `depth`), as `auto` mode sees them. `data` names the
    queries' dataset and split in the router's record.
    """
    qids = [q for q in queries if any(r > 0 for r in qrels.get(q, {}).values())]
    if len(qids) < 10:
        raise ValueError(f"{len(qids)} queries with a relevant item ({len(queries)} given); a router needs at least 10")
    if k < 1 or depth < 2:
        raise ValueError(f"k={k}, depth={depth}; need k >= 1 and depth >= 2")
    texts = [queries[q] for q in qids]
    relevant = [{i for i, r in qrels[q].items() if r > 0} for q in qids]
    log(f"router: {len(qids)} queries, direct")
    enc = searcher.model.encode_queries(texts, mode="direct", batch_size=batch_size, truncate=searcher.truncate)
    scores, ids = searcher.index.search(enc.embeddings, max(k, depth))
    log(f"router: {len(qids)} queries, reason")
    reasoned = searcher.search(texts, k=k, mode="reason", batch_size=batch_size, show_progress=show_progress)
    rr_direct = np.array([reciprocal_rank(row, rel, k) for row, rel in zip(ids, relevant)])
    rr_reason = np.array([reciprocal_rank(r.item_ids, rel, k) for r, rel in zip(reasoned, relevant)])
    fitted = {"model": searcher.model.source, "index": getattr(searcher, "index_dir", None), "data": data,
              "k": k, "label": f"reason beats direct: reciprocal rank of the first relevant item in the top {k} "
                               "(ties: direct)"}
    return learn_router(query_features(texts, scores, depth), rr_direct, rr_reason, holdout=holdout,
                        threshold=threshold, l2=l2, seed=seed, depth=depth, fitted=fitted)


def router_target(out, model: str | None, overwrite: bool = False) -> Path:
    """Where `lrem router fit --out OUT` writes, checked before any work.

    OUT is the model folder the router was fitted for (an LREM folder: it gets `router.json`), or
    a file path ending in .json. An existing router file is replaced only with `overwrite`; any
    other existing file, a folder that is not that model's, or a plain folder is refused
    (`lrem._io.OutputError`).
    """
    from ._io import OutputError

    given, out = str(out), Path(out)
    if out.is_dir():
        if not (out / "lrem_config.json").is_file():
            raise OutputError(f"--out {given}: a folder that is not an LREM model folder (no lrem_config.json); "
                              f"give the model's folder or a file path ending in .json")
        if not model or not Path(model).is_dir() or Path(model).resolve() != out.resolve():
            raise OutputError(f"--out {given}: the index's model is {model!r}, not this folder; a router belongs to "
                              "the model it was fitted with (write a .json file instead)")
        out = out / ROUTER_FILE
    elif out.suffix != ".json":
        raise OutputError(f"--out {given}: give the model's folder (router.json goes inside) or a file path "
                          "ending in .json")
    if out.exists() or out.is_symlink():
        try:
            LearnedRouter.load(out)
        except (OSError, ValueError):
            raise OutputError(f"--out {given}: {out} exists and is not a router file lrem wrote; refusing to "
                              "replace it") from None
        if not overwrite:
            raise OutputError(f"--out {given}: {out} exists (an earlier router); pass --overwrite to replace it")
    return out


def judged_sample(ds, split: str, limit: int | None, seed: int = 0) -> dict[str, str]:
    """id -> text of a fixed, seeded sample of `limit` queries of a split that have a relevant
    item (the sample `lrem eval --limit` draws)."""
    from .data import sample_query_ids

    split_queries = ds.split_queries(split)
    judged = [q for q in split_queries if any(r > 0 for r in ds.qrels.get(q, {}).values())]
    return {q: split_queries[q].text for q in sample_query_ids(judged, limit, seed)}
