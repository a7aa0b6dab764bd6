"""The steps of `lrem construct` that need no model (`lrem.construct` runs them): what the
teacher is asked (steps 2-3: `reason_chat`, `extract_chat`, `list_chat`, `pick_hint`), how its
phrase list becomes the CoT (step 4: `postprocess` and its rules) and the gain set (step 5:
`cot_query`, `gain_set`)."""
from __future__ import annotations

import hashlib
import re

from lrem.construct_config import ConstructConfig
from lrem.teachers import Chat

REASON_SYSTEM = "You are a shopping expert for an e-commerce search platform."
REASON_USER = ('A shopper searched for: "{query}"\n{hint}Think about what the shopper needs. Which products, '
               "product types, brands and attributes would satisfy this search? Answer in a few sentences.")
HINT_LINE = 'One product that satisfies this search is: "{title}". Explain how the search leads to products like it.\n'
EXTRACT_USER = ('A shopper searched for: "{query}"\n{hint}Analysis:\n{reasoning}\n\nFrom the analysis, list the '
                "products, brands and attributes a search engine should look for, as one comma-separated line. "
                "Rules: no duplicates; if the search names a brand, no other brands; nothing unrelated to the "
                "search; do not repeat the search itself. Answer with the list only.")
# `teacher_mode: list` (one call): the teacher lists phrases at once, without the free reasoning
# first. ~4x cheaper for a local teacher (the extraction prompt re-reads the whole reasoning).
LIST_USER = ('A shopper searched for: "{query}"\n{hint}List up to 5 products, product types, brands or attributes '
             "that would satisfy this search, as one comma-separated line. Rules: no duplicates; if the search names "
             "a brand, no other brands; do not repeat the search itself. Answer with the list only.")


# ---------------------------------------------------------------- prompts

CANDIDATES_BLOCK = "A first search found these products (some may not fit):\n{lines}\n"


def context_lines(hint: str | None = None, candidates: list[str] | None = None) -> str:
    """What the teacher sees besides the query: the retriever's top titles (`candidates`, beyond
    the paper: grounded reasoning) and one relevant item (`hint`), each block ending in a newline."""
    block = CANDIDATES_BLOCK.format(lines="\n".join(f"- {t}" for t in candidates)) if candidates else ""
    return block + (f'One product that satisfies this search is: "{hint}".\n' if hint else "")


def reason_chat(query: str, hint: str | None = None, candidates: list[str] | None = None) -> Chat:
    ctx = context_lines(None, candidates) + (HINT_LINE.format(title=hint) if hint else "")
    return Chat(REASON_SYSTEM, REASON_USER.format(query=query, hint=ctx))


def extract_chat(query: str, reasoning: str, hint: str | None = None, candidates: list[str] | None = None) -> Chat:
    return Chat(REASON_SYSTEM, EXTRACT_USER.format(query=query, reasoning=reasoning.strip(),
                                                   hint=context_lines(hint, candidates)))


def list_chat(query: str, hint: str | None = None, candidates: list[str] | None = None) -> Chat:
    return Chat(REASON_SYSTEM, LIST_USER.format(query=query, hint=context_lines(hint, candidates)))


def pick_hint(relevant: dict[str, int], query_id: str, seed: int = 0) -> str | None:
    """One relevant item id: the highest relevance, ties broken by a seeded hash (stable)."""
    rel = [(-r, hashlib.sha1(f"{seed}:{query_id}:{i}".encode()).hexdigest(), i) for i, r in relevant.items() if r > 0]
    return min(rel)[2] if rel else None


# ---------------------------------------------------------------- 4. post-processing (rules, no LLM)


def norm(phrase: str) -> str:
    """Lowercase words, punctuation dropped: how phrases are compared.

    >>> norm("  Wine-Glass, RED ")
    'wine glass red'
    """
    return " ".join(re.sub(r"[^\w]+", " ", phrase.lower()).split())


_FILLER_RE = re.compile(r"^(?:(?:and|or|including|with|specifically|e\.g\.|i\.e\.)\s+)?"
                        r"(?:(?:a|an|the)\s+)?(?:(?:products?|items?|something)\s+)?"
                        r"(?:(?:which|that)\s+(?:is|are)\s+|like\s+|such as\s+|called\s+|named\s+)?"
                        r"(?:(?:a|an|the)\s+)?", re.I)


