"""Reranking a first stage's candidates by an LREM embedding (`lrem.rerank`): `lrem eval`'s
`FIRST>MODEL:MODE` systems, with the tiny random model, real BM25 and a real FAISS index."""
from __future__ import annotations

import doctest

import numpy as np
import pytest

import lrem.rerank
from lrem.baselines import BM25Retriever
from lrem.data.formats import Dataset, Item, Query
from lrem.evaluate import evaluate_systems
from lrem.index import ItemIndex
from lrem.rerank import RerankRetriever, parse_rerank
from lrem.search import Searcher, build_systems, system_parts

TITLES = ["corkscrew, bottle screw", "teapot", "coffee, java", "mug", "spatula", "wine glass", "sofa, couch",
          "floor lamp", "rug", "throw pillow", "dining chair", "coffee table", "bookcase", "bed frame", "mirror",
          "curtain", "desk", "office chair", "saucepan", "kettle", "tea towel", "coffee grinder"]
CATALOG = {f"i{j}": t for j, t in enumerate(TITLES)}
QUERIES = ["a teapot for green tea", "coffee", "a chair for the office", "something to open wine"]


def test_doctests():
    assert doctest.testmod(lrem.rerank).failed == 0


@pytest.mark.parametrize("factory", ["Flat", "HNSW8,Flat"])
def test_rerank_orders_the_first_stages_candidates_by_the_models_cosine(tiny, factory):
    searcher = Searcher(tiny, ItemIndex.build(tiny, CATALOG, factory=factory, show_progress=False))
    bm25 = BM25Retriever(CATALOG, show_progress=False)
    reranked = RerankRetriever(bm25, searcher, "direct", depth=3).search(QUERIES, k=2)
    q = tiny.encode_queries(QUERIES, mode="direct").embeddings
    items = tiny.encode_items(TITLES)
    for query, first, got, qv in zip(QUERIES, bm25.search(QUERIES, k=3), reranked, q):
        cos = {i: float(items[int(i[1:])] @ qv) for i in first.item_ids}  # the three candidates' cosines
        best = sorted(first.item_ids, key=lambda i: -cos[i])[:2]
        assert got.item_ids == best, query
        assert [h.score for h in got.hits] == pytest.approx([cos[i] for i in best], abs=1e-4)
        assert got.cot == ""


def test_rerank_eval_specs(tiny_dir):
    catalog = {i: Item(i, t) for i, t in CATALOG.items()}
    queries = {f"q{n}": Query(f"q{n}", q, "c", "dev") for n, q in enumerate(QUERIES)}
    ds = Dataset(catalog, queries, {"q0": {"i1": 1}, "q1": {"i2": 1}, "q2": {"i17": 1}, "q3": {"i0": 1}}, "kitchen")
    model = f"{tiny_dir}:direct"
    systems = build_systems({"bm25": "bm25", "dense": model, "all": f"bm25>100>{model}",
                             "top1": f"bm25>1>{model}", "reason": f"bm25>{tiny_dir}:reason"}, ds, log=lambda *a: None)
    result = evaluate_systems(ds, "dev", systems, log=lambda *a: None)
    metrics, runs = result["systems"], result["runs"]
    assert metrics["top1"]["overall"]["hitrate@1"] == metrics["bm25"]["overall"]["hitrate@1"]  # one candidate: BM25's
    for q in queries:  # every BM25 candidate, in the dense model's order and with its scores
        assert {i for i, _ in runs["all"][q]} == {i for i, _ in runs["bm25"][q]}
        dense = {i: s for i, s in runs["dense"][q]}
        assert [s for _, s in runs["all"][q]] == pytest.approx([dense[i] for i, _ in runs["all"][q] if i in dense])
    assert metrics["all"]["mode"] == "rerank: bm25 top 100 by direct" and metrics["all"]["reasoned_share"] == 0.0
    assert metrics["reason"]["reasoned_share"] == 1.0 and result["examples"]["reason"]["q0"]["cot"] != ""
    assert system_parts(f"bm25+minilm>5>{model}") == ["bm25", "minilm", model]
    for bad, match in ((f"bm25>0>{model}", "FIRST>N>MODEL:MODE"), (f"bm25>>{model}", "FIRST>N>MODEL:MODE"),
                       (f"bm25>{tiny_dir}:auto", "one embedding per query"), ("bm25>minilm", "MODEL:MODE"),
                       ("bm25>20>bm25", "MODEL:MODE"), ("bm25>run:x.trec", "MODEL:MODE"),
                       (f"bm25>minilm+{model}", "MODEL:MODE")):
        with pytest.raises(ValueError, match=match):
            build_systems({"x": bad}, ds, log=lambda *a: None)
    assert parse_rerank(model) is None


def test_rerank_needs_an_index_that_keeps_its_vectors(tiny):
    searcher = Searcher(tiny, ItemIndex.build(tiny, CATALOG, factory="SQ8", show_progress=False))
    bm25 = BM25Retriever(CATALOG, show_progress=False)
    with pytest.raises(ValueError, match="compressed codes"):
        RerankRetriever(bm25, searcher, "direct").search(["coffee"], k=2)
    assert np.array_equal(ItemIndex.build(tiny, CATALOG, show_progress=False).vectors_of([]).shape, (0, tiny.dim))


def test_rerank_shallower_than_k_keeps_the_first_stages_tail(tiny, tiny_dir):
    """k past the depth: the top `depth` reordered, then the first stage's next items in its own order
    (a rescore window), scored below any cosine; before, the list stopped at the depth."""
    searcher = Searcher(tiny, ItemIndex.build(tiny, CATALOG, show_progress=False))
    bm25 = BM25Retriever(CATALOG, show_progress=False)
    query = "coffee table chair"
    first = bm25.search(query, k=10)
    assert len(first.hits) == 5  # coffee, java; coffee table; coffee grinder; dining chair; office chair
    got = RerankRetriever(bm25, searcher, "direct", depth=2).search(query, k=4)
    assert sorted(got.item_ids[:2]) == sorted(first.item_ids[:2]) and got.item_ids[2:] == first.item_ids[2:4]
    assert all(-1 <= h.score <= 1 for h in got.hits[:2]) and [h.score for h in got.hits[2:]] == [-2.0, -3.0]
    # in eval: reranking BM25's top 1 keeps BM25's whole ranking, so every metric at every depth is BM25's
    catalog = {i: Item(i, t) for i, t in CATALOG.items()}
    queries = {f"q{n}": Query(f"q{n}", q, "c", "dev") for n, q in enumerate(QUERIES + [query])}
    ds = Dataset(catalog, queries, {"q0": {"i1": 1}, "q1": {"i21": 1}, "q2": {"i17": 1}, "q3": {"i0": 1},
                                    "q4": {"i17": 1}}, "kitchen")
    systems = build_systems({"bm25": "bm25", "top1": f"bm25>1>{tiny_dir}:direct"}, ds, log=lambda *a: None)
    result = evaluate_systems(ds, "dev", systems, log=lambda *a: None)
    assert {q: [i for i, _ in run] for q, run in result["runs"]["top1"].items()} == \
        {q: [i for i, _ in run] for q, run in result["runs"]["bm25"].items()}
    assert result["systems"]["top1"]["overall"]["hitrate@10"] == result["systems"]["bm25"]["overall"]["hitrate@10"] > 0
