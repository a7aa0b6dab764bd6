"""lrem.bulk / `lrem search --from-file`: a file of queries searched into JSON lines or a TREC run,
resumed after a kill where it stopped. The tiny random model, real FAISS, real files."""
from __future__ import annotations

import json

import pytest

from lrem.bulk import read_queries, search_to_file
from lrem.data.formats import DataError
from lrem.index import ItemIndex
from lrem.runfile import read_trec_run
from lrem.search import Searcher

TITLES = ["mug", "teapot", "kettle", "sofa", "rug", "lamp", "desk", "chair", "corkscrew", "whisk"]
QUERIES = ["a cup for coffee", "something to sit on", "a light", "open a wine bottle", "a carpet",
           "boil water", "a table to work at", "beat eggs"]


@pytest.fixture(scope="module")
def searcher(tiny):
    return Searcher(tiny, ItemIndex.build(tiny, {f"i{j}": t for j, t in enumerate(TITLES * 3)}, show_progress=False))


class Interrupted(Exception):
    pass


class StopsAfter:
    """A real retriever that is killed (raises) once it has answered `batches` batches."""

    def __init__(self, retriever, batches: int):
        self.retriever, self.batches, self.calls = retriever, batches, []

    def search(self, queries, k=10):
        if len(self.calls) == self.batches:
            raise Interrupted
        self.calls.append(list(queries))
        return self.retriever.search(queries, k)


def test_results_equal_searching_directly_and_a_killed_job_resumes(searcher, tmp_path):
    qfile = tmp_path / "q.txt"
    qfile.write_text("\n".join(QUERIES) + "\n\n")  # ids are line numbers; blank lines are skipped
    queries = read_queries(qfile)
    assert queries[:2] == [("1", QUERIES[0]), ("2", QUERIES[1])] and len(queries) == 8
    settings = {"mode": "direct"}
    out = tmp_path / "r.jsonl"
    killed = StopsAfter(searcher.retriever("direct"), batches=1)
    with pytest.raises(Interrupted):
        search_to_file(killed, searcher.index.title, queries, out, k=5, settings=settings, batch_size=3,
                       show_progress=False)
    assert not out.exists() and (tmp_path / "r.jsonl.partial").exists()
    with pytest.raises(ValueError, match="a search with other settings"):  # another search does not mix in
        search_to_file(searcher.retriever("reason"), searcher.index.title, queries, out, k=5,
                       settings={"mode": "reason"}, show_progress=False)
    rerun = StopsAfter(searcher.retriever("direct"), batches=99)
    info = search_to_file(rerun, searcher.index.title, queries, out, k=5, settings=settings, batch_size=3,
                          show_progress=False)
    assert info == {"searched": 5, "resumed": 3, "queries": 8, "format": "jsonl"}
    assert [q for batch in rerun.calls for q in batch] == QUERIES[3:]  # only what the kill left
    assert not (tmp_path / "r.jsonl.partial").exists()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    want = searcher.search(QUERIES, k=5, mode="direct")
    assert [r["query_id"] for r in rows] == [str(n) for n in range(1, 9)]
    assert [[i["item_id"] for i in r["items"]] for r in rows] == [w.item_ids for w in want]
    assert rows[0]["items"][0]["title"] == searcher.index.title(want[0].item_ids[0]) and rows[0]["cot"] == ""
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        search_to_file(searcher.retriever("direct"), searcher.index.title, queries, out, show_progress=False)

    # the file edited between a kill and the rerun: lines whose text changed are searched again
    edited = tmp_path / "e.jsonl"
    with pytest.raises(Interrupted):
        search_to_file(StopsAfter(searcher.retriever("direct"), 1), searcher.index.title, queries, edited, k=5,
                       settings=settings, batch_size=3, show_progress=False)
    moved = [("1", "a kettle")] + [(str(n + 2), t) for n, (_, t) in enumerate(queries)]  # a line inserted on top
    rerun = StopsAfter(searcher.retriever("direct"), 99)
    search_to_file(rerun, searcher.index.title, moved, edited, k=5, settings=settings, show_progress=False)
    assert len([q for batch in rerun.calls for q in batch]) == 9  # ids 1-3 now hold other texts: all again
    rows = [json.loads(line) for line in edited.read_text().splitlines()]
    assert [[i["item_id"] for i in r["items"]] for r in rows] == \
        [w.item_ids for w in searcher.search([t for _, t in moved], k=5, mode="direct")]

    trec = tmp_path / "run.trec"  # a TREC run: what `lrem eval -s NAME=run:FILE` reads
    search_to_file(searcher.retriever("direct"), searcher.index.title, queries, trec, k=5, settings=settings,
                   show_progress=False)
    run = read_trec_run(trec)
    assert [[i for i, _ in run[str(n)]] for n in range(1, 9)] == [w.item_ids for w in want]


