"""Issue 16: never destroy a user's files, fail cleanly on every corrupt artifact, lock the server down.

Each test drives the real thing: the `lrem` CLI as a subprocess (exit codes and stderr), real
files, a real FAISS index, the tiny random model, and a real uvicorn server on 127.0.0.1.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from lrem._io import atomic_dir
from lrem.data import DataError, load_dataset, read_table, save_dataset
from lrem.index import ItemIndex
from lrem.search import Searcher
from lrem.serve import ServeConfig, background_server, create_app

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MARKER = ".lrem-output"  # what every folder lrem writes holds
TITLES = {"a": "mug", "b": "teacup", "c": "corkscrew, bottle screw", "d": "wine glass", "e": "kettle"}


def lrem(*args: str, cwd=None, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """The real CLI in a fresh process (exit code and stderr are what a user sees)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    if "LREM_DEBUG" not in (env or {}):
        full_env.pop("LREM_DEBUG", None)
    if full_env.get("PYTHONPATH"):  # some commands run in tmp_path: relative entries (PYTHONPATH=src) made absolute
        full_env["PYTHONPATH"] = os.pathsep.join(str(Path(p).resolve()) for p in full_env["PYTHONPATH"].split(os.pathsep)
                                                 if p)
    return subprocess.run([sys.executable, "-m", "lrem.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=full_env, timeout=timeout)


def assert_clean_error(p: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2, no traceback, and one `error:` line holding every needle."""
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, p.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def write_dataset(folder: Path, titles: dict[str, str] = TITLES) -> Path:
    folder.mkdir(parents=True)
    (folder / "catalog.jsonl").write_text("".join(json.dumps({"item_id": i, "title": t}) + "\n"
                                                  for i, t in titles.items()))
    (folder / "queries.jsonl").write_text(json.dumps({"query_id": "q", "text": "cup", "category": "c",
                                                      "split": "dev"}) + "\n")
    (folder / "qrels.jsonl").write_text(json.dumps({"query_id": "q", "item_id": "a", "relevance": 1}) + "\n")
    return folder


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, tiny):
    """A real index of TITLES built with the tiny model (meta.json names the tiny model's folder)."""
    out = tmp_path_factory.mktemp("idx") / "idx"
    ItemIndex.build(tiny, TITLES, show_progress=False).save(out)
    return out


# ---------------------------------------------------------------- 1. --out never destroys anything

def test_out_refuses_foreign_folders_inputs_and_files(tmp_path):
    data = write_dataset(tmp_path / "t")
    before = tree(data)
    notes = tmp_path / "v"
    notes.mkdir()
    (notes / "notes.txt").write_text("notes")
    assert_clean_error(lrem("data", "convert", str(data), "--format", "lrem", "--out", str(notes)), "not written by lrem")
    assert (notes / "notes.txt").read_text() == "notes"
    # the output is the input, or holds it
    assert_clean_error(lrem("index", "--data", str(data), "--out", str(data)), "is the input")
    assert_clean_error(lrem("data", "sample", "--data", str(data), "--out", str(tmp_path)), "holds the input")
    assert_clean_error(lrem("eval", "--data", str(data), "--system", "bm25", "--out", str(data)), "is the input")
    assert tree(data) == before
    afile = tmp_path / "afile.txt"
    afile.write_text("keep me")
    assert_clean_error(lrem("data", "convert", str(data), "--format", "lrem", "--out", str(afile)), "is a file")
    assert afile.read_text() == "keep me"
    # `--out .` is the folder holding the input here, and no longer an "empty name" traceback
    assert_clean_error(lrem("data", "convert", "t", "--format", "lrem", "--out", ".", cwd=tmp_path), "--out .")
    # training and construction refuse a foreign folder before loading anything
    assert_clean_error(lrem("train", "direct", "--data", str(data), "--out", str(notes)), "not written by lrem")
    assert_clean_error(lrem("construct", "--data", str(data), "--out", str(notes)), "not written by lrem")
    assert_clean_error(lrem("delta", "--model", str(tmp_path / "m"), "--out", str(notes)), "not written by lrem")
    assert (notes / "notes.txt").read_text() == "notes" and tree(data) == before


def test_out_replaces_only_lrems_own_output_and_only_with_overwrite(tmp_path):
    data = write_dataset(tmp_path / "t")
    out = tmp_path / "o"
    assert lrem("data", "convert", str(data), "--format", "lrem", "--out", str(out)).returncode == 0
    assert (out / MARKER).is_file() and load_dataset(out).counts()["items"] == len(TITLES)
    assert_clean_error(lrem("data", "convert", str(data), "--format", "lrem", "--out", str(out)), "--overwrite")
    p = lrem("data", "convert", str(data), "--format", "lrem", "--out", str(out), "--overwrite")
    assert p.returncode == 0, p.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    assert lrem("data", "convert", str(data), "--format", "lrem", "--out", str(empty)).returncode == 0


def test_an_output_of_another_command_is_neither_resumed_nor_replaced_unasked(tmp_path, index_dir, tiny_dir):
    import shutil

    data = write_dataset(tmp_path / "t")
    idx = tmp_path / "idx"
    shutil.copytree(index_dir, idx)
    before = tree(idx)
    # --resume continues a training run only (the final save would replace the whole folder)
    assert_clean_error(lrem("train", "direct", "--data", str(data), "--split", "train", "--max-steps", "1", "--resume",
                            "--out", str(idx)), "--resume continues a training run")
    # export checks its --out first: an earlier output wants --overwrite, and the input model is never replaced
    assert_clean_error(lrem("export", "--model", str(tiny_dir), "--out", str(idx)), "--overwrite")
    assert_clean_error(lrem("export", "--model", str(tiny_dir), "--out", str(tiny_dir)), "is the input")
    # a results file inside the searched index, or over its own partial file's name
    queries = tmp_path / "q.txt"
    queries.write_text("a mug\na teapot\n")
    assert_clean_error(lrem("search", "--index", str(idx), "--from-file", str(queries), "--out",
                            str(idx / "items.jsonl"), "--overwrite"), "lies inside the input")
    mine = tmp_path / "log.partial"
    mine.write_text('{"query_id": "a", "text": "a mug"}\n{"query_id": "b", "text": "a te')  # no final newline
    kept = mine.read_bytes()
    assert_clean_error(lrem("search", "--index", str(idx), "--from-file", str(queries), "--out", str(tmp_path / "log")),
                       "not a partial result of lrem search")
    assert mine.read_bytes() == kept and tree(idx) == before
    assert_clean_error(lrem("eval", "--data", str(data), "-s", "a=bm25", "-s", "a=bm25", "--out", str(tmp_path / "e")),
                       "'a' is given twice")
    for systems in (["-s", "a=bm25", "-s", "b=bm25"], ["-s", "c=bm25", "--overwrite"]):  # a refreshed report
        assert lrem("eval", "--data", str(data), "--split", "dev", *systems, "--out", str(tmp_path / "e")).returncode == 0
    assert sorted(p.name for p in (tmp_path / "e" / "runs").iterdir()) == ["c.trec"]  # no stale runs of a and b


def test_truncated_model_weights_are_one_clear_error(tmp_path, tiny_dir, index_dir):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(tiny_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a copy cut short
    data = write_dataset(tmp_path / "t")
    assert_clean_error(lrem("index", "--data", str(data), "--model", str(model), "--out", str(tmp_path / "o")),
                       "unreadable weights", "a truncated copy?")
    idx = tmp_path / "idx"
    shutil.copytree(index_dir, idx)
    meta = json.loads((idx / "meta.json").read_text())
    (idx / "meta.json").write_text(json.dumps({**meta, "model": str(model)}))
    for runtime in ("auto", "transformers"):  # the tiny model is not one the native runtime runs
        assert_clean_error(lrem("search", "--index", str(idx), "--runtime", runtime, "a mug"), "unreadable weights")


def test_library_writers_refuse_a_foreign_folder(tmp_path):
    from lrem._io import OutputError, prepare_output

    ds = load_dataset(write_dataset(tmp_path / "t"))
    foreign = tmp_path / "f"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match="not an lrem output"):
        save_dataset(ds, foreign)
    assert (foreign / "thesis.tex").read_text() == "years of work"
    save_dataset(ds, tmp_path / "mine")
    save_dataset(ds, tmp_path / "mine")  # its own output: replaced as a whole
    with pytest.raises(OutputError, match="is the input"):
        prepare_output(tmp_path / "t", [tmp_path / "t"])
    with pytest.raises(OutputError, match="--overwrite"):
        prepare_output(tmp_path / "mine")
    assert prepare_output(tmp_path / "mine", resume=True) == (tmp_path / "mine").resolve()


def test_construct_resumes_its_own_run_folder(tmp_path, tiny_dir):
    """A rerun into construct's run folder resumes (the folder holds the marker), never refused."""
    from lrem._io import prepare_output
    from lrem.construct import ConstructConfig, construct

    data = write_dataset(tmp_path / "t")
    (tmp_path / "cots.jsonl").write_text(json.dumps({"query_id": "q", "cot": "cup, mug"}) + "\n")
    cfg = ConstructConfig(student=str(tiny_dir), teacher=f"file:{tmp_path / 'cots.jsonl'}", keep_all=True,
                          k_mine=2, k_gain=2, split="dev")
    first = construct(data, tmp_path / "run", cfg, log=lambda *a: None, show_progress=False)
    assert (tmp_path / "run" / MARKER).is_file()
    prepare_output(tmp_path / "run", [data], resume=True)  # what `lrem construct` checks first
    log = []
    again = construct(data, tmp_path / "run", cfg, log=log.append, show_progress=False)
    assert again["funnel"] == first["funnel"] and first["funnel"]["done"] == 1
    assert any("1 already done, 0 to go" in line for line in log)


def test_construct_writes_only_into_its_own_runs_and_a_failed_start_binds_nothing(tmp_path, index_dir, tiny_dir):
    import shutil

    data = write_dataset(tmp_path / "t")
    idx = tmp_path / "idx"
    shutil.copytree(index_dir, idx)
    before = tree(idx)
    cots = tmp_path / "cots.jsonl"
    cots.write_text(json.dumps({"query_id": "q", "cot": "cup, mug"}) + "\n")
    args = ["construct", "--data", str(data), "--split", "dev", "--keep-all", "--k-mine", "2", "--k-gain", "2",
            "--config", str(tmp_path / "c.yaml")]
    (tmp_path / "c.yaml").write_text(f"student: {tiny_dir}\n")
    assert_clean_error(lrem(*args, "--teacher", f"file:{cots}", "--out", str(idx)), "not a `lrem construct` run")
    assert tree(idx) == before
    run = tmp_path / "run"
    p = lrem(*args, "--teacher", f"file:{tmp_path / 'missing.jsonl'}", "--out", str(run))
    assert p.returncode != 0 and (run / "config.json").is_file()  # it failed after writing its settings
    p = lrem(*args, "--teacher", f"file:{cots}", "--out", str(run))  # other settings: nothing was made with those
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((run / "config.json").read_text())["teacher"] == f"file:{cots}"


def test_a_run_folder_from_before_the_marker_still_resumes(tmp_path):
    """Interrupted construct and train runs of an older lrem (no marker) must stay resumable."""
    from lrem._io import OutputError, prepare_output

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "outcomes.jsonl").write_text("")
    prepare_output(run, resume=True, run_files=("config.json", "outcomes.jsonl"))
    assert (run / MARKER).is_file()  # recognised, so marked: later writers accept it
    (run / MARKER).unlink()
    with pytest.raises(OutputError, match="not written by lrem"):
        prepare_output(run, resume=True, run_files=("checkpoints",))
    with pytest.raises(OutputError, match="not written by lrem"):
        prepare_output(run, resume=True)


def test_an_eval_report_from_before_the_marker_can_be_refreshed(tmp_path):
    data = write_dataset(tmp_path / "t")
    report = tmp_path / "eval"
    report.mkdir()
    for name in ("metrics.json", "report.md"):
        (report / name).write_text("old")
    assert_clean_error(lrem("eval", "--data", str(data), "--system", "bm25", "--out", str(report)), "not written by lrem")
    p = lrem("eval", "--data", str(data), "--system", "bm25", "--out", str(report), "--overwrite")
    assert p.returncode == 0, p.stderr
    assert (report / MARKER).is_file() and (report / "report.md").read_text() != "old"


# ---------------------------------------------------------------- 2. numeric options, embeddings

@pytest.mark.parametrize("args, needle", [
    (["index", "--batch-size", "-5"], "--batch-size"),
    (["index", "--batch-size", "0"], "--batch-size"),
    (["search", "-k", "0", "mug"], "-k"),
    (["search", "-k", "-1", "mug"], "-k"),
    (["eval", "--system", "bm25", "--limit", "0"], "--limit"),
    (["eval", "--system", "bm25", "--batch-size", "0"], "--batch-size"),
    (["data", "sample", "--queries", "0"], "--queries"),
    (["train", "direct", "--learning-rate", "-1"], "--learning-rate"),
    (["train", "direct", "--max-steps", "0"], "--max-steps"),
    (["serve", "--port", "70000"], "--port"),
    (["index", "--dtype", "float8"], "--dtype"),
])
def test_numeric_and_choice_options_are_checked_at_parse_time(tmp_path, args, needle):
    common = {"index": ["--data", str(tmp_path), "--out", str(tmp_path / "o")],
              "search": ["--index", str(tmp_path / "missing")],
              "eval": ["--data", str(tmp_path), "--out", str(tmp_path / "o")],
              "data": ["--data", str(tmp_path), "--out", str(tmp_path / "o")],
              "train": ["--out", str(tmp_path / "o")], "serve": ["--index", str(tmp_path)]}[args[0]]
    p = lrem(*args, *common)
    assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "o").exists()


def test_version_and_short_help():
    import lrem as package

    p = lrem("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"lrem {package.__version__}", p.stderr
    for args in (["-h"], ["index", "-h"], ["data", "convert", "-h"]):
        p = lrem(*args)
        usage = " ".join(["Usage: python -m lrem.cli", *args[:-1], "[OPTIONS]"])  # `lrem` in a shell
        assert p.returncode == 0 and usage in " ".join(p.stdout.split()), (args, p.stdout[:300])


def test_bad_embeddings_never_reach_an_index(tiny):
    from lrem.index_base import check_embeddings

    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    check_embeddings(x, 3)
    for bad, match in ((np.zeros((3, 8), np.float32), "3 of 3 embeddings are not unit length"),
                       (x * np.nan, "not finite")):
        with pytest.raises(ValueError, match=match):
            ItemIndex.from_embeddings(bad, ["a", "b", "c"], ["A", "B", "C"])
    with pytest.raises(ValueError, match="expected \\(4, 8\\)"):
        check_embeddings(x, 4, 8)
    for size in (0, -5):
        with pytest.raises(ValueError, match="batch_size"):
            tiny.encode_items(["mug", "cup"], batch_size=size)


# ---------------------------------------------------------------- 3. truncated CSV, counts

def test_unterminated_quote_is_an_error_with_file_and_line(tmp_path):
    path = tmp_path / "catalog.csv"
    path.write_text('item_id,title\na,mug\nb,"tea\ncup\n')
    with pytest.raises(DataError, match=r"catalog.csv:3: malformed CSV: unterminated quoted field"):
        read_table(path, {"item_id": str, "title": str}, {})


def test_truncated_esci_csv_is_refused_and_counts_are_reported(tmp_path):
    src = SHARED / "esci_sample200" / "esci.csv"
    if not src.is_file():
        pytest.skip(f"shared data not found at {src}")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "esci.csv").write_bytes(src.read_bytes()[:381708])
    assert_clean_error(lrem("data", "convert", str(tmp_path / "e"), "--format", "esci", "--out", str(tmp_path / "o")),
                       "esci.csv:", "unterminated quoted field")
    assert not (tmp_path / "o").exists()
    p = lrem("data", "convert", str(src), "--format", "esci", "--out", str(tmp_path / "full"))
    assert p.returncode == 0 and "read 200 rows from esci.csv" in p.stdout and "200 items" in p.stdout, p.stderr


# ---------------------------------------------------------------- 4. control characters

@pytest.mark.parametrize("table, row, field", [
    ("catalog", {"item_id": "a", "title": "mu\u0000g"}, "title"),
    ("catalog", {"item_id": "a\u001b[31m", "title": "mug"}, "item_id"),
    ("queries", {"query_id": "q", "text": "cu\u0007p", "category": "c", "split": "dev"}, "text"),
])
def test_control_characters_in_dataset_files_are_rejected(tmp_path, table, row, field):
    data = write_dataset(tmp_path / "t")
    (data / f"{table}.jsonl").write_text(json.dumps(row) + "\n")
    p = lrem("data", "check", str(data))
    assert_clean_error(p, f"{table}.jsonl:1", f"field '{field}'", "control character")


@pytest.mark.parametrize("table, row, field", [
    ("catalog", {"item_id": "SKU 0298", "title": "mug"}, "item_id"),
    ("queries", {"query_id": "q 1", "text": "cup", "category": "c", "split": "dev"}, "query_id"),
])
def test_ids_with_whitespace_are_rejected(tmp_path, table, row, field):
    """A TREC run line is split on whitespace: such an id would shift its columns."""
    data = write_dataset(tmp_path / "t")
    (data / f"{table}.jsonl").write_text(json.dumps(row) + "\n")
    assert_clean_error(lrem("data", "check", str(data)), f"{table}.jsonl:1", f"field '{field}'", "holds whitespace")


def test_converters_clean_control_characters_of_raw_sources(tmp_path):
    from lrem.data import convert

    (tmp_path / "esci.csv").write_text(
        "query_id,query,product_id,product_locale,esci_label,product_title\n"
        '1,"cup\x00 ",P1,us,E,"tea\x00cup"\n')
    ds = convert(tmp_path / "esci.csv", "esci")
    assert ds.catalog["P1"].title == "tea cup" and ds.queries["1"].text == "cup"


# ---------------------------------------------------------------- 5. corrupt index folders

def _corrupt(index_dir: Path, dest: Path, file: str, content: bytes | str) -> Path:
    shutil.copytree(index_dir, dest)
    (dest / file).write_bytes(content if isinstance(content, bytes) else content.encode())
    return dest


CORRUPT = [  # (file, content, expected in the message)
    ("index.faiss", b"", "index.faiss: empty file"),
    ("index.faiss", b"\x00garbage" * 40, "index.faiss: not a readable FAISS index"),
    ("index.faiss", "TRUNCATE", "index.faiss: not a readable FAISS index"),
    ("meta.json", "[1, 2]", "meta.json: expected a JSON object"),
    ("meta.json", "{not json", "meta.json: malformed JSON"),
    ("items.jsonl", '{"item_id": "a"}\n', "items.jsonl:1: field 'title'"),
    ("items.jsonl", "DROP", "has 5 vectors but items.jsonl has 4 items"),
    ("meta.json", '{"model": "/no/such/model", "dim": 64}', "meta.json: '/no/such/model' is not a folder"),
    ("meta.json", '{"model": "MODEL", "dim": 8}', "meta.json: field 'dim'"),
]


@pytest.mark.parametrize("file, content, needle", CORRUPT)
def test_corrupt_index_is_one_clear_error(tmp_path, index_dir, tiny_dir, file, content, needle):
    if content == "TRUNCATE":
        content = (index_dir / file).read_bytes()[:100]
    if content == "DROP":
        content = "".join((index_dir / file).read_text().splitlines(keepends=True)[:-1])
    if isinstance(content, str):
        content = content.replace("MODEL", str(tiny_dir))
    bad = _corrupt(index_dir, tmp_path / "idx", file, content)
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        Searcher.load(bad)
    assert needle in str(e.value) and str(bad) in str(e.value)


def test_search_serve_eval_on_a_corrupt_index_exit_2_without_traceback(tmp_path, index_dir):
    bad = _corrupt(index_dir, tmp_path / "idx", "index.faiss", b"\x00garbage" * 40)
    data = write_dataset(tmp_path / "t")
    assert_clean_error(lrem("search", "--index", str(bad), "mug"), "index.faiss")
    assert_clean_error(lrem("serve", "--index", str(bad)), "index.faiss")
    assert_clean_error(lrem("eval", "--data", str(data), "--system", f"x={bad}:direct", "--out", str(tmp_path / "r")),
                       "index.faiss")
    assert_clean_error(lrem("search", "--index", str(bad), "   "), "empty")  # checked before loading


def test_serve_on_a_port_in_use_is_one_error_before_the_model_loads(index_dir):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        p = lrem("serve", "--index", str(index_dir), "--port", port)
    assert_clean_error(p, f"cannot listen on 127.0.0.1:{port}", "--port")
    assert "serving" not in p.stderr + p.stdout  # it bound first, so it never loaded the model


def test_index_of_another_dimension_is_refused(tmp_path, tiny):
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ItemIndex.from_embeddings(x, list(TITLES), list(TITLES.values())).save(tmp_path / "idx")
    with pytest.raises(ValueError, match="index dim 8 != model dim"):
        Searcher.load(tmp_path / "idx", model=tiny)


# ---------------------------------------------------------------- 6. factory checked before embedding

@pytest.mark.parametrize("flags, needle", [(["--factory", "Flatt"], "bad FAISS factory 'Flatt'"),
                                           (["--factory", "IVF64,Flat"], "64 lists but the catalog only 5"),
                                           (["--factory", "HNSW8,Flat", "--search-params", "efSerch=3"],
                                            "bad FAISS search parameter")])
def test_bad_factory_fails_before_embedding(tmp_path, tiny_dir, flags, needle):
    data = write_dataset(tmp_path / "t")
    p = lrem("index", "--data", str(data), "--out", str(tmp_path / "o"), "--model", str(tiny_dir), *flags)
    assert_clean_error(p, needle)
    assert "items:" not in p.stderr  # the embedding progress bar never started
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- 7. temp folders of killed writers

def test_temp_folder_of_a_killed_writer_is_cleaned_on_the_next_run(tmp_path):
    out = tmp_path / "idx"
    script = textwrap.dedent(f"""
        import os, signal
        from lrem._io import atomic_dir
        with atomic_dir({str(out)!r}) as tmp:
            (tmp / "index.faiss").write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    p = subprocess.run([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == -signal.SIGKILL
    left = list(tmp_path.glob(".idx.*.tmp"))
    assert len(left) == 1 and (left[0] / "index.faiss").exists()
    with atomic_dir(out) as tmp:
        assert list(tmp_path.glob(".idx.*.tmp")) == [tmp]  # the dead writer's folder is gone, ours remains
        (tmp / "x").write_text("ok")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_a_writer_killed_inside_the_swap_leaves_the_old_output_restored(tmp_path):
    """Killed between setting the old output aside and renaming its own into place, a writer leaves
    no output at all: the next run puts the old one back instead of removing it with the temps."""
    from lrem._io import clean_stale_temps

    out = tmp_path / "idx"
    script = textwrap.dedent(f"""
        import os, signal
        from lrem._io import atomic_dir
        with atomic_dir({str(out)!r}) as tmp:
            (tmp / "index.faiss").write_text("v1")
        replace = os.replace
        def dying(src, dst):  # the first rename (the output set aside) happens, then the process dies
            replace(src, dst)
            os.kill(os.getpid(), signal.SIGKILL)
        os.replace = dying
        with atomic_dir({str(out)!r}) as tmp:
            (tmp / "index.faiss").write_text("v2")
    """)
    p = subprocess.run([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == -signal.SIGKILL and not out.exists()
    assert len(list(tmp_path.glob(".idx.*.old"))) == 1 and len(list(tmp_path.glob(".idx.*.tmp"))) == 1
    clean_stale_temps(out)
    assert (out / "index.faiss").read_text() == "v1" and sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_a_live_writers_temp_folder_is_left_alone(tmp_path):
    with atomic_dir(tmp_path / "idx") as first:
        with atomic_dir(tmp_path / "idx") as second:  # same process: alive
            assert first.exists() and second.exists()
            (second / "a").write_text("a")
        (first / "b").write_text("b")
    assert (tmp_path / "idx" / "b").exists()


def test_writers_replacing_one_folder_at_once_all_succeed(tmp_path):
    """Test workers, or two `lrem serve` processes on a fresh machine, may build one model cache
    at once: each replace sets the old folder aside under a name of its own, so none fails."""
    script = textwrap.dedent(f"""
        import os
        from lrem._io import atomic_dir
        for i in range(40):
            with atomic_dir({str(tmp_path / "cache")!r}) as tmp:
                for name in ("weights", "config"):
                    (tmp / name).write_text(f"{{os.getpid()}} {{i}}")
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True) for _ in range(4)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errs
    final = tmp_path / "cache"
    assert (final / "weights").read_text() == (final / "config").read_text()  # one writer's whole folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # nothing set aside is left


# ---------------------------------------------------------------- 8. no tracebacks

def _deep_json(tmp_path):
    data = write_dataset(tmp_path / "t")
    (data / "catalog.jsonl").write_text("[" * 200_000 + "]" * 200_000 + "\n")
    return ["data", "check", str(data)], ["catalog.jsonl:1", "nested too deeply"]


def _huge_relevance_jsonl(tmp_path):
    data = write_dataset(tmp_path / "t")
    (data / "qrels.jsonl").write_text('{"query_id": "q", "item_id": "a", "relevance": ' + "9" * 5000 + "}\n")
    return ["data", "check", str(data)], ["qrels.jsonl:1"]


def _huge_relevance_csv(tmp_path):
    data = write_dataset(tmp_path / "t")
    (data / "qrels.jsonl").unlink()
    (data / "qrels.csv").write_text("query_id,item_id,relevance\nq,a," + "9" * 5000 + "\n")
    return ["data", "check", str(data)], ["qrels.csv:2", "field 'relevance'", "too large"]


def _symlink_loop(tmp_path):
    data = write_dataset(tmp_path / "t")
    (data / "catalog.jsonl").unlink()
    os.symlink(data / "catalog.jsonl", data / "catalog.jsonl")
    return ["data", "check", str(data)], ["catalog.jsonl", "symlink loop"]


def _unknown_model(tmp_path):
    return ["index", "--data", str(write_dataset(tmp_path / "t")), "--out", str(tmp_path / "o"),
            "--model", "no-such-model"], ["'no-such-model' is not a folder", "built-in"]


def _broken_yaml_set(tmp_path, index_dir):
    return ["serve", "--index", str(index_dir), "--set", "max_batch=["], ["--set", "not a YAML value"]


def _python_tag_set(tmp_path, index_dir):
    return ["serve", "--index", str(index_dir), "--set", 'max_batch=!!python/object/apply:os.system ["touch PWNED"]'], \
        ["--set", "not a YAML value"]


def _bad_config_file(tmp_path, index_dir):
    (tmp_path / "s.yaml").write_text("max_batch: [\n")
    return ["serve", "--index", str(index_dir), "--config", str(tmp_path / "s.yaml")], ["s.yaml", "malformed YAML"]


def _config_is_a_folder(tmp_path, index_dir):
    """An OS error root gets too (unlike a permission error): reading a folder as a file."""
    (tmp_path / "s.yaml").mkdir()
    return ["serve", "--index", str(index_dir), "--config", str(tmp_path / "s.yaml")], ["Is a directory", "s.yaml"]


@pytest.mark.parametrize("case", [_deep_json, _huge_relevance_jsonl, _huge_relevance_csv, _symlink_loop,
                                  _unknown_model, _broken_yaml_set, _python_tag_set, _bad_config_file,
                                  _config_is_a_folder])
def test_bad_input_is_one_line_and_exit_2(tmp_path, index_dir, case):
    made = case(tmp_path, index_dir) if case.__code__.co_argcount == 2 else case(tmp_path)
    args, needles = made
    p = lrem(*args, cwd=tmp_path)
    assert_clean_error(p, *needles)
    assert not (tmp_path / "PWNED").exists()
    debug = lrem(*args, cwd=tmp_path, env={"LREM_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_is_one_line(tmp_path):
    data = write_dataset(tmp_path / "t")
    (data / "catalog.jsonl").chmod(0)
    assert_clean_error(lrem("data", "check", str(data)), "Permission denied", "catalog.jsonl")


# ---------------------------------------------------------------- 9. one query rule everywhere

BAD_QUERIES = ["", "   ", "\t\n", "mug\x1b[2J", "cup\x07"]


def test_search_and_server_refuse_the_same_queries(tmp_path, index_dir, tiny):
    searcher = Searcher.load(index_dir, model=tiny)
    with background_server(create_app(searcher, ServeConfig())) as base:
        for q in BAD_QUERIES:
            with pytest.raises(ValueError) as e:
                searcher.search([q], k=3, mode="direct")
            r = httpx.post(base + "/search", json={"query": q, "k": 3}, timeout=30)
            assert r.status_code == 422 and r.json()["detail"] == str(e.value), (q, r.text)
        assert httpx.post(base + "/search", json={"query": "mug", "k": 3}, timeout=30).status_code == 200
    assert_clean_error(lrem("search", "--index", str(index_dir), "mug", " "), "query 2 is empty")


# ---------------------------------------------------------------- 10. a bad cache never stops the server

def _cache_files(tmp_path: Path, searcher) -> dict[str, Path]:
    """Broken cache files of every kind, keyed by name."""
    from lrem.serve import SearchService

    model_id = SearchService(searcher, ServeConfig()).model_id
    files = {}

    def path(name):
        files[name] = tmp_path / f"{name}.npz"
        return files[name]

    path("garbage").write_bytes(os.urandom(300))
    path("empty").write_bytes(b"")
    good = tmp_path / "good.npz"
    np.savez(good, kinds=np.array(["direct"]), texts=np.array(["mug"]), cots=np.array([""]),
             emb=np.ones((1, searcher.model.dim), np.float32) / np.sqrt(searcher.model.dim), model=np.array(model_id))
    path("truncated").write_bytes(good.read_bytes()[:200])
    np.savez(path("missing_key"), kinds=np.array(["direct"]), texts=np.array(["mug"]), model=np.array(model_id))
    np.savez(path("pickled"), kinds=np.array([{"x": 1}], dtype=object), texts=np.array(["mug"]),
             cots=np.array([""]), emb=np.zeros((1, 4)), model=np.array(model_id))
    np.savez(path("wrong_dim"), kinds=np.array(["direct"]), texts=np.array(["mug"]), cots=np.array([""]),
             emb=np.ones((1, 10), np.float32), model=np.array(model_id))
    return files


def test_a_bad_cache_file_is_moved_aside_and_the_server_starts(tmp_path, index_dir, tiny, caplog):
    searcher = Searcher.load(index_dir, model=tiny)
    for name, cache in _cache_files(tmp_path, searcher).items():
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lrem"):
            cfg = ServeConfig(cache_path=str(cache))
            with background_server(create_app(searcher, cfg)) as base:
                r = httpx.post(base + "/search", json={"query": "mug", "k": 2, "mode": "direct"}, timeout=30)
                assert r.status_code == 200 and r.json()["cached"] is False, (name, r.text)
        warnings = [r.getMessage() for r in caplog.records if r.name == "lrem"]
        assert len(warnings) == 1 and str(cache) in warnings[0] and "empty cache" in warnings[0], (name, warnings)
        assert list(tmp_path.glob(f"{name}.npz.bad-*")), name  # kept for a look, out of the way
        assert cache.is_file()  # the new cache, written at shutdown


# ---------------------------------------------------------------- 11. API key, /health, /info

@pytest.fixture(scope="module")
def keyed(index_dir, tiny):
    searcher = Searcher.load(index_dir, model=tiny)
    with background_server(create_app(searcher, ServeConfig(api_key="s3cret-key"))) as base:
        yield base


def test_api_key_is_required_everywhere_but_health(keyed):
    good, bad = {"Authorization": "Bearer s3cret-key"}, {"Authorization": "Bearer s3cret-kez"}
    for path in ("/health", "/healthz"):
        r = httpx.get(keyed + path)
        assert r.status_code == 200 and r.json() == {"status": "ok"}  # nothing about the deployment
    for method, path, body in (("GET", "/info", None), ("GET", "/metrics", None), ("GET", "/v1/models", None),
                               ("POST", "/search", {"query": "mug", "k": 2}),
                               ("POST", "/v1/embeddings", {"input": "mug", "model": "lrem-query-direct"})):
        for headers in ({}, bad, {"Authorization": "s3cret-key"}):
            r = httpx.request(method, keyed + path, headers=headers, json=body)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, r.text)
        r = httpx.request(method, keyed + path, headers=good, json=body, timeout=30)
        assert r.status_code == 200, (path, r.text)
    info = httpx.get(keyed + "/info", headers=good).json()
    assert info["config"]["api_key"] == "(set)" and "s3cret" not in json.dumps(info)


def test_openai_client_raises_authentication_error(keyed):
    wrong = openai.OpenAI(base_url=keyed + "/v1", api_key="nope", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError):
        wrong.embeddings.create(model="lrem-query-direct", input="mug")
    right = openai.OpenAI(base_url=keyed + "/v1", api_key="s3cret-key", max_retries=0, timeout=60)
    assert len(right.embeddings.create(model="lrem-query-direct", input="mug").data[0].embedding) > 0


def test_api_key_from_the_environment(index_dir, tiny, monkeypatch):
    monkeypatch.setenv("LREM_API_KEY", "env-key")
    with background_server(create_app(Searcher.load(index_dir, model=tiny), ServeConfig())) as base:
        assert httpx.get(base + "/info").status_code == 401
        assert httpx.get(base + "/info", headers={"Authorization": "Bearer env-key"}).status_code == 200


# ---------------------------------------------------------------- 12, 13. slow and vanishing clients

@pytest.fixture(scope="module")
def strict(index_dir, tiny):
    cfg = ServeConfig(header_timeout_s=1.0, body_timeout_s=1.0, max_connections=8)
    with background_server(create_app(Searcher.load(index_dir, model=tiny), cfg)) as base:
        yield base


def _connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    return s


def _read_all(s: socket.socket) -> bytes:
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_slow_body_gets_a_408_and_half_sent_headers_are_dropped(strict):
    t0 = time.monotonic()
    s = _connect(strict)
    s.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"q")
    reply = _read_all(s)
    s.close()
    assert reply.startswith(b"HTTP/1.1 408") and b"body_timeout_s" in reply and time.monotonic() - t0 < 8
    t0 = time.monotonic()
    s = _connect(strict)
    s.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\n")  # and never the rest
    assert _read_all(s) == b"" and time.monotonic() - t0 < 8  # closed by the server
    s.close()
    assert httpx.get(strict + "/health").status_code == 200


def test_connections_beyond_the_limit_get_a_503(strict):
    held = [_connect(strict) for _ in range(9)]
    try:
        for s in held:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers never finished: each holds a slot
        time.sleep(0.3)
        r = httpx.get(strict + "/health", timeout=10)
        assert r.status_code == 503
    finally:
        for s in held:
            s.close()
    time.sleep(1.5)
    assert httpx.get(strict + "/health", timeout=10).status_code == 200


def test_client_gone_mid_body_counts_as_499_not_500(strict):
    s = _connect(strict)
    s.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"q")
    time.sleep(0.2)
    s.close()
    time.sleep(0.5)
    text = httpx.get(strict + "/metrics").text
    assert 'lrem_http_requests_total{path="/search",status="499"} 1.0' in text
    assert 'status="500"' not in text


def test_overwrite_refuses_a_folder_holding_files_lrem_did_not_write(tmp_path):
    """An output folder records what lrem wrote into it; --overwrite (which replaces the whole
    folder) refuses one that also holds a user's files, naming them, and takes one that does
    not, or whose extra file another lrem command recorded (a model's router.json)."""
    from lrem._io import MARKER, OutputError, prepare_output
    from lrem.router import LearnedRouter

    out = tmp_path / "idx"
    with atomic_dir(out) as tmp:
        (tmp / "index.faiss").write_text("x")
        (tmp / "meta.json").write_text("{}")
    assert json.loads((out / MARKER).read_text())["files"] == ["index.faiss", "meta.json"]
    assert prepare_output(out, overwrite=True) == out.resolve()
    (out / "notes.md").write_text("my notes")
    (out / ".DS_Store").write_text("")  # hidden entries are not the user's work
    with pytest.raises(OutputError, match=r"holds notes.md, which lrem did not write; move them out first"):
        prepare_output(out, overwrite=True)
    (out / "notes.md").unlink()
    LearnedRouter(["margin"], [0.0], [1.0], [1.0], 0.0).save(out / "router.json")  # what `lrem router fit` writes
    assert prepare_output(out, overwrite=True) == out.resolve()
    assert (out / "router.json").exists()
    (out / ".meta.json.k2j4x9.tmp").write_text("")  # a writer killed mid-write: lrem's own leftover
    assert prepare_output(out, overwrite=True) == out.resolve()
    (out / ".git").mkdir()  # a model folder pushed to the hub by git: the user's, dot or not
    (out / ".gitattributes").write_text("*.safetensors filter=lfs")
    with pytest.raises(OutputError, match=r"holds \.git, \.gitattributes, which lrem did not write"):
        prepare_output(out, overwrite=True)


def _recorded(folder: Path) -> list[str]:
    """The top-level entries `folder`'s marker lists as lrem's."""
    return sorted(json.loads((folder / MARKER).read_text())["files"])


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name[:1] != ".")


