"""Stage 1 of LREM (cold start: SFT + InfoNCE) and the direct-embedding baseline, on Accelerate.

    lrem train coldstart --triplets runs/c/triplets.jsonl --out runs/cold [--config configs/coldstart.yaml]
    lrem train direct --pairs runs/c/triplets.jsonl --out runs/direct [--config configs/direct.yaml]
    # two processes (CPU: gloo; GPUs: NCCL), same command:
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m lrem.cli train direct ...

The output folder is an LREM model folder (`LREM.from_pretrained`, `lrem index`, `lrem eval` take
it as is) plus `train_state.json`, `tb/` (TensorBoard) and `checkpoints/step-N/` (model,
optimizer and scheduler, each written atomically). `--resume` continues from the last checkpoint
to the same weights as an uninterrupted run: the batch of step s depends only on (seed, s).
With `lora_r` > 0 (`lrem.train.lora`) only LoRA adapters and the new tokens' rows train; the
saved model has them merged, and checkpoints hold the adapter in place of the model.
"""
from __future__ import annotations

import json
import time

import torch

from .._io import record_files
from ..losses import IGNORE, LREMLoss
from ..prompts import close_cot
from .lora import lora_settings
from .loop import Run, warmup_steps
# lr_factor, mixed_precision, batch_indices, load_triplets, pairs_from_qrels, rl_holdout: re-exported,
# tests and older callers import them from here (their homes are .loop and .pairs)
from .loop import lr_factor, mixed_precision  # noqa: F401
from .pairs import (RL_PAIRS, BatchSampler, Pair, batch_indices, build_pairs, examples_sha256,  # noqa: F401
                    grounded, item_inputs, load_triplets, pad, pairs_from_qrels, rl_holdout, without_cots, write_pairs)
from .sft_config import SFTConfig


def collate(model, pairs: list[Pair], catalog=None) -> dict[str, torch.Tensor]:
    """Right-padded token batches for `LREMLoss` (see its docstring for the columns); `catalog`
    (item_id -> `lrem.data.Item`) fills the item template's other fields (`item_inputs`).

    The SFT targets are the tokens after `<think>`: the CoT, `</think>` and `<emb>`; everything
    before (system prompt, instruction, query) is not a target. Pairs without a CoT get none.
    """
    tok, cfg, pad_id = model.tokenizer, model.config, model.tokenizer.pad_token_id
    prompt_texts = model.query_prompts([p.query for p in pairs], candidates=[p.candidates for p in pairs])
    prompt_ids = tok(prompt_texts, add_special_tokens=False)["input_ids"]
    q_ids = tok([t + close_cot(p.cot or "", cfg) for t, p in zip(prompt_texts, pairs)],
                add_special_tokens=False)["input_ids"]
    d_ids = tok(model.item_texts(item_inputs(pairs, catalog)), add_special_tokens=False)["input_ids"]
    pos, tgt = [], []
    for p, prompt, full in zip(pairs, prompt_ids, q_ids):
        p_pos, p_tgt = sft_targets(len(prompt), full) if p.cot is not None else ([0], [IGNORE])
        pos.append(p_pos), tgt.append(p_tgt)
    qid = [p.query_id for p in pairs]
    iid = [p.item_id for p in pairs]
    exclude = torch.tensor([[qid[i] == qid[j] or iid[i] == iid[j] for j in range(len(pairs))]
                            for i in range(len(pairs))])  # (B, B) other positives: not negatives
    q, qm = pad(q_ids, pad_id)
    d, dm = pad(d_ids, pad_id)
    return {"q_ids": q, "q_mask": qm, "d_ids": d, "d_mask": dm, "exclude": exclude,
            "sft_pos": pad(pos, 0)[0], "sft_tgt": pad(tgt, IGNORE)[0]}


def sft_targets(prompt_len: int, ids: list[int]) -> tuple[list[int], list[int]]:
    """L_SFT's (positions, targets) in a query's token ids `ids` whose first `prompt_len` are the
    prompt (ending with `<think>`): each token after the prompt, predicted from the one before it.

    >>> sft_targets(3, [10, 11, 12, 13, 14])  # prompt 10 11 12; targets 13 14, read at positions 2 3
    ([2, 3], [13, 14])
    """
    return list(range(prompt_len - 1, len(ids) - 1)), ids[prompt_len:]


# ---------------------------------------------------------------- training

