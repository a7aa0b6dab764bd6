"""The dataset folder format shared by every lrem command: reading, validating, writing.

A dataset is a folder with three tables, each `.jsonl`, `.csv`, `.tsv` or `.parquet`:

    catalog   {item_id, title, category?, text?, brand?, color?, bullets?, description?}
    queries   {query_id, text, category, split, hard?}
    qrels     {query_id, item_id, relevance}      relevance > 0 = relevant, 0 = judged irrelevant

Every problem is reported as one `DataError` naming the file, the line and the field, so a
user can open the file and fix it without reading a traceback.
"""
from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import os
import random
import re
import sys
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from pathlib import Path

from lrem._io import atomic_dir, write_jsonl
from lrem._text import control_char

TABLES = ("catalog", "queries", "qrels")
EXTENSIONS = (".jsonl", ".csv", ".tsv", ".parquet")


class Id(str):
    """A field type for `read_table`: an id, a string or (in a JSON or Parquet source) an integer,
    read as its decimal string (a query log's or a Parquet export's numeric query ids). A CSV/TSV
    cell stays as written ("007")."""


# ids are `Id`s (a shop's Parquet or JSON export often holds numeric ones); the optional item
# fields are what a model's item template may name (lrem.prompts.ITEM_FIELDS)
CATALOG_SCHEMA = ({"item_id": Id, "title": str},
                  {"category": str, "text": str, "brand": str, "color": str, "bullets": str, "description": str})
QUERIES_SCHEMA = ({"query_id": Id, "text": str, "category": str, "split": str}, {"hard": bool})
QRELS_SCHEMA = ({"query_id": Id, "item_id": Id, "relevance": int}, {})
SCHEMAS = {"catalog": CATALOG_SCHEMA, "queries": QUERIES_SCHEMA, "qrels": QRELS_SCHEMA}

_INT_RE = re.compile(r"\s*[+-]?\d+(?:\.0*)?\s*")  # "2.0": a grade a float column wrote
_BOOL_TEXT = {"true": True, "false": False, "1": True, "0": False, "": None}
_SURROGATE_RE = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8 (surrogateescape)


class DataError(ValueError):
    """A problem in a data file, located as `path:line: field 'name': message`."""

    def __init__(self, path, line: int | None, field: str | None, message: str):
        self.path, self.line, self.field, self.message = str(path), line, field, message
        where = self.path if line is None else f"{self.path}:{line}"
        what = f"field '{field}': {message}" if field else message
        super().__init__(f"{where}: {what}")


@dataclass
class Item:
    item_id: str
    title: str
    category: str | None = None
    text: str | None = None  # free text (BEIR documents; ESCI and WANDS: the other fields joined)
    brand: str | None = None
    color: str | None = None
    bullets: str | None = None  # bullet points / features, one per line
    description: str | None = None


@dataclass
class Query:
    query_id: str
    text: str
    category: str
    split: str
    hard: bool | None = None


@dataclass(frozen=True)
class Pair:
    """A query and one item relevant to it: a training example (`lrem.train`; for cold start
    with the teacher's CoT) or a (query, item) for a judge to rate (`lrem.teachers`)."""

    query_id: str
    query: str
    item_id: str
    item_title: str
    cot: str | None = None  # None: no teacher CoT (embedded after an empty CoT, no SFT target)
    candidates: tuple[str, ...] | None = None  # a grounded query's first-stage titles, best first

    @property
    def title(self) -> str:
        """The item's title (what the judges call it)."""
        return self.item_title