def test_an_eval_report_records_what_it_writes_so_overwrite_keeps_a_users_file(tmp_path):
    """An eval report is written in place, file by file; its marker lists each one, so another
    command's --overwrite (which replaces the whole folder) refuses the report once it also
    holds a user's notes, where it deleted them before."""
    data = write_dataset(tmp_path / "t")
    report = tmp_path / "eval"
    figure = tmp_path / "rl" / "curves.png"
    figure.parent.mkdir()
    figure.write_bytes(b"\x89PNG")
    p = lrem("eval", "--data", str(data), "--split", "dev", "-s", "bm25", "--figure", str(figure), "--out", str(report))
    assert p.returncode == 0, p.stderr[-2000:]
    assert _recorded(report) == _listing(report)
    assert {"metrics.json", "report.md", "runs", "rl-curves.png"} <= set(_listing(report))
    (report / "notes.txt").write_text("mine")
    assert_clean_error(lrem("data", "sample", "--data", str(data), "--out", str(report), "--overwrite"),
                       "holds notes.txt, which lrem did not write; move them out first")
    assert (report / "notes.txt").read_text() == "mine"
    # `lrem eval --overwrite` refreshes the report's own files in place: the notes stay, unrecorded
    p = lrem("eval", "--data", str(data), "--split", "dev", "-s", "bm25", "--out", str(report), "--overwrite")
    assert p.returncode == 0, p.stderr[-2000:]
    assert (report / "notes.txt").read_text() == "mine" and "notes.txt" not in _recorded(report)
    assert not (report / "rl-curves.png").exists()  # the earlier report's figure, which this one lacks
    (report / "notes.txt").unlink()
    p = lrem("data", "sample", "--data", str(data), "--out", str(report), "--overwrite")  # lrem's files only
    assert p.returncode == 0, p.stderr[-2000:]
    assert not (report / "report.md").exists()


