"""Continuous batching of reasoning queries: a query joins a running decode batch between steps
and leaves as soon as its CoT has stopped, with its embedding taken from the same KV cache.

    stream = ReasonStream(model.engine, capacity=32)     # ReasonStream.supported(engine) first
    stream.add("q1", "a drink stronger than tea")
    while stream.busy:
        for key, cot, embedding in stream.step():       # one or a few forwards
            ...

Why: a static batch decodes until its longest CoT ends while new queries wait for the whole
batch. On short shop queries most CoTs are 1-2 tokens and a few run to the budget, so a served
batch of 16 spent most of its decode steps on one or two rows (WANDS queries, 32 clients).
Here every step runs every occupied row, each on its own block of tokens:
- a joining row its prompt after the template (whose KV fills slots [0, n) of every row);
- a decoding row its last generated token;
- a row whose CoT has stopped the closing tokens of its full text, up to `<emb>`, after the CoT
  tokens that text keeps, at the positions the plain path gives them (as
  `QueryEngine._embed_after` runs them): the hidden state at `<emb>` is its embedding.
Blocks of different widths run as separate forwards where padding them to one width would cost
more than another reading of the weights (`plan_forwards`).

The cache (`StaticDecoder`) has one write cursor for all rows; each row attends to the slots its
mask allows (keys carry their rotary positions, so only the mask matters, not where a slot is).
When the cursor reaches the end, the rows' slots are compacted to the front. CPU, compact
decoder only (`supported`); the CoTs and embeddings are those of `LREM.encode_queries(mode=
"reason")` (tested within float tolerance).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .decoding import StaticDecoder, common_prefix_len
from .engine import ROW_COST

if TYPE_CHECKING:
    from .engine import QueryEngine


def plan_forwards(widths: list[int], row_cost: float = ROW_COST) -> list[list[int]]:
    """The indices of `widths` (each row's block of tokens) grouped into forwards, each padded to
    its widest block, minimising the sum over forwards of `row_cost` (its weight reading, in
    row-tokens: `lrem.engine.ROW_COST`) + rows x width. Groups are runs of the blocks sorted by
    width (an exchange argument: a group's cost depends on its widest block only).

    >>> [len(g) for g in plan_forwards([1] * 8 + [2, 2])], [len(g) for g in plan_forwards([1] * 30 + [15] * 10)]
    ([10], [30, 10])
    """
    order = sorted(range(len(widths)), key=lambda i: widths[i])
    w = [widths[i] for i in order]
    best, cut = [0.0] + [float("inf")] * len(w), [0] * (len(w) + 1)  # best[j]: the first j blocks
    for j in range(1, len(w) + 1):
        for i in range(j):  # blocks i..j-1 in one forward, at width w[j - 1]
            cost = best[i] + row_cost + (j - i) * w[j - 1]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(w)
    while j:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


@dataclass
class _Row:
    key: object
    text: str
    candidates: list[str] | None
    seq: list[int]  # the prompt's ids, up to `<think>`
    row: int = -1  # its row of the cache
    gen: list[int] = field(default_factory=list)  # generated ids; the last one not fed yet
    slots: list[int] = field(default_factory=list)  # the cache slot of each fed generated id
    block: list[int] = field(default_factory=list)  # the tokens it runs next
    at: int = 0  # the position of block[0]
    closing: bool = False  # block is the full text's closing tokens
    deferred: int = 0  # steps it has waited to join


class ReasonStream:
    """Greedy reasoning and embedding for queries that come and go (see the module docstring).

    Args:
        engine: the model's `QueryEngine`.
        capacity: most queries decoding at once (rows of the cache); more wait in `add`'s order.
        room: cache slots after the template prefix. A query whose prompt, CoT budget and closing
            tokens need more than half of it is refused by `add` (run it the static way).
        join_min: while other rows decode, joining rows wait until this many can join in one
            forward (default half the capacity), or `max_defer` steps. Why: a forward's weight
            reading costs as much as ~40 row-tokens here, so prompts that join a few at a time
            made the stream slower than static batches (measured 21.5 vs 27 queries/s).
    """

    def __init__(self, engine: "QueryEngine", capacity: int, room: int = 192, join_min: int | None = None,
                 max_defer: int = 8):
        model = engine.model
        self.engine, self.model, self.capacity = engine, model, capacity
        self.join_min, self.max_defer = join_min or max(1, capacity // 2), max_defer
        self.max_new, self.stop = model.config.cot_max_tokens, set(model.stop_ids)
        self.pad = model.tokenizer.pad_token_id
        self.template = model.template_prefixes()[0]  # the query side's
        with engine.same_weights():
            self.n, kv = engine.shared_prefix([self.template + [-1]])
            self.linears, self.weights = engine.linears(), engine.cache  # `cache` is renewed when the weights change
        self.length = self.n + room
        self.dec = StaticDecoder(model.lm, capacity, self.length, self.linears)
        self.dec.fill(kv, self.n)
        self.dec.mask.zero_()
        self.dec.mask[:, : self.n] = 1
        self.cursor = self.n  # the next slot to write, for every row
        self.waiting: collections.deque[_Row] = collections.deque()
        self.rows: dict[int, _Row] = {}  # cache row -> its query
        self.forwards = self.compactions = 0  # model forwards run, cache compactions (tests, metrics)

    @staticmethod
    def supported(engine: "QueryEngine") -> bool:
        """Whether this engine decodes on the compact CPU decoder, which the stream needs."""
        model = engine.model
        return (model.device.type == "cpu" and engine.config.compact_decoder and engine.plain_layers()
                and StaticDecoder.supports(model.lm, 256))

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.waiting)

    def __len__(self) -> int:
        return len(self.rows) + len(self.waiting)

    def add(self, key, text: str, candidates: list[str] | None = None) -> bool:
        """Queue a query (`candidates`: a grounded query's titles); its result comes from a later
        `step` under `key`. False where the stream cannot take it: a prompt that does not start
        with the template's tokens, or one too long for the cache."""
        prompt = self.model.query_prompts([text], candidates=None if candidates is None else [candidates])[0]
        seq = self.model.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if seq[: self.n] != self.template[: self.n] or len(seq) - self.n + 2 * self.max_new + 16 > (self.length - self.n) // 2:
            return False
        self.waiting.append(_Row(key, text, candidates, seq))
        return True

    def drop(self) -> list:
        """Forget every query (after a failed step); returns their keys."""
        keys = [r.key for r in self.rows.values()] + [r.key for r in self.waiting]
        self.rows.clear()
        self.waiting.clear()
        return keys

    @torch.inference_mode()
    def step(self) -> list[tuple[object, str, "torch.Tensor"]]:
        """Admit waiting queries to free rows, run every row's block, and return (key, CoT,
        embedding (dim,) float32 numpy) for the queries that finished."""
        with self.engine.same_weights():
            if self.engine.cache is not self.weights:
                raise RuntimeError("the model's weights changed while queries were decoding")
            free = [r for r in range(self.capacity) if r not in self.rows]
            while self.waiting and free:
                q = self.waiting.popleft()
                q.row, q.block, q.at = free.pop(0), q.seq[self.n :], self.n
                self.dec.mask[q.row, self.n :] = 0
                self.rows[q.row] = q
            active = list(self.rows.values())
            joining = [q for q in active if not q.gen]
            if joining and len(joining) < min(self.join_min, len(self.rows)) and max(q.deferred for q in joining) < self.max_defer:
                for q in joining:  # others decode: join later, more at once
                    q.deferred += 1
                active = [q for q in active if q.gen]
            done = []
            for group in plan_forwards([len(q.block) for q in active]):
                done += self._forward([active[i] for i in group])
            return done

    def _forward(self, group: list[_Row]) -> list:
        width = max(len(q.block) for q in group)
        if self.cursor + width > self.length:
            self._compact()
        dev, c = self.dec.mask.device, self.cursor
        # one-token blocks for most rows run as the whole cache (the other rows feed padding, masked):
        # a subset would first gather its rows' keys and values, every layer
        whole = len(group) == self.capacity or (width == 1 and 2 * len(group) >= self.capacity)
        blocks = {q.row: q for q in group}
        order = range(self.capacity) if whole else [q.row for q in group]
        ids = torch.tensor([[self.pad] * (width - len(blocks[r].block)) + blocks[r].block if r in blocks
                            else [self.pad] * width for r in order], device=dev)  # (B', W) left-padded
        pos = torch.tensor([[blocks[r].at] * (width - len(blocks[r].block))
                            + list(range(blocks[r].at, blocks[r].at + len(blocks[r].block))) if r in blocks
                            else [0] * width for r in order], device=dev)
        self.dec.mask[list(order), c : c + width] = 0
        for q in group:
            self.dec.mask[q.row, c + width - len(q.block) : c + width] = 1
        h = self.dec(ids, pos, c, None if whole else torch.tensor(list(order), device=dev))  # (B', W, D)
        self.cursor += width
        self.forwards += 1
        at = {r: i for i, r in enumerate(order)}
        done, going = [], [q for q in group if not q.closing]
        for q in group:
            if q.closing:
                i = at[q.row]
                emb = self.model.pool(h[i : i + 1], ids[i : i + 1])  # its `<emb>`, the block's last token
                done.append((q.key, self.model.decode_cot(q.gen), emb[0].cpu().numpy()))
                del self.rows[q.row]
        if going:
            picks = self.dec.logits(h[[at[q.row] for q in going], -1]).argmax(-1).tolist()
            for q, tok in zip(going, picks):
                if q.gen:  # its last generated token was fed at the block's last slot
                    q.slots.append(c + width - 1)
                q.gen.append(tok)
                if tok in self.stop or len(q.gen) >= self.max_new:
                    done += self._close(q)
                else:
                    q.block, q.at = [tok], len(q.seq) + len(q.gen) - 1
        return done

    def _close(self, q: _Row) -> list:
        """Its CoT has stopped: its next block is its full text's closing tokens (or, where the
        prompt reads differently in the full text, its embedding the plain way, now)."""
        model, cot = self.model, self.model.decode_cot(q.gen)
        cands = None if q.candidates is None else [q.candidates]
        full = model.tokenizer(model.query_texts([q.text], [cot], candidates=cands), add_special_tokens=False)[
            "input_ids"][0]
        if full[: len(q.seq)] != q.seq:
            del self.rows[q.row]
            emb = self.engine.embed_texts(model.query_texts([q.text], [cot], candidates=cands), 1, "q", False)
            return [(q.key, cot, emb[0])]
        fed = q.gen[: len(q.slots)]
        keep = common_prefix_len([full[len(q.seq) :], fed + [-1]])
        for s in q.slots[keep:]:  # generated tokens the full text does not keep
            self.dec.mask[q.row, s] = 0
        q.block, q.at, q.closing = full[len(q.seq) + keep :], len(q.seq) + keep, True
        return []

    def _compact(self) -> None:
        """Move each row's unmasked slots after the template to the front; the cursor follows."""
        self.compactions += 1
        rows = list(self.rows.values())
        if not rows:
            self.cursor = self.n
            return
        dev, n = self.dec.mask.device, self.n
        kept = [(self.dec.mask[q.row, n : self.cursor] > 0).nonzero()[:, 0] + n for q in rows]
        width = max(len(k) for k in kept)
        index = torch.full((len(rows), width), n, dtype=torch.long, device=dev)
        for i, k in enumerate(kept):
            index[i, : len(k)] = k
        r = torch.tensor([q.row for q in rows], device=dev)
        for cache in (*self.dec.k, *self.dec.v):  # (B, KV, L, hd)
            moved = cache[r].gather(2, index[:, None, :, None].expand(-1, cache.shape[1], -1, cache.shape[3]))
            cache[r, :, n : n + width] = moved
        self.dec.mask[r, n:] = 0
        for i, (q, k) in enumerate(zip(rows, kept)):
            self.dec.mask[q.row, n : n + len(k)] = 1
            where = {int(s): n + j for j, s in enumerate(k.tolist())}
            q.slots = [where[s] for s in q.slots if s in where]
        self.cursor = n + width
