"""Stage 2 (RL): rewards, advantages, the clipped objective, rollout sampling and the trainer."""
import json
import math

import pytest
import torch

from lrem import rewards as R
from lrem.losses import IGNORE, GRPOLoss, clipped_policy_loss, group_advantages, infonce
from lrem.train import Pair, RLConfig, train_rl
from lrem.train.grpo import collate_rollouts, score_rollouts

WORDS = ["corkscrew", "wool socks", "espresso", "night cream", "toddler shirt", "shift dress", "spatula", "running shoe"]
PAIRS = [Pair(f"q{i}", f"something like a {w}", f"i{i}", w) for i, w in enumerate(WORDS)]


# ---------------------------------------------------------------- rewards

def test_r_format_hand_cases():
    cases = {
        "wine opener, corkscrew </think>": 1.0,  # closed by the policy
        " corkscrew</think><emb>": 1.0,  # it may add <emb> itself
        "</think>": 0.0,  # empty CoT
        "corkscrew, wine opener": 0.0,  # never closed (budget hit)
        "corkscrew<|im_end|>": 0.0,  # ended the turn instead
        "corkscrew<emb>": 0.0,  # <emb> without </think>
        "corkscrew\nmore text</think>": 0.0,  # two lines
        "a</think> b</think>": 0.0,
        "<think> nested </think>": 0.0,
    }
    assert R.r_format(list(cases)) == list(cases.values())


def test_r_length_and_r_acc_hand_cases():
    assert R.r_length([0, 1, 16, 17, 40], cot_max_tokens=16) == [1.0, 1.0, 1.0, 0.0, 0.0]
    acc = R.r_acc([1, 2, 8, 64], n_items=64)
    assert acc[0] == 1.0 and acc[-1] == 0.0 and acc[1] == pytest.approx(1 - math.log(2) / math.log(64))
    assert acc[2] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least 2 items"):
        R.r_acc([1], n_items=1)


def test_r_novel_counts_the_cot_words_the_query_lacks():
    q = "A Device for opening WINE bottles"
    assert R.r_novel(["corkscrew, wine-opener", "wine bottles", "", "Corkscrew corkscrew", "  , "], [q] * 5) \
        == [pytest.approx(2 / 3), 0.0, 0.0, 1.0, 0.0]
    assert R.r_novel(["café crème"], ["un café"]) == [0.5]  # letters beyond ASCII are words too
    with pytest.raises(ValueError, match="2 CoTs for 1 queries"):
        R.r_novel(["a", "b"], ["a"])


def test_combine_uses_the_paper_weights():
    cfg = RLConfig()
    assert cfg.reward_weights == {"format": 0.5, "length": 0.2, "acc": 1.0}
    parts = {"format": [1.0, 0.0, 1.0], "length": [1.0, 1.0, 0.0], "acc": [0.25, 1.0, 0.0]}
    assert R.combine(parts, cfg.reward_weights) == pytest.approx([0.95, 1.2, 0.5])
    with pytest.raises(ValueError, match="no reward values"):
        R.combine({"acc": [1.0]}, cfg.reward_weights)


def test_rl_config_refuses_no_samples_per_log():
    with pytest.raises(ValueError, match=r"samples_per_log=0; need >= 1"):  # was a ZeroDivisionError at step 1
        RLConfig(samples_per_log=0)


def test_positive_ranks_ties_and_excluded_items():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.9],  # own item 0 is last of 4
                           [0.7, 0.7, 0.2, 0.1],  # a tie counts against the positive: rank 2
                           [0.3, 0.2, 0.9, 0.8]])  # own item 2 first
    labels = torch.tensor([0, 1, 2])
    assert R.positive_ranks(scores, labels).tolist() == [4, 2, 1]
    exclude = torch.zeros(3, 4, dtype=torch.bool)
    exclude[0, 1] = exclude[0, 3] = True  # other positives of query 0 do not compete with it
    assert R.positive_ranks(scores, labels, exclude).tolist() == [2, 2, 1]


# ---------------------------------------------------------------- advantages and losses

def test_group_advantages_equal_rewards_give_zero_not_nan():
    r = torch.tensor([[0.7] * 8, [0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]])
    a = group_advantages(r)
    assert torch.isfinite(a).all() and a[0].abs().max() == 0
    assert a[1].mean().abs() < 1e-6 and a[1].std().item() == pytest.approx(1.0, abs=1e-3)
    assert (a[1][1::2] > 0).all() and (a[1][0::2] < 0).all()