@dataclass
class Dataset:
    catalog: dict[str, Item]
    queries: dict[str, Query]
    qrels: dict[str, dict[str, int]]  # query_id -> {item_id: relevance}
    name: str = ""
    # converters: rows read per source file, to report against what is written (not compared)
    source_rows: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def split_queries(self, split: str) -> dict[str, Query]:
        """The queries of one split ("all": every query); a ValueError listing the splits present if it is empty."""
        found = {qid: q for qid, q in self.queries.items() if q.split == split or split == "all"}
        if not found:
            have = sorted({q.split for q in self.queries.values()})
            raise ValueError(f"no queries in split {split!r}; available splits: {', '.join(have)}")
        return found

    def judged_queries(self, split: str) -> dict[str, Query]:
        """The split's queries with at least one relevant item (relevance > 0): the ones metrics can score."""
        return {qid: q for qid, q in self.split_queries(split).items()
                if any(r > 0 for r in self.qrels.get(qid, {}).values())}

    def at_relevance(self, min_relevance: int) -> Dataset:
        """This dataset where only judgements of at least `min_relevance` count (ESCI: 3 = Exact
        alone); lower ones are dropped, so metrics score them as not relevant."""
        if min_relevance <= 1:
            return self
        qrels = {q: {i: r for i, r in rels.items() if r >= min_relevance} for q, rels in self.qrels.items()}
        return replace(self, qrels={q: rels for q, rels in qrels.items() if rels})

    def relevant(self, query_id: str) -> set[str]:
        """Items judged relevant (relevance > 0) to a query."""
        return {item for item, rel in self.qrels.get(query_id, {}).items() if rel > 0}

    def counts(self) -> dict:
        """Sizes for logs and reports: items, queries per split and category, qrels."""
        per_split: dict[str, dict[str, int]] = {}
        for q in sorted(self.queries.values(), key=lambda q: (q.split, q.category)):
            c = per_split.setdefault(q.split, {})
            c[q.category] = c.get(q.category, 0) + 1
            c["hard"] = c.get("hard", 0) + bool(q.hard)
            c["total"] = c.get("total", 0) + 1
        n_qrels = sum(len(rels) for rels in self.qrels.values())
        return {"items": len(self.catalog), "queries": per_split, "qrels": n_qrels}


class Row(dict):
    """A table row that remembers where it came from (1-based line), for error messages."""

    def __init__(self, values: dict, line: int):
        super().__init__(values)
        self.line = line


def hash_split(key: str) -> str:
    """Stable 80/10/10 train/dev/test split from the sha1 of a key (same on every machine)."""
    bucket = int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16) % 10
    return "train" if bucket < 8 else "dev" if bucket == 8 else "test"


# ----------------------------------------------------------------------------- reading

