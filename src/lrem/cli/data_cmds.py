"""`lrem data ...` (build, convert, check and sample datasets) and `lrem construct` (triplets)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lrem.cli.options import DataDir, Out, Overwrite, check_output, echo_err
from lrem.data.converters import FORMATS


def _print_counts(ds) -> None:
    c = ds.counts()
    typer.echo(f"{ds.name}: {c['items']} items, {c['qrels']} qrels")
    for split, cats in c["queries"].items():
        detail = ", ".join(f"{k} {v}" for k, v in cats.items() if k not in ("total",))
        typer.echo(f"  {split}: {cats['total']} queries ({detail})")


# ---------------------------------------------------------------- data


def data_wordnet(out: Out, wordnet_dir: Annotated[Path, typer.Option(help="WordNet 3.0 dict folder.")] = Path("/usr/share/wordnet"),
                 overwrite: Overwrite = False):
    """Build the WordNet product benchmark (artifacts and food; definition and category queries)."""
    from lrem.data import build_wordnet, save_dataset

    check_output(out, wordnet_dir, overwrite=overwrite)
    ds = build_wordnet(wordnet_dir, log=typer.echo)
    save_dataset(ds, out)
    typer.echo(f"wrote {out}")


def data_convert(
    src: Annotated[Path, typer.Argument(help="Source folder or file.")],
    out: Out,
    fmt: Annotated[str, typer.Option("--format", help=f"One of {', '.join(FORMATS)} (lrem: a folder of "
                                     "CSV/TSV/Parquet/JSONL tables; auto: guess from the files).")] = "auto",
    locale: Annotated[Optional[str], typer.Option(help="ESCI only: keep one locale (us, es, jp).")] = None,
    overwrite: Overwrite = False,
):
    """Convert BEIR / ESCI / WANDS data (or CSV/TSV/Parquet tables) to the lrem folder format."""
    from lrem.data import convert, save_dataset

    check_output(out, src, overwrite=overwrite)
    ds = convert(src, fmt, locale=locale, log=echo_err)  # warnings: one plain line each on stderr
    save_dataset(ds, out)
    if ds.source_rows:
        typer.echo("read " + ", ".join(f"{n} rows from {f}" for f, n in ds.source_rows.items()))
    _print_counts(ds)
    typer.echo(f"wrote {out}")


def data_check(data: Annotated[Path, typer.Argument(help="Dataset folder.")]):
    """Validate a dataset folder and print its counts (exit 2 with file:line: field on bad input)."""
    from lrem.data import load_dataset

    _print_counts(load_dataset(data))


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

    check_output(out, data, overwrite=overwrite)
    ds = sample_dataset(load_dataset(data), queries, split, distractors, seed)
    save_dataset(ds, out)
    _print_counts(ds)


def construct(
    data: DataDir,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: a new or empty folder, or this command's "
                                      "earlier run folder, which it resumes.")],
    config: Annotated[Optional[Path], typer.Option(help="YAML file of ConstructConfig values (configs/construct.yaml).")] = None,
    split: Annotated[Optional[str], typer.Option(help="Split to take queries from (default train).")] = None,
    teacher: Annotated[Optional[str], typer.Option(help="openai:BASE_URL#MODEL, hf:NAME_OR_PATH, file:PATH.jsonl or labels.")] = None,
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
    from lrem.construct import (CONFIG, OUTCOMES, ConstructConfig, construct as run_construct, format_stats,
                                is_construct_run)
    from lrem.teachers import TeacherError

    flags = dict(split=split, teacher=teacher, judge=judge, retriever=retriever, hint=hint, teacher_mode=teacher_mode, candidates=candidates,
                 limit=limit, seed=seed,
                 k_mine=k_mine, mine_max_hitrate=mine_max_hitrate, keep_all=keep_all, k_gain=k_gain,
                 batch_size=batch_size)
    check_output(out, data, config, resume=True, run_files=(CONFIG, OUTCOMES))  # its own run folder is resumed
    if not is_construct_run(out):  # another command's output (an index, a model): not to be written into
        raise ValueError(f"--out {out}: an lrem output, but not a `lrem construct` run; use a new --out")
    try:
        stats = run_construct(data, out, ConstructConfig.load(config, **flags), log=echo_err)
    except TeacherError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    typer.echo(format_stats(stats))
    written = [p for p in (out / "triplets.jsonl", out / "stats.json") if p.is_file()]  # name only what is there
    if written:
        typer.echo(f"wrote {' and '.join(map(str, written))}")
