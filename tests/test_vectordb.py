"""lrem.vectordb: a Milvus collection as the item index, against a real Milvus Lite (a local
folder, started in the process that opens it): same top 10 as FAISS Flat, resumable upload
with no duplicates after a SIGKILL, and search / eval / serve through the same interfaces."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from lrem.embed import embed_catalog  # noqa: E402
from lrem.index import ItemIndex  # noqa: E402
from lrem.vectordb import MilvusIndex, MilvusWriter, iter_rows, parse_spec, upload  # noqa: E402

from test_embed import ENV, catalog, lrem, write_data  # noqa: E402


def unit_vectors(n: int, d: int = 32, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def batches_of(ids, titles, x, size, facets=None):
    for s in range(0, len(ids), size):
        yield (ids[s:s + size], titles[s:s + size], {f: c[s:s + size] for f, c in (facets or {}).items()}, None,
               (lambda pos, s=s: x[s:][pos]))


def test_spec_parsing():
    import doctest

    import lrem.vectordb

    assert doctest.testmod(lrem.vectordb).failed == 0
    assert parse_spec("milvus:/abs/items.db/wordnet") == ("/abs/items.db", "wordnet")
    assert parse_spec("milvus:http:/127.0.0.1:19530/c_1") == ("http://127.0.0.1:19530", "c_1")  # as pathlib folds it
    for bad in ("milvus:items.db", "milvus:items.db/1abc", "milvus:items/wordnet", "faiss:x/y"):
        with pytest.raises(ValueError, match="milvus:URI/COLLECTION|neither"):
            parse_spec(bad)


def interrupted(batches, n: int):
    """The first n batches, then the error of an upload killed mid-way."""
    for j, batch in enumerate(batches):
        if j == n:
            raise KeyboardInterrupt("killed")
        yield batch


def test_top10_equals_faiss_flat_and_reupload_writes_nothing(tmp_path):
    x, ids = unit_vectors(400), [f"item-{j}" for j in range(400)]
    titles = [f"title {j}" for j in range(400)]
    spec = f"milvus:{tmp_path / 'r.db'}/rand"
    meta = {"model": "m", "dim": 32, "item_template": "Item: {title}"}
    with pytest.raises(KeyboardInterrupt):
        upload(spec, interrupted(batches_of(ids, titles, x, 64), 3), meta, 400, show_progress=False)
    info = upload(spec, batches_of(ids, titles, x, 64), meta, 400, show_progress=False)  # resumed: by id
    assert (info["written"], info["skipped"], info["n_items"], info["complete"]) == (400 - 192, 192, 400, True)
    with pytest.raises(ValueError, match=r"holds a complete index \(400 items of None\); pass --update .* or "
                       "--overwrite"):  # never merged into silently
        upload(spec, batches_of(ids, titles, x, 64), meta, 400, show_progress=False)

    db, flat = MilvusIndex.open(spec), ItemIndex.from_embeddings(x, ids, titles)
    q = unit_vectors(25, seed=1)
    (s1, i1), (s2, i2) = flat.search(q, 10), db.search(q, 10)
    assert i1 == i2
    np.testing.assert_allclose(s1, s2, atol=1e-5)
    assert db.meta["model"] == "m" and db.index.d == 32 and db.ntotal == 400 and db.title("item-7") == "title 7"
    assert sorted(db.item_ids) == sorted(ids) and db.search(q[:1], 1000)[0].shape == (1, 400)
    # the stored vectors by id, in the asked order (duplicates too): what /rerank's item_ids score
    np.testing.assert_allclose(db.vectors_of(["item-9", "item-2", "item-9"]), x[[9, 2, 9]], atol=1e-6)
    assert "item-3" in db and "nope" not in db and db.vectors_of([]).shape == (0, 32)
    with pytest.raises(KeyError, match="'nope' is not in the collection"):
        db.vectors_of(["item-1", "nope"])

    with pytest.raises(ValueError, match="model='m', this upload model='other'; pass --overwrite"):
        MilvusWriter(spec, {**meta, "model": "other"})
    MilvusWriter(spec, {**meta, "model": "other"}, overwrite=True)  # lrem's own collection: replaced
    # where both record the weights' fingerprint, the model's name or path is not compared
    printed = f"milvus:{tmp_path / 'r.db'}/printed"
    MilvusWriter(printed, {**meta, "model_fingerprint": "abc"})
    MilvusWriter(printed, {**meta, "model": "./m", "model_fingerprint": "abc"})
    with pytest.raises(ValueError, match="model_fingerprint='abc', this upload model_fingerprint='xyz'"):
        MilvusWriter(printed, {**meta, "model_fingerprint": "xyz"})
    with pytest.raises(ValueError, match="upload to this collection did not finish"):
        MilvusIndex.open(spec)
    with pytest.raises(ValueError, match="no collection 'absent'"):
        MilvusIndex.open(f"milvus:{tmp_path / 'r.db'}/absent")


def test_a_filtered_milvus_search_equals_faiss_filtered(tmp_path, tiny):
    """Milvus filters inside its search (a boolean expression); the hits are FAISS's filtered ones,
    in every path that takes a filter: the index, Searcher modes, hybrid search."""
    from pymilvus import DataType, MilvusClient

    from lrem.data import Item
    from lrem.search import Searcher

    kinds = ["mug", "teapot", "kettle", "sofa", "rug", "lamp"]
    items = {f"i{j}": Item(f"i{j}", f"{kinds[j % 6]} {j}", category="kitchen" if j % 6 < 3 else "home",
                           brand=["Acme", 'Zed "Q"', "Café"][j % 3], color="red" if j % 4 == 0 else None)
             for j in range(90)}
    flat = ItemIndex.build(tiny, items, show_progress=False)
    x = flat.index.reconstruct_n(0, 90)
    spec = f"milvus:{tmp_path / 'f.db'}/facets"
    upload(spec, batches_of(flat.item_ids, flat.titles, x, 32, flat.facets), flat.meta, 90, show_progress=False)
    db = MilvusIndex.open(spec)
    assert db.filter_fields == flat.filter_fields == ["brand", "category", "color"]
    q = tiny.encode_queries(["a teapot", "a red sofa"], mode="direct").embeddings
    for where in ({"category": "kitchen"}, {"brand": ['Zed "Q"', "Café"], "category": "home"}, {"color": "red"},
                  {"brand": "Nobody"}):
        (s1, i1), (s2, i2) = flat.search(q, 10, where=where), db.search(q, 10, where=where)
        assert i1 == i2, where
        np.testing.assert_allclose(s1[np.isfinite(s1)], s2[np.isfinite(s2)], atol=1e-5)
        assert {db.item_ids[n] for n in db.allowed(where)} == {flat.item_ids[n] for n in flat.allowed(where)}
    with pytest.raises(ValueError, match="filter field 'size': this index can filter on brand, category, color"):
        db.search(q, 5, where={"size": "XL"})
    assert db.search(q, 10, where={"brand": "Nobody"})[0].shape == (2, 0)  # as an index folder: no columns
    scores, got = db.search(q, 60, where={"category": "kitchen"})  # 45 match: rows padded, never with -inf
    assert [len(r) for r in got] == [45, 45] and np.isfinite(scores).all() and scores.shape == (2, 60)
    faiss_s, milvus_s = Searcher(tiny, flat), Searcher(tiny, db)
    where = {"category": "home", "brand": "Acme"}
    for mode in ("direct", "auto"):
        assert ([r.item_ids for r in faiss_s.search(["a rug"], 5, mode=mode, where=where)]
                == [r.item_ids for r in milvus_s.search(["a rug"], 5, mode=mode, where=where)])
    hybrid = [r.item_ids for r in milvus_s.hybrid("direct", where=where).search(["a rug"], 5)]
    assert hybrid == [r.item_ids for r in faiss_s.hybrid("direct", where=where).search(["a rug"], 5)]
    from lrem.baselines import BM25Retriever  # reranking reads the collection's stored vectors
    from lrem.rerank import RerankRetriever

    bm25 = BM25Retriever(dict(zip(flat.item_ids, flat.titles)), show_progress=False)
    faiss_rr, milvus_rr = (RerankRetriever(bm25, s, "direct", depth=20).search(["a red rug", "kettle"], k=5)
                           for s in (faiss_s, milvus_s))
    assert [r.item_ids for r in milvus_rr] == [r.item_ids for r in faiss_rr]
    np.testing.assert_allclose([h.score for r in milvus_rr for h in r.hits], [h.score for r in faiss_rr for h in r.hits],
                               atol=1e-5)

    # a collection made before filters (no such fields): refused with the fields it has, none
    client = MilvusClient(str(tmp_path / "f.db"))
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("item_id", DataType.VARCHAR, is_primary=True, max_length=512)
    schema.add_field("title", DataType.VARCHAR, max_length=65535)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=x.shape[1])
    params = client.prepare_index_params()
    params.add_index(field_name="vector", index_type="FLAT", metric_type="IP")
    client.create_collection("old", schema=schema, index_params=params,
                             properties={"lrem.meta": json.dumps({**flat.meta, "complete": False})})
    old = f"milvus:{tmp_path / 'f.db'}/old"
    upload(old, batches_of(flat.item_ids, flat.titles, x, 32, flat.facets), flat.meta, 90, show_progress=False)
    with pytest.raises(ValueError, match="filter field 'brand': this index can filter on none"):
        MilvusIndex.open(old).search(q, 5, where={"brand": "Acme"})
    assert MilvusIndex.open(old).search(q, 5)[1] == flat.search(q, 5)[1]
    from lrem.vectordb import update  # no digests kept: titles are compared

    assert update(old, tiny, items, flat.meta, show_progress=False) == {"added": 0, "changed": 0, "removed": 0,
                                                                         "kept": 90}


def test_update_embeds_only_what_changed_and_searches_like_a_fresh_build(tmp_path, tiny, monkeypatch):
    """`lrem.vectordb.update`: the collection equals a fresh upload of the new catalog; only new
    and changed items are embedded; a rerun has nothing to do."""
    from lrem.data import Item
    from lrem.index_base import item_digest, item_facets
    from lrem.search import Searcher
    from lrem.vectordb import update

    kinds = ["mug", "teapot", "kettle", "sofa", "rug", "lamp"]
    old = {f"i{j}": Item(f"i{j}", f"{kinds[j % 6]} {j}", brand=["Acme", "Zed"][j % 2]) for j in range(40)}
    new = {k: v for k, v in old.items() if k != "i3"}
    new["i5"] = Item("i5", "cast iron skillet", brand="Zed")
    new["n1"] = Item("n1", "egg timer", brand="Acme")
    flat = ItemIndex.build(tiny, old, show_progress=False)
    items = list(old.values())
    digests = [item_digest(tiny, x) for x in items]
    spec = f"milvus:{tmp_path / 'u.db'}/items"
    upload(spec, [(flat.item_ids, flat.titles, item_facets(items), digests, lambda pos: flat.index.reconstruct_n(0, 40)[pos])],
           flat.meta, 40, show_progress=False)
    counted, encode = [], tiny.encode_items
    monkeypatch.setattr(tiny, "encode_items", lambda xs, **kw: counted.append(len(xs)) or encode(xs, **kw))  # counts
    counts = update(spec, tiny, new, flat.meta, upload_batch=16, show_progress=False)
    again = update(spec, tiny, new, flat.meta, show_progress=False)
    monkeypatch.undo()
    assert counts == {"added": 1, "changed": 1, "removed": 1, "kept": 38} and sum(counted) == 2
    assert again == {"added": 0, "changed": 0, "removed": 0, "kept": 40}
    db, fresh = MilvusIndex.open(spec), ItemIndex.build(tiny, new, show_progress=False)
    assert db.ntotal == 40 and sorted(db.item_ids) == sorted(new) and db.title("i5") == "cast iron skillet"
    q = tiny.encode_queries(["a skillet", "an egg timer", "a rug"], mode="direct").embeddings
    assert db.search(q, 10)[1] == fresh.search(q, 10)[1]
    assert db.search(q, 5, where={"brand": "Acme"})[1] == fresh.search(q, 5, where={"brand": "Acme"})[1]
    assert [u["changed"] for u in db.meta["updates"]] == [1, 0]
    assert Searcher(tiny, db).search(["an egg timer"], 3, mode="direct")[0].item_ids == fresh.search(q[1:2], 3)[1][0]


def test_cli_index_data_to_milvus_then_a_filtered_search(tmp_path, tiny_dir):
    """`lrem index --data --backend` keeps the catalog's filter fields; `lrem search --filter` uses them."""
    from lrem.data import Dataset, Item, Query, save_dataset

    items = {f"i{j}": Item(f"i{j}", f"{['mug', 'sofa', 'lamp'][j % 3]} {j}", category=["kitchen", "home"][j % 2])
             for j in range(30)}
    save_dataset(Dataset(items, {"q": Query("q", "a cup", "c", "dev")}, {"q": {"i1": 1}}), tmp_path / "ds")
    spec = f"milvus:{tmp_path / 'cli.db'}/items"
    up = lrem("index", "--data", tmp_path / "ds", "--backend", spec, "--model", tiny_dir, "--upload-batch", 8)
    assert up.returncode == 0 and "uploaded 30 items" in up.stdout, up.stderr[-3000:]
    p = lrem("search", "--index", spec, "--mode", "direct", "--json", "-k", "20", "--filter", "category=home", "a lamp")
    assert p.returncode == 0, p.stderr[-3000:]
    [row] = [json.loads(line) for line in p.stdout.splitlines()]
    assert len(row["items"]) == 15 and all(int(i["item_id"][1:]) % 2 == 1 for i in row["items"])
    # the catalog changes: --update embeds the new and changed items and deletes the removed ones
    items = {k: v for k, v in items.items() if k != "i0"}
    items["i1"] = Item("i1", "egg timer", category="home")
    save_dataset(Dataset(items, {"q": Query("q", "a cup", "c", "dev")}, {"q": {"i1": 1}}), tmp_path / "ds2")
    p = lrem("index", "--data", tmp_path / "ds2", "--backend", spec, "--update")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "0 added, 1 changed, 1 removed, 28 kept" in p.stdout and MilvusIndex.open(spec).ntotal == 29