def read_table(path, required: dict[str, type], optional: dict[str, type], *,
               raw: Collection[str] = ()) -> list[Row]:
    """Read a .jsonl/.csv/.tsv/.parquet table into typed rows, checking every field.

    Types are str, int, bool or `Id` (a string or an integer, read as a string). Text formats
    (CSV/TSV) give strings, which are parsed ("2" and "2.0" are an int, "true"/"0" a bool); an
    empty optional cell means None. A required column must exist.
    `raw` names the str fields of a raw benchmark source that its converter checks and cleans
    itself: empty or null values (a required one as "") and control characters are kept. Ids
    stay out of `raw`, so an empty id is reported here, at its own line.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        found, from_text = read_jsonl(path), False
    elif suffix in (".csv", ".tsv"):
        found, from_text = _read_delimited(path, required), True
    elif suffix == ".parquet":
        found, from_text = _read_parquet(path, required, optional), False
    else:
        raise DataError(path, None, None, f"unsupported format (use one of {', '.join(EXTENSIONS)})")
    rows = [_coerce(values, line, path, required, optional, from_text, raw) for line, values in found]
    if not rows:
        raise DataError(path, 1, None, "no data rows (empty file)")
    return rows


def decode_text(path: Path) -> str:
    """File text with undecodable bytes kept as surrogates, so the bad field can be named later.
    A `.gz` file is decompressed first (committed triplet sets are gzipped JSONL)."""
    data = Path(path).read_bytes()
    if Path(path).suffix == ".gz":
        import gzip
        import zlib

        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(path, None, None, f"not a readable gzip file ({e})") from None
    if data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):  # Excel's "Unicode Text" export
        try:
            return data.decode("utf-16")  # the codec drops the mark
        except UnicodeDecodeError as e:
            raise DataError(path, None, None, f"not valid UTF-16 (it starts with a UTF-16 mark): {e}") from None
    text = data.decode("utf-8", errors="surrogateescape")
    return text[1:] if text.startswith("\ufeff") else text


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; DataError on bad UTF-8, bad JSON or a non-object."""
    out = []
    for line_no, line in enumerate(decode_text(path).split("\n"), start=1):  # not splitlines: JSON may hold U+2028
        if not line.strip():
            continue
        try:
            values = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(path, line_no, None, f"malformed JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise DataError(path, line_no, None, "JSON nested too deeply") from None
        except ValueError as e:  # e.g. an integer of more than 4300 digits
            raise DataError(path, line_no, None, f"malformed JSON ({e})") from None
        if not isinstance(values, dict):
            raise DataError(path, line_no, None, "expected a JSON object")
        out.append((line_no, values))
    return out


def _read_delimited(path: Path, required: dict[str, type]) -> list[tuple[int, dict]]:
    """CSV or TSV (by extension, or tabs in the header); line numbers count the header as 1."""
    csv.field_size_limit(sys.maxsize)
    text = decode_text(path)
    header_line = text.split("\n", 1)[0]
    tabbed = path.suffix.lower() == ".tsv" or header_line.count("\t") > header_line.count(",")
    # strict: an unterminated quote (a truncated file) is an error, not a field that swallows the
    # rest of the file
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if tabbed else ",", strict=True)
    header = next(reader, None)
    if header is None:
        raise DataError(path, 1, None, "no data rows (empty file)")
    header = [h.strip() for h in header]
    for name in required:
        if name not in header:
            raise DataError(path, 1, name, f"missing column (header has: {', '.join(header)})")
    out, start = [], reader.line_num + 1
    try:
        for cells in reader:
            line, start = start, reader.line_num + 1
            if not cells:
                continue  # blank line
            if len(cells) > len(header):
                raise DataError(path, line, None, f"{len(cells)} fields but the header has {len(header)}")
            if tabbed:  # a stray quote opens a field that swallows the next rows, tabs and all
                for name, cell in zip(header, cells):
                    if "\t" in cell.partition("\n")[2]:
                        raise DataError(path, line, name, f"a quoted field runs to line {reader.line_num} and takes in "
                                        "tab-separated lines (a stray '\"'?); remove the quote, or quote the whole "
                                        "field and double the quotes in it")
            out.append((line, dict(zip(header, cells))))
    except csv.Error as e:  # e.g. a NUL byte, or an unterminated quote (a truncated file)
        what = "unterminated quoted field (is the file truncated?)" if "unexpected end of data" in str(e) else e
        raise DataError(path, start, None, f"malformed {'TSV' if tabbed else 'CSV'}: {what}") from None
    return out


def _read_parquet(path: Path, required: dict[str, type], optional: dict[str, type]) -> list[tuple[int, dict]]:
    """(row number, values) of the named columns only: an export's other columns (an embedding
    per row, say) would cost gigabytes as Python objects. A required column that is absent is
    named like a CSV's."""
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(path) as file:
            names = file.schema_arrow.names
            for name in required:
                if name not in names:
                    raise DataError(path, None, name, f"missing column (columns: {', '.join(names)})")
            table = file.read(columns=[n for n in names if n in required or n in optional])
    except DataError:
        raise
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(path, None, None, f"cannot read parquet: {e}") from None
    return [(i + 1, values) for i, values in enumerate(table.to_pylist())]


class _BadValue(ValueError):
    """A value of the wrong type; `_coerce` adds the file, line and field."""


def _coerce(values: dict, line: int, path: Path, required: dict, optional: dict,
            from_text: bool, raw: Collection[str] = ()) -> Row:
    """Check and convert one row's fields to their declared types; extra fields are dropped."""
    out = {}
    for name, kind in (*required.items(), *optional.items()):
        value = values.get(name)
        is_required = name in required
        if from_text and value == "" and (not is_required or kind is not str):
            value = None  # an empty cell is an absent value (a required str reports "empty" below)
        if value is None and is_required and name in raw and name in values:
            value = ""  # a null cell of a raw source's column: its converter judges empty values
        if value is None:
            if is_required:
                raise DataError(path, line, name, "missing")
            out[name] = None
            continue
        try:
            out[name] = _convert(value, kind, from_text, name in raw)
        except _BadValue as e:
            raise DataError(path, line, name, str(e)) from None
    return Row(out, line)


