"""lrem serve: a real uvicorn server on 127.0.0.1 around a real model and FAISS index.

Most tests use the tiny random model (fast); one uses the real default model. Clients are httpx
and the `openai` package; every request goes over loopback TCP.
"""
from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from lrem.batching import Batcher, EmbeddingCache
from lrem.index import ItemIndex
from lrem.model import LREM
from lrem.search import Searcher
from lrem.serve import ServeConfig, background_server, create_app, load_searcher, normalize_query

TITLES = ["corkscrew, bottle screw", "teapot", "coffee, java", "mug", "spatula", "wine glass", "sofa, couch",
          "floor lamp", "rug", "throw pillow", "dining chair", "coffee table", "bookcase", "bed frame", "mirror",
          "curtain", "desk", "office chair", "saucepan", "kettle"]
LIMITS = dict(max_query_chars=200, max_item_chars=2000, max_k=50, max_inputs=8, max_body_bytes=16_384)


@pytest.fixture(scope="module")
def searcher(tiny):
    return Searcher(tiny, ItemIndex.build(tiny, {f"i{j}": t for j, t in enumerate(TITLES)}, show_progress=False))


@pytest.fixture(scope="module")
def url(searcher):
    with background_server(create_app(searcher, ServeConfig(max_batch=8, max_wait_ms=20, **LIMITS))) as base:
        yield base


def post(url: str, path: str, body) -> httpx.Response:
    """POST a JSON value (dict, list) or raw bytes."""
    if isinstance(body, bytes):
        return httpx.post(url + path, content=body, headers={"content-type": "application/json"}, timeout=60)
    return httpx.post(url + path, json=body, timeout=60)


