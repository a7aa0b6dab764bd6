"""`lrem index` (a FAISS folder, or a Milvus collection with --backend) and `lrem embed` (the
catalog into resumable chunks, one share per process under torchrun)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lrem._defaults import CHUNK_SIZE, FACTORY, ITEM_BATCH, UPLOAD_BATCH, VECTOR_DTYPE
from lrem.cli.options import BatchSize, Dtype, Threads, Truncate, check_output, echo_err, echo_truncated


def index(
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Index folder (written atomically): a new or empty "
                                                "folder, or an earlier lrem output with --overwrite. Not with --backend.")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", "-d", help="Dataset folder whose catalog is embedded "
                                                 "here (queries and qrels not needed), or one catalog file (.jsonl, "
                                                 ".csv, .tsv, .parquet); or --from-chunks.")] = None,
    from_chunks: Annotated[Optional[Path], typer.Option(help="A chunk folder of `lrem embed` to index instead of "
                                                        "embedding (added chunk by chunk; docs/chunks.md).")] = None,
    backend: Annotated[Optional[str], typer.Option(help="milvus:URI/COLLECTION: upload to Milvus instead of writing a "
                                                   "FAISS folder (URI a Milvus Lite path *.db or http://host:port); "
                                                   "resumable: rerun to finish an upload; a complete collection "
                                                   "takes --update or --overwrite.")] = None,
    model: Annotated[Optional[str], typer.Option(help="LREM folder, HF folder or hub name, or a built-in name "
                                                 "(default: the shipped trained model lrem-wordnet-135m).")] = None,
    factory: Annotated[str, typer.Option(help='FAISS index_factory string: "Flat", "HNSW32,Flat", "IVF1024,PQ64"; '
                                         '"auto": a recipe by catalog size (lrem.index.auto_recipe).')] = FACTORY,
    search_params: Annotated[str, typer.Option(help='FAISS search-time parameters, e.g. "efSearch=128" or "nprobe=32".')] = "",
    milvus_index: Annotated[Optional[str], typer.Option(help="Milvus index type of a new --backend collection: FLAT "
                                                        "(exact; the default), HNSW, IVF_FLAT, AUTOINDEX. An existing "
                                                        "one keeps its own (rebuild: --overwrite).")] = None,
    milvus_params: Annotated[str, typer.Option(help='Milvus index parameters of a new --backend collection: IVF_FLAT '
                                               '"nlist=1024,nprobe=64" (default nlist ~4 sqrt(n), nprobe '
                                               'min(nlist, 256)), HNSW "M=16,efConstruction=200,ef=64"; kept in '
                                               'its metadata.')] = "",
    upload_batch: Annotated[int, typer.Option(min=1, help="Items per Milvus request with --backend.")] = UPLOAD_BATCH,
    batch_size: BatchSize = ITEM_BATCH,
    dtype: Dtype = "auto",
    threads: Threads = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT (or the --backend collection) if lrem "
                                            "wrote it earlier; never what lrem did not write.")] = False,
    truncate: Truncate = True,
    on_disk: Annotated[bool, typer.Option("--on-disk", help="With --from-chunks and an IVF factory: keep the "
                                          "inverted lists on disk, memory-mapped (OUT/lists.ivfdata), for indexes "
                                          "bigger than memory.")] = False,
    update: Annotated[bool, typer.Option("--update", help="OUT (or the --backend collection) is an index lrem "
                                         "built: bring it up to date with --data's catalog, embedding only new and "
                                         "changed items (removed ones leave); its model unless --model names the "
                                         "same weights.")] = False,
):
    """Embed the catalog with the model (items never reason) and build a FAISS index, or index the
    chunks of `lrem embed`; with --backend, upload to a Milvus collection instead."""
    from lrem._threads import set_threads

    if on_disk and (from_chunks is None or backend is not None):
        raise typer.BadParameter("--on-disk indexes the chunks of `lrem embed` into a FAISS folder: give "
                                 "--from-chunks and --out", param_hint="--on-disk")
    if (data is None) == (from_chunks is None):
        raise typer.BadParameter("give --data (embed the catalog here) or --from-chunks (vectors of `lrem embed`)",
                                 param_hint="--data / --from-chunks")
    if backend is not None and update and (from_chunks is not None or overwrite or milvus_index or milvus_params):
        raise typer.BadParameter("--update embeds --data's new and changed items into the collection, which keeps "
                                 "its own index; not with --from-chunks, --overwrite, --milvus-index or "
                                 "--milvus-params", param_hint="--update")
    if backend is None and (milvus_index is not None or milvus_params):
        raise typer.BadParameter("--milvus-index and --milvus-params are for a --backend collection; a FAISS "
                                 "folder takes --factory and --search-params", param_hint="--milvus-index")
    if backend is not None:
        from lrem.vectordb import MILVUS_INDEXES, parse_params, parse_spec

        if out is not None:
            raise typer.BadParameter("--out is the FAISS folder; with --backend the index is the collection",
                                     param_hint="--out")
        if factory != "Flat" or search_params:
            raise typer.BadParameter("--factory and --search-params are FAISS's; a --backend collection takes "
                                     "--milvus-index and --milvus-params", param_hint="--factory / --search-params")
        parse_spec(backend)  # a bad spec fails now, before any model loads
        if milvus_index is not None:
            milvus_index = milvus_index.upper()
            if milvus_index not in MILVUS_INDEXES:
                raise typer.BadParameter(f"{milvus_index!r}; expected one of {', '.join(MILVUS_INDEXES)}",
                                         param_hint="--milvus-index")
        params = parse_params(milvus_params, milvus_index) if milvus_params else None
        set_threads(threads, log=echo_err)
        if update:
            return _update_milvus(backend, data, model, upload_batch, batch_size, dtype, truncate)
        _index_to_milvus(backend, data, from_chunks, model, milvus_index, params, upload_batch, batch_size, dtype,
                         overwrite, truncate)
        return
    if out is None:
        raise typer.BadParameter("missing --out (the index folder), or give --backend", param_hint="--out")
    if update:
        if from_chunks is not None or on_disk or overwrite or factory != "Flat" or search_params:
            raise typer.BadParameter("--update embeds --data's new and changed items into the index OUT, which keeps "
                                     "its own factory and search parameters; not with --from-chunks, --on-disk, "
                                     "--overwrite, --factory or --search-params", param_hint="--update")
        _update_index(out, data, model, batch_size, dtype, threads, truncate)
        return
    if from_chunks is not None:
        from lrem.index import ItemIndex

        check_output(out, from_chunks, overwrite=overwrite)
        set_threads(threads, log=echo_err)
        scratch = Path(out).resolve().parent if on_disk else None  # beside OUT: moving the lists in is a rename
        idx = ItemIndex.from_chunks(from_chunks, factory=factory, search_params=search_params, on_disk=scratch)
        idx.save(out)
        typer.echo(f"indexed {len(idx.item_ids)} items from {from_chunks} ({idx.meta['factory']}, dim {idx.meta['dim']}) in "
                   f"{idx.meta['index_seconds']:.0f} s -> {out}")
        return
    from lrem.data import load_catalog
    from lrem.index import ItemIndex
    from lrem.model import LREM, default_model

    model = model or default_model()
    check_output(out, data, model if Path(model).exists() else None, overwrite=overwrite)
    catalog = load_catalog(data)
    set_threads(threads, log=echo_err)
    lrem = LREM.from_pretrained(model, dtype=dtype, log=echo_err)
    idx = ItemIndex.build(lrem, catalog, factory=factory, search_params=search_params,
                          batch_size=batch_size, truncate=truncate, dataset=str(data))
    idx.save(out)
    typer.echo(f"indexed {len(catalog)} items ({idx.meta['factory']}, dim {lrem.dim}) in "
               f"{idx.meta['encode_seconds']:.0f} s -> {out}")
    echo_truncated(lrem)


def _recorded_dtype(dtype: str, meta: dict) -> str:
    """An update's dtype: the one asked for, else ("auto") the one the index's items were embedded in,
    so that new items are not embedded in bfloat16 beside float32 ones (or the other way)."""
    recorded = meta.get("dtype")
    if dtype == "auto" and isinstance(recorded, str) and recorded in ("float32", "bfloat16", "float16"):
        return recorded
    return dtype


def _update_index(out, data, model, batch_size, dtype, threads, truncate) -> None:
    """`lrem index --update`: embed the new and changed items of --data's catalog into the index OUT."""
    from lrem._io import is_lrem_output
    from lrem._threads import set_threads
    from lrem.data import load_catalog
    from lrem.index import ItemIndex, is_index_dir
    from lrem.model import LREM

    if not is_index_dir(out) or not is_lrem_output(out):
        raise ValueError(f"--out {out}: not an index lrem built; build one first (`lrem index --data ... --out {out}`)")
    check_output(out, data, model if model and Path(model).exists() else None, resume=True)
    idx = ItemIndex.load(out)
    if not isinstance(idx.meta.get("factory"), str):
        raise ValueError(f"{out}/meta.json: field 'factory' is missing; rebuild the index")
    catalog = load_catalog(data)
    set_threads(threads, log=echo_err)
    lrem = LREM.from_pretrained(model or idx.meta.get("model"), dtype=_recorded_dtype(dtype, idx.meta), log=echo_err)
    new, counts = idx.updated(lrem, catalog, batch_size=batch_size, truncate=truncate, dataset=str(data))
    new.save(out)
    typer.echo(f"updated {out}: {counts['added']} added, {counts['changed']} changed, {counts['removed']} removed, "
               f"{counts['kept']} kept ({len(new.item_ids)} items; embedded {counts['added'] + counts['changed']} in "
               f"{new.meta['updates'][-1]['encode_seconds']:.0f} s)")
    echo_truncated(lrem)


