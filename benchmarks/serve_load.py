"""Bounded load test of `lrem serve` on loopback: latency percentiles and throughput per mode.

    python benchmarks/serve_load.py --index /tmp/idx_s --requests 32 --concurrency 8
    python benchmarks/serve_load.py --index runs/idx --queries ../shared/data/wands_queries/query.csv

Starts `lrem serve` as a subprocess on 127.0.0.1 (a free port), then runs phases one after the
other, each with `--concurrency` clients sending `--requests` searches (at most `--max-seconds`
per phase; requests not sent in time are counted as skipped):

    direct, reason, auto   cold cache: each phase has its own, unseen queries
    reason-warm, auto-warm the reason and auto phases' queries again: every embedding is cached

With a reasoning budget (`--router-share`, default 0.3), MIN_SAMPLES untimed auto queries go
first, so the router has margins to take the budget's quantile from.

Queries: the WANDS customer queries (`../shared/data/wands_queries/query.csv`, tab-separated
query_id, query, query_class) when present, else a small built-in list. Prints a table and writes
`benchmarks/results/serve_load.json` (atomically). Server-side figures (mean batch size, share of
auto queries reasoned, cache hit rate) come from /metrics differences around each phase.
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from lrem._io import write_json
from lrem.router import MIN_SAMPLES

ROOT = Path(__file__).resolve().parents[1]
WANDS = ROOT.parent / "shared" / "data" / "wands_queries" / "query.csv"
FALLBACK = ["salon chair", "smart coffee table", "dinosaur", "turquoise pillows", "something to keep a drink cold",
            "a device for pulling corks", "outdoor lounge chair", "bed for a small room", "lamp for reading",
            "rug that hides dog hair", "a cheaper alternative to a velvet sofa", "kitchen storage", "wall art",
            "desk for two monitors", "non-slip bath mat", "curtains that block light"]


def load_queries(path: Path | None) -> tuple[list[str], str]:
    """Distinct query texts from a WANDS query.csv (tab-separated): `path`, else the shared copy
    where present, else the built-in list. A `path` given but missing or without queries is an
    error, not a silent switch to the built-in list (the figures would be for other queries)."""
    if path is None:
        if not WANDS.exists():
            return FALLBACK, "built-in list"
        path = WANDS
    if not path.is_file():
        raise ValueError(f"{path}: no such file (--queries)")
    with path.open(encoding="utf-8", newline="") as f:
        rows = csv.DictReader(f, delimiter="\t")
        texts = list(dict.fromkeys(r["query"].strip() for r in rows if (r.get("query") or "").strip()))
    if not texts:
        raise ValueError(f"{path}: no queries in a tab-separated 'query' column (--queries)")
    return texts, str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: str, port: int, sets: list[str], log_path: Path) -> subprocess.Popen:
    """`lrem serve` in a subprocess; returns once /healthz answers (or raises with its log)."""
    cmd = [sys.executable, "-m", "lrem.cli", "serve", "--index", index, "--port", str(port)]
    for s in sets:
        cmd += ["--set", s]
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"lrem serve exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).raise_for_status()
            return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("lrem serve did not answer /healthz within 300 s")


def scrape(base: str) -> dict[str, float]:
    """The /metrics samples this benchmark reads, keyed by name and labels."""
    keep = ("lrem_batch_size_sum", "lrem_batch_size_count", "lrem_cache_lookups_total", "lrem_queries_total")
    out = {}
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        m = re.match(r"(\w+)(\{[^}]*\})? (\S+)$", line)
        if m and m.group(1) in keep:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def server_side(before: dict, after: dict) -> dict:
    """Mean batch size per kind, share of auto queries reasoned and cache hit rate over a phase."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    out = {}
    for kind in ("direct", "reason"):
        calls = d.get(f'lrem_batch_size_count{{kind="{kind}"}}', 0.0)
        out[f"mean_batch_{kind}"] = d.get(f'lrem_batch_size_sum{{kind="{kind}"}}', 0.0) / calls if calls else None
        out[f"model_calls_{kind}"] = int(calls)
    auto = {used: d.get(f'lrem_queries_total{{mode="auto",mode_used="{used}"}}', 0.0) for used in ("direct", "reason")}
    out["auto_reasoned_share"] = auto["reason"] / sum(auto.values()) if sum(auto.values()) else None
    hits = sum(v for k, v in d.items() if k.startswith("lrem_cache_lookups_total") and 'result="hit"' in k)
    looks = sum(v for k, v in d.items() if k.startswith("lrem_cache_lookups_total"))
    out["cache_hit_rate"] = hits / looks if looks else None
    return out


