"""The prompts of LREM (LREM_SPEC, "Model"): special tokens and the query and item templates.

A query is rendered with the backbone's chat template and the assistant turn is opened with
`<think>`; the reasoning (CoT) follows and the code closes it with `</think><emb>`. Items get no
reasoning: their assistant turn is just `<emb>`. The embedding is the hidden state at `<emb>`.
"""
from __future__ import annotations

import string
from dataclasses import asdict, dataclass, fields

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
    cot_max_tokens: int = 16  # l in the paper: the CoT budget (tokens generated at most)
    max_query_tokens: int = 64  # longer queries: an error, or cut (and counted) with truncate=True
    max_item_tokens: int = 64  # the same for an item's text as the item template fills it in

    def __post_init__(self):
        for name, text, allowed in (("query_instruction", self.query_instruction, ("query",)),
                                    ("item_template", self.item_template, ITEM_FIELDS)):
            names = template_fields(text)
            bad = sorted(names - set(allowed))
            if bad or allowed[0] not in names:
                raise ValueError(f"prompt config {name}={text!r} must name {{{allowed[0]}}} and only fields of "
                                 f"{', '.join(allowed)}" + (f"; unknown: {', '.join(bad)}" if bad else ""))
        for name in ("cot_max_tokens", "max_query_tokens", "max_item_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"prompt config {name}={getattr(self, name)!r}; expected an integer >= 1")

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


def query_prompt(tokenizer, query: str, cfg: PromptConfig) -> str:
    """The query-side text up to and including `<think>`: what generation continues from."""
    return chat(tokenizer, cfg.query_system, cfg.query_instruction.format(query=query)) + cfg.think_token


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
