"""Item index: FAISS over the catalog's `<emb>` embeddings, described by an `index_factory` string.

    from lrem.index import ItemIndex
    idx = ItemIndex.build(model, {"03109150-n": "corkscrew, bottle screw", ...}, factory="HNSW32,Flat")
    idx.save("runs/idx")                       # index.faiss + items.jsonl + meta.json
    idx = ItemIndex.load("runs/idx")
    scores, ids = idx.search(query_embeddings, k=10)

Embeddings are L2-normalised, so inner product (the metric used) is cosine similarity.
"Flat" is exact; "HNSW32,Flat" or "IVF1024,PQ64" trade recall for speed and memory at scale, and
search-time knobs go through `search_params` ("efSearch=128", "nprobe=32").
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from ._io import atomic_dir, write_json, write_jsonl

INDEX_FILE, ITEMS_FILE, META_FILE = "index.faiss", "items.jsonl", "meta.json"


def build_index(emb: np.ndarray, factory: str = "Flat", search_params: str = "") -> faiss.Index:
    """A FAISS inner-product index over `emb` (n, dim) float32, trained first if it needs it.

    Raises a ValueError naming the factory string when FAISS cannot build or train it (e.g.
    "IVF4096" with fewer vectors than lists).
    """
    emb = np.ascontiguousarray(emb, dtype=np.float32)  # (n, dim)
    try:
        index = faiss.index_factory(emb.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            index.train(emb)
        index.add(emb)
    except RuntimeError as e:
        raise ValueError(f"cannot build FAISS index {factory!r} on {emb.shape[0]} x {emb.shape[1]}: {e}") from e
    if search_params:
        set_search_params(index, search_params)
    return index


def set_search_params(index: faiss.Index, params: str) -> None:
    """Apply "name=value,name=value" search-time parameters (nprobe, efSearch, ...)."""
    ps = faiss.ParameterSpace()
    for kv in filter(None, (p.strip() for p in params.split(","))):
        name, _, value = kv.partition("=")
        try:
            ps.set_index_parameter(index, name, float(value))
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"bad FAISS search parameter {kv!r}: {e}") from e


@dataclass
class ItemIndex:
    """A FAISS index plus what is needed to use it: item ids, titles, and how it was built."""

    index: faiss.Index
    item_ids: list[str]
    titles: list[str]
    meta: dict = field(default_factory=dict)  # model, factory, dim, n_items, seconds, ...

    @classmethod
    def from_embeddings(cls, emb, item_ids, titles, factory="Flat", search_params="", **meta) -> "ItemIndex":
        if len(item_ids) != emb.shape[0] or len(titles) != emb.shape[0]:
            raise ValueError(f"{emb.shape[0]} embeddings for {len(item_ids)} ids and {len(titles)} titles")
        index = build_index(emb, factory, search_params)
        meta = {"factory": factory, "search_params": search_params, "dim": int(emb.shape[1]),
                "n_items": int(emb.shape[0]), **meta}
        return cls(index, list(item_ids), list(titles), meta)

    @classmethod
    def build(cls, model, catalog: dict, factory="Flat", search_params="", batch_size=64,
              show_progress=True, truncate: bool = True, **meta) -> "ItemIndex":
        """Embed `catalog` (item_id -> title, or -> `lrem.data.Item` / mapping, whose fields the
        model's item template may name) with `model.encode_items` and index it. `truncate`: item
        texts over the model's `max_item_tokens` are cut (their count is `meta["truncated_items"]`)
        or an error."""
        ids, items = list(catalog), list(catalog.values())
        titles = [x if isinstance(x, str) else (x.get("title") if isinstance(x, dict) else x.title) for x in items]
        t0 = time.perf_counter()
        cut = model.truncated["item"]
        emb = model.encode_items(items, batch_size=batch_size, show_progress=show_progress, truncate=truncate)
        seconds = time.perf_counter() - t0
        return cls.from_embeddings(emb, ids, titles, factory, search_params, model=getattr(model, "source", ""),
                                   encode_seconds=round(seconds, 3), truncated_items=model.truncated["item"] - cut,
                                   item_template=model.config.item_template, **meta)

    def search(self, q: np.ndarray, k: int = 10) -> tuple[np.ndarray, list[list[str]]]:
        """Top-k (scores (n, k'), item ids) for query embeddings q (n, dim); k' = min(k, n_items)."""
        k = min(k, len(self.item_ids))
        scores, idx = self.index.search(np.ascontiguousarray(q, dtype=np.float32), k)  # (n, k) each
        ids = [[self.item_ids[j] for j in row if j >= 0] for row in idx]
        return scores, ids

    def title(self, item_id: str) -> str:
        if not hasattr(self, "_pos"):
            self._pos = {i: n for n, i in enumerate(self.item_ids)}
        return self.titles[self._pos[item_id]]

    def save(self, out: str | os.PathLike) -> None:
        """Write `index.faiss`, `items.jsonl` and `meta.json` into `out`, atomically."""
        with atomic_dir(out) as tmp:
            faiss.write_index(self.index, str(tmp / INDEX_FILE))
            write_jsonl(tmp / ITEMS_FILE, ({"item_id": i, "title": t} for i, t in zip(self.item_ids, self.titles)))
            write_json(tmp / META_FILE, self.meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ItemIndex":
        path = Path(path)
        missing = [f for f in (INDEX_FILE, ITEMS_FILE, META_FILE) if not (path / f).exists()]
        if missing:
            raise FileNotFoundError(f"{path} is not an lrem index (missing {', '.join(missing)}); build one with `lrem index`")
        index = read_index(path / INDEX_FILE)
        rows = [json.loads(line) for line in (path / ITEMS_FILE).read_text(encoding="utf-8").splitlines() if line]
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        if index.ntotal != len(rows):
            raise ValueError(f"{path}: index has {index.ntotal} vectors but {ITEMS_FILE} has {len(rows)} items")
        out = cls(index, [r["item_id"] for r in rows], [r["title"] for r in rows], meta)
        if meta.get("search_params"):
            set_search_params(index, meta["search_params"])
        return out


def read_index(file: str | os.PathLike) -> faiss.Index:
    """Read a FAISS index memory-mapped where its type allows (the codes stay in the page cache,
    shared between processes, instead of being copied at every start), else read into memory."""
    try:
        return faiss.read_index(str(file), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:  # an index type whose reader has no mmap path
        return faiss.read_index(str(file))


def is_index_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / INDEX_FILE).exists()
