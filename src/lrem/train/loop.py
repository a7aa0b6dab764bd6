"""The training loop both stages run, on Accelerate: process set-up, resume, optimizer and
schedule, TensorBoard, progress bar, dev eval, checkpoints and the final save.

A stage (`lrem.train.sft.train`, `lrem.train.grpo.train_rl`) makes a `Run`, loads its model
and data through it, then hands `Run.fit` a step function (one step's batch, forward and
`Run.optimize`) and a log function (the step's scalars); `fit` does the rest:

    run = Run(cfg, out, resume, overwrite, inputs=(cfg.model, data), log=print)
    model = run.load_model(cfg.model, cfg.model)
    run.add_lora(model)
    ...                                        # data, loss, the train state
    return run.fit(model, loss_fn, total, state, step, log_step, desc="train")
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .._io import record_files
from .checkpoint import (base_identity, check_output, check_resume, claim_output, load_checkpoint,
                         load_checkpoint_extra, resume_source, save_checkpoint, save_final)
from .dev_eval import log_dev, make_dev_eval
from .lora import add_lora, merge_lora, trainable_parameters
from .pairs import RL_PAIRS


def lr_factor(step: int, total: int, warmup: int, schedule: str = "cosine") -> float:
    """Multiplier of the peak lr at `step`: 1) linear warmup, 2) cosine decay to 0 (or constant)."""
    import math

    if step < warmup:  # 1) warmup
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)  # 2) cosine
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def mixed_precision(bf16: bool | None) -> str:
    """Accelerate's mixed_precision for a config's `bf16` (None: bfloat16 where the hardware has it
    natively, `lrem.backbones.default_dtype`)."""
    from ..backbones import default_dtype

    if bf16 is None:
        bf16 = default_dtype("cuda" if torch.cuda.is_available() else "cpu") == torch.bfloat16
    return "bf16" if bf16 else "no"


def make_optimizer(module, cfg, total: int, warmup: int):
    """AdamW over `module`'s trainable parameters (with LoRA: the adapters and token rows) at
    `cfg.learning_rate`, and its per-step schedule (`lr_factor`); `cfg`: a `TrainingConfig`."""
    optimizer = torch.optim.AdamW(trainable_parameters(module), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, cfg.lr_schedule))
    return optimizer, scheduler


SHARDED = ("FSDP", "DEEPSPEED")  # Accelerate's distributed types whose processes hold weight shards


def warmup_steps(cfg, total: int) -> int:
    """The linear warmup's steps: `cfg.warmup_ratio` of `total`."""
    return int(round(cfg.warmup_ratio * total))


