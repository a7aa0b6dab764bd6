"""Grounded queries (issue 22, beyond the paper): first-stage candidates for training pairs.

A grounded query is shown the titles a direct search found before it reasons and embeds
(`PromptConfig.candidates_*` render them; `Searcher.search(mode="grounded")` runs both stages).
Training needs the same candidates on its pairs: `mine_candidates` takes them from an index of
a frozen model, ideally one that never trained on these queries, so that the first stage is as
good on them as it will be on unseen ones (a model's own training queries rank their positives
unrealistically high, and the grounded model would learn to copy the top candidate).

    lrem ground --index runs/index-direct --pairs pairs.jsonl --out runs/grounded-pairs   # -> pairs.jsonl, stats.json
"""
from __future__ import annotations

from dataclasses import replace

from ._defaults import QUERY_BATCH
from .data import Pair
from .search import Searcher


def mine_candidates(searcher: Searcher, pairs: list[Pair], k: int, batch_size: int = QUERY_BATCH,
                    show_progress: bool = False) -> list[Pair]:
    """The pairs with `candidates`: the top-`k` titles of a direct search of each query (each
    distinct query searched once) over `searcher`'s index."""
    queries = list(dict.fromkeys(p.query for p in pairs))
    titles = searcher.candidates(queries, k, batch_size=batch_size, show_progress=show_progress)
    found = dict(zip(queries, titles))
    return [replace(p, candidates=tuple(found[p.query])) for p in pairs]


def first_stage_recall(pairs: list[Pair]) -> float:
    """Share of pairs whose item title is among their candidates: how often the first stage
    already found the item (compare the training pairs' share with a dev split's)."""
    with_c = [p for p in pairs if p.candidates is not None]
    return sum(p.item_title in p.candidates for p in with_c) / max(len(with_c), 1)


PAIRS_FILE = "pairs.jsonl"  # in `lrem ground`'s output folder, beside stats.json


def write_grounded(out, pairs: list[Pair], stats: dict) -> None:
    """`lrem ground`'s output folder, written atomically: `pairs.jsonl` (the pairs with
    `candidates`, as `lrem train --pairs` reads them) and `stats.json` (what mined them)."""
    from ._io import atomic_dir, write_json
    from .train.pairs import write_pairs

    with atomic_dir(out) as tmp:
        write_pairs(tmp / PAIRS_FILE, pairs)
        write_json(tmp / "stats.json", stats)
