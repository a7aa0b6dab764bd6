"""A Milvus collection as an lrem item index, through pymilvus (`pip install "lrem[milvus]"`).

    lrem index --data data/wordnet --backend milvus:runs/items.db/wordnet          # Milvus Lite, a local folder
    lrem index --from-chunks runs/chunks --backend milvus:http://10.0.0.5:19530/wordnet   # a Milvus server
    lrem search --index milvus:runs/items.db/wordnet "a device for pulling corks"

    from lrem.vectordb import MilvusIndex
    idx = MilvusIndex.open("milvus:runs/items.db/wordnet")
    scores, ids = idx.search(query_embeddings, k=10)      # the contract of lrem.index.ItemIndex

The spec is `milvus:URI/COLLECTION`: URI a Milvus Lite path (`*.db`, a folder Milvus Lite
creates; same process, no server) or `http://host:port` of a Milvus server or cluster (the same
code). The collection has `item_id` (VARCHAR primary key), `title`, `vector` (FLOAT_VECTOR, inner
product on unit vectors = cosine) and the filter fields `category`, `brand` and `color` (nullable
VARCHARs, `lrem.index_base.FILTER_FIELDS`; `search(q, k, where=...)` turns a filter into a Milvus
boolean expression, so Milvus filters inside its own search), and the index metadata (model, dim, item template, ...) as
the collection property `lrem.meta` (JSON), from which `lrem search` / `serve` / `eval` load
the model as they do from an index folder's meta.json. Uploads are batched, resumable and
idempotent: each batch asks which of its ids the collection holds, and upserts (by primary key)
only the others, so a killed upload rerun writes each item once. A complete collection is never
uploaded to again (`update` brings it up to date; `overwrite` replaces it), and an unfinished
one only by the same catalog (its `catalog_digest`, of the ids and item digests, is kept).
`upload_catalog` (a catalog, embedded here) and `upload_chunks` (the chunks of `lrem embed`)
make `upload`'s batches; `check_upload` and `check_update` refuse before a model loads.

Ids are looked up and deleted through filter expressions this module writes (`milvus_string`:
any string, quotes, backslashes and control characters included). Credentials in a URI
(`http://user:password@host`) never appear in a message (`redact`).
"""
from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Sequence
from typing import Callable, Iterable, Iterator

import numpy as np

from ._defaults import ITEM_BATCH, UPLOAD_BATCH
from .embed import catalog_fingerprint, chunk_files, iter_chunks, read_chunk_fields, read_manifest
from .index_base import (FILTER_FIELDS, MODEL_KEYS, catalog_items, check_filter, fill_missing, item_digest, item_facets,
                         item_title, ivf_lists, model_identity, unchanged_items)

PREFIX = "milvus:"
META_PROPERTY = "lrem.meta"
MAX_ID, MAX_TITLE, MAX_FACET = 512, 65535, 1024  # VARCHAR lengths (bytes); 65535 is Milvus's limit
DIGEST = "digest"  # per item, `lrem.index_base.item_digest` of what was embedded: what `update` compares
MILVUS_INDEXES = ("FLAT", "HNSW", "IVF_FLAT", "AUTOINDEX")  # the types Milvus Lite and servers both know
# the parameters `--milvus-params` takes per index type: "build" (creating the index) or "search" (each query)
MILVUS_PARAMS = {"FLAT": {}, "AUTOINDEX": {}, "IVF_FLAT": {"nlist": "build", "nprobe": "search"},
                 "HNSW": {"M": "build", "efConstruction": "build", "ef": "search"}}
IVF_NPROBE = 256  # IVF_FLAT's default lists probed (all where there are fewer; README: recall)
CATALOG = "catalog_digest"  # meta: `catalog_digest` of the catalog an upload writes (same catalog, resume)
QUERY_IDS = 1000  # ids per lookup / delete expression
_COLLECTION = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")


def is_milvus_spec(spec) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def parse_spec(spec: str) -> tuple[str, str]:
    """"milvus:URI/COLLECTION" -> (URI, COLLECTION); a ValueError says what is wrong.

    >>> parse_spec("milvus:runs/items.db/wordnet")
    ('runs/items.db', 'wordnet')
    >>> parse_spec("milvus:http://127.0.0.1:19530/wordnet")
    ('http://127.0.0.1:19530', 'wordnet')
    """
    if not is_milvus_spec(spec):
        raise ValueError(f"{redact(spec)!r}: expected milvus:URI/COLLECTION")
    uri, sep, name = spec[len(PREFIX):].rpartition("/")
    uri = re.sub(r"^(https?|tcp|unix):/(?=[^/])", r"\1://", uri)  # a shell path or pathlib folded "//"
    if not sep or not uri or not _COLLECTION.fullmatch(name):
        raise ValueError(f"{redact(spec)!r}: expected milvus:URI/COLLECTION, COLLECTION of letters, digits and _ "
                         "(not starting with a digit), URI a Milvus Lite path (*.db) or http://host:port")
    if not re.match(r"^(https?|tcp)://", uri) and not uri.endswith(".db"):
        raise ValueError(f"{redact(spec)!r}: URI {redact(uri)!r} is neither http://host:port nor a Milvus Lite path ending in .db")
    return uri, name


