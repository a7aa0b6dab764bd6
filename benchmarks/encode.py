"""Item encoding throughput against the machine's FLOP bound, float32 and bfloat16.

    .venv/bin/python benchmarks/encode.py [--n 256] [--n-bf16 32] [--threads 2]

FLOPs are counted as 2 x non-embedding parameters x tokens (attention scores ignored: short
sequences). "computed" counts the tokens the decoder actually ran (each batch's suffixes after
the cached template prefix, padding included); "effective" counts every item's full sequence,
prefix included, as if it had been run: the work the prefix cache saved shows up there. The
bound is the best GFLOP/s of a 2048^3 matmul (`F.linear`) in the same dtype, measured in the same run.
"""
from __future__ import annotations

import argparse
import itertools
import random
import time

import numpy as np
import torch

from _common import interleaved, machine, matmul_gflops, name_arg, setup, table, write

ADJ = ["stainless steel", "wooden", "vintage", "waterproof", "organic cotton", "cordless", "ceramic", "folding"]
NOUN = ["corkscrew", "teapot", "garden hose", "running shoe", "desk lamp", "baby blanket", "chef knife", "backpack"]
EXTRA = ["with brass nozzle", "for kids", "set of 2", "XL", "with lid", "black", "gift box", "travel size"]


def titles(n: int) -> list[str]:
    """n distinct product-like titles, 4 to 8 words, in a fixed shuffled order (no download)."""
    combos = list(itertools.product(ADJ, NOUN, EXTRA, range(n // 512 + 1)))
    random.Random(0).shuffle(combos)
    return [f"{a} {b} {e}" + (f" model {k}" if k else "") for a, b, e, k in combos[:n]]


def token_counts(model, texts: list[str], batch_size: int) -> dict[str, int]:
    """Tokens run by the cached path (as `engine.embed_texts` batches them) and by the plain path."""
    seqs = model.tokenizer(texts, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        n = model.engine.shared_prefix(seqs)[0]
    lens = sorted(len(s) for s in seqs)
    batches = [lens[i : i + batch_size] for i in range(0, len(lens), batch_size)]
    return {"prefix": n, "effective": sum(lens), "computed": sum(len(b) * (max(b) - n) for b in batches),
            "plain": sum(len(b) * max(b) for b in batches)}


def run(dtype: torch.dtype, n: int, batch_size: int, repeat: int, model_name: str) -> dict:
    from lrem.model import LREM

    model = LREM.from_pretrained(model_name, dtype=dtype, log=lambda *a: None)
    dec = model.lm.get_decoder()
    params = sum(p.numel() for p in dec.parameters()) - dec.get_input_embeddings().weight.numel()
    texts = model.item_texts(titles(n))
    tok = token_counts(model, texts, batch_size)
    fast = lambda: model.engine.embed_texts(texts, batch_size, "items", False)  # = encode_items
    plain = lambda: model.engine.embed_texts(texts, batch_size, "items", False, prefix_cache=False)
    model.engine.embed_texts(texts[:8], batch_size, "items", False)  # warm-up on a few items
    model.engine.embed_texts(texts[:8], batch_size, "items", False, prefix_cache=False)
    t = interleaved({"fast": fast, "plain": plain}, repeat=repeat, warmup=False)
    diff = float(np.abs(fast() - plain()).max())
    bound = matmul_gflops(dtype, repeat=5 if dtype == torch.float32 else 2)
    rows = []
    for path, tokens in (("fast", tok["computed"]), ("plain", tok["plain"])):
        gflops = 2 * params * tokens / t[path] / 1e9
        eff = 2 * params * tok["effective"] / t[path] / 1e9
        rows.append({"dtype": str(dtype).removeprefix("torch."), "path": path, "items": n, "seconds": t[path],
                     "items/s": n / t[path], "GFLOP/s computed": gflops, "of bound": gflops / bound,
                     "GFLOP/s effective": eff, "effective of bound": eff / bound, "bound GFLOP/s": bound})
    return {"rows": rows, "tokens": tok, "non_embedding_params": params, "max_abs_diff_fast_vs_plain": diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=256, help="items for float32")
    ap.add_argument("--n-bf16", type=int, default=32, help="items for bfloat16 (slow without native bf16)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    name_arg(ap, "encode")
    args = ap.parse_args()
    setup(args.threads)
    info = machine()
    t0 = time.perf_counter()
    runs = [run(torch.float32, args.n, args.batch_size, args.repeat, args.model),
            run(torch.bfloat16, args.n_bf16, args.batch_size, max(1, args.repeat - 1), args.model)]
    rows = [r for x in runs for r in x["rows"]]
    print(table(rows, ["dtype", "path", "items", "items/s", "GFLOP/s computed", "of bound",
                       "GFLOP/s effective", "effective of bound", "bound GFLOP/s"]))
    for x in runs:
        diff = x["max_abs_diff_fast_vs_plain"]
        print(f"{x['rows'][0]['dtype']}: tokens {x['tokens']}, max |fast - plain| = {diff:.1e}")
    write(args.name, {"machine": info, "model": args.model, "batch_size": args.batch_size, "runs": runs,
                     "wall_seconds": round(time.perf_counter() - t0, 1)})


if __name__ == "__main__":
    main()
