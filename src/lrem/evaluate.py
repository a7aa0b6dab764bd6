"""Score retrievers on a dataset split and write the report.

Metrics are pure functions on ids (no model), so BM25, MiniLM and LREM are scored by the same
code. All metric values are fractions in [0, 1]; times are in milliseconds or seconds as named.

    result = evaluate_systems(ds, "test", {"bm25": BM25Retriever(texts)}, limit=500)
    print(format_table(result))
    write_report(result, "runs/eval", ds)  # metrics.json, runs.jsonl, runs/*.trec, qrels.trec, report.md, *.png

Each system's run is also written as a TREC run file (depth k, with scores) and the qrels in TREC
format, so that trec_eval, ir_measures or ranx can re-score them; report.md adds paired
significance tests between systems on per-query values that ir_measures computes.

The parts: `evaluate_metrics` (metrics, TREC lines, significance), `evaluate_report` (tables,
examples, report.md, `write_report`) and `evaluate_charts` (its PNG charts); this module runs
the systems and re-exports them.
"""
from __future__ import annotations

import time

from tqdm.auto import tqdm

from lrem._defaults import QUERY_BATCH
from lrem.data import sample_query_ids
from lrem.evaluate_metrics import (KS, PRIMARY_METRIC, RANDOMIZATION_ROUNDS, SIGNIFICANCE_METRICS, evaluate,
                                   evaluate_slices, ndcg_at, per_query_values, query_metrics, significance, trec_name,
                                   trec_qrels_lines, trec_run_lines)
from lrem.evaluate_report import (CHART_METRICS, N_EXAMPLES, REPORT_METRICS, SLICE_METRICS, format_examples,
                                  format_table, pick_examples, report_markdown, write_report)
from lrem.runfile import QueryText
from lrem.search_types import Retriever

# The names this module had before its parts moved out (`from lrem.evaluate import write_report`, ...)
__all__ = ["PRIMARY_METRIC", "KS", "SLICE_METRICS", "REPORT_METRICS", "CHART_METRICS", "N_EXAMPLES",
           "SIGNIFICANCE_METRICS", "RANDOMIZATION_ROUNDS", "ndcg_at", "query_metrics", "evaluate", "evaluate_slices",
           "slices_for", "run_system", "evaluate_systems", "trec_name", "trec_run_lines", "trec_qrels_lines",
           "per_query_values", "significance", "format_table", "pick_examples", "format_examples", "report_markdown",
           "write_report"]


# ---------------------------------------------------------------- running systems


# query lengths in words the report slices by: short head-like queries against long descriptive
# ones, where reasoning is expected to matter most (a dataset such as ESCI has no other slice)
LENGTH_SLICES = (("words=1-2", 1, 2), ("words=3-4", 3, 4), ("words=5+", 5, None))


def slices_for(queries: dict) -> dict[str, list[str]]:
    """Query slices for the report: "category=<c>" per category, then "hard" and "easy", then
    query length in whitespace-separated words ("words=1-2", "words=3-4", "words=5+", `LENGTH_SLICES`).

    hard: `query.hard is True`; easy: every other query. Empty slices are left out, and so are
    hard/easy when no query carries a hard flag (all None), and the length slices when every
    query falls in one (the overall figures already say it).
    """
    slices: dict[str, list[str]] = {}
    for qid, q in sorted(queries.items()):
        if q.category:
            slices.setdefault(f"category={q.category}", []).append(qid)
    slices = dict(sorted(slices.items()))
    if any(q.hard is not None for q in queries.values()):
        hard = sorted(qid for qid, q in queries.items() if q.hard is True)
        easy = sorted(qid for qid, q in queries.items() if q.hard is not True)
        slices.update({name: ids for name, ids in (("hard", hard), ("easy", easy)) if ids})
    by_length: dict[str, list[str]] = {name: [] for name, _, _ in LENGTH_SLICES}
    for qid, q in sorted(queries.items()):
        n = len(q.text.split())
        name = next((name for name, lo, hi in LENGTH_SLICES if lo <= n and (hi is None or n <= hi)), None)
        if name is not None:
            by_length[name].append(qid)
    if sum(bool(ids) for ids in by_length.values()) > 1:
        slices.update({name: ids for name, ids in by_length.items() if ids})
    return slices