def redact(text: str) -> str:
    """`text` with the password of any URI in it (scheme://user:password@host) replaced by ***.

    >>> redact("milvus:http://root:S3cret@10.0.0.5:19530/items")
    'milvus:http://root:***@10.0.0.5:19530/items'
    >>> redact("cannot reach https://u:p@ss@host/x and tcp://h:1")
    'cannot reach https://u:***@host/x and tcp://h:1'
    """
    return re.sub(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s/:@]*):[^\s/]*@", r"\1:***@", str(text))


def milvus_string(value: str) -> str:
    r"""A Milvus expression string literal holding exactly `value`: double-quoted, with backslash,
    double quote, newline, carriage return and tab escaped and every other character as it is
    (Milvus's parser knows no \u escapes, so JSON's would not do).

    >>> print(milvus_string('it\'s "q" back\\slash'))
    "it's \"q\" back\\slash"
    """
    return '"' + str(value).translate(_ESCAPES) + '"'


_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"})


def in_filter(field: str, values: Iterable[str]) -> str:
    """The Milvus expression matching rows whose `field` is one of `values`: `brand in ["a", "b"]`."""
    return f"{field} in [{', '.join(milvus_string(v) for v in values)}]"


def ids_filter(ids: Iterable[str]) -> str:
    """The Milvus expression matching these item ids: `item_id in ["a", "b"]`."""
    return in_filter("item_id", ids)


def catalog_digest(ids_sha1: str, digests: Iterable[str | None] | None) -> str:
    """A fingerprint of a catalog: `lrem.embed.catalog_fingerprint` of its ids (in order) and the
    items' `lrem.index_base.item_digest`s (None: not known, as in chunks of an older lrem). Kept in a
    collection's meta, so a rerun finishes an unfinished upload only of the same catalog."""
    import hashlib

    h = hashlib.sha1(ids_sha1.encode() + b"\n")
    h.update(b"-" if digests is None else "\n".join(d or "" for d in digests).encode())
    return h.hexdigest()


def parse_params(text: str, index_type: str | None = None) -> dict[str, int]:
    """ "nlist=1024,nprobe=64" -> {"nlist": 1024, "nprobe": 64}, the keys `index_type` takes
    (MILVUS_PARAMS; None: any type's, as for an existing collection, whose own type decides),
    positive integers; a ValueError says what is wrong.

    >>> parse_params("nlist=256, nprobe=32", "IVF_FLAT")
    {'nlist': 256, 'nprobe': 32}
    """
    known = MILVUS_PARAMS.get(index_type, {}) if index_type else {k: 0 for p in MILVUS_PARAMS.values() for k in p}
    out = {}
    for kv in filter(None, (p.strip() for p in (text or "").split(","))):
        name, _, value = (x.strip() for x in kv.partition("="))
        if name not in known:
            raise ValueError(f"milvus parameter {name!r} for {index_type or 'any index'}; expected "
                             + (", ".join(known) if known else f"none ({index_type} has no parameters)"))
        if not re.fullmatch(r"[0-9]+", value) or int(value) < 1:
            raise ValueError(f"milvus parameter {kv!r}: expected {name}=a positive integer")
        out[name] = int(value)
    return out


def default_params(index_type: str, n_items: int | None, given: dict | None = None) -> dict[str, int]:
    """The parameters a new index gets: `given`, and for IVF_FLAT nlist ~4 sqrt(n) (FAISS's
    guideline, `lrem.index_base.ivf_lists`) and nprobe min(nlist, IVF_NPROBE) where not given."""
    out = dict(given or {})
    if index_type == "IVF_FLAT":
        out.setdefault("nlist", min(65536, ivf_lists(n_items or 0)))
        out.setdefault("nprobe", min(out["nlist"], IVF_NPROBE))
    return out


def search_params(meta: dict, k: int) -> dict:
    """The search parameters of a collection's index (its meta's `milvus_params`) for a top-k."""
    kinds = MILVUS_PARAMS.get(meta.get("milvus_index"), {})
    params = {n: v for n, v in (meta.get("milvus_params") or {}).items() if kinds.get(n) == "search"}
    if "ef" in params:
        params["ef"] = max(params["ef"], k)  # HNSW's ef is at least k
    return {"metric_type": "IP", **({"params": params} if params else {})}


