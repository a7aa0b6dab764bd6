"""Query latency (batch 1) and throughput (batch 32, and 256 on a GPU), direct vs reason mode,
fast vs plain reasoning.

    .venv/bin/python benchmarks/query_latency.py [--threads 2] [--batches 1 32] [--no-gpu] [--model DIR]

On the CPU: the default model (SmolLM2-135M). Where a GPU is present, also a model with
Qwen2.5-3B's shape (`--shape`; random weights, SmolLM2's tokenizer unless `--tokenizer`; the
paper's backbone size) in bfloat16, at batch 1, 32 and 256 (`benchmarks/gpu.sh` runs it on a
GPU machine). Variants:
  direct          encode_queries(mode="direct")
  reason          encode_queries(mode="reason"): fast greedy CoT, then the embedding
  reason (plain)  lm.generate CoT, then the embedding with no prefix cache (nothing cached)
  generate        generate_cots() (fast path; vLLM on a GPU if installed)
  generate (prompt drafts)  the same with drafts from the query's own prompt only (batch 1 on
                  the CPU only; "generate" also drafts from the CoTs of the queries not timed)
  generate (no lookup)  the same with no drafted tokens (batch 1)
  reason (no lookup)  reason mode so (batch 1 on a GPU: one query drafts in chains there,
                  `chain_decode`; random weights' CoTs rarely follow a draft)
  generate (plain) generate_cots(fast=False): lm.generate on the left-padded prompts
The paper reports reason/direct = 50 ms / 15 ms = 3.3x online (Qwen2.5-3B, its serving stack).
At batch 1 each forward reads every weight once, so decoding one token per forward cannot beat
tokens generated x weight bytes / read bandwidth (the "floor", measured in the same run);
drafted tokens, several checked per forward, can. At batch 1 on the CPU it also counts the forwards
and rows (tokens run) per query of direct and reason (`batch1_counts`): what the times are made of,
the same on any machine, where the ratio of a forward's cost to a row's is not.
"""
from __future__ import annotations

import argparse
import collections
import functools
import os
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from _common import QUERIES, SHAPES, interleaved, machine, read_gbps, seconds, setup, shaped_model, table, write

PAPER_REASON_OVER_DIRECT = 50 / 15


def variants(model, qs: list[str]) -> dict:
    b = len(qs)

    def reason_plain():
        cots = model.generate_cots(qs, batch_size=b, fast=False)
        return model.engine.embed_texts(model.query_texts(qs, cots), b, "q", False, prefix_cache=False)

    def no_lookup():
        return configured(model, lambda: model.generate_cots(qs, batch_size=b), lookup_tokens=0)

    def prompt_drafts():
        keep, model.engine.history = model.engine.history, collections.deque(maxlen=0)
        try:
            return model.generate_cots(qs, batch_size=b)
        finally:
            model.engine.history = keep

    out = {
        "direct": lambda: model.encode_queries(qs, mode="direct", batch_size=b),
        "reason": lambda: model.encode_queries(qs, mode="reason", batch_size=b),
        "reason (plain)": reason_plain,
        "generate": lambda: model.generate_cots(qs, batch_size=b),
        "generate (prompt drafts)": prompt_drafts,
        "generate (no lookup)": no_lookup,
        "generate (plain)": lambda: model.generate_cots(qs, batch_size=b, fast=False),
    }
    if b > 1:  # drafts serve one query (on a GPU's path: `chain_decode`, from the prompt and recent CoTs)
        del out["generate (prompt drafts)"], out["generate (no lookup)"]
    elif model.device.type != "cpu":
        del out["generate (prompt drafts)"]
        out["reason (no lookup)"] = functools.partial(configured, model, out["reason"], lookup_tokens=0)
    # a compiled decode step compiles again for each variant's attention and widths: time it alone
    if model.device.type == "cuda" and not model.engine.config.compile_decode:
        # before the several-token forwards had graphs: the decode step's only
        for k in ("direct", "reason"):
            out[f"{k} (decode graph only)"] = functools.partial(configured, model, out[k], graph_widths=())
        for k in ("reason", "generate"):  # before the grouped heads were folded: keys and values repeated
            out[f"{k} (kv repeated)"] = functools.partial(configured, model, out[k], fold_heads=False)
        if b == 1:  # one query drafts in chains, which read every forward's picks: the lag serves `decode`
            out["reason (no lookup, sync each step)"] = functools.partial(configured, model, out["reason"],
                                                                          lookup_tokens=0, decode_lag=0)
        else:  # before the stop check lagged: the host waits for each step
            for k in ("reason", "generate"):
                out[f"{k} (sync each step)"] = functools.partial(configured, model, out[k], decode_lag=0)
    return out


