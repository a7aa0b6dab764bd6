"""A catalog update against a full rebuild: `ItemIndex.updated` embeds only new and changed items.

    .venv/bin/python benchmarks/update.py [--items 2000] [--changed 0.01] [--model lrem-wordnet-135m-direct]

Side by side in one run, on the same `--items` product-like titles (`encode.titles`): a fresh
`ItemIndex.build`, and `updated` after `--changed` of the items were retitled, as many added and
as many removed (each of the three a share `--changed` of the catalog). Both results are
checked to hold the same items and vectors. Writes benchmarks/results/update.json.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from _common import name_arg, setup, table, write
from encode import titles


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--changed", type=float, default=0.01, help="share of the catalog retitled, added and removed")
    ap.add_argument("--model", default="lrem-wordnet-135m-direct")
    ap.add_argument("--factory", default="Flat")
    ap.add_argument("--threads", type=int, default=None)
    name_arg(ap, "update")
    args = ap.parse_args()
    setup(args.threads)

    from lrem.index import ItemIndex, stored_vectors
    from lrem.model import LREM

    model = LREM.from_pretrained(args.model, dtype="float32", log=lambda *a: None)
    names = titles(args.items + args.items // 10 + 1)
    old = {f"i{j}": t for j, t in enumerate(names[: args.items])}
    n = max(1, round(args.changed * args.items))
    new = {k: v for k, v in list(old.items())[n:]}  # the first n removed
    for j, k in enumerate(list(new)[:n]):  # the next n retitled
        new[k] = f"{new[k]} (new edition {j})"
    new.update({f"n{j}": names[args.items + j] for j in range(n)})  # n added

    index = ItemIndex.build(model, old, factory=args.factory, show_progress=True)
    t0 = time.perf_counter()
    fresh = ItemIndex.build(model, new, factory=args.factory, show_progress=True)
    full_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    updated, counts = index.updated(model, new, show_progress=True)
    update_s = time.perf_counter() - t0
    assert updated.item_ids == fresh.item_ids
    diff = float(np.abs(stored_vectors(updated.index) - stored_vectors(fresh.index)).max())
    rows = [{"way": "full rebuild", "items embedded": len(new), "seconds": round(full_s, 2), "speedup": 1.0},
            {"way": "update", "items embedded": counts["added"] + counts["changed"], "seconds": round(update_s, 2),
             "speedup": round(full_s / update_s, 1)}]
    print(table(rows, ["way", "items embedded", "seconds", "speedup"]))
    print(f"counts {counts}; largest vector difference to the rebuild {diff:.2e}")
    write(args.name, {"args": vars(args), "counts": counts, "max_abs_vector_diff": diff, "rows": rows})


if __name__ == "__main__":
    main()
