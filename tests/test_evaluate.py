"""Metrics by hand, slices, sampling, and an end-to-end run with the real BM25Retriever."""
import json
import math
import re
import subprocess
import sys

import pytest

from lrem.baselines import BM25Retriever
from lrem.data import Dataset, Item, Query, sample_query_ids, save_dataset
from lrem.evaluate import (KS, PRIMARY_METRIC, evaluate, evaluate_slices, evaluate_systems, format_examples,
                           format_table, pick_examples, query_metrics, run_system, slices_for,
                           write_report)
from lrem.search_types import Hit, SearchResult

# ---------------------------------------------------------------- metrics by hand


def test_hitrate_and_precision_two_of_four_relevant_in_top10():
    rels = {"r1": 1, "r2": 2, "r3": 1, "r4": 3}
    ranked = ["r1", "x1", "r2"] + [f"x{i}" for i in range(2, 14)] + ["r3"]  # r3 at rank 16, r4 missing
    m = query_metrics(ranked, rels)
    assert m["hitrate@1"] == 0.25
    assert m["hitrate@10"] == 0.5
    assert m["hitrate@100"] == 0.75
    assert m["precision@1"] == 1.0
    assert m["precision@10"] == pytest.approx(0.2)
    assert m["precision@100"] == pytest.approx(0.03)
    assert m["mrr@10"] == 1.0


def test_ndcg_with_graded_gains_by_hand():
    rels = {"a": 1, "c": 3, "d": 2, "e": 0}
    m = query_metrics(["a", "b", "c", "e"], rels)
    dcg = (2**1 - 1) / 1 + 0 + (2**3 - 1) / 2 + 0  # ranks 1 and 3: log2(2) = 1, log2(4) = 2
    idcg = (2**3 - 1) / 1 + (2**2 - 1) / math.log2(3) + (2**1 - 1) / 2  # ideal order c, d, a
    assert m["ndcg@10"] == pytest.approx(dcg / idcg)
    assert m["ndcg@10"] == pytest.approx(0.479095, abs=1e-5)
    assert query_metrics(["c", "d", "a"], rels)["ndcg@10"] == pytest.approx(1.0)


def test_mrr_and_zero_relevance_is_not_relevant():
    rels = {"a": 0, "b": 1}
    m = query_metrics(["a", "x", "b"], rels)
    assert m["mrr@10"] == pytest.approx(1 / 3)
    assert m["hitrate@1"] == 0.0 and m["precision@1"] == 0.0
    late = query_metrics([f"x{i}" for i in range(10)] + ["b"], rels)
    assert late["mrr@10"] == 0.0 and late["hitrate@10"] == 0.0 and late["hitrate@100"] == 1.0


def test_duplicate_ids_count_once():
    m = query_metrics(["a", "a", "a"], {"a": 1, "b": 1})
    assert m["hitrate@10"] == 0.5
    assert m["precision@10"] == pytest.approx(0.1)


def test_evaluate_excludes_queries_without_relevant_items():
    qrels = {"q1": {"a": 1}, "q2": {"a": 0}, "q3": {"b": 2}}
    run = {"q1": ["a", "b"], "q2": ["a"], "q3": ["a", "b"], "q4": ["a"]}  # q2: only rel 0; q4: unjudged
    m = evaluate(run, qrels)
    assert m["hitrate@1"] == pytest.approx(0.5)  # mean of q1 (1) and q3 (0)
    assert m["mrr@10"] == pytest.approx((1 + 0.5) / 2)
    assert set(m) == {f"hitrate@{k}" for k in KS} | {f"precision@{k}" for k in KS} | {"ndcg@10", "mrr@10"}
    assert PRIMARY_METRIC in m
    assert evaluate({"q2": ["a"]}, qrels)["hitrate@10"] == 0.0


def test_evaluate_slices():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}, "q3": {"c": 1}}
    run = {"q1": ["a"], "q2": ["x"], "q3": ["c"]}
    out = evaluate_slices(run, qrels, {"s1": ["q1", "q2"], "s2": ["q3"], "none": ["q9"]})
    assert out["s1"]["hitrate@1"] == 0.5 and out["s1"]["n_queries"] == 2
    assert out["s2"]["hitrate@1"] == 1.0 and out["s2"]["n_queries"] == 1
    assert out["none"]["n_queries"] == 0


def test_sample_query_ids_is_deterministic_subset():
    ids = [f"q{i}" for i in range(100)]
    a = sample_query_ids(ids, 10, seed=3)
    assert a == sample_query_ids(list(reversed(ids)), 10, seed=3)  # input order does not matter
    assert len(a) == 10 and set(a) <= set(ids) and a == sorted(a)
    assert a != sample_query_ids(ids, 10, seed=4)
    assert set(a) <= set(sample_query_ids(ids, 30, seed=3))  # nested as limit grows
    assert sample_query_ids(ids, None) == sorted(ids)
    assert sample_query_ids(ids, 1000) == sorted(ids)


