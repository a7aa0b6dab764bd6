"""Converters from public benchmark layouts (BEIR, ESCI, WANDS) to the lrem dataset format.

Each converter reads the source as published, maps its labels to integer relevance, gives every
query a split (the source's own when it has one, else a stable sha1 80/10/10 split), and
returns a validated `Dataset`. Rows that cannot become items (no title) are skipped, said in one
`warning:` line per file and reason (with a few line numbers) through `log`; labels that are not
understood, empty ids and missing files or columns are a `DataError`. Control characters (NUL,
escape codes) in titles and texts (and ESCI and BEIR queries) of a raw source are replaced by
spaces; an id holding one is a `DataError` (lrem's own dataset files reject them in every text field).
"""
from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path
from typing import Callable

from .._text import strip_controls
from .formats import (EXTENSIONS, TABLES, DataError, Dataset, Id, Item, Query, Row, hash_split, load_dataset,
                      read_table, validate_dataset)

# what `convert` and `lrem data convert --format` accept ("lrem": a folder in lrem's own format)
FORMATS = ("beir", "esci", "wands", "lrem", "auto")
BEIR_FILES = ("corpus.jsonl", "queries.jsonl")
WANDS_FILES = ("product.csv", "query.csv", "label.csv")
ESCI_LABELS = {"e": 3, "s": 2, "c": 1, "i": 0, "exact": 3, "substitute": 2, "complement": 1, "irrelevant": 0}
WANDS_LABELS = {"exact": 2, "partial": 1, "irrelevant": 0}
ESCI_EXAMPLES = "shopping_queries_dataset_examples"
ESCI_PRODUCTS = "shopping_queries_dataset_products"
ESCI_PRODUCT_FIELDS = ("product_title", "product_brand", "product_color",
                       "product_bullet_point", "product_description")
ESCI_RAW = ("query", "esci_label", "split", *ESCI_PRODUCT_FIELDS)  # cleaned or judged here, not by read_table
SHOWN_LINES = 3  # line numbers a warning lists
SHOWN_CONFLICTS = 5  # conflicting ids named one per line, then one line for the rest

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def _and(names, word: str = "and") -> str:
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {word} {names[-1]}"


def _lines(lines: list[int]) -> str:
    if len(lines) == 1:
        return f"line {lines[0]}"
    more = ", ..." if len(lines) > SHOWN_LINES else ""
    return f"lines {', '.join(map(str, lines[:SHOWN_LINES]))}{more}"


class _Notes:
    """What a converter let pass in one source file, said as plain `warning:` lines on `report()`:
    rows skipped (one line per reason) and ids seen with two different titles (the first kept)."""

    def __init__(self, path: Path, log: Log):
        self.path, self.log = path, log
        self.skipped: dict[str, list[int]] = {}
        self.titles: dict[str, tuple[str, int]] = {}
        self.conflicts: list[tuple[str, int, int]] = []
        self.conflicted: set[str] = set()  # keys already noted: one warning per id

    def skip(self, line: int, reason: str) -> None:
        self.skipped.setdefault(reason, []).append(line)

    def first_title(self, key: str, title: str, line: int, what: str) -> bool:
        """True the first time `key` is seen; a later different title is noted (once per key)."""
        if key not in self.titles:
            self.titles[key] = (title, line)
            return True
        first, first_line = self.titles[key]
        if title != first and key not in self.conflicted:
            self.conflicted.add(key)
            self.conflicts.append((what, first_line, line))
        return False

    def report(self) -> None:
        for reason, lines in self.skipped.items():
            n = len(lines)
            self.log(f"warning: {self.path}: skipped {n} row{'s' * (n != 1)} ({_lines(lines)}): {reason}")
        for what, first, line in self.conflicts[:SHOWN_CONFLICTS]:
            self.log(f"warning: {self.path}: {what} has different titles on lines {first} and {line}; "
                     f"kept line {first}'s")
        rest = self.conflicts[SHOWN_CONFLICTS:]
        if rest:
            self.log(f"warning: {self.path}: {len(rest)} more ids with different titles "
                     f"({_lines([c[2] for c in rest])}); kept each one's first")


