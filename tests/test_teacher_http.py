"""The HTTP teacher as a user meets it: odd endpoints, keys, per-query rejections and whole-run
failures, against a real HTTP server on 127.0.0.1 standing in for vLLM or OpenAI; the run is
`lrem construct` itself, its rows counted."""
from __future__ import annotations

import json
import time

import pytest
from test_construct import QUIET, cfg, many_queries, read, shop
from test_teachers import CHAT, completion, dead_url, standin  # noqa: F401 (the fixture)

from lrem.construct import construct
from lrem.teachers import (Answer, CachedTeacher, Chat, JsonlLog, OpenAITeacher, TeacherError, generate,
                           parse_teacher)

TOO_LONG = '{"object": "error", "message": "This model\'s maximum context length is 2048 tokens.", "code": 400}'


# ---------------------------------------------------------------- one bad query, a bad endpoint

def test_one_query_the_server_rejects_is_that_query_s_failure_not_the_run_s(standin, tmp_path, tiny_dir):
    """vLLM answers 400 to a prompt longer than its context: that query fails with the server's
    message in its outcome, every other query goes on, and the run finishes (a rerun too)."""
    def reply(body, n):
        user = body["messages"][1]["content"]
        if "soup" in user:
            return 400, TOO_LONG, 0
        if "From the analysis" in user:
            return 200, completion("coffee, espresso"), 0
        return 200, completion("The shopper wants coffee or espresso."), 0

    srv = standin(reply)
    c = cfg(tiny_dir, teacher=f"openai:{srv.url}#m", teacher_backoff=0.01)
    stats = construct(shop(), tmp_path / "run", c, **QUIET)
    rows = {r["query_id"]: r for r in read(tmp_path / "run" / "outcomes.jsonl")}
    assert len(rows) == stats["funnel"]["done"] == 6
    echo = rows["q_echo"]
    assert echo["status"] == "teacher_failed" and echo["problems"] == ["reasoning:malformed"]
    assert echo["reasoning"].startswith("HTTP 400:") and "maximum context length" in echo["reasoning"]
    assert stats["statuses"]["teacher_failed"] == 1 and stats["funnel"]["triplets"] > 0
    assert all(t["query_id"] != "q_echo" for t in read(tmp_path / "run" / "triplets.jsonl"))
    asked = len(srv.requests)
    assert construct(shop(), tmp_path / "run", c, **QUIET)["funnel"] == stats["funnel"] and len(srv.requests) == asked


def test_a_server_that_rejects_every_request_stops_after_a_few(standin):
    srv = standin(lambda body, n: (400, '{"error": {"message": "Unsupported parameter: \'max_tokens\'"}}', 0))
    t = OpenAITeacher(srv.url, "m", concurrency=1, backoff=0.01)
    with pytest.raises(TeacherError, match=r"8 unusable answers in a row; last: HTTP 400: .*max_tokens"):
        generate(t, [Chat("s", f"q{i}") for i in range(50)], 16)
    assert len(srv.requests) == 8  # not 50 requests, nor 50 failed queries


def test_an_endpoint_that_answers_html_stops_the_run_and_the_rerun_asks_again(standin, tmp_path, tiny_dir):
    """A web UI on the teacher's port answers every path 200 with its HTML page: the run stops
    with a clear error instead of finishing with every query failed, and none of those failures
    is kept, so the rerun against the real server does every query."""
    state = {"html": True}

    def reply(body, n):
        if state["html"]:
            return 200, "<!DOCTYPE html><html><title>Open WebUI</title></html>", 0
        return 200, completion("kettle, teapot"), 0

    srv = standin(reply)
    c = cfg(tiny_dir, teacher=f"openai:{srv.url}#m", teacher_mode="list", keep_all=True, limit=20, batch_size=20)
    out = tmp_path / "run"
    with pytest.raises(TeacherError, match=r"unusable answers in a row; last: HTTP 200 .*Open WebUI"):
        construct(many_queries(20), out, c, **QUIET)
    assert read(out / "outcomes.jsonl") == []
    assert JsonlLog(out / "teacher_cache.jsonl").rows() == []  # no failure kept for the rerun
    state["html"] = False
    stats = construct(many_queries(20), out, c, **QUIET)
    rows = read(out / "outcomes.jsonl")
    assert len(rows) == len({r["query_id"] for r in rows}) == 20
    assert stats["statuses"].get("teacher_failed", 0) == 0


