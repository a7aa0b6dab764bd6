"""The teacher comparison report: yield after every step, CoT length, time and samples, per run.

    .venv/bin/python scripts/teacher_report.py runs/teachers/* --out docs/results/2026-11-25-teachers

Reads each `lrem construct` run folder (stats.json, outcomes.jsonl, triplets.jsonl, config.json)
and writes OUT/report.md (tables and 10 sample triplets per run, seeded) and OUT/yield.png.
Runs are compared on the queries they share, so a run still going is scored on what it did.
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
    args = ap.parse_args()
    runs = [r for r in args.runs if (r / "config.json").exists() and (r / "outcomes.jsonl").exists()]
    done = [{r["query_id"] for r in read_jsonl(run / "outcomes.jsonl")} for run in runs]
    shared = set.intersection(*done)
    stats = [summarise(run, shared) for run in runs]
    args.out.mkdir(parents=True, exist_ok=True)

    lines = [f"# Teacher comparison on {len(shared)} WordNet train queries", "",
             "Each run: `lrem construct` with bm25 mining (hitrate@10 < 0.5), the qrels judge and k_gain 50, "
             "on the same seeded sample (`scripts/teachers.sh`); rows count the queries every run has finished.",
             "", "| run | teacher | mined | CoT | empty after post-proc. | empty gain set | judged relevant "
             "(share of mined) | triplets | CoT tokens (mean) | s / mined query |", "|" + "---|" * 10]
    for s in stats:
        share = s["judged_relevant"] / s["mined"] if s["mined"] else 0
        lines.append(f"| {s['run']} | {s['teacher']} | {s['mined']} | {s['cots']} | {s['empty_after_postprocess']} | "
                     f"{s['empty_gain']} | {s['judged_relevant']} ({share:.1%}) | {s['triplets']} | {s['cot_tokens']} | "
                     f"{s['s_per_query']} |")
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
