"""Outputs of `lrem cache` and `lrem serve` never overwrite or move what is not theirs, and config
values are checked where they are read, with the file (and line) or flag they came from."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from lrem.batching import EmbeddingCache
from lrem.index import ItemIndex
from lrem.search import Searcher
from lrem.serve import ServeConfig, background_server, create_app
from test_reliability import TITLES, assert_clean_error, lrem, tree, write_dataset


@pytest.fixture(scope="module")
def idx(tmp_path_factory, tiny):
    """A real index of TITLES built with the tiny model."""
    out = tmp_path_factory.mktemp("safety") / "idx"
    ItemIndex.build(tiny, TITLES, show_progress=False).save(out)
    return out


@pytest.fixture(scope="module")
def modelless_idx(idx, tmp_path_factory):
    """The same index naming a model folder that does not exist: a command that loads the model
    fails on it, so a refusal that names the output proves the output was checked first."""
    out = tmp_path_factory.mktemp("modelless") / "idx"
    shutil.copytree(idx, out)
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "model": str(out.parent / "no-such-model")}))
    return out


def _no_bad_copies(folder: Path) -> None:
    assert not list(folder.rglob("*.bad-*")), list(folder.rglob("*.bad-*"))


# ---------------------------------------------------------------- 1. lrem cache --out

def test_cache_out_refuses_inputs_folders_and_other_files_before_the_model_loads(tmp_path, modelless_idx):
    queries = tmp_path / "q.txt"
    queries.write_text("a mug\na lamp\n")
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    other = tmp_path / "notes.npz"
    other.write_text("not a cache")
    npz = tmp_path / "arrays.npz"  # an .npz, but not lrem's
    np.savez(npz, x=np.zeros(3))
    index_before = tree(modelless_idx)
    for out, needles in ((queries, ["is the input", str(queries)]),
                         (modelless_idx / "cache.npz", ["lies inside the input", str(modelless_idx)]),
                         (modelless_idx / "items.jsonl", ["lies inside the input"]),
                         (folder, ["is a folder"]),
                         (other, ["not an lrem cache file", "not an .npz archive"]),
                         (npz, ["not an lrem cache file", "missing arrays"])):
        before = out.read_bytes() if out.is_file() else None
        p = lrem("cache", "--index", str(modelless_idx), "--from-file", str(queries), "--out", str(out), timeout=120)
        assert_clean_error(p, "--out", *needles)
        assert "no-such-model" not in p.stderr  # refused before the model was looked for
        assert (out.read_bytes() if out.is_file() else None) == before, out
    assert tree(modelless_idx) == index_before and (folder / "notes.txt").read_text() == "mine"
    assert queries.read_text() == "a mug\na lamp\n"
    _no_bad_copies(tmp_path)
    _no_bad_copies(modelless_idx)


def test_cache_out_resumes_its_own_file_and_refuses_another_models(tmp_path, idx):
    queries = tmp_path / "q.txt"
    queries.write_text("a mug\na lamp\n")
    out = tmp_path / "head.npz"
    args = ["cache", "--index", str(idx), "--from-file", str(queries), "--kinds", "direct"]
    first = lrem(*args, "--out", str(out), timeout=180)
    assert first.returncode == 0, first.stderr[-2000:]
    again = lrem(*args, "--out", str(out), timeout=180)  # its own cache: checked, readable, resumed
    assert again.returncode == 0 and "0 computed now, 2 entries from an earlier run" in again.stdout, again.stderr
    foreign = tmp_path / "other.npz"
    cache = EmbeddingCache(4)
    cache.put(("direct", "a mug"), ("", np.ones(8, np.float32)))
    cache.save(foreign, "another-model|dim=8|index=x")
    before = foreign.read_bytes()
    assert_clean_error(lrem(*args, "--out", str(foreign), timeout=180), "another model", str(foreign))
    assert foreign.read_bytes() == before
    _no_bad_copies(tmp_path)


def test_check_file_passes_absent_and_lrem_caches_only(tmp_path):
    EmbeddingCache.check_file(tmp_path / "new.npz")  # absent: fine
    EmbeddingCache(2).save(tmp_path / "c.npz", "m")
    EmbeddingCache.check_file(tmp_path / "c.npz")  # an lrem cache, whichever model's
    with pytest.raises(ValueError, match="is a folder"):
        EmbeddingCache.check_file(tmp_path)
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.npz: exists and is not an lrem cache file"):
        EmbeddingCache.check_file(tmp_path / "empty.npz")
    _no_bad_copies(tmp_path)


# ---------------------------------------------------------------- 1-2. lrem serve's cache_path and query_log

def test_serve_refuses_a_cache_or_log_in_the_index_or_a_folder_before_the_model_loads(tmp_path, modelless_idx):
    folder = tmp_path / "logs"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    before = tree(modelless_idx)
    for sets, needles in (([f"query_log={modelless_idx / 'items.jsonl'}"], ["query_log=", "inside the served index"]),
                          ([f"cache_path={modelless_idx / 'meta.json'}"], ["cache_path=", "inside the served index"]),
                          ([f"cache_path={modelless_idx / 'new.npz'}"], ["cache_path=", "inside the served index"]),
                          ([f"query_log={folder}"], ["query_log=", "is a folder"]),
                          ([f"cache_path={folder}"], ["cache_path=", "is a folder"]),
                          ([f"cache_path={tmp_path / 'x'}", f"query_log={tmp_path / 'x'}"], ["the same file"])):
        p = lrem("serve", "--index", str(modelless_idx), "--port", "0", *[a for s in sets for a in ("--set", s)],
                 timeout=120)
        assert_clean_error(p, *needles)
        assert "no-such-model" not in p.stderr and "serving" not in p.stderr  # the model was never looked for
    assert tree(modelless_idx) == before and tree(folder) == {"keep.txt": b"mine"}
    _no_bad_copies(tmp_path)


def test_a_cache_folder_is_refused_and_a_corrupt_cache_file_moved_aside(tmp_path, idx, tiny, caplog):
    searcher = Searcher.load(idx, model=tiny)
    folder = tmp_path / "cache.npz"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="cache_path=.*is a folder"):
        create_app(searcher, ServeConfig(cache_path=str(folder)))
    with pytest.raises(ValueError, match="is a folder"):  # the loader itself never moves a folder either
        EmbeddingCache(4).load(folder, "m")
    assert tree(folder) == {"keep.txt": b"mine"}
    with pytest.raises(ValueError, match="inside the served index"):  # an app made in Python: the same check
        create_app(searcher, ServeConfig(query_log=str(idx / "log.jsonl")))
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"garbage" * 20)
    with caplog.at_level(logging.WARNING, logger="lrem"):
        with background_server(create_app(searcher, ServeConfig(cache_path=str(corrupt)))) as base:
            r = httpx.post(base + "/search", json={"query": "mug", "k": 2, "mode": "direct"}, timeout=30)
            assert r.status_code == 200, r.text
    warnings = [r.getMessage() for r in caplog.records if r.name == "lrem"]
    assert len(warnings) == 1 and "moved to" in warnings[0], warnings  # a cache is disposable
    [aside] = tmp_path.glob("corrupt.npz.bad-*")
    assert aside.read_bytes() == b"garbage" * 20
    EmbeddingCache.check_file(corrupt)  # the server's own cache, written at shutdown


# ---------------------------------------------------------------- 3. numbers that are not finite

@pytest.mark.parametrize("setting", ["query_log_max_mb=.inf", "query_log_max_mb=.nan", "max_wait_ms=.nan",
                                     "request_timeout_s=.inf", "router_margin=-.inf"])
def test_serve_refuses_a_number_that_is_not_finite_before_the_model_loads(modelless_idx, setting):
    key = setting.split("=")[0]
    p = lrem("serve", "--index", str(modelless_idx), "--port", "0", "--set", setting, timeout=120)
    assert_clean_error(p, f"--set {key}=...", f"key '{key}'", "not a finite number")
    assert "no-such-model" not in p.stderr


@pytest.mark.parametrize("field", ["max_wait_ms", "request_timeout_s", "router_margin", "query_log_max_mb"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_serve_config_refuses_non_finite_floats_built_directly(field, value):
    with pytest.raises(ValueError, match=f"{field}={value}; need a finite number"):
        ServeConfig(**{field: value})


def test_training_and_construct_yaml_refuse_nan_and_inf(tmp_path):
    (tmp_path / "sft.yaml").write_text("# stage 1\nbatch_size: 8\ntemperature: .nan\n")
    assert_clean_error(lrem("train", "coldstart", "--config", str(tmp_path / "sft.yaml"), "--out", str(tmp_path / "o")),
                       f"{tmp_path / 'sft.yaml'}: key 'temperature'", "not a finite number")
    (tmp_path / "rl.yaml").write_text("top_p: .inf\n")
    assert_clean_error(lrem("train", "rl", "--init", str(tmp_path / "none"), "--config", str(tmp_path / "rl.yaml"),
                            "--out", str(tmp_path / "o")), "rl.yaml: key 'top_p'", "not a finite number")
    data = write_dataset(tmp_path / "data")
    (tmp_path / "c.yaml").write_text("teacher_timeout: -.inf\n")
    assert_clean_error(lrem("construct", "--data", str(data), "--config", str(tmp_path / "c.yaml"),
                            "--out", str(tmp_path / "run")), "c.yaml: key 'teacher_timeout'")
    assert not (tmp_path / "o").exists() and not (tmp_path / "run").exists()


def test_training_configs_built_directly_refuse_nan():
    from lrem.construct_config import ConstructConfig
    from lrem.train import RLConfig, SFTConfig

    for cls, field in ((SFTConfig, "temperature"), (RLConfig, "clip_eps"), (ConstructConfig, "mine_max_hitrate")):
        with pytest.raises(ValueError, match=f"{field}=nan; need a finite number"):
            cls(**{field: float("nan")})


def test_a_float_written_as_yaml_1_1_reads_as_text_and_is_taken_as_the_number(tmp_path):
    """PyYAML reads `1e-5` as a string (YAML 1.1 wants `1.0e-5`), the form papers and the shipped
    config's comments use: a float field takes it; a string field and other text are unchanged."""
    from lrem.serve_config import ServeConfig
    from lrem.train import SFTConfig

    (tmp_path / "c.yaml").write_text("learning_rate: 1e-5\ntemperature: 5E-2\n")
    cfg = SFTConfig.load(tmp_path / "c.yaml")
    assert (cfg.learning_rate, cfg.temperature) == (1e-5, 0.05)
    assert ServeConfig.from_yaml(sets=["router_margin=2e-2", "api_key=1e5"]).api_key == "1e5"
    with pytest.raises(ValueError, match="key 'learning_rate': expected float, got '1e-5x'"):
        SFTConfig.load(None, learning_rate="1e-5x")


