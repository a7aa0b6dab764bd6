"""The prompts of LREM (LREM_SPEC, "Model"): special tokens and the query and item templates.

A query is rendered with the backbone's chat template and the assistant turn is opened with
`<think>`; the reasoning (CoT) follows and the code closes it with `</think><emb>`. Items get no
reasoning: their assistant turn is just `<emb>`. The embedding is the hidden state at `<emb>`.
`TemplateMixin` gives a model (`lrem.model.LREM`) these templates over its tokenizer.
"""
from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

from .decoding import common_prefix_len

if TYPE_CHECKING:
    import torch

THINK_TOKEN = "<think>"
THINK_END_TOKEN = "</think>"
EMB_TOKEN = "<emb>"
SPECIAL_TOKENS = (THINK_TOKEN, THINK_END_TOKEN, EMB_TOKEN)

QUERY_SYSTEM = (
    "You are a query assistant for an e-commerce search platform. You help retrieve the products "
    "a shopper is looking for."
)
QUERY_INSTRUCTION = (
    "Think about the query to understand the product search intent; list related phrases "
    "(product types, brands, attributes), not the query itself; answer as "
    "<think> phrases </think><emb>. Query: {query}"
)
# The spec gives the item side no system prompt; an explicit one keeps backbones from adding
# their own default (SmolLM2 would insert "You are a helpful AI assistant named SmolLM...").
ITEM_SYSTEM = "You are an item assistant for an e-commerce search platform."
ITEM_TEMPLATE = "Item: {title}"
# Catalog fields an item template may name (`lrem.data.Item`); a field an item lacks renders as "".
ITEM_FIELDS = ("title", "category", "text", "brand", "color", "bullets", "description")
# Grounded queries (issue 22, beyond the paper): the first-stage top-K titles follow the query in
# the user turn, so the reasoning and the `<emb>` state see what a direct search already found.
CANDIDATES_TEMPLATE = "\nCandidates: {candidates}"
# How the model embeds a query (`LREM.encode_queries`' modes, the model card's `query_modes`): after
# the CoT it generates (`reason`) or after an empty one, `<think></think><emb>` (`direct`)
QUERY_MODES = ("reason", "direct")


COT_MAX_TOKENS = 16  # l in the paper: the CoT budget (tokens generated at most); construct and training default to it


@dataclass
class PromptConfig:
    """Everything that decides the token sequences; saved in `lrem_config.json` with the model."""

    query_system: str = QUERY_SYSTEM
    query_instruction: str = QUERY_INSTRUCTION
    item_system: str = ITEM_SYSTEM
    item_template: str = ITEM_TEMPLATE  # may name any of ITEM_FIELDS, e.g. "Item: {title} | brand: {brand}"
    think_token: str = THINK_TOKEN
    think_end_token: str = THINK_END_TOKEN
    emb_token: str = EMB_TOKEN
    cot_max_tokens: int = COT_MAX_TOKENS
    max_query_tokens: int = 64  # longer queries: an error, or cut (and counted) with truncate=True
    max_item_tokens: int = 64  # the same for an item's text as the item template fills it in
    candidates_k: int = 0  # K: first-stage titles a grounded query is shown; 0: the model is not grounded
    candidates_template: str = CANDIDATES_TEMPLATE  # after the query instruction; names {candidates}
    candidates_sep: str = "; "  # between titles (WordNet titles hold commas)
    max_candidate_tokens: int = 96  # the rendered list's budget: later titles dropped, the last one cut

    def __post_init__(self):
        for name, text, allowed in (("query_instruction", self.query_instruction, ("query",)),
                                    ("item_template", self.item_template, ITEM_FIELDS),
                                    ("candidates_template", self.candidates_template, ("candidates",))):
            names = template_fields(text)
            bad = sorted(names - set(allowed))
            if bad or allowed[0] not in names:
                raise ValueError(f"prompt config {name}={text!r} must name {{{allowed[0]}}} and only fields of "
                                 f"{', '.join(allowed)}" + (f"; unknown: {', '.join(bad)}" if bad else ""))
        for name in ("cot_max_tokens", "max_query_tokens", "max_item_tokens", "max_candidate_tokens", "candidates_k"):
            low = 0 if name == "candidates_k" else 1
            if not isinstance(getattr(self, name), int) or getattr(self, name) < low:
                raise ValueError(f"prompt config {name}={getattr(self, name)!r}; expected an integer >= {low}")

    @classmethod
    def from_dict(cls, d: dict) -> "PromptConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown prompt config keys {unknown}; known: {sorted(known)}")
        return cls(**d)

    to_dict = asdict


