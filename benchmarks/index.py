"""ANN index: build time, memory, search latency and recall@100 against exact search.

    .venv/bin/python benchmarks/index.py [--sizes 100000] [--million] [--data clustered|uniform] [--threads 2]

Items and queries are random unit vectors of the model's dimension (576). `clustered` (default)
draws them around 1,000 random centres, as real embeddings bunch by topic; `uniform` spreads them
evenly, the worst case for any ANN index (every point is almost equally far from a query).
Indexes are built with `lrem.index.build_index` from factory strings, inner product metric.
Latency is per query (batch 1, p50/p99 over the queries); recall@100 is the share of Flat's top
100 that the index returns in its top 100.
"""
from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from _common import machine, name_arg, table, write
from lrem.index import auto_recipe, build_index, set_search_params
from lrem.index_base import ivf_lists

# factory, search parameters: HNSW with M=32 and a wide beam; IVF with ~4 sqrt(n) lists and 64
# 4-bit PQ codes (fast-scan; 8-bit "PQ64" trains 64 k-means of 9-d points, which takes faiss
# minutes per 20k vectors on 2 cores)
INDEXES = [("Flat", ""), ("HNSW32,Flat", "efSearch=128"), ("IVF{nlist},PQ64x4fs", "nprobe=32")]


def unit_vectors(n: int, dim: int, rng: np.random.Generator, centres: np.ndarray | None,
                 chunk: int = 100_000) -> np.ndarray:
    """(n, dim) float32 unit vectors, made `chunk` rows at a time (1M x 576 is 2.3 GB: no full-size
    temporaries)."""
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, chunk):
        x = rng.standard_normal((min(chunk, n - s), dim), dtype=np.float32)
        if centres is not None:  # a centre plus noise of about the same norm
            x = centres[rng.integers(0, len(centres), len(x))] + 0.9 * x / np.sqrt(dim)
        out[s : s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def bench(n: int, dim: int, n_queries: int, data: str, k: int = 100) -> list[dict]:
    rng = np.random.default_rng(0)
    centres = unit_vectors(1000, dim, rng, None) if data == "clustered" else None
    xb = unit_vectors(n, dim, rng, centres)  # (n, dim)
    xq = unit_vectors(n_queries, dim, rng, centres)  # (q, dim)
    rows, truth = [], None
    for factory, params in INDEXES:
        factory = factory.format(nlist=ivf_lists(n))
        t = time.perf_counter()
        index = build_index(xb, factory, params)
        build = time.perf_counter() - t
        index.search(xq[:10], k)  # warm-up
        lat = []
        found = np.zeros((n_queries, k), dtype=np.int64)
        for i in range(n_queries):
            t = time.perf_counter()
            found[i] = index.search(xq[i : i + 1], k)[1][0]
            lat.append(time.perf_counter() - t)
        if truth is None:
            truth = found  # Flat: exact
        recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth)])
        size = faiss.serialize_index(index).nbytes
        rows.append({"items": n, "index": factory, "search params": params, "build s": build,
                     "MB": size / 2**20, "bytes/item": size / n,
                     "p50 ms": 1000 * np.percentile(lat, 50), "p99 ms": 1000 * np.percentile(lat, 99),
                     "recall@100": float(recall)})
        print(table(rows[-1:], list(rows[-1])).splitlines()[-1], flush=True)
        del index
    return rows


# The large-catalog recipes (issue 18): each index built once, then its search parameters swept.
# HNSW's beam (efSearch), IVF's probed lists (nprobe), and 4-bit PQ codes re-ranked by the full
# vectors (`,RFlat`: the k_factor_rf x k best by code distance are scored exactly).
RECIPES = [("HNSW32,Flat", ["efSearch=128", "efSearch=256", "efSearch=512", "efSearch=1024"]),
           ("IVF{nlist},Flat", ["nprobe=32", "nprobe=64", "nprobe=128"]),
           ("IVF{nlist},PQ64x4fs,RFlat", ["nprobe=64,k_factor_rf=8", "nprobe=128,k_factor_rf=16",
                                          "nprobe=256,k_factor_rf=16", "nprobe=256,k_factor_rf=32"])]


def latency(index, xq: np.ndarray, k: int) -> tuple[list[float], np.ndarray]:
    """Per-query seconds (batch 1) and the ids found (q, k)."""
    index.search(xq[:10], k)  # warm-up
    lat, found = [], np.zeros((len(xq), k), dtype=np.int64)
    for i in range(len(xq)):
        t = time.perf_counter()
        found[i] = index.search(xq[i : i + 1], k)[1][0]
        lat.append(time.perf_counter() - t)
    return lat, found