class Run:
    """One training run of either stage: the Accelerate processes, the output folder, the
    checkpoint to resume from, and (in `fit`) the optimizer and the loop.

    Made first, before any model or data is loaded: it checks that `out` may be written
    (`lrem.train.checkpoint.check_output`) and finds the checkpoint (`self.ckpt`) when `resume`.

    Args:
        cfg: the stage's config (a `TrainingConfig`).
        out: output folder.
        resume, overwrite: as the stages' arguments.
        inputs: the run's input paths, which `out` must not be.
        log: where the main process's messages go (the others are silent).
        find_unused_parameters: DDP's (parameters without a gradient in a step).
    """

    def __init__(self, cfg, out, resume: bool = False, overwrite: bool = False, inputs=(), log=print,
                 find_unused_parameters: bool = False):
        from accelerate import Accelerator, DistributedDataParallelKwargs
        from accelerate.state import AcceleratorState

        self.cfg, self.out, self.resume, self.overwrite = cfg, Path(out), resume, overwrite
        # Accelerate keeps its settings in a process-wide singleton: start each run (a library caller may
        # train twice, e.g. once in float32, once in bf16) from a clean one; the process group stays.
        AcceleratorState._reset_state()
        self.acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision(cfg.bf16),
                               kwargs_handlers=[DistributedDataParallelKwargs(
                                   find_unused_parameters=find_unused_parameters)])
        self.main = self.acc.is_main_process
        self.say = log if self.main else (lambda *_: None)
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        torch.manual_seed(cfg.seed)
        self.ckpt = check_output(self.out, resume, overwrite, inputs=inputs)
        if self.ckpt is not None and self.sharded:  # the optimizer state is sharded; the checkpoint has rank 0's
            raise ValueError(f"{self.ckpt}: resuming under {self.acc.distributed_type.value} is not supported yet; "
                             f"start a new run from its gathered weights (--init {self.ckpt / 'model'})")
        self.base = None  # the base model's identity (`load_model`), which a resume must match
        self.adapter = None  # the LoRA adapter (`add_lora`), or None: full fine-tuning
        self.wrapped = self.optimizer = self.scheduler = None  # set by `fit`, used by the step function
        self.start, self.t0 = 0, time.time()  # the step `fit` starts at, and when

    def load_model(self, base, source: str):
        """The model to train: from `base` (a fresh run, or a LoRA checkpoint, whose adapter `add_lora`
        loads), or the checkpoint's when full fine-tuning resumes; `source` is what it records as its origin."""
        from ..model import LREM

        check_resume(self.ckpt, self.cfg, base)
        self.base = base_identity(base)
        model = LREM.from_pretrained(resume_source(self.ckpt, self.cfg, base), dtype="float32", log=self.say)
        model.source = source
        return model

    def add_lora(self, model):
        """With `cfg.lora_r` > 0: LoRA adapters on `model` (the checkpoint's when resuming), kept for
        the checkpoints and merged into the final model. Returns the adapter, or None."""
        if self.cfg.lora_r and self.sharded:  # the merge and the adapter checkpoints read whole modules
            raise ValueError(f"lora_r={self.cfg.lora_r} under {self.acc.distributed_type.value}: LoRA runs data "
                             "parallel only (configs/accelerate/ddp.yaml); its optimizer state is small")
        self.adapter = add_lora(model, self.cfg, self.ckpt) if self.cfg.lora_r else None
        return self.adapter

    def dev_eval(self, dataset, mode: str):
        """The main process's `DevEval` when `cfg.eval_steps` asks for one (see `make_dev_eval`), else None."""
        dev = make_dev_eval(self.cfg, dataset, mode) if self.main else None
        if dev is not None:
            self.say(f"dev eval every {self.cfg.eval_steps} steps: {dev}")
        return dev

    @property
    def sharded(self) -> bool:
        """Whether each process holds only a shard of the weights (FSDP, DeepSpeed ZeRO-3)."""
        return self.acc.distributed_type.value in SHARDED

    def full_weights(self) -> dict | None:
        """Under FSDP / ZeRO-3, the whole backbone's weights (keys as `model.lm`'s state dict),
        gathered from every process's shard: every process must call it, the main one gets them
        (`Accelerator.get_state_dict`; the others get None). Otherwise None: each process's
        module is whole, and saving reads it directly."""
        if not self.sharded:
            return None
        full = self.acc.get_state_dict(self.wrapped)  # keys of the wrapped loss: "model.lm.<name>"
        if not self.main:
            return None
        prefix = "model.lm."
        return {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}

    def optimize(self, loss: torch.Tensor) -> tuple[torch.Tensor, float]:
        """One optimizer update from `loss` (the step function calls it once per update; the
        schedule steps once per training step, in `fit`). Returns (grad norm, the lr it used)."""
        self.acc.backward(loss)
        # the norm before clipping (max_grad_norm 0: an infinite bound, which scales by 1)
        grad_norm = self.acc.clip_grad_norm_(self.wrapped.parameters(), self.cfg.max_grad_norm or float("inf"))
        lr = self.scheduler.get_last_lr()[0]  # the lr this step used
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, lr

    def fit(self, model, loss_fn, total: int, state: dict, step: Callable, log_step: Callable, desc: str,
            dev=None, stop_after_step: int | None = None, on_claim: Callable | None = None, extra=None,
            before_final: Callable | None = None,
            keep: tuple[str, ...] = ("checkpoints", "tb", RL_PAIRS)) -> dict:
        """Train `total` steps (or up to `stop_after_step`) from the checkpoint's step or 0, then save
        the model folder `out` (with `keep` moved into it). Returns `state`.

        Args:
            model: the LREM being trained (dev eval, checkpoints, the final save).
            loss_fn: the loss module holding it; its trainable parameters are optimised. Wrapped by
                Accelerate as `self.wrapped`, which the step function calls.
            total: the run's steps (the schedule's length).
            state: the train state, the stage's keys in it (`lrem.train.checkpoint.RESUME_KEYS` among them);
                `fit` adds "base" and keeps "step" (and "dev", "seconds") up to date, and checkpoints and
                the final model save it.
            step: `step(s) -> result`, step s (from 0) on every process: the batch, forward, `optimize`.
            log_step: `log_step(done, result) -> (scalars, postfix)` every `cfg.logging_steps` steps and
                at the end, on every process (it may reduce across them): `scalars` go to TensorBoard,
                `postfix` to the progress bar.
            desc: the progress bar's label.
            dev: a `DevEval` (main process) run every `cfg.eval_steps` steps and at the end.
            stop_after_step: end after this step (checkpoint and return, no final model).
            on_claim: `on_claim(start)`, main process, once `out` is claimed: the stage's own files.
            extra: more trainer state to checkpoint and restore (`state_dict`/`load_state_dict`).
            before_final: main process, before the final save (e.g. plots into `out`).
            keep: files of `out` the final model folder takes over.
        """
        cfg, acc, out = self.cfg, self.acc, self.out
        self.optimizer, self.scheduler = make_optimizer(loss_fn, cfg, total, warmup_steps(cfg, total))
        start = 0
        state["base"] = self.base
        if self.ckpt is not None:
            start = load_checkpoint(self.ckpt, self.optimizer, self.scheduler, state)
            if extra is not None:  # the state an uninterrupted run would hold
                extra.load_state_dict(load_checkpoint_extra(self.ckpt))
            self.say(f"resuming from {self.ckpt} at step {start}")
        self.wrapped, self.optimizer = acc.prepare(loss_fn, self.optimizer)

        writer = None
        if self.main:  # the inputs are checked: from here on the run writes
            from torch.utils.tensorboard import SummaryWriter

            claim_output(out, self.resume, self.overwrite)
            if on_claim is not None:
                on_claim(start)
            record_files(out, "tb")  # before SummaryWriter makes it
            # a resume drops the events an interrupted run logged after its checkpoint (they come again)
            writer = SummaryWriter(str(out / "tb"), purge_step=start + 1 if start else None)
        state["step"] = start
        end = min(total, stop_after_step or total)
        self.start, self.t0 = start, time.time()
        bar = tqdm(range(start, end), initial=start, total=total, desc=desc, unit="step", disable=not self.main)
        for s in bar:
            result = step(s)
            self.scheduler.step()
            done = s + 1
            if done % cfg.logging_steps == 0 or done == end:
                scalars, postfix = log_step(done, result)
                if writer is not None:
                    for k, v in scalars.items():
                        writer.add_scalar(k, v, done)
                bar.set_postfix(**postfix)
            state["step"] = done
            if cfg.eval_steps and (done % cfg.eval_steps == 0 or done == end):
                acc.wait_for_everyone()
                if dev is not None:
                    state["dev"] = log_dev(dev, model, done, writer, bar)
            if done < total and ((cfg.save_steps and done % cfg.save_steps == 0) or done == end):  # the last is the model
                acc.wait_for_everyone()
                weights = self.full_weights()  # every process: a sharded model is gathered
                if self.main:
                    save_checkpoint(out, model, self.optimizer, self.scheduler, state, cfg.save_total_limit,
                                    self.adapter, extra.state_dict() if extra is not None else None, weights)
        bar.close()
        state["seconds"] = round(time.time() - self.t0, 2)
        acc.wait_for_everyone()
        if writer is not None:
            writer.close()
        weights = self.full_weights() if state["step"] == total else None
        if self.main and state["step"] == total:
            if before_final is not None:
                before_final()
            if self.adapter is not None:
                merge_lora(model, self.adapter)
            save_final(out, model, state, keep, weights)
            self.say(f"wrote {out} ({total} steps, {state['seconds']:.0f} s)")
        acc.wait_for_everyone()
        acc.end_training()
        return state