def test_scattered_malformed_answers_are_counted_and_kept(standin, tmp_path):
    """Fewer than UNUSABLE_IN_A_ROW in a row: each is its query's answer, and cached when the call ends."""
    srv = standin(lambda body, n: (200, '{"choices": []}' if body["messages"][1]["content"].endswith("3") else
                                   completion("ok"), 0))
    t = CachedTeacher(OpenAITeacher(srv.url, "m", concurrency=1), tmp_path / "c.jsonl")
    answers = generate(t, [Chat("s", f"q{i}") for i in range(30)], 16)
    assert [a.finish for a in answers].count("malformed") == 3 and len(read(tmp_path / "c.jsonl")) == 30


def test_the_model_that_answered_is_kept_with_the_answers(standin, tmp_path):
    """An alias ("gpt-4o-mini") moves to new snapshots: the cache of the run records which one wrote each CoT."""
    srv = standin(lambda body, n: (200, json.dumps({"model": "gpt-4o-mini-2024-07-18", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "coffee"}, "finish_reason": "stop"}]}), 0))
    t = CachedTeacher(OpenAITeacher(srv.url, "gpt-4o-mini"), tmp_path / "c.jsonl")
    assert generate(t, [CHAT], 8)[0].model == "gpt-4o-mini-2024-07-18"
    assert [r["model"] for r in read(tmp_path / "c.jsonl")] == ["gpt-4o-mini-2024-07-18"]
    again = CachedTeacher(OpenAITeacher(srv.url, "gpt-4o-mini"), tmp_path / "c.jsonl")
    assert generate(again, [CHAT], 8)[0].model == "gpt-4o-mini-2024-07-18" and len(srv.requests) == 1


# ---------------------------------------------------------------- the API key

def test_a_key_with_a_crlf_line_end_is_sent_trimmed(standin, monkeypatch):
    monkeypatch.setenv("LREM_TEACHER_KEY", "sk-secret-123\r")  # a .env file written on Windows
    srv = standin(lambda body, n: (200, completion("ok"), 0))
    assert generate(OpenAITeacher(srv.url, "m", retries=0), [CHAT], 8) == [Answer("ok", "stop")]
    assert srv.headers[0]["Authorization"] == "Bearer sk-secret-123"


def test_a_key_no_header_can_carry_is_named_never_shown(monkeypatch):
    monkeypatch.delenv("LREM_TEACHER_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-sécret-123")
    with pytest.raises(ValueError, match="OPENAI_API_KEY: the API key has characters") as e:
        parse_teacher(f"openai:{dead_url()}#m")
    assert "cret-123" not in str(e.value)


def test_the_key_never_shows_in_an_error(standin, monkeypatch):
    monkeypatch.setenv("LREM_TEACHER_KEY", "sk-secret-123")
    srv = standin(lambda body, n: (401, '{"error": {"message": "Incorrect API key provided: sk-secret-123."}}', 0))
    with pytest.raises(TeacherError, match=r"HTTP 401: .*Incorrect API key provided: \*\*\*") as e:
        generate(OpenAITeacher(srv.url, "m"), [CHAT], 8)
    assert "sk-secret" not in str(e.value)
    srv = standin(lambda body, n: (503, '{"error": "no capacity for key sk-secret-123"}', 0))
    with pytest.raises(TeacherError, match=r"failed after 2 tries; last error: HTTP 503") as e:
        generate(OpenAITeacher(srv.url, "m", retries=1, backoff=0.01), [CHAT], 8)
    assert "sk-secret" not in str(e.value)


# ---------------------------------------------------------------- the base URL