def test_a_milvus_server_by_http_uri(tmp_path):
    """The same code against a server: `milvus-lite server` on 127.0.0.1 (what a cluster's URI is)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(tmp_path / "srv"),
                               "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            assert server.poll() is None, "milvus-lite server exited"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        x, ids = unit_vectors(120, 16, seed=2), [f"s{j}" for j in range(120)]
        spec = f"milvus:http://127.0.0.1:{port}/served"
        upload(spec, batches_of(ids, ids, x, 50), {"model": "m", "dim": 16}, 120, show_progress=False)
        q = unit_vectors(5, 16, seed=3)
        assert MilvusIndex.open(spec).search(q, 10)[1] == ItemIndex.from_embeddings(x, ids, ids).search(q, 10)[1]
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_a_collection_lrem_did_not_create_is_never_touched(tmp_path):
    from pymilvus import DataType, MilvusClient

    client = MilvusClient(str(tmp_path / "f.db"))
    schema = client.create_schema(auto_id=False)
    schema.add_field("pk", DataType.INT64, is_primary=True)
    schema.add_field("v", DataType.FLOAT_VECTOR, dim=4)
    client.create_collection("theirs", schema=schema)
    spec = f"milvus:{tmp_path / 'f.db'}/theirs"
    with pytest.raises(ValueError, match="was not created by lrem"):
        MilvusWriter(spec, {"model": "m", "dim": 4}, overwrite=True)
    with pytest.raises(ValueError, match="was not created by lrem"):
        MilvusIndex.open(spec)
    assert client.has_collection("theirs")


def test_killed_upload_rerun_leaves_no_duplicates_and_searches_like_faiss(tmp_path, tiny, tiny_dir):
    """`lrem index --backend` killed (SIGKILL) mid-upload, rerun; then search, eval and serve on it."""
    data = write_data(tmp_path / "ds", 240)
    embed_catalog(tiny, catalog(240), tmp_path / "ch", chunk_size=16, show_progress=False)
    spec = f"milvus:{tmp_path / 'items.db'}/items"
    args = ["index", "--from-chunks", tmp_path / "ch", "--backend", spec, "--upload-batch", 2]
    bad = lrem("index", "--from-chunks", tmp_path / "ch", "--backend", "milvus:nowhere/items")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: 'milvus:nowhere/items': URI")

    log = tmp_path / "upload.log"
    with open(log, "w") as f:
        # off a terminal the bar redraws every 30 s; this test reads each step of it
        p = subprocess.Popen([sys.executable, "-m", "lrem.cli", *map(str, args)], env={**ENV, "TQDM_MININTERVAL": "0"},
                             stdout=f, stderr=f)
        deadline, done = time.time() + 1500, 0
        while p.poll() is None and done < 30 and time.time() < deadline:
            time.sleep(0.05)
            counts = re.findall(r"upload:.*?(\d+)/240", log.read_text(errors="replace"))
            done = int(counts[-1]) if counts else 0
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert 30 <= done < 240, f"not killed mid-upload ({done} items): {log.read_text()[-2000:]}"
    rerun = lrem(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    m = re.search(r"uploaded (\d+) items to .* \((\d+) already there; 240 in all", rerun.stdout)
    assert m and int(m[1]) + int(m[2]) == 240 and int(m[2]) >= 30, rerun.stdout

    db = MilvusIndex.open(spec)
    rows = list(iter_rows(db.client, db.name, ["item_id"]))
    assert len(rows) == 240 and len({r["item_id"] for r in rows}) == 240  # no duplicates
    assert db.meta["model"] == str(tiny_dir) and db.meta["n_items"] == 240

    flat = ItemIndex.from_chunks(tmp_path / "ch", show_progress=False)
    flat.save(tmp_path / "idx")
    q = tiny.encode_queries(["a cup", "a chair", "paper", "watch model 7"], mode="direct").embeddings
    (s1, i1), (s2, i2) = flat.search(q, 10), db.search(q, 10)
    assert i1 == i2
    np.testing.assert_allclose(s1, s2, atol=1e-5)

    # lrem search / eval / serve: the same Searcher over either index
    from lrem.data import load_dataset
    from lrem.evaluate import evaluate_systems
    from lrem.search import Searcher, build_systems
    from lrem.serve import ServeConfig, background_server, create_app

    faiss_s, milvus_s = Searcher.load(tmp_path / "idx", model=tiny), Searcher.load(spec, model=tiny)
    for mode in ("direct", "reason"):
        a, b = faiss_s.search(["a cup"], k=5, mode=mode), milvus_s.search(["a cup"], k=5, mode=mode)
        assert a[0].item_ids == b[0].item_ids and a[0].cot == b[0].cot
    ds = load_dataset(data)
    systems = build_systems({"faiss": f"{tmp_path / 'idx'}:direct", "milvus": f"{spec}:direct"}, ds, log=lambda *_: None)
    res = evaluate_systems(ds, "dev", systems, k=10, log=lambda *_: None)
    assert res["systems"]["faiss"]["overall"] == res["systems"]["milvus"]["overall"]
    import httpx

    with background_server(create_app(milvus_s, ServeConfig(max_batch=4, max_wait_ms=10))) as url:
        r = httpx.post(url + "/search", json={"query": "a cup", "k": 5, "mode": "direct"}, timeout=60)
    assert r.status_code == 200, r.text
    assert [i["item_id"] for i in r.json()["items"]] == faiss_s.search(["a cup"], k=5, mode="direct")[0].item_ids
    assert r.json()["items"][0]["title"] == flat.title(r.json()["items"][0]["item_id"])


ODD_IDS = ["it's", '~q"uote', "~~back\\slash", 'q"uote', "back\\slash", "a\\'b", "\\", "x\\\"y", "tab\tx", "nl\nx",
           "cr\rx", "bell\x07x", "nul\x00x", "ünï", "emoji😀", "\u2028ls", "\\u0041", "$ {} %s"]


def test_any_id_is_looked_up_resumed_updated_and_deleted(tmp_path, tiny):
    """Ids (and filter values) with quotes, backslashes, control characters: Milvus expressions
    are written with its own escapes (`milvus_string`), never pymilvus's unescaped get/delete."""
    from lrem.data import Item
    from lrem.index_base import item_digest, item_facets
    from lrem.vectordb import milvus_string, update

    kinds = ["mug", "teapot", "kettle", "sofa", "rug", "lamp"]
    ids = [f"p{j}" for j in range(8)] + ODD_IDS
    items = {i: Item(i, f"{kinds[j % 6]} {j}", brand=["O'Neil \\ co", 'Zed "Q"\n', "Acme"][j % 3])
             for j, i in enumerate(ids)}
    # the FAISS reference indexes them under stand-in keys: its item ids are single tokens (TREC
    # runs split on whitespace), while Milvus takes any string
    flat = ItemIndex.build(tiny, {f"s{j}": items[i] for j, i in enumerate(ids)}, show_progress=False)

    def as_ids(rows, keys=ids):
        return [[keys[int(s[1:])] for s in row] for row in rows]

    x, vals = flat.index.reconstruct_n(0, len(ids)), list(items.values())
    digests = [item_digest(tiny, v) for v in vals]

    def batches(size=5):
        for s in range(0, len(ids), size):
            yield (ids[s:s + size], flat.titles[s:s + size], item_facets(vals[s:s + size]), digests[s:s + size],
                   (lambda pos, s=s: x[s:][pos]))

    spec = f"milvus:{tmp_path / 'odd.db'}/odd"
    with pytest.raises(KeyboardInterrupt):  # killed after 2 batches (odd ids in the second): then resumed
        upload(spec, interrupted(batches(), 2), flat.meta, len(ids), show_progress=False)
    info = upload(spec, batches(), flat.meta, len(ids), show_progress=False)
    assert (info["written"], info["skipped"], info["n_items"]) == (len(ids) - 10, 10, len(ids))
    db = MilvusIndex.open(spec)
    assert sorted(db.item_ids) == sorted(ids)
    for size in (1, 3, 100):  # pages after an odd id (in primary-key order): every row once
        rows = [r["item_id"] for r in iter_rows(db.client, db.name, ["title"], batch_size=size)]
        assert sorted(rows) == sorted(ids), size
        assert sorted(r["item_id"] for r in iter_rows(db.client, db.name, [], size, 'brand == "Acme"')) == sorted(
            i for i in ids if items[i].brand == "Acme")
    assert [db.title(i) for i in ODD_IDS] == [items[i].title for i in ODD_IDS] and all(i in db for i in ODD_IDS)
    np.testing.assert_allclose(db.vectors_of(ODD_IDS[::-1]), x[[ids.index(i) for i in ODD_IDS[::-1]]], atol=1e-6)
    with pytest.raises(KeyError, match="is not in the collection"):
        db.vectors_of(["it's not"])
    q = tiny.encode_queries(["a teapot", "a red sofa"], mode="direct").embeddings
    assert db.search(q, 10)[1] == as_ids(flat.search(q, 10)[1])
    for where in ({"brand": "O'Neil \\ co"}, {"brand": ['Zed "Q"\n', "Acme"]}):
        assert db.search(q, 5, where=where)[1] == as_ids(flat.search(q, 5, where=where)[1]), where
    assert milvus_string('a"b\\c\n') == '"a\\"b\\\\c\\n"'
    # the catalog changes: odd ids leave (deleted by expression) or change (upserted)
    new = {i: v for i, v in items.items() if i not in ODD_IDS[:8]}
    new["ünï"] = Item("ünï", "cast iron skillet", brand="Acme")
    assert update(spec, tiny, new, flat.meta, show_progress=False) == {"added": 0, "changed": 1, "removed": 8,
                                                                       "kept": len(new) - 1}
    db = MilvusIndex.open(spec)
    assert sorted(db.item_ids) == sorted(new) and db.title("ünï") == "cast iron skillet"
    keys = list(new)
    ref = ItemIndex.build(tiny, {f"s{j}": new[i] for j, i in enumerate(keys)}, show_progress=False)
    assert db.search(q, 10)[1] == as_ids(ref.search(q, 10)[1], keys)