def _require_files(src: Path, names: tuple[str, ...], layout: str) -> None:
    """A missing input file is a sentence naming the layout's files, not an OSError."""
    if not src.is_dir():
        raise DataError(src, None, None, f"not a folder ({layout} is a folder of {_and(names)})")
    missing = [n for n in names if not (src / n).is_file()]
    if missing:
        raise DataError(src, None, None, f"the folder has no {_and(missing)} ({layout} needs {_and(names)})")


def _clean(text: str | None) -> str:
    """Flatten markup, control characters and whitespace: product descriptions carry HTML,
    stray newlines and the odd NUL or escape byte."""
    return " ".join(strip_controls(re.sub(r"<[^>]+>", " ", text or "")).split())


def _join(*parts: str | None) -> str | None:
    """Non-empty cleaned parts, one per line; None when there is nothing."""
    kept = [p for p in map(_clean, parts) if p]
    return "\n".join(kept) or None


def _add_qrel(qrels: dict, qid: str, iid: str, rel: int) -> None:
    """Record a judgement; a pair judged twice keeps its highest label (order-independent)."""
    rels = qrels.setdefault(qid, {})
    rels[iid] = max(rel, rels.get(iid, rel))


def _finish(catalog, queries, qrels, src: Path, name: str, read: dict[str, int], where: Path) -> Dataset:
    """Keep only queries with judgements and validate the result; `read`: rows read per source
    file, kept in `Dataset.source_rows` so a caller can report rows read against rows written.
    `where`: the source file to name when nothing is left (not a catalog.jsonl that does not exist)."""
    if not qrels:
        raise DataError(where, None, None, "no row left to convert (every row was skipped; see the warnings)")
    queries = {qid: q for qid, q in queries.items() if qid in qrels}
    ds = validate_dataset(Dataset(catalog, queries, qrels, name), root=src)
    ds.source_rows = read
    return ds


# ----------------------------------------------------------------------------- BEIR

def from_beir(src, log: Log = _stderr) -> Dataset:
    """A BEIR folder: corpus.jsonl, queries.jsonl, qrels/{train,dev,test}.tsv.

    A query's split is the qrels file it appears in (test wins over dev over train, so an
    evaluation query never counts as training); queries in no qrels file are dropped.
    """
    src = Path(src)
    _require_files(src, BEIR_FILES, "BEIR")
    catalog, read = {}, {}
    corpus_notes = _Notes(src / "corpus.jsonl", log)
    corpus = read_table(src / "corpus.jsonl", {"_id": Id}, {"title": str, "text": str}, raw=("title", "text"))
    read["corpus.jsonl"] = len(corpus)
    for row in corpus:
        text = strip_controls(row["text"] or "").strip()
        title = strip_controls(row["title"] or "").strip() or text[:200].strip()
        if not title:
            corpus_notes.skip(row.line, "neither a title nor a text")
            continue
        if row["_id"] in catalog:  # which document the qrels judged is unknown: keep the first, say so
            corpus_notes.skip(row.line, f"field '_id': {row['_id']!r} again (the first one is kept)")
            continue
        catalog[row["_id"]] = Item(row["_id"], title, "beir", text or None)
    texts, query_notes = {}, _Notes(src / "queries.jsonl", log)
    query_rows = read_table(src / "queries.jsonl", {"_id": Id, "text": str}, {}, raw=("text",))
    read["queries.jsonl"] = len(query_rows)
    for row in query_rows:
        if row["_id"] in texts:  # as with the corpus: the first one is kept, said
            query_notes.skip(row.line, f"field '_id': {row['_id']!r} again (the first one is kept)")
            continue
        texts[row["_id"]] = strip_controls(row["text"]).strip()

    queries, qrels, notes = {}, {}, [corpus_notes, query_notes]
    for split in ("train", "dev", "test"):
        path = src / "qrels" / f"{split}.tsv"
        if not path.is_file():
            continue
        rows = read_table(path, {"query-id": str, "corpus-id": str, "score": int}, {})
        read[f"qrels/{split}.tsv"] = len(rows)
        notes.append(_Notes(path, log))
        for row in rows:
            qid, iid = row["query-id"], row["corpus-id"]
            if not texts.get(qid):
                notes[-1].skip(row.line, "field 'query-id': no such query with a text in queries.jsonl")
                continue
            if iid not in catalog:
                notes[-1].skip(row.line, "field 'corpus-id': no such document with a title or text in corpus.jsonl")
                continue
            queries[qid] = Query(qid, texts[qid], "beir", split)
            _add_qrel(qrels, qid, iid, row["score"])
    for n in notes:
        n.report()
    if not queries:
        raise DataError(src / "qrels", None, None, "no qrels/{train,dev,test}.tsv with usable judgements")
    return _finish(catalog, queries, qrels, src, src.name, read, src / "qrels")


