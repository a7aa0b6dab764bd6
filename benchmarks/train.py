"""Cold-start training step speed on this machine: steps/s, tokens/s, and FLOP/s against the bound.

    .venv/bin/python benchmarks/train.py [--batch 16] [--steps 3] [--threads 2] [--lora-r 16]

One step of the real trainer (`lrem.train.sft.collate` + `lrem.losses.LREMLoss`, L = 0.1 L_SFT +
1.0 L_InfoNCE, backward, AdamW), timed side by side: with the batch's shared prompt prefix
run once (the default, `share_prefix=True`), with every row run in full (`share_prefix=False`),
and with the shared prefix under LoRA (`lora_r`, `lrem.train.lora`; `--lora-r 0` skips it).
FLOPs: 6 x non-embedding params x tokens run (padding included) + 6 x LM-head params x CE
positions (forward 2, backward 4; attention scores ignored); under LoRA 4 x, as the frozen
matrices get no weight gradient (the adapters' own FLOPs ignored; the tied head's rows train,
so its gradient is still computed whole).
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

from _common import QUERIES, machine, matmul_gflops, seconds, setup, table, write
from lrem.losses import IGNORE, LREMLoss
from lrem.model import shared_prefix_len
from lrem.train import SFTConfig
from lrem.train.lora import add_lora, trainable_parameters
from lrem.train.pairs import Pair
from lrem.train.sft import collate

COTS = ["corkscrew, wine opener, bottle opener", "wool socks, slippers, foot warmer", "coffee, espresso, energy drink",
        "moisturizer, face cream, drugstore skincare", "toddler clothes, 18-24 months, boys t-shirt",
        "loose fit dress, shift dress, empire waist", "spatula, pancake turner, silicone", "wide toe box, arch support"]
TITLES = ["waiter's corkscrew with foil cutter", "merino wool hiking socks", "dark roast espresso beans 1kg",
          "hydrating night cream 50ml", "boys cotton t-shirt 2T", "linen shift dress beige", "silicone spatula set",
          "stability running shoe wide"]


def make_batch(model, b: int) -> dict:
    pairs = [Pair(f"q{i}", QUERIES[i % len(QUERIES)], f"d{i}", f"{TITLES[i % len(TITLES)]} #{i}", COTS[i % len(COTS)])
             for i in range(b)]
    return collate(model, pairs)


def run_tokens(ids: torch.Tensor, mask: torch.Tensor, share: bool) -> int:
    """Token positions the decoder runs: the shared prefix once, then every row's rest."""
    if not share:
        return ids.numel()
    p = shared_prefix_len(ids, mask)
    return p + ids.shape[0] * (ids.shape[1] - p)


def train_step(loss_fn, opt, batch: dict) -> dict:
    parts = loss_fn(batch)
    loss = sum(loss_fn.weights[k] * v for k, v in parts.items())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {"loss": loss.item(), **{k: v.item() for k, v in parts.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per setting (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--lora-r", type=int, default=16, help="LoRA rank of the third row (0: no LoRA row)")
    args = ap.parse_args()
    setup(args.threads)
    from lrem.model import LREM

    info, t0 = machine(), time.perf_counter()
    model = LREM.from_pretrained(args.model, dtype="float32", log=lambda *a: None)
    model.lm.train()
    opt = torch.optim.AdamW(model.lm.parameters(), lr=1e-5)
    batch = make_batch(model, args.batch)
    dec = model.lm.get_decoder()
    params = sum(p.numel() for p in dec.parameters()) - dec.get_input_embeddings().weight.numel()
    head = model.lm.get_output_embeddings().weight.numel()
    real_tokens = int(batch["q_mask"].sum() + batch["d_mask"].sum())
    ce_positions = int((batch["sft_tgt"] != IGNORE).sum())
    bound = matmul_gflops(torch.float32)
    rows, losses, times = [], {}, {}
    for share, lora_r in ((True, 0), (False, 0)) + (((True, args.lora_r),) if args.lora_r else ()):
        if lora_r:  # last: the adapters go into the model in place
            add_lora(model, SFTConfig(lora_r=lora_r))
            opt = torch.optim.AdamW(trainable_parameters(model.lm), lr=1e-5)  # as the trainer: adapters and rows
        loss_fn = LREMLoss(model, 0.1, 1.0, 0.05, share_prefix=share)
        name = ("shared prefix" if share else "plain") + (f", LoRA r={lora_r}" if lora_r else "")
        losses[name] = [train_step(loss_fn, opt, batch)]  # warm-up
        times[name] = [seconds(lambda: losses[name].append(train_step(loss_fn, opt, batch))) for _ in range(args.steps)]
        step_s = sorted(times[name])[len(times[name]) // 2]
        ran = run_tokens(batch["q_ids"], batch["q_mask"], share) + run_tokens(batch["d_ids"], batch["d_mask"], share)
        flops = (4 if lora_r else 6) * params * ran + 6 * head * ce_positions
        rows.append({"path": name, "batch": args.batch, "query tokens/seq": batch["q_ids"].shape[1],
                     "item tokens/seq": batch["d_ids"].shape[1], "tokens run": ran, "s/step": step_s,
                     "steps/s": 1 / step_s, "tokens/s": real_tokens / step_s, "GFLOP/s": flops / step_s / 1e9,
                     "of bound": flops / step_s / 1e9 / bound})
    speedup = rows[1]["s/step"] / rows[0]["s/step"]
    lora = rows[0]["s/step"] / rows[2]["s/step"] if args.lora_r else None
    print(table(rows, list(rows[0])))
    print(f"shared prefix / plain: {speedup:.2f}x faster per step; FLOP bound {bound:.1f} GFLOP/s")
    if lora:
        print(f"LoRA r={args.lora_r} / full fine-tuning (shared prefix): {lora:.2f}x faster per step")
    write("train", {"machine": info, "model": args.model, "dtype": "float32", "rows": rows,
                    "speedup_shared_prefix": speedup, "speedup_lora": lora, "lora_r": args.lora_r,
                    "bound GFLOP/s": bound, "real_tokens_per_step": real_tokens,
                    "ce_positions": ce_positions, "step_seconds": times, "losses": losses,
                    "peak RSS GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                    "wall_seconds": round(time.perf_counter() - t0, 1)})


if __name__ == "__main__":
    main()
