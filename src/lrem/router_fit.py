"""`lrem router fit`'s steps: a judged sample of a split's queries (`judged_sample`), searched
directly and with reasoning, labelled by the reciprocal rank of the first relevant item
(`reciprocal_rank`) and handed to `learn_router` (`fit_router`); and where the router is
written (`router_target`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ._defaults import QUERY_BATCH, ROUTER_HOLDOUT, ROUTER_K, ROUTER_L2
from .router_base import query_features
from .router_learned import ROUTER_FILE, LearnedRouter, learn_router


def reciprocal_rank(ranked: list[str], relevant: set[str], k: int) -> float:
    """1 / rank of the first relevant item in the top k, else 0.

    >>> reciprocal_rank(["a", "b", "c"], {"c"}, 3), reciprocal_rank(["a", "b", "c"], {"c"}, 2)
    (0.3333333333333333, 0.0)
    """
    return next((1.0 / (i + 1) for i, d in enumerate(ranked[:k]) if d in relevant), 0.0)


def fit_router(searcher, queries: dict[str, str], qrels: dict[str, dict[str, int]], k: int = ROUTER_K,
               depth: int = LearnedRouter.depth, holdout: float = ROUTER_HOLDOUT,
               threshold: float = LearnedRouter.threshold,
               l2: float = ROUTER_L2, seed: int = 0, batch_size: int = QUERY_BATCH, data: str = "",
               show_progress: bool = False, log=print) -> LearnedRouter:
    """Search `queries` (id -> text; those with a relevant item in `qrels`) in both modes with an
    `lrem.search.Searcher`, and fit a router on when reasoning won (`learn_router`).

    The label is the reciprocal rank of the first relevant item in the top `k`; the features come
    from the direct search at depth max(k, `depth`), as `auto` mode sees them. `data` names the
    queries' dataset and split in the router's record.
    """
    from .index_base import model_fingerprint

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
    # the weights whose scores it learned from: a name can come to mean other weights, and a
    # router.json can be copied beside another model (`load_router` checks it)
    fitted = {"model": searcher.model.source, "model_fingerprint": model_fingerprint(searcher.model),
              "index": getattr(searcher, "index_dir", None), "data": data,
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

    judged = ds.judged_queries(split)
    return {q: judged[q].text for q in sample_query_ids(list(judged), limit, seed)}