def test_a_training_run_records_what_it_writes_so_overwrite_keeps_a_users_file(tmp_path, tiny_dir):
    """An interrupted training run (checkpoints, tb/, rl_pairs.jsonl, written in place) lists them in
    its marker: `lrem train --overwrite` refuses it once a user's file is in it, where it deleted
    the folder before. The resumed run's final model folder keeps that file, still not lrem's."""
    from lrem._io import OutputError, prepare_output
    from lrem.data import Dataset, Item, Query
    from lrem.train import SFTConfig, train

    words = ["corkscrew", "chair", "coffee", "teapot", "hammer", "lamp", "spoon", "blanket"]
    triplets = tmp_path / "triplets.jsonl"
    triplets.write_text("".join(json.dumps({"query_id": f"q{i}", "query": f"something like a {w}", "cot": w,
                                            "item_id": f"i{i}", "item_title": w}) + "\n" for i, w in enumerate(words)))
    # queries the triplets lack: a share of them is held back for RL (rl_pairs.jsonl)
    ds = Dataset({f"i{i}": Item(f"i{i}", w) for i, w in enumerate(words)},
                 {f"{q}{i}": Query(f"{q}{i}", f"{q} {w}", "c", "train") for i, w in enumerate(words) for q in "qh"},
                 {f"{q}{i}": {f"i{i}": 1} for i in range(len(words)) for q in "qh"}, "shop")
    cfg = SFTConfig(model=str(tiny_dir), batch_size=4, learning_rate=1e-3, warmup_ratio=0.0, logging_steps=1,
                    save_steps=1, max_steps=2, rl_holdout=0.5)
    run = tmp_path / "run"
    train(cfg, run, triplets=triplets, dataset=ds, stop_after_step=1, log=lambda *_: None)
    assert _recorded(run) == _listing(run) == ["checkpoints", "rl_pairs.jsonl", "tb"]
    (run / "notes.txt").write_text("mine")
    assert_clean_error(lrem("train", "coldstart", "--triplets", str(triplets), "--model", str(tiny_dir), "--out",
                            str(run), "--max-steps", "2", "--overwrite"),
                       "holds notes.txt, which lrem did not write; move them out first")
    train(cfg, run, triplets=triplets, dataset=ds, resume=True, log=lambda *_: None)  # to the final model
    assert (run / "config.json").is_file() and (run / "notes.txt").read_text() == "mine"
    assert _recorded(run) == [n for n in _listing(run) if n != "notes.txt"]
    with pytest.raises(OutputError, match="holds notes.txt"):
        prepare_output(run, overwrite=True)
    (run / "notes.txt").unlink()
    assert prepare_output(run, overwrite=True) == run.resolve()