def index_type_of(client, name: str) -> str | None:
    """The index type of a collection's vector field, as Milvus reports it (None: no index)."""
    names = client.list_indexes(name, field_name="vector") or client.list_indexes(name)
    return client.describe_index(name, names[0]).get("index_type") if names else None


LOCAL_OPEN_WAIT_S = 20.0  # Milvus Lite: how long to wait for another process to let go of a .db folder


def connect(uri: str, wait_s: float = LOCAL_OPEN_WAIT_S):
    """A pymilvus client; a clear error where pymilvus is missing or the server is unreachable.

    A Milvus Lite folder (a local path) is held by one process at a time, and the server of a
    command that just ended can hold it a moment longer: its opening is retried for `wait_s`."""
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise ValueError('the Milvus backend needs pymilvus and milvus-lite: pip install "lrem[milvus]"') from None
    local = "://" not in uri
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return MilvusClient(uri)
        except Exception as e:  # pymilvus raises its own MilvusException, a gRPC error or a timeout
            if local and "Open local milvus failed" in str(e) and time.monotonic() < deadline:
                time.sleep(0.5)
                continue
            held = " (another process may hold this Milvus Lite folder)" if local else ""
            raise ValueError(f"cannot connect to Milvus at {redact(uri)}{held}: "
                             f"{redact(' '.join(str(e).split()))[:300]}") from None


@contextlib.contextmanager
def milvus_errors(spec: str):
    """Milvus's own errors (a refused request, a server gone) as one-line ValueErrors naming the spec."""
    from pymilvus.exceptions import MilvusException

    try:
        yield
    except MilvusException as e:
        raise ValueError(f"{redact(spec)}: Milvus: {redact(' '.join(str(e).split()))[:300]}") from e


def read_meta(client, name: str, spec: str) -> dict | None:
    """The lrem metadata of a collection; None where it does not exist; a ValueError where it
    exists but lrem did not create it."""
    if not client.has_collection(name):
        return None
    props = client.describe_collection(name).get("properties", {}) or {}
    try:
        meta = json.loads(props[META_PROPERTY])
        assert isinstance(meta, dict)
    except (KeyError, ValueError, AssertionError):
        raise ValueError(f"{redact(spec)}: collection {name!r} was not created by lrem (no valid {META_PROPERTY} "
                         "property); choose another collection name") from None
    return meta


def complete_message(spec: str, meta: dict) -> str:
    """Why an upload to a complete collection is refused (`lrem index --backend` without --update)."""
    return (f"{redact(spec)}: the collection holds a complete index ({meta.get('n_items')} items of "
            f"{meta.get('dataset')}); pass --update to bring it up to date with this catalog, or --overwrite to "
            "replace it")


def check_upload(spec: str, overwrite: bool = False) -> None:
    """Refuse now (before a model loads) an upload `MilvusWriter` would refuse: to a complete
    collection, without `overwrite`."""
    if overwrite:
        return
    uri, name = parse_spec(spec)
    client = connect(uri)
    with milvus_errors(spec):
        old = read_meta(client, name, spec)
        client.close()
    if old is not None and old.get("complete"):
        raise ValueError(complete_message(spec, old))


def check_update(spec: str) -> dict:
    """The metadata of the collection an `update` brings up to date, read before a model loads (it
    names the model, and the dtype its items were embedded in); a ValueError where there is none."""
    uri, name = parse_spec(spec)
    with milvus_errors(spec):
        old = read_meta(connect(uri), name, spec)
    if old is None:
        raise ValueError(f"{redact(spec)}: no collection to update; create it with `lrem index --data ... "
                         f"--backend {redact(spec)}`")
    return old


