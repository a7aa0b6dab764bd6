"""Score an eval's run files on the queries a construct run wrote CoTs for (a partial run)."""
import json, sys
from lrem.data.formats import load_dataset
from lrem.evaluate_metrics import evaluate, significance
from lrem.runfile import read_trec_run
data, outcomes, runs_dir, *names = sys.argv[1:]
ds = load_dataset(data)
have = [json.loads(l)["query_id"] for l in open(outcomes)]
pairs = {n: {q: hits for q, hits in read_trec_run(f"{runs_dir}/{n}.trec").items() if q in set(have)} for n in names}
runs = {n: {q: [i for i, _ in hits] for q, hits in r.items()} for n, r in pairs.items()}
hard = {q: ds.queries[q].hard for q in have}
qrels = {q: ds.qrels[q] for q in have}
print(f"{len(have)} queries with a teacher CoT ({sum(hard.values())} hard)")
for n, r in runs.items():
    h = evaluate({q: r[q] for q in r if hard[q]}, qrels)["hitrate@10"]
    e = evaluate({q: r[q] for q in r if not hard[q]}, qrels)["hitrate@10"]
    o = evaluate(r, qrels)
    print(f"{n:28s} hitrate@10 {o['hitrate@10']:.4f} ndcg@10 {o['ndcg@10']:.4f} hard {h:.4f} easy {e:.4f}")
for t in significance(pairs, qrels):
    if t["metric"] == "hitrate@10":
        print(f"{t['a']} vs {t['b']}: {t['diff']:+.4f} p_rand {t['p_rand']:.4f}")
