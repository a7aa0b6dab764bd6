"""Probe (docs/results/2026-11-28-compile-probe): a whole 135M decode forward (30 layers + norm) in eager vs torch.compile (CPU inductor),
bf16, fixed KV length, batch 1 (T=1, T=15) and batch 32 (T=1)."""
import time, torch, torch.nn.functional as F
torch.set_num_threads(2)
from lrem.model import LREM
m = LREM.from_pretrained("lrem-wordnet-135m")
lm = m.lm
dec = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
cfg = lm.config
H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
hd = cfg.hidden_size // H
layers = []
for L in dec.layers:
    a, mlp = L.self_attn, L.mlp
    layers.append(dict(n1=L.input_layernorm.weight.detach(), n2=L.post_attention_layernorm.weight.detach(),
                       qkv=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach(),
                       o=a.o_proj.weight.detach(), gu=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(),
                       d=mlp.down_proj.weight.detach()))
normw = dec.norm.weight.detach()
eps = cfg.rms_norm_eps
dt = normw.dtype
print("dtype", dt, "layers", len(layers), "H", H, "KV", KV, "hd", hd)

def forward(h, kcs, vcs, cos, sin, bias):
    b, t, _ = h.shape
    g = H // KV
    for w, kc, vc in zip(layers, kcs, vcs):
        x = F.rms_norm(h, h.shape[-1:], w["n1"], eps)
        qkv = F.linear(x, w["qkv"])
        q, k, v = qkv.split([H * hd, KV * hd, KV * hd], -1)
        q = q.view(b, t, H, hd).transpose(1, 2); k = k.view(b, t, KV, hd).transpose(1, 2); v = v.view(b, t, KV, hd).transpose(1, 2)
        q = q * cos + q.roll(hd // 2, -1) * sin
        k = k * cos + k.roll(hd // 2, -1) * sin
        kf = torch.cat([kc, k], 2); vf = torch.cat([vc, v], 2)
        o = F.scaled_dot_product_attention(q.reshape(b, KV, g * t, hd), kf, vf, attn_mask=bias).view(b, H, t, hd)
        h = h + F.linear(o.transpose(1, 2).reshape(b, t, -1), w["o"])
        x = F.rms_norm(h, h.shape[-1:], w["n2"], eps)
        gate, up = F.linear(x, w["gu"]).chunk(2, -1)
        h = h + F.linear(F.silu(gate) * up, w["d"])
    return F.rms_norm(h, h.shape[-1:], normw, eps)

def bench(fn, args, n=20):
    with torch.no_grad():
        for _ in range(3): fn(*args)
        t = time.perf_counter()
        for _ in range(n): fn(*args)
    return (time.perf_counter() - t) / n * 1000

import torch._inductor.config as ic
ic.freezing = True
comp = torch.compile(forward)
for b, t in [(1, 1), (1, 15), (32, 1)]:
    Lc = 90
    h = torch.randn(b, t, cfg.hidden_size, dtype=dt)
    kcs = [torch.randn(b, KV, Lc, hd, dtype=dt) for _ in layers]; vcs = [torch.randn(b, KV, Lc, hd, dtype=dt) for _ in layers]
    cos = torch.randn(b, 1, t, hd, dtype=dt); sin = torch.randn(b, 1, t, hd, dtype=dt)
    bias = torch.zeros(b, 1, (H // KV) * t, Lc + t, dtype=dt)
    args = (h, kcs, vcs, cos, sin, bias)
    e = bench(forward, args)
    t0 = time.perf_counter(); 
    with torch.no_grad(): comp(*args)
    ct = time.perf_counter() - t0
    c = bench(comp, args)
    with torch.no_grad():
        diff = (comp(*args).float() - forward(*args).float()).abs().max().item()
    print(f"b={b} t={t}: eager {e:.1f} ms, compiled {c:.1f} ms ({e/c:.2f}x; first call {ct:.1f} s), max diff {diff:.3g}", flush=True)
