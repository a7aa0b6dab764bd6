"""lrem.train: training methods as config + trainer pairs (`sft_config.py` + `sft.py`: stage 1 and
the direct baseline; `grpo_config.py` + `grpo.py`: stage 2), on shared parts: `base_config.py`
(the settings both configs share), `loop.py` (the one training loop: a stage supplies its step),
`checkpoint.py` (checkpoints, resume, the final save) and `pairs.py` (pairs, triplets, the RL
hold-out, the batch sampler)."""
from .grpo import train_rl
from .grpo_config import RLConfig
from .pairs import Pair, build_pairs, load_triplets, pairs_from_qrels, rl_holdout
from .sft import train
from .sft_config import SFTConfig

__all__ = ["SFTConfig", "RLConfig", "Pair", "build_pairs", "load_triplets", "pairs_from_qrels", "rl_holdout", "train",
           "train_rl"]
