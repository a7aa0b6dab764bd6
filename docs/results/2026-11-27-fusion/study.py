"""Offline study of hybrid fusion functions for lrem (BM25 + lrem-wordnet-135m-direct).

    source .venv/bin/activate; export LREM_HOME=$HOME/.cache/lrem OMP_NUM_THREADS=1
    python docs/results/2026-11-27-fusion/study.py      # -> results.json, dev_alpha.png

Protocol: lists (top 100 with scores) from `lrem eval`'s own retrievers (build_systems + run_system;
computed once, ~5 minutes on one core, cached in runs/fusion-study/lists.json.gz; delete it to
recompute; checked against the TREC runs of runs/h/eval-*). WordNet: 1000 seeded TRAIN queries (gate fit only), the 400 seeded
DEV queries (every choice: alpha, normalisation, gate threshold), the 400 seeded TEST queries
(run once at dev's choices). ESCI (188 queries, no train split): dev's choices applied as they are.
Systems: dense alone, RRF (k 60, depth 100, BM25 weight w; lrem.fusion.rrf), convex combination
alpha * norm(dense) + (1 - alpha) * norm(bm25) over the union of both top 100s (min-max,
theoretical min-max with dense min -1 / BM25 min 0, z-score; an item missing from a list gets
that list's lowest normalised score), and a logistic-regression gate choosing per query between
dense and a fusion. Paired randomization tests: 10k sign flips of per-query differences.
"""
from __future__ import annotations

import gzip, json, os, subprocess, sys, time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

from lrem.evaluate_metrics import query_metrics  # noqa: E402
from lrem.fusion import rrf  # noqa: E402

# alpha grid, fixed before any test run: 0.05 steps, 0.01 steps from 0.9 (theoretical min-max squeezes
# the dense cosines into a narrow band near 1, so its useful alphas lie close to 1)
# ---------------------------------------------------------------- stage 1: the retrievers' lists

ROOT = Path(__file__).resolve().parents[3]
CACHE = ROOT / "runs" / "fusion-study" / "lists.json.gz"
SETS = {  # name -> (dataset, index, split, limit)
    "train": ("runs/h/wordnet", "runs/h/index-direct", "train", 1000),
    "dev": ("runs/h/wordnet", "runs/h/index-direct", "dev", 400),
    "test": ("runs/h/wordnet", "runs/h/index-direct", "test", 400),
    "esci": ("runs/h/esci", "runs/h/esci-index-direct", "all", None),
}


def compute(log=print) -> dict:
    from lrem._threads import set_threads
    from lrem.data import load_dataset, sample_query_ids
    from lrem.evaluate import run_system
    from lrem.search import build_systems
    import bm25s

    set_threads(1, log=log)
    out = {}
    for name, (data, index, split, limit) in SETS.items():
        ds = load_dataset(ROOT / data)
        split_queries = ds.split_queries(split)
        judged = [q for q in split_queries if any(r > 0 for r in ds.qrels.get(q, {}).values())]
        qids = sample_query_ids(judged, limit, 0)
        queries = {q: split_queries[q].text for q in qids}
        systems = build_systems({"bm25": "bm25", "dense": f"{ROOT / index}:direct"}, ds, log=log)
        entry = {"queries": {}, "qrels": {q: dict(ds.qrels[q]) for q in qids}}
        lists, secs = {}, {}
        for sysname, retr in systems.items():
            run, _, s, scores = run_system(retr, queries, k=100, desc=f"{name}/{sysname}")
            lists[sysname] = {q: [[i, sc] for i, sc in zip(run[q], scores[q])] for q in qids}
            secs[sysname] = s
        bm = systems["bm25"]
        for q in qids:
            toks = bm25s.tokenize(queries[q], stopwords="en", return_ids=False, show_progress=False)[0]
            entry["queries"][q] = {"text": queries[q], "hard": split_queries[q].hard,
                                   "n_words": len(queries[q].split()), "n_terms": len(toks),
                                   "n_known_terms": len(bm._token_ids(queries[q]))}
        entry["lists"] = lists
        entry["ms_per_query"] = {k: 1000 * v / len(qids) for k, v in secs.items()}
        log(f"{name}: {len(qids)} queries, ms/query {entry['ms_per_query']}")
        out[name] = entry
    return out