# ----------------------------------------------------------------------------- ESCI

def _find(folder: Path, stem: str) -> Path | None:
    for ext in (".parquet", ".csv"):
        if (folder / f"{stem}{ext}").is_file():
            return folder / f"{stem}{ext}"
    return None


def _esci_merged_file(src: Path) -> Path | None:
    """The single CSV/parquet holding both example and product columns, if `src` is one."""
    if src.is_file():
        return src
    for path in sorted(src.glob("*.csv")) + sorted(src.glob("*.parquet")):
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            try:  # by its columns: lrem's own tables may be Parquet too
                if "esci_label" in pq.read_schema(path).names:
                    return path
            except Exception:  # pyarrow raises several types; reading it as ESCI then names the file
                return path
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            if "esci_label" in f.readline():
                return path
    return None


def _esci_rows(src: Path, log: Log) -> tuple[Path, list[Row]]:
    """Example rows joined with their product columns, from either ESCI layout."""
    required = {"query_id": int, "query": str, "product_id": str, "product_locale": str, "esci_label": str}
    title = {"product_title": str}  # required: without the column every row would be skipped
    others = dict.fromkeys(ESCI_PRODUCT_FIELDS[1:], str)
    examples = _find(src, ESCI_EXAMPLES) if src.is_dir() else None
    if examples is None:
        merged = _esci_merged_file(src)
        if merged is None:
            raise DataError(src, None, None, f"no {ESCI_EXAMPLES}.parquet|csv and no merged ESCI CSV")
        return merged, read_table(merged, {**required, **title}, {"split": str, **others}, raw=ESCI_RAW)

    products_path = _find(src, ESCI_PRODUCTS)
    if products_path is None:
        raise DataError(src / f"{ESCI_PRODUCTS}.*", None, None, "missing (needed beside the examples file)")
    products, notes = {}, _Notes(products_path, log)
    for p in read_table(products_path, {"product_id": str, "product_locale": str, **title}, others, raw=ESCI_RAW):
        key = p["product_id"], p["product_locale"]
        if notes.first_title(f"{key}", _clean(p["product_title"]), p.line,
                             f"product_id {key[0]!r} (locale {key[1]!r})"):
            products[key] = p
    notes.report()
    rows = read_table(examples, required, {"split": str}, raw=ESCI_RAW)
    for row in rows:
        row.update(products.get((row["product_id"], row["product_locale"]), {}))
    return examples, rows


