"""Forwards per reasoned query, one query at a time, on the path a GPU takes (transformers' decoder
over a static cache, several-token forwards padded to the widths a CUDA graph is captured for),
run here on the CPU: drafting (the likeliest word draft in the prefill's forward, then chains:
`lrem.decoding.prefill_chain`, `chain_decode`) against one token a forward.

    .venv/bin/python benchmarks/gpu_path_counts.py [--model lrem-wordnet-135m] [--wands 60] [--esci 40] [--threads 2]

At batch 1 a GPU forward of a 3B model costs about the same for 1 token or 8 (it reads all the
weights, and launches the same kernels), so forwards are what a query's latency there is made of;
they are the same on any machine. The model runs in float32, where the two ways give the same
CoTs (checked, with the embeddings' largest difference). The queries: `query_latency.py`'s 32
shop questions, and the first WANDS and ESCI queries of ../shared/data, served in order (each
drafts from the CoTs before it, as a server's would).
"""
from __future__ import annotations

import argparse
import statistics

import numpy as np

from _common import name_arg, setup, table, write
from draft_counts import shop_args, shop_queries


def counted(model, queries: list[str], lookup_tokens: int) -> dict:
    """Each query reasoned alone, in order, from a fresh engine (no CoT history, no word-draft hit
    rates): the decoder's forwards over the step's static cache, CoTs and embeddings, and the
    forwards that ran over a copy of the cache (a slow path the GPU's would not capture: none
    expected)."""
    from transformers import DynamicCache

    from lrem.engine import QueryEngine

    model.engine = QueryEngine(model, model.engine.config)
    cfg, calls, copies = model.engine.config, [], []
    keep, cfg.lookup_tokens = cfg.lookup_tokens, lookup_tokens

    def hook(module, args, kwargs, out):
        calls.append(1)
        copies.extend([1] if isinstance(kwargs.get("past_key_values"), DynamicCache) else [])

    handle = model.lm.get_decoder().register_forward_hook(hook, with_kwargs=True)
    forwards, cots, embs = [], [], []
    try:
        for q in queries:
            calls.clear()
            enc = model.encode_queries([q], mode="reason", batch_size=1)
            forwards.append(len(calls))
            cots.append(enc.cots[0])
            embs.append(enc.embeddings[0])
    finally:
        handle.remove()
        cfg.lookup_tokens = keep
    return {"forwards": forwards, "cots": cots, "embeddings": np.array(embs), "cache_copies": len(copies)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shop_args(ap, wands=60, esci=40)
    name_arg(ap, "gpu_path_counts")
    args = ap.parse_args()
    setup(args.threads)
    from query_latency import QUERIES

    from lrem.engine import GRAPH_WIDTHS
    from lrem.model import LREM

    model = LREM.from_pretrained(args.model, device="cpu", log=lambda *a: None)
    model.lm.float()  # one dtype for both ways: bfloat16's near-ties would part them
    cfg = model.engine.config
    cfg.compact_decoder, cfg.graph_widths = False, GRAPH_WIDTHS  # the GPU's path, run eagerly
    sets = {"questions": QUERIES}
    if (args.data / "wands_queries").is_dir():  # else the questions only
        sets.update(shop_queries(args.data, args.wands, args.esci))
    rows = []
    for name, queries in sets.items():
        one, chains = counted(model, queries, 0), counted(model, queries, cfg.lookup_tokens)
        rows.append({"queries": name, "n": len(queries),
                     "one a forward": statistics.mean(one["forwards"]),
                     "chains": statistics.mean(chains["forwards"]),
                     "ratio": statistics.mean(one["forwards"]) / statistics.mean(chains["forwards"]),
                     "same CoTs": one["cots"] == chains["cots"],
                     "max |emb diff|": float(np.abs(one["embeddings"] - chains["embeddings"]).max()),
                     "cache copies": one["cache_copies"] + chains["cache_copies"],
                     "forwards (chains)": chains["forwards"]})
    print(table(rows, ["queries", "n", "one a forward", "chains", "ratio", "same CoTs", "max |emb diff|", "cache copies"]))
    write(args.name, {"model": args.model, "dtype": "float32", "widths": list(GRAPH_WIDTHS),
                      "lookup_tokens": cfg.lookup_tokens, "rows": rows})


if __name__ == "__main__":
    main()