def split_phrases(text: str) -> list[str]:
    """A teacher's list -> phrases: drops <think> blocks, lead-ins ("Here is the list:"),
    bullets, numbering, quotes and leading filler ("a product that is a"); splits on commas,
    semicolons, newlines and '"x" and "y"'.

    >>> split_phrases('Here are the phrases: "coffee", an espresso;\\n- energy drink.')
    ['coffee', 'espresso', 'energy drink']
    """
    text = re.sub(r"<think>.*?(</think>|$)", " ", text, flags=re.S)
    text = re.sub(r'"\s*(?:and|or)\s*"', ", ", text)  # '"blacktop" and "asphalt"' is a list too
    out = []
    for line in text.splitlines():
        line = re.sub(r"^[^,:;]{0,60}:(\s|$)", "", line.strip())  # a lead-in ending in ":"
        for part in re.split(r"[,;]", line):
            part = re.sub(r"^\s*(?:[-*\u2022]+|\d+[.)])\s*", "", part)  # bullet or "1." numbering
            part = " ".join(part.strip().strip("\"'`*.:!?()[]{}").split())
            part = _FILLER_RE.sub("", part)  # "a product that is a shoehorn" -> "shoehorn"
            if part:
                out.append(part)
    return out


def drop_duplicates(phrases: list[str]) -> list[str]:
    """Keep the first of phrases equal after `norm`.

    >>> drop_duplicates(["Coffee", "espresso", "coffee."])
    ['Coffee', 'espresso']
    """
    seen, out = set(), []
    for p in phrases:
        if norm(p) not in seen:
            seen.add(norm(p))
            out.append(p)
    return out


def drop_in_query(phrases: list[str], query: str) -> list[str]:
    """Drop phrases whose words already appear, in order, in the query (whole words).

    >>> drop_in_query(["tea", "green tea", "coffee", "stronger"], "a drink stronger than tea")
    ['green tea', 'coffee']
    """
    q = f" {norm(query)} "
    return [p for p in phrases if norm(p) and f" {norm(p)} " not in q]


def drop_banned(phrases: list[str], ban) -> list[str]:
    """Drop phrases on the ban list (compared after `norm`).

    >>> drop_banned(["Products", "coffee", "etc."], ["products", "etc"])
    ['coffee']
    """
    banned = {norm(b) for b in ban}
    return [p for p in phrases if norm(p) not in banned and norm(p)]


def drop_long(phrases: list[str], max_words: int) -> list[str]:
    """Drop phrases of more than `max_words` words (sentences, not phrases).

    >>> drop_long(["coffee", "the shopper wants something with more caffeine"], 6)
    ['coffee']
    """
    return [p for p in phrases if len(norm(p).split()) <= max_words]


def truncate_tokens(phrases: list[str], tokenizer, max_tokens: int) -> str:
    """Join phrases with ", " while the text fits in `max_tokens` tokens (whole phrases; a first
    phrase longer than the budget is cut at a token boundary)."""
    def n_tokens(s: str) -> int:
        return len(tokenizer(s, add_special_tokens=False)["input_ids"])

    cot = ""
    for p in phrases:
        candidate = f"{cot}, {p}" if cot else p
        if n_tokens(candidate) > max_tokens:
            if not cot:
                cot = tokenizer.decode(tokenizer(p, add_special_tokens=False)["input_ids"][:max_tokens]).strip()
            break
        cot = candidate
    return cot


def postprocess(text: str, query: str, tokenizer, cfg: ConstructConfig, ban=None,
                cut_off: bool = False) -> tuple[str, dict[str, int]]:
    """Step 4: the teacher's list -> the CoT, and how many phrases each rule dropped.

    `cut_off`: the answer hit its token limit, so its last phrase is incomplete and is dropped.
    """
    steps = [("cut_off", lambda ps: ps[:-1] if cut_off else ps), ("duplicate", drop_duplicates), ("in_query", lambda ps: drop_in_query(ps, query)),
             ("banned", lambda ps: drop_banned(ps, cfg.ban if ban is None else ban)),
             ("too_many_words", lambda ps: drop_long(ps, cfg.max_phrase_words))]
    phrases, dropped = split_phrases(text), {}
    for name, rule in steps:
        kept = rule(phrases)
        dropped[name] = len(phrases) - len(kept)
        phrases = kept
    cot = truncate_tokens(phrases, tokenizer, cfg.cot_max_tokens)
    dropped["truncated"] = len(phrases) - len(split_phrases(cot)) if cot else len(phrases)
    return cot, dropped


# ---------------------------------------------------------------- 5. gain set


def cot_query(query: str, cot: str) -> str:
    """The text retrieved for set 2.

    >>> cot_query("mug", "cup, tea cup")
    'mug (cup, tea cup)'
    """
    return f"{query} ({cot})"


def gain_set(set1: list[str], set2: list[str]) -> list[str]:
    """Set 2 minus set 1, in set 2's rank order.

    >>> gain_set(["a", "b", "c"], ["c", "d", "a", "e"])
    ['d', 'e']
    """
    first = set(set1)
    return [i for i in set2 if i not in first]