def _update_milvus(spec, data, model, upload_batch, batch_size, dtype, truncate) -> None:
    """`lrem index --backend milvus:... --update`: embed and upsert --data's new and changed items,
    delete the removed ones."""
    from lrem.data import load_catalog
    from lrem.model import LREM
    from lrem.vectordb import check_update, redact, update

    old = check_update(spec)  # the collection names its model: read before any model loads
    catalog = load_catalog(data)
    lrem = LREM.from_pretrained(model or old.get("model"), dtype=_recorded_dtype(dtype, old), log=echo_err)
    counts = update(spec, lrem, catalog, upload_batch=upload_batch, batch_size=batch_size, truncate=truncate,
                    dataset=str(data))
    typer.echo(f"updated {redact(spec)}: {counts['added']} added, {counts['changed']} changed, {counts['removed']} removed, "
               f"{counts['kept']} kept")
    echo_truncated(lrem)


def _index_to_milvus(spec, data, from_chunks, model, milvus_index, milvus_params, upload_batch, batch_size, dtype,
                     overwrite, truncate) -> None:
    """`lrem index --backend milvus:...`: embed (only the items the collection lacks) or read chunks, upload."""
    from lrem.vectordb import check_upload, redact, upload_catalog, upload_chunks

    check_upload(spec, overwrite)  # a complete collection: refused before any model loads
    if from_chunks is not None:
        info = upload_chunks(spec, from_chunks, upload_batch=upload_batch, overwrite=overwrite,
                             index_type=milvus_index, index_params=milvus_params, log=echo_err)
        lrem = None
    else:
        from lrem.data import load_catalog
        from lrem.model import LREM, default_model

        model = model or default_model()
        catalog = load_catalog(data)
        lrem = LREM.from_pretrained(model, dtype=dtype, log=echo_err)
        info = upload_catalog(spec, lrem, catalog, upload_batch=upload_batch, batch_size=batch_size, truncate=truncate,
                              overwrite=overwrite, index_type=milvus_index, index_params=milvus_params, log=echo_err,
                              dataset=str(data))
    params = ",".join(f"{k}={v}" for k, v in info["milvus_params"].items())
    typer.echo(f"uploaded {info['written']} items to {redact(spec)} ({info['skipped']} already there; "
               f"{info['n_items']} in all, dim {info['dim']}, {info['milvus_index']}{' ' + params if params else ''}) "
               f"in {info['upload_seconds']:.0f} s")
    if lrem is not None:
        echo_truncated(lrem)


