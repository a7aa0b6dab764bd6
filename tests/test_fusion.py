"""Hybrid search: reciprocal rank fusion of BM25 and LREM rankings, in the library, `lrem eval`'s
system specs and `lrem serve` (a real server on 127.0.0.1). The tiny random model and real BM25."""
from __future__ import annotations

import doctest

import httpx
import pytest

import lrem.fusion
from lrem.baselines import BM25Retriever
from lrem.data.formats import Dataset, Item, Query
from lrem.evaluate import evaluate_systems
from lrem.fusion import RRF_K, FusedRetriever, parse_fused, rrf
from lrem.index import ItemIndex
from lrem.search import Searcher, build_systems
from lrem.serve import ServeConfig, background_server, create_app

TITLES = ["corkscrew, bottle screw", "teapot", "coffee, java", "mug", "spatula", "wine glass", "sofa, couch",
          "floor lamp", "rug", "throw pillow", "dining chair", "coffee table", "bookcase", "bed frame", "mirror",
          "curtain", "desk", "office chair", "saucepan", "kettle"]
CATALOG = {f"i{j}": t for j, t in enumerate(TITLES)}
QUERIES = ["a teapot for green tea", "coffee", "a chair for the office", "something to open wine"]


@pytest.fixture(scope="module")
def searcher(tiny):
    return Searcher(tiny, ItemIndex.build(tiny, CATALOG, show_progress=False))


def test_doctests():
    result = doctest.testmod(lrem.fusion)
    assert result.attempted >= 5 and result.failed == 0


def test_rrf_sums_weighted_reciprocal_ranks_and_breaks_ties_by_first_sight():
    fused = dict(rrf([["a", "b"], ["b", "c"]], weights=[2.0, 1.0]))
    assert fused == pytest.approx({"a": 2 / (RRF_K + 1), "b": 2 / (RRF_K + 2) + 1 / (RRF_K + 1), "c": 1 / (RRF_K + 2)})
    # equal scores: the first ranking's items first, in its order, then the second's new ones
    assert [i for i, _ in rrf([["x", "y"], ["y", "x"], ["z"]], weights=[1, 1, 0])] == ["x", "y", "z"]
    with pytest.raises(ValueError, match="2 weights for 1 rankings"):
        rrf([["a"]], weights=[1, 1])


@pytest.mark.parametrize("mode", ["direct", "reason"])
def test_hybrid_search_is_the_rrf_of_its_parts_rankings(searcher, mode):
    k, depth = 5, 100
    dense = searcher.search(QUERIES, k=depth, mode=mode)
    lexical = BM25Retriever(CATALOG, show_progress=False).search(QUERIES, k=depth)
    for weight in (1.0, 0.3):
        for q, d, lex, got in zip(QUERIES, dense, lexical, searcher.hybrid(mode, weight).search(QUERIES, k=k)):
            assert got.cot == d.cot  # the dense part's reasoning (the tiny model writes one in reason mode)
            assert got.cot if mode == "reason" else got.cot == ""
            assert len(got.hits) == k
            rank_d = {i: r for r, i in enumerate(d.item_ids, 1)}
            rank_l = {i: r for r, i in enumerate(lex.item_ids, 1)}
            for h in got.hits:  # each score is its reciprocal ranks, added by hand here
                want = 1 / (RRF_K + rank_d[h.item_id]) + (weight / (RRF_K + rank_l[h.item_id]) if h.item_id in rank_l else 0)
                assert h.score == pytest.approx(want), q
            assert [h.score for h in got.hits] == sorted((h.score for h in got.hits), reverse=True)
    # a title BM25 matches on a word of the query is lifted above the dense model's (random) top items
    [hit] = searcher.hybrid("direct", lexical_weight=5.0).search(["teapot"], k=1)
    assert hit.item_ids == ["i1"]
    # a weight of 0 gives the dense ranking back
    assert [r.item_ids for r in searcher.hybrid(mode, 0.0).search(QUERIES, k=k)] == [r.item_ids[:k] for r in dense]


