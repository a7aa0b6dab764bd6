"""Score retrievers on a dataset split and write the report.

Metrics are pure functions on ids (no model), so BM25, MiniLM and LREM are scored by the same
code. All metric values are fractions in [0, 1]; times are in milliseconds or seconds as named.

    result = evaluate_systems(ds, "test", {"bm25": BM25Retriever(texts)}, limit=500)
    print(format_table(result))
    write_report(result, "runs/eval", ds)  # metrics.json, runs.jsonl, runs/*.trec, qrels.trec, report.md, *.png

Each system's run is also written as a TREC run file (depth k, with scores) and the qrels in TREC
format, so that trec_eval, ir_measures or ranx can re-score them; report.md adds paired
significance tests between systems on per-query values that ir_measures computes.
"""
from __future__ import annotations

import math
import re
import time
from pathlib import Path

from tqdm.auto import tqdm

from lrem._io import atomic_write, write_json, write_jsonl
from lrem.data import sample_query_ids
from lrem.search_types import Retriever

PRIMARY_METRIC = "hitrate@10"  # the key used to pick checkpoints and rank systems
KS = (1, 10, 100)
SLICE_METRICS = ("hitrate@10", "ndcg@10")
REPORT_METRICS = ("hitrate@1", "hitrate@10", "hitrate@100", "precision@1", "precision@10",
                  "precision@100", "ndcg@10", "mrr@10")
CHART_METRICS = ("hitrate@10", "hitrate@100", "ndcg@10", "mrr@10")
N_EXAMPLES = 5  # queries shown with their CoT and top items in report.md (when ds is given)
# Paired tests: report metric -> ir_measures measure. nDCG runs on qrels whose grades are mapped
# to 2**rel - 1, so trec_eval's linear gains equal `ndcg_at`'s exponential ones.
SIGNIFICANCE_METRICS = {"hitrate@10": "R@10", "ndcg@10": "nDCG@10"}
RANDOMIZATION_ROUNDS = 10_000


# ---------------------------------------------------------------- metrics (pure, on ids)

def _dedupe(ranked: list[str]) -> list[str]:
    """Drop repeated ids, keeping the first (best) position of each."""
    return list(dict.fromkeys(ranked))


