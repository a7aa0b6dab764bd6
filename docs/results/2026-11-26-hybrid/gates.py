import collections, json, sys
import numpy as np
d = sys.argv[1]
def run(name):
    r = collections.defaultdict(list)
    for line in open(f"{d}/runs/{name}.trec"):
        q, _, i, rank, s, _ = line.split()
        r[q].append((i, float(s)))
    return r
qrels = collections.defaultdict(set)
for line in open(f"{d}/qrels.trec"):
    q, _, i, rel = line.split()
    if int(rel) > 0: qrels[q].add(i)
bm, de = run("bm25"), run(sys.argv[2])
m = json.load(open(f"{d}/metrics.json"))
qs = list(de)
hard = {}
import gzip
# hard flag from dataset
ds = sys.argv[3]
for line in open(f"{ds}/queries.jsonl"):
    r = json.loads(line); hard[r["query_id"]] = bool(r.get("hard"))
def hr10(ranked, q):
    rel = qrels[q]; return len(rel & set(ranked[:10])) / len(rel)  # hitrate@10 as share of relevant
def fuse(q, w):
    sc = collections.defaultdict(float)
    for r, (i, _) in enumerate(de[q], 1): sc[i] += 1 / (60 + r)
    if w > 0:
        for r, (i, _) in enumerate(bm.get(q, []), 1): sc[i] += w / (60 + r)
    return [i for i, _ in sorted(sc.items(), key=lambda kv: -kv[1])]
def evaluate(rule):
    vals = collections.defaultdict(list)
    for q in qs:
        v = hr10(fuse(q, rule(q)), q)
        vals["all"].append(v); vals["hard" if hard[q] else "easy"].append(v)
    return {k: round(float(np.mean(v)), 4) for k, v in vals.items()}
top = {q: (bm[q][0][1] if bm.get(q) else 0.0) for q in qs}
print("dense", evaluate(lambda q: 0))
for w in (0.25, 0.5, 1):
    print("w", w, evaluate(lambda q, w=w: w))
print("bm25 top score quantiles", np.quantile(list(top.values()), [0.1, 0.25, 0.5, 0.75, 0.9]).round(2))
for tau in (4, 6, 8, 10, 12):
    for w in (0.5, 1):
        print("tau", tau, "w", w, evaluate(lambda q, w=w, tau=tau: w if top[q] >= tau else 0))
print("--- agreement gate: fuse when BM25's and the dense top-N share >= m items")
for n in (5, 10, 20, 50):
    for m_ in (1, 2, 3):
        for w in (0.25, 0.5, 1):
            gate = {q: len({i for i, _ in bm.get(q, [])[:n]} & {i for i, _ in de[q][:n]}) >= m_ for q in qs}
            r = evaluate(lambda q, w=w: w if gate[q] else 0)
            print(n, m_, w, r, f"fused {np.mean(list(gate.values())):.2f}")
orc = [max(hr10(fuse(q, 0), q), hr10(fuse(q, 1), q)) for q in qs]
print("oracle dense|w1", np.mean(orc))
