"""Training step speed on this machine: stage 1 (cold start) and stage 2 (RL) steps of the real
trainers' computation, steps/s, tokens/s, and FLOP/s against the bound.

    .venv/bin/python benchmarks/train.py [--batch 16] [--steps 3] [--threads 2] [--lora-r 16] [--rl-steps 2]
    python3 benchmarks/train.py --shape qwen2.5-0.5b --device cuda --tokenizer DIR   (GPU; benchmarks/gpu.sh)

`--shape` replaces the model with random weights of a published shape (`_common.SHAPES`: Qwen2.5
0.5B or 3B, or a tiny one that rehearses the GPU run on the CPU), on `--device`.

Stage 1, one step (`lrem.train.sft.collate` + `lrem.losses.LREMLoss`, L = 0.1 L_SFT + 1.0
L_InfoNCE, backward, AdamW), timed side by side: with the batch's shared prompt prefix run once
(the default, `share_prefix=True`), with every row run in full (`share_prefix=False`), under
bfloat16 autocast (what the trainers run where the CPU computes bfloat16 natively, `bf16: null`:
float32 weights and optimizer, bfloat16 matmuls), and under LoRA (`lora_r`, `lrem.train.lora`;
`--lora-r 0` skips it) in both precisions.

Stage 2 (`--rl-steps N`, 0 skips it), one GRPO step as `lrem train rl` runs it: `sample_cots`
(`--rl-queries` x G=8 rollouts of up to 24 tokens), `collate_rollouts`, the policy pass
(`GRPOLoss`), rank rewards among the batch items, the loss, backward, AdamW; timed as sampling
and update, in float32 and bfloat16 autocast, full and LoRA.

FLOPs: 6 x non-embedding params x tokens run (padding included) + 6 x LM-head params x CE
positions (forward 2, backward 4; attention scores ignored); under LoRA 4 x, as the frozen
matrices get no weight gradient (the adapters' own FLOPs ignored; the tied head's rows train,
so its gradient is still computed whole). The bound is the float32 matmul's, also for the
bfloat16 rows (so they can exceed 1).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import resource
import time
import traceback

import torch

from _common import QUERIES, SHAPES, machine, matmul_gflops, seconds, setup, shaped_model, sync, table, write
from lrem.losses import IGNORE, LREMLoss
from lrem.model import shared_prefix_len
from lrem.losses import GRPOLoss
from lrem.train import RLConfig, SFTConfig
from lrem.train.grpo import collate_rollouts, score_rollouts
from lrem.train.lora import add_lora, trainable_parameters
from lrem.train.pairs import Pair
from lrem.train.sft import collate

COTS = ["corkscrew, wine opener, bottle opener", "wool socks, slippers, foot warmer", "coffee, espresso, energy drink",
        "moisturizer, face cream, drugstore skincare", "toddler clothes, 18-24 months, boys t-shirt",
        "loose fit dress, shift dress, empire waist", "spatula, pancake turner, silicone", "wide toe box, arch support"]
TITLES = ["waiter's corkscrew with foil cutter", "merino wool hiking socks", "dark roast espresso beans 1kg",
          "hydrating night cream 50ml", "boys cotton t-shirt 2T", "linen shift dress beige", "silicone spatula set",
          "stability running shoe wide"]


def make_batch(model, b: int) -> dict:
    pairs = [Pair(f"q{i}", QUERIES[i % len(QUERIES)], f"d{i}", f"{TITLES[i % len(TITLES)]} #{i}", COTS[i % len(COTS)])
             for i in range(b)]
    return {k: v.to(model.device) for k, v in collate(model, pairs).items()}


def load(args):
    """The trained model: the built-in `--model`, or random weights of `--shape` on `--device`, in float32."""
    from lrem.model import LREM

    if args.shape:
        return shaped_model(args.shape, args.device, torch.float32, args.tokenizer)
    return LREM.from_pretrained(args.model, dtype="float32", device=args.device, log=lambda *a: None)


def run_tokens(ids: torch.Tensor, mask: torch.Tensor, share: bool) -> int:
    """Token positions the decoder runs: the shared prefix once, then every row's rest."""
    if not share:
        return ids.numel()
    p = shared_prefix_len(ids, mask)
    return p + ids.shape[0] * (ids.shape[1] - p)


