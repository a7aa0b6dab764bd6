"""lrem.train: input checks, data order, schedule, and real training runs of the tiny model
(one process, resume, and two processes under torchrun)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lrem.data import Dataset, DataError, Item, Query
from lrem.losses import LREMLoss
from lrem.model import LREM
from lrem.train import SFTConfig, build_pairs, load_triplets, train
from lrem.train.sft import batch_indices, collate, lr_factor

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["corkscrew", "chair", "coffee", "teapot", "hammer", "lamp", "spoon", "blanket"]


def _rows(n=8):
    return [{"query_id": f"q{i}", "query": f"something like a {w}", "cot": f"{w}, {w}s",
             "item_id": f"i{i}", "item_title": w} for i, w in enumerate(WORDS[:n])]


def _write(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def triplets(tmp_path):
    return _write(tmp_path / "triplets.jsonl", _rows())


def _cfg(tiny_dir, **kw):
    base = dict(model=str(tiny_dir), batch_size=4, learning_rate=1e-3, warmup_ratio=0.0, logging_steps=1,
                save_steps=0, max_steps=4)
    return SFTConfig(**{**base, **kw})


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("lines, line, field", [
    ([], None, None),  # empty file
    ([json.dumps(_rows()[0]), "{not json"], 2, None),  # malformed line
    ([{**_rows()[0], "item_title": ""}], 1, "item_title"),  # empty field
    ([{k: v for k, v in _rows()[0].items() if k != "query"}], 1, "query"),  # missing field
    ([_rows()[0], {**_rows()[1], "cot": " ".join(["word"] * 40)}], 2, "cot"),  # CoT over 16 tokens
    ([_rows()[0], {**_rows()[1], "item_id": "i0"}], 2, "item_title"),  # 2 titles
])
def test_bad_triplets_name_file_line_field(tmp_path, tiny, lines, line, field):
    path = _write(tmp_path / "t.jsonl", lines)
    with pytest.raises(DataError) as e:
        load_triplets(path, tiny.tokenizer, cot_max_tokens=16)
    assert (e.value.path, e.value.line, e.value.field) == (str(path), line, field)
    assert str(path) in str(e.value)


def test_unknown_ids_and_pairs_from_dataset(triplets):
    ds = Dataset(catalog={f"i{i}": Item(f"i{i}", w) for i, w in enumerate(WORDS)} | {"x": Item("x", "extra")},
                 queries={f"q{i}": Query(f"q{i}", f"q {w}", "definition", "train") for i, w in enumerate(WORDS)}
                 | {"q9": Query("q9", "an extra query", "definition", "train")},
                 qrels={"q0": {"i0": 1}, "q9": {"x": 1}})
    pairs, held = build_pairs(triplets, ds, "train")
    assert len(pairs) == 9 and pairs[-1].query_id == "q9" and pairs[-1].cot is None and not held  # qrels add q9
    assert all(p.cot is None for p in build_pairs(triplets, ds, "train", use_cot=False)[0])
    # RL holdout: only qrels-only queries can be held back, and the two sets never overlap
    for i in range(10, 60):
        ds.queries[f"q{i}"] = Query(f"q{i}", f"query {i}", "definition", "train")
        ds.qrels[f"q{i}"] = {"x": 1}
    pairs, held = build_pairs(triplets, ds, "train", rl_share=0.5)
    assert 10 < len(held) < 40 and {p.query_id for p in pairs}.isdisjoint(p.query_id for p in held)
    assert all(p.cot is None for p in held) and sum(p.cot is not None for p in pairs) == 8  # every CoT kept
    assert build_pairs(triplets, ds, "train", rl_share=0.5, use_cot=False)[1] == held  # direct: same holdout
    del ds.catalog["i3"]
    with pytest.raises(DataError, match=r"t.*jsonl:4: field 'item_id': unknown item id 'i3'"):
        build_pairs(triplets, ds, "train")


def test_triplets_of_another_split_are_refused(tmp_path):
    """Training on dev or test queries would leak into their evaluation."""
    ds = _dev_dataset()
    path = _write(tmp_path / "t.jsonl", [_rows()[0], {**_rows()[1], "query_id": "d1", "query": "a chair please"}])
    with pytest.raises(DataError, match=r"t\.jsonl:2: field 'query_id': query 'd1' is in the 'dev' split, not 'train'"):
        build_pairs(path, ds, "train")
    with pytest.raises(DataError, match=r"t\.jsonl:1: .*query 'q0' is in the 'train' split, not 'dev'"):
        build_pairs(path, ds, "dev")
    pairs, _ = build_pairs(path, ds, "all")  # every split, asked for
    assert [p.query_id for p in pairs[:2]] == ["q0", "d1"]


def test_batch_sampler_mixes_cot_pairs_deterministically():
    from lrem.train.sft import BatchSampler

    has_cot = [i % 10 == 0 for i in range(200)]  # 20 CoT pairs among 200
    s = BatchSampler(has_cot, 8, cot_share=0.5, seed=3)
    assert s.steps_per_epoch(1) == 45  # the larger pool (180 / 4) sets the epoch
    for step in range(30):  # 4 CoT pairs per batch, no repeats within a batch, same for a fresh sampler
        idx = s(step, 1, 0)
        assert sum(has_cot[i] for i in idx) == 4 and len(set(idx)) == 8
        assert idx == BatchSampler(has_cot, 8, cot_share=0.5, seed=3)(step, 1, 0)
    two = BatchSampler(has_cot, 4, cot_share=0.5, seed=3)
    assert sorted(two(5, 2, 0) + two(5, 2, 1)) == sorted(s(5, 1, 0))  # 2 processes x 4 == 1 x 8
    plain = BatchSampler(has_cot, 8)
    assert sum(sum(has_cot[i] for i in plain(step, 1, 0)) for step in range(25)) < 40  # no mixing: ~10%
    with pytest.raises(ValueError, match="cot_share"):
        BatchSampler([True] + [False] * 50, 8, cot_share=0.5).steps_per_epoch(1)


def test_cli_reports_bad_input_before_training(tmp_path, tiny_dir):
    from lrem.cli import app

    bad = _write(tmp_path / "bad.jsonl", [json.dumps(_rows()[0]), "[1, 2]"])
    res = CliRunner().invoke(app, ["train", "coldstart", "--triplets", str(bad), "--model", str(tiny_dir),
                                   "--out", str(tmp_path / "m")])
    assert isinstance(res.exception, DataError) and f"{bad}:2:" in str(res.exception)
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------- config, data order, schedule

def test_configs_load_and_checks():
    cold = SFTConfig.load(ROOT / "configs/coldstart.yaml")
    direct = SFTConfig.load(ROOT / "configs/direct.yaml", max_steps=10)
    assert (cold.sft_weight, cold.infonce_weight, cold.use_cot, cold.cot_max_tokens) == (0.1, 1.0, True, None)
    assert (direct.sft_weight, direct.use_cot, direct.max_steps) == (0.0, False, 10)
    assert {k: v for k, v in cold.to_dict().items() if k not in ("use_cot", "sft_weight")} == \
           {k: v for k, v in direct.to_dict().items() if k not in ("use_cot", "sft_weight", "max_steps")} | {"max_steps": None}
    with pytest.raises(ValueError, match="unknown key 'lr'"):
        SFTConfig.load(None, lr=1.0)
    with pytest.raises(ValueError, match="use_cot=false with sft_weight=0.1"):
        SFTConfig(use_cot=False)


def test_batch_indices_are_a_function_of_seed_and_step():
    n, bs, world = 20, 3, 2
    steps = n // (bs * world)  # 3 full global batches per epoch
    epoch = [i for s in range(steps) for r in range(world) for i in batch_indices(n, s, bs, world, r, seed=7)]
    assert len(set(epoch)) == len(epoch) == steps * bs * world  # disjoint across ranks and steps
    assert batch_indices(n, 4, bs, world, 1, 7) == batch_indices(n, 4, bs, world, 1, 7)
    assert batch_indices(n, 0, bs, world, 0, 7) != batch_indices(n, steps, bs, world, 0, 7)  # new epoch order


def test_lr_factor_warmup_then_cosine():
    assert [lr_factor(s, 10, 2) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, 10, 2) == 1.0 and lr_factor(6, 10, 2) == pytest.approx(0.5)
    assert lr_factor(9, 10, 2) < 0.05 and lr_factor(5, 10, 2, "constant") == 1.0


# ---------------------------------------------------------------- training runs (tiny model)

def _loss(model_dir, pairs):
    m = LREM.from_pretrained(str(model_dir), dtype="float32")
    with torch.no_grad():
        parts = LREMLoss(m, sft_weight=0.1)(collate(m, pairs))
    return {k: v.item() for k, v in parts.items()}


def test_coldstart_trains_and_writes_a_model_folder(tmp_path, tiny_dir, triplets):
    out = tmp_path / "cold"
    pairs = load_triplets(triplets)
    state = train(_cfg(tiny_dir, max_steps=8, save_steps=4), out, triplets=triplets, log=lambda *_: None)
    assert state["step"] == 8 and state["world_size"] == 1 and set(state["losses"]) == {"sft", "infonce", "total"}
    saved = json.loads((out / "train_state.json").read_text())
    assert saved["step"] == 8 and saved["config"]["sft_weight"] == 0.1
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000004"]  # step 8 is the final model
    before, after = _loss(tiny_dir, pairs), _loss(out, pairs)
    assert after["sft"] < before["sft"] and after["infonce"] < before["infonce"]
    m = LREM.from_pretrained(str(out))  # an LREM folder, as index/search/eval take it
    assert m.encode_items(["chair"]).shape == (1, m.dim)
    assert m.stages == [{"stage": "coldstart", "steps": 8, "examples": len(pairs), "data": str(triplets),
                           "init": str(tiny_dir), "batch_size": 4, "learning_rate": saved["config"]["learning_rate"],
                           "seed": saved["seed"]}]
    card = (out / "README.md").read_text()  # the model card names the stage, its data and steps
    assert "stage 1, cold start" in card and f"| 8 | {len(pairs)} | {triplets} |" in card


def test_resume_gives_the_same_weights_as_a_straight_run(tmp_path, tiny_dir, triplets):
    straight, resumed = tmp_path / "a", tmp_path / "b"
    cfg = _cfg(tiny_dir, max_steps=6, save_steps=2)
    sa = train(cfg, straight, triplets=triplets, log=lambda *_: None)
    part = train(cfg, resumed, triplets=triplets, stop_after_step=3, log=lambda *_: None)  # "interrupted"
    assert part["step"] == 3 and not (resumed / "config.json").exists()
    assert (resumed / "checkpoints" / "step-0000003").exists()
    sb = train(cfg, resumed, triplets=triplets, resume=True, log=lambda *_: None)
    assert sb["step"] == sa["step"] == 6
    wa, wb = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
    assert sb["losses"]["total"] == pytest.approx(sa["losses"]["total"], abs=1e-5)
    w0 = load_file(Path(tiny_dir) / "model.safetensors")
    assert not torch.equal(wa["model.layers.0.mlp.down_proj.weight"], w0["model.layers.0.mlp.down_proj.weight"])
    with pytest.raises(ValueError, match="already has checkpoints"):
        train(cfg, resumed, triplets=triplets, log=lambda *_: None)  # no silent restart over a run
    with pytest.raises(ValueError, match="batch_size=4 in the checkpoint but 2 now"):
        train(_cfg(tiny_dir, max_steps=6, batch_size=2), resumed, triplets=triplets, resume=True, log=lambda *_: None)


def _base_changed(before, now) -> str:
    import re

    return re.escape(f"base model {Path(before).resolve()} in the checkpoint but {Path(now).resolve()} now")


def test_resume_refuses_other_settings_data_or_base_and_takes_new_logging_settings(tmp_path, tiny_dir, triplets,
                                                                                   monkeypatch):
    """A resume that changed what trains would record one run and train another."""
    import shutil

    cfg, out = _cfg(tiny_dir, max_steps=4, save_steps=2), tmp_path / "run"
    train(cfg, out, triplets=triplets, stop_after_step=2, log=lambda *_: None)

    def resume(cfg, data=triplets):
        return train(cfg, out, triplets=data, resume=True, log=lambda *_: None)

    with pytest.raises(ValueError, match=r"learning_rate=0.001 in the checkpoint but 0.002 now; "
                                         r"temperature=0.05 in the checkpoint but 5.0 now; resume needs the same"):
        resume(_cfg(tiny_dir, max_steps=4, save_steps=2, learning_rate=2e-3, temperature=5.0))
    with pytest.raises(ValueError, match="lr_schedule=cosine in the checkpoint but constant now"):
        resume(_cfg(tiny_dir, max_steps=4, save_steps=2, lr_schedule="constant"))
    other = _write(tmp_path / "other.jsonl", [{**r, "query": r["query"].upper()} for r in _rows()])  # same length
    with pytest.raises(ValueError, match="examples_sha256=.* in the checkpoint but .* now"):
        resume(cfg, other)
    shutil.copytree(tiny_dir, tmp_path / "base2")
    with pytest.raises(ValueError, match=_base_changed(tiny_dir, tmp_path / "base2")):
        resume(_cfg(tmp_path / "base2", max_steps=4, save_steps=2))
    assert json.loads((out / "checkpoints" / "step-0000002" / "train_state.json").read_text())["step"] == 2
    # the same base spelt another way, and new logging and checkpoint settings: resumed
    monkeypatch.chdir(Path(tiny_dir).parent)
    state = resume(_cfg(Path(tiny_dir).name, max_steps=4, save_steps=1, logging_steps=2, save_total_limit=3))
    assert state["step"] == 4 and state["config"]["learning_rate"] == 1e-3


def test_a_resume_after_a_crash_logs_each_step_once(tmp_path, tiny_dir, triplets):
    """Steps an interrupted run logged after its last checkpoint are dropped from TensorBoard, not doubled."""
    import shutil

    cfg, out = _cfg(tiny_dir, max_steps=4, save_steps=2), tmp_path / "run"
    train(cfg, out, triplets=triplets, stop_after_step=3, log=lambda *_: None)
    shutil.rmtree(out / "checkpoints" / "step-0000003")  # killed after logging step 3, before its checkpoint
    train(cfg, out, triplets=triplets, resume=True, log=lambda *_: None)
    assert [s for s, _ in _scalars(out / "tb")["loss/total"]] == [1, 2, 3, 4]


class _RunsCode:
    """What a tampered checkpoint could hold: unpickling it calls Path.touch (any callable would do)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_resume_never_unpickles_code_from_a_checkpoint(tmp_path, tiny_dir, triplets):
    cfg = _cfg(tiny_dir, max_steps=4, save_steps=2)
    train(cfg, tmp_path / "run", triplets=triplets, stop_after_step=2, log=lambda *_: None)
    ckpt = tmp_path / "run" / "checkpoints" / "step-0000002"
    saved = torch.load(ckpt / "trainer.pt", weights_only=True)  # what train writes loads safely
    assert {"optimizer", "scheduler", "torch_rng"} <= set(saved)
    pwned = tmp_path / "PWNED"
    torch.save({**saved, "extra": _RunsCode(pwned)}, ckpt / "trainer.pt")
    with pytest.raises(ValueError, match="trainer.pt: cannot load the optimizer state"):
        train(cfg, tmp_path / "run", triplets=triplets, resume=True, log=lambda *_: None)
    assert not pwned.exists()