def test_slices_for():
    qs = {"a": Query("a", "t", "kitchen", "test", True), "b": Query("b", "t", "garden", "test", False),
          "c": Query("c", "t", "kitchen", "test", None)}
    assert slices_for(qs) == {"category=garden": ["b"], "category=kitchen": ["a", "c"],
                              "hard": ["a"], "easy": ["b", "c"]}
    unflagged = {"a": Query("a", "t", "kitchen", "test")}
    assert slices_for(unflagged) == {"category=kitchen": ["a"]}  # one length: no length slices
    lengths = {"a": Query("a", "mug", "x", "test"), "b": Query("b", "a mug for tea", "x", "test"),
               "c": Query("c", "a big mug for hot tea", "x", "test"), "d": Query("d", "blue mug", "x", "test")}
    assert slices_for(lengths) == {"category=x": ["a", "b", "c", "d"], "words=1-2": ["a", "d"], "words=3-4": ["b"],
                                   "words=5+": ["c"]}


# ---------------------------------------------------------------- end to end with BM25

TITLES = {
    "k1": ("cast iron skillet 12 inch", "kitchen"), "k2": ("enameled cast iron dutch oven", "kitchen"),
    "k3": ("insulated stainless thermos flask", "kitchen"), "k4": ("vacuum travel mug with lid", "kitchen"),
    "k5": ("waiter's corkscrew bottle screw", "kitchen"), "k6": ("drip coffee maker 12 cup", "kitchen"),
    "k7": ("burr coffee grinder", "kitchen"), "k8": ("crystal wine glasses set of 4", "kitchen"),
    "k9": ("nonstick frying pan", "kitchen"), "k10": ("bamboo cutting board", "kitchen"),
    "k11": ("chef knife 8 inch", "kitchen"), "k12": ("electric kettle 1.7 l", "kitchen"),
    "g1": ("expandable garden hose 50 ft", "garden"), "g2": ("hose nozzle spray with 8 patterns", "garden"),
    "g3": ("patio lounge chair", "garden"), "g4": ("cordless leaf blower", "garden"),
    "g5": ("raised garden bed kit", "garden"), "g6": ("solar path lights 8 pack", "garden"),
    "g7": ("pruning shears", "garden"), "g8": ("bird feeder for outdoors", "garden"),
    "g9": ("watering can 2 gallon", "garden"), "o1": ("ergonomic mesh office chair", "office"),
    "o2": ("standing desk converter", "office"), "o3": ("wireless keyboard and mouse", "office"),
    "o4": ("monitor arm dual", "office"), "o5": ("desk lamp led", "office"),
    "o6": ("paper shredder cross cut", "office"), "o7": ("stapler heavy duty", "office"),
    "o8": ("whiteboard 36 x 24", "office"), "o9": ("file cabinet 3 drawer", "office"),
}
QUERIES = [  # id, text, category, split, hard, qrels
    ("q1", "cast iron skillet", "kitchen", "test", False, {"k1": 3, "k2": 1}),
    ("q2", "garden hose", "garden", "test", False, {"g1": 3, "g2": 1}),
    ("q3", "ergonomic office chair", "office", "test", False, {"o1": 3, "g3": 0}),
    ("q4", "something to keep coffee hot", "kitchen", "test", True, {"k3": 3, "k4": 2, "k6": 0}),
    ("q5", "device to open wine bottles", "kitchen", "test", True, {"k5": 3}),
    ("q6", "lawn seat", "garden", "test", True, {"g3": 2}),
    ("q7", "garden hose", "garden", "train", False, {"g1": 3}),  # other split
    ("q8", "pruning shears", "garden", "test", False, {"g7": 0}),  # no relevant item: not scored
]
COTS = {"something to keep coffee hot": "thermos flask insulated travel mug",
        "device to open wine bottles": "corkscrew bottle screw", "lawn seat": "patio lounge chair"}


class ExpansionRetriever:
    """A tiny 'reasoning' system: appends a fixed CoT to the query, then searches with BM25."""

    def __init__(self, bm25: BM25Retriever):
        self.bm25 = bm25

    def search(self, queries: list[str], k: int = 10) -> list[SearchResult]:
        cots = [COTS.get(q, "") for q in queries]
        results = self.bm25.search([f"{q} {c}" for q, c in zip(queries, cots)], k=k)
        return [SearchResult(r.hits, cot=c or None) for r, c in zip(results, cots)]


@pytest.fixture(scope="module")
def toy():
    catalog = {i: Item(i, t, c) for i, (t, c) in TITLES.items()}
    queries = {q: Query(q, text, cat, split, hard) for q, text, cat, split, hard, _ in QUERIES}
    qrels = {q: rels for q, *_, rels in QUERIES}
    return Dataset(catalog, queries, qrels, name="toy")


