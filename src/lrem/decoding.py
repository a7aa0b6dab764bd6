"""Decoding pieces of the fast reasoning path: a compact decoder over its own static KV cache,
one decode step (graph-captured on CUDA), nucleus sampling for RL rollouts, and batched greedy
generation as functions over a model (`prefix_kv`, `prefill`, `decode`, `lookup_decode`, `generate`,
in the style of gpt-fast). `lrem.engine.QueryEngine` and the local teacher
(`lrem.teachers.HFTeacher`) drive them."""
from __future__ import annotations

import contextlib
import threading
import warnings
import weakref

import torch
import torch.nn.functional as F


def sample_top_p(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from softmax(logits / temperature), cut to the smallest set of tokens
    whose probability reaches `top_p` (nucleus sampling).  logits (B, V) -> ids (B,)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # tokens after the nucleus is full
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def greedy_ids(logits: torch.Tensor) -> torch.Tensor:
    """The greedy pick over the last dim: the first index of the largest logit, as argmax. On the
    CPU through `max`, whose indices are the same (ties included, tested): bfloat16's argmax kernel
    is ~12x slower there (20 x 49k logits, 2 threads: 6.1 ms against 0.5 ms), a tenth of a
    reasoned query's time."""
    return logits.max(-1).indices if logits.device.type == "cpu" else logits.argmax(-1)


def head_dim(cfg) -> int:
    """Width of one attention head of a (text) model config."""
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def lookup_draft(tokens: list[int], k: int, max_ngram: int = 3, min_ngram: int = 2) -> list[int]:
    """Prompt-lookup drafting: the (up to k) tokens that followed the latest earlier occurrence
    of the longest trailing n-gram (min_ngram <= n <= max_ngram) of `tokens` that is followed by
    k tokens (else the occurrence followed by the most); [] if there is none. One-token matches
    are left out by default: their drafts were mostly rejected (measured on SmolLM2's CoTs,
    where they made decoding slower).

    >>> lookup_draft([5, 6, 7, 8, 5, 6], k=2)
    [7, 8]
    """
    if len(tokens) < 2:
        return []
    # where the last token occurred before (list.index runs in C): the n-grams that may match end there
    ends, e = [], -1
    while True:
        try:
            e = tokens.index(tokens[-1], e + 1, len(tokens) - 1)
        except ValueError:
            break
        ends.append(e)
    for n in range(min(max_ngram, len(tokens) - 1), min_ngram - 1, -1):
        tail, best = tokens[-n:], []
        for e in reversed(ends):  # the latest first
            if e >= n - 1 and tokens[e - n + 1 : e + 1] == tail:
                follow = tokens[e + 1 : e + 1 + k]
                if len(follow) == k:
                    return follow
                best = max(best, follow, key=len)
        if best:
            return best
    return []


class Linear:
    """`mod(x)` for an `nn.Linear`, its weight's rows cut into `parts` blocks run as one batched
    matmul when x has few rows (views of the weight: no copy, updates show through).

    Why: with few rows in x (decoding), `F.linear` is a matrix-vector product that this CPU's
    BLAS runs on one core; as a batch of `parts` products it runs on `parts` cores, and the
    step is bound by reading the weights (measured 1.6x at one row with 2 threads, 1.3x at 32).
    With 2-8 rows (drafted tokens checked in one forward) each block multiplies x's transpose,
    W_block @ x.T: the BLAS then streams the weight instead of packing it first as it does for
    x @ W_block.T (the 135M model's LM head at 5 rows: 10 vs 20 ms); with more rows (a single
    query's prompt in direct mode) x @ W_block.T is the faster (measured 86-100 vs 127-143 ms).
    Float32 only: bfloat16 products go through oneDNN, which already spreads one matrix-vector
    product over the threads; cut into blocks they were slower (135M model, one token: 43 vs 32 ms).
    Bfloat16 weights on the CPU are instead kept once more in oneDNN's packed layout (or, stacked
    with the others of one input, in a `Fused` product's: `pack=False`) (`mkldnn
    ._reorder_linear_weight`, as inductor's weight prepacking does), used outside autograd: the
    same products (equal to F.linear's here), 1.2-2.6x faster at 1-32 rows (the 135M model's 576 x
    1536 layer at one row: 0.098 -> 0.037 ms; its LM head 4.8 -> 2.9 ms), 1.4-1.6x at 48-256 rows on
    an AMX CPU (`PACKED_ROWS`). That copy does not follow in-place updates: callers rebuild
    `block_linears` when the weights change, as `QueryEngine` does.
    """

    MAX_ROWS = 32  # above it F.linear is as fast (float32 blocks; measured up to 512 rows)
    # the packed bfloat16 product up to this many rows: on an AMX CPU it was 1.4-1.6x faster than
    # F.linear from 48 to 256 rows (the 135M model's products, 2 threads), as fast at 384-512
    PACKED_ROWS = 256
    TRANSPOSED_ROWS = 8  # up to it W_block @ x.T

    def __init__(self, mod: torch.nn.Linear, parts: int, pack: bool = True):
        w = mod.weight
        n, k = w.shape
        self.w, self.bias, self.parts = w, mod.bias, parts if w.device.type == "cpu" and w.dtype == torch.float32 and n >= parts else 1
        self.m = n - n % self.parts  # rows in the blocks; the rest (e.g. of a 49,155 vocabulary) run apart
        self.blocks = w[: self.m].view(self.parts, self.m // self.parts, k)  # (parts, m / parts, K)
        self.packed = packed_weight(w) if pack else None  # pack=False: a `Fused` product packs it with others

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        k = self.w.shape[1]
        if runs_packed(x, self.packed, [self]):
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")
        if self.parts < 2 or x.numel() > self.MAX_ROWS * k:
            return F.linear(x, self.w, self.bias)
        x2 = x.reshape(-1, k)  # (M, K)
        if len(x2) <= self.TRANSPOSED_ROWS:
            xt = x2.t()
            out = torch.bmm(self.blocks, xt.expand(self.parts, *xt.shape))  # (parts, m / parts, M)
            out = out.view(self.m, -1).t().contiguous()  # (M, m)
        else:
            out = torch.bmm(x2.expand(self.parts, *x2.shape), self.blocks.transpose(1, 2))  # (parts, M, m / parts)
            out = out.transpose(0, 1).reshape(-1, self.m)
        if self.m < self.w.shape[0]:
            out = torch.cat([out, F.linear(x2, self.w[self.m :])], -1)
        out = out.reshape(*x.shape[:-1], -1)
        return out if self.bias is None else out + self.bias


class Fused:
    """`Linear`s of one input (a layer's q, k and v projections; gate and up) as one product:
    `fused(x)` is the tuple of their outputs. Where the packed path applies (bfloat16 CPU weights,
    up to PACKED_ROWS rows, outside autograd) their weights are packed once, stacked, and multiplied
    in one call, whose outputs are split (views): one call and one pass over x instead of two or
    three, and the small k and v weights read as part of a larger one (the 135M model's 30 layers:
    ~1.5 ms less a forward at 1-12 rows; the same products, bit for bit). Elsewhere each `Linear`
    runs on its own."""

    def __init__(self, linears: list[Linear]):
        self.parts, self.sizes = linears, [lin.w.shape[0] for lin in linears]
        self.packed = packed_weight(*(lin.w for lin in linears))
        biases = [lin.bias for lin in linears]
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach() if b is not None else lin.w.new_zeros(lin.w.shape[0]) for b, lin in zip(biases, linears)])

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if runs_packed(x, self.packed, self.parts):
            out = torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")
            return out.split(self.sizes, -1)
        return tuple(lin(x) for lin in self.parts)