def precision(bf16: bool, device: torch.device):
    """The trainers' autocast (Accelerate's `mixed_precision="bf16"` is this), or none."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def train_step(loss_fn, opt, batch: dict, bf16: bool = False) -> dict:
    with precision(bf16, batch["q_ids"].device):
        parts = loss_fn(batch)
    loss = sum(loss_fn.weights[k] * v for k, v in parts.items())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {"loss": loss.item(), **{k: v.item() for k, v in parts.items()}}


def rl_step(model, loss_fn, opt, pairs: list[Pair], cfg: RLConfig, step: int, bf16: bool) -> dict:
    """One GRPO step as `lrem.train.grpo.train_rl` runs it (num_iterations 1, ranks among the batch
    items): seconds sampling, seconds for the rest, rollout tokens, loss."""
    sync()
    t0 = time.perf_counter()
    model.lm.eval()
    gen = torch.Generator(model.device).manual_seed(step)
    rows = model.sample_cots([p.query for p in pairs], cfg.num_generations, cfg.sampling_temperature, cfg.top_p,
                             cfg.rollout_max_tokens, generator=gen)
    model.lm.train()
    batch = collate_rollouts(model, pairs, rows, cfg)
    tensors = {k: v.to(model.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    sync()
    t1 = time.perf_counter()
    with precision(bf16, model.device):
        pol = loss_fn(tensors)
    scored = score_rollouts(batch, pol["q"], pol["d"], cfg)
    parts, _ = loss_fn.loss(pol, tensors, scored["advantages"].to(model.device), pol["logp"].detach())
    loss = sum(loss_fn.weights[k] * v for k, v in parts.items())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    return {"sample_s": t1 - t0, "update_s": time.perf_counter() - t1, "tokens run": int(tensors["mask"].sum()),
            "cot tokens": sum(batch["cot_tokens"]), "loss": loss.item()}


def guarded(rows: list[dict], name: str, fn, model, progress) -> None:
    """rows += fn() (one setting's row, with the GPU memory it peaked at), then `progress()` (a run
    cut short keeps the rows so far). Where the setting fails (a GPU run's LoRA, or memory), a row
    that says why instead, its gradients dropped, and the next setting runs: keep what a rare run gives."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        rows.append(fn())
    except Exception as e:  # noqa: BLE001 (any failure of one setting; the traceback is printed)
        traceback.print_exc()
        rows.append({"path": name, "error": f"{type(e).__name__}: {e}"[:400]})
        model.lm.zero_grad(set_to_none=True)
    if cuda:  # after the except block: its traceback held the failed setting's activations
        torch.cuda.empty_cache()
        rows[-1]["peak GPU GB"] = torch.cuda.max_memory_allocated() / 2**30
    progress()


def ratios_to(rows: list[dict], base: str) -> dict[str, float]:
    """Each timed row's speed as a multiple of row `base`'s ({} where `base` failed)."""
    step = {r["path"]: r["s/step"] for r in rows if "s/step" in r}
    return {name: step[base] / s for name, s in step.items()} if base in step else {}


def bench_stage1(args, rows: list[dict], progress) -> dict:
    """Stage-1 rows, added to `rows` (shared prefix, plain, bfloat16 autocast, then LoRA in both
    precisions); returns the counts behind their FLOPs. The model is freed on return."""
    model = load(args)
    model.lm.train()
    opt = torch.optim.AdamW(model.lm.parameters(), lr=1e-5)
    batch = make_batch(model, args.batch)
    params = (sum(p.numel() for p in model.lm.get_decoder().parameters())
              - model.lm.get_input_embeddings().weight.numel())
    head = model.lm.get_output_embeddings().weight.numel()
    real_tokens = int(batch["q_mask"].sum() + batch["d_mask"].sum())
    ce_positions = int((batch["sft_tgt"] != IGNORE).sum())
    info = {"bound GFLOP/s": matmul_gflops(torch.float32, device=args.device), "real_tokens_per_step": real_tokens,
            "ce_positions": ce_positions, "step_seconds": {}, "losses": {}}
    losses, times, bound = info["losses"], info["step_seconds"], info["bound GFLOP/s"]
    settings = [(True, 0, False), (False, 0, False), (True, 0, True)]
    settings += [(True, args.lora_r, False), (True, args.lora_r, True)] if args.lora_r else []
    for share, lora_r, bf16 in settings:
        name = (("shared prefix" if share else "plain") + (", bf16 autocast" if bf16 else "")
                + (f", LoRA r={lora_r}" if lora_r else ""))

        def row(name=name, share=share, lora_r=lora_r, bf16=bf16) -> dict:
            nonlocal opt
            if lora_r and model.engine.plain_layers():  # the LoRA settings come last: adapters go in in place
                add_lora(model, SFTConfig(lora_r=lora_r))
                opt = torch.optim.AdamW(trainable_parameters(model.lm), lr=1e-5)  # as the trainer: adapters and rows
            loss_fn = LREMLoss(model, 0.1, 1.0, 0.05, share_prefix=share)
            losses[name] = [train_step(loss_fn, opt, batch, bf16)]  # warm-up
            times[name] = [seconds(lambda: losses[name].append(train_step(loss_fn, opt, batch, bf16)))
                           for _ in range(args.steps)]
            step_s = sorted(times[name])[len(times[name]) // 2]
            ran = (run_tokens(batch["q_ids"], batch["q_mask"], share)
                   + run_tokens(batch["d_ids"], batch["d_mask"], share))
            flops = (4 if lora_r else 6) * params * ran + 6 * head * ce_positions
            return {"path": name, "batch": args.batch, "query tokens/seq": batch["q_ids"].shape[1],
                    "item tokens/seq": batch["d_ids"].shape[1], "tokens run": ran, "s/step": step_s,
                    "steps/s": 1 / step_s, "tokens/s": real_tokens / step_s, "GFLOP/s": flops / step_s / 1e9,
                    "of bound": flops / step_s / 1e9 / bound}

        guarded(rows, name, row, model, progress)
    return info


def bench_rl(args, lora_r: int, rows: list[dict], progress) -> None:
    """RL rows, added to `rows`: float32 and bfloat16 autocast, full fine-tuning then LoRA (`lora_r`; 0: none)."""
    cfg = RLConfig(lora_r=lora_r)
    pairs = [Pair(f"q{i}", QUERIES[i % len(QUERIES)], f"d{i}", f"{TITLES[i % len(TITLES)]} #{i}", "")
             for i in range(args.rl_queries)]
    model = load(args)
    model.config.cot_max_tokens = 16
    opt = torch.optim.AdamW(model.lm.parameters(), lr=1e-6)
    for lora, bf16 in ((False, False), (False, True)) + (((True, False), (True, True)) if lora_r else ()):
        name = "RL " + ("bf16 autocast" if bf16 else "float32") + (f", LoRA r={lora_r}" if lora else "")

        def row(name=name, lora=lora, bf16=bf16) -> dict:
            nonlocal opt
            if lora and model.engine.plain_layers():
                add_lora(model, cfg)
                opt = torch.optim.AdamW(trainable_parameters(model.lm), lr=1e-6)
            loss_fn = GRPOLoss(model, cfg.grpo_weight, cfg.infonce_weight, cfg.temperature, cfg.clip_eps)
            rl_step(model, loss_fn, opt, pairs, cfg, 0, bf16)  # warm-up
            runs = [rl_step(model, loss_fn, opt, pairs, cfg, s + 1, bf16) for s in range(args.rl_steps)]
            mid = sorted(runs, key=lambda r: r["sample_s"] + r["update_s"])[len(runs) // 2]
            return {"path": name, "queries x G": f"{args.rl_queries} x {cfg.num_generations}",
                    "s/step": mid["sample_s"] + mid["update_s"], "sampling s": mid["sample_s"],
                    "update s": mid["update_s"], "tokens run": mid["tokens run"], "cot tokens": mid["cot tokens"],
                    "runs": runs}

        guarded(rows, name, row, model, progress)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per setting (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--lora-r", type=int, default=16, help="LoRA rank of the LoRA rows (0: none)")
    ap.add_argument("--rl-steps", type=int, default=2, help="timed RL steps per setting (0: no RL rows)")
    ap.add_argument("--rl-queries", type=int, default=8, help="queries per RL step (G=8 rollouts each)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None,
                    help="random weights of this shape in place of --model (_common.SHAPES)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokenizer", default=None, help="--shape's tokenizer folder (default: SmolLM2's)")
    ap.add_argument("--name", default="train", help="results file: benchmarks/results/NAME.json")
    args = ap.parse_args()
    if args.rl_steps and args.rl_queries < 2:  # else every RL row fails after minutes of stage-1 steps
        ap.error("--rl-queries must be at least 2: the RL reward ranks each query's item among the batch's items")
    setup(args.threads)

    t0 = time.perf_counter()
    out = {"machine": machine(), "model": f"{args.shape}-shaped (random weights)" if args.shape else args.model,
           "device": args.device, "dtype": "float32 weights; rows say the autocast", "lora_r": args.lora_r,
           "rows": [], "rl_rows": []}

    def save(rl: str) -> None:  # after every row: a run cut short (a GPU call's time limit) keeps the rows so far
        out.update(rl=rl, speedups=ratios_to(out["rows"], "shared prefix"),
                   rl_speedups=ratios_to(out["rl_rows"], "RL float32"),
                   **{"peak RSS GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "wall_seconds": round(time.perf_counter() - t0, 1)})
        plain = ratios_to(out["rows"], "plain")  # the shared-prefix step's speed in plain steps
        out["speedup_shared_prefix"] = plain.get("shared prefix")
        out["speedup_lora"] = out["speedups"].get(f"shared prefix, LoRA r={args.lora_r}")
        write(args.name, out)

    out.update(bench_stage1(args, out["rows"], lambda: save("not yet run")))
    rows = out["rows"]
    save("not run (--rl-steps 0)" if not args.rl_steps else "running")
    print(table(rows, list(dict.fromkeys(k for r in rows for k in r))))
    print(f"shared prefix / plain: {out['speedup_shared_prefix'] or float('nan'):.2f}x faster per step; "
          f"FLOP bound {out['bound GFLOP/s']:.1f} GFLOP/s")
    for name, r in out["speedups"].items():
        print(f"  {name}: {r:.2f}x the float32 shared-prefix step")
    if not args.rl_steps:
        return
    gc.collect()  # stage 1's model, optimizer and LoRA copy are unreferenced now: their memory goes back
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    rl_rows = out["rl_rows"]
    bench_rl(args, args.lora_r, rl_rows, lambda: save("running"))
    save("done")
    print(table([{k: v for k, v in r.items() if k != "runs"} for r in rl_rows],
                list(dict.fromkeys(k for r in rl_rows for k in r if k != "runs"))))
    for name, r in out["rl_speedups"].items():
        print(f"  {name}: {r:.2f}x the float32 RL step")


if __name__ == "__main__":
    main()