def _convert(value, kind: type, from_text: bool, raw: bool):
    """One value to `kind` (str/Id/int/bool); _BadValue says what is wrong with it."""
    if isinstance(value, str):
        if not value.isascii() and _SURROGATE_RE.search(value):
            raise _BadValue("not valid UTF-8")
        if kind in (str, Id):
            if not raw and not value.strip():
                raise _BadValue("empty string")
            bad = None if raw else control_char(value)  # raw sources are cleaned by their converter
            if bad:
                raise _BadValue(f"control character {bad} (remove it)")
            return value
        if from_text and kind is int and _INT_RE.fullmatch(value):
            digits = value.strip().split(".")[0]
            if len(digits.lstrip("+-")) > 18:
                raise _BadValue(f"integer of {len(value.strip())} characters is too large")
            return int(digits)
        if from_text and kind is bool and value.strip().lower() in _BOOL_TEXT:
            return _BOOL_TEXT[value.strip().lower()]
    elif kind is Id and type(value) is int:  # not bool
        return str(value)
    elif kind is int and type(value) is float and value.is_integer():  # 2.0: a float column's grade
        value = int(value)
    if type(value) is kind:  # int or bool from JSON/parquet (bool is not accepted as int)
        if kind is int and not -2**63 <= value < 2**63:
            raise _BadValue("integer too large")
        return value
    expected = {str: "a string", Id: "a string or an integer", int: "an integer", bool: "true/false"}[kind]
    raise _BadValue(f"expected {expected}, got {value!r}")


# ----------------------------------------------------------------------------- assembling

def _assemble(tables: dict[str, tuple[Path, list[Row]]], name: str) -> Dataset:
    """Build a Dataset from checked rows: rejects duplicates and qrels to unknown ids."""
    cat_path, cat_rows = tables["catalog"]
    q_path, q_rows = tables["queries"]
    r_path, r_rows = tables["qrels"]
    catalog = _items(cat_path, cat_rows)
    queries: dict[str, Query] = {}
    for row in q_rows:
        _unique(row["query_id"], queries, q_path, row.line, "query_id")
        _single_token(row["query_id"], q_path, row.line, "query_id")
        queries[row["query_id"]] = Query(**row)
    qrels: dict[str, dict[str, int]] = {}
    for row in r_rows:
        qid, iid = row["query_id"], row["item_id"]
        if qid not in queries:
            raise DataError(r_path, row.line, "query_id", f"unknown query id {qid!r} (not in {q_path.name})")
        if iid not in catalog:
            raise DataError(r_path, row.line, "item_id", f"unknown item id {iid!r} (not in {cat_path.name})")
        rels = qrels.setdefault(qid, {})
        _unique(iid, rels, r_path, row.line, "item_id", what=f"pair ({qid!r}, {iid!r})")
        rels[iid] = row["relevance"]
    return Dataset(catalog, queries, qrels, name)


def _items(path: Path, rows: list[Row]) -> dict[str, Item]:
    catalog: dict[str, Item] = {}
    for row in rows:
        _unique(row["item_id"], catalog, path, row.line, "item_id")
        _single_token(row["item_id"], path, row.line, "item_id")
        catalog[row["item_id"]] = Item(**row)
    return catalog


def _single_token(key: str, path, line: int, field: str) -> None:
    if any(c.isspace() for c in key):  # TREC run and qrels files split their lines on whitespace
        raise DataError(path, line, field, f"{key!r} holds whitespace; ids are single tokens (replace it, e.g. by '_')")


def _unique(key: str, seen: dict, path, line: int, field: str, what: str | None = None) -> None:
    if key in seen:
        raise DataError(path, line, field, f"duplicate {what or repr(key)}")


