"""Grounded search against direct and reason (issue 22): time per query of a whole search (embed,
FAISS, and for grounded the first-stage direct search too), at batch 1 and 32, on one index.

    .venv/bin/python benchmarks/grounded_latency.py --index runs/g22/index-grounded [--threads 2] [--batches 1 32]

Modes, run in turns on the same queries (`_common.interleaved`):
  direct           embed without a CoT, search
  reason           greedy CoT, embed, search
  grounded-direct  direct search, then embed with its top-K titles in the prompt, search (no CoT)
  grounded         direct search, then reason with the titles, embed, search
The goal (issue 22): grounded at most 3x direct at batch 32 on this CPU. The prompt of a
grounded query is longer by the K titles (about `max_candidate_tokens` tokens at most).
"""
from __future__ import annotations

import argparse
import time

from _common import QUERIES, interleaved, machine, setup, table, write

MODES = ("direct", "reason", "grounded-direct", "grounded")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", required=True, help="an index folder (its model is loaded from meta.json)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--name", default="grounded_latency")
    args = ap.parse_args()
    setup(args.threads)
    from lrem.search import Searcher

    t0 = time.perf_counter()
    searcher = Searcher.load(args.index)
    model = searcher.model
    rows = []
    for b in args.batches:
        qs = (QUERIES * (b // len(QUERIES) + 1))[:b] if b > 1 else QUERIES[:1]
        fns = {m: (lambda m=m: searcher.search(qs, k=10, mode=m, batch_size=b)) for m in MODES}
        t = interleaved(fns, repeat=args.repeat if b > 1 else args.repeat * 3)
        for m in MODES:
            rows.append({"batch": b, "mode": m, "ms/query": 1000 * t[m] / b, "x direct": t[m] / t["direct"]})
    print(table(rows, ["batch", "mode", "ms/query", "x direct"]))
    write(args.name, {"machine": machine(), "index": args.index, "model": model.source,
                      "candidates_k": searcher.candidates_k, "max_candidate_tokens": model.config.max_candidate_tokens,
                      "rows": rows, "wall_seconds": round(time.perf_counter() - t0, 1)})


if __name__ == "__main__":
    main()
