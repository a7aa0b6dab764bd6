"""Metrics on ids, no model (`lrem.evaluate` runs the systems): per-query and mean metrics
overall and per slice, TREC run and qrels lines, and paired significance tests between systems
on the per-query values ir_measures computes. All metric values are fractions in [0, 1]."""
from __future__ import annotations

import math

from lrem.runfile import dedupe_hits, trec_name, trec_run_lines  # noqa: F401 (the report's)

PRIMARY_METRIC = "hitrate@10"  # the key used to pick checkpoints and rank systems
KS = (1, 10, 100)
# Paired tests: report metric -> ir_measures measure. nDCG runs on qrels whose grades are mapped
# to 2**rel - 1, so trec_eval's linear gains equal `ndcg_at`'s exponential ones.
SIGNIFICANCE_METRICS = {"hitrate@10": "R@10", "ndcg@10": "nDCG@10"}
RANDOMIZATION_ROUNDS = 10_000


# ---------------------------------------------------------------- metrics (pure, on ids)


def _dedupe(ranked: list[str]) -> list[str]:
    """Drop repeated ids, keeping the first (best) position of each."""
    return list(dict.fromkeys(ranked))


def gain(rel: int) -> int:
    """The gain of a grade: 2**rel - 1 for a relevant one, 0 for 0 and below (a negative grade,
    such as TREC's -2 for spam, costs nothing, as in trec_eval: nDCG stays in [0, 1])."""
    return 2 ** rel - 1 if rel > 0 else 0


