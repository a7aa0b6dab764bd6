"""lrem.data: the dataset folder format, its validation, converters and sampling (real files)."""
from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lrem.data import (DataError, Dataset, Item, Query, convert, detect_format, from_beir, from_esci, from_wands,
                       load_dataset, read_table, read_wands_queries, sample_dataset, save_dataset)
from lrem.data.converters import FORMATS

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FIELDS = {
    "catalog": ["item_id", "title", "category", "text"],
    "queries": ["query_id", "text", "category", "split", "hard"],
    "qrels": ["query_id", "item_id", "relevance"],
}


def tiny() -> Dataset:
    catalog = {
        "i1": Item("i1", "steel corkscrew", "opener", 'pulls corks, "fast"\nsecond line'),
        "i2": Item("i2", "bread knife", "knife"),
        "i3": Item("i3", "teapot", None, "glazed"),
    }
    queries = {
        "q1": Query("q1", "open a wine bottle", "definition", "train", True),
        "q2": Query("q2", "cut a loaf", "definition", "test", False),
        "q3": Query("q3", "kitchen things", "category", "test"),
    }
    qrels = {"q1": {"i1": 1, "i2": 0}, "q2": {"i2": 2}, "q3": {"i1": 1, "i2": 1, "i3": 1}}
    return Dataset(catalog, queries, qrels, "tiny")


def table_rows(ds: Dataset, table: str) -> list[dict]:
    if table == "qrels":
        return [{"query_id": q, "item_id": i, "relevance": r} for q, rels in ds.qrels.items() for i, r in rels.items()]
    return [vars(obj) for obj in getattr(ds, table).values()]


def write_table(path: Path, rows: list[dict], fields: list[str]) -> None:
    """Write rows the way a user's tool would: CSV/TSV with csv, parquet with pyarrow, JSONL."""
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n" for r in rows))
    else:
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter="\t" if path.suffix == ".tsv" else ",")
            w.writerow(fields)
            for r in rows:
                w.writerow(["" if r.get(k) is None else str(r[k]).lower() if isinstance(r[k], bool) else r[k]
                            for k in fields])


def write_folder(folder: Path, ds: Dataset, ext: str = ".jsonl") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for table, fields in FIELDS.items():
        write_table(folder / f"{table}{ext}", table_rows(ds, table), fields)
    return folder


def same_content(a: Dataset, b: Dataset) -> bool:
    return (a.catalog, a.queries, a.qrels) == (b.catalog, b.queries, b.qrels)


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("ext", [".jsonl", ".csv", ".tsv", ".parquet"])
def test_load_each_format(tmp_path, ext):
    loaded = load_dataset(write_folder(tmp_path / "ds", tiny(), ext))
    assert same_content(loaded, tiny())
    assert loaded.name == "ds"


def test_save_load_round_trip_is_byte_stable(tmp_path):
    save_dataset(tiny(), tmp_path / "a")
    loaded = load_dataset(tmp_path / "a")
    assert same_content(loaded, tiny())
    save_dataset(loaded, tmp_path / "b")
    for table in FIELDS:
        assert (tmp_path / "a" / f"{table}.jsonl").read_bytes() == (tmp_path / "b" / f"{table}.jsonl").read_bytes()
    first = json.loads((tmp_path / "a" / "catalog.jsonl").read_text().splitlines()[2])
    assert first == {"item_id": "i3", "title": "teapot", "text": "glazed"}  # None fields omitted
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]  # no temp folders left behind


def test_tab_separated_csv_is_sniffed(tmp_path):
    path = tmp_path / "qrels.csv"
    path.write_text("query_id\titem_id\trelevance\nq1\ti1\t2\n")
    assert read_table(path, {"query_id": str, "item_id": str, "relevance": int}, {}) == [
        {"query_id": "q1", "item_id": "i1", "relevance": 2}]