class MilvusWriter:
    """Create (or reopen, to resume or update) an lrem collection and upsert items in batches.

    `index_type` / `index_params` (`parse_params`): the new collection's index, FLAT and the
    `default_params` where not given; an existing collection keeps its own, and asking for
    another (type or parameter) is refused: rebuilding is `overwrite`. `n_items`: the catalog's
    size (IVF_FLAT's default nlist). An existing collection is reopened only to finish its
    upload of the same catalog (`meta[CATALOG]`, where both have one) or, with `updating`, to
    update it; a complete one otherwise is refused."""

    def __init__(self, spec: str, meta: dict, overwrite: bool = False, index_type: str | None = None,
                 index_params: dict | None = None, n_items: int | None = None, updating: bool = False):
        from pymilvus import DataType

        if index_type is not None and index_type not in MILVUS_INDEXES:
            raise ValueError(f"milvus index type {index_type!r}; expected one of {', '.join(MILVUS_INDEXES)}")
        self.spec = spec
        self.shown = shown = redact(spec)  # what messages name: no password
        self.uri, self.name = parse_spec(spec)
        self.client = connect(self.uri)
        old = read_meta(self.client, self.name, spec)
        if old is not None and overwrite:
            self.client.drop_collection(self.name)  # lrem's own (read_meta checked), as --overwrite asks
            old = None
        if old is not None:
            # the weights by their fingerprint where both record one: the same model under another
            # path or name ("m", "./m", a copied folder) is the same model
            fingerprinted = bool(old.get("model_fingerprint") and meta.get("model_fingerprint"))
            for key in MODEL_KEYS:
                if old.get(key) != meta.get(key) and not (key == "model" and fingerprinted):
                    raise ValueError(f"{shown}: the collection holds {key}={old.get(key)!r}, this upload "
                                     f"{key}={meta.get(key)!r}; pass --overwrite to replace it")
            if not updating and old.get("complete"):
                raise ValueError(complete_message(spec, old))
            if not updating and old.get(CATALOG) and meta.get(CATALOG) and old[CATALOG] != meta[CATALOG]:
                raise ValueError(f"{shown}: the collection holds an unfinished upload of another catalog "
                                 f"({old.get('dataset')}); rerun that upload to finish it, or pass --overwrite "
                                 "to replace it")
            have = index_type_of(self.client, self.name) or old.get("milvus_index")
            kept = old.get("milvus_params") or {}
            if index_type is not None and index_type != have:
                raise ValueError(f"{shown}: the collection has a {have} index, not {index_type}; pass --overwrite "
                                 f"to rebuild it as {index_type}, or leave out --milvus-index")
            for key, value in (index_params or {}).items():
                if kept.get(key) != value:
                    raise ValueError(f"{shown}: the collection's {have} index has {key}={kept.get(key)}, not "
                                     f"{value}; pass --overwrite to rebuild it, or leave out --milvus-params")
            self.meta = {**meta, "backend": "milvus", "milvus_index": have, "milvus_params": kept}
            self.client.load_collection(self.name)  # resuming: a reopened collection starts released
            self.facet_fields = schema_facets(self.client, self.name)  # none in a collection made before filters
            self.has_digests = DIGEST in schema_fields(self.client, self.name)
            self.previous = old
            return
        index_type = index_type or "FLAT"
        for key in index_params or {}:
            if key not in MILVUS_PARAMS[index_type]:
                raise ValueError(f"milvus parameter {key!r} for {index_type}; expected "
                                 + (", ".join(MILVUS_PARAMS[index_type]) or f"none ({index_type} has no parameters)"))
        resolved = default_params(index_type, n_items, index_params)
        self.meta = {**meta, "backend": "milvus", "milvus_index": index_type, "milvus_params": resolved}
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("item_id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID)
        schema.add_field("title", DataType.VARCHAR, max_length=MAX_TITLE)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=int(meta["dim"]))
        for name in FILTER_FIELDS:
            schema.add_field(name, DataType.VARCHAR, max_length=MAX_FACET, nullable=True)
        schema.add_field(DIGEST, DataType.VARCHAR, max_length=64, nullable=True)
        self.facet_fields, self.has_digests, self.previous = list(FILTER_FIELDS), True, {}
        build = {n: v for n, v in resolved.items() if MILVUS_PARAMS[index_type][n] == "build"}
        params = self.client.prepare_index_params()
        # a server reads the parameters as keys of their own; Milvus Lite only as the JSON "params"
        params.add_index(field_name="vector", index_type=index_type, metric_type="IP",
                         params={**build, "params": build} if build else None)
        self.client.create_collection(self.name, schema=schema, index_params=params,
                                      properties={META_PROPERTY: json.dumps({**self.meta, "complete": False})})

    def stored(self, ids: list[str], fields: list[str]) -> dict[str, dict]:
        """item_id -> {field: value} of those of `ids` the collection holds."""
        out = {}
        for s in range(0, len(ids), QUERY_IDS):
            for row in self.client.query(self.name, filter=ids_filter(ids[s:s + QUERY_IDS]),
                                         output_fields=["item_id", *fields]):
                out[row["item_id"]] = row
        return out

    def missing(self, ids: list[str], digests: list[str | None] | None = None) -> list[int]:
        """Positions in `ids` of the items the collection does not hold yet; a ValueError where
        it holds one with another digest than `digests` gives (an unfinished upload of another
        catalog: resuming would mix the two)."""
        check = digests is not None and self.has_digests
        have = self.stored(list(ids), [DIGEST] if check else [])
        if check:
            for i, d in zip(ids, digests):
                old = have.get(i, {}).get(DIGEST)
                if old is not None and d is not None and old != d:
                    raise ValueError(f"{self.shown}: item {i[:80]!r} in the collection differs from this catalog's "
                                     "(an unfinished upload of another catalog); pass --overwrite to replace it, "
                                     "or --update to update a complete one")
        return [j for j, i in enumerate(ids) if i not in have]

    def upsert(self, ids: list[str], titles: list[str], vectors: np.ndarray, facets: dict | None = None,
               digests: list[str] | None = None) -> None:
        """Write items; `facets`: FILTER_FIELDS field -> value per item (None where one lacks it),
        as `lrem.index_base.item_facets` gives them; `digests`: `lrem.index_base.item_digest` per item."""
        facets = {f: column for f, column in (facets or {}).items() if f in self.facet_fields}
        rows = [{"item_id": i, "title": t, "vector": v} for i, t, v in zip(ids, titles, vectors.astype(np.float32).tolist())]
        for n, row in enumerate(rows):
            row.update({f: column[n] for f, column in facets.items()})
            if digests is not None and self.has_digests:
                row[DIGEST] = digests[n]
            for what, cap in (("item_id", MAX_ID), ("title", MAX_TITLE), *((f, MAX_FACET) for f in facets)):
                if row[what] is not None and len(row[what].encode()) > cap:
                    raise ValueError(f"{self.shown}: item {ids[n][:80]!r}: {what} longer than Milvus's {cap} bytes")
        self.client.upsert(self.name, rows)

    def delete(self, ids: list[str]) -> None:
        for s in range(0, len(ids), QUERY_IDS):
            self.client.delete(self.name, filter=ids_filter(ids[s:s + QUERY_IDS]))

    def count(self) -> int:
        self.client.flush(self.name)
        return row_count(self.client, self.name)

    def finish(self, **meta) -> dict:
        """Flush, and record the final metadata (item count, seconds, complete)."""
        n = self.count()
        self.meta = {**self.meta, **meta, "n_items": n, "complete": True}
        self.client.alter_collection_properties(self.name, properties={META_PROPERTY: json.dumps(self.meta)})
        return self.meta


