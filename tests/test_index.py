"""lrem.index: FAISS from factory strings, save/load, search parameters."""
from __future__ import annotations

import json
import os
from pathlib import Path

import faiss
import numpy as np
import pytest

from lrem.index import ItemIndex, build_index, is_index_dir


def unit_vectors(n: int, d: int = 32, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("factory,params", [("Flat", ""), ("HNSW16,Flat", "efSearch=64"), ("IVF8,Flat", "nprobe=8"),
                                            ("IVF8,PQ8", "nprobe=8")])
def test_factories_find_the_item_itself(factory, params):
    emb = unit_vectors(500)
    idx = ItemIndex.from_embeddings(emb, [f"i{j}" for j in range(500)], [f"t{j}" for j in range(500)], factory, params)
    scores, ids = idx.search(emb[:20], k=5)
    top1 = [row[0] for row in ids]
    hits = sum(t == f"i{j}" for j, t in enumerate(top1))
    assert hits >= (20 if "PQ" not in factory else 15)
    assert scores.shape == (20, 5) and np.all(np.diff(scores, axis=1) <= 1e-6)  # best first


def test_exact_scores_are_cosine():
    emb = unit_vectors(50)
    idx = ItemIndex.from_embeddings(emb, [str(j) for j in range(50)], ["t"] * 50)
    scores, ids = idx.search(emb[3:4], k=50)
    expected = np.sort(emb @ emb[3])[::-1]
    np.testing.assert_allclose(scores[0], expected, atol=1e-5)
    assert ids[0][0] == "3"


def test_save_load_round_trip(tmp_path):
    emb = unit_vectors(100)
    idx = ItemIndex.from_embeddings(emb, [f"i{j}" for j in range(100)], [f"title {j}" for j in range(100)],
                                    "HNSW16,Flat", "efSearch=32", model="m")
    idx.save(tmp_path / "idx")
    assert is_index_dir(tmp_path / "idx")
    back = ItemIndex.load(tmp_path / "idx")
    assert back.meta["model"] == "m" and back.meta["factory"] == "HNSW16,Flat" and back.meta["n_items"] == 100
    assert back.title("i7") == "title 7"
    s1, i1 = idx.search(emb[:5], 10)
    s2, i2 = back.search(emb[:5], 10)
    assert i1 == i2
    np.testing.assert_allclose(s1, s2)
    assert [p.name for p in (tmp_path).iterdir()] == ["idx"]  # no temp leftovers


@pytest.mark.parametrize("factory", ["Flat", "HNSW16,Flat", "IVF4,Flat"])
def test_load_maps_the_index_file_instead_of_copying_it(tmp_path, factory):
    """Start-up: the codes are read through mmap (the page cache, shared across processes)."""
    emb = unit_vectors(300)
    idx = ItemIndex.from_embeddings(emb, [f"i{j}" for j in range(300)], [f"t{j}" for j in range(300)], factory)
    idx.save(tmp_path / "idx")
    back = ItemIndex.load(tmp_path / "idx")
    maps = Path("/proc/self/maps").read_text()
    assert str((tmp_path / "idx" / "index.faiss").resolve()) in maps
    assert back.search(emb[:3], 5)[1] == idx.search(emb[:3], 5)[1]


def test_k_larger_than_catalog_and_errors(tmp_path):
    emb = unit_vectors(3)
    idx = ItemIndex.from_embeddings(emb, ["a", "b", "c"], ["A", "B", "C"])
    _, ids = idx.search(emb, k=10)
    assert all(len(r) == 3 for r in ids)
    with pytest.raises(ValueError, match="IVF64"):
        build_index(emb, "IVF64,Flat")  # more lists than vectors
    with pytest.raises(ValueError, match="bad FAISS search parameter"):
        build_index(unit_vectors(100), "HNSW8,Flat", "efSerch=3")
    with pytest.raises(ValueError, match="embeddings for"):
        ItemIndex.from_embeddings(emb, ["a"], ["A"])
    with pytest.raises(FileNotFoundError, match="not an lrem index"):
        ItemIndex.load(tmp_path)


def test_default_threads_are_the_cores_the_load_leaves_free(monkeypatch):
    """Issue 21: cores minus the 1-minute load average, rounded, at least 1 (see lrem._threads);
    OMP_NUM_THREADS, when set, is the user's choice and wins."""
    from lrem._threads import available_cores, default_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "0")  # not a positive integer: ignored
    assert 1 <= default_threads() <= available_cores()
    monkeypatch.delenv("OMP_NUM_THREADS")
    cores = available_cores()
    before, n, after = os.getloadavg()[0], default_threads(), os.getloadavg()[0]
    assert 1 <= n <= cores
    assert n == max(1, min(cores, int(cores - before + 0.5))) or n == max(1, min(cores, int(cores - after + 0.5)))