def test_overwrite_starts_a_finished_run_over(tmp_path, tiny_dir, triplets):
    cfg = _cfg(tiny_dir, max_steps=2, save_steps=1)
    train(cfg, tmp_path / "run", triplets=triplets, log=lambda *_: None)
    with pytest.raises(ValueError, match="--overwrite"):
        train(cfg, tmp_path / "run", triplets=triplets, log=lambda *_: None)
    (tmp_path / "run" / "notes.txt").write_text("the user's")  # --overwrite never deletes what lrem did not write
    with pytest.raises(ValueError, match="notes.txt"):
        train(cfg, tmp_path / "run", triplets=triplets, overwrite=True, log=lambda *_: None)
    assert (tmp_path / "run" / "notes.txt").exists()
    (tmp_path / "run" / "notes.txt").unlink()
    state = train(cfg, tmp_path / "run", triplets=triplets, overwrite=True, log=lambda *_: None)
    assert state["step"] == 2
    with pytest.raises(ValueError, match="is the input"):
        train(_cfg(tmp_path / "run", max_steps=2), tmp_path / "run", triplets=triplets, overwrite=True,
              log=lambda *_: None)
    assert (tmp_path / "run" / "config.json").exists()  # the model it would have trained from is intact


def test_direct_under_torchrun_with_two_processes(tmp_path, tiny_dir, triplets):
    out = tmp_path / "direct"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lrem.cli", "train", "direct", "--pairs", str(triplets), "--model", str(tiny_dir),
           "--out", str(out), "--max-steps", "2", "--batch-size", "2"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    state = json.loads((out / "train_state.json").read_text())
    assert (state["world_size"], state["global_batch_size"], state["step"]) == (2, 4, 2)
    assert state["config"]["use_cot"] is False and set(state["losses"]) == {"infonce", "total"}
    assert LREM.from_pretrained(str(out)).encode_queries(["a chair"], mode="direct").embeddings.shape[0] == 1