def ndcg_at(ranked: list[str], rels: dict[str, int], k: int = 10) -> float:
    """nDCG@k with graded gains 2**rel - 1 (`gain`) and a log2(rank + 1) discount; a repeated id
    counts at its first place only.

    The ideal ranking is built from all judged relevances of the query, not just retrieved ones.
    """
    dcg = sum(gain(rels.get(d, 0)) / math.log2(i + 2) for i, d in enumerate(_dedupe(ranked)[:k]))
    ideal = sorted((gain(r) for r in rels.values() if r > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def query_metrics(ranked: list[str], rels: dict[str, int], ks=KS) -> dict[str, float]:
    """Metrics of one ranked list against one query's graded judgements (relevant: rel > 0).

    hitrate@K: share of the query's relevant items found in the top K (the paper's HitRate);
    precision@K: relevant items in the top K / K; ndcg@10: graded, see `ndcg_at`;
    mrr@10: 1 / rank of the first relevant item within the top 10, else 0.
    A query with no relevant item scores 0 everywhere (`evaluate` leaves such queries out).
    """
    ranked = _dedupe(ranked)
    relevant = {d for d, r in rels.items() if r > 0}
    out: dict[str, float] = {}
    for k in ks:
        found = sum(1 for d in ranked[:k] if d in relevant)
        out[f"hitrate@{k}"] = found / len(relevant) if relevant else 0.0
    for k in ks:
        out[f"precision@{k}"] = sum(1 for d in ranked[:k] if d in relevant) / k
    out["ndcg@10"] = ndcg_at(ranked, rels, 10)
    first = next((i for i, d in enumerate(ranked[:10]) if d in relevant), None)
    out["mrr@10"] = 1.0 / (first + 1) if first is not None else 0.0
    return out


def _judged_ids(run: dict[str, list[str]], qrels: dict[str, dict[str, int]]) -> list[str]:
    """Query ids of the run with at least one relevant (rel > 0) item in qrels."""
    return [q for q in run if any(r > 0 for r in qrels.get(q, {}).values())]


def _mean_metrics(run, qrels, qids: list[str], ks) -> dict[str, float]:
    per_query = [query_metrics(run[q], qrels[q], ks) for q in qids]
    keys = query_metrics([], {}, ks).keys()
    return {m: (sum(p[m] for p in per_query) / len(per_query) if per_query else 0.0) for m in keys}


def evaluate(run: dict[str, list[str]], qrels: dict[str, dict[str, int]], ks=KS) -> dict[str, float]:
    """Mean of `query_metrics` over the run's queries that have >= 1 relevant item.

    Args:
        run: query_id -> ranked item ids, best first.
        qrels: query_id -> {item_id: graded relevance}; relevant means > 0.
    Returns a flat dict such as {"hitrate@10": 0.42, ..., "ndcg@10": ..., "mrr@10": ...};
    all zeros when no query can be scored.
    """
    return _mean_metrics(run, qrels, _judged_ids(run, qrels), ks)


def evaluate_slices(run, qrels, slices: dict[str, list[str]], ks=KS) -> dict[str, dict[str, float]]:
    """`evaluate` restricted to each slice's query ids; each dict also holds "n_queries"
    (the number of that slice's queries that were scored)."""
    out = {}
    for name, qids in slices.items():
        sub = {q: run[q] for q in qids if q in run}
        judged = _judged_ids(sub, qrels)
        out[name] = {**_mean_metrics(sub, qrels, judged, ks), "n_queries": len(judged)}
    return out


# ---------------------------------------------------------------- TREC files and significance


def trec_qrels_lines(qrels: dict[str, dict[str, int]]) -> list[str]:
    """TREC qrels lines "qid 0 item gain", the grades written as their gains 2**rel - 1 (`gain`:
    1 -> 1, 2 -> 3, 3 -> 7; 0 and below -> 0): trec_eval, ir_measures and ranx weigh nDCG's gains
    linearly, so on these lines their nDCG@10 is the report's, and every measure that asks only
    whether an item is relevant (rel > 0) is unchanged."""
    return [f"{q} 0 {item} {gain(rel)}" for q, rels in qrels.items() for item, rel in rels.items()]


def per_query_values(run: dict[str, list], qrels: dict[str, dict[str, int]]) -> dict[str, dict[str, float]]:
    """ir_measures' per-query value of each `SIGNIFICANCE_METRICS` entry: metric -> qid -> value,
    0 for a query the system returned nothing for.

    The run is passed ranked (score = depth - rank): trec_eval sorts by score and breaks ties by
    item id, which would reorder a retriever's equal scores (BM25's often tie) and score a
    ranking it never returned."""
    import ir_measures

    ranked = {q: {item: float(len(hits) - r) for r, (item, _) in enumerate(dedupe_hits(hits))}
              for q, hits in run.items()}
    out: dict[str, dict[str, float]] = {}
    for metric, measure in SIGNIFICANCE_METRICS.items():
        rels = qrels if metric != "ndcg@10" else {q: {i: gain(r) for i, r in rr.items()} for q, rr in qrels.items()}
        vals = {m.query_id: m.value for m in ir_measures.iter_calc([ir_measures.parse_measure(measure)], rels, ranked)}
        out[metric] = {q: float(vals.get(q, 0.0)) for q in qrels}
    return out


def significance(runs: dict[str, dict[str, list]], qrels: dict[str, dict[str, int]], seed: int = 0) -> list[dict]:
    """Paired tests between every two systems (in the order given) on per-query values
    (`per_query_values`): a paired t-test and a paired randomization test (sign flips of the
    per-query differences, `RANDOMIZATION_ROUNDS` rounds, or all 2**n flips when fewer; seeded).

    Returns rows {a, b, metric, mean_a, mean_b, diff (b - a), p_t, p_rand, n}; p is 1.0 when the
    two systems score every query alike. No correction for multiple comparisons is applied.
    """
    import numpy as np
    from scipy import stats

    values = {name: per_query_values(run, qrels) for name, run in runs.items()}
    names, qids = list(runs), list(qrels)
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for metric in SIGNIFICANCE_METRICS:
                x = np.array([values[a][metric][q] for q in qids])
                y = np.array([values[b][metric][q] for q in qids])
                d = y - x
                if len(d) < 2 or not d.any():
                    p_t = p_rand = 1.0
                else:
                    p_t = float(stats.ttest_rel(y, x).pvalue) if d.std() > 0 else 0.0
                    p_rand = float(stats.permutation_test(
                        (d,), np.mean, permutation_type="samples", n_resamples=RANDOMIZATION_ROUNDS,
                        random_state=seed).pvalue)
                rows.append({"a": a, "b": b, "metric": metric, "mean_a": float(x.mean()) if len(x) else 0.0,
                             "mean_b": float(y.mean()) if len(y) else 0.0, "diff": float(d.mean()) if len(d) else 0.0,
                             "p_t": p_t, "p_rand": p_rand, "n": len(d)})
    return rows

