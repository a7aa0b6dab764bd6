"""The data both training stages share: (query, item) pairs, triplet files, the RL hold-out and
the batch sampler.

Stage 1 (`lrem.train.sft`) trains on `build_pairs` and writes the held-back pairs to
`rl_pairs.jsonl`; stage 2 (`lrem.train.grpo`) reads them back with `load_rl_pairs`. A batch is a
function of (seed, step) only (`batch_indices`, `BatchSampler`), so a resumed run sees exactly
the batches an uninterrupted one would.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..data import DataError, Pair, read_jsonl  # Pair: one training example (lrem.data, shared with the judges)
from ..prompts import COT_MAX_TOKENS, item_fields

RL_PAIRS = "rl_pairs.jsonl"  # the pairs held back for `lrem train rl`
REQUIRED = ("query_id", "query", "item_id", "item_title")


# ---------------------------------------------------------------- files and splits

def cot_tokens(tokenizer, cot: str) -> int:
    """A teacher CoT's length in `tokenizer`'s tokens, as `load_triplets` holds it to cot_max_tokens."""
    return len(tokenizer(cot.strip(), add_special_tokens=False)["input_ids"])


def load_triplets(path, tokenizer=None, cot_max_tokens: int = COT_MAX_TOKENS, dataset=None, split: str | None = None) -> list[Pair]:
    """Read `triplets.jsonl` ({query_id, query, cot, item_id, item_title} per line, from `lrem construct`;
    optional `candidates`, a grounded query's first-stage titles, from `lrem.grounding.mine_candidates`).

    Raises `DataError` naming file, line and field for: an empty file, a malformed line, a
    missing or non-string field, a CoT longer than `cot_max_tokens` tokens (when `tokenizer` is
    given), an id unknown to `dataset` (when given), a query of another split of `dataset` than
    `split` (when given; "all": any), or one item id with two titles.
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
            n = cot_tokens(tokenizer, cot)
            if n > cot_max_tokens:
                raise DataError(path, line_no, "cot", f"{n} tokens, more than cot_max_tokens={cot_max_tokens}")
        if dataset is not None:
            query = dataset.queries.get(row["query_id"])
            if query is None:
                raise DataError(path, line_no, "query_id", f"unknown query id {row['query_id']!r}")
            if split not in (None, "all", query.split):  # training on it would leak into that split's scores
                raise DataError(path, line_no, "query_id", f"query {row['query_id']!r} is in the {query.split!r} "
                                f"split, not {split!r}: training on it leaks into that split's evaluation")
            if row["item_id"] not in dataset.catalog:
                raise DataError(path, line_no, "item_id", f"unknown item id {row['item_id']!r}")
        seen = titles.setdefault(row["item_id"], (row["item_title"], line_no))
        if seen[0] != row["item_title"]:
            raise DataError(path, line_no, "item_title", f"item {row['item_id']!r} has another title on line {seen[1]}")
        cands = row.get("candidates")
        if cands is not None and (not isinstance(cands, list) or not all(isinstance(t, str) for t in cands)):
            raise DataError(path, line_no, "candidates", f"expected a list of titles, got {cands!r}")
        pairs.append(Pair(row["query_id"], row["query"], row["item_id"], row["item_title"], cot,
                          None if cands is None else tuple(cands)))
    if not pairs:
        raise DataError(path, None, None, "no triplets (the file is empty)")
    return pairs


def pairs_from_qrels(dataset, split: str = "train") -> list[Pair]:
    """(query, relevant item) pairs of one split, in a fixed order, without CoTs."""
    queries = dataset.split_queries(split)
    return [Pair(qid, q.text, iid, dataset.catalog[iid].title)
            for qid, q in sorted(queries.items()) for iid in sorted(dataset.relevant(qid))]


def item_inputs(pairs: list[Pair], catalog=None) -> list:
    """What each pair's item is embedded from: its title, or with `catalog` (item_id -> `lrem.data.Item`,
    the `--data` catalog) the item's catalog fields under the pair's title, so an item template naming
    `{brand}` or `{text}` is filled in training as `lrem index` fills it for search.

    >>> from lrem.data import Item
    >>> item_inputs([Pair("q", "mug?", "i", "mug")], {"i": Item("i", "mug", brand="Acme")})[0]["brand"]
    'Acme'
    """
    if not catalog:
        return [p.item_title for p in pairs]
    return [{**item_fields(catalog[p.item_id]), "title": p.item_title} if p.item_id in catalog else p.item_title
            for p in pairs]


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


def build_pairs(triplets=None, dataset=None, split: str = "train", tokenizer=None, cot_max_tokens: int = COT_MAX_TOKENS,
                use_cot: bool = True, rl_share: float = 0.0, seed: int = 0) -> tuple[list[Pair], list[Pair]]:
    """(training pairs, RL pairs): the triplet file's pairs, then the split's qrels pairs of the
    queries it lacks; of those qrels-only queries a share `rl_share` is held back for stage 2
    (queries with a teacher CoT are never held back: they are the scarce ones).

    Cold start and the direct baseline call this with the same inputs, so they see the same
    (query, item) pairs and hold back the same RL pairs; `use_cot=False` drops the CoTs.
    """
    if triplets is None and dataset is None:
        raise ValueError("give a triplet/pair file, a dataset folder and split, or both")
    pairs = load_triplets(triplets, tokenizer, cot_max_tokens, dataset, split) if triplets is not None else []
    held: list[Pair] = []
    if dataset is not None:
        have = {p.query_id for p in pairs}
        rest = [p for p in pairs_from_qrels(dataset, split) if p.query_id not in have]
        out = rl_holdout({p.query_id for p in rest}, rl_share, seed)
        pairs += [p for p in rest if p.query_id not in out]
        held = [p for p in rest if p.query_id in out]
    if not use_cot:
        pairs = without_cots(pairs)
    return pairs, held


def examples_sha256(pairs: list[Pair]) -> str:
    """A digest of the examples, in order (every field): a resume must train on the same data."""
    import hashlib
    import json

    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps(list(vars(p).values())).encode() + b"\n")
    return h.hexdigest()[:16]  # enough to tell data sets apart, short enough for an error line


