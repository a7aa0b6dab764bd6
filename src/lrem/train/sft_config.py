"""`SFTConfig`: every value of stage-1 training (cold start) and of the direct baseline.

    cfg = SFTConfig.load("configs/coldstart.yaml", max_steps=200)   # defaults < YAML < overrides
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lrem.backbones import BASE_MODEL
from lrem.train.base_config import TrainingConfig


@dataclass
class SFTConfig(TrainingConfig):
    """Stage 1's own fields; optimisation, precision, logging, checkpoints, dev eval and LoRA are
    `TrainingConfig`'s (its defaults are stage 1's)."""

    # Model and objective (LREM_SPEC, "Stage 1: cold start")
    model: str = field(default=BASE_MODEL, metadata={
        "help": "Base: a built-in name, an HF folder or hub name, or an LREM folder."})
    use_cot: bool = field(default=True, metadata={
        "help": "Train the query side on the teacher CoT (`<think> cot </think><emb>`); false = the direct "
                "baseline, `<think></think><emb>` for every query."})
    sft_weight: float = field(default=0.1, metadata={"help": "Weight of L_SFT (paper: 0.1); 0 = InfoNCE only."})
    infonce_weight: float = field(default=1.0, metadata={"help": "Weight of L_InfoNCE (paper: 1.0)."})
    cot_max_tokens: int | None = field(default=None, metadata={
        "help": "l in the paper: the CoT budget. None: the model's own (`PromptConfig.cot_max_tokens`, 16 for a "
                "backbone); a value is written into the trained model, which then generates at most that many "
                "tokens. A training CoT longer than it is an input error."})
    cot_share: float = field(default=0.0, metadata={
        "help": "0: batches drawn from all pairs alike. > 0: this share of every batch is pairs with a teacher CoT "
                "(the paper's pairs all have one; use when CoTs are few). Same batches for cold start and direct."})
    rl_holdout: float = field(default=0.1, metadata={
        "help": "Share of the split's queries without a teacher CoT held back for stage 2 (written to "
                "OUT/rl_pairs.jsonl; the paper keeps 4M of its pairs for RL). Needs --data."})
    # Grounded queries (issue 22): pairs whose rows carry `candidates` (first-stage titles)
    candidates_k: int = field(default=10, metadata={
        "help": "K: the first-stage titles a grounded query is shown; written into the trained model (with pairs "
                "that carry candidates) so that search shows it as many."})
    grounded_share: float = field(default=0.5, metadata={
        "help": "Share of the queries with candidates that are shown them (a seeded hash per query id); the rest "
                "train plain, so one model serves the first-stage search over its own index and the grounded one. "
                "0: none (the plain baseline on the same pairs file)."})
    # Memory
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations (less memory)."})

    def __post_init__(self):
        super().__post_init__()
        if self.cot_max_tokens is not None and self.cot_max_tokens < 1:
            raise ValueError(f"cot_max_tokens={self.cot_max_tokens}; need >= 1 (or null for the model's own)")
        if self.sft_weight < 0 or self.infonce_weight <= 0:
            raise ValueError(f"sft_weight={self.sft_weight}, infonce_weight={self.infonce_weight}; "
                             "need sft_weight >= 0 and infonce_weight > 0")
        if not self.use_cot and self.sft_weight > 0:
            raise ValueError(f"use_cot=false with sft_weight={self.sft_weight}: there is no CoT to train on; "
                             "set sft_weight: 0 (the direct baseline)")
        if self.temperature <= 0 or self.learning_rate <= 0:
            raise ValueError(f"temperature={self.temperature}, learning_rate={self.learning_rate}; need > 0")
        if not 0 <= self.cot_share <= 1:
            raise ValueError(f"cot_share={self.cot_share}; need 0 <= cot_share <= 1")
        if not 0 <= self.grounded_share <= 1 or self.candidates_k < 1:
            raise ValueError(f"grounded_share={self.grounded_share}, candidates_k={self.candidates_k}; "
                             "need 0 <= grounded_share <= 1 and candidates_k >= 1")
        if not 0 <= self.rl_holdout < 1:
            raise ValueError(f"rl_holdout={self.rl_holdout}; need 0 <= rl_holdout < 1")
