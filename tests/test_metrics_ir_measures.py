"""lrem's metrics against ir_measures (pytrec_eval, i.e. trec_eval) on seeded random runs: ties,
repeated ids, fewer than k hits, empty rankings, grades 0 and negative, `--min-relevance`, slices,
the TREC files lrem writes, and the paired tests."""
from __future__ import annotations

import random

import ir_measures
import pytest

from lrem.data import Dataset
from lrem.evaluate_metrics import (evaluate, evaluate_slices, gain, ndcg_at, query_metrics, significance,
                                   trec_qrels_lines)
from lrem.runfile import dedupe_hits, trec_run_lines

# lrem's metric -> ir_measures' (hitrate@K is the share of relevant items found: recall)
MEASURES = {"hitrate@1": "R@1", "hitrate@10": "R@10", "hitrate@100": "R@100", "precision@1": "P@1",
            "precision@10": "P@10", "precision@100": "P@100", "ndcg@10": "nDCG@10", "mrr@10": "RR@10"}
ITEMS = [f"d{i}" for i in range(40)]


def random_case(seed: int, n_queries: int = 6):
    """qrels (grades -2..3, some queries with nothing relevant) and a run of [item, score] lists with
    tied scores, repeated ids, short and empty rankings, and items nobody judged."""
    rng = random.Random(seed)
    qrels, run = {}, {}
    for q in range(n_queries):
        qid = f"q{q}"
        qrels[qid] = {d: rng.choice([-2, -1, 0, 0, 1, 1, 2, 3]) for d in rng.sample(ITEMS, rng.randint(0, 14))}
        hits = rng.sample(ITEMS, rng.choice([0, 1, 3, 9, 10, 11, 25]))
        hits += rng.sample(hits, min(len(hits), rng.randint(0, 3)))  # the same id again, lower down
        scores = sorted((rng.choice([1.0, 0.5, 0.5, 0.25, round(rng.random(), 3)]) for _ in hits), reverse=True)
        run[qid] = [[h, s] for h, s in zip(hits, scores)]
    return qrels, run


def judged(qrels):
    return {q: rels for q, rels in qrels.items() if any(r > 0 for r in rels.values())}


def reference(qrels, run) -> dict[tuple[str, str], float]:
    """(qid, lrem metric) -> ir_measures' value, the run ranked as lrem ranked it (by position, so
    trec_eval's tie-break by id cannot reorder it) and the grades as lrem's gains."""
    ranked = {q: {i: float(1000 - r) for r, (i, _) in enumerate(dedupe_hits(h))} for q, h in run.items()}
    gains = {q: {i: gain(r) for i, r in rels.items()} for q, rels in judged(qrels).items()}
    by_name = {v: k for k, v in MEASURES.items()}
    measures = [ir_measures.parse_measure(m) for m in MEASURES.values()]
    return {(m.query_id, by_name[str(m.measure)]): m.value for m in ir_measures.iter_calc(measures, gains, ranked)}


@pytest.mark.parametrize("seed", range(40))
def test_query_metrics_equal_ir_measures_per_query(seed):
    qrels, run = random_case(seed)
    ref = reference(qrels, run)
    for q in judged(qrels):
        mine = query_metrics([i for i, _ in run[q]], qrels[q])
        for metric in MEASURES:
            assert mine[metric] == pytest.approx(ref.get((q, metric), 0.0), abs=1e-9), (seed, q, metric)


def test_negative_grades_cost_nothing_and_ndcg_stays_in_0_1():
    """A grade below 0 (TREC's -2 for spam) is not relevant and has gain 0, as in trec_eval: it
    used to add 2**-2 - 1 = -0.75, making nDCG negative."""
    rels = {"spam": -2, "bad": -1, "good": 1}
    assert ndcg_at(["spam", "bad"], rels) == 0.0
    assert ndcg_at(["spam", "good"], rels) == pytest.approx(1 / 1.584962500721156)
    assert ndcg_at(["good", "good", "spam"], rels) == 1.0  # a repeated id counts once


