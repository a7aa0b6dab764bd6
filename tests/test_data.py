"""lrem.data: the dataset folder format, its validation, converters and sampling (real files)."""
from __future__ import annotations

import csv
import json
import os
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lrem.data import (DataError, Dataset, Item, Query, convert, detect_format, from_beir, from_esci, from_wands,
                       load_dataset, read_table, read_wands_queries, sample_dataset, save_dataset)

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
    ], [])
    write_table(src / "queries.jsonl", [{"_id": f"q{i}", "text": f"question {i}"} for i in range(1, 5)], [])
    (src / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t0\nq3\td1\t1\n")
    (src / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq3\td2\t2\n")
    assert detect_format(src) == "beir"
    ds = from_beir(src)
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


@pytest.mark.parametrize("ext", [".csv", ".parquet"])
def test_from_esci_official_layout(tmp_path, ext):
    src = esci_official(tmp_path / "esci", ext)
    with pytest.warns(UserWarning, match="skipped 1 ESCI rows"):
        ds = convert(src, "auto")
    assert set(ds.catalog) == {"us:B0", "us:B1", "es:B0", "es:B2"}
    assert ds.catalog["us:B0"].title == "Fan 80 CFM"
    assert ds.catalog["us:B0"].text == "Panasonic\nwhite\n1 2\nquiet"
    assert ds.qrels == {"0": {"us:B0": 3, "us:B1": 2}, "7": {"es:B0": 1, "es:B2": 0}}
    assert (ds.queries["0"].split, ds.queries["7"].split) == ("train", "test")

    us = from_esci(src, locale="us")
    assert set(us.catalog) == {"B0", "B1"} and set(us.queries) == {"0"}


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
    with pytest.warns(UserWarning) as caught:
        ds = convert(write_wands(tmp_path / "wands"), "auto")
    assert sorted(str(w.message) for w in caught) == [
        "skipped 1 WANDS labels naming an unknown query or product", "skipped 1 WANDS products with an empty name"]
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


def test_convert_rejects_unknown_inputs(tmp_path):
    with pytest.raises(DataError, match="cannot detect"):
        convert(tmp_path, "auto")
    with pytest.raises(ValueError, match="unknown format"):
        convert(tmp_path, "msmarco")


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
