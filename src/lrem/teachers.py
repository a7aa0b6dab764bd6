"""Teachers and judges for `lrem construct`: the LLMs that write CoTs and judge relevance.

A teacher answers chats (system + user message). Spec strings pick one:

    openai:http://localhost:8000/v1#Qwen/Qwen3-30B-A3B-Instruct-2507   any OpenAI-compatible server
    hf:qwen2.5-coder-1.5b-instruct                                      a local HF model (batched, greedy)
    file:cots.jsonl                                                     precomputed CoTs, rows {query_id|query, cot}
    labels                                                              the dataset's labels (label distillation)

    teacher = CachedTeacher(parse_teacher("hf:smollm2-135m-instruct"), "runs/x/teacher_cache.jsonl")
    [answer] = teacher.generate([Chat("You are ...", "A shopper searched for ...")], max_tokens=64)
    answer.text, answer.finish      # ('...', 'stop'); finish: stop | length | refused | malformed

Judges decide whether an item is relevant to a query: `qrels` (the dataset's labels), `llm`
(a yes/no prompt to the teacher, or `llm:SPEC` to another one) and `cross-encoder:PATH`
(a sentence-transformers CrossEncoder folder, when one is installed).

The OpenAI client reads its key from LREM_TEACHER_KEY, else OPENAI_API_KEY (none is fine for
local servers). Transient failures (timeouts, connection errors, 429, 5xx) are retried
(tenacity) after the server's Retry-After where it sends one, else with exponential backoff;
when the retries run out, or the server says 401/403/404 (bad key, model or URL), `TeacherError`
stops the run with the endpoint and the last error (the key never shows). A 400/413/422 (this
prompt exceeds the context, a filter) or a body that is no chat completion is that one query's
`malformed` answer; 8 in a row stop the run (the endpoint or a setting is wrong for every query).

The parts live in `teacher_types` (Chat, Answer, the Teacher protocol), `teacher_openai`,
`teacher_local` and `judges`; this module wraps a teacher in its answer cache (`CachedTeacher`)
and turns spec strings into teachers and judges (`parse_teacher`, `parse_judge`).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterator

from ._io import JsonlLog
from .data import Pair
from .judges import JUDGE_SYSTEM, JUDGE_USER, CrossEncoderJudge, LLMJudge, QrelsJudge, parse_yes_no
from .teacher_local import FileCoTs, HFTeacher, LabelCoTs
from .teacher_openai import OpenAITeacher, parse_chat_response, retry_after
from .teacher_types import FINISHES, Answer, Chat, Teacher, TeacherError, generate, looks_refused

# The names this module had before its parts moved out (`from lrem.teachers import Chat`, ...)
__all__ = ["FINISHES", "TeacherError", "Chat", "Answer", "looks_refused", "Teacher", "generate", "OpenAITeacher",
           "retry_after", "parse_chat_response", "HFTeacher", "FileCoTs", "LabelCoTs", "CachedTeacher",
           "parse_teacher", "JUDGE_SYSTEM", "JUDGE_USER", "QrelsJudge", "LLMJudge", "parse_yes_no",
           "CrossEncoderJudge", "parse_judge", "JsonlLog", "Pair"]


class CachedTeacher:
    """A teacher whose answers are kept in a JSONL file keyed by sha256(model, prompt, max_tokens),
    so a rerun (or a resumed run) never asks twice. `calls` counts answers actually requested.

    Identical chats in one call are asked once. A `malformed` answer is written only once the
    whole call has finished: when the teacher stops the run (an endpoint that answers nothing
    usable), the rerun asks those chats again instead of keeping a failure it did not earn.
    """

    def __init__(self, teacher: Teacher, path: str | os.PathLike):
        self.teacher, self.name = teacher, teacher.name
        self.log = JsonlLog(path)
        self.cache = {r["key"]: Answer(r["text"], r["finish"], r.get("model")) for r in self.log.rows()}
        self.calls = self.hits = 0

    def key(self, chat: Chat, max_tokens: int) -> str:
        blob = json.dumps([self.teacher.name, chat.system, chat.user, max_tokens], ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def stream(self, chats: list[Chat], max_tokens: int) -> Iterator[tuple[int, Answer]]:
        keys = [self.key(c, max_tokens) for c in chats]
        missing: dict[str, list[int]] = {}  # key -> the chats that ask it (asked once)
        for i, k in enumerate(keys):
            if k in self.cache:
                self.hits += 1
                yield i, self.cache[k]
            else:
                missing.setdefault(k, []).append(i)
        if not missing:
            return
        asked = [idx[0] for idx in missing.values()]
        held = []  # malformed answers, logged when the call ends well
        for j, answer in self.teacher.stream([chats[i] for i in asked], max_tokens):
            k = keys[asked[j]]
            self.calls += 1
            row = {"key": k, "text": answer.text, "finish": answer.finish}
            if answer.model:  # what the server says answered: what made the CoTs of this run
                row["model"] = answer.model
            if answer.finish == "malformed":
                held.append(row)
            else:
                self.cache[k] = answer
                self.log.append(row)
            for i in missing[k]:
                yield i, answer
        if held:
            self.log.append(*held)
            self.cache.update((r["key"], Answer(r["text"], r["finish"], r.get("model"))) for r in held)


def parse_teacher(spec: str, *, batch_size: int = 16, concurrency: int = 8, timeout: float = 60.0,
                  retries: int = 4, backoff: float = 1.0, threads: int | None = None, dtype: str = "auto"):
    """`openai:BASE_URL#MODEL`, `hf:NAME_OR_PATH` or `file:PATH.jsonl` -> a teacher (FileCoTs for file:)."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise ValueError(f"teacher {spec!r}: expected openai:BASE_URL#MODEL, hf:NAME_OR_PATH or file:PATH.jsonl")
    if kind == "openai":
        url, hash_, model = rest.rpartition("#")
        if not hash_ or not url or not model:
            raise ValueError(f"teacher {spec!r}: expected openai:BASE_URL#MODEL, e.g. openai:http://localhost:8000/v1#qwen3")
        return OpenAITeacher(url, model, concurrency=concurrency, timeout=timeout, retries=retries, backoff=backoff)
    if kind == "hf":
        return HFTeacher(rest, batch_size=batch_size, threads=threads, dtype=dtype)
    if kind == "file":
        return FileCoTs(rest)
    raise ValueError(f"teacher {spec!r}: unknown kind {kind!r} (openai, hf, file)")


def parse_judge(spec: str, qrels: dict, teacher=None, make_teacher=parse_teacher, threshold: float = 0.5):
    """`qrels`, `llm` (the run's teacher), `llm:TEACHER_SPEC` or `cross-encoder:PATH` -> a judge."""
    kind, sep, rest = spec.partition(":")
    if spec == "qrels":
        return QrelsJudge(qrels)
    if kind == "llm":
        t = make_teacher(rest) if sep else teacher
        if t is None or hasattr(t, "lookup"):
            raise ValueError(f"judge {spec!r} needs a chat teacher (openai: or hf:), not {getattr(t, 'name', t)!r}")
        return LLMJudge(t)
    if kind == "cross-encoder" and rest:
        return CrossEncoderJudge(rest, threshold=threshold)
    raise ValueError(f"judge {spec!r}: expected qrels, llm, llm:TEACHER_SPEC or cross-encoder:PATH")
