"""Option types and helpers the `lrem` command families share (`lrem.cli`): --out, --data,
--batch-size, --dtype, --threads, --truncate, the --out check and messages on stderr."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

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


def check_output(out: Path, *inputs, overwrite: bool = False, resume: bool = False, run_files=(),
                 in_place: bool = False) -> Path:
    """Refuse, before any work, an --out that is an input, a file or a folder lrem did not write."""
    from lrem._io import prepare_output

    return prepare_output(out, inputs, overwrite=overwrite, resume=resume, run_files=run_files, in_place=in_place)


Truncate = Annotated[bool, typer.Option("--truncate/--no-truncate", help="Inputs over the model's token limits "
                                        "(max_query_tokens, max_item_tokens in its lrem_config.json): cut them "
                                        "and say how many, or stop with an error.")]
Threads = Annotated[Optional[int], typer.Option(help="CPU threads for the model and FAISS (default: the cores the "
                                                "load average leaves free, at least 1).", min=1)]


def echo_err(msg: str) -> None:
    typer.echo(msg, err=True)


def echo_truncated(model) -> None:
    """Say how many inputs were cut to the model's token limits (`--truncate`)."""
    for side, n in sorted(model.truncated.items()):
        if n:
            limit = "max_query_tokens" if side == "query" else "max_item_tokens"
            echo_err(f"{model.source}: truncated {n} {side} text(s) to {getattr(model.config, limit)} tokens ({limit})")

