"""The query engine: how an `LREM` reasons and embeds fast, kept apart from the network.

    from lrem.engine import EngineConfig, QueryEngine
    model.engine                                   # made with the model, configured from the environment
    model.engine = QueryEngine(model, EngineConfig(lookup_tokens=0))   # or chosen in code
    model.engine.greedy(seqs, max_new=16, stop=model.stop_ids)         # (B, 16) ids, as lm.generate

It owns what the fast paths keep between calls: the KV of the prompt prefix every query (or
item) shares, the decode steps (CUDA graphs) and blocked weight views, all valid for one state
of the weights; the recent greedy CoTs that draft single queries, and how often each position's
word drafted in a query's prefill was its CoT (`draft_hits`); and the back-end choice,
made once from an `EngineConfig`: the compact CPU decoder (`lrem.decoding.StaticDecoder`),
transformers' decoder over a `StaticCache` (captured in a CUDA graph on a GPU), or vLLM. The
decode loops themselves are functions in `lrem.decoding` (gpt-fast style); `LREM.encode_*`,
`generate_cots` and `sample_cots` call this engine.
"""
from __future__ import annotations

import collections
import contextlib
import importlib.util
import os
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ._defaults import ITEM_BATCH, QUERY_BATCH, ROLLOUT_BATCH
from .decoding import (GreedyStep, Linear, StaticDecoder, agreed, block_linears, chain_decode, check_branch,
                       common_prefix_len, decode, draft_decode, greedy_ids, kv_cache, lookup_decode, move_slots, packs, padded_width,
                       prefill, prefill_chain, prefill_tree, prefix_kv, sample_top_p)
from .prompts import close_cot


def check_batch_size(batch_size) -> None:
    """A whole number >= 1: below 1 would embed nothing (range() with a negative step) and leave zero
    rows; 2.5, "4" or None failed inside torch with a TypeError that named nothing."""
    import numbers

    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}; must be a whole number >= 1")


def length_order(seqs: list[list[int]]) -> list[int]:
    """Indices of `seqs` by token count, ties in input order: batches taken in this order pad less
    (and queries of like length write CoTs of like length), as sentence-transformers sorts.

    >>> length_order([[1, 2, 3], [1], [4, 5], [6]])
    [1, 3, 2, 0]
    """
    return np.argsort([len(x) for x in seqs], kind="stable").tolist()


@dataclass
class QueryEncoding:
    """For a list of n queries: embeddings (n, dim) and n CoTs; for one query given as a string:
    embeddings (dim,) and its CoT as a string (as `SentenceTransformer.encode` treats a string)."""

    embeddings: np.ndarray  # (n, dim) or (dim,), float32, L2-normalised
    cots: list[str] | str  # the reasoning each embedding was taken after ("" in direct mode)


@dataclass
class EngineConfig:
    """How the engine decodes. Read once, when the engine is made (`from_env` by default)."""

    # CPU decoding through `lrem.decoding.StaticDecoder` where it covers the backbone; False:
    # transformers' decoder over a static cache, the path CUDA takes (tested against each other)
    compact_decoder: bool = True
    # greedy reasoning for one query (compact decoder) checks up to this many tokens drafted from
    # its prompt and recent CoTs per forward (`lrem.decoding.lookup_decode`); 0: one token per forward
    lookup_tokens: int = 4
    # greedy CoTs kept as draft sources (`QueryEngine.history`): CoTs share phrasing across queries
    # ("The product search intent is: ..."), as SuffixDecoding (Oliaro et al., 2024) uses for
    # repeated agent outputs. Drafts are checked, so outputs stay greedy. 0: the prompt only
    history: int = 32
    # a single query's prefill forward also runs up to this many of its words as drafted CoTs, each
    # followed by the closing tokens: where the model writes one of them (a trained model's CoT often
    # copies the query's head noun: "a device for pulling corks" -> "device", "salon chair" -> "chair"),
    # the query is reasoned and embedded in that one forward, as in direct mode. Which words: those at
    # the positions (`WORD_POSITIONS`) whose drafts hit most often lately, while their hit rate pays for
    # their rows: 7, all positions (3 ran 2.0-2.1x direct's time on the shop questions, 7 ran 1.6-1.7x,
    # bfloat16 and float32 alike). 0 (LREM_WORD_DRAFTS=0): off, for the plain path's CoTs in bfloat16
    # too (a branch's larger forward may break a near-tie otherwise)
    word_drafts: int = 7
    # greedy reasoning on the CPU also drafts from the query's words spelled otherwise
    # (`QueryEngine.respelled`): a trained model's CoT often capitalises or hyphenates them
    # ("carolyn console table" -> "Carolyn Console", "anti fatigue mats" -> "anti-fatigue mats"),
    # whose tokens the query's do not predict, so each such token took a forward of its own
    respelled_drafts: bool = True
    cuda_graphs: bool = True  # capture each CUDA decode step in a graph (LREM_CUDA_GRAPHS=0: off)
    # transformers' decoder (CUDA, other backbones) attends with grouped query heads folded into
    # the query length (`lrem.decoding.folded_sdpa`), not keys and values repeated per head
    fold_heads: bool = True
    # on a CUDA graph step, whether every row has stopped is read this many steps late
    # (`lrem.decoding.decode`), so the host queues a step while the GPU runs the one before; as many
    # steps may run past the last stop (then forgotten)
    decode_lag: int = 1
    # the CUDA decode step's forward through torch.compile before its graph is captured (LREM_COMPILE=1):
    # batch-1 reasoning 109 -> 81 ms for Qwen2.5-3B's shape on an H200, but each batch size compiles
    # on its first call (tens of seconds), so it is off by default
    compile_decode: bool = False
    # widths (tokens a row) that forwards of several tokens (a prompt's suffix, closing tokens, a
    # direct query) on transformers' decoder pad to, each captured in a graph (`GreedyStep.widths`),
    # up to `GRAPH_TOKENS` a forward. None: `GRAPH_WIDTHS` where the decode step is captured (CUDA),
    # none elsewhere; a tuple applies on the CPU too (the CPU check of the GPU path)
    graph_widths: tuple[int, ...] | None = None
    # batch sizes that steps with CUDA graphs are made for (`QueryEngine.rows`): a call of another
    # size runs at the next one up, the extra rows repeating its last (their results dropped). None:
    # `GRAPH_BATCHES` where the decode step is captured (CUDA), none elsewhere; a tuple applies on
    # the CPU too (the CPU check of the GPU path)
    graph_batches: tuple[int, ...] | None = None
    vllm: bool = True  # generate with vLLM where installed and the model is on CUDA (LREM_VLLM=0: off)
    vllm_memory: float = 0.3  # the GPU memory share vLLM takes (LREM_VLLM_MEMORY)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "EngineConfig":
        """The defaults, with the LREM_WORD_DRAFTS, LREM_CUDA_GRAPHS, LREM_COMPILE, LREM_VLLM and
        LREM_VLLM_MEMORY switches applied."""
        def switch(name: str, default: bool) -> bool:  # unset: the field's default; "0": off, else on
            return env[name] != "0" if name in env else default

        return cls(word_drafts=int(env.get("LREM_WORD_DRAFTS", cls.word_drafts)),
                   cuda_graphs=switch("LREM_CUDA_GRAPHS", cls.cuda_graphs), vllm=switch("LREM_VLLM", cls.vllm),
                   compile_decode=switch("LREM_COMPILE", cls.compile_decode),
                   vllm_memory=float(env.get("LREM_VLLM_MEMORY", cls.vllm_memory)))