def test_bf16_and_gradient_checkpointing_options(tmp_path, tiny_dir, triplets):
    cfg = _cfg(tiny_dir, max_steps=2, bf16=True, gradient_checkpointing=True)
    state = train(cfg, tmp_path / "bf16", triplets=triplets, log=lambda *_: None)
    assert state["step"] == 2 and all(torch.isfinite(torch.tensor(v)) for v in state["losses"].values())
    assert LREM.from_pretrained(str(tmp_path / "bf16"), dtype="float32").lm.dtype == torch.float32
    assert state["precision"] == "bf16"


def test_bf16_auto_follows_the_hardware(tmp_path, tiny_dir, triplets):
    """bf16 None (the default): autocast exactly where default_dtype finds native bfloat16."""
    from lrem.backbones import default_dtype
    from lrem.train.sft import mixed_precision

    native = default_dtype("cuda" if torch.cuda.is_available() else "cpu") == torch.bfloat16
    assert SFTConfig().bf16 is None and mixed_precision(None) == ("bf16" if native else "no")
    assert mixed_precision(False) == "no" and mixed_precision(True) == "bf16"
    state = train(_cfg(tiny_dir, max_steps=1), tmp_path / "auto", triplets=triplets, log=lambda *_: None)
    assert state["precision"] == ("bf16" if native else "no")


