"""Dense pseudo-relevance feedback (Rocchio on embeddings): q' = normalize(q + a * sum_i w_i d_i) over the
first search's top k items d_i, uniform weights (mean) or a softmax of their scores at temperature 0.05 (soft).
Writes one TREC run per setting for `lrem eval -s NAME=run:FILE`. A measurement, not a feature: no setting
helped on WordNet dev (README.md here).

    python docs/results/2026-11-27-prf/prf.py --model lrem-wordnet-135m-direct --index runs/h/index-direct \
        --data runs/h/wordnet --split dev --limit 400 --out runs/prf
"""
import argparse
from pathlib import Path

import numpy as np

from lrem.data import load_dataset
from lrem.index import ItemIndex
from lrem.model import LREM
from lrem.router import judged_sample
from lrem.runfile import trec_run_lines

ap = argparse.ArgumentParser()
for a in ("--model", "--index", "--data", "--split", "--out"):
    ap.add_argument(a, required=True)
ap.add_argument("--limit", type=int, default=None, help="as lrem eval --limit; default: every judged query")
ap.add_argument("--mode", default="direct")
args = ap.parse_args()

queries = judged_sample(load_dataset(args.data), args.split, args.limit)  # the sample `lrem eval --limit` scores
qids = list(queries)
index = ItemIndex.load(args.index)
X = index.index.reconstruct_n(0, index.index.ntotal)  # (n, dim), unit rows
ids = np.array(index.item_ids)
q = np.asarray(LREM.from_pretrained(args.model).encode_queries([queries[i] for i in qids], mode=args.mode,
                                                                 show_progress=True).embeddings, np.float32)
S = q @ X.T
order = np.argsort(-S, axis=1)
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)


def write(name, qe):
    s = qe @ X.T
    top = np.argsort(-s, axis=1)[:, :100]
    run = {qid: [(ids[j], float(s[r, j])) for j in top[r]] for r, qid in enumerate(qids)}
    (out / f"{name}.trec").write_text("\n".join(trec_run_lines(name, run)) + "\n")


write("base", q)
for k in (1, 3, 5, 10, 20):
    for a in (0.25, 0.5, 1.0, 2.0):
        for how in ("mean", "soft"):
            top = order[:, :k]
            if how == "mean":
                fb = X[top].mean(1)
            else:
                z = np.take_along_axis(S, top, 1) / 0.05
                w = np.exp(z - z.max(1, keepdims=True))
                fb = (w[:, :, None] * X[top]).sum(1) / w.sum(1, keepdims=True)
            qn = q + a * fb
            write(f"prf-k{k}-a{a}-{how}", qn / np.linalg.norm(qn, axis=1, keepdims=True))
