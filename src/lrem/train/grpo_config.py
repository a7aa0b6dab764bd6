"""`RLConfig`: every value of LREM stage 2 (GRPO on the reasoning + InfoNCE).

    cfg = RLConfig.load("configs/rl.yaml", max_steps=50)   # defaults < YAML < overrides
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lrem.train.base_config import TrainingConfig


@dataclass
class RLConfig(TrainingConfig):
    """Stage 2's own fields, and the shared ones (`TrainingConfig`) whose default or meaning differs here."""

    # Objective (LREM_SPEC, "Stage 2: RL")
    num_generations: int = field(default=8, metadata={"help": "G: CoTs sampled per query (paper: 8)."})
    grpo_weight: float = field(default=1.0, metadata={"help": "Weight of L_GRPO (paper: 1.0)."})
    infonce_weight: float = field(default=0.1, metadata={
        "help": "Weight of L_InfoNCE over all N*G rollout embeddings (paper: 0.1)."})
    format_weight: float = field(default=0.5, metadata={"help": "Weight of r_format (paper: 0.5)."})
    length_weight: float = field(default=0.2, metadata={"help": "Weight of r_length (paper: 0.2)."})
    acc_weight: float = field(default=1.0, metadata={"help": "Weight of r_acc = 1 - log(rank)/log(N) (paper: 1.0)."})
    novel_weight: float = field(default=0.0, metadata={
        "help": "Weight of r_novel, the share of CoT words the query lacks (not in the paper; 0 = off): rewards "
                "reformulation over echoing the query."})
    cot_max_tokens: int | None = field(default=None, metadata={
        "help": "l: r_length is 1 for a CoT of at most l tokens. None: the policy's own (`PromptConfig`); a value "
                "is written into the trained model."})
    rollout_max_tokens: int = field(default=24, metadata={
        "help": "Sampling budget per CoT; above l so that r_length can tell (a CoT cut here gets r_format 0)."})
    sampling_temperature: float = field(default=1.0, metadata={
        "help": "Rollout sampling temperature (paper: not given; 1.0 samples the policy itself, as TRL does)."})
    top_p: float = field(default=1.0, metadata={"help": "Rollout nucleus sampling (1.0 = off)."})
    clip_eps: float = field(default=0.2, metadata={"help": "PPO clip range (paper: not given; PPO/TRL: 0.2)."})
    kl_coef: float = field(default=0.0, metadata={
        "help": "Weight of a KL term to the frozen stage-1 model (paper: none; TRL's default beta is 0 too). "
                "> 0 loads a reference copy and costs one more forward per step."})
    num_iterations: int = field(default=1, metadata={
        "help": "Policy updates per batch of rollouts (TRL's num_iterations); > 1 makes the clip bite."})
    # What r_acc ranks among (lrem.train.rank_pool)
    rank_pool: str = field(default="batch", metadata={
        "help": "batch: the step's N items (paper); mined: those + hard_negatives per query mined from an index "
                "of the current model; catalog: the positive's rank in the whole item bank. mined and catalog "
                "need rank_data."})
    hard_negatives: int = field(default=7, metadata={
        "help": "mined: items per query from the current model's index (batch 8 + 8 x 7 = 64 items)."})
    refresh_steps: int = field(default=25, metadata={"help": "mined, catalog: re-embed the item bank every N steps."})
    pool_items: int = field(default=0, metadata={
        "help": "mined, catalog: 0 = the whole catalog in the bank; else a seeded sample of N items plus every "
                "RL positive (bounds the refresh cost)."})
    rank_data: str | None = field(default=None, metadata={
        "help": "mined, catalog: dataset folder whose catalog the item bank holds (`lrem train rl --data`)."})
    # Optimisation and logging: TrainingConfig's fields, here with stage 2's defaults and meaning
    learning_rate: float = field(default=1e-6, metadata={"help": "Peak AdamW lr (paper: 1e-6)."})
    batch_size: int = field(default=16, metadata={
        "help": "Queries per process per step (N: their positives are the items r_acc ranks among)."})
    num_epochs: int = field(default=TrainingConfig.num_epochs, metadata={
        "help": "Passes over the RL pairs (paper: 1), unless max_steps."})
    seed: int = field(default=TrainingConfig.seed, metadata={"help": "Seeds the data order and the sampling."})
    logging_steps: int = field(default=1, metadata={"help": "TensorBoard scalars every N steps."})
    save_steps: int = field(default=20, metadata={"help": "Checkpoint every N steps; 0 = off."})
    eval_steps: int = field(default=TrainingConfig.eval_steps, metadata={
        "help": "Every N steps (and at the end), dev hitrate@10 and nDCG@10 on a small fixed sample go to "
                "TensorBoard (dev/...) and train_state.json; 0 = off. Needs eval_data."})
    eval_data: str | None = field(default=TrainingConfig.eval_data, metadata={"help": "Dataset folder for eval_steps."})
    samples_per_log: int = field(default=4, metadata={"help": "Rollouts (query, CoT, reward) written to samples.jsonl per log."})

    def __post_init__(self):
        super().__post_init__()
        if self.cot_max_tokens is not None and self.cot_max_tokens < 1:
            raise ValueError(f"cot_max_tokens={self.cot_max_tokens}; need >= 1 (or null for the policy's own)")
        for name in ("num_generations", "rollout_max_tokens", "num_iterations", "samples_per_log"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; need >= 1")
        if self.num_generations < 2:
            raise ValueError(f"num_generations={self.num_generations}; GRPO compares rollouts, need >= 2")
        if self.batch_size < 2:
            raise ValueError(f"batch_size={self.batch_size}; r_acc ranks among the batch's items, need >= 2")
        if self.rollout_max_tokens < (self.cot_max_tokens or 0):
            raise ValueError(f"rollout_max_tokens={self.rollout_max_tokens} < cot_max_tokens={self.cot_max_tokens}")
        for name in ("grpo_weight", "infonce_weight", "format_weight", "length_weight", "acc_weight", "novel_weight",
                     "kl_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}; need >= 0")
        if self.temperature <= 0 or self.sampling_temperature <= 0 or self.learning_rate <= 0:
            raise ValueError("temperature, sampling_temperature and learning_rate must be > 0")
        if not 0 < self.top_p <= 1 or not 0 < self.clip_eps < 1:
            raise ValueError(f"top_p={self.top_p}, clip_eps={self.clip_eps}; need 0 < top_p <= 1, 0 < clip_eps < 1")
        if self.rank_pool not in ("batch", "mined", "catalog"):
            raise ValueError(f"rank_pool={self.rank_pool!r}; choose batch, mined or catalog")
        if self.rank_pool != "batch" and not self.rank_data:
            raise ValueError(f"rank_pool={self.rank_pool!r} needs rank_data (a dataset folder; `--data`)")
        if self.hard_negatives < 1 or self.refresh_steps < 1 or self.pool_items < 0:
            raise ValueError(f"hard_negatives={self.hard_negatives}, refresh_steps={self.refresh_steps}, "
                             f"pool_items={self.pool_items}; need >= 1, >= 1, >= 0")

    @property
    def reward_weights(self) -> dict[str, float]:
        paper = {"format": self.format_weight, "length": self.length_weight, "acc": self.acc_weight}
        return paper | ({"novel": self.novel_weight} if self.novel_weight else {})
