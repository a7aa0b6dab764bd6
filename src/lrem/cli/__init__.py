"""The `lrem` command: thin wrappers that parse arguments and call the library.

    lrem data wordnet --out data/wordnet
    lrem index --model smollm2-135m-instruct --data data/wordnet --out runs/idx
    lrem embed --data data/wordnet --out runs/chunks       # resumable; torchrun for several processes
    lrem index --from-chunks runs/chunks --out runs/idx | --backend milvus:runs/items.db/wordnet
    lrem search --index runs/idx "a device for pulling corks"
    lrem eval --data data/wordnet --split dev --system bm25 --system base=runs/idx:reason --out runs/eval
    lrem serve --index runs/idx --port 8000 [--config serve.yaml] [--set max_batch=32]
    lrem router fit --index runs/idx --data data/wordnet --split train --queries 400 --out MODEL_FOLDER
    lrem export --model runs/coldstart --to sentence-transformers --out runs/coldstart-st
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from lrem.search_types import MODES

# No HF_HUB_OFFLINE here: built-in names and folders never ask the hub, hub names do
# (`lrem.backbones.resolve_backbone`, which fails in a second with one line when it is unreachable).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(help="LREM: reason about a query, then embed it. Dense retrieval for product search.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Build, convert, check and sample datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

Out = Annotated[Path, typer.Option("--out", "-o", help="Output folder (written atomically): a new or empty folder, "
                                    "or an earlier lrem output with --overwrite.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace OUT if an earlier lrem command wrote it "
                                         "(a folder lrem did not write is never replaced).")]
DataDir = Annotated[Path, typer.Option("--data", "-d", help="Dataset folder (catalog, queries, qrels).")]
BatchSize = Annotated[int, typer.Option(min=1, help="Texts per model call.")]


def _dtype(value: str) -> str:
    from lrem.model import DTYPES

    if value not in DTYPES:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(DTYPES)}")
    return value


Dtype = Annotated[str, typer.Option(callback=_dtype, help="auto, float32, bfloat16 or float16.")]


def _positive(value: Optional[float]) -> Optional[float]:
    if value is not None and not value > 0:  # also catches nan
        raise typer.BadParameter(f"{value} is not > 0")
    return value


def _output(out: Path, *inputs, overwrite: bool = False, resume: bool = False, run_files=()) -> Path:
    """Refuse, before any work, an --out that is an input, a file or a folder lrem did not write."""
    from lrem._io import prepare_output

    return prepare_output(out, inputs, overwrite=overwrite, resume=resume, run_files=run_files)


Truncate = Annotated[bool, typer.Option("--truncate/--no-truncate", help="Inputs over the model's token limits "
                                        "(max_query_tokens, max_item_tokens in its lrem_config.json): cut them "
                                        "and say how many, or stop with an error.")]
Threads = Annotated[Optional[int], typer.Option(help="CPU threads for the model and FAISS (default: the cores the "
                                                "load average leaves free, at least 1).", min=1)]


def _echo(msg: str) -> None:
    typer.echo(msg, err=True)


def _print_counts(ds) -> None:
    c = ds.counts()
    typer.echo(f"{ds.name}: {c['items']} items, {c['qrels']} qrels")
    for split, cats in c["queries"].items():
        detail = ", ".join(f"{k} {v}" for k, v in cats.items() if k not in ("total",))
        typer.echo(f"  {split}: {cats['total']} queries ({detail})")


# ---------------------------------------------------------------- data

@data_app.command("wordnet")
def data_wordnet(out: Out, wordnet_dir: Annotated[Path, typer.Option(help="WordNet 3.0 dict folder.")] = Path("/usr/share/wordnet"),
                 overwrite: Overwrite = False):
    """Build the WordNet product benchmark (artifacts and food; definition and category queries)."""
    from lrem.data import build_wordnet, save_dataset

    _output(out, wordnet_dir, overwrite=overwrite)
    ds = build_wordnet(wordnet_dir, log=typer.echo)
    save_dataset(ds, out)
    typer.echo(f"wrote {out}")


@data_app.command("convert")
def data_convert(
    src: Annotated[Path, typer.Argument(help="Source folder or file.")],
    out: Out,
    fmt: Annotated[str, typer.Option("--format", help="beir, esci, wands, lrem (a folder of CSV/TSV/Parquet/JSONL) or auto.")] = "auto",
    locale: Annotated[Optional[str], typer.Option(help="ESCI only: keep one locale (us, es, jp).")] = None,
    overwrite: Overwrite = False,
):
    """Convert BEIR / ESCI / WANDS data (or CSV/TSV/Parquet tables) to the lrem folder format."""
    from lrem.data import convert, load_dataset, save_dataset

    _output(out, src, overwrite=overwrite)
    if fmt == "lrem":
        ds = load_dataset(src)
    else:
        ds = convert(src, fmt, **({"locale": locale} if locale else {}))
    save_dataset(ds, out)
    if ds.source_rows:
        typer.echo("read " + ", ".join(f"{n} rows from {f}" for f, n in ds.source_rows.items()))
    _print_counts(ds)
    typer.echo(f"wrote {out}")


@data_app.command("check")
def data_check(data: Annotated[Path, typer.Argument(help="Dataset folder.")]):
    """Validate a dataset folder and print its counts (exit 2 with file:line: field on bad input)."""
    from lrem.data import load_dataset

    _print_counts(load_dataset(data))


@data_app.command("sample")
def data_sample(
    data: DataDir,
    out: Out,
    queries: Annotated[int, typer.Option(min=1, help="Queries to keep.")] = 100,
    split: Annotated[Optional[str], typer.Option(help="Only queries of this split.")] = None,
    distractors: Annotated[int, typer.Option(min=0, help="Extra random catalog items besides the judged ones.")] = 1000,
    seed: int = 0,
    overwrite: Overwrite = False,
):
    """A fixed, seeded subset: N queries, their judged items, and random distractor items."""
    from lrem.data import load_dataset, sample_dataset, save_dataset

    _output(out, data, overwrite=overwrite)
    ds = sample_dataset(load_dataset(data), queries, split, distractors, seed)
    save_dataset(ds, out)
    _print_counts(ds)


# ---------------------------------------------------------------- index and search

def _check_mode(mode: str) -> str:
    """Reject an unknown mode before any model loads."""
    if mode not in MODES:
        raise typer.BadParameter(f"{mode!r} is not a mode; expected one of {', '.join(MODES)}")
    return mode


@app.command()
def index(
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Index folder (written atomically): a new or empty "
                                                "folder, or an earlier lrem output with --overwrite. Not with --backend.")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", "-d", help="Dataset folder whose catalog is embedded here "
                                                 "(or --from-chunks).")] = None,
    from_chunks: Annotated[Optional[Path], typer.Option(help="A chunk folder of `lrem embed` to index instead of "
                                                        "embedding (added chunk by chunk; docs/chunks.md).")] = None,
    backend: Annotated[Optional[str], typer.Option(help="milvus:URI/COLLECTION: upload to Milvus instead of writing a "
                                                   "FAISS folder (URI a Milvus Lite path *.db or http://host:port); "
                                                   "resumable, items already there are skipped.")] = None,
    model: Annotated[Optional[str], typer.Option(help="LREM folder, HF folder or hub name, or a built-in name "
                                                 "(default: the shipped trained model lrem-wordnet-135m).")] = None,
    factory: Annotated[str, typer.Option(help='FAISS index_factory string: "Flat", "HNSW32,Flat", "IVF1024,PQ64".')] = "Flat",
    search_params: Annotated[str, typer.Option(help='FAISS search-time parameters, e.g. "efSearch=128" or "nprobe=32".')] = "",
    milvus_index: Annotated[str, typer.Option(help="Milvus index type with --backend: FLAT (exact), HNSW, IVF_FLAT, "
                                              "AUTOINDEX.")] = "FLAT",
    upload_batch: Annotated[int, typer.Option(min=1, help="Items per Milvus request with --backend.")] = 1000,
    batch_size: BatchSize = 64,
    dtype: Dtype = "auto",
    threads: Threads = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT (or the --backend collection) if lrem "
                                            "wrote it earlier; never what lrem did not write.")] = False,
    truncate: Truncate = True,
):
    """Embed the catalog with the model (items never reason) and build a FAISS index, or index the
    chunks of `lrem embed`; with --backend, upload to a Milvus collection instead."""
    from lrem._threads import set_threads

    if (data is None) == (from_chunks is None):
        raise typer.BadParameter("give --data (embed the catalog here) or --from-chunks (vectors of `lrem embed`)",
                                 param_hint="--data / --from-chunks")
    if backend is not None:
        from lrem.vectordb import parse_spec

        if out is not None:
            raise typer.BadParameter("--out is the FAISS folder; with --backend the index is the collection",
                                     param_hint="--out")
        parse_spec(backend)  # a bad spec fails now, before any model loads
        set_threads(threads, log=_echo)
        _index_to_milvus(backend, data, from_chunks, model, milvus_index, upload_batch, batch_size, dtype, overwrite,
                         truncate)
        return
    if out is None:
        raise typer.BadParameter("missing --out (the index folder), or give --backend", param_hint="--out")
    if from_chunks is not None:
        from lrem.index import ItemIndex

        _output(out, from_chunks, overwrite=overwrite)
        set_threads(threads, log=_echo)
        idx = ItemIndex.from_chunks(from_chunks, factory=factory, search_params=search_params)
        idx.save(out)
        typer.echo(f"indexed {len(idx.item_ids)} items from {from_chunks} ({factory}, dim {idx.meta['dim']}) in "
                   f"{idx.meta['index_seconds']:.0f} s -> {out}")
        return
    from lrem.data import load_dataset
    from lrem.index import ItemIndex
    from lrem.model import LREM, default_model

    model = model or default_model()
    _output(out, data, model if Path(model).exists() else None, overwrite=overwrite)
    ds = load_dataset(data)
    set_threads(threads, log=_echo)
    lrem = LREM.from_pretrained(model, dtype=dtype, log=_echo)
    idx = ItemIndex.build(lrem, dict(ds.catalog), factory=factory, search_params=search_params,
                          batch_size=batch_size, truncate=truncate, dataset=str(data))
    idx.save(out)
    typer.echo(f"indexed {len(ds.catalog)} items ({factory}, dim {lrem.dim}) in {idx.meta['encode_seconds']:.0f} s -> {out}")
    _echo_truncated(lrem)


def _index_to_milvus(spec, data, from_chunks, model, milvus_index, upload_batch, batch_size, dtype, overwrite,
                     truncate) -> None:
    """`lrem index --backend milvus:...`: embed (only the items the collection lacks) or read chunks, upload."""
    from lrem.vectordb import upload

    if from_chunks is not None:
        from lrem.embed import chunk_files, iter_chunks, read_manifest
        from lrem.index import MODEL_KEYS

        man = read_manifest(from_chunks)
        chunk_files(from_chunks, man)  # all there, before any upload
        meta = {k: man[k] for k in (*MODEL_KEYS, "dataset") if k in man}

        def batches():
            for ids, titles, x in iter_chunks(from_chunks, show_progress=False):
                for s in range(0, len(ids), upload_batch):
                    yield ids[s:s + upload_batch], titles[s:s + upload_batch], (lambda pos, s=s, x=x: x[s:][pos])

        total, lrem = man["n_items"], None
    else:
        from lrem.data import load_dataset
        from lrem.model import LREM, default_model

        model = model or default_model()
        ds = load_dataset(data)
        lrem = LREM.from_pretrained(model, dtype=dtype, log=_echo)
        from lrem.index import model_identity

        meta = {**model_identity(lrem), "model": lrem.source or model, "dataset": str(data)}
        ids, items = list(ds.catalog), list(ds.catalog.values())

        def batches():
            for s in range(0, len(ids), upload_batch):
                part = items[s:s + upload_batch]
                yield (ids[s:s + upload_batch], [x.title for x in part],
                       lambda pos, part=part: lrem.encode_items([part[j] for j in pos], batch_size=batch_size,
                                                                truncate=truncate))

        total = len(ids)
    info = upload(spec, batches(), meta, total, overwrite=overwrite, index_type=milvus_index, log=_echo)
    typer.echo(f"uploaded {info['written']} items to {spec} ({info['skipped']} already there; {info['n_items']} in "
               f"all, dim {info['dim']}, {milvus_index}) in {info['upload_seconds']:.0f} s")
    if lrem is not None:
        _echo_truncated(lrem)


@app.command()
def embed(
    data: DataDir,
    out: Annotated[Path, typer.Option("--out", "-o", help="Chunk folder: a new or empty folder, or this command's "
                                      "earlier run folder, which it resumes (only missing chunks are encoded).")],
    model: Annotated[Optional[str], typer.Option(help="LREM folder, HF folder or hub name, or a built-in name "
                                                 "(default: the shipped trained model lrem-wordnet-135m).")] = None,
    chunk_size: Annotated[int, typer.Option(min=1, help="Items per chunk file (the most vectors a process holds).")] = 4096,
    vector_dtype: Annotated[str, typer.Option(help="float32 or float16 (half the disk; values rounded to ~1e-3 relative).")] = "float32",
    max_chunks: Annotated[Optional[int], typer.Option(min=1, help="Stop after encoding N chunks in each process "
                                                      "(rerun to continue).")] = None,
    batch_size: BatchSize = 64,
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
    from lrem.data import load_dataset
    from lrem._io import OutputError
    from lrem.embed import CHUNKS, MANIFEST, VECTOR_DTYPES, embed_catalog
    from lrem.model import LREM, default_model

    if vector_dtype not in VECTOR_DTYPES:
        raise typer.BadParameter(f"{vector_dtype!r}; expected one of {', '.join(VECTOR_DTYPES)}",
                                 param_hint="--vector-dtype")
    model = model or default_model()
    _output(out, data, model if Path(model).exists() else None, resume=True, run_files=(MANIFEST,))
    other = sorted(p.name for p in out.iterdir() if p.name[:1] != "." and p.name not in (MANIFEST, CHUNKS)) \
        if out.is_dir() else []  # (".": the marker, temp files of a rank writing the manifest)
    if other:  # another command's lrem output (an index, a model): never mixed with chunks
        raise OutputError(f"--out {out}: holds {', '.join(other[:3])}, not a chunk folder of `lrem embed`; "
                          "choose a new folder")
    ds = load_dataset(data)
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=48))  # ranks wait for the slowest
    rank, world = state.process_index, state.num_processes
    set_threads(threads, log=_echo if rank == 0 else None)
    lrem = LREM.from_pretrained(model, dtype=dtype, device=str(state.device), log=_echo if rank == 0 else (lambda *_: None))
    stats = embed_catalog(lrem, dict(ds.catalog), out, chunk_size=chunk_size, rank=rank, world=world,
                          vector_dtype=vector_dtype, batch_size=batch_size, max_chunks=max_chunks, truncate=truncate,
                          barrier=state.wait_for_everyone, dataset=str(data))
    _echo(f"rank {rank}/{world}: encoded {len(stats.encoded)} chunks ({stats.items} items) in {stats.seconds:.1f} s "
          f"({stats.items_per_second:.1f} items/s); skipped {len(stats.skipped)} written earlier"
          + ("; stopped at --max-chunks" if stats.stopped else ""))
    _echo_truncated(lrem)
    if rank == 0:
        import json as _json

        done = _json.loads((out / MANIFEST).read_text()).get("complete", False)
        typer.echo(f"wrote {out}: " + ("complete; next: lrem index --from-chunks " + str(out) + " --out INDEX" if done
                                       else "not complete; rerun the same command to encode the missing chunks"))


@app.command()
def search(
    queries: Annotated[list[str], typer.Argument(help="One or more queries.")],
    index_dir: Annotated[str, typer.Option("--index", "-i", help="Index folder from `lrem index`, or "
                                           "milvus:URI/COLLECTION.")],
    k: Annotated[int, typer.Option("-k", min=1, help="Items to show.")] = 10,
    mode: Annotated[str, typer.Option(callback=_check_mode, help=f"One of {', '.join(MODES)}.")] = "reason",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines instead of text.")] = False,
    truncate: Truncate = True,
):
    """Search the index: prints the generated CoT and the top items with scores."""
    from lrem.search import Searcher, check_search

    check_search(queries, k)  # before the model loads
    searcher = Searcher.load(index_dir, log=_echo)
    searcher.truncate = truncate
    for q, r in zip(queries, searcher.search(queries, k=k, mode=mode)):
        if as_json:
            hits = [{"item_id": h.item_id, "title": searcher.index.title(h.item_id), "score": h.score} for h in r.hits]
            typer.echo(json.dumps({"query": q, "mode": mode, "cot": r.cot, "items": hits}, ensure_ascii=False))
            continue
        typer.echo(f"query: {q}\n  cot ({mode}): {r.cot or '(none)'}")
        for rank, h in enumerate(r.hits, 1):
            typer.echo(f"  {rank:>3}. {h.score:.4f}  {h.item_id}  {searcher.index.title(h.item_id)}")


@app.command()
def serve(
    index_dir: Annotated[str, typer.Option("--index", "-i", help="Index folder from `lrem index`, or "
                                           "milvus:URI/COLLECTION.")],
    host: Annotated[Optional[str], typer.Option(help="Interface to listen on (default 127.0.0.1).")] = None,
    port: Annotated[Optional[int], typer.Option(min=0, max=65535, help="TCP port (default 8000).")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML file of ServeConfig keys.")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="Override one ServeConfig key: --set max_batch=32. Repeat.")] = [],
):
    """Serve /search and OpenAI-compatible /v1/embeddings over HTTP, with batching, a cache and a router."""
    from lrem.serve import ServeConfig
    from lrem.serve import serve as run_server

    run_server(index_dir, ServeConfig.from_yaml(config, sets=set_, host=host, port=port), log=_echo)


# ---------------------------------------------------------------- the router of auto mode

router_app = typer.Typer(help="The router of `auto` mode: which queries reason.", no_args_is_help=True)
app.add_typer(router_app, name="router")


@router_app.command("fit")
def router_fit(
    index_dir: Annotated[Path, typer.Option("--index", "-i", help="Index folder from `lrem index`, over the dataset's "
                                            "catalog; its model is the one routed.")],
    data: DataDir,
    out: Annotated[Path, typer.Option("--out", "-o", help="The index's model folder (router.json is written into "
                                      "it, and loaded with the model from then on), or a file path ending in .json.")],
    split: Annotated[str, typer.Option(help="Split whose queries it learns from (not the one you evaluate "
                                       "on).")] = "train",
    queries: Annotated[int, typer.Option(min=10, help="A fixed, seeded sample of N queries with a relevant item; "
                                         "each is searched directly and with reasoning.")] = 400,
    k: Annotated[int, typer.Option("-k", min=1, help="Label depth: reasoning wins when it ranks the first relevant "
                                   "item higher within the top k (reciprocal rank; ties: direct).")] = 10,
    holdout: Annotated[float, typer.Option(min=0.0, max=0.9, help="Share of the queries held out to measure "
                                           "it.")] = 0.25,
    threshold: Annotated[float, typer.Option(min=0.0, max=1.0, help="Reason where P(reasoning wins) > this.")] = 0.5,
    l2: Annotated[float, typer.Option(callback=_positive, help="L2 penalty on the weights (> 0; "
                                      "scikit-learn's 1/C).")] = 1.0,
    seed: int = 0,
    batch_size: BatchSize = 32,
    threads: Threads = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a router file lrem wrote earlier.")] = False,
):
    """Learn when reasoning helps: search a split's queries directly and with reasoning, fit a logistic
    regression on the direct scores and the query (`lrem.router`), print its held-out accuracy, write it."""
    from lrem._threads import set_threads
    from lrem.data import load_dataset
    from lrem.index import ItemIndex
    from lrem.router import fit_router, judged_sample, router_target
    from lrem.search import Searcher

    index = ItemIndex.load(index_dir)  # no model yet: the output is checked before any work
    target = router_target(out, index.meta.get("model"), overwrite=overwrite)
    ds = load_dataset(data)
    if set(index.item_ids) != set(ds.catalog):
        raise ValueError(f"index {index_dir} was built on another catalog than {data}")
    sample = judged_sample(ds, split, queries, seed)
    set_threads(threads, log=_echo)
    searcher = Searcher.load(index_dir, log=_echo)
    router = fit_router(searcher, sample, ds.qrels, k=k, holdout=holdout, threshold=threshold, l2=l2, seed=seed,
                        batch_size=batch_size, data=f"{data}:{split}", show_progress=True, log=_echo)
    router.save(target)
    f, h = router.fitted, router.fitted["heldout"]
    typer.echo(f"reasoning beat direct on {f['reason_won']} of {f['queries']} queries (rr@{k})")
    if h:
        typer.echo(f"held out {h['queries']}: accuracy {h['accuracy']:.3f} (majority {h['majority_accuracy']:.3f}), "
                   f"would reason on {100 * h['reasoned_share']:.0f}%; mrr@{k} direct {h['mrr_direct']:.4f}, "
                   f"reason {h['mrr_reason']:.4f}, routed {h['mrr_routed']:.4f}, oracle {h['mrr_oracle']:.4f}")
    typer.echo(f"wrote {target}")


# ---------------------------------------------------------------- evaluation

@app.command("eval")
def eval_(
    data: DataDir,
    out: Out,
    system: Annotated[list[str], typer.Option("--system", "-s", help=f"NAME=SPEC, SPEC in bm25, minilm, MODEL:MODE (MODEL a model or index folder; MODE one of {', '.join(MODES)}, or auto@SHARE; auto-margin[@SHARE]: the margin router even where the model has a router.json). Repeat.")],
    split: Annotated[str, typer.Option(help="dev, test, train, ... or all.")] = "dev",
    limit: Annotated[Optional[int], typer.Option(min=1, help="Evaluate a fixed, seeded sample of N queries.")] = None,
    seed: int = 0,
    k: Annotated[int, typer.Option(min=1, help="Depth retrieved per query (metrics use 1, 10, 100).")] = 100,
    batch_size: BatchSize = 32,
    examples: Annotated[int, typer.Option(min=0, help="Print (and put in report.md) this many example queries with "
                                          "CoTs and top items, spread over the slices (report.md: 5 when 0).")] = 0,
    figure: Annotated[Optional[list[Path]], typer.Option(help="A PNG to add to report.md (e.g. OUT/curves.png of "
                                                         "`lrem train rl`). Repeat.")] = None,
    threads: Threads = None,
    overwrite: Overwrite = False,
    truncate: Truncate = True,
):
    """Score systems on a split: HitRate/Precision/nDCG/MRR overall and per slice; writes a report."""
    from lrem._io import claim_dir
    from lrem._threads import set_threads
    from lrem.data import load_dataset
    from lrem.evaluate import N_EXAMPLES, evaluate_systems, format_examples, format_table, write_report
    from lrem.search import build_systems, parse_system

    specs = dict(parse_system(s) for s in system)
    models = [spec.rpartition(":")[0] for spec in specs.values()]
    _output(out, data, *[m for m in models if m and Path(m).exists()], *(figure or ()), overwrite=overwrite,
            run_files=("metrics.json", "report.md"))  # a report of an older lrem can be refreshed too
    ds = load_dataset(data)
    set_threads(threads, log=_echo)
    systems = build_systems(specs, ds, batch_size=batch_size, log=_echo, truncate=truncate)
    result = evaluate_systems(ds, split, systems, limit=limit, seed=seed, k=k, log=_echo)
    import shlex

    result["command"] = shlex.join(["lrem", *sys.argv[1:]])  # report.md records how it was made
    for name, spec in specs.items():
        result["systems"][name]["spec"] = spec
    write_report(result, claim_dir(out), ds, n_examples=examples or N_EXAMPLES, figures=figure or ())  # the examples printed
    typer.echo(format_table(result))
    if examples:
        typer.echo(format_examples(result, ds, examples))
    typer.echo(f"report: {out / 'report.md'}")
    for model in {id(r.searcher.model): r.searcher.model for r in systems.values() if hasattr(r, "searcher")}.values():
        _echo_truncated(model)


def _echo_truncated(model) -> None:
    """Say how many inputs were cut to the model's token limits (`--truncate`)."""
    for side, n in sorted(model.truncated.items()):
        if n:
            limit = "max_query_tokens" if side == "query" else "max_item_tokens"
            _echo(f"{model.source}: truncated {n} {side} text(s) to {getattr(model.config, limit)} tokens ({limit})")