def test_gzipped_triplets_load_as_the_plain_file(tmp_path, tiny_dir, triplets):
    """Committed triplet sets are gzipped JSONL: training reads them with no other step, and a
    damaged archive is one error naming the file."""
    import gzip

    gz = tmp_path / "triplets.jsonl.gz"
    gz.write_bytes(gzip.compress(triplets.read_bytes()))
    assert load_triplets(gz) == load_triplets(triplets)
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(gzip.compress(triplets.read_bytes())[:-12])
    with pytest.raises(DataError, match="bad.jsonl.gz: not a readable gzip file"):
        load_triplets(bad)
    out = tmp_path / "cold"
    r = subprocess.run([sys.executable, "-m", "lrem.cli", "train", "coldstart", "--triplets", str(gz), "--out", str(out),
                        "--model", str(tiny_dir), "--max-steps", "1", "--batch-size", "4"],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "config.json").exists()


def _dev_dataset() -> Dataset:
    """The triplets' train queries plus 4 dev queries over the same 8 items."""
    dev = {f"d{i}": Query(f"d{i}", f"a {w} please", "definition", "dev") for i, w in enumerate(WORDS[:4])}
    return Dataset(catalog={f"i{i}": Item(f"i{i}", w) for i, w in enumerate(WORDS)},
                   queries={f"q{i}": Query(f"q{i}", f"something like a {w}", "definition", "train")
                            for i, w in enumerate(WORDS)} | dev,
                   qrels={f"q{i}": {f"i{i}": 1} for i in range(len(WORDS))} | {f"d{i}": {f"i{i}": 1} for i in range(4)})


