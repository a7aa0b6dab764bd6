"""Settings of `lrem construct` (`ConstructConfig`, every knob of the triplet pipeline in
`lrem.construct`): defaults, then a YAML file (`configs/construct.yaml`), then flags."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from lrem._config import check_finite, load_config
from lrem.backbones import BASE_MODEL
from lrem.prompts import COT_MAX_TOKENS

DEFAULT_BAN = ("product", "products", "item", "items", "query", "search", "shopper", "customer", "brand",
               "brands", "attribute", "attributes", "related products", "etc", "none", "n/a", "various",
               "other", "others", "yes", "no", "e-commerce", "online shopping")


@dataclass
class ConstructConfig:
    """Every knob of the triplet pipeline; `config.json` in RUN_DIR records the resolved values."""

    # Which queries
    split: str = field(default="train", metadata={"help": "Dataset split to take queries from."})
    limit: int | None = field(default=None, metadata={"help": "A fixed, seeded sample of N queries (None: all)."})
    seed: int = field(default=0, metadata={"help": "Seed of the query sample and of the hint choice."})
    # 1. Mining
    retriever: str = field(default="bm25", metadata={"help": "The direct retriever: bm25, minilm or MODEL:direct "
                                                     "(any spec lrem.search.build_systems accepts)."})
    k_mine: int = field(default=10, metadata={"help": "Depth at which mining measures hitrate."})
    mine_max_hitrate: float = field(default=0.5, metadata={
        "help": "A query is difficult when hitrate@k_mine < this (0.5: fewer than half its relevant items "
                "in the top k_mine)."})
    keep_all: bool = field(default=False, metadata={"help": "Keep every query, difficult or not."})
    # 2-3. Teacher
    teacher: str = field(default=f"hf:{BASE_MODEL}", metadata={
        "help": "openai:BASE_URL#MODEL, hf:NAME_OR_PATH, file:PATH.jsonl (precomputed CoTs: skips steps 2-3) or "
                "labels (CoTs from the relevant items' titles and categories: label distillation)."})
    teacher_mode: str = field(default="two-step", metadata={
        "help": "two-step (the paper: free reasoning, then extraction of a phrase list) or list (one call: the "
                "phrase list at once; several times cheaper with a local teacher)."})
    candidates: int = field(default=0, metadata={
        "help": "Beyond the paper (grounded reasoning): show the teacher the retriever's top-N titles for the "
                "query (N <= k_gain; 0: none), so it can recognise what it does not know by name."})
    hint: str = field(default="none", metadata={
        "help": "none (the paper) or gold: the teacher also sees one relevant item (rationalisation)."})
    reason_max_tokens: int = field(default=128, metadata={"help": "Token budget of the free reasoning."})
    extract_max_tokens: int = field(default=48, metadata={"help": "Token budget of the extracted phrase list."})
    teacher_batch_size: int = field(default=16, metadata={"help": "hf: chats per generate call."})
    teacher_threads: int | None = field(default=None, metadata={
        "help": "hf: torch threads while generating (None: OMP_NUM_THREADS if set, else the cores the load "
                "average leaves free, checked every batch)."})
    teacher_dtype: str = field(default="auto", metadata={"help": "hf: auto, float32 or bfloat16."})
    teacher_concurrency: int = field(default=8, metadata={
        "help": "openai: requests in flight (a step takes at least this many queries; see batch_size)."})
    teacher_timeout: float = field(default=60.0, metadata={"help": "openai: seconds per request."})
    teacher_retries: int = field(default=4, metadata={"help": "openai: retries of a failed request."})
    teacher_backoff: float = field(default=1.0, metadata={"help": "openai: first retry wait (s), doubled each try."})
    # 4. Post-processing
    student: str = field(default=BASE_MODEL, metadata={
        "help": "Model whose tokenizer counts CoT tokens (the student to be trained)."})
    cot_max_tokens: int = field(default=COT_MAX_TOKENS, metadata={"help": "l in the paper: CoT budget in student tokens."})
    max_phrase_words: int = field(default=6, metadata={"help": "Longer phrases are sentences, not phrases: dropped."})
    ban: list[str] = field(default_factory=lambda: list(DEFAULT_BAN), metadata={
        "help": "Phrases never kept (compared lowercased, punctuation ignored)."})
    ban_file: str | None = field(default=None, metadata={"help": "More banned phrases, one per line."})
    # 5. Gain set
    k_gain: int = field(default=50, metadata={"help": "Depth of set 1 (query) and set 2 (query (cot))."})
    # 6. Judge
    judge: str = field(default="qrels", metadata={"help": "qrels, llm (the teacher), llm:TEACHER_SPEC or "
                                                  "cross-encoder:PATH."})
    judge_threshold: float = field(default=0.5, metadata={"help": "cross-encoder: relevant when score >= this."})
    # Run
    batch_size: int = field(default=16, metadata={
        "help": "Queries per step (at least teacher_concurrency); outcomes are appended per step."})

    # fields that do not change what a query's outcome is: free to differ when a run resumes
    RUNTIME = ("limit", "teacher_batch_size", "teacher_threads", "teacher_concurrency", "teacher_timeout", "teacher_retries",
               "teacher_backoff", "batch_size")

    def __post_init__(self):
        check_finite(self)  # first: a NaN passes the range checks below
        if self.hint not in ("none", "gold"):
            raise ValueError(f"hint={self.hint!r}; expected none or gold")
        if not 0 <= self.candidates <= self.k_gain:
            raise ValueError(f"candidates={self.candidates}; need 0 <= candidates <= k_gain ({self.k_gain})")
        if self.teacher_mode not in ("two-step", "list"):
            raise ValueError(f"teacher_mode={self.teacher_mode!r}; expected two-step or list")
        for name in ("k_mine", "k_gain", "cot_max_tokens", "batch_size", "reason_max_tokens", "extract_max_tokens",
                     "max_phrase_words"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; need >= 1")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit={self.limit}; need >= 1 (or none for all queries)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def load(cls, path=None, **overrides) -> "ConstructConfig":
        """Defaults, then a YAML file of values, then `overrides` (None values are ignored).

        An unknown key or a value of the wrong type raises a ValueError naming file and key.
        """
        return load_config(cls, path, overrides)
