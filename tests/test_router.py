"""lrem.router and the `auto` mode it drives in Searcher and `lrem eval` (tiny random model, real FAISS)."""
from __future__ import annotations

import doctest

import numpy as np
import pytest

import lrem.router
from lrem.data import Dataset, Item, Query
from lrem.evaluate import evaluate_systems
from lrem.search import build_systems
from lrem.index import ItemIndex
from lrem.router import MIN_SAMPLES, Router
from lrem.search import Searcher

TITLES = ["corkscrew, bottle screw", "teapot", "coffee, java", "mug", "spatula", "wine glass", "sofa, couch",
          "floor lamp", "rug", "throw pillow", "dining chair", "coffee table", "bookcase", "bed frame", "mirror",
          "curtain", "desk", "office chair", "saucepan", "kettle"]
QUERIES = ["a device for pulling corks", "hot drink", "something to sit on", "a place to keep books", "cup",
           "light for the living room", "soft thing for the sofa", "boil water", "window covering", "tea",
           "a table for the sofa", "glass for wine", "where to sleep", "see yourself", "cook pasta", "rug",
           "study furniture", "an espresso", "morning beverage", "a seat with wheels", "big mug", "wool carpet",
           "kitchen tool for flipping", "somewhere to put your cup"]


def test_doctests():
    import lrem.router_base
    import lrem.router_fit
    import lrem.router_learned

    result = doctest.testmod(lrem.router)
    assert result.attempted >= 3 and result.failed == 0
    for mod in (lrem.router_base, lrem.router_learned, lrem.router_fit):  # the parts that moved out
        result = doctest.testmod(mod)
        assert result.attempted > 0 and result.failed == 0, mod.__name__


def test_fixed_margin_and_long_queries():
    scores = np.array([[0.9, 0.8, 0.3], [0.6, 0.59, 0.58], [0.7, 0.7, 0.7]])  # margins 0.6, 0.02, 0.0
    assert Router(margin=0.05, depth=3).decide(["a", "b", "c"], scores) == [False, True, True]
    assert Router(margin=0.0, depth=3).decide(["a", "b", "c"], scores) == [False, False, False]
    long = Router(margin=0.0, long_query_words=3, depth=3)
    assert long.decide(["one two three", "one two", "x"], scores) == [True, False, False]
    assert Router(share=1.0, depth=3).decide(["a", "b", "c"], scores) == [True, True, True]
    # a NaN margin compares False with every margin, so it reasoned on nothing without a word
    with pytest.raises(ValueError, match="margin >= 0"):
        Router(margin=float("nan"))


def test_share_is_a_budget_whatever_the_score_scale():
    rng = np.random.default_rng(0)
    for scale in (0.01, 1.0):  # an untrained model's tiny margins and a trained one's wide ones
        router = Router(share=0.3, depth=2)
        routed = []
        for _ in range(40):
            top1 = rng.uniform(0.5, 1.0, size=10)
            scores = np.stack([top1, top1 - scale * rng.uniform(0, 1, size=10)], axis=1)  # (10, 2)
            routed += router.decide(["q"] * 10, scores)
        later = routed[MIN_SAMPLES:]
        assert 0.2 < sum(later) / len(later) < 0.4, scale
        assert router.describe()["margins_seen"] == 400


def test_calibrate_fixes_a_margin_for_a_share():
    scores = np.array([[1.0, 1.0 - m] for m in np.linspace(0.01, 0.5, 20)])
    r = Router(depth=2).calibrate(scores, 0.25)
    assert sum(r.decide(["q"] * 20, scores)) == 5 and r.share == 0.0


@pytest.mark.parametrize("kwargs", [{"margin": -1}, {"share": 1.5}, {"depth": 1}, {"long_query_words": -2}])
def test_bad_settings_raise(kwargs):
    with pytest.raises(ValueError):
        Router(**kwargs)


@pytest.fixture(scope="module")
def searcher(tiny):
    return Searcher(tiny, ItemIndex.build(tiny, {f"i{j}": t for j, t in enumerate(TITLES)}, show_progress=False))


def test_searcher_auto_reasons_only_where_routed(searcher):
    direct_scores, _ = searcher.index.search(searcher.model.encode_queries(QUERIES, mode="direct").embeddings, 10)
    router = Router().calibrate(direct_scores, 0.5)
    results, routed = searcher.search_auto(QUERIES, k=5, router=router)
    assert 0 < sum(routed) < len(QUERIES)
    direct = searcher.search(QUERIES, k=5, mode="direct")
    reasoned = searcher.search([q for q, r in zip(QUERIES, routed) if r], k=5, mode="reason")
    reasoned_iter = iter(reasoned)
    for res, was_routed, d in zip(results, routed, direct):
        expected = next(reasoned_iter) if was_routed else d
        assert res.item_ids == expected.item_ids and res.cot == expected.cot
        assert len(res.hits) == 5
    assert all(r.cot == "" for r, was in zip(results, routed) if not was)


def test_eval_measures_auto_quality_and_reasoned_share(tiny, searcher, tmp_path):
    searcher.index.save(tmp_path / "idx")  # meta names the tiny model's folder, so eval loads it
    catalog = {f"i{j}": Item(f"i{j}", t) for j, t in enumerate(TITLES)}
    queries = {f"q{j}": Query(f"q{j}", t, "demo", "dev", hard=j % 2 == 0) for j, t in enumerate(QUERIES)}
    qrels = {f"q{j}": {f"i{j % len(TITLES)}": 1} for j in range(len(QUERIES))}
    ds = Dataset(catalog, queries, qrels, name="toy")
    idx = tmp_path / "idx"
    systems = build_systems({"direct": f"{idx}:direct", "reason": f"{idx}:reason", "auto": f"{idx}:auto",
                             "half": f"{idx}:auto@0.5"}, ds, log=lambda m: None)
    result = evaluate_systems(ds, "dev", systems, k=10, log=lambda m: None)
    share = {name: s["reasoned_share"] for name, s in result["systems"].items()}
    assert share["direct"] == 0.0 and share["reason"] == 1.0
    assert 0.3 <= share["half"] <= 0.7  # 24 queries in one batch: the budget applies from the start
    assert 0.0 <= share["auto"] <= 1.0
    for s in result["systems"].values():
        assert 0.0 <= s["overall"]["hitrate@10"] <= 1.0 and s["ms_per_query"] > 0
    with pytest.raises(ValueError, match="auto@SHARE"):
        build_systems({"bad": f"{idx}:auto@2"}, ds)
    with pytest.raises(ValueError, match="auto@SHARE"):
        build_systems({"bad": f"{idx}:direct@0.5"}, ds)