def get_lists(log=print) -> dict:
    if CACHE.exists():
        with gzip.open(CACHE, "rt") as f:
            return json.load(f)
    t0 = time.time()
    data = compute(log)
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(CACHE, "wt") as f:
        json.dump(data, f)
    log(f"lists computed in {time.time() - t0:.0f} s -> {CACHE}")
    return data



# ---------------------------------------------------------------- settings

ALPHAS = sorted({round(a, 2) for a in np.arange(0, 0.9, 0.05)} | {round(a, 2) for a in np.arange(0.9, 1.0001, 0.01)})
NORMS = ("minmax", "tmm", "zscore")
RRF_WEIGHTS = (0.25, 0.5, 1.0)
THRESHOLDS = [round(t, 3) for t in np.arange(0.05, 0.951, 0.025)]
ROUNDS = 10_000
METRICS = ("hitrate@10", "ndcg@10")
FEATURES = ("bm25_top1", "bm25_gap12", "bm25_top1_per_term", "n_words", "dense_top1", "dense_margin_1_10",
            "overlap10", "overlap50", "inv_bm25_rank_of_dense_top1")


# ---------------------------------------------------------------- fusion functions

def normalise(scores: list[float], how: str, theoretical_min: float) -> tuple[np.ndarray, float]:
    """(normalised scores, the value a missing item gets: the list's lowest normalised score)."""
    s = np.asarray(scores, dtype=np.float64)
    if len(s) == 0:
        return s, 0.0
    if how == "minmax":
        lo, hi = s.min(), s.max()
        n = (s - lo) / (hi - lo) if hi > lo else np.ones_like(s)
    elif how == "tmm":
        lo, hi = theoretical_min, s.max()
        n = (s - lo) / (hi - lo) if hi > lo else np.ones_like(s)
    elif how == "zscore":
        sd = s.std()
        n = (s - s.mean()) / sd if sd > 0 else np.zeros_like(s)
    else:
        raise ValueError(how)
    return n, float(n.min())


def convex(dense: list, bm: list, alpha: float, how: str) -> list[str]:
    dn, dmiss = normalise([s for _, s in dense], how, -1.0)
    bn, bmiss = normalise([s for _, s in bm], how, 0.0)
    dmap = {i: v for (i, _), v in zip(dense, dn)}
    bmap = {i: v for (i, _), v in zip(bm, bn)}
    drank = {i: r for r, (i, _) in enumerate(dense)}
    brank = {i: r for r, (i, _) in enumerate(bm)}
    union = list(dict.fromkeys([i for i, _ in dense] + [i for i, _ in bm]))
    score = {i: alpha * dmap.get(i, dmiss) + (1 - alpha) * bmap.get(i, bmiss) for i in union}
    return sorted(union, key=lambda i: (-score[i], drank.get(i, 10**6), brank.get(i, 10**6)))


def rrf_ids(dense: list, bm: list, w: float) -> list[str]:
    """As `lrem eval`'s "w*bm25+IDX:direct": BM25's ranking first, weight w; dense weight 1."""
    return [i for i, _ in rrf([[i for i, _ in bm], [i for i, _ in dense]], weights=[w, 1.0])]


# ---------------------------------------------------------------- metrics and tests

def per_query(ranked: dict[str, list[str]], qrels: dict) -> dict[str, np.ndarray]:
    qids = sorted(qrels)
    vals = [query_metrics(ranked[q], qrels[q]) for q in qids]
    return {m: np.array([v[m] for v in vals]) for m in METRICS}


def summarise(pq: dict[str, np.ndarray], slices: dict[str, np.ndarray]) -> dict:
    return {m: {name: round(float(pq[m][mask].mean()), 4) for name, mask in slices.items()} for m in METRICS}