def test_an_unfinished_upload_resumes_only_with_its_own_catalog(tmp_path):
    """Rerunning finishes an interrupted upload of the same catalog; another catalog (its
    fingerprint, an item's digest, items beyond it) is refused, and a complete collection too."""
    from lrem.embed import catalog_fingerprint
    from lrem.vectordb import CATALOG, catalog_digest

    x, ids = unit_vectors(60, 8), [f"i{j}" for j in range(60)]
    digests = [f"d{j}" for j in range(60)]
    meta = {"model": "m", "dim": 8, "dataset": "A"}
    meta_a = {**meta, CATALOG: catalog_digest(catalog_fingerprint(ids), digests)}

    def batches(ids=ids, digests=digests, size=20):
        for s in range(0, len(ids), size):
            yield ids[s:s + size], ids[s:s + size], {}, digests and digests[s:s + size], (lambda pos, s=s: x[s:][pos])

    spec = f"milvus:{tmp_path / 'c.db'}/items"
    with pytest.raises(KeyboardInterrupt):
        upload(spec, interrupted(batches(), 1), meta_a, 60, show_progress=False)
    changed = digests[:5] + ["other"] + digests[6:]
    meta_b = {**meta, "dataset": "B", CATALOG: catalog_digest(catalog_fingerprint(ids), changed)}
    with pytest.raises(ValueError, match=r"unfinished upload of another catalog \(A\); rerun that upload"):
        upload(spec, batches(digests=changed), meta_b, 60, show_progress=False)  # its fingerprint differs
    with pytest.raises(ValueError, match="item 'i5' in the collection differs from this catalog's"):
        upload(spec, batches(digests=changed), meta, 60, show_progress=False)  # no fingerprint: the digests tell
    others = [f"o{j}" for j in range(60)]
    with pytest.raises(ValueError, match="holds 20 items not in this catalog"):  # neither: the count tells
        upload(spec, batches(ids=others, digests=None), meta, 60, show_progress=False)
    with pytest.raises(ValueError, match="did not finish"):
        MilvusIndex.open(spec)  # never marked complete with the two catalogs mixed
    MilvusWriter(spec, meta_a).client.delete("items", filter='item_id like "o%"')  # what that rerun added
    info = upload(spec, batches(), meta_a, 60, show_progress=False)  # the same catalog: resumed
    assert (info["written"], info["skipped"], info["n_items"]) == (40, 20, 60)
    assert sorted(MilvusIndex.open(spec).item_ids) == sorted(ids)
    with pytest.raises(ValueError, match=r"holds a complete index \(60 items of A\)"):
        upload(spec, batches(), meta_a, 60, show_progress=False)
    info = upload(spec, batches(ids=others, digests=None), meta_b, 60, overwrite=True, show_progress=False)
    assert sorted(MilvusIndex.open(spec).item_ids) == sorted(others) and info["dataset"] == "B"


