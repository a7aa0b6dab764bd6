"""The learned router (lrem.router.LearnedRouter, fit_router, `lrem router fit`): its features and
logistic regression by hand, and a fit on a real run (tiny random model, real FAISS index over
the test_router catalog) whose router.json, saved in the model folder, drives `auto`."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_router import QUERIES, TITLES

from lrem._io import OutputError
from lrem.data import Dataset, Item, Query, save_dataset
from lrem.evaluate import evaluate_systems
from lrem.index import ItemIndex
from lrem.model import LREM
from lrem.router import (FEATURES, MIN_SAMPLES, ROUTER_FILE, LearnedRouter, Router, fit_logistic, fit_router,
                         learn_router, query_features, reciprocal_rank, router_target)
from lrem.search import Searcher, build_systems
from lrem.serve import ServeConfig

QRELS = {f"q{j}": {f"i{j % len(TITLES)}": 1} for j in range(len(QUERIES))}
CATALOG = {f"i{j}": t for j, t in enumerate(TITLES)}


# ---------------------------------------------------------------- pure functions

def test_query_features_by_hand():
    scores = np.array([[0.9, 0.7, 0.6, 0.2], [0.5, 0.5, 0.5, 0.5]])
    x = query_features(["Which mug holds 500 ml?", "teapot"], scores, depth=3)
    want = {"top1": [0.9, 0.5], "gap": [0.2, 0.0], "margin": [0.3, 0.0], "mean": [(0.9 + 0.7 + 0.6) / 3, 0.5],
            "words": [5, 1], "chars": [23, 6], "digits": [3, 0], "question": [1, 0]}
    assert list(FEATURES) == list(want)
    np.testing.assert_allclose(x, np.array(list(want.values())).T, atol=1e-12)
    # a chosen subset, in its order; fewer hits than depth: the last one stands for top-depth
    np.testing.assert_allclose(query_features(["a b", "how"], scores[:, :2], depth=10, names=("question", "margin")),
                               [[0.0, 0.2], [1.0, 0.0]], atol=1e-12)
    with pytest.raises(ValueError, match="unknown router feature"):
        query_features(["a"], scores[:1], names=("top1", "clicks"))
    with pytest.raises(ValueError, match="2 queries for 1 rows"):
        query_features(["a", "b"], scores[:1])


def test_reciprocal_rank_counts_only_the_top_k():
    assert reciprocal_rank(["a", "b", "c"], {"b", "c"}, 10) == 0.5
    assert reciprocal_rank(["a", "b", "c"], {"c"}, 2) == 0.0
    assert reciprocal_rank([], {"c"}, 5) == 0.0


def test_fit_logistic_reaches_the_penalised_optimum():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 4))
    y = (x @ np.array([2.0, -1.0, 0.0, 0.5]) + 0.5 * rng.standard_normal(200) > 0.3).astype(float)
    for l2 in (0.1, 1.0, 10.0):
        w, b = fit_logistic(x, y, l2=l2)
        p = 1 / (1 + np.exp(-(x @ w + b)))
        np.testing.assert_allclose(x.T @ (p - y) + l2 * w, 0, atol=1e-6)  # gradient of the objective is 0
        assert abs(np.sum(p - y)) < 1e-6  # the unpenalised bias: mean prediction = mean label
    w, b = fit_logistic(x, y, l2=0.1)
    assert np.mean((x @ w + b > 0) == y) > 0.85 and w[0] > 0 > w[1]
    w_strong, _ = fit_logistic(x, y, l2=1000.0)
    assert np.abs(w_strong).sum() < np.abs(w).sum() / 5  # the penalty shrinks the weights
    with pytest.raises(ValueError, match="l2=0"):
        fit_logistic(x, y, l2=0)


def _synthetic(n=400, seed=0):
    """Direct scores where reasoning wins exactly for ambiguous queries (top-1 - top-10 < 0.05)."""
    rng = np.random.default_rng(seed)
    top1 = rng.uniform(0.5, 0.9, n)
    margin = rng.uniform(0.0, 0.2, n)
    scores = top1[:, None] - np.linspace(0, 1, 10)[None, :] * margin[:, None]  # (n, 10), best first
    queries = [" ".join(["word"] * int(w)) for w in rng.integers(1, 8, n)]
    wins = margin < 0.05
    rr_direct = np.where(wins, 0.2, 0.5)
    rr_reason = np.where(wins, 1.0, rng.choice([0.5, 0.25], n))  # otherwise a tie or a loss
    return queries, scores, rr_direct, rr_reason


def test_learn_router_finds_when_reasoning_wins_and_measures_it_held_out():
    queries, scores, rr_direct, rr_reason = _synthetic()
    router = learn_router(query_features(queries, scores), rr_direct, rr_reason, holdout=0.25, l2=0.1,
                          fitted={"data": "synthetic"})
    f, h = router.fitted, router.fitted["heldout"]
    assert f["data"] == "synthetic" and f["queries"] == 400 and f["train_queries"] == 300 and h["queries"] == 100
    assert f["reason_won"] == int(np.sum(rr_reason > rr_direct))  # ties and losses: direct
    assert h["accuracy"] >= 0.9 > h["majority_accuracy"]
    assert router.weights[list(FEATURES).index("margin")] < 0  # a smaller margin: more likely to gain
    assert h["mrr_direct"] < h["mrr_routed"] <= h["mrr_oracle"] and h["mrr_reason"] < h["mrr_routed"]
    # the router returned is the one measured: its decisions on all queries reproduce the accuracy's sense
    decided = np.array(router.decide(queries, scores))
    assert np.mean(decided == (rr_reason > rr_direct)) >= 0.9
    assert abs(decided.mean() - np.mean(rr_reason > rr_direct)) < 0.1
    assert learn_router(query_features(queries, scores), rr_direct, rr_reason, holdout=0.0).fitted["heldout"] is None


def test_learn_router_refuses_one_outcome_and_bad_input():
    queries, scores, rr_direct, _ = _synthetic(50)
    x = query_features(queries, scores)
    with pytest.raises(ValueError, match="beat direct on 0 of 38"):
        learn_router(x, rr_direct, rr_direct)  # every query a tie: nothing to learn
    with pytest.raises(ValueError, match="holdout"):
        learn_router(x, rr_direct, rr_direct + 1, holdout=1.0)
    with pytest.raises(ValueError, match="expected"):
        learn_router(x[:, :3], rr_direct, rr_direct + 1)


def _margin_router(**kwargs) -> LearnedRouter:
    """A hand-set router: P(gain) falls with the margin (no fitting involved)."""
    return LearnedRouter(("margin", "words"), mean=[0.125, 3.0], scale=[0.0625, 2.0], weights=[-3.0, 0.0], bias=0.0,
                         depth=2, **kwargs)


def test_learned_router_threshold_and_share_budget():
    scores = np.array([[1.0, 1.0 - m] for m in (0.0, 0.0625, 0.125, 0.1875, 0.375)])  # exact in binary
    queries = ["q"] * 5
    p = _margin_router().proba(queries, scores)
    assert np.all(np.diff(p) < 0) and p[2] == 0.5  # margin 0.125 is the mean: P = sigmoid(0)
    assert _margin_router(threshold=0.5).decide(queries, scores) == [True, True, False, False, False]
    assert _margin_router(threshold=0.96).decide(queries, scores) == [True, False, False, False, False]
    assert _margin_router(share=1.0).decide(queries, scores) == [True] * 5
    rng = np.random.default_rng(0)
    for scale in (0.01, 1.0):  # whatever the score scale, about `share` of the queries reason
        router = _margin_router(share=0.3)
        routed = []
        for _ in range(40):
            top1 = rng.uniform(0.5, 1.0, size=10)
            routed += router.decide(["q"] * 10, np.stack([top1, top1 - scale * rng.uniform(0, 1, 10)], axis=1))
        later = routed[MIN_SAMPLES:]
        assert 0.2 < sum(later) / len(later) < 0.4, scale
        assert router.describe()["probabilities_seen"] == 400 and router.describe()["kind"] == "learned"
    budget = _margin_router(threshold=0.7).with_share(0.4)
    assert budget.share == 0.4 and budget.threshold == 0.7 and budget.describe()["probabilities_seen"] == 0
    json.dumps(_margin_router(share=1.0).describe(), allow_nan=False)  # /info stays valid JSON
    json.dumps(Router(share=1.0).describe(), allow_nan=False)


def test_router_json_round_trip_and_bad_files(tmp_path):
    router = _margin_router(threshold=0.3, fitted={"queries": 7})
    router.save(tmp_path / "r.json")
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["format"] == "lrem-router" and saved["features"] == ["margin", "words"] and "share" not in saved
    loaded = LearnedRouter.load(tmp_path / "r.json")
    scores = np.array([[0.9, 0.85], [0.9, 0.6]])
    np.testing.assert_allclose(loaded.proba(["a", "b c"], scores), router.proba(["a", "b c"], scores))
    assert loaded.threshold == 0.3 and loaded.depth == 2 and loaded.fitted == {"queries": 7}
    bad = {"not json": "{", "no format": {"kind": "logistic"}, "version 2": {**saved, "version": 2},
           "missing weights": {k: v for k, v in saved.items() if k != "weights"},
           "unknown feature": {**saved, "features": ["margin", "clicks"]},
           "one weight for two": {**saved, "weights": [1.0]}, "nan": {**saved, "mean": [float("nan"), 1.0]},
           "zero scale": {**saved, "scale": [0.0, 1.0]}, "threshold 2": {**saved, "threshold": 2}}
    for what, content in bad.items():
        path = tmp_path / f"{what}.json"
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(ValueError, match="json: ") as e:
            LearnedRouter.load(path)
        assert str(path) in str(e.value), what


# ---------------------------------------------------------------- a real fit

@pytest.fixture(scope="module")
def lrem_dir(tiny, tmp_path_factory):
    """The tiny model saved as an LREM folder (no router.json yet)."""
    out = tmp_path_factory.mktemp("tiny-lrem") / "model"
    tiny.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def plain(lrem_dir):
    """A searcher over the test catalog, its model loaded before any router.json exists."""
    model = LREM.from_pretrained(str(lrem_dir), dtype="float32")
    assert model.router is None
    return Searcher(model, ItemIndex.build(model, CATALOG, show_progress=False))


def test_fit_router_labels_match_the_two_modes_searched(plain):
    queries = {f"q{j}": t for j, t in enumerate(QUERIES)}
    queries["q-unjudged"] = "no relevant item"  # left out: nothing to label it by
    router = fit_router(plain, queries, QRELS, k=10, holdout=0.25, data="toy:dev", log=lambda m: None)
    f = router.fitted
    assert f["queries"] == len(QUERIES) and f["train_queries"] == 18 and f["heldout"]["queries"] == 6
    assert f["data"] == "toy:dev" and f["model"] == plain.model.source and f["k"] == 10
    direct = plain.search(QUERIES, k=10, mode="direct")
    reason = plain.search(QUERIES, k=10, mode="reason")
    won = [reciprocal_rank(r.item_ids, set(QRELS[f"q{j}"]), 10) > reciprocal_rank(d.item_ids, set(QRELS[f"q{j}"]), 10)
           for j, (d, r) in enumerate(zip(direct, reason))]
    assert f["reason_won"] == sum(won) and 0 < sum(won) < len(QUERIES)
    assert router.features == tuple(FEATURES) and np.isfinite(router.weights).all()
    with pytest.raises(ValueError, match="at least 10"):
        fit_router(plain, {"q0": QUERIES[0]}, QRELS, log=lambda m: None)


@pytest.fixture(scope="module")
def routed_dir(plain, lrem_dir):
    """The model folder with a router.json fitted on the test queries, its threshold set to the
    median probability (about half the queries reason)."""
    router = fit_router(plain, {f"q{j}": t for j, t in enumerate(QUERIES)}, QRELS, log=lambda m: None)
    scores, _ = plain.index.search(plain.model.encode_queries(QUERIES, mode="direct").embeddings, 10)
    router.threshold = float(np.median(router.proba(QUERIES, scores)))
    router.save(router_target(lrem_dir, str(lrem_dir)))
    return lrem_dir


def test_router_json_in_the_model_folder_drives_auto(plain, routed_dir, tmp_path):
    model = LREM.from_pretrained(str(routed_dir), dtype="float32")
    assert isinstance(model.router, LearnedRouter)
    learned = Searcher(model, plain.index)
    assert learned.router is model.router and isinstance(plain.router, Router)
    scores, _ = plain.index.search(model.encode_queries(QUERIES, mode="direct").embeddings, 10)
    expected = (model.router.proba(QUERIES, scores) > model.router.threshold).tolist()
    results, routed = learned.search_auto(QUERIES, k=5)
    assert routed == expected and 0 < sum(routed) < len(QUERIES)
    _, margin_routed = plain.search_auto(QUERIES, k=5)
    assert routed != margin_routed  # the file changed which queries reason
    reasoned = iter(learned.search([q for q, r in zip(QUERIES, routed) if r], k=5, mode="reason"))
    direct = learned.search(QUERIES, k=5, mode="direct")
    for res, was, d in zip(results, routed, direct):
        expected = next(reasoned) if was else d
        assert res.item_ids == expected.item_ids and res.cot == expected.cot
    # the router belongs to these weights: saving the model again does not carry it over
    model.save_pretrained(tmp_path / "again")
    assert not (tmp_path / "again" / ROUTER_FILE).exists()
    assert LREM.from_pretrained(str(tmp_path / "again"), dtype="float32").router is None


def test_serve_and_eval_use_the_learned_router(plain, routed_dir, tmp_path):
    model = LREM.from_pretrained(str(routed_dir), dtype="float32")
    assert ServeConfig().router(model.router).describe()["kind"] == "learned"
    budget = ServeConfig(router_share=0.3).router(model.router)
    assert budget.share == 0.3 and budget is not model.router and model.router.share == 0.0
    assert isinstance(ServeConfig(router_kind="margin").router(model.router), Router)
    assert isinstance(ServeConfig().router(None), Router)
    with pytest.raises(ValueError, match="router_kind"):
        ServeConfig(router_kind="learned")

    idx = tmp_path / "idx"
    plain.index.save(idx)
    meta = json.loads((idx / "meta.json").read_text())
    assert meta["model"] == str(routed_dir)  # eval loads the model, and its router.json, from here
    catalog = {i: Item(i, t) for i, t in CATALOG.items()}
    queries = {f"q{j}": Query(f"q{j}", t, "demo", "dev") for j, t in enumerate(QUERIES)}
    ds = Dataset(catalog, queries, QRELS, name="toy")
    systems = build_systems({"auto": f"{idx}:auto", "margin": f"{idx}:auto-margin", "half": f"{idx}:auto@0.5",
                             "mhalf": f"{idx}:auto-margin@0.5"}, ds, log=lambda m: None)
    result = evaluate_systems(ds, "dev", systems, k=10, log=lambda m: None)
    s = result["systems"]
    assert s["auto"]["mode"] == "auto (learned router)" and s["margin"]["mode"] == "auto (margin router)"
    assert s["half"]["mode"] == "auto@0.5 (learned router)" and s["mhalf"]["mode"] == "auto@0.5 (margin router)"
    assert abs(s["auto"]["reasoned_share"] - 0.5) <= 1 / 24  # the threshold: the median of their probabilities
    assert s["margin"]["reasoned_share"] == plain.search_auto(QUERIES, k=10)[1].count(True) / len(QUERIES)
    with pytest.raises(ValueError, match="auto-margin"):
        build_systems({"bad": f"{idx}:direct-margin"}, ds)


# ---------------------------------------------------------------- the command

def _lrem(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "lrem.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def test_router_fit_command_writes_router_json_and_refuses_bad_outputs(tiny, tmp_path):
    model_dir = tmp_path / "model"
    tiny.save_pretrained(model_dir)
    data = tmp_path / "data"
    save_dataset(Dataset({i: Item(i, t) for i, t in CATALOG.items()},
                         {f"q{j}": Query(f"q{j}", t, "demo", "train") for j, t in enumerate(QUERIES)}, QRELS,
                         name="toy"), data)
    model = LREM.from_pretrained(str(model_dir), dtype="float32")
    ItemIndex.build(model, CATALOG, show_progress=False).save(tmp_path / "idx")
    fit = ["router", "fit", "--index", tmp_path / "idx", "--data", data, "--queries", 24, "--threads", 1]

    p = _lrem(*fit, "--out", model_dir)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "held out 6: accuracy" in p.stdout and "would reason on" in p.stdout and "of 24 queries" in p.stdout
    saved = json.loads((model_dir / ROUTER_FILE).read_text())
    assert saved["fitted"]["queries"] == 24 and saved["fitted"]["data"] == f"{data}:train"
    assert saved["fitted"]["index"] == str(tmp_path / "idx")
    assert isinstance(LREM.from_pretrained(str(model_dir), dtype="float32").router, LearnedRouter)

    other = tmp_path / "other-model"
    tiny.save_pretrained(other)
    (tmp_path / "notes.json").write_text("{\"mine\": 1}\n")
    (tmp_path / "plain").mkdir()
    refused = {"exists (an earlier router); pass --overwrite": (model_dir, False),
               "not this folder": (other, True),
               "not an LREM model folder": (tmp_path / "plain", True),
               "not a router file lrem wrote": (tmp_path / "notes.json", True),
               "ending in .json": (tmp_path / "router.txt", True)}
    for message, (out, overwrite) in refused.items():
        with pytest.raises(OutputError, match=re.escape(message)):
            router_target(out, str(model_dir), overwrite=overwrite)
    for args, message in ((("--out", model_dir), "exists (an earlier router); pass --overwrite"),
                          (("--out", tmp_path / "r.json", "--split", "test"), "no queries in split 'test'")):
        p = _lrem(*fit, *args)  # refused before the model loads: exit 2, one line
        assert p.returncode == 2 and message in " ".join(p.stderr.split()), (message, p.stderr[-1000:])
        assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert json.loads((tmp_path / "notes.json").read_text()) == {"mine": 1}  # untouched
    assert not (other / ROUTER_FILE).exists() and not (tmp_path / "r.json").exists()

    p = _lrem(*fit, "--out", tmp_path / "r.json", "--seed", 1)
    assert p.returncode == 0 and json.loads((tmp_path / "r.json").read_text())["fitted"]["seed"] == 1
    p = _lrem(*fit, "--out", model_dir, "--overwrite", "--threshold", 0.2)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((model_dir / ROUTER_FILE).read_text())["threshold"] == 0.2


def test_a_router_fitted_on_other_weights_is_refused(plain, routed_dir, tmp_path):
    """router.json records the weights it was fitted on; beside another model (copied into a retrained
    folder or a delta's), loading it with that model's fingerprint is an error, not a silent misroute."""
    from lrem.index_base import model_fingerprint
    from lrem.router import load_router

    mine = model_fingerprint(plain.model)
    assert json.loads((routed_dir / ROUTER_FILE).read_text())["fitted"]["model_fingerprint"] == mine
    assert isinstance(load_router(routed_dir, mine), LearnedRouter)
    other = LREM.from_pretrained(str(routed_dir), dtype="float32")
    with torch.no_grad():
        next(m for m in other.lm.modules() if isinstance(m, torch.nn.Linear)).weight[0] += 0.5  # other weights
    other.save_pretrained(tmp_path / "retrained")
    (tmp_path / "retrained" / ROUTER_FILE).write_text((routed_dir / ROUTER_FILE).read_text())
    theirs = model_fingerprint(other)
    assert theirs != mine
    with pytest.raises(ValueError, match=f"fitted on other weights \\(model fingerprint {mine}\\).*refit"):
        load_router(tmp_path / "retrained", theirs)
    # what `lrem search` / `lrem serve` meet: the folder's router, or one passed in, beside other weights
    retrained = LREM.from_pretrained(str(tmp_path / "retrained"), dtype="float32")
    with pytest.raises(ValueError, match=f"retrained/router.json: fitted on other weights \\(model fingerprint {mine}\\)"):
        Searcher(retrained, plain.index)
    with pytest.raises(ValueError, match="^router: fitted on other weights"):
        Searcher(other, plain.index, router=plain.model.router or load_router(routed_dir))
    assert isinstance(Searcher(LREM.from_pretrained(str(routed_dir), dtype="float32"), plain.index).router,
                      LearnedRouter)  # its own weights: taken
    # a router written before the fingerprint was recorded loads as before
    old = json.loads((routed_dir / ROUTER_FILE).read_text())
    del old["fitted"]["model_fingerprint"]
    (tmp_path / "retrained" / ROUTER_FILE).write_text(json.dumps(old))
    assert isinstance(load_router(tmp_path / "retrained", theirs), LearnedRouter)


def test_a_router_file_with_a_fractional_depth_is_refused(tmp_path):
    """depth 2.5 in router.json was read as 2; a count must be whole."""
    d = LearnedRouter(["margin"], [0.0], [1.0], [1.0], 0.0).to_dict()
    for bad in (2.5, float("inf"), True, "10"):
        with pytest.raises(ValueError, match=r"depth="):
            LearnedRouter.from_dict({**d, "depth": bad}, "r.json")
    assert LearnedRouter.from_dict({**d, "depth": 12.0}, "r.json").depth == 12