def from_esci(src, locale: str | None = None, log: Log = _stderr) -> Dataset:
    """Amazon Shopping Queries (ESCI): official two-file layout or one merged CSV.

    Labels Exact/Substitute/Complement/Irrelevant (or E/S/C/I) become relevance 3/2/1/0.
    `locale` (us, es, jp) keeps one locale; item ids get a locale prefix when several remain.
    A product repeated across queries with another title keeps its first (a warning says where).
    """
    src = Path(src)
    path, rows = _esci_rows(src, log)
    n_read = len(rows)
    if locale is not None:
        rows = [r for r in rows if r["product_locale"] == locale]
        if not rows:
            raise DataError(path, None, "product_locale", f"no rows with locale {locale!r}")
    prefix = len({r["product_locale"] for r in rows}) > 1

    catalog, queries, qrels, notes = {}, {}, {}, _Notes(path, log)
    for row in rows:
        label = ESCI_LABELS.get(row["esci_label"].strip().lower())
        if label is None:
            raise DataError(path, row.line, "esci_label",
                            f"unknown label {row['esci_label']!r} (expected Exact/Substitute/Complement/Irrelevant)")
        if "product_title" not in row:  # official layout: not in the products file
            notes.skip(row.line, "field 'product_id': not in the products file")
            continue
        title, qtext = _clean(row["product_title"]), strip_controls(row["query"]).strip()
        if not title or not qtext:
            notes.skip(row.line, "field 'product_title': empty" if not title else "field 'query': empty")
            continue
        pid, loc = row["product_id"], row["product_locale"]
        iid = f"{loc}:{pid}" if prefix else pid
        if notes.first_title(iid, title, row.line, f"product_id {pid!r}" + (f" (locale {loc!r})" if prefix else "")):
            fields = {f: _clean(row.get(f"product_{f}")) or None for f in ("brand", "color", "description")}
            bullets = _join(*(row.get("product_bullet_point") or "").splitlines())  # one bullet a line
            catalog[iid] = Item(iid, title, "esci", _join(*(row.get(f) for f in ESCI_PRODUCT_FIELDS[1:])),
                                bullets=bullets, **fields)
        qid = str(row["query_id"])
        split = _clean(row.get("split")) or hash_split(qid)
        queries.setdefault(qid, Query(qid, qtext, "esci", split))
        _add_qrel(qrels, qid, iid, label)
    notes.report()
    return _finish(catalog, queries, qrels, src, src.stem if src.is_file() else src.name, {path.name: n_read}, path)


# ----------------------------------------------------------------------------- WANDS

def read_wands_queries(path) -> dict[str, Query]:
    """WANDS query.csv (tab-separated): query_id, query, query_class -> Query by id.

    category = query_class ("unknown" when empty); split = sha1 hash split of the query id.
    """
    queries = {}
    for row in read_table(path, {"query_id": str, "query": str}, {"query_class": str}):
        qid = row["query_id"].strip()
        if qid in queries:
            raise DataError(path, row.line, "query_id", f"duplicate {qid!r}")
        category = (row["query_class"] or "").strip() or "unknown"
        queries[qid] = Query(qid, strip_controls(row["query"]).strip(), category, hash_split(qid))
    return queries


def from_wands(src, log: Log = _stderr) -> Dataset:
    """Wayfair WANDS folder: product.csv, query.csv, label.csv (all tab-separated).

    Labels Exact/Partial/Irrelevant become relevance 2/1/0.
    """
    src = Path(src)
    _require_files(src, WANDS_FILES, "WANDS")
    catalog, product_notes = {}, _Notes(src / "product.csv", log)
    optional = dict.fromkeys(("product_class", "product_description", "product_features"), str)
    products = read_table(src / "product.csv", {"product_id": str, "product_name": str}, optional,
                          raw=("product_name", *optional))
    for row in products:
        title = _clean(row["product_name"])
        if not title:
            product_notes.skip(row.line, "field 'product_name': empty")
            continue
        if row["product_id"] in catalog:  # which product label.csv judged is unknown: keep the first, say so
            product_notes.skip(row.line, f"field 'product_id': {row['product_id']!r} again (the first one is kept)")
            continue
        features = (row["product_features"] or "").replace("|", "; ")
        category = _clean(row["product_class"]) or None
        catalog[row["product_id"]] = Item(row["product_id"], title, category,
                                          _join(row["product_description"], features),
                                          bullets=_join(*features.split("; ")),
                                          description=_clean(row["product_description"]) or None)
    queries = read_wands_queries(src / "query.csv")

    label_path, qrels = src / "label.csv", {}
    label_notes = _Notes(label_path, log)
    labels = read_table(label_path, {"query_id": str, "product_id": str, "label": str}, {})
    for row in labels:
        rel = WANDS_LABELS.get(row["label"].strip().lower())
        if rel is None:
            raise DataError(label_path, row.line, "label",
                            f"unknown label {row['label']!r} (expected Exact/Partial/Irrelevant)")
        if row["query_id"] not in queries:
            label_notes.skip(row.line, "field 'query_id': not in query.csv")
        elif row["product_id"] not in catalog:
            label_notes.skip(row.line, "field 'product_id': not in product.csv (or its name is empty)")
        else:
            _add_qrel(qrels, row["query_id"], row["product_id"], rel)
    product_notes.report()
    label_notes.report()
    return _finish(catalog, queries, qrels, src, src.name,
                   {"product.csv": len(products), "query.csv": len(queries), "label.csv": len(labels)}, label_path)


