"""lrem.embed and `lrem embed`: sharded, resumable catalog encoding into Parquet chunks, and
`lrem index --from-chunks` (real processes: torchrun with gloo, a run killed with SIGKILL)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lrem.data import DataError, Dataset, Item, Query, save_dataset
from lrem.embed import CHUNKS, MANIFEST, chunk_name, embed_catalog, iter_chunks, read_chunk, read_manifest
from lrem.index import ItemIndex

WORDS = ("mug cup kettle spoon fork knife plate bowl chair table lamp sofa bed shelf desk pen pencil paper book "
         "bag shoe sock hat coat glove scarf ring watch phone radio").split()
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def catalog(n: int) -> dict[str, Item]:
    return {f"i{j}": Item(f"i{j}", f"{WORDS[j % len(WORDS)]} model {j}") for j in range(n)}


def write_data(folder: Path, n: int) -> Path:
    cat = catalog(n)
    save_dataset(Dataset(cat, {"q": Query("q", "a cup", "c", "dev")}, {"q": {"i1": 1}}), folder)
    return folder


def lrem(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lrem.cli", *map(str, args)], capture_output=True, text=True, env=ENV,
                          timeout=1800, **kw)


def chunk_state(folder: Path) -> dict[str, tuple[int, int]]:
    """chunk name -> (inode, mtime_ns): a chunk written again gets a new inode (temp + rename)."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted((folder / CHUNKS).glob("chunk-*.parquet"))}


def test_doctests():
    import doctest

    import lrem.embed

    assert doctest.testmod(lrem.embed).failed == 0


def test_chunks_hold_the_catalog_in_order_and_index_like_the_in_memory_build(tmp_path, tiny):
    cat = catalog(37)
    stats = embed_catalog(tiny, cat, tmp_path / "ch", chunk_size=8, show_progress=False)
    assert (stats.encoded, stats.skipped, stats.items, stats.stopped) == ([0, 1, 2, 3, 4], [], 37, False)
    man = read_manifest(tmp_path / "ch")
    assert (man["n_chunks"], man["chunk_size"], man["dim"], man["complete"]) == (5, 8, tiny.dim, True)
    rows = [r for part in iter_chunks(tmp_path / "ch", show_progress=False) for r in zip(*part)]
    assert [r[0] for r in rows] == list(cat) and [r[1] for r in rows] == [x.title for x in cat.values()]
    ids, titles, x = read_chunk(tmp_path / "ch" / CHUNKS / chunk_name(4))
    assert len(ids) == 5 and x.dtype == np.float32 and x.shape == (5, tiny.dim)
    np.testing.assert_allclose(x, tiny.encode_items(list(cat.values())[32:]), atol=1e-6)

    built = ItemIndex.build(tiny, cat, show_progress=False)
    chunked = ItemIndex.from_chunks(tmp_path / "ch", show_progress=False)
    assert chunked.item_ids == built.item_ids and chunked.meta["model"] == built.meta["model"]
    q = tiny.encode_queries(["a cup", "a chair"], mode="direct").embeddings
    (s1, i1), (s2, i2) = built.search(q, 10), chunked.search(q, 10)
    assert i1 == i2
    np.testing.assert_allclose(s1, s2, atol=1e-5)
    # a trained index (IVF) trains on a sample of the chunks, then adds chunk by chunk
    ivf = ItemIndex.from_chunks(tmp_path / "ch", factory="IVF2,Flat", search_params="nprobe=2", show_progress=False)
    assert ivf.index.ntotal == 37 and ivf.search(q, 10)[1] == i1
    assert chunked.digests == built.digests and chunked.facets == built.facets == {}  # titles only: no fields


