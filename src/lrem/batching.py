"""Dynamic batching and an embedding cache for `lrem.serve` (no web framework in here).

    batcher = Batcher(encode, max_batch=16, max_wait_ms=5, max_queue=1024)
    batcher.start()                                   # inside a running event loop
    cot, emb = await batcher.submit("reason", "a drink stronger than tea")

`Batcher`: callers await `submit`; one worker task drains up to `max_batch` pending texts
(waiting at most `max_wait_ms` after the first), groups them by kind, runs `encode(kind, texts)`
on a single model thread and resolves each caller's future with its own row.
`EmbeddingCache`: bounded LRU of (kind, text) -> (CoT, embedding) with hit counts, saved to and
loaded from an .npz file.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ._io import atomic_write

# query embedding without / with a CoT, the same shown first-stage titles (texts: (query, titles)), item
KINDS = ("direct", "reason", "grounded", "grounded-direct", "item")


class EmbeddingCache:
    """LRU map (kind, text) -> (cot, embedding (dim,) float32), with hit counts and .npz persistence."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], tuple[str, np.ndarray]] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def hit_rate(self) -> float:
        return self.hits / (self.hits + self.misses) if self.hits + self.misses else 0.0

    def get(self, key: tuple[str, str]) -> tuple[str, np.ndarray] | None:
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: tuple[str, str], value: tuple[str, np.ndarray]) -> None:
        if self.max_entries <= 0:
            return
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def save(self, path: str | Path, model_id: str) -> None:
        """Write all entries (oldest first) to an .npz, atomically."""
        keys, values = list(self._entries), list(self._entries.values())
        emb = np.stack([v[1] for v in values]) if values else np.zeros((0, 0), np.float32)
        with atomic_write(path, "wb") as f:
            np.savez(f, kinds=np.array([k[0] for k in keys], dtype=str), texts=np.array([k[1] for k in keys], dtype=str),
                     cots=np.array([v[0] for v in values], dtype=str), emb=emb, model=np.array(model_id))

    @staticmethod
    def check_file(path: str | Path) -> None:
        """Raise a ValueError saying why `path` may not be written as a cache file: a folder, or
        an existing file that is not a readable lrem cache (of any model: which model wrote it is
        `load`'s question). An absent path passes. For writers that were given the path and must
        not move or replace someone else's file (`lrem cache --out`)."""
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"{path}: is a folder, not a cache file")
        if not (path.exists() or path.is_symlink()):
            return
        try:
            with open(path, "rb") as f:
                if f.read(4) != b"PK\x03\x04":  # numpy's guess at other bytes is "pickled data": say what it is
                    raise ValueError("not an .npz archive")
            _read_cache(path, None, None)
        except Exception as e:  # noqa: BLE001 - whatever the reader trips on, it is no cache of lrem's
            raise ValueError(f"{path}: exists and is not an lrem cache file ({type(e).__name__}: {e})") from None

    def load(self, path: str | Path, model_id: str, dim: int | None = None, log=None) -> int:
        """Add the entries of a saved cache; returns how many (0 if absent or from another model).

        A cache is disposable: a file that cannot be read or holds entries of the wrong shape
        (`dim`: the model's) is moved aside as `PATH.bad-TIME` with one warning (`log`, default
        the `lrem` logger), and the service starts with an empty cache. A folder is a ValueError,
        never moved: it is no cache, and may be anyone's.
        """
        path = Path(path)
        warn = log or logging.getLogger("lrem").warning
        if path.is_dir():
            raise ValueError(f"cache {path}: is a folder, not a cache file")
        if not (path.exists() or path.is_symlink()):
            return 0
        try:
            entries = _read_cache(path, model_id, dim)
        except Exception as e:  # noqa: BLE001 - any problem at all: start empty rather than not start
            aside = path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%d-%H%M%S')}")
            try:
                os.replace(path, aside)
                where = f"moved to {aside}"
            except OSError as move_error:
                where = f"could not move it aside ({move_error})"
            warn(f"cache {path}: unusable ({type(e).__name__}: {e}); {where}; starting with an empty cache")
            return 0
        if entries is None:
            warn(f"cache {path}: written for another model; starting with an empty cache (it is replaced at shutdown)")
            return 0
        for key, value in entries:
            self.put(key, value)
        return len(entries)