def upload(spec: str, batches: Iterable[tuple[list[str], list[str], dict, list | None,
                                            Callable[[list[int]], np.ndarray]]],
           meta: dict, total: int, overwrite: bool = False, index_type: str | None = None,
           index_params: dict | None = None, show_progress: bool = True, log=print) -> dict:
    """Upload items to the collection of `spec`, skipping those it holds; returns its metadata.

    `batches` yields (ids, titles, facets, digests, vectors_of): `facets` the batch's filter
    fields (`lrem.index_base.item_facets`; {} where they are not known, as in chunks), `digests` its
    `lrem.index_base.item_digest`s (None where not known), and `vectors_of(positions)` the unit vectors
    (len(positions), dim) of those rows of the batch, so a resumed upload encodes (or reads) only
    the items it still needs. A complete collection is refused (`update` it, or `overwrite`), and
    so is an unfinished one of another catalog: `meta[CATALOG]` (`catalog_digest`) differs, an
    item's digest differs, or items of this catalog are not all it holds.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    with milvus_errors(spec):
        writer = MilvusWriter(spec, meta, overwrite=overwrite, index_type=index_type, index_params=index_params,
                              n_items=total)
        written = skipped = 0
        with tqdm(total=total, desc="upload", unit="item", disable=not show_progress) as bar:
            for ids, titles, facets, digests, vectors_of in batches:
                todo = writer.missing(ids, digests)
                if todo:
                    writer.upsert([ids[j] for j in todo], [titles[j] for j in todo], vectors_of(todo),
                                  {f: [column[j] for j in todo] for f, column in facets.items()},
                                  None if digests is None else [digests[j] for j in todo])
                written, skipped = written + len(todo), skipped + len(ids) - len(todo)
                bar.update(len(ids))
        if writer.previous and writer.count() > written + skipped:  # items no batch named: another catalog's
            raise ValueError(f"{writer.shown}: the collection holds {writer.count() - written - skipped} items not in "
                             "this catalog (an unfinished upload of another catalog); pass --overwrite to replace "
                             "it")
        out = writer.finish(upload_seconds=round(time.perf_counter() - t0, 3))
    out.update(written=written, skipped=skipped)
    return out


def upload_catalog(spec: str, model, catalog: dict, upload_batch: int = UPLOAD_BATCH, batch_size: int = ITEM_BATCH,
                   truncate: bool = True, overwrite: bool = False, index_type: str | None = None,
                   index_params: dict | None = None, show_progress: bool = True, log=print,
                   dataset: str | None = None) -> dict:
    """`upload` a catalog (item_id -> title / `lrem.data.Item`), `upload_batch` items per request,
    embedded by `model` (`encode_items`, `batch_size` at a time) only where the collection lacks
    them. The collection records the model (`model_identity`), `dataset`, and the catalog
    (`CATALOG`: its ids and item digests), which tells a rerun of this upload from another
    catalog's. Returns the collection's metadata, with the items written and skipped."""
    ids, items = catalog_items(catalog)
    digests = [item_digest(model, x) for x in items]  # what tells this catalog's unfinished upload from another's
    meta = {**model_identity(model), "dataset": dataset,
            CATALOG: catalog_digest(catalog_fingerprint(ids), digests)}

    def batches():
        for s in range(0, len(ids), upload_batch):
            part = items[s:s + upload_batch]
            yield (ids[s:s + upload_batch], [item_title(x) for x in part], item_facets(part),
                   digests[s:s + upload_batch],
                   lambda pos, part=part: model.encode_items([part[j] for j in pos], batch_size=batch_size,
                                                             truncate=truncate))

    return upload(spec, batches(), meta, len(ids), overwrite=overwrite, index_type=index_type,
                  index_params=index_params, show_progress=show_progress, log=log)


def upload_chunks(spec: str, folder, upload_batch: int = UPLOAD_BATCH, overwrite: bool = False,
                  index_type: str | None = None, index_params: dict | None = None, show_progress: bool = True,
                  log=print) -> dict:
    """`upload` a chunk folder of `lrem embed` (`lrem.embed`: every chunk there before anything is
    uploaded), `upload_batch` items per request, with the items' digests and filter fields where
    the chunks keep them. The collection records the chunks' model (`MODEL_KEYS`), dataset and
    catalog (`CATALOG`). Returns the collection's metadata, with the items written and skipped."""
    man = read_manifest(folder)
    files = chunk_files(folder, man)  # all there, before any upload
    meta = {k: man[k] for k in (*MODEL_KEYS, "dataset") if k in man}
    if man.get("catalog_sha1"):  # the chunks' catalog: their ids, and the items' digests where all have them
        every: list | None = []
        for f in files:
            d = read_chunk_fields(f)[0]
            every = None if every is None or d is None else every + d
        meta[CATALOG] = catalog_digest(man["catalog_sha1"], every)

    def batches():
        for (ids, titles, x), f in zip(iter_chunks(folder, show_progress=False), files):
            digests, facets = read_chunk_fields(f)  # where the chunks keep them
            for s in range(0, len(ids), upload_batch):
                cut = slice(s, s + upload_batch)
                yield (ids[cut], titles[cut], {k: v[cut] for k, v in facets.items()},
                       None if digests is None else digests[cut], (lambda pos, s=s, x=x: x[s:][pos]))

    return upload(spec, batches(), meta, man["n_items"], overwrite=overwrite, index_type=index_type,
                  index_params=index_params, show_progress=show_progress, log=log)


