"""The Python API's inputs: one string, empty lists, bad items and queries, sentence-transformers'
keywords, on the built-in model and a real FAISS index."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lrem.data import Item
from lrem.index import ItemIndex
from lrem.search import Searcher, SearchResult

CATALOG = {"a": "teapot", "b": "coffee, java", "c": "corkscrew, bottle screw", "d": "sofa, couch"}


@pytest.fixture(scope="module")
def searcher(real_model):
    return Searcher(real_model, ItemIndex.build(real_model, CATALOG, show_progress=False))


def test_one_query_string_gives_one_result(searcher):
    one = searcher.search("a hot drink", k=2, mode="direct")
    assert isinstance(one, SearchResult) and one == searcher.search(["a hot drink"], k=2, mode="direct")[0]
    assert searcher.search("a hot drink", k=2, cots="tea") == searcher.search(["a hot drink"], k=2, cots=["tea"])[0]
    result, reasoned = searcher.search_auto("a hot drink", k=2)
    assert (result, reasoned) == tuple(x[0] for x in searcher.search_auto(["a hot drink"], k=2))
    retriever = searcher.retriever("direct")
    assert retriever.search(["a hot drink"], k=2) == [one] and retriever.n_queries == 1  # retrievers: lists
    assert searcher.candidates("a hot drink", k=2) == searcher.candidates(["a hot drink"], k=2)[0]


def test_empty_inputs_give_empty_outputs(searcher):
    model = searcher.model
    for emb in (model.encode_items([]), model.encode_queries([], mode="direct").embeddings, model.encode_query([])):
        assert emb.shape == (0, model.dim) and emb.dtype == np.float32
    assert model.encode_queries([]).cots == []
    assert searcher.search([], k=3) == [] and searcher.search_auto([], k=3) == ([], [])
    assert searcher.candidates([]) == []
    with pytest.raises(ValueError, match="mode='nope'"):  # still checked without queries
        searcher.search([], mode="nope")


@pytest.mark.parametrize("items,error,message", [
    ([None], TypeError, r"items\[0\]: None; expected a title string"),
    (["mug", 1], TypeError, r"items\[1\]: 1; expected a title string"),
    ([{"brand": "x"}], ValueError, r"items\[0\]: \{'brand': 'x'\}; expected a title string"),
    ([{"title": None}], ValueError, r"items\[0\]: .*expected a title string"),
    ([{"title": 3}], ValueError, r"items\[0\] title is not a string \(int\)"),
    (["mug", " "], ValueError, r"items\[1\] is empty"),
    ([Item("i", "mug\x1b[2J")], ValueError, r"items\[0\] title holds a control character \(U\+001B"),
])
def test_bad_items_are_refused_by_index(real_model, items, error, message):
    with pytest.raises(error, match=message):
        real_model.encode_items(items)


@pytest.mark.parametrize("texts,message", [
    (["\x00x"], r"texts\[0\] holds a control character \(U\+0000 at character 1\)"),
    (["tea", ""], r"texts\[1\] is empty"),
    (["tea", None], r"texts\[1\] is not a string \(NoneType\)"),
    ("\x07", r"query holds a control character"),
])
def test_bad_queries_are_refused_by_index(real_model, texts, message):
    with pytest.raises(ValueError, match=message):
        real_model.encode_queries(texts, mode="direct")


def test_valid_items_pass_the_checks(real_model):
    ref = real_model.encode_items(["mug"])
    np.testing.assert_allclose(real_model.encode_items([Item("i", "mug"), {"title": "mug", "brand": None}]),
                               np.vstack([ref, ref]), atol=1e-5)
    with pytest.raises(TypeError, match=r"list\(catalog.values\(\)\)"):  # a catalog dict would embed its ids
        real_model.encode_items({"a": "mug"})


def test_auto_mode_says_it_needs_an_index(searcher):
    with pytest.raises(ValueError, match=r"mode='auto' needs an index.*Searcher\(model, index\)"
                                         r"\.search\(queries, mode='auto'\) \(or \.search_auto\)"):
        searcher.model.encode_queries(["a hot drink"], mode="auto")
    with pytest.raises(ValueError, match="mode='grounded'; the model encodes in 'reason' or 'direct'.*need an index"):
        searcher.model.encode_query("a hot drink", mode="grounded")
    assert len(searcher.search(["a hot drink"], k=2, mode="auto")[0].hits) == 2


def test_sentence_transformers_keywords(real_model, capsys):
    titles = ["teapot", "sofa, couch"]
    ref = real_model.encode_items(titles)
    capsys.readouterr()
    got = real_model.encode_items(titles, show_progress_bar=True, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_array_equal(got, ref)
    assert "items" in capsys.readouterr().err  # the alias turned tqdm's bar on
    for kwargs in ({"convert_to_tensor": True}, {"convert_to_numpy": False}):
        t = real_model.encode_document(titles, **kwargs)
        assert isinstance(t, torch.Tensor)
        np.testing.assert_allclose(t.cpu().numpy(), ref, atol=1e-6)
    q = real_model.encode_query("a hot drink", mode="direct", convert_to_tensor=True)
    assert isinstance(q, torch.Tensor) and q.shape == (real_model.dim,)
    np.testing.assert_allclose(q.numpy(), real_model.encode_query("a hot drink", mode="direct"), atol=1e-6)
    with pytest.raises(ValueError, match="normalize_embeddings=False: lrem's embeddings are always L2-normalised"):
        real_model.encode_queries(["tea"], mode="direct", normalize_embeddings=False)
    with pytest.raises(TypeError, match="device"):  # other keywords stay errors
        real_model.encode_items(titles, device="cpu")
    assert real_model.get_sentence_embedding_dimension() == real_model.dim == ref.shape[1]


def test_doctests():
    import doctest

    import lrem.model

    assert doctest.testmod(lrem.model).failed == 0  # as_batch's examples
