"""Converters from public benchmark layouts (BEIR, ESCI, WANDS) to the lrem dataset format.

Each converter reads the source as published, maps its labels to integer relevance, gives every
query a split (the source's own when it has one, else a stable sha1 80/10/10 split), and
returns a validated `Dataset`. Rows that cannot become items (no title) are skipped with a
warning; labels that are not understood are a `DataError`. Control characters (NUL, escape
codes) in titles and texts (and ESCI and BEIR queries) of a raw source are replaced by spaces; an id holding one
is a `DataError` (lrem's own dataset files reject them in every text field).
"""
from __future__ import annotations

import hashlib
import re
import warnings
from pathlib import Path

from .._text import strip_controls
from .formats import DataError, Dataset, Item, Query, Row, hash_split, read_table, validate_dataset

FORMATS = ("beir", "esci", "wands")
ESCI_LABELS = {"e": 3, "s": 2, "c": 1, "i": 0, "exact": 3, "substitute": 2, "complement": 1, "irrelevant": 0}
WANDS_LABELS = {"exact": 2, "partial": 1, "irrelevant": 0}
ESCI_EXAMPLES = "shopping_queries_dataset_examples"
ESCI_PRODUCTS = "shopping_queries_dataset_products"
ESCI_PRODUCT_FIELDS = ("product_title", "product_brand", "product_color",
                       "product_bullet_point", "product_description")


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


def _warn_skipped(count: int, what: str) -> None:
    if count:
        warnings.warn(f"skipped {count} {what}", stacklevel=3)


def _finish(catalog, queries, qrels, src: Path, name: str, read: dict[str, int]) -> Dataset:
    """Keep only queries with judgements and validate the result; `read`: rows read per source
    file, kept in `Dataset.source_rows` so a caller can report rows read against rows written."""
    queries = {qid: q for qid, q in queries.items() if qid in qrels}
    ds = validate_dataset(Dataset(catalog, queries, qrels, name), root=src)
    ds.source_rows = read
    return ds


# ----------------------------------------------------------------------------- BEIR

def from_beir(src) -> Dataset:
    """A BEIR folder: corpus.jsonl, queries.jsonl, qrels/{train,dev,test}.tsv.

    A query's split is the qrels file it appears in (test wins over dev over train, so an
    evaluation query never counts as training); queries in no qrels file are dropped.
    """
    src = Path(src)
    catalog, no_title, read = {}, 0, {}
    corpus = read_table(src / "corpus.jsonl", {"_id": str}, {"title": str, "text": str}, allow_empty=True)
    read["corpus.jsonl"] = len(corpus)
    for row in corpus:
        text = strip_controls(row["text"] or "").strip()
        title = strip_controls(row["title"] or "").strip() or text[:200].strip()
        if not title:
            no_title += 1
            continue
        catalog[row["_id"]] = Item(row["_id"], title, "beir", text or None)
    texts = {r["_id"]: strip_controls(r["text"]).strip()
             for r in read_table(src / "queries.jsonl", {"_id": str, "text": str}, {}, allow_empty=True)}

    queries, qrels, dangling = {}, {}, 0
    for split in ("train", "dev", "test"):
        path = src / "qrels" / f"{split}.tsv"
        if not path.is_file():
            continue
        rows = read_table(path, {"query-id": str, "corpus-id": str, "score": int}, {})
        read[f"qrels/{split}.tsv"] = len(rows)
        for row in rows:
            qid, iid = row["query-id"], row["corpus-id"]
            if not texts.get(qid) or iid not in catalog:
                dangling += 1
                continue
            queries[qid] = Query(qid, texts[qid], "beir", split)
            _add_qrel(qrels, qid, iid, row["score"])
    if not queries:
        raise DataError(src / "qrels", None, None, "no qrels/{train,dev,test}.tsv with usable judgements")
    _warn_skipped(no_title, "BEIR documents with neither title nor text")
    _warn_skipped(dangling, "BEIR qrels naming an unknown or empty query or document")
    return _finish(catalog, queries, qrels, src, src.name, {**read, "queries.jsonl": len(texts)})


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
            return path
        with open(path, encoding="utf-8", errors="replace") as f:
            if "esci_label" in f.readline():
                return path
    return None


def _esci_rows(src: Path) -> tuple[Path, list[Row]]:
    """Example rows joined with their product columns, from either ESCI layout."""
    required = {"query_id": int, "query": str, "product_id": str, "product_locale": str, "esci_label": str}
    optional = {"split": str}
    examples = _find(src, ESCI_EXAMPLES) if src.is_dir() else None
    if examples is None:
        merged = _esci_merged_file(src)
        if merged is None:
            raise DataError(src, None, None, f"no {ESCI_EXAMPLES}.parquet|csv and no merged ESCI CSV")
        fields = dict.fromkeys(ESCI_PRODUCT_FIELDS, str)
        return merged, read_table(merged, required, {**optional, **fields}, allow_empty=True)

    products_path = _find(src, ESCI_PRODUCTS)
    if products_path is None:
        raise DataError(src / f"{ESCI_PRODUCTS}.*", None, None, "missing (needed beside the examples file)")
    products = {}
    for p in read_table(products_path, {"product_id": str, "product_locale": str},
                        dict.fromkeys(ESCI_PRODUCT_FIELDS, str), allow_empty=True):
        products[p["product_id"], p["product_locale"]] = p
    rows = read_table(examples, required, optional, allow_empty=True)
    for row in rows:
        row.update(products.get((row["product_id"], row["product_locale"]), {}))
    return examples, rows


