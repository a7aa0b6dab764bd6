"""How often does GRPO get no signal? The share of zero-advantage groups (all G rewards equal)
for each `RLConfig.rank_pool`, on the same rollouts of the same model.

    .venv/bin/python scripts/rank_pools.py --model runs/cold --pairs runs/cold/rl_pairs.jsonl \
        --data runs/data/wordnet --batches 8 --out docs/results/x/rank_pools.json

Per batch of `--batch-size` RL queries: G CoTs sampled from the model (seeded, as `lrem train rl`
samples them), one policy pass (no update), then r_acc and the total reward under each pool:
`batch` (N in-batch items, the paper), `mined` (+ hard_negatives per query from an index of this
model) and `catalog` (rank in the whole bank). The pools see identical rollouts and embeddings,
so the differences are the pools' alone.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--pairs", required=True)
    ap.add_argument("--data", required=True, help="dataset folder (the bank's catalog)")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--num-generations", type=int, default=8)
    ap.add_argument("--hard-negatives", type=int, default=7)
    ap.add_argument("--pool-items", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from tqdm.auto import tqdm

    from lrem.losses import GRPOLoss
    from lrem.model import LREM
    from lrem.train import RLConfig
    from lrem.train.grpo import collate_rollouts, score_rollouts
    from lrem.train.pairs import batch_indices, load_rl_pairs
    from lrem.train.rank_pool import RankPool, load_catalog

    model = LREM.from_pretrained(args.model, dtype="float32")
    data, _ = load_rl_pairs(args.pairs)
    catalog = load_catalog(args.data)
    cfg = RLConfig(batch_size=args.batch_size, num_generations=args.num_generations, seed=args.seed,
                   cot_max_tokens=model.config.cot_max_tokens)
    pools = {kind: RankPool(kind, data, catalog, args.hard_negatives, 10**9, args.pool_items, cfg.num_generations,
                            args.seed) for kind in ("batch", "mined", "catalog")}
    t0 = time.time()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pools["mined"].refresh(model, 0, show_progress=True)
    pools["catalog"].load_state_dict(pools["mined"].state_dict())  # the same bank: embed it once
    bank_s = time.time() - t0
    loss_fn = GRPOLoss(model, sampling_temperature=cfg.sampling_temperature)
    stats = {k: {"zero_groups": [], "rank_mean": [], "acc_mean": [], "reward_std": [], "items": 0} for k in pools}
    for step in tqdm(range(args.batches), desc="batches"):
        pairs = [data[i] for i in batch_indices(len(data), step, cfg.batch_size, 1, 0, args.seed)]
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 1_009)
        model.lm.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            rows = model.sample_cots([p.query for p in pairs], cfg.num_generations, cfg.sampling_temperature,
                                     cfg.top_p, cfg.rollout_max_tokens, generator=gen)
            batch = collate_rollouts(model, pairs, rows, cfg)
            out = loss_fn({k: v for k, v in batch.items() if isinstance(v, torch.Tensor)})
            for kind, pool in pools.items():
                ranked = pool.ranks(model, pairs, out["q"], out["d"], batch)
                s = score_rollouts(batch, out["q"], out["d"], cfg, ranked)
                reward = s["reward"].view(-1, cfg.num_generations)
                st = stats[kind]
                st["zero_groups"].append(float((reward.std(dim=1) == 0).float().mean()))
                st["rank_mean"].append(float(s["ranks"].float().mean()))
                st["acc_mean"].append(float(torch.tensor(s["parts"]["acc"]).mean()))
                st["reward_std"].append(float(reward.std(dim=1).mean()))
                st["items"] = s["n_items"]
    mean = lambda xs: round(sum(xs) / len(xs), 4)  # noqa: E731
    result = {"model": args.model, "pairs": args.pairs, "batches": args.batches, "batch_size": cfg.batch_size,
              "num_generations": cfg.num_generations, "hard_negatives": args.hard_negatives,
              "bank_items": len(pools["mined"].ids), "bank_seconds": round(bank_s, 1),
              "seconds": round(time.time() - t0, 1),
              "pools": {k: {"items_ranked_among": v["items"], "zero_advantage_groups": mean(v["zero_groups"]),
                            "mean_rank": mean(v["rank_mean"]), "mean_r_acc": mean(v["acc_mean"]),
                            "mean_group_reward_std": mean(v["reward_std"])} for k, v in stats.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| pool | items | zero-advantage groups | mean rank | mean r_acc | group reward std |")
    print("|---|---|---|---|---|---|")
    for k, v in result["pools"].items():
        print(f"| {k} | {v['items_ranked_among']} | {v['zero_advantage_groups']:.3f} | {v['mean_rank']:.2f} | "
              f"{v['mean_r_acc']:.3f} | {v['mean_group_reward_std']:.3f} |")


if __name__ == "__main__":
    main()
