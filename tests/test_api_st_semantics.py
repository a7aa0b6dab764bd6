"""The encoders and `Searcher.search` as a notebook feeds them: pandas, generators, numpy, CoTs of
the wrong shape or type, and sentence-transformers' keywords as a real SentenceTransformer reads them."""
from __future__ import annotations

import numpy as np
import pytest

from lrem.index import ItemIndex
from lrem.search import Searcher

CATALOG = {"a": "teapot", "b": "coffee, java", "c": "corkscrew, bottle screw", "d": "sofa, couch"}


@pytest.fixture(scope="module")
def searcher(tiny):
    return Searcher(tiny, ItemIndex.build(tiny, CATALOG, show_progress=False))


def test_a_dataframe_is_refused_not_embedded_as_its_column_names(tiny):
    """encode_items(df) embedded the column name "title" as the one item: (1, dim) for a 3-row frame."""
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"title": ["teapot", "sofa, couch", "corkscrew"], "brand": ["x", "y", "z"]})
    for call in (lambda: tiny.encode_items(df), lambda: tiny.encode_queries(df, mode="direct")):
        with pytest.raises(TypeError, match=r"got a DataFrame; pass one column \(df\['title'\]\)"):
            call()
    ref = tiny.encode_items(["teapot", "sofa, couch", "corkscrew"])
    np.testing.assert_allclose(tiny.encode_items(df["title"]), ref, atol=1e-6)  # the ways the message names
    np.testing.assert_allclose(tiny.encode_items(df.to_dict("records")), ref, atol=1e-6)


def test_cots_as_the_queries_are_taken_and_bad_ones_named(tiny, searcher):
    """cots=[..., None] failed with "'NoneType' object has no attribute 'strip'", a generator with
    "no len()", and a dict {query: cot} of the right length embedded its keys as the CoTs."""
    pd = pytest.importorskip("pandas")
    queries = ["a hot drink", "a seat"]
    ref = tiny.encode_queries(queries, cots=["tea", "chair"])
    for cots in ((c for c in ["tea", "chair"]), np.array(["tea", "chair"]), pd.Series(["tea", "chair"], index=[7, 3])):
        got = tiny.encode_queries(queries, cots=cots)
        assert got.cots == ["tea", "chair"]
        np.testing.assert_allclose(got.embeddings, ref.embeddings, atol=1e-6)
    for cots, error, match in (([None, "chair"], ValueError, r"cots\[0\] is not a string \(NoneType\)"),
                               (["tea", 3], ValueError, r"cots\[1\] is not a string \(int\)"),
                               ({"a hot drink": "tea", "a seat": "chair"}, TypeError,
                                "cots: expected a list .* got a dict"),
                               (["tea"], ValueError, "1 cots for 2 queries")):
        with pytest.raises(error, match=match):
            tiny.encode_queries(queries, cots=cots)
        with pytest.raises(error, match=match):
            searcher.search(queries, k=2, cots=cots)


def test_one_query_with_a_list_of_cots_is_refused_by_search(searcher):
    """search("q", cots=["x"]) wrapped the list into one CoT: an AttributeError from .strip()."""
    with pytest.raises(ValueError, match="one query .* one CoT as a string, got list"):
        searcher.search("a hot drink", k=2, cots=["tea"])
    assert searcher.search("a hot drink", k=2, cots="tea") == searcher.search(["a hot drink"], k=2, cots=["tea"])[0]


