"""Item index: FAISS over the catalog's `<emb>` embeddings, described by an `index_factory` string.

    from lrem.index import ItemIndex
    idx = ItemIndex.build(model, {"03109150-n": "corkscrew, bottle screw", ...}, factory="HNSW32,Flat")
    idx.save("runs/idx")                       # index.faiss + items.jsonl + meta.json
    idx = ItemIndex.load("runs/idx")
    scores, ids = idx.search(query_embeddings, k=10)

Embeddings are L2-normalised, so inner product (the metric used) is cosine similarity.
"Flat" is exact; "HNSW32,Flat" or "IVF1024,PQ64" trade recall for speed and memory at scale, and
search-time knobs go through `search_params` ("efSearch=128", "nprobe=32").
What an index keeps of its items and model (filter fields, digests, the model identity) is
`lrem.index_base`'s, shared with a Milvus collection (`lrem.vectordb`) and chunks (`lrem.embed`).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from ._defaults import FACTORY, ITEM_BATCH
from ._io import atomic_dir, write_json, write_jsonl
from .index_base import (FILTER_FIELDS, MODEL_KEYS, catalog_items, check_embeddings, check_filter, fill_missing,
                         item_digest, item_facets, item_title, ivf_lists, model_identity, unchanged_items)
from .search_types import check_k, top_k  # noqa: F401  check_k re-exported: users import it from here

INDEX_FILE, ITEMS_FILE, META_FILE = "index.faiss", "items.jsonl", "meta.json"
FILTER_CACHE_BYTES = 512 * 2**20  # what the recent filters keep in all: positions, selectors, vectors
# A filter matching at most this many items is searched by brute force over their vectors: exact, and
# cheaper than an HNSW beam or IVF's lists through a selective filter, which miss matches (as Weaviate's
# flatSearchCutoff and Qdrant's full_scan_threshold do; measured in benchmarks/filter.py).
BRUTE_FORCE_FILTER_UP_TO = 10_000
EXACT_FILTER_UP_TO = 50_000  # a filter matching at most this many items is scored exactly where FAISS fell short
LISTS_FILE = "lists.ivfdata"  # an on-disk IVF index's inverted lists (`ItemIndex.from_chunks(on_disk=...)`)
SCRATCH_PREFIX = ".lrem-ivf-"  # an on-disk build's scratch folder (blocks, then the merged lists) beside OUT
SCRATCH_LOCK = ".lock"  # in a scratch folder: flock'd by the build using it, released when its process ends


def build_index(emb: np.ndarray, factory: str = FACTORY, search_params: str = "", max_train: int = 100_000,
                seed: int = 0) -> faiss.Index:
    """A FAISS inner-product index over `emb` (n, dim) float32, trained first if it needs it, on
    a seeded sample of at most `max_train` vectors (as `ItemIndex.from_chunks`: k-means over all
    of 1M vectors costs minutes more and barely moves recall).

    Raises a ValueError naming the factory string when FAISS cannot build or train it (e.g.
    "IVF4096" with fewer vectors than lists).
    """
    emb = np.ascontiguousarray(emb, dtype=np.float32)  # (n, dim)
    try:
        index = faiss.index_factory(emb.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            sample, n = emb, train_size(index, len(emb), max_train)
            if n < len(emb):
                sample = emb[np.sort(np.random.default_rng(seed).choice(len(emb), n, replace=False))]
            index.train(sample)
        index.add(emb)
    except RuntimeError as e:
        raise ValueError(f"cannot build FAISS index {factory!r} on {emb.shape[0]} x {emb.shape[1]}: "
                         f"{_faiss_message(e)}") from e
    if search_params:
        set_search_params(index, search_params)
    return index


# `--factory auto` (`auto_recipe`), from `benchmarks/index.py --recipes 1000000` (README, "Index recipes"):
# at 1M clustered vectors of dim 576, IVF2048,PQ64x4fs,RFlat at these parameters reached recall@100
# 1.0 at p50 1.6 ms (1 thread), IVF2048,Flat at nprobe=32 1.0 at 2.8 ms, and HNSW32,Flat at most
# 0.915 (efSearch=1024, 3.0 ms): its graph search loses its way inside dense clusters.
EXACT_UP_TO = 50_000  # Flat: exact, p50 ~8 ms at 50k items on one core (15 ms at 100k, 131 ms at 1M)
IVFPQ_PARAMS = "nprobe=128,k_factor_rf=16"  # 128 lists probed; 16 x k candidates re-ranked by the full vectors
IVF_PARAMS = "nprobe=32"


def auto_recipe(n_items: int, dim: int, exact_up_to: int = EXACT_UP_TO, on_disk: bool = False) -> tuple[str, str]:
    """(FAISS factory, search parameters) for a catalog of `n_items` vectors of `dim`: exact search
    while it is fast enough, then IVF over ~4 sqrt(n) lists with 4-bit PQ codes (fast scan) whose
    best candidates are re-ranked by the full vectors (`,RFlat`); IVF with full vectors where no
    even number of codes up to 64 splits `dim`. Memory: the full vectors either way (~dim x 4 bytes
    per item); an index bigger than memory takes `IVF...,Flat` with `--on-disk` instead.

    >>> auto_recipe(10_000, 576)
    ('Flat', '')
    >>> auto_recipe(1_000_000, 576)
    ('IVF2048,PQ64x4fs,RFlat', 'nprobe=128,k_factor_rf=16')
    >>> auto_recipe(1_000_000, 576, on_disk=True)
    ('IVF2048,Flat', 'nprobe=32')
    """
    if n_items <= exact_up_to and not on_disk:
        return "Flat", ""
    nlist = ivf_lists(n_items)
    m = next((m for m in range(64, 1, -2) if dim % m == 0), None)  # codes split the dimension (4-bit fast scan: even)
    if m is None or on_disk:  # on-disk lists take plain IVF codes (no fast scan, no refine)
        return f"IVF{nlist},Flat", IVF_PARAMS
    return f"IVF{nlist},PQ{m}x4fs,RFlat", IVFPQ_PARAMS


def resolve_factory(factory: str, search_params: str, n_items: int, dim: int,
                    on_disk: bool = False) -> tuple[str, str]:
    """`factory` and `search_params` as given, or for "auto" the `auto_recipe` for this catalog
    (given search parameters replace the recipe's)."""
    if factory != "auto":
        return factory, search_params
    auto, params = auto_recipe(n_items, dim, on_disk=on_disk)
    return auto, search_params or params


def _ivf(index: faiss.Index):
    """The IVF part of `index` as its concrete type (IndexIVFFlat, IndexIVFPQFastScan, ...), or None."""
    try:
        return faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:  # not an IVF index
        return None


def train_size(index: faiss.Index, n_items: int, max_train: int) -> int:
    """Vectors to train `index` on: at most `max_train`, but at least the 39 per IVF list FAISS's
    k-means asks for (fewer would fail or cluster badly), and never more than there are."""
    ivf = _ivf(index)
    return min(n_items, max(max_train, 39 * (ivf.nlist if ivf is not None else 0)))


# search parameters that count something (probes, graph candidates, a re-rank factor): FAISS takes
# 0 or a negative value without a word and then returns one wrong hit (efSearch) or fails every
# search (nprobe), and cuts 2.7 to 2
COUNTS = ("nprobe", "efSearch", "k_factor", "k_factor_rf", "max_codes")


def set_search_params(index: faiss.Index, params: str) -> None:
    """Apply "name=value,name=value" search-time parameters (nprobe, efSearch, ...)."""
    ps = faiss.ParameterSpace()
    for kv in filter(None, (p.strip() for p in params.split(","))):
        name, _, value = kv.partition("=")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"bad FAISS search parameter {kv!r}: {value!r} is not a number") from None
        counts = name.strip().split("_", 1)[-1] in COUNTS or name.strip() in COUNTS  # quantizer_efSearch too
        if not math.isfinite(number) or (counts and not (number.is_integer() and 1 <= number < 2**31)):
            want = "a whole number from 1 to 2^31 - 1" if counts else "a finite number"
            raise ValueError(f"bad FAISS search parameter {kv!r}: {name.strip()} takes {want}")
        try:
            ps.set_index_parameter(index, name, number)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"bad FAISS search parameter {kv!r}: {_faiss_message(e)}") from None