async def run_phase(base: str, queries: list[str], mode: str, k: int, concurrency: int, max_seconds: float) -> dict:
    """`concurrency` clients share the query list; per-request latency (ms) and errors."""
    latencies, errors, pending = [], [], list(reversed(queries))
    deadline = time.perf_counter() + max_seconds

    async def client(http: httpx.AsyncClient):
        while pending and time.perf_counter() < deadline:
            q = pending.pop()
            t0 = time.perf_counter()
            try:
                r = await http.post("/search", json={"query": q, "k": k, "mode": mode})
                ok = r.status_code == 200
            except httpx.HTTPError as e:
                ok, r = False, e
            if ok:
                latencies.append(1000 * (time.perf_counter() - t0))
            else:
                errors.append(getattr(r, "status_code", type(r).__name__))

    t_start = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, timeout=max_seconds + 60) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    wall = time.perf_counter() - t_start
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {"mode": mode, "sent": len(latencies) + len(errors), "ok": len(latencies), "errors": len(errors),
            "error_codes": sorted({str(e) for e in errors}), "skipped": len(pending), "wall_s": round(wall, 3),
            "throughput_qps": round(len(latencies) / wall, 3) if wall > 0 else 0.0,
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "mean_ms": round(float(lat.mean()), 1)}


def print_table(rows: list[dict]) -> None:
    cols = [("phase", "phase"), ("ok", "ok"), ("errors", "errors"), ("skipped", "skipped"), ("p50 ms", "p50_ms"),
            ("p99 ms", "p99_ms"), ("q/s", "throughput_qps"), ("batch direct", "mean_batch_direct"),
            ("batch reason", "mean_batch_reason"), ("reasoned", "auto_reasoned_share"), ("cache hit", "cache_hit_rate")]
    fmt = lambda v: "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))  # noqa: E731
    table = [[c for c, _ in cols]] + [[fmt(r.get(key)) for _, key in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    for row in table:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))


def main(args) -> dict:
    try:
        queries, source = load_queries(args.queries)
    except ValueError as e:  # bad input: one line, exit 2, before a server starts
        print(f"serve_load.py: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    n, n_warm = args.requests, MIN_SAMPLES if args.router_share > 0 else 0
    if len(queries) < 3 * n + n_warm:
        queries = (queries * ((3 * n + n_warm) // len(queries) + 1))  # short list: reuse, cold phases overlap
    slices = {"direct": queries[:n], "reason": queries[n:2 * n], "auto": queries[2 * n:3 * n],
              "router-warmup": queries[3 * n:3 * n + n_warm]}
    phases = [("direct", "direct", slices["direct"]), ("reason", "reason", slices["reason"]),
              ("auto", "auto", slices["auto"]), ("reason-warm", "reason", slices["reason"]),
              ("auto-warm", "auto", slices["auto"])]
    sets = [f"max_batch={args.max_batch}", f"max_wait_ms={args.max_wait_ms}", f"router_share={args.router_share}",
            f"router_margin={args.router_margin}", f"request_timeout_s={args.max_seconds + 30}"]
    port, out = free_port(), Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    server_log = Path(tempfile.gettempdir()) / f"lrem_serve_load_{port}.log"
    proc = start_server(args.index, port, sets, server_log)
    base = f"http://127.0.0.1:{port}"
    rows, load_start = [], os.getloadavg()
    try:
        health = httpx.get(base + "/info", timeout=10).json()  # /healthz only says "ok"
        print(f"server: {health['items']} items, model {health['model']}, dim {health['dim']}; "
              f"{n} requests x {len(phases)} phases, {args.concurrency} clients; queries: {source}")
        if n_warm:  # the budget needs MIN_SAMPLES margins before it applies: feed it, untimed
            asyncio.run(run_phase(base, slices["router-warmup"], "auto", args.k, args.concurrency, args.max_seconds))
        for name, mode, qs in phases:
            before = scrape(base)
            row = asyncio.run(run_phase(base, qs, mode, args.k, args.concurrency, args.max_seconds))
            rows.append({"phase": name, **row, **server_side(before, scrape(base))})
            print(f"  {name}: {row['ok']} ok, {row['errors']} errors, p50 {row['p50_ms']} ms, "
                  f"{row['throughput_qps']} q/s", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    print_table(rows)
    load_end = os.getloadavg()
    print(f"load average (1 min): {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end; "
          f"cores: {os.cpu_count()}")
    result = {"index": args.index, "queries": source, "requests_per_phase": n, "concurrency": args.concurrency,
              "k": args.k, "server_settings": sets, "model": health["model"], "items": health["items"],
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
              "load_average": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in load_end]},
              "phases": rows}
    write_json(out, result)
    print(f"wrote {out}")
    return result


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--index", required=True, help="Index folder from `lrem index`.")
    p.add_argument("--queries", type=Path, default=None,
                   help="WANDS query.csv (tab-separated; default: the shared copy where present, "
                   "else a built-in list).")
    p.add_argument("--requests", type=int, default=32, help="Requests per phase.")
    p.add_argument("--concurrency", type=int, default=8, help="Concurrent clients.")
    p.add_argument("--max-seconds", type=float, default=120.0, help="Time limit per phase.")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--max-batch", type=int, default=32, help="The server's max_batch (its default).")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--router-share", type=float, default=0.3, help="Reasoning budget of auto mode (0: fixed margin).")
    p.add_argument("--router-margin", type=float, default=0.0,
                   help="Fixed margin (also used until the budget has seen 20 queries; 0: reason none then).")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load.json"))
    return p


if __name__ == "__main__":
    main(make_parser().parse_args())
