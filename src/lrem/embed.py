"""Sharded, resumable catalog encoding: the catalog's item vectors as a folder of Parquet chunks.

    lrem embed --data data/wordnet --model M --out runs/chunks --chunk-size 4096
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m lrem.cli embed ...   # 2 CPU processes or GPUs
    lrem index --from-chunks runs/chunks --out runs/idx [--factory "HNSW32,Flat"]
    lrem index --from-chunks runs/chunks --backend milvus:runs/items.db/wordnet

The catalog (in its file order) is cut into fixed-size chunks; chunk c holds rows
[c * chunk_size, (c + 1) * chunk_size). Rank r of a world of W processes encodes the chunks with
c % W == r, one at a time, and writes each one atomically (temp file, then rename), so a process
holds one chunk of vectors at most, and a killed run, rerun with the same command (any number of
processes), encodes only the chunks that are missing. A chunk is encoded by the same
`LREM.encode_items` call whatever W is, so 1 and N processes write the same vectors.

The folder (docs/chunks.md):
    embed.json               manifest: format, model, dim, n_items, chunk_size, n_chunks, vector_dtype, ...
    chunks/chunk-000012.parquet   columns item_id (string), title (string),
                             vector (fixed_size_list<float32 or float16>[dim], unit length);
                             schema metadata "lrem": the run it belongs to (`chunk_pin`)
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ._defaults import CHUNK_SIZE, ITEM_BATCH, VECTOR_DTYPE
from ._io import atomic_write, write_json
from .index_base import (FILTER_FIELDS, MODEL_KEYS, catalog_items, check_embeddings, item_digest, item_facets,
                         model_identity)

MANIFEST = "embed.json"
CHUNKS = "chunks"
FORMAT = "lrem-chunks"
VERSION = 1
DIGEST = "digest"  # optional column: `lrem.index_base.item_digest` per item (what `--update` compares)
VECTOR_DTYPES = ("float32", "float16")
# what must agree between the run that started a folder and the one that resumes it. The model is
# its weights' fingerprint, not the name it was loaded by (`./m`, `m/` and a copy on another node
# are one model); the name is compared only where a manifest has no fingerprint.
_SAME_ON_RESUME = (*(k for k in MODEL_KEYS if k != "model"), "n_items", "catalog_sha1", "items_sha1", "chunk_size",
                   "vector_dtype")
_SINCE = ("items_sha1",)  # keys a folder of an older lrem lacks: compared where its manifest has them
PIN = b"lrem"  # a chunk's Parquet metadata key: the run it belongs to


def chunk_name(c: int) -> str:
    return f"chunk-{c:06d}.parquet"


def catalog_fingerprint(item_ids: list[str]) -> str:
    """sha1 of the item ids in catalog order: a resumed run must cut the same catalog the same way."""
    h = hashlib.sha1()
    for i in item_ids:
        h.update(i.encode("utf-8") + b"\n")
    return h.hexdigest()


def items_fingerprint(digests: list[str]) -> str:
    """sha1 of the items' `lrem.index_base.item_digest`s in catalog order: what was embedded (the filled
    item template), so a catalog whose titles changed under the same ids is not resumed into."""
    return catalog_fingerprint(digests)


def chunk_pin(manifest: dict, c: int) -> dict:
    """What ties chunk c to its run: the manifest's `_SAME_ON_RESUME` values and c. Kept in the
    chunk's Parquet metadata, so a chunk another run wrote (another model, catalog or chunking:
    a folder whose embed.json was deleted or replaced, a file copied in) is embedded again on
    resume and refused by `iter_chunks`, never mixed in."""
    return {**{k: manifest.get(k) for k in _SAME_ON_RESUME}, "chunk": c}


def read_pin(path: str | os.PathLike) -> dict | None:
    """A chunk's pin (`chunk_pin`), or None where it has none (written by an older lrem)."""
    import pyarrow.parquet as pq

    return _pin_of(pq.read_metadata(path))


def _pin_of(metadata) -> dict | None:
    """The pin in a chunk's Parquet file metadata (`read_pin`)."""
    raw = (metadata.metadata or {}).get(PIN)
    try:
        pin = json.loads(raw) if raw is not None else None
    except ValueError:
        return {}  # unreadable: matches no run
    return pin if isinstance(pin, dict) or pin is None else {}


def pin_mismatch(pin: dict | None, want: dict) -> str | None:
    """The first field where a chunk's pin differs from its run's (None: it matches, or the chunk
    has no pin)."""
    if pin is None:
        return None
    return next((k for k in want if pin.get(k) != want[k]), None)