def runs_packed(x: torch.Tensor, packed: torch.Tensor | None, linears: list[Linear]) -> bool:
    """Whether x (up to `Linear.PACKED_ROWS` rows, in the weights' dtype) runs through `packed`, the
    packed copy of `linears`' weights: only outside autograd, or where none of their weights and
    biases needs gradients (the packed product has no backward)."""
    w = linears[0].w
    return (packed is not None and x.numel() <= Linear.PACKED_ROWS * w.shape[1] and x.dtype == w.dtype
            and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                     for lin in linears for t in (lin.w, lin.bias))))


_PACKED: dict[tuple[int, ...], tuple[tuple, torch.Tensor]] = {}  # ids of the weights -> (their state, packed copy)


def packs(w: torch.Tensor) -> bool:
    """Whether `packed_weight` applies to `w`: a bfloat16 CPU weight, in a build with oneDNN."""
    return w.device.type == "cpu" and w.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()


def packed_weight(*ws: torch.Tensor) -> torch.Tensor | None:
    """Bfloat16 CPU weights (N_i, K), stacked along N, in oneDNN's packed layout for
    `mkldnn._linear_pointwise`, or None where that does not apply (another dtype or device, or a
    build without oneDNN). Kept while the weights live and are unchanged (address, version):
    `block_linears` for another thread count (a teacher adapts its threads to the load) shares it
    instead of packing again."""
    w = ws[0]
    if not all(packs(x) for x in ws):
        return None
    key, state = tuple(id(x) for x in ws), tuple((x.data_ptr(), x._version, tuple(x.shape)) for x in ws)
    kept = _PACKED.get(key)
    if kept is not None and kept[0] == state:
        return kept[1]
    try:
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(torch.cat([x.detach() for x in ws]) if len(ws) > 1
                                                             else w.detach())
    except (RuntimeError, AttributeError):  # an op this build lacks: plain F.linear
        return None
    if kept is None:
        for x in ws:
            weakref.finalize(x, _PACKED.pop, key, None)
    _PACKED[key] = (state, packed)
    return packed


def kv_cache(lm, pairs):
    """Per-layer (key, value) pairs as the cache `lm`'s decoder takes: transformers' `DynamicCache`,
    or the pairs themselves for the native network (`lrem.network`, which never imports transformers)."""
    if getattr(lm, "native", False):
        return list(pairs)
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=list(pairs))


FUSED = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}  # `Fused` products, by name


def block_linears(lm, parts: int) -> tuple[list[dict[str, Linear | Fused]], Linear]:
    """`Linear` views of each decoder layer's projections (by name) and of the LM head; where the
    weights are packed (bfloat16 on the CPU), also the `FUSED` products of those that share an
    input, whose parts then keep no packed copy of their own."""
    dec = lm.get_decoder()
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    layers = []
    for layer in dec.layers:
        mods = {n: getattr(mod, n) for mod in (layer.self_attn, layer.mlp) for n in names if hasattr(mod, n)}
        fuse = {f: ns for f, ns in FUSED.items() if all(n in mods for n in ns)
                and all(packs(mods[n].weight) for n in ns)}
        lins = {n: Linear(m, parts, pack=not any(n in ns for ns in fuse.values())) for n, m in mods.items()}
        layers.append({**lins, **{f: Fused([lins[n] for n in ns]) for f, ns in fuse.items()}})
    return layers, Linear(lm.get_output_embeddings(), parts)