@app.command()
def export(
    out: Out,
    model: Annotated[str, typer.Option(help="LREM folder (or a built-in name) to export.")],
    to: Annotated[str, typer.Option(help="Target format: sentence-transformers.")] = "sentence-transformers",
    dtype: Annotated[str, typer.Option(help="Weights to write: auto, float32 or bfloat16.")] = "float32",
):
    """Write a folder sentence-transformers loads (items, and queries in direct mode: same embeddings as
    lrem); reasoning needs `lrem serve`."""
    from lrem.export import FORMATS, export as run_export
    from lrem.model import LREM

    if to not in FORMATS:
        raise typer.BadParameter(f"{to!r}; expected one of {', '.join(FORMATS)}", param_hint="--to")
    run_export(LREM.from_pretrained(model, dtype=dtype, log=_echo), to, out, log=typer.echo)


# ---------------------------------------------------------------- triplet construction

@app.command()
def construct(
    data: DataDir,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: a new or empty folder, or this command's "
                                      "earlier run folder, which it resumes.")],
    config: Annotated[Optional[Path], typer.Option(help="YAML file of ConstructConfig values (configs/construct.yaml).")] = None,
    split: Annotated[Optional[str], typer.Option(help="Split to take queries from (default train).")] = None,
    teacher: Annotated[Optional[str], typer.Option(help="openai:BASE_URL#MODEL, hf:NAME_OR_PATH or file:PATH.jsonl.")] = None,
    judge: Annotated[Optional[str], typer.Option(help="qrels, llm, llm:TEACHER_SPEC or cross-encoder:PATH.")] = None,
    retriever: Annotated[Optional[str], typer.Option(help="The direct retriever: bm25, minilm or MODEL:direct.")] = None,
    hint: Annotated[Optional[str], typer.Option(help="none (the paper) or gold (teacher sees one relevant item).")] = None,
    teacher_mode: Annotated[Optional[str], typer.Option(help="two-step (the paper: reason, then extract) or list "
                                                        "(one call: the phrase list at once).")] = None,
    candidates: Annotated[Optional[int], typer.Option(min=0, help="Show the teacher the retriever's top-N titles "
                                                      "(grounded reasoning; 0: none).")] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="A fixed, seeded sample of N queries.")] = None,
    seed: Optional[int] = None,
    k_mine: Annotated[Optional[int], typer.Option(min=1, help="Mining depth: difficult when hitrate@k_mine < --mine-max-hitrate.")] = None,
    mine_max_hitrate: Annotated[Optional[float], typer.Option(min=0.0, max=1.0)] = None,
    keep_all: Annotated[Optional[bool], typer.Option("--keep-all/--mine", help="Keep every query (no mining).")] = None,
    k_gain: Annotated[Optional[int], typer.Option(min=1, help="Depth of the two retrievals of the gain set.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Queries per step (outcomes are appended per batch).")] = None,
):
    """Build Query-CoT-Item triplets: mine, reason, extract, post-process, gain set, judge (resumable)."""
    from lrem.construct import CONFIG, OUTCOMES, ConstructConfig, construct as run_construct, format_stats
    from lrem.teachers import TeacherError

    flags = dict(split=split, teacher=teacher, judge=judge, retriever=retriever, hint=hint, teacher_mode=teacher_mode, candidates=candidates,
                 limit=limit, seed=seed,
                 k_mine=k_mine, mine_max_hitrate=mine_max_hitrate, keep_all=keep_all, k_gain=k_gain,
                 batch_size=batch_size)
    _output(out, data, config, resume=True, run_files=(CONFIG, OUTCOMES))  # its own run folder is resumed
    try:
        stats = run_construct(data, out, ConstructConfig.load(config, **flags), log=_echo)
    except TeacherError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    typer.echo(format_stats(stats))
    written = [p for p in (out / "triplets.jsonl", out / "stats.json") if p.is_file()]  # name only what is there
    if written:
        typer.echo(f"wrote {' and '.join(map(str, written))}")