def update(spec: str, model, catalog: dict, meta: dict | None = None, upload_batch: int = UPLOAD_BATCH,
           batch_size: int = ITEM_BATCH,
           truncate: bool = True, show_progress: bool = True, dataset: str | None = None) -> dict:
    """Bring the collection of `spec` up to date with `catalog` (item_id -> `lrem.data.Item`),
    as `lrem.index.ItemIndex.updated` does a FAISS index: embed and upsert the new and changed
    items, delete the removed ones. Changed: its `item_digest` differs (a collection without
    digests compares titles, or re-embeds all where the item template names other fields).
    `meta`: the model and dataset the collection is to record (None: `model`'s `model_identity`
    and `dataset`). Every step is idempotent, so a killed update rerun finishes it. Returns the
    counts."""
    from tqdm.auto import tqdm

    from .prompts import item_fields

    if meta is None:
        meta = {**model_identity(model), "dataset": dataset}  # a local model folder recorded absolute
    t0 = time.perf_counter()
    with milvus_errors(spec):
        writer = MilvusWriter(spec, meta, updating=True)  # refuses a collection of another model (MODEL_KEYS)
        if not writer.previous:
            raise ValueError(f"{writer.shown}: no collection to update; create it with `lrem index --data ... "
                             f"--backend {writer.shown}`")
        writer.meta = {**writer.previous, **writer.meta}  # keeps what the upload recorded (its seconds, ...)
        fields = ["item_id", "title"] + ([DIGEST] if writer.has_digests else [])
        have = {r["item_id"]: r for r in iter_rows(writer.client, writer.name, fields)}
        ids, items = catalog_items(catalog)
        digests, same = unchanged_items(model, items, [
            None if i not in have else (have[i].get(DIGEST), have[i]["title"]) for i in ids])
        todo = [n for n, kept in enumerate(same) if not kept]
        removed = sorted(set(have) - set(ids))
        writer.meta[CATALOG] = catalog_digest(catalog_fingerprint(ids), digests)  # the catalog it now holds
        with tqdm(total=len(todo), desc="update", unit="item", disable=not show_progress) as bar:
            for s in range(0, len(todo), upload_batch):
                part = todo[s:s + upload_batch]
                chosen = [items[n] for n in part]
                vectors = model.encode_items(chosen, batch_size=batch_size, truncate=truncate)
                writer.upsert([ids[n] for n in part], [item_fields(x)["title"] for x in chosen], vectors,
                              item_facets(chosen),
                              [digests[n] for n in part])
                bar.update(len(part))
        for s in range(0, len(removed), upload_batch):
            writer.delete(removed[s:s + upload_batch])
        counts = {"added": sum(ids[n] not in have for n in todo), "changed": sum(ids[n] in have for n in todo),
                  "removed": len(removed), "kept": len(ids) - len(todo)}
        updates = list(writer.previous.get("updates", [])) + [{**counts, "seconds": round(time.perf_counter() - t0, 3),
                                                               "dataset": meta.get("dataset")}]
        writer.finish(updates=updates)
    return counts


