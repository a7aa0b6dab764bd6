"""`lrem search`, `serve`, `eval`, `export` and `delta`: using a model and its index, scoring
systems, and shipping a trained model."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from lrem._defaults import QUERY_BATCH
from lrem.cli.options import (BatchSize, DataDir, Out, Overwrite, Threads, Truncate, check_output, echo_err,
                              echo_truncated)
from lrem.fusion import LEXICAL_WEIGHT
from lrem.search_types import MODES


def _check_mode(mode: str) -> str:
    """Reject an unknown mode before any model loads."""
    if mode not in MODES:
        raise typer.BadParameter(f"{mode!r} is not a mode; expected one of {', '.join(MODES)}")
    return mode


def search(
    index_dir: Annotated[str, typer.Option("--index", "-i", help="Index folder from `lrem index`, or "
                                           "milvus:URI/COLLECTION.")],
    queries: Annotated[Optional[list[str]], typer.Argument(help="One or more queries (or --from-file).")] = None,
    k: Annotated[int, typer.Option("-k", min=1, help="Items to show.")] = 10,
    mode: Annotated[str, typer.Option(callback=_check_mode, help=f"One of {', '.join(MODES)}. auto (as lrem serve): "
                                      "embed directly and reason only where the model's router expects a gain.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines instead of text.")] = False,
    truncate: Truncate = True,
    runtime: Annotated[str, typer.Option(help="auto: LREM folders run without importing transformers where they "
                                         "can (a faster start, the same results); transformers; native.")] = "auto",
    hybrid: Annotated[bool, typer.Option("--hybrid", help="Hybrid search: fuse the MODE ranking with BM25 over the "
                                         "index's titles by reciprocal rank fusion (scores are then RRF scores).")] = False,
    lexical_weight: Annotated[float, typer.Option(min=0.0, help="With --hybrid: the weight of BM25's ranks "
                                                  "(the dense ranks weigh 1).")] = LEXICAL_WEIGHT,
    filter_: Annotated[list[str], typer.Option("--filter", help="FIELD=VALUE[|VALUE...]: only items whose FIELD "
                                               "(category, brand or color, as the catalog gave them) is one of the "
                                               "values. Repeat: every field must match.")] = [],
    from_file: Annotated[Optional[Path], typer.Option("--from-file", help="Search every query of this file "
                                                      "(.jsonl of query_id/text rows, a .csv/.tsv/.parquet table "
                                                      "with those columns, or text: a query a line) "
                                                      "into --out, resumably.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="With --from-file: the results file, JSON lines "
                                                "(or a TREC run where it ends in .trec); - for standard output "
                                                "(not resumable).")] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", help="With --from-file: jsonl or trec (default: by "
                                               "--out's extension).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out file.")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Queries per model call with --from-file.")] = QUERY_BATCH,
):
    """Search the index: prints the generated CoT and the top items with scores (or, with
    --from-file, writes every query's results to --out)."""
    from lrem.search import check_search

    if (from_file is None) == (not queries):
        raise typer.BadParameter("give queries, or --from-file FILE (one of the two)", param_hint="QUERIES")
    if from_file is not None and as_json:
        raise typer.BadParameter("--from-file writes --out (JSON lines unless it ends in .trec); drop --json",
                                 param_hint="--json")
    if from_file is not None and out is None:
        raise typer.BadParameter("--from-file needs --out FILE", param_hint="--out")
    if from_file is None and (out is not None or fmt is not None):
        raise typer.BadParameter("--out and --format go with --from-file", param_hint="--out")
    where = _parse_filters(filter_)
    if from_file is not None:
        return _search_file(index_dir, from_file, out, fmt, overwrite, k, mode, where, hybrid, lexical_weight,
                            truncate, runtime, batch_size)
    check_search(queries, k)  # before the model loads
    searcher, retriever, label = _retriever(index_dir, runtime, truncate, mode, where, hybrid, lexical_weight)
    results = retriever.search(queries, k=k)
    for q, r in zip(queries, results):
        if as_json:
            hits = [{"item_id": h.item_id, "title": searcher.index.title(h.item_id), "score": h.score} for h in r.hits]
            typer.echo(json.dumps({"query": q, "mode": label, "cot": r.cot, "items": hits}, ensure_ascii=False))
            continue
        typer.echo(f"query: {q}\n  cot ({label}): {r.cot or '(none)'}")
        for rank, h in enumerate(r.hits, 1):
            typer.echo(f"  {rank:>3}. {h.score:.4f}  {h.item_id}  {searcher.index.title(h.item_id)}")


def _retriever(index_dir, runtime, truncate, mode, where, hybrid, lexical_weight):
    """(the loaded Searcher, the retriever `lrem search` asks, its label for the output): the
    MODE ranking alone, or fused with BM25 where --hybrid."""
    from lrem.search import Searcher

    searcher = Searcher.load(index_dir, log=echo_err, runtime=runtime)
    searcher.truncate = truncate
    if where and hasattr(searcher.index, "filter_hints"):  # a Milvus collection filters in Milvus
        for hint in searcher.index.filter_hints(where):
            echo_err(f"note: {hint}")
    if hybrid:
        return searcher, searcher.hybrid(mode, lexical_weight, where=where), f"{mode}+bm25"
    return searcher, searcher.retriever(mode, where=where), mode


def _search_file(index_dir, from_file, out, fmt, overwrite, k, mode, where, hybrid, lexical_weight, truncate,
                 runtime, batch_size) -> None:
    """`lrem search --from-file`: read and check the queries and the output first, then search."""
    from lrem.bulk import output_format, read_queries, search_to_file, search_to_stream

    queries = read_queries(from_file)
    fmt = output_format(out, fmt)
    if str(out) == "-":  # a pipe: results as they come, the summary on stderr
        if hasattr(sys.stdout, "reconfigure"):
            sys.stdout.reconfigure(encoding="utf-8")  # JSON lines are UTF-8, as the file path writes them
        searcher, retriever, label = _retriever(index_dir, runtime, truncate, mode, where, hybrid, lexical_weight)
        search_to_stream(retriever, searcher.index.title, queries, sys.stdout, k=k, fmt=fmt, tag=label,
                         batch_size=batch_size)
        typer.echo(f"wrote {len(queries)} queries' top {k} to standard output ({fmt})", err=True)
        return
    from lrem._io import prepare_file_output
    from lrem.bulk import PARTIAL_SUFFIX

    local = index_dir if Path(index_dir).exists() else None  # not a milvus: spec
    prepare_file_output(out, (from_file, local), overwrite, also=[f"{out}{PARTIAL_SUFFIX}"])
    searcher, retriever, label = _retriever(index_dir, runtime, truncate, mode, where, hybrid, lexical_weight)
    settings = {"index": _index_identity(index_dir, searcher.index), "mode": label, "filter": where or None,
                "lexical_weight": lexical_weight if hybrid else None,
                "queries": str(Path(from_file).resolve())}  # however it is spelt, from any folder
    info = search_to_file(retriever, searcher.index.title, queries, out, k=k, fmt=fmt, settings=settings,
                          batch_size=batch_size, overwrite=overwrite)
    typer.echo(f"wrote {info['queries']} queries' top {k} to {out} ({fmt}; {info['searched']} searched now, "
             f"{info['resumed']} from an earlier run)")


def _index_identity(index_dir: str, index) -> dict | str:
    """What a resumed `--from-file` search must find again: the index folder (its real path), the
    weights that embedded it and its FAISS file's size and time, so a rebuilt index is not mixed
    in; a milvus: spec as given."""
    path = Path(index_dir)
    if not path.is_dir():
        return str(index_dir)
    stat = (path / "index.faiss").stat()
    return {"path": str(path.resolve()), "model_fingerprint": index.meta.get("model_fingerprint"),
            "index_file": [stat.st_size, stat.st_mtime_ns]}


def _parse_filters(items: list[str]) -> dict[str, list[str]]:
    """--filter FIELD=VALUE[|VALUE...], repeated -> {field: [values]}."""
    from lrem.index_base import FILTER_FIELDS

    where: dict[str, list[str]] = {}
    for item in items:
        name, eq, values = item.partition("=")
        if not eq or not name.strip() or not values:
            raise typer.BadParameter(f"{item!r}: expected FIELD=VALUE[|VALUE...]", param_hint="--filter")
        if name.strip() not in FILTER_FIELDS:
            raise typer.BadParameter(f"{name.strip()!r} is not a filter field; use one of {', '.join(FILTER_FIELDS)}",
                                     param_hint="--filter")
        where.setdefault(name.strip(), []).extend(v.strip() for v in values.split("|"))
    return where


def serve(
    index_dir: Annotated[str, typer.Option("--index", "-i", help="Index folder from `lrem index`, or "
                                           "milvus:URI/COLLECTION.")],
    host: Annotated[Optional[str], typer.Option(help="Interface to listen on (default 127.0.0.1).")] = None,
    port: Annotated[Optional[int], typer.Option(min=0, max=65535, help="TCP port (default 8000).")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML file of ServeConfig keys.")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="Override one ServeConfig key: --set max_batch=32. Repeat.")] = [],
):
    """Serve /search, OpenAI-compatible /v1/embeddings and TEI/Cohere-style rerank over HTTP, with batching, a cache and a router."""
    from lrem.serve import ServeConfig
    from lrem.serve import serve as run_server

    run_server(index_dir, ServeConfig.from_yaml(config, sets=set_, host=host, port=port), log=echo_err)


def cache(
    index_dir: Annotated[str, typer.Option("--index", "-i", help="Index folder from `lrem index`, or "
                                           "milvus:URI/COLLECTION (the one `lrem serve` will serve).")],
    from_file: Annotated[Path, typer.Option("--from-file", help="Queries (.jsonl of query_id/text rows, a .csv/.tsv/"
                                            ".parquet table, or text: a query a line), most frequent first.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The cache file (.npz) for `lrem serve --set "
                                      "cache_path=OUT`; an earlier one of the same model is resumed.")],
    kinds: Annotated[str, typer.Option(help="Comma-separated: direct, reason (auto mode needs both).")] = "direct,reason",
    batch_size: Annotated[int, typer.Option(min=1, help="Queries per model call.")] = QUERY_BATCH,
    runtime: Annotated[str, typer.Option(help="auto, transformers or native (as lrem search).")] = "auto",
):
    """Precompute `lrem serve`'s query cache for a file of queries (the head of a query log), so
    those queries are answered without running the model: reasoning costs nothing for them."""
    from lrem._io import prepare_file_output
    from lrem.batching import EmbeddingCache
    from lrem.bulk import read_queries
    from lrem.search import Searcher
    from lrem.serve_service import warm_cache

    # before the model loads: OUT may be new or an lrem cache (resumed), never an input, a folder or another file
    local = index_dir if Path(index_dir).exists() else None  # not a milvus: spec
    prepare_file_output(out, (from_file, local), overwrite=True)  # overwrite: an existing cache is checked next
    try:
        EmbeddingCache.check_file(out)
    except ValueError as e:
        raise ValueError(f"--out {e}; choose another path (lrem cache resumes or replaces only its own cache "
                         "files)") from None
    queries = [text for _, text in read_queries(from_file)]
    chosen = tuple(k.strip() for k in kinds.split(",") if k.strip())
    searcher = Searcher.load(index_dir, log=echo_err, runtime=runtime)
    info = warm_cache(searcher, queries, out, kinds=chosen, batch_size=batch_size)
    typer.echo(f"cached {info['queries']} queries x {len(chosen)} ({', '.join(chosen)}) in {out}: {info['computed']} "
               f"computed now, {info['resumed']} entries from an earlier run; serve with --set cache_path={out} "
               f"--set cache_size={max(info['entries'], 10_000)}")


def eval_(
    data: DataDir,
    out: Out,
    system: Annotated[list[str], typer.Option("--system", "-s", help=f"NAME=SPEC, SPEC in bm25, minilm, MODEL:MODE (MODEL a model or index folder; MODE one of {', '.join(MODES)}, or auto@SHARE; auto-margin[@SHARE]: the margin router even where the model has a router.json), run:FILE (a TREC run file: another engine's rankings), PART+PART (hybrid: reciprocal rank fusion, WEIGHT*PART weighs one), or FIRST>MODEL:MODE (rerank FIRST's top 100 by MODEL in MODE; FIRST>N>MODEL:MODE: its top N). Repeat.")],
    split: Annotated[str, typer.Option(help="dev, test, train, ... or all.")] = "dev",
    limit: Annotated[Optional[int], typer.Option(min=1, help="Evaluate a fixed, seeded sample of N queries.")] = None,
    seed: int = 0,
    min_relevance: Annotated[int, typer.Option(min=1, help="Count only judgements of at least N as relevant (ESCI: "
                                               "3 Exact, 2 Substitute, 1 Complement); nDCG keeps their grades.")] = 1,
    k: Annotated[int, typer.Option("--k", "-k", min=1, help="Depth retrieved per query (metrics use 1, 10, 100).")] = 100,
    batch_size: BatchSize = QUERY_BATCH,
    examples: Annotated[int, typer.Option(min=0, help="Print (and put in report.md) this many example queries with "
                                          "CoTs and top items, spread over the slices (report.md: 5 when 0).")] = 0,
    figure: Annotated[Optional[list[Path]], typer.Option(help="A PNG to add to report.md (e.g. OUT/curves.png of "
                                                         "`lrem train rl`). Repeat.")] = None,
    threads: Threads = None,
    overwrite: Overwrite = False,
    truncate: Truncate = True,
):
    """Score systems on a split: HitRate/Precision/nDCG/MRR overall and per slice; writes a report."""
    from lrem._threads import set_threads
    from lrem.data import load_dataset
    from lrem.evaluate import N_EXAMPLES, evaluate_systems, format_examples, format_table, write_report
    from lrem.evaluate_report import METRICS_JSON, check_figures, is_eval_output
    from lrem.runfile import trec_files
    from lrem.search import build_systems, parse_system, system_parts

    specs = {}
    for name, spec in map(parse_system, system):
        if name in specs:  # dict() would keep the last silently
            raise ValueError(f"--system: the name {name!r} is given twice; name each system once")
        specs[name] = spec
    trec_files(specs)  # two names that share a runs/*.trec file: refused now, not after every system ran
    check_figures(figure or ())
    parts = [part for spec in specs.values() for part in system_parts(spec)]
    models = [part.rpartition(":")[0] for part in parts]
    check_output(out, data, *[m for m in models if m and Path(m).exists()], *(figure or ()), overwrite=overwrite,
            run_files=(METRICS_JSON, "report.md"),  # a report of an older lrem can be refreshed too
            in_place=True)  # a refresh replaces the report's own files only: a user's notes stay
    if not is_eval_output(out):  # another command's output (a model, an index): not to be written into
        raise ValueError(f"--out {out}: an lrem output, but not a `lrem eval` report; use a new --out "
                         "(--overwrite replaces only an earlier report)")
    ds = load_dataset(data).at_relevance(min_relevance)
    ds.split_queries(split)  # an unknown split: refused before the catalog is embedded
    set_threads(threads, log=echo_err)
    systems = build_systems(specs, ds, batch_size=batch_size, log=echo_err, truncate=truncate)
    result = evaluate_systems(ds, split, systems, limit=limit, seed=seed, k=k, log=echo_err)
    import shlex

    result["command"] = shlex.join(["lrem", *sys.argv[1:]])  # report.md records how it was made
    for name, spec in specs.items():
        result["systems"][name]["spec"] = spec
    write_report(result, out, ds, n_examples=examples or N_EXAMPLES, figures=figure or ())  # the examples printed
    typer.echo(format_table(result))
    if examples:
        typer.echo(format_examples(result, ds, examples))
    typer.echo(f"report: {out / 'report.md'}")
    def searchers(r) -> list:  # every LREM searcher a system uses: inside fusions and rerankers too
        inner = [*getattr(r, "parts", []), *([r.first] if hasattr(r, "first") else [])]
        return ([r.searcher] if hasattr(r, "searcher") else []) + [s for p in inner for s in searchers(p)]

    for model in {id(s.model): s.model for r in systems.values() for s in searchers(r)}.values():
        echo_truncated(model)


def export(
    out: Out,
    model: Annotated[str, typer.Option(help="LREM folder (or a built-in name) to export.")],
    to: Annotated[str, typer.Option(help="Target format: sentence-transformers.")] = "sentence-transformers",
    dtype: Annotated[str, typer.Option(help="Weights to write: auto, float32 or bfloat16.")] = "float32",
    overwrite: Overwrite = False,
):
    """Write a folder sentence-transformers loads (items, and queries in direct mode: same embeddings as
    lrem); reasoning needs `lrem serve`."""
    from lrem.export import FORMATS, export as run_export
    from lrem.model import LREM

    if to not in FORMATS:
        raise typer.BadParameter(f"{to!r}; expected one of {', '.join(FORMATS)}", param_hint="--to")
    check_output(out, model if Path(model).exists() else None, overwrite=overwrite)  # before the model loads
    run_export(LREM.from_pretrained(model, dtype=dtype, log=echo_err), to, out, log=typer.echo)


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
    from lrem.delta import DELTA_JSON, DELTA_WEIGHTS
    from lrem.delta_save import save_delta

    check_output(out, model, overwrite=overwrite, run_files=(DELTA_JSON, DELTA_WEIGHTS))  # also a delta of an older lrem

    meta = save_delta(model, out, base=base, rank=rank, log=echo_err)
    f = meta["fidelity"]
    typer.echo(f"wrote {out}: {meta['bytes'] / 1e6:.1f} MB, rank {rank}, base {meta['base']}; embedding cosine to "
               f"the full model: queries min {f['query_cos_min']:.4f}, items min {f['item_cos_min']:.4f}")