def embed(
    data: Annotated[Path, typer.Option("--data", "-d", help="Dataset folder (its catalog alone is read) or one "
                                       "catalog file (.jsonl, .csv, .tsv, .parquet).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Chunk folder: a new or empty folder, or this command's "
                                      "earlier run folder, which it resumes (only missing chunks are encoded).")],
    model: Annotated[Optional[str], typer.Option(help="LREM folder, HF folder or hub name, or a built-in name "
                                                 "(default: the shipped trained model lrem-wordnet-135m).")] = None,
    chunk_size: Annotated[int, typer.Option(min=1, help="Items per chunk file (the most vectors a process "
                                            "holds).")] = CHUNK_SIZE,
    vector_dtype: Annotated[str, typer.Option(help="float32 or float16 (half the disk; values rounded to ~1e-3 "
                                              "relative).")] = VECTOR_DTYPE,
    max_chunks: Annotated[Optional[int], typer.Option(min=1, help="Stop after encoding N chunks in each process "
                                                      "(rerun to continue).")] = None,
    batch_size: BatchSize = ITEM_BATCH,
    dtype: Dtype = "auto",
    threads: Threads = None,
    truncate: Truncate = True,
):
    """Encode the catalog into Parquet chunks, resumably; under torchrun / accelerate launch each
    process (CPU or GPU) encodes its own share. Then `lrem index --from-chunks OUT`."""
    from datetime import timedelta

    import torch
    from accelerate import PartialState

    from lrem._threads import set_threads
    from lrem.data import load_catalog
    from lrem.embed import MANIFEST, VECTOR_DTYPES, check_chunk_folder, embed_catalog
    from lrem.model import LREM, default_model

    if vector_dtype not in VECTOR_DTYPES:
        raise typer.BadParameter(f"{vector_dtype!r}; expected one of {', '.join(VECTOR_DTYPES)}",
                                 param_hint="--vector-dtype")
    model = model or default_model()
    check_output(out, data, model if Path(model).exists() else None, resume=True, run_files=(MANIFEST,))
    check_chunk_folder(out)  # another command's lrem output (an index, a model): never mixed with chunks
    catalog = load_catalog(data)
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=48))  # ranks wait for the slowest
    rank, world = state.process_index, state.num_processes
    set_threads(threads, log=echo_err if rank == 0 else None)
    lrem = LREM.from_pretrained(model, dtype=dtype, device=str(state.device), log=echo_err if rank == 0 else (lambda *_: None))
    try:
        stats = embed_catalog(lrem, catalog, out, chunk_size=chunk_size, rank=rank, world=world,
                              vector_dtype=vector_dtype, batch_size=batch_size, max_chunks=max_chunks,
                              truncate=truncate, barrier=state.wait_for_everyone, dataset=str(data))
    except (ValueError, OSError):
        if rank != 0:  # every rank refuses a mismatched resume alike: rank 0 says why, once
            raise SystemExit(2)
        raise
    echo_err(f"rank {rank}/{world}: encoded {len(stats.encoded)} chunks ({stats.items} items) in {stats.seconds:.1f} s "
          f"({stats.items_per_second:.1f} items/s); skipped {len(stats.skipped)} written earlier"
          + ("; stopped at --max-chunks" if stats.stopped else ""))
    echo_truncated(lrem)
    if rank == 0:
        import json as _json

        done = _json.loads((out / MANIFEST).read_text()).get("complete", False)
        typer.echo(f"wrote {out}: " + ("complete; next: lrem index --from-chunks " + str(out) + " --out INDEX" if done
                                       else "not complete; rerun the same command to encode the missing chunks"))