def test_jsonl_queries_and_bad_rows_name_file_line_and_field(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"query_id": "a", "text": "mug"}\n{"id": 7, "query": "lamp"}\n{"text": "rug"}\n')
    assert read_queries(path) == [("a", "mug"), ("7", "lamp"), ("3", "rug")]
    for rows, where in (('{"query_id": "a", "text": "mug"}\n{"query_id": "a", "text": "cup"}', ":2: field 'query_id'"),
                        ('{"query_id": "a", "text": "  "}', ":1: field 'text': the query is empty"),
                        ('{"query_id": "a b", "text": "mug"}', ":1: field 'query_id'"),
                        ('{"query_id": "a", "query": "x\\u0007y"}', ":1: field 'query'")):
        path.write_text(rows + "\n")
        with pytest.raises(DataError, match=f"^{path}{where}"):
            read_queries(path)


def test_query_files_as_editors_and_other_tools_write_them(tmp_path):
    """A byte-order mark (Windows editors) is not part of the first query, nor does it hide a query
    log's JSON; a .txt query may start with "{"; UTF-16 and gzip are read as the data readers read
    them; BEIR's queries.jsonl keeps its ids ("_id"), not line numbers."""
    import gzip

    bom = tmp_path / "q.txt"
    bom.write_bytes("\ufeffsalon chair\r\nsmart table\r\n".encode("utf-8"))
    assert read_queries(bom) == [("1", "salon chair"), ("2", "smart table")]
    log = tmp_path / "queries.jsonl.1"  # a rotated query log, saved again by an editor that adds a mark
    log.write_bytes('\ufeff{"query_id": "a", "text": "mug"}\n'.encode("utf-8"))
    assert read_queries(log) == [("a", "mug")]
    braces = tmp_path / "b.txt"
    braces.write_text("{bracket} shelf\nlamp\n")
    assert read_queries(braces) == [("1", "{bracket} shelf"), ("2", "lamp")]
    wide = tmp_path / "w.txt"
    wide.write_bytes("mug\nlamp\n".encode("utf-16"))
    assert read_queries(wide) == [("1", "mug"), ("2", "lamp")]
    gz = tmp_path / "queries.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"query_id": "g", "text": "rug"}\n'))
    assert read_queries(gz) == [("g", "rug")]
    beir = tmp_path / "queries.jsonl"
    beir.write_text('{"_id": "q7", "text": "mug", "metadata": {}}\n{"_id": "q9", "text": "lamp", "metadata": {}}\n')
    assert read_queries(beir) == [("q7", "mug"), ("q9", "lamp")]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"mug\nlamp \xff\n")
    with pytest.raises(DataError, match=f"^{bad}:2: field 'text'"):
        read_queries(bad)


