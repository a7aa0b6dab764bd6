"""Grounded queries (issue 22): the first-stage titles in the query prompt, rendered within their
token budget, the same at training and at search time, saved with the model; the grounded
search modes; mining candidates for training pairs."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lrem.data import DataError, Pair
from lrem.grounding import first_stage_recall, mine_candidates
from lrem.index import ItemIndex
from lrem.model import LREM
from lrem.prompts import PromptConfig
from lrem.search import Searcher
from lrem.train import SFTConfig, load_triplets, train
from lrem.train.pairs import grounded
from lrem.train.sft import collate

CATALOG = {"i0": "corkscrew, bottle screw", "i1": "wine opener", "i2": "teapot", "i3": "office chair",
           "i4": "claw hammer", "i5": "desk lamp"}
Q = "a device for pulling corks"


@pytest.fixture
def model(tiny_dir):
    m = LREM.from_pretrained(str(tiny_dir))
    m.config.candidates_k = 3
    return m


def test_candidates_follow_the_query_in_rank_order_and_none_is_the_plain_prompt(model):
    cands = ["corkscrew, bottle screw", "wine opener", "teapot", "office chair"]
    [p] = model.query_prompts([Q], candidates=[cands])
    user = p.split("<|im_start|>user\n")[1]
    assert user.split("<|im_end|>")[0].endswith(f"Query: {Q}\nCandidates: corkscrew, bottle screw; wine opener; teapot")
    assert "office chair" not in p  # K = 3
    assert p.endswith("<think>")
    assert model.query_prompts([Q], candidates=[None]) == model.query_prompts([Q])
    with pytest.raises(ValueError, match="2 candidate lists for 1 queries"):
        model.query_prompts([Q], candidates=[cands, cands])


@pytest.mark.parametrize("budget", [3, 6, 9, 40])
def test_the_candidate_list_keeps_to_its_token_budget(model, budget):
    model.config.max_candidate_tokens = budget
    model.config.candidates_k = 0  # every given title
    titles = [f"{w} with a long descriptive product title number {i}" for i, w in enumerate(["mug", "lamp", "sofa"])]
    [text] = model.candidate_lists([titles])
    assert model.token_counts([text])[0] <= budget
    assert text.startswith(titles[0][:3])  # the best candidate first, cut where it must be
    kept = text.split(model.config.candidates_sep)
    assert all(t in titles for t in kept[:-1]) and titles[0].startswith(kept[0])
    if budget == 40:  # room for more than the first: whole titles, in rank order
        assert kept[:2] == titles[:2]
    assert model.candidate_lists([None, []]) == [None, ""]


def test_prompt_config_checks_the_candidate_settings():
    with pytest.raises(ValueError, match="candidates_template"):
        PromptConfig(candidates_template="Candidates: {titles}")
    with pytest.raises(ValueError, match="candidates_k=-1"):
        PromptConfig(candidates_k=-1)
    with pytest.raises(ValueError, match="max_candidate_tokens=0"):
        PromptConfig(max_candidate_tokens=0)


def test_training_and_search_see_the_same_grounded_prompt_and_the_model_keeps_k(tmp_path, tiny_dir):
    cands = ("corkscrew, bottle screw", "wine opener", "teapot")
    rows = [{"query_id": f"q{i}", "query": f"{Q} {i}", "cot": "", "item_id": iid, "item_title": CATALOG[iid],
             "candidates": list(cands)} for i, iid in enumerate(CATALOG)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = load_triplets(path)
    assert pairs[0].candidates == cands
    model = LREM.from_pretrained(str(tiny_dir))
    model.config.candidates_k = 2
    batch = collate(model, pairs[:2])
    want = model.tokenizer(model.query_texts([pairs[0].query], [""], candidates=[cands]),
                           add_special_tokens=False)["input_ids"][0]
    assert batch["q_ids"][0, : len(want)].tolist() == want and batch["q_mask"][0].sum() == len(want)

    # a seeded share of the queries keeps its candidates, all of a query's pairs alike
    half = grounded(pairs + pairs, 0.5, seed=0)
    shown = {p.query_id for p in half if p.candidates}
    assert 0 < len(shown) < len(CATALOG) and shown == {p.query_id for p in grounded(pairs, 0.5, 0) if p.candidates}
    assert all((p.candidates is not None) == (p.query_id in shown) for p in half)

    cfg = SFTConfig(model=str(tiny_dir), use_cot=False, sft_weight=0.0, batch_size=2, max_steps=2, save_steps=0,
                    warmup_ratio=0.0, logging_steps=1, candidates_k=2, grounded_share=1.0)
    train(cfg, tmp_path / "run", triplets=path, log=lambda *_: None)
    saved = json.loads((tmp_path / "run" / "lrem_config.json").read_text())
    assert saved["prompts"]["candidates_k"] == 2
    trained = LREM.from_pretrained(str(tmp_path / "run"))
    assert trained.config.candidates_k == 2
    assert trained.query_texts([pairs[0].query], [""], candidates=[cands]) == \
        model.query_texts([pairs[0].query], [""], candidates=[cands])
    # grounded_share 0: the same pairs file trains the plain baseline (no titles, K not saved)
    train(SFTConfig(**{**cfg.to_dict(), "grounded_share": 0.0}), tmp_path / "plain", triplets=path, log=lambda *_: None)
    assert LREM.from_pretrained(str(tmp_path / "plain")).config.candidates_k == 0


def test_grounded_modes_search_twice_with_the_first_stage_titles(lively_dir):
    model = LREM.from_pretrained(str(lively_dir("llama")), dtype="float32")
    model.config.candidates_k = 3
    s = Searcher(model, ItemIndex.build(model, CATALOG, show_progress=False))
    queries = [Q, "somewhere to sit at a desk"]
    first = s.candidates(queries)
    direct = s.search(queries, k=3, mode="direct")
    assert [[s.index.title(i) for i in r.item_ids] for r in direct] == first  # the direct search's top K
    assert len(s.candidates(queries, k=5)[0]) == 5

    res = s.search(queries, k=6, mode="grounded-direct")
    emb = model.encode_queries(queries, mode="direct", candidates=first).embeddings
    scores, ids = s.index.search(emb, 6)
    assert [r.item_ids for r in res] == ids and all(r.cot == "" for r in res)
    assert not np.allclose(emb, model.encode_queries(queries, mode="direct").embeddings)  # the titles count

    res = s.search(queries, k=6, mode="grounded")
    again = model.encode_queries(queries, cots=[r.cot for r in res], candidates=first).embeddings
    _, ids = s.index.search(again, 6)
    assert [r.item_ids for r in res] == ids
    # the fast path (CoT and embedding from one cache) equals plain generation and a plain forward
    fast = model.encode_queries(queries, mode="reason", candidates=first)
    plain_cots = model.engine.generate_cots(queries, 32, False, None, False, first)
    assert fast.cots == plain_cots and len(set(plain_cots)) == 2
    ref = model.engine.embed_texts(model.query_texts(queries, plain_cots, candidates=first), 32, "q", False,
                                   prefix_cache=False)
    np.testing.assert_allclose(fast.embeddings, ref, atol=1e-5)
    r = s.retriever("grounded")
    r.search(queries, k=2)
    assert r.reasoned_share == 1.0


def test_mine_candidates_gives_each_pair_its_querys_top_titles(lively_dir, tmp_path):
    model = LREM.from_pretrained(str(lively_dir("llama")))
    s = Searcher(model, ItemIndex.build(model, CATALOG, show_progress=False))
    pairs = [Pair("q0", Q, "i0", CATALOG["i0"]), Pair("q0", Q, "i1", CATALOG["i1"]),
             Pair("q1", "a lamp", "i5", CATALOG["i5"])]
    out = mine_candidates(s, pairs, k=len(CATALOG))
    assert out[0].candidates == out[1].candidates == tuple(s.candidates([Q], k=len(CATALOG))[0])
    assert first_stage_recall(out) == 1.0  # every title is among all the catalog's
    assert first_stage_recall(mine_candidates(s, pairs, k=1)) < 1.0  # two items, one candidate

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"query_id": "q", "query": "x", "item_id": "i", "item_title": "t",
                               "candidates": "not a list"}) + "\n")
    with pytest.raises(DataError) as e:
        load_triplets(bad)
    assert e.value.line == 1 and e.value.field == "candidates"


def test_cli_ground_writes_pairs_with_candidates_that_training_reads(lively_dir, tmp_path):
    from typer.testing import CliRunner

    from lrem.cli import app

    model = LREM.from_pretrained(str(lively_dir("llama")))
    ItemIndex.build(model, CATALOG, show_progress=False).save(tmp_path / "idx")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query_id": f"q{i}", "query": q, "item_id": iid, "item_title": CATALOG[iid]})
                             + "\n" for i, (q, iid) in enumerate([(Q, "i0"), ("a lamp for the desk", "i5")])))
    args = ["ground", "--pairs", str(pairs), "--index", str(tmp_path / "idx"), "--out", str(tmp_path / "g"), "-k", "2"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    mined = load_triplets(tmp_path / "g" / "pairs.jsonl")
    s = Searcher.load(tmp_path / "idx")
    assert [p.candidates for p in mined] == [tuple(c) for c in s.candidates([Q, "a lamp for the desk"], k=2)]
    stats = json.loads((tmp_path / "g" / "stats.json").read_text())
    assert stats["k"] == 2 and stats["n_pairs"] == 2 and stats["first_stage_recall"] == first_stage_recall(mined)
    again = CliRunner().invoke(app, args)  # an existing output is never silently replaced
    assert again.exit_code != 0 and "--overwrite" in str(again.exception or again.output)
