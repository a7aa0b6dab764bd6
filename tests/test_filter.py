"""Filtered search: only items whose category / brand / color match, searched inside FAISS (its ID
selector), in the library, every search mode, hybrid search, `lrem search --filter` and `lrem serve`.
The tiny random model, real FAISS, a real server on 127.0.0.1."""
from __future__ import annotations

import json

import faiss
import httpx
import numpy as np
import pytest

from lrem.data import Item
from lrem.index import ItemIndex, stored_vectors
from lrem.search import Searcher
from lrem.serve import ServeConfig, background_server, create_app

KINDS = ["mug", "teapot", "kettle", "sofa", "rug", "lamp", "desk", "chair"]
CATALOG = {f"i{j}": Item(f"i{j}", f"{KINDS[j % 8]} model {j}", category="kitchen" if j % 8 < 3 else "home",
                         brand=["Acme", "Zed", "Orla"][j % 3], color="red" if j % 5 == 0 else None) for j in range(120)}
QUERIES = ["a teapot for green tea", "something to sit on", "a red lamp"]


def matching(where: dict) -> set[str]:
    def ok(item: Item) -> bool:
        return all(getattr(item, f) in ([v] if isinstance(v, str) else v) for f, v in where.items())
    return {i for i, item in CATALOG.items() if ok(item)}


@pytest.fixture(scope="module")
def searcher(tiny):
    return Searcher(tiny, ItemIndex.build(tiny, CATALOG, show_progress=False))


@pytest.mark.parametrize("brute_force_up_to,cache_bytes", [(0, 2**29), (10_000, 2**29), (10_000, 64)],
                         ids=["faiss-selector", "brute-force", "brute-force-vectors-over-the-cache-budget"])
@pytest.mark.parametrize("factory,params", [("Flat", ""), ("HNSW8,Flat", "efSearch=256"), ("IVF4,Flat", "nprobe=4"),
                                            ("IVF4,PQ4x4fs,RFlat", "nprobe=4,k_factor_rf=64")])
def test_a_filtered_search_is_the_exact_top_k_of_the_matching_items(tiny, tmp_path, factory, params,
                                                                    brute_force_up_to, cache_bytes, monkeypatch):
    """Inside FAISS (its ID selector), or, where few items match, by brute force over their vectors
    (cached with the filter, or read for each call where they would not fit the cache's budget)."""
    monkeypatch.setattr("lrem.index.BRUTE_FORCE_FILTER_UP_TO", brute_force_up_to)
    monkeypatch.setattr("lrem.index.FILTER_CACHE_BYTES", cache_bytes)
    index = ItemIndex.build(tiny, CATALOG, factory=factory, search_params=params, show_progress=False)
    index.save(tmp_path / "idx")
    index = ItemIndex.load(tmp_path / "idx")  # facets come back from items.jsonl, the search params from meta
    assert sorted(index.facets) == ["brand", "category", "color"]
    q = tiny.encode_queries(QUERIES, mode="direct").embeddings
    vectors = stored_vectors(index.index) if "PQ" not in factory else None
    for where in ({"category": "kitchen"}, {"category": "home", "brand": ["Zed", "Orla"]}, {"color": "red"}):
        allowed = sorted(matching(where), key=lambda i: int(i[1:]))
        scores, ids = index.search(q, k=10, where=where)
        assert all(set(row) <= set(allowed) for row in ids) and all(len(row) == min(10, len(allowed)) for row in ids)
        if vectors is not None:  # exact where the codes are the vectors (HNSW: efSearch above the catalog size)
            pos = [int(i[1:]) for i in allowed]
            want = [[allowed[j] for j in np.argsort(-(vectors[pos] @ qv), kind="stable")[:10]] for qv in q]
            assert ids == want
    assert index.search(q, k=5, where={"brand": "Nobody"})[1] == [[], [], []]
    with pytest.raises(ValueError, match="value 'Ac\\\\x01me' is not a string without control characters"):
        index.search(q, k=5, where={"brand": "Ac\x01me"})
    with pytest.raises(ValueError, match="filter field 'size': this index can filter on brand, category, color"):
        index.search(q, k=5, where={"size": "XL"})


