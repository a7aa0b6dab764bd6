"""`TrainingConfig`: the values both training stages share (optimisation, precision, logging,
checkpoints, dev eval), as TRL's method configs share `transformers.TrainingArguments`.

`SFTConfig` (stage 1) and `RLConfig` (stage 2) inherit these fields and redeclare a field only
where the stage's default or meaning differs (RL: `learning_rate`, `logging_steps`, ...): one
definition of each setting, which `lrem.train.loop.Run` reads for either stage.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Self

from lrem._config import check_finite, load_config
from lrem.train.lora import LoraOptions, check_lora

# The settings (of either stage) a resumed run may change: they decide what is logged, evaluated
# (on the side: no RNG, weights restored to train mode) and kept, or trade memory for compute
# (gradient_checkpointing: the same gradients), never what trains. Every other field must equal the
# checkpoint's (`lrem.train.checkpoint.load_checkpoint`).
RESUME_FREE = ("logging_steps", "save_steps", "save_total_limit", "eval_steps", "eval_data", "eval_split",
               "eval_queries", "eval_distractors", "samples_per_log", "gradient_checkpointing")


@dataclass
class TrainingConfig(LoraOptions):
    # Optimisation
    learning_rate: float = field(default=2e-5, metadata={
        "help": "Peak AdamW lr. Paper: 1e-5 for a 3B model at batch 16384; 2e-5 suits a 135M model at batch "
                "16-64 (sentence-transformers' default)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    warmup_ratio: float = field(default=0.03, metadata={"help": "Linear warmup share of the steps (paper: 3%)."})
    lr_schedule: str = field(default="cosine", metadata={"help": "cosine (paper) or constant after warmup."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping; 0 = off."})
    batch_size: int = field(default=16, metadata={
        "help": "Pairs per process per step; in-batch negatives are the other pairs of the process."})
    num_epochs: int = field(default=1, metadata={"help": "Passes over the data (paper: 1), unless max_steps."})
    max_steps: int | None = field(default=None, metadata={"help": "Stop after this many steps (overrides epochs)."})
    seed: int = field(default=0, metadata={"help": "Seeds the data order (same seed -> same batches)."})
    # Objective (both stages: in-batch InfoNCE)
    temperature: float = field(default=0.05, metadata={
        "help": "InfoNCE temperature on cosine similarity, stage 1 and stage 2 alike (paper: not given). 0.05 = "
                "scale 20, the sentence-transformers default."})
    # Precision
    bf16: bool | None = field(default=None, metadata={
        "help": "bfloat16 autocast. None (auto): where the hardware computes bfloat16 natively (CUDA; CPUs with "
                "AMX or AVX512-BF16: 1.4x per step on an AVX512-BF16 EPYC), float32 elsewhere (on an AVX2 CPU "
                "bfloat16 is ~6x slower)."})
    # Logging and checkpoints
    logging_steps: int = field(default=10, metadata={"help": "TensorBoard scalars every N steps."})
    save_steps: int = field(default=100, metadata={"help": "Checkpoint (model + optimizer) every N steps; 0 = off."})
    save_total_limit: int = field(default=2, metadata={"help": "Checkpoints kept (oldest deleted)."})
    eval_steps: int = field(default=0, metadata={
        "help": "Every N steps (and at the end), dev hitrate@10 and nDCG@10 on a small fixed sample go to "
                "TensorBoard (dev/...) and train_state.json; 0 = off. Needs eval_data or --data."})
    eval_data: str | None = field(default=None, metadata={"help": "Dataset folder for eval_steps (default: --data)."})
    eval_split: str = field(default="dev", metadata={"help": "Split the eval queries come from."})
    eval_queries: int = field(default=32, metadata={"help": "Queries in the fixed eval sample."})
    eval_distractors: int = field(default=500, metadata={
        "help": "Catalog items besides the sample's judged ones (re-embedded at each eval)."})

    def __post_init__(self):
        """The shared fields' checks; each stage's `__post_init__` calls this first, then checks its own."""
        check_finite(self)  # first, for every stage's fields: a NaN passes the range checks (temperature <= 0)
        check_lora(self)
        if self.eval_steps < 0 or self.eval_queries < 1 or self.eval_distractors < 0:
            raise ValueError(f"eval_steps={self.eval_steps}, eval_queries={self.eval_queries}, "
                             f"eval_distractors={self.eval_distractors}; need >= 0, >= 1, >= 0")
        for name in ("batch_size", "num_epochs", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; need >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps={self.max_steps}; need >= 1 (or null for num_epochs)")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio={self.warmup_ratio}; need 0 <= warmup_ratio < 1")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule={self.lr_schedule!r}; expected cosine or constant")
        if self.save_steps < 0 or self.save_total_limit < 1:
            raise ValueError(f"save_steps={self.save_steps}, save_total_limit={self.save_total_limit}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def load(cls, path=None, **overrides) -> Self:
        """Defaults, then a YAML file of values, then `overrides` (None values are ignored).

        An unknown key or a value of the wrong type raises a ValueError naming file and key.
        """
        return load_config(cls, path, overrides)