def test_clipped_policy_loss_hand_computation():
    logp = torch.log(torch.tensor([[1.5, 1.0], [0.5, 1.0]]))  # ratios against old = 0
    old = torch.zeros(2, 2)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, clip = clipped_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    # row 0 (A=+1): min(1.5, 1.2) = 1.2 and 1.0 -> -(1.2 + 1.0)/2; row 1 (A=-1): min(-0.5, -0.8) = -0.8 -> 0.8
    assert loss.item() == pytest.approx((-1.1 + 0.8) / 2)
    assert clip.item() == pytest.approx(2 / 3)  # 1.5 and 0.5 are outside [0.8, 1.2]; padding ignored


def test_infonce_with_labels_matches_the_square_case():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    d = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    assert infonce(q, d, 0.1).item() == pytest.approx(infonce(q, d, 0.1, labels=torch.arange(4)).item())
    # G=2 rollouts per query against N=2 items: rows 0,1 -> item 0; rows 2,3 -> item 1
    lab = torch.tensor([0, 0, 1, 1])
    manual = torch.nn.functional.cross_entropy(q @ d[:2].T / 0.1, lab)
    assert infonce(q, d[:2], 0.1, labels=lab).item() == pytest.approx(manual.item(), rel=1e-6)


# ---------------------------------------------------------------- sampling and rollouts

def test_sample_cots_shapes_determinism_and_greedy_limit(tiny):
    texts = [p.query for p in PAIRS[:3]]
    a = tiny.sample_cots(texts, num_samples=4, max_new_tokens=6, generator=torch.Generator().manual_seed(1))
    b = tiny.sample_cots(texts, num_samples=4, max_new_tokens=6, generator=torch.Generator().manual_seed(1))
    assert a == b and len(a) == 12 and all(len(r) == 6 for r in a)
    stops, pad = set(tiny.stop_ids), tiny.tokenizer.pad_token_id
    for row in a:  # after the first stop id only padding
        k = next((i for i, t in enumerate(row) if t in stops), None)
        assert k is None or all(t == pad for t in row[k + 1:])
    assert len({tuple(r) for r in a[:4]}) > 1  # temperature 1 on a random model: the samples differ
    cold = tiny.sample_cots(texts, num_samples=2, temperature=1e-6, max_new_tokens=6)
    seqs = tiny.tokenizer(tiny.query_prompts(texts), add_special_tokens=False)["input_ids"]
    greedy = tiny.engine.greedy(seqs, 6, tiny.stop_ids)
    assert cold[0::2] == greedy and cold[1::2] == greedy  # near-zero temperature = argmax


