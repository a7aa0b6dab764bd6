"""The LREM model: one decoder LLM that reasons about a query, then embeds it at `<emb>`.

    from lrem.model import LREM
    model = LREM.from_pretrained("smollm2-135m-instruct")       # built-in, offline
    q = model.encode_queries(["a device for pulling corks"], mode="reason")
    q.cots          # ['corkscrew, wine opener, ...']
    q.embeddings    # (1, 576) float32, L2-normalised
    items = model.encode_items(["corkscrew, bottle screw"])   # (1, 576)
    model.similarity(q.embeddings, items)                       # (1, 1) cosine
    model.encode_items("corkscrew")                             # one string: (576,), as sentence-transformers

Inputs longer than the model's limits (`max_query_tokens`, `max_item_tokens` in its PromptConfig)
are cut and counted in `model.truncated` by default; `truncate=False` makes them an error.

Query side (LREM_SPEC): chat prompt + `<think>` + CoT + `</think><emb>`; the CoT is generated
greedily (at most `cot_max_tokens` tokens) in `reason` mode, empty in `direct` mode, or given.
Item side: chat prompt + `<emb>`, no reasoning. Embedding = last-layer hidden state at `<emb>`.

Speed: the prompt prefix every query (or item) shares is run once and its KV cache kept across
calls; reasoning decodes greedily over a preallocated KV cache: on the CPU with a compact
decoder (`lrem.decoding.StaticDecoder`) that checks tokens drafted from the prompt when a query
runs alone, on CUDA with a captured graph, or vLLM where installed. `generate_cots(fast=False)`
is the plain `lm.generate` path, same CoTs.
"""
from __future__ import annotations

import collections
import importlib.util
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import prompts
from ._io import atomic_dir, write_json
from .backbones import BUILTINS, default_dtype, init_special_embeddings, resolve_backbone
from .decoding import (GreedyStep, Linear, StaticDecoder, block_linears, common_prefix_len, decode, lookup_draft,
                       prefill, prefix_kv, sample_top_p)
from .prompts import PromptConfig
from .router import load_router

LREM_CONFIG = "lrem_config.json"
BASE_MODEL = "smollm2-135m-instruct"  # the backbone lrem trains from (SFTConfig.model)
TRAINED_MODEL = "lrem-wordnet-135m"  # the shipped reasoning model (a delta on BASE_MODEL, lrem.delta)


def default_model() -> str:
    """What a user gets without naming a model: the shipped trained model, or the untrained base
    where a checkout lacks it (an untrained model returns near-identical items for every query)."""
    from .delta import shipped

    return TRAINED_MODEL if TRAINED_MODEL in shipped() else BASE_MODEL
DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_batch_size(batch_size) -> None:
    """A batch size below 1 would embed nothing (range() with a negative step) and leave zero rows."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}; must be >= 1")


QUERY_MODES = ("reason", "direct")


def emb_hidden(hidden: torch.Tensor, input_ids: torch.Tensor, emb_id: int) -> torch.Tensor:
    """Hidden state at the last `<emb>` of each row.  hidden (B, T, D), input_ids (B, T) -> (B, D).

    Raises if a row has no `<emb>` (it was truncated away or never added).
    """
    is_emb = input_ids == emb_id  # (B, T)
    if not bool(is_emb.any(dim=1).all()):
        raise ValueError("a sequence has no <emb> token")
    t = torch.arange(input_ids.shape[1], device=input_ids.device)
    pos = torch.where(is_emb, t, -1).max(dim=1).values  # (B,) last <emb> position
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), pos]


def shared_prefix_len(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """Leading columns every row of a right-padded batch shares (unmasked, same ids), leaving each
    row >= 1 token after them; 0 for a single row.  (B, T), (B, T) -> int.

    >>> shared_prefix_len(torch.tensor([[1, 2, 3, 4], [1, 2, 5, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]))
    2
    """
    if input_ids.shape[0] < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(dim=0) & attention_mask.bool().all(dim=0)  # (T,)
    return min(int(same.long().cumprod(0).sum()), input_ids.shape[1] - 1)


def _resize_embeddings(lm, n: int) -> None:
    """`lm.resize_token_embeddings(n)` without drawing random rows when the embeddings are tied:
    the new rows (the special tokens) are set by `init_special_embeddings` right after, and the
    draws over a new full-size matrix took ~0.5 s of every load of a backbone."""
    out = lm.get_output_embeddings()
    if out is not None and out.weight is not lm.get_input_embeddings().weight:  # untied: a new head row keeps its init
        lm.resize_token_embeddings(n, mean_resizing=False)
        return
    from transformers.initialization import no_init_weights

    old = lm.get_input_embeddings().weight.shape[0]
    lm._init_weights = lambda module: None  # shadows the method for this call only
    try:
        with no_init_weights():
            lm.resize_token_embeddings(n, mean_resizing=False)
    finally:
        del lm._init_weights
    with torch.no_grad():
        lm.get_input_embeddings().weight[old:] = 0.0  # not left uninitialised, should a row not be a special token


@dataclass
class QueryEncoding:
    """For a list of n queries: embeddings (n, dim) and n CoTs; for one query given as a string:
    embeddings (dim,) and its CoT as a string (as `SentenceTransformer.encode` treats a string)."""

    embeddings: np.ndarray  # (n, dim) or (dim,), float32, L2-normalised
    cots: list[str] | str  # the reasoning each embedding was taken after ("" in direct mode)


class InputTooLong(ValueError):
    """An input over the model's token limit, with truncate=False."""


SIDES = {"query": "max_query_tokens", "item": "max_item_tokens"}  # side -> the PromptConfig limit


def similarity(a, b) -> np.ndarray:
    """Cosine similarity of every row of `a` with every row of `b`: (n, m) float32; a 1-D vector
    counts as one row (as `SentenceTransformer.similarity`, which returns a tensor)."""
    a, b = (np.atleast_2d(np.asarray(x, dtype=np.float32)) for x in (a, b))
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def item_fields(item) -> dict:
    """A catalog item as template fields: a string is its title; a mapping or an object with
    attributes (`lrem.data.Item`) gives any of `prompts.ITEM_FIELDS` it has."""
    if isinstance(item, str):
        return {"title": item}
    get = item.get if isinstance(item, Mapping) else lambda f: getattr(item, f, None)
    return {f: get(f) for f in prompts.ITEM_FIELDS}


class LREM(torch.nn.Module):
    """A causal LM backbone plus the LREM prompts and special tokens.

    Args:
        lm: a transformers causal LM whose vocabulary already has the special tokens.
        tokenizer: its tokenizer.
        config: prompts and budgets (saved as `lrem_config.json`).
    """

    HISTORY_CONTEXT = 3  # prompt tokens kept before each CoT in `cot_history` (the CoT's first n-grams)

    def __init__(self, lm, tokenizer, config: PromptConfig | None = None):
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer
        self.config = config or PromptConfig()
        self.tokenizer.padding_side = "left"  # generation appends on the right
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        ids = self.tokenizer.convert_tokens_to_ids(
            [self.config.think_token, self.config.think_end_token, self.config.emb_token]
        )
        if self.tokenizer.unk_token_id is not None and self.tokenizer.unk_token_id in ids:
            raise ValueError("the tokenizer lacks the LREM special tokens; use LREM.from_pretrained")
        self.think_id, self.think_end_id, self.emb_id = ids
        self.source = ""  # where it was loaded from (recorded in index metadata)
        self.base = ""  # the backbone these weights started from (model card)
        # the training stages behind these weights (lrem_config.json, model card); not `training`,
        # which is nn.Module's train/eval flag (`.train()` would overwrite the list with a bool)
        self.stages: list[dict] = []
        # inputs cut to the token limits so far, per side ("query", "item"): what `lrem index` and
        # `lrem eval` report, and /metrics counts
        self.truncated: collections.Counter = collections.Counter()
        # the learned router of `auto` mode (`lrem.router.LearnedRouter`) when the model folder has a
        # router.json (`lrem router fit`), else None: searchers then use the margin router
        self.router = None
        self._fast: dict = {}  # prefix KV caches, CUDA graphs, vLLM engine: valid for one `_weights_key`
        self._templates: dict = {}  # template prefix ids per prompt config (they do not depend on weights)
        # Greedy reasoning for one query (CPU) checks up to this many tokens drafted from its prompt
        # per forward (`_lookup_run`); 0 decodes one token per forward.
        self.lookup_tokens = 4
        # ... and from the CoTs of the latest greedy queries (with the last prompt tokens before
        # each): CoTs share phrasing across queries ("The product search intent is: ..."), as
        # SuffixDecoding (Oliaro et al., 2024) uses for repeated agent outputs. Drafts are
        # checked, so the outputs stay those of greedy decoding. maxlen 0: prompt only.
        self.cot_history: collections.deque[list[int]] = collections.deque(maxlen=32)
        # CPU decoding through `lrem.decoding.StaticDecoder` where it covers the backbone; False:
        # transformers' decoder over a static cache, the path CUDA takes (tested against each other).
        self.compact_decoder = True

    def __getstate__(self):
        # the speed caches hold CUDA graphs and tensors tied to these weights: copies rebuild them
        return {**self.__dict__, "_fast": {}}

    # ---- loading and saving -------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, name_or_path: str | None = None, dtype: str | torch.dtype = "auto", device: str = "cpu", log=print
    ) -> "LREM":
        """Load an LREM folder, a plain HF folder or hub name, a built-in backbone name, or a
        shipped trained model (`lrem-wordnet-135m`, the default: see `default_model`).

        A folder with `lrem_config.json` is an LREM model (special tokens already in place); a
        `router.json` beside it (`lrem router fit`) becomes `model.router`, which `auto` mode uses.
        Anything else is a backbone: the three special tokens are added and the embedding
        matrix grows by three rows (initialised to the mean of the others).
        `dtype`: "auto" (bfloat16 where the hardware has it, see `default_dtype`), "bfloat16"
        or "float32".
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if isinstance(dtype, str) and dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}; expected one of {', '.join(DTYPES)}")
        if dtype == "auto":
            dtype = default_dtype(device)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        name_or_path = name_or_path or default_model()  # recorded below: an index must name a loadable model
        path = resolve_backbone(name_or_path, log=log)
        cfg_file = Path(path) / LREM_CONFIG
        if Path(path).exists() and not (Path(path) / "config.json").exists():
            raise FileNotFoundError(f"{path} is not a model folder (no config.json)")
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:  # transformers' multi-line "couldn't connect" and repo-id errors
            if Path(path).exists():
                raise ValueError(f"model {name_or_path}: cannot load its tokenizer: {str(e).splitlines()[0]}") from e
            raise ValueError(f"model {name_or_path!r}: no such folder, not a built-in name ({', '.join(BUILTINS)}) "
                             "and not a hub model in the local cache") from e
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        saved = json.loads(cfg_file.read_text()) if cfg_file.exists() else None
        if saved is not None:
            config = PromptConfig.from_dict(saved["prompts"])
        else:
            config = PromptConfig()
            tok.add_tokens(list(prompts.SPECIAL_TOKENS), special_tokens=True)
            _resize_embeddings(lm, len(tok))
            init_special_embeddings(lm, tok)
        model = cls(lm.to(device).eval(), tok, config)
        model.source = model.base = str(name_or_path)
        if saved is not None:
            model.stages = list(saved.get("training", []))
            model.base = saved.get("base_model") or saved.get("base") or model.source
            model.router = load_router(path)
        return model

    def save_pretrained(self, out: str | os.PathLike, stage: dict | None = None, metrics: dict | None = None) -> None:
        """Write backbone, tokenizer, `lrem_config.json` and a model card (README.md) to `out`
        atomically. `stage` (a training stage: name, steps, data, ...) is recorded after the
        stages these weights already went through; `metrics` go into the card. A learned router
        (`self.router`, from router.json) is not written: it was fitted on the scores of the
        weights it was loaded with, so a saved model gets its own (`lrem router fit`)."""
        from .card import model_card

        training = self.stages + ([stage] if stage else [])
        with atomic_dir(out) as tmp:
            self.lm.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            write_json(tmp / LREM_CONFIG, {"prompts": self.config.to_dict(), "base": self.source,
                                           "base_model": self.base, "training": training})
            (tmp / "README.md").write_text(model_card(self, training=training, metrics=metrics), encoding="utf-8")

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    @property
    def dim(self) -> int:
        return self.lm.config.hidden_size

    # ---- text -> token batches ----------------------------------------------------------
    def token_counts(self, texts: list[str]) -> list[int]:
        """Tokens of each text on its own (what the limits count)."""
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def overlong(self, texts, side: str) -> list[tuple[int, int]]:
        """(position, tokens) of each input over the side's limit (`SIDES`); for items, the
        filled item template counts (an input may be a title or an item's fields)."""
        if side == "item":
            texts = [prompts.item_text(item_fields(x), self.config) for x in texts]
        limit = getattr(self.config, SIDES[side])
        return [(i, n) for i, n in enumerate(self.token_counts(texts)) if n > limit]

    def fit(self, texts: list[str], side: str, truncate: bool = True) -> list[str]:
        """`texts` within the side's token limit (`SIDES`): over it, an `InputTooLong` naming the
        limit, or (truncate) cut to it and counted in `self.truncated[side]`. Fitting twice cuts
        nothing more, so the public renderers below can each fit their input."""
        setting = SIDES[side]
        limit, out = getattr(self.config, setting), list(texts)
        for i, n in enumerate(self.token_counts(out)):
            if n <= limit:
                continue
            if not truncate:
                raise InputTooLong(f"{side} {i} has {n} tokens; the limit is {limit} ({setting}, saved with the model "
                                   f"in lrem_config.json); pass truncate=True to cut it")
            ids = self.tokenizer(out[i], add_special_tokens=False)["input_ids"]
            k = limit
            while True:  # decoding can merge pieces into more tokens than `k`: cut until it fits
                out[i] = self.tokenizer.decode(ids[:k])
                if self.token_counts([out[i]])[0] <= limit or k == 0:
                    break
                k -= 1
            self.truncated[side] += 1
        return out

    def query_prompts(self, texts: list[str], truncate: bool = True) -> list[str]:
        """Query-side texts up to `<think>` (queries fitted to `max_query_tokens`, see `fit`)."""
        return [prompts.query_prompt(self.tokenizer, t, self.config) for t in self.fit(texts, "query", truncate)]

    def query_texts(self, texts: list[str], cots: list[str], truncate: bool = True) -> list[str]:
        """Full query-side texts: prompt + `<think>` + CoT + `</think><emb>`."""
        return [p + prompts.close_cot(c, self.config) for p, c in zip(self.query_prompts(texts, truncate), cots)]

    def item_texts(self, items, truncate: bool = True) -> list[str]:
        """Full item-side texts: the item template filled from each item's fields (`item_fields`;
        a string is a title), fitted to `max_item_tokens`, in the item chat prompt ending `<emb>`."""
        filled = [prompts.item_text(item_fields(x), self.config) for x in items]
        return [prompts.item_prompt(self.tokenizer, t, self.config) for t in self.fit(filled, "item", truncate)]

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Left-padded batch; the templates already hold every special token."""
        batch = self.tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
        return {k: v.to(self.device) for k, v in batch.items()}

    # ---- embeddings ---------------------------------------------------------------------
    def embed_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised `<emb>` hidden states, (B, D), with gradients if enabled.

        Runs the decoder without the LM head (the vocabulary projection is not needed here).
        Position ids come from the mask, so left padding does not shift positions.
        """
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        out = self.lm.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        h = emb_hidden(out.last_hidden_state, input_ids, self.emb_id)  # (B, D)
        return F.normalize(h.float(), dim=-1)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      share_prefix: bool = True) -> torch.Tensor:
        """Last hidden states (B, T, H) of right-padded rows, with gradients if enabled.

        With `share_prefix`, the token prefix all rows share (chat template, system prompt and
        instruction: most of a query side) runs once at batch 1 and its keys and values are
        broadcast to the batch. The values equal a plain batched pass, gradients included
        (they sum over the broadcast); the training cost falls by the shared share of tokens.
        """
        b, t = input_ids.shape
        p = shared_prefix_len(input_ids, attention_mask) if share_prefix else 0
        dec = self.lm.get_decoder()
        checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in self.lm.modules())
        if p == 0 or checkpointing:  # activation checkpointing runs without a KV cache
            pos = torch.arange(t, device=input_ids.device).expand(b, -1)
            return dec(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
                       use_cache=False).last_hidden_state
        from transformers import DynamicCache

        pre = dec(input_ids=input_ids[:1, :p], position_ids=torch.arange(p, device=input_ids.device)[None],
                  use_cache=True)
        kv = [(layer.keys.expand(b, -1, -1, -1), layer.values.expand(b, -1, -1, -1))
              for layer in pre.past_key_values.layers]
        pos = torch.arange(p, t, device=input_ids.device).expand(b, -1)  # (B, T - P)
        out = dec(input_ids=input_ids[:, p:], attention_mask=attention_mask, position_ids=pos,
                  past_key_values=DynamicCache(ddp_cache_data=kv), use_cache=True).last_hidden_state
        return torch.cat([pre.last_hidden_state.expand(b, -1, -1), out], dim=1)

    @torch.inference_mode()
    def _embed_texts(self, texts: list[str], batch_size: int, desc: str, show_progress: bool,
                     prefix_cache: bool = True) -> np.ndarray:
        """Embed full texts in length-sorted batches (less padding), returned in input order.

        With `prefix_cache`, the token prefix shared by all texts (system prompt, instruction:
        most of a query's tokens) is run once and its KV cache reused by every batch (and by
        later calls, see `_shared_prefix`); the token sequences and positions are exactly those
        of the plain path.
        """
        check_batch_size(batch_size)
        seqs = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        n_prefix, prefix_kv = self._shared_prefix(seqs) if prefix_cache else (0, None)
        order = np.argsort([len(s) for s in seqs], kind="stable")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for s in tqdm(range(0, len(texts), batch_size), desc=desc, disable=not show_progress, unit="batch"):
            idx = order[s : s + batch_size]
            out[idx] = self._embed_suffixes([seqs[i][n_prefix:] for i in idx], prefix_kv, n_prefix).cpu().numpy()
        return out

    def _prefix_kv(self, prefix: list[int], past=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (key, value) of the shared prefix, batch 1 (`lrem.decoding.prefix_kv`)."""
        return prefix_kv(self.lm, prefix, past)

    def _weights_key(self) -> tuple:
        """Changes whenever the weights may have: moved, cast, replaced (any parameter's address),
        or updated in place (every in-place update bumps a tensor's version counter)."""
        ps = list(self.lm.parameters())
        return ps[0].device, ps[0].dtype, tuple(p.data_ptr() for p in ps), sum(p._version for p in ps)

    def _fast_state(self) -> dict:
        """Caches derived from the weights (prefix KV, CUDA graphs, vLLM), dropped when they change."""
        key = self._weights_key()
        if self._fast.get("key") != key:
            self._fast = {"key": key, "prefix": {}, "steps": {}, "linears": {}}
        return self._fast

    def _plain_layers(self) -> bool:
        """Whether the LM's layers are its own: not wrapped by adapters (LoRA while training,
        `lrem.train.lora`). The compact decoder and vLLM read the weight tensors directly, which
        would miss an adapter; transformers' decoder runs it."""
        state = self._fast_state()
        if "plain" not in state:  # PEFT's layers keep the layer they wrap as `base_layer`
            state["plain"] = not any(hasattr(m, "base_layer") for m in self.lm.modules())
        return state["plain"]

    def _template_prefixes(self) -> list[list[int]]:
        """Token ids every query prompt, and every item text, starts with: the chat template,
        system prompt and instruction up to where the query or title goes (kept per prompt config)."""
        key = repr(self.config)
        if key not in self._templates:
            self._templates[key] = []
            for render in (self.query_prompts, self.item_texts):
                a, b = self.tokenizer(render(["a", "b"]), add_special_tokens=False)["input_ids"]
                self._templates[key].append(a[: common_prefix_len([a, b])])
        return self._templates[key]

    def _linears(self):
        """The compact decoder's blocked views of the weights for this thread count (kept)."""
        cached, parts = self._fast_state()["linears"], torch.get_num_threads()
        if parts not in cached:
            cached[parts] = block_linears(self.lm, parts)
        return cached[parts]

    def _shared_prefix(self, seqs: list[list[int]]) -> tuple[int, list | None]:
        """(n, per-layer KV of the first n tokens): the prefix of `seqs` to run once, batch 1.

        n is the batch's common prefix (each row keeps >= 1 token). Its part shared with a
        template prefix comes from a KV cache kept across calls, so even a single query skips
        its system prompt and instruction; the rest (e.g. one query repeated) is run here.
        """
        n = common_prefix_len(seqs)
        if n == 0:
            return 0, None
        tpl = max(self._template_prefixes(), key=lambda t: common_prefix_len([t + [-1], seqs[0]]))
        m = min(n, common_prefix_len([tpl + [-1], seqs[0]]))  # tokens shared with the template
        if m == 0:
            return (n, self._prefix_kv(seqs[0][:n])) if len(seqs) > 1 else (0, None)
        cached = self._fast_state()["prefix"]
        if tuple(tpl) not in cached:
            cached[tuple(tpl)] = self._prefix_kv(tpl)
        kv = [(k[:, :, :m], v[:, :, :m]) for k, v in cached[tuple(tpl)]]
        if n > m and len(seqs) > 1:  # a longer common prefix than the template's: extend it
            kv = self._prefix_kv(seqs[0][m:n], past=kv)
        return (n if len(seqs) > 1 else m), kv

    def _embed_suffixes(self, suffixes: list[list[int]], prefix_kv, n_prefix: int) -> torch.Tensor:
        """Embeddings (B, D) of prefix + each suffix; suffixes are right-padded (positions stay
        exact, and `emb_hidden` finds each row's own `<emb>`)."""
        from transformers import DynamicCache

        width = max(len(x) for x in suffixes)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([x + [pad] * (width - len(x)) for x in suffixes], device=self.device)  # (B, S)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in suffixes], device=self.device)
        if prefix_kv is None:
            return self.embed_batch(ids, mask)
        b = ids.shape[0]
        full_mask = torch.cat([torch.ones(b, n_prefix, dtype=mask.dtype, device=self.device), mask], dim=1)
        position_ids = n_prefix + torch.arange(width, device=self.device).expand(b, -1)  # (B, S)
        few = (self.compact_decoder and ids.numel() <= Linear.MAX_ROWS and self.device.type == "cpu"
               and self._plain_layers())
        if few and StaticDecoder.supports(self.lm, n_prefix + width):
            # a query or a few: the compact decoder's blocked matmuls use every core (measured 1.6x at
            # one query); larger batches run as fast through transformers
            dec = StaticDecoder(self.lm, b, n_prefix + width, self._linears())
            dec.fill(prefix_kv, n_prefix)
            dec.mask.copy_(full_mask)
            hidden = dec(ids, position_ids, n_prefix)
        else:
            cache = DynamicCache(ddp_cache_data=[(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in prefix_kv])
            hidden = self.lm.get_decoder()(input_ids=ids, attention_mask=full_mask, position_ids=position_ids,
                                           past_key_values=cache, use_cache=True).last_hidden_state
        return F.normalize(emb_hidden(hidden, ids, self.emb_id).float(), dim=-1)

    def encode_items(self, items, batch_size: int = 64, show_progress: bool = False,
                     truncate: bool = True) -> np.ndarray:
        """Item embeddings (n, dim), float32, L2-normalised; items never reason. `items`: titles,
        or mappings / `lrem.data.Item`s whose fields the item template names; one item (a
        string) gives one vector (dim,). `truncate`: see `fit`."""
        if isinstance(items, str):
            return self.encode_items([items], batch_size, show_progress, truncate)[0]
        return self._embed_texts(self.item_texts(list(items), truncate), batch_size, "items", show_progress)

    def encode_document(self, items, **kwargs) -> np.ndarray:
        """`encode_items` under sentence-transformers' name."""
        return self.encode_items(items, **kwargs)

    def encode_query(self, texts, mode: str = "reason", **kwargs) -> np.ndarray:
        """Embeddings only, as sentence-transformers' `encode_query`: (dim,) for a string, (n, dim)
        for a list. `encode_queries` also gives the CoTs."""
        return self.encode_queries(texts, mode=mode, **kwargs).embeddings

    similarity = staticmethod(similarity)

    def encode_queries(
        self,
        texts: list[str] | str,
        mode: str = "reason",
        cots: list[str] | str | None = None,
        batch_size: int = 32,
        show_progress: bool = False,
        fast: bool = True,
        truncate: bool = True,
    ) -> QueryEncoding:
        """Query embeddings after reasoning (`reason`), after none (`direct`), or after `cots`.

        Given `cots` (teacher CoTs, ablations), `mode` is ignored. In `reason` mode the
        embedding equals the one `encode_queries(texts, cots=result.cots)` gives; `fast`
        (default) embeds each query from the KV cache its reasoning left (`_reason`).
        One query as a string gives embeddings (dim,) and its CoT as a string. `truncate`:
        queries over `max_query_tokens` are cut and counted (True) or an error (False).
        """
        check_batch_size(batch_size)
        if isinstance(texts, str):
            one = self.encode_queries([texts], mode, None if cots is None else [cots], batch_size, show_progress,
                                      fast, truncate)
            return QueryEncoding(one.embeddings[0], one.cots[0])
        texts = self.fit(list(texts), "query", truncate)
        if cots is not None:
            if len(cots) != len(texts):
                raise ValueError(f"{len(cots)} cots for {len(texts)} queries")
            cots = [c.strip() for c in cots]
        elif mode == "reason" and fast and self._vllm() is None:
            return self._reason(texts, batch_size, show_progress)
        elif mode == "reason":
            cots = self.generate_cots(texts, batch_size=batch_size, show_progress=show_progress, fast=fast)
        elif mode == "direct":
            cots = [""] * len(texts)
        else:
            raise ValueError(f"mode={mode!r}; expected one of {QUERY_MODES} (or pass cots=)")
        emb = self._embed_texts(self.query_texts(texts, cots), batch_size, "queries", show_progress)
        return QueryEncoding(emb, cots)

    # ---- reasoning ----------------------------------------------------------------------
    @torch.inference_mode()
    def generate_cots(
        self,
        texts: list[str],
        batch_size: int = 32,
        show_progress: bool = False,
        max_new_tokens: int | None = None,
        fast: bool = True,
    ) -> list[str]:
        """Greedy CoTs of at most `cot_max_tokens` tokens, batched.

        Generation stops at `</think>`, `<emb>` or end-of-turn; whatever the model emits, the
        caller closes the CoT with `</think><emb>` itself. `fast` (default) decodes with the
        cached prompt prefix and a preallocated KV cache (`_greedy`; vLLM instead when it is
        installed and the model is on CUDA); `fast=False` is plain `lm.generate` on left-padded
        prompts. Both give the same CoTs (up to float rounding on near-ties).
        """
        max_new = max_new_tokens or self.config.cot_max_tokens
        stop = self.stop_ids
        prompts_ = self.query_prompts(texts)
        engine = self._vllm() if fast else None
        if engine is not None:
            return [self.decode_cot(ids) for ids in self._greedy_vllm(engine, prompts_, max_new, stop)]
        cots: list[str] = []
        for s in tqdm(range(0, len(texts), batch_size), desc="reasoning", disable=not show_progress, unit="batch"):
            if fast:
                seqs = self.tokenizer(prompts_[s : s + batch_size], add_special_tokens=False)["input_ids"]
                gen = self._greedy(seqs, max_new, stop)
            else:
                batch = self.tokenize(prompts_[s : s + batch_size])
                gen = self.lm.generate(
                    **batch,
                    max_new_tokens=max_new,
                    do_sample=False,
                    eos_token_id=stop,
                    pad_token_id=self.tokenizer.pad_token_id,
                )[:, batch["input_ids"].shape[1] :].tolist()  # (B, <= max_new)
            cots.extend(self.decode_cot(row) for row in gen)
        return cots

    @torch.inference_mode()
    def sample_cots(self, texts: list[str], num_samples: int = 8, temperature: float = 1.0, top_p: float = 1.0,
                    max_new_tokens: int | None = None, generator: torch.Generator | None = None,
                    batch_size: int = 64) -> list[list[int]]:
        """`num_samples` sampled continuations of each query prompt (RL rollouts), as token ids.

        Returns len(texts) * num_samples rows (query i's samples at rows i*num_samples ...), each
        `max_new_tokens` ids long (default `cot_max_tokens`): the sampled tokens up to and
        including the first stop id (`stop_ids`), then pad. Same cached-prefix decoding as the
        greedy fast path, with top-p sampling at `temperature` in place of argmax.
        """
        max_new = max_new_tokens or self.config.cot_max_tokens
        seqs = self.tokenizer(self.query_prompts(texts), add_special_tokens=False)["input_ids"]
        rows = [s for s in seqs for _ in range(num_samples)]

        def pick(logits: torch.Tensor) -> torch.Tensor:
            return sample_top_p(logits, temperature, top_p, generator)

        return [row for s in range(0, len(rows), batch_size)
                for row in self._greedy(rows[s : s + batch_size], max_new, self.stop_ids, pick=pick)]

    @torch.inference_mode()
    def _reason(self, texts: list[str], batch_size: int, show_progress: bool) -> QueryEncoding:
        """`reason` mode per batch: greedy CoTs, then each query's embedding from the same cache."""
        stop = self.stop_ids
        prompts_ = self.query_prompts(texts)
        cots, embs = [], []
        for s in tqdm(range(0, len(texts), batch_size), desc="reasoning", disable=not show_progress, unit="batch"):
            seqs = self.tokenizer(prompts_[s : s + batch_size], add_special_tokens=False)["input_ids"]
            batch = texts[s : s + batch_size]
            batch_cots, emb = self._greedy(seqs, self.config.cot_max_tokens, stop, texts=batch)
            if emb is None:
                embs.append(self._embed_texts(self.query_texts(batch, batch_cots), batch_size, "q", False))
            else:
                embs.append(emb.cpu().numpy())
            cots += batch_cots
        return QueryEncoding(np.concatenate(embs) if embs else np.zeros((0, self.dim), np.float32), cots)

    def _greedy(self, seqs: list[list[int]], max_new: int, stop: list[int], texts: list[str] | None = None,
                pick=None):
        """Greedy continuations (B rows of max_new ids; pad after a stop id), as `lm.generate` gives.
        Given `texts` (the queries of `seqs`), returns (CoTs, embeddings (B, D) or None) instead:
        each query embedded after its CoT from the cache the decoding left (`_embed_after`).
        `pick` (logits -> ids) replaces argmax, e.g. sampling (`sample_cots`; decoded eagerly).

        The prefix shared with the prompt template (~70 of ~85 query tokens) comes from the
        cached KV (`_shared_prefix`), expanded to the batch; each prompt's suffix follows it,
        left-padded in the middle (mask 0, positions counted from the mask, so every token
        sits where it would in the plain path). Then one token per step over a preallocated
        cache, the LM head on the last position only; finished rows keep feeding pad.
        """
        n, kv = self._shared_prefix(seqs)
        sufs = [x[n:] for x in seqs]
        length = n + max(len(x) for x in sufs) + max_new + 8  # + room for `_embed_after`'s `</think><emb>`
        if self.device.type == "cuda":
            length = -(-length // 64) * 64  # a few sizes only, so CUDA graphs are reused across calls
        step = self._step(len(seqs), length)
        with step.lock:  # a CUDA step (graph and cache) is shared by every call of its size
            gen, used = self._greedy_run(step, n, kv, seqs, max_new, stop, pick)
            if texts is None:
                return gen
            cots = [self.decode_cot(g) for g in gen]
            full = self.tokenizer(self.query_texts(texts, cots), add_special_tokens=False)["input_ids"]
            if any(f[: len(x)] != x for f, x in zip(full, seqs)):  # the prompt tokenizes differently in context
                return cots, None
            return cots, self._embed_after(step, used, seqs, gen, full)

    def _greedy_run(self, step: "GreedyStep", n: int, kv, seqs: list[list[int]], max_new: int,
                    stop: list[int], pick=None) -> tuple[list[list[int]], int]:
        """Decode `seqs` into `step`'s cache: prefix KV in slots [0, n), the suffixes in [n, n + W),
        then one slot per generated token. Returns the generated ids and the number of cache slots
        filled. `pick` (logits (B, V) -> ids (B,)) replaces argmax, e.g. to sample (`sample_cots`).
        A single greedy query on the compact decoder takes drafts from its own prompt (`_lookup_run`)."""
        pad = self.tokenizer.pad_token_id
        logits, last, w = prefill(step, n, kv, seqs, pad)
        tok = pick(logits) if pick else logits.argmax(-1)  # (B,)
        if len(seqs) == 1 and pick is None and step.compact is not None and self.lookup_tokens > 0:
            gen, used = self._lookup_run(step, seqs[0], int(tok), n + w, int(last[0]) + 1, max_new, stop)
            self._remember(seqs, [gen], stop)
            return [gen + [pad] * (max_new - len(gen))], used
        gen = decode(step, tok, last, n + w, max_new, stop, pad, pick)
        if pick is None:
            self._remember(seqs, gen, stop)
        return [row + [pad] * (max_new - len(row)) for row in gen], n + w + max(len(g) for g in gen) - 1  # slots used

    def _remember(self, seqs: list[list[int]], gen: list[list[int]], stop: list[int]) -> None:
        """Keep greedy CoTs (up to and including their stop token), each after its prompt's last
        tokens, as draft sources for later single queries (`cot_history`)."""
        if self.cot_history.maxlen:
            ends = [next((i + 1 for i, t in enumerate(g) if t in stop), len(g)) for g in gen]
            self.cot_history.extend(x[-self.HISTORY_CONTEXT :] + g[:e] for x, g, e in zip(seqs, gen, ends))

    def _lookup_run(self, step: "GreedyStep", seq: list[int], first: int, slot: int, pos: int, max_new: int,
                    stop: list[int]) -> tuple[list[int], int]:
        """Greedy decoding of one query, several tokens per forward where its prompt or a recent
        CoT predicts them (prompt-lookup speculative decoding; the CoT's phrases often repeat the
        query's or the instruction's words, and other queries' CoTs). Each forward feeds the last
        token plus up to `lookup_tokens` drafted ones (`lookup_draft`) and keeps the drafts up to
        the first the model would not have picked, plus the model's own next token: the same
        tokens as one-at-a-time greedy decoding, while each forward reads the weights once.
        `first` is the first generated token, to be fed at cache slot `slot` and position `pos`.
        Returns (generated ids, cache slots filled)."""
        gen, dev = [first], self.device
        past = [t for h in list(self.cot_history) for t in h]  # oldest first: the query's own tokens win ties
        while gen[-1] not in stop and len(gen) < max_new:
            draft = lookup_draft(past + seq + gen, k=min(self.lookup_tokens, max_new - len(gen) - 1))
            ids = [gen[-1], *draft]
            step.mask[:, slot : slot + len(ids)] = 1
            h = step.run(torch.tensor([ids], device=dev), pos + torch.arange(len(ids), device=dev)[None], slot)
            best = step.logits(h[0]).argmax(-1).tolist()  # the model's pick after each fed token
            a = 0
            while a < len(draft) and draft[a] == best[a] and best[a] not in stop:
                a += 1
            step.mask[:, slot + a + 1 : slot + len(ids)] = 0  # slots of rejected drafts
            gen += [*draft[:a], best[a]]
            slot, pos = slot + a + 1, pos + a + 1
        return gen, slot

    def _embed_after(self, step: "GreedyStep", used: int, seqs: list[list[int]], gen: list[list[int]],
                     full: list[list[int]]) -> torch.Tensor:
        """Embeddings (B, D) of the `full` query sequences (prompt + CoT + `</think><emb>`), run
        over the first `used` cache slots `_greedy_run` filled: the prompt's KV is reused, and so
        is that of the generated tokens each CoT starts with; the rest (at least `<emb>`) is run
        in new slots, so each token keeps the position it has in the plain path."""
        g0, dev, pad = max(len(x) for x in seqs), self.device, self.tokenizer.pad_token_id  # g0: first generated slot
        keep = [common_prefix_len([f[len(x):], g[: used - g0] + [-1]]) for x, g, f in zip(seqs, gen, full)]
        tails = [f[len(x) + j :] for x, f, j in zip(seqs, full, keep)]
        k = max(len(t) for t in tails)
        ids = torch.tensor([t + [pad] * (k - len(t)) for t in tails], device=dev)  # (B, K) right-padded
        new = torch.tensor([[1] * len(t) + [0] * (k - len(t)) for t in tails], device=dev)
        for r, j in enumerate(keep):
            step.mask[r, g0 + j : used] = 0  # generated tokens this row's CoT does not keep
        pos = torch.tensor([[len(x) + j + i for i in range(k)] for x, j in zip(seqs, keep)], device=dev)  # (B, K)
        return F.normalize(emb_hidden(step.extend(ids, pos, new, used), ids, self.emb_id).float(), dim=-1)

    def _step(self, batch: int, length: int) -> "GreedyStep":
        """A decode step over a KV cache of `length` slots; on CUDA a captured graph (unless
        `LREM_CUDA_GRAPHS=0`), kept per size."""
        if self.device.type != "cuda":
            return GreedyStep(self.lm, batch, length, graph=False,
                              linears=self._linears() if self.compact_decoder and self._plain_layers() else None)
        steps = self._fast_state()["steps"]
        if (batch, length) not in steps:
            graph = os.environ.get("LREM_CUDA_GRAPHS", "1") != "0"
            steps[(batch, length)] = GreedyStep(self.lm, batch, length, graph=graph)
        return steps[(batch, length)]

    def _vllm(self):
        """A vLLM engine over the current weights when vLLM is installed and the model is on CUDA
        (`LREM_VLLM=0` turns it off), else None. Built on first use (the weights are saved to a
        temp folder for it to load) and rebuilt when the weights change."""
        if self.device.type != "cuda" or os.environ.get("LREM_VLLM", "1") == "0" or not self._plain_layers():
            return None
        if not importlib.util.find_spec("vllm"):
            return None
        state = self._fast_state()
        if state.get("vllm") is None:
            import tempfile

            from vllm import LLM

            folder = Path(tempfile.mkdtemp(prefix="lrem-vllm-")) / "model"
            self.save_pretrained(folder)
            state["vllm"] = LLM(model=str(folder), dtype=str(self.lm.dtype).removeprefix("torch."),
                                skip_tokenizer_init=True, seed=0,
                                gpu_memory_utilization=float(os.environ.get("LREM_VLLM_MEMORY", "0.3")))
        return state["vllm"]

    def _greedy_vllm(self, engine, prompts_: list[str], max_new: int, stop: list[int]) -> list[list[int]]:
        from vllm import SamplingParams

        seqs = self.tokenizer(prompts_, add_special_tokens=False)["input_ids"]
        params = SamplingParams(temperature=0.0, max_tokens=max_new, stop_token_ids=stop, detokenize=False)
        outs = engine.generate([{"prompt_token_ids": x} for x in seqs], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    @property
    def stop_ids(self) -> list[int]:
        """Token ids that end a CoT: `</think>`, `<emb>`, end of turn."""
        return [self.think_end_id, self.emb_id, self.tokenizer.eos_token_id]

    def decode_cot(self, ids: list[int]) -> str:
        """Generated ids -> CoT text: cut at the first stop token (or its literal text), drop
        special tokens, keep the first line (a CoT is one list of phrases)."""
        stops = {*self.stop_ids, self.tokenizer.pad_token_id}
        cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
        text = self.tokenizer.decode(ids[:cut], skip_special_tokens=True)
        for lit in (self.config.think_end_token, self.config.emb_token, self.config.think_token):
            text = text.split(lit)[0]
        return text.strip().split("\n")[0].strip()