def run_system(retriever: Retriever, queries: dict[str, str], k: int = 100, batch_size: int = QUERY_BATCH,
               desc: str = "search") -> tuple[dict[str, list[str]], dict[str, str | None], float,
                                              dict[str, list[float]]]:
    """Search all queries in batches with a progress bar.

    Returns (run: qid -> ranked item ids, cots: qid -> reasoning or None, seconds spent inside
    `retriever.search` only, scores: qid -> the score of each ranked id). Each text goes in as a
    `QueryText` carrying its id: a run file answers two queries of the same text apart.
    """
    qids = list(queries)
    run, cots, seconds, scores = {}, {}, 0.0, {}
    with tqdm(total=len(qids), desc=desc, unit="q") as bar:
        for start in range(0, len(qids), batch_size):
            batch = qids[start:start + batch_size]
            t0 = time.perf_counter()
            results = retriever.search([QueryText(queries[q], q) for q in batch], k=k)
            seconds += time.perf_counter() - t0
            if len(results) != len(batch):
                raise ValueError(f"{desc}: got {len(results)} results for {len(batch)} queries")
            for qid, res in zip(batch, results):
                run[qid] = [h.item_id for h in res.hits]
                scores[qid] = [float(h.score) for h in res.hits]
                cots[qid] = res.cot
            bar.update(len(batch))
    return run, cots, seconds, scores


def evaluate_systems(ds, split: str, systems: dict[str, Retriever], limit: int | None = None,
                     seed: int = 0, k: int = 100, log=print) -> dict:
    """Run every system over a (sampled) split and score it, overall and per slice.

    Only queries with >= 1 relevant item are sampled (the others cannot be scored).
    Returns the metrics.json object (with "significance": paired tests between every two
    systems, see `significance`) plus, dropped from metrics.json by `write_report`, "examples"
    (per system and query, the CoT and top-10 ids), "runs" (per system and query, the ranked
    [item id, score] pairs to depth k) and "qrels" (the scored queries' judgements).
    """
    judged = ds.judged_queries(split)
    qids = sample_query_ids(list(judged), limit, seed)
    queries = {q: judged[q].text for q in qids}
    slices = slices_for({q: judged[q] for q in qids})
    sampled = f", a seeded sample (limit {limit})" if len(qids) < len(judged) else ""
    log(f"{ds.name}/{split}: {len(qids)} of {len(judged)} judged queries scored{sampled} ({len(ds.split_queries(split))} "
        f"in the split), {len(ds.catalog)} items")
    if k < max(KS):  # the metrics' cutoffs are fixed: deeper ones count only what the runs hold
        log(f"note: k={k} retrieves less than the metrics' deepest cutoff; "
            f"{', '.join(f'@{c}' for c in KS if c > k)} count only the top {k}")
    result = {"dataset": ds.name, "split": split, "n_queries": len(qids), "k": k,
              "limit": limit, "seed": seed, "systems": {}, "examples": {}, "runs": {},
              "qrels": {q: dict(ds.qrels[q]) for q in qids}}
    for name, retriever in systems.items():
        run, cots, seconds, scores = run_system(retriever, queries, k=k, desc=name)
        n = max(len(qids), 1)
        result["systems"][name] = {
            "overall": evaluate(run, ds.qrels),
            "slices": evaluate_slices(run, ds.qrels, slices),
            "ms_per_query": 1000.0 * seconds / n,
            "queries_per_s": len(qids) / seconds if seconds > 0 else 0.0,
        }
        if getattr(retriever, "reasoned_share", None) is not None:  # LREM systems: the share that generated a CoT
            result["systems"][name]["reasoned_share"] = retriever.reasoned_share
        if hasattr(retriever, "describe"):  # model, index path, mode: what report.md records
            result["systems"][name].update(retriever.describe())
        result["examples"][name] = {q: {"cot": cots[q], "top": run[q][:10]} for q in qids}
        result["runs"][name] = {q: [[i, s] for i, s in zip(run[q], scores[q])] for q in qids}
        overall = result["systems"][name]["overall"]
        share = result["systems"][name].get("reasoned_share")
        log(f"{name}: {PRIMARY_METRIC}={overall[PRIMARY_METRIC]:.4f} "
            f"ndcg@10={overall['ndcg@10']:.4f} ({1000.0 * seconds / n:.1f} ms/query"
            + (f", {100 * share:.0f}% reasoned)" if share is not None else ")"))
    result["significance"] = significance(result["runs"], result["qrels"], seed=seed)
    return result