def _scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_gets_grad_norm_and_dev_hitrate_every_eval_steps(tmp_path, tiny_dir, triplets):
    """Issue 17: a run's quality can be followed while it trains."""
    from lrem.train.dev_eval import DevEval

    ds, out = _dev_dataset(), tmp_path / "cold"
    cfg = _cfg(tiny_dir, max_steps=5, eval_steps=2, eval_queries=3, eval_distractors=2, max_grad_norm=0.0)
    state = train(cfg, out, triplets=triplets, dataset=ds, log=lambda *_: None)
    tags = _scalars(out / "tb")
    assert [s for s, _ in tags["dev/hitrate@10"]] == [2, 4, 5] and [s for s, _ in tags["dev/ndcg@10"]] == [2, 4, 5]
    assert all(0 <= v <= 1 for _, v in tags["dev/hitrate@10"])
    assert [s for s, _ in tags["grad_norm"]] == [1, 2, 3, 4, 5] and all(v > 0 for _, v in tags["grad_norm"])
    # the last value is the saved model's, on the same fixed sample (3 dev queries, their items, 2 others)
    dev = DevEval(ds, "dev", 3, 2, cfg.seed, "reason")
    assert len(dev.queries) == 3 and len(dev.titles) == 5 and set(dev.queries) <= {"d0", "d1", "d2", "d3"}
    final = dev(LREM.from_pretrained(str(out), dtype="float32"))
    # (5 items: hitrate@10 is 1 whatever the model; nDCG@10 tells the rankings apart)
    assert state["dev"]["step"] == 5 and state["dev"]["ndcg@10"] == pytest.approx(final["ndcg@10"])
    assert tags["dev/ndcg@10"][-1][1] == pytest.approx(final["ndcg@10"])
    before = dev(LREM.from_pretrained(str(tiny_dir), dtype="float32"))
    assert before["ndcg@10"] != pytest.approx(final["ndcg@10"])  # it measured the trained model
    with pytest.raises(ValueError, match="eval_steps=2 needs a dataset"):
        train(cfg, tmp_path / "nodata", triplets=triplets, log=lambda *_: None)