def test_chunks_keep_digests_and_filter_fields(tmp_path, tiny):
    """The optional columns: an index from chunks filters and updates as one built in memory."""
    import pyarrow.parquet as pq

    cat = {f"i{j}": Item(f"i{j}", f"{WORDS[j % len(WORDS)]} {j}", category=["home", "kitchen"][j % 2],
                         brand=None if j % 3 == 0 else "Acme", color="red" if j < 8 else None) for j in range(30)}
    embed_catalog(tiny, cat, tmp_path / "ch", chunk_size=8, show_progress=False)
    names = [set(pq.read_schema(f).names) for f in sorted((tmp_path / "ch" / CHUNKS).glob("chunk-*.parquet"))]
    assert names[0] >= {"digest", "category", "brand", "color"} and "color" not in names[-1]  # no red item there
    built, chunked = ItemIndex.build(tiny, cat, show_progress=False), ItemIndex.from_chunks(tmp_path / "ch",
                                                                                         show_progress=False)
    assert chunked.digests == built.digests and chunked.facets == built.facets
    q = tiny.encode_queries(["a cup", "a chair"], mode="direct").embeddings
    for where in ({"category": "home"}, {"brand": "Acme", "color": "red"}):
        assert chunked.search(q, 5, where=where)[1] == built.search(q, 5, where=where)[1]
    assert chunked.updated(tiny, cat, show_progress=False)[1]["kept"] == 30  # digests compared: nothing to embed


def test_resume_skips_written_chunks_and_refuses_other_settings(tmp_path, tiny):
    cat = catalog(20)
    first = embed_catalog(tiny, cat, tmp_path / "ch", chunk_size=4, max_chunks=2, show_progress=False)
    assert first.encoded == [0, 1] and first.stopped and "complete" not in read_manifest(tmp_path / "ch")
    with pytest.raises(ValueError, match=r"3 of 5 chunks missing \(2, 3, 4\)"):
        ItemIndex.from_chunks(tmp_path / "ch")
    (tmp_path / "ch" / CHUNKS / ".chunk-000002.parquet.abc.tmp").write_bytes(b"half a chunk")  # a killed writer's
    before = chunk_state(tmp_path / "ch")
    again = embed_catalog(tiny, cat, tmp_path / "ch", chunk_size=4, show_progress=False)
    assert (again.encoded, again.skipped) == ([2, 3, 4], [0, 1])
    after = chunk_state(tmp_path / "ch")
    assert {k: after[k] for k in before} == before and len(after) == 5  # none written twice, none lost
    assert not list((tmp_path / "ch" / CHUNKS).glob(".*"))
    assert read_manifest(tmp_path / "ch")["complete"] is True
    with pytest.raises(DataError, match=r"embed.json: field 'chunk_size': 4 in the earlier run, 5 now"):
        embed_catalog(tiny, cat, tmp_path / "ch", chunk_size=5, show_progress=False)
    with pytest.raises(DataError, match="catalog_sha1"):
        embed_catalog(tiny, {("x0" if k == "i0" else k): v for k, v in cat.items()}, tmp_path / "ch", chunk_size=4,
                      show_progress=False)


def test_resume_refuses_edited_items_and_knows_the_model_by_its_weights(tmp_path, tiny, tiny_dir):
    """The same ids with other titles would resume into a folder of the old titles' vectors (mixed
    in silently); the same weights under another spelling of their path are the same model."""
    from lrem.model import LREM

    cat = catalog(20)
    embed_catalog(tiny, cat, tmp_path / "ch", chunk_size=4, max_chunks=2, show_progress=False)
    edited = {**cat, "i13": Item("i13", "teapot, brand new title")}
    with pytest.raises(DataError, match=r"field 'items_sha1': the items' text changed since the earlier run"):
        embed_catalog(tiny, edited, tmp_path / "ch", chunk_size=4, show_progress=False)
    same = LREM.from_pretrained(str(tiny_dir) + "/", dtype="float32", log=lambda *_: None)  # `--model m/` this time
    assert same.source != read_manifest(tmp_path / "ch")["model"]
    again = embed_catalog(same, cat, tmp_path / "ch", chunk_size=4, show_progress=False)
    assert (again.encoded, again.skipped) == ([2, 3, 4], [0, 1])