def test_csv_accepts_text_values(tmp_path):
    path = tmp_path / "queries.csv"
    path.write_text("query_id,text,category,split,hard\n"
                    "a,x,c,train,true\nb,x,c,train,0\nc,x,c,train,\nd,x,c,train,FALSE\n")
    rows = read_table(path, {"query_id": str, "text": str, "category": str, "split": str}, {"hard": bool})
    assert [r["hard"] for r in rows] == [True, False, None, False]


def test_blank_jsonl_lines_are_skipped_and_counted(tmp_path):
    path = tmp_path / "catalog.jsonl"
    path.write_text('{"item_id": "a", "title": "x"}\n\n{"item_id": "b"}\n')
    with pytest.raises(DataError, match=r"catalog\.jsonl:3: field 'title': missing"):
        read_table(path, {"item_id": str, "title": str}, {})


# ----------------------------------------------------------------------------- bad inputs

BAD = {  # case: (file name, content, line, field)
    "malformed json": ("catalog.jsonl", '{"item_id": "i1", "title": "a"}\n{"item_id": "i2", "title": \n', 2, None),
    "missing title": ("catalog.jsonl", '{"item_id": "i1", "title": "a"}\n{"item_id": "i2"}\n', 2, "title"),
    "empty id": ("catalog.jsonl", '{"item_id": "", "title": "a"}\n', 1, "item_id"),
    "empty text": ("catalog.jsonl", '{"item_id": "i1", "title": "a", "text": " "}\n', 1, "text"),
    "int title": ("catalog.jsonl", '{"item_id": "i1", "title": 7}\n', 1, "title"),
    "duplicate item": ("catalog.jsonl", '{"item_id": "i1", "title": "a"}\n{"item_id": "i1", "title": "b"}\n', 2,
                       "item_id"),
    "bad utf-8": ("catalog.jsonl", b'{"item_id": "i1", "title": "a"}\n\n{"item_id": "i2", "title": "caf\xe9"}\n', 3,
                  "title"),
    "empty file": ("catalog.jsonl", "", 1, None),
    "csv bad utf-8": ("catalog.csv", b'item_id,title,text\ni1,a,"two\nlines"\ni2,b,\xff\n', 4, "text"),
    "csv header only": ("catalog.csv", "item_id,title\n", 1, None),
    "csv extra cells": ("catalog.csv", "item_id,title\ni1,a,b\n", 2, None),
    "float relevance": ("qrels.jsonl", '{"query_id": "q1", "item_id": "i1", "relevance": 1.5}\n', 1, "relevance"),
    "text relevance": ("qrels.jsonl", '{"query_id": "q1", "item_id": "i1", "relevance": "x"}\n', 1, "relevance"),
    "bool relevance": ("qrels.jsonl", '{"query_id": "q1", "item_id": "i1", "relevance": true}\n', 1, "relevance"),
    "csv text relevance": ("qrels.csv", "query_id,item_id,relevance\nq1,i1,2\nq1,i2,x\n", 3, "relevance"),
    "csv missing column": ("qrels.csv", "query_id,item_id\nq1,i1\n", 1, "relevance"),
    "csv bad hard": ("queries.csv", "query_id,text,category,split,hard\nq1,t,c,train,maybe\n", 2, "hard"),
    "csv empty split": ("queries.csv", "query_id,text,category,split\nq1,t,c,\n", 2, "split"),
    "json int split": ("queries.jsonl", '{"query_id": "q1", "text": "t", "category": "c", "split": 3}\n', 1, "split"),
    "duplicate query": ("queries.jsonl", '{"query_id": "q1", "text": "t", "category": "c", "split": "train"}\n' * 2,
                        2, "query_id"),
    "duplicate pair": ("qrels.jsonl", '{"query_id": "q1", "item_id": "i1", "relevance": 1}\n' * 2, 2, "item_id"),
    "unknown query": ("qrels.jsonl", '{"query_id": "q1", "item_id": "i1", "relevance": 1}\n'
                                     '{"query_id": "zz", "item_id": "i1", "relevance": 1}\n', 2, "query_id"),
    "unknown item": ("qrels.tsv", "query_id\titem_id\trelevance\nq1\tzz\t1\n", 2, "item_id"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_names_file_line_and_field(tmp_path, case):
    name, content, line, field = BAD[case]
    folder = write_folder(tmp_path / "ds", tiny())
    (folder / f"{name.split('.')[0]}.jsonl").unlink()
    path = folder / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError) as info:
        load_dataset(folder)
    err = info.value
    assert (Path(err.path).name, err.line, err.field) == (name, line, field)
    assert f"{name}:{line}:" in str(err)
    if field:
        assert f"field '{field}'" in str(err)


def test_table_file_must_be_unique(tmp_path):
    folder = write_folder(tmp_path / "ds", tiny())
    write_table(folder / "qrels.csv", table_rows(tiny(), "qrels"), FIELDS["qrels"])
    with pytest.raises(DataError, match="more than one qrels"):
        load_dataset(folder)
    (folder / "qrels.csv").unlink()
    (folder / "qrels.jsonl").unlink()
    with pytest.raises(DataError, match="no qrels"):
        load_dataset(folder)


def test_failed_save_writes_nothing(tmp_path):
    bad = tiny()
    bad.qrels["q1"]["ghost"] = 1
    with pytest.raises(DataError, match=r"qrels\.jsonl:1: field 'item_id': unknown item id 'ghost'"):
        save_dataset(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    save_dataset(tiny(), tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    bad.queries["q2"].split = ""
    with pytest.raises(DataError, match=r"queries\.jsonl:2: field 'split': empty string"):
        save_dataset(bad, tmp_path / "out")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert os.listdir(tmp_path) == ["out"]


def test_save_rejects_key_that_differs_from_id(tmp_path):
    ds = tiny()
    ds.catalog["i9"] = Item("i1", "copy")
    with pytest.raises(DataError, match="item_id"):
        save_dataset(ds, tmp_path / "out")


def test_dataset_helpers():
    ds = tiny()
    assert ds.relevant("q1") == {"i1"}
    assert ds.relevant("nope") == set()
    assert set(ds.split_queries("test")) == {"q2", "q3"}
    assert set(ds.split_queries("all")) == set(ds.queries)  # every split
    with pytest.raises(ValueError, match="available splits: test, train"):
        ds.split_queries("dev")
    assert ds.counts() == {
        "items": 3,
        "queries": {"test": {"category": 1, "definition": 1, "hard": 0, "total": 2},
                    "train": {"definition": 1, "hard": 1, "total": 1}},
        "qrels": 6,
    }


# ----------------------------------------------------------------------------- converters

def test_from_beir(tmp_path):
    src = tmp_path / "scifact"
    (src / "qrels").mkdir(parents=True)
    write_table(src / "corpus.jsonl", [
        {"_id": "d1", "title": "Aspirin", "text": "An analgesic."},
        {"_id": "d2", "title": "", "text": "x" * 300},
        {"_id": "d3", "title": "Unjudged", "text": ""},
        {"_id": "d1", "title": "Aspirin again", "text": "A second document of the same id."},
    ], [])
    write_table(src / "queries.jsonl", [{"_id": f"q{i}", "text": f"question {i}"} for i in range(1, 5)], [])
    (src / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t0\nq3\td1\t1\n")
    (src / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq3\td2\t2\n")
    assert detect_format(src) == "beir"
    said = []
    ds = from_beir(src, log=said.append)
    assert ds.catalog["d1"].title == "Aspirin" and any("'d1' again" in line for line in said)  # the first, and a note
    assert ds.catalog["d2"].title == "x" * 200 and ds.catalog["d3"].text is None
    assert {q.query_id: q.split for q in ds.queries.values()} == {"q1": "train", "q2": "train", "q3": "test"}
    assert ds.qrels["q3"] == {"d1": 1, "d2": 2} and ds.relevant("q2") == set()
    assert {q.category for q in ds.queries.values()} == {"beir"}
    save_dataset(ds, tmp_path / "out")
    assert same_content(load_dataset(tmp_path / "out"), ds)


ESCI_EXAMPLE_FIELDS = ["example_id", "query", "query_id", "product_id", "product_locale", "esci_label",
                       "small_version", "large_version", "split"]
ESCI_PRODUCT_FIELDS = ["product_id", "product_title", "product_description", "product_bullet_point",
                       "product_brand", "product_color", "product_locale"]


def esci_official(folder: Path, ext: str, label: str = "I") -> Path:
    folder.mkdir()
    examples = [
        [0, "revent 80 cfm", 0, "B0", "us", "E", 1, 1, "train"],
        [1, "revent 80 cfm", 0, "B1", "us", "S", 1, 1, "train"],
        [2, "zapatillas", 7, "B0", "es", "C", 1, 1, "test"],
        [3, "zapatillas", 7, "B2", "es", label, 1, 1, "test"],
        [4, "zapatillas", 7, "B3", "es", "E", 1, 1, "test"],
    ]
    products = [
        ["B0", "Fan <b>80</b> CFM", "<p>quiet</p>", "1\n2", "Panasonic", "white", "us"],
        ["B1", "Fan 110 CFM", None, None, None, None, "us"],
        ["B0", "Zapatilla", None, None, "Nike", None, "es"],
        ["B2", "Calcetines", None, None, None, None, "es"],
        ["B3", "", None, None, None, None, "es"],
    ]
    for stem, fields, rows in (("examples", ESCI_EXAMPLE_FIELDS, examples),
                               ("products", ESCI_PRODUCT_FIELDS, products)):
        write_table(folder / f"shopping_queries_dataset_{stem}{ext}", [dict(zip(fields, r)) for r in rows], fields)
    return folder


@pytest.mark.parametrize("ext, line", [(".csv", 6), (".parquet", 5)])  # a CSV counts its header
def test_from_esci_official_layout(tmp_path, ext, line):
    src = esci_official(tmp_path / "esci", ext)
    notes = []
    ds = convert(src, "auto", log=notes.append)
    assert notes == [f"warning: {src}/shopping_queries_dataset_examples{ext}: skipped 1 row (line {line}): "
                     "field 'product_title': empty"]
    assert set(ds.catalog) == {"us:B0", "us:B1", "es:B0", "es:B2"}
    assert ds.catalog["us:B0"].title == "Fan 80 CFM"
    assert ds.catalog["us:B0"].text == "Panasonic\nwhite\n1 2\nquiet"
    assert ds.qrels == {"0": {"us:B0": 3, "us:B1": 2}, "7": {"es:B0": 1, "es:B2": 0}}
    assert (ds.queries["0"].split, ds.queries["7"].split) == ("train", "test")

    us = from_esci(src, locale="us", log=notes.append)
    assert set(us.catalog) == {"B0", "B1"} and set(us.queries) == {"0"}


def test_esci_official_products_table_problems(tmp_path):
    """A products table without product_title is refused (not every row skipped); a null title
    skips its rows; the same product listed twice with two titles keeps the first."""
    src = esci_official(tmp_path / "esci", ".parquet")
    products = src / "shopping_queries_dataset_products.parquet"
    table = pq.read_table(products)
    pq.write_table(table.drop(["product_title"]), products)
    with pytest.raises(DataError) as info:
        from_esci(src, log=print)
    assert (info.value.path, info.value.line, info.value.field) == (str(products), None, "product_title")
    assert "missing column" in str(info.value)

    rows = table.to_pylist()
    rows[1]["product_title"] = None  # us:B1
    rows.append({**rows[0], "product_title": "Fan 90 CFM"})  # us:B0 again, other title: row 6
    pq.write_table(pa.Table.from_pylist(rows), products)
    notes = []
    ds = from_esci(src, log=notes.append)
    examples = src / "shopping_queries_dataset_examples.parquet"
    assert notes == [
        f"warning: {products}: product_id 'B0' (locale 'us') has different titles on lines 1 and 6; kept line 1's",
        f"warning: {examples}: skipped 2 rows (lines 2, 5): field 'product_title': empty"]
    assert ds.catalog["us:B0"].title == "Fan 80 CFM" and "us:B1" not in ds.catalog


def test_esci_unknown_label(tmp_path):
    src = esci_official(tmp_path / "esci", ".csv", label="X")
    with pytest.raises(DataError, match=r"examples\.csv:5: field 'esci_label': unknown label 'X'"):
        from_esci(src)


def test_esci_real_sample():
    path = SHARED / "esci_sample200" / "esci.csv"
    if not path.is_file():
        pytest.skip(f"shared data not found at {path}")
    ds = convert(path, "auto")
    assert len(ds.queries) == 200 and len(ds.catalog) == 200
    assert Counter(r for rels in ds.qrels.values() for r in rels.values()) == {3: 138, 2: 49, 0: 12, 1: 1}
    assert set(Counter(q.split for q in ds.queries.values())) <= {"train", "dev", "test"}
    q = ds.queries["65329"]
    assert q.text == "mama koala" and ds.relevant("65329") == {"B01LVWQY6K"}
    assert ds.catalog["B01LVWQY6K"].title.startswith("Mama Koala One Size Baby Washable")


def write_wands(folder: Path, label: str = "Partial") -> Path:
    folder.mkdir()
    (folder / "product.csv").write_text(
        "product_id\tproduct_name\tproduct_class\tcategory hierarchy\tproduct_description\tproduct_features"
        "\trating_count\taverage_rating\treview_count\n"
        "0\tsolid wood chair\tChairs\tFurniture / Chairs\tsturdy\tcolor:brown|material:oak\t3\t4.5\t2\n"
        "1\tvelvet sofa\tSofas\tFurniture / Sofas\t\t\t\t\t\n"
        "2\t\tLamps\t\t\t\t\t\t\n")
    (folder / "query.csv").write_text("query_id\tquery\tquery_class\n0\toak chair\tChairs\n1\t\"36\"\" sofa\"\t\n")
    (folder / "label.csv").write_text(
        f"id\tquery_id\tproduct_id\tlabel\n0\t0\t0\tExact\n1\t0\t1\tIrrelevant\n2\t1\t1\t{label}\n3\t1\t2\tExact\n")
    return folder


def test_from_wands(tmp_path):
    notes = []
    src = write_wands(tmp_path / "wands")
    ds = convert(src, "auto", log=notes.append)
    assert notes == [f"warning: {src}/product.csv: skipped 1 row (line 4): field 'product_name': empty",
                     f"warning: {src}/label.csv: skipped 1 row (line 5): field 'product_id': not in product.csv "
                     "(or its name is empty)"]
    assert ds.qrels == {"0": {"0": 2, "1": 0}, "1": {"1": 1}}
    assert ds.catalog["0"] == Item("0", "solid wood chair", "Chairs", "sturdy\ncolor:brown; material:oak",
                                   bullets="color:brown\nmaterial:oak", description="sturdy")
    assert (ds.queries["1"].text, ds.queries["1"].category) == ('36" sofa', "unknown")


def test_wands_unknown_label(tmp_path):
    with pytest.raises(DataError, match=r"label\.csv:4: field 'label': unknown label 'Great'"):
        from_wands(write_wands(tmp_path / "wands", label="Great"))


def test_wands_real_queries():
    path = SHARED / "wands_queries" / "query.csv"
    if not path.is_file():
        pytest.skip(f"shared data not found at {path}")
    queries = read_wands_queries(path)
    assert len(queries) == 480
    assert (queries["0"].text, queries["0"].category) == ("salon chair", "Massage Chairs")
    assert queries["208"].text == 'fawkes 36" blue vanity'
    assert sum(q.category == "unknown" for q in queries.values()) == 6
    splits = Counter(q.split for q in queries.values())
    assert 0.7 < splits["train"] / 480 < 0.9 and splits["dev"] and splits["test"]


def test_convert_detects_lrem_tables_in_any_format(tmp_path):
    src = write_folder(tmp_path / "ds", tiny(), ".csv")
    assert detect_format(src) == "lrem"
    assert same_content(convert(src), tiny())


def test_convert_rejects_unknown_inputs(tmp_path):
    with pytest.raises(DataError, match="cannot detect.*lrem's tables"):
        convert(tmp_path, "auto")
    with pytest.raises(ValueError, match="unknown format"):
        convert(tmp_path, "msmarco")
    with pytest.raises(ValueError, match="locale applies to ESCI sources only, not wands"):
        convert(write_wands(tmp_path / "wands"), "auto", locale="us")


# ----------------------------------------------------------------------------- `lrem data convert` on bad input

ESCI_COLS = ["query_id", "query", "product_id", "product_locale", "esci_label", "product_title", "product_bullet_point"]


def write_esci(path: Path, rows: list[list], cols: list[str] = ESCI_COLS) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerows(rows)
    return path


def lrem_cli(*args: str) -> subprocess.CompletedProcess:
    """The real CLI in a fresh process: exit code and stderr as a user sees them."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LREM_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "lrem.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def stderr_lines(p: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in p.stderr and "Warning:" not in p.stderr, p.stderr  # no Python warning format
    return p.stderr.splitlines()


def test_cli_esci_missing_title_column(tmp_path):
    src = write_esci(tmp_path / "nocol.csv", [[1, "fan", "B0", "us", "E", "Fan"]] * 3, ESCI_COLS[:5] + ["brand"])
    p = lrem_cli("data", "convert", str(src), "--format", "esci", "--out", str(tmp_path / "out"))
    lines = stderr_lines(p)
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert lines[0].startswith(f"error: {src}:1: field 'product_title': missing column (header has: query_id,")
    assert not (tmp_path / "out").exists()


def test_cli_esci_empty_product_id_names_its_line(tmp_path):
    src = write_esci(tmp_path / "emptyid.csv", [[1, "fan", "B0", "us", "E", "Fan", "quiet\nsmall"],  # lines 2-3
                                                [2, "lamp", "", "us", "E", "Lamp", ""]])  # line 4
    p = lrem_cli("data", "convert", str(src), "--out", str(tmp_path / "out"))
    assert p.returncode == 2 and stderr_lines(p) == [f"error: {src}:4: field 'product_id': empty string"], p.stderr


def test_cli_skipped_rows_are_one_plain_warning_line(tmp_path):
    rows = [[q, f"query {q}", f"B{q}", "us", "E", "" if q in (3, 4, 6, 8, 9) else f"title {q}", ""]
            for q in range(1, 11)]  # query q on line q + 1
    src = write_esci(tmp_path / "esci.csv", rows)
    p = lrem_cli("data", "convert", str(src), "--out", str(tmp_path / "out"))
    assert p.returncode == 0, p.stderr
    assert stderr_lines(p) == [f"warning: {src}: skipped 5 rows (lines 4, 5, 7, ...): field 'product_title': empty"]
    assert len(load_dataset(tmp_path / "out").catalog) == 5

    empty = write_esci(tmp_path / "empty.csv", [[1, "fan", "B0", "us", "E", "  ", ""]])  # nothing left: one error
    p = lrem_cli("data", "convert", str(empty), "--out", str(tmp_path / "out2"))
    assert p.returncode == 2 and stderr_lines(p) == [
        f"warning: {empty}: skipped 1 row (line 2): field 'product_title': empty",
        f"error: {empty}: no row left to convert (every row was skipped; see the warnings)"], p.stderr


def test_cli_unknown_format_lists_every_choice(tmp_path):
    src = write_esci(tmp_path / "esci.csv", [[1, "fan", "B0", "us", "E", "Fan", ""]])
    p = lrem_cli("data", "convert", str(src), "--format", "amazon", "--out", str(tmp_path / "out"))
    lines = stderr_lines(p)
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    m = re.fullmatch(r"error: unknown format 'amazon'; use one of (.+)", lines[0])
    listed = re.split(r", | or ", m.group(1))
    assert listed == ["beir", "esci", "wands", "lrem", "auto"] == list(FORMATS)
    help_text = " ".join(lrem_cli("data", "convert", "--help").stdout.replace("│", " ").split())
    assert f"One of {', '.join(listed)} (lrem:" in help_text
    for fmt in listed:  # each is accepted: a plain ValueError (unknown format) escapes, a DataError about
        with contextlib.suppress(DataError):  # this file not being that layout does not
            convert(src, fmt, log=lambda _: None)


@pytest.mark.parametrize("real", [False, True])
def test_cli_wands_folder_without_product_csv(tmp_path, real):
    if real:
        src = SHARED / "wands_queries"
        if not (src / "query.csv").is_file():
            pytest.skip(f"shared data not found at {src}")
        missing = "product.csv and label.csv"
    else:
        src = write_wands(tmp_path / "wands")
        (src / "product.csv").unlink()
        missing = "product.csv"
    p = lrem_cli("data", "convert", str(src), "--format", "wands", "--out", str(tmp_path / "out"))
    assert p.returncode == 2 and stderr_lines(p) == [
        f"error: {src}: the folder has no {missing} (WANDS needs product.csv, query.csv and label.csv)"], p.stderr


def test_wands_empty_product_id_names_its_line(tmp_path):
    src = write_wands(tmp_path / "wands")
    text = (src / "product.csv").read_text().replace("\n1\tvelvet", "\n\tvelvet")
    (src / "product.csv").write_text(text)
    with pytest.raises(DataError, match=re.escape(f"{src}/product.csv:3: field 'product_id': empty string")):
        from_wands(src, log=print)


def test_cli_esci_conflicting_titles_warn_and_keep_the_first(tmp_path):
    src = write_esci(tmp_path / "dup.csv", [
        [1, "fan", "B0", "us", "E", "Fan 80", ""],
        [2, "quiet fan", "B0", "us", "S", "Fan 80", ""],  # the same title again: normal in ESCI
        [3, "lamp", "B1", "us", "E", "Lamp", ""],
        [4, "cheap fan", "B0", "us", "E", "Fan 110", ""],  # line 5: another title for B0
        [5, "big fan", "B0", "us", "E", "Fan 120", ""],  # said once per id
    ])
    p = lrem_cli("data", "convert", str(src), "--out", str(tmp_path / "out"))
    assert p.returncode == 0, p.stderr
    assert stderr_lines(p) == [
        f"warning: {src}: product_id 'B0' has different titles on lines 2 and 5; kept line 2's"]
    ds = load_dataset(tmp_path / "out")
    assert ds.catalog["B0"].title == "Fan 80" and ds.qrels["4"] == {"B0": 3}


# ----------------------------------------------------------------------------- sampling

def big() -> Dataset:
    catalog = {f"i{n}": Item(f"i{n}", f"item {n}") for n in range(100)}
    queries = {f"q{n}": Query(f"q{n}", f"query {n}", "c", "test" if n % 2 else "train") for n in range(20)}
    qrels = {f"q{n}": {f"i{n}": 1, f"i{n + 50}": 0} for n in range(20)}
    return Dataset(catalog, queries, qrels, "big")


def test_sample_dataset_is_fixed_and_complete(tmp_path):
    small = sample_dataset(big(), 4, "test", 10, seed=1)
    assert small == sample_dataset(big(), 4, "test", 10, seed=1)
    assert small != sample_dataset(big(), 4, "test", 10, seed=2)
    assert len(small.queries) == 4 and {q.split for q in small.queries.values()} == {"test"}
    judged = {i for rels in small.qrels.values() for i in rels}
    assert len(judged) == 8 and judged < set(small.catalog) and len(small.catalog) == 18
    assert set(sample_dataset(big(), 2, "test", 0, seed=1).queries) < set(small.queries)  # prefix-stable
    save_dataset(small, tmp_path / "s")
    assert same_content(load_dataset(tmp_path / "s"), small)
    with pytest.raises(ValueError, match="available splits"):
        sample_dataset(big(), 4, "dev", 10)
    assert len(sample_dataset(big(), 100, None, 1000).catalog) == 100
