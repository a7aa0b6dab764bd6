"""What r_acc ranks among in RL: the batch (paper), mined hard negatives, or the whole catalog."""
import json

import pytest
import torch

from lrem import rewards as R
from lrem.data import Dataset, Item, Query
from lrem.data.formats import save_dataset
from lrem.train import Pair, RLConfig, train_rl
from lrem.train.grpo import collate_rollouts
from lrem.train.rank_pool import RankPool
from lrem.train.sft import write_pairs as _write

WORDS = ["corkscrew", "wool socks", "espresso", "night cream", "toddler shirt", "shift dress", "spatula", "running shoe"]
OTHER = ["tea kettle", "wine glass", "hiking boot", "face mask", "baby onesie", "ladle", "sock drawer", "tumbler",
         "coffee grinder", "moisturiser", "sandal", "whisk"]
PAIRS = [Pair(f"q{i}", f"something like a {w}", f"i{i}", w) for i, w in enumerate(WORDS)]


def write_pairs(path, pairs):
    _write(path, pairs)
    return path


CATALOG = {f"i{i}": w for i, w in enumerate(WORDS)} | {f"o{i}": w for i, w in enumerate(OTHER)}


def _rollouts(model, pairs, g=2):
    cfg = RLConfig(num_generations=g, batch_size=len(pairs), rollout_max_tokens=6)
    word = model.tokenizer(" opener", add_special_tokens=False)["input_ids"]
    gen = [word + [model.think_end_id] for _ in range(len(pairs) * g)]
    batch = collate_rollouts(model, pairs, gen, cfg)
    with torch.no_grad():
        q = model.encode_queries([p.query for p in pairs for _ in range(g)], mode="direct").embeddings
        d = model.encode_items([p.item_title for p in pairs])
    return batch, torch.from_numpy(q), torch.from_numpy(d)


def test_mined_pool_ranks_among_batch_and_hard_negatives(tiny):
    pairs = PAIRS[:4]
    pool = RankPool("mined", PAIRS + [Pair("q0", PAIRS[0].query, "o0", "tea kettle")], CATALOG, hard_negatives=3,
                    num_generations=2)
    assert pool.refresh(tiny, 0) and not pool.refresh(tiny, 1)  # due at the first step, then every 25
    batch, q, d = _rollouts(tiny, pairs)
    ranks, n = pool.ranks(tiny, pairs, q, d, batch)
    assert n == 4 + 4 * 3  # the 4 batch items + 3 mined per query (distinct, none a batch item)
    # the same ranks by brute force: every catalog item that is neither a batch item nor the query's
    # positive, the 3 nearest to the query's rollouts per query, then rank among batch + those
    bank = torch.from_numpy(tiny.encode_items([CATALOG[i] for i in pool.ids]))
    mined = []
    for n_, p in enumerate(pairs):
        s = (q[2 * n_: 2 * n_ + 2] @ bank.T).amax(0)
        cand = [pool.ids[j] for j in torch.argsort(s, descending=True).tolist()]
        skip = {x.item_id for x in pairs} | set(mined) | ({"i0", "o0"} if p.query_id == "q0" else {p.item_id})
        mined += [c for c in cand if c not in skip][:3]
    items = torch.cat([d, torch.from_numpy(tiny.encode_items([CATALOG[i] for i in mined]))])
    excl = torch.cat([batch["exclude"], torch.tensor([[r < 2 and m == "o0" for m in mined] for r in range(8)])], 1)
    assert "o0" not in mined  # q0's other positive is never a negative
    assert ranks.tolist() == R.positive_ranks(q @ items.T, batch["labels"], excl).tolist()


def test_catalog_pool_ranks_the_positive_in_the_whole_bank(tiny):
    pairs = PAIRS[:2]
    pool = RankPool("catalog", PAIRS, CATALOG, num_generations=2, refresh_steps=5)
    pool.refresh(tiny, 0)
    assert not pool.refresh(tiny, 4) and pool.refresh(tiny, 5)
    batch, q, d = _rollouts(tiny, pairs)
    ranks, n = pool.ranks(tiny, pairs, q, d, batch)
    assert n == len(CATALOG)
    bank = torch.from_numpy(tiny.encode_items([CATALOG[i] for i in pool.ids]))
    for r in range(4):
        own = q[r] @ bank[pool.ids.index(pairs[r // 2].item_id)]
        assert ranks[r] == 1 + sum(bool(q[r] @ bank[j] >= own) for j in range(len(bank))
                                   if pool.ids[j] != pairs[r // 2].item_id)


def test_pool_sample_keeps_every_positive_and_bad_settings_fail():
    pool = RankPool("mined", PAIRS, CATALOG, pool_items=3)
    assert {p.item_id for p in PAIRS} <= set(pool.ids) and len(pool.ids) == len(PAIRS) + len(
        [i for i in pool.ids if i.startswith("o")]) <= len(PAIRS) + 3
    with pytest.raises(ValueError, match="needs a catalog"):
        RankPool("catalog", PAIRS, None)
    with pytest.raises(ValueError, match="rank_pool"):
        RankPool("nearest", PAIRS, CATALOG)
    with pytest.raises(ValueError, match="needs rank_data"):
        RLConfig(rank_pool="mined")


def test_train_rl_with_a_mined_pool_logs_the_pool_size_and_resumes_exactly(tmp_path, tiny_dir):
    from lrem.model import LREM

    ds = Dataset({i: Item(i, t) for i, t in CATALOG.items()}, {p.query_id: Query(p.query_id, p.query, "x", "train")
                                                                 for p in PAIRS}, {p.query_id: {p.item_id: 1} for p in PAIRS})
    save_dataset(ds, tmp_path / "ds")
    pairs = write_pairs(tmp_path / "rl_pairs.jsonl", PAIRS)
    cfg = RLConfig(num_generations=2, batch_size=4, rollout_max_tokens=6, cot_max_tokens=4, max_steps=3,
                   learning_rate=1e-3, warmup_ratio=0.0, save_steps=1, rank_pool="mined", hard_negatives=2,
                   refresh_steps=2, rank_data=str(tmp_path / "ds"))
    train_rl(cfg, tiny_dir, tmp_path / "full", pairs=pairs, log=lambda *a: None)
    hist = [json.loads(x) for x in (tmp_path / "full" / "history.jsonl").read_text().splitlines()]
    assert all(h["rank/items"] == 4 + 4 * 2 for h in hist) and all(1 <= h["rank/mean"] <= 12 for h in hist)
    # killed after step 2 (the bank was embedded at step 0; the next refresh is at step 2)
    train_rl(cfg, tiny_dir, tmp_path / "cut", pairs=pairs, stop_after_step=1, log=lambda *a: None)
    train_rl(cfg, tiny_dir, tmp_path / "cut", pairs=pairs, resume=True, log=lambda *a: None)
    a = LREM.from_pretrained(str(tmp_path / "full"), dtype="float32").lm.state_dict()
    b = LREM.from_pretrained(str(tmp_path / "cut"), dtype="float32").lm.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