def test_chunks_pin_their_run_so_foreign_chunks_are_never_mixed_in(tmp_path, tiny, lively_dir):
    """Each chunk names its run (model, catalog, chunking) in its Parquet metadata: a chunk of
    another run (copied in; a folder whose embed.json was deleted) is refused by `from_chunks`
    and embedded again by a resumed `lrem embed`."""
    import shutil

    from lrem.model import LREM

    other = LREM.from_pretrained(str(lively_dir("llama")), dtype="float32", log=lambda *_: None)
    assert other.dim == tiny.dim
    cat = catalog(12)
    embed_catalog(tiny, cat, tmp_path / "a", chunk_size=4, show_progress=False)
    embed_catalog(other, cat, tmp_path / "b", chunk_size=4, show_progress=False)
    shutil.copyfile(tmp_path / "b" / CHUNKS / chunk_name(1), tmp_path / "a" / CHUNKS / chunk_name(1))
    with pytest.raises(DataError, match=r"chunk-000001.parquet: field 'model_fingerprint': .*another run wrote"):
        ItemIndex.from_chunks(tmp_path / "a", show_progress=False)
    again = embed_catalog(tiny, cat, tmp_path / "a", chunk_size=4, show_progress=False)
    assert (again.encoded, again.skipped) == ([1], [0, 2])
    _, _, x = read_chunk(tmp_path / "a" / CHUNKS / chunk_name(1))
    np.testing.assert_allclose(x, tiny.encode_items(list(cat.values())[4:8]), atol=1e-6)
    assert ItemIndex.from_chunks(tmp_path / "a", show_progress=False).index.ntotal == 12
    (tmp_path / "a" / MANIFEST).unlink()  # the manifest lost: no chunk of tiny's run is taken for other's
    assert embed_catalog(other, cat, tmp_path / "a", chunk_size=4, show_progress=False).encoded == [0, 1, 2]
    for c in range(3):
        np.testing.assert_array_equal(read_chunk(tmp_path / "a" / CHUNKS / chunk_name(c))[2],
                                      read_chunk(tmp_path / "b" / CHUNKS / chunk_name(c))[2])


def test_float16_chunks_and_damaged_chunks(tmp_path, tiny):
    cat = catalog(10)
    embed_catalog(tiny, cat, tmp_path / "h", chunk_size=4, vector_dtype="float16", show_progress=False)
    import pyarrow.parquet as pq

    assert str(pq.read_schema(tmp_path / "h" / CHUNKS / chunk_name(0)).field("vector").type.value_type) == "halffloat"
    _, _, x = read_chunk(tmp_path / "h" / CHUNKS / chunk_name(0))
    full = tiny.encode_items([c.title for c in list(cat.values())[:4]])
    assert x.dtype == np.float32 and np.abs(x - full).max() < 2e-3
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-6)
    (tmp_path / "h" / CHUNKS / chunk_name(1)).write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"chunk-000001.parquet: not a readable Parquet chunk"):
        ItemIndex.from_chunks(tmp_path / "h", show_progress=False)
    whole = (tmp_path / "h" / CHUNKS / chunk_name(2)).read_bytes()
    (tmp_path / "h" / CHUNKS / chunk_name(2)).write_bytes(whole[: len(whole) // 2])  # a copy cut short
    again = embed_catalog(tiny, cat, tmp_path / "h", chunk_size=4, vector_dtype="float16", show_progress=False)
    assert (again.encoded, again.skipped) == ([1, 2], [0])  # the damaged chunks are embedded again
    assert (tmp_path / "h" / CHUNKS / chunk_name(2)).read_bytes() == whole
    assert len(ItemIndex.from_chunks(tmp_path / "h", show_progress=False).item_ids) == 10


def test_two_processes_write_the_vectors_of_one(tmp_path, tiny_dir):
    """torchrun, 2 CPU processes (gloo): each encodes every other chunk; the chunks equal a 1-process run's."""
    data = write_data(tmp_path / "ds", 45)
    one = lrem("embed", "--data", data, "--model", tiny_dir, "--out", tmp_path / "one", "--chunk-size", 7, "--threads", 1)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "rank 0/1: encoded 7 chunks (45 items)" in one.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lrem.cli",
           "embed", "--data", str(data), "--model", str(tiny_dir), "--out", str(tmp_path / "two"), "--chunk-size", "7"]
    two = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=1800)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "rank 0/2: encoded 4 chunks (24 items)" in two.stderr and "rank 1/2: encoded 3 chunks (21 items)" in two.stderr
    assert read_manifest(tmp_path / "two")["complete"] is True
    for c in range(7):
        a, b = read_chunk(tmp_path / "one" / CHUNKS / chunk_name(c)), read_chunk(tmp_path / "two" / CHUNKS / chunk_name(c))
        assert a[:2] == b[:2]
        np.testing.assert_allclose(a[2], b[2], atol=1e-6, rtol=0)
    # resumed with another chunk size: each rank refuses it with the one line; none is left waiting at the
    # barrier for rank 0, which has exited (gloo's "Connection closed by peer" and a traceback)
    bad = subprocess.run([*cmd[:-1], "5"], capture_output=True, text=True, env=ENV, timeout=1800)
    assert bad.returncode != 0 and bad.stderr.count("field 'chunk_size': 7 in the earlier run, 5 now") == 1
    assert not re.search(r"\[rank\d\]: Traceback|Connection closed by peer", bad.stderr), bad.stderr[-3000:]