def test_cli_refuses_a_complete_collection_and_uploads_any_id(tmp_path, tiny_dir):
    """`lrem index --data B --backend X` on a complete collection: one line, nothing written;
    --update brings it to B (odd ids deleted); a password in the URI is never printed."""
    def catalog_file(path, n, odd):
        rows = [{"item_id": f"i{j}", "title": f"{['mug', 'sofa', 'lamp'][j % 3]} {j}"} for j in range(n)]
        rows += [{"item_id": i, "title": f"odd {k}", "brand": "O'Neil"} for k, i in enumerate(odd)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    a = catalog_file(tmp_path / "a.jsonl", 10, ["it's", "back\\slash", 'q"uote', "a\\'b"])
    b = catalog_file(tmp_path / "b.jsonl", 12, ["it's"])
    spec = f"milvus:{tmp_path / 'cli.db'}/items"
    up = lrem("index", "--data", a, "--backend", spec, "--model", tiny_dir, "--upload-batch", 5)
    assert up.returncode == 0 and "uploaded 14 items" in up.stdout and ", FLAT)" in up.stdout, up.stderr[-3000:]
    for args in ([], ["--milvus-index", "HNSW"]):
        p = lrem("index", "--data", b, "--backend", spec, "--model", tiny_dir, *args)
        assert p.returncode == 2 and "Traceback" not in p.stderr
        assert p.stderr.strip().splitlines()[-1] == (f"error: {spec}: the collection holds a complete index (14 items "
                                                     f"of {a}); pass --update to bring it up to date with this "
                                                     "catalog, or --overwrite to replace it")
    # (Milvus Lite: one process at a time holds the folder, so this one opens it after the CLI's)
    p = lrem("index", "--data", b, "--backend", spec, "--update")  # its counts: A's 14 items were all it held
    assert p.returncode == 0 and "2 added, 0 changed, 3 removed, 11 kept" in p.stdout, p.stderr[-3000:]
    db = MilvusIndex.open(spec)
    assert sorted(db.item_ids) == sorted([f"i{j}" for j in range(12)] + ["it's"]) and db.meta["milvus_index"] == "FLAT"
    assert [u["dataset"] for u in db.meta["updates"]] == [str(b)] and db.meta["upload_seconds"] > 0
    p = lrem("index", "--data", b, "--backend", "milvus:http://root:S3cret@127.0.0.1:1/items", "--model", tiny_dir)
    assert p.returncode == 2 and "S3cret" not in p.stdout + p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: cannot connect to Milvus at http://root:***@127.0.0.1:1")


def test_ivf_flat_gets_its_lists_and_probes(tmp_path):
    """IVF_FLAT: nlist ~4 sqrt(n) and nprobe min(nlist, 256) by default, or as given; both reach
    Milvus (its index reports nlist, and few probes lose recall), and the defaults keep recall@10."""
    from lrem.vectordb import default_params, index_type_of, parse_params

    assert default_params("IVF_FLAT", 5000) == {"nlist": 256, "nprobe": 256}
    assert default_params("IVF_FLAT", 1_000_000) == {"nlist": 2048, "nprobe": 256}
    assert default_params("IVF_FLAT", 5000, {"nprobe": 64}) == {"nlist": 256, "nprobe": 64}
    assert default_params("HNSW", 5000) == {} and parse_params("M=8,ef=32", "HNSW") == {"M": 8, "ef": 32}
    for bad, match in (("nlist=0", "a positive integer"), ("ef=5", "expected nlist, nprobe"), ("nlist=x", "integer")):
        with pytest.raises(ValueError, match=match):
            parse_params(bad, "IVF_FLAT")
    with pytest.raises(ValueError, match="'nlist' for FLAT; expected none"):
        MilvusWriter(f"milvus:{tmp_path / 'i.db'}/bad", {"model": "m", "dim": 32}, index_params={"nlist": 8})

    n, x = 3000, unit_vectors(3000, seed=4)
    ids, q = [f"v{j}" for j in range(n)], unit_vectors(40, seed=5)
    want = ItemIndex.from_embeddings(x, ids, ids).search(q, 10)[1]

    def recall(db):
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(want, db.search(q, 10)[1])])

    spec = f"milvus:{tmp_path / 'i.db'}/ivf"
    info = upload(spec, batches_of(ids, ids, x, 1000), {"model": "m", "dim": 32}, n, index_type="IVF_FLAT",
                  show_progress=False)
    assert info["milvus_index"] == "IVF_FLAT" and info["milvus_params"] == {"nlist": 128, "nprobe": 128}
    db = MilvusIndex.open(spec)
    assert db.client.describe_index("ivf", "vector")["params"]["nlist"] == 128 and recall(db) >= 0.95
    spec2 = f"milvus:{tmp_path / 'i.db'}/few"
    upload(spec2, batches_of(ids, ids, x, 1000), {"model": "m", "dim": 32}, n, index_type="IVF_FLAT",
           index_params={"nlist": 64, "nprobe": 1}, show_progress=False)
    few = MilvusIndex.open(spec2)
    assert few.meta["milvus_params"] == {"nlist": 64, "nprobe": 1} and index_type_of(few.client, "few") == "IVF_FLAT"
    deadline = time.time() + 60  # Milvus Lite builds the index in the background (until then it scans all)
    while recall(few) > 0.6 and time.time() < deadline:
        time.sleep(0.5)
    assert recall(few) <= 0.6  # 1 of 64 lists probed: nprobe and nlist reach Milvus
    few.meta = {**few.meta, "milvus_params": {"nlist": 64, "nprobe": 64}}
    assert recall(few) == 1.0  # all lists probed


