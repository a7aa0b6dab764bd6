"""The backbone network for inference without transformers: Llama-family decoders (Llama,
Mistral, Qwen2: `ARCHS`) in plain torch, loaded from a model folder's `config.json` and
safetensors.

    lm = CausalLM.from_folder("~/.cache/lrem/models/lrem-wordnet-135m", torch.float32)

Why: importing transformers' model classes costs ~3 s of a cold `lrem search` (the import
chain reaches torch's compiler and distributed tensors), against ~0.2 s to read 135M
parameters. The modules keep transformers' names and layout (`model.layers.N.self_attn.q_proj`,
`lm_head` tied to the embeddings where the config says so), so the same checkpoint loads, the
compact decoder (`lrem.decoding.StaticDecoder`) runs these weights, and the model fingerprint is
the one transformers' load gives. Only the network lives here: decoding is `lrem.decoding`'s.
`supports(folder)` says whether a folder can load here; `lrem.backbones.load_backbone` falls back
to transformers otherwise (training, adapters, other architectures and rope types).
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

ARCHS = ("llama", "mistral", "qwen2")
WEIGHTS = "model.safetensors"


def _rope(cfg: dict) -> dict | None:
    """The rope parameters of a config, transformers 5's `rope_parameters` or the older flat keys
    (an older `rope_scaling` wins where both are set, as transformers reads them)."""
    rope = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    kind = rope.get("rope_type") or rope.get("type") or "default"  # older configs name it "type"
    return {"rope_theta": cfg.get("rope_theta", 10000.0), **rope} if kind == "default" else None


def supports(folder: str | Path) -> bool:
    """Whether `folder` holds a model this module runs: an architecture of `ARCHS` with plain
    rotary embeddings and full attention, weights in one safetensors file, no adapter."""
    folder = Path(folder)
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    windowed = cfg.get("use_sliding_window", cfg.get("model_type") == "mistral") and cfg.get("sliding_window")
    # a PEFT adapter saved in the folder: transformers (with peft installed) loads it on top of the weights
    return (cfg.get("model_type") in ARCHS and _rope(cfg) is not None and not windowed
            and cfg.get("hidden_act", "silu") == "silu" and (folder / WEIGHTS).is_file()
            and not (folder / "adapter_config.json").exists())


class Linear(nn.Linear):
    def reset_parameters(self) -> None:
        """None: the weights come from the checkpoint (and initialising on the meta device would
        import torch's compiler, ~1 s)."""


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        """None, as `Linear`'s."""


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in float32, then cast back before the weight, as transformers does (bfloat16 rounds alike)
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos and sin (B, T, head_dim) at positions (B, T), computed in float32 as transformers does."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        # on the CPU even while the network is built on the meta device (math there imports torch's
        # compiler), and a plain attribute, not a buffer: `.to(dtype)` leaves it float32, as transformers keeps it
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
        self.inv_freq = 1.0 / (theta**exponents)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)  # (B, T, hd / 2)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


class Attention(nn.Module):
    def __init__(self, c: SimpleNamespace, bias: bool):
        super().__init__()
        hd = c.head_dim
        self.q_proj = Linear(c.hidden_size, c.num_attention_heads * hd, bias=bias)
        self.k_proj = Linear(c.hidden_size, c.num_key_value_heads * hd, bias=bias)
        self.v_proj = Linear(c.hidden_size, c.num_key_value_heads * hd, bias=bias)
        self.o_proj = Linear(c.num_attention_heads * hd, c.hidden_size, bias=c.o_bias)
        self.head_dim, self.scaling = hd, hd**-0.5

    def forward(self, x, cos, sin, past, bias):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        rep = q.shape[1] // k.shape[1]  # keys and values repeated per query head, as transformers' SDPA path does
        kr, vr = (k, v) if rep == 1 else (k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1))
        o = F.scaled_dot_product_attention(q, kr, vr, attn_mask=bias, scale=self.scaling)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1)), (k, v)


class MLP(nn.Module):
    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.self_attn = Attention(c, bias=c.qkv_bias)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, h, cos, sin, past, bias):
        a, kv = self.self_attn(self.input_layernorm(h), cos, sin, past, bias)
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h)), kv