class MilvusIndex:
    """A Milvus collection with the interface of `lrem.index.ItemIndex`: `search(q, k) -> (scores,
    ids)`, `meta`, `title(id)`, `item_ids` and `titles` (read from the collection on first use),
    and FAISS's `d` / `ntotal` (`index.index.d` works as for an ItemIndex)."""

    def __init__(self, spec: str, client, name: str, meta: dict):
        self.spec, self.client, self.name, self.meta = spec, client, name, meta
        self.d = int(meta["dim"])
        self.ntotal = row_count(client, name)
        self._titles: dict[str, str] = {}
        self._all: tuple[list[str], list[str]] | None = None
        self._filter_fields: list[str] | None = None

    @property
    def index(self) -> "MilvusIndex":
        return self

    @classmethod
    def open(cls, spec: str) -> "MilvusIndex":
        uri, name = parse_spec(spec)
        client = connect(uri)
        shown = redact(spec)
        with milvus_errors(spec):
            meta = read_meta(client, name, spec)
            if meta is None:
                raise ValueError(f"{shown}: no collection {name!r} at {redact(uri)}; create it with `lrem index "
                                 f"--backend {shown}`")
            if not meta.get("complete"):
                raise ValueError(f"{shown}: the upload to this collection did not finish; rerun the same `lrem index` "
                                 "command")
            if isinstance(meta.get("dim"), bool) or not isinstance(meta.get("dim"), int):
                raise ValueError(f"{shown}: {META_PROPERTY}: field 'dim': expected an integer, got {meta.get('dim')!r}")
            client.load_collection(name)
            return cls(spec, client, name, meta)

    @property
    def filter_fields(self) -> list[str]:
        """The FILTER_FIELDS this collection can filter on: those its items hold a value of
        (asked once; a collection made before filters has none)."""
        if self._filter_fields is None:
            with milvus_errors(self.spec):
                self._filter_fields = sorted(f for f in schema_facets(self.client, self.name)
                                             if self.client.query(self.name, filter=f"{f} is not null",
                                                                  output_fields=[f], limit=1))
        return self._filter_fields

    def search(self, q: np.ndarray, k: int = 10, where: dict | None = None) -> tuple[np.ndarray, list[list[str]]]:
        """Top-k (scores (n, k'), item ids) for query embeddings q (n, dim); k' = min(k, n_items).
        `where`: only items matching this filter (`lrem.index.ItemIndex.allowed`'s), which Milvus
        applies inside its search; rows hold fewer than k where fewer items match."""
        q = np.ascontiguousarray(q, dtype=np.float32)  # (n, dim)
        k = min(k, self.ntotal)
        scores = np.full((q.shape[0], k), -np.inf, dtype=np.float32)  # (n, k)
        ids: list[list[str]] = []
        if k == 0:
            return scores, [[] for _ in range(q.shape[0])]
        expr = self._expression(where) if where else ""
        with milvus_errors(self.spec):
            res = self.client.search(self.name, data=q.tolist(), limit=k, output_fields=["title"],
                                     search_params=search_params(self.meta, k), filter=expr)
        found = np.full(scores.shape, -1, dtype=np.int64)  # (n, k): -1 where a row has fewer hits
        for r, hits in enumerate(res):
            row = []
            for j, h in enumerate(hits):
                item_id = h["item_id"] if "item_id" in h else h["id"]  # the primary key's name, or "id"
                scores[r, j], found[r, j] = h["distance"], j
                row.append(item_id)
                self._titles[item_id] = h["entity"]["title"]
            ids.append(row)
        if where and not any(ids):  # nothing matches the filter: no columns, as an index folder answers
            return scores[:, :0], ids
        return fill_missing(scores, found), ids  # no -inf padding reaches the router's margins

    def allowed(self, where: dict) -> np.ndarray:
        """Positions in `item_ids` (sorted int64) of the items matching a filter, as
        `ItemIndex.allowed` (hybrid search restricts BM25 with them)."""
        expr = self._expression(where)
        pos = {i: n for n, i in enumerate(self._load_all()[0])}
        with milvus_errors(self.spec):
            found = [pos[r["item_id"]] for r in iter_rows(self.client, self.name, ["item_id"], filter=expr)]
        return np.array(sorted(found), dtype=np.int64)

    def _expression(self, where: dict) -> str:
        """A filter as a Milvus boolean expression: `brand in ["Acme", "Zed"] and color in ["red"]`.
        Field names are checked against FILTER_FIELDS; values are `milvus_string` literals."""
        check_filter(where, self.filter_fields)
        parts = []
        for name, values in where.items():
            values = [values] if isinstance(values, str) else list(values)
            parts.append(in_filter(name, values))
        return " and ".join(parts)

    def title(self, item_id: str) -> str:
        if item_id not in self._titles:
            with milvus_errors(self.spec):
                rows = self.client.query(self.name, filter=ids_filter([item_id]), output_fields=["title"])
            if not rows:
                raise KeyError(item_id)
            self._titles[item_id] = rows[0]["title"]
        return self._titles[item_id]

    def vectors_of(self, item_ids: list[str]) -> np.ndarray:
        """The stored vectors (len(item_ids), dim) of these items, in their order (as
        `ItemIndex.vectors_of`: what `lrem serve`'s /rerank by item_ids scores); a KeyError names
        an unknown id."""
        if not item_ids:
            return np.zeros((0, self.d), np.float32)
        wanted, rows = list(dict.fromkeys(item_ids)), []
        with milvus_errors(self.spec):
            for s in range(0, len(wanted), QUERY_IDS):
                rows += self.client.query(self.name, filter=ids_filter(wanted[s:s + QUERY_IDS]),
                                          output_fields=["item_id", "vector", "title"])
        got = {}
        for row in rows:
            item_id = row["item_id"] if "item_id" in row else row["id"]
            got[item_id] = np.asarray(row["vector"], np.float32)
            self._titles[item_id] = row["title"]
        missing = [i for i in item_ids if i not in got]
        if missing:
            raise KeyError(f"item_id {missing[0]!r} is not in the collection")
        return np.stack([got[i] for i in item_ids])

    def __contains__(self, item_id: str) -> bool:
        if item_id in self._titles:
            return True
        if not hasattr(self, "_id_set"):  # the ids are read (and the set built) once, not per call
            self._id_set = set(self._load_all()[0])
        return item_id in self._id_set

    def _load_all(self) -> tuple[list[str], list[str]]:
        if self._all is None:
            ids, titles = [], []
            for row in iter_rows(self.client, self.name, ["item_id", "title"]):
                ids.append(row["item_id"])
                titles.append(row["title"])
            self._all = (ids, titles)
        return self._all

    @property
    def item_ids(self) -> Sequence[str]:
        """Every item id; `len()` asks nothing, the ids load on first use (e.g. `set(...)`)."""
        return _Column(self, 0)

    @property
    def titles(self) -> Sequence[str]:
        return _Column(self, 1)