def test_an_existing_collection_keeps_its_index(tmp_path):
    """--milvus-index / --milvus-params other than the collection's are refused, not recorded;
    overwrite rebuilds; resuming and updating keep (and record) the index it has."""
    from lrem.vectordb import index_type_of, read_meta

    x, ids = unit_vectors(40, 8), [f"i{j}" for j in range(40)]
    meta = {"model": "m", "dim": 8}
    spec = f"milvus:{tmp_path / 'k.db'}/items"
    with pytest.raises(KeyboardInterrupt):
        upload(spec, interrupted(batches_of(ids, ids, x, 10), 1), meta, 40, show_progress=False)
    with pytest.raises(ValueError, match="has a FLAT index, not HNSW; pass --overwrite to rebuild it as HNSW"):
        upload(spec, batches_of(ids, ids, x, 10), meta, 40, index_type="HNSW", show_progress=False)
    writer = MilvusWriter(spec, meta)
    assert read_meta(writer.client, "items", spec)["milvus_index"] == "FLAT" and index_type_of(writer.client, "items") == "FLAT"
    info = upload(spec, batches_of(ids, ids, x, 10), meta, 40, index_type="FLAT", show_progress=False)
    assert (info["milvus_index"], info["written"]) == ("FLAT", 30)
    info = upload(spec, batches_of(ids, ids, x, 10), meta, 40, overwrite=True, index_type="IVF_FLAT",
                  index_params={"nprobe": 4}, show_progress=False)
    assert (info["milvus_index"], info["milvus_params"]) == ("IVF_FLAT", {"nprobe": 4, "nlist": 16})
    assert index_type_of(MilvusIndex.open(spec).client, "items") == "IVF_FLAT"
    updating = MilvusWriter(spec, meta, updating=True)  # what `update` opens: the index it has
    assert (updating.meta["milvus_index"], updating.meta["milvus_params"]) == ("IVF_FLAT", {"nprobe": 4, "nlist": 16})
    with pytest.raises(ValueError, match="has nprobe=4, not 8; pass --overwrite"):
        MilvusWriter(spec, meta, index_params={"nprobe": 8}, updating=True)


