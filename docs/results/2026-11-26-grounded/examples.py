"""10 before/after examples: direct-trained (before) vs grounded-direct (after), dev queries where the
first relevant item's rank changes most (5 wins, 5 losses where there are), from the eval's runs.jsonl."""
import json, sys
from lrem.data import load_dataset
ev = sys.argv[1]; before, after = sys.argv[2], sys.argv[3]
ds = load_dataset("runs/data/wordnet")
rows = {}
for line in open(f"{ev}/runs.jsonl"):
    r = json.loads(line); rows.setdefault(r["system"], {})[r["query_id"]] = r
def rank(top, rel):
    return next((i + 1 for i, x in enumerate(top) if x in rel), 99)
out = []
for q, b in rows[before].items():
    a = rows[after][q]; rel = {i for i, v in ds.qrels[q].items() if v > 0}
    out.append((rank(b["top"], rel) - rank(a["top"], rel), q, b, a, rel))
wins = sorted([o for o in out if o[0] > 0], key=lambda o: -o[0])
losses = sorted([o for o in out if o[0] < 0], key=lambda o: o[0])
print(f"{len(wins)} queries ranked a relevant item higher, {len(losses)} lower, {len(out)-len(wins)-len(losses)} the same (first relevant item within the top 10)\n")
print("| query | relevant (first) | before: top 3 | rank | after: top 3 | rank |\n|---|---|---|---|---|---|")
t = lambda i: ds.catalog[i].title.split(",")[0]
for d, q, b, a, rel in wins[:5] + losses[:5]:
    rb, ra = rank(b["top"], rel), rank(a["top"], rel)
    fr = next(iter(sorted(rel)))
    print(f"| {b['query'][:70]} | {t(fr)} | {'; '.join(t(i) for i in b['top'][:3])} | {rb if rb < 99 else '>10'} | "
          f"{'; '.join(t(i) for i in a['top'][:3])} | {ra if ra < 99 else '>10'} |")