# ---------------------------------------------------------------- shipping a trained model

@app.command()
def delta(
    model: Annotated[str, typer.Option(help="A trained LREM folder (e.g. OUT of `lrem train`).")],
    out: Out,
    rank: Annotated[int, typer.Option(min=1, help="Rank of each weight matrix's change (truncated SVD).")] = 32,
    base: Annotated[Optional[str], typer.Option(help="The built-in backbone it was trained from (default: "
                                                "the one its lrem_config.json names).")] = None,
    overwrite: Overwrite = False,
):
    """Store a trained model as a small delta from its built-in backbone (a folder under
    src/lrem/models/ ships as a built-in model name)."""
    from lrem.delta import DELTA_JSON, DELTA_WEIGHTS, save_delta

    _output(out, model, overwrite=overwrite, run_files=(DELTA_JSON, DELTA_WEIGHTS))  # also a delta of an older lrem

    meta = save_delta(model, out, base=base, rank=rank, log=_echo)
    f = meta["fidelity"]
    typer.echo(f"wrote {out}: {meta['bytes'] / 1e6:.1f} MB, rank {rank}, base {meta['base']}; embedding cosine to "
               f"the full model: queries min {f['query_cos_min']:.4f}, items min {f['item_cos_min']:.4f}")


# ---------------------------------------------------------------- training