def grounded(pairs: list[Pair], share: float, seed: int = 0) -> list[Pair]:
    """The same pairs, of which only the queries in a seeded `share` of ids keep their
    `candidates` (all of a query's pairs alike; `rl_holdout`'s hash with another seed)."""
    keep = rl_holdout({p.query_id for p in pairs if p.candidates is not None}, share, seed + 1)
    return [p if p.query_id in keep else replace(p, candidates=None) for p in pairs]


def without_cots(pairs: list[Pair]) -> list[Pair]:
    """The same pairs with no teacher CoT (the direct baseline; RL, which samples its own)."""
    return [replace(p, cot=None) for p in pairs]


def write_pairs(path, pairs: list[Pair]) -> None:
    """Write pairs as JSONL (the format `load_triplets` reads; `cot` only where there is one)."""
    from .._io import write_jsonl

    write_jsonl(path, [{k: v for k, v in vars(p).items() if v is not None} for p in pairs])


def load_rl_pairs(pairs=None, init=None) -> tuple[list[Pair], Path]:
    """The RL pairs: `pairs` (a JSONL of query_id, query, item_id, item_title), or the
    `rl_pairs.jsonl` stage 1 held back in its output folder `init`."""
    path = Path(pairs) if pairs else Path(init) / RL_PAIRS
    if not path.exists():
        raise FileNotFoundError(f"{path}: no RL pairs (train stage 1 with --data and rl_holdout > 0, or pass --pairs)")
    return without_cots(load_triplets(path)), path


# ---------------------------------------------------------------- batches

def pad(seqs: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists with `value` into (ids, mask), both (B, T): the collates' batches.

    >>> pad([[5, 6], [7]], 0)
    (tensor([[5, 6],
            [7, 0]]), tensor([[1, 1],
            [1, 0]]))
    """
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
