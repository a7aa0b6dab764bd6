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
depend only on (seed, step). `lora_r` > 0 trains LoRA adapters as in stage 1 (`lrem.train.lora`).
"""
from __future__ import annotations

import dataclasses

import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import rewards as R
from .._io import append_jsonl
from ..prompts import PromptConfig
from ..losses import IGNORE, GRPOLoss, group_advantages
from .dev_eval import log_dev, make_dev_eval
from .grpo_config import RLConfig
from .lora import add_lora, lora_settings, merge_lora
from .rank_pool import RankPool, load_catalog
from .sft import (RL_PAIRS, Pair, _pad, _save_final, batch_indices, check_output, check_resume, claim_output,
                  load_checkpoint, load_checkpoint_extra, load_triplets, make_optimizer, mixed_precision,
                  resume_source, save_checkpoint)

HISTORY, SAMPLES, CURVES = "history.jsonl", "samples.jsonl", "curves.png"


def collate_rollouts(model, pairs: list[Pair], gen: list[list[int]], cfg: RLConfig) -> dict:
    """Tensors for `GRPOLoss` plus the token-level rewards' inputs, from G sampled rows per pair.

    Row r is pair r // G. Its query side is prompt + the sampled CoT (up to the first stop id)
    + `</think><emb>`: what inference embeds. The log-prob targets are the sampled ids, the stop
    id included (the policy chose it; its prediction comes from the last CoT position whatever
    token follows there).
    """
    tok, g_n = model.tokenizer, cfg.num_generations
    stops = set(model.stop_ids)
    prompt_ids = tok(model.query_prompts([p.query for p in pairs]), add_special_tokens=False)["input_ids"]
    seqs, pos, tgt, completions, cot_tokens = [], [], [], [], []
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
    ids, mask = _pad(seqs, tok.pad_token_id)
    d_ids, d_mask = _pad(tok(model.item_texts([p.item_title for p in pairs]), add_special_tokens=False)["input_ids"],
                         tok.pad_token_id)
    qid, iid = [p.query_id for p in pairs], [p.item_id for p in pairs]
    exclude = torch.tensor([[qid[r // g_n] == qid[j] or iid[r // g_n] == iid[j] for j in range(len(pairs))]
                            for r in range(len(gen))])  # (R, N) other positives of the rollout's query
    return {"ids": ids, "mask": mask, "lp_pos": _pad(pos, 0)[0], "lp_tgt": _pad(tgt, IGNORE)[0],
            "d_ids": d_ids, "d_mask": d_mask, "exclude": exclude,
            "labels": torch.arange(len(gen)) // g_n, "completions": completions, "cot_tokens": cot_tokens}


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
             "acc": R.r_acc(ranks.tolist(), n_items=n_items)}
    total = torch.tensor(R.combine(parts, cfg.reward_weights))  # (R,)
    adv = group_advantages(total.view(-1, cfg.num_generations)).flatten()  # (R,)
    return {"parts": parts, "reward": total, "ranks": ranks.cpu(), "advantages": adv, "n_items": n_items}


def load_rl_pairs(pairs=None, init=None) -> tuple[list[Pair], Path]:
    """The RL pairs: `pairs` (a JSONL of query_id, query, item_id, item_title), or the
    `rl_pairs.jsonl` stage 1 held back in its output folder `init`."""
    path = Path(pairs) if pairs else Path(init) / RL_PAIRS
    if not path.exists():
        raise FileNotFoundError(f"{path}: no RL pairs (train stage 1 with --data and rl_holdout > 0, or pass --pairs)")
    return [Pair(p.query_id, p.query, p.item_id, p.item_title) for p in load_triplets(path)], path


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
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from ..model import LREM

    out = Path(out)
    AcceleratorState._reset_state()  # see lrem.train.sft.train
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision(cfg.bf16))
    main = acc.is_main_process
    say = log if main else (lambda *_: None)
    torch.manual_seed(cfg.seed)
    ckpt = check_output(out, resume, overwrite, inputs=(init, pairs))
    data, data_path = load_rl_pairs(pairs, init)
    check_resume(ckpt, cfg)
    model = LREM.from_pretrained(resume_source(ckpt, cfg, init), dtype="float32", log=say)
    model.source = str(init)
    if cfg.cot_max_tokens is None:  # the prompt config owns l: the policy's, unless this run sets it
        cfg = dataclasses.replace(cfg, cot_max_tokens=model.config.cot_max_tokens)
    if cfg.rollout_max_tokens < cfg.cot_max_tokens:
        raise ValueError(f"rollout_max_tokens={cfg.rollout_max_tokens} < cot_max_tokens={cfg.cot_max_tokens}")
    model.config.cot_max_tokens = cfg.cot_max_tokens
    adapter = add_lora(model, cfg, ckpt) if cfg.lora_r else None
    ref = None  # the frozen stage-1 model, only for the KL term
    if cfg.kl_coef > 0:
        ref_model = LREM.from_pretrained(str(init), dtype="float32", log=say).requires_grad_(False)
        ref = GRPOLoss(ref_model, sampling_temperature=cfg.sampling_temperature)

    world, rank, bs = acc.num_processes, acc.process_index, cfg.batch_size
    per_epoch = len(data) // (bs * world)
    if per_epoch == 0:
        raise ValueError(f"{data_path}: {len(data)} pairs, fewer than one global batch ({bs} x {world} processes)")
    total = cfg.max_steps or per_epoch * cfg.num_epochs
    warmup = int(round(cfg.warmup_ratio * total))
    say(f"{len(data)} RL pairs from {data_path}, {world} process(es) x {bs} queries x G={cfg.num_generations}, "
        f"{total} steps, config {json.dumps(cfg.to_dict())}")

    pool = RankPool(cfg.rank_pool, data, load_catalog(cfg.rank_data) if cfg.rank_data else None,
                    cfg.hard_negatives, cfg.refresh_steps, cfg.pool_items, cfg.num_generations, cfg.seed)
    say(f"r_acc ranks among: {pool}")
    dev = make_dev_eval(cfg, None, "reason") if main else None
    if dev is not None:
        say(f"dev eval every {cfg.eval_steps} steps: {dev}")
    model.lm.train()
    loss_fn = GRPOLoss(model, cfg.grpo_weight, cfg.infonce_weight, cfg.temperature, cfg.clip_eps, cfg.kl_coef,
                       cfg.sampling_temperature)
    optimizer, scheduler = make_optimizer(loss_fn, cfg, total, warmup)
    start = 0
    if ckpt is not None:
        start = load_checkpoint(ckpt, optimizer, scheduler, {"world_size": world, "total_steps": total,
                                "seed": cfg.seed, "batch_size": bs, "examples": len(data)})
        pool.load_state_dict(load_checkpoint_extra(ckpt))  # the bank an uninterrupted run would hold
        say(f"resuming from {ckpt} at step {start}")
    wrapped, optimizer = acc.prepare(loss_fn, optimizer)

    writer = None
    if main:
        from torch.utils.tensorboard import SummaryWriter

        claim_output(out, resume, overwrite)
        writer = SummaryWriter(str(out / "tb"))
        if start == 0:  # a fresh run: no history of an earlier one
            for name in (HISTORY, SAMPLES):
                (out / name).unlink(missing_ok=True)
    state = {"step": start, "total_steps": total, "world_size": world, "batch_size": bs, "seed": cfg.seed,
             "examples": len(data), "precision": acc.mixed_precision, "init": str(init), "pairs": str(data_path),
             "config": cfg.to_dict(), "lora": lora_settings(cfg), "last": {}}
    end = min(total, stop_after_step or total)
    t0 = time.time()
    bar = tqdm(range(start, end), initial=start, total=total, desc="rl", unit="step", disable=not main)
    for step in bar:
        t_step = time.time()
        batch_pairs = [data[i] for i in batch_indices(len(data), step, bs, world, rank, cfg.seed)]
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1_009 + rank)  # (seed, step, rank) only
        with acc.autocast():  # the bank (mined, catalog) follows the weights every refresh_steps
            pool.refresh(model, step, show_progress=main)
        model.lm.eval()
        rows = model.sample_cots([p.query for p in batch_pairs], cfg.num_generations, cfg.sampling_temperature,
                                 cfg.top_p, cfg.rollout_max_tokens, generator=gen)
        model.lm.train()
        batch = collate_rollouts(model, batch_pairs, rows, cfg)
        tensors = {k: v.to(acc.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        t_sample = time.time() - t_step
        ref_logp = None
        if ref is not None:
            with torch.no_grad():
                ref_logp = ref(tensors, items=False)["logp"]
        for it in range(cfg.num_iterations):
            with acc.autocast():
                pol = wrapped(tensors)
            if it == 0:
                with acc.autocast():
                    ranked = pool.ranks(model, batch_pairs, pol["q"], pol["d"], batch)
                scored = score_rollouts(batch, pol["q"], pol["d"], cfg, ranked)
                # "old" log-probs = the sampling policy's: its weights are these, so this pass's
                # detached values are them (as TRL does); kept for the later iterations
                adv, old_logp = scored["advantages"].to(acc.device), pol["logp"].detach()
            parts, info = loss_fn.loss(pol, tensors, adv, old_logp, ref_logp)
            loss = sum(loss_fn.weights[k] * v for k, v in parts.items())
            acc.backward(loss)
            # the norm before clipping (max_grad_norm 0: an infinite bound, which scales by 1)
            grad_norm = acc.clip_grad_norm_(wrapped.parameters(), cfg.max_grad_norm or float("inf"))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        done = step + 1
        if done % cfg.logging_steps == 0 or done == end:
            dt = time.time() - t_step
            vals = {f"loss/{k}": v.detach().float() for k, v in {**parts, "total": loss}.items()}
            vals |= {f"reward/{k}": torch.tensor(v).mean() for k, v in scored["parts"].items()}
            reward = scored["reward"].view(-1, cfg.num_generations)
            vals |= {"reward/total": reward.mean(), "reward/group_std": reward.std(dim=1).mean(),
                     "advantage/abs_mean": scored["advantages"].abs().mean(),
                     "advantage/zero_groups": (reward.std(dim=1) == 0).float().mean(),
                     "rank/mean": scored["ranks"].float().mean(), "rank/top1": (scored["ranks"] == 1).float().mean(),
                     "rank/items": torch.tensor(float(scored["n_items"])),
                     "cot/tokens": torch.tensor(batch["cot_tokens"], dtype=torch.float).mean(),
                     **{f"policy/{k}": torch.tensor(v) for k, v in info.items()}}
            vals = {k: acc.reduce(v.to(acc.device).float(), "mean").item() for k, v in vals.items()}
            vals |= {"lr": lr, "grad_norm": float(grad_norm),
                     "time/step_s": dt, "time/sample_s": t_sample, "time/rollouts_per_s": len(rows) * world / dt}
            state["last"] = vals
            if main:
                for k, v in vals.items():
                    writer.add_scalar(k, v, done)
                append_jsonl(out / HISTORY, {"step": done, **vals})
                append_jsonl(out / SAMPLES, *[{"step": done, "query": batch_pairs[r // cfg.num_generations].query,
                                               "completion": batch["completions"][r],
                                               "reward": round(scored["reward"][r].item(), 4),
                                               "rank": int(scored["ranks"][r])}
                                              for r in range(0, len(rows), max(1, len(rows) // cfg.samples_per_log))])
            bar.set_postfix(reward=f"{vals['reward/total']:.3f}", rank=f"{vals['rank/mean']:.2f}",
                            loss=f"{vals['loss/total']:.4f}")
        state["step"] = done
        if cfg.eval_steps and (done % cfg.eval_steps == 0 or done == end):
            acc.wait_for_everyone()
            if dev is not None:
                state["dev"] = log_dev(dev, model, done, writer, bar)
        if done < total and ((cfg.save_steps and done % cfg.save_steps == 0) or done == end):
            acc.wait_for_everyone()
            if main:
                save_checkpoint(out, model, optimizer, scheduler, state, cfg.save_total_limit, adapter,
                                pool.state_dict())
    bar.close()
    state["seconds"] = round(time.time() - t0, 2)
    acc.wait_for_everyone()
    if writer is not None:
        writer.close()
    if main and state["step"] == total:
        plot_curves(out / HISTORY, out / CURVES)
        if adapter is not None:
            merge_lora(model, adapter)
        _save_final(out, model, state, keep=("checkpoints", "tb", HISTORY, SAMPLES, CURVES))
        say(f"wrote {out} ({total} steps, {state['seconds']:.0f} s)")
    acc.wait_for_everyone()
    acc.end_training()
    return state


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
    panels = [("reward", ["reward/total", "reward/acc", "reward/format", "reward/length"]),
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
    with atomic_write(png, "wb", encoding=None) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
