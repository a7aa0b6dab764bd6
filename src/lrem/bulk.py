"""Search a file of queries (a query log, a test set) into a results file, resumably.

    lrem search --index runs/idx --mode auto --from-file queries.jsonl --out results.jsonl
    lrem search --index runs/idx --mode direct --from-file queries.txt --out run.trec -k 100

    from lrem.bulk import read_queries, search_to_file
    search_to_file(searcher.retriever("auto"), searcher.index.title, read_queries("queries.jsonl"),
                   "results.jsonl", k=10, settings={"mode": "auto"})

Queries: JSON lines of {"query_id": ..., "text": ...} (a `.jsonl` file, or any file but `.txt`
whose first line is a JSON object, such as a rotated or gzipped query log; "query" is taken for
"text", and "id" or BEIR's "_id" for "query_id"), a table with a header and those columns (`.csv`,
`.tsv`, `.parquet`), or plain text, one query a line, whose ids are the line numbers (a table's
rows without an id too). Text is UTF-8 (a byte-order mark is dropped) or UTF-16 with its mark. Results:
JSON lines (query_id, query, cot, items: item_id, title, score), or a TREC run (`.trec`, which
`lrem eval -s NAME=run:FILE` scores). Queries are searched in batches and each batch is appended
to `OUT.partial` (fsynced); a killed job rerun with the same settings searches only the queries
the partial file lacks (or holds with another text: an edited file), and the finished file
replaces OUT at once, in the input's order. OUT `-` is standard output (`search_to_stream`): each
batch is written as it is searched, and nothing is kept to resume from.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, TextIO

from lrem._defaults import QUERY_BATCH
from lrem._io import JsonlLog, atomic_write, prepare_file_output
from lrem._text import check_query
from lrem.runfile import trec_run_lines
from lrem.search_types import Retriever

FORMATS = ("jsonl", "trec")
PARTIAL_SUFFIX = ".partial"


def read_queries(path: str | Path) -> list[tuple[str, str]]:
    """(query_id, text) pairs of a queries file; a `DataError` names the file, line and field of
    a bad row (no text, an id given twice, a control character)."""
    from lrem.data.formats import EXTENSIONS, DataError, Id, decode_text, read_jsonl, read_table

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in EXTENSIONS and suffix != ".jsonl":  # a table with a header, e.g. WANDS' query.csv (tab-separated)
        table = read_table(path, {}, {"query_id": Id, "id": Id, "_id": Id, "text": str, "query": str})
        text_key = next((k for k in ("text", "query") if any(r[k] is not None for r in table)), None)
        if text_key is None:
            raise DataError(path, 1, "text", "missing column (a table of queries needs 'text' or 'query')")
        found = [(r.line, {k: v for k, v in r.items() if v is not None}) for r in table]
    else:
        try:  # the data readers' decoding: a byte-order mark dropped (else it would start the first query), UTF-16
            text = decode_text(path)  # with its mark, .gz; bad UTF-8 bytes kept, refused below at their line
        except OSError as e:
            raise DataError(path, None, None, f"cannot read the queries: {e}") from None
        first = next((line for line in text.split("\n") if line.strip()), "")
        # JSON lines by name, or by content (a rotated log); a .txt is text even where a query starts with "{"
        if suffix == ".jsonl" or (suffix != ".txt" and first.lstrip().startswith("{")):
            found, text_key = read_jsonl(path), None
        else:
            found = [(n, {"text": line.rstrip("\r")}) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
            text_key = "text"
    rows = []
    for line, row in found:
        key = text_key or ("text" if "text" in row else "query")
        qid = row.get("query_id", row.get("id", row.get("_id", str(line))))
        if not isinstance(qid, (str, int)) or isinstance(qid, bool) or not str(qid).strip() or \
                any(c.isspace() for c in str(qid)):
            raise DataError(path, line, "query_id", f"{qid!r}: expected a string or integer without spaces")
        rows.append((line, str(qid), row.get(key), key))
    out, seen = [], {}
    for line, qid, text, key in rows:
        try:
            check_query(text, "the query")
        except ValueError as e:
            raise DataError(path, line, key, str(e)) from None
        if qid in seen:
            raise DataError(path, line, "query_id", f"{qid!r} again (first on line {seen[qid]})")
        seen[qid] = line
        out.append((qid, text))
    if not out:
        raise DataError(path, None, None, "no queries")
    return out


def output_format(out: str | Path, fmt: str | None = None) -> str:
    """The results format: `fmt`, else TREC for a `.trec` file and JSON lines otherwise."""
    fmt = fmt or ("trec" if Path(out).suffix == ".trec" else "jsonl")
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return fmt


def _result_rows(batch: list[tuple[str, str]], results, title: Callable[[str], str]) -> list[dict]:
    """The JSON-lines rows of one batch of (id, text) queries and their search results."""
    return [{"query_id": q, "query": t, "cot": r.cot,
             "items": [{"item_id": h.item_id, "title": title(h.item_id), "score": float(h.score)} for h in r.hits]}
            for (q, t), r in zip(batch, results)]


def _format_rows(rows: list[dict], fmt: str, tag: str) -> list[str]:
    """Lines of `rows` as JSON lines or a TREC run named `tag`."""
    if fmt == "jsonl":
        return [json.dumps(r, ensure_ascii=False) + "\n" for r in rows]
    run = {r["query_id"]: [(h["item_id"], h["score"]) for h in r["items"]] for r in rows}
    return [line + "\n" for line in trec_run_lines(tag, run)]


def search_to_stream(retriever: Retriever, title: Callable[[str], str], queries: list[tuple[str, str]],
                     stream: TextIO, k: int = 10, fmt: str | None = None, tag: str = "lrem",
                     batch_size: int = QUERY_BATCH, show_progress: bool = True) -> dict:
    """`search_to_file` into an open text stream (`lrem search --out -`: standard output, for a
    pipe), each batch written and flushed as it is searched, in the input's order. Nothing is
    kept to resume from. `fmt`: jsonl (default) or trec. `tag` names a TREC run. Returns counts as
    `search_to_file` does."""
    from tqdm.auto import tqdm

    fmt = output_format("-", fmt)
    with tqdm(total=len(queries), desc="search", unit="q", disable=not show_progress) as bar:
        for s in range(0, len(queries), batch_size):
            batch = queries[s:s + batch_size]
            stream.writelines(_format_rows(_result_rows(batch, retriever.search([t for _, t in batch], k=k), title),
                                           fmt, tag))
            stream.flush()
            bar.update(len(batch))
    return {"searched": len(queries), "resumed": 0, "queries": len(queries), "format": fmt}


def search_to_file(retriever: Retriever, title: Callable[[str], str], queries: list[tuple[str, str]],
                   out: str | Path, k: int = 10, fmt: str | None = None, settings: dict | None = None,
                   batch_size: int = QUERY_BATCH, overwrite: bool = False, show_progress: bool = True) -> dict:
    """Search `queries` ((id, text) pairs) with `retriever` and write the results to `out`.

    `title(item_id)` gives the titles of JSON lines. `settings` (index, mode, filter, ...) are
    recorded in the partial file: a rerun with other settings is refused rather than mixing two
    searches in one file. An existing `out` is replaced only with `overwrite`. Returns counts:
    searched now, resumed from the partial file, queries in all.
    """
    from tqdm.auto import tqdm

    out, fmt = Path(out), output_format(out, fmt)
    prepare_file_output(out, overwrite=overwrite)
    header = {"lrem_bulk_search": 1, "k": k, "settings": settings or {}}
    partial = JsonlLog(out.with_name(out.name + PARTIAL_SUFFIX))
    done: dict[str, dict] = {}
    rows = partial.rows(repair=False)  # read-only until it is known to be this search's
    torn = partial.path.read_bytes() if not rows and partial.path.is_file() else b""  # no whole line: whose?
    mark = b'{"lrem_bulk_search"'
    if (rows and "lrem_bulk_search" not in rows[0]) or (torn and not (torn.startswith(mark) or mark.startswith(torn))):
        raise ValueError(f"{partial.path}: exists and is not a partial result of lrem search; move it, or choose "
                         "another --out")
    if torn:
        partial.rows()  # lrem's own header, cut short by a crash: nothing was searched, cut it off
    if rows:
        if rows[0] != json.loads(json.dumps(header)):
            raise ValueError(f"{partial.path}: a search with other settings ({rows[0].get('settings')}, k "
                             f"{rows[0].get('k')}) left it; delete it, or rerun that search to finish it")
        done = {r["query_id"]: r for r in partial.rows()[1:]}  # now a torn last line is cut off
    else:
        partial.append(header)
    todo = [(q, t) for q, t in queries if q not in done or done[q]["query"] != t]  # an edited line: again
    try:
        with tqdm(total=len(queries), initial=len(queries) - len(todo), desc="search", unit="q",
                  disable=not show_progress) as bar:
            for s in range(0, len(todo), batch_size):
                batch = todo[s:s + batch_size]
                new = _result_rows(batch, retriever.search([t for _, t in batch], k=k), title)
                partial.append(*new)
                done.update((r["query_id"], r) for r in new)
                bar.update(len(batch))
    finally:
        partial.close()
    ordered = [done[q] for q, _ in queries]
    with atomic_write(out) as f:
        f.writelines(_format_rows(ordered, fmt, (settings or {}).get("mode") or "lrem"))
    os.unlink(partial.path)
    return {"searched": len(todo), "resumed": len(queries) - len(todo), "queries": len(queries), "format": fmt}
