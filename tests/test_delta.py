"""Deltas (`lrem.delta`): a fine-tuned model stored as low-rank changes from its built-in base,
rebuilt into the same model."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from lrem.delta import DELTA_JSON, DELTA_WEIGHTS, apply_delta, make_delta
from lrem.model import LREM, materialise

TEXTS = ["a device for pulling corks", "something warm for the feet", "a drink stronger than tea"]


@torch.no_grad()
def fine_tune_stand_in(model: LREM, rank: int, seed: int = 0) -> None:
    """Change every matrix by a random rank-`rank` product, every vector a little, and the new
    tokens' rows: the shape of a LoRA fine-tune plus trained norms and token rows."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.lm.named_parameters():
        if p.ndim == 2:
            m, n = p.shape
            p.add_(0.02 * torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g) / rank ** 0.5)
        else:
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    emb = model.lm.get_input_embeddings().weight
    emb[[model.think_id, model.emb_id]] += 0.5


def test_a_low_rank_change_round_trips(tiny_dir):
    tuned = LREM.from_pretrained(str(tiny_dir), dtype="float32")
    fine_tune_stand_in(tuned, rank=3)
    delta = make_delta(tuned, LREM.from_pretrained(str(tiny_dir), dtype="float32"), rank=3)
    assert all(t.dtype in (torch.float16, torch.int64) for t in delta.values())
    assert any(k.endswith("::A") for k in delta) and any(k.endswith("::rows") for k in delta)
    rebuilt = LREM.from_pretrained(str(tiny_dir), dtype="float32")
    apply_delta(rebuilt, delta)
    for (name, a), b in zip(tuned.lm.named_parameters(), rebuilt.lm.parameters()):
        assert torch.allclose(a, b, atol=2e-3), name  # float16 storage
    np.testing.assert_allclose(rebuilt.encode_items(TEXTS), tuned.encode_items(TEXTS), atol=2e-3)
    # a rank below the change's loses some of it, but stays close (the best rank-1 approximation)
    low = LREM.from_pretrained(str(tiny_dir), dtype="float32")
    apply_delta(low, make_delta(tuned, LREM.from_pretrained(str(tiny_dir), dtype="float32"), rank=1))
    w = "model.layers.0.mlp.up_proj.weight"
    base_w = dict(LREM.from_pretrained(str(tiny_dir), dtype="float32").lm.named_parameters())[w]
    full, approx = dict(tuned.lm.named_parameters())[w] - base_w, dict(low.lm.named_parameters())[w] - base_w
    assert 0.3 < float((approx * full).sum() / full.norm() ** 2) < 1.0


def test_a_delta_of_another_shape_is_refused(tiny_dir, lively_dir):
    with pytest.raises(ValueError, match="not a fine-tune of it"):
        make_delta(LREM.from_pretrained(str(lively_dir("qwen2")), dtype="float32"),  # q/k/v biases
                   LREM.from_pretrained(str(tiny_dir), dtype="float32"))