# a GPU forward of a few tokens is launch-bound (Qwen2.5-3B, batch 1: ~43 ms eagerly, an H200):
# such forwards pad to one of these widths and replay a graph captured for it; beyond
# GRAPH_TOKENS (batch x width) a forward is compute-bound and runs eagerly. Each step (a batch
# size and cache length) keeps one memory pool for its graphs, sized by its widest forward: ~150 MB
# at 2,048 tokens for a 3B model (an estimate), about what the step's static cache takes
GRAPH_WIDTHS = (4, 8, 16, 32, 64)
GRAPH_TOKENS = 2048
# up to here a GPU's decode step costs about the same whatever its rows (Qwen2.5-3B on an H200: a
# step reads 5.75 GB of weights, ~1.6 ms, while 128 rows' products take ~1 ms), so a call pads its
# rows up to one of these sizes: a server whose batches come in every size from 1 to 32 captures
# graphs for 6 sizes rather than 32, each with its own cache
GRAPH_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def cuda_length(length: int) -> int:
    """A CUDA step's cache length: `length` rounded up to a multiple of 64, so that a few sizes
    (and their captured graphs) serve every call."""
    return -(-length // 64) * 64


# a forward's weight reading in row-tokens (~30 ms against ~0.8 ms a row-token for the 135M model on
# this CPU): what an extra forward costs against running more tokens in one
ROW_COST = 37.0


def split_width(lengths: list[int], row_cost: float = ROW_COST) -> int:
    """How many tokens of each row's closing tail the first `_embed_after` forward runs; rows with
    longer tails run the rest alone in a second (a CoT whose first tokens retokenize differently
    re-runs whole: 4-9 tokens where most rows need 3). The cost of a forward is modelled as
    `row_cost` (`ROW_COST`) plus its rows x width.

    >>> split_width([3] * 31 + [9]), split_width([3, 3, 3, 9]), split_width([5])
    (3, 9, 5)
    """
    longest, n = max(lengths), len(lengths)

    def cost(k: int) -> float:
        rest = [x for x in lengths if x > k]
        return n * k + (row_cost + len(rest) * (longest - k) if rest else 0)

    return min(sorted(set(lengths)), key=cost)


class QueryEngine:
    """Fast reasoning and embedding over `model` (an `lrem.model.LREM`); see the module docstring.

    `cache` holds what is derived from the weights (prefix KV, decode steps, blocked weight views,
    the vLLM engine); it is rebuilt when the weights change and dropped from copies. `history`
    holds the recent greedy CoTs, each after its prompt's last `HISTORY_CONTEXT` tokens.
    """

    HISTORY_CONTEXT = 3  # prompt tokens kept before each CoT in `history` (the CoT's first n-grams)
    EXPLORE_EVERY = 8  # every so many single queries try all word drafts, whatever their recent hit rate
    # what a word draft the CoT began with but went on from counts for in its position's hit rate:
    # decoding goes on from the prefill's pick after it, often a forward saved. Counting it as a miss
    # dropped such positions: WANDS 2.08 forwards a query against 1.92 with it (draft_counts.py)
    BEGAN = 0.5
    # where a single query's CoT may be one of its words (`_word_drafts`): its first and second content
    # word, its last word, its last two. Measured on the shipped model's CoTs: a definition's first
    # content word for 53 of 80 WordNet queries ("a device for ..."), the last word for 22 of 64 WANDS
    # keyword queries ("salon chair"), the first or second content word for 23 of 32 shop questions.
    # Or two of its content words, a compound noun ("phone case that is not plastic" -> "phone case"),
    # or the whole of a short query ("pillow for neck pain")
    WORD_POSITIONS = ("first", "second", "last", "last two", "first two", "second two", "whole")
    WHOLE_WORDS = 4  # the longest query drafted whole
    UPPER_LETTERS = 3  # words up to this long are also drafted in capitals (`respelled`: "US", "LED")
    HYPHEN_WORDS = 8  # the longest query whose neighbouring words are also drafted hyphenated (`respelled`)
    NOT_PLURAL = ("ss", "us", "is")  # endings in "s" that `respelled` keeps ("glass", "cactus", "tennis")
    # words skipped when counting content words: English articles, prepositions, pronouns and the like
    FUNCTION_WORDS = frozenset("a an the of for to in on at by with from into as and or but not no is are was be "
                               "that which who whom whose what when where how does do can i my me you your it "
                               "its this these those some something someone any".split())

    def __init__(self, model, config: EngineConfig | None = None):
        self.model = model
        self.config = config or EngineConfig.from_env()
        self.cache: dict = {}  # valid for one `_weights_key`
        self.history: collections.deque[list[int]] = collections.deque(maxlen=self.config.history)
        # word position -> the worth of its recent 16 tries: 1 the CoT, BEGAN a CoT that began with it, else 0
        self.draft_hits: dict[str, collections.deque[float]] = {}
        self.n_drafted = 0  # single queries `_word_drafts` was asked for
        self._blank: dict[int, bool] = {}  # token id -> whether it decodes to whitespace alone (`_ending`)
        self._local = threading.local()  # `same_weights`' pinned cache, per thread
        self._building = threading.Lock()  # held while a CUDA decode step is made (`step`)

    def __getstate__(self):
        # the caches hold CUDA graphs and tensors tied to these weights: copies rebuild them
        return {**self.__dict__, "cache": {}, "_local": None, "_building": None}

    def __setstate__(self, state):
        self.__dict__.update(state, _local=threading.local(), _building=threading.Lock())

    # ---- caches tied to the weights -----------------------------------------------------------
    def _weights_key(self) -> tuple:
        """Changes whenever the weights may have: moved, cast, replaced (any parameter's address),
        or updated in place (every in-place update bumps a tensor's version counter)."""
        ps = list(self.model.lm.parameters())
        return ps[0].device, ps[0].dtype, tuple(p.data_ptr() for p in ps), sum(p._version for p in ps)

    def _state(self) -> dict:
        """`cache`, emptied first if the weights changed since it was filled (checked once per
        `same_weights` scope: walking the parameters costs ~2 ms, a few times per query)."""
        pinned = getattr(self._local, "state", None)
        if pinned is not None:
            return pinned
        key = self._weights_key()
        if self.cache.get("key") != key:
            self.cache = {"key": key, "prefix": {}, "steps": {}, "linears": {}}
        return self.cache

    @contextlib.contextmanager
    def same_weights(self):
        """A scope (one call: a batch encoded, CoTs decoded) in which the weights do not change, so
        the caches are checked against them once, at its start (per thread; scopes nest)."""
        if getattr(self._local, "state", None) is not None:
            yield
            return
        self._local.state = self._state()
        try:
            yield
        finally:
            self._local.state = None

    def plain_layers(self) -> bool:
        """Whether the LM's layers are its own: not wrapped by adapters (LoRA while training,
        `lrem.train.lora`). The compact decoder and vLLM read the weight tensors directly, which
        would miss an adapter; transformers' decoder runs it."""
        state = self._state()
        if "plain" not in state:  # PEFT's layers keep the layer they wrap as `base_layer`
            state["plain"] = not any(hasattr(m, "base_layer") for m in self.model.lm.modules())
        return state["plain"]

    def linears(self):
        """The compact decoder's blocked views of the weights for this thread count (kept)."""
        cached, parts = self._state()["linears"], torch.get_num_threads()
        if parts not in cached:
            cached[parts] = block_linears(self.model.lm, parts)
        return cached[parts]

    def compact(self) -> bool:
        """Whether decode steps run on the compact decoder (`StaticDecoder`, where it covers the
        backbone): off CUDA, with `config.compact_decoder` on and the LM's own layers."""
        return self.model.device.type != "cuda" and self.config.compact_decoder and self.plain_layers()

    def step(self, batch: int, length: int, graph: bool = True) -> GreedyStep:
        """A decode step over a KV cache of `length` slots; on CUDA kept per size, and captured in
        graphs where `captures(graph)`."""
        lm, widths, fold = self.model.lm, self.widths(batch, graph), self.config.fold_heads
        if self.model.device.type != "cuda":
            return GreedyStep(lm, batch, length, graph=False, linears=self.linears() if self.compact() else None,
                              widths=widths, fold=fold)
        graph = self.captures(graph)
        compiled = graph and self.config.compile_decode
        key, steps = (batch, length, graph, widths, fold, compiled), self._state()["steps"]
        with self._building:  # one capture at a time: two server threads may ask for the same size
            if key not in steps:
                steps[key] = GreedyStep(lm, batch, length, graph=graph, widths=widths, fold=fold, compile=compiled)
        return steps[key]

    def roomy_step(self, batch: int, length: int) -> GreedyStep:
        """A greedy step of `batch` rows with at least `length` slots: on CUDA the shortest already
        built (its graphs captured) rather than a new size, else `step`."""
        if self.model.device.type == "cuda":
            key = (self.captures(True), self.widths(batch), self.config.fold_heads,
                   self.captures(True) and self.config.compile_decode)
            built = [k for k in self._state()["steps"] if k[0] == batch and k[1] >= length and k[2:] == key]
            if built:
                return self._state()["steps"][min(built)]
            length = cuda_length(length)
        return self.step(batch, length)

    def captures(self, graph: bool) -> bool:
        """Whether a CUDA step captures graphs: asked to (`graph`: greedy decoding; sampling runs
        eagerly), `config.cuda_graphs` on, and the layers the LM's own (PEFT's trainable-token rows
        copy indices from the host, which a capture cannot hold)."""
        return graph and self.config.cuda_graphs and self.plain_layers()

    def rows(self, batch: int, graph: bool = True) -> int:
        """The rows a greedy call of `batch` rows runs at: the smallest of `config.graph_batches`
        that holds it, or `batch` itself."""
        sizes = self.config.graph_batches
        if sizes is None:
            sizes = GRAPH_BATCHES if self.model.device.type == "cuda" and self.captures(graph) else ()
        return padded_width(sizes, batch)

    def widths(self, batch: int, graph: bool = True) -> tuple[int, ...]:
        """The widths a step of `batch` rows pads several-token forwards to (`config.graph_widths`)."""
        widths = self.config.graph_widths
        if widths is None:
            widths = GRAPH_WIDTHS if self.model.device.type == "cuda" and self.captures(graph) else ()
        return tuple(sorted(w for w in set(widths) if batch * w <= GRAPH_TOKENS))

    def vllm(self):
        """A vLLM engine over the current weights when vLLM is installed, the model is on CUDA and
        `config.vllm` is on, else None. Built on first use (the weights are saved to a temp folder
        for it to load) and rebuilt when the weights change."""
        if self.model.device.type != "cuda" or not self.config.vllm or not self.plain_layers():
            return None
        if not importlib.util.find_spec("vllm"):
            return None
        state = self._state()
        if state.get("vllm") is None:
            from vllm import LLM

            folder = Path(tempfile.mkdtemp(prefix="lrem-vllm-")) / "model"
            self.model.save_pretrained(folder)
            state["vllm"] = LLM(model=str(folder), dtype=str(self.model.lm.dtype).removeprefix("torch."),
                                skip_tokenizer_init=True, seed=0, gpu_memory_utilization=self.config.vllm_memory)
        return state["vllm"]

    # ---- embedding over the prefix cache ------------------------------------------------------
    def shared_prefix(self, seqs: list[list[int]]) -> tuple[int, list | None]:
        """(n, per-layer KV of the first n tokens): the prefix of `seqs` to run once, batch 1.

        n is the batch's common prefix (each row keeps >= 1 token). Its part shared with a
        template prefix (`LREM.template_prefixes`) comes from a KV cache kept across calls, so even
        a single query skips its system prompt and instruction; the rest (e.g. one query repeated)
        is run here.
        """
        n = common_prefix_len(seqs)
        if n == 0:
            return 0, None
        lm = self.model.lm
        tpl = max(self.model.template_prefixes(), key=lambda t: common_prefix_len([t + [-1], seqs[0]]))
        m = min(n, common_prefix_len([tpl + [-1], seqs[0]]))  # tokens shared with the template
        if m == 0:
            return (n, prefix_kv(lm, seqs[0][:n])) if len(seqs) > 1 else (0, None)
        cached = self._state()["prefix"]
        if tuple(tpl) not in cached:
            cached[tuple(tpl)] = prefix_kv(lm, tpl)
        kv = [(k[:, :, :m], v[:, :, :m]) for k, v in cached[tuple(tpl)]]
        if n > m and len(seqs) > 1:  # a longer common prefix than the template's: extend it
            kv = prefix_kv(lm, seqs[0][m:n], past=kv)
        return (n if len(seqs) > 1 else m), kv

    @torch.inference_mode()
    def embed_texts(self, texts: list[str], batch_size: int = ITEM_BATCH, desc: str = "texts",
                    show_progress: bool = False, prefix_cache: bool = True) -> np.ndarray:
        """Embeddings (n, dim) of full texts (templates filled, ending `<emb>`), in length-sorted
        batches (less padding), returned in input order.

        With `prefix_cache`, the token prefix shared by all texts (system prompt, instruction:
        most of a query's tokens) is run once and its KV cache reused by every batch (and by
        later calls, see `shared_prefix`); the token sequences and positions are exactly those
        of the plain path (`prefix_cache=False`: every token run, nothing cached).
        """
        check_batch_size(batch_size)
        seqs = self.model.tokenizer(texts, add_special_tokens=False)["input_ids"]
        order = length_order(seqs)
        out = np.zeros((len(texts), self.model.dim), dtype=np.float32)
        with self.same_weights():
            n_prefix, kv = self.shared_prefix(seqs) if prefix_cache else (0, None)
            for s in tqdm(range(0, len(texts), batch_size), desc=desc, disable=not show_progress, unit="batch"):
                idx = order[s : s + batch_size]
                out[idx] = self._embed_suffixes([seqs[i][n_prefix:] for i in idx], kv, n_prefix).cpu().numpy()
        return out

    def _embed_suffixes(self, suffixes: list[list[int]], kv, n_prefix: int) -> torch.Tensor:
        """Embeddings (B, D) of prefix + each suffix; suffixes are right-padded (positions stay
        exact, and `emb_hidden` finds each row's own `<emb>`)."""
        model, dev = self.model, self.model.device
        width, pad = max(len(x) for x in suffixes), model.tokenizer.pad_token_id
        ids = torch.tensor([x + [pad] * (width - len(x)) for x in suffixes], device=dev)  # (B, S)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in suffixes], device=dev)
        if kv is None:
            return model.embed_batch(ids, mask)
        b = ids.shape[0]
        full_mask = torch.cat([torch.ones(b, n_prefix, dtype=mask.dtype, device=dev), mask], dim=1)
        position_ids = n_prefix + torch.arange(width, device=dev).expand(b, -1)  # (B, S)
        rows = Linear.PACKED_ROWS if packs(next(model.lm.parameters())) else Linear.MAX_ROWS
        few = self.config.compact_decoder and ids.numel() <= rows and dev.type == "cpu" and self.plain_layers()
        height = self.rows(b)  # the step's rows, where graphs are captured
        widths = self.widths(height)
        wide = padded_width(widths, width)  # one of widths, or width itself where none holds it
        if few and StaticDecoder.supports(model.lm, n_prefix + width):
            # a query or a few: the compact decoder's blocked matmuls use every core (measured 1.6x at
            # one query), or its packed bfloat16 products run (up to 256 rows); larger batches run as
            # fast through transformers
            dec = StaticDecoder(model.lm, b, n_prefix + width, self.linears())
            dec.fill(kv, n_prefix)
            dec.mask.copy_(full_mask)
            hidden = dec(ids, position_ids, n_prefix)
        elif wide in widths and not self.compact():
            # a few tokens a row (a GPU): a step's captured forward at the padded width (`widths`)
            more = wide - width
            ids, mask = F.pad(ids, (0, more), value=pad), F.pad(mask, (0, more))
            # the step's rows (`rows`): the last row repeated, its copies' results dropped
            rep = torch.cat([torch.arange(b, device=dev), torch.full((height - b,), b - 1, device=dev)])
            position_ids = n_prefix + torch.arange(wide, device=dev).expand(height, -1)
            step = self.roomy_step(height, n_prefix + wide + 1)  # a width is captured where the cache has room after it
            with step.lock:
                step.reset(kv, n_prefix)
                step.mask[:, n_prefix : n_prefix + wide] = mask[rep]
                hidden = step.run(ids[rep], position_ids, n_prefix)[:b]
        else:
            cache = kv_cache(model.lm, [(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in kv])
            hidden = model.lm.get_decoder()(input_ids=ids, attention_mask=full_mask, position_ids=position_ids,
                                            past_key_values=cache, use_cache=True).last_hidden_state
        return model.pool(hidden, ids)

    # ---- reasoning -----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate_cots(self, texts: list[str], batch_size: int = QUERY_BATCH, show_progress: bool = False,
                      max_new_tokens: int | None = None, fast: bool = True,
                      candidates: list | None = None) -> list[str]:
        """`LREM.generate_cots`: greedy CoTs, batched (`candidates`: per query, a grounded query's
        titles, or None); `fast` decodes over the prefix cache and a preallocated KV cache (`greedy`; vLLM instead where `vllm()` gives an engine), else plain
        `lm.generate` on left-padded prompts. Both give the same CoTs (up to float rounding on near-ties)."""
        model = self.model
        max_new, stop = max_new_tokens or model.config.cot_max_tokens, model.stop_ids
        prompts_ = model.query_prompts(texts, candidates=candidates)
        engine = self.vllm() if fast else None
        if engine is not None:
            return [model.decode_cot(ids) for ids in self._greedy_vllm(engine, prompts_, max_new, stop)]
        cots: list[str] = [""] * len(texts)
        # the fast path in length-sorted batches (as `reason`), plain `generate` in input order
        seqs = model.tokenizer(prompts_, add_special_tokens=False)["input_ids"] if fast and texts else []
        order = length_order(seqs) if fast else list(range(len(texts)))
        for s in tqdm(range(0, len(texts), batch_size), desc="reasoning", disable=not show_progress, unit="batch"):
            idx = order[s : s + batch_size]
            if fast:
                gen = self.greedy([seqs[i] for i in idx], max_new, stop)
            else:
                batch = model.tokenize(prompts_[s : s + batch_size])
                out = model.lm.generate(**batch, max_new_tokens=max_new, do_sample=False, eos_token_id=stop,
                                        pad_token_id=model.tokenizer.pad_token_id)
                gen = out[:, batch["input_ids"].shape[1] :].tolist()  # (B, <= max_new)
            for i, row in zip(idx, gen):
                cots[i] = model.decode_cot(row)
        return cots

    @torch.inference_mode()
    def sample_cots(self, texts: list[str], num_samples: int = 8, temperature: float = 1.0, top_p: float = 1.0,
                    max_new_tokens: int | None = None, generator: torch.Generator | None = None,
                    batch_size: int = ROLLOUT_BATCH, candidates: list | None = None) -> list[list[int]]:
        """`LREM.sample_cots`: the greedy fast path with top-p sampling at `temperature` in place of argmax."""
        model = self.model
        max_new = max_new_tokens or model.config.cot_max_tokens
        seqs = model.tokenizer(model.query_prompts(texts, candidates=candidates), add_special_tokens=False)["input_ids"]
        rows = [s for s in seqs for _ in range(num_samples)]

        def pick(logits: torch.Tensor) -> torch.Tensor:
            return sample_top_p(logits, temperature, top_p, generator)

        return [row for s in range(0, len(rows), batch_size)
                for row in self.greedy(rows[s : s + batch_size], max_new, model.stop_ids, pick=pick)]

    @torch.inference_mode()
    def reason(self, texts: list[str], batch_size: int = QUERY_BATCH, show_progress: bool = False,
               candidates: list | None = None) -> QueryEncoding:
        """`reason` mode per batch: greedy CoTs, then each query's embedding from the same cache
        (`candidates`: per query, a grounded query's titles, or None). Batches are length-sorted, as
        `embed_texts`' are (less padding in the prefill, and queries of like length write CoTs of
        like length, so fewer forwards run a batch's last rows alone); returned in input order."""
        model = self.model
        prompts_ = model.query_prompts(texts, candidates=candidates)
        seqs = model.tokenizer(prompts_, add_special_tokens=False)["input_ids"] if texts else []
        order = length_order(seqs)
        cots, embs = [""] * len(texts), np.zeros((len(texts), model.dim), np.float32)
        for s in tqdm(range(0, len(texts), batch_size), desc="reasoning", disable=not show_progress, unit="batch"):
            idx = order[s : s + batch_size]
            batch = [texts[i] for i in idx]
            cands = None if candidates is None else [candidates[i] for i in idx]
            batch_cots, emb = self.greedy([seqs[i] for i in idx], model.config.cot_max_tokens, model.stop_ids,
                                          texts=batch, candidates=cands)
            if emb is None:
                embs[idx] = self.embed_texts(model.query_texts(batch, batch_cots, candidates=cands), batch_size, "q",
                                             False)
            else:
                embs[idx] = emb.cpu().numpy()
            for i, c in zip(idx, batch_cots):
                cots[i] = c
        return QueryEncoding(embs, cots)

    def greedy(self, seqs: list[list[int]], max_new: int, stop: list[int], texts: list[str] | None = None,
               pick=None, candidates: list | None = None):
        """Greedy continuations (B rows of max_new ids; pad after a stop id), as `lm.generate` gives.
        Given `texts` (the queries of `seqs`), returns (CoTs, embeddings (B, D) or None) instead:
        each query embedded after its CoT from the cache the decoding left (`_embed_after`).
        `pick` (logits -> ids) replaces argmax, e.g. sampling (`sample_cots`; decoded eagerly).

        The prefix shared with the prompt template (~70 of ~85 query tokens) comes from the
        cached KV (`shared_prefix`), expanded to the batch; each prompt's suffix follows it,
        left-padded in the middle (mask 0, positions counted from the mask, so every token
        sits where it would in the plain path). Then one token per step over a preallocated
        cache, the LM head on the last position only; finished rows feed pad until half the
        batch has stopped, then the others run alone (`lrem.decoding.decode`).
        """
        with self.same_weights():
            n, rows = len(seqs), self.rows(len(seqs), pick is None)
            if rows == n:
                return self._greedy(seqs, max_new, stop, texts, pick, candidates)
            # a size with captured graphs (`rows`): the last row repeated, its copies' results dropped
            more = rows - n
            out = self._greedy(seqs + [seqs[-1]] * more, max_new, stop, texts and texts + [texts[-1]] * more,
                               pick, candidates and candidates + [candidates[-1]] * more)
            if texts is None:
                return out[:n]
            cots, emb = out
            return cots[:n], None if emb is None else emb[:n]

    def _greedy(self, seqs: list[list[int]], max_new: int, stop: list[int], texts: list[str] | None,
                pick, candidates: list | None):
        model = self.model
        n, kv = self.shared_prefix(seqs)
        sufs = [x[n:] for x in seqs]
        # + room for `_embed_after`: `</think><emb>`, or a CoT that retokenizes differently, run again whole
        prompts_ = None if texts is None else model.query_prompts(texts, candidates=candidates)
        close = None if texts is None or len(seqs) != 1 else self._closer(seqs[0], prompts_[0])
        # word drafts run in a single greedy query's prefill: on the compact decoder as branches
        # (`prefill_tree`), on transformers' decoder the likeliest one as a chain (`prefill_chain`)
        fast = close is not None and pick is None and self.config.lookup_tokens > 0
        # transformers' decoder with captured widths (a GPU) runs one word draft, in a chain after the prompt
        chained = fast and not self.compact() and bool(self.widths(1))
        drafts = (self._word_drafts(texts[0], close, max_new, 1 if chained else None)
                  if fast and (self.compact() or chained) else [])
        # where greedy rows draft (the compact decoder; a single query on a GPU's path too): the
        # queries respelled, as draft sources too
        alts = (self.respelled(texts) if texts is not None and pick is None and self.config.respelled_drafts
                and self.config.lookup_tokens > 0 and (self.compact() or len(seqs) == 1) else None)
        widths = self.widths(len(seqs), pick is None)  # `prefill` and `extend` pad to them
        # the suffix, the CoT, then the closing tokens (or a CoT that retokenizes differently, up to max_new + 8);
        # greedy rows on the CPU (`draft_decode`) get room for the drafts they do not take: at most
        # lookup_tokens a forward (~0.7 MB a slot at batch 32 for the 135M model)
        k = self.config.lookup_tokens if len(seqs) > 1 and pick is None and self.compact() else 0
        drafted = sum(len(d) + len(t) for _, d, t in drafts)  # after the suffix: padded with it where chained
        prefill_w = padded_width(widths, max(len(x) for x in sufs) + (drafted if chained else 0))
        length = (n + prefill_w + max_new + padded_width(widths, max_new + 8) + (0 if chained else drafted)
                  + max_new * k)
        if model.device.type == "cuda":
            length = cuda_length(length)
        step = self.step(len(seqs), length, graph=pick is None)
        ending = self._ending(seqs, prompts_, stop) if texts is not None and k else None
        with step.lock:  # a CUDA step (graph and cache) is shared by every call of its size
            gen, at, used, ends = self._run(step, n, kv, seqs, max_new, stop, pick, close, drafts, ending, alts)
            if texts is None:
                return gen
            cots = [model.decode_cot(g) for g in gen]
            if len(ends) == len(seqs):  # every query's decoding already ran its closing `</think><emb>`
                return cots, self._pool_ends(ends)
            full = model.tokenizer([p + close_cot(c, model.config) for p, c in zip(prompts_, cots)],
                                   add_special_tokens=False)["input_ids"]  # = `query_texts`
            if any(f[: len(x)] != x for f, x in zip(full, seqs)):  # the prompt tokenizes differently in context
                return cots, None
            return cots, self._embed_after(step, at, used, seqs, gen, full, stop, ends)

    def _ending(self, seqs: list[list[int]], prompts_: list[str], stop: list[int]):
        """For a batch's rows, `ending(r, tokens)` (`draft_decode`): the full text's closing tokens
        from `</think>` on (`</think><emb>`) should row r's CoT end after `tokens`, where its last
        token is blank (" ": a CoT ends " </think>") and the text reads them as they are; else
        None."""
        closers: dict[int, object] = {}
        blank = self._blank

        def ending(r: int, tokens: list[int]) -> list[int] | None:
            t = tokens[-1]
            if t not in blank:
                blank[t] = not self.model.tokenizer.decode([t]).strip()
            if not blank[t]:
                return None
            if r not in closers:
                closers[r] = self._closer(seqs[r], prompts_[r])
            keep, toks, _ = closers[r](tokens)
            return toks if toks and keep == len(tokens) and toks[0] in stop else None

        return ending

    def _pool_ends(self, ends: dict[int, torch.Tensor], rows: list[int] | None = None) -> torch.Tensor:
        """Embeddings (len(rows), D) from these rows' hidden states at their `<emb>` (`ends`; rows:
        0..B-1 by default)."""
        h = torch.stack([ends[r] for r in (range(len(ends)) if rows is None else rows)])[:, None]  # (B', 1, D)
        return self.model.pool(h, torch.full((len(h), 1), self.model.emb_id, device=h.device))

    def _closer(self, seq: list[int], prompt: str):
        """For one query, `close(gen)` (`lookup_decode` and `draft_decode` draft with it): how its
        full text (`query_texts`) reads should the CoT end after the prompt `seq` (the tokens of
        `prompt`) + `gen`, as (keep, tokens, ends): the text shares gen's first `keep` tokens, then
        has `tokens`; `ends` are its tokens between the CoT and `</think>` (whitespace). (0, None,
        []) where the text does not start with the prompt."""
        model, head = self.model, seq
        decode, stops = model.tokenizer.decode, set(model.stop_ids)
        seen: dict[tuple[int, ...], tuple] = {}  # a forward may ask twice (drafts, then the CoT that ran)
        # the full text is the prompt's then the CoT part's (`query_texts`): made once, and where the
        # first read shows its tokens to be the prompt's then the CoT part's alone (the part begins
        # after the special `<think>`, where the tokenizer splits), only that part is tokenized again
        apart = None

        def ids(text: str) -> list[int]:
            return model.tokenizer(text, add_special_tokens=False)["input_ids"]

        def close(gen: list[int]) -> tuple[int, list[int] | None, list[int]]:
            if tuple(gen) not in seen:
                seen[tuple(gen)] = reads(gen)
            return seen[tuple(gen)]

        def reads(gen: list[int]) -> tuple[int, list[int] | None, list[int]]:
            nonlocal apart
            part = close_cot(model.decode_cot(gen), model.config)
            if apart:
                full = head + ids(part)
            else:
                full = ids(prompt + part)
                if apart is None:
                    apart = full == head + ids(part)
            if full[: len(head)] != head:
                return 0, None, []
            keep = common_prefix_len([full[len(head) :], gen + [-1]])
            toks = full[len(head) + keep :]
            s = next((i for i, t in enumerate(toks) if t in stops), len(toks))
            e = s
            while e > 0 and not decode([toks[e - 1]]).strip():
                e -= 1
            return keep, toks, toks[e:s]

        return close

    def respelled(self, texts: list[str]) -> list[list[int]]:
        """For each text, tokens of its words spelled as a CoT may write them, as draft sources
        (`draft_for`): in Title Case; short words (up to `UPPER_LETTERS` letters) in capitals ("us
        navy" -> "US navy"); in the singular where they end in "s" ("pancakes" -> "pancake"); and,
        for up to `HYPHEN_WORDS` words, the text with one pair of neighbouring words hyphenated, for
        each pair ("kitchen anti-fatigue mats"). Each spelling that differs from the text, after a
        space and followed by `</think>` (a stop id: a draft ends where its spelling does, and the
        closing tokens follow it); [] where none differs. One tokenizer call."""
        spellings = []
        for text in texts:
            words = text.split()
            alts = [" ".join(w.title() for w in words),
                    " ".join(w.upper() if w.isalpha() and len(w) <= self.UPPER_LETTERS else w for w in words),
                    " ".join(w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith(self.NOT_PLURAL) else w
                             for w in words)]
            if len(words) <= self.HYPHEN_WORDS:
                alts += [" ".join([*words[:i], words[i] + "-" + words[i + 1], *words[i + 2 :]])
                         for i in range(len(words) - 1)]
            spellings.append([" " + x for x in dict.fromkeys(alts) if x != " ".join(words)])
        flat = [x for alts in spellings for x in alts]
        ids = iter(self.model.tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else [])
        end = self.model.think_end_id
        return [[t for _ in alts for t in [*next(ids), end]] for alts in spellings]

    def _word_drafts(self, text: str, close, max_new: int, most: int | None = None
                     ) -> list[tuple[tuple[str, ...], list[int], list[int]]]:
        """A single query's drafted CoTs for its prefill (`config.word_drafts`): words of the query
        at `WORD_POSITIONS`, each as (its positions, CoT tokens, the full text's closing tokens
        after them), where its full text reads them as drafted and the draft pays: the recent hit
        rate of its positions (`draft_hits`, prior 1/2; a CoT that only began with the draft counts
        `BEGAN`: its next token came with the prefill) times a saved forward (`ROW_COST` tokens)
        at least its tokens; the likeliest first. Why: each drafted token costs ~1/40 of the
        forward a hit saves, and which word the CoT copies depends on the queries' form (a
        definition's head noun comes first, a keyword query's last). Every `EXPLORE_EVERY`-th query
        tries them whatever their hit rate, the least tried first. `most`: at most so many (else
        `config.word_drafts`)."""
        most = self.config.word_drafts if most is None else min(most, self.config.word_drafts)
        if not most:
            return []
        words = [w.strip(",.;:!?\"()") for w in text.split()]
        words = [w for w in words if any(c.isalnum() for c in w)]  # not "-", "&", "/"
        content = [w for w in words if w.lower() not in self.FUNCTION_WORDS]
        at = {"first": content[:1], "second": content[1:2], "last": words[-1:],
              "last two": words[-2:] if len(words) > 2 else [], "first two": content[:2] if len(content) > 1 else [],
              "second two": content[1:3] if len(content) > 2 else [],
              "whole": words if 2 < len(words) <= self.WHOLE_WORDS else []}
        phrases: dict[str, list[str]] = {}
        for where in self.WORD_POSITIONS:
            if at[where]:
                phrases.setdefault(" ".join(at[where]), []).append(where)
        self.n_drafted += 1
        explore = self.n_drafted % self.EXPLORE_EVERY == 0
        out = []
        for phrase, where in phrases.items():
            draft = self.model.tokenizer(" " + phrase, add_special_tokens=False)["input_ids"]
            keep, toks, _ = close(draft)
            if toks is None or keep != len(draft) or len(draft) >= max_new:
                continue
            tries = [self.draft_hits.setdefault(w, collections.deque(maxlen=16)) for w in where]
            rate = max((sum(t) + 1) / (len(t) + 2) for t in tries)
            if explore or rate * ROW_COST >= len(draft) + len(toks):
                out.append(((min(len(t) for t in tries) if explore else 0, -rate), tuple(where), draft, toks))
        out.sort(key=lambda d: d[0])
        return [d[1:] for d in out[:most]]

    def _run(self, step: GreedyStep, n: int, kv, seqs: list[list[int]], max_new: int,
             stop: list[int], pick=None, close=None, drafts=(), ending=None, alts=None
             ) -> tuple[list[list[int]], list[list[int]], int, dict[int, torch.Tensor]]:
        """Decode `seqs` into `step`'s cache: prefix KV in slots [0, n), the suffixes in [n, n + W),
        then the word drafts' slots if any (masked out again unless one was the CoT), then one slot
        per generated token (drafted tokens a row did not take leave masked slots between). Returns
        the generated ids, the slot of each generated token each row fed, the number of cache slots
        filled, and the last hidden state of the closing tokens of the rows where they ran while
        decoding (row -> (D,)). `pick` (logits (B, V) -> ids (B,)) replaces argmax, e.g. to sample
        (`sample_cots`). A single greedy query on the compact decoder takes drafts from its prompt
        and `history`, and `close` (`_closer`); its `drafts` ((positions, CoT, closing tokens), see
        `_word_drafts`) run in the prefill forward itself (`prefill_tree`); a greedy batch there
        decodes with drafts (`draft_decode`), and with `ending` (`_ending`) runs closing tokens.
        On transformers' decoder with captured widths (a GPU), a single greedy query runs its word
        draft, if any, after the prompt (`_chain_drafted`), then drafts in one chain a forward
        (`chain_decode`). All of them also draft from `alts`, each query respelled (`respelled`), if
        given."""
        pad, k = self.model.tokenizer.pad_token_id, self.config.lookup_tokens
        single = len(seqs) == 1 and pick is None and step.compact is not None and k > 0
        slot, first = None, None
        if single and drafts:
            hs, w = prefill_tree(step, n, kv, seqs[0], [d + t for _, d, t in drafts])
            # the picks after the prompt and along every draft (but its last token) from one pass of the
            # LM head: its cost is flat up to 16 rows, about what three drafts need
            starts = np.cumsum([w] + [len(d) + len(t) for _, d, t in drafts]).tolist()
            need = [w - 1, *(i for s0, (_, d, t) in zip(starts, drafts) for i in range(s0, s0 + len(d) + len(t) - 1))]
            picked = dict(zip(need, greedy_ids(step.logits(hs[need])).tolist()))
            tok, at, last = picked[w - 1], w, torch.tensor([n + w - 1])
            began = None  # (tokens taken, slot, picks) of the draft the model's CoT begins with, if any
            for j, (where, d, t) in enumerate(drafts):
                gen = None
                if d[0] == tok:  # the model's first CoT token: check the rest of this draft
                    picks = [tok, *(picked[i] for i in range(at, at + len(d) + len(t) - 1))]
                    gen = check_branch(d, t, picks, stop, max_new, close)
                    a = agreed(d, picks, stop)
                    if began is None or a > began[0]:
                        began = (a, n + at, picks)
                self._tried(where, gen is not None, d[0] == tok)
                if gen is not None:
                    for rest, _, _ in drafts[j + 1 :]:  # the other drafts were not the CoT
                        self._tried(rest, False)
                    self._remember(seqs, [gen], stop)
                    end = at + len(d) + len(t)
                    return [gen + [pad] * (max_new - len(gen))], [list(range(n + at, n + end))], n + end, {0: hs[end - 1]}
                at += len(d) + len(t)
            slot = n + len(hs)
            step.mask[:, n + w : slot] = 0  # no draft was the CoT: decode after their slots
            if began is not None and began[2][began[0]] not in stop:
                # the CoT begins with a draft's first tokens ("warm" of "warm boot"): keep their keys and
                # values and the model's next pick, so decoding goes on from there (a forward saved)
                a, src, picks = began
                move_slots(step, src, slot, a)
                first = picks[: a + 1]
        elif not (drafts and step.compact is None):  # (a word draft on transformers' decoder: `_chain_drafted`)
            logits, last, w = prefill(step, n, kv, seqs, pad)
            tok = pick(logits) if pick else greedy_ids(logits)  # (B,)
        if single:
            gen, used, h = lookup_decode(step, seqs[0], first or int(tok), slot or n + w, int(last[0]) + 1, max_new,
                                         stop, k, self._past(), close, alts[0] if alts else None)
            self._remember(seqs, [gen], stop)
            ends = {} if h is None else {0: h}
            return [gen + [pad] * (max_new - len(gen))], [list(range(slot or n + w, used))], used, ends
        if len(seqs) == 1 and pick is None and k > 0 and step.widths:  # one greedy query on transformers' decoder
            h = None
            if drafts:
                gen, slot, h = self._chain_drafted(step, n, kv, seqs[0], max_new, stop, close, drafts[0])
            else:
                gen, slot = [int(tok)], n + w
            if h is None:
                gen, used, h = chain_decode(step, seqs[0], gen, slot, len(seqs[0]), max_new, stop, k, self._past(),
                                            close, alts[0] if alts else None)
            else:  # the word draft was the CoT: it and its closing tokens ran
                used = slot + len(drafts[0][1]) + len(drafts[0][2])
            self._remember(seqs, [gen], stop)
            return [gen + [pad] * (max_new - len(gen))], [list(range(slot, used))], used, {} if h is None else {0: h}
        if pick is None and step.compact is not None and k > 0:  # greedy on the CPU: rows with drafts
            gen, at, ends = draft_decode(step, tok.tolist(), last.tolist(), n + w, max_new, stop, pad, seqs, k,
                                         reserve=max_new + 8, ending=ending,  # the closing tokens' room (`_greedy`)
                                         alts=alts)
            used = max((a[-1] + 1 for a in at if a), default=n + w)
        else:  # one token a step: token i of every row in slot n + w + i
            lag = self.config.decode_lag if step.graph is not None and pick is None else 0
            gen = decode(step, tok, last, n + w, max_new, stop, pad, pick, lag=lag)
            used = n + w + max(len(g) for g in gen) - 1  # slots filled
            at, ends = [list(range(n + w, used))] * len(gen), {}
        if pick is None:
            self._remember(seqs, gen, stop)
        return [row + [pad] * (max_new - len(row)) for row in gen], at, used, ends

    def _chain_drafted(self, step: GreedyStep, n: int, kv, seq: list[int], max_new: int, stop: list[int], close,
                       draft: tuple) -> tuple[list[int], int, torch.Tensor | None]:
        """One query's prefill on transformers' decoder with its likeliest word draft (positions, CoT
        tokens, closing tokens; `_word_drafts`) run after the prompt in the same forward
        (`prefill_chain`). Returns (tokens, the slot of the draft's first, hidden state): where the CoT
        is the draft and stops where the closing tokens begin, the CoT's ids and the closing tokens'
        last hidden state (that forward has embedded the query); else the tokens generated so far
        (the draft's first tokens the model took, then its own pick) and None, the draft's other
        slots masked."""
        where, d, t = draft
        hs, slot = prefill_chain(step, n, kv, seq, d + t, self.model.tokenizer.pad_token_id)
        s = len(seq) - n
        picks = greedy_ids(step.logits(hs[s - 1 : s + len(d) + len(t) - 1])).tolist()  # picks[i]: where chain[i] is
        gen = check_branch(d, t, picks, stop, max_new, close)
        self._tried(where, gen is not None, d[0] == picks[0])
        if gen is not None:
            return gen, slot, hs[-1]
        a = agreed(d, picks, stop)
        step.mask[:, slot + a :] = 0  # the draft's tokens after those the model took
        return d[:a] + [picks[a]], slot, None

    def _tried(self, where, hit: bool, began: bool = False) -> None:
        """A word draft's try, in its positions' recent hit rates (`draft_hits`): 1 where it was the
        CoT, `BEGAN` where the CoT began with it, else 0."""
        for key in where:
            self.draft_hits[key].append(1.0 if hit else self.BEGAN if began else 0.0)

    def _past(self) -> list[int]:
        """The recent CoTs' tokens (`history`) as one draft source, oldest first: the query's own
        tokens, searched after them, win ties."""
        return [t for h in list(self.history) for t in h]

    def _remember(self, seqs: list[list[int]], gen: list[list[int]], stop: list[int]) -> None:
        """Keep greedy CoTs (up to and including their stop token), each after its prompt's last
        tokens, as draft sources for later single queries (`history`)."""
        if self.history.maxlen:
            ends = [next((i + 1 for i, t in enumerate(g) if t in stop), len(g)) for g in gen]
            kept = {tuple(x[-self.HISTORY_CONTEXT :] + g[:e]): None for x, g, e in zip(seqs, gen, ends)}
            self.history.extend(list(h) for h in kept)  # each once: a batch's rows may repeat (`rows`)

    def _embed_after(self, step: GreedyStep, at: list[list[int]], used: int, seqs: list[list[int]],
                     gen: list[list[int]], full: list[list[int]], stop: list[int],
                     done: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Embeddings (B, D) of the `full` query sequences (prompt + CoT + `</think><emb>`), run
        over the first `used` cache slots `_run` filled (the generated tokens each row fed in slots
        `at[row]`): the prompt's KV is reused, and so is that of the generated tokens each CoT
        starts with, up to its stop id (a stopped row is not always run again: `decode` runs the
        others alone); the rest (at least `<emb>`) is run in new slots, so each token keeps the
        position it has in the plain path. `done`: rows whose closing tokens already ran while
        decoding, with the hidden state at their `<emb>` (`draft_decode`): not run again."""
        dev, done = self.model.device, done or {}
        fed = [min(len(a), next((i for i, t in enumerate(g) if t in stop), len(g))) for a, g in zip(at, gen)]
        keep = [common_prefix_len([f[len(x):], g[:m] + [-1]]) for x, g, f, m in zip(seqs, gen, full, fed)]
        pad = self.model.tokenizer.pad_token_id
        tails = [f[len(x) + j :] for x, f, j in zip(seqs, full, keep)]
        todo = [r for r in range(len(tails)) if r not in done]
        for r in todo:
            step.mask[r, at[r][keep[r]:]] = 0  # generated tokens this row's CoT does not keep
        longest = max(len(tails[r]) for r in todo)
        split = step.compact is not None and used + longest <= step.length  # a second forward needs the cache's room
        k = split_width([len(tails[r]) for r in todo]) if split else longest
        out = torch.empty(len(tails), self.model.dim, device=dev)
        some = split and len(todo) < len(tails)  # only these rows run (the compact decoder with room)
        rows, first = torch.tensor(todo if split else range(len(tails)), device=dev), 0
        while len(rows):  # the first k tokens of every tail, then the rest of the longer ones (those rows alone)
            part = [tails[r][first : first + k] for r in rows.tolist()]
            w = max(len(t) for t in part)
            ids = torch.tensor([t + [pad] * (w - len(t)) for t in part], device=dev)  # (B', W) right-padded
            new = torch.tensor([[1] * len(t) + [0] * (w - len(t)) for t in part], device=dev)
            pos = torch.tensor([[len(seqs[r]) + keep[r] + first + i for i in range(w)] for r in rows.tolist()],
                               device=dev)  # (B', W)
            h = step.extend(ids, pos, new, used + first, None if first == 0 and not some else rows)
            ends = torch.tensor([len(tails[r]) <= first + k for r in rows.tolist()], device=dev)
            out[rows[ends]] = self.model.pool(h[ends], ids[ends])
            rows, first = rows[~ends], first + k
            k = longest - first
        if done:  # after the loop: without room for a second forward, every row ran again above
            out[list(done)] = self._pool_ends(done, list(done))
        return out

    def _greedy_vllm(self, engine, prompts_: list[str], max_new: int, stop: list[int]) -> list[list[int]]:
        from vllm import SamplingParams

        seqs = self.model.tokenizer(prompts_, add_special_tokens=False)["input_ids"]
        params = SamplingParams(temperature=0.0, max_tokens=max_new, stop_token_ids=stop, detokenize=False)
        outs = engine.generate([{"prompt_token_ids": x} for x in seqs], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]
