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
import os
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .._io import atomic_dir, claim_dir, prepare_output, write_json
from ..data import DataError, Pair, read_jsonl  # Pair: one training example
from ..losses import IGNORE, LREMLoss
from ..prompts import close_cot
from .dev_eval import log_dev, make_dev_eval
from .lora import ADAPTER, add_lora, lora_settings, merge_lora, save_adapter, trainable_parameters
from .sft_config import SFTConfig

TRAIN_STATE = "train_state.json"
RL_PAIRS = "rl_pairs.jsonl"  # the pairs held back for `lrem train rl`
EXTRA = "extra.pt"  # a checkpoint's trainer state beyond optimizer, scheduler and RNG
REQUIRED = ("query_id", "query", "item_id", "item_title")


# ---------------------------------------------------------------- data

def load_triplets(path, tokenizer=None, cot_max_tokens: int = 16, dataset=None) -> list[Pair]:
    """Read `triplets.jsonl` ({query_id, query, cot, item_id, item_title} per line, from `lrem construct`).

    Raises `DataError` naming file, line and field for: an empty file, a malformed line, a
    missing or non-string field, a CoT longer than `cot_max_tokens` tokens (when `tokenizer` is
    given), an id unknown to `dataset` (when given), or one item id with two titles.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such triplet file")
    pairs: list[Pair] = []
    titles: dict[str, tuple[str, int]] = {}
    for line_no, row in read_jsonl(path):
        for f in (*REQUIRED, "cot"):
            value = row.get(f, "" if f == "cot" else None)
            if not isinstance(value, str) or (f != "cot" and not value.strip()):
                raise DataError(path, line_no, f, f"expected a non-empty string, got {value!r}"
                                if f != "cot" else f"expected a string, got {value!r}")
        cot = row.get("cot", "").strip()
        if tokenizer is not None and cot:
            n = len(tokenizer(cot, add_special_tokens=False)["input_ids"])
            if n > cot_max_tokens:
                raise DataError(path, line_no, "cot", f"{n} tokens, more than cot_max_tokens={cot_max_tokens}")
        if dataset is not None:
            if row["query_id"] not in dataset.queries:
                raise DataError(path, line_no, "query_id", f"unknown query id {row['query_id']!r}")
            if row["item_id"] not in dataset.catalog:
                raise DataError(path, line_no, "item_id", f"unknown item id {row['item_id']!r}")
        seen = titles.setdefault(row["item_id"], (row["item_title"], line_no))
        if seen[0] != row["item_title"]:
            raise DataError(path, line_no, "item_title", f"item {row['item_id']!r} has another title on line {seen[1]}")
        pairs.append(Pair(row["query_id"], row["query"], row["item_id"], row["item_title"], cot))
    if not pairs:
        raise DataError(path, None, None, "no triplets (the file is empty)")
    return pairs


def pairs_from_qrels(dataset, split: str = "train") -> list[Pair]:
    """(query, relevant item) pairs of one split, in a fixed order, without CoTs."""
    queries = dataset.split_queries(split)
    return [Pair(qid, q.text, iid, dataset.catalog[iid].title)
            for qid, q in sorted(queries.items()) for iid in sorted(dataset.relevant(qid))]


def rl_holdout(query_ids, share: float, seed: int = 0) -> set[str]:
    """The query ids held back for RL: a fixed share of `query_ids`, chosen by a seeded hash of
    each id (the same ids whatever else is in the set).

    >>> sorted(rl_holdout([f"q{i}" for i in range(10)], 0.3))
    ['q4', 'q6']
    """
    import hashlib

    def u(q: str) -> float:  # a uniform number in [0, 1) per (seed, id)
        return int.from_bytes(hashlib.sha256(f"{seed}:{q}".encode()).digest()[:8], "big") / 2**64

    return {q for q in query_ids if u(q) < share}


def build_pairs(triplets=None, dataset=None, split: str = "train", tokenizer=None, cot_max_tokens: int = 16,
                use_cot: bool = True, rl_share: float = 0.0, seed: int = 0) -> tuple[list[Pair], list[Pair]]:
    """(training pairs, RL pairs): the triplet file's pairs, then the split's qrels pairs of the
    queries it lacks; of those qrels-only queries a share `rl_share` is held back for stage 2
    (queries with a teacher CoT are never held back: they are the scarce ones).

    Cold start and the direct baseline call this with the same inputs, so they see the same
    (query, item) pairs and hold back the same RL pairs; `use_cot=False` drops the CoTs.
    """
    if triplets is None and dataset is None:
        raise ValueError("give a triplet/pair file, a dataset folder and split, or both")
    pairs = load_triplets(triplets, tokenizer, cot_max_tokens, dataset) if triplets is not None else []
    held: list[Pair] = []
    if dataset is not None:
        have = {p.query_id for p in pairs}
        rest = [p for p in pairs_from_qrels(dataset, split) if p.query_id not in have]
        out = rl_holdout({p.query_id for p in rest}, rl_share, seed)
        pairs += [p for p in rest if p.query_id not in out]
        held = [p for p in rest if p.query_id in out]
    if not use_cot:
        pairs = [Pair(p.query_id, p.query, p.item_id, p.item_title, None) for p in pairs]
    return pairs, held


def write_pairs(path, pairs: list[Pair]) -> None:
    """Write pairs as JSONL (the format `load_triplets` reads; `cot` only where there is one)."""
    from .._io import write_jsonl

    write_jsonl(path, [{k: v for k, v in vars(p).items() if v is not None} for p in pairs])


def collate(model, pairs: list[Pair]) -> dict[str, torch.Tensor]:
    """Right-padded token batches for `LREMLoss` (see its docstring for the columns).

    The SFT targets are the tokens after `<think>`: the CoT, `</think>` and `<emb>`; everything
    before (system prompt, instruction, query) is not a target. Pairs without a CoT get none.
    """
    tok, cfg, pad = model.tokenizer, model.config, model.tokenizer.pad_token_id
    prompt_texts = model.query_prompts([p.query for p in pairs])
    prompt_ids = tok(prompt_texts, add_special_tokens=False)["input_ids"]
    q_ids = tok([t + close_cot(p.cot or "", cfg) for t, p in zip(prompt_texts, pairs)],
                add_special_tokens=False)["input_ids"]
    d_ids = tok(model.item_texts([p.item_title for p in pairs]), add_special_tokens=False)["input_ids"]
    pos, tgt = [], []
    for p, prompt, full in zip(pairs, prompt_ids, q_ids):
        n = len(prompt)  # the prompt ends with <think>: the next token is the first target
        if p.cot is None:
            pos.append([0]), tgt.append([IGNORE])
        else:
            pos.append(list(range(n - 1, len(full) - 1))), tgt.append(full[n:])
    qid = [p.query_id for p in pairs]
    iid = [p.item_id for p in pairs]
    exclude = torch.tensor([[qid[i] == qid[j] or iid[i] == iid[j] for j in range(len(pairs))]
                            for i in range(len(pairs))])  # (B, B) other positives: not negatives
    q, qm = _pad(q_ids, pad)
    d, dm = _pad(d_ids, pad)
    return {"q_ids": q, "q_mask": qm, "d_ids": d, "d_mask": dm, "exclude": exclude,
            "sft_pos": _pad(pos, 0)[0], "sft_tgt": _pad(tgt, IGNORE)[0]}


def _pad(seqs: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [value] * (width - len(s)) for s in seqs])  # (B, T)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])  # (B, T)
    return ids, mask


def batch_indices(n: int, step: int, batch_size: int, world: int, rank: int, seed: int) -> list[int]:
    """Indices of this process's part of the global batch of `step`: a function of (seed, step) only,
    so a resumed run sees exactly the batches an uninterrupted one would.

    >>> batch_indices(8, 0, 2, 2, 0, 0) + batch_indices(8, 0, 2, 2, 1, 0) == batch_indices(8, 0, 4, 1, 0, 0)
    True
    """
    per_epoch = n // (batch_size * world)
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    start = (i * world + rank) * batch_size
    return perm[start : start + batch_size].tolist()


class BatchSampler:
    """Which pairs make up each step's batch, a function of (seed, step) only.

    With `cot_share` = 0 the batch is drawn from all pairs alike (an epoch is one permutation).
    With `cot_share` > 0, round(batch_size * cot_share) of each batch are pairs with a teacher
    CoT and the rest pairs without, each pool cycling through its own permutations: where
    CoTs are scarce (the paper's data has one for every pair; ours, few), cold start still
    sees them, and the direct baseline, built on the same flags, sees the same (query, item)s.

    >>> s = BatchSampler([True, True, False, False, False, False], 4, cot_share=0.5)
    >>> [sum(i < 2 for i in s(step, 1, 0)) for step in range(3)]  # two CoT pairs in every batch
    [2, 2, 2]
    """

    def __init__(self, has_cot: list[bool], batch_size: int, cot_share: float = 0.0, seed: int = 0):
        self.seed, self.bs = seed, batch_size
        if cot_share > 0:
            cot = [i for i, h in enumerate(has_cot) if h]
            rest = [i for i, h in enumerate(has_cot) if not h]
            n_cot = max(1, round(batch_size * cot_share))
            self.pools = [(cot, n_cot), (rest, batch_size - n_cot)]
        else:
            self.pools = [(list(range(len(has_cot))), batch_size)]
        self.pools = [(pool, k) for pool, k in self.pools if k > 0]

    def steps_per_epoch(self, world: int) -> int:
        """Steps until the largest pool has been seen once; an error if a pool cannot fill a batch."""
        for pool, k in self.pools:
            if len(pool) < k * world:
                raise ValueError(f"{len(pool)} pairs for a pool that needs {k} per process x {world} processes "
                                 "per step (fewer than one global batch; check the data or cot_share)")
        return max(len(pool) // (k * world) for pool, k in self.pools)

    def __call__(self, step: int, world: int, rank: int) -> list[int]:
        self.steps_per_epoch(world)
        return [pool[i] for j, (pool, k) in enumerate(self.pools)
                for i in batch_indices(len(pool), step, k, world, rank, self.seed + 7919 * j)]


# ---------------------------------------------------------------- schedule and checkpoints

def lr_factor(step: int, total: int, warmup: int, schedule: str = "cosine") -> float:
    """Multiplier of the peak lr at `step`: 1) linear warmup, 2) cosine decay to 0 (or constant)."""
    import math

    if step < warmup:  # 1) warmup
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)  # 2) cosine
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def check_output(out: Path, resume: bool, overwrite: bool, inputs=()) -> Path | None:
    """Before any work: may `out` be written? Returns the checkpoint to resume from, if any.

    A foreign folder is refused (`lrem._io.prepare_output`), and an earlier run unless `resume`
    (continue it) or `overwrite` (start over: `claim_output` deletes it).
    """
    ckpt = last_checkpoint(out)
    if ckpt is not None and not (resume or overwrite):
        raise ValueError(f"{out} already has checkpoints ({ckpt.name}); pass --resume to continue, --overwrite to "
                         "start over, or use a new --out")
    prepare_output(out, inputs, overwrite=overwrite, resume=resume,  # e.g. --model runs/a --out runs/a
                   run_files=("checkpoints",) if resume else ())
    return ckpt if resume else None


def claim_output(out: Path, resume: bool, overwrite: bool) -> None:
    """Once the inputs are checked, before the first write: make `out` lrem's run folder
    (checkpoints go into it as training goes), deleting an earlier run there for `overwrite`."""
    if overwrite and not resume and out.exists():
        shutil.rmtree(out)
    claim_dir(out)


def last_checkpoint(out) -> Path | None:
    """The newest complete checkpoint folder under `out/checkpoints`, or None."""
    folder = Path(out) / "checkpoints"
    found = sorted(p for p in folder.glob("step-*") if (p / TRAIN_STATE).exists()) if folder.exists() else []
    return found[-1] if found else None


def mixed_precision(bf16: bool | None) -> str:
    """Accelerate's mixed_precision for a config's `bf16` (None: bfloat16 where the hardware has it
    natively, `lrem.backbones.default_dtype`)."""
    from ..backbones import default_dtype

    if bf16 is None:
        bf16 = default_dtype("cuda" if torch.cuda.is_available() else "cpu") == torch.bfloat16
    return "bf16" if bf16 else "no"


def save_checkpoint(out, model, optimizer, scheduler, state: dict, keep: int, adapter=None,
                    extra: dict | None = None) -> Path:
    """Write `out/checkpoints/step-N` (the model, or with LoRA its `adapter`; optimizer, scheduler,
    RNG, train state; `extra`: more trainer state as tensors, e.g. RL's item bank, read back by
    `load_checkpoint_extra`) and delete all but the newest `keep`."""
    path = Path(out) / "checkpoints" / f"step-{state['step']:07d}"
    with atomic_dir(path) as tmp:
        if adapter is not None:
            save_adapter(adapter, tmp / ADAPTER)  # the base is the run's own: a few MB instead of the model
        else:
            model.save_pretrained(tmp / "model")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state()}, tmp / "trainer.pt")
        if extra:
            torch.save(extra, tmp / EXTRA)
        write_json(tmp / TRAIN_STATE, state)
    for old in sorted((Path(out) / "checkpoints").glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint_extra(ckpt: Path) -> dict:
    """The `extra` trainer state `save_checkpoint` wrote ({} when none)."""
    path = Path(ckpt) / EXTRA
    return torch.load(path, weights_only=True) if path.exists() else {}


def check_resume(ckpt: Path | None, cfg) -> None:
    """Before loading anything from `ckpt`: it continues only a run with the same LoRA settings
    (a LoRA checkpoint holds an adapter, a full one the model)."""
    if ckpt is None:
        return
    prev, now = json.loads((ckpt / TRAIN_STATE).read_text()).get("lora"), lora_settings(cfg)
    if prev != now:
        raise ValueError(f"{ckpt}: LoRA {prev or 'off (full fine-tuning)'} in the checkpoint but "
                         f"{now or 'off (lora_r=0)'} now; resume needs the same lora_* settings")


def resume_source(ckpt: Path | None, cfg, base: str) -> str:
    """The folder a run's model loads from: the checkpoint's model when full fine-tuning resumes;
    else `base` (a fresh run, or a LoRA checkpoint, whose adapter goes over the run's own base)."""
    return str(ckpt / "model") if ckpt is not None and cfg.lora_r == 0 else str(base)


def load_checkpoint(ckpt: Path, optimizer, scheduler, expect: dict) -> int:
    """Restore optimizer, scheduler and torch RNG from `ckpt`; return the step it ended.

    `expect` (world_size, total_steps, seed, batch_size, examples) must equal the checkpoint's:
    any other value would not continue the same run.
    """
    prev = json.loads((ckpt / TRAIN_STATE).read_text())
    for key, now in expect.items():
        if prev[key] != now:
            raise ValueError(f"{ckpt}: {key}={prev[key]} in the checkpoint but {now} now; resume needs the "
                             "same data, batch, steps, seed and processes")
    try:  # tensors and plain containers only: a checkpoint file cannot run code when loaded
        saved = torch.load(ckpt / "trainer.pt", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise ValueError(f"{ckpt / 'trainer.pt'}: cannot load the optimizer state ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); delete this checkpoint to resume from an "
                         "earlier one") from None
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    return prev["step"]


def make_optimizer(module, cfg, total: int, warmup: int):
    """AdamW over `module`'s trainable parameters (with LoRA: the adapters and token rows) at
    `cfg.learning_rate`, and its per-step schedule (`lr_factor`); any config with learning_rate,
    weight_decay and lr_schedule (SFTConfig, RLConfig)."""
    optimizer = torch.optim.AdamW(trainable_parameters(module), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, cfg.lr_schedule))
    return optimizer, scheduler


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
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState

    from ..model import LREM

    out = Path(out)
    # Accelerate keeps its settings in a process-wide singleton: start each run (a library caller may
    # train twice, e.g. once in float32, once in bf16) from a clean one; the process group stays.
    AcceleratorState._reset_state()
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision(cfg.bf16),
                      kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.sft_weight == 0)])
    main = acc.is_main_process
    say = log if main else (lambda *_: None)
    torch.manual_seed(cfg.seed)
    ckpt = check_output(out, resume, overwrite, inputs=(cfg.model, triplets))
    if resume and ckpt is None:
        say(f"no checkpoint under {out / 'checkpoints'}; starting from {cfg.model}")
    check_resume(ckpt, cfg)
    model = LREM.from_pretrained(resume_source(ckpt, cfg, cfg.model), dtype="float32", log=say)
    model.source = cfg.model
    if cfg.cot_max_tokens is not None:  # the prompt config owns l; the model trained with it keeps it
        model.config.cot_max_tokens = cfg.cot_max_tokens
    adapter = add_lora(model, cfg, ckpt) if cfg.lora_r else None
    pairs, held = build_pairs(triplets, dataset, split, model.tokenizer, model.config.cot_max_tokens, True,
                              cfg.rl_holdout, cfg.seed)
    # the batches depend on which pairs have a teacher CoT (cot_share), for cold start and the
    # direct baseline alike; only then does the baseline drop the CoTs
    sampler = BatchSampler([p.cot is not None for p in pairs], cfg.batch_size, cfg.cot_share, cfg.seed)
    if not cfg.use_cot:
        pairs = [Pair(p.query_id, p.query, p.item_id, p.item_title, None) for p in pairs]
    if main:
        claim_output(out, resume, overwrite)
        if held:
            write_pairs(out / RL_PAIRS, held)  # stage 2's pairs, never seen here
    dev = make_dev_eval(cfg, dataset, "reason" if cfg.use_cot else "direct") if main else None
    if dev is not None:
        say(f"dev eval every {cfg.eval_steps} steps: {dev}")

    world, rank, bs = acc.num_processes, acc.process_index, cfg.batch_size
    total = cfg.max_steps or sampler.steps_per_epoch(world) * cfg.num_epochs
    warmup = int(round(cfg.warmup_ratio * total))
    say(f"{len(pairs)} pairs ({sum(p.cot is not None for p in pairs)} with a CoT; {len(held)} held back for RL), "
        f"{world} process(es) x "
        f"batch {bs}, {total} steps, warmup {warmup}, config {json.dumps(cfg.to_dict())}")

    if cfg.gradient_checkpointing:
        enable = getattr(model.lm, "activation_checkpointing_enable", None) or model.lm.gradient_checkpointing_enable
        enable()
    model.lm.train()
    loss_fn = LREMLoss(model, cfg.sft_weight, cfg.infonce_weight, cfg.temperature)
    optimizer, scheduler = make_optimizer(loss_fn, cfg, total, warmup)
    start = 0
    if ckpt is not None:
        start = load_checkpoint(ckpt, optimizer, scheduler, {"world_size": world, "total_steps": total,
                                "seed": cfg.seed, "batch_size": bs, "examples": len(pairs)})
        say(f"resuming from {ckpt} at step {start}")
    wrapped, optimizer = acc.prepare(loss_fn, optimizer)

    writer = None
    if main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"))
    state = {"step": start, "total_steps": total, "world_size": world, "batch_size": bs, "global_batch_size": bs * world,
             "seed": cfg.seed, "examples": len(pairs), "precision": acc.mixed_precision, "config": cfg.to_dict(),
             "lora": lora_settings(cfg),
             "losses": {},
             "data": ", ".join(x for x in (str(triplets or ""), dataset and f"{dataset.name} ({split} qrels)") if x)}
    end = min(total, stop_after_step or total)
    t0, t_log, s_log = time.time(), time.time(), start
    bar = tqdm(range(start, end), initial=start, total=total, desc="train", unit="step", disable=not main)
    for step in bar:
        idx = sampler(step, world, rank)
        batch = {k: v.to(acc.device) for k, v in collate(model, [pairs[i] for i in idx]).items()}
        with acc.autocast():
            parts = wrapped(batch)
        loss = sum(loss_fn.weights[k] * v for k, v in parts.items())
        acc.backward(loss)
        # the norm before clipping (max_grad_norm 0: an infinite bound, which scales by 1)
        grad_norm = acc.clip_grad_norm_(wrapped.parameters(), cfg.max_grad_norm or float("inf"))
        lr = scheduler.get_last_lr()[0]  # the lr this step used
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if done % cfg.logging_steps == 0 or done == end:
            vals = {k: acc.reduce(v.detach().float(), "mean").item() for k, v in {**parts, "total": loss}.items()}
            dt = max(time.time() - t_log, 1e-9)
            speed = {"steps_per_s": (done - s_log) / dt, "samples_per_s": (done - s_log) * bs * world / dt}
            t_log, s_log = time.time(), done
            state["losses"] = vals
            if writer is not None:
                for k, v in vals.items():
                    writer.add_scalar(f"loss/{k}", v, done)
                writer.add_scalar("lr", lr, done)
                writer.add_scalar("grad_norm", float(grad_norm), done)
                for k, v in speed.items():
                    writer.add_scalar(f"throughput/{k}", v, done)
            bar.set_postfix(loss=f"{vals['total']:.4f}", lr=f"{lr:.2e}",
                            it_s=f"{speed['steps_per_s']:.2f}")
        state["step"] = done
        if cfg.eval_steps and (done % cfg.eval_steps == 0 or done == end):
            acc.wait_for_everyone()
            if dev is not None:
                state["dev"] = log_dev(dev, model, done, writer, bar)
        if done < total and ((cfg.save_steps and done % cfg.save_steps == 0) or done == end):  # the last is the model
            acc.wait_for_everyone()
            if main:
                save_checkpoint(out, model, optimizer, scheduler, state, cfg.save_total_limit, adapter)
    bar.close()
    state["seconds"] = round(time.time() - t0, 2)
    acc.wait_for_everyone()
    if writer is not None:
        writer.close()
    if main and state["step"] == total:
        if adapter is not None:
            merge_lora(model, adapter)
        _save_final(out, model, state)
        say(f"wrote {out} ({total} steps, {state['seconds']:.0f} s)")
    acc.wait_for_everyone()
    acc.end_training()
    return state


def training_stage(state: dict) -> dict:
    """What the model card and lrem_config.json record of a finished run (from its train state)."""
    cfg = state.get("config", {})
    name = "rl" if "init" in state else "coldstart" if cfg.get("use_cot", True) else "direct"
    stage = {"stage": name, "steps": state.get("step"), "examples": state.get("examples"),
             "data": state.get("pairs") or state.get("data"), "init": state.get("init") or cfg.get("model"),
             "batch_size": state.get("global_batch_size", state.get("batch_size")),
             "learning_rate": cfg.get("learning_rate"), "seed": state.get("seed")}
    if state.get("lora"):  # trained as LoRA adapters (merged into the saved weights)
        stage["lora"] = state["lora"]
    return stage


def _save_final(out: Path, model, state: dict, keep: tuple[str, ...] = ("checkpoints", "tb", RL_PAIRS)) -> None:
    """Replace `out` atomically by the model folder; checkpoints, logs and the `keep` files move into it."""
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, stage=training_stage(state))
        write_json(tmp / TRAIN_STATE, state)
        for sub in keep:
            if (out / sub).exists():
                os.replace(out / sub, tmp / sub)
