"""Filtered search: latency and recall@10 of lrem's in-index filter against post-filtering.

    .venv/bin/python benchmarks/filter.py [--items 100000] [--queries 200] [--threads 1] [--brute-force-up-to N]

A filter (`where=`, README "Filters") runs inside FAISS through an ID selector, so a selective
filter still returns its k best matching items. The usual alternative, post-filtering, asks the
index for `f x k` hits and keeps the matching ones: cheap, but it returns fewer than k (or the
wrong k) when few items match. This script measures both, per index recipe and per filter
selectivity (the share of the catalog a filter keeps: 50%, 10%, 1%, 0.1%), on clustered random
unit vectors (`benchmarks/index.py`'s) whose facet values are drawn independently of the vectors.

recall@10 is the share of the exact filtered top 10 (brute force over the matching items) that a
method returns; "short" is the share of queries answered with fewer than 10 items (fewer than
the matching items, where fewer than 10 match). Latency is per
query (batch 1, p50), with the filter's selector cached (`ItemIndex` keeps the filters seen
last); "first ms" is one query with a cold cache (the selector built). A filter matching at most
`lrem.index.BRUTE_FORCE_FILTER_UP_TO` items is searched by brute force over their vectors;
`--brute-force-up-to 0` measures FAISS's selector search alone. Writes
benchmarks/results/filter.json (filter-selector-only.json with 0).
"""
from __future__ import annotations

import argparse
import os
import time

import faiss
import numpy as np

import lrem.index
from _common import machine, name_arg, table, write
from index import unit_vectors
from lrem.index import ItemIndex, build_index
from lrem.index_base import ivf_lists

# (factory, search params): the recipes `--factory auto` picks (Flat; IVF-PQ fast-scan re-ranked)
# and HNSW; params as in README "Index recipes"
RECIPES = [("Flat", ""), ("HNSW32,Flat", "efSearch=128"), ("IVF{nlist},PQ64x4fs,RFlat", "nprobe=64,k_factor_rf=16")]
# field -> number of equally likely values: one value of each keeps 50%, 10%, 1%; brand and
# color together keep 0.1%
FIELDS = {"category": 2, "brand": 10, "color": 100}
FILTERS = {"50%": {"category": "v0"}, "10%": {"brand": "v0"}, "1%": {"color": "v0"},
           "0.1%": {"brand": "v0", "color": "v1"}}
POST_FACTORS = (10, 100)  # post-filtering asks for f x k hits


def exact_filtered(x: np.ndarray, xq: np.ndarray, allowed: np.ndarray, k: int) -> np.ndarray:
    """The exact top k positions among `allowed` per query (brute force)."""
    sims = xq @ x[allowed].T  # (n_queries, n_allowed)
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return allowed[top]


def p50_ms(fn, xq: np.ndarray) -> tuple[float, list]:
    out, times = [], []
    for q in xq:
        t0 = time.perf_counter()
        out.append(fn(q[None]))
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times)), out


def bench(n: int, dim: int, n_queries: int, k: int = 10, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    centres = unit_vectors(1000, dim, rng, None)
    x = unit_vectors(n, dim, rng, centres)
    xq = unit_vectors(n_queries, dim, rng, centres)
    ids = [f"i{j}" for j in range(n)]
    facets = {f: [f"v{v}" for v in rng.integers(0, m, n)] for f, m in FIELDS.items()}
    rows = []
    for factory, params in RECIPES:
        factory = factory.format(nlist=ivf_lists(n))
        t0 = time.perf_counter()
        index = ItemIndex(build_index(x, factory, params), ids, ids, {"factory": factory, "search_params": params},
                          facets=facets)
        build = time.perf_counter() - t0
        for share, where in FILTERS.items():
            allowed = index.allowed(where)
            truth = exact_filtered(x, xq, allowed, k)
            index = ItemIndex(index.index, ids, ids, index.meta, facets=facets)  # a cold filter cache
            t0 = time.perf_counter()
            index.search(xq[:1], k, where=where)
            first = 1000 * (time.perf_counter() - t0)
            pos = {i: j for j, i in enumerate(ids)}
            ms, found = p50_ms(lambda q: index.search(q, k, where=where)[1][0], xq)
            row = {"items": n, "index": factory, "filter keeps": share, "matching": len(allowed),
                   "build s": build, "first ms": first, "in-index p50 ms": ms,
                   "in-index recall@10": recall(found, truth, pos, k),
                   "in-index short": short(found, min(k, len(allowed)))}
            keep = np.zeros(n, dtype=bool)
            keep[allowed] = True
            for f in POST_FACTORS:
                def post(q, f=f):
                    _, idx = index.index.search(q, min(f * k, n))
                    return [ids[j] for j in idx[0] if j >= 0 and keep[j]][:k]
                ms_post, found_post = p50_ms(post, xq)
                row.update({f"post x{f} p50 ms": ms_post, f"post x{f} recall@10": recall(found_post, truth, pos, k),
                            f"post x{f} short": short(found_post, min(k, len(allowed)))})
            rows.append(row)
            print(table([row], list(row)).splitlines()[-1], flush=True)
    return rows


def recall(found: list[list[str]], truth: np.ndarray, pos: dict, k: int) -> float:
    return float(np.mean([len({pos[i] for i in got} & set(want[:k].tolist())) / min(k, len(want))
                          for got, want in zip(found, truth)]))


def short(found: list[list[str]], want: int) -> float:
    return float(np.mean([len(got) < want for got in found]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1, help="FAISS OpenMP threads")
    ap.add_argument("--brute-force-up-to", type=int, default=None,
                    help="override lrem.index.BRUTE_FORCE_FILTER_UP_TO (0: FAISS's selector search only)")
    name_arg(ap, None)  # default: filter, or filter-selector-only with --brute-force-up-to 0
    args = ap.parse_args()
    if args.brute_force_up_to is not None:
        lrem.index.BRUTE_FORCE_FILTER_UP_TO = args.brute_force_up_to
    faiss.omp_set_num_threads(args.threads)
    info, t0 = machine(), time.perf_counter()
    rows = bench(args.items, args.dim, args.queries)
    cols = ["index", "filter keeps", "matching", "in-index p50 ms", "in-index recall@10", "in-index short",
            "post x10 p50 ms", "post x10 recall@10", "post x10 short", "post x100 p50 ms", "post x100 recall@10",
            "post x100 short", "first ms"]
    print()
    print(table(rows, cols))
    write(args.name or ("filter" if args.brute_force_up_to != 0 else "filter-selector-only"),
          {"machine": info, "brute_force_up_to": lrem.index.BRUTE_FORCE_FILTER_UP_TO, "items": args.items,
           "dim": args.dim, "queries": args.queries, "faiss": faiss.__version__,
           "omp_threads": faiss.omp_get_max_threads(), "rows": rows, "load_average_end": round(os.getloadavg()[0], 2),
           "wall_seconds": round(time.perf_counter() - t0, 1)})


if __name__ == "__main__":
    main()
