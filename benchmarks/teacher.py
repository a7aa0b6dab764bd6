"""The local teacher's generation speed: lrem's fast path against plain `lm.generate`, same prompts.

    .venv/bin/python benchmarks/teacher.py [--teacher qwen2.5-coder-0.5b-instruct] [--n 16] [--tokens 32] [--threads 1]

The prompts are construct's reasoning prompts (`lrem.construct.reason_chat`) for the first `n`
benchmark queries, one batch of `n`, greedy, at most `tokens` new tokens each. Tokens/s counts
the tokens each row generated (up to its stop). "fast" is `HFTeacher(fast=True)`: the prompt
prefix all chats share (chat template + system prompt) run once and kept, a preallocated KV
cache, and on the CPU the compact decoder; "plain" is `lm.generate` on left-padded prompts.
Timings interleave the two (fast, plain, fast, plain, ...) so load from other jobs hits both;
the Qwen weights need `LREM_QWEN=1 bash scripts/setup.sh`.
"""
from __future__ import annotations

import argparse

from _common import QUERIES, interleaved, machine, setup, table, write


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", action="append", help="built-in name or HF folder (repeat); default the 0.5B "
                                                       "and 1.5B Qwen2.5-Coder teachers")
    ap.add_argument("--n", type=int, default=16, help="prompts in the batch")
    ap.add_argument("--tokens", type=int, default=32, help="max new tokens per prompt")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="teacher")
    args = ap.parse_args()
    setup(args.threads)
    from lrem.construct import reason_chat
    from lrem.teachers import HFTeacher

    rows = []
    for name in args.teacher or ["qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"]:
        t = HFTeacher(name, batch_size=args.n, dtype=args.dtype)
        texts = [t.prompt(reason_chat(q)) for q in QUERIES[: args.n]]
        out = {}

        def run(fast: bool):
            def go():
                t.fast = fast
                out[fast] = t.generate_ids(texts, args.tokens)
            return go

        secs = interleaved({"fast": run(True), "plain": run(False)}, repeat=args.repeat)
        tokens = {k: sum(len(r) for r in out[k == "fast"]) for k in secs}
        same = sum(a == b for a, b in zip(out[True], out[False]))
        rows.append({"teacher": name, "dtype": str(next(t.lm.parameters()).dtype).removeprefix("torch."),
                     "batch": args.n, "tokens": tokens["fast"], "fast s": secs["fast"], "plain s": secs["plain"],
                     "fast tok/s": tokens["fast"] / secs["fast"], "plain tok/s": tokens["plain"] / secs["plain"],
                     "speed-up": secs["plain"] / secs["fast"], "same rows": f"{same}/{len(texts)}"})
        print(table(rows[-1:], list(rows[-1])), flush=True)
        del t
    print(f"\nload average {machine()['load_average_1m']}")
    print(table(rows, list(rows[0])))
    write(args.out, {"rows": rows, "n": args.n, "tokens": args.tokens})


if __name__ == "__main__":
    main()
