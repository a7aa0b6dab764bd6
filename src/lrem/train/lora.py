"""LoRA (PEFT) for both training stages: low-rank adapters on the decoder's projections, the three
LREM tokens' rows (`<think>`, `</think>`, `<emb>`) trainable, every other weight frozen.

    cfg = SFTConfig(lora_r=16)            # or `lora_r: 16` in configs/coldstart.yaml, or --lora-r 16
    adapter = add_lora(model, cfg)        # model.lm now holds the adapters (injected in place)
    ...                                   # train: only the adapters and the three token rows change
    merge_lora(model, adapter)            # model.lm: a plain LM again, the adapters merged into its weights

Why: the optimizer state shrinks to the adapters' (a 3B model's full AdamW state is 24 GB), and a
LoRA-trained change of each matrix is exactly rank r, so `lrem delta --rank r` ships the trained
model whole in a few MB. The saved model is a plain LREM folder (merged weights): every other
command takes it unchanged.

A LoRA run's checkpoint holds the adapter (`adapter/`, a PEFT adapter folder) in place of the
model; resuming rebuilds base + adapter, the base being the run's own (`model`, or `--init`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

# LLaMA / Mistral / Qwen2 decoder projections: attention and MLP
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER = "adapter"  # a LoRA checkpoint's subfolder (in place of `model/`)
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT's file name: the folder loads with PeftModel.from_pretrained


@dataclass
class LoraOptions:
    """The LoRA settings of both stages: `SFTConfig` and `RLConfig` inherit them (one definition;
    each config's `__post_init__` calls `check_lora`)."""

    lora_r: int = field(default=0, metadata={
        "help": "0: full fine-tuning. > 0: LoRA adapters of this rank on lora_target_modules, plus the three LREM "
                "tokens' rows; the rest frozen. The saved model has them merged (a normal LREM folder), and its "
                "change is exactly rank r: `lrem delta --rank r` holds it whole."})
    lora_alpha: int = field(default=32, metadata={
        "help": "LoRA scale numerator: the update is (alpha / r) B A (PEFT's lora_alpha; 2r at r = 16)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapters' input (PEFT's lora_dropout)."})
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS), metadata={
        "help": "Module names that get adapters (default: the attention and MLP projections of a LLaMA/Qwen-style "
                "decoder)."})


def check_lora(cfg) -> None:
    """Raise a ValueError for an impossible LoRA setting of `cfg` (SFTConfig or RLConfig)."""
    if cfg.lora_r < 0 or cfg.lora_alpha <= 0:
        raise ValueError(f"lora_r={cfg.lora_r}, lora_alpha={cfg.lora_alpha}; need lora_r >= 0 (0 = full "
                         "fine-tuning) and lora_alpha > 0")
    if not 0 <= cfg.lora_dropout < 1:
        raise ValueError(f"lora_dropout={cfg.lora_dropout}; need 0 <= lora_dropout < 1")
    if not cfg.lora_target_modules or not all(isinstance(m, str) and m for m in cfg.lora_target_modules):
        raise ValueError(f"lora_target_modules={cfg.lora_target_modules!r}; need a list of module names "
                         f"(e.g. {', '.join(LORA_TARGETS)})")


def lora_settings(cfg) -> dict | None:
    """What a run records of its LoRA (train state, the saved model's training stages); None: full fine-tuning."""
    if cfg.lora_r == 0:
        return None
    return {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
            "target_modules": list(cfg.lora_target_modules)}


def add_lora(model, cfg, checkpoint: Path | None = None):
    """Put LoRA adapters of rank `cfg.lora_r` on `model.lm`'s `cfg.lora_target_modules` (in place) and
    make the LREM tokens' embedding rows trainable (and their LM-head rows: the same rows where the
    head is tied to the embeddings, PEFT's own where not); freeze the rest. With `checkpoint`,
    load the adapter it holds. Returns the PEFT model (for `save_adapter` and `merge_lora`);
    `model.lm` stays the same object and runs with the adapters.
    """
    from peft import LoraConfig, get_peft_model

    lm = model.lm
    ids = [model.think_id, model.think_end_id, model.emb_id]
    emb, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    if head is None or head.weight is emb.weight:
        tokens = ids  # PEFT ties the head's rows to these
    else:
        names = {id(m): n for n, m in lm.named_modules()}
        tokens = {names[id(emb)]: ids, names[id(head)]: ids}
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=list(cfg.lora_target_modules), trainable_token_indices=tokens,
                        bias="none")
    try:
        with warnings.catch_warnings():  # PEFT reads transformers' deprecated `is_gradient_checkpointing`
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            adapter = get_peft_model(lm, config)
    except ValueError as e:  # e.g. a target module the backbone lacks
        raise ValueError(f"LoRA on {model.source or 'the model'}: {str(e).splitlines()[0]}") from None
    if checkpoint is not None:
        load_adapter(adapter, Path(checkpoint) / ADAPTER)
    return adapter


def trainable_parameters(module) -> list:
    """The parameters the optimizer updates: all of them, or with LoRA the adapters and token rows."""
    return [p for p in module.parameters() if p.requires_grad]


def save_adapter(adapter, path: Path) -> None:
    """The adapter weights and config as a PEFT adapter folder (the LoRA matrices and the three
    token rows only: the base's embedding matrix is left out)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    weights = get_peft_model_state_dict(adapter, save_embedding_layers=False)
    save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(path / ADAPTER_WEIGHTS))
    adapter.peft_config["default"].save_pretrained(str(path))


def load_adapter(adapter, path: Path) -> None:
    """Set the adapter weights from a folder `save_adapter` wrote."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if not (path / ADAPTER_WEIGHTS).exists():
        raise ValueError(f"{path / ADAPTER_WEIGHTS}: no LoRA adapter in this checkpoint; resume with its lora_r")
    result = set_peft_model_state_dict(adapter, load_file(str(path / ADAPTER_WEIGHTS)))
    if result.unexpected_keys:
        raise ValueError(f"{path}: adapter tensors {result.unexpected_keys[:3]} do not fit this model's LoRA "
                         "(another lora_r or lora_target_modules?)")


def merge_lora(model, adapter) -> None:
    """Merge the adapters and token rows into `model.lm`'s weights and remove the adapter layers:
    a plain LM again (in place), which saves as a normal LREM folder."""
    model.lm = adapter.merge_and_unload()
    model.lm.requires_grad_(True)  # as loaded: nothing frozen
