"""`lrem construct`: post-processing rules, gain sets on real indexes (BM25, FAISS), the funnel
with each teacher kind, config checks, and a resume after SIGKILL through the real CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_teachers import OpenAIStandIn, completion, dead_url
from typer.testing import CliRunner

from lrem.baselines import BM25Retriever
from lrem.construct import (ConstructConfig, construct, cot_query, drop_banned, drop_duplicates, drop_in_query,
                            drop_long, gain_set, pick_hint, postprocess, split_phrases, truncate_tokens)
from lrem.data import Dataset, Item, Query, save_dataset

QUIET = dict(log=lambda *a: None, show_progress=False)

# ---------------------------------------------------------------- a small shop

CATALOG = {"tea1": "black tea", "tea2": "green tea", "tea3": "tea cup", "cof1": "coffee beans",
           "cof2": "espresso machine", "cof3": "instant coffee", "hose": "garden hose", "rake": "garden rake",
           "spade": "spade, shovel", "flask": "vacuum flask", "therm": "thermos bottle", "mug": "ceramic mug"}
QUERIES = {"q_tea": ("a drink stronger than tea", ["cof1", "cof2", "cof3"]),
           "q_easy": ("green tea", ["tea2"]),
           "q_echo": ("something that keeps soup hot", ["flask"]),
           "q_missing": ("watering the lawn", ["hose"]),
           "q_nogain": ("hot beverage container", ["mug"]),
           "q_irrelevant": ("a tool for digging", ["spade"])}
FILE_COTS = {"q_tea": "Coffee, espresso, coffee, tea", "q_echo": "soup, Soup, products, something",
             "q_nogain": "quux gizmo", "q_irrelevant": "garden hose"}


def shop() -> Dataset:
    catalog = {i: Item(i, t) for i, t in CATALOG.items()}
    queries = {q: Query(q, text, "test", "train") for q, (text, _) in QUERIES.items()}
    qrels = {q: {i: 1 for i in rel} for q, (_, rel) in QUERIES.items()}
    return Dataset(catalog, queries, qrels, "shop")


def cfg(tiny_dir, **kw) -> ConstructConfig:
    return ConstructConfig(student=str(tiny_dir), k_mine=3, k_gain=3, **kw)


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- 4. post-processing rules

def test_split_phrases():
    assert split_phrases("coffee, espresso; energy drink") == ["coffee", "espresso", "energy drink"]
    assert split_phrases("Here is the list: coffee, tea") == ["coffee", "tea"]
    assert split_phrases("1. coffee\n2) espresso\n- an energy drink\n* 'mocha'.") == [
        "coffee", "espresso", "energy drink", "mocha"]
    assert split_phrases("<think>hmm, let me see</think>coffee,  black   coffee ,") == ["coffee", "black coffee"]
    assert split_phrases("Products:\ncoffee") == ["coffee"]
    assert split_phrases('a product that is a revere, which is a kitchen table, items like mugs, "tar" and "asphalt"') == [
        "revere", "kitchen table", "mugs", "tar", "asphalt"]
    assert split_phrases("The product, A shoehorn, the itemizer") == ["product", "shoehorn", "itemizer"]
    assert split_phrases("tar, and a hairpiece, including wigs, or the toupee") == ["tar", "hairpiece", "wigs", "toupee"]
    assert split_phrases("  , ; ") == []


def test_each_drop_rule():
    assert drop_duplicates(["Coffee", "coffee.", "COFFEE beans", "coffee beans"]) == ["Coffee", "COFFEE beans"]
    query = "a La Mer dupe for dry skin"
    assert drop_in_query(["la mer", "dupe", "dry skin", "skin cream", "mer cream", "la"], query) == [
        "skin cream", "mer cream"]
    assert drop_banned(["Products", "moisturiser", "E-commerce", "n/a"], ["products", "e-commerce", "n/a"]) == [
        "moisturiser"]
    assert drop_long(["cheaper face cream", "this is a whole sentence about creams"], 6) == ["cheaper face cream"]


def test_truncate_to_student_tokens(tiny):
    tok = tiny.tokenizer
    phrases = ["coffee", "espresso", "energy drink", "black coffee", "caffeine pills", "matcha", "yerba mate",
               "guarana soda", "cold brew"]
    cot = truncate_tokens(phrases, tok, 16)
    n = len(tok(cot, add_special_tokens=False)["input_ids"])
    assert n <= 16 and cot.startswith("coffee, espresso, energy drink")
    kept = cot.split(", ")
    assert kept == phrases[:len(kept)] and len(kept) < len(phrases)  # whole phrases, a prefix
    longer = truncate_tokens(phrases, tok, 17 + n)
    assert len(longer) > len(cot)
    giant = "supercalifragilistic " * 20
    cut = truncate_tokens([giant, "coffee"], tok, 16)
    assert 0 < len(tok(cut, add_special_tokens=False)["input_ids"]) <= 16 and "coffee" not in cut


def test_postprocess_applies_every_rule_and_counts(tiny_dir, tiny):
    c = cfg(tiny_dir)
    text = ("Here are the phrases: Coffee, coffee, tea, products, a drink that is much stronger than regular tea, "
            "espresso, energy drink, yerba mate, guarana, caffeine pills, cold brew concentrate, matcha latte, mocha")
    cot, dropped = postprocess(text, "a drink stronger than tea", tiny.tokenizer, c)
    assert cot.startswith("Coffee, espresso, energy drink")
    assert dropped["duplicate"] == 1 and dropped["in_query"] == 1 and dropped["banned"] == 1
    assert dropped["too_many_words"] == 1 and dropped["truncated"] > 0 and dropped["cut_off"] == 0
    assert len(tiny.tokenizer(cot, add_special_tokens=False)["input_ids"]) <= 16
    cot, dropped = postprocess("vacuum flask, thermos, vacuum fl", "soup", tiny.tokenizer, c, cut_off=True)
    assert cot == "vacuum flask, thermos" and dropped["cut_off"] == 1
    cot, _ = postprocess("tea, drink, Tea", "a drink stronger than tea", tiny.tokenizer, c)
    assert cot == ""


# ---------------------------------------------------------------- 5. gain sets on real indexes

def test_gain_set_on_bm25():
    bm25 = BM25Retriever(CATALOG, show_progress=False)
    query = "a drink stronger than tea"
    [s1], [s2] = bm25.search([query], k=3), bm25.search([cot_query(query, "coffee, espresso")], k=3)
    assert set(s1.item_ids) == {"tea1", "tea2", "tea3"}
    assert set(s2.item_ids) == {"cof1", "cof2", "cof3"}
    assert gain_set(s1.item_ids, s2.item_ids) == s2.item_ids
    assert gain_set(s1.item_ids, s1.item_ids) == []


def test_gain_sets_of_a_run_on_a_real_faiss_index(tmp_path, tiny_dir):
    """The pipeline's gain sets, with the tiny LREM in direct mode over FAISS, equal set 2 minus
    set 1 recomputed here from a separately built index."""
    from lrem.index import ItemIndex
    from lrem.model import LREM
    from lrem.search import Searcher

    tiny = LREM.from_pretrained(str(tiny_dir))  # the dtype the retriever spec loads ("auto": bfloat16 on some CPUs)
    cots = tmp_path / "cots.jsonl"
    cots.write_text("".join(json.dumps({"query_id": q, "cot": c}) + "\n" for q, c in FILE_COTS.items()))
    stats = construct(shop(), tmp_path / "run", cfg(tiny_dir, teacher=f"file:{cots}", retriever=f"{tiny_dir}:direct",
                                                    keep_all=True), **QUIET)
    searcher = Searcher(tiny, ItemIndex.build(tiny, CATALOG, show_progress=False))
    rows = [r for r in read(tmp_path / "run" / "outcomes.jsonl") if r["cot"]]
    assert len(rows) == 3 and stats["funnel"]["with_cot"] == 3
    for r in rows:
        [s1] = searcher.search([r["query"]], k=3, mode="direct")
        [s2] = searcher.search([cot_query(r["query"], r["cot"])], k=3, mode="direct")
        assert r["gain"] == [i for i in s2.item_ids if i not in s1.item_ids]
        assert r["relevant"] == [i for i in r["gain"] if i in dict.fromkeys(QUERIES[r["query_id"]][1])]
    assert stats["funnel"]["with_gain"] == sum(bool(r["gain"]) for r in rows)


# ---------------------------------------------------------------- the funnel, per teacher kind

def test_funnel_with_the_file_teacher(tmp_path, tiny_dir):
    cots = tmp_path / "cots.jsonl"
    cots.write_text("".join(json.dumps({"query_id": q, "cot": c}) + "\n" for q, c in FILE_COTS.items()))
    out = tmp_path / "run"
    stats = construct(shop(), out, cfg(tiny_dir, teacher=f"file:{cots}"), **QUIET)
    assert stats["funnel"] == {"queries_in": 6, "done": 6, "mined": 5, "cots": 4, "empty_after_postprocess": 1,
                               "with_cot": 3, "empty_gain": 1, "with_gain": 2, "judged_relevant": 1, "triplets": 3}
    status = {r["query_id"]: r["status"] for r in read(out / "outcomes.jsonl")}
    assert status == {"q_tea": "ok", "q_easy": "easy", "q_echo": "empty_cot", "q_missing": "teacher_failed",
                      "q_nogain": "empty_gain", "q_irrelevant": "none_relevant"}
    triplets = read(out / "triplets.jsonl")
    assert {t["item_id"] for t in triplets} == {"cof1", "cof2", "cof3"}
    assert triplets[0] == {"query_id": "q_tea", "query": "a drink stronger than tea", "cot": "Coffee, espresso",
                           "item_id": triplets[0]["item_id"], "item_title": CATALOG[triplets[0]["item_id"]]}
    assert stats["teacher_problems"] == {"cot:missing": 1}
    assert stats["postprocess_dropped"]["in_query"] == 3 and stats["postprocess_dropped"]["banned"] == 1
    assert stats["cot_tokens"]["n"] == 3 and stats["cot_tokens"]["max"] <= 16
    assert json.loads((out / "stats.json").read_text())["funnel"] == stats["funnel"]
    assert json.loads((out / "config.json").read_text())["teacher"] == f"file:{cots}"


def shop_service(body, n):
    """The stand-in teacher: reasoning, extraction and judge answers decided by the prompt."""
    user = body["messages"][1]["content"]
    if "Would a shopper" in user:  # judge
        return 200, completion("Yes" if any(w in user for w in ("coffee", "espresso", "flask", "thermos")) else "No"), 0
    if "From the analysis" in user:  # extraction
        if "soup" in user:
            return 200, completion("vacuum flask, thermos, vacuum fl", finish="length"), 0
        return 200, completion("coffee, espresso, tea"), 0
    if "watering the lawn" in user:
        return 200, completion(""), 0
    if "digging" in user:
        return 200, completion(None, refusal="I can't help with digging."), 0
    if "beverage container" in user:
        return 200, "<html>502 from a proxy</html>", 0
    return 200, completion("The shopper wants coffee or espresso."), 0


def test_funnel_with_the_tiny_hf_teacher(tmp_path, tiny_dir):
    """A random model is a useless teacher (it writes newlines): every answer is counted, none crashes."""
    stats = construct(shop(), tmp_path / "run", cfg(tiny_dir, teacher=f"hf:{tiny_dir}", reason_max_tokens=8,
                                                    extract_max_tokens=8), **QUIET)
    f = stats["funnel"]
    assert f["done"] == 6 and f["mined"] == 5
    assert f["mined"] - f["cots"] == stats["statuses"]["teacher_failed"] == sum(stats["teacher_problems"].get(
        k, 0) for k in ("reasoning:empty", "extraction:empty", "reasoning:refused", "extraction:refused"))
    assert stats["this_run"]["teacher_calls"] >= 5


@pytest.mark.slow
def test_funnel_with_the_real_default_teacher(tmp_path, tiny_dir):
    stats = construct(shop(), tmp_path / "run", cfg(tiny_dir, hint="gold", reason_max_tokens=48), **QUIET)
    assert stats["funnel"]["done"] == 6 and stats["funnel"]["mined"] == 5
    assert stats["this_run"]["teacher_calls"] >= 5 and stats["seconds_per_mined_query"] > 0
    rows = read(tmp_path / "run" / "outcomes.jsonl")
    assert all(r["reasoning"] for r in rows if r["status"] != "easy")  # the real model writes something


def test_http_teacher_and_llm_judge_pipeline_with_cache(tmp_path, tiny_dir):
    srv = OpenAIStandIn(shop_service)
    try:
        c = cfg(tiny_dir, teacher=f"openai:{srv.url}#shop-llm", judge="llm", teacher_backoff=0.01)
        out = tmp_path / "run"
        stats = construct(shop(), out, c, **QUIET)
        assert stats["funnel"] == {"queries_in": 6, "done": 6, "mined": 5, "cots": 2, "empty_after_postprocess": 0,
                                   "with_cot": 2, "empty_gain": 0, "with_gain": 2, "judged_relevant": 2,
                                   "triplets": 5}
        assert stats["teacher_problems"] == {"extraction:too_long": 1, "reasoning:empty": 1,
                                             "reasoning:malformed": 1, "reasoning:refused": 1}
        trip = {(t["query_id"], t["cot"], t["item_id"]) for t in read(out / "triplets.jsonl")}
        assert trip == {("q_tea", "coffee, espresso", i) for i in ("cof1", "cof2", "cof3")} | {
            ("q_echo", "vacuum flask, thermos", i) for i in ("flask", "therm")}
        asked = len(srv.requests)
        assert asked == 5 + 2 + 5 and stats["this_run"]["teacher_calls"] == asked  # reason, extract, judge

        again = construct(shop(), out, c, **QUIET)  # finished: nothing to do
        assert again["funnel"] == stats["funnel"] and again["this_run"]["teacher_calls"] == 0
        (out / "outcomes.jsonl").unlink()
        (out / "triplets.jsonl").unlink()
        redo = construct(shop(), out, c, **QUIET)  # from scratch, but every answer is cached
        assert len(srv.requests) == asked and redo["this_run"]["teacher_cache_hits"] == asked
        assert {(t["query_id"], t["cot"], t["item_id"]) for t in read(out / "triplets.jsonl")} == trip

        gold = construct(shop(), tmp_path / "gold", ConstructConfig(**{**c.to_dict(), "hint": "gold"}), **QUIET)
        hinted = [r["messages"][1]["content"] for r in srv.requests[asked:] if "Think about" in r["messages"][1]["content"]]
        assert len(hinted) == 5 and all("One product that satisfies this search is:" in u for u in hinted)
        assert 'is: "vacuum flask"' in next(u for u in hinted if "soup" in u)
        rows = {r["query_id"]: r for r in read(tmp_path / "gold" / "outcomes.jsonl")}
        assert rows["q_tea"]["hint"] == CATALOG[pick_hint({i: 1 for i in QUERIES["q_tea"][1]}, "q_tea")]
        assert all(set(t) == {"query_id", "query", "cot", "item_id", "item_title"}
                   for t in read(tmp_path / "gold" / "triplets.jsonl"))  # the student never sees the hint
        assert gold["funnel"]["mined"] == 5
    finally:
        srv.close()


def test_pick_hint_is_stable_and_prefers_higher_relevance():
    rels = {"a": 1, "b": 2, "c": 2, "d": 0}
    assert pick_hint(rels, "q") in ("b", "c") and pick_hint(rels, "q") == pick_hint(dict(reversed(rels.items())), "q")
    assert pick_hint({"d": 0}, "q") is None


# ---------------------------------------------------------------- config and errors

def test_config_file_flags_and_errors(tmp_path, tiny_dir):
    path = tmp_path / "c.yaml"
    path.write_text("k_gain: 20\nhint: gold\nban: [foo]\n")
    c = ConstructConfig.load(path, k_gain=7, limit=None)
    assert (c.k_gain, c.hint, c.ban, c.limit) == (7, "gold", ["foo"], None)
    for text, match in (("k_gian: 3\n", r"c.yaml: unknown key 'k_gian'"),
                        ("k_gain: ten\n", r"c.yaml: key 'k_gain': expected int, got 'ten'"),
                        ("keep_all: 1\n", r"key 'keep_all'"),
                        ("k_gain: 3\n  bad: [\n", r"c.yaml:\d+: malformed YAML"),
                        ("hint: silver\n", r"hint='silver'; expected none or gold"),
                        ("- 1\n", r"expected a mapping")):
        path.write_text(text)
        with pytest.raises(ValueError, match=match):
            ConstructConfig.load(path)
    assert ConstructConfig.load(None, mine_max_hitrate=1).mine_max_hitrate == 1


def test_resuming_with_other_settings_is_refused(tmp_path, tiny_dir):
    cots = tmp_path / "cots.jsonl"
    cots.write_text(json.dumps({"query_id": "q_tea", "cot": "coffee"}) + "\n")
    construct(shop(), tmp_path / "run", cfg(tiny_dir, teacher=f"file:{cots}"), **QUIET)
    construct(shop(), tmp_path / "run", cfg(tiny_dir, teacher=f"file:{cots}", batch_size=2), **QUIET)  # runtime only
    with pytest.raises(ValueError, match=r"config.json: this run was started with k_gain=3, now k_gain=5"):
        construct(shop(), tmp_path / "run", ConstructConfig(student=str(tiny_dir), k_mine=3, k_gain=5,
                                                            teacher=f"file:{cots}"), **QUIET)


def test_cli_dead_endpoint_exits_with_a_clear_error(tmp_path, tiny_dir):
    from lrem.cli import app

    save_dataset(shop(), tmp_path / "data")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"student": str(tiny_dir), "teacher_retries": 1,
                                                     "teacher_backoff": 0.01, "k_mine": 3, "k_gain": 3}))
    url = dead_url()
    res = CliRunner().invoke(app, ["construct", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                                   "--config", str(tmp_path / "c.yaml"), "--teacher", f"openai:{url}#m"])
    assert res.exit_code == 1
    assert f"error: teacher {url}/chat/completions (model 'm') failed after 2 tries" in res.output
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit)


# ---------------------------------------------------------------- resume after SIGKILL

KITCHEN = ["kettle", "teapot", "skillet", "ladle", "whisk", "colander", "grater", "peeler", "tongs", "wok"]


def many_queries(n: int) -> Dataset:
    words = KITCHEN
    catalog = {f"i{j}": Item(f"i{j}", f"{words[j % 10]} model {j}") for j in range(30)}
    queries = {f"q{k:03d}": Query(f"q{k:03d}", f"kitchen helper number {k} for {words[k % 10]}s", "test", "train")  # plural: no bm25 match
               for k in range(n)}
    qrels = {q: {f"i{j}": 1 for j in range(30) if (j + int(q[1:])) % 3 == 0} for q in queries}
    return Dataset(catalog, queries, qrels, "kitchen")


def test_resume_after_sigkill_finishes_with_no_duplicate_and_no_lost_query(tmp_path, tiny_dir):
    n = 400
    save_dataset(many_queries(n), tmp_path / "data")
    cots = tmp_path / "cots.jsonl"
    words = KITCHEN  # a CoT names two other utensils than the query's: bm25 finds new items
    cots.write_text("".join(json.dumps({"query_id": f"q{k:03d}", "cot": f"{words[(k + 1) % 10]}, {words[(k + 3) % 10]}"})
                            + "\n" for k in range(n)))
    cfg_path = tmp_path / "kill.yaml"
    cfg_path.write_text(yaml.safe_dump({"teacher": f"file:{cots}", "student": str(tiny_dir), "retriever": "bm25",
                                        "keep_all": True, "k_mine": 3, "k_gain": 3, "batch_size": 1}))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lrem.cli", "construct", "--data", str(tmp_path / "data"), "--out", str(out),
           "--config", str(cfg_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    outcomes = out / "outcomes.jsonl"

    def n_lines() -> int:
        return outcomes.read_bytes().count(b"\n") if outcomes.exists() else 0

    with open(tmp_path / "first.log", "w") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
        deadline = time.time() + 240
        while n_lines() < 3:
            assert p.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
            assert time.time() < deadline, "no outcome written in time"
            time.sleep(0.01)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    killed = read(outcomes)
    assert 3 <= len(killed) < n, "the run was not killed mid-way"
    # the two crash windows: triplets appended but not the outcome; an outcome cut mid-write
    undone = next(q for q in (f"q{k:03d}" for k in range(n)) if q not in {r["query_id"] for r in killed})
    with open(out / "triplets.jsonl", "a") as f:
        f.write(json.dumps({"query_id": undone, "query": "x", "cot": "x", "item_id": "i0", "item_title": "x"}) + "\n")
    with open(outcomes, "a") as f:
        f.write('{"query_id": "' + undone + '", "query": "kitch')

    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{len(killed)} already done" in res.stderr
    rows = read(outcomes)
    ids = [r["query_id"] for r in rows]
    assert sorted(ids) == sorted(f"q{k:03d}" for k in range(n))  # every query once: none lost, none twice
    triplets = [(t["query_id"], t["item_id"]) for t in read(out / "triplets.jsonl")]
    assert len(triplets) == len(set(triplets)) > 0
    assert set(triplets) == {(r["query_id"], i) for r in rows for i in r["relevant"]}

    clean = tmp_path / "clean"  # the same run, never interrupted
    construct(tmp_path / "data", clean, ConstructConfig.load(cfg_path), **QUIET)
    view = lambda rs: {r["query_id"]: (r["status"], r["cot"], r["gain"], r["relevant"]) for r in rs}  # noqa: E731
    assert view(rows) == view(read(clean / "outcomes.jsonl"))
    assert sorted(triplets) == sorted((t["query_id"], t["item_id"]) for t in read(clean / "triplets.jsonl"))
    final = json.loads((out / "stats.json").read_text())
    assert final["funnel"]["done"] == n and final["funnel"]["triplets"] == len(triplets)


def test_cli_run_with_no_triplet_says_why_and_writes_an_empty_file(tmp_path, tiny_dir):
    """Issue 21: a run that yields 0 triplets still leaves triplets.jsonl (empty), names only files
    that exist, and says in one line which statuses stopped the queries."""
    save_dataset(shop(), tmp_path / "data")
    cots = tmp_path / "cots.jsonl"  # every CoT is banned or repeats its query; q_tea has none
    useless = {"q_echo": "products, soup", "q_missing": "watering the lawn, items", "q_nogain": "container, etc",
               "q_irrelevant": "a tool, n/a"}
    cots.write_text("".join(json.dumps({"query_id": q, "cot": c}) + "\n" for q, c in useless.items()))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"student": str(tiny_dir), "k_mine": 3, "k_gain": 3}))
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "lrem.cli", "construct", "--data", str(tmp_path / "data"),
                          "--out", str(out), "--config", str(tmp_path / "c.yaml"), "--teacher", f"file:{cots}"],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "triplets.jsonl").read_bytes() == b""
    assert f"wrote {out / 'triplets.jsonl'} and {out / 'stats.json'}" in res.stdout
    assert ("0 triplets: 4 of 4 CoTs empty after post-processing, 1 of 6 queries easy for the retriever "
            "(not mined), 1 of 5 teacher answers failed; teacher problems cot:missing 1") in res.stdout.splitlines()


def test_list_mode_asks_once_per_query_and_labels_need_no_teacher(tmp_path, tiny_dir):
    """`teacher_mode: list`: one request per mined query, the list prompt (with the hint line when
    hinted), no reasoning call; the labels teacher makes CoTs from the relevant items alone."""
    def service(body, n):
        user = body["messages"][1]["content"]
        assert "List up to 5 products" in user and "Think about" not in user
        return 200, completion("coffee, espresso, tea" if "stronger" in user else "vacuum flask, thermos"), 0

    srv = OpenAIStandIn(service)
    try:
        stats = construct(shop(), tmp_path / "list", cfg(tiny_dir, teacher=f"openai:{srv.url}#m", teacher_mode="list",
                                                          hint="gold"), **QUIET)
        assert len(srv.requests) == stats["funnel"]["mined"] == 5
        assert all('One product that satisfies this search is: "' in r["messages"][1]["content"] for r in srv.requests)
        rows = {r["query_id"]: r for r in read(tmp_path / "list" / "outcomes.jsonl")}
        assert rows["q_tea"]["reasoning"] is None and rows["q_tea"]["cot"] == "coffee, espresso"
        # grounded: the teacher also sees the retriever's top titles (set 1's first N), recorded by id
        construct(shop(), tmp_path / "cands", cfg(tiny_dir, teacher=f"openai:{srv.url}#m", teacher_mode="list",
                                                  candidates=2), **QUIET)
        rows = {r["query_id"]: r for r in read(tmp_path / "cands" / "outcomes.jsonl")}
        top2 = [BM25Retriever({i: t for i, t in CATALOG.items()}).search(["a drink stronger than tea"], k=2)[0].item_ids]
        assert rows["q_tea"]["candidates"] == top2[0]
        user = next(r["messages"][1]["content"] for r in srv.requests[5:] if "stronger" in r["messages"][1]["content"])
        assert "A first search found these products" in user
        assert all(f"- {CATALOG[i]}" in user for i in top2[0]) and "One product" not in user
    finally:
        srv.close()
    with pytest.raises(ValueError, match="candidates=4; need 0 <= candidates <= k_gain"):
        cfg(tiny_dir, candidates=4)
    with pytest.raises(ValueError, match="teacher_mode='think'"):
        cfg(tiny_dir, teacher_mode="think")

    stats = construct(shop(), tmp_path / "labels", cfg(tiny_dir, teacher="labels"), **QUIET)
    rows = {r["query_id"]: r for r in read(tmp_path / "labels" / "outcomes.jsonl")}
    assert rows["q_irrelevant"]["extraction"] == "spade, shovel"  # the relevant item's names
    assert rows["q_tea"]["cot"] and stats["funnel"]["cots"] == stats["funnel"]["mined"]
    assert stats["this_run"]["teacher_calls"] == 0


def test_a_resume_with_a_smaller_limit_keeps_and_counts_what_the_larger_one_wrote(tmp_path, tiny_dir):
    """`limit` may change on a resume (it does not change any query's outcome); a smaller one
    leaves the queries a larger one did in the folder, so the stats count them too: they describe
    triplets.jsonl as it is."""
    save_dataset(many_queries(12), tmp_path / "data")
    cots = tmp_path / "cots.jsonl"
    cots.write_text("".join(json.dumps({"query_id": f"q{k:03d}", "cot": f"{KITCHEN[(k + 1) % 10]}, {KITCHEN[(k + 3) % 10]}"})
                            + "\n" for k in range(12)))
    cfg = dict(teacher=f"file:{cots}", student=str(tiny_dir), retriever="bm25", keep_all=True, k_mine=3, k_gain=3)
    out, said = tmp_path / "run", []
    first = construct(tmp_path / "data", out, ConstructConfig(limit=8, **cfg), **QUIET)
    again = construct(tmp_path / "data", out, ConstructConfig(limit=4, **cfg), log=said.append, show_progress=False)
    assert first["funnel"]["done"] == again["funnel"]["done"] == 8
    assert again["funnel"]["triplets"] == first["funnel"]["triplets"] == len(read(out / "triplets.jsonl")) > 0
    assert any("4 more queries done earlier" in line for line in said), said
    assert json.loads((out / "stats.json").read_text())["funnel"]["done"] == 8