def train(cfg: SFTConfig, out, triplets=None, dataset=None, split: str = "train", resume: bool = False,
          stop_after_step: int | None = None, overwrite: bool = False, log=print) -> dict:
    """Train from `cfg.model` on the pairs of `build_pairs` and write the model folder `out`.

    Args:
        cfg: the resolved config (see `SFTConfig`).
        out: output folder (the model; checkpoints and TensorBoard logs inside).
        triplets: `triplets.jsonl` (query, cot, item), or for the direct baseline any such file.
        dataset: a loaded `lrem.data.Dataset`: its `split` qrels add pairs without a CoT, and the
            triplet ids are checked against it.
        resume: continue from the last checkpoint in `out/checkpoints`.
        stop_after_step: end (checkpoint and return, no final model) after this step: a time box,
            or a simulated interruption in tests.
        overwrite: (without `resume`) start over in `out`, an earlier lrem output, deleting it.
    Returns the train state (also written to `out/train_state.json`).
    """
    run = Run(cfg, out, resume, overwrite, inputs=(cfg.model, triplets), log=log,
              find_unused_parameters=cfg.sft_weight == 0)
    acc, say, world, bs = run.acc, run.say, run.world, cfg.batch_size
    if resume and run.ckpt is None:
        say(f"no checkpoint under {run.out / 'checkpoints'}; starting from {cfg.model}")
    model = run.load_model(cfg.model, cfg.model)
    if cfg.cot_max_tokens is not None:  # the prompt config owns l; the model trained with it keeps it
        model.config.cot_max_tokens = cfg.cot_max_tokens
    run.add_lora(model)
    pairs, held = build_pairs(triplets, dataset, split, model.tokenizer, model.config.cot_max_tokens, True,
                              cfg.rl_holdout, cfg.seed)
    # the batches depend on which pairs have a teacher CoT (cot_share), for cold start and the
    # direct baseline alike; only then does the baseline drop the CoTs
    sampler = BatchSampler([p.cot is not None for p in pairs], cfg.batch_size, cfg.cot_share, cfg.seed)
    if not cfg.use_cot:
        pairs = without_cots(pairs)
    if any(p.candidates is not None for p in pairs):  # grounded training: the model keeps K
        pairs = grounded(pairs, cfg.grounded_share, cfg.seed)  # share 0: every query plain (the baseline)
        if cfg.grounded_share > 0:
            model.config.candidates_k = cfg.candidates_k
    dev = run.dev_eval(dataset, "reason" if cfg.use_cot else "direct")
    catalog = dataset.catalog if dataset is not None else None  # the fields the item template may name

    total = cfg.max_steps or sampler.steps_per_epoch(world) * cfg.num_epochs
    say(f"{len(pairs)} pairs ({sum(p.cot is not None for p in pairs)} with a CoT, "
        f"{sum(p.candidates is not None for p in pairs)} grounded; {len(held)} held back for RL), "
        f"{world} process(es) x "
        f"batch {bs}, {total} steps, warmup {warmup_steps(cfg, total)}, config {json.dumps(cfg.to_dict())}")

    if cfg.gradient_checkpointing:
        enable = getattr(model.lm, "activation_checkpointing_enable", None) or model.lm.gradient_checkpointing_enable
        enable()
    model.lm.train()
    loss_fn = LREMLoss(model, cfg.sft_weight, cfg.infonce_weight, cfg.temperature)
    state = {"step": 0, "total_steps": total, "world_size": world, "batch_size": bs, "global_batch_size": bs * world,
             "seed": cfg.seed, "examples": len(pairs), "examples_sha256": examples_sha256(pairs + held),
             "precision": acc.mixed_precision, "config": cfg.to_dict(),
             "lora": lora_settings(cfg),
             "losses": {},
             "data": ", ".join(x for x in (str(triplets or ""), dataset and f"{dataset.name} ({split} qrels)") if x)}

    def sft_step(step: int):
        idx = sampler(step, world, run.rank)
        batch = {k: v.to(acc.device) for k, v in collate(model, [pairs[i] for i in idx], catalog).items()}
        with acc.autocast():
            parts = run.wrapped(batch)
        loss = sum(loss_fn.weights[k] * v for k, v in parts.items())
        grad_norm, lr = run.optimize(loss)
        return {**parts, "total": loss}, grad_norm, lr

    since = {}  # the time and step of the last log (first: the run's start)

    def log_step(done: int, result):
        parts, grad_norm, lr = result
        vals = {k: acc.reduce(v.detach().float(), "mean").item() for k, v in parts.items()}
        t_log, s_log = since.get("t", run.t0), since.get("step", run.start)
        dt = max(time.time() - t_log, 1e-9)
        speed = {"steps_per_s": (done - s_log) / dt, "samples_per_s": (done - s_log) * bs * world / dt}
        since.update(t=time.time(), step=done)
        state["losses"] = vals
        scalars = {**{f"loss/{k}": v for k, v in vals.items()}, "lr": lr, "grad_norm": float(grad_norm),
                   **{f"throughput/{k}": v for k, v in speed.items()}}
        return scalars, {"loss": f"{vals['total']:.4f}", "lr": f"{lr:.2e}", "it_s": f"{speed['steps_per_s']:.2f}"}

    def on_claim(start: int):
        if held:
            record_files(run.out, RL_PAIRS)  # before it is written: lrem's, for a later --overwrite
            write_pairs(run.out / RL_PAIRS, held)  # stage 2's pairs, never seen here

    return run.fit(model, loss_fn, total, state, sft_step, log_step, "train", dev=dev,
                   stop_after_step=stop_after_step, on_claim=on_claim)
