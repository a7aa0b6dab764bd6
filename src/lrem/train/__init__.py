"""lrem.train: training methods as config + trainer pairs (`sft_config.py` + `sft.py`: stage 1 and
the direct baseline; `grpo_config.py` + `grpo.py`: stage 2)."""
from .grpo import train_rl
from .grpo_config import RLConfig
from .sft import Pair, build_pairs, load_triplets, pairs_from_qrels, rl_holdout, train
from .sft_config import SFTConfig

__all__ = ["SFTConfig", "RLConfig", "Pair", "build_pairs", "load_triplets", "pairs_from_qrels", "rl_holdout", "train",
           "train_rl"]
