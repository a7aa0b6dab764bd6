"""End to end through the real CLI with the real default model: data -> index -> search -> eval."""
from __future__ import annotations

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORDNET = Path("/usr/share/wordnet")


def lrem(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}  # wide help: no wrapped words
    p = subprocess.run([sys.executable, "-m", "lrem.cli", *args], capture_output=True, text=True, env=env,
                       timeout=900)
    if ok and p.returncode != 0:
        raise AssertionError(f"lrem {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    if not (WORDNET / "data.noun").exists():
        if os.environ.get("CI"):
            pytest.fail("CI must install wordnet-base (scripts/setup.sh does)")
        pytest.skip("WordNet is not installed")
    root = tmp_path_factory.mktemp("e2e")
    lrem("data", "wordnet", "--out", str(root / "wordnet"))
    lrem("data", "sample", "--data", str(root / "wordnet"), "--out", str(root / "small"), "--queries", "12",
         "--split", "dev", "--distractors", "120")
    return root


@pytest.mark.slow
def test_index_search_eval_with_the_default_model(small):
    out = lrem("index", "--data", str(small / "small"), "--out", str(small / "idx"))
    assert "indexed" in out.stdout
    meta = json.loads((small / "idx" / "meta.json").read_text())
    # the default model is the shipped trained one (lrem.model.default_model)
    assert meta["model"] == "lrem-wordnet-135m" and meta["dim"] == 576 and meta["factory"] == "Flat"

    res = lrem("search", "--index", str(small / "idx"), "-k", "3", "--json", "a device for pulling corks", "cheese")
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["query"] for r in rows] == ["a device for pulling corks", "cheese"]
    for r in rows:
        assert len(r["items"]) == 3 and isinstance(r["cot"], str)
        assert r["items"][0]["score"] >= r["items"][2]["score"]
    text = lrem("search", "--index", str(small / "idx"), "--mode", "direct", "mug").stdout
    assert "cot (direct): (none)" in text and "  1. " in text
    # hybrid: BM25 over the index's titles fused with the dense ranking; RRF scores, at most 2/61 here
    res = lrem("search", "--index", str(small / "idx"), "--mode", "direct", "--hybrid", "--json", "-k", "4", "corkscrew")
    [row] = [json.loads(line) for line in res.stdout.splitlines()]
    assert row["mode"] == "direct+bm25" and len(row["items"]) == 4
    assert 2 / 61 >= row["items"][0]["score"] >= row["items"][3]["score"] > 0

    report = small / "report"
    res = lrem("eval", "--data", str(small / "small"), "--split", "dev", "--out", str(report), "--examples", "2",
               "-s", "bm25", "-s", "minilm", "-s", f"lrem-direct={small / 'idx'}:direct",
               "-s", f"lrem-reason={small / 'idx'}:reason", "-s", "fresh-qcot=smollm2-135m-instruct:query-cot",
               "-s", f"hybrid=bm25+{small / 'idx'}:direct")
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["split"] == "dev" and metrics["n_queries"] == 12
    assert set(metrics["systems"]) == {"bm25", "minilm", "lrem-direct", "lrem-reason", "fresh-qcot", "hybrid"}
    assert metrics["systems"]["hybrid"]["mode"] == "rrf: 1*bm25 + 1*direct"
    for name, s in metrics["systems"].items():
        for m in ("hitrate@1", "hitrate@10", "hitrate@100", "precision@10", "ndcg@10", "mrr@10"):
            assert 0.0 <= s["overall"][m] <= 1.0, (name, m)
        assert s["ms_per_query"] > 0 and any(k.startswith("category=") for k in s["slices"])
        o = s["overall"]
        assert o["hitrate@1"] <= o["hitrate@10"] <= o["hitrate@100"], name
    # MiniLM and the shipped model are trained embedders: on definition queries they beat chance by far
    assert metrics["systems"]["minilm"]["overall"]["hitrate@10"] > 0.3
    assert metrics["systems"]["lrem-direct"]["overall"]["hitrate@10"] > 0.3
    assert "| lrem-reason |" in (report / "report.md").read_text()
    assert (report / "overall.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "cot:" in res.stdout and "(+ = relevant)" in res.stdout
    # the terminal and report.md show the same 2 examples
    printed = [line.split("]: ", 1)[1].split("  (")[0] for line in res.stdout.splitlines() if line.startswith("query [")]
    reported = re.findall(r"^\*\*[^:]+: (.+?)\*\* \(", (report / "report.md").read_text(), flags=re.M)
    assert len(printed) == 2 and printed == reported
    runs = [json.loads(line) for line in (report / "runs.jsonl").read_text().splitlines()]
    assert any(r["system"] == "lrem-reason" and r["cot"] for r in runs)


def test_bad_input_exits_with_file_line_field(tmp_path):
    (tmp_path / "catalog.jsonl").write_text('{"item_id": "a", "title": "mug"}\n{"item_id": "b"}\n')
    (tmp_path / "queries.jsonl").write_text('{"query_id": "q", "text": "cup", "category": "c", "split": "dev"}\n')
    (tmp_path / "qrels.jsonl").write_text('{"query_id": "q", "item_id": "a", "relevance": 1}\n')
    p = lrem("data", "check", str(tmp_path), ok=False)
    assert p.returncode == 2
    assert "catalog.jsonl:2" in p.stderr and "title" in p.stderr and "Traceback" not in p.stderr
    p = lrem("index", "--data", str(tmp_path), "--out", str(tmp_path / "idx"), ok=False)
    assert p.returncode == 2 and "catalog.jsonl:2" in p.stderr and not (tmp_path / "idx").exists()


@pytest.mark.parametrize("cmd", [[], ["data"], ["data", "wordnet"], ["data", "convert"], ["data", "check"],
                                 ["data", "sample"], ["index"], ["search"], ["eval"], ["router"], ["router", "fit"]])
def test_every_command_has_help(cmd):
    p = lrem(*cmd, "--help")
    assert "Usage" in p.stdout


def _plain(text: str) -> str:
    """Help or error text without box drawing and line wrapping (click also wraps after a hyphen)."""
    return re.sub(r"(\w-) (?=\w)", r"\1", " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split()))


def test_mode_options_list_exactly_the_modes_of_the_searcher(tmp_path):
    """Issue 21: `--help` lists every mode of lrem.search_types.MODES (auto included), from that tuple."""
    from lrem.search_types import MODES

    assert "auto" in MODES
    assert f"One of {', '.join(MODES)}." in _plain(lrem("search", "--help").stdout)
    assert f"MODE one of {', '.join(MODES)}, or auto@SHARE" in _plain(lrem("eval", "--help").stdout)


def test_unknown_mode_is_rejected_with_the_modes(tmp_path):
    from lrem.search_types import MODES

    p = lrem("search", "--index", str(tmp_path), "--mode", "think", "mug", ok=False)
    assert p.returncode == 2
    assert f"'think' is not a mode; expected one of {', '.join(MODES)}" in _plain(p.stderr)
    (tmp_path / "catalog.jsonl").write_text('{"item_id": "a", "title": "mug"}\n')
    (tmp_path / "queries.jsonl").write_text('{"query_id": "q", "text": "cup", "category": "c", "split": "dev"}\n')
    (tmp_path / "qrels.jsonl").write_text('{"query_id": "q", "item_id": "a", "relevance": 1}\n')
    p = lrem("eval", "--data", str(tmp_path), "--out", str(tmp_path / "ev"), "-s", f"x={tmp_path}:think", ok=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert f"system x='{tmp_path}:think': expected bm25, minilm, MODEL:MODE with MODE in {MODES}" in p.stderr