def test_an_rl_run_records_its_logs_and_curves(tmp_path, tiny_dir):
    """Stage 2's run folder: checkpoints, tb/, history and samples as it goes, then curves.png."""
    from lrem._io import OutputError, prepare_output
    from lrem.train import RLConfig, train_rl

    words = ["corkscrew", "wool socks", "espresso", "night cream", "toddler shirt", "shift dress", "spatula", "shoe"]
    pairs = tmp_path / "rl_pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query_id": f"q{i}", "query": f"something like a {w}", "item_id": f"i{i}",
                                         "item_title": w, "cot": ""}) + "\n" for i, w in enumerate(words)))
    cfg = RLConfig(num_generations=2, batch_size=4, rollout_max_tokens=6, cot_max_tokens=4, max_steps=2,
                   learning_rate=1e-3, warmup_ratio=0.0, save_steps=1, logging_steps=1)
    run = tmp_path / "rl"
    train_rl(cfg, tiny_dir, run, pairs=pairs, stop_after_step=1, log=lambda *_: None)
    assert _recorded(run) == _listing(run) == ["checkpoints", "history.jsonl", "samples.jsonl", "tb"]
    (run / "plot.png").write_text("mine")
    with pytest.raises(OutputError, match="holds plot.png"):
        prepare_output(run, overwrite=True)
    train_rl(cfg, tiny_dir, run, pairs=pairs, resume=True, log=lambda *_: None)
    assert "curves.png" in _recorded(run) and _recorded(run) == [n for n in _listing(run) if n != "plot.png"]


