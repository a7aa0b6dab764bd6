"""The teacher comparison report: yield after every step, CoT length, time and samples, per run.

    .venv/bin/python scripts/teacher_report.py runs/teachers/* --out docs/results/2026-11-25-teachers

Reads each `lrem construct` run folder (stats.json, outcomes.jsonl, triplets.jsonl, config.json)
and writes OUT/report.md (tables and 10 sample triplets per run, seeded) and OUT/yield.png.
Runs are compared on the queries they share, so a run still going is scored on what it did.
With --data, each run also gets bm25's hitrate@10 on its mined queries for "query" against
"query (cot)" (the query alone where the CoT is empty): the gain set of the paper counts only
relevant items outside the query's own top k_gain, so it cannot credit a CoT that lifts an item
the query already ranks 11-50 (what a teacher shown the retriever's candidates does).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

STEPS = [("mined", "mined"), ("cots", "CoT"), ("empty_after_postprocess", "empty after post-proc."),
         ("empty_gain", "empty gain set"), ("judged_relevant", "judged relevant (queries)"), ("triplets", "triplets")]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()] if path.exists() else []


def describe(cfg: dict) -> str:
    t = cfg["teacher"].removeprefix("hf:")
    extra = [f"hint {cfg['hint']}"] if cfg["hint"] != "none" else []
    extra += [f"top-{cfg['candidates']} candidates"] if cfg.get("candidates") else []
    return f"{t}, {cfg.get('teacher_mode', 'two-step')}" + (f" ({', '.join(extra)})" if extra else "")


def summarise(run: Path, shared: set[str]) -> dict:
    cfg = json.loads((run / "config.json").read_text())
    rows = [r for r in read_jsonl(run / "outcomes.jsonl") if r["query_id"] in shared]
    mined = [r for r in rows if r["status"] != "easy"]
    st = {s: sum(r["status"] == s for r in mined) for s in ("teacher_failed", "empty_cot", "empty_gain", "none_relevant", "ok")}
    secs = [r["seconds"] for r in mined if "seconds" in r]
    cots = [r["cot_tokens"] for r in mined if r.get("cot")]
    return {"run": run.name, "teacher": describe(cfg), "done": len(rows), "mined": len(mined),
            "cots": len(mined) - st["teacher_failed"], "empty_after_postprocess": st["empty_cot"],
            "empty_gain": st["empty_gain"], "judged_relevant": st["ok"],
            "triplets": sum(len(r.get("relevant", [])) for r in mined),
            "cot_tokens": round(statistics.fmean(cots), 1) if cots else 0.0,
            "s_per_query": round(statistics.fmean(secs), 2) if secs else 0.0, "rows": mined}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--data", type=Path, help="the runs' dataset folder: adds bm25 hitrate@10 query vs query (cot)")
    args = ap.parse_args()
    runs = [r for r in args.runs if (r / "config.json").exists() and (r / "outcomes.jsonl").exists()]
    done = [{r["query_id"] for r in read_jsonl(run / "outcomes.jsonl")} for run in runs]
    limits = [json.loads((run / "config.json").read_text())["limit"] for run in runs]
    complete = [lim is None or len(d) >= lim for d, lim in zip(done, limits)]  # runs still going are shown apart
    full = [run for run, c in zip(runs, complete) if c]
    partial = [(run, d) for run, d, c in zip(runs, done, complete) if not c]
    shared = set.intersection(*[d for d, c in zip(done, complete) if c])  # samples nest: the smallest
    stats = [summarise(run, shared) for run in full] + [summarise(run, d) | {"partial": True} for run, d in partial]
    runs = full + [run for run, _ in partial]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.data:
        from lrem.baselines import BM25Retriever
        from lrem.construct import cot_query
        from lrem.data import load_dataset

        ds = load_dataset(args.data)
        bm25 = BM25Retriever({i: it.title for i, it in ds.catalog.items()})

        def hr10(texts, qids):
            res = bm25.search(texts, k=10)
            return statistics.fmean(len(ds.relevant(q) & set(r.item_ids[:10])) / len(ds.relevant(q))
                                    for q, r in zip(qids, res))

        for s in stats:
            qids = [r["query_id"] for r in s["rows"]]
            s["hr10_query"] = hr10([r["query"] for r in s["rows"]], qids)
            s["hr10_cot"] = hr10([cot_query(r["query"], r["cot"]) if r.get("cot") else r["query"] for r in s["rows"]],
                                 qids)

    lines = [f"# Teacher comparison on {len(shared)} WordNet train queries", "",
             "Each run: `lrem construct` with bm25 mining (hitrate@10 < 0.5), the qrels judge and k_gain 50, "
             "on the same seeded sample (`scripts/teachers.sh`); rows count the queries every run has finished. "
             "A run marked partial was stopped early: its row counts only the queries it finished.",
             "", "| run | teacher | mined | CoT | empty after post-proc. | empty gain set | judged relevant "
             "(share of mined) | triplets | CoT tokens (mean) | s / mined query | bm25 HR@10 query -> query (cot) |",
             "|" + "---|" * 11]
    for s in stats:
        share = s["judged_relevant"] / s["mined"] if s["mined"] else 0
        name = f"{s['run']} (partial)" if s.get("partial") else s["run"]
        lines.append(f"| {name} | {s['teacher']} | {s['mined']} | {s['cots']} | {s['empty_after_postprocess']} | "
                     f"{s['empty_gain']} | {s['judged_relevant']} ({share:.1%}) | {s['triplets']} | {s['cot_tokens']} | "
                     f"{s['s_per_query']} | " + (f"{s['hr10_query']:.3f} -> {s['hr10_cot']:.3f} |" if "hr10_cot" in s
                                                 else " |"))
    rng = random.Random(0)
    for run, s in zip(runs, stats):
        titles = {(t["query_id"], t["item_id"]): t["item_title"] for t in read_jsonl(run / "triplets.jsonl")}
        ok = [r for r in s["rows"] if r["status"] == "ok"]
        lines += ["", f"## {s['run']}: {s['teacher']}", "", "| query | CoT | relevant item it found |", "|---|---|---|"]
        for r in rng.sample(ok, min(args.samples, len(ok))):
            title = titles.get((r["query_id"], r["relevant"][0]), r["relevant"][0])
            lines.append(f"| {r['query'][:90]} | {r['cot']} | {title} |")
    (args.out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 0.6 * len(stats) + 1.5))
    names = [s["run"] for s in stats][::-1]
    vals = [s["judged_relevant"] / max(s["mined"], 1) for s in stats][::-1]
    bars = ax.barh(names, vals, color="#4c72b0")
    for b, v, s in zip(bars, vals, stats[::-1]):
        ax.text(v + 0.005, b.get_y() + b.get_height() / 2, f"{v:.1%} ({s['triplets']} triplets, {s['s_per_query']} s/q)",
                va="center", fontsize=8)
    ax.set_xlim(0, max(vals + [0.1]) * 1.45)
    ax.set_xlabel(f"share of mined queries whose CoT found a relevant item (n = {stats[0]['mined']} mined)")
    ax.set_title("Teacher yield on the same WordNet train queries")
    fig.tight_layout()
    fig.savefig(args.out / "yield.png", dpi=120)
    print((args.out / "report.md").read_text().split("\n## ")[0])


if __name__ == "__main__":
    main()
