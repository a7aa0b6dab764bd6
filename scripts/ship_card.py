"""Write the model card (README.md) of a shipped delta: the trained model's own card plus what a
user of the built-in name needs: data, teacher, steps, the dev table, limits.

    .venv/bin/python scripts/ship_card.py --delta src/lrem/models/lrem-wordnet-135m \
        --eval runs/t15/eval-dev/metrics.json --systems lrem-reason lrem-direct lrem-auto \
        --about "..." [--limits "..."]

The dev table is read from an `lrem eval` metrics.json (overall and hard/easy hitrate@10,
ndcg@10, ms/query of the named systems and of bm25 / minilm for reference).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from lrem.card import SHIPPED_HEADING


def table(metrics: dict, names: list[str]) -> list[str]:
    systems = metrics["systems"]
    rows = ["| system | hitrate@10 | ndcg@10 | hard hitrate@10 | easy hitrate@10 | ms/query |",
            "|---|---|---|---|---|---|"]
    for name in names:
        s = systems.get(name)
        if s is None:
            continue
        sl = s.get("slices", {})
        hard = sl.get("hard", {}).get("hitrate@10")
        easy = sl.get("easy", {}).get("hitrate@10")
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        mode = f" ({s['mode']})" if s.get("mode") else ""
        rows.append(f"| {name}{mode} | {fmt(s['overall'].get('hitrate@10'))} | "
                    f"{fmt(s['overall'].get('ndcg@10'))} | {fmt(hard)} | {fmt(easy)} | {s.get('ms_per_query', 0):.0f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--delta", required=True)
    ap.add_argument("--eval", required=True, help="metrics.json of `lrem eval` on WordNet dev")
    ap.add_argument("--systems", nargs="+", required=True)
    ap.add_argument("--about", required=True, help="what this model is (markdown paragraph)")
    ap.add_argument("--limits", default="")
    args = ap.parse_args()
    delta = Path(args.delta)
    meta = json.loads((delta / "delta.json").read_text())
    metrics = json.loads(Path(args.eval).read_text())
    card = (delta / "README.md").read_text(encoding="utf-8") if (delta / "README.md").exists() else ""
    card = card.split("\n" + SHIPPED_HEADING, 1)[0].rstrip() + "\n"
    f = meta["fidelity"]
    size = (delta / "delta.safetensors").stat().st_size / 1e6
    n = metrics.get("n_queries") or metrics.get("queries")
    lines = ["", f"{SHIPPED_HEADING} as `{delta.name}`", "", args.about, "",
             "```python", "from lrem.model import LREM",
             f"model = LREM.from_pretrained(\"{delta.name}\")   # offline: {meta['base']} + this delta, built once",
             "```", "",
             f"Stored as a rank-{meta['rank']} delta from `{meta['base']}` ({size:.1f} MB, float16; "
             f"`lrem delta`): embedding cosine to the full trained model on probe texts, queries min "
             f"{f['query_cos_min']:.4f} / mean {f['query_cos_mean']:.4f}, items min {f['item_cos_min']:.4f}.", "",
             f"WordNet dev ({n or 'the seeded'} queries, the full catalog; `lrem eval`, with this delta):", "",
             *table(metrics, ["bm25", "minilm", *args.systems]), ""]
    if args.limits:
        lines += ["### Limits", "", args.limits, ""]
    (delta / "README.md").write_text(card + "\n".join(lines), encoding="utf-8")
    print(f"wrote {delta / 'README.md'}")


if __name__ == "__main__":
    main()
