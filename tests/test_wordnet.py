"""The WordNet product benchmark, built from the real WordNet 3.0 files (no mocks)."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from lrem.data import build_wordnet, content_words, save_dataset
from lrem.data.wordnet import WordNetNouns, parse_data_line

WORDNET = Path("/usr/share/wordnet")

if not (WORDNET / "data.noun").is_file():
    if os.environ.get("CI"):
        raise RuntimeError(f"WordNet files missing at {WORDNET} (install wordnet-base)")
    pytest.skip(f"WordNet files not found at {WORDNET}", allow_module_level=True)


@pytest.fixture(scope="module")
def built():
    lines = []
    return build_wordnet(WORDNET, log=lines.append), lines


@pytest.fixture(scope="module")
def wn():
    return WordNetNouns(WORDNET)


def test_content_words():
    assert content_words("A bottle opener that pulls corks") == {"bottle", "opener", "pull", "cork"}
    assert content_words("Cups, 2 mugs; and the knives!") == {"cup", "2", "mug", "knive"}
    assert content_words("knife") == {"knife"}  # no real stemming: knives/knife do not match
    assert content_words("bus gas of the") == {"bus", "gas"}  # short words keep their s
    assert content_words("") == set()


def test_parse_data_line():
    line = ('03109150 06 n 02 corkscrew 0 bottle_screw 0 001 @ 02877962 n 0000 '
            '| a bottle opener that pulls corks; "he lost the corkscrew"  \n')
    syn = parse_data_line(line)
    assert (syn.offset, syn.lemmas, syn.pointers) == ("03109150", ["corkscrew", "bottle screw"], [("@", "02877962")])
    assert syn.definition == "a bottle opener that pulls corks"


def test_catalog_item_title_and_category(built, wn):
    ds, _ = built
    offset = wn.senses("corkscrew")[0]
    item = ds.catalog[f"{offset}-n"]
    assert "corkscrew" in item.title
    hypernym = wn.synset(wn.synset(offset).first("@"))
    assert item.category == hypernym.lemmas[0] == "bottle opener"
    for lemma, sense in (("artifact", 0), ("food", 0), ("food", 1)):  # roots are items too
        assert f"{wn.senses(lemma)[sense]}-n" in ds.catalog
    assert 10_000 <= len(ds.catalog) <= 15_000


def test_definition_query(built, wn):
    ds, _ = built
    item_id = f"{wn.senses('corkscrew')[0]}-n"
    query = ds.queries[f"def-{item_id}"]
    assert (query.text, query.category) == ("a bottle opener that pulls corks", "definition")
    assert ds.qrels[query.query_id] == {item_id: 1}
    assert query.hard is False  # "bottle" is in the title "corkscrew, bottle screw"


def test_category_queries(built):
    ds, _ = built
    category = [q for q in ds.queries.values() if q.category == "category"]
    assert len(category) > 500
    for q in category:
        relevant = ds.relevant(q.query_id)
        offset = q.query_id.split("-")[2]
        assert f"{offset}-n" in relevant and 4 <= len(relevant) <= 201
    assert {q.query_id.split("-")[1] for q in category} == {"lemma", "gloss"}


def test_splits_are_by_synset_and_disjoint(built):
    ds, _ = built
    split_of_synset, texts = {}, {}
    for q in ds.queries.values():
        offset = q.query_id.rsplit("-", 2)[-2]
        assert split_of_synset.setdefault(offset, q.split) == q.split
        norm = " ".join(q.text.lower().split())
        assert texts.setdefault(norm, q.split) == q.split
    share = Counter(split_of_synset.values())
    total = sum(share.values())
    assert abs(share["train"] / total - 0.8) < 0.03
    assert abs(share["dev"] / total - 0.1) < 0.02 and abs(share["test"] / total - 0.1) < 0.02


def test_hard_flags_and_log(built):
    ds, lines = built
    hard = Counter(q.category for q in ds.queries.values() if q.hard)
    assert 0 < hard["definition"] < sum(q.category == "definition" for q in ds.queries.values())
    assert hard["category"] > 0
    assert lines[0].startswith(f"wordnet: {len(ds.catalog)} items")
    assert any(line.strip().startswith("test:") and "hard" in line for line in lines)


def test_builds_are_byte_identical(built, tmp_path):
    ds, _ = built
    save_dataset(ds, tmp_path / "a")
    save_dataset(build_wordnet(WORDNET, log=lambda *_: None), tmp_path / "b")
    for name in ("catalog.jsonl", "queries.jsonl", "qrels.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