# ---------------------------------------------------------------- 4. errors name the source of the value

def test_config_errors_name_the_file_or_flag_a_value_came_from(tmp_path):
    def train(config: Path, *flags: str):
        return lrem("train", "coldstart", "--config", str(config), "--out", str(tmp_path / "o"), *flags)

    (tmp_path / "s.yaml").write_text('seed: 1\nbatch_size: "16"\n')
    line = assert_clean_error(train(tmp_path / "s.yaml"), f"{tmp_path / 's.yaml'}: key 'batch_size'", "expected int")
    assert "flag" not in line  # every unset flag is passed as None: not a source
    (tmp_path / "r.yaml").write_text("seed: 1\nlr_schedule: foo\n")  # refused by __post_init__, not by type
    assert_clean_error(train(tmp_path / "r.yaml"), f"{tmp_path / 'r.yaml'}: lr_schedule='foo'")
    (tmp_path / "b.yaml").write_bytes(b"\xff\xfe")
    assert_clean_error(train(tmp_path / "b.yaml"), str(tmp_path / "b.yaml"), "not UTF-8")
    (tmp_path / "z.yaml").write_bytes(b"seed: 1\nlora_r: 0\x00\n")
    assert_clean_error(train(tmp_path / "z.yaml"), f"{tmp_path / 'z.yaml'}:2", "malformed YAML")
    (tmp_path / "ok.yaml").write_text("batch_size: 8\n")  # a flag that overrides the file is named as the flag
    line = assert_clean_error(lrem("train", "rl", "--init", str(tmp_path / "none"), "--config", str(tmp_path / "ok.yaml"),
                                   "--out", str(tmp_path / "o"), "--batch-size", "1"), "flag: batch_size=1")
    assert "ok.yaml" not in line
    data = write_dataset(tmp_path / "data")
    (tmp_path / "c.yaml").write_text('limit: "100"\n')
    line = assert_clean_error(lrem("construct", "--data", str(data), "--config", str(tmp_path / "c.yaml"), "--out",
                                   str(tmp_path / "run")), f"{tmp_path / 'c.yaml'}: key 'limit'")
    assert "flag" not in line
    (tmp_path / "c.yaml").write_text("split: dev\nhint: maybe\n")
    assert_clean_error(lrem("construct", "--data", str(data), "--config", str(tmp_path / "c.yaml"), "--out",
                            str(tmp_path / "run")), f"{tmp_path / 'c.yaml'}: hint='maybe'")
    assert not (tmp_path / "o").exists() and not (tmp_path / "run").exists()