# ----------------------------------------------------------------------------- dispatch

def detect_format(src) -> str:
    """Guess the source layout from the files present."""
    src = Path(src)
    if src.is_file():
        return "esci"
    if (src / BEIR_FILES[0]).is_file():
        return "beir"
    if all((src / f).is_file() for f in WANDS_FILES):
        return "wands"
    if _find(src, ESCI_EXAMPLES) or (src.is_dir() and _esci_merged_file(src)):
        return "esci"
    if all(any((src / f"{t}{ext}").is_file() for ext in EXTENSIONS) for t in TABLES):
        return "lrem"  # lrem's own tables (catalog, queries, qrels in any format): checked and rewritten
    raise DataError(src, None, None, f"cannot detect the format: expected BEIR ({BEIR_FILES[0]}), "
                    f"WANDS ({', '.join(WANDS_FILES)}), ESCI files, or lrem's tables "
                    f"({', '.join(t + '.*' for t in TABLES)})")


def convert(src, fmt: str = "auto", *, locale: str | None = None, log: Log = _stderr) -> Dataset:
    """Convert a source folder/file to a Dataset; `fmt` is one of FORMATS. `log` gets the
    `warning:` lines (rows skipped, conflicting titles); `locale` is for ESCI only."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {_and(FORMATS, 'or')}")
    if not Path(src).exists():
        raise DataError(src, None, None, "does not exist")
    fmt = detect_format(src) if fmt == "auto" else fmt
    if locale is not None and fmt != "esci":
        raise ValueError(f"{src}: a locale applies to ESCI sources only, not {fmt}")
    if fmt == "esci":
        return from_esci(src, locale, log=log)
    if fmt == "lrem":
        return load_dataset(src)
    return {"beir": from_beir, "wands": from_wands}[fmt](src, log=log)


# ----------------------------------------------------------------------------- subsets

def _rank(seed: int, key: str) -> str:
    """A seeded pseudo-random sort key that is the same on every machine and Python version."""
    return hashlib.sha1(f"{seed}:{key}".encode("utf-8")).hexdigest()


def sample_dataset(ds: Dataset, n_queries: int, split: str | None, n_distractors: int,
                   seed: int = 0) -> Dataset:
    """A small fixed subset for quick runs: n queries, all their judged items, n other items.

    Picks are by seeded hash rank, so a larger n keeps every pick of a smaller one and the
    subset is identical across runs and machines.
    """
    pool = ds.split_queries(split) if split is not None else ds.queries
    chosen = sorted(pool, key=lambda qid: _rank(seed, qid))[:n_queries]
    judged = {iid for qid in chosen for iid in ds.qrels.get(qid, {})}
    others = sorted((iid for iid in ds.catalog if iid not in judged), key=lambda iid: _rank(seed, iid))
    keep = judged | set(others[:n_distractors])
    catalog = {iid: ds.catalog[iid] for iid in sorted(keep)}
    queries = {qid: ds.queries[qid] for qid in sorted(chosen)}
    qrels = {qid: dict(sorted(ds.qrels[qid].items())) for qid in sorted(chosen) if qid in ds.qrels}
    return Dataset(catalog, queries, qrels, ds.name)
