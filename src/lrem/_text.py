"""Text rules shared by data files, `lrem search` and the server, so they accept the same inputs."""
from __future__ import annotations

import re
import unicodedata

# C0 and C1 control characters except tab, line feed and carriage return (which are whitespace):
# a NUL or an escape code in a title or query is almost always corruption, and it reaches the
# tokenizer, the index's items.jsonl and terminals unseen.
CONTROL_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def control_char(text: str) -> str | None:
    """A description of the first control character in `text` ("U+0000 at character 4"), or None."""
    m = CONTROL_RE.search(text)
    return None if m is None else f"U+{ord(m.group()):04X} at character {m.start() + 1}"


def strip_controls(text: str) -> str:
    """`text` with each control character replaced by a space (converters clean raw sources so)."""
    return CONTROL_RE.sub(" ", text)


def check_query(text, what: str = "query", max_chars: int | None = None, limit: str = "max_query_chars") -> str:
    """`text` if it is a usable query, else a ValueError naming `what` and the problem.

    Refused: a non-string, an empty or whitespace-only text, a lone surrogate (not Unicode), a
    control character, and (with `max_chars`) a longer text: the message names the setting
    `limit` that sets it.
    """
    if not isinstance(text, str):
        raise ValueError(f"{what} is not a string ({type(text).__name__})")
    if max_chars is not None and len(text) > max_chars:
        raise ValueError(f"{what} has {len(text)} characters; the limit is {max_chars} ({limit})")
    if not text.strip():
        raise ValueError(f"{what} is empty (or only whitespace)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid Unicode (it holds a lone surrogate)") from None
    bad = control_char(text)
    if bad:
        raise ValueError(f"{what} holds a control character ({bad})")
    return text


def normalize_query(text: str) -> str:
    """The server's cache key and the text the model sees: NFKC, lower case, runs of whitespace
    -> one space.

    >>> normalize_query("  Ｗine   Opener\\n")
    'wine opener'
    """
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())
