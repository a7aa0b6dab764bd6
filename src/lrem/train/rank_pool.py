"""The items r_acc ranks each rollout's positive among (`RLConfig.rank_pool`).

- `batch` (the paper): the step's N batch items. With N = 8 a quarter to a third of the groups
  end up with equal rewards late in training (every rollout ranks its positive first), which
  gives GRPO nothing to learn from.
- `mined`: the batch items plus `hard_negatives` items per query mined from an index of the
  current model: the catalog items nearest to the query's rollouts, positives excluded. The
  index (the item bank) is re-embedded every `refresh_steps` steps; the mined items themselves
  are embedded afresh each step, so every score compares the current weights' embeddings.
- `catalog`: the positive's rank in the whole item bank (stale by up to `refresh_steps` steps on
  both sides), i.e. the rank a user's search would give it.

The bank is the dataset's catalog (`rank_data`), or a seeded sample of `pool_items` of it plus
every RL pair's positive, which bounds the refresh cost on a CPU.
"""
from __future__ import annotations

import random

import torch

from .. import rewards as R
from .._defaults import ITEM_BATCH

POOLS = ("batch", "mined", "catalog")


class RankPool:
    """Ranks for r_acc: `ranks(model, pairs, q, d, batch)` -> ((R,) ranks, N items ranked among).

    Args:
        kind: one of `POOLS`.
        pairs: every RL pair (their positives join the bank, and give each query its positives).
        catalog: item_id -> title or `lrem.data.Item`, for `mined` and `catalog`.
        hard_negatives: mined items per query (`mined`).
        refresh_steps: re-embed the bank every this many steps.
        pool_items: 0 = the whole catalog; else this many sampled items (+ the positives).
        num_generations: G, rollouts per query (rows r // G belong to pair r).
        seed: the bank sample's seed.
    """

    def __init__(self, kind: str, pairs, catalog=None, hard_negatives: int = 4, refresh_steps: int = 25,
                 pool_items: int = 0, num_generations: int = 8, seed: int = 0):
        if kind not in POOLS:
            raise ValueError(f"rank_pool={kind!r}; choose one of {', '.join(POOLS)}")
        self.kind, self.g_n, self.k, self.refresh_steps = kind, num_generations, hard_negatives, refresh_steps
        self.positives: dict[str, set[str]] = {}
        for p in pairs:
            self.positives.setdefault(p.query_id, set()).add(p.item_id)
        self.ids: list[str] = []
        self.items: list = []
        self.bank: torch.Tensor | None = None  # (M, D) unit vectors of the bank, from the last refresh
        self.bank_step = -1
        if kind == "batch":
            return
        if not catalog:
            raise ValueError(f"rank_pool={kind!r} needs a catalog (rank_data: a dataset folder)")
        own = {p.item_id: p.item_title for p in pairs}
        ids = sorted(catalog)
        if pool_items and pool_items < len(ids):
            ids = sorted(random.Random(seed).sample(ids, pool_items))
        ids = sorted(set(ids) | set(own))
        self.ids = ids
        self.items = [catalog.get(i, own.get(i)) for i in ids]
        self.row = {i: n for n, i in enumerate(ids)}

    def __repr__(self) -> str:
        extra = "" if self.kind == "batch" else f", {len(self.ids)} bank items, refresh every {self.refresh_steps} steps"
        return f"RankPool({self.kind}{f', {self.k} hard negatives per query' if self.kind == 'mined' else ''}{extra})"

    def state_dict(self) -> dict:
        """The bank and the step it was embedded at (checkpointed, so a resumed run ranks as an
        uninterrupted one would)."""
        return {} if self.bank is None else {"bank": self.bank, "bank_step": torch.tensor(self.bank_step)}

    def load_state_dict(self, state: dict) -> None:
        if self.kind != "batch" and "bank" in state:
            if state["bank"].shape[0] != len(self.ids):
                raise ValueError(f"checkpoint item bank has {state['bank'].shape[0]} items, this run's {len(self.ids)}; "
                                 "resume needs the same rank_data and pool_items")
            self.bank, self.bank_step = state["bank"], int(state["bank_step"])

    def refresh(self, model, step: int, show_progress: bool = False) -> bool:
        """Re-embed the bank with the current weights when due (at the first step, then every
        `refresh_steps`). True when it did."""
        if self.kind == "batch" or (self.bank is not None and step - self.bank_step < self.refresh_steps):
            return False
        was_training = model.lm.training
        model.lm.eval()
        self.bank = torch.from_numpy(model.encode_items(self.items, batch_size=ITEM_BATCH, show_progress=show_progress))
        model.lm.train(was_training)
        self.bank_step = step
        return True

    def _excluded(self, pairs) -> list[set[int]]:
        """Per pair, the bank rows of its query's positives."""
        return [{self.row[i] for i in self.positives.get(p.query_id, {p.item_id}) if i in self.row} for p in pairs]

    def ranks(self, model, pairs, q: torch.Tensor, d: torch.Tensor, batch: dict) -> tuple[torch.Tensor, int]:
        """(R,) rank of each rollout's positive (1 = first), and how many items it was ranked among."""
        q, d = q.detach().float().cpu(), d.detach().float().cpu()
        labels, exclude = batch["labels"], batch["exclude"]
        if self.kind == "batch":
            return R.positive_ranks(q @ d.T, labels, exclude), d.shape[0]
        if self.kind == "catalog":
            scores = q @ self.bank.T  # (R, M)
            gold = torch.tensor([self.row[pairs[r // self.g_n].item_id] for r in range(len(q))])
            mask = torch.zeros_like(scores, dtype=torch.bool)  # the query's other positives
            excl = self._excluded(pairs)
            for r in range(len(q)):
                mask[r, list(excl[r // self.g_n])] = True
            return R.positive_ranks(scores, gold, mask), self.bank.shape[0]
        # mined: per query, the bank items nearest to any of its rollouts, its positives and the
        # batch's items aside; embedded afresh and ranked with the batch items
        batch_ids = {p.item_id for p in pairs}
        scores = (q @ self.bank.T).view(len(pairs), self.g_n, -1).amax(dim=1)  # (N, M)
        mined: list[str] = []
        for n, rows in enumerate(self._excluded(pairs)):
            taken = 0
            for j in torch.argsort(scores[n], descending=True).tolist():
                iid = self.ids[j]
                if j in rows or iid in batch_ids or iid in mined:
                    continue
                mined.append(iid)
                taken += 1
                if taken == self.k:
                    break
        if not mined:
            return R.positive_ranks(q @ d.T, labels, exclude), d.shape[0]
        was_training = model.lm.training
        model.lm.eval()
        extra = torch.from_numpy(model.encode_items([self.items[self.row[i]] for i in mined], batch_size=ITEM_BATCH))
        model.lm.train(was_training)
        pool = torch.cat([d, extra])  # (N + M', D)
        qids = [pairs[r // self.g_n].query_id for r in range(len(q))]
        extra_excl = torch.tensor([[iid in self.positives.get(qid, ()) for iid in mined] for qid in qids])
        return R.positive_ranks(q @ pool.T, labels, torch.cat([exclude, extra_excl], dim=1)), pool.shape[0]


def load_catalog(folder) -> dict:
    """item_id -> `lrem.data.Item` of a dataset folder's catalog."""
    from ..data import load_dataset

    return load_dataset(folder).catalog

