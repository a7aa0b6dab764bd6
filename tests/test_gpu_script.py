"""The GPU script (`benchmarks/gpu.sh`) rehearsed on the CPU: GPU sessions are rare and their time
short, so the script that spends it must already run here, step by step, with tiny shapes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_rehearsal_runs_every_step_and_writes_its_results(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    res = subprocess.run(["bash", "benchmarks/gpu.sh", "--rehearse"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=800)
    steps = "\n".join(line for line in res.stdout.splitlines() if line.startswith("=== "))  # which step failed
    assert res.returncode == 0, steps + "\n" + res.stdout[-3000:] + res.stderr[-3000:]
    for step in ("graph_check", "query_latency", "train tiny", "trainers tiny"):
        assert f"=== {step}: rc 0" in res.stdout, res.stdout[-3000:]
    ql = json.loads((tmp_path / "gpu-query_latency.json").read_text())["shaped"]
    assert "partial" not in ql  # the last write is the whole run's
    assert ql["model"] == "tiny-shaped (random weights)"
    assert {r["batch"] for r in ql["rows"]} == {1, 4}
    for check in ql["checks"].values():  # the fast path gives the plain path's CoTs on the shaped model too
        assert check["same_cots"] and check["max_abs_embedding_diff"] < 1e-2
    tr = json.loads((tmp_path / "gpu-train-tiny.json").read_text())
    assert tr["model"] == "tiny-shaped (random weights)" and tr["device"] == "cpu"
    assert {r["path"] for r in tr["rl_rows"]} == {"RL float32", "RL bf16 autocast", "RL float32, LoRA r=4",
                                                 "RL bf16 autocast, LoRA r=4"}
    assert all(r["s/step"] > 0 for r in tr["rows"] + tr["rl_rows"])
    loop = json.loads((tmp_path / "gpu-trainers-tiny.json").read_text())  # the real trainers, both stages
    assert [(r["stage"], r["steps"], r["checkpoints"]) for r in loop["rows"]] == [
        ("coldstart", 2, ["step-0000001"]), ("rl", 2, ["step-0000001"])]
    assert (tmp_path / "gpu.log").read_text().count("=== ") >= 8  # the log the device call brings back


def test_train_benchmark_keeps_the_other_settings_when_one_fails(tmp_path):
    """A setting that fails (here LoRA with an invalid rank) leaves a row naming its error, and
    the run goes on and writes its results: a GPU run is rare, so one failure must not cost the rest."""
    res = subprocess.run([sys.executable, "benchmarks/train.py", "--shape", "tiny", "--steps", "1", "--batch", "4",
                          "--rl-steps", "0", "--lora-r", "-1", "--threads", "2", "--name", str(tmp_path / "t")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads((tmp_path / "t.json").read_text())
    ok, failed = [r for r in out["rows"] if "error" not in r], [r for r in out["rows"] if "error" in r]
    assert [r["path"] for r in ok] == ["shared prefix", "plain", "shared prefix, bf16 autocast"]
    assert len(failed) == 2 and all("lora_r=-1" in r["error"] for r in failed)
    assert set(out["speedups"]) == {r["path"] for r in ok} and out["speedup_lora"] is None
    assert out["rl"] == "not run (--rl-steps 0)"


def _results_state() -> dict:
    return {p.name: p.stat().st_mtime_ns for p in (ROOT / "benchmarks" / "results").glob("*.json")}


def test_benchmarks_write_where_name_says_and_print_the_load_average(tmp_path, tiny_dir):
    """A trial run at tiny settings must not overwrite the committed results: every script takes
    --name (here a path), and prints the load average with its figures."""
    before = _results_state()
    runs = {"update": ["benchmarks/update.py", "--items", "20", "--changed", "0.1", "--model", str(tiny_dir)],
            "index": ["benchmarks/index.py", "--sizes", "1000", "--dim", "64", "--queries", "5"]}
    for name, cmd in runs.items():
        res = subprocess.run([sys.executable, *cmd, "--threads", "1", "--name", str(tmp_path / name)], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        assert "load average (1 min): " in res.stdout, res.stdout[-2000:]
        assert "load_average_1m" in json.loads((tmp_path / f"{name}.json").read_text())["machine"]
    assert _results_state() == before


def test_serve_load_rejects_a_queries_file_it_cannot_use(tmp_path):
    """A mistyped --queries path used to switch silently to the built-in list (figures for other
    queries), and a file without a 'query' column died dividing by zero: one line, exit 2."""
    bad = tmp_path / "q.csv"
    bad.write_text("id\ttext\n1\tsofa\n")
    for path, why in ((tmp_path / "missing.csv", "no such file"), (bad, "no queries")):
        res = subprocess.run([sys.executable, "benchmarks/serve_load.py", "--index", str(tmp_path), "--queries",
                              str(path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
        assert str(path) in res.stderr and why in res.stderr


def test_threads_benchmark_shows_why_its_worker_failed(tmp_path):
    """The worker runs in a fresh process with its output captured: its error must reach the user,
    not only "CalledProcessError ... exit status 1"."""
    res = subprocess.run([sys.executable, "benchmarks/threads.py", "--items", "4", "--repeat", "1", "--dtype", "fp99",
                          "--name", str(tmp_path / "t")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "CalledProcessError" not in res.stderr, res.stderr[-2000:]
    assert "fp99" in res.stderr and "the worker (default OMP wait policy) failed" in res.stderr
    assert not (tmp_path / "t.json").exists()


def test_train_benchmark_refuses_rl_queries_below_two_before_any_step(tmp_path):
    """One query per RL step cannot be ranked among the batch's items: every RL row used to fail
    after the stage-1 rows had run; now the arguments are refused at once."""
    res = subprocess.run([sys.executable, "benchmarks/train.py", "--shape", "tiny", "--rl-queries", "1",
                          "--name", str(tmp_path / "t")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--rl-queries must be at least 2" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "t.json").exists()