def template_fields(template: str) -> set[str]:
    """The {field} names of a format string.

    >>> sorted(template_fields("Item: {title} | brand: {brand}"))
    ['brand', 'title']
    """
    try:
        return {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ValueError(f"bad template {template!r}: {e}") from None


def item_text(fields_: dict, cfg: PromptConfig) -> str:
    """The item template filled in: the catalog text an item's embedding is taken after.

    >>> item_text({"title": "mug", "brand": "Acme"}, PromptConfig(item_template="{title} | brand: {brand}"))
    'mug | brand: Acme'
    """
    return cfg.item_template.format(**{f: fields_.get(f) or "" for f in ITEM_FIELDS})


def chat(tokenizer, system: str, user: str) -> str:
    """Render one system+user exchange with the backbone's chat template, assistant turn open.

    Backbones without a chat template (base models) get a plain fallback layout.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{system}\n\nUser: {user}\nAssistant: "


def query_prompt(tokenizer, query: str, cfg: PromptConfig, candidates: str | None = None) -> str:
    """The query-side text up to and including `<think>`: what generation continues from.
    `candidates`: a grounded query's rendered candidate list (`TemplateMixin.candidate_lists`)."""
    user = cfg.query_instruction.format(query=query)
    if candidates is not None:
        user += cfg.candidates_template.format(candidates=candidates)
    return chat(tokenizer, cfg.query_system, user) + cfg.think_token


def close_cot(cot: str, cfg: PromptConfig) -> str:
    """What follows `<think>`: the CoT and the closing `</think><emb>` the code always adds.

    >>> close_cot("corkscrew, wine opener", PromptConfig())
    ' corkscrew, wine opener </think><emb>'
    >>> close_cot("", PromptConfig())
    '</think><emb>'
    """
    cot = cot.strip()
    return (f" {cot} " if cot else "") + cfg.think_end_token + cfg.emb_token


def item_prompt(tokenizer, text: str, cfg: PromptConfig) -> str:
    """The full item-side text, ending with `<emb>`; `text` is the filled item template (`item_text`)."""
    return chat(tokenizer, cfg.item_system, text) + cfg.emb_token


class InputTooLong(ValueError):
    """An input over the model's token limit, with truncate=False."""


SIDES = {"query": "max_query_tokens", "item": "max_item_tokens"}  # side -> the PromptConfig limit


def item_fields(item) -> dict:
    """A catalog item as template fields: a string is its title; a mapping or an object with
    attributes (`lrem.data.Item`) gives any of `ITEM_FIELDS` it has."""
    if isinstance(item, str):
        return {"title": item}
    get = item.get if isinstance(item, Mapping) else lambda f: getattr(item, f, None)
    return {f: get(f) for f in ITEM_FIELDS}


class TemplateMixin:
    """The text side of `lrem.model.LREM`: inputs fitted to the token limits, the templates filled
    in and tokenized, generated ids read back as a CoT. Uses the model's `tokenizer`, `config`
    (a `PromptConfig`), `truncated` (a Counter), `think_end_id`, `emb_id` and `device`."""

    def token_counts(self, texts: list[str]) -> list[int]:
        """Tokens of each text on its own (what the limits count)."""
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def overlong(self, texts, side: str) -> list[tuple[int, int]]:
        """(position, tokens) of each input over the side's limit (`SIDES`); for items, the
        filled item template counts (an input may be a title or an item's fields)."""
        if side == "item":
            texts = [item_text(item_fields(x), self.config) for x in texts]
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

    def candidate_lists(self, candidates: list) -> list[str | None]:
        """Each grounded query's candidate titles (best first) as the text its prompt shows: the
        first `candidates_k` (all, for a model with 0), joined by `candidates_sep`, within
        `max_candidate_tokens` (titles that do not fit dropped, the first one that does not cut).
        None stays None: that query is not grounded."""
        cfg, out = self.config, []
        for titles in candidates:
            if titles is None:
                out.append(None)
                continue
            titles = [" ".join(str(t).split()) for t in titles][: cfg.candidates_k or None]
            kept: list[str] = []
            for t in titles:
                room = cfg.max_candidate_tokens - (self.token_counts([cfg.candidates_sep.join(kept + [""])])[0]
                                                   if kept else 0)
                if self.token_counts([t])[0] <= room:
                    kept.append(t)
                    continue
                ids = self.tokenizer(t, add_special_tokens=False)["input_ids"]
                if room >= 2:  # a stub of one token says little; a longer cut keeps the title's head
                    kept.append(self.tokenizer.decode(ids[:room]).strip())
                break
            while kept and self.token_counts([cfg.candidates_sep.join(kept)])[0] > cfg.max_candidate_tokens:
                kept.pop()  # joined pieces can tokenize longer than their parts
            out.append(cfg.candidates_sep.join(kept))
        return out

    def query_prompts(self, texts: list[str], truncate: bool = True, candidates: list | None = None) -> list[str]:
        """Query-side texts up to `<think>` (queries fitted to `max_query_tokens`, see `fit`).
        `candidates`: per query, the first-stage titles a grounded query is shown, or None."""
        texts = self.fit(texts, "query", truncate)
        if candidates is None:
            return [query_prompt(self.tokenizer, t, self.config) for t in texts]
        if len(candidates) != len(texts):
            raise ValueError(f"{len(candidates)} candidate lists for {len(texts)} queries")
        return [query_prompt(self.tokenizer, t, self.config, c)
                for t, c in zip(texts, self.candidate_lists(candidates))]

    def query_texts(self, texts: list[str], cots: list[str], truncate: bool = True,
                    candidates: list | None = None) -> list[str]:
        """Full query-side texts: prompt + `<think>` + CoT + `</think><emb>`."""
        return [p + close_cot(c, self.config) for p, c in zip(self.query_prompts(texts, truncate, candidates), cots)]

    def item_texts(self, items, truncate: bool = True) -> list[str]:
        """Full item-side texts: the item template filled from each item's fields (`item_fields`;
        a string is a title), fitted to `max_item_tokens`, in the item chat prompt ending `<emb>`."""
        filled = [item_text(item_fields(x), self.config) for x in items]
        return [item_prompt(self.tokenizer, t, self.config) for t in self.fit(filled, "item", truncate)]

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Left-padded batch; the templates already hold every special token."""
        batch = self.tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
        return {k: v.to(self.device) for k, v in batch.items()}

    def template_prefixes(self) -> list[list[int]]:
        """Token ids every query prompt, and every item text, starts with: the chat template,
        system prompt and instruction up to where the query or title goes (kept per prompt config)."""
        key, cache = repr(self.config), vars(self).setdefault("_template_ids", {})  # not weights-dependent
        if key not in cache:
            cache[key] = []
            for render in (self.query_prompts, self.item_texts):
                a, b = self.tokenizer(render(["a", "b"]), add_special_tokens=False)["input_ids"]
                cache[key].append(a[: common_prefix_len([a, b])])
        return cache[key]

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
