"""Score retrievers on a dataset split and write the report.

Metrics are pure functions on ids (no model), so BM25, MiniLM and LREM are scored by the same
code. All metric values are fractions in [0, 1]; times are in milliseconds or seconds as named.

    result = evaluate_systems(ds, "test", {"bm25": BM25Retriever(texts)}, limit=500)
    print(format_table(result))
    write_report(result, "runs/eval", ds)  # metrics.json, runs.jsonl, report.md, *.png
"""
from __future__ import annotations

import math
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
               desc: str = "search") -> tuple[dict[str, list[str]], dict[str, str | None], float]:
    """Search all queries in batches with a progress bar.

    Returns (run: qid -> ranked item ids, cots: qid -> reasoning or None, seconds spent inside
    `retriever.search` only).
    """
    qids = list(queries)
    run, cots, seconds = {}, {}, 0.0
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
                cots[qid] = res.cot
            bar.update(len(batch))
    return run, cots, seconds


def evaluate_systems(ds, split: str, systems: dict[str, Retriever], limit: int | None = None,
                     seed: int = 0, k: int = 100, log=print) -> dict:
    """Run every system over a (sampled) split and score it, overall and per slice.

    Only queries with >= 1 relevant item are sampled (the others cannot be scored).
    Returns the metrics.json object plus an "examples" key holding, per system and query,
    the CoT and top-10 ids (dropped from metrics.json by `write_report`).
    """
    split_queries = ds.split_queries(split)
    judged = [q for q in split_queries if any(r > 0 for r in ds.qrels.get(q, {}).values())]
    qids = sample_query_ids(judged, limit, seed)
    queries = {q: split_queries[q].text for q in qids}
    slices = slices_for({q: split_queries[q] for q in qids})
    log(f"{ds.name}/{split}: {len(qids)} queries scored ({len(judged)} judged of {len(split_queries)}), "
        f"{len(ds.catalog)} items")
    result = {"dataset": ds.name, "split": split, "n_queries": len(qids), "k": k,
              "limit": limit, "seed": seed, "systems": {}, "examples": {}}
    for name, retriever in systems.items():
        run, cots, seconds = run_system(retriever, queries, k=k, desc=name)
        n = max(len(qids), 1)
        result["systems"][name] = {
            "overall": evaluate(run, ds.qrels),
            "slices": evaluate_slices(run, ds.qrels, slices),
            "ms_per_query": 1000.0 * seconds / n,
            "queries_per_s": len(qids) / seconds if seconds > 0 else 0.0,
        }
        if hasattr(retriever, "reasoned_share"):  # LREM systems: the share of queries that generated a CoT
            result["systems"][name]["reasoned_share"] = retriever.reasoned_share
        result["examples"][name] = {q: {"cot": cots[q], "top": run[q][:10]} for q in qids}
        overall = result["systems"][name]["overall"]
        share = result["systems"][name].get("reasoned_share")
        log(f"{name}: {PRIMARY_METRIC}={overall[PRIMARY_METRIC]:.4f} "
            f"ndcg@10={overall['ndcg@10']:.4f} ({1000.0 * seconds / n:.1f} ms/query"
            + (f", {100 * share:.0f}% reasoned)" if share is not None else ")"))
    return result


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


def report_markdown(result: dict, ds=None, n_examples: int = N_EXAMPLES, figures: tuple[str, ...] = ()) -> str:
    """The report.md text: header, overall table, one slice table per primary metric, charts,
    examples, and extra `figures` (file names in the report folder, e.g. training curves)."""
    header, rows = _table_rows(result, REPORT_METRICS)
    lines = [f"# Evaluation: {result['dataset']} / {result['split']}", "",
             f"{result['n_queries']} queries (seed {result.get('seed')}, limit {result.get('limit')}); "
             f"metrics are fractions in [0, 1]; hitrate@K = share of a query's relevant items in "
             f"the top K; ms/query covers search only.", "", "## Overall", "",
             *_md_table(header, rows), "", "![overall](overall.png)", ""]
    for metric in SLICE_METRICS:
        lines += [f"## Slices: {metric}", "", *_slice_table(result, metric), ""]
    lines += ["![slices](slices.png)", ""]
    if figures:
        lines += ["## Figures", "", *(f"![{Path(f).stem}]({f})" for f in figures), ""]
    if ds is not None:
        lines += _examples_md(result, ds, n_examples)
    return "\n".join(lines)


def _bar_chart(path: Path, groups: list[str], series: dict[str, list[float]], title: str) -> None:
    """Grouped bar chart (one bar per series inside each group) saved as PNG, atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width_in = min(max(6.0, 2.0 + 0.3 * len(groups) * max(len(series), 1)), 30.0)
    fig = Figure(figsize=(width_in, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(len(series), 1)
    for j, (name, values) in enumerate(series.items()):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, values, width, label=name)
    rotate = len(groups) > 4
    ax.set_xticks(range(len(groups)), groups, rotation=30 if rotate else 0,
                  ha="right" if rotate else "center")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title)
    if series:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", bbox_inches="tight")


def write_report(result: dict, out_dir, ds=None, n_examples: int = N_EXAMPLES, figures=()) -> None:
    """Write metrics.json, runs.jsonl, report.md, overall.png and slices.png into out_dir.

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
    write_json(out / "metrics.json", {k: v for k, v in result.items() if k != "examples"})
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
    _bar_chart(out / "slices.png", slice_names,
               {n: [s["slices"][sl][PRIMARY_METRIC] for sl in slice_names] for n, s in systems.items()},
               f"{result['dataset']}/{result['split']}: {PRIMARY_METRIC} per slice")
    with atomic_write(out / "report.md") as f:
        f.write(report_markdown(result, ds, n_examples, tuple(names)))


# ---------------------------------------------------------------- systems from spec strings
