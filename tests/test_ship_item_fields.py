"""A shop's model whose item template names catalog fields (`{brand}`): training embeds its items
as `lrem index` will, from the `--data` catalog's fields, not from the title alone."""
from __future__ import annotations

import json
from dataclasses import replace

import torch
from safetensors.torch import load_file

from lrem.data import Dataset, Item, Query
from lrem.model import LREM
from lrem.prompts import PromptConfig
from lrem.train import RLConfig, SFTConfig, build_pairs, train
from lrem.train.dev_eval import DevEval
from lrem.train.grpo import collate_rollouts
from lrem.train.sft import collate

WORDS = ["corkscrew", "chair", "coffee", "teapot", "hammer", "lamp", "spoon", "blanket"]
TEMPLATE = "Item: {title} | brand: {brand}"


def _dataset(brand: str) -> Dataset:
    dev = {f"d{i}": Query(f"d{i}", f"a {w} please", "definition", "dev") for i, w in enumerate(WORDS[:4])}
    return Dataset(catalog={f"i{i}": Item(f"i{i}", w, brand=f"{brand}{i}") for i, w in enumerate(WORDS)},
                   queries={f"q{i}": Query(f"q{i}", f"something like a {w}", "definition", "train")
                            for i, w in enumerate(WORDS)} | dev,
                   qrels={f"q{i}": {f"i{i}": 1} for i in range(len(WORDS))} | {f"d{i}": {f"i{i}": 1} for i in range(4)})


def _rows(mask: torch.Tensor, ids: torch.Tensor) -> list[list[int]]:
    return [r[m.bool()].tolist() for r, m in zip(ids, mask)]


def test_training_batches_and_dev_eval_fill_the_item_template_from_the_catalog(tmp_path, tiny_dir):
    model = LREM.from_pretrained(str(tiny_dir), dtype="float32")
    model.config = replace(model.config, item_template=TEMPLATE)
    ds = _dataset("Acme")
    triplets = tmp_path / "t.jsonl"
    triplets.write_text("".join(json.dumps({"query_id": f"q{i}", "query": f"something like a {w}", "cot": f"{w}s",
                                            "item_id": f"i{i}", "item_title": w}) + "\n" for i, w in enumerate(WORDS)))
    pairs, _ = build_pairs(triplets, ds, "train", model.tokenizer)
    # what ItemIndex.build embeds for these items, token for token
    indexed = model.tokenizer(model.item_texts([ds.catalog[p.item_id] for p in pairs[:4]]),
                              add_special_tokens=False)["input_ids"]
    batch = collate(model, pairs[:4], ds.catalog)
    assert _rows(batch["d_mask"], batch["d_ids"]) == indexed
    assert "brand: Acme0" in model.tokenizer.decode(batch["d_ids"][0])
    word = model.tokenizer(" opener", add_special_tokens=False)["input_ids"]
    rl = collate_rollouts(model, pairs[:4], [word + [model.think_end_id]] * 8,
                          RLConfig(num_generations=2, batch_size=4, rollout_max_tokens=6), ds.catalog)
    assert _rows(rl["d_mask"], rl["d_ids"]) == indexed
    assert DevEval(ds, "dev", 4, 4, 0, "direct").titles["i0"].brand == "Acme0"


def test_a_trained_model_learns_from_the_brand_its_item_template_names(tmp_path, tiny_dir):
    """Two catalogs that differ only in brands train different weights (before, the brand was empty
    in every training batch, so both gave the same model)."""
    base = LREM.from_pretrained(str(tiny_dir), dtype="float32")
    base.config = replace(base.config, item_template=TEMPLATE)
    base.save_pretrained(tmp_path / "base")
    cfg = SFTConfig(model=str(tmp_path / "base"), use_cot=False, sft_weight=0.0, batch_size=4, learning_rate=1e-2,
                    warmup_ratio=0.0, save_steps=0, max_steps=1, rl_holdout=0.0)
    weights = []
    for brand in ("Acme", "Zenith"):
        train(cfg, tmp_path / brand, dataset=_dataset(brand), log=lambda *_: None)
        weights.append(load_file(str(tmp_path / brand / "model.safetensors")))
        assert json.loads((tmp_path / brand / "lrem_config.json").read_text())["prompts"]["item_template"] == TEMPLATE
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
