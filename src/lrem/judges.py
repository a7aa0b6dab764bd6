"""Judges for `lrem construct` (`lrem.teachers.parse_judge` picks one): whether an item is
relevant to a query, from the dataset's labels (`QrelsJudge`), a yes/no question to a chat
teacher (`LLMJudge`) or a cross-encoder (`CrossEncoderJudge`)."""
from __future__ import annotations

import re

from .data import Pair
from .teacher_types import Chat, Teacher, generate

JUDGE_SYSTEM = "You are a relevance judge for an e-commerce search platform."
JUDGE_USER = ('Search query: "{query}"\nProduct: "{title}"\n'
              "Would a shopper who typed this query be satisfied to find this product? Answer yes or no.")


class QrelsJudge:
    """Relevant = the dataset labels it relevant (relevance > 0)."""

    name = "qrels"

    def __init__(self, qrels: dict[str, dict[str, int]]):
        self.qrels = qrels

    def __call__(self, pairs: list[Pair]) -> list[bool | None]:
        return [self.qrels.get(p.query_id, {}).get(p.item_id, 0) > 0 for p in pairs]


class LLMJudge:
    """Asks a chat teacher a yes/no relevance question per pair; an answer that is neither
    yes nor no gives None (counted, treated as not relevant)."""

    def __init__(self, teacher: Teacher, max_tokens: int = 4):
        self.teacher, self.max_tokens, self.name = teacher, max_tokens, f"llm({teacher.name})"

    def __call__(self, pairs: list[Pair]) -> list[bool | None]:
        chats = [Chat(JUDGE_SYSTEM, JUDGE_USER.format(query=p.query, title=p.item_title)) for p in pairs]
        return [parse_yes_no(a.text) for a in generate(self.teacher, chats, self.max_tokens)]


def parse_yes_no(text: str) -> bool | None:
    """The first word of a judge's answer: yes -> True, no -> False, anything else -> None. A
    leading "Answer:" and a thinking model's closed `<think>...</think>` block are passed over.

    >>> parse_yes_no(" Yes."), parse_yes_no("no"), parse_yes_no("maybe")
    (True, False, None)
    >>> parse_yes_no("Answer: No"), parse_yes_no("<think>short</think> yes"), parse_yes_no("<think>The")
    (False, True, None)
    """
    text = re.sub(r"(?s)<think>.*?</think>", " ", text.lower())
    word = re.sub(r"[^a-z]", " ", text).split()
    if word[:1] == ["answer"]:
        word = word[1:]
    return {"yes": True, "no": False}.get(word[0]) if word else None


class CrossEncoderJudge:
    """A sentence-transformers CrossEncoder folder; relevant when its score >= threshold
    (scores are sigmoid probabilities for one-label models)."""

    def __init__(self, path: str, threshold: float = 0.5, batch_size: int = 32):
        try:
            from sentence_transformers import CrossEncoder

            self.model = CrossEncoder(path, device="cpu")
        except (OSError, ValueError) as e:
            raise ValueError(f"judge cross-encoder:{path}: cannot load a cross-encoder there ({e})") from e
        self.threshold, self.batch_size, self.name = threshold, batch_size, f"cross-encoder:{path}"

    def __call__(self, pairs: list[Pair]) -> list[bool | None]:
        if not pairs:
            return []
        scores = self.model.predict([(p.query, p.item_title) for p in pairs], batch_size=self.batch_size,
                                    show_progress_bar=False)
        return [bool(s >= self.threshold) for s in scores]

