"""What a `lrem construct` run yielded (`lrem.construct`): stats.json from the outcome rows
(`compute_stats`: the funnel after each step, problems, CoT lengths, time), the printed summary
(`format_stats`) and why a run yielded no triplet (`why_empty`)."""
from __future__ import annotations

import statistics
from collections import Counter

from lrem.construct_config import ConstructConfig

STATUSES = ("easy", "teacher_failed", "empty_cot", "empty_gain", "none_relevant", "ok")


def distribution(values: list[int]) -> dict:
    """n, min, mean, median, p90, max and a histogram {value: count} of integers."""
    if not values:
        return {"n": 0}
    s = sorted(values)
    return {"n": len(s), "min": s[0], "mean": round(statistics.fmean(s), 2), "median": statistics.median(s),
            "p90": s[min(len(s) - 1, int(0.9 * len(s)))], "max": s[-1],
            "histogram": {str(v): n for v, n in sorted(Counter(s).items())}}


def compute_stats(queries: dict[str, str], done: dict[str, dict], cfg: ConstructConfig, run: dict) -> dict:
    """The yield after each step, problems, CoT lengths and time, from the outcome rows."""
    rows = [done[q] for q in queries if q in done]
    c = Counter(r["status"] for r in rows)
    mined = len(rows) - c["easy"]
    cots = mined - c["teacher_failed"]
    with_cot = cots - c["empty_cot"]
    dropped: Counter = Counter()
    for r in rows:
        dropped.update(r.get("dropped", {}))
    seconds = [r["seconds"] for r in rows if r["status"] != "easy" and "seconds" in r]
    return {
        "funnel": {"queries_in": len(queries), "done": len(rows), "mined": mined, "cots": cots,
                   "empty_after_postprocess": c["empty_cot"], "with_cot": with_cot, "empty_gain": c["empty_gain"],
                   "with_gain": with_cot - c["empty_gain"], "judged_relevant": c["ok"],
                   "triplets": sum(len(r.get("relevant", [])) for r in rows)},
        "statuses": {s: c[s] for s in STATUSES},
        "gain_items": sum(len(r.get("gain", [])) for r in rows),
        "teacher_problems": dict(sorted(Counter(p for r in rows for p in r.get("problems", [])).items())),
        "postprocess_dropped": dict(dropped),
        "cot_tokens": distribution([r["cot_tokens"] for r in rows if r.get("cot")]),
        "seconds_per_mined_query": round(statistics.fmean(seconds), 3) if seconds else None,
        "this_run": run,
        "config": cfg.to_dict(),
    }


FUNNEL_LABELS = {"queries_in": "queries in", "mined": "mined (difficult)", "cots": "CoTs from the teacher",
                 "empty_after_postprocess": "  empty after post-processing", "with_cot": "non-empty CoTs",
                 "empty_gain": "  empty gain set", "with_gain": "with a gain set",
                 "judged_relevant": "judged relevant (queries)", "triplets": "triplets"}


# how each status reads in `why_empty`, and the funnel count it is a share of
STATUS_WHY = {"easy": ("queries_in", "queries easy for the retriever (not mined)"),
              "teacher_failed": ("mined", "teacher answers failed"),
              "empty_cot": ("cots", "CoTs empty after post-processing"),
              "empty_gain": ("with_cot", "CoTs found no new item (empty gain set)"),
              "none_relevant": ("with_gain", "gain sets without a relevant item")}


def why_empty(stats: dict) -> str | None:
    """One line saying why a run yielded no triplet (None when it yielded some): the statuses
    that stopped its queries, largest first, and the teacher problems.

    >>> why_empty({"funnel": {"queries_in": 12, "done": 12, "mined": 11, "cots": 11, "with_cot": 2,
    ...            "with_gain": 2, "triplets": 0}, "statuses": {"easy": 1, "empty_cot": 9, "none_relevant": 2},
    ...            "teacher_problems": {"extraction:too_long": 2, "reasoning:too_long": 8}})
    '0 triplets: 9 of 11 CoTs empty after post-processing, 2 of 2 gain sets without a relevant item, 1 of 12 queries easy for the retriever (not mined); teacher problems reasoning:too_long 8, extraction:too_long 2'
    """
    f = stats["funnel"]
    if f["triplets"]:
        return None
    if not f["queries_in"]:
        return "0 triplets: no query selected (the split has no query with a relevant item)"
    counts = sorted(((n, s) for s, n in stats["statuses"].items() if n and s in STATUS_WHY), key=lambda x: -x[0])
    parts = [f"{n} of {f[STATUS_WHY[s][0]]} {STATUS_WHY[s][1]}" for n, s in counts]
    if f["done"] < f["queries_in"]:
        parts.append(f"{f['queries_in'] - f['done']} queries not done yet")
    line = "0 triplets: " + ", ".join(parts)
    problems = sorted(stats.get("teacher_problems", {}).items(), key=lambda kv: -kv[1])
    if problems:
        line += "; teacher problems " + ", ".join(f"{k} {v}" for k, v in problems)
    return line


def format_stats(stats: dict) -> str:
    """The printed summary: the funnel, CoT lengths, problems and time (and why, when no triplet)."""
    f, lines = stats["funnel"], []
    if f["done"] < f["queries_in"]:
        lines.append(f"(partial: {f['done']} of {f['queries_in']} queries done)")
    lines += [f"  {label:<32}{f[key]:>7}" for key, label in FUNNEL_LABELS.items()]
    d = stats["cot_tokens"]
    if d["n"]:
        lines.append(f"  CoT tokens: min {d['min']}, median {d['median']}, mean {d['mean']}, p90 {d['p90']}, "
                     f"max {d['max']}")
    if stats["teacher_problems"]:
        lines.append("  problems: " + ", ".join(f"{k} {v}" for k, v in stats["teacher_problems"].items()))
    if stats["seconds_per_mined_query"] is not None:
        lines.append(f"  time: {stats['seconds_per_mined_query']:.2f} s per mined query "
                     f"(this run {stats['this_run']['seconds']:.0f} s, "
                     f"{stats['this_run']['teacher_calls']} teacher calls, "
                     f"{stats['this_run']['teacher_cache_hits']} cached)")
    if why_empty(stats):
        lines.append(why_empty(stats))
    return "\n".join(lines)
