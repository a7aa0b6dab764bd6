"""The prompts of LREM (LREM_SPEC, "Model"): special tokens and the query and item templates.

A query is rendered with the backbone's chat template and the assistant turn is opened with
`<think>`; the reasoning (CoT) follows and the code closes it with `</think><emb>`. Items get no
reasoning: their assistant turn is just `<emb>`. The embedding is the hidden state at `<emb>`.
"""
from __future__ import annotations

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


@dataclass
class PromptConfig:
    """Everything that decides the token sequences; saved in `lrem_config.json` with the model."""

    query_system: str = QUERY_SYSTEM
    query_instruction: str = QUERY_INSTRUCTION
    item_system: str = ITEM_SYSTEM
    item_template: str = ITEM_TEMPLATE
    think_token: str = THINK_TOKEN
    think_end_token: str = THINK_END_TOKEN
    emb_token: str = EMB_TOKEN
    cot_max_tokens: int = 16  # l in the paper: the CoT budget (tokens generated at most)
    max_query_tokens: int = 64  # longer queries are truncated before templating
    max_item_tokens: int = 64  # longer item titles are truncated before templating

    @classmethod
    def from_dict(cls, d: dict) -> "PromptConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown prompt config keys {unknown}; known: {sorted(known)}")
        return cls(**d)

    to_dict = asdict


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


def item_prompt(tokenizer, title: str, cfg: PromptConfig) -> str:
    """The full item-side text, ending with `<emb>`."""
    return chat(tokenizer, cfg.item_system, cfg.item_template.format(title=title)) + cfg.emb_token