def metric(text: str, name: str, **labels) -> float:
    """One sample's value from Prometheus text (0.0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)$"
    found = [float(m.group(1)) for line in text.splitlines() if (m := re.match(pattern, line))]
    return found[0] if found else 0.0


# ---------------------------------------------------------------- endpoints

@pytest.mark.parametrize("mode", ["direct", "reason", "auto", "grounded", "grounded-direct"])
def test_search_returns_what_the_library_returns(url, searcher, mode):
    r = post(url, "/search", {"query": "  A device for PULLING corks ", "k": 5, "mode": mode})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"] == "a device for pulling corks"
    assert body["mode_used"] in (("direct", "reason") if mode == "auto" else (mode,))
    [expected] = searcher.search([body["query"]], k=5, mode=body["mode_used"])
    assert [i["item_id"] for i in body["items"]] == expected.item_ids
    assert [i["score"] for i in body["items"]] == pytest.approx([h.score for h in expected.hits], abs=1e-5)
    assert [i["title"] for i in body["items"]] == [searcher.index.title(i) for i in expected.item_ids]
    assert body["cot"] == expected.cot and (body["cot"] == "") == (body["mode_used"] in ("direct", "grounded-direct"))
    if mode.startswith("grounded"):  # a direct search first, then the grounded one: both timed
        assert body["timings_ms"]["direct"] > 0 and body["timings_ms"][mode] > 0
    assert body["timings_ms"]["total"] >= body["timings_ms"]["index"] >= 0


def test_min_score_drops_the_weaker_items(url):
    full = post(url, "/search", {"query": "a mug for coffee", "k": 8, "mode": "direct"}).json()["items"]
    cut = (full[2]["score"] + full[3]["score"]) / 2  # between the 3rd and 4th scores
    body = post(url, "/search", {"query": "a mug for coffee", "k": 8, "mode": "direct", "min_score": cut}).json()
    assert body["items"] == [it for it in full if it["score"] >= cut] and 0 < len(body["items"]) < len(full)
    again = post(url, "/search", {"query": "a mug for coffee", "k": 8, "mode": "direct"}).json()
    assert again["cached"] and again["items"] == full  # the cached list is whole
    assert post(url, "/search", {"query": "mug", "min_score": "high"}).status_code == 422


def test_offset_pages_through_one_ranking(url):
    whole = post(url, "/search", {"query": "a mug for coffee", "k": 9, "mode": "direct"}).json()["items"]
    pages = [post(url, "/search", {"query": "a mug for coffee", "k": 3, "offset": o, "mode": "direct"}).json()["items"]
             for o in (0, 3, 6)]
    assert [it for page in pages for it in page] == whole and len(whole) == 9
    past = post(url, "/search", {"query": "a mug for coffee", "k": 5, "offset": len(TITLES), "mode": "direct"})
    assert past.status_code == 200 and past.json()["items"] == []  # past the catalog's end: an empty page
    over = post(url, "/search", {"query": "mug", "k": 30, "offset": 30})
    assert over.status_code == 422 and "offset + k = 60" in over.json()["error"]["message"]
    assert post(url, "/search", {"query": "mug", "offset": -1}).status_code == 422


def test_openai_client(url, tiny):
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    items = client.embeddings.create(model="lrem-item", input=["mug", "teapot"])  # base64 on the wire
    assert [d.index for d in items.data] == [0, 1] and items.model == "lrem-item"
    np.testing.assert_allclose([d.embedding for d in items.data], tiny.encode_items(["mug", "teapot"]), atol=1e-4)
    assert items.usage.prompt_tokens > 0

    direct = client.embeddings.create(model="lrem-query-direct", input="A  Cup", encoding_format="float")
    np.testing.assert_allclose(direct.data[0].embedding, tiny.encode_queries(["a cup"], mode="direct").embeddings[0],
                               atol=1e-4)
    reason = client.embeddings.create(model="lrem-query-reason", input=["hot tea"], dimensions=tiny.dim)
    enc = tiny.encode_queries(["hot tea"], mode="reason")
    np.testing.assert_allclose(reason.data[0].embedding, enc.embeddings[0], atol=1e-4)
    assert reason.data[0].model_extra["cot"] == enc.cots[0]
    auto = client.embeddings.create(model="lrem-query-auto", input=["a", "b", "c"])
    assert len(auto.data) == 3 and all(len(d.embedding) == tiny.dim for d in auto.data)

    assert {m.id for m in client.models.list()} == {"lrem-query-reason", "lrem-query-direct", "lrem-query-auto",
                                                   "lrem-query-grounded", "lrem-query-grounded-direct", "lrem-item"}
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.embeddings.create(model="text-embedding-3-small", input="mug")
    with pytest.raises(openai.UnprocessableEntityError, match="max_inputs"):
        client.embeddings.create(model="lrem-item", input=["mug"] * 9)
    with pytest.raises(openai.BadRequestError, match=f"dimensions={tiny.dim + 1}; this model gives 1 to {tiny.dim}"):
        client.embeddings.create(model="lrem-item", input="mug", dimensions=tiny.dim + 1)


def test_rerank_scores_candidates_by_the_embeddings_cosines(url, tiny, searcher):
    """TEI's /rerank: texts embedded as items, or the index's items by id (their stored vectors:
    the same scores for the same titles), ranked by cosine with the query in the asked mode."""
    texts = ["teapot", "floor lamp", "coffee, java", "mug"]
    r = post(url, "/rerank", {"query": "Hot  TEA", "texts": texts, "mode": "direct", "return_text": True})
    assert r.status_code == 200, r.text
    got = r.json()
    q = tiny.encode_queries(["hot tea"], mode="direct").embeddings[0]
    cos = tiny.encode_items(texts) @ q
    assert [h["index"] for h in got] == list(np.argsort(-cos, kind="stable"))
    assert [h["score"] for h in got] == pytest.approx(sorted(cos, reverse=True), abs=1e-4)
    assert [h["text"] for h in got] == [texts[h["index"]] for h in got]
    ids = ["i1", "i7", "i2", "i3"]  # the same four titles, as served items
    assert [searcher.index.title(i) for i in ids] == texts
    by_id = post(url, "/rerank", {"query": "hot tea", "item_ids": ids, "mode": "direct"}).json()
    assert [(h["index"], "text" in h) for h in by_id] == [(h["index"], False) for h in got]
    assert [h["score"] for h in by_id] == pytest.approx([h["score"] for h in got], abs=1e-4)
    assert post(url, "/rerank", {"query": "hot tea", "item_ids": ids, "return_text": True}).json()[0]["text"] in texts

    # Cohere's / Jina's shape: the query model picks the mode; top_n; documents as texts or {text}
    v1 = post(url, "/v1/rerank", {"model": "lrem-query-reason", "query": "hot tea", "top_n": 2,
                                   "documents": ["teapot", {"text": "floor lamp"}, "coffee, java", "mug"]}).json()
    enc = tiny.encode_queries(["hot tea"], mode="reason")
    cos = tiny.encode_items(texts) @ enc.embeddings[0]
    best = list(np.argsort(-cos, kind="stable")[:2])
    assert [x["index"] for x in v1["results"]] == best and v1["mode_used"] == "reason" and v1["cot"] == enc.cots[0]
    assert [x["relevance_score"] for x in v1["results"]] == pytest.approx(cos[best], abs=1e-4)
    assert [x["document"]["text"] for x in v1["results"]] == [texts[i] for i in best]
    assert v1["model"] == "lrem-query-reason" and v1["usage"]["total_tokens"] > 0
    plain = post(url, "/v1/rerank", {"query": "hot tea", "documents": texts, "return_documents": False}).json()
    assert len(plain["results"]) == 4 and "document" not in plain["results"][0]
    assert plain["model"] == "lrem-query-auto" and plain["mode_used"] in ("direct", "reason")
    # what vLLM's and TEI's clients send: top_n 0 (all), documents with other keys, truncate null; long texts
    info = httpx.get(url + "/info").json()["cache"]["entries"]
    long = "a very long product description " * 40  # > max_query_chars, < max_item_chars: the token limit cuts it
    r = post(url, "/v1/rerank", {"query": "hot tea", "top_n": 0, "documents": [{"text": "mug", "id": 3}, long],
                                 "truncate": True})
    assert r.status_code == 200 and len(r.json()["results"]) == 2, r.text
    r = post(url, "/rerank", {"query": "hot tea", "texts": ["mug", "kettle"], "truncate": None,
                              "truncation_direction": "right", "raw_scores": True})
    assert r.status_code == 200 and -1.0 <= r.json()[0]["score"] <= 1.0, r.text
    assert post(url, "/v1/embeddings", {"model": "lrem-item", "input": ["an item never seen"]}).status_code == 200
    assert httpx.get(url + "/info").json()["cache"]["entries"] == info  # items do not crowd out the queries

    for path, body, status, message in [
            ("/rerank", {"query": "tea", "texts": ["mug"], "item_ids": ["i1"]}, 422, "one of the two"),
            ("/rerank", {"query": "tea"}, 422, "one of the two"),
            ("/rerank", {"query": "tea", "item_ids": ["i1", "nope"]}, 422, "'nope' is not in the index"),
            ("/rerank", {"query": "tea", "texts": ["mug"] * 9}, 422, "max_inputs"),
            ("/rerank", {"query": "tea", "texts": ["mug", ""]}, 422, "texts[1] is empty"),
            ("/rerank", {"query": "tea", "texts": ["mug"], "truncation_direction": "Left"}, 422, "Right) only"),
            ("/rerank", {"query": "tea", "texts": ["a long text " * 100]}, 422, "send truncate=true"),
            ("/v1/rerank", {"query": "tea", "documents": ["mug"], "model": "lrem-item"}, 404, "does not rank"),
            ("/v1/rerank", {"query": "tea", "documents": [{"title": "mug"}]}, 422, "documents[0]")]:
        r = post(url, path, body)
        assert r.status_code == status and message in r.json()["detail"], (body, r.text)
    counted = httpx.get(url + "/metrics").text  # each path its own label
    assert metric(counted, "lrem_http_requests_total", path="/rerank", status="200") >= 3
    assert metric(counted, "lrem_http_requests_total", path="/v1/rerank", status="404") >= 1


def test_grounded_embeddings_are_the_grounded_searchs(url, searcher):
    """/v1/embeddings of a grounded query model: the embedding `/search` found its items with
    (the served index's top titles in the prompt), with its CoT."""
    for name, mode in (("lrem-query-grounded", "grounded"), ("lrem-query-grounded-direct", "grounded-direct")):
        r = post(url, "/v1/embeddings", {"model": name, "input": ["a cup", "hot tea"]})
        assert r.status_code == 200, r.text
        got = r.json()["data"]
        first = searcher.candidates(["a cup", "hot tea"])
        enc = searcher.model.encode_queries(["a cup", "hot tea"], mode="reason" if mode == "grounded" else "direct",
                                            candidates=first)
        assert [d["cot"] for d in got] == enc.cots
        np.testing.assert_allclose([d["embedding"] for d in got], enc.embeddings, atol=1e-5)


@pytest.mark.parametrize("model", ["lrem-item", "lrem-query-reason", "lrem-query-direct"])
def test_embeddings_dimensions_are_the_renormalised_prefix(url, tiny, model):
    full = np.array([row["embedding"] for row in post(url, "/v1/embeddings", {
        "model": model, "input": ["mug", "hot tea"]}).json()["data"]])
    assert np.linalg.norm(full, axis=1) == pytest.approx([1.0, 1.0], abs=1e-4)
    for d in (1, 5, tiny.dim - 1, tiny.dim):
        r = post(url, "/v1/embeddings", {"model": model, "input": ["mug", "hot tea"], "dimensions": d})
        assert r.status_code == 200, r.text
        got = np.array([row["embedding"] for row in r.json()["data"]])
        assert got.shape == (2, d)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        prefix = full[:, :d] / np.linalg.norm(full[:, :d], axis=1, keepdims=True)
        np.testing.assert_allclose(got, prefix, atol=1e-5)  # at d=1: the sign of the first value
    # base64 (what the openai client asks for) carries the same shortened vectors
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    short = client.embeddings.create(model=model, input=["mug", "hot tea"], dimensions=5)
    np.testing.assert_allclose([e.embedding for e in short.data], full[:, :5] / np.linalg.norm(
        full[:, :5], axis=1, keepdims=True), atol=1e-5)
    raw = post(url, "/v1/embeddings", {"model": model, "input": "mug", "dimensions": 3, "encoding_format": "base64"})
    assert np.frombuffer(base64.b64decode(raw.json()["data"][0]["embedding"]), "<f4").shape == (3,)


@pytest.mark.parametrize("dimensions", [0, -1, 65, 10_000])
def test_embeddings_dimensions_out_of_range_is_a_400_with_the_range(url, tiny, dimensions):
    r = post(url, "/v1/embeddings", {"model": "lrem-item", "input": "mug", "dimensions": dimensions})
    assert r.status_code == 400, r.text
    assert r.json()["detail"] == f"dimensions={dimensions}; this model gives 1 to {tiny.dim} (its full size)"
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_models_list_the_model_card_facts(searcher, tmp_path):
    stage = {"stage": "coldstart", "steps": 7, "examples": 42, "data": "runs/triplets.jsonl", "batch_size": 8,
             "learning_rate": 2e-5}
    searcher.model.save_pretrained(tmp_path / "m", stage=stage)
    trained = LREM.from_pretrained(str(tmp_path / "m"), dtype="float32")
    trained.save_pretrained(tmp_path / "m2", stage={"stage": "rl", "steps": 3})
    trained = LREM.from_pretrained(str(tmp_path / "m2"), dtype="float32")
    index = ItemIndex.build(trained, {f"i{j}": t for j, t in enumerate(TITLES[:4])}, show_progress=False)
    with background_server(create_app(Searcher(trained, index))) as base:
        r = httpx.get(base + "/v1/models")
        assert r.status_code == 200, r.text
        entries = {m["id"]: m for m in r.json()["data"]}
        listed = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0).models.list()
    assert [m.id for m in listed] == list(entries)
    assert {m: (e["mode"], e["input"]) for m, e in entries.items()} == {
        "lrem-query-reason": ("reason", "query"), "lrem-query-direct": ("direct", "query"),
        "lrem-query-auto": ("auto", "query"), "lrem-query-grounded": ("grounded", "query"),
        "lrem-query-grounded-direct": ("grounded-direct", "query"), "lrem-item": ("item", "item")}
    saved_at = int((tmp_path / "m2" / "lrem_config.json").stat().st_mtime)
    cfg = trained.config
    for e in entries.values():
        assert e["object"] == "model" and e["owned_by"] == "lrem" and e["created"] == saved_at
        assert e["dim"] == trained.dim and e["source"] == str(tmp_path / "m2")
        assert e["base_model"] == e["root"] == str(searcher.model.source)  # the backbone the stages started from
        assert e["training"] == [stage, {"stage": "rl", "steps": 3}] and e["training_steps"] == 10
        assert e["prompts"] == cfg.to_dict() and e["cot_max_tokens"] == cfg.cot_max_tokens
        assert e["max_model_len"] == (cfg.max_item_tokens if e["input"] == "item" else cfg.max_query_tokens)
        assert e["query_modes"] == ["reason", "direct"]
    assert listed.data[0].model_extra["training_steps"] == 10  # the openai client keeps the extra fields