def test_credentials_never_appear_in_messages(tmp_path):
    from lrem.vectordb import connect, redact

    assert redact("milvus:http://root:S3cret@10.0.0.5:19530/items") == "milvus:http://root:***@10.0.0.5:19530/items"
    assert redact("cannot reach https://u:p@ss@host:1/x") == "cannot reach https://u:***@host:1/x"
    assert redact(f"milvus:{tmp_path / 'a.db'}/c") == f"milvus:{tmp_path / 'a.db'}/c"
    for call in (lambda: connect("http://root:S3cret@127.0.0.1:1"),
                 lambda: MilvusIndex.open("milvus:http://root:S3cret@127.0.0.1:1/c"),
                 lambda: parse_spec("milvus:http://root:S3cret@127.0.0.1:1/1bad")):
        with pytest.raises(ValueError) as e:
            call()
        assert "S3cret" not in str(e.value) and "root:***@127.0.0.1:1" in str(e.value)


def test_a_local_folder_held_by_another_process_is_waited_for(tmp_path):
    """Milvus Lite lets one process hold a .db folder; the server of a command that just ended can
    hold it a moment longer, so `connect` waits for it (`LOCAL_OPEN_WAIT_S`), and names the cause
    when the wait runs out."""
    from lrem.vectordb import connect

    db = tmp_path / "held.db"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pymilvus import MilvusClient\n"
                               f"c = MilvusClient({str(db)!r}); print('held', flush=True); time.sleep(4); c.close()"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match="another process may hold this Milvus Lite folder"):
            connect(str(db), wait_s=0.5)
        t0 = time.monotonic()
        connect(str(db)).close()  # opened once the holder lets go
        assert time.monotonic() - t0 < 15
    finally:
        holder.kill()