def test_query_tables_are_read_by_their_header(tmp_path):
    """A CSV/TSV/Parquet file of queries is a table: its header names the columns (WANDS' query.csv
    is tab-separated under a .csv name), not a query on line 1."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    wands = tmp_path / "query.csv"
    wands.write_text("query_id\tquery\tquery_class\n0\tsalon chair\tMassage Chairs\n1\tsmart coffee table\tTables\n")
    assert read_queries(wands) == [("0", "salon chair"), ("1", "smart coffee table")]
    plain = tmp_path / "q.csv"
    plain.write_text('text\nmug\n"lamp, floor"\n')
    assert read_queries(plain) == [("2", "mug"), ("3", "lamp, floor")]  # no id column: line numbers
    pq.write_table(pa.table({"query_id": ["a", "b"], "text": ["mug", "rug"]}), tmp_path / "q.parquet")
    assert read_queries(tmp_path / "q.parquet") == [("a", "mug"), ("b", "rug")]
    pq.write_table(pa.table({"query_id": [7, 8], "query": ["mug", "rug"]}), tmp_path / "n.parquet")  # int64 ids
    assert read_queries(tmp_path / "n.parquet") == [("7", "mug"), ("8", "rug")]
    pq.write_table(pa.table({"query_id": [True], "query": ["mug"]}), tmp_path / "b.parquet")
    with pytest.raises(DataError, match="b.parquet:1: field 'query_id': expected a string or an integer, got True"):
        read_queries(tmp_path / "b.parquet")
    for text, where in (("query_id,words\n1,mug\n", ":1: field 'text': missing column"),
                        ("query_id,query\n1,mug\n1,cup\n", ":3: field 'query_id'")):
        plain.write_text(text)
        with pytest.raises(DataError, match=f"^{plain}{where}"):
            read_queries(plain)


def test_cli_search_from_file(tiny, tmp_path):
    from test_reliability import assert_clean_error, lrem

    ItemIndex.build(tiny, {f"i{j}": t for j, t in enumerate(TITLES)}, show_progress=False).save(tmp_path / "idx")
    (tmp_path / "q.txt").write_text("\n".join(QUERIES) + "\n")
    args = ["search", "--index", str(tmp_path / "idx"), "--mode", "direct", "-k", "4", "--from-file",
            str(tmp_path / "q.txt"), "--out", str(tmp_path / "run.trec")]
    p = lrem(*args)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "wrote 8 queries' top 4" in p.stdout and len(read_trec_run(tmp_path / "run.trec")) == 8
    assert_clean_error(lrem(*args), "run.trec exists; pass --overwrite")
    piped = lrem(*args[:-1], "-", "--format", "trec")  # standard output: the same run, nothing else on it
    assert piped.returncode == 0 and "to standard output (trec)" in piped.stderr
    assert piped.stdout == (tmp_path / "run.trec").read_text() and not list(tmp_path.glob("*.partial"))
    rows = [json.loads(line) for line in lrem(*args[:-1], "-").stdout.splitlines()]  # JSON lines by default
    assert [r["query"] for r in rows] == QUERIES and all(len(r["items"]) == 4 for r in rows)
    both = lrem("search", "--index", str(tmp_path / "idx"), "a mug", "--from-file", str(tmp_path / "q.txt"))
    assert both.returncode == 2 and "give queries, or --from-file" in both.stderr and "Traceback" not in both.stderr


def test_a_partial_file_without_a_whole_line_is_resumed_if_lrems_and_left_alone_if_not(searcher, tmp_path):
    queries = [("q1", "a teapot"), ("q2", "a sofa")]
    out = tmp_path / "res.jsonl"
    partial = tmp_path / "res.jsonl.partial"
    partial.write_bytes(b"my notes, no newline")
    with pytest.raises(ValueError, match="not a partial result of lrem search"):
        search_to_file(searcher.retriever("direct"), searcher.index.title, queries, out, k=2, show_progress=False)
    assert partial.read_bytes() == b"my notes, no newline" and not out.exists()
    partial.write_bytes(b'{"lrem_bulk_search": 1, "k"')  # lrem's header, cut short by a crash
    info = search_to_file(searcher.retriever("direct"), searcher.index.title, queries, out, k=2, show_progress=False)
    assert info["searched"] == 2 and not partial.exists() and len(out.read_text().splitlines()) == 2
