"""`MODEL:cots=FILE` systems: each query embedded after a CoT from a file (e.g. the teacher's)."""
from __future__ import annotations

import json

import pytest

from lrem.data import Dataset, Item, Query
from lrem.evaluate import evaluate_systems
from lrem.index import ItemIndex
from lrem.search import Searcher, build_systems, load_cots

TITLES = ["corkscrew, bottle screw", "teapot", "coffee, java", "mug", "spatula", "wine glass", "sofa, couch", "rug"]
QUERIES = ["a device for pulling corks", "hot drink", "something to sit on", "cup"]


def test_cot_file_system_embeds_after_the_files_cots(tiny, tmp_path):
    catalog = {f"i{j}": Item(f"i{j}", t) for j, t in enumerate(TITLES)}
    ds = Dataset(catalog, {f"q{j}": Query(f"q{j}", t, "demo", "dev") for j, t in enumerate(QUERIES)},
                 {f"q{j}": {f"i{j}": 1} for j in range(len(QUERIES))}, name="toy")
    searcher = Searcher(tiny, ItemIndex.build(tiny, {i: it.title for i, it in catalog.items()}))
    searcher.index.save(tmp_path / "idx")
    cots = {"a device for pulling corks": "corkscrew, wine opener", "hot drink": "coffee, tea"}  # none for 2
    path = tmp_path / "cots.jsonl"
    path.write_text("".join(json.dumps({"query_id": "x", "query": q, "cot": c}) + "\n" for q, c in cots.items())
                    + json.dumps({"query": "cup", "status": "easy"}) + "\n")  # an outcome row without a CoT
    assert load_cots(path) == cots | {"cup": ""}
    system = build_systems({"t": f"{tmp_path / 'idx'}:cots={path}"}, ds, log=lambda m: None)["t"]
    got = system.search(QUERIES, k=3)
    want = searcher.search(QUERIES, k=3, mode="reason", cots=[cots.get(q, "") for q in QUERIES])
    assert [r.item_ids for r in got] == [r.item_ids for r in want] and [r.cot for r in got] == [cots.get(q, "") for q in QUERIES]
    direct = searcher.search(QUERIES[:1], k=len(TITLES), mode="direct")[0]
    assert [h.score for h in got[0].hits] != [h.score for h in direct.hits[:3]]  # the CoT changed the embedding
    result = evaluate_systems(ds, "dev", {"t": system}, k=3, log=lambda m: None)
    assert result["systems"]["t"]["reasoned_share"] == 0.0 and "cots=" in result["systems"]["t"]["mode"]
    path.write_text('{"query": 3, "cot": "x"}\n')
    with pytest.raises(ValueError, match="cots.jsonl:1"):
        load_cots(path)