def test_precision_and_device_keywords_read_as_sentence_transformers_reads_them(tiny):
    """precision=None is float32 to SentenceTransformer.encode (it was refused here), and a list of
    devices, its multi-process pool, is refused in one line rather than with torch's TypeError."""
    st = pytest.importorskip("sentence_transformers")
    from lrem.baselines import minilm_model_path

    try:
        path = minilm_model_path()
    except ImportError:
        pytest.skip("the MiniLM wheel is not installed")
    mini = st.SentenceTransformer(path, device="cpu")
    titles = ["teapot", "sofa, couch", "corkscrew"]
    np.testing.assert_array_equal(mini.encode(titles, precision=None), mini.encode(titles))  # its reading
    np.testing.assert_array_equal(tiny.encode_items(titles, precision=None), tiny.encode_items(titles))
    np.testing.assert_array_equal(tiny.encode_query(titles, mode="direct", precision=None),
                                  tiny.encode_query(titles, mode="direct"))
    # the quantisations are its own, on the batch: the same as quantising what it returns
    for precision in ("int8", "ubinary"):
        np.testing.assert_array_equal(mini.encode(titles, precision=precision),
                                      st.quantize_embeddings(mini.encode(titles), precision))
        np.testing.assert_array_equal(tiny.encode_items(titles, precision=precision),
                                      st.quantize_embeddings(tiny.encode_items(titles), precision))
    with pytest.raises(ValueError, match=r"device=\['cpu', 'cpu'\]: lrem encodes in this process on one device"):
        tiny.encode_items(titles, device=["cpu", "cpu"])


def test_candidates_given_as_a_string_are_refused_not_spelt_out(tiny):
    """candidates=["teapot"] for one query in a list showed the titles "t; e; a; p; o; t"."""
    ref = tiny.encode_queries(["a hot drink"], mode="direct", candidates=[["teapot"]]).embeddings
    np.testing.assert_array_equal(tiny.encode_query("a hot drink", mode="direct", candidates=["teapot"]), ref[0])
    for texts, candidates in ((["a hot drink"], ["teapot"]), ("a hot drink", "teapot")):
        with pytest.raises(ValueError, match=r"candidates\[0\]: 'teapot' is a string; give each query a list"):
            tiny.encode_queries(texts, mode="direct", candidates=candidates)


def test_a_given_cots_retriever_takes_one_query_as_a_string(searcher, tmp_path):
    """`MODEL:cots=FILE` looked up one CoT per character of a string query and failed."""
    import json

    from lrem.data import Dataset, Item, Query
    from lrem.search import build_systems

    searcher.index.save(tmp_path / "idx")
    (tmp_path / "cots.jsonl").write_text(json.dumps({"query": "a hot drink", "cot": "tea"}) + "\n")
    ds = Dataset({i: Item(i, t) for i, t in CATALOG.items()}, {"q": Query("q", "a hot drink", "c", "dev")},
                 {"q": {"a": 1}}, "toy")
    given = build_systems({"g": f"{tmp_path / 'idx'}:cots={tmp_path / 'cots.jsonl'}"}, ds, log=lambda *_: None)["g"]
    one, many = given.search("a hot drink", k=2), given.search(["a hot drink"], k=2)
    want = searcher.search("a hot drink", k=2, cots="tea")  # (its model loaded in float32: the ids, not the scores)
    assert one.cot == many[0].cot == "tea" and one.item_ids == many[0].item_ids == want.item_ids and len(many) == 1


def test_a_batch_size_that_is_no_whole_number_is_named(tiny):
    """batch_size=2.5, "4" or None failed inside torch with a TypeError naming nothing."""
    for bad in (0, 2.5, "4", None, True):
        with pytest.raises(ValueError, match=f"batch_size={bad!r}; must be a whole number >= 1"):
            tiny.encode_items(["teapot"], batch_size=bad)
    assert tiny.encode_items(["teapot"], batch_size=np.int64(2)).shape == (1, tiny.dim)


def test_a_catalog_as_a_pandas_series_indexes_as_its_dict(tiny):
    """ItemIndex.build on a Series indexed by item id failed inside ('ArrowStringArray' object is
    not callable); a list, whose ids are unknown, is refused with what to pass."""
    pd = pytest.importorskip("pandas")
    from_series = ItemIndex.build(tiny, pd.Series(CATALOG), show_progress=False)
    from_dict = ItemIndex.build(tiny, CATALOG, show_progress=False)
    assert from_series.item_ids == from_dict.item_ids and from_series.titles == from_dict.titles
    with pytest.raises(ValueError, match=r"catalog: expected a mapping of item id -> title or item, got a list"):
        ItemIndex.build(tiny, list(CATALOG.values()), show_progress=False)
