"""Freed memory kept for reuse (`lrem._malloc`, the default) against glibc's own thresholds
(LREM_MALLOC=system): page faults and time of the CPU forwards.

    .venv/bin/python benchmarks/malloc.py [--rounds 3] [--threads 2] [--model lrem-wordnet-135m]

Each variant runs in fresh processes, in turns (system, keep, system, keep, ...), so that load from
other jobs hits both alike: the model loads as `lrem` loads it (`LREM.from_pretrained`, which sets
the thresholds unless LREM_MALLOC=system), every job runs twice to warm up, then once timed, with
the process's minor page faults counted (`getrusage`). Jobs: 192 ESCI product titles at batch 64,
as `lrem index` embeds items; the 96 first WANDS queries at batch 32 in
direct and in reason mode; 12 of them one at a time in reason mode. Prints the median seconds per
variant, their ratio (system / keep: above 1, keeping memory is the faster), the faults and the
process's kernel time (where faulting pages in is counted: steadier than wall time on a shared VM),
the peak memory and the load average; writes benchmarks/results/malloc.json.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from _common import name_arg, setup, table, write
from draft_counts import DATA, shop_queries

JOBS = ("items, batch 64", "direct, batch 32", "reason, batch 32", "reason, batch 1")


def items(n: int = 192) -> list[str]:
    """The titles of the first `n` ESCI products of the shared sample (../shared/data)."""
    with open(DATA / "esci_sample200" / "esci.csv", newline="") as f:
        return [r["product_title"] for r in csv.DictReader(f)][:n]


def worker(model_name: str, threads: int) -> dict:
    """In this process: seconds and page faults of each job (after two warm-up runs), peak memory."""
    from lrem._malloc import keep_freed_memory
    from lrem.model import LREM

    setup(threads)
    model = LREM.from_pretrained(model_name, log=lambda *a: None)
    docs, queries = items(), shop_queries(DATA, 96, 0)["wands"]
    jobs = {
        "items, batch 64": lambda: model.encode_items(docs, batch_size=64),
        "direct, batch 32": lambda: model.encode_queries(queries, mode="direct", batch_size=32),
        "reason, batch 32": lambda: model.encode_queries(queries, mode="reason", batch_size=32),
        "reason, batch 1": lambda: [model.encode_queries([q], mode="reason") for q in queries[:12]],
    }
    out = {"kept": keep_freed_memory(), "seconds": {}, "faults": {}, "kernel_seconds": {}}
    for name, job in jobs.items():
        job(), job()  # warm-up: the heap settles within two runs (and glibc's own thresholds adapt)
        before, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        job()
        out["seconds"][name] = time.perf_counter() - t
        after = resource.getrusage(resource.RUSAGE_SELF)
        out["faults"][name] = after.ru_minflt - before.ru_minflt
        out["kernel_seconds"][name] = after.ru_stime - before.ru_stime  # faulting pages in is kernel time
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    out["load_average_1m"] = round(os.getloadavg()[0], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="processes per variant, in turns")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="lrem-wordnet-135m")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    name_arg(ap, "malloc")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.model, args.threads)))
        return
    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {"system": [], "keep": []}
    for _ in range(args.rounds):
        for variant in runs:
            env = {**os.environ, "LREM_MALLOC": variant}
            cmd = [sys.executable, __file__, "--worker", "--model", args.model, "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode:  # its stderr says why
                sys.exit(f"{out.stderr.rstrip()}\nmalloc.py: the worker (LREM_MALLOC={variant}) failed, "
                         f"exit status {out.returncode}")
            runs[variant].append(json.loads(out.stdout.splitlines()[-1]))
    if not all(r["kept"] for r in runs["keep"]):
        sys.exit("malloc.py: the thresholds were not set (not glibc, or a malloc setting of your own: see lrem._malloc)")
    rows = []
    for job in JOBS:
        med = {v: statistics.median(r["seconds"][job] for r in rs) for v, rs in runs.items()}
        faults = {v: statistics.median(r["faults"][job] for r in rs) for v, rs in runs.items()}
        kernel = {v: statistics.median(r["kernel_seconds"][job] for r in rs) for v, rs in runs.items()}
        rows.append({"job": job, "system s": med["system"], "keep s": med["keep"],
                     "system / keep": med["system"] / med["keep"],
                     "faults system": f"{faults['system']:,.0f}", "faults keep": f"{faults['keep']:,.0f}",
                     "kernel s system": kernel["system"], "kernel s keep": kernel["keep"]})
    loads = [r["load_average_1m"] for rs in runs.values() for r in rs]
    peak = {v: max(r["peak_rss_mb"] for r in rs) for v, rs in runs.items()}
    print(f"{args.model}, {args.threads} threads, {args.rounds} processes a variant in turns; medians; load average "
          f"{load_before:.2f} before, {min(loads):.2f}-{max(loads):.2f} in the workers; peak memory "
          f"{peak['system']} MB (system) / {peak['keep']} MB (keep)")
    print(table(rows, ["job", "system s", "keep s", "system / keep", "faults system", "faults keep", "kernel s system",
                       "kernel s keep"]))
    write(args.name, {"model": args.model, "threads": args.threads, "rounds": args.rounds,
                      "load_average_before": round(load_before, 2), "peak_rss_mb": peak, "rows": rows, "runs": runs})


if __name__ == "__main__":
    main()
