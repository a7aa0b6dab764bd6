"""Index build under the current load: 1 vs 2 threads (and OpenMP's passive waiting).

    .venv/bin/python benchmarks/threads.py [--items 256] [--repeat 2] [--batch-size 64] [--dtype auto]

Embeds `--items` synthetic titles with the built-in model and builds a Flat index
(`ItemIndex.build`, as `lrem index` does), in turns with 1 and 2 torch/FAISS threads, so that
load from other processes hits both alike. That runs twice, in fresh processes: with OpenMP's
default wait policy (threads spin a while at the end of each parallel loop) and with
OMP_WAIT_POLICY=PASSIVE (they sleep). Prints the median build time per variant, seconds per
batch and the load average before and after, and writes benchmarks/results/threads.json.
`lrem index` / `lrem eval --threads` default to the cores the load average leaves free.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _common import QUERIES, name_arg, setup, table, write


def titles(n: int) -> dict[str, str]:
    """`n` distinct product-like titles (words of the benchmark queries, numbered)."""
    return {f"i{j}": f"{QUERIES[j % len(QUERIES)]}, model {j}" for j in range(n)}


def worker(items: int, repeat: int, batch_size: int, dtype: str) -> dict:
    """In this process: median seconds of one index build per thread count, interleaved."""
    from lrem._threads import set_threads
    from lrem.index import ItemIndex
    from lrem.model import LREM

    setup(None)
    model = LREM.from_pretrained("smollm2-135m-instruct", dtype=dtype, log=lambda *a: None)
    catalog = titles(items)
    build = lambda: ItemIndex.build(model, catalog, batch_size=batch_size, show_progress=False)  # noqa: E731
    set_threads(2)
    ItemIndex.build(model, titles(8), show_progress=False)  # warm-up: prefix cache, allocator
    times: dict[int, list[float]] = {1: [], 2: []}
    loads = [os.getloadavg()[0]]
    for _ in range(repeat):
        for n in (1, 2):
            set_threads(n)
            t = time.perf_counter()
            build()
            times[n].append(time.perf_counter() - t)
            loads.append(os.getloadavg()[0])
    return {"seconds": {n: statistics.median(v) for n, v in times.items()}, "all_seconds": times,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "load_average_1m": loads}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--dtype", default="auto", help="auto (as `lrem index`), float32 or bfloat16")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    name_arg(ap, "threads")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.items, args.repeat, args.batch_size, args.dtype)))
        return
    load_before = os.getloadavg()[0]
    rows, runs = [], {}
    for policy in ("default", "PASSIVE"):
        env = {**os.environ, "OMP_NUM_THREADS": "2"}  # the pool size; each build then sets 1 or 2
        env.pop("OMP_WAIT_POLICY", None)
        if policy != "default":
            env["OMP_WAIT_POLICY"] = policy
        cmd = [sys.executable, __file__, "--worker", "--items", str(args.items), "--repeat", str(args.repeat),
               "--batch-size", str(args.batch_size), "--dtype", args.dtype]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode:  # its stderr says why; CalledProcessError alone would not
            sys.exit(f"{out.stderr.rstrip()}\nthreads.py: the worker ({policy} OMP wait policy) failed, "
                     f"exit status {out.returncode}")
        runs[policy] = res = json.loads(out.stdout.splitlines()[-1])
        batches = -(-args.items // args.batch_size)
        for n in ("1", "2"):
            s = res["seconds"][n]
            rows.append({"OMP wait policy": policy, "threads": n, "build s": s, "s per batch": s / batches,
                         "items/s": args.items / s, "vs 1 thread": res["seconds"]["1"] / s,
                         "load avg (1 min)": f"{min(res['load_average_1m']):.2f}-{max(res['load_average_1m']):.2f}"})
    load_after = os.getloadavg()[0]
    cols = ["OMP wait policy", "threads", "build s", "s per batch", "items/s", "vs 1 thread", "load avg (1 min)"]
    print(f"{args.items} items, batch {args.batch_size}, {runs['default']['dtype']}, {os.cpu_count()} cores; load average "
          f"{load_before:.2f} before, {load_after:.2f} after (vs 1 thread: >1 means faster than 1 thread)")
    print(table(rows, cols))
    write(args.name, {"items": args.items, "batch_size": args.batch_size, "repeat": args.repeat,
                      "dtype": runs["default"]["dtype"],
                      "load_average_before": round(load_before, 2), "load_average_after": round(load_after, 2),
                      "rows": rows, "runs": runs})


if __name__ == "__main__":
    main()