class _Column(Sequence):
    """The item ids or titles of a MilvusIndex: the length from the collection's row count, the
    values read from the collection only when asked for (`lrem serve` starts without them)."""

    def __init__(self, index: MilvusIndex, which: int):
        self.index, self.which = index, which

    def __len__(self) -> int:
        return self.index.ntotal

    def __getitem__(self, j):
        return self.index._load_all()[self.which][j]

    def __iter__(self):
        return iter(self.index._load_all()[self.which])


def schema_fields(client, name: str) -> set[str]:
    return {f["name"] for f in client.describe_collection(name).get("fields", [])}


def schema_facets(client, name: str) -> list[str]:
    """The FILTER_FIELDS a collection's schema has."""
    have = schema_fields(client, name)
    return [f for f in FILTER_FIELDS if f in have]


def row_count(client, name: str) -> int:
    """The items a collection holds now (a count query: a server's statistics may still count
    deleted rows until it compacts)."""
    return int(client.query(name, filter="", output_fields=["count(*)"])[0]["count(*)"])


def iter_rows(client, name: str, fields: list[str], batch_size: int = 1000, filter: str = "") -> Iterator[dict]:
    """Every row of a collection (the fields asked; those matching `filter`, a Milvus expression),
    in pages of `batch_size` in primary-key order (a query in Milvus's iterator mode), each page
    after the last id of the one before: pymilvus's query_iterator writes that id into its
    expression unescaped, which an id with a double quote or backslash breaks."""
    last = None
    while True:
        cursor = None if last is None else f"item_id > {milvus_string(last)}"
        expr = " and ".join(f"({e})" for e in (cursor, filter) if e)
        rows = client.query(name, filter=expr, output_fields=list(dict.fromkeys(["item_id", *fields])),
                            limit=batch_size, iterator="True", reduce_stop_for_best="True")
        if not rows:
            return
        yield from rows
        last = max(r["item_id"] for r in rows)