def configured(model, fn, **fields):
    """fn() with these fields of the engine's config (`EngineConfig`) set meanwhile: a variant that
    turns one speed-up off (graph_widths=(): no several-token forward captured; fold_heads=False:
    transformers' SDPA, keys and values repeated per head; decode_lag=0: each step's stop check
    read at once; lookup_tokens=0: one token a forward)."""
    cfg = model.engine.config
    keep = {k: getattr(cfg, k) for k in fields}
    for k, v in fields.items():
        setattr(cfg, k, v)
    try:
        return fn()
    finally:
        for k, v in keep.items():
            setattr(cfg, k, v)


def bench(model, batches: list[int], repeat: int, n_single: int, progress=None) -> dict:
    """Seconds per batch for each variant and batch size, plus the equality checks; `progress`
    gets the rows and checks so far after each batch size (a run cut short keeps them)."""
    rows, checks = [], {}
    for b in batches:
        if b == 1:  # latency: each query alone, variants in turns, median (and mean) over queries
            # drafts may come from recent CoTs (`engine.history`): those of the other queries (as a
            # server has seen), set before each call so no timed query drafts from its own
            model.engine.history = collections.deque(maxlen=max(len(QUERIES), model.engine.config.history))
            for q in QUERIES:  # one at a time: a batch runs length-sorted and adds its CoTs to the history in
                model.generate_cots([q])  # that order (from 8618324 until this check, timed queries drafted from their own)
            seen = list(model.engine.history)  # one entry per query, in QUERIES' order (none where vLLM generates)
            ctx, prompts = model.engine.HISTORY_CONTEXT, model.tokenizer(model.query_prompts(QUERIES),
                                                                         add_special_tokens=False)["input_ids"]
            assert not seen or [h[:ctx] for h in seen] == [p[-ctx:] for p in prompts], "history out of QUERIES' order"
            per: dict[str, list[float]] = {}
            for i, q in enumerate(QUERIES[:n_single]):
                fns = variants(model, [q])
                for k, fn in fns.items():
                    if k not in per:
                        fn()  # warm-up, each variant before its first timing
                    others_history(model, seen, i)
                    per.setdefault(k, []).append(seconds(fn))
            t = {k: statistics.median(v) for k, v in per.items()}
            means = {k: statistics.mean(v) for k, v in per.items()}
            counts = batch1_counts(model, QUERIES[:n_single], seen)
        else:
            qs = (QUERIES * (b // len(QUERIES) + 1))[:b]
            # on a GPU the first call of a batch size captures its CUDA graph: keep it out of the timing
            t = interleaved(variants(model, qs), repeat=repeat, warmup=model.device.type == "cuda")
            means, counts = {}, {}
        for k, s in t.items():
            rows.append({"batch": b, "variant": k, "ms/query": 1000 * s / b, "queries/s": b / s, "seconds": s,
                         **({"mean ms/query": 1000 * means[k]} if k in means else {})})
        qs = (QUERIES * (b // len(QUERIES) + 1))[:b]
        fast, plain = model.generate_cots(qs, batch_size=b), model.generate_cots(qs, batch_size=b, fast=False)
        enc = model.encode_queries(qs, mode="reason", batch_size=b)
        ref = model.engine.embed_texts(model.query_texts(qs, plain), b, "q", False, prefix_cache=False)
        checks[b] = {"same_cots": fast == plain, "cots_differing": sum(a != c for a, c in zip(fast, plain)),
                     "max_abs_embedding_diff": float(np.abs(enc.embeddings - ref).max()),
                     "generate_speedup": t["generate (plain)"] / t["generate"],
                     **({"generate_speedup_no_lookup": t["generate (plain)"] / t["generate (no lookup)"]}
                        if "generate (no lookup)" in t else {}),
                     **({"generate_speedup_prompt_drafts": t["generate (plain)"] / t["generate (prompt drafts)"]}
                        if "generate (prompt drafts)" in t else {}),
                     **({"reason_speedup_drafts": t["reason (no lookup)"] / t["reason"]} if "reason (no lookup)" in t else {}),
                     "reason_speedup": t["reason (plain)"] / t["reason"],
                     **({f"{k}_speedup_wide_graphs": t[f"{k} (decode graph only)"] / t[k] for k in ("direct", "reason")}
                        if "reason (decode graph only)" in t else {}),
                     **({f"{k}_speedup_folded_heads": t[f"{k} (kv repeated)"] / t[k] for k in ("generate", "reason")}
                        if "reason (kv repeated)" in t else {}),
                     **({f"{k}_speedup_lagged_stop_check": t[f"{k} (sync each step)"] / t[k] for k in ("generate", "reason")}
                        if "reason (sync each step)" in t else {}),
                     **({"reason_no_lookup_speedup_lagged_stop_check":
                         t["reason (no lookup, sync each step)"] / t["reason (no lookup)"]}
                        if "reason (no lookup, sync each step)" in t else {}),
                     "reason_over_direct": t["reason"] / t["direct"],
                     **({"reason_over_direct_mean": means["reason"] / means["direct"]} if means else {}),
                     **counts,
                     "paper_reason_over_direct": round(PAPER_REASON_OVER_DIRECT, 2)}
        if progress:
            progress({"rows": rows, "checks": checks})
    return {"rows": rows, "checks": checks, **batch1_floor(model, rows, QUERIES[:n_single])}


def others_history(model, seen: list, i: int) -> None:
    """Set the engine's draft history to the CoTs of every query but the i-th (`seen`: one per
    query of QUERIES; none where vLLM generated them), as a server that has seen the others."""
    model.engine.history.clear()
    model.engine.history.extend(seen[:i] + seen[i + 1 :] if len(seen) == len(QUERIES) else [])


def batch1_counts(model, queries: list[str], seen: list) -> dict:
    """Forwards and rows (tokens run) per query at batch 1, direct and reason, counted on the
    compact decoder's calls (CPU) with the timing's draft history: what the timings are made of,
    and, unlike them, the same on any machine. {} where the compact decoder does not run."""
    from lrem.decoding import StaticDecoder

    calls: list[int] = []
    run = StaticDecoder.__call__

    def counted(self, ids, *args, **kwargs):
        calls.append(ids.shape[-1])
        return run(self, ids, *args, **kwargs)

    out: dict[str, list[tuple[int, int]]] = {"direct": [], "reason": []}
    StaticDecoder.__call__ = counted
    try:
        for i, q in enumerate(queries):
            for mode in out:
                others_history(model, seen, i)
                calls.clear()
                model.encode_queries([q], mode=mode, batch_size=1)
                out[mode].append((len(calls), sum(calls)))
    finally:
        StaticDecoder.__call__ = run
    if not all(f for rows in out.values() for f, _ in rows):
        return {}
    return {f"{mode}_{what}_per_query": statistics.mean(r[j] for r in rows)
            for mode, rows in out.items() for j, what in enumerate(("forwards", "rows"))}


def batch1_floor(model, rows: list[dict], queries: list[str]) -> dict:
    """Batch-1 generation against memory bandwidth: one token per forward, each forward (the
    prompt's, then one per generated token up to the stop token or cot_max_tokens, counted on
    the timed queries) reads all decoder and LM-head weights at least once. Drafted tokens
    (`EngineConfig.lookup_tokens`) check several tokens per forward, so the fast path may beat it;
    "generate (no lookup)" may not."""
    dev = model.device.type
    weights = sum(p.numel() * p.element_size() for p in model.lm.parameters())  # tied head counted once
    embed = model.lm.get_input_embeddings().weight
    if model.lm.get_output_embeddings().weight is not embed:  # untied: the input table is only gathered
        weights -= embed.numel() * embed.element_size()
    gbps = read_gbps(device=dev)
    stop, pad = set(model.stop_ids), model.tokenizer.pad_token_id
    with torch.inference_mode():
        gen = [model.engine.greedy(model.tokenizer(model.query_prompts([q]), add_special_tokens=False)["input_ids"],
                                   model.config.cot_max_tokens, model.stop_ids)[0] for q in queries]
    tokens = statistics.mean(next((i + 1 for i, t in enumerate(g) if t in stop or t == pad), len(g)) for g in gen)
    floor = tokens * weights / (gbps * 1e9)
    one = {r["variant"]: r["seconds"] for r in rows if r["batch"] == 1}
    return {"weights_read_per_step_MB": weights / 1e6, "read_GBps": gbps, "batch1_tokens_per_query": tokens,
            "batch1_generate_floor_ms": 1000 * floor,
            "batch1_generate_of_floor": floor / one["generate"] if "generate" in one else None,
            "batch1_no_lookup_of_floor": floor / one["generate (no lookup)"] if "generate (no lookup)" in one else None}


def gpu_profile(model, queries: list[str], mode: str = "reason") -> dict:
    """Where one call's time goes (torch.profiler, after the timings, so the graphs exist): the
    kernels launched, their total GPU time and the costliest, the host ops with the most time of
    their own, and the wall time. Wall time well above kernel time is the GPU waiting on the host.
    A decode step replayed from a graph is still one kernel per small op (norms, rotary, adds):
    their count against the bandwidth floor says whether fusing them (torch.compile) would pay."""
    from torch.profiler import ProfilerActivity, profile

    def call():
        if mode == "generate":
            return model.generate_cots(queries, batch_size=len(queries))
        return model.encode_queries(queries, mode=mode, batch_size=len(queries))

    call()  # warm: the graphs of this size are captured
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        call()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name = collections.Counter()
    for e in kernels:
        by_name[e.name[:80]] += e.device_time_total / 1000  # ms
    host = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    return {"queries": len(queries), "mode": mode, "wall_ms": 1000 * wall, "kernels": len(kernels),
            "kernel_ms": sum(by_name.values()), "top_kernels_ms": dict(by_name.most_common(8)),
            "top_host_ops_self_ms": {e.key[:80]: e.self_cpu_time_total / 1000 for e in host}}


# the report's comparison lines: (what a speed-up is over, its checks' key suffix, the kinds it has)
COMPARISONS = [
    ("graphs for several-token forwards too, over the decode step's only", "speedup_wide_graphs", ("direct", "reason")),
    ("grouped heads folded, over keys and values repeated", "speedup_folded_heads", ("generate", "reason")),
    ("drafts, over one token a forward", "speedup_drafts", ("reason",)),
    ("stop check a step late, over each step synced", "speedup_lagged_stop_check", ("reason_no_lookup",)),
    ("stop check a step late, over each step synced", "speedup_lagged_stop_check", ("generate", "reason")),
]


def report(name: str, out: dict) -> None:
    print(f"\n## {name}")
    print(table(out["rows"], ["batch", "variant", "ms/query", "mean ms/query", "queries/s"]))
    if out.get("batch1_generate_of_floor"):
        print(f"batch 1 generate floor: {out['batch1_tokens_per_query']:.1f} tokens x "
              f"{out['weights_read_per_step_MB']:.0f} MB at {out['read_GBps']:.1f} "
              f"GB/s -> {out['batch1_generate_floor_ms']:.0f} ms; measured runs at "
              f"{out['batch1_generate_of_floor']:.0%} of that speed"
              + (f" ({out['batch1_no_lookup_of_floor']:.0%} without drafts)" if out.get("batch1_no_lookup_of_floor") else ""))
    for b, c in out["checks"].items():
        nl = ((f" ({c['generate_speedup_prompt_drafts']:.2f}x with prompt drafts only, "
               if "generate_speedup_prompt_drafts" in c else " (")
              + f"{c['generate_speedup_no_lookup']:.2f}x without drafts)" if "generate_speedup_no_lookup" in c else "")
        print(f"batch {b}: generate fast/plain speedup {c['generate_speedup']:.2f}x{nl}, reason speedup "
              f"{c['reason_speedup']:.2f}x, reason/direct {c['reason_over_direct']:.2f}x"
              + (f" (of means {c['reason_over_direct_mean']:.2f}x)" if "reason_over_direct_mean" in c else "") + " "
              f"(paper {c['paper_reason_over_direct']}x), same CoTs {c['same_cots']}, "
              f"max |emb diff| {c['max_abs_embedding_diff']:.1e}")
        for label, suffix, kinds in COMPARISONS:
            keys = [f"{k}_{suffix}" for k in kinds]
            if all(key in c for key in keys):
                print(f"batch {b}: {label}: " + ", ".join(f"{k.replace('_', ' ')} {c[key]:.2f}x"
                                                           for k, key in zip(kinds, keys)) + " faster")
        if "reason_forwards_per_query" in c:
            print(f"batch {b}: forwards / rows per query: reason {c['reason_forwards_per_query']:.2f} / "
                  f"{c['reason_rows_per_query']:.1f}, direct {c['direct_forwards_per_query']:.2f} / "
                  f"{c['direct_rows_per_query']:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model timed on the CPU ('none': skip)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--gpu-batches", type=int, nargs="+", default=[1, 32, 256])
    ap.add_argument("--n-single", type=int, default=len(QUERIES),
                    help="queries timed one by one at batch 1 (each drafts from the other queries' CoTs)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-gpu", action="store_true", help="skip the GPU part even where a GPU is present")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-3b",
                    help="the random-weight model of the GPU part (benchmarks/_common.py SHAPES)")
    ap.add_argument("--shape-device", default=None,
                    help="run the shaped part on this device (default: cuda where present); "
                         "'cpu' with --shape tiny rehearses the GPU part here")
    ap.add_argument("--tokenizer", default=None, help="the shaped model's tokenizer folder (default: SmolLM2's)")
    ap.add_argument("--name", default=None, help="results file: benchmarks/results/NAME.json")
    args = ap.parse_args()
    setup(args.threads)
    from lrem.model import LREM

    info, t0 = machine(), time.perf_counter()
    results = {}
    name = args.name or ("query_latency" if args.model == ap.get_default("model")
                         else f"query_latency-{Path(args.model).name}")

    def save(partial: dict | None = None) -> float:
        """Write the results, with `partial` (part -> its rows so far) while a part runs: a run
        cut short (a GPU call's time limit) keeps them. Returns the load average at the end."""
        end_load = round(os.getloadavg()[0], 2)
        write(name, {"machine": {**info, "load_average_1m_end": end_load}, **results, **(partial or {}),
                     "wall_seconds": round(time.perf_counter() - t0, 1)})
        return end_load

    def progress(part: str, head: dict):
        return lambda rows: save({part: {**head, **rows, "partial": True}})

    if args.model != "none":
        cpu = LREM.from_pretrained(args.model, device="cpu", log=lambda *a: None)
        head = {"model": args.model, "dtype": str(cpu.lm.dtype)}
        results["cpu"] = {**head, **bench(cpu, args.batches, args.repeat, args.n_single, progress("cpu", head))}
        report(f"CPU, {args.model}, {cpu.lm.dtype}", results["cpu"])
        del cpu
    device = args.shape_device or ("cuda" if torch.cuda.is_available() and not args.no_gpu else None)
    if device:
        shaped = shaped_model(args.shape, device, torch.bfloat16, args.tokenizer)
        cuda = device.startswith("cuda")
        graphs = "CUDA graph" if shaped.engine.config.cuda_graphs else "no CUDA graph (LREM_CUDA_GRAPHS=0)"
        compiled = " + torch.compile'd decode step" if shaped.engine.config.compile_decode else ""
        engine = "vllm" if shaped.engine.vllm() is not None else (
            f"hf static cache + {graphs}{compiled}" if cuda else "lrem CPU fast path")
        where = torch.cuda.get_device_name() if cuda else device
        part = "gpu" if cuda else "shaped"
        head = {"model": f"{args.shape}-shaped (random weights)", "device": where, "dtype": "bfloat16",
                "tokenizer": str(shaped.tokenizer.name_or_path), "engine": engine}
        # a failed capture decodes eagerly with a warning (`GreedyStep`): count them, or the label lies
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = bench(shaped, args.gpu_batches, args.repeat, args.n_single, progress(part, head))
        failed = [str(w.message) for w in caught if "CUDA graph capture failed" in str(w.message)]
        for m in sorted({str(w.message).splitlines()[0] for w in caught})[:5]:
            print(f"warning: {m}")
        results[part] = out = {**head, **out, "graph_capture_failures": len(failed),
                               "graph_capture_errors": sorted(set(failed))[:3]}
        # one reasoned query, and the largest batch generating (its fast path beat plain by 1.43x only)
        for b, mode in ((1, "reason"), (max(args.gpu_batches), "generate")) if cuda else ():
            if b not in args.gpu_batches:
                continue
            key = f"profile_batch{b}_{mode}"
            try:
                out[key] = prof = gpu_profile(shaped, (QUERIES * (b // len(QUERIES) + 1))[:b], mode)
                print(f"profile, batch {b} {mode}: {prof['wall_ms']:.1f} ms wall, {prof['kernels']} kernels, "
                      f"{prof['kernel_ms']:.1f} ms in kernels; top kernels {prof['top_kernels_ms']}; "
                      f"top host ops {prof['top_host_ops_self_ms']}")
            except Exception as e:  # noqa: BLE001 (the profile is extra: keep the timings)
                out[key] = {"error": f"{type(e).__name__}: {e}"[:300]}
        report(f"{where}, {args.shape}-shaped, bfloat16, fast engine: {engine}"
               + (f" ({len(failed)} captures failed: eager)" if failed else ""), out)
    end_load = save()
    print(f"load average (1 min): {info['load_average_1m']} at the start, {end_load} at the end")


if __name__ == "__main__":
    main()