train_app = typer.Typer(help="Train LREM stage 1 (cold start), stage 2 (RL) or the direct-embedding baseline (Accelerate; "
                             "run under torchrun / accelerate launch for several processes).", no_args_is_help=True)
app.add_typer(train_app, name="train")
TrainConfig = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML file of SFTConfig values "
                                                     "(configs/coldstart.yaml, configs/direct.yaml).")]
TrainData = Annotated[Optional[Path], typer.Option("--data", "-d", help="Dataset folder: adds the split's qrels pairs "
                                                   "of queries without a CoT, and checks triplet ids.")]
Model = Annotated[Optional[str], typer.Option(help="Base model (default: the config's).")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint in OUT/checkpoints.")]
Steps = Annotated[Optional[int], typer.Option(min=1, help="Stop after N steps (default: num_epochs over the data).")]
CotShare = Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Share of each batch with a teacher CoT "
                                                   "(0: no mixing); give cold start and direct the same value.")]
TrainBatch = Annotated[Optional[int], typer.Option(min=1)]
SaveSteps = Annotated[Optional[int], typer.Option(min=0, help="Checkpoint every N steps (0: only at the end).")]
LoraRank = Annotated[Optional[int], typer.Option(min=0, help="> 0: train LoRA adapters of this rank and the new "
                                                 "tokens' rows, the rest frozen (saved merged); 0: every weight.")]