@pytest.mark.parametrize("mode", ["direct", "reason", "auto", "grounded"])
def test_every_mode_and_hybrid_keep_to_the_filter(searcher, mode):
    where = {"category": "kitchen", "brand": "Acme"}
    allowed = matching(where)
    for result in searcher.search(QUERIES, k=5, mode=mode, where=where):
        assert result.item_ids and set(result.item_ids) <= allowed
    for result in searcher.hybrid(mode, 5.0, where=where).search(["teapot", "lamp"], k=5):
        assert result.item_ids and set(result.item_ids) <= allowed
    # unfiltered, the same queries reach other items
    assert not set(searcher.search(QUERIES, k=20, mode="direct")[0].item_ids) <= allowed
    # a filter nothing matches: no items, whatever the mode (auto's router gets no scores to read)
    assert [r.item_ids for r in searcher.search(QUERIES, k=5, mode=mode, where={"brand": "Nobody"})] == [[], [], []]


@pytest.mark.parametrize("factory,params", [("IVF64,Flat", "nprobe=2"), ("IVF64,PQ8x4fs,RFlat", "nprobe=2"),
                                            ("OPQ8,IVF16,Flat", "nprobe=2"), ("HNSW4,Flat", "efSearch=8")])
def test_a_selective_filter_gets_k_items_where_the_probed_lists_hold_fewer(factory, params, monkeypatch):
    """FAISS's selector search falls short (2 of 64 lists probed, a narrow beam); the matching
    items are then scored exactly. By default so few matches are searched by brute force: exact."""
    monkeypatch.setattr("lrem.index.BRUTE_FORCE_FILTER_UP_TO", 0)  # the FAISS path and its fallback
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"i{j}" for j in range(6000)]
    index = ItemIndex.from_embeddings(x, ids, ids, factory, params)
    index.facets = {"brand": ["rare" if j % 300 == 0 else "common" for j in range(6000)]}  # 20 items match
    scores, got = index.search(x[:8], k=10, where={"brand": "rare"})
    rare = np.arange(0, 6000, 300)
    want = [[f"i{rare[j]}" for j in np.argsort(-(x[rare] @ q), kind="stable")[:10]] for q in x[:8]]
    assert [len(row) for row in got] == [10] * 8
    if "PQ" not in factory:  # the full vectors: exact
        assert got == want
    assert scores.min() > -1.0001  # no -3.4e38 padding reaches the router
    monkeypatch.undo()
    index = ItemIndex(index.index, ids, ids, index.meta, facets=index.facets)  # the same FAISS index, a cold cache
    scores, got = index.search(x[:8], k=10, where={"brand": "rare"})
    assert got == want  # every recipe here gives its vectors back (RFlat: the refine stage's)


def test_serve_filter(searcher):
    with background_server(create_app(searcher, ServeConfig(hybrid=True))) as url:
        for body in ({"mode": "direct"}, {"mode": "reason", "hybrid": True}):
            r = httpx.post(url + "/search", json={"query": "a teapot", "k": 8, "filter": {"brand": ["Zed", "Orla"],
                                                  "category": "kitchen"}, **body}, timeout=60)
            assert r.status_code == 200, r.text
            got = [i["item_id"] for i in r.json()["items"]]
            assert len(got) == 8 and set(got) <= matching({"brand": ["Zed", "Orla"], "category": "kitchen"})
        r = httpx.post(url + "/search", json={"query": "a teapot", "filter": {"brand": "Nobody"}}, timeout=60)
        assert r.status_code == 200 and r.json()["items"] == []  # mode auto, the default
        r = httpx.post(url + "/search", json={"query": "a teapot", "filter": {"size": "XL"}}, timeout=60)
        assert r.status_code == 422 and "can filter on brand, category, color" in r.json()["detail"]
        r = httpx.post(url + "/search", json={"query": "a teapot", "filter": {"brand": 3}}, timeout=60)
        assert r.status_code == 422
        assert httpx.get(url + "/info", timeout=60).json()["filter_fields"] == ["brand", "category", "color"]