def test_collate_rollouts_targets_and_scores(tiny):
    cfg = RLConfig(num_generations=2, batch_size=4, rollout_max_tokens=20)
    e, t, emb = tiny.tokenizer.eos_token_id, tiny.think_end_id, tiny.emb_id
    word = tiny.tokenizer(" opener", add_special_tokens=False)["input_ids"]
    pad = tiny.tokenizer.pad_token_id
    gen = [word + [t] + [pad] * 5, word * 7, [t] + [pad] * 6, word + [e] + [pad] * 5,
           word + [emb] + [pad] * 5, word * 2 + [t] + [pad], word + [t] + [pad] * 5, word + [t] + [pad] * 5]
    gen = [g[:7] + [pad] * (7 - len(g[:7])) for g in gen]
    batch = collate_rollouts(tiny, PAIRS[:4], gen, cfg)
    assert batch["ids"].shape[0] == 8 and batch["labels"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    for r in range(8):
        ids = batch["ids"][r][batch["mask"][r].bool()].tolist()
        assert ids[-2:] == [t, emb]  # every rollout is closed by the code
        tgt = [x for x in batch["lp_tgt"][r].tolist() if x != IGNORE]
        pos = batch["lp_pos"][r][: len(tgt)]
        assert tgt == gen[r][: len(tgt)] and len(tgt) >= 1  # the sampled ids, stop included
        for p_, x in zip(pos.tolist(), tgt):  # predicted from the position before; input there is the
            assert ids[p_ + 1] == x or (x in (e, emb) and ids[p_ + 1] == t)  # token or the closing </think>
    fmt = R.r_format(batch["completions"])
    assert fmt == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert batch["cot_tokens"][2] == 0 and batch["cot_tokens"][1] == 7 and len(word) == 2  # budget: all 7
    q = torch.nn.functional.normalize(torch.randn(8, 4), dim=-1)
    scored = score_rollouts(batch, q, q[::2], cfg)  # item j = rollout 2j's own embedding: that one ranks 1st
    assert scored["ranks"][0::2].tolist() == [1, 1, 1, 1]
    assert scored["advantages"].shape == (8,) and torch.isfinite(scored["advantages"]).all()
    assert batch["queries"] == [p.query for p in PAIRS[:4] for _ in range(2)]
    assert batch["cots"][2] == "" and scored["parts"]["novel"][2] == 0.0  # logged even at weight 0
    assert scored["parts"]["novel"] == R.r_novel(batch["cots"], batch["queries"])
    novel = score_rollouts(batch, q, q[::2], RLConfig(**{**vars(cfg), "novel_weight": 0.5}))
    assert (novel["reward"] - scored["reward"]).tolist() == pytest.approx([0.5 * x for x in scored["parts"]["novel"]])


def test_a_few_rl_updates_lower_the_clipped_loss_on_a_fixed_batch(tiny):
    import copy

    model = copy.deepcopy(tiny)
    cfg = RLConfig(num_generations=4, batch_size=4, rollout_max_tokens=8, cot_max_tokens=6)
    rows = model.sample_cots([p.query for p in PAIRS[:4]], 4, max_new_tokens=8,
                             generator=torch.Generator().manual_seed(0))
    batch = collate_rollouts(model, PAIRS[:4], rows, cfg)
    tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    loss_fn = GRPOLoss(model, infonce_weight=0.0)
    model.lm.train()
    opt = torch.optim.SGD(model.lm.parameters(), lr=0.05)
    with torch.no_grad():
        first = loss_fn(tensors)
    adv = torch.linspace(-1.5, 1.5, 16)  # fixed advantages: raise the late rollouts, lower the early ones
    old = first["logp"]
    losses = []
    for _ in range(4):
        parts, info = loss_fn.loss(loss_fn(tensors), tensors, adv, old)
        losses.append(parts["grpo"].item())
        parts["grpo"].backward()
        opt.step()
        opt.zero_grad()
    assert losses[0] == pytest.approx(0.0, abs=1e-6)  # ratio 1: the surrogate starts at -mean(A) = 0
    assert losses[-1] < losses[0] - 1e-3, losses


# ---------------------------------------------------------------- trainer

def write_pairs(path, pairs):
    path.write_text("".join(json.dumps(vars(p) | {"cot": ""}) + "\n" for p in pairs))
    return path


def test_train_rl_writes_a_model_and_resumes_to_the_same_weights(tmp_path, tiny_dir):
    from lrem.model import LREM

    pairs = write_pairs(tmp_path / "rl_pairs.jsonl", PAIRS)
    cfg = RLConfig(num_generations=2, batch_size=4, rollout_max_tokens=6, cot_max_tokens=4, max_steps=3,
                   learning_rate=1e-3, warmup_ratio=0.0, save_steps=1, logging_steps=1)
    state = train_rl(cfg, tiny_dir, tmp_path / "full", pairs=pairs, log=lambda *a: None)
    assert state["step"] == 3 and (tmp_path / "full" / "curves.png").stat().st_size > 1000
    hist = [json.loads(x) for x in (tmp_path / "full" / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist] == [1, 2, 3]
    for key in ("reward/format", "reward/length", "reward/acc", "reward/total", "rank/mean", "cot/tokens",
                "advantage/abs_mean", "loss/grpo", "loss/infonce", "policy/clip_frac"):
        assert key in hist[0] and math.isfinite(hist[0][key]), key
    assert 1 <= hist[0]["rank/mean"] <= 4 and 0 <= hist[0]["reward/acc"] <= 1
    samples = (tmp_path / "full" / "samples.jsonl").read_text().splitlines()
    assert samples and {"query", "completion", "reward", "rank"} <= set(json.loads(samples[0]))
    assert list((tmp_path / "full" / "tb").glob("events.*"))

    import re
    import shutil

    cut = tmp_path / "cut"
    train_rl(cfg, tiny_dir, cut, pairs=pairs, stop_after_step=2, log=lambda *a: None)
    assert not (cut / "config.json").exists()  # interrupted: no final model yet
    with pytest.raises(ValueError, match="--resume"):
        train_rl(cfg, tiny_dir, cut, pairs=pairs, log=lambda *a: None)
    # killed after logging step 2, before its checkpoint, halfway through a history line
    shutil.rmtree(cut / "checkpoints" / "step-0000002")
    with open(cut / "history.jsonl", "a") as f:
        f.write('{"step": 3, "rew')
    shutil.copytree(tiny_dir, tmp_path / "init2")
    with pytest.raises(ValueError, match=re.escape(f"base model {tiny_dir.resolve()} in the checkpoint but "
                                                   f"{(tmp_path / 'init2').resolve()} now")):
        train_rl(cfg, tmp_path / "init2", cut, pairs=pairs, resume=True, log=lambda *a: None)
    with pytest.raises(ValueError, match="sampling_temperature=1.0 in the checkpoint but 0.5 now"):
        train_rl(RLConfig(**{**vars(cfg), "sampling_temperature": 0.5}), tiny_dir, cut, pairs=pairs, resume=True,
                 log=lambda *a: None)
    train_rl(cfg, tiny_dir, cut, pairs=pairs, resume=True, log=lambda *a: None)
    hist = [json.loads(x) for x in (cut / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist] == [1, 2, 3]  # step 2 once: the interrupted run's was cut on resume
    steps = [json.loads(x)["step"] for x in (cut / "samples.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and set(steps) == {1, 2, 3} and steps.count(2) == steps.count(1)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(cut / "tb"))
    tb.Reload()
    assert [e.step for e in tb.Scalars("reward/total")] == [1, 2, 3]
    a = LREM.from_pretrained(str(tmp_path / "full"), dtype="float32").lm.state_dict()
    b = LREM.from_pretrained(str(cut), dtype="float32").lm.state_dict()
    base = LREM.from_pretrained(str(tiny_dir), dtype="float32").lm.state_dict()
    assert any(not torch.equal(a[k], base[k]) for k in a)  # it trained
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # resumed == uninterrupted


def test_cli_train_rl_and_bad_pairs(tmp_path, tiny_dir):
    from typer.testing import CliRunner

    from lrem.cli import app

    pairs = write_pairs(tmp_path / "p.jsonl", PAIRS[:4])
    r = CliRunner().invoke(app, ["train", "rl", "--init", str(tiny_dir), "--pairs", str(pairs), "--out",
                                 str(tmp_path / "rl"), "--max-steps", "1", "--batch-size", "2", "--num-generations", "2"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "rl" / "lrem_config.json").exists()
    (tmp_path / "bad.jsonl").write_text('{"query_id": "q0", "query": "x", "item_id": "i0"}\n')
    r = CliRunner().invoke(app, ["train", "rl", "--init", str(tiny_dir), "--pairs", str(tmp_path / "bad.jsonl"),
                                 "--out", str(tmp_path / "rl2")])
    assert r.exit_code != 0 and "bad.jsonl:1" in (r.output + str(r.exception))
    r = CliRunner().invoke(app, ["train", "rl", "--init", str(tiny_dir), "--out", str(tmp_path / "rl3")])
    assert r.exit_code != 0 and "rl_pairs.jsonl" in (r.output + str(r.exception))


def test_doctests():
    import doctest

    import lrem.model
    import lrem.rewards
    import lrem.search
    import lrem.train.sft

    for mod in (lrem.rewards, lrem.train.sft, lrem.search, lrem.model):
        result = doctest.testmod(mod)
        assert result.attempted > 0 and result.failed == 0, mod.__name__


def test_train_rl_under_torchrun_with_two_processes(tmp_path, tiny_dir):
    import os
    import subprocess
    import sys

    pairs = write_pairs(tmp_path / "p.jsonl", PAIRS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lrem.cli",
           "train", "rl", "--init", str(tiny_dir), "--pairs", str(pairs), "--out", str(tmp_path / "rl"),
           "--max-steps", "2", "--batch-size", "2", "--num-generations", "2"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    state = json.loads((tmp_path / "rl" / "train_state.json").read_text())
    assert (state["world_size"], state["step"]) == (2, 2)
    hist = [json.loads(x) for x in (tmp_path / "rl" / "history.jsonl").read_text().splitlines()]
    assert len(hist) == 2 and hist[-1]["time/rollouts_per_s"] > 0  # rank 0 logs the reduced values once


def test_kl_to_the_stage1_model_is_logged_and_weighted(tmp_path, tiny_dir):
    pairs = write_pairs(tmp_path / "p.jsonl", PAIRS[:4])
    cfg = RLConfig(num_generations=2, batch_size=4, rollout_max_tokens=6, cot_max_tokens=4, max_steps=2,
                   learning_rate=1e-2, warmup_ratio=0.0, kl_coef=0.5, save_steps=0)
    state = train_rl(cfg, tiny_dir, tmp_path / "kl", pairs=pairs, log=lambda *a: None)
    hist = [json.loads(x) for x in (tmp_path / "kl" / "history.jsonl").read_text().splitlines()]
    assert "loss/kl" in hist[0] and hist[0]["policy/kl"] == pytest.approx(0.0, abs=1e-6)  # step 1: policy == reference
    assert hist[1]["policy/kl"] > 0 and state["last"]["loss/kl"] == pytest.approx(hist[1]["policy/kl"], rel=1e-4)


def test_train_rl_logs_grad_norm_and_dev_metrics_from_eval_data(tmp_path, tiny_dir):
    from lrem.data import Dataset, Item, Query, save_dataset

    words = [p.item_title for p in PAIRS]
    ds = Dataset({p.item_id: Item(p.item_id, p.item_title) for p in PAIRS},
                 {f"d{i}": Query(f"d{i}", f"a {w} please", "definition", "dev") for i, w in enumerate(words)},
                 {f"d{i}": {p.item_id: 1} for i, p in enumerate(PAIRS)}, name="toy")
    save_dataset(ds, tmp_path / "data")
    pairs = write_pairs(tmp_path / "p.jsonl", PAIRS[:4])
    cfg = RLConfig(num_generations=2, batch_size=4, rollout_max_tokens=6, cot_max_tokens=4, max_steps=2,
                   learning_rate=1e-3, warmup_ratio=0.0, save_steps=0, eval_steps=1,
                   eval_data=str(tmp_path / "data"), eval_queries=3, eval_distractors=3)
    state = train_rl(cfg, tiny_dir, tmp_path / "rl", pairs=pairs, log=lambda *a: None)
    hist = [json.loads(x) for x in (tmp_path / "rl" / "history.jsonl").read_text().splitlines()]
    assert all(h["grad_norm"] > 0 for h in hist)
    assert state["dev"]["step"] == 2 and 0 <= state["dev"]["ndcg@10"] <= 1

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(tmp_path / "rl" / "tb"))
    tb.Reload()
    assert [e.step for e in tb.Scalars("dev/hitrate@10")] == [1, 2] and [e.step for e in tb.Scalars("grad_norm")] == [1, 2]


def test_train_rl_with_lora_resumes_and_saves_merged_weights(tmp_path, tiny_dir):
    """lora_r > 0 in stage 2: adapters and the new tokens' rows train (norms stay), the saved model
    is a plain LREM folder, and a resumed run ends where an uninterrupted one does."""
    from lrem.model import LREM

    pairs = write_pairs(tmp_path / "rl_pairs.jsonl", PAIRS)
    cfg = RLConfig(num_generations=2, batch_size=4, rollout_max_tokens=6, cot_max_tokens=4, max_steps=2,
                   learning_rate=1e-3, warmup_ratio=0.0, save_steps=1, logging_steps=1, lora_r=4)
    state = train_rl(cfg, tiny_dir, tmp_path / "full", pairs=pairs, log=lambda *a: None)
    assert state["step"] == 2 and state["lora"]["r"] == 4
    assert (tmp_path / "full" / "checkpoints" / "step-0000001" / "adapter" / "adapter_model.safetensors").exists()
    train_rl(cfg, tiny_dir, tmp_path / "cut", pairs=pairs, stop_after_step=1, log=lambda *a: None)
    train_rl(cfg, tiny_dir, tmp_path / "cut", pairs=pairs, resume=True, log=lambda *a: None)
    m = LREM.from_pretrained(str(tmp_path / "full"), dtype="float32")
    assert m.stages[-1]["stage"] == "rl" and m.stages[-1]["lora"]["r"] == 4
    a, base = m.lm.state_dict(), LREM.from_pretrained(str(tiny_dir), dtype="float32").lm.state_dict()
    b = LREM.from_pretrained(str(tmp_path / "cut"), dtype="float32").lm.state_dict()
    assert a.keys() == base.keys()
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    assert all(torch.equal(a[k], base[k]) for k in a if "norm" in k)  # frozen
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # resumed == uninterrupted
