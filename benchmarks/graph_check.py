"""The CUDA graphs of `lrem.decoding.GreedyStep` against the same step run eagerly: one random
Qwen2 (float32, large weights so greedy tokens vary with the input), a padded prefill, greedy
decoding, closing tokens in place (`extend`), twice, so every graph also replays after the others.
Prints the widths captured and the largest differences; exits 1 on a mismatch or a width missing.

    python benchmarks/graph_check.py            # on a GPU (`benchmarks/gpu.sh` runs it first)
    python benchmarks/graph_check.py --device cpu   # the same steps eagerly: a rehearsal

bfloat16 near-ties (random weights) hide a wrong replay in the latency benchmark's "same CoTs"
check; float32 on both sides leaves only kernel-order rounding.
"""
from __future__ import annotations

import argparse
import sys
import warnings

import torch

from lrem.decoding import GreedyStep, chain_decode, decode, prefill

WIDTHS = (4, 8, 16, 32, 64)
N_PREFIX, LENGTH, LAYERS, KV_HEADS, HEAD_DIM = 7, 192, 4, 2, 32


def tiny_qwen2(device: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=512, hidden_size=KV_HEADS * 4 * HEAD_DIM, intermediate_size=512,
                      num_hidden_layers=LAYERS, num_attention_heads=KV_HEADS * 4, num_key_value_heads=KV_HEADS,
                      max_position_embeddings=1024)
    lm = Qwen2ForCausalLM(cfg).to(device).eval()
    with torch.no_grad():
        for p in lm.parameters():
            p.mul_(8)
    return lm


def run(step: GreedyStep, kv, seqs: list[list[int]], closing: torch.Tensor, stop: list[int], lag: int = 0):
    """(prefill logits, greedy ids per row, hidden states of `closing` after them)."""
    dev = closing.device
    logits, last, w = prefill(step, N_PREFIX, kv, seqs, pad=0)
    gen = decode(step, logits.argmax(-1), last, N_PREFIX + w, 12, stop=stop, pad=0, lag=lag)
    used = N_PREFIX + w + max(map(len, gen)) - 1
    if step.filled() != used:
        raise AssertionError(f"the static cache holds {step.filled()} slots, {used} expected")
    pos = last[:, None] + 13 + torch.arange(closing.shape[1], device=dev)
    return logits, gen, step.extend(closing, pos, torch.ones_like(closing), used)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev, cuda = args.device, args.device.startswith("cuda")
    lm = tiny_qwen2(dev)
    g = torch.Generator().manual_seed(1)
    kv = [(torch.randn(1, KV_HEADS, N_PREFIX, HEAD_DIM, generator=g).to(dev),
           torch.randn(1, KV_HEADS, N_PREFIX, HEAD_DIM, generator=g).to(dev)) for _ in range(LAYERS)]
    seqs = [[1] * N_PREFIX + torch.randint(2, 512, (k,), generator=g).tolist() for k in (5, 11, 9)]
    bad = 0
    with torch.inference_mode(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graphed = GreedyStep(lm, len(seqs), LENGTH, graph=cuda, widths=WIDTHS)
        eager = GreedyStep(lm, len(seqs), LENGTH, graph=False, widths=WIDTHS)
        repeated = GreedyStep(lm, len(seqs), LENGTH, graph=False, widths=WIDTHS, fold=False)  # transformers' SDPA
        print(f"device {dev}: widths captured {sorted(graphed.wide)}, decode step captured {graphed.graph is not None}"
              + "".join(f"\nwarning: {str(w.message)[:200]}" for w in caught))
        stop = [511]  # never picked here: the first pass decodes 12 tokens
        for rep in range(2):
            closing = torch.randint(2, 512, (len(seqs), 3), generator=g).to(dev)
            # the graphed step reads the stops a step late (`decode`'s lag, as the engine does on
            # CUDA); where every row stops early (the second pass), the extra step is set back
            (lg, gg, hg), (le, ge, he) = run(graphed, kv, seqs, closing, stop, lag=1), run(eager, kv, seqs, closing, stop)
            d_logits, d_hidden = (lg - le).abs().max().item(), (hg - he).abs().max().item()
            ok = gg == ge and d_logits < 1e-3 and d_hidden < 1e-3
            print(f"pass {rep + 1}: prefill logits differ by {d_logits:.2e}, same tokens {gg == ge} "
                  f"(longest {max(map(len, ge))}), closing hidden states differ by {d_hidden:.2e}: {'ok' if ok else 'MISMATCH'}")
            bad += not ok
            # the folded heads against keys and values repeated: other SDPA kernels, so rounding
            # differs; relative to the largest value (the weights are scaled up)
            lr, gr, hr = run(repeated, kv, seqs, closing, stop)
            r_logits = ((le - lr).abs().max() / lr.abs().max()).item()
            r_hidden = ((he - hr).abs().max() / hr.abs().max()).item()
            ok = ge == gr and r_logits < 1e-4 and r_hidden < 1e-4
            print(f"pass {rep + 1}, heads folded vs keys and values repeated: relative differences logits "
                  f"{r_logits:.1e}, closing hidden states {r_hidden:.1e}, same tokens {ge == gr}: "
                  f"{'ok' if ok else 'MISMATCH'}")
            bad += not ok
            stop = sorted({row[min(3, len(row) - 1)] for row in ge})  # the next pass: every row stops by its 4th token
        # one query drafting in chains (`chain_decode`, the engine's batch-1 path on a GPU) on a
        # captured step, against the eager step one token at a time; its drafts come from `past`
        # holding that CoT, so whole chains are taken and the captured widths replay in place
        single, ref_step = GreedyStep(lm, 1, LENGTH, graph=cuda, widths=WIDTHS), GreedyStep(lm, 1, LENGTH, graph=False)
        logits, last, w = prefill(ref_step, N_PREFIX, kv, seqs[:1], pad=0)
        ref = decode(ref_step, logits.argmax(-1), last, N_PREFIX + w, 12, stop=[511], pad=0)[0]
        logits, last, w = prefill(single, N_PREFIX, kv, seqs[:1], pad=0)
        gen, used, _ = chain_decode(single, seqs[0], int(logits.argmax(-1)[0]), N_PREFIX + w, int(last[0]) + 1, 12,
                                    [511], 4, past=seqs[0][-3:] + ref)
        ok = gen == ref and single.filled() == used
        print(f"one query in chains: same tokens {gen == ref}, cache filled to {single.filled()} of {used} "
              f"slots: {'ok' if ok else 'MISMATCH'}")
        bad += not ok
    missing = cuda and (sorted(graphed.wide) != list(WIDTHS) or graphed.graph is None)
    if cuda:
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    if missing:
        print("a graph was not captured: that forward ran eagerly")
    return 1 if bad or missing else 0


if __name__ == "__main__":
    sys.exit(main())
