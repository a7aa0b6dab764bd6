"""Forwards and rows per reasoned query on real shop queries: at batch 1, served one at a time in
order as a server sees them (the engine's CoT history and word-draft hit rates build up as they
go), and in batches of 32.

    .venv/bin/python benchmarks/draft_counts.py [--model lrem-wordnet-135m] [--wands 120] [--esci 80] [--threads 2]

`benchmarks/query_latency.py` times 32 hand-written shop questions; this is the check on queries
nobody wrote for it: the first WANDS queries and ESCI queries of ../shared/data (real fixtures).
For each set: reason mode with the engine's defaults, then again with no word drafts in the
prefill (`EngineConfig.word_drafts=0`, a fresh engine), and direct mode. Then in batches of 32
(reason and direct in turns, twice; forwards per batch), with the defaults and with no drafts
in a batch's last rows (`EngineConfig.lookup_tokens=0`), and all the queries in one call of each
mode (its batches length-sorted, as an eval's are). Forwards and rows (tokens
run) come from the compact decoder's calls, so they are the same on any CPU of the same dtype;
the times (direct and reason in turns, query by query; medians, and the ratio of means) are this
machine's.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import statistics
import time
from pathlib import Path

from _common import machine, name_arg, setup, table, write

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shop_queries(data: Path, n_wands: int, n_esci: int) -> dict[str, list[str]]:
    """The first n WANDS queries and the first n distinct ESCI queries of `data` (../shared/data)."""
    with open(data / "wands_queries" / "query.csv", newline="") as f:
        wands = [r["query"] for r in csv.DictReader(f, delimiter="\t")][:n_wands]
    with open(data / "esci_sample200" / "esci.csv", newline="") as f:
        esci = list(dict.fromkeys(r["query"] for r in csv.DictReader(f)))[:n_esci]
    return {"wands": wands, "esci": esci}


@contextlib.contextmanager
def counted_forwards(model, **config):
    """The compact decoder's forwards (tokens a row of each) while the block runs, with the engine's
    `config` fields set to these values meanwhile (None keeps a field)."""
    from lrem.decoding import StaticDecoder

    cfg = model.engine.config
    keep = {k: getattr(cfg, k) for k in config}
    for k, v in config.items():
        if v is not None:
            setattr(cfg, k, v)
    calls: list[int] = []
    run = StaticDecoder.__call__

    def counted(self, ids, *args, **kwargs):
        calls.append(ids.shape[-1])
        return run(self, ids, *args, **kwargs)

    StaticDecoder.__call__ = counted
    try:
        yield calls
    finally:
        StaticDecoder.__call__ = run
        for k, v in keep.items():
            setattr(cfg, k, v)


def served(model, queries: list[str], word_drafts: int | None) -> dict:
    """Each query reasoned alone, in order, on a fresh engine state (`word_drafts`: None keeps the
    config's); direct mode timed in turns with it. Returns per-query means."""
    from lrem.engine import QueryEngine

    model.engine = QueryEngine(model, model.engine.config)
    forwards, rows, reason_s, direct_s = [], [], [], []
    model.encode_queries(queries[:1], mode="direct", batch_size=1)  # warm-up of the direct path
    with counted_forwards(model, word_drafts=word_drafts) as calls:
        for q in queries:
            calls.clear()
            t = time.perf_counter()
            model.encode_queries([q], mode="reason", batch_size=1)
            reason_s.append(time.perf_counter() - t)
            forwards.append(len(calls))
            rows.append(sum(calls))
            t = time.perf_counter()
            model.encode_queries([q], mode="direct", batch_size=1)
            direct_s.append(time.perf_counter() - t)
    return {"forwards": statistics.mean(forwards), "rows": statistics.mean(rows),
            "one_forward": sum(f == 1 for f in forwards), "n": len(queries),
            "reason_ms": 1000 * statistics.median(reason_s), "direct_ms": 1000 * statistics.median(direct_s),
            "reason_over_direct": statistics.median(reason_s) / statistics.median(direct_s),
            "reason_over_direct_of_means": statistics.mean(reason_s) / statistics.mean(direct_s)}


def batched(model, queries: list[str], batch: int, lookup_tokens: int | None, rounds: int = 2,
            one_call: bool = False) -> dict:
    """The queries in batches of `batch` (a whole number of them), reason and direct mode in turns,
    `rounds` times; `lookup_tokens`: None keeps the config's (0: a batch's last rows decode one
    token a forward, no drafts). `one_call`: all the queries in one call of each mode (its batches
    length-sorted), else a call a batch in the given order. Returns forwards per batch and ms per
    query (sums over batches)."""
    qs = queries[: len(queries) // batch * batch]
    forwards, reason_s, direct_s = [], 0.0, 0.0
    model.encode_queries(qs[:batch], mode="reason", batch_size=batch)  # warm-up: the decode step's cache
    calls_of = [qs] if one_call else [qs[i : i + batch] for i in range(0, len(qs), batch)]
    with counted_forwards(model, lookup_tokens=lookup_tokens) as calls:
        for r in range(rounds):
            for part in calls_of:
                calls.clear()
                t = time.perf_counter()
                model.encode_queries(part, mode="reason", batch_size=batch)
                reason_s += time.perf_counter() - t
                if r == 0:
                    forwards.append(len(calls) / (len(part) // batch))
                t = time.perf_counter()
                model.encode_queries(part, mode="direct", batch_size=batch)
                direct_s += time.perf_counter() - t
    n = rounds * len(qs)
    return {"forwards": statistics.mean(forwards), "n": len(qs), "reason_ms": 1000 * reason_s / n,
            "direct_ms": 1000 * direct_s / n, "reason_over_direct": reason_s / direct_s,
            "forwards_per_batch": forwards}


def shop_args(ap: argparse.ArgumentParser, wands: int, esci: int) -> None:
    """The options of a benchmark over the model and the first shop queries (`shop_queries`)."""
    ap.add_argument("--model", default="lrem-wordnet-135m")
    ap.add_argument("--wands", type=int, default=wands, help="first WANDS queries")
    ap.add_argument("--esci", type=int, default=esci, help="first distinct ESCI queries")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--data", type=Path, default=DATA, help="the folder of wands_queries/ and esci_sample200/")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shop_args(ap, wands=120, esci=80)
    name_arg(ap, "draft_counts")
    args = ap.parse_args()
    if not (args.data / "wands_queries").is_dir():
        ap.error(f"{args.data}: no wands_queries/ there; pass --data (the project's shared/data folder)")
    setup(args.threads)
    info = machine()
    from lrem.model import LREM

    model = LREM.from_pretrained(args.model, device="cpu", log=lambda *a: None)
    out = []
    for name, qs in shop_queries(args.data, args.wands, args.esci).items():
        for label, drafts in (("defaults", None), ("no word drafts", 0)):
            out.append({"queries": name, "variant": label, **served(model, qs, drafts)})
            print(f"{name}, {label}: {out[-1]['forwards']:.3f} forwards a query", flush=True)
        variants = (("batch 32", None, False), ("batch 32, no row drafts", 0, False), ("batch 32, one call", None, True))
        for label, k, one in variants if len(qs) >= 32 else ():
            out.append({"queries": name, "variant": label, **batched(model, qs, 32, k, one_call=one)})
            print(f"{name}, {label}: {out[-1]['forwards']:.1f} forwards a batch", flush=True)
    print(table(out, ["queries", "variant", "forwards", "rows", "one_forward", "reason_ms", "direct_ms",
                      "reason_over_direct", "reason_over_direct_of_means"]))
    write(args.name, {"machine": info, "model": args.model, "dtype": str(model.lm.dtype), "rows": out})


if __name__ == "__main__":
    main()
