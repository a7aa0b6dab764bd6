"""lrem.data: the dataset folder format, converters from public benchmarks, and the WordNet task."""
from .converters import (convert, detect_format, from_beir, from_esci, from_wands, read_wands_queries,
                         sample_dataset)
from .formats import (DataError, Dataset, Item, Pair, Query, hash_split, load_catalog, load_dataset, read_jsonl, read_table,
                      sample_query_ids, save_dataset, validate_dataset)
from .wordnet import build_wordnet, content_words

__all__ = [
    "DataError", "Item", "Query", "Pair", "Dataset",
    "load_catalog", "load_dataset", "save_dataset", "read_jsonl", "read_table", "validate_dataset", "hash_split", "sample_query_ids",
    "convert", "detect_format", "from_beir", "from_esci", "from_wands", "read_wands_queries",
    "sample_dataset", "build_wordnet", "content_words",
]
