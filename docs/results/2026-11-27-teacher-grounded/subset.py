"""Score an eval's run files on the queries a construct run wrote CoTs for (a partial run)."""
import json, sys
from lrem.data import load_dataset
from lrem.evaluate_metrics import evaluate_slices, significance
from lrem.runfile import read_trec_run
data, outcomes, runs_dir, *names = sys.argv[1:]
ds = load_dataset(data)
order = [json.loads(l)["query_id"] for l in open(outcomes)]  # the file's order: the tests' pairing follows it
have = set(order)
pairs = {n: {q: hits for q, hits in read_trec_run(f"{runs_dir}/{n}.trec").items() if q in have} for n in names}
runs = {n: {q: [i for i, _ in hits] for q, hits in r.items()} for n, r in pairs.items()}
qrels = {q: ds.qrels[q] for q in order}
slices = {"all": order, "hard": [q for q in order if ds.queries[q].hard], "easy": [q for q in order if not ds.queries[q].hard]}
print(f"{len(have)} queries with a teacher CoT ({len(slices['hard'])} hard)")
for n, r in runs.items():
    m = evaluate_slices(r, qrels, slices)
    print(f"{n:28s} hitrate@10 {m['all']['hitrate@10']:.4f} ndcg@10 {m['all']['ndcg@10']:.4f} "
          f"hard {m['hard']['hitrate@10']:.4f} easy {m['easy']['hitrate@10']:.4f}")
for t in significance(pairs, qrels):
    if t["metric"] == "hitrate@10":
        print(f"{t['a']} vs {t['b']}: {t['diff']:+.4f} p_rand {t['p_rand']:.4f}")