def test_base_url_forms(standin):
    srv = standin(lambda body, n: (200, completion("ok"), 0))
    for url in (srv.url, srv.url + "/", srv.url + "/chat/completions", srv.url + "/chat/completions/"):
        t = OpenAITeacher(url, "m", retries=0)
        assert generate(t, [CHAT], 8) == [Answer("ok", "stop")], url
        assert t.name == f"openai:{srv.url}#m"  # one cache key whichever form was typed
    no_v1 = srv.url[: -len("/v1")]
    with pytest.raises(TeacherError, match=r"answered HTTP 404: .*Not Found.*usually serve BASE_URL \.\.\./v1"):
        generate(OpenAITeacher(no_v1, "m", retries=0), [CHAT], 8)


def test_a_base_url_without_a_scheme_is_refused_at_once():
    t0 = time.perf_counter()
    for spec in ("openai:localhost:8000/v1#m", "openai:127.0.0.1:8000/v1#m", "openai:/v1#m"):
        with pytest.raises(ValueError, match=r"teacher base URL .*: expected http://"):
            parse_teacher(spec)
    assert time.perf_counter() - t0 < 1  # not after retrying each request with backoff


# ---------------------------------------------------------------- retries, concurrency, paying once

def test_retries_back_off_then_give_up_in_one_line(standin):
    srv = standin(lambda body, n: (503, '{"error": "busy"}', 0))
    with pytest.raises(TeacherError) as e:
        generate(OpenAITeacher(srv.url, "m", retries=3, backoff=0.1), [CHAT], 8)
    assert "\n" not in str(e.value)
    assert str(e.value).endswith('failed after 4 tries; last error: HTTP 503: {"error": "busy"}')
    gaps = [b - a for a, b in zip(srv.times, srv.times[1:])]
    assert len(gaps) == 3 and gaps[0] >= 0.09 and gaps[1] >= 0.19 and gaps[2] >= 0.39


def test_concurrency_is_a_ceiling(standin):
    srv = standin(lambda body, n: (200, completion("ok"), 0.1))
    generate(OpenAITeacher(srv.url, "m", concurrency=3), [Chat("s", f"q{i}") for i in range(12)], 8)
    assert srv.max_in_flight == 3


def test_identical_chats_are_asked_once(standin, tmp_path):
    """Two catalog items with the same title (colour variants) judged for one query: one request."""
    srv = standin(lambda body, n: (200, completion(body["messages"][1]["content"][::-1]), 0))
    t = CachedTeacher(OpenAITeacher(srv.url, "m"), tmp_path / "c.jsonl")
    answers = generate(t, [Chat("s", "ab"), Chat("s", "cd"), Chat("s", "ab")], 8)
    assert [a.text for a in answers] == ["ba", "dc", "ba"]
    assert len(srv.requests) == 2 == t.calls and len(read(tmp_path / "c.jsonl")) == 2


def test_answers_that_arrived_with_a_failure_are_kept(standin, tmp_path):
    """A request fails for good while others have just been answered: those answers are paid
    for, so they reach the cache before the run stops (the rerun does not buy them again)."""
    def reply(body, n):
        user = body["messages"][1]["content"]
        if user == "bad":  # fails last: once every request has arrived and the good ones are answered
            while len(srv.requests) < 21:
                time.sleep(0.01)
            return 401, '{"error": "key revoked"}', 0.5
        return 200, completion(user), 0 if user == "q0" else 0.1

    srv = standin(reply)
    t = CachedTeacher(OpenAITeacher(srv.url, "m", concurrency=32), tmp_path / "c.jsonl")
    chats = [Chat("s", f"q{i}") for i in range(20)] + [Chat("s", "bad")]
    seen = []
    with pytest.raises(TeacherError, match="key revoked"):
        for i, a in t.stream(chats, 8):
            seen.append(i)
            while len(seen) == 1 and len(srv.requests) < 21:
                time.sleep(0.01)
            if len(seen) == 1:
                time.sleep(1.0)  # a slow consumer: the rest finish meanwhile, the failure among them
    assert len(read(tmp_path / "c.jsonl")) == len(seen) == 20