def pq_centroids(index: faiss.Index) -> int | None:
    """Centroids per sub-vector of the product quantizer inside `index` (2^nbits), or None: found
    through pre-transforms (OPQ), refinement, HNSW storage and IVF."""
    index = faiss.downcast_index(index)
    if hasattr(index, "pq"):
        return int(index.pq.ksub)
    for attr in ("index", "base_index", "storage"):
        inner = getattr(index, attr, None)
        if inner is not None:
            found = pq_centroids(inner)
            if found:
                return found
    ivf = _ivf(index)
    return int(ivf.pq.ksub) if ivf is not None and hasattr(ivf, "pq") else None


def check_factory(factory: str, search_params: str, dim: int, n_items: int | None = None) -> None:
    """Raise a ValueError now, before hours of embedding, for a factory string or search
    parameters FAISS would reject, or an IVF index with more lists than items.

    Builds the index on a few random unit vectors (untrained: training needs real data).
    """
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"bad FAISS factory {factory!r}: {_faiss_message(e)}") from None
    if search_params:
        set_search_params(index, search_params)
    if n_items is not None:
        ivf = _ivf(index)
        nlist = ivf.nlist if ivf is not None else 0
        if nlist > n_items:
            raise ValueError(f"FAISS factory {factory!r} has {nlist} lists but the catalog only {n_items} items")
        ksub = pq_centroids(index)
        if ksub and ksub > n_items:  # FAISS's k-means refuses fewer points than centroids, after the embedding
            raise ValueError(f"FAISS factory {factory!r} trains {ksub} PQ centroids per sub-vector but the catalog "
                             f"has only {n_items} items; use 4-bit codes (e.g. PQ64x4fs: 16 centroids) or Flat/HNSW")
    if index.is_trained:
        x = np.random.default_rng(0).standard_normal((4, dim)).astype(np.float32)
        index.add(x / np.linalg.norm(x, axis=1, keepdims=True))


