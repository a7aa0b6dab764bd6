"""`lrem train coldstart|direct|rl` (Accelerate; torchrun -m lrem.cli for several processes),
`lrem router fit` (when `auto` mode reasons) and `lrem ground` (candidates for grounded training)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lrem._defaults import QUERY_BATCH, ROUTER_HOLDOUT, ROUTER_K, ROUTER_L2, ROUTER_THRESHOLD
from lrem.cli.options import BatchSize, DataDir, Out, Overwrite, Threads, check_output, echo_err


def _positive(value: Optional[float]) -> Optional[float]:
    if value is not None and not value > 0:  # also catches nan
        raise typer.BadParameter(f"{value} is not > 0")
    return value


TrainConfig = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML file of SFTConfig values "
                                                     "(configs/coldstart.yaml, configs/direct.yaml).")]
TrainData = Annotated[Optional[Path], typer.Option("--data", "-d", help="Dataset folder: adds the split's qrels pairs "
                                                   "of queries without a CoT, and checks triplet ids.")]
Model = Annotated[Optional[str], typer.Option(help="Base model (default: the config's).")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint in OUT/checkpoints.")]
Steps = Annotated[Optional[int], typer.Option(min=1, help="Stop after N steps (default: num_epochs over the data).")]
CotShare = Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Share of each batch with a teacher CoT "
                                                   "(0: no mixing); give cold start and direct the same value.")]
TrainBatch = Annotated[Optional[int], typer.Option(min=1)]
SaveSteps = Annotated[Optional[int], typer.Option(min=0, help="Checkpoint every N steps (0: only at the end).")]
LoraRank = Annotated[Optional[int], typer.Option(min=0, help="> 0: train LoRA adapters of this rank and the new "
                                                 "tokens' rows, the rest frozen (saved merged); 0: every weight.")]


LearningRate = Annotated[Optional[float], typer.Option(callback=_positive, help="Peak learning rate (> 0).")]


def _train(config, out, triplets, data, split, resume, use_cot, overwrite=False, **flags) -> None:
    from lrem.data import load_dataset
    from lrem.train import SFTConfig, train

    check_output(out, config, triplets, data, overwrite=overwrite, resume=resume, run_files=("checkpoints",) if resume else ())

    defaults = {} if config else ({} if use_cot else {"use_cot": False, "sft_weight": 0.0})
    cfg = SFTConfig.load(config, **{**defaults, **flags})
    if cfg.use_cot != use_cot:
        raise ValueError(f"{config}: use_cot={cfg.use_cot}; `lrem train {'coldstart' if use_cot else 'direct'}` "
                         f"needs use_cot={use_cot}")
    train(cfg, out, triplets=triplets, dataset=load_dataset(data) if data else None, split=split, resume=resume,
          overwrite=overwrite, log=echo_err)


def train_coldstart(
    out: Out,
    triplets: Annotated[Optional[Path], typer.Option(help="triplets.jsonl from `lrem construct`.")] = None,
    config: TrainConfig = None, data: TrainData = None, split: str = "train", model: Model = None,
    max_steps: Steps = None, batch_size: TrainBatch = None, learning_rate: LearningRate = None,
    save_steps: SaveSteps = None, seed: Optional[int] = None, cot_share: CotShare = None, lora_r: LoraRank = None,
    resume: Resume = False, overwrite: Overwrite = False,
):
    """Stage 1: L = 0.1 L_SFT (teacher CoT) + 1.0 L_InfoNCE (in-batch negatives)."""
    _train(config, out, triplets, data, split, resume, True, overwrite, model=model, max_steps=max_steps,
           batch_size=batch_size, learning_rate=learning_rate, save_steps=save_steps, seed=seed, cot_share=cot_share,
           lora_r=lora_r)


def train_direct(
    out: Out,
    pairs: Annotated[Optional[Path], typer.Option(help="A triplets.jsonl (its CoTs are ignored).")] = None,
    config: TrainConfig = None, data: TrainData = None, split: str = "train", model: Model = None,
    max_steps: Steps = None, batch_size: TrainBatch = None, learning_rate: LearningRate = None,
    save_steps: SaveSteps = None, seed: Optional[int] = None, cot_share: CotShare = None, lora_r: LoraRank = None,
    resume: Resume = False, overwrite: Overwrite = False,
):
    """The direct-embedding baseline: InfoNCE only, `<think></think><emb>`, same pairs and schedule."""
    _train(config, out, pairs, data, split, resume, False, overwrite, model=model, max_steps=max_steps,
           batch_size=batch_size, learning_rate=learning_rate, save_steps=save_steps, seed=seed, cot_share=cot_share,
           lora_r=lora_r)


def train_rl(
    out: Out,
    init: Annotated[Path, typer.Option(help="The stage-1 (cold start) model folder to start from.")],
    pairs: Annotated[Optional[Path], typer.Option(help="RL pairs (JSONL: query_id, query, item_id, item_title); "
                                                  "default INIT/rl_pairs.jsonl, held back by stage 1.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML of RLConfig values (configs/rl.yaml).")] = None,
    max_steps: Steps = None, batch_size: TrainBatch = None,
    num_generations: Annotated[Optional[int], typer.Option(min=1)] = None,
    rank_pool: Annotated[Optional[str], typer.Option(help="What r_acc ranks among: batch (paper), mined, catalog "
                                                     "(RLConfig.rank_pool; mined and catalog need --data).")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", "-d", help="Dataset folder: the item bank of the mined "
                                                 "and catalog rank pools (RLConfig.rank_data).")] = None,
    learning_rate: LearningRate = None, save_steps: SaveSteps = None, seed: Optional[int] = None,
    lora_r: LoraRank = None, resume: Resume = False, overwrite: Overwrite = False,
):
    """Stage 2: L = 1.0 L_GRPO (G sampled CoTs per query, rank reward) + 0.1 L_InfoNCE."""
    from lrem.train import RLConfig, train_rl as run

    check_output(out, init, pairs, config, overwrite=overwrite, resume=resume, run_files=("checkpoints",) if resume else ())
    cfg = RLConfig.load(config, max_steps=max_steps, batch_size=batch_size, num_generations=num_generations,
                        learning_rate=learning_rate, save_steps=save_steps, seed=seed, rank_pool=rank_pool,
                        rank_data=str(data) if data else None, lora_r=lora_r)
    run(cfg, init, out, pairs=pairs, resume=resume, overwrite=overwrite, log=echo_err)


def router_fit(
    index_dir: Annotated[Path, typer.Option("--index", "-i", help="Index folder from `lrem index`, over the dataset's "
                                            "catalog; its model is the one routed.")],
    data: DataDir,
    out: Annotated[Path, typer.Option("--out", "-o", help="The index's model folder (router.json is written into "
                                      "it, and loaded with the model from then on), or a file path ending in .json.")],
    split: Annotated[str, typer.Option(help="Split whose queries it learns from (not the one you evaluate "
                                       "on).")] = "train",
    queries: Annotated[int, typer.Option(min=10, help="A fixed, seeded sample of N queries with a relevant item; "
                                         "each is searched directly and with reasoning.")] = 400,
    k: Annotated[int, typer.Option("-k", min=1, help="Label depth: reasoning wins when it ranks the first relevant "
                                   "item higher within the top k (reciprocal rank; ties: direct).")] = ROUTER_K,
    holdout: Annotated[float, typer.Option(min=0.0, max=0.9, help="Share of the queries held out to measure "
                                           "it.")] = ROUTER_HOLDOUT,
    threshold: Annotated[float, typer.Option(min=0.0, max=1.0, help="Reason where P(reasoning wins) > "
                                             "this.")] = ROUTER_THRESHOLD,
    l2: Annotated[float, typer.Option(callback=_positive, help="L2 penalty on the weights (> 0; "
                                      "scikit-learn's 1/C).")] = ROUTER_L2,
    seed: int = 0,
    batch_size: BatchSize = QUERY_BATCH,
    threads: Threads = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a router file lrem wrote earlier.")] = False,
):
    """Learn when reasoning helps: search a split's queries directly and with reasoning, fit a logistic
    regression on the direct scores and the query (`lrem.router`), print its held-out accuracy, write it."""
    from lrem._threads import set_threads
    from lrem.data import load_dataset
    from lrem.index import ItemIndex
    from lrem.router import fit_router, judged_sample, router_target
    from lrem.search import Searcher

    index = ItemIndex.load(index_dir)  # no model yet: the output is checked before any work
    target = router_target(out, index.meta.get("model"), overwrite=overwrite)
    ds = load_dataset(data)
    if set(index.item_ids) != set(ds.catalog):
        raise ValueError(f"index {index_dir} was built on another catalog than {data}")
    sample = judged_sample(ds, split, queries, seed)
    set_threads(threads, log=echo_err)
    searcher = Searcher.load(index_dir, log=echo_err)
    router = fit_router(searcher, sample, ds.qrels, k=k, holdout=holdout, threshold=threshold, l2=l2, seed=seed,
                        batch_size=batch_size, data=f"{data}:{split}", show_progress=True, log=echo_err)
    router.save(target)
    f, h = router.fitted, router.fitted["heldout"]
    typer.echo(f"reasoning beat direct on {f['reason_won']} of {f['queries']} queries (rr@{k})")
    if h:
        typer.echo(f"held out {h['queries']}: accuracy {h['accuracy']:.3f} (majority {h['majority_accuracy']:.3f}), "
                   f"would reason on {100 * h['reasoned_share']:.0f}%; mrr@{k} direct {h['mrr_direct']:.4f}, "
                   f"reason {h['mrr_reason']:.4f}, routed {h['mrr_routed']:.4f}, oracle {h['mrr_oracle']:.4f}")
    typer.echo(f"wrote {target}")


def ground(
    out: Out,
    pairs: Annotated[Path, typer.Option(help="Training pairs: a triplets.jsonl (`lrem construct`) or any JSONL of "
                                        "query_id, query, item_id, item_title.")],
    index: Annotated[str, typer.Option("--index", "-i", help="Index folder of a frozen model, ideally one never "
                                       "trained on these queries (its direct search is the first stage).")],
    k: Annotated[int, typer.Option("-k", min=1, help="Titles per query (training shows its model's candidates_k "
                                   "of them).")] = 20,
    batch_size: BatchSize = QUERY_BATCH, threads: Threads = None, overwrite: Overwrite = False,
):
    """Mine first-stage candidates for grounded training: OUT/pairs.jsonl is PAIRS with each query's top-k titles."""
    import time

    from lrem._threads import set_threads
    from lrem.grounding import PAIRS_FILE, first_stage_recall, mine_candidates, write_grounded
    from lrem.search import Searcher
    from lrem.train.pairs import load_triplets

    check_output(out, pairs, index, overwrite=overwrite)
    set_threads(threads)
    rows = load_triplets(pairs)
    searcher = Searcher.load(index)
    t0 = time.perf_counter()
    mined = mine_candidates(searcher, rows, k, batch_size=batch_size, show_progress=True)
    stats = {"pairs": str(pairs), "index": index, "model": searcher.model.source, "k": k, "n_pairs": len(mined),
             "n_queries": len({p.query_id for p in mined}), "first_stage_recall": round(first_stage_recall(mined), 4),
             "seconds": round(time.perf_counter() - t0, 1)}
    write_grounded(out, mined, stats)
    echo_err(f"{stats['n_queries']} queries, {len(mined)} pairs; the item is among the top {k} for "
             f"{100 * stats['first_stage_recall']:.1f}% of pairs -> {out / PAIRS_FILE}")