def shard(n_chunks: int, rank: int, world: int) -> list[int]:
    """The chunks rank `rank` of `world` processes encodes: c % world == rank.

    >>> shard(5, 0, 2), shard(5, 1, 2)
    ([0, 2, 4], [1, 3])
    """
    return list(range(rank, n_chunks, world))


def read_manifest(folder: str | os.PathLike) -> dict:
    """The manifest of a chunk folder; a DataError names the file and field when it is not one."""
    from .data import DataError

    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not an lrem chunk folder (no {MANIFEST}); write one with `lrem embed`")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:
        raise DataError(path, None, None, f"malformed JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(path, None, "format", f"expected {FORMAT!r}")
    for name in ("dim", "n_items", "chunk_size", "n_chunks"):
        if isinstance(meta.get(name), bool) or not isinstance(meta.get(name), int) or meta[name] < 0:
            raise DataError(path, None, name, f"expected an integer >= 0, got {meta.get(name)!r}")
    if meta.get("vector_dtype") not in VECTOR_DTYPES:
        raise DataError(path, None, "vector_dtype", f"expected one of {VECTOR_DTYPES}, got {meta.get('vector_dtype')!r}")
    return meta


def start_manifest(folder: Path, meta: dict) -> dict:
    """Write the manifest of a new run, or check that an earlier run's matches (resume)."""
    old = check_manifest(folder, meta)
    if old is not None:
        return old
    write_json(folder / MANIFEST, meta)
    return meta


def check_manifest(folder: Path, meta: dict) -> dict | None:
    """The earlier run's manifest where there is one (None: a new folder); a DataError where it does
    not match `meta` (another model, catalog or chunking)."""
    from .data import DataError

    path = folder / MANIFEST
    if path.exists():
        old = read_manifest(folder)
        names = [n for n in _SAME_ON_RESUME if n in old or n not in _SINCE]
        if old.get("model_fingerprint") is None:
            names.insert(0, "model")
        for name in names:
            if old.get(name) != meta.get(name):
                what = ("the items' text changed since the earlier run (the same ids, other titles or fields)"
                        if name == "items_sha1" else f"{old.get(name)!r} in the earlier run, {meta.get(name)!r} now")
                raise DataError(path, None, name, f"{what}; resume with the same model, catalog and chunking, or use "
                                "a new --out")
        return old
    return None


@dataclass
class EmbedStats:
    """What one process did: chunks encoded and skipped (already written by an earlier run)."""

    rank: int
    world: int
    encoded: list[int]
    skipped: list[int]
    items: int
    seconds: float
    stopped: bool  # stopped by max_chunks before its shard was done

    @property
    def items_per_second(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else 0.0


def write_chunk(path: Path, ids: list[str], titles: list[str], vectors: np.ndarray, digests: list[str] | None = None,
                facets: dict[str, list] | None = None, pin: dict | None = None) -> None:
    """One chunk as Parquet (item_id, title, vector; and, where given, each item's digest and its
    filter fields: `lrem.index_base.item_digest`, `item_facets`; its run's `chunk_pin`), atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    dim = vectors.shape[1]
    columns = {"item_id": pa.array(ids, pa.string()), "title": pa.array(titles, pa.string()),
               "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)}
    if digests is not None:
        columns[DIGEST] = pa.array(digests, pa.string())
    columns.update({name: pa.array(values, pa.string()) for name, values in (facets or {}).items()})
    table = pa.table(columns)
    if pin is not None:
        table = table.replace_schema_metadata({PIN: json.dumps(pin)})
    with atomic_write(path, "wb") as f:
        pq.write_table(table, f)


def read_chunk_fields(path: str | os.PathLike) -> tuple[list[str] | None, dict[str, list]]:
    """(digests or None, {filter field: values}) of one chunk: the optional columns, where the
    chunk has them (chunks of an older lrem have neither)."""
    import pyarrow.parquet as pq

    have = set(pq.read_schema(path).names)
    wanted = [c for c in (DIGEST, *FILTER_FIELDS) if c in have]
    table = pq.read_table(path, columns=wanted) if wanted else None
    digests = table.column(DIGEST).to_pylist() if DIGEST in wanted else None
    return digests, {c: table.column(c).to_pylist() for c in wanted if c != DIGEST}


def chunk_fields(folder: str | os.PathLike) -> tuple[list[str] | None, dict[str, list]]:
    """The digests (None unless every chunk has them) and filter fields (None where a chunk lacks
    one) of a whole chunk folder, in catalog order: what `ItemIndex.from_chunks` keeps."""
    files = chunk_files(folder)
    digests: list | None = []
    columns: dict[str, list] = {f: [] for f in FILTER_FIELDS}
    for f in files:
        n = _rows(f)
        d, facets = read_chunk_fields(f)
        digests = None if digests is None or d is None else digests + d
        for name in FILTER_FIELDS:
            columns[name] += facets.get(name) or [None] * n
    return digests, {name: c for name, c in columns.items() if any(v is not None for v in c)}


def _chunk_ok(path: Path, n: int, pin: dict) -> bool:
    """Whether a chunk file is there whole (its Parquet footer readable, n rows) and of this run
    (`chunk_pin`): a copy cut short or damaged outside lrem, or a chunk another run wrote, is
    embedded again (lrem's own writes are atomic)."""
    import pyarrow.parquet as pq

    try:
        if not path.is_file():
            return False
        metadata = pq.read_metadata(path)  # the footer once: its rows and its pin
        return metadata.num_rows == n and pin_mismatch(_pin_of(metadata), pin) is None
    except Exception:  # noqa: BLE001 - pyarrow's errors for a bad footer vary (ArrowInvalid, OSError)
        return False


def _rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.read_metadata(path).num_rows


def read_chunk(path: str | os.PathLike, dim: int | None = None) -> tuple[list[str], list[str], np.ndarray]:
    """(item ids, titles, vectors (n, dim) float32, unit length) of one chunk; a DataError names
    the file when it is not one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .data import DataError

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(path, None, None, f"not a readable Parquet chunk ({e})") from None
    for name in ("item_id", "title", "vector"):
        if name not in table.column_names:
            raise DataError(path, None, name, "missing column")
    vec = table.column("vector").combine_chunks()
    if not pa.types.is_fixed_size_list(vec.type) or (dim is not None and vec.type.list_size != dim):
        raise DataError(path, None, "vector", f"expected fixed_size_list[{dim}], got {vec.type}")
    x = vec.values.to_numpy(zero_copy_only=False).reshape(len(vec), vec.type.list_size)
    if x.dtype != np.float32:  # float16 chunks: back to unit length in float32
        x = x.astype(np.float32)
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return table.column("item_id").to_pylist(), table.column("title").to_pylist(), x


def chunk_files(folder: str | os.PathLike, meta: dict | None = None) -> list[Path]:
    """The chunk files of a complete folder, in catalog order; a ValueError names the missing ones."""
    folder = Path(folder)
    meta = meta or read_manifest(folder)
    files = [folder / CHUNKS / chunk_name(c) for c in range(meta["n_chunks"])]
    missing = [c for c, f in enumerate(files) if not f.is_file()]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise ValueError(f"{folder}: {len(missing)} of {meta['n_chunks']} chunks missing ({shown}); "
                         "rerun the same `lrem embed` command to finish it")
    return files


def iter_chunks(folder: str | os.PathLike, show_progress: bool = True) -> Iterator[tuple[list[str], list[str], np.ndarray]]:
    """(ids, titles, vectors) per chunk, in catalog order, one chunk in memory at a time; each
    checked against the manifest (its run's pin, rows, dim, finite unit vectors)."""
    from tqdm.auto import tqdm

    from .data import DataError

    meta = read_manifest(folder)
    for c, f in enumerate(tqdm(chunk_files(folder, meta), desc="chunks", unit="chunk", disable=not show_progress)):
        ids, titles, x = read_chunk(f, meta["dim"])
        pin = read_pin(f)
        field = pin_mismatch(pin, chunk_pin(meta, c))
        if field is not None:
            raise DataError(f, None, field, f"{pin.get(field)!r}, but {MANIFEST} has {chunk_pin(meta, c)[field]!r}: "
                            "another run wrote this chunk; rerun `lrem embed` into this folder to embed it again")
        want = min(meta["chunk_size"], meta["n_items"] - c * meta["chunk_size"])
        if len(ids) != want:
            raise DataError(f, None, None, f"{len(ids)} rows; expected {want} (chunk {c} of {meta['n_items']} items "
                            f"in chunks of {meta['chunk_size']})")
        try:
            check_embeddings(x, len(ids), meta["dim"])
        except ValueError as e:
            raise DataError(f, None, "vector", str(e)) from None
        yield ids, titles, x


def check_chunk_folder(out: Path) -> None:
    """Refuse an `out` that holds another command's lrem output (an index, a model): chunks are
    never mixed into it. Its own files: the manifest, the chunks, the marker and temp files."""
    from ._io import OutputError

    other = sorted(p.name for p in Path(out).iterdir() if p.name[:1] != "." and p.name not in (MANIFEST, CHUNKS)) \
        if Path(out).is_dir() else []
    if other:
        raise OutputError(f"--out {out}: holds {', '.join(other[:3])}, not a chunk folder of `lrem embed`; "
                          "choose a new folder")


def embed_catalog(model, catalog: dict, out: str | os.PathLike, chunk_size: int = CHUNK_SIZE, rank: int = 0,
                  world: int = 1, vector_dtype: str = VECTOR_DTYPE, batch_size: int = ITEM_BATCH,
                  max_chunks: int | None = None,
                  truncate: bool = True, show_progress: bool = True, barrier=None, **meta) -> EmbedStats:
    """Encode this rank's shard of `catalog` (item_id -> title / Item) into `out`, chunk by chunk.

    `out` must be an lrem output folder (see `lrem._io.claim_dir`) or new. Rank 0 writes (or, on
    resume, checks) the manifest; `barrier()` (all ranks) runs after that and at the end. Chunks
    already in `out/chunks` are skipped. `max_chunks`: stop after encoding that many (per process).
    """
    from tqdm.auto import tqdm

    from ._io import claim_dir

    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}; must be >= 1")
    if vector_dtype not in VECTOR_DTYPES:
        raise ValueError(f"vector_dtype={vector_dtype!r}; expected one of {VECTOR_DTYPES}")
    barrier = barrier or (lambda: None)
    out = Path(out)
    check_chunk_folder(out)
    ids, items = catalog_items(catalog)
    titles = [x if isinstance(x, str) else (x.get("title") if isinstance(x, dict) else x.title) for x in items]
    n_chunks = -(-len(ids) // chunk_size)
    digests = [item_digest(model, x) for x in items]
    manifest = {"format": FORMAT, "version": VERSION, **model_identity(model), "n_items": len(ids),
                "catalog_sha1": catalog_fingerprint(ids), "items_sha1": items_fingerprint(digests),
                "chunk_size": chunk_size, "n_chunks": n_chunks, "vector_dtype": vector_dtype, **meta}
    if rank != 0:
        # a resume with other settings: every rank stops here with rank 0's error, rather than
        # waiting at the barrier for a rank that has exited (a gloo/NCCL error and a traceback)
        check_manifest(out, manifest)
    else:
        claim_dir(out, files=(CHUNKS, MANIFEST))  # recorded before they are written (`lrem._io.record_files`)
        (out / CHUNKS).mkdir(exist_ok=True)
        start_manifest(out, manifest)
    barrier()
    run = check_manifest(out, manifest)  # every rank: the manifest in force (the earlier run's on resume)
    mine = shard(n_chunks, rank, world)
    done = [c for c in mine if _chunk_ok(out / CHUNKS / chunk_name(c), min(chunk_size, len(ids) - c * chunk_size),
                                         chunk_pin(run, c))]
    todo = [c for c in mine if c not in set(done)][:max_chunks]
    t0, n = time.perf_counter(), 0
    bar = tqdm(todo, desc=f"rank {rank} chunks" if world > 1 else "chunks", unit="chunk", disable=not show_progress,
               position=rank if world > 1 else None)
    for c in bar:
        for stale in (out / CHUNKS).glob(f".{chunk_name(c)}.*.tmp"):  # a temp file a killed run left
            stale.unlink(missing_ok=True)
        lo, hi = c * chunk_size, min((c + 1) * chunk_size, len(ids))
        emb = model.encode_items(items[lo:hi], batch_size=batch_size, truncate=truncate)  # (hi - lo, dim) float32
        write_chunk(out / CHUNKS / chunk_name(c), ids[lo:hi], titles[lo:hi], emb.astype(vector_dtype),
                    digests[lo:hi], item_facets(items[lo:hi]), chunk_pin(run, c))
        n += hi - lo
    seconds = time.perf_counter() - t0
    stats = EmbedStats(rank, world, todo, done, n, seconds, stopped=len(done) + len(todo) < len(mine))
    barrier()
    if rank == 0:
        present = sum((out / CHUNKS / chunk_name(c)).is_file() for c in range(n_chunks))
        if present == n_chunks and not json.loads((out / MANIFEST).read_text()).get("complete"):
            write_json(out / MANIFEST, {**read_manifest(out), "complete": True})
    return stats
