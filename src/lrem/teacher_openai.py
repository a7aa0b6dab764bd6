"""The HTTP teacher (`lrem.teachers`): `OpenAITeacher`, any OpenAI-compatible /chat/completions
endpoint, with retries (`retry_after`) and tolerant parsing of its replies (`parse_chat_response`)."""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Iterator

from .teacher_types import Answer, Chat, TeacherError, looks_refused


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

