"""What every teacher of `lrem construct` is (`lrem.teachers`): a request (`Chat`), a reply
(`Answer` and how it finished), the `Teacher` protocol with `generate`, and `TeacherError`."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterator, Protocol

FINISHES = ("stop", "length", "refused", "malformed")
_REFUSAL_RE = re.compile(r"^\s*(i'?m sorry|i am sorry|sorry, |i can(no|')t (help|assist)|i cannot (help|assist|provide)"
                         r"|as an ai\b|i'?m unable to|i am unable to)", re.I)


class TeacherError(RuntimeError):
    """The teacher cannot answer at all (dead endpoint after the retries, 4xx, bad spec)."""


@dataclass(frozen=True)
class Chat:
    """One request: a system message and a user message."""

    system: str
    user: str

    def messages(self) -> list[dict]:
        return [{"role": "system", "content": self.system}, {"role": "user", "content": self.user}]


@dataclass(frozen=True)
class Answer:
    """A teacher's reply. finish: stop (complete), length (hit max_tokens), refused, malformed.
    model: the model the server says answered (an alias like "gpt-4o-mini" names a dated
    snapshot there), kept in the answer cache with the run; None when unknown."""

    text: str
    finish: str = "stop"
    model: str | None = field(default=None, compare=False)


def looks_refused(text: str) -> bool:
    """True for the usual refusal openings ("I'm sorry", "I can't help", "As an AI").

    >>> looks_refused("I'm sorry, I can't help with that."), looks_refused("coffee, espresso")
    (True, False)
    """
    return bool(_REFUSAL_RE.match(text))


class Teacher(Protocol):
    name: str  # identifies the model in the cache key

    def stream(self, chats: list[Chat], max_tokens: int) -> Iterator[tuple[int, Answer]]:
        """Yield (index into chats, answer) as answers arrive, in any order; raise TeacherError
        when the teacher cannot answer at all."""
        ...


def generate(teacher: Teacher, chats: list[Chat], max_tokens: int) -> list[Answer]:
    """All answers of `teacher.stream`, in the order of `chats`."""
    out: list[Answer | None] = [None] * len(chats)
    for i, answer in teacher.stream(chats, max_tokens):
        out[i] = answer
    return out  # type: ignore[return-value]