def test_cot_max_tokens_set_for_training_is_saved_with_the_model(tmp_path, lively_dir, triplets):
    """The prompt config owns l: a training run that sets cot_max_tokens writes it into the model
    it saves, which then generates at most that many tokens (before, only the triplet filter saw it)."""
    short = _write(tmp_path / "short.jsonl", [{**r, "cot": r["item_title"]} for r in _rows()])
    out = tmp_path / "cold8"
    train(_cfg(lively_dir("llama"), max_steps=2, cot_max_tokens=8), out, triplets=short, log=lambda *_: None)
    m = LREM.from_pretrained(str(out), dtype="float32")
    assert m.config.cot_max_tokens == 8
    queries = ["a device for pulling corks", "something warm for the feet", "a drink stronger than tea"]
    assert all(m.generate_cots(queries))
    rows = m.sample_cots(queries, num_samples=2)  # token ids, each row the generation budget long
    assert len(rows) == 6 and {len(r) for r in rows} == {8}
    # unset: the model keeps its own (16 for a backbone)
    train(_cfg(lively_dir("llama"), max_steps=1), tmp_path / "cold16", triplets=short, log=lambda *_: None)
    assert LREM.from_pretrained(str(tmp_path / "cold16")).config.cot_max_tokens == 16
    with pytest.raises(ValueError, match="cot_max_tokens=0"):
        _cfg(lively_dir("llama"), cot_max_tokens=0)


# ---------------------------------------------------------------- LoRA (lrem.train.lora)

def _changed(a: dict, b: dict) -> set[str]:
    return {k for k in a if not torch.equal(a[k], b[k])}


def test_lora_trains_only_adapters_and_the_new_token_rows(tmp_path, tiny_dir, triplets):
    """lora_r > 0: the saved model is a plain LREM folder whose projections moved by rank <= r,
    whose new tokens' rows moved, and nothing else; checkpoints hold the adapter, not the model."""
    from lrem.train.lora import LORA_TARGETS

    out = tmp_path / "lora"
    state = train(_cfg(tiny_dir, max_steps=4, save_steps=2, lora_r=4), out, triplets=triplets, log=lambda *_: None)
    assert state["lora"] == {"r": 4, "alpha": 32, "dropout": 0.0, "target_modules": list(LORA_TARGETS)}
    m, base = LREM.from_pretrained(str(out), dtype="float32"), LREM.from_pretrained(str(tiny_dir), dtype="float32")
    assert m.stages[-1]["lora"]["r"] == 4 and "(LoRA r=4) | 4 |" in (out / "README.md").read_text()
    w, w0 = m.lm.state_dict(), base.lm.state_dict()
    assert w.keys() == w0.keys()  # merged: no adapter tensors left
    projections = {k for k in w0 if any(f".{t}." in k for t in LORA_TARGETS)}
    assert _changed(w, w0) == projections | {"model.embed_tokens.weight", "lm_head.weight"}  # the head is tied
    for k in projections:
        s = torch.linalg.svdvals(w[k] - w0[k])
        assert s[4] < 1e-5 * s[0], k  # rank 4 (float32 rounding aside)
    new = [m.think_id, m.think_end_id, m.emb_id]
    rows = _changed({i: w["model.embed_tokens.weight"][i] for i in range(len(w0["model.embed_tokens.weight"]))},
                    {i: w0["model.embed_tokens.weight"][i] for i in range(len(w0["model.embed_tokens.weight"]))})
    assert rows == set(new)  # of 49,155 rows, only <think>, </think> and <emb>
    ckpt = out / "checkpoints" / "step-0000002"
    assert not (ckpt / "model").exists() and (ckpt / "adapter" / "adapter_config.json").exists()
    assert (ckpt / "adapter" / "adapter_model.safetensors").stat().st_size < 100_000  # adapters + 3 rows
    assert m.encode_items(["chair"]).shape == (1, m.dim)
    with pytest.raises(ValueError, match="lora_dropout=1.0"):
        _cfg(tiny_dir, lora_r=4, lora_dropout=1.0)
    with pytest.raises(ValueError, match="lora_r=-1"):
        _cfg(tiny_dir, lora_r=-1)
    with pytest.raises(ValueError, match="LoRA on .*no_such_proj"):
        train(_cfg(tiny_dir, lora_r=4, lora_target_modules=["no_such_proj"]), tmp_path / "bad", triplets=triplets,
              log=lambda *_: None)


