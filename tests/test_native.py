"""The native runtime (`lrem.network`, `lrem.tokenizer`): the same ids, CoTs and embeddings as
transformers, without importing it."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lrem.model import LREM

QUERIES = ["a device for pulling corks", "red running shoes for women, size 8", "Löwe — ünïcode 🚀 café",
           "x", "something   to keep\tcoffee hot"]
ITEMS = ["Corkscrew (stainless steel)", "Thermos flask 1L", "Nike Air Zoom Pegasus 39 <think> literal"]


@pytest.fixture(scope="module")
def lrem_dirs(lively_dir, tmp_path_factory):
    """arch -> an LREM folder (special tokens in place) of the lively random model."""
    out = {}
    for arch in ("llama", "qwen2"):
        folder = tmp_path_factory.mktemp(f"native-{arch}")
        LREM.from_pretrained(str(lively_dir(arch)), dtype="float32").save_pretrained(folder)
        out[arch] = folder
    return out


def outputs(model: LREM) -> dict:
    grounded = [["Corkscrew", "Wine opener"], [], ["Thermos"], ["a"], ["b", "c"]]
    return {
        "ids": model.tokenizer(model.query_prompts(QUERIES), add_special_tokens=False)["input_ids"],
        "padded": {k: v.tolist() for k, v in model.tokenize(model.item_texts(ITEMS)).items()},
        "decoded": [model.tokenizer.decode(x, skip_special_tokens=s) for s in (False, True)
                    for x in model.tokenizer(QUERIES + ITEMS, add_special_tokens=False)["input_ids"]],
        "cots": model.generate_cots(QUERIES),
        "cot1": model.generate_cots(QUERIES[:1]),
        "reason": model.encode_queries(QUERIES, mode="reason").embeddings,
        "reason1": model.encode_queries(QUERIES[2], mode="reason").embeddings,
        "direct": model.encode_queries(QUERIES, mode="direct").embeddings,
        "grounded": model.encode_queries(QUERIES, mode="direct", candidates=grounded).embeddings,
        "plain": model.engine.embed_texts(model.query_texts(QUERIES, [""] * len(QUERIES)), prefix_cache=False),
        "items": model.encode_items(ITEMS),
        "items64": model.encode_items(ITEMS * 30, batch_size=64),
    }


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_native_equals_transformers(lrem_dirs, arch, dtype):
    from lrem.index_base import model_fingerprint
    from lrem.network import CausalLM

    hf = LREM.from_pretrained(str(lrem_dirs[arch]), dtype=dtype)
    nat = LREM.from_pretrained(str(lrem_dirs[arch]), dtype=dtype, runtime="native")
    assert isinstance(nat.lm, CausalLM) and not isinstance(hf.lm, CausalLM)
    assert model_fingerprint(nat) == model_fingerprint(hf)  # an index built by one is searched by the other
    a, b = outputs(hf), outputs(nat)
    for key in ("ids", "padded", "decoded", "cots", "cot1"):
        assert a[key] == b[key], key
    assert len(set(a["cots"])) > 1  # the lively model writes different CoTs, so a wrong position would show
    for key in ("reason", "reason1", "direct", "grounded", "plain", "items", "items64"):
        # the same ops in the same order: equal, not merely close (bfloat16 included)
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_chat_template_renders_as_transformers(lrem_dirs):
    hf = LREM.from_pretrained(str(lrem_dirs["llama"]), dtype="float32")
    nat = LREM.from_pretrained(str(lrem_dirs["llama"]), dtype="float32", runtime="native")
    for gen in (True, False):
        for msgs in ([{"role": "user", "content": "hi"}],
                     [{"role": "system", "content": "S"}, {"role": "user", "content": "a {{ b }} ü"}],
                     [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]):
            assert (nat.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
                    == hf.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen))


def test_real_tokenizer_ids_equal(real_model, tmp_path):
    """SmolLM2's real tokenizer (the default model's) on texts with spaces, digits, symbols and
    every special token."""
    from lrem.tokenizer import Tokenizer

    real_model.save_pretrained(tmp_path)
    nat = Tokenizer(tmp_path)
    texts = QUERIES + ITEMS + ["<|im_start|>user\nhi<|im_end|>", "</think><emb>  12.5kg  ", "   ", "a\n\nb", "日本語のテキスト"]
    hf_ids = real_model.tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert nat(texts, add_special_tokens=False)["input_ids"] == hf_ids
    assert [nat.decode(x, skip_special_tokens=True) for x in hf_ids] == \
        [real_model.tokenizer.decode(x, skip_special_tokens=True) for x in hf_ids]
    for name in ("eos_token_id", "pad_token_id", "unk_token_id", "bos_token_id"):
        assert getattr(nat, name) == getattr(real_model.tokenizer, name), name


def test_auto_falls_back_to_transformers_and_native_says_why(lively_dir, lrem_dirs):
    from lrem.network import CausalLM

    plain = LREM.from_pretrained(str(lively_dir("llama")), dtype="float32", runtime="auto")  # a backbone: tokens to add
    assert not isinstance(plain.lm, CausalLM)
    with pytest.raises(ValueError, match="runtime 'native' runs LREM folders"):
        LREM.from_pretrained(str(lively_dir("qwen3")), dtype="float32", runtime="native")
    with pytest.raises(ValueError, match="runtime="):
        LREM.from_pretrained(str(lrem_dirs["llama"]), runtime="fast")
    nat = LREM.from_pretrained(str(lrem_dirs["llama"]), dtype="float32", runtime="auto")
    assert isinstance(nat.lm, CausalLM)
    with pytest.raises(NotImplementedError, match="runtime='transformers'"):
        nat.save_pretrained(lrem_dirs["llama"].parent / "never")
    assert not (lrem_dirs["llama"].parent / "never").exists()


def test_lrem_search_never_imports_transformers(lrem_dirs, tmp_path):
    """`lrem search` end to end, as a user runs it: the native runtime loads, transformers stays
    unimported, and the results equal `--runtime transformers`'s."""
    from lrem.index import ItemIndex

    model = LREM.from_pretrained(str(lrem_dirs["llama"]), dtype="float32")
    ItemIndex.build(model, {f"i{n}": t for n, t in enumerate(ITEMS * 4)}).save(tmp_path / "idx")
    code = ("import sys, json; from lrem.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print(json.dumps({'transformers': 'transformers' in sys.modules, 'dynamo': 'torch._dynamo' in sys.modules}))")
    env = dict(os.environ)
    runs = {}
    for rt in ("auto", "transformers"):
        r = subprocess.run([sys.executable, "-c", code, "search", "a device for pulling corks", "--index",
                            str(tmp_path / "idx"), "-k", "3", "--json", "--runtime", rt],
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.strip().splitlines()
        runs[rt] = (json.loads(lines[0]), json.loads(lines[-1]))
    assert runs["auto"][1] == {"transformers": False, "dynamo": False}
    assert runs["transformers"][1]["transformers"] is True
    assert runs["auto"][0]["cot"] == runs["transformers"][0]["cot"]
    assert [h["item_id"] for h in runs["auto"][0]["items"]] == [h["item_id"] for h in runs["transformers"][0]["items"]]
    assert [h["score"] for h in runs["auto"][0]["items"]] == pytest.approx(
        [h["score"] for h in runs["transformers"][0]["items"]], abs=1e-3)


def test_review_edge_cases(lrem_dirs, tmp_path):
    """Configs and tokenizer folders the native runtime must not run as if they were plain, and the
    decode path without the compact decoder's blocked views."""
    import shutil

    from lrem import network, tokenizer
    from lrem.network import CausalLM

    folder = tmp_path / "m"
    shutil.copytree(lrem_dirs["llama"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    for rope in ({"rope_scaling": {"type": "linear", "factor": 4.0}, "rope_parameters": None},
                 {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}):
        (folder / "config.json").write_text(json.dumps({**cfg, **rope}))
        assert not network.supports(folder)  # scaled rope: transformers runs it, not a plain-rope copy
        assert not isinstance(LREM.from_pretrained(str(folder), dtype="float32", runtime="auto").lm, CausalLM)
    (folder / "config.json").write_text(json.dumps(cfg))
    tok = tokenizer.Tokenizer(folder)
    assert tok.convert_tokens_to_ids("no-such-token-xyz") == tok.unk_token_id is not None
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").write_text("{% generation %}x{% endgeneration %}" + template)
    assert not tokenizer.supports(folder)  # transformers' own jinja extension: left to transformers
    # the decode path with the compact decoder switched off still runs the native network
    nat = LREM.from_pretrained(str(lrem_dirs["llama"]), dtype="float32", runtime="native")
    hf = LREM.from_pretrained(str(lrem_dirs["llama"]), dtype="float32")
    nat.engine.config.compact_decoder = False
    assert nat.generate_cots(QUERIES) == hf.generate_cots(QUERIES)


def _copy(src, dst, config=None, tokenizer_config=None):
    """A copy of the LREM folder `src` with config.json / tokenizer_config.json keys set."""
    import shutil

    shutil.copytree(src, dst)
    for name, edit in (("config.json", config), ("tokenizer_config.json", tokenizer_config)):
        if edit:
            cfg = json.loads((dst / name).read_text())
            (dst / name).write_text(json.dumps({**cfg, **edit}))
    return dst


def test_checkpoint_head_and_shapes_as_transformers_loads_them(lrem_dirs, tmp_path):
    """tie_word_embeddings with its own, different lm_head in the file: transformers 5 keeps that
    head (the config is taken to be wrong), so the native network must too; shapes config.json does
    not give are a one-line ValueError (so `auto` falls back) rather than torch's RuntimeError."""
    from safetensors.torch import load_file, save_file

    from lrem.network import CausalLM

    folder = _copy(lrem_dirs["llama"], tmp_path / "head")
    state = load_file(folder / "model.safetensors")
    torch.manual_seed(1)
    state["lm_head.weight"] = state["model.embed_tokens.weight"] + torch.randn_like(state["model.embed_tokens.weight"])
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is True
    hf = LREM.from_pretrained(str(folder), dtype="float32")
    nat = LREM.from_pretrained(str(folder), dtype="float32", runtime="native")
    assert hf.lm.lm_head.weight is not hf.lm.model.embed_tokens.weight  # what transformers does with such a file
    assert nat.generate_cots(QUERIES) == hf.generate_cots(QUERIES)
    np.testing.assert_array_equal(nat.encode_queries(QUERIES).embeddings, hf.encode_queries(QUERIES).embeddings)
    # the head equal to the embeddings (older saves wrote both): tied, as transformers ties it
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    lm = CausalLM.from_folder(folder)
    assert lm.lm_head.weight is lm.model.embed_tokens.weight

    bad = _copy(lrem_dirs["llama"], tmp_path / "kv", config={"num_key_value_heads": 4})
    with pytest.raises(ValueError, match=r"model.safetensors: weights do not match config.json \(size mismatch"):
        LREM.from_pretrained(str(bad), dtype="float32", runtime="native")


@pytest.mark.parametrize("runtime", ["auto", "transformers"])
def test_a_head_the_checkpoint_lacks_is_refused_not_started_random(lrem_dirs, tmp_path, runtime):
    """config.json unties the head (tie_word_embeddings false) of a checkpoint saved tied (no
    lm_head.weight): transformers would start the head random and only warn, so every load would
    reason differently. Both runtimes refuse it in one line that says what to fix."""
    folder = _copy(lrem_dirs["llama"], tmp_path / "untied", config={"tie_word_embeddings": False})
    with pytest.raises(ValueError, match=r"lacks weights its config.json asks for \(lm_head.weight\).*"
                                         r"set tie_word_embeddings to true"):
        LREM.from_pretrained(str(folder), dtype="float32", runtime=runtime)


def test_tokenizer_config_transformers_honours(lrem_dirs, tmp_path):
    """tokenizer_config.json settings transformers applies: `split_special_tokens` (the native
    tokenizer applies it too), a tokenizer class transformers rebuilds the pipeline of and
    `add_prefix_space` (left to transformers under auto): the ids are transformers' either way."""
    from lrem import tokenizer
    from lrem.network import CausalLM

    texts = ["e\u0301 café", "<think> a </think><emb><|im_end|>", " Hello  world 12345", "don't"]
    cases = {"split": ({"split_special_tokens": True}, True),
             "qwen2-class": ({"tokenizer_class": "Qwen2Tokenizer"}, False),
             "prefix-space": ({"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": True}, False)}
    for name, (edit, native) in cases.items():
        folder = _copy(lrem_dirs["llama"], tmp_path / name, tokenizer_config=edit)
        hf = LREM.from_pretrained(str(folder), dtype="float32")
        auto = LREM.from_pretrained(str(folder), dtype="float32", runtime="auto")
        assert tokenizer.supports(folder) is native and isinstance(auto.lm, CausalLM) is native, name
        assert (auto.tokenizer(texts, add_special_tokens=False)["input_ids"]
                == hf.tokenizer(texts, add_special_tokens=False)["input_ids"]), name
    # an older folder's special_tokens_map.json names another pad token: it wins, as in transformers
    folder = _copy(lrem_dirs["llama"], tmp_path / "map")
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
    hf = LREM.from_pretrained(str(folder), dtype="float32")
    nat = LREM.from_pretrained(str(folder), dtype="float32", runtime="native")
    assert nat.tokenizer.pad_token_id == hf.tokenizer.pad_token_id != hf.tokenizer.eos_token_id
    assert ({k: v.tolist() for k, v in nat.tokenize(nat.item_texts(ITEMS)).items()}
            == {k: v.tolist() for k, v in hf.tokenize(hf.item_texts(ITEMS)).items()})
    # transformers always rebuilds a qwen2 model's tokenizer; lrem's own save wrote that pipeline: native
    assert tokenizer.supports(lrem_dirs["qwen2"])
    folder = _copy(lrem_dirs["qwen2"], tmp_path / "qwen2-prefix", tokenizer_config={"add_prefix_space": True})
    assert not tokenizer.supports(folder)


def test_chat_template_variables_and_namespace_as_transformers(lrem_dirs, tmp_path):
    """Every special token transformers names is a template variable (sep, cls, mask too), and its
    namespace refuses underscore names: the template renders, or fails, alike."""
    from jinja2.exceptions import SecurityError

    folder = _copy(lrem_dirs["llama"], tmp_path / "t", tokenizer_config={
        "sep_token": "<|endoftext|>", "cls_token": "<|im_start|>", "mask_token": "<think>"})
    template = (folder / "chat_template.jinja").read_text()
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "q {{ x }} é"}]
    (folder / "chat_template.jinja").write_text("[{{ sep_token }}|{{ cls_token }}|{{ mask_token }}]" + template)
    hf = LREM.from_pretrained(str(folder), dtype="float32")
    nat = LREM.from_pretrained(str(folder), dtype="float32", runtime="native")
    rendered = nat.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    assert rendered.startswith("[<|endoftext|>|<|im_start|>|<think>]")
    assert rendered == hf.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert nat.query_prompts(QUERIES) == hf.query_prompts(QUERIES)
    (folder / "chat_template.jinja").write_text("{% set ns = namespace(_seen=0) %}" + template)
    for model in (LREM.from_pretrained(str(folder), dtype="float32"),
                  LREM.from_pretrained(str(folder), dtype="float32", runtime="native")):
        with pytest.raises(SecurityError, match="underscore"):
            model.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_folder_with_an_adapter_is_left_to_transformers(lrem_dirs, tmp_path):
    """A PEFT adapter saved into the model folder: transformers loads it on top of the weights, so
    `auto` must not run the bare weights natively."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from lrem.network import CausalLM

    folder = _copy(lrem_dirs["llama"], tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    torch.manual_seed(0)
    peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
                        ).save_pretrained(folder)
    hf = LREM.from_pretrained(str(folder), dtype="float32")
    auto = LREM.from_pretrained(str(folder), dtype="float32", runtime="auto")
    assert not isinstance(auto.lm, CausalLM)
    np.testing.assert_array_equal(auto.encode_queries(QUERIES, mode="direct").embeddings,
                                  hf.encode_queries(QUERIES, mode="direct").embeddings)
    with pytest.raises(ValueError, match="runtime 'native' runs LREM folders"):
        LREM.from_pretrained(str(folder), dtype="float32", runtime="native")


def test_rope_scaling_next_to_rope_parameters_is_transformers(lrem_dirs, tmp_path):
    """A v4-style `rope_scaling` added to a v5 config that has default `rope_parameters`:
    transformers scales by it (it wins), so the native runtime must not run plain rotary embeddings."""
    from lrem import network
    from lrem.network import CausalLM

    folder = _copy(lrem_dirs["llama"], tmp_path / "rope", config={"rope_scaling": {"type": "linear", "factor": 4.0}})
    assert json.loads((folder / "config.json").read_text())["rope_parameters"]["rope_type"] == "default"
    assert not network.supports(folder)
    hf = LREM.from_pretrained(str(folder), dtype="float32")
    auto = LREM.from_pretrained(str(folder), dtype="float32", runtime="auto")
    assert not isinstance(auto.lm, CausalLM)
    assert auto.generate_cots(QUERIES) == hf.generate_cots(QUERIES)
