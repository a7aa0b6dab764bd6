"""What `lrem eval` prints and writes (`lrem.evaluate`): the terminal table, example queries
picked over the slices, report.md, and `write_report` (metrics.json, runs.jsonl, TREC files,
report.md and its charts)."""
from __future__ import annotations

import json
from pathlib import Path

from lrem._io import OutputError, atomic_write, claim_dir, is_lrem_output, is_unstarted, write_json, write_jsonl
from lrem.evaluate_charts import bar_chart, quality_cost_chart
from lrem.evaluate_metrics import PRIMARY_METRIC, RANDOMIZATION_ROUNDS, query_metrics, trec_qrels_lines, trec_run_lines
from lrem.runfile import trec_files

SLICE_METRICS = ("hitrate@10", "ndcg@10")
REPORT_METRICS = ("hitrate@1", "hitrate@10", "hitrate@100", "precision@1", "precision@10",
                  "precision@100", "ndcg@10", "mrr@10")
CHART_METRICS = ("hitrate@10", "hitrate@100", "ndcg@10", "mrr@10")
N_EXAMPLES = 5  # queries shown with their CoT and top items in report.md (when ds is given)
METRICS_JSON = "metrics.json"  # written first: a folder holding it is an `lrem eval` report


def is_eval_output(out) -> bool:
    """Whether `lrem eval --overwrite` may write into `out`: missing or empty (but for lrem's
    marker), or an earlier report (its metrics.json), not another command's output (a model, an index)."""
    out = Path(out)
    return is_unstarted(out) or (out / METRICS_JSON).is_file()


def _earlier_figures(out: Path) -> set[str]:
    """The figures an earlier report in `out` copied in (its metrics.json lists them); only plain
    file names, so a hand-edited list cannot reach outside the folder."""
    try:
        listed = json.loads((out / METRICS_JSON).read_text()).get("figures", [])
    except (OSError, ValueError, AttributeError):
        return set()
    return {n for n in listed if isinstance(n, str) and n == Path(n).name and n.endswith(".png")} if isinstance(listed, list) else set()


def check_figures(figures) -> None:
    """Every --figure is an existing file (checked before any system runs)."""
    for fig in map(Path, figures):
        if not fig.is_file():
            raise FileNotFoundError(f"{fig}: no such figure")


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


def _title(ds, item_id: str) -> str:
    """An item's title, or its id where the catalog lacks it (a run file of another system can name such items)."""
    return ds.catalog[item_id].title if item_id in ds.catalog else item_id


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
            top = ", ".join(("+" if i in rel else "") + _title(ds, i).split(",")[0] for i in ex[q]["top"][:3])
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
                             _short(_title(ds, i))
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
            "judgements: `qrels.trec` (grades written as gains 2^rel - 1, so that trec_eval's nDCG is ndcg@10 here).", ""]


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


def write_report(result: dict, out_dir, ds=None, n_examples: int = N_EXAMPLES, figures=()) -> None:
    """Write metrics.json, runs.jsonl (top 10 and CoT per query), runs/<system>.trec (depth k,
    scores), qrels.trec, report.md, overall.png, slices.png and quality.png into out_dir.

    `out_dir` is new, empty, or an earlier report (else an `OutputError`). Every file is written
    atomically. `ds` (optional) adds query texts and item titles;
    `figures` (PNG paths, e.g. a trainer's curves.png) are copied in and shown in report.md, named
    after their parent folder ("runs/rl/curves.png" -> "rl-curves.png").
    """
    out = Path(out_dir)
    check_figures(figures)
    if is_lrem_output(out) and not is_eval_output(out):  # another command's output (a model, an index)
        raise OutputError(f"{out}: an lrem output, but not a `lrem eval` report; use a new folder (an earlier "
                          "report is refreshed in place)")
    files = trec_files(result.get("runs", {}))  # before any write: no system's file replaces another's
    names = [f"{fig.parent.name}-{fig.name}" for fig in map(Path, figures)]
    # a folder lrem did not write is refused; what this report writes is recorded before it is
    # written, so that an --overwrite refuses the folder once it also holds a user's files
    claim_dir(out, files=[METRICS_JSON, *names, *(["runs"] if files else []),
                          *(["qrels.trec"] if "qrels" in result else []),
                          "runs.jsonl", "overall.png", "slices.png", "quality.png", "report.md"])
    earlier = _earlier_figures(out)
    # metrics.json first: an interrupted report is still recognised as one (`is_eval_output`); it
    # lists the copied figures, so that a later --overwrite removes those this report lacks
    write_json(out / METRICS_JSON, {**{k: v for k, v in result.items() if k not in ("examples", "runs", "qrels")},
                                    "figures": names})
    for name in earlier - set(names):
        (out / name).unlink(missing_ok=True)
    for fig, name in zip(map(Path, figures), names):
        with atomic_write(out / name, "wb", encoding=None) as f:
            f.write(fig.read_bytes())
    for stale in (out / "runs").glob("*.trec"):  # an earlier report's systems (--overwrite): not this report's
        if stale.name not in files.values():
            stale.unlink()
    for name, run in result.get("runs", {}).items():
        with atomic_write(out / "runs" / files[name]) as f:
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
    bar_chart(out / "overall.png", list(CHART_METRICS),
               {n: [s["overall"][m] for m in CHART_METRICS] for n, s in systems.items()},
               f"{result['dataset']}/{result['split']}: overall")
    slice_names = list(next(iter(systems.values()))["slices"]) if systems else []
    first = next(iter(systems.values()), {"slices": {}})
    bar_chart(out / "slices.png", [f"{sl}\n(n={first['slices'][sl]['n_queries']})" for sl in slice_names],
               {n: [s["slices"][sl][PRIMARY_METRIC] for sl in slice_names] for n, s in systems.items()},
               f"{result['dataset']}/{result['split']}: {PRIMARY_METRIC} per slice")
    quality_cost_chart(out / "quality.png", systems, f"{result['dataset']}/{result['split']}: quality vs cost")
    with atomic_write(out / "report.md") as f:
        f.write(report_markdown(result, ds, n_examples, tuple(names)))

