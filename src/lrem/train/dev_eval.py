"""Dev quality during training: hitrate@10 and nDCG@10 on a small fixed sample of a dataset
split, every `eval_steps` steps, so that a run's quality can be followed in TensorBoard without
stopping it.

The sample is `lrem.data.sample_dataset`'s (seeded: the same queries and items at every step and
across resumes): `eval_queries` queries of `eval_split`, their judged items and `eval_distractors`
other catalog items. Its items are re-embedded at every evaluation (the weights changed).
"""
from __future__ import annotations

import torch

from .._defaults import QUERY_BATCH


class DevEval:
    """`dev(model)` -> {"hitrate@10": ..., "ndcg@10": ...} on the fixed sample.

    Args:
        dataset: a loaded `lrem.data.Dataset`.
        split: the split the queries come from (e.g. "dev").
        n_queries, n_distractors, seed: the sample (see `lrem.data.sample_dataset`).
        mode: the query mode, "reason" or "direct".
    """

    def __init__(self, dataset, split: str, n_queries: int, n_distractors: int, seed: int, mode: str,
                 batch_size: int = QUERY_BATCH):
        from ..data import sample_dataset

        judged = {q: qr for q, qr in dataset.qrels.items() if any(r > 0 for r in qr.values())}
        pool = type(dataset)(dataset.catalog, {q: v for q, v in dataset.split_queries(split).items() if q in judged},
                             dataset.qrels, dataset.name)
        sample = sample_dataset(pool, n_queries, None, n_distractors, seed)
        if not sample.queries:
            raise ValueError(f"eval_steps: {dataset.name} has no judged {split!r} queries to evaluate on")
        self.queries = {q: v.text for q, v in sample.queries.items()}
        self.titles = dict(sample.catalog)  # the items themselves: the item template may name other fields
        self.qrels = sample.qrels
        self.mode, self.batch_size = mode, batch_size

    def __repr__(self) -> str:
        return f"DevEval({len(self.queries)} queries, {len(self.titles)} items, mode {self.mode})"

    def __call__(self, model) -> dict[str, float]:
        from ..evaluate import evaluate, run_system
        from ..index import ItemIndex
        from ..search import Searcher

        training = model.lm.training
        model.lm.eval()
        try:
            with torch.no_grad():
                index = ItemIndex.build(model, self.titles, batch_size=self.batch_size, show_progress=False)
                retriever = Searcher(model, index).retriever(self.mode)
                run, *_ = run_system(retriever, self.queries, k=10, batch_size=self.batch_size, desc="dev")
        finally:
            model.lm.train(training)
        m = evaluate(run, self.qrels, ks=(10,))
        return {"hitrate@10": m["hitrate@10"], "ndcg@10": m["ndcg@10"]}


def make_dev_eval(cfg, dataset, mode: str) -> DevEval | None:
    """The `DevEval` a config asks for (None when `eval_steps` is 0): on `cfg.eval_data` when set,
    else on `dataset` (the training run's --data)."""
    if not cfg.eval_steps:
        return None
    if cfg.eval_data:
        from ..data import load_dataset

        dataset = load_dataset(cfg.eval_data)
    if dataset is None:
        raise ValueError(f"eval_steps={cfg.eval_steps} needs a dataset: set eval_data "
                         "(or pass --data to lrem train coldstart|direct)")
    return DevEval(dataset, cfg.eval_split, cfg.eval_queries, cfg.eval_distractors, cfg.seed, mode)


def log_dev(dev: DevEval, model, step: int, writer, bar) -> dict:
    """Score `model` on the dev sample at `step`: to TensorBoard (`dev/...`, main process's writer)
    and one line under the progress bar; returns {"step", metric: value} for the train state."""
    out = {"step": step, **dev(model)}
    for k, v in out.items():
        if k != "step" and writer is not None:
            writer.add_scalar(f"dev/{k}", v, step)
    bar.write(f"step {step}: dev " + ", ".join(f"{k} {v:.4f}" for k, v in out.items() if k != "step"))
    return out