def _read_cache(path: Path, model_id: str | None, dim: int | None) -> list | None:
    """The (key, value) entries of a cache file, None if another model wrote it (`model_id`
    None: any model's entries); a ValueError (or the reader's own error) for anything malformed.
    Never unpickles."""
    with np.load(path, allow_pickle=False) as z:
        missing = {"kinds", "texts", "cots", "emb", "model"} - set(z.files)
        if missing:
            raise ValueError(f"missing arrays {sorted(missing)}")
        if model_id is not None and str(z["model"]) != model_id:
            return None
        kinds, texts, cots, emb = z["kinds"], z["texts"], z["cots"], z["emb"]
    n = len(kinds)
    for name, a in (("kinds", kinds), ("texts", texts), ("cots", cots)):
        if a.ndim != 1 or a.dtype.kind != "U" or len(a) != n:
            raise ValueError(f"{name}: expected {n} strings, got {a.dtype} of shape {a.shape}")
    if n and (emb.ndim != 2 or emb.shape[0] != n or emb.dtype.kind != "f" or (dim is not None and emb.shape[1] != dim)):
        raise ValueError(f"emb: expected ({n}, {dim if dim is not None else 'dim'}) floats, got {emb.dtype} {emb.shape}")
    if n and not np.isfinite(emb).all():
        raise ValueError("emb: not finite")
    unknown = set(map(str, kinds)) - set(KINDS)
    if unknown:
        raise ValueError(f"kinds: unknown {sorted(unknown)}")
    emb = emb.astype(np.float32, copy=False)
    return [((str(k), str(t)), (str(c), emb[j])) for j, (k, t, c) in enumerate(zip(kinds, texts, cots))]


class Overloaded(Exception):
    """The batcher's queue is full."""


class Batcher:
    """Group concurrent texts into model calls; one call runs at a time, on one thread.

    Args:
        encode: `encode(kind, texts) -> (cots, embeddings (n, dim))`, run in the model thread.
        max_batch: most texts per call; max_wait_ms: how long the first text waits for others.
        on_batch: called with (kind, n_texts, seconds) after each model call (metrics).
        on_result: called with (kind, text, cot, row) for each text computed, before its callers
            get it, whether or not any is still waiting (the cache keeps what was paid for).
    """

    def __init__(self, encode, max_batch: int, max_wait_ms: float, max_queue: int, on_batch=None, on_result=None):
        self.encode, self.max_batch, self.max_wait = encode, max_batch, max_wait_ms / 1000.0
        self.max_queue, self.on_batch = max_queue, on_batch or (lambda kind, n, s: None)
        self.on_result = on_result or (lambda kind, text, cot, row: None)
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._last_size = 0  # callers in the last batch collected

    @property
    def pending(self) -> int:
        return self._queue.qsize() if self._queue else 0

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="lrem-model")
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._executor:
            self._executor.shutdown(wait=True)

    async def submit(self, kind: str, text: str) -> tuple[str, np.ndarray]:
        """(cot, embedding) for one text, computed in a batch with whatever else is pending."""
        if self._queue is None:
            raise RuntimeError("Batcher.start() was not called (the app's lifespan starts it)")
        if self._queue.qsize() >= self.max_queue:
            raise Overloaded(f"{self._queue.qsize()} texts are waiting (max_queue={self.max_queue})")
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((kind, text, future))
        return await future

    async def _collect(self) -> list:
        """The next batch: the first pending job, then others until full or `max_wait` is over.
        After a batch of one caller (no load) it does not wait: a lone caller would only lose
        `max_wait` (measured at one client: 5 ms of ~55); under load the calls hold several texts,
        and the wait gathers the callers that arrive together."""
        batch = [await self._queue.get()]
        deadline = asyncio.get_running_loop().time() + (self.max_wait if self._last_size > 1 else 0.0)
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except asyncio.TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        while True:
            jobs = [j for j in await self._collect() if not j[2].done()]  # callers gone (timeout, hang-up): dropped
            self._last_size = len(jobs)  # callers, whatever their kinds and duplicates
            for kind in KINDS:
                waiting: dict[str, list[asyncio.Future]] = {}
                for k, text, future in jobs:
                    if k == kind:
                        waiting.setdefault(text, []).append(future)  # same text twice: computed once
                if waiting:
                    await self._compute(kind, waiting)

    async def _compute(self, kind: str, waiting: dict[str, list[asyncio.Future]]) -> None:
        """One model call for these texts. If it fails, each text is tried alone, so one bad text
        fails only its own callers (with the model's exception) and never the worker."""
        texts = list(waiting)
        t0 = time.perf_counter()
        try:
            cots, emb = await asyncio.get_running_loop().run_in_executor(self._executor, self.encode, kind, texts)
        except Exception as e:
            if len(texts) > 1:
                for text in texts:
                    await self._compute(kind, {text: waiting[text]})
                return
            for future in waiting[texts[0]]:
                if not future.done():
                    future.set_exception(e)
            return
        self.on_batch(kind, len(texts), time.perf_counter() - t0)
        for text, cot, row in zip(texts, cots, emb):
            row = row.copy()  # a copy: a cached row must not pin the whole batch
            self.on_result(kind, text, cot, row)
            for future in waiting[text]:
                if not future.done():
                    future.set_result((cot, row))
