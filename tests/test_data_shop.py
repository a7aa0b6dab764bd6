"""A shop's own exports read by lrem.data: the quirks of real CSV/TSV/Parquet/JSONL files and
of BEIR/WANDS copies that are not clean (every row read is counted, none silently lost)."""
from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lrem.data import DataError, convert, detect_format, from_beir, from_wands, load_catalog, load_dataset

QUERIES_CSV = "query_id,text,category,split\nq1,oak chair,c,test\n"


def lrem_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LREM_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "lrem.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_tsv_stray_quote_is_an_error_not_rows_merged_into_one_title(tmp_path):
    """A title opening with an unpaired quote used to swallow the next row up to an inch mark
    (`30"` before a tab): 3 rows read as 2, item 2 gone, item 1 titled with row 2's cells."""
    src = tmp_path / "shop"
    src.mkdir()
    (src / "catalog.tsv").write_text('item_id\ttitle\tbrand\n1\t"Big chair\tAcme\n2\tSmall table 30"\tZed\n'
                                     '3\tlamp\tQ\n')
    (src / "queries.csv").write_text(QUERIES_CSV)
    (src / "qrels.csv").write_text("query_id,item_id,relevance\nq1,1,1\n")
    with pytest.raises(DataError) as info:
        load_catalog(src / "catalog.tsv")
    assert (info.value.line, info.value.field) == (2, "title") and "stray" in str(info.value)

    p = lrem_cli("data", "convert", str(src), "--out", str(tmp_path / "out"))
    assert p.returncode == 2 and p.stderr.splitlines() == [f"error: {info.value}"], p.stderr
    assert not (tmp_path / "out").exists()

    # a field quoted as a CSV writer quotes it (doubled quotes, a line break, a tab) is still read whole
    (src / "catalog.tsv").write_text('item_id\ttitle\tbrand\n1\t"Big ""oak""\tchair\nsecond line"\tAcme\n'
                                     '2\tSmall table 30"\tZed\n3\tlamp\tQ\n')
    catalog = load_catalog(src / "catalog.tsv")
    assert [i.title for i in catalog.values()] == ['Big "oak"\tchair\nsecond line', 'Small table 30"', "lamp"]