def test_fused_eval_specs(searcher, tiny_dir):
    catalog = {i: Item(i, t) for i, t in CATALOG.items()}
    queries = {f"q{n}": Query(f"q{n}", q, "c", "dev") for n, q in enumerate(QUERIES)}
    ds = Dataset(catalog, queries, {"q0": {"i1": 1}, "q1": {"i2": 1}, "q2": {"i17": 1}, "q3": {"i0": 1}}, "kitchen")
    model = f"{tiny_dir}:direct"
    systems = build_systems({"dense": model, "hybrid": f"bm25+{model}", "no-bm25": f"0*bm25+{model}",
                             "three": f"bm25+{model}+0.5*minilm"}, ds, log=lambda *a: None)
    assert isinstance(systems["hybrid"], FusedRetriever) and systems["three"].weights == [1.0, 1.0, 0.5]
    metrics = evaluate_systems(ds, "dev", systems, log=lambda *a: None)["systems"]
    assert metrics["no-bm25"]["overall"] == metrics["dense"]["overall"]
    # the random tiny model alone ranks few relevant items high; every query here shares a word with its item
    assert metrics["hybrid"]["overall"]["hitrate@10"] > metrics["dense"]["overall"]["hitrate@10"]
    assert systems["three"].describe()["mode"] == "rrf: 1*bm25 + 1*direct + 0.5*minilm"
    # the CoT of a fusion is its reasoning part's, wherever that part stands
    mixed = build_systems({"mix": f"{model}+{tiny_dir}:reason"}, ds, log=lambda *a: None)["mix"]
    assert mixed.search(["mug"], k=3)[0].cot == searcher.search(["mug"], k=3, mode="reason")[0].cot != ""
    for bad, match in (("x*bm25+minilm", "not a weight"), ("-1*bm25+minilm", "finite and >= 0"),
                       ("nan*bm25+minilm", "finite and >= 0")):
        with pytest.raises(ValueError, match=match):
            parse_fused(bad)
    with pytest.raises(ValueError, match="expected bm25, minilm, MODEL:MODE"):
        build_systems({"x": "bm25+"}, ds, log=lambda *a: None)
    # a '+' inside a part stays there: a path, a weight in scientific notation
    assert parse_fused(f"1e+1*bm25+{tiny_dir}/a+b:direct") == [(10.0, "bm25"), (1.0, f"{tiny_dir}/a+b:direct")]
    assert parse_fused(str(tiny_dir)) is None and parse_fused(f"{tiny_dir}:cots=a+b.jsonl") is None


def test_serve_hybrid_is_the_librarys(searcher):
    with background_server(create_app(searcher, ServeConfig(hybrid=True))) as url:
        for mode, weight in (("direct", 1.0), ("reason", 0.5)):
            r = httpx.post(url + "/search", json={"query": "a teapot for green tea", "k": 4, "mode": mode,
                                                  "hybrid": True, "lexical_weight": weight}, timeout=60)
            assert r.status_code == 200, r.text
            [want] = searcher.hybrid(mode, weight).search(["a teapot for green tea"], k=4)
            body = r.json()
            assert [i["item_id"] for i in body["items"]] == want.item_ids and body["cot"] == want.cot
            assert [i["score"] for i in body["items"]] == pytest.approx([h.score for h in want.hits])
            assert body["timings_ms"]["lexical"] >= 0
        assert httpx.get(url + "/info", timeout=60).json()["config"]["hybrid"] is True
        r = httpx.post(url + "/search", json={"query": "mug", "hybrid": True, "lexical_weight": -1}, timeout=60)
        assert r.status_code == 422 and "greater than or equal to 0" in r.json()["detail"]
        r = httpx.post(url + "/search", content=b'{"query": "mug", "hybrid": true, "lexical_weight": Infinity}',
                       timeout=60)
        assert r.status_code == 422 and "finite number" in r.json()["detail"]
    with background_server(create_app(searcher, ServeConfig())) as url:
        r = httpx.post(url + "/search", json={"query": "mug", "hybrid": True}, timeout=60)
        assert r.status_code == 400 and "--set hybrid=true" in r.json()["detail"]
    with pytest.raises(ValueError, match="hybrid='yes'; expected bool"):
        ServeConfig(hybrid="yes")


def test_rrf_counts_a_repeated_item_once_and_keeps_exact_ties():
    # a ranking that repeats an item (chunks of one product) counts it once, at its best rank; the
    # items after it move up. Before, "a" scored 1/61 + 1/62 from one retriever and beat "b".
    assert rrf([["a", "a", "b"], ["b"]]) == [("b", 1 / (RRF_K + 2) + 1 / (RRF_K + 1)), ("a", 1 / (RRF_K + 1))]
    # x and y hold ranks {1, 2, 7} each: a tie, so x (met first) leads; summed in ranking order, float
    # rounding made y's sum one ulp larger and put it first
    fused = rrf([["x", "f1", "f2", "f3", "f4", "f5", "y"], ["g1", "y", "g2", "g3", "g4", "g5", "x"], ["y", "x"]])
    assert fused[:2] == [("x", fused[0][1]), ("y", fused[0][1])]
    for bad in (-1, -0.5, float("nan")):
        with pytest.raises(ValueError, match="rrf_k"):
            FusedRetriever([BM25Retriever(CATALOG, show_progress=False)] * 2, rrf_k=bad)