def _faiss_message(e: Exception) -> str:
    """The useful part of a FAISS C++ exception (it also names the C++ function, file and line)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = next((ln for ln in lines if ln.startswith("Error")), lines[-1] if lines else str(e))
    text = text.split("' failed: ")[-1]
    return re.sub(r"^Error in .*? at \S+:\d+: ", "", text)


@dataclass
class ItemIndex:
    """A FAISS index plus what is needed to use it: item ids, titles, and how it was built."""

    index: faiss.Index
    item_ids: list[str]
    titles: list[str]
    meta: dict = field(default_factory=dict)  # model, factory, dim, n_items, seconds, ...
    lists_file: Path | None = None  # on-disk inverted lists, memory-mapped
    lists_scratch: bool = False  # lists_file lies in from_chunks' scratch folder, removed once `save` has a copy
    scratch_lock: int | None = field(default=None, repr=False)  # that folder's lock (`_lock_scratch`), held till then
    digests: list[str] | None = None  # per item, `item_digest` of what was embedded (None: not known)
    facets: dict[str, list] = field(default_factory=dict)  # FILTER_FIELDS present: field -> value per item

    def allowed(self, where: dict) -> np.ndarray:
        """Positions (sorted int64) of the items matching a filter: {field: value or values}, a
        FILTER_FIELDS field each; an item matches when each field's value is one of the given ones."""
        return self._filter(where).allowed

    def _filter(self, where: dict) -> _Filter:
        """The filter's matching positions and FAISS selector (and, once scored by brute force,
        their vectors), kept for the filters used last: a server sees the same few again and
        again, and a selector over 1M ids takes ~90 ms to build. At most FILTER_CACHE_BYTES are
        kept in all, the least recently used filters dropped first."""
        check_filter(where, self.filter_fields)  # before the key: sorting an int or None would raise a TypeError
        key = tuple(sorted((f, (v,) if isinstance(v, str) else tuple(sorted(v))) for f, v in where.items()))
        lock = vars(self).setdefault("_filter_lock", threading.Lock())  # serve searches from several threads
        with lock:
            cache = vars(self).setdefault("_filters", {})
            if key in cache:
                cache[key] = cache.pop(key)  # most recently used last
                return cache[key]
        allowed = self._match(where)
        found = _Filter(allowed, faiss.IDSelectorBatch(allowed))
        with lock:
            cache[key] = found
        self._trim_filters()
        return found

    def _trim_filters(self) -> None:
        with self._filter_lock:
            cache = self._filters
            while sum(f.nbytes for f in cache.values()) > FILTER_CACHE_BYTES and len(cache) > 1:
                cache.pop(next(iter(cache)))

    def _filter_vectors(self, found: _Filter) -> np.ndarray | None:
        """The matching items' vectors (len(allowed), dim), read back from the index once per
        cached filter (under a lock: serve searches from several threads); None where its codes
        cannot give them back as added (PQ, SQ). Vectors larger than the whole cache's budget
        are read for this call and not kept (the cache keeps its newest filter whatever its size)."""
        if len(found.allowed) * self.index.d * 4 > FILTER_CACHE_BYTES:
            return None if found.lossy else self._vectors(found.allowed)
        with vars(self).setdefault("_vectors_lock", threading.Lock()):
            if found.vectors is None and not found.lossy:
                found.vectors = self._vectors(found.allowed)
                found.lossy = found.vectors is None
        self._trim_filters()
        return found.vectors

    @property
    def filter_fields(self) -> list[str]:
        """The FILTER_FIELDS this index can filter on (those its catalog had), sorted."""
        return sorted(self.facets)

    def filter_hints(self, where: dict) -> list[str]:
        """A line for each filter value no item has, naming the values that differ from it only in
        case or spacing: filters match exactly, so "acme" finds no "Acme", silently otherwise."""
        hints = []
        for name, values in where.items():
            have = {v for v in self._coded(name)[1] if v is not None} if name in self.facets else set()
            folded: dict[str, list[str]] = {}
            for v in have:
                folded.setdefault(" ".join(v.casefold().split()), []).append(v)
            for value in [values] if isinstance(values, str) else values:
                if value not in have:
                    near = sorted(folded.get(" ".join(str(value).casefold().split()), []))
                    hints.append(f"no item has {name}={value!r}" + (
                        f" (filters match exactly; the index has {', '.join(map(repr, near))})" if near else ""))
        return hints

    def _match(self, where: dict) -> np.ndarray:
        keep = np.ones(len(self.item_ids), dtype=bool)
        for name, values in where.items():
            codes, lookup = self._coded(name)
            wanted = [lookup[v] for v in ([values] if isinstance(values, str) else values) if v in lookup]
            keep &= np.isin(codes, np.array(wanted, np.int32))
        return np.flatnonzero(keep).astype(np.int64)

    def _coded(self, name: str) -> tuple[np.ndarray, dict]:
        """A facet column as integer codes (n,) and its value -> code map, made once: np.isin over
        strings compares the whole column once per value (3 s for 100 brands at 1M items), over
        codes it is one pass."""
        coded = vars(self).setdefault("_coded_columns", {})
        if name not in coded:
            column = self.facets[name]
            lookup = {v: j for j, v in enumerate(dict.fromkeys(column))}
            coded[name] = np.fromiter(map(lookup.__getitem__, column), np.int32, len(column)), lookup
        return coded[name]

    @classmethod
    def from_embeddings(cls, emb, item_ids, titles, factory=FACTORY, search_params="", **meta) -> "ItemIndex":
        """An index of these embeddings (n, dim), one per item id (distinct strings) and title."""
        if len(item_ids) != emb.shape[0] or len(titles) != emb.shape[0]:
            raise ValueError(f"{emb.shape[0]} embeddings for {len(item_ids)} ids and {len(titles)} titles")
        check_item_ids(item_ids)
        check_embeddings(emb, len(item_ids))
        factory, search_params = resolve_factory(factory, search_params, emb.shape[0], emb.shape[1])
        index = build_index(emb, factory, search_params)
        meta = {"factory": factory, "search_params": search_params, "dim": int(emb.shape[1]),
                "n_items": int(emb.shape[0]), **meta}
        return cls(index, list(item_ids), list(titles), meta)

    @classmethod
    def build(cls, model, catalog: dict, factory=FACTORY, search_params="", batch_size=ITEM_BATCH,
              show_progress=True, truncate: bool = True, **meta) -> "ItemIndex":
        """Embed `catalog` (item_id -> title, or -> `lrem.data.Item` / mapping, whose fields the
        model's item template may name) with `model.encode_items` and index it. `truncate`: item
        texts over the model's `max_item_tokens` are cut (their count is `meta["truncated_items"]`)
        or an error."""
        ids, items = catalog_items(catalog)
        check_item_ids(ids)  # before the embedding, not after
        factory, search_params = resolve_factory(factory, search_params, len(ids), model.dim)
        check_factory(factory, search_params, model.dim, len(ids))  # fail now, not after embedding
        t0 = time.perf_counter()
        cut = model.truncated["item"]
        emb = model.encode_items(items, batch_size=batch_size, show_progress=show_progress, truncate=truncate)
        seconds = time.perf_counter() - t0
        out = cls.from_embeddings(emb, ids, [item_title(x) for x in items], factory, search_params, **model_identity(model),
                                  encode_seconds=round(seconds, 3), truncated_items=model.truncated["item"] - cut,
                                  **meta)
        out.digests, out.facets = [item_digest(model, x) for x in items], item_facets(items)
        return out

    def updated(self, model, catalog: dict, batch_size=ITEM_BATCH, show_progress=True, truncate: bool = True,
                **meta) -> tuple["ItemIndex", dict]:
        """This index brought up to date with `catalog` (as `build` takes it), embedding only the
        items that are new or changed: (the new index, counts of added, changed, removed and kept
        items). The result equals a fresh `build` of `catalog` with the same factory (items in
        catalog order; an index that trains, IVF, is trained again on the new set).

        `model` must be the one whose weights and item template embedded this index. An item
        counts as changed when its filled item template differs (`item_digest`; for an index
        without digests, written by an older lrem or from chunks, when its title differs, or always
        where the template names other fields too). The kept items' vectors are
        read back from the index, so its codes must hold them whole (`stored_vectors`)."""
        now, then = model_identity(model), self.meta
        for key in ("model_fingerprint", "item_template", "dim"):
            if then.get(key) is not None and then[key] != now[key]:
                raise ValueError(f"the index was embedded by another model ({key} {then[key]!r}, this model's "
                                 f"{now[key]!r}): rebuild it (`lrem index --overwrite`)")
        if self.lists_file is not None:
            raise ValueError("an index with on-disk lists cannot be updated in place: rebuild it (`lrem embed` "
                             "then `lrem index --from-chunks`)")
        try:  # a catalog that shrank below the factory's lists or PQ centroids: now, not after the embedding
            check_factory(then.get("factory", "Flat"), then.get("search_params", ""), self.index.d, len(catalog))
        except ValueError as e:
            raise ValueError(f"{e}; rebuild the index with a smaller factory (`lrem index --overwrite --factory "
                             "...`)") from None
        vectors = stored_vectors(self.index)  # (n_old, dim), before any work
        ids, items = catalog_items(catalog)
        pos = {i: n for n, i in enumerate(self.item_ids)}
        digests, same = unchanged_items(model, items, [
            None if i not in pos else (None if self.digests is None else self.digests[pos[i]], self.titles[pos[i]])
            for i in ids])
        todo = [n for n, kept in enumerate(same) if not kept]
        t0, cut = time.perf_counter(), model.truncated["item"]
        fresh = model.encode_items([items[n] for n in todo], batch_size=batch_size, show_progress=show_progress,
                                   truncate=truncate) if todo else np.zeros((0, model.dim), np.float32)
        seconds = time.perf_counter() - t0
        emb = np.empty((len(ids), vectors.shape[1]), np.float32)  # (n_new, dim), in catalog order
        kept = [n for n, k in enumerate(same) if k]
        emb[kept] = vectors[[pos[ids[n]] for n in kept]]
        emb[todo] = fresh
        counts = {"added": sum(i not in pos for i in ids), "changed": sum(ids[n] in pos for n in todo),
                  "removed": len(set(pos) - set(ids)), "kept": len(kept)}
        history = [*then.get("updates", []), {**counts, "encode_seconds": round(seconds, 3),
                                              "truncated_items": model.truncated["item"] - cut,
                                              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}]
        # what described the first build only (its timings, truncations, chunks) goes; updates[] says the rest
        keep = {k: v for k, v in then.items() if k not in ("factory", "search_params", "n_items", "updates",
                                                           "truncated_items", "encode_seconds", "index_seconds",
                                                           "chunks")}
        out = ItemIndex.from_embeddings(emb, ids, [item_title(x) for x in items],
                                        then.get("factory", "Flat"), then.get("search_params", ""),
                                        **{**keep, **now, **meta, "updates": history})
        out.digests, out.facets = digests, item_facets(items)
        return out, counts

    @classmethod
    def from_chunks(cls, folder, factory=FACTORY, search_params="", max_train: int = 100_000, seed: int = 0,
                    show_progress: bool = True, on_disk: str | os.PathLike | None = None, **meta) -> "ItemIndex":
        """Index a chunk folder of `lrem embed` (`lrem.embed`), adding chunk by chunk: one chunk of
        vectors in memory besides the index. An index that needs training (IVF, PQ) is trained
        first on a seeded sample of at most `max_train` vectors, drawn evenly from every chunk.

        `on_disk` (a scratch folder, on the output's file system): an IVF index whose inverted
        lists stay on disk, memory-mapped (FAISS's `OnDiskInvertedLists`, `faiss.contrib.ondisk`),
        for catalogs whose index is bigger than memory. Each chunk is indexed alone and written as
        a block, then the blocks are merged into one lists file; `save` moves it into the index
        folder. Needs an IVF factory without fast-scan codes or a refine stage (`IVF4096,Flat`,
        `IVF4096,PQ64`, `IVF4096,SQ8`)."""
        from .embed import chunk_fields, chunk_files, iter_chunks, read_manifest

        man = read_manifest(folder)
        chunk_files(folder, man)  # every chunk there, before any work
        factory, search_params = resolve_factory(factory, search_params, man["n_items"], man["dim"], on_disk is not None)
        check_factory(factory, search_params, man["dim"], man["n_items"])
        try:
            index = faiss.index_factory(man["dim"], factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise ValueError(f"bad FAISS factory {factory!r}: {_faiss_message(e)}") from None
        if on_disk is not None:
            _check_on_disk(index, factory)  # before training: a refused factory costs nothing
            Path(on_disk).mkdir(parents=True, exist_ok=True)  # (OUT's parent: lrem writes there anyway)
        t0 = time.perf_counter()
        if not index.is_trained:
            rng = np.random.default_rng(seed)
            share = min(1.0, train_size(index, man["n_items"], max_train) / max(man["n_items"], 1))
            sample = [x[rng.random(len(x)) < share] for _, _, x in iter_chunks(folder, show_progress)]
            _train_or_raise(index, np.concatenate(sample), factory)
        ids, titles, blocks = [], [], []
        scratch, lock = None, None
        if on_disk is not None:
            _clear_stale_scratch(Path(on_disk))
            scratch = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=on_disk))
            lock = _lock_scratch(scratch)
        try:
            for chunk_ids, chunk_titles, x in iter_chunks(folder, show_progress):
                if scratch is None:
                    index.add(x)
                else:  # this chunk alone in a copy of the trained, empty index, written as a block
                    block = faiss.clone_index(index)
                    block.add_with_ids(x, np.arange(len(ids), len(ids) + len(x), dtype=np.int64))
                    blocks.append(str(scratch / f"block{len(blocks):05d}.index"))
                    faiss.write_index(block, blocks[-1])
                    del block
                ids += chunk_ids
                titles += chunk_titles
            if len(set(ids)) != len(ids):
                raise ValueError(f"{folder}: duplicate item ids across chunks")
            lists = None
            if scratch is not None:
                from faiss.contrib.ondisk import merge_ondisk

                lists = scratch / LISTS_FILE
                with _stdout_to_stderr():  # FAISS reports the file's growth on stdout
                    merge_ondisk(index, blocks, str(lists))
                for b in blocks:
                    os.remove(b)
        except BaseException:  # a failed or interrupted build leaves no scratch behind (a rerun starts over)
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
                os.close(lock)
            raise
        if search_params:
            set_search_params(index, search_params)
        keep = {k: man[k] for k in (*MODEL_KEYS, "dtype", "dataset") if k in man}
        meta = {"factory": factory, "search_params": search_params, "n_items": len(ids), **keep, "chunks": str(folder),
                "index_seconds": round(time.perf_counter() - t0, 3), **({"on_disk": True} if lists else {}), **meta}
        out = cls(index, ids, titles, meta, lists_file=lists, lists_scratch=lists is not None, scratch_lock=lock)
        out.digests, out.facets = chunk_fields(folder)  # where the chunks keep them (an older lrem's do not)
        return out

    def search(self, q: np.ndarray, k: int = 10, where: dict | None = None) -> tuple[np.ndarray, list[list[str]]]:
        """Top-k (scores (n, k'), item ids) for query embeddings q (n, dim); k' = min(k, n_items).
        `where`: only items matching this filter (`allowed`), searched inside the index (FAISS's ID
        selector), so a selective filter still gets its k best matches."""
        q = np.ascontiguousarray(np.atleast_2d(q), dtype=np.float32)  # one vector (dim,): one query
        k = check_k(k)
        if where:
            found = self._filter(where)
            allowed = found.allowed
            if not len(allowed):
                return np.zeros((len(q), 0), np.float32), [[] for _ in range(len(q))]
            k = min(k, len(allowed))
            vectors = self._filter_vectors(found) if len(allowed) <= BRUTE_FORCE_FILTER_UP_TO else None
            if vectors is not None:  # few match: score them all, exact and cheaper than searching the index
                scores, idx = exact_top_k(q, vectors, allowed, k)
                return scores, [[self.item_ids[j] for j in row] for row in idx]
            try:
                scores, idx = self.index.search(q, k, params=selector_params(self.index, found.selector))
            except RuntimeError as e:  # index types whose search takes no selector (flat PQ codes, ...)
                raise ValueError(f"this index ({self.meta.get('factory', type(self.index).__name__)}) cannot "
                                 f"filter: {_faiss_message(e)}; rebuild it with a Flat, HNSW or IVF recipe") from None
            short = (idx < 0).any(axis=1)
            if short.any() and len(allowed) <= EXACT_FILTER_UP_TO:
                # IVF probes only some lists and HNSW's beam can miss a few matching items: score them all
                # (their vectors read once and cached with the filter, within FILTER_CACHE_BYTES)
                vectors = self._filter_vectors(found)
                if vectors is not None:
                    scores[short], idx[short] = exact_top_k(q[short], vectors, allowed, k)
        else:
            scores, idx = self.index.search(q, min(k, len(self.item_ids)))  # (n, k) each
        ids = [[self.item_ids[j] for j in row if j >= 0] for row in idx]
        return fill_missing(scores, idx), ids

    def _vectors(self, positions: np.ndarray) -> np.ndarray | None:
        """The vectors (len(positions), dim) the index holds at these positions; None where its
        codes are lossy (PQ, SQ: `keeps_vectors`) or it cannot give them back."""
        if not keeps_vectors(self.index):
            return None
        with vars(self).setdefault("_direct_map_lock", threading.Lock()):  # a half-built map reads wrong vectors
            try:
                ivf = faiss.extract_index_ivf(self.index)
                if ivf.direct_map.type == faiss.DirectMap.NoMap and not isinstance(faiss.downcast_index(self.index),
                                                                                  faiss.IndexRefine):
                    ivf.make_direct_map()  # ids -> list entries, built once (the lists are only read)
            except RuntimeError:  # not an IVF index
                pass
        try:
            return self.index.reconstruct_batch(positions)
        except RuntimeError:
            return None

    def position(self, item_id: str) -> int:
        """The item's row in the index (a KeyError where it has none)."""
        return self._positions()[item_id]

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._positions()

    def title(self, item_id: str) -> str:
        return self.titles[self.position(item_id)]

    def vectors_of(self, item_ids: list[str]) -> np.ndarray | None:
        """The vectors (len(item_ids), dim) the index holds for these items, in their order: what
        scoring given candidates needs (`lrem serve`'s /rerank by item_ids). None where its codes
        do not keep them as added (PQ, SQ: `keeps_vectors`); a KeyError names an unknown id."""
        missing = [i for i in item_ids if i not in self]
        if missing:
            raise KeyError(f"item_id {missing[0]!r} is not in the index")
        if not item_ids:
            return np.zeros((0, self.index.d), np.float32)
        return self._vectors(np.array([self.position(i) for i in item_ids], np.int64))

    def _positions(self) -> dict[str, int]:
        if not hasattr(self, "_pos"):
            self._pos = {i: n for n, i in enumerate(self.item_ids)}
        return self._pos

    def save(self, out: str | os.PathLike) -> None:
        """Write `index.faiss`, `items.jsonl` and `meta.json` into `out`, atomically; an on-disk
        index's lists file moves in beside them (`LISTS_FILE`; the index reads it from its own
        folder, wherever that is later moved)."""
        with atomic_dir(out) as tmp:
            if self.lists_file is not None:  # linked where one file system allows (no copy), else copied;
                try:                          # the source stays until the folder is in place
                    os.link(self.lists_file, tmp / LISTS_FILE)
                except OSError:
                    shutil.copyfile(self.lists_file, tmp / LISTS_FILE)
            faiss.write_index(self.index, str(tmp / INDEX_FILE))
            write_jsonl(tmp / ITEMS_FILE, (self._row(n) for n in range(len(self.item_ids))))
            write_json(tmp / META_FILE, self.meta)
        if self.lists_file is not None:
            if self.lists_scratch:
                shutil.rmtree(Path(self.lists_file).parent, ignore_errors=True)
                if self.scratch_lock is not None:
                    os.close(self.scratch_lock)
                    self.scratch_lock = None
            self.lists_file, self.lists_scratch = Path(out) / LISTS_FILE, False

    def _row(self, n: int) -> dict:
        """Item n's line of items.jsonl: id, title, digest and the facets it has."""
        row = {"item_id": self.item_ids[n], "title": self.titles[n]}
        if self.digests is not None:
            row["digest"] = self.digests[n]
        row.update({name: column[n] for name, column in self.facets.items() if column[n] is not None})
        return row

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = True) -> "ItemIndex":
        """Read an index folder; a ValueError names the file and what is wrong with it
        (unreadable FAISS file, malformed meta.json or items.jsonl, counts that disagree).

        `mmap` (`read_index`): map the FAISS file rather than copy it into memory. A mapped index
        is read-only (`updated` builds a new one), and a process mapping it dies (SIGBUS) if the
        file is overwritten in place (`cp`, `rsync --inplace`); lrem replaces files by rename."""
        from .data import DataError, read_jsonl

        path = Path(path)
        missing = [f for f in (INDEX_FILE, ITEMS_FILE, META_FILE) if not (path / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{path} is not an lrem index (missing {', '.join(missing)}); build one with `lrem index`")
        try:
            meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as e:
            raise DataError(path / META_FILE, None, None, f"malformed JSON ({e})") from None
        if not isinstance(meta, dict):
            raise DataError(path / META_FILE, None, None, "expected a JSON object")
        ids, titles, digests, facets = [], [], [], {f: [] for f in FILTER_FIELDS}
        for line, row in read_jsonl(path / ITEMS_FILE):
            for name in ("item_id", "title"):
                if not isinstance(row.get(name), str):
                    raise DataError(path / ITEMS_FILE, line, name, f"expected a string, got {row.get(name)!r}")
            ids.append(row["item_id"])
            titles.append(row["title"])
            digests.append(row.get("digest"))
            for name, column in facets.items():
                value = row.get(name)
                if value is not None and not isinstance(value, str):
                    raise DataError(path / ITEMS_FILE, line, name, f"expected a string, got {value!r}")
                column.append(value)
        if (path / INDEX_FILE).stat().st_size == 0:
            raise DataError(path / INDEX_FILE, None, None, "empty file (an interrupted write?); rebuild the index")
        try:
            index = read_index(path / INDEX_FILE, mmap=mmap)
        except RuntimeError as e:
            raise DataError(path / INDEX_FILE, None, None, f"not a readable FAISS index ({_faiss_message(e)})") from None
        if index.ntotal != len(ids):
            raise DataError(path / INDEX_FILE, None, None,
                            f"has {index.ntotal} vectors but {ITEMS_FILE} has {len(ids)} items")
        if meta.get("dim", index.d) != index.d:
            raise DataError(path / META_FILE, None, "dim", f"{meta['dim']!r}, but {INDEX_FILE} has dim {index.d}")
        if len(set(ids)) != len(ids):
            raise DataError(path / ITEMS_FILE, None, "item_id", "duplicate item ids")
        out = cls(index, ids, titles, meta, lists_file=path / LISTS_FILE if (path / LISTS_FILE).is_file() else None,
                  digests=digests if all(isinstance(d, str) for d in digests) else None,
                  facets={f: column for f, column in facets.items() if any(v is not None for v in column)})
        if meta.get("search_params"):
            if not isinstance(meta["search_params"], str):
                raise DataError(path / META_FILE, None, "search_params", f"expected a string, got {meta['search_params']!r}")
            try:
                set_search_params(index, meta["search_params"])
            except ValueError as e:
                raise DataError(path / META_FILE, None, "search_params", str(e)) from None
        return out


@dataclass(eq=False)
class _Filter:
    """A cached filter: the matching positions (sorted int64), their FAISS selector, and their
    vectors once a brute-force search read them (`lossy`: the index could not give them)."""

    allowed: np.ndarray
    selector: "faiss.IDSelector"
    vectors: np.ndarray | None = None
    lossy: bool = False

    @property
    def nbytes(self) -> int:
        return self.allowed.nbytes * 2 + (0 if self.vectors is None else self.vectors.nbytes)  # the selector copies ids


def exact_top_k(q: np.ndarray, vectors: np.ndarray, positions: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: the k best of `vectors` (the items at `positions`, k <= len(positions)) per
    query, by inner product, ties in position order. Returns (scores (n, k), positions (n, k))."""
    sims = q @ vectors.T  # (n, len(positions))
    top = np.stack([top_k(row, k) for row in sims]) if len(q) else np.zeros((0, k), np.int64)
    return np.take_along_axis(sims, top, axis=1), positions[top]


def keeps_vectors(index: faiss.Index) -> bool:
    """Whether `index.reconstruct` gives back the vectors as added (to float rounding): Flat
    codes, HNSW's flat storage, IVF-Flat lists, a flat refine stage (RFlat), behind rotations
    (OPQ, random rotation); not compressed codes (PQ, SQ), whose reconstructions are approximate."""
    typed = faiss.downcast_index(index)
    kind = type(typed)
    if kind in (faiss.IndexFlat, faiss.IndexFlatIP, faiss.IndexFlatL2, faiss.IndexIVFFlat):
        return True
    if kind in (faiss.IndexRefine, faiss.IndexRefineFlat):
        return keeps_vectors(typed.refine_index)
    if kind in (faiss.IndexHNSW, faiss.IndexHNSWFlat):
        return keeps_vectors(typed.storage)
    if kind is faiss.IndexPreTransform:
        steps = [faiss.downcast_VectorTransform(typed.chain.at(j)) for j in range(typed.chain.size())]
        return (all(type(t) in (faiss.OPQMatrix, faiss.RandomRotationMatrix) and t.d_in == t.d_out for t in steps)
                and keeps_vectors(typed.index))
    return False


def check_item_ids(item_ids) -> None:
    """A ValueError unless the ids are at least one, all strings (items.jsonl and every reader
    take them as strings: `str(id)` an integer id), non-empty, free of whitespace (a TREC run
    line splits on it; the dataset loader refuses it too), and distinct."""
    if not len(item_ids):
        raise ValueError("no items to index (an empty catalog)")
    seen = set()
    for i in item_ids:
        if not isinstance(i, str):
            raise ValueError(f"item id {i!r} is a {type(i).__name__}; item ids are strings (pass str(id))")
        if not i or any(c.isspace() for c in i):
            raise ValueError(f"item id {i!r} is empty or holds whitespace, which TREC run files split on")
        if i in seen:
            raise ValueError(f"item id {i!r} appears twice; item ids must be distinct")
        seen.add(i)


def stored_vectors(index: faiss.Index) -> np.ndarray:
    """Every vector an index holds (ntotal, d), as added (to float rounding), in insertion order,
    from the codes that keep them (`keeps_vectors`). Compressed codes alone (PQ, SQ) are lossy,
    so a ValueError says to rebuild instead."""
    if not keeps_vectors(index):
        raise ValueError(f"a {type(faiss.downcast_index(index)).__name__} index does not keep the embeddings as "
                         f"they were added (compressed codes): it cannot be updated in place; rebuild it "
                         f"(`lrem index --overwrite`)")
    typed = faiss.downcast_index(index)  # a view: `index` must stay referenced (it owns the C++ object)
    if isinstance(typed, (faiss.IndexRefine, faiss.IndexRefineFlat)):
        return stored_vectors(typed.refine_index)
    if isinstance(typed, (faiss.IndexHNSW, faiss.IndexHNSWFlat)):
        return stored_vectors(typed.storage)
    if isinstance(typed, faiss.IndexPreTransform):  # a rotation: the inner vectors turned back
        inner = stored_vectors(typed.index)
        out = np.empty((typed.ntotal, typed.d), np.float32)
        typed.reverse_chain(len(inner), faiss.swig_ptr(inner), faiss.swig_ptr(out))
        return out
    if isinstance(typed, faiss.IndexIVFFlat):  # reconstruct_n would need a direct map
        out = np.empty((typed.ntotal, typed.d), np.float32)
        lists = typed.invlists
        for j in range(typed.nlist):  # the lists hold (id, raw float32 code) pairs; ids are positions
            n = lists.list_size(j)
            if n:
                ids = faiss.rev_swig_ptr(lists.get_ids(j), n).copy()
                codes = faiss.rev_swig_ptr(lists.get_codes(j), n * lists.code_size).copy()
                out[ids] = codes.view(np.float32).reshape(n, typed.d)
        return out
    return typed.reconstruct_n(0, typed.ntotal)  # Flat


def selector_params(index: faiss.Index, selector) -> faiss.SearchParameters:
    """Search parameters that restrict `index`'s search to `selector`'s ids and keep the index's
    own search-time settings (nprobe, efSearch, the refine k_factor): FAISS replaces those by its
    defaults when given parameters."""
    typed = faiss.downcast_index(index)
    if isinstance(typed, faiss.IndexPreTransform):  # OPQ, PCA: the parameters are the inner index's
        return selector_params(typed.index, selector)
    if isinstance(typed, faiss.IndexRefine):
        return faiss.IndexRefineSearchParameters(k_factor=typed.k_factor,
                                                 base_index_params=selector_params(typed.base_index, selector))
    if isinstance(typed, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=selector, efSearch=typed.hnsw.efSearch)
    if isinstance(typed, faiss.IndexIVF):
        return faiss.SearchParametersIVF(sel=selector, nprobe=typed.nprobe, max_codes=typed.max_codes)
    return faiss.SearchParameters(sel=selector)


def read_index(file: str | os.PathLike, mmap: bool = True) -> faiss.Index:
    """Read a FAISS index memory-mapped where its type allows and `mmap` (the codes stay in the
    page cache, shared between processes, instead of being copied at every start), else read into
    memory (an index of its own, which a later overwrite of the file cannot touch). On-disk lists
    are opened from the index file's own folder, mapped whatever `mmap` says."""
    flags = faiss.IO_FLAG_READ_ONLY | faiss.IO_FLAG_ONDISK_SAME_DIR  # on-disk lists: opened read-only, beside the file
    quiet = _stdout_to_stderr if (Path(file).parent / LISTS_FILE).is_file() else contextlib.nullcontext
    with quiet():  # FAISS prints where it found on-disk lists: keep stdout for results (--json)
        try:
            index = faiss.read_index(str(file), (faiss.IO_FLAG_MMAP_IFC if mmap else 0) | flags)
        except RuntimeError:  # an index type whose reader has no mmap path (on-disk lists among them)
            index = faiss.read_index(str(file), flags)
    ivf = _ivf(index)
    lists = faiss.downcast_InvertedLists(ivf.invlists) if ivf is not None else None
    if isinstance(lists, faiss.OnDiskInvertedLists):
        # no prefetch threads: each search would start 32 of them (~4 ms) to read lists the page cache holds
        lists.prefetch_nthread = 0
    return index


@contextlib.contextmanager
def _stdout_to_stderr():
    """File descriptor 1 pointed at 2 meanwhile (C++ printf does not go through sys.stdout); nothing
    where there is no stdout to protect."""
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
        saved = os.dup(1)
    except OSError:  # fd 1 closed
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        if sys.stdout is not None:
            sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _check_on_disk(index: faiss.Index, factory: str) -> None:
    """A ValueError unless `index` can keep its inverted lists on disk."""
    ivf = _ivf(index)
    if ivf is None or isinstance(index, faiss.IndexRefine) or isinstance(ivf, faiss.IndexIVFFastScan):
        raise ValueError(f"FAISS factory {factory!r} cannot keep its lists on disk: use an IVF factory without "
                         "fast-scan codes or a refine stage, e.g. IVF4096,Flat, IVF4096,PQ64 or IVF4096,SQ8")


def _lock_scratch(scratch: Path) -> int:
    """Mark a scratch folder as in use: an exclusive flock on its lock file, which the OS drops when
    this process ends, however it ends. Returns the lock's descriptor (closing it unlocks)."""
    fd = os.open(scratch / SCRATCH_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _clear_stale_scratch(parent: Path) -> None:
    """Remove the scratch folders that killed on-disk builds left in `parent` (their blocks and
    half-merged lists: as big as the index, and nothing else removes them): those whose lock no
    live build holds. One without a lock file (an older lrem's) is left alone."""
    for folder in parent.glob(SCRATCH_PREFIX + "*"):
        try:
            fd = os.open(folder / SCRATCH_LOCK, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a build in progress (another process) holds it
            os.close(fd)
            continue
        try:
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            os.close(fd)


def is_index_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / INDEX_FILE).exists()


def _train_or_raise(index: faiss.Index, x: np.ndarray, factory: str) -> None:
    try:
        index.train(np.ascontiguousarray(x, dtype=np.float32))
    except RuntimeError as e:
        raise ValueError(f"cannot train FAISS index {factory!r} on {x.shape[0]} sampled vectors: "
                         f"{_faiss_message(e)}") from e


def open_index(spec: str | os.PathLike, mmap: bool = True):
    """An index folder (`ItemIndex.load`, `mmap` as there) or a vector database collection,
    `milvus:URI/COLLECTION` (`lrem.vectordb.MilvusIndex`): both give `search(q, k) -> (scores,
    ids)`, `meta` and `title`."""
    from .vectordb import MilvusIndex, is_milvus_spec

    return MilvusIndex.open(str(spec)) if is_milvus_spec(str(spec)) else ItemIndex.load(spec, mmap=mmap)