def test_cli_options_default_to_the_library_functions_they_call():
    """Each shared default has one owner (`lrem._defaults`): an option the CLI passes on to a
    library function defaults to that function's own default, so `lrem` and the API agree."""
    import inspect

    from lrem import vectordb
    from lrem.bulk import search_to_file
    from lrem.cli import index_cmds, search_cmds, train_cmds
    from lrem.embed import embed_catalog
    from lrem.evaluate import run_system
    from lrem.grounding import mine_candidates
    from lrem.router import LearnedRouter, fit_router
    from lrem.search import build_systems
    from lrem.serve_service import warm_cache

    def default(fn, name):
        return inspect.signature(fn).parameters[name].default

    pairs = [(index_cmds.index, "factory", ItemIndex.build), (index_cmds.index, "batch_size", ItemIndex.build),
             (index_cmds.index, "upload_batch", vectordb.upload_catalog),
             (index_cmds.index, "batch_size", vectordb.upload_catalog),
             *((index_cmds.embed, name, embed_catalog) for name in ("chunk_size", "vector_dtype", "batch_size")),
             (search_cmds.search, "batch_size", search_to_file), (search_cmds.cache, "batch_size", warm_cache),
             (search_cmds.eval_, "batch_size", build_systems), (search_cmds.eval_, "batch_size", run_system),
             *((train_cmds.router_fit, name, fit_router) for name in ("k", "holdout", "l2", "batch_size")),
             (train_cmds.ground, "batch_size", mine_candidates)]
    for cli, name, lib in pairs:
        assert default(cli, name) == default(lib, name), (cli.__name__, name, lib.__name__)
    assert default(train_cmds.router_fit, "threshold") == LearnedRouter.threshold
