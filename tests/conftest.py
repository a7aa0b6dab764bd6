"""Shared fixtures: a tiny random LREM (real tokenizer, random weights) and the real default model."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
def tiny(tiny_dir):
    from lrem.model import LREM

    return LREM.from_pretrained(str(tiny_dir), dtype="float32")


@pytest.fixture(scope="session")
def real_model(backbone_dir):
    from lrem.model import LREM

    # float32 whatever the CPU: where it computes bfloat16 natively, "auto" picks bfloat16, whose
    # rounding breaks the untrained model's near-ties differently in batched and single runs
    return LREM.from_pretrained("smollm2-135m-instruct", dtype="float32")
