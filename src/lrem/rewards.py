"""Rewards of LREM stage 2 (LREM_SPEC, "Stage 2: RL"): plain callables, one score per rollout.

Like TRL's reward functions, each takes lists (one entry per rollout) plus keyword arguments
and returns a list of floats, so they can be swapped, tested and logged one by one:

    from lrem import rewards
    r = rewards.combine({"format": rewards.r_format(completions),
                         "length": rewards.r_length(cot_tokens, cot_max_tokens=16),
                         "acc": rewards.r_acc(ranks, n_items=16)},
                        {"format": 0.5, "length": 0.2, "acc": 1.0})

A completion is the text the policy generated after `<think>` with special tokens kept, e.g.
"pelican crossing, zebra crossing </think>". The trainer (`lrem.train.grpo`) closes every CoT
with `</think><emb>` itself, so r_format checks what the policy did on its own.
"""
from __future__ import annotations

import math
import re

import torch
from torch import Tensor

from .prompts import COT_MAX_TOKENS, EMB_TOKEN, THINK_END_TOKEN, THINK_TOKEN


def r_format(completions: list[str], think_end: str = THINK_END_TOKEN, emb: str = EMB_TOKEN,
             banned: tuple[str, ...] = (THINK_TOKEN, "<|im_end|>", "<|im_start|>", "<|endoftext|>"),
             **_) -> list[float]:
    """1.0 if the policy wrote `phrases </think>` (optionally followed by `<emb>`) and nothing
    else: a non-empty one-line CoT, closed by the policy itself, no other special token.

    >>> r_format(["wine opener, corkscrew </think>", "</think>", "corkscrew", "a\\nb</think>", "x</think><emb>"])
    [1.0, 0.0, 0.0, 0.0, 1.0]
    """
    out = []
    for c in completions:
        body = c[: -len(emb)] if c.endswith(emb) else c
        ok = body.endswith(think_end) and body.count(think_end) == 1
        cot = body[: -len(think_end)] if ok else body
        ok = ok and bool(cot.strip()) and "\n" not in cot.strip() and emb not in cot
        out.append(float(ok and not any(b in cot for b in banned)))
    return out


def r_length(cot_tokens: list[int], cot_max_tokens: int = COT_MAX_TOKENS, **_) -> list[float]:
    """1.0 if the CoT has at most l = `cot_max_tokens` tokens (the closing token not counted).

    >>> r_length([3, 16, 17], cot_max_tokens=16)
    [1.0, 1.0, 0.0]
    """
    return [float(n <= cot_max_tokens) for n in cot_tokens]


def r_acc(ranks: list[int], n_items: int, **_) -> list[float]:
    """1 - log(rank) / log(N): 1.0 when the query's own positive is ranked first among the N
    items of the batch, 0.0 when it is last.

    >>> [round(x, 3) for x in r_acc([1, 4, 16], n_items=16)]
    [1.0, 0.5, 0.0]
    """
    if n_items < 2:
        raise ValueError(f"n_items={n_items}: the rank reward needs at least 2 items in the batch")
    return [1.0 - math.log(r) / math.log(n_items) for r in ranks]


_WORD = re.compile(r"[^\W_]+")


def r_novel(cots: list[str], queries: list[str], **_) -> list[float]:
    """Share of the CoT's words that its query lacks (lower-cased letters and digits): 1.0 when
    every word is new, 0.0 when the CoT only repeats the query or is empty. Not in the paper: a
    push towards reformulation for a policy that learns to echo its query's head noun. Filler, a
    plural or a repeated word counts as new too: only r_acc holds such CoTs back.

    >>> r_novel(["corkscrew, wine opener", "wine", ""], ["a device for opening wine"] * 3)
    [0.6666666666666666, 0.0, 0.0]
    """
    if len(cots) != len(queries):
        raise ValueError(f"{len(cots)} CoTs for {len(queries)} queries")
    out = []
    for cot, query in zip(cots, queries):
        words, seen = _WORD.findall(cot.lower()), set(_WORD.findall(query.lower()))
        out.append(sum(w not in seen for w in words) / len(words) if words else 0.0)
    return out


def combine(parts: dict[str, list[float]], weights: dict[str, float]) -> list[float]:
    """Weighted sum per rollout, r = sum_k weights[k] * parts[k] (paper: 0.5 format + 0.2 length + 1.0 acc).

    >>> combine({"format": [1.0, 0.0], "acc": [0.5, 1.0]}, {"format": 0.5, "acc": 1.0})
    [1.0, 1.0]
    """
    missing = set(weights) - set(parts)
    if missing:
        raise ValueError(f"no reward values for {sorted(missing)}")
    n = {len(v) for v in parts.values()}
    if len(n) != 1:
        raise ValueError(f"reward lists of different lengths: { {k: len(v) for k, v in parts.items()} }")
    return [sum(w * parts[k][i] for k, w in weights.items()) for i in range(n.pop())]


def positive_ranks(scores: Tensor, labels: Tensor, exclude: Tensor | None = None) -> Tensor:
    """Rank (1 = first) of each row's positive item among the batch items, by score.

    Items in `exclude` (other positives of the same query) are not counted above it; ties count
    against the positive (a collapsed embedding earns no reward).

    Args:
        scores: (R, N) similarity of each rollout's query embedding to the N batch items.
        labels: (R,) index of each row's positive item.
        exclude: optional (R, N) bool, items not to count as competitors.

    >>> positive_ranks(torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.3]]), torch.tensor([0, 1])).tolist()
    [1, 2]
    """
    rows = torch.arange(len(scores), device=scores.device)
    own = scores[rows, labels][:, None]  # (R, 1)
    above = scores >= own  # (R, N)
    above[rows, labels] = False
    if exclude is not None:
        above &= ~exclude
    return 1 + above.sum(dim=1)