def _table_file(folder: Path, table: str) -> Path:
    for ext in EXTENSIONS:
        path = folder / f"{table}{ext}"
        if os.path.lexists(path) and not path.is_file():  # is_file() is False for a dangling link or a loop
            kind = "a folder" if path.is_dir() else "a broken symlink or a symlink loop"
            raise DataError(path, None, None, f"is {kind}, not a readable file")
    found = [folder / f"{table}{ext}" for ext in EXTENSIONS if (folder / f"{table}{ext}").is_file()]
    if len(found) != 1:
        problem = "no" if not found else "more than one"
        raise DataError(folder / f"{table}.*", None, None,
                        f"{problem} {table} file (expected exactly one of {', '.join(EXTENSIONS)})")
    return found[0]


def load_dataset(path) -> Dataset:
    """Read and validate a dataset folder (each table in any supported format)."""
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(folder, None, None, "not a dataset folder")
    tables = {}
    for table in TABLES:
        file = _table_file(folder, table)
        tables[table] = (file, read_table(file, *SCHEMAS[table]))
    return _assemble(tables, name=folder.name)


def load_catalog(path) -> dict[str, Item]:
    """The items of a dataset folder, from its catalog table alone (a production catalog has no
    queries or qrels), or of one catalog file (.jsonl, .csv, .tsv or .parquet)."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, None, "no such dataset folder or catalog file")
    file = _table_file(path, "catalog") if path.is_dir() else path
    return _items(file, read_table(file, *CATALOG_SCHEMA))


# ----------------------------------------------------------------------------- writing

def _rows(ds: Dataset) -> dict[str, list[dict]]:
    """The three tables as plain rows in file order: sorted by id, None fields omitted."""
    def plain(obj) -> dict:
        return {k: v for k, v in vars(obj).items() if v is not None}

    catalog = [plain(ds.catalog[k]) for k in sorted(ds.catalog, key=str)]
    queries = [plain(ds.queries[k]) for k in sorted(ds.queries, key=str)]
    qrels = [{"query_id": qid, "item_id": iid, "relevance": rel}
             for qid in sorted(ds.qrels, key=str)
             for iid, rel in sorted(ds.qrels[qid].items(), key=lambda kv: str(kv[0]))]
    return {"catalog": catalog, "queries": queries, "qrels": qrels}


def validate_dataset(ds: Dataset, root="<dataset>") -> Dataset:
    """Check an in-memory dataset as if it were saved under `root`; returns a clean copy.

    Errors name the line the row would have in `root/<table>.jsonl`, so save and load report
    problems the same way.
    """
    root = Path(root)
    for table, id_field in (("catalog", "item_id"), ("queries", "query_id")):
        objs = getattr(ds, table)
        for line, key in enumerate(sorted(objs, key=str), start=1):
            if getattr(objs[key], id_field) != key:
                raise DataError(root / f"{table}.jsonl", line, id_field, f"differs from its dict key {key!r}")
    tables = {}
    for table, rows in _rows(ds).items():
        path = root / f"{table}.jsonl"
        if not rows:
            raise DataError(path, 1, None, f"no {table} rows (empty table)")
        checked = [_coerce(r, i, path, *SCHEMAS[table], from_text=False)
                   for i, r in enumerate(rows, start=1)]
        tables[table] = (path, checked)
    return _assemble(tables, name=ds.name)


def save_dataset(ds: Dataset, out) -> None:
    """Validate, then write the folder as JSONL atomically with deterministic bytes.

    Nothing is written if validation fails; an existing folder is replaced only as a whole.
    """
    out = Path(out)
    rows = _rows(validate_dataset(ds, root=out))
    with atomic_dir(out) as tmp:
        for table in TABLES:
            write_jsonl(tmp / f"{table}.jsonl", rows[table])


def sample_query_ids(query_ids: list[str], limit: int | None, seed: int = 0) -> list[str]:
    """A fixed random subset of `limit` ids (all ids when limit is None), returned sorted.

    Ids are sorted first and shuffled with random.Random(seed), so the sample depends only on
    the id set and the seed; a smaller limit gives a subset of a larger one.
    """
    ids = sorted(query_ids)
    if limit is None or limit >= len(ids):
        return ids
    return sorted(random.Random(seed).sample(ids, len(ids))[:max(limit, 0)])
