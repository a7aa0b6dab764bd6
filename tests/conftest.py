"""Shared fixtures: a tiny random LREM (real tokenizer, random weights) and the real default model."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # workers share the cores: an even share each, or their threads thrash
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


@pytest.fixture(scope="session")
def backbone_dir():
    """The built-in SmolLM2 converted to a safetensors folder (cached under $LREM_HOME)."""
    from lrem.backbones import builtin_path

    return builtin_path("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, backbone_dir):
    """A 2-layer Llama with random weights and SmolLM2's real tokenizer and chat template."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(backbone_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def lively_dir(tmp_path_factory, backbone_dir):
    """arch ("llama", "qwen2", "qwen3") -> folder of a 2-layer random model with large weights
    and SmolLM2's tokenizer and chat template (made once per arch): unlike `tiny`, whose greedy
    output is one token repeated, its output differs from prompt to prompt, so an off-by-one
    position or a leaked pad changes the tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    made = {}

    def make(arch: str):
        if arch not in made:
            tok = AutoTokenizer.from_pretrained(backbone_dir)
            cfg = AutoConfig.for_model(arch, vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       max_position_embeddings=512, initializer_range=0.2, tie_word_embeddings=True,
                                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            torch.manual_seed(0)
            made[arch] = tmp_path_factory.mktemp(f"lively-{arch}")
            AutoModelForCausalLM.from_config(cfg).save_pretrained(made[arch])
            tok.save_pretrained(made[arch])
        return made[arch]

    return make


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    from lrem.model import LREM

    return LREM.from_pretrained(str(tiny_dir), dtype="float32")


@pytest.fixture(scope="session")
def real_model(backbone_dir):
    from lrem.model import LREM

    # float32 whatever the CPU: where it computes bfloat16 natively, "auto" picks bfloat16, whose
    # rounding breaks the untrained model's near-ties differently in batched and single runs
    return LREM.from_pretrained("smollm2-135m-instruct", dtype="float32")