def write_beir(src: Path, queries: str) -> Path:
    (src / "qrels").mkdir(parents=True)
    (src / "corpus.jsonl").write_text('{"_id": "d1", "title": "Oak chair"}\n{"_id": "d2", "title": "Lamp"}\n')
    (src / "queries.jsonl").write_text(queries)
    (src / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\n")
    return src


def test_beir_query_id_given_twice_keeps_the_first_says_so_and_counts_every_row(tmp_path):
    """It used to keep the last text silently, and report 2 rows read of the 3 in the file."""
    src = write_beir(tmp_path / "beir", '{"_id": "q1", "text": "wooden chair"}\n{"_id": "q2", "text": "desk light"}\n'
                                        '{"_id": "q1", "text": "metal stool"}\n')
    said = []
    ds = from_beir(src, log=said.append)
    assert ds.queries["q1"].text == "wooden chair"
    assert said == [f"warning: {src}/queries.jsonl: skipped 1 row (line 3): field '_id': 'q1' again "
                    "(the first one is kept)"]
    assert ds.source_rows["queries.jsonl"] == 3


def test_beir_integer_ids_match_the_qrels(tmp_path):
    src = write_beir(tmp_path / "beir", '{"_id": "q1", "text": "wooden chair"}\n{"_id": "q2", "text": "lamp"}\n')
    (src / "corpus.jsonl").write_text('{"_id": 7, "title": "Oak chair"}\n{"_id": "d2", "title": "Lamp"}\n')
    (src / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\t7\t1\nq2\td2\t1\n")
    assert from_beir(src, log=print).qrels == {"q1": {"7": 1}, "q2": {"d2": 1}}


def test_wands_product_id_given_twice_keeps_the_first_and_says_so(tmp_path):
    """It used to keep the last row silently: label.csv's judgement of product 0 then pointed at
    another product."""
    src = tmp_path / "wands"
    src.mkdir()
    (src / "product.csv").write_text("product_id\tproduct_name\tproduct_class\n0\tsolid wood chair\tChairs\n"
                                     "1\tdesk lamp\tLamps\n0\tmetal stool\tStools\n")
    (src / "query.csv").write_text("query_id\tquery\tquery_class\n0\toak chair\tChairs\n")
    (src / "label.csv").write_text("id\tquery_id\tproduct_id\tlabel\n0\t0\t0\tExact\n1\t0\t1\tIrrelevant\n")
    said = []
    ds = from_wands(src, log=said.append)
    assert ds.catalog["0"].title == "solid wood chair" and len(ds.catalog) == 2
    assert said == [f"warning: {src}/product.csv: skipped 1 row (line 4): field 'product_id': '0' again "
                    "(the first one is kept)"]


def test_integer_ids_of_a_parquet_or_json_export_are_read_as_strings(tmp_path):
    """A shop's Parquet export holds int64 ids; they were refused ("expected a string, got 7")
    although `lrem search --queries` reads the same table's ids."""
    src = tmp_path / "shop"
    src.mkdir()
    pq.write_table(pa.table({"item_id": [7, 8], "title": ["oak chair", "lamp"]}), src / "catalog.parquet")
    (src / "queries.csv").write_text(QUERIES_CSV)
    (src / "qrels.jsonl").write_text('{"query_id": "q1", "item_id": 7, "relevance": 1}\n'
                                     '{"query_id": "q1", "item_id": "8", "relevance": 0}\n')
    ds = load_dataset(src)
    assert ds.qrels == {"q1": {"7": 1, "8": 0}} and set(ds.catalog) == {"7", "8"}
    assert load_catalog(src / "catalog.parquet")["7"].title == "oak chair"

    (src / "qrels.jsonl").write_text('{"query_id": "q1", "item_id": "007", "relevance": 1}\n')
    with pytest.raises(DataError, match=r"qrels\.jsonl:1: field 'item_id': unknown item id '007'"):
        load_dataset(src)  # "007" is not 7: an id is compared as written, never as a number
    (src / "qrels.jsonl").write_text('{"query_id": "q1", "item_id": 7.0, "relevance": 1}\n')
    with pytest.raises(DataError, match=r"qrels\.jsonl:1: field 'item_id': expected a string or an integer"):
        load_dataset(src)


def test_relevance_written_as_a_whole_float_is_read(tmp_path):
    """A grade column that went through a float ("1.0" in a CSV, 2.0 in Parquet) was refused."""
    src = tmp_path / "shop"
    src.mkdir()
    (src / "catalog.csv").write_text("item_id,title\na,oak chair\nb,lamp\nc,stool\n")
    (src / "queries.csv").write_text(QUERIES_CSV)
    (src / "qrels.csv").write_text("query_id,item_id,relevance\nq1,a,1.0\nq1,b, 2 \nq1,c,0.\n")
    assert load_dataset(src).qrels == {"q1": {"a": 1, "b": 2, "c": 0}}
    (src / "qrels.csv").unlink()
    pq.write_table(pa.table({"query_id": ["q1", "q1"], "item_id": ["a", "b"], "relevance": [2.0, 0.0]}),
                   src / "qrels.parquet")
    assert load_dataset(src).qrels == {"q1": {"a": 2, "b": 0}}
    pq.write_table(pa.table({"query_id": ["q1", "q1"], "item_id": ["a", "b"], "relevance": [2.0, 0.5]}),
                   src / "qrels.parquet")
    with pytest.raises(DataError, match=r"qrels\.parquet:2: field 'relevance': expected an integer, got 0\.5"):
        load_dataset(src)


def test_parquet_catalog_reads_only_the_columns_lrem_uses(tmp_path):
    """Every column used to become Python objects: an export's embedding column (1M rows x 768
    floats) costs tens of gigabytes before a single item is indexed."""
    n, dim = 2000, 512
    vectors = pa.FixedSizeListArray.from_arrays(pa.array([0.5] * (n * dim), pa.float32()), dim)
    path = tmp_path / "catalog.parquet"
    pq.write_table(pa.table({"item_id": [f"i{k}" for k in range(n)], "title": [f"chair {k}" for k in range(n)],
                             "embedding": vectors, "price": [1.5] * n}), path)
    tracemalloc.start()
    try:
        catalog = load_catalog(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(catalog) == n and catalog["i1"].title == "chair 1"
    assert peak < 8e6, peak  # the embedding column as Python floats alone is n * dim * 24 bytes = 24 MB


def test_excel_unicode_text_export_is_read(tmp_path):
    """Excel's "Unicode Text" is UTF-16 TSV with a byte order mark; it was read as UTF-8, so the
    error named a header of NULs and stray bytes."""
    path = tmp_path / "catalog.tsv"
    path.write_bytes("item_id\ttitle\r\nA1\tCafé chair\r\nA2\tlamp\r\n".encode("utf-16"))
    catalog = load_catalog(path)
    assert [(i.item_id, i.title) for i in catalog.values()] == [("A1", "Café chair"), ("A2", "lamp")]
    path.write_bytes("item_id\ttitle\r\nA1\tchair\r\n".encode("utf-16") + b"\x00")  # an odd byte: cut short
    with pytest.raises(DataError, match="not valid UTF-16"):
        load_catalog(path)


def test_auto_tells_lrem_parquet_tables_from_a_merged_esci_parquet(tmp_path):
    """Any .parquet in a folder used to be taken for a merged ESCI file: a folder of lrem's own
    tables in Parquet failed with "catalog.parquet: field 'query_id': missing column"."""
    src = tmp_path / "shop"
    src.mkdir()
    pq.write_table(pa.table({"item_id": ["a", "b"], "title": ["oak chair", "lamp"]}), src / "catalog.parquet")
    pq.write_table(pa.table({"query_id": ["q1"], "text": ["chair"], "category": ["c"], "split": ["test"]}),
                   src / "queries.parquet")
    pq.write_table(pa.table({"query_id": ["q1"], "item_id": ["a"], "relevance": [1]}), src / "qrels.parquet")
    assert detect_format(src) == "lrem" and convert(src).qrels == {"q1": {"a": 1}}

    esci = tmp_path / "esci"
    esci.mkdir()
    pq.write_table(pa.table({"query_id": [1], "query": ["chair"], "product_id": ["B0"], "product_locale": ["us"],
                             "esci_label": ["E"], "product_title": ["Oak chair"]}), esci / "esci.parquet")
    assert detect_format(esci) == "esci" and convert(esci, log=print).qrels == {"1": {"B0": 3}}