def test_answers_are_cached_as_they_arrive_not_when_the_batch_ends(standin, tmp_path):
    """One slow request must not hold back the others: a run killed while it is in flight keeps
    every answer that came before (a resume pays only for the slow one)."""
    srv = standin(lambda body, n: (200, completion("late"), 3.0) if body["messages"][1]["content"] == "slow"
                  else (200, completion("ok"), 0))
    t = CachedTeacher(OpenAITeacher(srv.url, "m", concurrency=8), tmp_path / "c.jsonl")
    stream = t.stream([Chat("s", "slow")] + [Chat("s", f"q{i}") for i in range(5)], 8)
    t0 = time.perf_counter()
    first = [next(stream) for _ in range(5)]
    assert time.perf_counter() - t0 < 2.0 and sorted(i for i, _ in first) == [1, 2, 3, 4, 5]
    assert len(read(tmp_path / "c.jsonl")) == 5  # on disk while "slow" is still being answered
    assert list(stream) == [(0, Answer("late", "stop"))]


# ---------------------------------------------------------------- a run killed and resumed

def test_a_run_killed_mid_way_resumes_without_paying_twice(standin, tmp_path, tiny_dir):
    """`lrem construct` on the HTTP teacher, SIGKILLed mid-run, then rerun: every query once,
    and no prompt bought twice but those in flight at the kill (`teacher_concurrency`), give or take
    the answers that arrived as it landed."""
    import collections
    import os
    import signal
    import subprocess
    import sys

    import yaml

    from lrem.data import save_dataset

    n = 60
    save_dataset(many_queries(n), tmp_path / "data")
    extract = lambda body: "From the analysis" in body["messages"][1]["content"]  # noqa: E731
    srv = standin(lambda body, k: (200, completion("kettle, teapot" if extract(body) else "The shopper wants a kettle."),
                                   0.05))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "teacher": f"openai:{srv.url}#m", "student": str(tiny_dir), "keep_all": True, "k_mine": 3, "k_gain": 3,
        "batch_size": 16, "teacher_concurrency": 4}))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lrem.cli", "construct", "--data", str(tmp_path / "data"), "--out", str(out),
           "--config", str(tmp_path / "c.yaml")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 240
    while len(srv.requests) < 30:
        assert p.poll() is None, p.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no teacher request in time"
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    killed = len(read(out / "outcomes.jsonl"))
    assert killed < n
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = read(out / "outcomes.jsonl")
    assert sorted(r["query_id"] for r in rows) == sorted(many_queries(n).queries)
    assert all(r["status"] != "teacher_failed" for r in rows)
    triplets = [(t["query_id"], t["item_id"]) for t in read(out / "triplets.jsonl")]
    assert len(triplets) == len(set(triplets)) > 0
    asked = collections.Counter(json.dumps(r["messages"]) for r in srv.requests)
    assert len(asked) == 2 * n  # reasoning and extraction of each query
    # paid twice: the 4 in flight at the kill, and under load a few answered but not yet written;
    # before, answers were written when the whole batch of 16 ended
    assert sum(c - 1 for c in asked.values()) <= 8


def test_a_step_sends_as_many_requests_as_the_teacher_may_have_in_flight(standin, tmp_path, tiny_dir):
    """teacher_concurrency 8 with the default batch_size 16 or a smaller one, 4: a step takes at
    least 8 queries, so 8 requests are in flight (before, a step of 4 capped them at 4)."""
    extract = lambda body: "From the analysis" in body["messages"][1]["content"]  # noqa: E731
    srv = standin(lambda body, k: (200, completion("kettle, teapot" if extract(body) else "The shopper wants a kettle."),
                                   0.2))
    c = cfg(tiny_dir, teacher=f"openai:{srv.url}#m", keep_all=True, batch_size=4, teacher_concurrency=8)
    stats = construct(many_queries(16), tmp_path / "run", c, **QUIET)
    assert stats["funnel"]["done"] == 16 and srv.max_in_flight == 8
