"""Stage 2 of LREM: GRPO on the reasoning with a retrieval-rank reward, plus InfoNCE, on Accelerate.

    lrem train rl --init runs/cold --out runs/rl [--pairs runs/cold/rl_pairs.jsonl] [--config configs/rl.yaml]

Each step, per process: take `batch_size` (query, item) pairs; sample G CoTs per query from the
current policy (`LREM.sample_cots`); close each with `</think><emb>`; one policy pass gives the
sampled tokens' log-probs and every rollout's query embedding, a second the N items'. Rewards
(`lrem.rewards`): r_format and r_length from the tokens, r_acc from the rank of the query's own
item among the N by the rollout's embedding. Advantages are normalised per query (group of G);
L = 1.0 L_GRPO (PPO-clipped, on the CoT tokens) + 0.1 L_InfoNCE over the N*G rollout embeddings.

The output folder is an LREM model folder plus `train_state.json`, `history.jsonl` (every logged
value), `samples.jsonl` (some rollouts with their rewards), `curves.png`, `tb/` and
`checkpoints/`. `--resume` gives the same weights as an uninterrupted run: batches and sampling
depend only on (seed, step); the logs are cut back to the checkpoint's step first (`cut_log`). `lora_r` > 0 trains LoRA adapters as in stage 1 (`lrem.train.lora`).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from .. import rewards as R
from .._io import JsonlLog, append_jsonl, record_files, write_jsonl
from ..losses import IGNORE, GRPOLoss, group_advantages
from ..prompts import PromptConfig
from .grpo_config import RLConfig
from .lora import lora_settings
from .loop import Run
from .pairs import Pair, batch_indices, examples_sha256, item_inputs, load_rl_pairs, pad
from .rank_pool import RankPool, load_catalog

HISTORY, SAMPLES, CURVES = "history.jsonl", "samples.jsonl", "curves.png"


def collate_rollouts(model, pairs: list[Pair], gen: list[list[int]], cfg: RLConfig, catalog=None) -> dict:
    """Tensors for `GRPOLoss` plus the token-level rewards' inputs, from G sampled rows per pair;
    `catalog` (item_id -> `lrem.data.Item`) fills the item template's other fields (`item_inputs`).

    Row r is pair r // G. Its query side is prompt + the sampled CoT (up to the first stop id)
    + `</think><emb>`: what inference embeds. The log-prob targets are the sampled ids, the stop
    id included (the policy chose it; its prediction comes from the last CoT position whatever
    token follows there).
    """
    tok, g_n = model.tokenizer, cfg.num_generations
    stops = set(model.stop_ids)
    prompt_ids = tok(model.query_prompts([p.query for p in pairs]), add_special_tokens=False)["input_ids"]
    seqs, pos, tgt, completions, cot_tokens, cots = [], [], [], [], [], []
    for r, g in enumerate(gen):
        prompt = prompt_ids[r // g_n]
        k = next((i for i, t in enumerate(g) if t in stops), None)
        cot = g[:k] if k is not None else g
        target = g[: k + 1] if k is not None else g
        seqs.append(prompt + cot + [model.think_end_id, model.emb_id])
        pos.append(list(range(len(prompt) - 1, len(prompt) - 1 + len(target))))
        tgt.append(target)
        completions.append(tok.decode(target, skip_special_tokens=False))
        cot_tokens.append(len(cot))
        cots.append(tok.decode(cot, skip_special_tokens=True))
    ids, mask = pad(seqs, tok.pad_token_id)
    d_ids, d_mask = pad(tok(model.item_texts(item_inputs(pairs, catalog)), add_special_tokens=False)["input_ids"],
                        tok.pad_token_id)
    qid, iid = [p.query_id for p in pairs], [p.item_id for p in pairs]
    exclude = torch.tensor([[qid[r // g_n] == qid[j] or iid[r // g_n] == iid[j] for j in range(len(pairs))]
                            for r in range(len(gen))])  # (R, N) other positives of the rollout's query
    return {"ids": ids, "mask": mask, "lp_pos": pad(pos, 0)[0], "lp_tgt": pad(tgt, IGNORE)[0],
            "d_ids": d_ids, "d_mask": d_mask, "exclude": exclude,
            "labels": torch.arange(len(gen)) // g_n, "completions": completions, "cot_tokens": cot_tokens,
            "cots": cots, "queries": [pairs[r // g_n].query for r in range(len(gen))]}


def score_rollouts(batch: dict, q: torch.Tensor, d: torch.Tensor, cfg: RLConfig,
                   ranked: tuple[torch.Tensor, int] | None = None) -> dict:
    """Each reward component, the total, the ranks and the group-normalised advantages.
    `ranked`: (ranks, items ranked among) from a `RankPool`; default: among the batch items `d`."""
    if ranked is None:
        with torch.no_grad():
            ranked = (R.positive_ranks(q.detach() @ d.detach().T, batch["labels"].to(q.device),
                                       batch["exclude"].to(q.device)), d.shape[0])
    ranks, n_items = ranked
    parts = {"format": R.r_format(batch["completions"]),
             # unset outside `train_rl` (which resolves it to the policy's): the prompt config's default
             "length": R.r_length(batch["cot_tokens"], cot_max_tokens=cfg.cot_max_tokens or PromptConfig.cot_max_tokens),
             "acc": R.r_acc(ranks.tolist(), n_items=n_items),
             "novel": R.r_novel(batch["cots"], batch["queries"])}
    total = torch.tensor(R.combine(parts, cfg.reward_weights))  # (R,)
    adv = group_advantages(total.view(-1, cfg.num_generations)).flatten()  # (R,)
    return {"parts": parts, "reward": total, "ranks": ranks.cpu(), "advantages": adv, "n_items": n_items}


def train_rl(cfg: RLConfig, init, out, pairs=None, resume: bool = False, stop_after_step: int | None = None,
             overwrite: bool = False, log=print) -> dict:
    """Train the stage-1 model `init` with GRPO + InfoNCE on the RL pairs and write the model folder `out`.

    Args:
        cfg: the resolved config (see `RLConfig`).
        init: the stage-1 (cold start) model folder; also the frozen reference when kl_coef > 0.
        out: output folder.
        pairs: RL pairs file (default: `init/rl_pairs.jsonl`).
        resume: continue from the last checkpoint in `out/checkpoints`.
        stop_after_step: end (checkpoint and return) after this step.
        overwrite: (without `resume`) start over in `out`, an earlier lrem output, deleting it.
    Returns the train state (also written to `out/train_state.json`).
    """
    from ..model import LREM

    run = Run(cfg, out, resume, overwrite, inputs=(init, pairs), log=log)
    acc, say, out = run.acc, run.say, run.out
    data, data_path = load_rl_pairs(pairs, init)
    model = run.load_model(init, str(init))
    if cfg.cot_max_tokens is None:  # the prompt config owns l: the policy's, unless this run sets it
        cfg = dataclasses.replace(cfg, cot_max_tokens=model.config.cot_max_tokens)
    if cfg.rollout_max_tokens < cfg.cot_max_tokens:
        raise ValueError(f"rollout_max_tokens={cfg.rollout_max_tokens} < cot_max_tokens={cfg.cot_max_tokens}")
    model.config.cot_max_tokens = cfg.cot_max_tokens
    run.add_lora(model)
    ref = None  # the frozen stage-1 model, only for the KL term
    if cfg.kl_coef > 0:
        ref_model = LREM.from_pretrained(str(init), dtype="float32", device=str(acc.device), log=say).requires_grad_(False)
        ref = GRPOLoss(ref_model, sampling_temperature=cfg.sampling_temperature)

    world, rank, bs, g_n = run.world, run.rank, cfg.batch_size, cfg.num_generations
    per_epoch = len(data) // (bs * world)
    if per_epoch == 0:
        raise ValueError(f"{data_path}: {len(data)} pairs, fewer than one global batch ({bs} x {world} processes)")
    total = cfg.max_steps or per_epoch * cfg.num_epochs
    say(f"{len(data)} RL pairs from {data_path}, {world} process(es) x {bs} queries x G={g_n}, "
        f"{total} steps, config {json.dumps(cfg.to_dict())}")

    catalog = load_catalog(cfg.rank_data) if cfg.rank_data else None  # the bank's items and the batch's: same fields
    pool = RankPool(cfg.rank_pool, data, catalog,
                    cfg.hard_negatives, cfg.refresh_steps, cfg.pool_items, g_n, cfg.seed)
    say(f"r_acc ranks among: {pool}")
    dev = run.dev_eval(None, "reason")
    model.lm.train()
    loss_fn = GRPOLoss(model, cfg.grpo_weight, cfg.infonce_weight, cfg.temperature, cfg.clip_eps, cfg.kl_coef,
                       cfg.sampling_temperature)
    state = {"step": 0, "total_steps": total, "world_size": world, "batch_size": bs, "seed": cfg.seed,
             "examples": len(data), "examples_sha256": examples_sha256(data), "precision": acc.mixed_precision,
             "init": str(init), "pairs": str(data_path), "config": cfg.to_dict(), "lora": lora_settings(cfg),
             "last": {}}

    def rl_step(step: int) -> dict:
        t_step = time.time()
        batch_pairs = [data[i] for i in batch_indices(len(data), step, bs, world, rank, cfg.seed)]
        # (seed, step, rank) only; on the sampling device (torch.multinomial needs a CUDA generator for CUDA probs)
        gen = torch.Generator(model.device).manual_seed(cfg.seed * 1_000_003 + step * 1_009 + rank)
        with acc.autocast():  # the bank (mined, catalog) follows the weights every refresh_steps
            pool.refresh(model, step, show_progress=run.main)
        model.lm.eval()
        rows = model.sample_cots([p.query for p in batch_pairs], g_n, cfg.sampling_temperature,
                                 cfg.top_p, cfg.rollout_max_tokens, generator=gen)
        model.lm.train()
        batch = collate_rollouts(model, batch_pairs, rows, cfg, catalog)
        tensors = {k: v.to(acc.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        t_sample = time.time() - t_step
        ref_logp = None
        if ref is not None:
            with torch.no_grad():
                ref_logp = ref(tensors, items=False)["logp"]
        for it in range(cfg.num_iterations):
            with acc.autocast():
                pol = run.wrapped(tensors)
            if it == 0:
                with acc.autocast():
                    ranked = pool.ranks(model, batch_pairs, pol["q"], pol["d"], batch)
                scored = score_rollouts(batch, pol["q"], pol["d"], cfg, ranked)
                # "old" log-probs = the sampling policy's: its weights are these, so this pass's
                # detached values are them (as TRL does); kept for the later iterations
                adv, old_logp = scored["advantages"].to(acc.device), pol["logp"].detach()
            parts, info = loss_fn.loss(pol, tensors, adv, old_logp, ref_logp)
            loss = sum(loss_fn.weights[k] * v for k, v in parts.items())
            grad_norm, lr = run.optimize(loss)
        return {"pairs": batch_pairs, "batch": batch, "rows": len(rows), "scored": scored, "parts": parts,
                "loss": loss, "info": info, "grad_norm": grad_norm, "lr": lr, "t_step": t_step, "t_sample": t_sample}

    def log_step(done: int, r: dict):
        dt = time.time() - r["t_step"]
        scored, batch, n_rows = r["scored"], r["batch"], r["rows"]
        vals = {f"loss/{k}": v.detach().float() for k, v in {**r["parts"], "total": r["loss"]}.items()}
        vals |= {f"reward/{k}": torch.tensor(v).mean() for k, v in scored["parts"].items()}
        reward = scored["reward"].view(-1, g_n)
        vals |= {"reward/total": reward.mean(), "reward/group_std": reward.std(dim=1).mean(),
                 "advantage/abs_mean": scored["advantages"].abs().mean(),
                 "advantage/zero_groups": (reward.std(dim=1) == 0).float().mean(),
                 "rank/mean": scored["ranks"].float().mean(), "rank/top1": (scored["ranks"] == 1).float().mean(),
                 "rank/items": torch.tensor(float(scored["n_items"])),
                 "cot/tokens": torch.tensor(batch["cot_tokens"], dtype=torch.float).mean(),
                 **{f"policy/{k}": torch.tensor(v) for k, v in r["info"].items()}}
        vals = {k: acc.reduce(v.to(acc.device).float(), "mean").item() for k, v in vals.items()}
        vals |= {"lr": r["lr"], "grad_norm": float(r["grad_norm"]),
                 "time/step_s": dt, "time/sample_s": r["t_sample"], "time/rollouts_per_s": n_rows * world / dt}
        state["last"] = vals
        if run.main:
            append_jsonl(out / HISTORY, {"step": done, **vals})
            append_jsonl(out / SAMPLES, *[{"step": done, "query": r["pairs"][i // g_n].query,
                                      "completion": batch["completions"][i], "reward": round(scored["reward"][i].item(), 4),
                                      "rank": int(scored["ranks"][i])}
                                     for i in range(0, n_rows, max(1, n_rows // cfg.samples_per_log))])
        return vals, {"reward": f"{vals['reward/total']:.3f}", "rank": f"{vals['rank/mean']:.2f}",
                      "loss": f"{vals['loss/total']:.4f}"}

    def on_claim(start: int):
        record_files(out, HISTORY, SAMPLES)  # before the first step appends to them
        for name in (HISTORY, SAMPLES):
            if start == 0:  # a fresh run: no history of an earlier one
                (out / name).unlink(missing_ok=True)
            else:  # resumed: the steps logged after the checkpoint come again
                cut_log(out / name, start)

    return run.fit(model, loss_fn, total, state, rl_step, log_step, "rl", dev=dev, stop_after_step=stop_after_step,
                   on_claim=on_claim, extra=pool, before_final=lambda: plot_curves(out / HISTORY, out / CURVES),
                   keep=("checkpoints", "tb", HISTORY, SAMPLES, CURVES))


def cut_log(path: Path, step: int) -> None:
    """Keep a JSONL log's rows up to `step` (and drop a line torn by a kill), atomically: a crash
    here leaves the old file."""
    if path.exists():
        write_jsonl(path, [row for row in JsonlLog(path).rows(repair=False) if row.get("step", 0) <= step])


def plot_curves(history: Path, png: Path) -> None:
    """Training curves (reward components, mean rank, CoT length, losses) from `history.jsonl`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .._io import atomic_write

    rows = [json.loads(line) for line in history.read_text().splitlines() if line.strip()] if history.exists() else []
    if not rows:
        return
    # the GRPO loss itself is ~0 by construction (advantages are centred per group, ratio 1 on the
    # first pass), so it is not plotted; noisy per-batch values get a 5-step running mean
    panels = [("reward", ["reward/total", "reward/acc", "reward/format", "reward/length", "reward/novel"]),
              ("mean rank of the positive (1 = first)", ["rank/mean"]), ("CoT tokens", ["cot/tokens"]),
              ("InfoNCE loss", ["loss/infonce"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.3))
    steps = [r["step"] for r in rows]
    for ax, (title, keys) in zip(axes, panels):
        for k in keys:
            if k not in rows[0]:
                continue
            ys = [r[k] for r in rows]
            line, = ax.plot(steps, ys, alpha=0.35, label=None)
            smooth = [sum(ys[max(0, i - 4): i + 1]) / len(ys[max(0, i - 4): i + 1]) for i in range(len(ys))]
            ax.plot(steps, smooth, color=line.get_color(), label=k.split("/")[-1])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    record_files(png.parent, png.name)  # a run folder's own file (when `png` is in one)
    with atomic_write(png, "wb", encoding=None) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