class Decoder(nn.Module):
    """transformers' `model.model`: embeddings, layers, final norm. Called as transformers' decoder
    is (`input_ids`, a 2-D `attention_mask` over past and new tokens, `position_ids`,
    `past_key_values` as per-layer (key, value) pairs); returns `last_hidden_state` and, with
    `use_cache`, `past_key_values` (`.layers[i].keys`, `.values`, as transformers' cache has them)."""

    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(c.head_dim, c.rope_theta)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        b, t = input_ids.shape
        past = list(past_key_values or [])
        start = past[0][0].shape[2] if past else 0
        end, dev = start + t, input_ids.device
        if position_ids is None:
            position_ids = (start + torch.arange(t, device=dev)).expand(b, -1)
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(h, position_ids)
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd): broadcast over heads
        # each token sees the earlier slots the mask allows and itself (a padded row never sees nothing)
        slots, own = torch.arange(end, device=dev), start + torch.arange(t, device=dev)[:, None]
        allowed = (slots <= own).expand(b, -1, -1)  # (B, T, end)
        if attention_mask is not None:
            allowed = allowed & ((attention_mask[:, None, :end] > 0) | (slots == own))
        bias = allowed[:, None]  # (B, 1, T, end)
        new = []
        for i, layer in enumerate(self.layers):
            h, kv = layer(h, cos, sin, past[i] if past else None, bias)
            new.append(kv)
        out = SimpleNamespace(last_hidden_state=self.norm(h), past_key_values=None)
        if use_cache:
            out.past_key_values = KVCache(new)
        return out


class KVCache:
    """Per-layer keys and values (B, kv heads, T, head_dim), read as transformers' cache is."""

    def __init__(self, pairs):
        self.layers = [SimpleNamespace(keys=k, values=v) for k, v in pairs]


class CausalLM(nn.Module):
    """Decoder plus LM head, with the parts of transformers' `PreTrainedModel` interface that
    lrem's inference uses (`get_decoder`, `get_output_embeddings`, `config`, `dtype`)."""

    native = True  # lrem.decoding builds plain KV caches for it, not transformers' Cache objects

    def __init__(self, cfg: dict):
        super().__init__()
        self.config = Config(cfg)
        c = self.config
        self.model = Decoder(c)
        self.lm_head = Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def from_folder(cls, folder: str | Path, dtype: torch.dtype = torch.float32) -> "CausalLM":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg = json.loads((folder / "config.json").read_text())
        try:
            state = load_file(folder / WEIGHTS)
        except SafetensorError as e:  # neither an OSError nor a ValueError: say which file, in one line
            raise ValueError(f"{folder / WEIGHTS}: unreadable weights ({e}); a truncated copy? copy it again") from e
        with torch.device("meta"):
            lm = cls(cfg)
            # a head in the checkpoint that differs from the embeddings stays untied, tie_word_embeddings
            # or not: transformers 5 loads it so (the config is taken to be wrong), and its logits are the head's
            head, emb = state.get("lm_head.weight"), state.get("model.embed_tokens.weight")
            tie = lm.config.tie_word_embeddings and (head is None or emb is None or torch.equal(head, emb))
            if lm.config.tie_word_embeddings and not tie:
                lm.lm_head.weight = nn.Parameter(torch.empty_like(lm.lm_head.weight))
        state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}  # old checkpoints kept it
        if tie:
            state.pop("lm_head.weight", None)
        try:
            missing, unexpected = lm.load_state_dict(state, strict=False, assign=True)
        except RuntimeError as e:  # shapes config.json does not give (a ValueError, so `auto` falls back)
            detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
            raise ValueError(f"{folder / WEIGHTS}: weights do not match config.json ({detail})") from None
        missing = [m for m in missing if not (m == "lm_head.weight" and tie)]
        if missing or unexpected:
            raise ValueError(f"{folder / WEIGHTS}: weights do not match config.json "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        if tie:
            lm.lm_head.weight = lm.model.embed_tokens.weight
        return lm.to(dtype).eval()

    def get_decoder(self) -> Decoder:
        return self.model

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, use_cache)
        out.logits = self.lm_head(out.last_hidden_state)
        return out

    def generate(self, *args, **kwargs):
        raise NotImplementedError("the native network decodes through lrem.decoding (fast=True); "
                                  "load the model with runtime='transformers' for `generate`")

    def save_pretrained(self, *args, **kwargs):
        raise NotImplementedError("a model loaded with runtime='native' is for inference; "
                                  "load it with runtime='transformers' to save it")


class Config(SimpleNamespace):
    """The config.json values the network reads, with transformers' defaults."""

    def __init__(self, cfg: dict):
        mt = cfg["model_type"]
        heads = cfg["num_attention_heads"]
        super().__init__(
            model_type=mt, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=_rope(cfg)["rope_theta"],
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # as transformers builds them: Qwen2 always has q/k/v biases, Mistral none, Llama per attention_bias
            qkv_bias=mt == "qwen2" or (mt == "llama" and bool(cfg.get("attention_bias", False))),
            o_bias=mt == "llama" and bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=None, use_sliding_window=False)

    def get_text_config(self) -> "Config":
        return self
