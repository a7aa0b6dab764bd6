"""The real trainers, end to end, for a few steps on a random-weight model of a published shape:
`lrem.train.sft.train` (cold start) and then `lrem.train.grpo.train_rl` on its output, as
`lrem train coldstart` and `lrem train rl` run them (Accelerate, bfloat16 autocast where the
hardware has it, checkpoints, the saved model folder). On a GPU machine this is the check that
the training loop runs there at all; the per-step speed comes from `benchmarks/train.py`.

    python3 benchmarks/trainers.py --shape qwen2.5-0.5b --tokenizer DIR    (benchmarks/gpu.sh)
    .venv/bin/python benchmarks/trainers.py --shape tiny                    (the rehearsal)

Data: the committed WordNet label triplets (`data/triplets/wordnet-labels`), for both stages
(stage 2 reads them as RL pairs, CoTs dropped), less the rows whose CoT runs over `cot_max_tokens`
in the shaped model's tokenizer (the set was checked in SmolLM2's). Seconds per stage include
loading and saving.
"""
from __future__ import annotations

import argparse
import gzip
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from _common import SHAPES, machine, setup, shaped_model, table, write

ROOT = Path(__file__).resolve().parents[1]
TRIPLETS = ROOT / "data/triplets/wordnet-labels/triplets.jsonl.gz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--tokenizer", default=None, help="the shaped model's tokenizer folder (default: SmolLM2's)")
    ap.add_argument("--steps", type=int, default=4, help="steps per stage (a checkpoint every steps // 2)")
    ap.add_argument("--batch", type=int, default=16, help="stage 1 pairs per step; stage 2 takes half as queries")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work", default=None, help="folder for the models written (default: a temp folder)")
    ap.add_argument("--name", default="trainers", help="results file: benchmarks/results/NAME.json")
    args = ap.parse_args()
    setup(args.threads)
    from lrem.train import RLConfig, SFTConfig
    from lrem.train.grpo import train_rl
    from lrem.train.pairs import cot_tokens
    from lrem.train.sft import train

    info, t0 = machine(), time.perf_counter()
    work = Path(args.work or tempfile.mkdtemp(prefix="lrem-trainers-"))
    base, triplets = work / "base", work / "triplets.jsonl"
    model = shaped_model(args.shape, "cpu", torch.float32, args.tokenizer)
    model.save_pretrained(base)
    budget, tok = model.config.cot_max_tokens, model.tokenizer
    with gzip.open(TRIPLETS, "rt") as f:
        lines = f.readlines()
    fit = [ln for ln in lines if cot_tokens(tok, json.loads(ln)["cot"]) <= budget]
    triplets.write_text("".join(fit))
    print(f"{len(fit)} of {len(lines)} triplets have a CoT of at most {budget} tokens in this tokenizer")
    del model
    every = max(1, args.steps // 2)  # checkpoints
    rows, states = [], {}
    cfg1 = SFTConfig(model=str(base), batch_size=args.batch, max_steps=args.steps, save_steps=every, logging_steps=1)
    cfg2 = RLConfig(batch_size=max(1, args.batch // 2), max_steps=args.steps, save_steps=every, logging_steps=1)
    cuda = torch.cuda.is_available()

    def save():  # after each stage: a run cut short (a GPU call's time limit) keeps the stages done
        write(args.name, {"machine": info, "model": f"{args.shape}-shaped (random weights)",
                          "device": "cuda" if cuda else "cpu", "rows": rows,
                          "last": {k: s.get("last", {}) for k, s in states.items()},
                          **({"peak GPU memory GB": torch.cuda.max_memory_allocated() / 2**30} if cuda else {}),
                          "wall_seconds": round(time.perf_counter() - t0, 1)})

    for stage, out, fn in (("coldstart", work / "cold", lambda out: train(cfg1, out, triplets=triplets)),
                           ("rl", work / "rl", lambda out: train_rl(cfg2, work / "cold", out, pairs=triplets))):
        t = time.perf_counter()
        state = fn(out)
        secs = time.perf_counter() - t
        states[stage] = state
        rows.append({"stage": stage, "steps": state["step"], "batch": state["batch_size"],
                     "precision": state["precision"], "seconds (load, steps, saves)": secs,
                     "checkpoints": sorted(p.name for p in (out / "checkpoints").iterdir())})
        save()
    print(table(rows, list(rows[0])))
    print(json.dumps({k: {"step": s["step"], "precision": s["precision"]} for k, s in states.items()}))
    if not args.work:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
