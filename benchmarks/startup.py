"""Start-up time of the `lrem` command: each row is a new process, as a user runs it.

    .venv/bin/python benchmarks/startup.py [--baseline /path/to/other/src] [--repeat 3] [--index DIR]

Wall and CPU seconds (user + system of the child: less sensitive to other jobs), medians.
Rows: `lrem --help`, `lrem search --mode direct` and `lrem search` (reason) against a small
index of the built-in model (200 items, built once into a temporary folder unless --index
names one). With --baseline, the same commands also run from another source tree (e.g. the
main branch's `src`), in turns with this tree's, so that load from other processes hits both
alike. Then the search split into phases (imports, model and index load, the query; wall and
CPU seconds, each tree in turns) says where the time goes. Writes benchmarks/results/startup.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import QUERIES, name_arg, table, write

SRC = Path(__file__).resolve().parents[1] / "src"
QUERY = "a device for pulling corks"

PHASES = """
import json, os, sys, time
w, c = [time.perf_counter()], [time.process_time()]
def lap():
    w.append(time.perf_counter()); c.append(time.process_time())
from lrem.search import Searcher
lap()
s = Searcher.load(sys.argv[1], log=lambda *a: None)  # runtime auto: no transformers for an LREM folder (older trees: imports it)
lap()
s.search([sys.argv[2]], k=10)
lap()
print(json.dumps({f"{k}_{u}": x[i + 1] - x[i] for i, k in enumerate(("import", "load", "query"))
                  for u, x in (("s", w), ("cpu_s", c))}))
"""


def env_for(src: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def lrem_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", "from lrem.cli import main; main()", *args]


def timed(cmd: list[str], src: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one run. The CPU time (user + system) of the child varies
    less than the wall time when other jobs share the cores."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, env=env_for(src), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def build_index(out: Path) -> None:
    """200 made-up product titles embedded by the default model (the shipped trained one, what a new
    user's `lrem index` uses; the content does not matter here)."""
    titles = [f"{q} (model {i // len(QUERIES)})" for i, q in enumerate(QUERIES * 7)][:200]
    code = ("import sys; from lrem.model import LREM; from lrem.index import ItemIndex; "
            "titles = sys.argv[2:]; m = LREM.from_pretrained(log=lambda *a: None); "
            "ItemIndex.build(m, {f'i{n}': t for n, t in enumerate(titles)}, show_progress=False).save(sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(out), *titles], env=env_for(SRC), check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path, help="Another source tree to time side by side (its `src` folder).")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--index", type=Path, help="An index folder to search (default: build a small one).")
    name_arg(ap, "startup")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # both trees alike; the machine's cores are shared

    with tempfile.TemporaryDirectory() as tmp:
        index = args.index or Path(tmp) / "idx"
        if not args.index:
            print("building a 200-item index with the built-in model ...", file=sys.stderr)
            build_index(index)
        rows = {"lrem --help": lrem_cmd("--help"),
                "lrem search --mode direct": lrem_cmd("search", "--index", str(index), "--mode", "direct", QUERY),
                "lrem search (reason)": lrem_cmd("search", "--index", str(index), QUERY)}
        trees = {"this": SRC, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
        load_before = os.getloadavg()[0]
        times = {(r, t): [] for r in rows for t in trees}
        for _ in range(args.repeat):
            for r, cmd in rows.items():
                for t, src in trees.items():  # in turns: a busy moment hits both trees
                    times[r, t].append(timed(cmd, src))
        phase_runs = {t: [] for t in trees}
        for _ in range(args.repeat):
            for t, src in trees.items():
                phase_runs[t].append(json.loads(subprocess.run(
                    [sys.executable, "-c", PHASES, str(index), QUERY], env=env_for(src), check=True,
                    capture_output=True, text=True).stdout.splitlines()[-1]))
        phases = {t: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for t, runs in phase_runs.items()}
        load_after = os.getloadavg()[0]

    out = []
    for r in rows:
        row = {"command": r}
        for t in trees:
            row[f"{t}_s"] = statistics.median(w for w, _ in times[r, t])
            row[f"{t}_cpu_s"] = statistics.median(c for _, c in times[r, t])
        if args.baseline:
            row["speedup"] = row["baseline_s"] / row["this_s"]
            row["cpu_speedup"] = row["baseline_cpu_s"] / row["this_cpu_s"]
        out.append(row)
    cols = ["command", *(["baseline_s"] if args.baseline else []), "this_s", *(["speedup"] if args.baseline else []),
            *(["baseline_cpu_s"] if args.baseline else []), "this_cpu_s", *(["cpu_speedup"] if args.baseline else [])]
    print(table(out, cols))
    print("\n`lrem search` (reason) by phase, in one process, medians:")
    print(table([{"tree": t, **p} for t, p in phases.items()], ["tree", *next(iter(phases.values()))]))
    print(f"load average (1 min): {load_before:.2f} before, {load_after:.2f} after; cores: {os.cpu_count()}")
    write(args.name, {"rows": out, "runs_s": {f"{r} | {t}": v for (r, t), v in times.items()}, "phases_s": phases,
                      "repeat": args.repeat, "omp_num_threads": os.environ["OMP_NUM_THREADS"],
                      "baseline": str(args.baseline) if args.baseline else None,
                      "load_average_1m": {"before": load_before, "after": load_after},
                      "goal_s": {"lrem --help": 1.0, "lrem search (reason)": 5.0}})


if __name__ == "__main__":
    main()
