"""Rankings computed elsewhere, read from a TREC run file, as a retriever.

Compare lrem with the search engine you run now (Elasticsearch, OpenSearch, Vespa, Solr: each can
write a TREC run for a query set), or fuse with it, before deploying anything:

    lrem eval --data data/esci --split test -s prod=run:prod.trec -s lrem=runs/idx:direct \\
        -s hybrid=run:prod.trec+runs/idx:direct

A run file has one line per (query, item): `query_id Q0 item_id rank score tag`, whitespace
separated, as trec_eval reads it (and as `lrem eval` writes its runs/*.trec). Each query's items
are ranked by score, highest first, as trec_eval does; equal scores keep the file's order. The
query ids are the dataset's: `lrem eval` hands the retriever each query's id with its text
(`QueryText`), so two queries of the same text keep their own rankings.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from lrem.search_types import Hit, SearchResult

RUN_PREFIX = "run:"


def trec_name(name: str) -> str:
    """A system name as a TREC run tag and file name (no spaces or path characters)."""
    return re.sub(r"[^\w.+@-]", "_", name) or "_"


def trec_files(names) -> dict[str, str]:
    """System name -> its run file's name ("<trec_name>.trec"). Names that would share a file
    ("r/1" and "r_1", or "A" and "a" on a case-insensitive disk) are a ValueError naming both."""
    files: dict[str, str] = {}
    taken: dict[str, str] = {}
    for name in names:
        files[name] = f"{trec_name(name)}.trec"
        other = taken.setdefault(files[name].casefold(), name)
        if other != name:
            raise ValueError(f"the systems {other!r} and {name!r} would both write runs/{files[name]}; "
                             "rename one (letters, digits and . + @ - _ are kept as they are)")
    return files


class QueryText(str):
    """A query's text that also carries its id (`query_id`), for retrievers that answer by id (a
    run file): every other retriever sees the plain text."""

    query_id: str

    def __new__(cls, text: str, query_id: str):
        self = super().__new__(cls, text)
        self.query_id = query_id
        return self


def trec_run_lines(name: str, run: dict[str, list]) -> list[str]:
    """TREC run lines "qid Q0 item rank score tag" of one system's ranked [item, score] lists
    (an item listed twice for a query keeps its first place), scores written strictly decreasing
    (`written_scores`)."""
    tag = trec_name(name)
    lines = []
    for q, hits in run.items():
        hits = dedupe_hits(hits)
        for rank, ((item, _), score) in enumerate(zip(hits, written_scores([s for _, s in hits])), 1):
            lines.append(f"{q} Q0 {item} {rank} {score} {tag}")
    return lines


def written_scores(scores: list[float]) -> list[str]:
    """Scores as a run file holds them, in rank order and strictly decreasing: trec_eval and
    ir_measures order a query's lines by score, breaking ties by item id (descending), not by the
    rank column, so a tie (common in RRF) would score another ranking than lrem's. Six digits
    where they keep the order; a tied or out-of-order score becomes the next single-precision
    float below the one before it (trec_eval reads scores as C floats), in 9 digits.

    >>> written_scores([0.5, 0.25, 0.25, 0.1, 0.2])
    ['0.5', '0.25', '0.249999985', '0.1', '0.099999994']
    """
    out, prev = [], np.float32(np.inf)
    for s in scores:
        text = f"{float(s):.6g}"
        if np.float32(text) >= prev:
            text = f"{np.nextafter(prev, np.float32(-np.inf)):.9g}"
        out.append(text)
        prev = np.float32(text)
    return out


def dedupe_hits(hits: list) -> list:
    seen: set = set()
    return [h for h in hits if not (h[0] in seen or seen.add(h[0]))]


def is_run_spec(spec: str) -> bool:
    return spec.startswith(RUN_PREFIX)


def read_trec_run(path: str | Path) -> dict[str, list[tuple[str, float]]]:
    """query_id -> [(item_id, score)], best first. A malformed line is a `DataError` naming it."""
    from lrem.data.formats import DataError

    path = Path(path)
    runs: dict[str, list[tuple[str, float, int]]] = {}
    seen: set[tuple[str, str]] = set()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, None, None, f"cannot read the run file: {e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        cols = line.split()
        if len(cols) != 6:
            raise DataError(path, n, None, f"expected 6 columns (query_id Q0 item_id rank score tag), got {len(cols)}")
        qid, _, item, _, score, _ = cols
        try:
            value = float(score)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise DataError(path, n, "score", f"{score!r} is not a finite number")
        if (qid, item) in seen:
            raise DataError(path, n, "item_id", f"{item!r} appears twice for query {qid!r}")
        seen.add((qid, item))
        runs.setdefault(qid, []).append((item, value, n))
    if not runs:
        raise DataError(path, None, None, "the run file holds no ranking")
    return {q: [(i, s) for i, s, _ in sorted(rows, key=lambda r: (-r[1], r[2]))] for q, rows in runs.items()}


class RunFileRetriever:
    """A `Retriever` that answers each query with its ranking in a TREC run file.

    `queries`: (query id, text) pairs, the dataset's. A query that comes as a `QueryText` (as
    `lrem eval` asks) is answered by its id; a plain text by the first id of that text the run
    ranks (a text several ids share, such as the same query in two splits, cannot tell them
    apart). A query the run does not rank gets no hits (trec_eval scores it 0 too); `missing`
    holds their ids (or texts). `catalog_ids`: where given, the run's
    items outside the catalog are counted (`unknown_items`: a run of another catalog shows here).
    """

    def __init__(self, path: str | Path, queries, catalog_ids=None):
        self.path = str(path)
        self.runs = read_trec_run(path)
        self.query_ids: dict[str, str] = {}
        for qid, text in queries:
            if qid in self.runs:
                self.query_ids.setdefault(text, qid)
        self.missing: set[str] = set()
        known = set(catalog_ids) if catalog_ids is not None else None
        self.unknown_items = 0 if known is None else sum(i not in known for r in self.runs.values() for i, _ in r)

    def search(self, queries: list[str], k: int = 10) -> list[SearchResult]:
        out = []
        for text in queries:
            qid = getattr(text, "query_id", None)
            qid = qid if qid is not None else self.query_ids.get(text)
            if qid not in self.runs:
                self.missing.add(qid if qid is not None else text)
            out.append(SearchResult(hits=[Hit(i, s) for i, s in self.runs.get(qid, [])[:k]]))
        return out

    def describe(self) -> dict:
        """For the eval report: the file, and what of it did not fit the dataset."""
        return {"retriever": "run file", "mode": "run", "index": self.path, "run_queries": len(self.runs),
                "queries_missing": len(self.missing), "unknown_items": self.unknown_items}
