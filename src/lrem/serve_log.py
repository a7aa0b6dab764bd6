"""The query log of `lrem serve`: one JSON line per /search, written off the event loop.

A search team's query log is what it tunes and trains on: which queries came, what lrem answered
(the CoT, the items and their scores), how long it took. With `query_log: PATH` each answered
/search appends {"time", "query", "mode", "mode_used", "k", "offset", "filter", "hybrid", "lexical_weight",
"min_score", "cached", "cot", "items": [[item_id, score], ...], "ms"}; `lrem search --from-file
PATH` replays it. Rows go through a queue to a thread (Python's QueueHandler / QueueListener), so
a slow disk never holds a request, and the file is rotated by size (RotatingFileHandler: PATH.1
... PATH.N kept).
Queries are logged verbatim: where they may hold personal data, treat the file accordingly.
"""
from __future__ import annotations

import json
import logging
import logging.handlers
import queue
import time
from pathlib import Path


class QueryLog:
    """Append rows to `path` as JSON lines from a background thread; `start()` / `stop()` around
    serving (`stop` writes what is queued)."""

    def __init__(self, path: str | Path, max_mb: float = 100.0, backups: int = 5):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handler = _RotatingFile(self.path, maxBytes=max(1, int(max_mb * 2**20)), backupCount=backups, encoding="utf-8",
                                delay=True)
        handler.setFormatter(logging.Formatter("%(message)s"))
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._listener = logging.handlers.QueueListener(self._queue, handler)
        # a logger of its own, outside logging's registry (so none outlives the app): the file only
        self._logger = logging.Logger("lrem.query_log", logging.INFO)
        self._logger.propagate = False
        self._logger.addHandler(logging.handlers.QueueHandler(self._queue))

    def start(self) -> None:
        self._listener.start()

    def stop(self) -> None:
        self._listener.stop()  # writes the rows still queued, then ends the thread
        for h in self._listener.handlers:
            h.close()
            if h.lost:
                _warn(f"query log {self.path}: {h.lost} rows could not be written")

    def write(self, request: dict, result: dict) -> None:
        """Log one answered search: `request` the /search body's fields, `result` its answer."""
        now = time.time()
        row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z",
               **request, "mode_used": result["mode_used"], "cached": result["cached"], "cot": result["cot"],
               "items": [[h["item_id"], round(float(h["score"]), 6)] for h in result["items"]],
               "ms": result["timings_ms"].get("total")}
        self._logger.info(json.dumps(row, ensure_ascii=False))


def _warn(message: str) -> None:
    logging.getLogger("lrem").warning(message)


class _RotatingFile(logging.handlers.RotatingFileHandler):
    """A row that cannot be written (disk full, folder removed) is counted, and the first one
    warned of in one line: logging's default prints a traceback per row, which on a full disk
    would pour tracebacks into the server's own log at the request rate."""

    lost = 0

    def handleError(self, record) -> None:
        import sys

        self.lost += 1
        if self.lost == 1:
            error = sys.exc_info()[1]
            _warn(f"query log {self.baseFilename}: cannot write ({type(error).__name__}: {error}); rows are dropped "
                  "and counted until it can (the server answers on)")
