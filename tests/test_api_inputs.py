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
    np.testing.assert_array_equal(real_model.encode_items(titles, device="cpu"), ref)  # already there: no move
    with pytest.raises(TypeError, match="truncate_dim"):  # other keywords stay errors
        real_model.encode_items(titles, truncate_dim=64)
    assert real_model.get_sentence_embedding_dimension() == real_model.dim == ref.shape[1]


def test_sentence_transformers_precision(real_model):
    """precision= quantises as sentence-transformers does (its own quantize_embeddings), for items
    and queries, one input or many; an unknown precision is refused before anything is embedded."""
    from sentence_transformers.util.quantization import quantize_embeddings

    titles = ["teapot", "sofa, couch", "corkscrew"]
    ref = real_model.encode_items(titles)
    for precision, dtype, width in (("ubinary", np.uint8, ref.shape[1] // 8), ("binary", np.int8, ref.shape[1] // 8),
                                    ("int8", np.int8, ref.shape[1]), ("uint8", np.uint8, ref.shape[1])):
        got = real_model.encode_items(titles, precision=precision)
        assert got.dtype == dtype and got.shape == (3, width), precision
        np.testing.assert_array_equal(got, quantize_embeddings(ref, precision))
    bits = real_model.encode_document("teapot", precision="ubinary", convert_to_tensor=True)
    assert isinstance(bits, torch.Tensor) and bits.dtype == torch.uint8 and bits.shape == (ref.shape[1] // 8,)
    np.testing.assert_array_equal(bits.numpy(), np.packbits(ref[0] > 0))
    queries = real_model.encode_queries(["a hot drink", "a seat"], mode="direct", precision="ubinary")
    direct = real_model.encode_query(["a hot drink", "a seat"], mode="direct")
    np.testing.assert_array_equal(queries.embeddings, np.packbits(direct > 0, axis=-1))
    assert len(queries.cots) == 2
    with pytest.raises(ValueError, match="precision='float16'; one of 'float32', 'int8'"):
        real_model.encode_items(titles, precision="float16")


def test_doctests():
    import doctest

    import lrem.model

    assert doctest.testmod(lrem.model).failed == 0  # as_batch's examples


def test_item_ids_are_distinct_strings_checked_before_any_embedding(searcher, tmp_path):
    model = searcher.model
    for catalog, match in (({1: "teapot", 2: "mug"}, "item id 1 is a int"), ({}, "no items"),
                           (["teapot", "mug"], "expected a mapping")):
        with pytest.raises(ValueError, match=match):
            ItemIndex.build(model, catalog, show_progress=False)
    emb = model.encode_items(["teapot", "mug"])
    with pytest.raises(ValueError, match="'p' appears twice"):
        ItemIndex.from_embeddings(emb, ["p", "p"], ["teapot", "mug"])
    ItemIndex.from_embeddings(emb, ["p", "q"], ["teapot", "mug"]).save(tmp_path / "idx")
    assert ItemIndex.load(tmp_path / "idx").item_ids == ["p", "q"]  # what build accepts, load reads back


def test_k_may_be_a_numpy_integer_and_one_vector_is_one_query(searcher):
    q = searcher.model.encode_queries("a hot drink", mode="direct").embeddings  # (dim,)
    scores, ids = searcher.index.search(q, np.int64(2))
    assert scores.shape == (1, 2) and ids == searcher.index.search(q[None], 2)[1]
    assert searcher.search("a hot drink", k=np.int64(2), mode="direct").item_ids == ids[0]
    for k in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="k="):
            searcher.search("a hot drink", k=k, mode="direct")
    with pytest.raises(ValueError, match="k=0"):
        searcher.index.search(q, 0)


def test_search_defaults_to_auto_as_the_cli_and_the_server(searcher):
    assert searcher.search("a hot drink", k=2) == searcher.search_auto("a hot drink", k=2)[0]
    with pytest.raises(ValueError, match="cots with mode='auto'"):
        searcher.search("a hot drink", k=2, mode="auto", cots="tea")
    with pytest.raises(ValueError, match="one query .* one CoT as a string"):
        searcher.model.encode_queries("a hot drink", cots=["tea"])
    with pytest.raises(TypeError, match="items: expected a list .* got NoneType"):
        searcher.model.encode_items(None)


def test_every_retriever_takes_one_query_as_a_string_and_checks_k(searcher):
    from lrem.rerank import RerankRetriever

    for retriever in (searcher.hybrid("direct"), searcher.lexical(),
                      RerankRetriever(searcher.lexical(), searcher, "direct", depth=4)):
        one = retriever.search("a teapot for coffee", k=2)
        assert isinstance(one, SearchResult) and one == retriever.search(["a teapot for coffee"], k=2)[0]
        assert len(one.hits) == 2  # not one result per character
        for k in (0, -1, 2.5):  # -1 cut the last of 100 candidates, 2.5 was a TypeError
            with pytest.raises(ValueError, match="k="):
                retriever.search(["a teapot for coffee"], k=k)


@pytest.mark.parametrize("factory,params", [("HNSW16,Flat", "efSearch=0"), ("HNSW16,Flat", "efSearch=-3"),
                                            ("IVF2,Flat", "nprobe=0"), ("IVF2,Flat", "nprobe=nan"),
                                            ("IVF2,Flat", "nprobe=2.7"), ("IVF2,Flat", "nprobe=3e9"),
                                            ("IVF2,Flat", "nprobe=x")])
def test_search_parameters_faiss_would_take_and_then_fail_on_are_refused(searcher, factory, params):
    """efSearch=0 built and then returned one wrong hit per query; nprobe=0 failed every search
    with a FAISS traceback."""
    from lrem.index import check_factory

    with pytest.raises(ValueError, match=f"bad FAISS search parameter '{params}'"):
        check_factory(factory, params, searcher.model.dim, 100)
    check_factory(factory, params.split("=")[0] + "=2", searcher.model.dim, 100)  # a count of 2 is fine


def test_item_ids_with_whitespace_or_empty_are_refused(searcher):
    emb = searcher.model.encode_items(["teapot", "mug"])
    for bad in ("sku 1", "", "x\ty"):  # a TREC run line splits on whitespace: lrem's own reader refused the file
        with pytest.raises(ValueError, match="empty or holds whitespace"):
            ItemIndex.from_embeddings(emb, ["p", bad], ["teapot", "mug"])


def test_similarity_of_tensors_is_a_tensor_with_its_gradient(searcher):
    from lrem.model import similarity

    a = torch.tensor([[3.0, 4.0]], requires_grad=True)
    sim = similarity(a, np.array([[6.0, 8.0], [-4.0, 3.0]]))
    assert isinstance(sim, torch.Tensor) and torch.allclose(sim, torch.tensor([[1.0, 0.0]]), atol=1e-6)
    sim.sum().backward()
    assert a.grad is not None
    assert similarity(a.detach().bfloat16(), a.detach()).dtype == torch.float32
    assert isinstance(similarity([3.0, 4.0], [[6.0, 8.0]]), np.ndarray)


def test_an_index_loaded_without_mmap_is_its_own(searcher, tmp_path):
    searcher.index.save(tmp_path / "idx")
    own = ItemIndex.load(tmp_path / "idx", mmap=False)
    (tmp_path / "idx" / "index.faiss").write_bytes(b"overwritten in place")  # cannot touch the copy in memory
    q = searcher.model.encode_queries("a hot drink", mode="direct").embeddings
    assert own.search(q, 2)[1] == searcher.index.search(q, 2)[1]
    own.index.add(q[None])  # its own vectors: FAISS may change them (a mapped index would abort)
    assert own.index.ntotal == len(CATALOG) + 1
