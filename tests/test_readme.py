"""The README's "Using it" commands, run as written through the real CLI on a small sample.

What the test changes, and why (everything else is the README's own text):
- `lrem` runs as `python -m lrem.cli` (this interpreter; `source .venv/bin/activate` is skipped);
- commands after `lrem data sample` use its output wherever the README says `--data data/wordnet`
  (the full 13k-item catalog takes too long to index in a test);
- `path/to/esci` is a tiny ESCI folder in the official layout;
- `[--model M]` becomes the tiny random model and `[--threads N]` `--threads 1`; the other
  optional `[...]` parts are left out.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from test_data import esci_official

ROOT = Path(__file__).resolve().parents[1]
WORDNET = Path("/usr/share/wordnet")


def using_it_commands() -> list[str]:
    """The `lrem ...` lines of the first bash block under "## Using it", continuations joined."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Using it\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [line.strip() for line in lines if line.strip().startswith("lrem ")]


def test_using_it_lists_data_sample():
    cmds = using_it_commands()
    assert any(c.startswith("lrem data sample ") for c in cmds)
    assert [c.split()[1] for c in cmds] == ["data", "data", "data", "data", "index", "search", "search", "eval"]


@pytest.mark.slow
def test_using_it_commands_run_as_written(tmp_path, tiny_dir):
    if not (WORDNET / "data.noun").exists():
        if os.environ.get("CI"):
            pytest.fail("CI must install wordnet-base (scripts/setup.sh does)")
        pytest.skip("WordNet is not installed")
    esci = esci_official(tmp_path / "esci-src", ".csv")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if env.get("PYTHONPATH"):  # the commands run in tmp_path: relative entries (PYTHONPATH=src) made absolute
        env["PYTHONPATH"] = os.pathsep.join(str(Path(p).resolve()) for p in env["PYTHONPATH"].split(os.pathsep) if p)
    sample_out, ran = None, {}
    for line in using_it_commands():
        line = line.replace("path/to/esci", str(esci)).replace("[--model M]", f"--model {tiny_dir}")
        line = re.sub(r"\s*\[[^\]]*\]", "", line.replace("[--threads N]", "--threads 1"))
        args = shlex.split(line, comments=True)[1:]
        if sample_out and "--data" in args:
            args[args.index("--data") + 1] = sample_out
        p = subprocess.run([sys.executable, "-m", "lrem.cli", *args], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=900)
        assert p.returncode == 0, f"{line}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
        ran[" ".join(args[:2] if args[0] == "data" else args[:1]) + (" --from-file" if "--from-file" in args else "")] = p
        if args[:2] == ["data", "sample"]:
            sample_out = args[args.index("--out") + 1]
    assert list(ran) == ["data wordnet", "data sample", "data convert", "data check", "index", "search",
                         "search --from-file", "eval"]
    assert re.search(r"dev: 100 queries", ran["data sample"].stdout)
    assert "query: a device for pulling corks" in ran["search"].stdout
    rows = [json.loads(line) for line in (tmp_path / "runs" / "small.jsonl").read_text().splitlines()]
    assert len(rows) == 100 and all(len(r["items"]) == 10 for r in rows)  # the sample's 100 queries
    metrics = json.loads((tmp_path / "runs" / "eval" / "metrics.json").read_text())
    assert metrics["n_queries"] == 100 and set(metrics["systems"]) == {"bm25", "minilm", "direct", "reason", "hybrid"}
    assert ran["eval"].stdout.count("\nquery [") == 3  # --examples 3