def test_cli_filter(tiny, tiny_dir, tmp_path):
    from test_reliability import lrem

    data = tmp_path / "data"
    data.mkdir()
    (data / "catalog.jsonl").write_text("".join(json.dumps({k: v for k, v in vars(x).items() if v is not None}) + "\n"
                                                for x in CATALOG.values()))
    (data / "queries.jsonl").write_text('{"query_id": "q", "text": "cup", "category": "c", "split": "dev"}\n')
    (data / "qrels.jsonl").write_text('{"query_id": "q", "item_id": "i0", "relevance": 1}\n')
    assert lrem("index", "--data", str(data), "--out", str(tmp_path / "idx"), "--model", str(tiny_dir)).returncode == 0
    p = lrem("search", "--index", str(tmp_path / "idx"), "--mode", "direct", "--json", "-k", "6",
             "--filter", "category=home", "--filter", "brand=Zed|Acme", "a lamp")
    assert p.returncode == 0, p.stderr[-2000:]
    [row] = [json.loads(line) for line in p.stdout.splitlines()]
    assert len(row["items"]) == 6 and {i["item_id"] for i in row["items"]} <= matching({"category": "home",
                                                                                       "brand": ["Zed", "Acme"]})
    p = lrem("search", "--index", str(tmp_path / "idx"), "--mode", "direct", "--filter", "brand=acme|Zed", "lamp")
    assert p.returncode == 0 and "note: no item has brand='acme' (filters match exactly; the index has 'Acme')" \
        in p.stderr, p.stderr[-2000:]
    assert "brand='Zed'" not in p.stderr  # a value some item has gets no note
    p = lrem("search", "--index", str(tmp_path / "idx"), "--filter", "colour=red", "lamp")  # checked at parse time
    assert p.returncode == 2 and "'colour' is not a filter field" in p.stderr and "Traceback" not in p.stderr
    # a field the catalog never had: the error names the ones the index can filter on
    bare = ItemIndex.build(tiny, {"i0": "mug", "i1": "cup"}, show_progress=False)
    with pytest.raises(ValueError, match="filter field 'brand': this index can filter on none"):
        bare.search(tiny.encode_queries(["mug"], mode="direct").embeddings, k=1, where={"brand": "Zed"})


def test_brute_force_ties_keep_catalog_order_at_the_kth_place():
    """Equal scores rank in catalog order, also the ones tied at the k-th place (as FAISS's Flat)."""
    from lrem.index import exact_top_k

    x = np.zeros((5000, 4), np.float32)
    x[:, 0] = np.random.default_rng(0).integers(0, 20, 5000)  # many equal integer scores
    q = np.array([[1, 0, 0, 0]], np.float32)
    scores, top = exact_top_k(q, x, np.arange(5000), 50)
    want = np.argsort(-x[:, 0], kind="stable")[:50]
    assert top[0].tolist() == want.tolist() and scores[0].tolist() == x[want, 0].tolist()
    assert exact_top_k(q, x[:7], np.arange(7) * 3, 7)[1][0].tolist() == (np.argsort(-x[:7, 0], kind="stable") * 3).tolist()


def test_a_filter_value_that_is_not_a_string_is_one_clear_error(searcher):
    q = searcher.model.encode_queries(["tea"], mode="direct").embeddings
    for where in ({"brand": 3}, {"brand": ["Acme", 3]}, {"brand": None}):
        with pytest.raises(ValueError, match="filter field 'brand'"):  # not a TypeError from sorting the cache key
            searcher.index.search(q, 3, where=where)


def test_auto_searches_directly_where_a_filter_matches_fewer_items_than_the_router_reads(searcher):
    from lrem.router import Router

    router = Router(margin=10.0)  # every query looks ambiguous: it would reason
    narrow = {"brand": "Acme", "color": "red", "category": "kitchen"}
    assert 0 < len(matching(narrow)) < router.depth
    results, reasoned = searcher.search_auto(QUERIES, k=5, router=router, where=narrow)
    assert reasoned == [False] * len(QUERIES) and all(set(r.item_ids) == matching(narrow) for r in results)
    assert all(searcher.search_auto(QUERIES, k=5, router=router, where={"category": "home"})[1])


def test_a_filter_of_many_values_reads_the_column_once():
    """np.isin over a column of strings compared the whole column once per value: a filter of 100
    brands took 3 s at 1M items. Counted here as the string comparisons the column's values make."""
    compared = []

    class Counted(str):
        def __eq__(self, other):
            compared.append(1)
            return str.__eq__(self, other)

        __hash__ = str.__hash__

    n, brands = 2_000, [Counted(f"b{j}") for j in range(200)]
    column = [brands[j % 200] if j % 7 else None for j in range(n)]
    index = ItemIndex(faiss.IndexFlatIP(4), [f"i{j}" for j in range(n)], [""] * n, facets={"brand": column})
    for wanted in (brands[:150] + ["nobody"], brands[150:], "b3"):
        compared.clear()
        got = index.allowed({"brand": wanted}).tolist()
        assert len(compared) <= n  # at most one per item (np.isin: one per item and value, 257,000)
        assert got == [j for j in range(n) if column[j] in ({wanted} if isinstance(wanted, str) else set(wanted))]