def from_esci(src, locale: str | None = None) -> Dataset:
    """Amazon Shopping Queries (ESCI): official two-file layout or one merged CSV.

    Labels Exact/Substitute/Complement/Irrelevant (or E/S/C/I) become relevance 3/2/1/0.
    `locale` (us, es, jp) keeps one locale; item ids get a locale prefix when several remain.
    """
    src = Path(src)
    path, rows = _esci_rows(src)
    n_read = len(rows)
    if locale is not None:
        rows = [r for r in rows if r["product_locale"] == locale]
        if not rows:
            raise DataError(path, None, "product_locale", f"no rows with locale {locale!r}")
    prefix = len({r["product_locale"] for r in rows}) > 1

    catalog, queries, qrels, no_title = {}, {}, {}, 0
    for row in rows:
        label = ESCI_LABELS.get(row["esci_label"].strip().lower())
        if label is None:
            raise DataError(path, row.line, "esci_label",
                            f"unknown label {row['esci_label']!r} (expected Exact/Substitute/Complement/Irrelevant)")
        title, qtext = _clean(row.get("product_title")), strip_controls(row["query"]).strip()
        if not title or not qtext:
            no_title += 1
            continue
        pid, loc = row["product_id"], row["product_locale"]
        iid = f"{loc}:{pid}" if prefix else pid
        fields = {f: _clean(row.get(f"product_{f}")) or None for f in ("brand", "color", "description")}
        bullets = _join(*(row.get("product_bullet_point") or "").splitlines())  # one bullet a line
        catalog.setdefault(iid, Item(iid, title, "esci", _join(*(row.get(f) for f in ESCI_PRODUCT_FIELDS[1:])),
                                     bullets=bullets, **fields))
        qid = str(row["query_id"])
        split = (row.get("split") or "").strip() or hash_split(qid)
        queries.setdefault(qid, Query(qid, qtext, "esci", split))
        _add_qrel(qrels, qid, iid, label)
    _warn_skipped(no_title, "ESCI rows with an empty product title or query")
    return _finish(catalog, queries, qrels, src, src.stem if src.is_file() else src.name, {path.name: n_read})


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


def from_wands(src) -> Dataset:
    """Wayfair WANDS folder: product.csv, query.csv, label.csv (all tab-separated).

    Labels Exact/Partial/Irrelevant become relevance 2/1/0.
    """
    src = Path(src)
    catalog, no_name = {}, 0
    optional = dict.fromkeys(("product_class", "product_description", "product_features"), str)
    products = read_table(src / "product.csv", {"product_id": str, "product_name": str}, optional, allow_empty=True)
    for row in products:
        title = _clean(row["product_name"])
        if not title:
            no_name += 1
            continue
        features = (row["product_features"] or "").replace("|", "; ")
        category = _clean(row["product_class"]) or None
        catalog[row["product_id"]] = Item(row["product_id"], title, category,
                                          _join(row["product_description"], features),
                                          bullets=_join(*features.split("; ")),
                                          description=_clean(row["product_description"]) or None)
    queries = read_wands_queries(src / "query.csv")

    label_path, qrels, dangling = src / "label.csv", {}, 0
    labels = read_table(label_path, {"query_id": str, "product_id": str, "label": str}, {})
    for row in labels:
        rel = WANDS_LABELS.get(row["label"].strip().lower())
        if rel is None:
            raise DataError(label_path, row.line, "label",
                            f"unknown label {row['label']!r} (expected Exact/Partial/Irrelevant)")
        if row["query_id"] not in queries or row["product_id"] not in catalog:
            dangling += 1
            continue
        _add_qrel(qrels, row["query_id"], row["product_id"], rel)
    _warn_skipped(no_name, "WANDS products with an empty name")
    _warn_skipped(dangling, "WANDS labels naming an unknown query or product")
    return _finish(catalog, queries, qrels, src, src.name,
                   {"product.csv": len(products), "query.csv": len(queries), "label.csv": len(labels)})


# ----------------------------------------------------------------------------- dispatch

def detect_format(src) -> str:
    """Guess the source layout from the files present."""
    src = Path(src)
    if src.is_file():
        return "esci"
    if (src / "corpus.jsonl").is_file():
        return "beir"
    if all((src / f).is_file() for f in ("product.csv", "query.csv", "label.csv")):
        return "wands"
    if _find(src, ESCI_EXAMPLES) or (src.is_dir() and _esci_merged_file(src)):
        return "esci"
    raise DataError(src, None, None, "cannot detect the format: expected BEIR (corpus.jsonl), "
                    "WANDS (product.csv, query.csv, label.csv) or ESCI files")


def convert(src, fmt: str = "auto", **options) -> Dataset:
    """Convert a source folder/file to a Dataset; fmt is beir, esci, wands or auto."""
    if not Path(src).exists():
        raise DataError(src, None, None, "does not exist")
    fmt = detect_format(src) if fmt == "auto" else fmt
    converters = {"beir": from_beir, "esci": from_esci, "wands": from_wands}
    if fmt not in converters:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)} or auto")
    return converters[fmt](src, **options)


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
