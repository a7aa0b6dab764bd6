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

The commands live by family in `data_cmds` (data, construct), `index_cmds` (index, embed),
`search_cmds` (search, serve, eval, export, delta) and `train_cmds` (train, router fit), on the
shared options of `options`; this module puts them in one `app`, in the order `lrem --help`
lists them.
"""
from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from lrem.cli.data_cmds import construct, data_check, data_convert, data_sample, data_wordnet
from lrem.cli.index_cmds import embed, index
from lrem.cli.search_cmds import cache, delta, eval_, export, search, serve
from lrem.cli.train_cmds import ground, router_fit, train_coldstart, train_direct, train_rl

# No HF_HUB_OFFLINE here: built-in names and folders never ask the hub, hub names do
# (`lrem.model.resolve_backbone`, which fails in a second with one line when it is unreachable).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(help="LREM: reason about a query, then embed it. Dense retrieval for product search.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  rich_markup_mode=None,  # plain click output: errors without boxes, help that pipes
                  context_settings={"help_option_names": ["-h", "--help"]})  # subcommands inherit -h


def _print_version(value: bool) -> None:
    if value:
        from lrem import __version__

        typer.echo(f"lrem {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                help="Print lrem's version and exit.")] = False) -> None:
    """The root's one option, --version (the help text is the app's)."""


data_app = typer.Typer(help="Build, convert, check and sample datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
data_app.command("wordnet")(data_wordnet)
data_app.command("convert")(data_convert)
data_app.command("check")(data_check)
data_app.command("sample")(data_sample)

app.command()(index)
app.command()(embed)
app.command()(search)
app.command()(serve)
app.command()(cache)

router_app = typer.Typer(help="The router of `auto` mode: which queries reason.", no_args_is_help=True)
app.add_typer(router_app, name="router")
router_app.command("fit")(router_fit)

app.command("eval")(eval_)
app.command()(export)
app.command()(construct)
app.command()(delta)

train_app = typer.Typer(help="Train LREM stage 1 (cold start), stage 2 (RL) or the direct-embedding baseline (Accelerate; "
                             "run under torchrun / accelerate launch for several processes).", no_args_is_help=True)
app.add_typer(train_app, name="train")
train_app.command("coldstart")(train_coldstart)
train_app.command("direct")(train_direct)
train_app.command("rl")(train_rl)
app.command()(ground)


def main() -> None:
    """Run the CLI; bad input (lrem's errors, file system errors) is one line on stderr and exit
    code 2, like a usage error. LREM_DEBUG=1 shows the traceback instead."""
    import yaml

    if not sys.stderr.isatty():  # a log file or a pipe: a progress line every 30 s, not a frame per batch
        os.environ.setdefault("TQDM_MININTERVAL", "30")
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