def randomization(x: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    """Two-sided paired randomization test on mean(y - x): ROUNDS random sign flips."""
    d = y - x
    if not d.any():
        return 1.0
    rng = np.random.default_rng(seed)
    obs = abs(d.mean())
    signs = rng.choice([-1.0, 1.0], size=(ROUNDS, len(d)))
    null = np.abs((signs * d).mean(axis=1))
    return float((np.sum(null >= obs - 1e-12) + 1) / (ROUNDS + 1))


# ---------------------------------------------------------------- gate features

def features(q: str, data: dict) -> list[float]:
    bm, de = data["lists"]["bm25"][q], data["lists"]["dense"][q]
    info = data["queries"][q]
    b1 = bm[0][1] if bm else 0.0
    b2 = bm[1][1] if len(bm) > 1 else 0.0
    d1 = de[0][1]
    d10 = de[min(9, len(de) - 1)][1]
    bids = [i for i, _ in bm]
    dids = [i for i, _ in de]
    brank = {i: r for r, i in enumerate(bids, 1)}
    return [b1, b1 - b2, b1 / max(info["n_terms"], 1), info["n_words"], d1, d1 - d10,
            len(set(bids[:10]) & set(dids[:10])) / 10, len(set(bids[:50]) & set(dids[:50])) / 50,
            1.0 / brank[dids[0]] if dids[0] in brank else 0.0]


class Gate:
    """Standardised features -> logistic regression P(fusion beats dense on hitrate@10)."""

    def fit(self, X: np.ndarray, y: np.ndarray):
        from sklearn.linear_model import LogisticRegression
        self.mu, self.sd = X.mean(0), X.std(0) + 1e-9
        self.lr = LogisticRegression(C=1.0, max_iter=1000).fit((X - self.mu) / self.sd, y)
        return self

    def prob(self, X: np.ndarray) -> np.ndarray:
        return self.lr.predict_proba((X - self.mu) / self.sd)[:, 1]

    def coefs(self) -> dict:
        return {f: round(float(c), 3) for f, c in zip(FEATURES, self.lr.coef_[0])} | {
            "intercept": round(float(self.lr.intercept_[0]), 3)}


def auc(p: np.ndarray, y: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score
    return float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")


# ---------------------------------------------------------------- checks against lrem eval's TREC runs

def read_trec(path: Path) -> dict[str, list]:
    run: dict[str, list] = {}
    for line in open(path):
        q, _, i, _, s, _ = line.split()
        run.setdefault(q, []).append((i, float(s)))
    return run


def check_against_trec(data: dict, folder: str) -> dict:
    """Our recomputed lists (and RRF from them) against the TREC files `lrem eval` wrote."""
    runs = ROOT / folder / "runs"
    out = {}
    pairs = [("bm25", "bm25.trec"), ("dense", "direct-trained.trec")]
    for ours, file in pairs:
        trec = read_trec(runs / file)
        same_ids = sum([i for i, _ in trec.get(q, [])] == [i for i, _ in data["lists"][ours][q]]
                       for q in data["qrels"])
        maxdiff = max(max((abs(a[1] - b[1]) / max(abs(b[1]), 1e-9) for a, b in zip(trec.get(q, []), data["lists"][ours][q])),
                          default=0.0) for q in data["qrels"])
        out[ours] = {"queries_same_ranking": int(same_ids), "n": len(data["qrels"]), "max_rel_score_diff": maxdiff}
    for w, file in ((1.0, "hybrid-direct.trec"), (0.25, "hybrid-direct-w0.25.trec")):
        if (runs / file).exists():
            trec = read_trec(runs / file)
            same = sum([i for i, _ in trec.get(q, [])] == rrf_ids(data["lists"]["dense"][q], data["lists"]["bm25"][q], w)[:100]
                       for q in data["qrels"])
            out[f"rrf_w{w:g}"] = {"queries_same_ranking": int(same), "n": len(data["qrels"])}
    return out


# ---------------------------------------------------------------- the study

def main():
    t0 = time.time()
    load_start = os.getloadavg()
    L = get_lists()
    res: dict = {"protocol": __doc__.strip(), "load_average_start": load_start,
                 "n_queries": {k: len(v["qrels"]) for k, v in L.items()},
                 "ms_per_query": {k: v["ms_per_query"] for k, v in L.items()}}
    res["checks"] = {name: check_against_trec(L[name], folder)
                     for name, folder in (("dev", "runs/h/eval-dev"), ("test", "runs/h/eval-test"),
                                          ("esci", "runs/h/eval-esci"))}

    def slices(name):
        qids = sorted(L[name]["qrels"])
        hard = np.array([L[name]["queries"][q]["hard"] is True for q in qids])
        s = {"all": np.ones(len(qids), bool)}
        if any(L[name]["queries"][q]["hard"] is not None for q in qids):
            s |= {"hard": hard, "easy": ~hard}
        return s

    def run_of(name, fn) -> dict[str, list[str]]:
        d = L[name]
        return {q: fn(d["lists"]["dense"][q], d["lists"]["bm25"][q]) for q in d["qrels"]}

    def pq_of(name, fn):
        return per_query(run_of(name, fn), L[name]["qrels"])

    dense_fn = lambda de, bm: [i for i, _ in de]
    bm25_fn = lambda de, bm: [i for i, _ in bm]

    # 1. dev sweeps: RRF weights, convex alpha per normalisation
    base = {n: {"dense": pq_of(n, dense_fn), "bm25": pq_of(n, bm25_fn),
                **{f"rrf_w{w:g}": pq_of(n, lambda de, bm, w=w: rrf_ids(de, bm, w)) for w in RRF_WEIGHTS}}
            for n in ("train", "dev", "test", "esci")}
    sweep = {how: {} for how in NORMS}
    for how in NORMS:
        for a in ALPHAS:
            pq = pq_of("dev", lambda de, bm, a=a, how=how: convex(de, bm, a, how))
            sweep[how][a] = {m: round(float(pq[m].mean()), 4) for m in METRICS} | {
                "hard": round(float(pq["hitrate@10"][slices("dev")["hard"]].mean()), 4)}
    res["dev_sweep_convex"] = {how: {str(a): v for a, v in s.items()} for how, s in sweep.items()}
    # descriptive only, never used for a choice: the same sweep on ESCI (what a shop catalog would want)
    res["esci_sweep_convex_descriptive"] = {how: {str(a): {m: round(float(v[m].mean()), 4) for m in METRICS} for a, v in (
        (a, pq_of("esci", lambda de, bm, a=a, how=how: convex(de, bm, a, how))) for a in ALPHAS)} for how in NORMS}
    res["dev_rrf"] = {k: {m: round(float(v[m].mean()), 4) for m in METRICS} for k, v in base["dev"].items()}
    # dev choice: the best (norm, alpha) by hitrate@10 (ties: ndcg@10, then the higher alpha = nearer dense)
    best = {how: max(ALPHAS, key=lambda a: (sweep[how][a]["hitrate@10"], sweep[how][a]["ndcg@10"], a)) for how in NORMS}
    best_norm = max(NORMS, key=lambda h: (sweep[h][best[h]]["hitrate@10"], sweep[h][best[h]]["ndcg@10"]))
    res["dev_choice"] = {"alpha_per_norm": best, "norm": best_norm, "alpha": best[best_norm]}
    convex_fns = {f"convex_{h}_a{best[h]:g}": (lambda de, bm, h=h: convex(de, bm, best[h], h)) for h in NORMS}
    best_convex = f"convex_{best_norm}_a{best[best_norm]:g}"

    # 2. learned gates: fit on TRAIN, threshold on DEV
    feats = {n: np.array([features(q, L[n]) for q in sorted(L[n]["qrels"])]) for n in L}
    fused_for_gate = {"rrf_w1": lambda de, bm: rrf_ids(de, bm, 1.0), best_convex: convex_fns[best_convex]}
    gate_pq = {n: {} for n in L}
    res["gates"] = {}
    for gname, fn in fused_for_gate.items():
        pqs = {n: (base[n][gname] if gname in base[n] else pq_of(n, fn)) for n in L}
        d_tr = pqs["train"]["hitrate@10"] - base["train"]["dense"]["hitrate@10"]
        fit_mask = d_tr != 0  # ties (same hitrate@10) say nothing about which to pick
        y = (d_tr > 0).astype(int)
        gate = Gate().fit(feats["train"][fit_mask], y[fit_mask])
        probs = {n: gate.prob(feats[n]) for n in L}
        info = {"train_label_counts": {"fusion_better": int((d_tr > 0).sum()), "dense_better": int((d_tr < 0).sum()),
                                       "tie": int((d_tr == 0).sum())}, "coefficients": gate.coefs()}
        for n in ("train", "dev", "test", "esci"):
            d = pqs[n]["hitrate@10"] - base[n]["dense"]["hitrate@10"]
            info[f"auc_{n}"] = round(auc(probs[n][d != 0], (d[d != 0] > 0).astype(int)), 3)
            info[f"oracle_{n}"] = round(float(np.maximum(pqs[n]["hitrate@10"], base[n]["dense"]["hitrate@10"]).mean()), 4)

        def gated(n, t):
            use = probs[n] >= t
            return {m: np.where(use, pqs[n][m], base[n]["dense"][m]) for m in METRICS}, float(use.mean())
        dev_curve = {t: (float(gated("dev", t)[0]["hitrate@10"].mean()), float(gated("dev", t)[0]["ndcg@10"].mean()))
                     for t in THRESHOLDS}
        t_best = max(THRESHOLDS, key=lambda t: (dev_curve[t], t))
        info["dev_threshold_curve"] = {str(t): [round(v[0], 4), round(v[1], 4), round(gated("dev", t)[1], 3)]
                                       for t, v in dev_curve.items()}
        info["threshold"] = t_best
        for n in L:
            gate_pq[n][f"gate_{gname}"], share = gated(n, t_best)
            info[f"fused_share_{n}"] = round(share, 3)
            gate_pq[n][f"fused:{gname}"] = pqs[n]
        res["gates"][f"gate_{gname}"] = info

    # 3. reports: dev, test (once, at dev's choices), ESCI (dev's choices), train (for the record)
    res["tables"], res["tests"] = {}, {}
    for n in ("dev", "test", "esci", "train"):
        systems = {"dense": base[n]["dense"], "bm25": base[n]["bm25"],
                   **{k: v for k, v in base[n].items() if k.startswith("rrf")}}
        for cname, fn in convex_fns.items():
            systems[cname] = gate_pq[n].get(f"fused:{cname}") or pq_of(n, fn)
        systems |= {k: v for k, v in gate_pq[n].items() if k.startswith("gate_")}
        res["tables"][n] = {k: summarise(v, slices(n)) for k, v in systems.items()}
        if n == "train":
            continue
        res["tests"][n] = {}
        for k, v in systems.items():
            for ref in ("dense", "rrf_w1"):
                if k == ref:
                    continue
                for m in METRICS:
                    res["tests"][n].setdefault(k, {})[f"{m} vs {ref}"] = {
                        "diff": round(float((v[m] - systems[ref][m]).mean()), 4),
                        "p": round(randomization(systems[ref][m], v[m]), 4)}
    res["dev_oracle_dense_vs_rrf_w1"] = round(float(np.maximum(base["dev"]["dense"]["hitrate@10"],
                                                                base["dev"]["rrf_w1"]["hitrate@10"]).mean()), 4)
    res["load_average_end"] = os.getloadavg()
    res["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    res["seconds"] = round(time.time() - t0, 1)
    (HERE / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    plot(res)
    print(json.dumps({k: res[k] for k in ("checks", "dev_choice", "n_queries")}, indent=1))
    for n in ("dev", "test", "esci", "train"):
        print(f"--- {n}")
        for k, v in res["tables"][n].items():
            print(f"{k:28s} " + "  ".join(f"{m} {v[m]}" for m in METRICS))


def plot(res):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    for ax, m in zip(axes, METRICS):
        for how, label in (("minmax", "convex, min-max"), ("tmm", "convex, theoretical min-max"), ("zscore", "convex, z-score")):
            s = res["dev_sweep_convex"][how]
            ax.plot([float(a) for a in s], [v[m] for v in s.values()], marker=".", label=label)
        for key, color, ls, label in (("dense", "k", "-", "dense alone"), ("rrf_w1", "r", "--", "RRF w=1"),
                                      ("rrf_w0.25", "m", ":", "RRF w=0.25"), ("bm25", "0.6", "-", "BM25 alone")):
            ax.axhline(res["dev_rrf"][key][m], color=color, linestyle=ls, lw=1, label=label)
        ax.set_xlabel("alpha (weight of the dense score)")
        ax.set_ylabel(m)
        ax.set_title(f"WordNet dev (400 queries): {m}")
        ax.grid(alpha=0.3)
    ax = axes[2]
    for how in NORMS:
        s = res["esci_sweep_convex_descriptive"][how]
        ax.plot([float(a) for a in s], [v["hitrate@10"] for v in s.values()], marker=".")
    for key, color, ls in (("dense", "k", "-"), ("rrf_w1", "r", "--"), ("rrf_w0.25", "m", ":"), ("bm25", "0.6", "-")):
        ax.axhline(res["tables"]["esci"][key]["hitrate@10"]["all"], color=color, linestyle=ls, lw=1)
    ax.set_xlabel("alpha (weight of the dense score)")
    ax.set_ylabel("hitrate@10")
    ax.set_title("ESCI (188 queries), descriptive only: not used to choose")
    ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(HERE / "dev_alpha.png", dpi=110)


if __name__ == "__main__":
    main()