@pytest.mark.parametrize("seed", range(10))
def test_trec_files_rescore_to_the_reported_means(seed, tmp_path):
    """The runs/*.trec and qrels.trec lines, read back by ir_measures (trec_eval ranks by score and
    breaks ties by id), give `evaluate`'s means for every metric, nDCG on graded judgements included."""
    qrels, run = random_case(seed)
    qrels = judged(qrels)  # what `lrem eval` scores and writes
    run = {q: run[q] for q in qrels}
    (tmp_path / "run.trec").write_text("".join(ln + "\n" for ln in trec_run_lines("sys", run)))
    (tmp_path / "qrels.trec").write_text("".join(ln + "\n" for ln in trec_qrels_lines(qrels)))
    measures = [ir_measures.parse_measure(m) for m in MEASURES.values()]
    per_query = {(m.query_id, str(m.measure)): m.value for m in ir_measures.iter_calc(
        measures, list(ir_measures.read_trec_qrels(str(tmp_path / "qrels.trec"))),
        list(ir_measures.read_trec_run(str(tmp_path / "run.trec"))))}
    ours = evaluate({q: [i for i, _ in h] for q, h in run.items()}, qrels)
    for metric, measure in MEASURES.items():
        # trec_eval leaves out a query with no line in the run: lrem counts it as 0, as the mean over qrels
        theirs = sum(per_query.get((q, measure), 0.0) for q in qrels) / len(qrels)
        assert ours[metric] == pytest.approx(theirs, abs=1e-9), (seed, metric)


@pytest.mark.parametrize("seed", range(10))
def test_min_relevance_equals_trec_eval_relevance_level(seed):
    """`--min-relevance 3` (`Dataset.at_relevance`) counts what trec_eval -l 3 counts as relevant."""
    qrels, run = random_case(seed)
    ds = Dataset(name="t", catalog={}, queries={}, qrels=qrels).at_relevance(3)
    ranked = {q: {i: float(1000 - r) for r, (i, _) in enumerate(dedupe_hits(h))} for q, h in run.items()}
    scored = {q: rels for q, rels in qrels.items() if any(r >= 3 for r in rels.values())}
    measures = {"hitrate@10": ir_measures.R(rel=3) @ 10, "precision@10": ir_measures.P(rel=3) @ 10,
                "mrr@10": ir_measures.RR(rel=3) @ 10}
    ours = evaluate({q: [i for i, _ in h] for q, h in run.items()}, ds.qrels)
    for metric, measure in measures.items():
        vals = {m.query_id: m.value for m in ir_measures.iter_calc([measure], scored, ranked)}
        expected = sum(vals.get(q, 0.0) for q in scored) / len(scored) if scored else 0.0
        assert ours[metric] == pytest.approx(expected, abs=1e-9), (seed, metric)


@pytest.mark.parametrize("seed", range(5))
def test_slices_significance_and_identical_systems(seed):
    """A slice's mean is the mean of ir_measures' per-query values over its judged queries; the
    paired tests' means are `evaluate`'s; identical systems get p = 1; swapping the systems flips
    the difference and keeps the p-values."""
    qrels, run_a = random_case(seed, n_queries=12)
    _, run_b = random_case(seed + 1000, n_queries=12)
    qrels = judged(qrels)
    run_a, run_b = ({q: r[q] for q in qrels} for r in (run_a, run_b))
    ref = reference(qrels, run_a)
    slices = {"even": sorted(qrels)[::2], "odd": sorted(qrels)[1::2]}
    ids = lambda run: {q: [i for i, _ in h] for q, h in run.items()}  # noqa: E731
    for name, sl in evaluate_slices(ids(run_a), qrels, slices).items():
        assert sl["n_queries"] == len(slices[name])
        for metric in MEASURES:
            assert sl[metric] == pytest.approx(sum(ref.get((q, metric), 0.0) for q in slices[name]) / len(slices[name]))

    rows = {(r["a"], r["b"], r["metric"]): r for r in significance({"a": run_a, "b": run_b, "a2": run_a}, qrels,
                                                                    seed=seed)}
    swapped = {r["metric"]: r for r in significance({"b": run_b, "a": run_a}, qrels, seed=seed)}
    for metric in ("hitrate@10", "ndcg@10"):
        ab, same = rows["a", "b", metric], rows["a", "a2", metric]
        assert ab["mean_a"] == pytest.approx(evaluate(ids(run_a), qrels)[metric])
        assert ab["mean_b"] == pytest.approx(evaluate(ids(run_b), qrels)[metric])
        assert ab["n"] == len(qrels) and 0 < ab["p_rand"] <= 1 and 0 <= ab["p_t"] <= 1
        assert (same["p_t"], same["p_rand"], same["diff"]) == (1.0, 1.0, 0.0)
        assert swapped[metric]["diff"] == pytest.approx(-ab["diff"])
        assert swapped[metric]["p_t"] == pytest.approx(ab["p_t"])
        assert swapped[metric]["p_rand"] == pytest.approx(ab["p_rand"])