LearningRate = Annotated[Optional[float], typer.Option(callback=_positive, help="Peak learning rate (> 0).")]


def _train(config, out, triplets, data, split, resume, use_cot, overwrite=False, **flags) -> None:
    from lrem.data import load_dataset
    from lrem.train import SFTConfig, train

    _output(out, config, triplets, data, overwrite=overwrite, resume=resume, run_files=("checkpoints",) if resume else ())

    defaults = {} if config else ({} if use_cot else {"use_cot": False, "sft_weight": 0.0})
    cfg = SFTConfig.load(config, **{**defaults, **flags})
    if cfg.use_cot != use_cot:
        raise ValueError(f"{config}: use_cot={cfg.use_cot}; `lrem train {'coldstart' if use_cot else 'direct'}` "
                         f"needs use_cot={use_cot}")
    train(cfg, out, triplets=triplets, dataset=load_dataset(data) if data else None, split=split, resume=resume,
          overwrite=overwrite, log=_echo)


@train_app.command("coldstart")
def train_coldstart(
    out: Out,
    triplets: Annotated[Optional[Path], typer.Option(help="triplets.jsonl from `lrem construct`.")] = None,
    config: TrainConfig = None, data: TrainData = None, split: str = "train", model: Model = None,
    max_steps: Steps = None, batch_size: TrainBatch = None, learning_rate: LearningRate = None,
    save_steps: SaveSteps = None, seed: Optional[int] = None, cot_share: CotShare = None, lora_r: LoraRank = None,
    resume: Resume = False, overwrite: Overwrite = False,
):
    """Stage 1: L = 0.1 L_SFT (teacher CoT) + 1.0 L_InfoNCE (in-batch negatives)."""
    _train(config, out, triplets, data, split, resume, True, overwrite, model=model, max_steps=max_steps,
           batch_size=batch_size, learning_rate=learning_rate, save_steps=save_steps, seed=seed, cot_share=cot_share,
           lora_r=lora_r)


