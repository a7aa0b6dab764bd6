"""lrem.train: training methods as config + trainer pairs (`sft_config.py` + `sft.py`)."""
from .sft import Pair, build_pairs, load_triplets, pairs_from_qrels, train
from .sft_config import SFTConfig

__all__ = ["SFTConfig", "Pair", "build_pairs", "load_triplets", "pairs_from_qrels", "train"]