class StaticDecoder:
    """The backbone's decoder, written out for decoding: Llama-family layers (`ARCHS`) over a
    KV cache of `length` slots it owns, running the model's own weights (no copies).

    `__call__(ids, pos, start)` runs tokens (B, T) at positions (B, T), writes their keys and
    values into slots [start, start + T) and returns the last layer's (normed) hidden states,
    as the HF decoder would. Each token attends to the earlier slots `mask` (B, length) allows,
    and to itself. Slots are read only up to the last one written, so the cache is not zeroed,
    but once from the first `rows` call's first slot on (for the rows it skips).
    Why: at one query, a transformers decode step spends ~20 ms of its ~75 ms in module and
    mask plumbing on this 135M model; here a layer is a dozen tensor ops.
    """

    ARCHS = ("llama", "mistral", "qwen2")

    @classmethod
    def supports(cls, lm, length: int) -> bool:
        cfg = lm.config.get_text_config()
        window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
        return cfg.model_type in cls.ARCHS and (window is None or length <= window)

    def __init__(self, lm, batch: int, length: int, linears=None):
        self.dec = lm.get_decoder()
        cfg = lm.config.get_text_config()
        self.head_dim = head_dim(cfg)
        self.kv_heads, self.group = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
        p = next(lm.parameters())
        shape = (batch, cfg.num_key_value_heads, length, self.head_dim)
        self.k = [torch.empty(shape, dtype=p.dtype, device=p.device) for _ in self.dec.layers]
        self.v = [torch.empty(shape, dtype=p.dtype, device=p.device) for _ in self.dec.layers]
        self.mask = torch.zeros(batch, length, dtype=torch.long, device=p.device)  # 1 = a slot to attend to
        self.length = length
        # every row's slots from here to the end were zeroed (the cache is allocated uninitialised;
        # see `rows`), and since written or still zero
        self.zeroed = length
        # `block_linears` of these weights (kept by the caller: building them costs ~4 ms)
        self.lin, self.head_lin = linears or block_linears(lm, torch.get_num_threads())

    def fill(self, kv, n: int) -> None:
        """Slots [0, n) from per-layer (key, value) of batch 1 or B."""
        for k, v, (pk, pv) in zip(self.k, self.v, kv):
            k[:, :, :n] = pk[:, :, :n]
            v[:, :, :n] = pv[:, :, :n]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head_lin(h)

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, start: int, rows: torch.Tensor | None = None,
                 attend: torch.Tensor | None = None) -> torch.Tensor:
        """`rows` (B',): run only these rows of the cache (ids and pos are theirs, (B', T)): their
        keys and values up to `end` are gathered per layer, the new ones written back to the cache.
        Why: once most of a batch's CoTs have stopped, a step costs the weights' reading plus ~1 ms
        a row on this CPU, and the finished rows would only feed padding. `attend` (B, T, start + T)
        bool: which slots each new token attends to, in place of `mask` and causal order (a tree
        of drafts: `lookup_decode`'s branches)."""
        b, t = ids.shape
        end, hd = start + t, self.head_dim
        h = self.dec.embed_tokens(ids)
        # rotary embedding as transformers applies it, x * cos + rotate_half(x) * sin, with
        # rotate_half(x) * sin = roll(x, half) * [-sin_1, sin_2]: half the ops, the same values
        cos, sin = self.dec.rotary_emb(h, pos)  # (B, T, hd)
        half = hd // 2
        cos, sin = cos[:, None], torch.cat([-sin[..., :half], sin[..., half:]], -1)[:, None]  # (B, 1, T, hd)
        slots = torch.arange(end, device=ids.device)
        own = start + torch.arange(t, device=ids.device)[:, None]  # (T, 1) each token's slot
        mask = self.mask[:, :end] if rows is None else self.mask[rows, :end]
        if rows is not None and start < self.zeroed:
            # the other rows' slots from here on are skipped, masked, and may be read when they run
            # again: uninitialised memory may hold NaN, which a mask does not hide. Zeroed once, all
            # rows to the cache's end (the rows run write theirs below), instead of the skipped rows'
            # new slots in each layer of each such forward (60 masked writes, ~2.5 ms a forward here)
            for kc, vc in zip(self.k, self.v):
                kc[:, :, start : self.zeroed].zero_()
                vc[:, :, start : self.zeroed].zero_()
            self.zeroed = start
        allowed = ((mask[:, None] > 0) | (slots == own)) & (slots <= own) if attend is None else attend  # (B, T, end)
        bias = torch.zeros(allowed.shape, dtype=h.dtype, device=h.device).masked_fill_(~allowed, float("-inf"))
        kv, g = self.kv_heads, self.group
        bias = bias[:, None, None].expand(b, 1, g, t, end).reshape(b, 1, g * t, end)  # (B, 1, G * T, end): each
        # query head of a group sees its token's row; broadcast over key heads (additive: faster here than boolean)
        for layer, lin, kc, vc in zip(self.dec.layers, self.lin, self.k, self.v):
            a, n1, n2 = layer.self_attn, layer.input_layernorm, layer.post_attention_layernorm
            x = F.rms_norm(h, h.shape[-1:], n1.weight, n1.variance_epsilon)  # = the module's output, fewer ops
            if "qkv" in lin:  # one product; q and k rotated together (the same values, half the ops)
                q, k, v = lin["qkv"](x)
                qk = torch.cat([q, k], -1).view(b, t, -1, hd).transpose(1, 2)  # (B, H + KV, T, hd)
                qk = qk * cos + qk.roll(half, -1) * sin
                q, k = qk[:, : q.shape[-1] // hd], qk[:, q.shape[-1] // hd :]
            else:
                q = lin["q_proj"](x).view(b, t, -1, hd).transpose(1, 2)
                k = lin["k_proj"](x).view(b, t, -1, hd).transpose(1, 2)
                q = q * cos + q.roll(half, -1) * sin
                k = k * cos + k.roll(half, -1) * sin
                v = lin["v_proj"](x)
            v = v.view(b, t, -1, hd).transpose(1, 2)
            if rows is not None:  # the rows' cache, then the new slots written to both
                full_k, full_v = kc, vc
                kc, vc = kc[:, :, :end].index_select(0, rows), vc[:, :, :end].index_select(0, rows)
                full_k[rows, :, start:end], full_v[rows, :, start:end] = k, v
            kc[:, :, start:end], vc[:, :, start:end] = k, v
            # the query heads that share a key head run as one longer query (B, KV, G * T, hd): the
            # CPU kernel is then ~5x faster on decode shapes (batch 32, one token: 0.27 vs 1.4 ms a layer)
            o = F.scaled_dot_product_attention(q.reshape(b, kv, -1, hd), kc[:, :, :end], vc[:, :, :end],
                                               attn_mask=bias, scale=a.scaling).view(b, -1, t, hd)
            h = h + lin["o_proj"](o.transpose(1, 2).reshape(b, t, -1))
            x = F.rms_norm(h, h.shape[-1:], n2.weight, n2.variance_epsilon)
            gate, up = lin["gate_up"](x) if "gate_up" in lin else (lin["gate_proj"](x), lin["up_proj"](x))
            h = h + lin["down_proj"](layer.mlp.act_fn(gate) * up)
        norm = self.dec.norm
        return F.rms_norm(h, h.shape[-1:], norm.weight, norm.variance_epsilon)


def padded_width(widths, w: int) -> int:
    """The smallest of `widths` that holds `w` tokens, else `w` itself.

    >>> padded_width((4, 8, 16), 5), padded_width((4, 8, 16), 17), padded_width((), 5)
    (8, 17, 5)
    """
    return min((x for x in widths if x >= w), default=w)


FOLDED = "lrem_folded_sdpa"  # the attention implementation `folded_attention` registers
_folding_lock = threading.Lock()
_folding: dict[int, list] = {}  # id(config) -> [config, its implementation before, holders]


def folded_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                is_causal=None, **kwargs):
    """transformers' SDPA attention with grouped-query heads folded into the query length rather
    than keys and values repeated: query (B, H, T, d) runs as (B, Hkv, G*T, d) against the cache's
    (B, Hkv, L, d), the mask repeated G times along its rows. transformers 5.17 copies the keys
    and values G times over the whole static cache in every layer whenever there is a mask (always,
    over a static cache), and 5.23 still does for forwards of several tokens: at batch 256 on an
    H200 those copies were 55% of a generation's kernel time (Qwen2.5-3B's shape, G=8). The same
    products, the same result (tested). Anything else goes to transformers' own SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if (groups == 1 or attention_mask is None or attention_mask.ndim != 4 or attention_mask.shape[1] != 1
            or attention_mask.shape[2] != query.shape[2]
            or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None or dropout):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    b, h, t, d = query.shape
    hkv = key.shape[1]
    q = query.reshape(b, hkv, groups * t, d)  # head h = kv * G + g: rows (g, t) of kv head `kv`
    mb, _, mt, ml = attention_mask.shape  # a mask of one row broadcasts over the batch
    mask = attention_mask.expand(-1, groups, -1, -1).reshape(mb, 1, groups * mt, ml)
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, h, t, d).transpose(1, 2).contiguous(), None


class folded_attention:
    """Within it, `lm` attends through `folded_sdpa` where it would through transformers' SDPA
    ("sdpa"); outside it, as it did. The engine's own forwards over a static cache (and their CUDA
    graph captures) run inside; the model as loaded stays as transformers made it. Several threads
    may hold it at once: the last to leave restores the implementation."""

    def __init__(self, lm):
        self.config = lm.config

    def __enter__(self):
        with _folding_lock:
            held = _folding.get(id(self.config))
            if held is None:
                before = self.config._attn_implementation
                if before != "sdpa":  # eager, flash, a user's own: theirs to keep
                    return self
                _register_folded()
                held = _folding[id(self.config)] = [self.config, before, 0]
                self.config._attn_implementation = FOLDED
            held[2] += 1
            self.held = held
        return self

    def __exit__(self, *exc):
        held = getattr(self, "held", None)
        if held is not None:
            with _folding_lock:
                held[2] -= 1
                if held[2] == 0:
                    held[0]._attn_implementation = held[1]
                    del _folding[id(self.config)]
            del self.held
        return False


def _register_folded() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(FOLDED, folded_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(FOLDED, sdpa_mask)  # the masks SDPA gets


class GreedyStep:
    """Decoding state for one batch shape: a KV cache of `length` slots, the mask over them,
    and the decode step, (B,) ids -> (B,) next ids.

    On the CPU, given `linears` (`block_linears`), for the architectures `StaticDecoder` covers,
    it decodes with that. Otherwise
    (CUDA, other backbones) with the HF decoder over a transformers `StaticCache`, whose inputs
    live in fixed buffers (ids, positions, the 2-D mask), so on CUDA the step is captured once in
    a CUDA graph and replayed: a 3B model's decode step is hundreds of small kernels, and
    launching them one by one costs more than running them.

    `widths` (the HF decoder only): forwards of several tokens a row (a prompt's suffix, a CoT's
    closing tokens, a direct query) are padded to the smallest of these widths that holds them
    (`width`), and on a graph step each width is captured too. At batch 1 on a GPU such a
    forward is launch-bound: a 3B model's prefill took ~43 ms eagerly, about what 16 tokens of
    its captured decode step took.
    """

    def __init__(self, lm, batch: int, length: int, graph: bool, linears=None, widths: tuple[int, ...] = (),
                 fold: bool = True, compile: bool = False):
        p = next(lm.parameters())
        self.lm, self.length = lm, length
        # the HF decoder's attention: grouped heads folded (`folded_sdpa`), or transformers' as loaded
        self.fold = fold
        # the decode step's forward through torch.compile (fused norms, rotary, activations: a
        # GPU's batch-1 step is ~45 small kernels a layer); compiled on the first step, per size
        self.decoder = torch.compile(lm.get_decoder(), dynamic=False) if compile else lm.get_decoder()
        self.compact = None
        native = getattr(lm, "native", False)  # lrem.network: no transformers cache classes, so always compact
        if native and linears is None:
            linears = block_linears(lm, torch.get_num_threads())
        if linears is not None and (p.device.type == "cpu" or native) and StaticDecoder.supports(lm, length):
            self.compact = StaticDecoder(lm, batch, length, linears)
            self.mask = self.compact.mask
        else:
            from transformers import StaticCache

            cfg = lm.config.get_text_config()
            self.cache = StaticCache(config=cfg, max_cache_len=length)
            self.cache.early_initialization(batch, cfg.num_key_value_heads, head_dim(cfg), p.dtype, p.device)
            self.mask = torch.zeros(batch, length, dtype=torch.long, device=p.device)  # 1 = a slot to attend to
        # a wide forward must leave room in the cache for the tokens after it
        self.widths = () if self.compact is not None else tuple(sorted(w for w in set(widths) if 1 < w < length))
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=p.device)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=p.device)
        self.graph = None
        self.wide: dict[int, tuple] = {}  # width -> (graph, ids (B, W), pos (B, W), hidden (B, W, D))
        self.lock = threading.Lock()
        if graph and self.compact is None:
            self._capture()

    def width(self, w: int) -> int:
        """The width a forward of `w` tokens a row runs at (`padded_width` of its `widths`)."""
        return padded_width(self.widths, w)

    # ---- the cache -------------------------------------------------------------------------
    def reset(self, kv=None, n: int = 0) -> None:
        """Empty the cache, then put the per-layer prefix (key, value) `kv` (batch 1) in slots
        [0, n). Slots are overwritten, and masked until written."""
        self.mask.zero_()
        self.mask[:, :n] = 1
        if self.compact is not None:
            self.compact.fill(kv or [], n)
            return
        b = self.mask.shape[0]
        for layer in self.cache.layers:
            layer.cumulative_length.zero_()
        for layer, (k, v) in zip(self.cache.layers, kv or []):
            layer.update(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1))

    def filled(self) -> int:
        """Slots the HF decoder's static cache has written since `reset` (where its next tokens go)."""
        return int(self.cache.layers[0].cumulative_length)

    def seek(self, slot: int) -> None:
        """Have the HF decoder's static cache write its next tokens from `slot` (its count set in
        place, so a captured graph still reads it). The compact decoder writes where it is told."""
        if self.compact is None:
            for layer in self.cache.layers:
                layer.cumulative_length.fill_(slot)

    def rewind(self, used: int) -> None:
        """Forget the slots from `used` on: masked, and written next (`seek`)."""
        self.mask[:, used:] = 0
        self.seek(used)

    def kv(self, used: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (key, value) of the first `used` slots."""
        if self.compact is not None:
            return [(k[:, :, :used], v[:, :, :used]) for k, v in zip(self.compact.k, self.compact.v)]
        return [(layer.keys[:, :, :used], layer.values[:, :, :used]) for layer in self.cache.layers]

    def run(self, ids: torch.Tensor, pos: torch.Tensor, start: int, rows: torch.Tensor | None = None,
            attend: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (B, T, D) of ids (B, T) at positions pos, written to slots [start, start + T)
        (the caller sets their mask); `start` is the number of slots filled so far. `rows`, `attend`:
        the compact decoder only (see `StaticDecoder`). A width captured in a graph replays it."""
        if self.compact is not None:
            return self.compact(ids, pos, start, rows, attend)
        if start + ids.shape[1] > self.length:  # on CUDA an index past the cache is a device assert, fatal
            raise ValueError(f"{ids.shape[1]} tokens after slot {start} overflow a cache of {self.length} slots")
        wide = self.wide.get(ids.shape[1])
        if wide is not None:
            graph, ids_, pos_, out = wide
            ids_.copy_(ids)
            pos_.copy_(pos)
            graph.replay()
            return out.clone()  # the next replay of a graph in this pool overwrites it
        return self._decoder(ids, pos)

    def _decoder(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        decoder = self.decoder if ids.shape[1] == 1 else self.lm.get_decoder()  # compiled: the decode step
        with folded_attention(self.lm) if self.fold else contextlib.nullcontext():
            return decoder(input_ids=ids, attention_mask=self.mask, position_ids=pos,
                           past_key_values=self.cache, use_cache=True).last_hidden_state

    def extend(self, ids: torch.Tensor, pos: torch.Tensor, new: torch.Tensor, used: int,
               rows: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (B, K) of ids (B, K) after the first `used` slots (as `mask` allows them),
        `new` (B, K) masking the new tokens; the static cache is extended in place where it has room.
        `rows`: ids, pos and new are these rows' only (the compact decoder with room only)."""
        k = ids.shape[1]
        if self.compact is not None and used + k <= self.length:
            if rows is None:
                self.mask[:, used : used + k] = new
            else:
                self.mask[rows, used : used + k] = new
            return self.compact(ids, pos, used, rows)
        if rows is not None:
            raise ValueError("extend: row subsets need the compact decoder with room in its cache")
        w = self.width(k)
        if self.compact is None and self.widths and used + w <= self.length and self.filled() == used:
            # in place at the padded width (a captured graph where there is one); the padding is masked
            more = w - k
            ids, pos = F.pad(ids, (0, more), value=0), torch.cat([pos, pos[:, -1:].expand(-1, more)], 1)
            self.mask[:, used : used + w] = F.pad(new, (0, more))
            return self.run(ids, pos, used)[:, :k]
        mask = torch.cat([self.mask[:, :used], new], 1)  # (B, used + K)
        with folded_attention(self.lm) if self.fold else contextlib.nullcontext():
            return self.lm.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos,
                                         past_key_values=kv_cache(self.lm, self.kv(used)),
                                         use_cache=True).last_hidden_state

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.compact is not None:
            return self.compact.logits(h)
        return self.lm.get_output_embeddings()(h)

    # ---- the decode step ---------------------------------------------------------------------
    def _logits(self, slot: int) -> torch.Tensor:
        return self.logits(self.run(self.ids, self.pos, slot)[:, -1])  # (B, V)

    def _forward(self) -> torch.Tensor:
        return self._logits(-1).argmax(-1)  # (B,); the static cache keeps its own count

    def _capture(self) -> None:
        """Capture the decode step and each of `widths`' forwards, widest first, in one memory
        pool: they replay one at a time, and each output is copied out (`run`) or its own."""
        pool, failed, b, dev = None, False, self.ids.shape[0], self.ids.device
        for w in [*sorted(self.widths, reverse=True), 1]:
            if w > 1 and failed:
                continue
            if w == 1:
                fn = self._forward
            else:
                ids, pos = torch.zeros(b, w, dtype=torch.long, device=dev), torch.zeros(b, w, dtype=torch.long, device=dev)
                fn = (lambda ids=ids, pos=pos: self._decoder(ids, pos))
            graph, out = self._graph(fn, pool, warmups=3 if w == 1 else 1)
            if graph is None:  # an op that cannot be captured: run eagerly, still correct; the
                failed, pool = True, None  # decode step is still tried on its own
                continue
            pool = graph.pool()
            if w == 1:
                self.graph, self.out = graph, out
            else:
                self.wide[w] = (graph, ids, pos, out)
        self.reset()

    def _graph(self, fn, pool, warmups: int):
        """(graph, output) of `fn` captured, or (None, None) with a warning; the cache is reset
        before each run, so warm-ups and capture write from slot 0."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (allocations, kernel choice) off the capture
            for _ in range(warmups):
                self.reset()
                fn()
        torch.cuda.current_stream().wait_stream(side)
        self.reset()
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: a server's other threads may sync with the GPU meanwhile (their own work)
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                out = fn()
            return graph, out
        except RuntimeError as e:
            warnings.warn(f"CUDA graph capture failed, decoding without it: {e}")
            torch.cuda.synchronize()
            return None, None

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, slot: int, pick=None,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
        """Feed ids (B,) at positions pos (B,) into cache slot `slot`; return the next ids (B,):
        argmax, or `pick(logits)` (eager: sampling is not graph-captured). `rows` (compact decoder):
        ids and pos are these rows' only, and so are the ids returned."""
        if rows is not None:
            self.mask[rows, slot] = 1
            logits = self.logits(self.compact(ids[:, None], pos[:, None], slot, rows)[:, -1])
            return pick(logits) if pick is not None else greedy_ids(logits)
        self.ids.copy_(ids[:, None])
        self.pos.copy_(pos[:, None])
        self.mask[:, slot] = 1
        if pick is not None:
            return pick(self._logits(slot))
        if self.graph is None:
            return greedy_ids(self._logits(slot))
        self.graph.replay()
        return self.out.clone()


# ---------------------------------------------------------------- generation as functions

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


def shared_prefix_len(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """Leading columns every row of a right-padded batch shares (unmasked, same ids), leaving each
    row >= 1 token after them; 0 for a single row.  (B, T), (B, T) -> int.

    >>> shared_prefix_len(torch.tensor([[1, 2, 3, 4], [1, 2, 5, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]))
    2
    """
    if input_ids.shape[0] < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(dim=0) & attention_mask.bool().all(dim=0)  # (T,)
    return min(int(same.long().cumprod(0).sum()), input_ids.shape[1] - 1)


def prefix_kv(lm, prefix: list[int], past=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (key, value) of `prefix` run as batch 1 after `past` (the KV of the tokens
    before it, extended, not modified)."""
    dev = next(lm.parameters()).device
    start = past[0][0].shape[2] if past else 0
    ids = torch.tensor([prefix], device=dev)
    pos = start + torch.arange(len(prefix), device=dev)[None]  # (1, P)
    cache = kv_cache(lm, past) if past else None
    out = lm.get_decoder()(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True)
    return [(layer.keys, layer.values) for layer in out.past_key_values.layers]


def prefill(step: GreedyStep, n: int, kv, seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Put the prefix KV `kv` (batch 1) in slots [0, n) of `step`'s cache and run each row's
    suffix `seqs[i][n:]` after it, left-padded in the middle (mask 0; positions counted from the
    mask, so every token sits where it would unpadded). Returns (last logits (B, V), last
    positions (B,), suffix width W, padded to `step.width`): the first generated token goes to slot n + W."""
    h, pos, w = prefill_hidden(step, n, kv, seqs, pad)
    return step.logits(h[:, -1]), pos[:, -1], w


def prefill_hidden(step: GreedyStep, n: int, kv, seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`prefill`'s forward: (hidden states (B, W, D), positions (B, W), W)."""
    sufs = [x[n:] for x in seqs]
    w, dev = step.width(max(len(x) for x in sufs)), step.mask.device  # a captured width: more padding
    step.reset(kv, n)
    ids = torch.tensor([[pad] * (w - len(x)) + x for x in sufs], device=dev)  # (B, W)
    mask = torch.tensor([[0] * (w - len(x)) + [1] * len(x) for x in sufs], device=dev)  # (B, W)
    step.mask[:, n : n + w] = mask
    pos = n + (mask.cumsum(-1) - 1).clamp(min=0)  # (B, W)
    return step.run(ids, pos, n), pos, w


def prefill_tree(step: GreedyStep, n: int, kv, seq: list[int], branches: list[list[int]]) -> tuple[torch.Tensor, int]:
    """`prefill` for one sequence, with `branches` (drafted continuations: token lists) run in the
    same forward after its suffix `seq[n:]`. Each branch attends to the prompt and to its own
    earlier tokens only, at the positions it would have right after the prompt, so its hidden
    states are those of the prompt followed by it. Returns (hidden states (T, D): the suffix's W,
    then each branch's in order; W); the branches fill the slots after the suffix's."""
    suf, dev = seq[n:], step.mask.device
    w, total = len(suf), sum(len(b) for b in branches)
    step.reset(kv, n)
    step.mask[:, n : n + w + total] = 1
    attend = torch.zeros(w + total, n + w + total, dtype=torch.bool, device=dev)  # (T, end)
    attend[:, : n + w] = True  # the prefix and the suffix, causal within the suffix (below)
    attend[:w, n : n + w] = torch.ones(w, w, dtype=torch.bool, device=dev).tril()
    pos, at = list(range(n, n + w)), w
    for b in branches:
        attend[at : at + len(b), n + at : n + at + len(b)] = torch.ones(len(b), len(b), dtype=torch.bool,
                                                                           device=dev).tril()
        pos += range(n + w, n + w + len(b))
        at += len(b)
    h = step.run(torch.tensor([suf + [t for b in branches for t in b]], device=dev),
                 torch.tensor([pos], device=dev), n, attend=attend[None])
    return h[0], w


def prefill_chain(step: GreedyStep, n: int, kv, seq: list[int], chain: list[int], pad: int) -> tuple[torch.Tensor, int]:
    """`prefill` for one sequence on transformers' decoder, with `chain` (drafted tokens) run after
    its suffix `seq[n:]` in the same forward, the two left-padded together to `step.width`: the
    chain's hidden states are those of the prompt followed by it (a linear `prefill_tree`, which
    needs the compact decoder's per-row attention). Returns (hidden states (S + C, D) of the
    suffix's S tokens and the chain's C, the slot of chain[0]: where decoding goes on, the chain's
    slots masked again, should the model not write it)."""
    h, _, w = prefill_hidden(step, n, kv, [seq + chain], pad)
    total = len(seq) - n + len(chain)
    return h[0, w - total :], n + w - len(chain)


def move_slots(step: GreedyStep, src: int, dst: int, count: int) -> None:
    """Copy the keys and values of cache slots [src, src + count) to [dst, dst + count) in every
    layer of `step`'s compact decoder (`StaticDecoder`), and attend to the copies: a drafted
    branch's tokens the model took, moved to where decoding goes on after them."""
    dec = step.compact
    for k, v in zip(dec.k, dec.v):
        k[:, :, dst : dst + count] = k[:, :, src : src + count].clone()
        v[:, :, dst : dst + count] = v[:, :, src : src + count].clone()
    step.mask[:, dst : dst + count] = 1


def check_branch(draft: list[int], tail: list[int], picks: list[int], stop: list[int], max_new: int, close
                 ) -> list[int] | None:
    """Whether the model writes `draft` as its CoT and stops where `tail` (the full text's closing
    tokens after it, up to `<emb>`) begins, `picks[i]` being its pick where token i of draft +
    tail was fed (picks[0]: after the prompt): the generated ids (up to the stop) if so, and if
    the full text after them is exactly the rest of tail (`close`, as in `lookup_decode`); None
    if not. Closing tokens the model picks itself (" " before `</think>`) are part of the CoT."""
    a = agreed(draft, picks, stop)
    if a < len(draft):
        return None
    j, ended = closing_taken(draft, tail, picks[a:], stop, max_new - a - 1, close)
    return draft + tail[:j] + [picks[a + j]] if ended else None


def closing_taken(done: list[int], tail: list[int], picks: list[int], stop: list[int], limit: int, close,
                  expect: tuple | None = None) -> tuple[int, bool]:
    """After the generated tokens `done`, with the full text's closing tokens `tail` fed right
    after them (`picks[i]`: the model's pick where tail[i] was fed): how many of them the model
    picks itself, up to `limit` (" " before `</think>` is part of the CoT), and whether it stops
    right after those with the full text reading the rest of tail from there (`close`; or reading
    `expect`, close's (kept, tokens), where a rerun ran instead): then what ran embeds the query."""
    j = agreed(tail, picks, stop, limit)
    want = expect if expect is not None else (len(done) + j, tail[j:])
    return j, picks[j] in stop and close(done + tail[:j])[:2] == want


def decode(step: GreedyStep, tok: torch.Tensor, pos: torch.Tensor, slot: int, max_new: int, stop: list[int],
           pad: int, pick=None, lag: int = 0) -> list[list[int]]:
    """From the first generated tokens `tok` (B,) (the last prompt token at positions `pos`),
    one token per step into cache slots slot, slot + 1, ...: argmax, or `pick(logits)`. Rows
    that emitted a stop id keep feeding `pad`, except that on the compact decoder the rest run
    alone once at least half have stopped (sampling then draws for those rows only); stops when
    all have or at `max_new` tokens.

    `lag` (transformers' decoder only): whether every row has stopped is read `lag` steps late.
    Reading it waits for the device, so on a GPU the host then queues the next step while the
    device still runs the one before, rather than each step's launch waiting for the last to end.
    The up to `lag` steps run after the last stop are forgotten (`GreedyStep.rewind`): the cache
    ends where it would without the lag.
    Returns the generated ids per row, up to and including its stop id (unpadded)."""
    stop_t = torch.tensor(stop, device=tok.device)
    out, done, p = [tok], torch.isin(tok, stop_t), pos
    lag = lag if step.compact is None else 0
    finished = [done.all()]  # per token: whether every row had stopped by it, read `lag` tokens late
    for t in range(1, max_new):
        if t > lag and bool(finished[t - 1 - lag]):
            break
        p = p + 1
        # `nonzero` waits for the device: only the compact (CPU) decoder runs row subsets
        live = (~done).nonzero()[:, 0] if step.compact is not None else None
        if live is not None and len(live) <= len(tok) // 2:  # most rows have stopped: run the others only
            nxt = torch.full_like(tok, pad)
            nxt[live] = step(tok[live], p[live], slot + t - 1, pick, rows=live)
            tok = nxt
        else:
            tok = torch.where(done, pad, step(tok, p, slot + t - 1, pick))  # (B,)
        out.append(tok)
        done |= torch.isin(tok, stop_t)
        finished.append(done.all())
    rows = torch.stack(out, 1).tolist()  # (B, <= max_new)
    gen = [r[: next((i + 1 for i, t in enumerate(r) if t in stop), len(r))] for r in rows]
    longest = max(map(len, gen))
    if longest < len(rows[0]):  # steps run past every row's stop (`lag`): slot + longest - 1 filled
        step.rewind(slot + longest - 1)
    return gen


DRAFT_ROWS = 32  # rows a forward of `draft_decode` runs once most rows have stopped: flat-ish cost up to 32 here
FULL_DRAFTS = 1  # drafted tokens a row while most rows still run (all B rows in each forward; 2 timed worse)


def draft_decode(step: GreedyStep, first: list[int], pos: list[int], slot: int, max_new: int, stop: list[int],
                 pad: int, seqs: list[list[int]], k: int, reserve: int = 0, ending=None,
                 alts: list[list[int]] | None = None) -> tuple[list[list[int]], list[list[int]], dict[int, torch.Tensor]]:
    """`decode` for greedy rows on the compact decoder, with drafts: from the first generated
    tokens `first` (the last prompt token of each row at `pos`), each forward feeds every running
    row's last token plus tokens drafted from its prompt `seqs[r]`, its CoT and `alts[r]` (its
    query respelled, if given) (`draft_for`: up to k; `FULL_DRAFTS` while more than half the rows
    run, as many as `DRAFT_ROWS` rows allow once the others run alone) into the same new slots. Each row keeps its drafts up to the first the model
    would not have picked, plus its own pick; the slots of the others are masked, so each row goes
    on at its own pace: the same tokens as one at a time. Why: a CoT copies the query's words, and
    a batch's last rows are its longest CoTs, often a phrase the model repeats ("4 light 4 light
    4"), each a forward of a few rows that reads all the weights (batches of 32 real WANDS and ESCI
    queries: 12.8 -> 8.5 and 15.0 -> 9.3 forwards a batch).
    Drafts use only the cache's spare slots: those beyond what one token a forward would still
    need (up to `max_new` tokens a row) and the last `reserve` (kept for what the caller runs after:
    `QueryEngine._embed_after`'s closing tokens); with none spare, a forward feeds one token a row.

    `ending(r, tokens)`, if given, gives the full text's closing tokens from its stop id on
    (`</think><emb>`) should row r's CoT end after `tokens`, or None. A row that stops there runs
    them in the next forward, beside the running rows (while most rows run, the stopped ones are
    in every forward anyway); once most have stopped, a running row that `ending` says may end
    after its last token runs them at once, and where the model stops there (it picks their
    first), that forward was its last. Either way the hidden state of their last token comes back,
    and the row needs no forward after its CoT. Why: nearly every CoT ends " </think>", so the
    closing tokens are known; the closing forward of a batch of 32 took ~95 ms here.
    Returns (the generated ids per row, up to and including its stop id; the cache slot of each
    token each row fed, in order, closing tokens included; the rows whose closing tokens ran, with
    that hidden state (D,))."""
    dev = step.mask.device
    gen, at, pos, s = [[x] for x in first], [[] for _ in first], list(pos), slot  # s: the first free slot
    ends: dict[int, torch.Tensor] = {}
    pending: dict[int, list[int]] = {}  # stopped rows -> their closing tokens after the stop id, to run
    live = [r for r, x in enumerate(first) if x not in stop and max_new > 1]
    for r in range(len(first)) if ending else ():
        if r not in live:
            _closes(ending, r, gen[r], pending)
    while live or pending:
        every = len(live) > len(first) // 2  # most rows still run: run them all, the stopped ones on pad
        # the slots one token a forward still needs, and those kept for after
        spare = step.length - reserve - s - max((max_new - len(gen[r]) for r in live), default=0)
        room = max(0, min(k, FULL_DRAFTS if every else DRAFT_ROWS // max(len(live), 1) - 1, spare))
        drafts = {r: draft_for(seqs[r] + gen[r], min(room, max_new - len(gen[r]) - 1), stop,
                               alt=alts[r] if alts else None) for r in live}
        tails: dict[int, list[int]] = {}
        if ending and not every:  # few rows run: each may run its closing tokens beside its drafts
            for r in live:
                t = ending(r, gen[r])
                if t and len(drafts[r]) + len(t) <= spare:
                    tails[r] = t
        w = max((len(drafts[r]) + len(tails.get(r, [])) for r in live), default=0)
        # within the forward's width, or with room for the stop id and them; else `_embed_after`'s
        pending = {r: t for r, t in pending.items() if len(t) <= w or len(t) + 1 <= spare}
        if not live and not pending:
            break
        w = max(w, *(len(t) for t in pending.values())) if pending else w
        # each row's chain (its last token, then drafts; or a stopped row's stop id, then its closing
        # tokens), then a running row's closing tokens as a branch after its last token
        chain = {r: [gen[r][-1], *drafts[r]] for r in live}
        chain.update((r, [gen[r][-1], *t]) for r, t in pending.items())
        fed = {r: [*c, *tails.get(r, [])] for r, c in chain.items()}
        run = list(range(len(first))) if every else sorted(fed)
        ids = torch.tensor([fed[r] + [pad] * (w + 1 - len(fed[r])) if r in fed else [pad] * (w + 1) for r in run],
                           device=dev)
        offsets = {r: [*range(len(c)), *range(1, len(tails.get(r, [])) + 1)] for r, c in chain.items()}
        where = torch.tensor([[pos[r] + 1 + i for i in offsets.get(r, [])] + [pos[r] + 1] * (w + 1 - len(offsets.get(r, [])))
                              for r in run], device=dev)
        step.mask[torch.tensor(sorted(fed), device=dev), s : s + w + 1] = 1
        row_of = {r: i for i, r in enumerate(run)}
        attend = None
        if any(drafts[r] for r in tails):  # closing tokens attend to the last token, not the drafts beside them
            end = s + w + 1
            slots, own = torch.arange(end, device=dev), s + torch.arange(w + 1, device=dev)[:, None]
            attend = (((step.mask[run, :end] > 0)[:, None] | (slots == own)) & (slots <= own)).clone()  # (B', T, end)
            for r in tails:
                d = len(drafts[r])
                attend[row_of[r], 1 + d :, s + 1 : s + 1 + d] = False
        h = step.run(ids, where, s, rows=None if every else torch.tensor(run, device=dev), attend=attend)
        for r, t in pending.items():  # their closing tokens ran: the last one's hidden state
            ends[r] = h[row_of[r], len(t)]
            at[r] += range(s, s + 1 + len(t))
            step.mask[r, s + 1 + len(t) : s + w + 1] = 0
        pending = {}
        going = []
        if live:
            # the LM head after the last token and the drafts only: a closing token's pick is not checked
            hl = h[torch.tensor([row_of[r] for r in live], device=dev), : 1 + max(len(drafts[r]) for r in live)]
            for r, row in zip(live, greedy_ids(step.logits(hl)).tolist()):
                d, t = drafts[r], tails.get(r)
                a = agreed(d, row, stop)
                if t and row[0] == t[0]:  # it stops after its last token, where its closing tokens began: they ran
                    gen[r].append(t[0])
                    at[r] += [s, *range(s + 1 + len(d), s + 1 + len(d) + len(t))]
                    ends[r] = h[row_of[r], len(d) + len(t)]
                    continue
                step.mask[r, s + a + 1 : s + w + 1] = 0  # the drafts it did not take
                gen[r] += row[: a + 1]
                at[r] += range(s, s + a + 1)
                pos[r] += a + 1
                if row[a] not in stop and len(gen[r]) < max_new:
                    going.append(r)
                elif ending:
                    _closes(ending, r, gen[r], pending)
        s, live = s + w + 1, going
    return gen, at, ends


def _closes(ending, r: int, gen: list[int], pending: dict[int, list[int]]) -> None:
    """Where row r stopped (the last of `gen`) on the first of the closing tokens `ending` gives
    for the CoT before it, put the rest in `pending` (`draft_decode`)."""
    t = ending(r, gen[:-1]) if gen[-1:] and len(gen) > 1 else None
    if t and t[0] == gen[-1]:
        pending[r] = t[1:]


def draft_for(tokens: list[int], k: int, stop: list[int], past: list[int] | None = None,
              alt: list[int] | None = None) -> list[int]:
    """Up to k tokens drafted after `tokens` (`lookup_draft`: 2-3-token matches in `alt` + `past` +
    tokens, else one-token matches in alt + tokens; the latest match wins, so tokens before past
    before alt), cut before a stop id. Why one-token matches and the cut: a trained model's CoT
    often copies a phrase of the query ("recliner" from "chair and a half recliner"), and the cut
    stops the draft where the query (or a past CoT) ends, so the closing tokens can follow it.
    `alt`: other spellings of the query's words (`QueryEngine.respelled`: the model writes "Carolyn
    Console" for "carolyn console table", whose tokens share none with it)."""
    if k <= 0:
        return []
    alt = alt or []
    d = lookup_draft(alt + (past or []) + tokens, k=k) or lookup_draft(alt + tokens, k=k, min_ngram=1)
    return d[: next((i for i, x in enumerate(d) if x in stop), len(d))]


def agreed(tokens: list[int], picks: list[int], stop: list[int], limit: int | None = None) -> int:
    """How many leading `tokens` (drafted) the model picked itself, `picks[i]` being its pick where
    tokens[i] was drafted, stopping at a stop id and after `limit` tokens.

    >>> agreed([5, 6, 7], [5, 6, 9], stop=[0]), agreed([5, 0], [5, 0], stop=[0]), agreed([5, 6], [5, 6], [0], limit=1)
    (2, 1, 1)
    """
    n = min(len(tokens), len(tokens) if limit is None else limit)
    a = 0
    while a < n and tokens[a] == picks[a] and picks[a] not in stop:
        a += 1
    return a


def lookup_decode(step: GreedyStep, seq: list[int], first: int | list[int], slot: int, pos: int, max_new: int,
                  stop: list[int], k: int, past: list[int] | None = None, close=None, alt: list[int] | None = None
                  ) -> tuple[list[int], int, torch.Tensor | None]:
    """Greedy decoding of one sequence `seq` (batch 1), several tokens per forward where its own
    tokens, `past` (earlier tokens, e.g. recent CoTs) or `alt` (the query respelled) predict them
    (`draft_for`): prompt-lookup speculative decoding (a CoT's phrases often repeat the query's or
    the instruction's words, and other queries' CoTs). Each forward feeds the last token plus up to `k` drafted ones (`lookup_draft`)
    and keeps the drafts up to the first the model would not have picked, plus the model's own
    next token: the same tokens as one-at-a-time greedy decoding, while each forward reads the
    weights once. `first` is the first generated token, to be fed at cache slot `slot` and
    position `pos`; or the tokens generated so far, all but the last already in the cache from
    `slot` (a drafted word the model began its CoT with: `QueryEngine` runs them in the prefill).

    `close(gen)`, if given, says how the full text reads should the CoT end after `seq + gen`:
    (keep, tokens, ends): it shares gen's first `keep` tokens, then has `tokens` (up to
    `</think><emb>`); `ends` are the tokens the model writes between its CoT and `</think>` (" ").
    Where keep is all of gen and the drafts, `tokens` are drafted after them. Where the text reads
    gen differently (the model wrote "chair" where the text has " chair"), `ends` are drafted
    after them, and `tokens` run in the same forward as a branch from gen[:keep], attending to
    the prompt and those tokens only. Beside the drafts, the closing tokens (as last read, a " "
    and `</think><emb>`) run as branches after gen and after each of the drafts but the last,
    should the CoT end inside them ("La Mer" drafted " La Mer dupe"). Wherever the model stops
    on tokens that ran, that forward has already run the full text's closing tokens: their last
    hidden state comes back, and no further forward is needed to embed.
    Returns (generated ids, cache slots filled, that hidden state (D,) or None)."""
    gen, dev, past = list(first) if isinstance(first, list) else [first], step.mask.device, past or []
    slot0, pos0 = slot, pos
    slot, pos = slot + len(gen) - 1, pos + len(gen) - 1
    closing = None  # the text's closing tokens, as last read: drafted wherever the CoT may end in the drafts
    while gen[-1] not in stop and len(gen) < max_new:
        draft = draft_for(seq + gen, min(k, max_new - len(gen) - 1), stop, past, alt)
        keep, toks, ends = close(gen + draft) if close else (0, None, [])
        tail, rerun = [], []
        if toks is not None and keep == len(gen) + len(draft):
            tail = toks  # the text goes on from the drafts
            closing = toks if ends else closing  # after a word (" " before `</think>`): the branches' guess
        elif toks is not None and keep < len(gen):
            tail, rerun = ends, toks  # the text reads the CoT differently: run it again beside the chain
        if draft and not rerun and close and closing is None:
            keep0, toks0, _ = close(gen)
            closing = toks0 if toks0 is not None and keep0 == len(gen) else None
        chain = 1 + len(draft) + len(tail)
        # beside the drafts, the closing tokens should the CoT end before draft c (the model writes
        # "La Mer" and stops where the query goes on " dupe"): a guess, read again where it is taken
        ats = list(range(len(draft))) if draft and closing and not rerun else []
        if slot + chain + len(rerun) + len(ats) * len(closing or []) > step.length:
            ats = []  # no room in the cache (a long CoT near its budget): the chain alone
        ids = [gen[-1], *draft, *tail, *rerun, *(closing * len(ats) if ats else [])]
        step.mask[:, slot : slot + len(ids)] = 1
        at = [pos + torch.arange(chain, device=dev)]
        attend = None
        if rerun or ats:  # a tree: each row attends to the cache before `lim`, the chain up to `upto`, and its own block
            lim, upto, start = [slot] * chain, [-1] * chain, [slot] * chain
            if rerun:  # after gen[:keep]
                at.append(pos0 + keep + torch.arange(len(rerun), device=dev))
                lim, upto, start = lim + [slot0 + keep] * len(rerun), upto + [-1] * len(rerun), start + [slot + chain] * len(rerun)
            for i, c in enumerate(ats):  # after gen and draft[:c]
                at.append(pos + 1 + c + torch.arange(len(closing), device=dev))
                b0 = slot + chain + i * len(closing)
                lim, upto, start = lim + [slot] * len(closing), upto + [c] * len(closing), start + [b0] * len(closing)
            end = slot + len(ids)
            slots, own = torch.arange(end, device=dev), slot + torch.arange(len(ids), device=dev)[:, None]
            lim, upto, start = (torch.tensor(x, device=dev)[:, None] for x in (lim, upto, start))
            cached = step.mask[0, :end] > 0
            attend = ((cached & (slots < lim)) | ((slots >= slot) & (slots <= slot + upto))
                      | ((slots >= start) & (slots <= own)))[None]  # (1, T, end)
        h = step.run(torch.tensor([ids], device=dev), torch.cat(at)[None], slot, attend=attend)
        # the model's pick after each token fed whose next token is checked: the chain's, and each
        # branch's but its last (the LM head on 16 rows or fewer costs a third of 17 or more here)
        need = [*range(chain), *(chain + i * len(closing) + j for i in range(len(ats)) for j in range(len(closing) - 1))]
        best: list[int | None] = [None] * len(ids)
        for i, t in zip(need, greedy_ids(step.logits(h[0, need])).tolist()):
            best[i] = t
        a = agreed(draft, best, stop)
        if ats and a < len(draft):  # the model leaves the drafts at a: does it close there (branch a)?
            b0 = chain + a * len(closing)
            after = [best[a], *best[b0 : b0 + len(closing)]]  # its picks after draft[:a], then after each closing token
            j = agreed(closing, after, stop, min(len(closing) - 1, max_new - len(gen) - a - 1))
            done = gen + draft[:a] + closing[:j]
            if after[j] in stop and close(done)[:2] == (len(done), closing[j:]):
                return done + [after[j]], slot + len(ids), h[0, b0 + len(closing) - 1]
        if a == len(draft) and tail:  # every draft taken: the closing tokens were fed right after them
            # (closing tokens the model picks itself, within the generated tokens the budget still allows)
            j, ended = closing_taken(gen + draft, tail, best[a:], stop, max_new - len(gen) - len(draft) - 1, close,
                                     (keep, rerun) if rerun else None)
            if ended:  # the embedding is the rerun's last token's, else the chain's
                return gen + draft + tail[:j] + [best[a + j]], slot + len(ids), h[0, chain + len(rerun) - 1]
            a += j
            draft = draft + tail[:j]
        step.mask[:, slot + a + 1 : slot + len(ids)] = 0  # slots of rejected drafts and branches
        gen += [*draft[:a], best[a]]
        slot, pos = slot + a + 1, pos + a + 1
    return gen, slot, None


def chain_decode(step: GreedyStep, seq: list[int], first: int | list[int], slot: int, pos: int, max_new: int,
                 stop: list[int], k: int, past: list[int] | None = None, close=None, alt: list[int] | None = None
                 ) -> tuple[list[int], int, torch.Tensor | None]:
    """`lookup_decode` for transformers' decoder (a GPU's path), batch 1: each forward feeds the
    last token and up to `k` tokens drafted from `seq`, `past` and `alt` (`draft_for`) in one
    chain, padded to a captured width (`GreedyStep.extend`), and keeps the drafts the model would
    have picked plus its own next token: the same tokens as one at a time. `close` (see
    `lookup_decode`): where the full text goes on from the drafts, its closing tokens (up to
    `<emb>`) end the chain, and where the model stops there, that forward has embedded the query.
    `first`: the first generated token, to be fed at cache slot `slot` and position `pos`; or the
    tokens generated so far, all but the last already in the cache from `slot` (`prefill_chain`).
    No branches (they need the compact decoder's per-row attention); where nothing is drafted and
    nothing closes, the captured decode step runs. Why: at batch 1 a GPU forward of a 3B model
    costs about the same for 1 token or 8, so each drafted token the model takes is a forward
    saved. Returns (generated ids, cache slots filled, the closing tokens' last hidden state (D,)
    or None); the cache is set back to those slots."""
    gen, dev, past = list(first) if isinstance(first, list) else [first], step.mask.device, past or []
    slot, pos = slot + len(gen) - 1, pos + len(gen) - 1
    filled = None  # where the cache writes next, where known here (a seek is a kernel per layer)
    while gen[-1] not in stop and len(gen) < max_new:
        draft = draft_for(seq + gen, min(k, max_new - len(gen) - 1), stop, past, alt)
        keep, toks, _ = close(gen + draft) if close else (0, None, [])
        tail = toks if toks is not None and keep == len(gen) + len(draft) else []
        if slot + step.width(1 + len(draft) + len(tail)) > step.length:  # no room to run the chain in place
            draft, tail = [], []
        if filled != slot:
            step.seek(slot)  # rejected drafts of the last forward are overwritten
        if not draft and not tail:
            gen.append(int(step(torch.tensor([gen[-1]], device=dev), torch.tensor([pos], device=dev), slot)[0]))
            slot, pos = slot + 1, pos + 1
            filled = slot
            continue
        ids = torch.tensor([[gen[-1], *draft, *tail]], device=dev)
        h = step.extend(ids, pos + torch.arange(ids.shape[1], device=dev)[None], torch.ones_like(ids), slot)
        filled = slot + step.width(ids.shape[1])  # `extend` ran in place at the padded width
        best = greedy_ids(step.logits(h[0])).tolist()
        a = agreed(draft, best, stop)
        if a == len(draft) and tail:  # every draft taken: the closing tokens were fed right after them
            j, ended = closing_taken(gen + draft, tail, best[a:], stop, max_new - len(gen) - len(draft) - 1, close)
            if ended:
                step.rewind(slot + ids.shape[1])
                return gen + draft + tail[:j] + [best[a + j]], slot + ids.shape[1], h[0, -1]
            a += j
            draft = draft + tail[:j]
        step.mask[:, slot + a + 1 :] = 0  # slots of rejected drafts (and the width's padding)
        gen += [*draft[:a], best[a]]
        slot, pos = slot + a + 1, pos + a + 1
    step.rewind(slot)
    return gen, slot, None


PREFIX_CACHE_SIZE = 4  # prompt prefixes `generate` keeps per cache (a template's, and a few longer ones)


@torch.inference_mode()
def generate(lm, seqs: list[list[int]], max_new: int, stop: list[int], pad: int, linears=None,
             prefix_cache: dict | None = None) -> list[list[int]]:
    """Greedy continuations of token sequences, batched, as `lm.generate(do_sample=False)` gives
    them (each row cut after its first stop id).

    The prefix all rows share (a chat template and system prompt) is run once (batch 1) and,
    given `prefix_cache` (a dict kept by the caller for the same weights), kept across calls;
    then `prefill` and `decode` over a preallocated cache. On the CPU, given `linears`
    (`block_linears` of these weights), the compact `StaticDecoder` runs the steps.
    """
    n = common_prefix_len(seqs) if len(seqs) > 1 else 0
    kv = None
    if prefix_cache is not None and n:  # the longest cached prefix of this one
        key = tuple(seqs[0][:n])
        for cached in sorted(prefix_cache, key=len, reverse=True):
            if len(cached) <= n and key[: len(cached)] == cached:
                kv = prefix_cache[cached]
                if len(cached) < n:
                    kv = prefix_kv(lm, list(key[len(cached) :]), past=kv)
                break
        if kv is None:
            kv = prefix_kv(lm, list(key))
            while len(prefix_cache) >= PREFIX_CACHE_SIZE:  # bounded: a batch whose rows share more than
                prefix_cache.pop(next(iter(prefix_cache)))  # the template adds a key; drop the oldest
            prefix_cache[key] = kv
    elif n:
        kv = prefix_kv(lm, seqs[0][:n])
    length = n + max(len(x) - n for x in seqs) + max_new
    step = GreedyStep(lm, len(seqs), length, graph=False, linears=linears)
    logits, pos, w = prefill(step, n, kv, seqs, pad)
    return decode(step, greedy_ids(logits), pos, n + w, max_new, stop, pad)