@train_app.command("direct")
def train_direct(
    out: Out,
    pairs: Annotated[Optional[Path], typer.Option(help="A triplets.jsonl (its CoTs are ignored).")] = None,
    config: TrainConfig = None, data: TrainData = None, split: str = "train", model: Model = None,
    max_steps: Steps = None, batch_size: TrainBatch = None, learning_rate: LearningRate = None,
    save_steps: SaveSteps = None, seed: Optional[int] = None, cot_share: CotShare = None, lora_r: LoraRank = None,
    resume: Resume = False, overwrite: Overwrite = False,
):
    """The direct-embedding baseline: InfoNCE only, `<think></think><emb>`, same pairs and schedule."""
    _train(config, out, pairs, data, split, resume, False, overwrite, model=model, max_steps=max_steps,
           batch_size=batch_size, learning_rate=learning_rate, save_steps=save_steps, seed=seed, cot_share=cot_share,
           lora_r=lora_r)


@train_app.command("rl")
def train_rl(
    out: Out,
    init: Annotated[Path, typer.Option(help="The stage-1 (cold start) model folder to start from.")],
    pairs: Annotated[Optional[Path], typer.Option(help="RL pairs (JSONL: query_id, query, item_id, item_title); "
                                                  "default INIT/rl_pairs.jsonl, held back by stage 1.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML of RLConfig values (configs/rl.yaml).")] = None,
    max_steps: Steps = None, batch_size: TrainBatch = None,
    num_generations: Annotated[Optional[int], typer.Option(min=1)] = None,
    rank_pool: Annotated[Optional[str], typer.Option(help="What r_acc ranks among: batch (paper), mined, catalog "
                                                     "(RLConfig.rank_pool; mined and catalog need --data).")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", "-d", help="Dataset folder: the item bank of the mined "
                                                 "and catalog rank pools (RLConfig.rank_data).")] = None,
    learning_rate: LearningRate = None, save_steps: SaveSteps = None, seed: Optional[int] = None,
    lora_r: LoraRank = None, resume: Resume = False, overwrite: Overwrite = False,
):
    """Stage 2: L = 1.0 L_GRPO (G sampled CoTs per query, rank reward) + 0.1 L_InfoNCE."""
    from lrem.train import RLConfig, train_rl as run

    _output(out, init, pairs, config, overwrite=overwrite, resume=resume, run_files=("checkpoints",) if resume else ())
    cfg = RLConfig.load(config, max_steps=max_steps, batch_size=batch_size, num_generations=num_generations,
                        learning_rate=learning_rate, save_steps=save_steps, seed=seed, rank_pool=rank_pool,
                        rank_data=str(data) if data else None, lora_r=lora_r)
    run(cfg, init, out, pairs=pairs, resume=resume, overwrite=overwrite, log=_echo)


def main() -> None:
    """Run the CLI; bad input (lrem's errors, file system errors) is one line on stderr and exit
    code 2, like a usage error. LREM_DEBUG=1 shows the traceback instead."""
    import yaml

    try:
        app()
    except (ValueError, OSError, RecursionError, yaml.YAMLError) as e:
        if os.environ.get("LREM_DEBUG", "") not in ("", "0"):
            raise
        if isinstance(e, RecursionError):
            e = "input nested too deeply (RecursionError)"
        message = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the library wrote
        typer.echo(f"error: {message}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