def ndcg_at(ranked: list[str], rels: dict[str, int], k: int = 10) -> float:
    """nDCG@k with graded gains 2**rel - 1 and a log2(rank + 1) discount.

    The ideal ranking is built from all judged relevances of the query, not just retrieved ones.
    """
    dcg = sum((2 ** rels.get(d, 0) - 1) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted((r for r in rels.values() if r > 0), reverse=True)[:k]
    idcg = sum((2 ** r - 1) / math.log2(i + 2) for i, r in enumerate(ideal))
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


# ---------------------------------------------------------------- running systems

def slices_for(queries: dict) -> dict[str, list[str]]:
    """Query slices for the report: "category=<c>" per category, then "hard" and "easy".

    hard: `query.hard is True`; easy: every other query. Empty slices are left out, and so are
    hard/easy when no query carries a hard flag (all None).
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
    return slices


def run_system(retriever: Retriever, queries: dict[str, str], k: int = 100, batch_size: int = 32,
               desc: str = "search") -> tuple[dict[str, list[str]], dict[str, str | None], float,
                                              dict[str, list[float]]]:
    """Search all queries in batches with a progress bar.

    Returns (run: qid -> ranked item ids, cots: qid -> reasoning or None, seconds spent inside
    `retriever.search` only, scores: qid -> the score of each ranked id).
    """
    qids = list(queries)
    run, cots, seconds, scores = {}, {}, 0.0, {}
    with tqdm(total=len(qids), desc=desc, unit="q") as bar:
        for start in range(0, len(qids), batch_size):
            batch = qids[start:start + batch_size]
            t0 = time.perf_counter()
            results = retriever.search([queries[q] for q in batch], k=k)
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
    split_queries = ds.split_queries(split)
    judged = [q for q in split_queries if any(r > 0 for r in ds.qrels.get(q, {}).values())]
    qids = sample_query_ids(judged, limit, seed)
    queries = {q: split_queries[q].text for q in qids}
    slices = slices_for({q: split_queries[q] for q in qids})
    log(f"{ds.name}/{split}: {len(qids)} queries scored ({len(judged)} judged of {len(split_queries)}), "
        f"{len(ds.catalog)} items")
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
        if hasattr(retriever, "reasoned_share"):  # LREM systems: the share of queries that generated a CoT
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


# ---------------------------------------------------------------- TREC files and significance

def trec_name(name: str) -> str:
    """A system name as a TREC run tag and file name (no spaces or path characters)."""
    return re.sub(r"[^\w.+@-]", "_", name) or "_"


def trec_run_lines(name: str, run: dict[str, list]) -> list[str]:
    """TREC run lines "qid Q0 item rank score tag" of one system's ranked [item, score] lists."""
    tag = trec_name(name)
    return [f"{q} Q0 {item} {rank} {score:.6g} {tag}" for q, hits in run.items()
            for rank, (item, score) in enumerate(_dedupe_hits(hits), 1)]


def trec_qrels_lines(qrels: dict[str, dict[str, int]]) -> list[str]:
    return [f"{q} 0 {item} {rel}" for q, rels in qrels.items() for item, rel in rels.items()]


def _dedupe_hits(hits: list) -> list:
    seen: set = set()
    return [h for h in hits if not (h[0] in seen or seen.add(h[0]))]


def per_query_values(run: dict[str, list], qrels: dict[str, dict[str, int]]) -> dict[str, dict[str, float]]:
    """ir_measures' per-query value of each `SIGNIFICANCE_METRICS` entry: metric -> qid -> value,
    0 for a query the system returned nothing for.

    The run is passed ranked (score = depth - rank): trec_eval sorts by score and breaks ties by
    item id, which would reorder a retriever's equal scores (BM25's often tie) and score a
    ranking it never returned."""
    import ir_measures

    ranked = {q: {item: float(len(hits) - r) for r, (item, _) in enumerate(_dedupe_hits(hits))}
              for q, hits in run.items()}
    out: dict[str, dict[str, float]] = {}
    for metric, measure in SIGNIFICANCE_METRICS.items():
        rels = qrels if metric != "ndcg@10" else {q: {i: 2 ** r - 1 if r > 0 else 0 for i, r in rr.items()}
                                                    for q, rr in qrels.items()}
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


# ---------------------------------------------------------------- tables and report

def _table_rows(result: dict, metrics) -> tuple[list[str], list[list[str]]]:
    header = ["system", *metrics, "ms/query"]
    rows = [[name, *(f"{s['overall'].get(m, float('nan')):.4f}" for m in metrics),
             f"{s['ms_per_query']:.1f}"] for name, s in result["systems"].items()]
    return header, rows


def format_table(result: dict, metrics=("hitrate@1", "hitrate@10", "hitrate@100",
                                        "precision@10", "ndcg@10", "mrr@10")) -> str:
    """Plain-text table for the terminal: systems as rows, metrics and ms/query as columns."""
    header, rows = _table_rows(result, metrics)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths)))
    title = f"{result['dataset']}/{result['split']} ({result['n_queries']} queries)"
    return "\n".join([title, fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def _slice_table(result: dict, metric: str) -> list[str]:
    names = list(result["systems"])
    slice_names = list(next(iter(result["systems"].values()))["slices"]) if names else []
    rows = []
    for sl in slice_names:
        first = result["systems"][names[0]]["slices"][sl]
        rows.append([sl, str(first["n_queries"]),
                     *(f"{result['systems'][n]['slices'][sl][metric]:.4f}" for n in names)])
    return _md_table(["slice", "n", *names], rows)


def _short(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _compared_systems(names: list[str]) -> tuple[str, str] | None:
    """The (baseline, other) pair whose per-query difference picks examples: a system named like
    "direct" and one named like "reason" when both exist, else the first and the last system."""
    direct = next((n for n in names if "direct" in n), None)
    reason = next((n for n in names if "reason" in n and n != direct), None)
    if direct and reason:
        return direct, reason
    return (names[0], names[-1]) if len(names) > 1 else None


def _slice_of(q) -> str:
    return q.category + ("" if q.hard is None else ", hard" if q.hard else ", easy")


def pick_examples(result: dict, ds, n: int) -> list[tuple[str, str]]:
    """`n` example queries for the terminal and report.md, as (query_id, why picked) pairs.

    Where two systems can be compared (see `_compared_systems`), the first picks are the query
    where the second system gained most hitrate@10 over the first and the one where it lost
    most (if any query gained or lost). The rest are spread over the slices (category x
    hard/easy), taking turns from the slice shown least so far; within a slice, queries go in
    an order seeded by the run's seed. The same result always gives the same picks.
    """
    import hashlib

    examples = result.get("examples", {})
    qids = [q for q in next(iter(examples.values()), {}) if q in ds.queries]
    seed = result.get("seed", 0)
    order = {q: hashlib.sha1(f"{seed}:{q}".encode()).hexdigest() for q in qids}
    picks: dict[str, str] = {}
    pair = _compared_systems(list(examples))
    if pair and n > 0:
        a, b = pair

        def hr(name: str, q: str) -> float:
            return query_metrics(examples[name][q]["top"], ds.qrels.get(q, {}), (10,))["hitrate@10"]

        delta = {q: (hr(a, q), hr(b, q)) for q in qids}  # (a's, b's) hitrate@10
        for sign, verb in ((1, "beat"), (-1, "lost to")):
            best = max(qids, key=lambda q: (sign * (delta[q][1] - delta[q][0]), order[q]), default=None)
            if best is not None and sign * (delta[best][1] - delta[best][0]) > 0 and len(picks) < n:
                picks[best] = f"{b} {verb} {a}: hitrate@10 {delta[best][1]:.2f} vs {delta[best][0]:.2f}"
    by_slice: dict[str, list[str]] = {}
    for q in sorted(qids, key=order.get):
        by_slice.setdefault(_slice_of(ds.queries[q]), []).append(q)
    shown = {sl: sum(_slice_of(ds.queries[q]) == sl for q in picks) for sl in by_slice}
    while len(picks) < min(n, len(qids)):
        sl = min((s for s in by_slice if any(q not in picks for q in by_slice[s])), key=lambda s: (shown[s], s))
        picks[next(q for q in by_slice[sl] if q not in picks)] = ""
        shown[sl] += 1
    return list(picks.items())


def format_examples(result: dict, ds, n: int) -> str:
    """The terminal's examples (the same as report.md's): each system's CoT and top-3 items."""
    lines = []
    for q, why in pick_examples(result, ds, n):
        rel = ds.relevant(q)
        lines.append(f"\nquery [{_slice_of(ds.queries[q])}]: {ds.queries[q].text}" + (f"  ({why})" if why else ""))
        for name, ex in result["examples"].items():
            top = ", ".join(("+" if i in rel else "") + ds.catalog[i].title.split(",")[0] for i in ex[q]["top"][:3])
            cot = f" cot: {ex[q]['cot']!r}" if ex[q]["cot"] is not None else ""
            lines.append(f"  {name:<14}{cot}\n  {'':<14} top: {top}")
    return "\n".join(lines) + "\n(+ = relevant)"


def _examples_md(result: dict, ds, n: int = N_EXAMPLES) -> list[str]:
    """`n` queries (`pick_examples`) with each system's CoT and top 3 titles (+ marks a relevant item)."""
    examples = result.get("examples", {})
    lines = ["## Examples", ""]
    for qid, why in pick_examples(result, ds, n):
        rels = ds.qrels.get(qid, {})
        lines.append(f"**{qid}: {ds.queries[qid].text}** ({_slice_of(ds.queries[qid])}; "
                     f"{sum(r > 0 for r in rels.values())} relevant)" + (f" {why}" if why else ""))
        lines.append("")
        for name, ex in examples.items():
            if qid not in ex:
                continue
            cot = f" (cot: {ex[qid]['cot']})" if ex[qid]["cot"] else ""
            tops = "; ".join(("+ " if rels.get(i, 0) > 0 else "") +
                             _short(ds.catalog[i].title if i in ds.catalog else i)
                             for i in ex[qid]["top"][:3])
            lines.append(f"- {name}{cot}: {tops}")
        lines.append("")
    return lines


def _systems_md(result: dict) -> list[str]:
    """What each system was: its spec, model, index folder and mode (as far as known)."""
    rows = [[name, *(f"`{s[key]}`" if s.get(key) not in (None, "") else "" for key in ("spec", "model", "index")),
             str(s.get("mode", ""))] for name, s in result["systems"].items()]
    return ["## Systems", "", *_md_table(["system", "spec", "model", "index", "mode"], rows), "",
            f"Run files (TREC, depth {result.get('k')}, with scores): `runs/<system>.trec`; "
            "judgements: `qrels.trec`.", ""]


def _significance_md(result: dict) -> list[str]:
    rows = [[r["b"], r["a"], r["metric"], f"{r['mean_b']:.4f}", f"{r['mean_a']:.4f}", f"{r['diff']:+.4f}",
             f"{r['p_t']:.3g}", f"{r['p_rand']:.3g}"] for r in result.get("significance", [])]
    if not rows:
        return []
    n = result["significance"][0]["n"]
    return ["## Significance", "",
            f"Paired tests over the same {n} queries, per-query values from ir_measures on the run files "
            f"(hitrate@10 = R@10; ndcg@10 = nDCG@10 on gains 2^rel - 1). p_t: paired t-test; p_rand: "
            f"paired randomization test ({RANDOMIZATION_ROUNDS:,} sign flips, or all when fewer). "
            "Two-sided, no correction for multiple comparisons.", "",
            *_md_table(["system", "against", "metric", "system's mean", "against's mean", "difference",
                        "p_t", "p_rand"], rows), ""]


def report_markdown(result: dict, ds=None, n_examples: int = N_EXAMPLES, figures: tuple[str, ...] = ()) -> str:
    """The report.md text: header and command, systems, overall table, one slice table per
    primary metric, significance tests, charts, examples, and extra `figures` (file names in
    the report folder, e.g. training curves)."""
    header, rows = _table_rows(result, REPORT_METRICS)
    lines = [f"# Evaluation: {result['dataset']} / {result['split']}", "",
             f"{result['n_queries']} queries (seed {result.get('seed')}, limit {result.get('limit')}); "
             f"metrics are fractions in [0, 1]; hitrate@K = share of a query's relevant items in "
             f"the top K; ms/query covers search only.", ""]
    if result.get("command"):
        lines += ["Command:", "", "```", result["command"], "```", ""]
    lines += [*_systems_md(result), "## Overall", "", *_md_table(header, rows), "", "![overall](overall.png)", "",
              "![quality versus cost](quality.png)", ""]
    for metric in SLICE_METRICS:
        lines += [f"## Slices: {metric}", "", *_slice_table(result, metric), ""]
    lines += ["![slices](slices.png)", "", *_significance_md(result)]
    if figures:
        lines += ["## Figures", "", *(f"![{Path(f).stem}]({f})" for f in figures), ""]
    if ds is not None:
        lines += _examples_md(result, ds, n_examples)
    return "\n".join(lines)


def _figure(width_in: float, height_in: float = 4.5):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", bbox_inches="tight")


def _bar_chart(path: Path, groups: list[str], series: dict[str, list[float]], title: str) -> None:
    """Grouped bar chart (one bar per series inside each group) saved as PNG, atomically.

    Each bar carries its value (a zero bar shows "0.00" and an outline, so it reads as zero,
    not as missing); group labels wrap at "=" and ", " and the figure widens with the bars
    and the longest label line, so neighbouring labels do not run into each other."""
    import textwrap

    labels = ["\n".join(w for line in g.split("\n") for w in textwrap.wrap(line.replace("=", "= "), 14))
              .replace("= ", "=") for g in groups]
    widest = max((len(line) for lab in labels for line in lab.splitlines()), default=1)
    per_group = max(0.35 * max(len(series), 1) + 0.3, 0.095 * widest)  # inches
    fig = _figure(min(max(6.0, 2.5 + per_group * len(groups)), 40.0))
    ax = fig.add_subplot()
    width = 0.8 / max(len(series), 1)
    colors = [f"C{j % 10}" for j in range(len(series))]
    for j, (name, values) in enumerate(series.items()):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(groups))]
        bars = ax.bar(xs, values, width, label=name, color=colors[j], edgecolor=colors[j], linewidth=1.2)
        ax.bar_label(bars, fmt="%.2f", fontsize=7 if len(series) < 5 else 6, padding=1,
                     rotation=90 if len(series) > 3 else 0)
    ax.set_xticks(range(len(groups)), labels, fontsize=8)
    ax.set_ylim(0, 1.12)  # room for the value labels above a bar at 1.0
    ax.axhline(0, color="black", linewidth=0.8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title)
    if series:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    _save(fig, path)


def _quality_cost_chart(path: Path, systems: dict, title: str) -> None:
    """Quality (hitrate@10, ndcg@10) against ms/query per system, ms on a log axis."""
    fig = _figure(7.0)
    ax = fig.add_subplot()
    names = list(systems)
    ms = [max(systems[n]["ms_per_query"], 1e-3) for n in names]
    for j, (metric, marker) in enumerate(((PRIMARY_METRIC, "o"), ("ndcg@10", "s"))):
        ax.scatter(ms, [systems[n]["overall"][metric] for n in names], marker=marker, label=metric, color=f"C{j}")
    # names next to the hitrate@10 points, alternately above and below; systems at the same spot
    # (on the plot's scale) share one label instead of printing over each other
    spots: dict[tuple, list[int]] = {}
    for j, n in enumerate(names):
        spots.setdefault((round(math.log10(ms[j]), 1), round(systems[n]["overall"][PRIMARY_METRIC], 2)), []).append(j)
    for i, js in enumerate(spots.values()):
        ax.annotate(", ".join(names[j] for j in js), (ms[js[0]], systems[names[js[0]]]["overall"][PRIMARY_METRIC]),
                    textcoords="offset points", xytext=(6, 8 if i % 2 == 0 else -12), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("ms per query (search only, log scale)")
    ax.set_ylabel("metric (fraction)")
    ax.set_ylim(-0.02, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    ax.set_title(title)
    _save(fig, path)


def write_report(result: dict, out_dir, ds=None, n_examples: int = N_EXAMPLES, figures=()) -> None:
    """Write metrics.json, runs.jsonl (top 10 and CoT per query), runs/<system>.trec (depth k,
    scores), qrels.trec, report.md, overall.png, slices.png and quality.png into out_dir.

    Every file is written atomically. `ds` (optional) adds query texts and item titles;
    `figures` (PNG paths, e.g. a trainer's curves.png) are copied in and shown in report.md, named
    after their parent folder ("runs/rl/curves.png" -> "rl-curves.png").
    """
    out = Path(out_dir)
    names = []
    for fig in map(Path, figures):
        if not fig.is_file():
            raise FileNotFoundError(f"{fig}: no such figure")
        names.append(f"{fig.parent.name}-{fig.name}")
        with atomic_write(out / names[-1], "wb", encoding=None) as f:
            f.write(fig.read_bytes())
    write_json(out / "metrics.json", {k: v for k, v in result.items() if k not in ("examples", "runs", "qrels")})
    for name, run in result.get("runs", {}).items():
        with atomic_write(out / "runs" / f"{trec_name(name)}.trec") as f:
            f.writelines(line + "\n" for line in trec_run_lines(name, run))
    if "qrels" in result:
        with atomic_write(out / "qrels.trec") as f:
            f.writelines(line + "\n" for line in trec_qrels_lines(result["qrels"]))
    write_jsonl(out / "runs.jsonl", (
        {"system": name, "query_id": qid,
         **({"query": ds.queries[qid].text} if ds is not None else {}),
         "cot": ex["cot"], "top": ex["top"]}
        for name, per_query in result.get("examples", {}).items() for qid, ex in per_query.items()))
    systems = result["systems"]
    _bar_chart(out / "overall.png", list(CHART_METRICS),
               {n: [s["overall"][m] for m in CHART_METRICS] for n, s in systems.items()},
               f"{result['dataset']}/{result['split']}: overall")
    slice_names = list(next(iter(systems.values()))["slices"]) if systems else []
    first = next(iter(systems.values()), {"slices": {}})
    _bar_chart(out / "slices.png", [f"{sl}\n(n={first['slices'][sl]['n_queries']})" for sl in slice_names],
               {n: [s["slices"][sl][PRIMARY_METRIC] for sl in slice_names] for n, s in systems.items()},
               f"{result['dataset']}/{result['split']}: {PRIMARY_METRIC} per slice")
    _quality_cost_chart(out / "quality.png", systems, f"{result['dataset']}/{result['split']}: quality vs cost")
    with atomic_write(out / "report.md") as f:
        f.write(report_markdown(result, ds, n_examples, tuple(names)))


# ---------------------------------------------------------------- systems from spec strings
