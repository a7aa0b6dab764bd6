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
when the retries run out, or the server says 4xx (bad model, bad key), `TeacherError` stops the
run with the endpoint and the last error.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

from ._io import JsonlLog
from .data import Pair

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
    """A teacher's reply. finish: stop (complete), length (hit max_tokens), refused, malformed."""

    text: str
    finish: str = "stop"


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


# ---------------------------------------------------------------- teachers

class OpenAITeacher:
    """Any OpenAI-compatible /chat/completions endpoint (vLLM, Ollama, llama.cpp server, APIs).

    Args:
        base_url: e.g. "http://localhost:8000/v1" (".../chat/completions" is appended).
        model: the model name the server expects.
        api_key: None reads LREM_TEACHER_KEY, else OPENAI_API_KEY; none sends no header.
        concurrency: requests in flight at once.
        timeout: seconds per request.
        retries: extra tries after a transient failure; waits the server's Retry-After, else
            backoff * 2**try seconds.
        temperature: 0.0 = greedy (reproducible with most servers).
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, concurrency: int = 8,
                 timeout: float = 60.0, retries: int = 4, backoff: float = 1.0, temperature: float = 0.0):
        import httpx

        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.name = model, f"openai:{base_url.rstrip('/')}#{model}"
        self.concurrency, self.retries, self.backoff, self.temperature = concurrency, retries, backoff, temperature
        key = api_key or os.environ.get("LREM_TEACHER_KEY") or os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(timeout=timeout, headers=headers,
                                   limits=httpx.Limits(max_connections=max(concurrency, 1)))

    def ask(self, chat: Chat, max_tokens: int) -> Answer:
        """One request with retries; TeacherError when it cannot get any answer."""
        import httpx
        from tenacity import RetryError, Retrying, retry_if_exception_type, stop_after_attempt

        body = {"model": self.model, "messages": chat.messages(), "max_tokens": max_tokens,
                "temperature": self.temperature}

        def post() -> httpx.Response:
            r = self.client.post(self.url, json=body)  # httpx.HTTPError: timeouts, refused connections, resets
            if r.status_code == 429 or r.status_code >= 500:
                raise _Transient(r)
            return r

        try:
            r = Retrying(retry=retry_if_exception_type((httpx.HTTPError, _Transient)),
                         stop=stop_after_attempt(self.retries + 1), wait=self._wait, sleep=time.sleep)(post)
        except RetryError as e:
            err = e.last_attempt.exception()
            last = str(err) if isinstance(err, _Transient) else f"{type(err).__name__}: {err}"
            raise TeacherError(f"teacher {self.url} (model {self.model!r}) failed after {self.retries + 1} tries; "
                               f"last error: {last}") from None
        if r.status_code != 200:
            raise TeacherError(f"teacher {self.url} (model {self.model!r}) answered HTTP {r.status_code}: "
                               f"{r.text[:300]}")
        return parse_chat_response(r.text)

    MAX_RETRY_AFTER = 120.0  # seconds: a longer Retry-After is capped (the run would look hung)

    def _wait(self, state) -> float:
        """Seconds before the next try: the server's Retry-After where it sent one (429, 503),
        else backoff * 2**(try - 1)."""
        err = state.outcome.exception()
        after = retry_after(err.response) if isinstance(err, _Transient) else None
        if after is not None:
            return min(after, self.MAX_RETRY_AFTER)
        return self.backoff * 2 ** (state.attempt_number - 1)

    def stream(self, chats: list[Chat], max_tokens: int) -> Iterator[tuple[int, Answer]]:
        pool = ThreadPoolExecutor(max_workers=max(self.concurrency, 1))
        try:
            pending = {pool.submit(self.ask, c, max_tokens): i for i, c in enumerate(chats)}
            while pending:
                done, _ = wait(pending, return_when=FIRST_EXCEPTION)
                for fut in done:
                    i = pending.pop(fut)
                    if fut.exception() is not None:
                        raise fut.exception()
                    yield i, fut.result()
        finally:  # on an error, don't wait for the queued requests (in-flight ones end with their timeout)
            pool.shutdown(wait=False, cancel_futures=True)


class _Transient(Exception):
    """A reply worth retrying (429, 5xx); keeps the response for its Retry-After header."""

    def __init__(self, response):
        super().__init__(f"HTTP {response.status_code}: {response.text[:200]}")
        self.response = response


def retry_after(response) -> float | None:
    """The wait a response asks for, in seconds: OpenAI's `retry-after-ms`, or `Retry-After` as
    seconds or an HTTP date (RFC 9110); None when absent or unreadable."""
    from email.utils import parsedate_to_datetime

    h = response.headers
    try:
        if "retry-after-ms" in h:
            return max(float(h["retry-after-ms"]) / 1000, 0.0)
        if "retry-after" in h:
            v = h["retry-after"].strip()
            if v.replace(".", "", 1).isdigit():
                return float(v)
            return max(parsedate_to_datetime(v).timestamp() - time.time(), 0.0)
    except (ValueError, TypeError, OverflowError):
        return None
    return None


def parse_chat_response(text: str) -> Answer:
    """An OpenAI chat-completion body -> Answer; anything unexpected is `malformed`, not an error."""
    try:
        choice = json.loads(text)["choices"][0]
        msg = choice["message"]
        content = msg.get("content")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return Answer("", "malformed")
    if msg.get("refusal"):
        return Answer(str(msg["refusal"]), "refused")
    if not isinstance(content, str):
        return Answer("", "malformed")
    if looks_refused(content):
        return Answer(content, "refused")
    return Answer(content, "length" if choice.get("finish_reason") == "length" else "stop")


class HFTeacher:
    """A local HF causal LM with a chat template: batched greedy generation.

    Args:
        name_or_path: a built-in name (e.g. "qwen2.5-coder-1.5b-instruct"), an HF folder or hub name.
        batch_size: chats per batch (sorted by length to pad less).
        dtype: "auto" (see `lrem.backbones.default_dtype`), "float32" or "bfloat16".
        fast: decode with `lrem.decoding.generate` (the prompt prefix all chats share, e.g. the
            system prompt, run once and kept; a preallocated KV cache; on the CPU the compact
            decoder, whose matmuls use every thread even for few rows); False: `lm.generate`.
            Same tokens up to float near-ties.
        threads: torch threads while generating. None: `OMP_NUM_THREADS` when set, else the cores
            other jobs leave free (`lrem._threads.default_threads`), checked again every batch, so
            a long run uses both cores of a quiet 2-core machine and one when another job starts.
    """

    def __init__(self, name_or_path: str, batch_size: int = 16, dtype: str = "auto", device: str = "cpu",
                 fast: bool = True, threads: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from lrem.backbones import default_dtype, resolve_backbone

        path = resolve_backbone(name_or_path)
        self.name, self.batch_size, self.device = f"hf:{name_or_path}", batch_size, device
        self.fast, self.threads = fast, threads
        self.tok = AutoTokenizer.from_pretrained(path)
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        dt = default_dtype(device) if dtype == "auto" else getattr(torch, dtype)
        self.lm = AutoModelForCausalLM.from_pretrained(path, dtype=dt).to(device).eval()
        eos = self.lm.generation_config.eos_token_id
        self.stop_ids = sorted({*(eos if isinstance(eos, list) else [eos] if eos is not None else []),
                                self.tok.eos_token_id} - {None})
        self._prefixes: dict = {}  # prompt prefix -> KV (`lrem.decoding.generate`), for these weights
        self._linears: dict = {}  # thread count -> the compact decoder's blocked weight views

    def prompt(self, chat: Chat) -> str:
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template(chat.messages(), tokenize=False, add_generation_prompt=True)
        return f"{chat.system}\n\nUser: {chat.user}\nAssistant: "

    def generate_ids(self, texts: list[str], max_tokens: int) -> list[list[int]]:
        """Greedy continuations (token ids, each up to and including its stop id) of prompts."""
        import torch

        from lrem.decoding import block_linears, generate

        if not self.fast:
            batch = self.tok(texts, padding=True, add_special_tokens=False, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                gen = self.lm.generate(**batch, max_new_tokens=max_tokens, do_sample=False,
                                       eos_token_id=self.stop_ids, pad_token_id=self.tok.pad_token_id)
            rows = gen[:, batch["input_ids"].shape[1]:].tolist()  # (B, <= max)
            return [r[: next((i + 1 for i, t in enumerate(r) if t in self.stop_ids), len(r))] for r in rows]
        seqs = self.tok(texts, add_special_tokens=False)["input_ids"]
        linears = None
        if self.device == "cpu":
            n = torch.get_num_threads()
            if n not in self._linears:
                self._linears[n] = block_linears(self.lm, n)
            linears = self._linears[n]
        return generate(self.lm, seqs, max_tokens, self.stop_ids, self.tok.pad_token_id, linears=linears,
                        prefix_cache=self._prefixes)

    def stream(self, chats: list[Chat], max_tokens: int) -> Iterator[tuple[int, Answer]]:
        import torch

        if not chats:
            return
        texts = [self.prompt(c) for c in chats]
        lengths = [len(ids) for ids in self.tok(texts, add_special_tokens=False)["input_ids"]]
        order = sorted(range(len(chats)), key=lambda i: lengths[i])
        from lrem._threads import default_threads

        old = torch.get_num_threads()
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            torch.set_num_threads(self.threads or default_threads())  # OMP_NUM_THREADS, else the free cores
            try:
                gen = self.generate_ids([texts[i] for i in idx], max_tokens)
            finally:
                torch.set_num_threads(old)
            for i, row in zip(idx, gen):
                stopped = bool(row) and row[-1] in self.stop_ids
                text = self.tok.decode(row, skip_special_tokens=True).strip()
                finish = "refused" if looks_refused(text) else "stop" if stopped else "length"
                yield i, Answer(text, finish)


class FileCoTs:
    """Precomputed CoTs from a JSONL file: rows {query_id, cot} or {query, cot}.

    Not a chat teacher: `lookup` returns the CoT of a query (by id, else by exact text) or None.
    A bad row raises a ValueError naming file, line and field.
    """

    def __init__(self, path: str | os.PathLike):
        from lrem.data import DataError

        self.path, self.name = Path(path), f"file:{path}"
        if not self.path.is_file():
            raise FileNotFoundError(f"CoT file {self.path} does not exist")
        self.by_id: dict[str, str] = {}
        self.by_text: dict[str, str] = {}
        for n, line in enumerate(self.path.read_text(encoding="utf-8").split("\n"), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(self.path, n, None, f"malformed JSON ({e})") from None
            if not isinstance(row, dict):
                raise DataError(self.path, n, None, "expected a JSON object")
            if not isinstance(row.get("cot"), str):
                raise DataError(self.path, n, "cot", "missing or not a string")
            key_field = "query_id" if "query_id" in row else "query" if "query" in row else None
            if key_field is None or not isinstance(row[key_field], str) or not row[key_field]:
                raise DataError(self.path, n, key_field or "query_id", "need a non-empty query_id or query")
            table = self.by_id if key_field == "query_id" else self.by_text
            if row[key_field] in table:
                raise DataError(self.path, n, key_field, f"duplicate {row[key_field]!r}")
            table[row[key_field]] = row["cot"]

    def lookup(self, query_id: str, query: str) -> str | None:
        return self.by_id.get(query_id, self.by_text.get(query))


class LabelCoTs:
    """Label distillation (beyond the paper): each query's CoT is built from the dataset's own
    labels, the titles and categories of its relevant items, so it shows how far a perfectly
    informed teacher gets. Free, and a CoT for every labelled query; the construct pipeline
    post-processes it like any teacher's list and cuts it to `cot_max_tokens` student tokens.

    Phrases, in order: the first name of each relevant item (highest relevance first, ties in
    a seeded hash order), then their other names, then their distinct categories. A title
    "corkscrew, bottle screw" counts as two names (catalog titles list synonyms by comma).

    Not a chat teacher: `lookup` gives the list of a query, or None for an unlabelled one.
    """

    name = "labels"

    def __init__(self, qrels: dict[str, dict[str, int]], catalog: dict, seed: int = 0):
        self.qrels, self.catalog, self.seed = qrels, catalog, seed

    def lookup(self, query_id: str, query: str) -> str | None:
        rel = [(-r, hashlib.sha1(f"{self.seed}:{query_id}:{i}".encode()).hexdigest(), i)
               for i, r in self.qrels.get(query_id, {}).items() if r > 0 and i in self.catalog]
        items = [self.catalog[i] for *_, i in sorted(rel)]
        if not items:
            return None
        names = [[n.strip() for n in item.title.split(",") if n.strip()] for item in items]
        phrases = [n[0] for n in names if n] + [x for n in names for x in n[1:]]
        phrases += list(dict.fromkeys(item.category for item in items if getattr(item, "category", None)))
        return ", ".join(phrases)


class CachedTeacher:
    """A teacher whose answers are kept in a JSONL file keyed by sha256(model, prompt, max_tokens),
    so a rerun (or a resumed run) never asks twice. `calls` counts answers actually requested."""

    def __init__(self, teacher: Teacher, path: str | os.PathLike):
        self.teacher, self.name = teacher, teacher.name
        self.log = JsonlLog(path)
        self.cache = {r["key"]: Answer(r["text"], r["finish"]) for r in self.log.rows()}
        self.calls = self.hits = 0

    def key(self, chat: Chat, max_tokens: int) -> str:
        blob = json.dumps([self.teacher.name, chat.system, chat.user, max_tokens], ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def stream(self, chats: list[Chat], max_tokens: int) -> Iterator[tuple[int, Answer]]:
        keys = [self.key(c, max_tokens) for c in chats]
        missing = []
        for i, k in enumerate(keys):
            if k in self.cache:
                self.hits += 1
                yield i, self.cache[k]
            else:
                missing.append(i)
        if not missing:
            return
        for j, answer in self.teacher.stream([chats[i] for i in missing], max_tokens):
            i = missing[j]
            self.calls += 1
            if keys[i] not in self.cache:
                self.cache[keys[i]] = answer
                self.log.append({"key": keys[i], "text": answer.text, "finish": answer.finish})
            yield i, answer


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


# ---------------------------------------------------------------- judges

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
    """The first word of a judge's answer: yes -> True, no -> False, anything else -> None.

    >>> parse_yes_no(" Yes."), parse_yes_no("no"), parse_yes_no("maybe")
    (True, False, None)
    """
    word = re.sub(r"[^a-z]", " ", text.lower()).split()
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