def test_a_construct_run_records_what_it_writes(tmp_path, tiny_dir):
    """A construct run (config, outcomes, triplets, the teacher's cache, stats) lists them in its
    marker as it writes them, a rerun adding to the same list; a user's file is then refused
    by --overwrite. A run folder of an older lrem (a marker without a list) resumes as before."""
    from lrem._io import OutputError, prepare_output
    from lrem.construct import ConstructConfig, construct

    data = write_dataset(tmp_path / "t")
    cfg = ConstructConfig(student=str(tiny_dir), teacher=f"hf:{tiny_dir}", reason_max_tokens=4, extract_max_tokens=4,
                          keep_all=True, k_mine=2, k_gain=2, split="dev")
    run = tmp_path / "run"
    construct(data, run, cfg, log=lambda *a: None, show_progress=False)
    assert _recorded(run) == _listing(run) == ["config.json", "outcomes.jsonl", "stats.json", "teacher_cache.jsonl",
                                               "triplets.jsonl"]
    (run / "notes.txt").write_text("mine")
    construct(data, run, cfg, log=lambda *a: None, show_progress=False)  # a rerun resumes: nothing to do
    with pytest.raises(OutputError, match="holds notes.txt"):
        prepare_output(run, overwrite=True)
    (run / MARKER).write_text("{}\n")  # an older lrem's marker: what the folder holds is unknown
    construct(data, run, cfg, log=lambda *a: None, show_progress=False)
    assert "files" not in json.loads((run / MARKER).read_text())  # not recorded now: the notes would count as lrem's
    assert prepare_output(run, overwrite=True) == run.resolve()  # as before the record

def test_saved_weights_are_readable_as_the_umask_allows(tiny, tmp_path):
    """safetensors writes through a temp file created 0600; a saved model (and every file of an
    lrem output folder) gets the usual umask permissions, so a server running as another user
    (TEI, vLLM in a container) can read it."""
    import stat

    umask = os.umask(0)
    os.umask(umask)  # the process's own, which lrem read at import
    if umask & 0o044:
        pytest.skip(f"umask {umask:o} keeps others from reading: nothing to tell apart")
    tiny.save_pretrained(tmp_path / "m")
    for f in (tmp_path / "m").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == (0o666 & ~umask if f.is_file() else 0o777 & ~umask), f.name