@pytest.mark.slow
def test_lrem_delta_ships_a_trained_default_model(tmp_path, monkeypatch, real_model):
    """`lrem delta` on a model fine-tuned from the built-in SmolLM2 writes a small folder; a
    shipped-model name built from it gives the fine-tuned model's embeddings."""
    from lrem.prompts import PromptConfig

    tuned = LREM.from_pretrained("smollm2-135m-instruct", dtype="float32")
    fine_tune_stand_in(tuned, rank=4)
    tuned.source = "smollm2-135m-instruct"
    # prompts of its own: the fidelity is measured with them (it was measured with the base's: 0.97)
    tuned.config = PromptConfig(item_template="Product: {title}", query_system="You find products for shoppers.")
    tuned.save_pretrained(tmp_path / "trained")
    # a learned router fitted on the trained folder (`lrem router fit --out MODEL`) ships with its delta
    from lrem.router import LearnedRouter

    LearnedRouter(("margin", "words"), mean=[0.1, 3.0], scale=[0.1, 2.0], weights=[-3.0, 0.0], bias=0.0,
                  threshold=0.5).save(tmp_path / "trained" / "router.json")
    r = subprocess.run([sys.executable, "-m", "lrem.cli", "delta", "--model", str(tmp_path / "trained"),
                        "--out", str(tmp_path / "delta"), "--rank", "8"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads((tmp_path / "delta" / DELTA_JSON).read_text())
    assert meta["base"] == "smollm2-135m-instruct" and meta["fidelity"]["query_cos_min"] > 0.999
    assert meta["fidelity"]["item_cos_min"] > 0.999 and meta["prompts"]["item_template"] == "Product: {title}"
    size = (tmp_path / "delta" / DELTA_WEIGHTS).stat().st_size
    assert size < 12e6, size  # rank 8 of a 135M model (plus norms and new rows), float16
    assert "MB, rank 8" in r.stdout
    monkeypatch.setenv("LREM_HOME", str(tmp_path / "home"))
    folder = materialise("lrem-test", tmp_path / "delta", log=lambda *a: None)
    rebuilt = LREM.from_pretrained(str(folder), dtype="float32")
    np.testing.assert_allclose(rebuilt.encode_queries(TEXTS, mode="direct").embeddings,
                               tuned.encode_queries(TEXTS, mode="direct").embeddings, atol=5e-3)
    assert rebuilt.router is not None and (tmp_path / "delta" / "README.md").is_file()
    assert materialise("lrem-test", tmp_path / "delta", log=lambda *a: pytest.fail("rebuilt twice")) == folder
    (tmp_path / "delta" / "router.json").unlink()  # gone there: gone here (below, a router added back)
    materialise("lrem-test", tmp_path / "delta", log=lambda *a: None)
    assert LREM.from_pretrained(str(folder), dtype="float32").router is None
    # a learned router shipped beside the delta reaches the built model without a rebuild
    LearnedRouter(("margin", "words"), mean=[0.1, 3.0], scale=[0.1, 2.0], weights=[-3.0, 0.0], bias=0.0,
                  threshold=0.5).save(tmp_path / "delta" / "router.json")
    assert materialise("lrem-test", tmp_path / "delta", log=lambda *a: pytest.fail("rebuilt for a router")) == folder
    assert LREM.from_pretrained(str(folder), dtype="float32").router is not None
    (tmp_path / "delta" / "router.json").unlink()  # removed there: gone here
    materialise("lrem-test", tmp_path / "delta", log=lambda *a: None)
    assert not (folder / "router.json").exists()
    # another install ships another delta under the same name and shares $LREM_HOME: each keeps its own
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other"
    shutil.copytree(tmp_path / "delta", other)
    tensors = load_file(str(other / DELTA_WEIGHTS))
    save_file({k: v * 0.5 if v.is_floating_point() else v for k, v in tensors.items()}, str(other / DELTA_WEIGHTS))
    folder2 = materialise("lrem-test", other, log=lambda *a: None)
    assert folder2 != folder and folder2.parent == folder.parent
    assert materialise("lrem-test", tmp_path / "delta", log=lambda *a: pytest.fail("rebuilt over")) == folder
    # the delta folder itself loads by its path (lrem index --model DELTA_DIR), the same weights
    by_path = LREM.from_pretrained(str(tmp_path / "delta"), dtype="float32")
    np.testing.assert_allclose(by_path.encode_queries(TEXTS, mode="direct").embeddings,
                               rebuilt.encode_queries(TEXTS, mode="direct").embeddings, atol=1e-6)


def test_a_lora_trained_model_is_held_whole_by_its_delta_at_rank_r(tmp_path, tiny_dir):
    """LoRA training (lrem.train.lora) changes each matrix by exactly rank r, so the delta at rank r
    rebuilds the trained model (float16 storage aside), embeddings included."""
    from lrem.delta import PROBE_QUERIES, PROBE_TITLES, fidelity
    from lrem.train import SFTConfig, train

    words = ["corkscrew", "chair", "coffee", "teapot", "hammer", "lamp", "spoon", "blanket"]
    triplets = tmp_path / "t.jsonl"
    triplets.write_text("".join(json.dumps({"query_id": f"q{i}", "query": f"something like a {w}", "cot": f"{w}s",
                                            "item_id": f"i{i}", "item_title": w}) + "\n" for i, w in enumerate(words)))
    cfg = SFTConfig(model=str(tiny_dir), batch_size=4, learning_rate=1e-2, warmup_ratio=0.0, save_steps=0,
                    max_steps=3, lora_r=4)
    train(cfg, tmp_path / "lora", triplets=triplets, log=lambda *_: None)
    tuned = LREM.from_pretrained(str(tmp_path / "lora"), dtype="float32")
    delta = make_delta(tuned, LREM.from_pretrained(str(tiny_dir), dtype="float32"), rank=4)
    assert not any("norm" in k for k in delta)  # LoRA leaves them
    emb = "model.embed_tokens.weight"
    assert {k for k in delta if k.startswith(emb)} == {f"{emb}::rows", f"{emb}::row_ids"}  # and the old tokens' rows
    rebuilt = LREM.from_pretrained(str(tiny_dir), dtype="float32")
    apply_delta(rebuilt, delta)
    for (name, a), b in zip(tuned.lm.named_parameters(), rebuilt.lm.parameters()):
        assert torch.allclose(a, b, atol=1e-4), name
    fid = fidelity(tuned, rebuilt, PROBE_QUERIES, PROBE_TITLES)
    assert min(fid.values()) > 0.99999, fid
    # at a lower rank the change no longer fits
    low = LREM.from_pretrained(str(tiny_dir), dtype="float32")
    apply_delta(low, make_delta(tuned, LREM.from_pretrained(str(tiny_dir), dtype="float32"), rank=2))
    w = "model.layers.0.mlp.up_proj.weight"
    assert not torch.allclose(dict(low.lm.named_parameters())[w], dict(tuned.lm.named_parameters())[w], atol=1e-4)


def test_lrem_delta_refuses_a_folder_that_is_not_a_trained_lrem_model_before_loading(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text("{}")
    r = subprocess.run([sys.executable, "-m", "lrem.cli", "delta", "--model", str(tmp_path / "plain"),
                        "--out", str(tmp_path / "delta")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not a trained lrem model (no lrem_config.json)" in r.stderr, r.stderr
    assert "Errno" not in r.stderr and not (tmp_path / "delta").exists()


def test_lrem_delta_of_a_run_still_training_says_so_before_loading(tmp_path, tiny_dir):
    """A run folder mid-training holds checkpoints but no model yet: `lrem delta` says that training
    has not finished (it said the folder was not one `lrem train` wrote), and writes nothing."""
    from lrem.train import SFTConfig, train

    triplets = tmp_path / "t.jsonl"
    triplets.write_text("".join(json.dumps({"query_id": f"q{i}", "query": f"something like a {w}", "cot": w,
                                            "item_id": f"i{i}", "item_title": w}) + "\n"
                                for i, w in enumerate(["corkscrew", "chair", "coffee", "teapot"])))
    cfg = SFTConfig(model=str(tiny_dir), batch_size=2, learning_rate=1e-3, warmup_ratio=0.0, save_steps=1,
                    max_steps=3, lora_r=4)
    train(cfg, tmp_path / "run", triplets=triplets, stop_after_step=1, log=lambda *_: None)  # as if killed
    r = subprocess.run([sys.executable, "-m", "lrem.cli", "delta", "--model", str(tmp_path / "run"),
                        "--out", str(tmp_path / "delta")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "run: training has not finished there (checkpoints up to step-0000001, no final model yet)" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "delta").exists()


def test_lrem_delta_against_a_base_it_was_not_trained_from_names_both(tmp_path, tiny):
    tiny.save_pretrained(tmp_path / "trained")  # its base: the tiny folder, of another width than SmolLM2
    r = subprocess.run([sys.executable, "-m", "lrem.cli", "delta", "--model", str(tmp_path / "trained"), "--out",
                        str(tmp_path / "delta"), "--base", "smollm2-135m-instruct"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"{tmp_path / 'trained'} against the base smollm2-135m-instruct: model.embed_tokens.weight: shape" in r.stderr
    assert "not a fine-tune of it; pass the backbone it was trained from as --base" in r.stderr
    assert not (tmp_path / "delta").exists()
