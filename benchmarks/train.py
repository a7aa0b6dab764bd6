"""Cold-start training step speed on this machine: steps/s, tokens/s, and FLOP/s against the bound.

    .venv/bin/python benchmarks/train.py [--batch 16] [--steps 3] [--threads 2]

One step as LREM_SPEC's stage 1 does it (the trainer itself lives elsewhere): a forward over the
query-side sequences (prompt + teacher CoT + `</think><emb>`) giving both the CoT logits and the
`<emb>` state, a forward over the items (`embed_batch`), L = 0.1 * CE(CoT and format tokens,
summed per sample, averaged) + InfoNCE (in-batch negatives, scale 20), backward, AdamW step.
FLOPs: 6 x non-embedding params x tokens run (padding included) + 6 x LM-head params x CE
positions (forward 2, backward 4; attention scores ignored).
"""
from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.nn.functional as F

from _common import QUERIES, machine, matmul_gflops, seconds, setup, table, write
from lrem.model import emb_hidden

COTS = ["corkscrew, wine opener, bottle opener", "wool socks, slippers, foot warmer", "coffee, espresso, energy drink",
        "moisturizer, face cream, drugstore skincare", "toddler clothes, 18-24 months, boys t-shirt",
        "loose fit dress, shift dress, empire waist", "spatula, pancake turner, silicone", "wide toe box, arch support"]
TITLES = ["waiter's corkscrew with foil cutter", "merino wool hiking socks", "dark roast espresso beans 1kg",
          "hydrating night cream 50ml", "boys cotton t-shirt 2T", "linen shift dress beige", "silicone spatula set",
          "stability running shoe wide"]


def make_batch(model, b: int) -> dict:
    queries = (QUERIES * (b // len(QUERIES) + 1))[:b]
    cots = (COTS * (b // len(COTS) + 1))[:b]
    titles = [f"{t} #{i}" for i, t in enumerate((TITLES * (b // len(TITLES) + 1))[:b])]
    q = model.tokenize(model.query_texts(queries, cots))
    after_think = (q["input_ids"] == model.think_id).long().cumsum(-1) > 0  # (B, T) <think> and after
    targets = after_think & (q["input_ids"] != model.think_id)  # CoT, </think>, <emb>
    return {"q": q, "targets": targets, "items": model.tokenize(model.item_texts(titles))}


def train_step(model, opt, batch: dict, scale: float = 20.0) -> dict:
    q, items, targets = batch["q"], batch["items"], batch["targets"]
    ids, mask = q["input_ids"], q["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    h = model.lm.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
    q_emb = F.normalize(emb_hidden(h, ids, model.emb_id).float(), dim=-1)  # (B, D)
    sel = targets[:, 1:]  # the token at t is predicted from the state at t - 1
    logits = model.lm.get_output_embeddings()(h[:, :-1][sel])  # (N, V): LM head on CE positions only
    ce = F.cross_entropy(logits.float(), ids[:, 1:][sel], reduction="sum") / ids.shape[0]
    d_emb = model.embed_batch(items["input_ids"], items["attention_mask"])  # (B, D)
    infonce = F.cross_entropy(scale * q_emb @ d_emb.T, torch.arange(ids.shape[0], device=ids.device))
    loss = 0.1 * ce + infonce
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {"loss": loss.item(), "ce": ce.item(), "infonce": infonce.item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    setup(args.threads)
    from lrem.model import LREM

    info, t0 = machine(), time.perf_counter()
    model = LREM.from_pretrained(args.model, dtype="float32", log=lambda *a: None)
    model.lm.train()
    opt = torch.optim.AdamW(model.lm.parameters(), lr=1e-5)
    batch = make_batch(model, args.batch)
    losses = [train_step(model, opt, batch)]  # warm-up
    times = []
    for _ in range(args.steps):
        times.append(seconds(lambda: losses.append(train_step(model, opt, batch))))
    step_s = sorted(times)[len(times) // 2]
    dec = model.lm.get_decoder()
    params = sum(p.numel() for p in dec.parameters()) - dec.get_input_embeddings().weight.numel()
    head = model.lm.get_output_embeddings().weight.numel()
    q, it = batch["q"]["attention_mask"], batch["items"]["attention_mask"]
    run_tokens, real_tokens = q.numel() + it.numel(), int(q.sum() + it.sum())
    ce_positions = int(batch["targets"][:, 1:].sum())
    flops = 6 * params * run_tokens + 6 * head * ce_positions
    bound = matmul_gflops(torch.float32)
    row = {"batch": args.batch, "query tokens/seq": q.shape[1], "item tokens/seq": it.shape[1], "s/step": step_s,
           "steps/s": 1 / step_s, "tokens/s": real_tokens / step_s, "GFLOP/s": flops / step_s / 1e9,
           "of bound": flops / step_s / 1e9 / bound, "bound GFLOP/s": bound,
           "peak RSS GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    print(table([row], list(row)))
    print("losses:", [round(x["loss"], 3) for x in losses])
    write("train", {"machine": info, "model": args.model, "dtype": "float32", **row,
                    "real_tokens_per_step": real_tokens, "run_tokens_per_step": run_tokens,
                    "ce_positions": ce_positions, "step_seconds": times, "losses": losses,
                    "wall_seconds": round(time.perf_counter() - t0, 1)})


if __name__ == "__main__":
    main()