def test_models_of_an_untrained_backbone(url, tiny):
    entries = httpx.get(url + "/v1/models").json()["data"]
    assert len(entries) == 6
    for e in entries:
        assert e["training"] == [] and e["training_steps"] == 0 and e["created"] == 0  # no lrem_config.json
        assert e["base_model"] == tiny.source and e["dim"] == tiny.dim


# ---------------------------------------------------------------- content types and docs

@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain",
                                          "text/plain; charset=utf-8", None])
def test_json_body_is_read_whatever_the_content_type(url, content_type):
    headers = {"content-type": content_type} if content_type else {}
    expected = post(url, "/search", {"query": "wine glass", "k": 3, "mode": "direct"}).json()
    r = httpx.post(url + "/search", content=b'{"query": "wine glass", "k": 3, "mode": "direct"}', headers=headers,
                   timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["items"] == expected["items"]
    r = httpx.post(url + "/v1/embeddings", content=b'{"model": "lrem-item", "input": ["mug"], "dimensions": 4}',
                   headers=headers, timeout=60)
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 4, r.text
    # a body that is not JSON is still refused, saying so
    r = httpx.post(url + "/search", content=b"query=mug&k=3", headers=headers, timeout=60)
    assert r.status_code == 422
    assert r.json()["detail"] == ("request body is not JSON (Expecting value at character 0); bodies are read as "
                                  "JSON whatever their content-type")


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
def test_readme_curl_example(url):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    serving = readme.split("\n## Serving\n", 1)[1]
    [line] = [ln for ln in serving.split("```", 2)[1].splitlines() if ln.startswith("curl ")]
    args = shlex.split(line.replace("localhost:8000", url))
    at = args.index("content-type: application/json")  # the README shows the header clients should send
    assert args[at - 1] == "-H"
    for cmd in (args, args[:at - 1] + args[at + 1:]):  # as written, and without it (curl says form encoding)
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        body = json.loads(p.stdout)
        assert body["query"] == "a drink stronger than tea" and len(body["items"]) == 5, p.stdout


HOSTS = re.compile(r"(?:https?:)?//[\w.:-]+")  # the host part of a URL (absolute or scheme-relative)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_nothing_from_other_hosts(url, page):
    check_docs_page(url, page)


def test_docs_load_without_the_api_key(searcher):
    """The API's description is open (as vLLM's): a browser sends no key for the page's schema
    and scripts; everything else still wants the key."""
    with background_server(create_app(searcher, ServeConfig(api_key="k3y"))) as base:
        for page in ("/docs", "/redoc"):
            check_docs_page(base, page)
        assert httpx.get(base + "/openapi.json").json()["info"]["title"] == "lrem"
        for path in ("/info", "/metrics", "/v1/models"):
            assert httpx.get(base + path).status_code == 401, path
        assert httpx.post(base + "/search", json={"query": "mug"}).status_code == 401


def check_docs_page(url: str, page: str) -> None:
    """The page and each asset it loads come from this server, with nothing from elsewhere."""
    r = httpx.get(url + page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert set(HOSTS.findall(html)) <= {url, url.removeprefix("http:")}, html  # this server's, if any
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert any(a.endswith(".js") for a in assets), html  # the page loads its UI from this server
    assert "/openapi.json" in html
    for asset in assets:
        assert asset.startswith("/"), asset  # a path on this server
        got = httpx.get(url + asset)
        assert got.status_code == 200 and len(got.content) > 1000, asset
        if asset.endswith(".css"):  # fonts or images: only data: URLs
            assert not re.search(r"@import|url\((?![\"']?data:)", got.text), asset
        if asset.endswith(".js"):
            assert not re.search(r"cdn\.jsdelivr|unpkg\.com|cdnjs|fonts\.googleapis", got.text), asset
    if page == "/docs":
        assert '"validatorUrl": null' in html  # no call to validator.swagger.io


def test_health_info_openapi_and_metrics(url, tiny):
    assert httpx.get(url + "/healthz").json() == httpx.get(url + "/health").json() == {"status": "ok"}
    info = httpx.get(url + "/info").json()
    assert info["dim"] == tiny.dim and info["items"] == len(TITLES)
    assert info["config"]["max_k"] == 50 and info["router"]["depth"] == 10
    schema = httpx.get(url + "/openapi.json").json()
    assert {"/search", "/v1/embeddings", "/v1/models", "/health", "/healthz", "/info", "/metrics"} <= set(schema["paths"])
    assert {"SearchRequest", "SearchResponse", "EmbeddingRequest", "EmbeddingResponse"} <= set(
        schema["components"]["schemas"])
    post(url, "/search", {"query": "kettle", "k": 3})
    r = httpx.get(url + "/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    for name in ("lrem_http_requests_total", "lrem_http_request_seconds_bucket", "lrem_batch_size_bucket",
                 "lrem_cache_hit_rate", "lrem_router_reason_share", "lrem_queue_depth"):
        assert name in r.text, name
    assert metric(r.text, "lrem_http_requests_total", path="/search", status="200") >= 1
    searched = [metric(r.text, "lrem_queries_total", endpoint="search", mode="auto", mode_used=m)
                for m in ("direct", "reason")]
    assert sum(searched) >= 1


def test_queries_are_counted_by_endpoint(searcher):
    """lrem_queries_total: a search, an embedding and a rerank each count under their own endpoint
    (an auto embedding routes through a search of the index, and is still an embedding)."""
    with background_server(create_app(searcher, ServeConfig())) as base:
        post(base, "/search", {"query": "a kettle", "k": 2, "mode": "direct"})
        for model in ("lrem-query-auto", "lrem-query-direct"):
            assert post(base, "/v1/embeddings", {"model": model, "input": ["a kettle"]}).status_code == 200
        assert post(base, "/rerank", {"query": "a kettle", "texts": ["teapot", "mug"]}).status_code == 200
        text = httpx.get(base + "/metrics").text

        def count(endpoint, mode):
            return sum(metric(text, "lrem_queries_total", endpoint=endpoint, mode=mode, mode_used=m)
                       for m in ("direct", "reason"))

        assert count("search", "direct") == 1 and count("search", "auto") == 0
        assert count("embeddings", "auto") == 1 and count("embeddings", "direct") == 1
        assert count("rerank", "auto") + count("rerank", "direct") + count("rerank", "reason") == 1


def test_what_other_clients_send_and_ask(url, tiny):
    """HEAD health checks, the openai client's models.retrieve, and an unset encoding_format sent
    as null (read as float)."""
    for path in ("/health", "/healthz"):
        r = httpx.head(url + path)
        assert r.status_code == 200 and r.content == b"", path
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    one = client.models.retrieve("lrem-item")
    assert one.id == "lrem-item" and one.model_extra["input"] == "item"
    assert one.model_dump() == [m for m in client.models.list().model_dump()["data"] if m["id"] == "lrem-item"][0]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("text-embedding-3-small")
    r = httpx.get(url + "/v1/models/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    r = post(url, "/v1/embeddings", {"model": "lrem-item", "input": "mug", "encoding_format": None})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["data"][0]["embedding"], tiny.encode_items(["mug"])[0], atol=1e-4)


def test_usage_and_truncation_count_what_the_model_embeds(url, tiny):
    """A cut input counts at most its side's token limit in `usage`; lrem_truncated_inputs counts
    a text once, where the model embeds it, not again for its cache hits and next pages."""
    cfg, long_item = tiny.config, "a very long product description " * 40
    assert tiny.token_counts([long_item])[0] > cfg.max_item_tokens
    r = post(url, "/v1/embeddings", {"model": "lrem-item", "input": [long_item, "mug"], "truncate": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == cfg.max_item_tokens + tiny.token_counts(["mug"])[0]
    r = post(url, "/v1/rerank", {"query": "Hot  TEA", "documents": [long_item, "mug"], "truncate": True,
                                 "model": "lrem-query-direct"})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["total_tokens"] == (tiny.token_counts(["hot tea"])[0] + cfg.max_item_tokens
                                                 + tiny.token_counts(["mug"])[0])

    long_query = "a1 " * 66  # within max_query_chars (200), over max_query_tokens
    assert tiny.token_counts([long_query.strip()])[0] > cfg.max_query_tokens
    before = httpx.get(url + "/metrics").text
    pages = [post(url, "/search", {"query": long_query, "k": 2, "offset": o, "mode": "direct"}) for o in (0, 0, 2)]
    assert [r.status_code for r in pages] == [200] * 3 and [r.json()["cached"] for r in pages] == [False, True, True]
    r = post(url, "/v1/embeddings", {"model": "lrem-query-direct", "input": long_query, "truncate": True})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == cfg.max_query_tokens, r.text
    after = httpx.get(url + "/metrics").text
    for side, n in (("query", 1), ("item", 0)):  # the query embedded once; no item since `before`
        assert metric(after, "lrem_truncated_inputs_total", side=side) - metric(
            before, "lrem_truncated_inputs_total", side=side) == n, side
    assert metric(after, "lrem_truncated_inputs_total", side="item") >= 2  # the two cut candidates above


# ---------------------------------------------------------------- bad input

BAD = [
    ("/search", b"", 422, "Field required"),
    ("/search", {}, 422, "query: Field required"),
    ("/search", {"query": ""}, 422, "empty"),
    ("/search", {"query": " \n\t "}, 422, "empty"),
    ("/search", {"query": "x" * 201}, 422, "max_query_chars"),
    ("/search", {"query": 5}, 422, "valid string"),
    ("/search", {"query": ["mug"]}, 422, "valid string"),
    ("/search", {"query": None}, 422, "valid string"),
    ("/search", {"query": "mug", "k": 0}, 422, "greater than or equal to 1"),
    ("/search", {"query": "mug", "k": "5"}, 422, "valid integer"),
    ("/search", {"query": "mug", "k": 5.5}, 422, "valid integer"),
    ("/search", {"query": "mug", "k": True}, 422, "valid integer"),
    ("/search", {"query": "mug", "k": 51}, 422, "max_k"),
    ("/search", {"query": "mug", "mode": "fast"}, 422, "'auto', 'reason', 'direct', 'grounded' or 'grounded-direct'"),
    ("/search", {"query": "mug", "querry": "mug"}, 422, "Extra inputs"),
    ("/search", [1, 2], 422, "valid dictionary"),
    ("/search", b'{"query": "caf\xe9"}', 422, "not valid UTF-8"),
    ("/search", b'{"query": "mug"', 422, "JSON"),
    ("/search", b"[" * 5000 + b"]" * 5000, 422, "nested too deep"),
    ("/search", b'{"query": "mug", "k": ' + b"9" * 5000 + b"}", 422, "a number is too long"),
    ("/search", b'{"query": "\\ud800"}', 422, "lone surrogate"),
    ("/search", b'{"query": "' + b"a" * 20_000 + b'"}', 413, "max_body_bytes"),
    ("/v1/embeddings", {"model": "lrem-item"}, 422, "input: Field required"),
    ("/v1/embeddings", {"input": "mug"}, 422, "model: Field required"),
    ("/v1/embeddings", {"input": [], "model": "lrem-item"}, 422, "max_inputs"),
    ("/v1/embeddings", {"input": [1, 2], "model": "lrem-item"}, 422, "token ids are not accepted"),
    ("/v1/embeddings", {"input": [[15339, 1917]], "model": "lrem-item"}, 422, "check_embedding_ctx_length=False"),
    ("/v1/embeddings", {"input": [1, "mug"], "model": "lrem-item"}, 422, "valid string"),
    ("/v1/embeddings", {"input": ["mug", " "], "model": "lrem-item"}, 422, "input[1] is empty"),
    ("/v1/embeddings", {"input": "x" * 201, "model": "lrem-query-direct"}, 422, "max_query_chars"),
    ("/v1/embeddings", {"input": "x" * 2001, "model": "lrem-item"}, 422, "the limit is 2000 (max_item_chars)"),
    ("/rerank", {"query": "mug", "texts": ["x" * 2001]}, 422, "the limit is 2000 (max_item_chars)"),
    ("/v1/embeddings", {"input": "mug", "model": "lrem-item", "encoding_format": "hex"}, 422, "'float' or 'base64'"),
]


@pytest.mark.parametrize("path,body,status,message", BAD, ids=[f"{p}-{i}" for i, (p, *_) in enumerate(BAD)])
def test_bad_request_gets_a_4xx_with_a_message(url, path, body, status, message):
    r = post(url, path, body)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]


def test_streamed_oversized_body_and_wrong_method(url):
    chunks = iter([b'{"query": "', b"a" * 10_000, b"a" * 10_000, b'"}'])  # chunked: no content-length
    r = httpx.post(url + "/search", content=chunks, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "max_body_bytes" in r.json()["detail"]
    assert httpx.get(url + "/search").status_code == 405


def test_server_keeps_serving_after_bad_requests(url):
    for path, body, *_ in BAD:
        post(url, path, body)
    assert httpx.get(url + "/healthz").json()["status"] == "ok"
    assert post(url, "/search", {"query": "mug", "k": 2}).status_code == 200
    text = httpx.get(url + "/metrics").text
    assert metric(text, "lrem_http_requests_total", path="/search", status="422") >= 15
    assert not re.search(r'lrem_http_requests_total\{[^}]*status="5\d\d"', text)  # no 5xx ever


def raw_request(path: str, body: bytes, declared: int | None = None) -> bytes:
    """An HTTP/1.1 POST as bytes; `declared`: a Content-Length other than the body's."""
    return (f"POST {path} HTTP/1.1\r\nHost: lrem\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body) if declared is None else declared}\r\n\r\n").encode() + body


def test_clients_that_hang_up_are_not_computed_and_count_as_499(searcher):
    """Reason-mode requests queued one text per model call; their clients close the connection
    after 0.3 s: the server stops those requests (499), the batcher drops their queued texts, and
    what the model did compute is cached all the same."""
    n = 48  # enough that the tiny model cannot answer them all before the 0.3 s (16 once did, ~15 ms each)
    with background_server(create_app(searcher, ServeConfig(max_batch=1))) as base:
        host, port = base.removeprefix("http://").split(":")

        async def hang_up(i: int) -> None:
            reader, writer = await asyncio.open_connection(host, int(port))
            body = json.dumps({"query": f"a gift idea number {i}", "k": 3, "mode": "reason"}).encode()
            writer.write(raw_request("/search", body))
            await asyncio.sleep(0.3)
            writer.close()

        async def run():
            await asyncio.gather(*(hang_up(i) for i in range(n)))

        asyncio.run(run())
        deadline = time.monotonic() + 60
        while True:  # the server hears each hang-up (or had answered) shortly after
            text = httpx.get(base + "/metrics", timeout=60).text
            left, answered = (metric(text, "lrem_http_requests_total", path="/search", status=s) for s in ("499", "200"))
            if left + answered == n or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert left + answered == n and left >= 1, (left, answered)
        r = post(base, "/search", {"query": "a lamp", "k": 3, "mode": "reason"})  # queued after them: they are done
        assert r.status_code == 200, r.text
        text = httpx.get(base + "/metrics").text
        computed = metric(text, "lrem_batch_size_sum", kind="reason") - 1  # less "a lamp"
        assert answered <= computed < n, (answered, computed)  # the texts of clients gone were mostly skipped
        assert httpx.get(base + "/info").json()["cache"]["entries"] == computed + 1  # a computed row kept, caller or not


def test_max_requests_is_a_503_that_spares_health_checks_and_metrics(searcher):
    """max_requests=1 with requests kept in progress (two clients posting reason batches of new
    texts): another gets a 503 in the error shape with Retry-After, /health and /metrics still
    answer, and once the load stops requests succeed again."""
    with background_server(create_app(searcher, ServeConfig(max_requests=1))) as base:
        stop, sent = threading.Event(), itertools.count()

        def busy():
            with httpx.Client(timeout=60) as client:
                while not stop.is_set():  # new texts each time: the cache must not answer them
                    client.post(base + "/v1/embeddings", json={"model": "lrem-query-reason",
                                                               "input": [f"a gift idea {next(sent)}" for _ in range(8)]})

        workers = [threading.Thread(target=busy) for _ in range(2)]
        for w in workers:
            w.start()
        try:
            deadline = time.monotonic() + 60
            while (r := post(base, "/search", {"query": "a lamp", "mode": "direct"})).status_code != 503:
                assert r.status_code == 200 and time.monotonic() < deadline, r.text
            assert "max_requests=1" in r.json()["error"]["message"] and r.headers["retry-after"] == "1"
            # monitoring sees the overload: a scrape refused by it would read as the server down
            text = httpx.get(base + "/metrics").text
            assert metric(text, "lrem_http_requests_total", path="/search", status="503") >= 1
            for path in ("/health", "/healthz"):
                assert httpx.get(base + path).status_code == 200 and httpx.head(base + path).status_code == 200
        finally:
            stop.set()
            for w in workers:
                w.join()
        assert post(base, "/search", {"query": "a lamp", "mode": "direct"}).status_code == 200


def test_a_client_still_sending_its_body_holds_no_request_slot(searcher):
    """max_requests=1 and a client that has sent half its body: other requests are served (it
    holds a connection, not one of the requests in progress), and it is answered once the rest
    arrives."""
    with background_server(create_app(searcher, ServeConfig(max_requests=1))) as base:
        body = json.dumps({"query": "a mug", "k": 2, "mode": "direct"}).encode()
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as held:
            held.sendall(raw_request("/search", body[:5], declared=len(body)))
            time.sleep(0.3)  # its headers and first bytes are in
            for q in ("a lamp", "a teapot", "a sofa"):
                r = post(base, "/search", {"query": q, "k": 2, "mode": "direct"})
                assert r.status_code == 200, r.text
            assert httpx.get(base + "/info").status_code == 200
            held.sendall(body[5:])
            assert held.recv(65536).startswith(b"HTTP/1.1 200")


def test_a_forwarded_client_is_not_local(url):
    """A proxy on this machine that names the real client in X-Forwarded-For: /admin/reload
    without a key is refused to it (uvicorn's proxy_headers, trusted from 127.0.0.1)."""
    r = httpx.post(url + "/admin/reload", json={}, headers={"X-Forwarded-For": "203.0.113.9"})
    assert r.status_code == 403 and "only this machine's clients" in r.json()["detail"]
    assert httpx.post(url + "/admin/reload", json={}).status_code == 409  # loopback itself: allowed (no folder here)


def test_timeout_is_a_503_and_the_server_recovers(searcher):
    cfg = ServeConfig(request_timeout_s=0.001, max_wait_ms=50)
    with background_server(create_app(searcher, cfg)) as base:
        r = post(base, "/search", {"query": "a slow query", "mode": "reason"})
        assert r.status_code == 503 and "request_timeout_s" in r.json()["detail"]
        assert httpx.get(base + "/healthz").status_code == 200


# ---------------------------------------------------------------- batching and cache

def test_concurrent_clients_are_batched_and_get_their_own_results(url, searcher):
    queries = [f"something for the {room} number {i}" for i, room in
               enumerate(["kitchen", "bedroom", "office", "hall"] * 8)]  # 32 distinct queries
    expected = searcher.search(queries, k=5, mode="direct")

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            direct = [client.post("/search", json={"query": q, "k": 5, "mode": "direct"}) for q in queries]
            reason = [client.post("/search", json={"query": f"gift idea {i}", "k": 5, "mode": "reason"})
                      for i in range(8)]
            return await asyncio.gather(*direct, *reason)

    before = httpx.get(url + "/metrics").text
    responses = asyncio.run(asyncio.wait_for(run(), timeout=120))
    assert [r.status_code for r in responses] == [200] * 40
    for r, q, e in zip(responses, queries, expected):
        body = r.json()
        assert body["query"] == q and body["mode_used"] == "direct"
        assert [i["score"] for i in body["items"]] == pytest.approx([h.score for h in e.hits], abs=1e-4)
    assert all(r.json()["mode_used"] == "reason" for r in responses[32:])
    after = httpx.get(url + "/metrics").text
    for kind, n in (("direct", 32), ("reason", 8)):
        texts = metric(after, "lrem_batch_size_sum", kind=kind) - metric(before, "lrem_batch_size_sum", kind=kind)
        calls = metric(after, "lrem_batch_size_count", kind=kind) - metric(before, "lrem_batch_size_count", kind=kind)
        assert texts == n and calls < n, (kind, texts, calls)  # fewer model calls than texts: batches > 1


def test_cache_hits_and_persists_across_restarts(searcher, tmp_path):
    cfg = ServeConfig(cache_path=str(tmp_path / "cache.npz"), cache_size=100)
    with background_server(create_app(searcher, cfg)) as base:
        first = post(base, "/search", {"query": "Wine Glass", "k": 3, "mode": "reason"}).json()
        again = post(base, "/search", {"query": "  wine   glass", "k": 3, "mode": "reason"}).json()
        assert (first["cached"], again["cached"]) == (False, True)
        assert again["items"] == first["items"] and again["cot"] == first["cot"]
        assert metric(httpx.get(base + "/metrics").text, "lrem_cache_hit_rate") == pytest.approx(0.5)
    assert (tmp_path / "cache.npz").exists()
    with background_server(create_app(searcher, cfg)) as base:
        assert httpx.get(base + "/info").json()["cache"]["entries"] == 1
        warm = post(base, "/search", {"query": "wine glass", "k": 3, "mode": "reason"}).json()
        assert warm["cached"] is True and warm["items"] == first["items"]


def test_batcher_groups_by_kind_and_isolates_a_failing_text():
    calls = []

    def encode(kind, texts):  # stands in for the model: fails on any batch holding "bad"
        calls.append((kind, sorted(texts)))
        if "bad" in texts:
            raise ValueError("cannot embed 'bad'")
        return [f"{kind}:{t}" for t in texts], np.array([[len(t)] for t in texts], dtype=np.float32)

    async def run():
        batcher = Batcher(encode, max_batch=16, max_wait_ms=50, max_queue=100)
        batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(kind, text) for kind, text in
                                          [("direct", "a"), ("direct", "bb"), ("reason", "a"), ("direct", "bad"),
                                           ("direct", "a")]), return_exceptions=True)
        finally:
            await batcher.stop()

    a, bb, reason_a, bad, a_again = asyncio.run(run())
    assert a[0] == "direct:a" and a[1].tolist() == [1.0] and a_again[0] == "direct:a"
    assert bb[0] == "direct:bb" and bb[1].tolist() == [2.0] and reason_a[0] == "reason:a"
    assert isinstance(bad, ValueError)
    # one batch per kind ("a" once), then the failed direct batch retried text by text
    assert calls[0] == ("direct", ["a", "bad", "bb"]) and ("reason", ["a"]) in calls
    assert ("direct", ["a"]) in calls and ("direct", ["bb"]) in calls and ("direct", ["bad"]) in calls


def test_batcher_waits_for_company_only_after_a_batch_of_several_texts():
    """A lone text after a batch of one (no load) runs at once; after a batch of several (load),
    the next call waits up to max_wait for others: a text that arrives 0.3 s later joins it."""
    calls = []

    def encode(kind, texts):
        calls.append(sorted(texts))
        return [""] * len(texts), np.zeros((len(texts), 1), dtype=np.float32)

    async def lone_then_late(batcher, first, second):
        task = asyncio.ensure_future(batcher.submit("direct", first))
        await asyncio.sleep(0.3)
        await asyncio.gather(task, batcher.submit("direct", second))

    async def run():
        batcher = Batcher(encode, max_batch=2, max_wait_ms=5000, max_queue=100)
        batcher.start()
        try:
            await lone_then_late(batcher, "a", "b")  # idle: "a" runs alone, then "b" alone
            await asyncio.gather(batcher.submit("direct", "c"), batcher.submit("direct", "d"))  # a call of two
            await lone_then_late(batcher, "e", "f")  # under load: "e" waits, and "f" joins it
        finally:
            await batcher.stop()

    asyncio.run(run())
    assert calls[:2] == [["a"], ["b"]] and ["c", "d"] in calls and calls[-1] == ["e", "f"]


def test_cache_is_a_bounded_lru_and_ignores_another_models_file(tmp_path):
    cache = EmbeddingCache(max_entries=2)
    vec = lambda x: np.full(4, x, dtype=np.float32)  # noqa: E731
    cache.put(("direct", "a"), ("", vec(1)))
    cache.put(("direct", "b"), ("", vec(2)))
    assert cache.get(("direct", "a")) is not None  # "a" is now the most recent
    cache.put(("reason", "c"), ("cot c", vec(3)))
    assert cache.get(("direct", "b")) is None and len(cache) == 2 and cache.hit_rate == 0.5
    cache.save(tmp_path / "c.npz", "model-1")
    fresh = EmbeddingCache(10)
    assert fresh.load(tmp_path / "c.npz", "model-2") == 0 and len(fresh) == 0
    assert fresh.load(tmp_path / "c.npz", "model-1") == 2
    cot, emb = fresh.get(("reason", "c"))
    assert cot == "cot c" and emb.tolist() == [3.0] * 4


# ---------------------------------------------------------------- config and CLI

def test_config_from_yaml_sets_and_flags(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("max_batch: 4\nrouter_share: 0.3\nport: 8100\n")
    cfg = ServeConfig.from_yaml(path, sets=["max_wait_ms=2.5", "cache_path="], port=9001, host=None)
    assert (cfg.max_batch, cfg.router_share, cfg.max_wait_ms, cfg.port, cfg.host) == (4, 0.3, 2.5, 9001, "127.0.0.1")
    assert cfg.router().share == 0.3
    for bad, match in ((["max_bacth=4"], "^--set max_bacth=...: unknown key 'max_bacth'"),
                       (["max_batch=four"], "^--set max_batch=...: key 'max_batch': expected int"),
                       (["max_batch=0"], "^--set max_batch=...: .*>= 1"), (["router_share=2"], "share"),
                       (["port"], "KEY=VALUE")):
        with pytest.raises(ValueError, match=match):
            ServeConfig.from_yaml(sets=bad)
    with pytest.raises(ValueError, match="^--port: port=70000"):  # the option, not "flag"
        ServeConfig.from_yaml(port=70000)
    assert normalize_query("Ｍug\u3000 CUP ") == "mug cup"


def test_doctests():
    import doctest

    import lrem._text
    import lrem.serve

    results = [doctest.testmod(lrem.serve), doctest.testmod(lrem._text)]  # _text: normalize_query, the cache key
    assert sum(r.attempted for r in results) >= 4 and not any(r.failed for r in results)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lrem_serve(index, *args) -> tuple[subprocess.Popen, str]:
    """`lrem serve --index index *args` in a new process on a free port, once /healthz answers:
    (the process, its base URL); stdout and stderr on one pipe."""
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lrem.cli", "serve", "--index", str(index), "--port", str(port),
                             *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read().decode())
        try:
            assert httpx.get(base + "/healthz", timeout=2).json() == {"status": "ok"}
            return proc, base
        except httpx.TransportError:
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError("lrem serve did not come up in 120 s") from None
            time.sleep(0.5)


def test_lrem_serve_command(searcher, tmp_path):
    searcher.index.save(tmp_path / "idx")
    cache = tmp_path / "cache.npz"
    proc, base = _lrem_serve(tmp_path / "idx", "--set", "max_batch=4", "--set", f"cache_path={cache}")
    try:
        info = httpx.get(base + "/info", timeout=10).json()
        assert info["config"]["max_batch"] == 4 and info["items"] == len(TITLES)
        r = post(base, "/search", {"query": "mug", "k": 2, "mode": "direct"})
        assert r.status_code == 200 and len(r.json()["items"]) == 2
        # the index file overwritten in place (what cp does): the copy in memory serves on, and a
        # reload reads the broken file and refuses it
        (tmp_path / "idx" / "index.faiss").write_bytes(b"not an index")
        r = post(base, "/search", {"query": "a teapot", "k": 2, "mode": "direct"})
        assert r.status_code == 200 and len(r.json()["items"]) == 2, r.text
        r = post(base, "/admin/reload", {})
        assert r.status_code == 409 and "index.faiss" in r.json()["detail"], r.text
        assert post(base, "/search", {"query": "a mug", "k": 2, "mode": "direct"}).status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 0, out
    assert cache.exists()  # written at shutdown


def test_lrem_serve_says_where_a_fatal_signal_struck(searcher, tmp_path):
    """A fatal signal (SIGBUS: a memory-mapped index file truncated under the server) kills the
    process, but faulthandler first writes every thread's Python stack to stderr, so the log says
    where instead of ending silently."""
    searcher.index.save(tmp_path / "idx")
    proc, _ = _lrem_serve(tmp_path / "idx", "--set", "mmap_index=true")
    proc.send_signal(signal.SIGBUS)
    out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == -signal.SIGBUS, out
    assert "Fatal Python error: Bus error" in out and 'File "' in out, out


# ---------------------------------------------------------------- the real default model

@pytest.mark.slow
def test_real_model_reasons_over_http(real_model):
    titles = {f"i{j}": t for j, t in enumerate(TITLES[:6])}
    searcher = Searcher(real_model, ItemIndex.build(real_model, titles, show_progress=False))
    with background_server(create_app(searcher, ServeConfig())) as base:
        body = post(base, "/search", {"query": "a device for pulling corks", "k": 3, "mode": "reason"}).json()
        assert body["mode_used"] == "reason" and body["cot"].strip() and len(body["items"]) == 3
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
        emb = client.embeddings.create(model="lrem-query-direct", input="corkscrew").data[0].embedding
        assert len(emb) == 576 and abs(np.linalg.norm(emb) - 1.0) < 1e-3


def test_reload_serves_an_updated_index_and_refuses_another_models(tiny, lively_dir, tmp_path):
    folder = tmp_path / "idx"
    catalog = {f"i{j}": t for j, t in enumerate(TITLES)}
    ItemIndex.build(tiny, catalog, show_progress=False).save(folder)
    searcher = Searcher.load(folder, model=tiny)
    with background_server(create_app(searcher, ServeConfig(hybrid=True))) as url:
        def top(query: str, **extra) -> list[str]:
            r = post(url, "/search", {"query": query, "k": 3, "mode": "direct", **extra})
            assert r.status_code == 200, r.text
            return [i["item_id"] for i in r.json()["items"]]

        assert "n1" not in top("egg timer", hybrid=True, lexical_weight=10.0)
        # what `lrem index --update` does: the folder replaced by the updated index
        new_catalog = {**{k: v for k, v in catalog.items() if k != "i0"}, "n1": "egg timer"}
        ItemIndex.load(folder).updated(tiny, new_catalog, show_progress=False)[0].save(folder)
        r = post(url, "/admin/reload", {})
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["items"], body["previous_items"]) == (20, 20)
        assert body["last_update"]["added"] == 1 and body["last_update"]["removed"] == 1
        assert top("egg timer", hybrid=True, lexical_weight=10.0)[0] == "n1"  # BM25 rebuilt over the new titles
        assert "i0" not in top("corkscrew, bottle screw")
        assert httpx.get(url + "/info", timeout=60).json()["items"] == 20
        # an index of other weights is refused; the server keeps serving the one it had
        other = LREM.from_pretrained(str(lively_dir("llama")), dtype="float32")
        ItemIndex.build(other, catalog, show_progress=False).save(folder)
        r = post(url, "/admin/reload", {})
        assert r.status_code == 409 and "other weights" in r.json()["detail"]
        assert top("egg timer", hybrid=True, lexical_weight=10.0)[0] == "n1"


def this_machines_address() -> str | None:
    """An address of this machine other than loopback (None where it has none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # a UDP "connect" sends nothing: it picks the outgoing interface
            return s.getsockname()[0]
        except OSError:
            return None


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
@pytest.mark.parametrize("mmap_index", [False, True])
def test_mmap_index_maps_the_index_file_at_start_and_reload(tiny, tmp_path, mmap_index):
    folder = tmp_path / "idx"
    index = ItemIndex.build(tiny, {f"i{j}": t for j, t in enumerate(TITLES)}, show_progress=False)
    index.save(folder)
    file = str(folder / "index.faiss")

    def mapped() -> bool:  # a mapping of the file now in the folder (one replaced since ends "(deleted)")
        return any(line.endswith(file) for line in Path("/proc/self/maps").read_text().splitlines())

    cfg = ServeConfig(mmap_index=mmap_index)
    searcher = load_searcher(folder, cfg, log=lambda *_: None)
    assert searcher.model.source == tiny.source and mapped() == mmap_index
    index.save(folder)  # replaced by rename, as lrem index does
    assert not mapped()
    with background_server(create_app(searcher, cfg)) as base:
        assert post(base, "/admin/reload", {}).status_code == 200
        assert mapped() == mmap_index
        assert post(base, "/search", {"query": "a mug", "mode": "direct"}).status_code == 200


def test_reload_without_a_key_answers_loopback_clients_only(tiny, tmp_path):
    ip = this_machines_address()
    if ip is None or ip.startswith("127."):
        pytest.skip("this machine has no address besides loopback")
    ItemIndex.build(tiny, {f"i{j}": t for j, t in enumerate(TITLES)}, show_progress=False).save(tmp_path / "idx")
    searcher = Searcher.load(tmp_path / "idx", model=tiny)
    for key, status in (("", 403), ("k3y", 200)):
        with background_server(create_app(searcher, ServeConfig(api_key=key)), host=ip) as url:
            headers = {"Authorization": "Bearer k3y"} if key else {}
            r = httpx.post(url + "/admin/reload", json={}, headers=headers, timeout=60)  # from `ip`, not loopback
            assert r.status_code == status, r.text
            if status == 403:
                assert "only this machine's clients" in r.json()["detail"]
                assert httpx.post(url + "/search", json={"query": "a mug", "mode": "direct"}, timeout=60).status_code == 200


def test_query_log_rows_rotate_and_replay(tiny, tmp_path):
    """`query_log`: one JSON line per answered /search, written by a thread, rotated by size; the
    file is a queries file for `lrem search --from-file`."""
    from lrem.bulk import read_queries

    ItemIndex.build(tiny, {f"i{j}": t for j, t in enumerate(TITLES)}, show_progress=False).save(tmp_path / "idx")
    searcher = Searcher.load(tmp_path / "idx", model=tiny)
    log = tmp_path / "logs" / "queries.jsonl"
    cfg = ServeConfig(query_log=str(log), hybrid=True)
    with background_server(create_app(searcher, cfg)) as url:
        answers = [post(url, "/search", body).json() for body in
                   ({"query": "a mug", "mode": "direct", "k": 3, "min_score": -1.0},
                    {"query": "a lamp", "mode": "reason", "k": 2},
                    {"query": "a rug", "mode": "direct", "hybrid": True, "lexical_weight": 2.5})]
        assert post(url, "/search", {"query": "", "mode": "direct"}).status_code == 422  # refused: not logged
    rows = [json.loads(line) for line in log.read_text().splitlines()]  # the server stopped: all written
    assert [r["query"] for r in rows] == ["a mug", "a lamp", "a rug"]
    assert [r["mode_used"] for r in rows] == ["direct", "reason", "direct"] and rows[2]["hybrid"] is True
    # what a replay needs to answer the same: hybrid's weight and the score floor
    assert [(r["lexical_weight"], r["min_score"]) for r in rows] == [(1.0, -1.0), (1.0, None), (2.5, None)]
    assert rows[1]["cot"] == answers[1]["cot"] and rows[1]["k"] == 2
    assert rows[0]["items"] == [[i["item_id"], round(i["score"], 6)] for i in answers[0]["items"]]
    assert rows[0]["time"].endswith("Z") and rows[0]["ms"] > 0
    assert read_queries(log) == [("1", "a mug"), ("2", "a lamp"), ("3", "a rug")]  # replayable

    small = ServeConfig(query_log=str(log), query_log_max_mb=400 / 2**20, query_log_backups=2)  # ~400 bytes a file
    with background_server(create_app(searcher, small)) as url:
        for n in range(12):
            assert post(url, "/search", {"query": f"a mug {n}", "mode": "direct", "k": 1}).status_code == 200
    assert sorted(p.name for p in log.parent.iterdir()) == ["queries.jsonl", "queries.jsonl.1", "queries.jsonl.2"]
    assert json.loads(log.read_text().splitlines()[-1])["query"] == "a mug 11"
    assert [t for _, t in read_queries(log.parent / "queries.jsonl.1")][0].startswith("a mug")  # rotated: still rows


def test_a_warmed_cache_answers_head_queries_without_the_model(tiny, lively_dir, tmp_path):
    """`lrem cache` (`warm_cache`): the head queries' CoTs and embeddings computed offline, keyed as
    the server keys them; the server loads the file and answers those from it."""
    from lrem.serve_service import warm_cache

    ItemIndex.build(tiny, {f"i{j}": t for j, t in enumerate(TITLES)}, show_progress=False).save(tmp_path / "idx")
    searcher = Searcher.load(tmp_path / "idx", model=tiny)
    path = tmp_path / "head.npz"
    info = warm_cache(searcher, ["A Mug", "a  lamp", "a mug"], path, batch_size=2, show_progress=False)
    assert info == {"queries": 2, "computed": 4, "resumed": 0, "entries": 4}  # "A Mug" and "a mug" are one key
    again = warm_cache(searcher, ["a mug", "a lamp", "a rug"], path, show_progress=False)  # resumes: 2 new entries
    assert (again["computed"], again["resumed"], again["entries"]) == (2, 4, 6)
    with background_server(create_app(searcher, ServeConfig(cache_path=str(path)))) as url:
        warm = post(url, "/search", {"query": "A MUG", "mode": "reason", "k": 3}).json()
        cold = post(url, "/search", {"query": "a sofa", "mode": "reason", "k": 3}).json()
    assert warm["cached"] is True and cold["cached"] is False
    assert warm["items"] == post_free_search(searcher, "a mug")
    other = Searcher.load(tmp_path / "idx", model=LREM.from_pretrained(str(lively_dir("llama")), dtype="float32"))
    with pytest.raises(ValueError, match="another model: pass another path"):
        warm_cache(other, ["a mug"], tmp_path / "head.npz", show_progress=False)


def post_free_search(searcher, query: str) -> list[dict]:
    """What the server answers for `query` in reason mode, computed here without it."""
    [r] = searcher.search([query], k=3, mode="reason")
    return [{"item_id": h.item_id, "title": searcher.index.title(h.item_id), "score": pytest.approx(h.score, abs=1e-5)}
            for h in r.hits]


def test_the_example_serve_config_loads_and_holds_the_defaults():
    """configs/serve.yaml (the README's --config example) is a valid ServeConfig at its defaults."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "serve.yaml"
    loaded, default = ServeConfig.from_yaml(path), ServeConfig()
    assert loaded == default and "max_batch: 32" in path.read_text()


def test_a_query_cache_belongs_to_the_weights_and_prompts_not_a_path(searcher, tiny_dir, tmp_path):
    """The same weights loaded from another folder (an index rebuilt elsewhere, a reload) keep
    their cache file; other weights or other prompts do not."""
    import shutil

    import torch

    from lrem.model import LREM
    from lrem.serve_service import cache_model_id

    shutil.copytree(tiny_dir, tmp_path / "copy")
    same = LREM.from_pretrained(str(tmp_path / "copy"), dtype="float32")
    assert cache_model_id(Searcher(same, searcher.index)) == cache_model_id(searcher)
    same.config.query_instruction = "Find the product."
    assert cache_model_id(Searcher(same, searcher.index)) != cache_model_id(searcher)
    other = LREM.from_pretrained(str(tmp_path / "copy"), dtype="float32")
    with torch.no_grad():
        next(m for m in other.lm.modules() if isinstance(m, torch.nn.Linear)).weight[0] += 0.5
    assert cache_model_id(Searcher(other, searcher.index)) != cache_model_id(searcher)
