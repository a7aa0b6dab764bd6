"""A lexical-gap product-search benchmark built from WordNet 3.0 nouns (no nltk needed).

The catalog is every artifact and food synset; queries describe a product without naming it
(its definition) or ask for a whole category (its lemma or definition). Many definitions share
no word with the product's name, which is exactly the gap a reasoning embedder should close.
Everything is derived from Debian's `wordnet-base` files, so the build is offline,
deterministic and takes a few seconds.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .formats import Dataset, Item, Query, hash_split, validate_dataset

ROOTS = (("artifact", 1), ("food", 1), ("food", 2))  # lemma, sense number (artifact.n.01, ...)
MIN_CATEGORY, MAX_CATEGORY = 3, 200  # descendants a synset needs to become a category query
HYPONYM_POINTERS = ("~", "~i")

STOPWORDS = frozenset("""
a an the and or but nor of for to in on at by with from into onto over under as than then
that this these those which who whom whose what when where while is are was were be been being
it its it's their them they he she his her you your we our not no any some such other used use
usually especially often something someone one etc e g i ie
""".split())


@dataclass
class Synset:
    offset: str
    lemmas: list[str]  # with spaces, in WordNet order
    pointers: list[tuple[str, str]]  # (symbol, target offset), noun targets only
    definition: str

    @property
    def item_id(self) -> str:
        return f"{self.offset}-n"

    def first(self, symbol: str) -> str | None:
        return next((off for sym, off in self.pointers if sym == symbol), None)


def content_words(text: str) -> set[str]:
    """Lowercase word tokens minus stopwords, crudely singularised ("cups" -> "cup").

    Used to decide whether a query shares any vocabulary with a product title.
    """
    words = set()
    for token in re.findall(r"[a-z0-9]+", text.lower()):
        if token in STOPWORDS:
            continue
        words.add(token[:-1] if len(token) > 3 and token.endswith("s") else token)
    return words


def _normalise(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


# ----------------------------------------------------------------------------- parsing

class WordNetNouns:
    """Lazy reader of data.noun/index.noun: lines are indexed by offset, parsed on demand."""

    def __init__(self, wordnet_dir):
        self.dir = Path(wordnet_dir)
        self._lines: dict[str, str] = {}
        with open(self.dir / "data.noun", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.startswith("  "):  # license header lines start with two spaces
                    self._lines[line[:8]] = line
        self._parsed: dict[str, Synset] = {}

    def synset(self, offset: str) -> Synset:
        if offset not in self._parsed:
            self._parsed[offset] = parse_data_line(self._lines[offset])
        return self._parsed[offset]

    def senses(self, lemma: str) -> list[str]:
        """Synset offsets of a noun lemma in sense order, from index.noun."""
        key = lemma.replace(" ", "_").lower() + " "
        with open(self.dir / "index.noun", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(key):
                    fields = line.split()
                    return fields[-int(fields[2]):]  # synset_cnt offsets end the line
        raise KeyError(f"{lemma!r} not in {self.dir / 'index.noun'}")


def parse_data_line(line: str) -> Synset:
    """One data.noun line: offset lex_filenum ss_type w_cnt word lex_id ... p_cnt pointers | gloss."""
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    n_words = int(fields[3], 16)
    lemmas = [w.replace("_", " ") for w in fields[4:4 + 2 * n_words:2]]
    at = 4 + 2 * n_words
    n_pointers = int(fields[at])
    pointers = []
    for i in range(at + 1, at + 1 + 4 * n_pointers, 4):
        symbol, target, pos = fields[i:i + 3]
        if pos == "n":
            pointers.append((symbol, target))
    definition = gloss.split('; "')[0].strip().rstrip(";").strip()
    return Synset(fields[0], lemmas, pointers, definition)


# ----------------------------------------------------------------------------- building

def _catalog_offsets(wn: WordNetNouns) -> list[str]:
    """All synsets reachable from the roots through hyponym pointers (roots included)."""
    todo = [wn.senses(lemma)[sense - 1] for lemma, sense in ROOTS]
    seen = set(todo)
    while todo:
        for sym, target in wn.synset(todo.pop()).pointers:
            if sym in HYPONYM_POINTERS and target not in seen:
                seen.add(target)
                todo.append(target)
    return sorted(seen)


def _category(wn: WordNetNouns, syn: Synset) -> str | None:
    """First lemma of the nearest hypernym (class before instance-of)."""
    parent = syn.first("@") or syn.first("@i")
    return wn.synset(parent).lemmas[0] if parent else None


def _descendants(wn: WordNetNouns, offsets: list[str]) -> dict[str, frozenset[str]]:
    """Transitive hyponyms of every catalog synset (a DAG, so memoise child sets)."""
    memo: dict[str, frozenset[str]] = {}

    def below(offset: str) -> frozenset[str]:
        if offset not in memo:
            found: set[str] = set()
            for sym, child in wn.synset(offset).pointers:
                if sym in HYPONYM_POINTERS:
                    found.add(child)
                    found |= below(child)
            memo[offset] = frozenset(found)
        return memo[offset]

    return {off: below(off) for off in offsets}


def _candidate_queries(wn, catalog: dict[str, Item], offsets: list[str]):
    """(query_id, text, category, offset, {item_id: 1}, hard) for every possible query."""
    descendants = _descendants(wn, offsets)
    title_words = {iid: content_words(item.title) for iid, item in catalog.items()}
    for off in offsets:
        syn = wn.synset(off)
        hard = not content_words(syn.definition) & title_words[syn.item_id]
        yield f"def-{off}-n", syn.definition, "definition", off, {syn.item_id: 1}, hard
        below = descendants[off]
        if not MIN_CATEGORY <= len(below) <= MAX_CATEGORY:
            continue
        rels = {f"{o}-n": 1 for o in sorted(below | {off})}
        for kind, text in (("lemma", syn.lemmas[0]), ("gloss", syn.definition)):
            words = content_words(text)
            sharing = sum(bool(words & title_words[iid]) for iid in rels)
            yield f"cat-{kind}-{off}-n", text, "category", off, rels, sharing < len(rels) / 2


def build_wordnet(wordnet_dir="/usr/share/wordnet", log=print) -> Dataset:
    """Build the WordNet product benchmark; splits are 80/10/10 by sha1 of the synset offset.

    Queries with empty or already-seen text (normalised, first in sorted query_id order) are
    dropped, so no text is both a training and an evaluation query.
    """
    wn = WordNetNouns(wordnet_dir)
    offsets = _catalog_offsets(wn)
    catalog = {}
    for off in offsets:
        syn = wn.synset(off)
        catalog[syn.item_id] = Item(syn.item_id, ", ".join(syn.lemmas), _category(wn, syn))

    queries, qrels, seen = {}, {}, set()
    candidates = sorted(_candidate_queries(wn, catalog, offsets), key=lambda c: c[0])
    for qid, text, kind, off, rels, hard in candidates:
        norm = _normalise(text)
        if not norm or norm in seen:
            continue
        seen.add(norm)
        queries[qid] = Query(qid, text, kind, hash_split(off), hard)
        qrels[qid] = rels
    ds = validate_dataset(Dataset(catalog, queries, qrels, "wordnet"), root=Path(wordnet_dir))
    _log_counts(ds, log)
    return ds


def _log_counts(ds: Dataset, log) -> None:
    """One line per split: queries per category, with how many of them are hard."""
    counts = ds.counts()
    log(f"wordnet: {counts['items']} items, {len(ds.queries)} queries, {counts['qrels']} qrels")
    for split in ("train", "dev", "test"):
        parts = []
        for kind in ("definition", "category"):
            qs = [q for q in ds.queries.values() if q.split == split and q.category == kind]
            parts.append(f"{kind} {len(qs)} (hard {sum(bool(q.hard) for q in qs)})")
        total = counts["queries"].get(split, {}).get("total", 0)
        log(f"  {split}: {total} queries: {', '.join(parts)}")