@pytest.fixture(scope="module")
def systems(toy):
    bm25 = BM25Retriever({i: it.title for i, it in toy.catalog.items()}, show_progress=False)
    return {"bm25": bm25, "bm25+cot": ExpansionRetriever(bm25)}


def test_run_system_collects_run_cots_and_time(systems):
    queries = {"a": "garden hose", "b": "lawn seat", "c": "chef knife"}
    run, cots, seconds, scores = run_system(systems["bm25+cot"], queries, k=5, batch_size=2)
    assert list(run) == ["a", "b", "c"]
    assert all(len(scores[q]) == len(run[q]) and scores[q] == sorted(scores[q], reverse=True) for q in run)
    assert run["a"][0] == "g1" and run["b"][0] == "g3" and run["c"][0] == "k11"
    assert cots == {"a": None, "b": "patio lounge chair", "c": None}
    assert seconds > 0


def test_evaluate_systems_and_write_report(toy, systems, tmp_path):
    result = evaluate_systems(toy, "test", systems, log=lambda *_: None)
    assert result["n_queries"] == 6  # q7 is train, q8 has no relevant item
    bm25, cot = result["systems"]["bm25"], result["systems"]["bm25+cot"]
    assert bm25["overall"]["hitrate@10"] == pytest.approx(0.5)  # easy queries all found, hard none
    assert bm25["slices"]["easy"]["hitrate@10"] == 1.0 and bm25["slices"]["hard"]["hitrate@10"] == 0.0
    assert cot["slices"]["hard"]["hitrate@10"] == 1.0
    assert bm25["slices"]["hard"]["n_queries"] == 3
    assert set(bm25["slices"]) == {"category=garden", "category=kitchen", "category=office", "hard", "easy",
                                   "words=1-2", "words=3-4", "words=5+"}
    assert bm25["slices"]["words=5+"]["n_queries"] == 2  # q4, q5: hard, BM25 finds neither
    assert bm25["slices"]["words=5+"]["hitrate@10"] == 0.0 and cot["slices"]["words=5+"]["hitrate@10"] == 1.0
    assert bm25["ms_per_query"] > 0 and bm25["queries_per_s"] > 0
    assert result["examples"]["bm25+cot"]["q6"] == {"cot": "patio lounge chair",
                                                    "top": result["examples"]["bm25+cot"]["q6"]["top"]}
    assert result["examples"]["bm25+cot"]["q6"]["top"][0] == "g3"

    write_report(result, tmp_path, toy, n_examples=6)  # every query: its texts can be checked
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) >= {"dataset", "split", "n_queries", "systems", "significance"}
    assert not {"examples", "runs", "qrels"} & set(metrics)
    assert metrics["dataset"] == "toy" and metrics["split"] == "test"
    assert set(metrics["systems"]["bm25"]) == {"overall", "slices", "ms_per_query", "queries_per_s", "retriever", "index"}

    rows = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    by_key = {(r["system"], r["query_id"]): r for r in rows}
    assert by_key[("bm25+cot", "q5")]["cot"] == "corkscrew bottle screw"
    assert by_key[("bm25", "q5")]["cot"] is None
    assert by_key[("bm25", "q1")]["top"][0] == "k1" and by_key[("bm25", "q1")]["query"] == "cast iron skillet"

    report = (tmp_path / "report.md").read_text()
    for text in ("# Evaluation: toy / test", "6 queries", "| system | hitrate@1 | hitrate@10 |",
                 "| bm25+cot |", "## Slices: hitrate@10", "## Slices: ndcg@10", "| category=kitchen |",
                 "| hard | 3 |", "![overall](overall.png)", "![slices](slices.png)", "device to open wine bottles",
                 "+ waiter's corkscrew bottle screw"):
        assert text in report, text

    for png in ("overall.png", "slices.png", "quality.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert not list(tmp_path.glob(".*.tmp"))  # no temp files left behind

    (tmp_path / "rl").mkdir()
    (tmp_path / "rl" / "curves.png").write_bytes((tmp_path / "overall.png").read_bytes())  # a trainer's figure
    write_report(result, tmp_path / "r2", toy, n_examples=1, figures=[tmp_path / "rl" / "curves.png"])
    report = (tmp_path / "r2" / "report.md").read_text()
    assert "![rl-curves](rl-curves.png)" in report and (tmp_path / "r2" / "rl-curves.png").stat().st_size > 5000
    assert report.count("relevant)") == 1  # one example query
    with pytest.raises(FileNotFoundError, match="no such figure"):
        write_report(result, tmp_path / "r3", toy, figures=[tmp_path / "missing.png"])

    # a refreshed report (--overwrite) drops the figure the earlier one copied in, and only that
    (tmp_path / "r2" / "notes.png").write_bytes(b"the user's own")
    write_report(result, tmp_path / "r2", toy, n_examples=1)
    assert not (tmp_path / "r2" / "rl-curves.png").exists() and (tmp_path / "r2" / "notes.png").is_file()
    assert "rl-curves" not in (tmp_path / "r2" / "report.md").read_text()


class CoTOnlyRetriever:
    """A 'reasoning' system that searches by its CoT alone: a good CoT finds what the query
    misses, a misleading one loses what the query found."""

    COTS = {"lawn seat": "patio lounge chair", "garden hose": "office chair"}

    def __init__(self, bm25: BM25Retriever):
        self.bm25 = bm25

    def search(self, queries: list[str], k: int = 10) -> list[SearchResult]:
        cots = [self.COTS.get(q, "") for q in queries]
        results = self.bm25.search([c or q for q, c in zip(queries, cots)], k=k)
        return [SearchResult(r.hits, cot=c) for r, c in zip(results, cots)]


def test_examples_show_a_gain_and_a_loss_then_spread_over_slices(toy, systems, tmp_path):
    """Issue 21: the examples are the query reason won most on, the one it lost most on, then one
    per slice (category x hard/easy) in turn; the terminal and report.md show the same ones."""
    bm25 = systems["bm25"]
    named = {"bm25": bm25, "base-direct": bm25, "base-reason": CoTOnlyRetriever(bm25), "base-auto": bm25}
    result = evaluate_systems(toy, "test", named, log=lambda *_: None)
    picks = pick_examples(result, toy, 4)
    assert picks[:2] == [("q6", "base-reason beat base-direct: hitrate@10 1.00 vs 0.00"),
                         ("q2", "base-reason lost to base-direct: hitrate@10 0.00 vs 1.00")]
    slices = [(toy.queries[q].category, toy.queries[q].hard) for q, _ in picks]
    assert len(set(slices)) == 4  # four different slices
    assert slices[2:] == [("kitchen", False), ("kitchen", True)]  # the slices not shown yet, in name order
    assert [why for _, why in picks[2:]] == ["", ""]
    assert pick_examples(result, toy, 4) == picks  # deterministic
    assert sorted(q for q, _ in pick_examples(result, toy, 10)) == ["q1", "q2", "q3", "q4", "q5", "q6"]
    assert pick_examples(result, toy, 1) == picks[:1]

    printed = format_examples(result, toy, 4)
    write_report(result, tmp_path, toy, n_examples=4)
    report = (tmp_path / "report.md").read_text()
    in_report = re.findall(r"^\*\*(q\d+): ", report, flags=re.M)
    in_terminal = [next(q for q, text, *_ in QUERIES if text == line.split("]: ", 1)[1].split("  (")[0])
                   for line in printed.splitlines() if line.startswith("query [")]
    assert in_report == in_terminal == [q for q, _ in picks]
    assert "query [garden, hard]: lawn seat  (base-reason beat base-direct: hitrate@10 1.00 vs 0.00)" in printed
    assert "**q2: garden hose** (garden, easy; 2 relevant) base-reason lost to base-direct" in report

    # without a direct/reason pair, the first and last systems are compared
    result = evaluate_systems(toy, "test", {"bm25": bm25, "cot-only": CoTOnlyRetriever(bm25)}, log=lambda *_: None)
    assert [why for _, why in pick_examples(result, toy, 2)] == [
        "cot-only beat bm25: hitrate@10 1.00 vs 0.00", "cot-only lost to bm25: hitrate@10 0.00 vs 1.00"]


def test_evaluate_systems_limit_is_a_stable_sample(toy, systems):
    a = evaluate_systems(toy, "test", {"bm25": systems["bm25"]}, limit=3, seed=1, log=lambda *_: None)
    b = evaluate_systems(toy, "test", {"bm25": systems["bm25"]}, limit=3, seed=1, log=lambda *_: None)
    assert a["n_queries"] == 3
    assert list(a["examples"]["bm25"]) == list(b["examples"]["bm25"])
    assert a["systems"]["bm25"]["overall"] == b["systems"]["bm25"]["overall"]


def test_format_table(toy, systems):
    result = evaluate_systems(toy, "test", systems, log=lambda *_: None)
    table = format_table(result)
    lines = table.splitlines()
    assert lines[0] == "toy/test (6 queries)"
    assert lines[1].split() == ["system", "hitrate@1", "hitrate@10", "hitrate@100", "precision@10",
                                "ndcg@10", "mrr@10", "ms/query"]
    assert lines[3].startswith("bm25 ") and lines[4].startswith("bm25+cot")
    assert "0.5000" in lines[3]
    assert len({len(line) for line in lines[1:]}) == 1  # columns aligned


def test_trec_files_rescore_with_ir_measures_and_significance_is_in_the_report(toy, systems, tmp_path):
    """Issue 17: each system's run as a TREC file at depth k with scores, the qrels in TREC
    format; ir_measures reading those files gives the report's hitrate@10 (R@10); report.md
    has the paired tests, the systems' specs and the command line."""
    import ir_measures

    result = evaluate_systems(toy, "test", systems, k=100, log=lambda *_: None)
    result["command"] = "lrem eval --data toy -s bm25 -s 'bm25+cot'"
    write_report(result, tmp_path, toy)
    run_lines = (tmp_path / "runs" / "bm25+cot.trec").read_text().splitlines()
    q1 = [ln.split() for ln in run_lines if ln.startswith("q1 ")]
    assert [(r[2], float(r[4])) for r in q1] == [(i, pytest.approx(sc, rel=1e-5))
                                                 for i, sc in result["runs"]["bm25+cot"]["q1"]]
    assert [int(r[3]) for r in q1] == list(range(1, len(q1) + 1)) and {r[1] for r in q1} == {"Q0"}
    assert q1[0][2] == "k1" and q1[0][5] == "bm25+cot" and float(q1[0][4]) >= float(q1[1][4])
    assert "q4 0 k3 7" in (tmp_path / "qrels.trec").read_text().splitlines()  # grade 3 as its gain 2^3 - 1
    assert "q7" not in (tmp_path / "qrels.trec").read_text()  # only the scored queries

    qrels = list(ir_measures.read_trec_qrels(str(tmp_path / "qrels.trec")))
    for name in systems:
        # trec_eval ranks by score (ties by id): BM25 has no ties in the top 10 here
        run = list(ir_measures.read_trec_run(str(tmp_path / "runs" / f"{name}.trec")))
        agg = ir_measures.calc_aggregate([ir_measures.R @ 10, ir_measures.nDCG @ 10], qrels, run)
        assert agg[ir_measures.R @ 10] == pytest.approx(result["systems"][name]["overall"]["hitrate@10"])
        # q4's grades 3 and 2: trec_eval's linear gains on qrels.trec give the report's exponential nDCG
        assert agg[ir_measures.nDCG @ 10] == pytest.approx(result["systems"][name]["overall"]["ndcg@10"])

    sig = {(r["a"], r["b"], r["metric"]): r for r in result["significance"]}
    assert set(sig) == {("bm25", "bm25+cot", "hitrate@10"), ("bm25", "bm25+cot", "ndcg@10")}
    hr = sig["bm25", "bm25+cot", "hitrate@10"]
    assert hr["mean_a"] == pytest.approx(result["systems"]["bm25"]["overall"]["hitrate@10"])
    assert hr["mean_b"] == pytest.approx(result["systems"]["bm25+cot"]["overall"]["hitrate@10"])
    nd = sig["bm25", "bm25+cot", "ndcg@10"]  # exponential gains, as ndcg_at
    assert nd["mean_b"] == pytest.approx(result["systems"]["bm25+cot"]["overall"]["ndcg@10"])
    # bm25+cot wins the 3 hard queries and ties the 3 easy ones: the exact sign-flip p is 2/8
    assert hr["diff"] == pytest.approx(0.5) and hr["p_rand"] == pytest.approx(0.25) and 0 < hr["p_t"] < 0.25
    report = (tmp_path / "report.md").read_text()
    for text in ("## Significance", "| bm25+cot | bm25 | hitrate@10 | 1.0000 | 0.5000 | +0.5000 |", "lrem eval --data toy -s bm25 -s 'bm25+cot'",
                 "## Systems", "runs/<system>.trec", "![quality versus cost](quality.png)"):
        assert text in report, text
    same = evaluate_systems(toy, "test", {"a": systems["bm25"], "b": systems["bm25"]}, log=lambda *_: None)
    assert {(r["p_t"], r["p_rand"]) for r in same["significance"]} == {(1.0, 1.0)}

    # depth k, not runs.jsonl's top 10: a system that ranks the whole catalog (BM25 hits, then ties at 0)
    deep = evaluate_systems(toy, "test", {"all": PaddedRetriever(systems["bm25"], sorted(TITLES))}, k=20,
                            log=lambda *_: None)
    write_report(deep, tmp_path / "deep", toy)
    lines = (tmp_path / "deep" / "runs" / "all.trec").read_text().splitlines()
    assert len(lines) == 6 * 20 and lines[19].split()[3] == "20"


def test_per_query_values_follow_the_systems_order_through_ties():
    """trec_eval re-sorts equal scores by id (here it would put "a" last); the tests compare the
    rankings the systems returned."""
    from lrem.evaluate import per_query_values

    tied = [[f"m{i:02d}", 0.0] for i in range(11)]
    values = per_query_values({"first": [["a", 0.0], *tied], "last": [*tied, ["a", 0.0]]},
                              {"first": {"a": 1}, "last": {"a": 1}, "none": {"a": 1}})
    assert values["hitrate@10"] == {"first": 1.0, "last": 0.0, "none": 0.0}
    assert values["ndcg@10"] == {"first": 1.0, "last": 0.0, "none": 0.0}


class PaddedRetriever:
    """BM25's hits, then every other catalog item at score 0 (ties, in id order)."""

    def __init__(self, bm25: BM25Retriever, item_ids: list[str]):
        self.bm25, self.item_ids = bm25, item_ids

    def search(self, queries: list[str], k: int = 10) -> list[SearchResult]:
        out = []
        for r in self.bm25.search(queries, k=k):
            seen = {h.item_id for h in r.hits}
            out.append(SearchResult((r.hits + [Hit(i, 0.0) for i in self.item_ids if i not in seen])[:k]))
        return out


def test_a_run_file_scores_as_the_system_that_wrote_it_and_fuses(toy, systems, tmp_path):
    """`run:FILE`: another engine's TREC run, here the report's own runs/*.trec, read back. It
    scores as the system that wrote it, and fuses as that system does."""
    from lrem.fusion import FusedRetriever
    from lrem.search import build_systems

    result = evaluate_systems(toy, "test", systems, k=100, log=lambda *_: None)
    write_report(result, tmp_path / "first", toy)
    runs = tmp_path / "first" / "runs"
    specs = {"prod": f"run:{runs / 'bm25.trec'}", "fused": f"run:{runs / 'bm25.trec'}+0.5*run:{runs / 'bm25+cot.trec'}"}
    again = evaluate_systems(toy, "test", build_systems(specs, toy, log=lambda *_: None), k=100, log=lambda *_: None)
    assert again["systems"]["prod"]["overall"] == result["systems"]["bm25"]["overall"]
    assert ({q: [i for i, _ in r] for q, r in again["runs"]["prod"].items()}
            == {q: [i for i, _ in r] for q, r in result["runs"]["bm25"].items()})
    direct = evaluate_systems(toy, "test", {"f": FusedRetriever([systems["bm25"], systems["bm25+cot"]], [1.0, 0.5])},
                              k=100, log=lambda *_: None)
    assert again["systems"]["fused"]["overall"] == direct["systems"]["f"]["overall"]
    assert again["systems"]["prod"]["retriever"] == "run file" and again["systems"]["prod"]["queries_missing"] == 1  # q6: BM25 found nothing, so the run has no line for it
    # "garden hose" is q2 (test) and q7 (train): the run ranks q2 only, so q2's ranking answers it
    assert build_systems({"p": specs["prod"]}, toy)["p"].search(["garden hose"], 3)[0].item_ids == \
        [i for i, _ in result["runs"]["bm25"]["q2"]][:3]


@pytest.mark.parametrize("line,where", [("q1 Q0 k1 1 0.5", ":2: expected 6 columns"),
                                        ("q1 Q0 k2 2 nan x", ":2: field 'score': 'nan' is not a finite number"),
                                        ("q1 Q0 k1 2 0.1 x", ":2: field 'item_id': 'k1' appears twice")])
def test_a_malformed_run_file_names_file_line_and_field(tmp_path, line, where):
    from lrem.data.formats import DataError
    from lrem.runfile import read_trec_run

    path = tmp_path / "run.trec"
    path.write_text(f"q1 Q0 k1 1 0.9 x\n{line}\n")
    with pytest.raises(DataError, match=re.escape(f"{path}{where}")):
        read_trec_run(path)
    path.write_text("q1 Q0 a 1 1.0 x\nq1 Q0 b 2 2.0 x\nq1 Q0 c 3 2.0 x\n\nq2 Q0 a 1 -1 x\n")
    assert read_trec_run(path) == {"q1": [("b", 2.0), ("c", 2.0), ("a", 1.0)], "q2": [("a", -1.0)]}  # by score


def test_min_relevance_counts_only_the_higher_grades(toy, systems, tmp_path):
    """ESCI's "Exact only" hit rate: at relevance 3, q4's 2-graded travel mug and q6's only item
    (2) stop counting, so q6 is no longer scored; grade 1 complements never count."""
    exact = toy.at_relevance(3)
    assert toy.at_relevance(1) is toy and exact.qrels["q4"] == {"k3": 3} and "q6" not in exact.qrels
    assert toy.qrels["q4"] == {"k3": 3, "k4": 2, "k6": 0}  # the loaded dataset is left as it was
    everything = evaluate_systems(toy, "test", systems, log=lambda *_: None)
    strict = evaluate_systems(exact, "test", systems, log=lambda *_: None)
    assert (everything["n_queries"], strict["n_queries"]) == (6, 5)
    data = tmp_path / "toy"
    save_dataset(toy, data)
    p = subprocess.run([sys.executable, "-m", "lrem.cli", "eval", "--data", str(data), "--split", "test", "-s", "bm25",
                        "--min-relevance", "3", "--out", str(tmp_path / "r"), "-k", "5"], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "note: k=5 retrieves less than the metrics' deepest cutoff; @10, @100 count only the top 5" in p.stderr
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["n_queries"] == 5 and metrics["k"] == 5
    assert metrics["systems"]["bm25"]["overall"] == pytest.approx(strict["systems"]["bm25"]["overall"])


# ---------------------------------------------------------------- run files and `lrem eval`'s checks


def test_a_run_file_answers_queries_of_the_same_text_by_id(toy, tmp_path):
    """Two test queries of one text, each with its own ranking in the run: each keeps its own
    (by text, q9 would get q1's), so the score is ir_measures' and runs/*.trec is the input."""
    import dataclasses

    import ir_measures

    from lrem.search import build_systems

    twin = dataclasses.replace(toy, queries={**toy.queries, "q9": Query("q9", "cast iron skillet", "kitchen", "test",
                                                                        False)},
                               qrels={**toy.qrels, "q9": {"k9": 2}})
    run = tmp_path / "prod.trec"
    run.write_text("q1 Q0 k1 1 9 x\nq1 Q0 k2 2 8 x\nq9 Q0 k9 1 7 x\nq9 Q0 k1 2 6 x\nq3 Q0 o1 1 5 x\n")
    result = evaluate_systems(twin, "test", build_systems({"p": f"run:{run}"}, twin, log=lambda *_: None),
                              log=lambda *_: None)
    assert result["examples"]["p"]["q9"]["top"] == ["k9", "k1"] and result["examples"]["p"]["q1"]["top"] == ["k1", "k2"]
    write_report(result, tmp_path / "r", twin)
    qrels = list(ir_measures.read_trec_qrels(str(tmp_path / "r" / "qrels.trec")))
    [r10] = ir_measures.calc_aggregate([ir_measures.R @ 10], qrels, list(ir_measures.read_trec_run(str(run)))).values()
    assert result["systems"]["p"]["overall"]["hitrate@10"] == pytest.approx(r10) == pytest.approx(3 / 7)  # q1, q9, q3
    rewritten = (tmp_path / "r" / "runs" / "p.trec").read_text().splitlines()
    assert sorted(ln.split()[:4] for ln in rewritten) == sorted(ln.split()[:4] for ln in run.read_text().splitlines())


def eval_cli(data, *args):
    """`lrem eval` in this process: (exit code, output, the exception it raised or None)."""
    from typer.testing import CliRunner

    from lrem.cli import app

    res = CliRunner().invoke(app, ["eval", "--data", str(data), "--split", "test", *map(str, args)])
    return res.exit_code, res.output, None if isinstance(res.exception, SystemExit) else res.exception


@pytest.fixture()
def toy_dir(toy, tmp_path):
    save_dataset(toy, tmp_path / "toy")
    return tmp_path / "toy"


def test_eval_examples_show_a_run_files_unknown_items_by_id(toy_dir, tmp_path):
    """A run from another system can name items this catalog lacks: the terminal's examples show
    their ids, as report.md does, instead of a KeyError after the report was written."""
    run = tmp_path / "other.trec"
    run.write_text("".join(f"q{n} Q0 zz{n} 1 9 x\nq{n} Q0 k1 2 8 x\n" for n in range(1, 7)))
    code, output, error = eval_cli(toy_dir, "-s", f"p=run:{run}", "--examples", "6", "--out", tmp_path / "r")
    assert (code, error) == (0, None), output
    assert "top: zz1, +cast iron skillet 12 inch" in output
    assert "- p: zz1; + cast iron skillet 12 inch" in (tmp_path / "r" / "report.md").read_text()


def test_eval_refuses_bad_inputs_before_any_system_is_built(toy_dir, tmp_path):
    """A missing --figure, an unknown --split and two system names sharing a runs/*.trec file are
    refused first: the malformed run file (read when the systems are built) is never reached,
    and no --out is made."""
    bad = tmp_path / "bad.trec"
    bad.write_text("q1 Q0 k1 1\n")
    out = tmp_path / "r"
    code, _, error = eval_cli(toy_dir, "-s", f"p=run:{bad}", "--figure", tmp_path / "nope.png", "--out", out)
    assert isinstance(error, FileNotFoundError) and str(error) == f"{tmp_path / 'nope.png'}: no such figure"
    code, _, error = eval_cli(toy_dir, "-s", f"p=run:{bad}", "--split", "tst", "--out", out)
    assert isinstance(error, ValueError) and "no queries in split 'tst'; available splits: test, train" in str(error)
    code, _, error = eval_cli(toy_dir, "-s", f"r/1=run:{bad}", "-s", "r_1=bm25", "--out", out)
    assert isinstance(error, ValueError) and str(error).startswith(
        "the systems 'r/1' and 'r_1' would both write runs/r_1.trec; rename one")
    assert not out.exists()
    code, _, error = eval_cli(toy_dir, "-s", f"p=run:{bad}", "--out", out)  # the run file is read next
    assert "expected 6 columns" in str(error)


def test_two_system_names_never_share_a_trec_file(toy, systems, tmp_path):
    result = evaluate_systems(toy, "test", {"r/1": systems["bm25"], "R_1": systems["bm25+cot"]}, log=lambda *_: None)
    with pytest.raises(ValueError, match="'r/1' and 'R_1' would both write runs/R_1.trec"):  # a case-blind disk too
        write_report(result, tmp_path / "r", toy)
    assert not (tmp_path / "r").exists()  # refused before anything is written


def test_eval_overwrite_replaces_only_an_earlier_report(toy_dir, tmp_path):
    """--overwrite refreshes an eval report, but never writes into another lrem output (a model)."""
    from lrem._io import MARKER

    model = tmp_path / "model"
    model.mkdir()
    (model / MARKER).write_text("{}\n")
    (model / "config.json").write_text("{}\n")
    code, _, error = eval_cli(toy_dir, "-s", "bm25", "--overwrite", "--out", model)
    assert isinstance(error, ValueError) and str(error).startswith(f"--out {model}: an lrem output, but not a `lrem eval`")
    assert sorted(p.name for p in model.iterdir()) == sorted([MARKER, "config.json"])
    for _ in range(2):  # a new folder, then the report it holds
        code, output, error = eval_cli(toy_dir, "-s", "bm25", "--overwrite", "--out", tmp_path / "r")
        assert (code, error) == (0, None), output
    assert (tmp_path / "r" / "runs" / "bm25.trec").is_file()


def test_a_run_file_with_tied_scores_keeps_lrems_order_for_trec_tools(tmp_path):
    """trec_eval and ir_measures order a query's lines by score and break ties by item id
    (descending), not by rank: tied scores (common in RRF) are written strictly decreasing, so
    they score lrem's ranking."""
    import ir_measures

    from lrem.runfile import read_trec_run, trec_run_lines

    run = {"q1": [("a", 0.5), ("b", 0.5), ("c", 0.5), ("d", 0.25)], "q2": [("x", 0.01), ("y", 0.02)]}
    path = tmp_path / "run.trec"
    path.write_text("".join(line + "\n" for line in trec_run_lines("rrf", run)))
    back = read_trec_run(path)
    assert [i for i, _ in back["q1"]] == ["a", "b", "c", "d"] and [i for i, _ in back["q2"]] == ["x", "y"]
    scores = [s for _, s in back["q1"]]
    assert all(x > y for x, y in zip(scores, scores[1:])) and abs(scores[2] - 0.5) < 1e-6
    qrels = [ir_measures.Qrel("q1", "b", 1), ir_measures.Qrel("q2", "y", 1)]
    mrr = ir_measures.calc_aggregate([ir_measures.RR], qrels, ir_measures.read_trec_run(str(path)))[ir_measures.RR]
    assert mrr == (1 / 2 + 1 / 2) / 2  # lrem's ranks: b second, y second (ties by id would put b, y first)


def test_a_report_never_goes_into_a_folder_lrem_did_not_write_or_another_commands(toy, systems, tmp_path):
    """write_report, construct and embed_catalog (the library, not only the CLI) refuse a user's
    non-empty folder, which they would otherwise mark as lrem's for a later --overwrite to delete,
    and another command's output."""
    from lrem._io import MARKER, OutputError
    from lrem.construct import construct
    from lrem.embed import embed_catalog

    result = evaluate_systems(toy, "test", {"bm25": systems["bm25"]}, log=lambda *_: None)
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(OutputError, match="not written by lrem"):
        write_report(result, mine, toy)
    with pytest.raises(OutputError, match="not written by lrem"):
        construct(toy, mine)
    with pytest.raises(OutputError, match="not a chunk folder"):
        embed_catalog(None, {"a": "tea"}, mine)
    assert sorted(p.name for p in mine.iterdir()) == ["cat.jpg"]  # not marked, nothing written
    model = tmp_path / "model"
    model.mkdir()
    (model / MARKER).write_text("{}\n")
    (model / "config.json").write_text("{}\n")
    with pytest.raises(OutputError, match="not a `lrem eval` report"):
        write_report(result, model, toy)
    with pytest.raises(OutputError, match="not a `lrem construct` run"):
        construct(toy, model)
    assert sorted(p.name for p in model.iterdir()) == sorted([MARKER, "config.json"])