def test_lora_resume_gives_the_same_weights_as_a_straight_run(tmp_path, tiny_dir, triplets):
    cfg = _cfg(tiny_dir, max_steps=4, save_steps=2, lora_r=4, lora_dropout=0.1)  # dropout: the RNG must resume too
    train(cfg, tmp_path / "a", triplets=triplets, log=lambda *_: None)
    train(cfg, tmp_path / "b", triplets=triplets, stop_after_step=3, log=lambda *_: None)
    sb = train(cfg, tmp_path / "b", triplets=triplets, resume=True, log=lambda *_: None)
    assert sb["step"] == 4
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"LoRA .*'r': 4.* in the checkpoint but off \(lora_r=0\) now"):
        train(_cfg(tiny_dir, max_steps=4, save_steps=2), tmp_path / "b", triplets=triplets, resume=True,
              log=lambda *_: None)
    import shutil

    train(cfg, tmp_path / "c", triplets=triplets, stop_after_step=2, log=lambda *_: None)
    shutil.copytree(tiny_dir, tmp_path / "base2")  # the adapter was trained over tiny_dir, not this
    with pytest.raises(ValueError, match=_base_changed(tiny_dir, tmp_path / "base2")):
        train(_cfg(tmp_path / "base2", max_steps=4, save_steps=2, lora_r=4, lora_dropout=0.1), tmp_path / "c",
              triplets=triplets, resume=True, log=lambda *_: None)


def test_an_lrem_with_lora_layers_encodes_as_its_merged_weights(lively_dir):
    """While LoRA layers are in the LM (training: dev eval, RL rollouts) the fast CPU paths, which
    read weight tensors directly, step aside: CoTs and embeddings are those of the merged model."""
    from lrem.train.lora import add_lora, merge_lora

    m = LREM.from_pretrained(str(lively_dir("llama")), dtype="float32")
    adapter = add_lora(m, SFTConfig(lora_r=4))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained adapter stand-in (B starts at zero)
        for name, p in m.lm.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    queries = ["a device for pulling corks", "something warm for the feet", "a drink stronger than tea"]
    titles = ["corkscrew, bottle screw", "slipper"]
    batch, one = m.encode_queries(queries), m.encode_queries(queries[:1])  # reason mode; one query: its own path
    items = m.encode_items(titles)
    rows = m.sample_cots(queries[:1], num_samples=2, generator=torch.Generator().manual_seed(1))
    merge_lora(m, adapter)
    assert m.engine.plain_layers()
    merged = m.encode_queries(queries)
    assert batch.cots == merged.cots and one.cots == merged.cots[:1]
    np.testing.assert_allclose(batch.embeddings, merged.embeddings, atol=1e-5)
    np.testing.assert_allclose(one.embeddings, merged.embeddings[:1], atol=1e-5)
    np.testing.assert_allclose(items, m.encode_items(titles), atol=1e-5)
    assert rows == m.sample_cots(queries[:1], num_samples=2, generator=torch.Generator().manual_seed(1))