def bench_recipes(n: int, dim: int, n_queries: int, data: str, k: int = 100, flat_queries: int = 100) -> list[dict]:
    """Each recipe of `RECIPES` at n items: build once, then each search parameter's p50/p99 and
    recall@100 against exact search (the truth from one batched Flat search)."""
    import resource

    rng = np.random.default_rng(0)
    centres = unit_vectors(1000, dim, rng, None) if data == "clustered" else None
    xb = unit_vectors(n, dim, rng, centres)
    xq = unit_vectors(n_queries, dim, rng, centres)
    flat = build_index(xb, "Flat")
    truth = flat.search(xq, k)[1]  # batched: exact, and fast as one matrix product
    lat, _ = latency(flat, xq[:flat_queries], k)  # Flat's own latency on fewer queries (~0.2 s each at 1M)
    rows = [{"items": n, "index": "Flat", "search params": "", "build s": 0.0, "MB": flat.ntotal * dim * 4 / 2**20,
             "bytes/item": dim * 4.0, "p50 ms": 1000 * np.percentile(lat, 50), "p99 ms": 1000 * np.percentile(lat, 99),
             "recall@100": 1.0, "peak RSS GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}]
    print(table(rows, list(rows[0])).splitlines()[-1], flush=True)
    del flat
    for factory, sweep in RECIPES:
        factory = factory.format(nlist=ivf_lists(n))
        t = time.perf_counter()
        index = build_index(xb, factory)
        build = time.perf_counter() - t
        size = faiss.serialize_index(index).nbytes
        for params in sweep:
            set_search_params(index, params)
            lat, found = latency(index, xq, k)
            recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth)])
            rows.append({"items": n, "index": factory, "search params": params, "build s": build, "MB": size / 2**20,
                         "bytes/item": size / n, "p50 ms": 1000 * np.percentile(lat, 50),
                         "p99 ms": 1000 * np.percentile(lat, 99), "recall@100": float(recall),
                         "peak RSS GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20})
            print(table(rows[-1:], list(rows[-1])).splitlines()[-1], flush=True)
        del index
    rows += bench_on_disk(xb, xq, truth, k)
    return rows


def bench_on_disk(xb: np.ndarray, xq: np.ndarray, truth: np.ndarray, k: int, factory: str = "IVF{nlist},Flat",
                  sweep: tuple[str, ...] = ("nprobe=32", "nprobe=64", "nprobe=128"), chunk: int = 50_000) -> list[dict]:
    """The IVF recipe with its inverted lists on disk: the vectors written as an `lrem embed` chunk
    folder, indexed by `ItemIndex.from_chunks(on_disk=...)` (one chunk in memory at a time), saved,
    loaded back (lists memory-mapped) and searched. The page cache is warm (just written): the
    latency of a catalog whose lists fit in the page cache, not of one read from disk per query."""
    import resource
    import shutil
    import tempfile
    from pathlib import Path

    from lrem.embed import CHUNKS, FORMAT, chunk_name, write_chunk
    from lrem.index import ItemIndex
    from lrem._io import write_json

    n, dim = xb.shape
    factory = factory.format(nlist=ivf_lists(n))
    tmp = Path(tempfile.mkdtemp(prefix="lrem-bench-ondisk-", dir="."))
    try:
        (tmp / "ch" / CHUNKS).mkdir(parents=True)
        n_chunks = -(-n // chunk)
        for c in range(n_chunks):
            ids = [str(i) for i in range(c * chunk, min(n, (c + 1) * chunk))]
            write_chunk(tmp / "ch" / CHUNKS / chunk_name(c), ids, ids, xb[c * chunk : (c + 1) * chunk])
        write_json(tmp / "ch" / "embed.json", {"format": FORMAT, "dim": dim, "n_items": n, "chunk_size": chunk,
                                                "n_chunks": n_chunks, "vector_dtype": "float32", "complete": True})
        t = time.perf_counter()
        ItemIndex.from_chunks(tmp / "ch", factory, on_disk=tmp, show_progress=False).save(tmp / "idx")
        build = time.perf_counter() - t
        index = ItemIndex.load(tmp / "idx").index
        size = sum(f.stat().st_size for f in (tmp / "idx").iterdir())
        rows = []
        for params in sweep:
            set_search_params(index, params)
            lat, found = latency(index, xq, k)
            recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth)])
            rows.append({"items": n, "index": factory + " (lists on disk)", "search params": params, "build s": build,
                         "MB": size / 2**20, "bytes/item": size / n, "p50 ms": 1000 * np.percentile(lat, 50),
                         "p99 ms": 1000 * np.percentile(lat, 99), "recall@100": float(recall),
                         "peak RSS GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20})
            print(table(rows[-1:], list(rows[-1])).splitlines()[-1], flush=True)
        del index
        return rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    ap.add_argument("--million", action="store_true", help="add 1,000,000 items (HNSW builds for minutes on 2 cores)")
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--data", choices=["clustered", "uniform"], default="clustered")
    ap.add_argument("--threads", type=int, default=None, help="FAISS OpenMP threads (default: all cores)")
    ap.add_argument("--recipes", type=int, metavar="N", help="instead: the large-catalog recipes (RECIPES) at N "
                    "items, each built once and its search parameters swept -> index_recipes.json")
    name_arg(ap, None)  # default: index_recipes with --recipes, else index_DATA
    args = ap.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    info, t0 = machine(), time.perf_counter()
    name = args.name or ("index_recipes" if args.recipes else f"index_{args.data}")
    if args.recipes:
        cols = ["items", "index", "search params", "build s", "MB", "bytes/item", "p50 ms", "p99 ms", "recall@100",
                "peak RSS GB"]
        print(table([], cols))
        rows = bench_recipes(args.recipes, args.dim, args.queries, args.data)
        print()
        print(table(rows, cols))
        write(name, {"machine": info, "dim": args.dim, "queries": args.queries, "data": args.data,
                     "faiss": faiss.__version__, "omp_threads": faiss.omp_get_max_threads(), "rows": rows,
                     "auto": {str(n): auto_recipe(n, args.dim) for n in (10_000, 100_000, 1_000_000, 10_000_000)},
                     "wall_seconds": round(time.perf_counter() - t0, 1)})
        return
    sizes = args.sizes + ([1_000_000] if args.million else [])
    cols = ["items", "index", "search params", "build s", "MB", "bytes/item", "p50 ms", "p99 ms", "recall@100"]
    print(table([], cols))
    rows = [r for n in sizes for r in bench(n, args.dim, args.queries, args.data)]
    print()
    print(table(rows, cols))
    write(name, {"machine": info, "dim": args.dim, "queries": args.queries, "data": args.data,
                 "faiss": faiss.__version__, "omp_threads": faiss.omp_get_max_threads(), "rows": rows,
                 "wall_seconds": round(time.perf_counter() - t0, 1)})


if __name__ == "__main__":
    main()
