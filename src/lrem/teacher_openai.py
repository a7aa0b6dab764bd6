"""The HTTP teacher (`lrem.teachers`): `OpenAITeacher`, any OpenAI-compatible /chat/completions
endpoint, with retries (`retry_after`) and tolerant parsing of its replies (`parse_chat_response`)."""
from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Iterator
from urllib.parse import urlsplit

from .teacher_types import Answer, Chat, TeacherError, looks_refused


class OpenAITeacher:
    """Any OpenAI-compatible /chat/completions endpoint (vLLM, Ollama, llama.cpp server, APIs).

    Args:
        base_url: e.g. "http://localhost:8000/v1" (".../chat/completions" is appended; a base
            URL that already ends in it is taken as the endpoint).
        model: the model name the server expects.
        api_key: None reads LREM_TEACHER_KEY, else OPENAI_API_KEY; none sends no header. Never
            shown: error lines print "***" where a server echoes it.
        concurrency: requests in flight at once.
        timeout: seconds per request.
        retries: extra tries after a transient failure; waits the server's Retry-After, else
            backoff * 2**try seconds.
        temperature: 0.0 = greedy (reproducible with most servers).

    One query's unusable answer (a body that is no chat completion, or a 400/413/422 the server
    gives that request alone, e.g. its prompt exceeds the context) is that query's `malformed`
    answer, with the server's message as its text. `UNUSABLE_IN_A_ROW` of them with no good
    answer between stop the run (TeacherError): then the endpoint or a setting is wrong, and
    going on would only mark every query failed.
    """

    UNUSABLE_IN_A_ROW = 8
    REJECTED = (400, 413, 422)  # the request's own content (too long, filtered), not the endpoint

    def __init__(self, base_url: str, model: str, api_key: str | None = None, concurrency: int = 8,
                 timeout: float = 60.0, retries: int = 4, backoff: float = 1.0, temperature: float = 0.0):
        import httpx

        base = base_url.strip().rstrip("/")
        if base.endswith("/chat/completions"):  # the whole endpoint pasted as the base URL
            base = base[: -len("/chat/completions")]
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"teacher base URL {base_url!r}: expected http://HOST[:PORT]/PATH or https://..., "
                             "e.g. http://localhost:8000/v1")
        self.url = base + "/chat/completions"
        self.model, self.name = model, f"openai:{base}#{model}"
        self.concurrency, self.retries, self.backoff, self.temperature = concurrency, retries, backoff, temperature
        keys = {"api_key": api_key, **{v: os.environ.get(v) for v in ("LREM_TEACHER_KEY", "OPENAI_API_KEY")}}
        source, key = next(((k, v) for k, v in keys.items() if v), (None, ""))
        self._key = key.strip()  # a key file or .env with CRLF line ends leaves "\r", which no header may carry
        if self._key and not (self._key.isascii() and self._key.isprintable()):
            raise ValueError(f"{source}: the API key has characters an HTTP header cannot carry (non-ASCII or "
                             "control characters); check how it was set")
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        self.client = httpx.Client(timeout=timeout, headers=headers,
                                   limits=httpx.Limits(max_connections=max(concurrency, 1)))
        self._lock = threading.Lock()
        self._unusable = 0  # unusable answers since the last good one

    def _redact(self, text: str) -> str:
        """Some servers echo the key they refuse; a short placeholder ("EMPTY", "ollama") is no
        secret, and replacing it would garble the host names and messages it also appears in."""
        return text.replace(self._key, "***") if len(self._key) >= 8 else text

    def _error(self, what: str) -> TeacherError:
        """The run-stopping error, naming endpoint and model; the key never shows."""
        return TeacherError(self._redact(f"teacher {self.url} (model {self.model!r}) {what}"))

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
            raise self._error(f"failed after {self.retries + 1} tries; last error: {last}") from None
        if r.status_code in self.REJECTED:
            answer = Answer(self._redact(f"HTTP {r.status_code}: {r.text[:300]}"), "malformed")
        elif r.status_code != 200:
            hint = ""
            if r.status_code == 404 and not urlsplit(self.url).path.endswith("/v1/chat/completions"):
                hint = " (OpenAI-compatible servers usually serve BASE_URL .../v1)"
            raise self._error(f"answered HTTP {r.status_code}: {r.text[:300]}{hint}")
        else:
            answer = parse_chat_response(r.text)
        with self._lock:
            self._unusable = self._unusable + 1 if answer.finish == "malformed" else 0
            stop = self._unusable >= self.UNUSABLE_IN_A_ROW
        if stop:
            what = answer.text or f"HTTP 200 with no usable answer: {r.text[:300]!r}"
            raise self._error(f"gave {self.UNUSABLE_IN_A_ROW} unusable answers in a row; last: {what}")
        return answer

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
                done, _ = wait(pending, return_when=FIRST_COMPLETED)  # FIRST_EXCEPTION waits for all
                failed = None
                for fut in done:  # the answers that came with a failure are paid for: hand them on first
                    i = pending.pop(fut)
                    if fut.exception() is not None:
                        failed = failed or fut.exception()
                    else:
                        yield i, fut.result()
                if failed is not None:
                    raise failed
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
        body = json.loads(text)
        choice = body["choices"][0]
        msg = choice["message"]
        content = msg.get("content")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return Answer("", "malformed")
    model = body.get("model") if isinstance(body.get("model"), str) else None
    if msg.get("refusal"):
        return Answer(str(msg["refusal"]), "refused", model)
    if not isinstance(content, str):
        return Answer("", "malformed", model)
    if looks_refused(content):
        return Answer(content, "refused", model)
    return Answer(content, "length" if choice.get("finish_reason") == "length" else "stop", model)