def test_cli_threads_reach_torch_and_faiss(tmp_path, tiny_dir):
    """`lrem index --threads 1` runs torch and FAISS on one thread and says so; 0 is refused."""
    import json
    import subprocess
    import sys

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "catalog.jsonl").write_text("".join(json.dumps({"item_id": f"i{j}", "title": t}) + "\n"
                                                  for j, t in enumerate(["mug", "teapot", "corkscrew"])))
    (tmp_path / "d" / "queries.jsonl").write_text('{"query_id": "q", "text": "cup", "category": "c", "split": "dev"}\n')
    (tmp_path / "d" / "qrels.jsonl").write_text('{"query_id": "q", "item_id": "i0", "relevance": 1}\n')
    # the CLI in a subprocess, then the thread counts it left, read in the same process
    code = ("import sys, faiss, torch; from lrem.cli import app\n"
            "try:\n    app(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('threads', torch.get_num_threads(), faiss.omp_get_max_threads())")
    args = ["index", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "idx"), "--model", str(tiny_dir)]
    p = subprocess.run([sys.executable, "-c", code, *args, "--threads", "1"], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "2"}, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "threads 1 1" in p.stdout and "using 1 thread\n" in p.stderr
    p = subprocess.run([sys.executable, "-m", "lrem.cli", *args, "--threads", "0"], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2 and "--threads" in p.stderr


def test_an_index_whose_named_model_changed_weights_is_refused(tmp_path, tiny_dir):
    """An index records its model's fingerprint; when the name it records later means other weights
    (a retrained folder, a newer built-in), loading it is an error naming the rebuild, not silently
    wrong scores. Another model passed on purpose only warns."""
    import shutil

    import torch

    from lrem.index import ItemIndex
    from lrem.index_base import model_fingerprint
    from lrem.model import LREM
    from lrem.search import Searcher

    folder = tmp_path / "model"
    m = LREM.from_pretrained(str(tiny_dir), dtype="float32", log=lambda *a: None)
    m.save_pretrained(folder)
    m = LREM.from_pretrained(str(folder), dtype="float32", log=lambda *a: None)
    assert model_fingerprint(m) == model_fingerprint(LREM.from_pretrained(str(folder), dtype="bfloat16",
                                                                          log=lambda *a: None))
    ItemIndex.build(m, {"a": "teapot", "b": "sofa"}, show_progress=False).save(tmp_path / "idx")
    assert Searcher.load(tmp_path / "idx", log=lambda *a: None).search(["tea"], k=1)[0].hits

    with torch.no_grad():  # "retrain" the folder: one linear layer's weights change
        next(mod for mod in m.lm.modules() if isinstance(mod, torch.nn.Linear)).weight.mul_(1.5)
    shutil.rmtree(folder)
    m.save_pretrained(folder)
    with pytest.raises(ValueError, match="other weights.*rebuild the index"):
        Searcher.load(tmp_path / "idx", log=lambda *a: None)
    with pytest.warns(UserWarning, match="other weights"):
        Searcher.load(tmp_path / "idx", model=m)


def test_auto_recipe_by_catalog_size():
    import doctest

    import lrem.index
    import lrem.index_base
    from lrem.index import auto_recipe, resolve_factory

    assert doctest.testmod(lrem.index).failed == 0
    assert doctest.testmod(lrem.index_base).failed == 0  # ivf_lists
    assert auto_recipe(50_000, 576) == ("Flat", "")
    assert auto_recipe(60_000, 576) == ("IVF512,PQ64x4fs,RFlat", lrem.index.IVFPQ_PARAMS)
    assert auto_recipe(20_000_000, 100) == ("IVF16384,PQ50x4fs,RFlat", lrem.index.IVFPQ_PARAMS)
    assert auto_recipe(20_000_000, 99) == ("IVF16384,Flat", lrem.index.IVF_PARAMS)  # no even split into PQ codes
    assert resolve_factory("auto", "nprobe=8", 1_000_000, 576) == ("IVF2048,PQ64x4fs,RFlat", "nprobe=8")  # given params win
    assert resolve_factory("IVF8,Flat", "nprobe=2", 10, 576) == ("IVF8,Flat", "nprobe=2")
    # each recipe really builds and searches (the exact threshold scaled down to a small catalog)
    for dim, want in ((64, "IVF128,PQ64x4fs,RFlat"), (63, "IVF128,Flat")):
        x = unit_vectors(3000, dim)
        ids = [f"i{n}" for n in range(len(x))]
        assert auto_recipe(len(x), dim, exact_up_to=len(x)) == ("Flat", "")
        f, p = auto_recipe(len(x), dim, exact_up_to=100)
        assert f == want
        idx = ItemIndex.from_embeddings(x, ids, ids, f, p)
        assert idx.search(x[:20], k=1)[1] == [[i] for i in ids[:20]]  # each vector finds itself


def test_cli_factory_auto_records_the_recipe(tmp_path, tiny_dir):
    """`lrem index --factory auto` on a real (small) catalog: the recipe (exact search) is built and
    recorded in meta.json, and the CLI says which it took."""
    import json
    import subprocess
    import sys

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "catalog.jsonl").write_text("".join(json.dumps({"item_id": f"i{j}", "title": t}) + "\n"
                                                  for j, t in enumerate(["mug", "teapot", "corkscrew"])))
    (tmp_path / "d" / "queries.jsonl").write_text('{"query_id": "q", "text": "cup", "category": "c", "split": "dev"}\n')
    (tmp_path / "d" / "qrels.jsonl").write_text('{"query_id": "q", "item_id": "i0", "relevance": 1}\n')
    p = subprocess.run([sys.executable, "-m", "lrem.cli", "index", "--data", str(tmp_path / "d"), "--out",
                        str(tmp_path / "idx"), "--model", str(tiny_dir), "--factory", "auto"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "(Flat, dim" in p.stdout
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert meta["factory"] == "Flat" and meta["search_params"] == "" and meta["n_items"] == 3


def test_ivf_trains_on_enough_vectors_for_its_lists():
    """`max_train` below 39 x nlist would fail k-means: the sample grows to what the lists need."""
    from lrem.index import train_size

    x = unit_vectors(600, 16)
    idx = build_index(x, "IVF8,Flat", "nprobe=8", max_train=50)  # 8 lists want 312 points
    assert idx.ntotal == 600 and idx.search(x[:5], 1)[1][:, 0].tolist() == list(range(5))
    import faiss

    assert train_size(faiss.index_factory(16, "IVF8,Flat"), 600, 50) == 312
    assert train_size(faiss.index_factory(16, "Flat"), 600, 50) == 50


# ---------------------------------------------------------------- updating an index

KITCHEN = {f"k{j}": t for j, t in enumerate(["mug", "teapot", "kettle", "saucepan", "spatula", "wine glass", "corkscrew",
                                             "colander", "ladle", "whisk"] * 4)}
KITCHEN = {k: f"{t} {k}" for k, t in KITCHEN.items()}  # 40 distinct titles


def _changed(catalog: dict) -> dict:
    """One item removed, one retitled, one added (at the end), the rest as they were."""
    new = {k: v for k, v in catalog.items() if k != "k3"}
    new["k5"] = "cast iron skillet"
    new["n1"] = "egg timer"
    return new


@pytest.mark.parametrize("factory", ["Flat", "HNSW8,Flat", "IVF2,Flat", "IVF2,PQ4x4fs,RFlat"])
def test_update_embeds_only_what_changed_and_equals_a_fresh_build(tiny, factory):
    from lrem.index import stored_vectors

    old = ItemIndex.build(tiny, KITCHEN, factory=factory, show_progress=False)
    fresh = ItemIndex.build(tiny, _changed(KITCHEN), factory=factory, show_progress=False)
    new, counts = old.updated(tiny, _changed(KITCHEN), show_progress=False)
    assert counts == {"added": 1, "changed": 1, "removed": 1, "kept": 38}
    assert (new.item_ids, new.titles, new.digests) == (fresh.item_ids, fresh.titles, fresh.digests)
    np.testing.assert_allclose(stored_vectors(new.index), stored_vectors(fresh.index), atol=1e-5)
    # kept items keep the vectors the index holds (they are not embedded again): mark one, update
    marked = stored_vectors(old.index)
    marked[0] = unit_vectors(1, marked.shape[1])[0]
    old.index = build_index(marked, factory)
    vectors = stored_vectors(old.updated(tiny, _changed(KITCHEN), show_progress=False)[0].index)
    np.testing.assert_array_equal(vectors[0], marked[0])
    np.testing.assert_allclose(vectors[1:], stored_vectors(fresh.index)[1:], atol=1e-5)
    assert new.meta["factory"] == factory and new.meta["n_items"] == 40
    assert new.meta["updates"][-1]["changed"] == 1 and new.meta["model_fingerprint"] == old.meta["model_fingerprint"]
    assert "encode_seconds" not in new.meta and new.meta["updates"][-1]["encode_seconds"] >= 0


@pytest.mark.parametrize("factory, lossy", [("OPQ4,Flat", False), ("RR32,HNSW8,Flat", False), ("IVF2,PQ4", True),
                                            ("SQ8", True)])
def test_stored_vectors_turns_rotations_back_and_refuses_lossy_codes(factory, lossy):
    from lrem.index import keeps_vectors, stored_vectors

    x = unit_vectors(300)
    index = build_index(x, factory)
    if lossy:  # compressed codes: what they give back is not what was added
        assert not keeps_vectors(index)
        with pytest.raises(ValueError, match="rebuild it"):
            stored_vectors(index)
    else:
        assert keeps_vectors(index)
        np.testing.assert_allclose(stored_vectors(index), x, atol=1e-5)


def test_update_of_a_multi_field_template_sees_field_changes(tiny):
    from lrem.data import Item
    from lrem.model import LREM
    from lrem.prompts import PromptConfig

    model = LREM(tiny.lm, tiny.tokenizer, PromptConfig(item_template="Item: {title} | brand: {brand}"))
    old = {"a": Item("a", "mug", brand="Acme"), "b": Item("b", "teapot", brand="Zed")}
    new = {"a": Item("a", "mug", brand="Other"), "b": Item("b", "teapot", brand="Zed")}  # a's brand only
    index = ItemIndex.build(model, old, show_progress=False)
    assert index.updated(model, new, show_progress=False)[1] == {"added": 0, "changed": 1, "removed": 0, "kept": 1}
    index.digests = None  # as an index from chunks: the brands embedded then are unknown, so all are embedded again
    assert index.updated(model, new, show_progress=False)[1] == {"added": 0, "changed": 2, "removed": 0, "kept": 0}


def test_update_with_nothing_to_do_and_of_an_index_without_digests(tiny):
    index = ItemIndex.build(tiny, _changed(KITCHEN), show_progress=False)
    same, counts = index.updated(tiny, _changed(KITCHEN), show_progress=False)
    assert counts == {"added": 0, "changed": 0, "removed": 0, "kept": 40} and same.meta["updates"][-1]["added"] == 0
    index.digests = None  # written before digests were kept: a title-only template compares titles
    assert index.updated(tiny, _changed(KITCHEN), show_progress=False)[1]["kept"] == 40
    back, counts = index.updated(tiny, KITCHEN, show_progress=False)
    assert counts == {"added": 1, "changed": 1, "removed": 1, "kept": 38} and back.digests is not None  # written again


def test_update_refuses_lossy_codes_and_another_model(tiny, lively_dir):
    from lrem.model import LREM

    pq = ItemIndex.build(tiny, KITCHEN, factory="IVF2,PQ4x4", show_progress=False)
    with pytest.raises(ValueError, match="IndexIVFPQ index does not keep the embeddings.*rebuild"):
        pq.updated(tiny, KITCHEN)
    other = LREM.from_pretrained(str(lively_dir("llama")), dtype="float32")
    with pytest.raises(ValueError, match="embedded by another model \\(model_fingerprint"):
        ItemIndex.build(tiny, KITCHEN, show_progress=False).updated(other, KITCHEN)
    ivf = ItemIndex.build(tiny, KITCHEN, factory="IVF8,Flat", search_params="nprobe=8", show_progress=False)
    few = dict(list(KITCHEN.items())[:5])  # fewer items than lists: said before embedding, with the way out
    with pytest.raises(ValueError, match="8 lists but the catalog only 5 items; rebuild the index with a smaller factory"):
        ivf.updated(tiny, few)


def test_cli_update_in_place(tmp_path, tiny_dir):
    from test_reliability import assert_clean_error, lrem

    def write_dataset(folder: Path, titles: dict) -> Path:
        folder.mkdir()
        (folder / "catalog.jsonl").write_text("".join(json.dumps({"item_id": i, "title": t}) + "\n"
                                                      for i, t in titles.items()))
        (folder / "queries.jsonl").write_text('{"query_id": "q", "text": "cup", "category": "c", "split": "dev"}\n')
        (folder / "qrels.jsonl").write_text('{"query_id": "q", "item_id": "k0", "relevance": 1}\n')
        return folder

    a = write_dataset(tmp_path / "a", KITCHEN)
    b = write_dataset(tmp_path / "b", _changed(KITCHEN))
    idx = tmp_path / "idx"
    # built in the dtype `auto` does not pick here: the update embeds its items in it too
    import torch

    from lrem.backbones import default_dtype

    dtype = "float32" if default_dtype() == torch.bfloat16 else "bfloat16"
    assert lrem("index", "--data", str(a), "--out", str(idx), "--model", str(tiny_dir), "--dtype",
                dtype).returncode == 0
    assert ItemIndex.load(idx).meta["dtype"] == dtype
    p = lrem("index", "--data", str(b), "--out", str(idx), "--update")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "1 added, 1 changed, 1 removed, 38 kept (40 items; embedded 2" in p.stdout
    loaded = ItemIndex.load(idx)
    assert loaded.meta["dtype"] == dtype
    assert loaded.item_ids == list(_changed(KITCHEN)) and loaded.title("k5") == "cast iron skillet"
    assert loaded.meta["dataset"] == str(b) and len(loaded.meta["updates"]) == 1
    # a folder that is not lrem's index is refused, untouched
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert_clean_error(lrem("index", "--data", str(b), "--out", str(other), "--update"), "not an index lrem built")
    assert [f.name for f in other.iterdir()] == ["notes.txt"]


def test_a_pq_factory_with_more_centroids_than_items_is_refused_before_embedding():
    """FAISS's k-means refuses fewer points than centroids: 8-bit PQ (256 centroids) on 200 items
    failed only after the catalog was embedded."""
    from lrem.index import check_factory, pq_centroids

    for factory in ("IVF4,PQ8", "OPQ8,IVF4,PQ8", "HNSW16,PQ8", "PQ8"):
        with pytest.raises(ValueError, match="trains 256 PQ centroids .* only 200 items"):
            check_factory(factory, "", 64, 200)
        check_factory(factory, "", 64, 256)
    check_factory("IVF4,PQ8x4fs,RFlat", "", 64, 200)  # 4-bit codes: 16 centroids
    assert pq_centroids(faiss.index_factory(64, "IVF4,PQ8x4fs,RFlat")) == 16
    assert pq_centroids(faiss.index_factory(64, "HNSW16,Flat")) is None


def test_an_index_records_a_relative_model_folder_as_absolute(tmp_path, tiny_dir, monkeypatch):
    """`lrem index --model runs/m` recorded "runs/m": `lrem search`, `serve` and `index --update` load
    the model the index names, and from another folder found none there."""
    from lrem.index_base import model_identity
    from lrem.model import LREM
    from lrem.search import Searcher

    monkeypatch.chdir(tiny_dir.parent)
    model = LREM.from_pretrained(tiny_dir.name, dtype="float32", log=lambda *_: None)
    ItemIndex.build(model, KITCHEN, show_progress=False).save(tmp_path / "idx")
    assert model.source == tiny_dir.name  # the name as given: the index made it absolute
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    searcher = Searcher.load(tmp_path / "idx", log=lambda *_: None)
    assert searcher.index.meta["model"] == str(tiny_dir)
    assert searcher.search("a cup", k=3, mode="direct").item_ids == \
        ItemIndex.load(tmp_path / "idx").search(model.encode_queries("a cup", mode="direct").embeddings, 3)[1][0]
    model.source = "lrem-wordnet-135m"  # a built-in (or hub) name, no folder here: stays a name
    assert model_identity(model)["model"] == "lrem-wordnet-135m"
