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