def test_a_killed_run_resumes_without_encoding_a_chunk_twice(tmp_path, tiny_dir):
    data = write_data(tmp_path / "ds", 240)
    out = tmp_path / "ch"
    args = ["embed", "--data", data, "--model", tiny_dir, "--out", out, "--chunk-size", 2, "--threads", 1]
    part = lrem(*args, "--max-chunks", 3)
    assert part.returncode == 0 and "encoded 3 chunks" in part.stderr and "not complete" in part.stdout, part.stderr[-2000:]
    bad = lrem("index", "--from-chunks", out, "--out", tmp_path / "idx")  # bad input: one line, exit 2
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and not (tmp_path / "idx").exists()
    assert bad.stderr.strip().splitlines()[-1].startswith(f"error: {out}: 117 of 120 chunks missing (3, 4, 5,")

    # a real kill: SIGKILL once a few more chunks are on disk
    p = subprocess.Popen([sys.executable, "-m", "lrem.cli", *map(str, args)], env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + 1500
    while len(chunk_state(out)) < 8 and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    before = chunk_state(out)
    assert 8 <= len(before) < 120, "the run finished before it was killed; make the catalog bigger"

    rest = lrem(*args)
    assert rest.returncode == 0, rest.stderr[-3000:]
    m = re.search(r"encoded (\d+) chunks \((\d+) items\).*skipped (\d+) written earlier", rest.stderr)
    assert (int(m[1]), int(m[3])) == (120 - len(before), len(before)) and int(m[2]) == 2 * (120 - len(before))
    after = chunk_state(out)
    assert {k: after[k] for k in before} == before and len(after) == 120  # none encoded twice, none lost
    assert not list((out / CHUNKS).glob(".*.tmp"))  # the killed writer's temp file is gone
    ids = [i for part in iter_chunks(out, show_progress=False) for i in part[0]]
    from lrem.data import load_dataset

    assert ids == list(load_dataset(data).catalog) and len(set(ids)) == 240
    done = lrem("index", "--from-chunks", out, "--out", tmp_path / "idx", "--threads", 1)
    assert done.returncode == 0 and "indexed 240 items" in done.stdout, done.stderr[-2000:]
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert meta["n_items"] == 240 and meta["model"] == str(tiny_dir) and meta["chunks"] == str(out)


def test_on_disk_ivf_lists_search_like_in_memory_and_travel_with_the_folder(tmp_path, tiny):
    """`from_chunks(on_disk=...)`: each chunk a block, merged into one memory-mapped lists file that
    `save` moves into the index folder; the results equal the in-memory IVF's, also after the
    folder is moved and loaded again; fast-scan and refine factories are refused up front."""
    import shutil

    from lrem.index import LISTS_FILE

    cat = catalog(61)
    embed_catalog(tiny, cat, tmp_path / "ch", chunk_size=8, show_progress=False)
    q = tiny.encode_queries(["a cup", "a chair", "a lamp"], mode="direct").embeddings
    mem = ItemIndex.from_chunks(tmp_path / "ch", factory="IVF4,Flat", search_params="nprobe=2", show_progress=False)
    disk = ItemIndex.from_chunks(tmp_path / "ch", factory="IVF4,Flat", search_params="nprobe=2", show_progress=False,
                                 on_disk=tmp_path)
    assert disk.meta["on_disk"] is True and disk.index.ntotal == 61
    (s1, i1), (s2, i2) = mem.search(q, 20), disk.search(q, 20)
    assert i1 == i2
    np.testing.assert_allclose(s1, s2, atol=1e-6)
    disk.save(tmp_path / "idx")
    assert (tmp_path / "idx" / LISTS_FILE).stat().st_size > 0
    assert not list(tmp_path.glob(".lrem-ivf-*"))  # the scratch folder (blocks, lists) is gone
    shutil.move(str(tmp_path / "idx"), tmp_path / "moved")  # the lists are read from the index's own folder
    loaded = ItemIndex.load(tmp_path / "moved")
    assert loaded.search(q, 20)[1] == i1
    loaded.save(tmp_path / "copy")  # a loaded on-disk index saved elsewhere takes a copy of its lists
    assert ItemIndex.load(tmp_path / "copy").search(q, 20)[1] == i1 and (tmp_path / "moved" / LISTS_FILE).is_file()
    for factory in ("HNSW8,Flat", "IVF4,PQ4x4fs", "IVF4,Flat,RFlat"):
        with pytest.raises(ValueError, match="cannot keep its lists on disk"):
            ItemIndex.from_chunks(tmp_path / "ch", factory=factory, show_progress=False, on_disk=tmp_path)
    assert not list(tmp_path.glob(".lrem-ivf-*"))  # refused before any scratch folder is made


def test_a_killed_on_disk_build_leaves_no_scratch_behind_its_rerun(tmp_path, tiny):
    """SIGKILL during `lrem index --on-disk`: its scratch folder beside OUT (the blocks, then the
    merged lists: as big as the index) is removed by the next on-disk build there, while one that
    a live build holds is left alone."""
    import fcntl

    embed_catalog(tiny, catalog(600), tmp_path / "ch", chunk_size=2, show_progress=False)
    live = tmp_path / ".lrem-ivf-live"  # another build's, in progress: its lock is held
    live.mkdir()
    held = os.open(live / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX)
    args = [sys.executable, "-m", "lrem.cli", "index", "--from-chunks", str(tmp_path / "ch"), "--out",
            str(tmp_path / "idx"), "--factory", "IVF8,Flat", "--on-disk", "--threads", "1"]
    p = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not list(tmp_path.glob(".lrem-ivf-*/block00010.index")) and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    left = [d for d in tmp_path.glob(".lrem-ivf-*") if d != live]
    assert len(left) == 1 and not (tmp_path / "idx").exists(), "the build finished before it was killed"
    done = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert list(tmp_path.glob(".lrem-ivf-*")) == [live] and ItemIndex.load(tmp_path / "idx").index.ntotal == 600
    os.close(held)


def test_cli_on_disk_index(tmp_path, tiny, tiny_dir):
    import subprocess
    import sys

    embed_catalog(tiny, catalog(30), tmp_path / "ch", chunk_size=8, show_progress=False)
    base = [sys.executable, "-m", "lrem.cli", "index", "--factory", "IVF2,Flat", "--on-disk"]
    p = subprocess.run([*base, "--from-chunks", str(tmp_path / "ch"), "--out", str(tmp_path / "idx")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert ItemIndex.load(tmp_path / "idx").index.ntotal == 30 and (tmp_path / "idx" / "lists.ivfdata").is_file()
    p = subprocess.run([*base, "--data", str(tmp_path), "--out", str(tmp_path / "x"), "--model", str(tiny_dir)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "--on-disk" in p.stderr and "Traceback" not in p.stderr
