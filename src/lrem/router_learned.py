"""The learned router of `auto` mode (`lrem.router`): `LearnedRouter`, a logistic regression on
`FEATURES` that predicts P(reasoning beats direct) per query, its `router.json` file
(`ROUTER_FILE`, `load_router`), and how it is learned from per-query features and the
reciprocal ranks each mode got (`fit_logistic`, `learn_router`). Gathering those from a searcher
and a dataset is `lrem.router_fit`."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._defaults import ROUTER_HOLDOUT, ROUTER_L2, ROUTER_THRESHOLD
from .router_base import DEPTH, FEATURES, WINDOW, Budget, finite, query_features, sigmoid

ROUTER_FILE = "router.json"  # a learned router, in the model folder it was fitted for
FORMAT, VERSION = "lrem-router", 1


@dataclass
class LearnedRouter(Budget):
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
    threshold: float = ROUTER_THRESHOLD
    share: float = 0.0
    depth: int = DEPTH
    window: int = WINDOW
    fitted: dict = field(default_factory=dict, compare=False)

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
        self.reset_window()

    def proba(self, queries: list[str], direct_scores: np.ndarray) -> np.ndarray:
        """P(reasoning beats direct) per query (n,).  direct_scores (n, >= depth), best first."""
        return self._proba(query_features(queries, direct_scores, self.depth, self.features))

    def _proba(self, x: np.ndarray) -> np.ndarray:
        return sigmoid(((x - self.mean) / self.scale) @ self.weights + self.bias)

    def cutoff(self) -> float:
        """The probability above which a query reasons now (adapts when `share` is set)."""
        if self.share >= 1:
            return -math.inf
        adaptive = self.recent_quantile(1.0 - self.share) if self.share > 0 else None
        return self.threshold if adaptive is None else adaptive

    def decide(self, queries: list[str], direct_scores: np.ndarray) -> list[bool]:
        """True where the query should be reasoned about.  direct_scores (n, >= depth), best first."""
        p = self.proba(queries, direct_scores)
        if self.share > 0:
            self.remember(p.tolist())
        return (p > self.cutoff()).tolist()

    def describe(self) -> dict:
        """Settings, current cutoff (None with share 1: every query reasons) and how it was fitted, for
        logs and /info."""
        return {"kind": "learned", "features": list(self.features), "threshold": self.threshold,
                "share": self.share, "depth": self.depth, "cutoff": finite(self.cutoff()),
                "probabilities_seen": self.seen(),
                "fitted": self.fitted}

    # ---- router.json ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        """What `router.json` holds (see `save`)."""
        return {"format": FORMAT, "version": VERSION, "kind": "logistic", "features": list(self.features),
                "mean": self.mean.tolist(), "scale": self.scale.tolist(), "weights": self.weights.tolist(),
                "bias": self.bias, "threshold": self.threshold, "depth": self.depth, "fitted": self.fitted}

    def save(self, path) -> None:
        """Write the router as JSON, atomically (a model folder's `router.json`, or any file)."""
        from ._io import record_files, write_json

        write_json(path, self.to_dict())
        record_files(Path(path).parent, Path(path).name)  # a model folder's own file now: --overwrite may replace it

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
                       threshold=float(d["threshold"]), depth=_whole(d["depth"], "depth"),
                       fitted=dict(d.get("fitted") or {}))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None

    def check_fitted_on(self, fingerprint, where: str = "the learned router") -> None:
        """A ValueError where the router was fitted on other weights than those `fingerprint()`
        gives (`lrem.index_base.model_fingerprint`, called only when the router recorded its own):
        its probabilities would read another model's score scale."""
        fitted_on = self.fitted.get("model_fingerprint")
        if fitted_on and fitted_on != (now := fingerprint()):
            raise ValueError(f"{where}: fitted on other weights (model fingerprint {fitted_on}) than this model's "
                             f"({now}); refit it (`lrem router fit --out MODEL_DIR --overwrite`) or remove it")

    @classmethod
    def load(cls, path) -> "LearnedRouter":
        """Read a router file; a ValueError names the file and what is wrong with it."""
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{path}: malformed JSON ({e})") from None
        return cls.from_dict(d, str(path))


def _whole(value, name: str) -> int:
    """A count read from JSON: a whole number (2.5 was read as 2), not a bool."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{name}={value!r}; need a whole number")
    return int(value)


def load_router(model_dir, fingerprint: str | None = None) -> LearnedRouter | None:
    """The learned router saved in a model folder (`ROUTER_FILE`), or None when it has none.
    `fingerprint`: the folder's model's (`lrem.index_base.model_fingerprint`); a router fitted on other
    weights is a ValueError (its probabilities read another model's score scale). A router from
    before lrem recorded the fingerprint is trusted."""
    file = Path(model_dir) / ROUTER_FILE
    if not file.is_file():
        return None
    router = LearnedRouter.load(file)
    if fingerprint:
        router.check_fitted_on(lambda: fingerprint, f"{file}")
    return router


# ---------------------------------------------------------------- learning it


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = ROUTER_L2, max_iter: int = 100) -> tuple[np.ndarray, float]:
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
        p = sigmoid(a @ w)  # (n,)
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


def learn_router(x: np.ndarray, rr_direct: np.ndarray, rr_reason: np.ndarray, features=tuple(FEATURES),
                 holdout: float = ROUTER_HOLDOUT, threshold: float = LearnedRouter.threshold, l2: float = ROUTER_L2,
                 seed: int = 0, depth: int = LearnedRouter.depth, fitted: dict | None = None) -> LearnedRouter:
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

