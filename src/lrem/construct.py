"""Query-CoT-Item triplets (LREM_SPEC, "Data"; paper section 3.2), resumable.

    lrem construct --data data/wordnet --split train --out runs/triplets --limit 100 [--hint gold]

    from lrem.construct import ConstructConfig, construct
    stats = construct("data/wordnet", "runs/triplets", ConstructConfig(limit=100, hint="gold"))

Steps, each configurable in `ConstructConfig` (a YAML file and flags override it):
1. mine: queries whose relevant items the direct retriever ranks poorly (hitrate@k_mine < x);
2. reason: the teacher reasons freely about the query;
3. extract: the same teacher turns that into a comma-separated list of phrases;
4. post-process (rules): drop a phrase cut off by the token limit, duplicates, phrases already
   in the query, banned and sentence-long ones; keep whole phrases up to `cot_max_tokens`
   student tokens: the CoT;
5. gain set: top-k for "query" (set 1) and "query (cot)" (set 2); keep set 2 minus set 1;
6. judge: keep the relevant items of the gain set; each is one triplet.
`hint="gold"` (beyond the paper) shows the teacher one relevant item of the query, so a weak
teacher rationalises the way from the query to it; the student only ever sees query and CoT.

RUN_DIR gets `triplets.jsonl` {query_id, query, cot, item_id, item_title}, `outcomes.jsonl`
(one row per query, whatever happened to it), `teacher_cache.jsonl`, `config.json` and
`stats.json`. Rows are appended and fsynced as each batch of queries finishes; a rerun with the
same settings skips the queries that have an outcome and drops a torn last line, so a killed run
finishes the same files with no duplicate and no lost query.
"""
from __future__ import annotations

import hashlib
import re
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from lrem._config import load_config
from lrem._io import JsonlLog, claim_dir, write_json, write_jsonl
from lrem.data import Pair
from lrem.teachers import Chat, generate

DEFAULT_BAN = ("product", "products", "item", "items", "query", "search", "shopper", "customer", "brand",
               "brands", "attribute", "attributes", "related products", "etc", "none", "n/a", "various",
               "other", "others", "yes", "no", "e-commerce", "online shopping")

REASON_SYSTEM = "You are a shopping expert for an e-commerce search platform."
REASON_USER = ('A shopper searched for: "{query}"\n{hint}Think about what the shopper needs. Which products, '
               "product types, brands and attributes would satisfy this search? Answer in a few sentences.")
HINT_LINE = 'One product that satisfies this search is: "{title}". Explain how the search leads to products like it.\n'
EXTRACT_USER = ('A shopper searched for: "{query}"\n{hint}Analysis:\n{reasoning}\n\nFrom the analysis, list the '
                "products, brands and attributes a search engine should look for, as one comma-separated line. "
                "Rules: no duplicates; if the search names a brand, no other brands; nothing unrelated to the "
                "search; do not repeat the search itself. Answer with the list only.")
# `teacher_mode: list` (one call): the teacher lists phrases at once, without the free reasoning
# first. ~4x cheaper for a local teacher (the extraction prompt re-reads the whole reasoning).
LIST_USER = ('A shopper searched for: "{query}"\n{hint}List up to 5 products, product types, brands or attributes '
             "that would satisfy this search, as one comma-separated line. Rules: no duplicates; if the search names "
             "a brand, no other brands; do not repeat the search itself. Answer with the list only.")
STATUSES = ("easy", "teacher_failed", "empty_cot", "empty_gain", "none_relevant", "ok")


@dataclass
class ConstructConfig:
    """Every knob of the triplet pipeline; `config.json` in RUN_DIR records the resolved values."""

    # Which queries
    split: str = field(default="train", metadata={"help": "Dataset split to take queries from."})
    limit: int | None = field(default=None, metadata={"help": "A fixed, seeded sample of N queries (None: all)."})
    seed: int = field(default=0, metadata={"help": "Seed of the query sample and of the hint choice."})
    # 1. Mining
    retriever: str = field(default="bm25", metadata={"help": "The direct retriever: bm25, minilm or MODEL:direct "
                                                     "(any spec lrem.search.build_systems accepts)."})
    k_mine: int = field(default=10, metadata={"help": "Depth at which mining measures hitrate."})
    mine_max_hitrate: float = field(default=0.5, metadata={
        "help": "A query is difficult when hitrate@k_mine < this (0.5: fewer than half its relevant items "
                "in the top k_mine)."})
    keep_all: bool = field(default=False, metadata={"help": "Keep every query, difficult or not."})
    # 2-3. Teacher
    teacher: str = field(default="hf:smollm2-135m-instruct", metadata={
        "help": "openai:BASE_URL#MODEL, hf:NAME_OR_PATH, file:PATH.jsonl (precomputed CoTs: skips steps 2-3) or "
                "labels (CoTs from the relevant items' titles and categories: label distillation)."})
    teacher_mode: str = field(default="two-step", metadata={
        "help": "two-step (the paper: free reasoning, then extraction of a phrase list) or list (one call: the "
                "phrase list at once; several times cheaper with a local teacher)."})
    candidates: int = field(default=0, metadata={
        "help": "Beyond the paper (grounded reasoning): show the teacher the retriever's top-N titles for the "
                "query (N <= k_gain; 0: none), so it can recognise what it does not know by name."})
    hint: str = field(default="none", metadata={
        "help": "none (the paper) or gold: the teacher also sees one relevant item (rationalisation)."})
    reason_max_tokens: int = field(default=128, metadata={"help": "Token budget of the free reasoning."})
    extract_max_tokens: int = field(default=48, metadata={"help": "Token budget of the extracted phrase list."})
    teacher_batch_size: int = field(default=16, metadata={"help": "hf: chats per generate call."})
    teacher_threads: int | None = field(default=None, metadata={
        "help": "hf: torch threads while generating (None: OMP_NUM_THREADS if set, else the cores the load "
                "average leaves free, checked every batch)."})
    teacher_dtype: str = field(default="auto", metadata={"help": "hf: auto, float32 or bfloat16."})
    teacher_concurrency: int = field(default=8, metadata={"help": "openai: requests in flight."})
    teacher_timeout: float = field(default=60.0, metadata={"help": "openai: seconds per request."})
    teacher_retries: int = field(default=4, metadata={"help": "openai: retries of a failed request."})
    teacher_backoff: float = field(default=1.0, metadata={"help": "openai: first retry wait (s), doubled each try."})
    # 4. Post-processing
    student: str = field(default="smollm2-135m-instruct", metadata={
        "help": "Model whose tokenizer counts CoT tokens (the student to be trained)."})
    cot_max_tokens: int = field(default=16, metadata={"help": "l in the paper: CoT budget in student tokens."})
    max_phrase_words: int = field(default=6, metadata={"help": "Longer phrases are sentences, not phrases: dropped."})
    ban: list[str] = field(default_factory=lambda: list(DEFAULT_BAN), metadata={
        "help": "Phrases never kept (compared lowercased, punctuation ignored)."})
    ban_file: str | None = field(default=None, metadata={"help": "More banned phrases, one per line."})
    # 5. Gain set
    k_gain: int = field(default=50, metadata={"help": "Depth of set 1 (query) and set 2 (query (cot))."})
    # 6. Judge
    judge: str = field(default="qrels", metadata={"help": "qrels, llm (the teacher), llm:TEACHER_SPEC or "
                                                  "cross-encoder:PATH."})
    judge_threshold: float = field(default=0.5, metadata={"help": "cross-encoder: relevant when score >= this."})
    # Run
    batch_size: int = field(default=16, metadata={"help": "Queries per step; outcomes are appended per batch."})

    # fields that do not change what a query's outcome is: free to differ when a run resumes
    RUNTIME = ("limit", "teacher_batch_size", "teacher_threads", "teacher_concurrency", "teacher_timeout", "teacher_retries",
               "teacher_backoff", "batch_size")

    def __post_init__(self):
        if self.hint not in ("none", "gold"):
            raise ValueError(f"hint={self.hint!r}; expected none or gold")
        if not 0 <= self.candidates <= self.k_gain:
            raise ValueError(f"candidates={self.candidates}; need 0 <= candidates <= k_gain ({self.k_gain})")
        if self.teacher_mode not in ("two-step", "list"):
            raise ValueError(f"teacher_mode={self.teacher_mode!r}; expected two-step or list")
        for name in ("k_mine", "k_gain", "cot_max_tokens", "batch_size", "reason_max_tokens", "extract_max_tokens",
                     "max_phrase_words"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; need >= 1")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit={self.limit}; need >= 1 (or none for all queries)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def load(cls, path=None, **overrides) -> "ConstructConfig":
        """Defaults, then a YAML file of values, then `overrides` (None values are ignored).

        An unknown key or a value of the wrong type raises a ValueError naming file and key.
        """
        return load_config(cls, path, overrides)


# ---------------------------------------------------------------- prompts

CANDIDATES_BLOCK = "A first search found these products (some may not fit):\n{lines}\n"


def context_lines(hint: str | None = None, candidates: list[str] | None = None) -> str:
    """What the teacher sees besides the query: the retriever's top titles (`candidates`, beyond
    the paper: grounded reasoning) and one relevant item (`hint`), each block ending in a newline."""
    block = CANDIDATES_BLOCK.format(lines="\n".join(f"- {t}" for t in candidates)) if candidates else ""
    return block + (f'One product that satisfies this search is: "{hint}".\n' if hint else "")


def reason_chat(query: str, hint: str | None = None, candidates: list[str] | None = None) -> Chat:
    ctx = context_lines(None, candidates) + (HINT_LINE.format(title=hint) if hint else "")
    return Chat(REASON_SYSTEM, REASON_USER.format(query=query, hint=ctx))


def extract_chat(query: str, reasoning: str, hint: str | None = None, candidates: list[str] | None = None) -> Chat:
    return Chat(REASON_SYSTEM, EXTRACT_USER.format(query=query, reasoning=reasoning.strip(),
                                                   hint=context_lines(hint, candidates)))


def list_chat(query: str, hint: str | None = None, candidates: list[str] | None = None) -> Chat:
    return Chat(REASON_SYSTEM, LIST_USER.format(query=query, hint=context_lines(hint, candidates)))


def pick_hint(relevant: dict[str, int], query_id: str, seed: int = 0) -> str | None:
    """One relevant item id: the highest relevance, ties broken by a seeded hash (stable)."""
    rel = [(-r, hashlib.sha1(f"{seed}:{query_id}:{i}".encode()).hexdigest(), i) for i, r in relevant.items() if r > 0]
    return min(rel)[2] if rel else None


# ---------------------------------------------------------------- 4. post-processing (rules, no LLM)

def norm(phrase: str) -> str:
    """Lowercase words, punctuation dropped: how phrases are compared.

    >>> norm("  Wine-Glass, RED ")
    'wine glass red'
    """
    return " ".join(re.sub(r"[^\w]+", " ", phrase.lower()).split())


_FILLER_RE = re.compile(r"^(?:(?:and|or|including|with|specifically|e\.g\.|i\.e\.)\s+)?"
                        r"(?:(?:a|an|the)\s+)?(?:(?:products?|items?|something)\s+)?"
                        r"(?:(?:which|that)\s+(?:is|are)\s+|like\s+|such as\s+|called\s+|named\s+)?"
                        r"(?:(?:a|an|the)\s+)?", re.I)


def split_phrases(text: str) -> list[str]:
    """A teacher's list -> phrases: drops <think> blocks, lead-ins ("Here is the list:"),
    bullets, numbering, quotes and leading filler ("a product that is a"); splits on commas,
    semicolons, newlines and '"x" and "y"'.

    >>> split_phrases('Here are the phrases: "coffee", an espresso;\\n- energy drink.')
    ['coffee', 'espresso', 'energy drink']
    """
    text = re.sub(r"<think>.*?(</think>|$)", " ", text, flags=re.S)
    text = re.sub(r'"\s*(?:and|or)\s*"', ", ", text)  # '"blacktop" and "asphalt"' is a list too
    out = []
    for line in text.splitlines():
        line = re.sub(r"^[^,:;]{0,60}:(\s|$)", "", line.strip())  # a lead-in ending in ":"
        for part in re.split(r"[,;]", line):
            part = re.sub(r"^\s*(?:[-*\u2022]+|\d+[.)])\s*", "", part)  # bullet or "1." numbering
            part = " ".join(part.strip().strip("\"'`*.:!?()[]{}").split())
            part = _FILLER_RE.sub("", part)  # "a product that is a shoehorn" -> "shoehorn"
            if part:
                out.append(part)
    return out


def drop_duplicates(phrases: list[str]) -> list[str]:
    """Keep the first of phrases equal after `norm`.

    >>> drop_duplicates(["Coffee", "espresso", "coffee."])
    ['Coffee', 'espresso']
    """
    seen, out = set(), []
    for p in phrases:
        if norm(p) not in seen:
            seen.add(norm(p))
            out.append(p)
    return out


def drop_in_query(phrases: list[str], query: str) -> list[str]:
    """Drop phrases whose words already appear, in order, in the query (whole words).

    >>> drop_in_query(["tea", "green tea", "coffee", "stronger"], "a drink stronger than tea")
    ['green tea', 'coffee']
    """
    q = f" {norm(query)} "
    return [p for p in phrases if norm(p) and f" {norm(p)} " not in q]


def drop_banned(phrases: list[str], ban) -> list[str]:
    """Drop phrases on the ban list (compared after `norm`).

    >>> drop_banned(["Products", "coffee", "etc."], ["products", "etc"])
    ['coffee']
    """
    banned = {norm(b) for b in ban}
    return [p for p in phrases if norm(p) not in banned and norm(p)]


def drop_long(phrases: list[str], max_words: int) -> list[str]:
    """Drop phrases of more than `max_words` words (sentences, not phrases).

    >>> drop_long(["coffee", "the shopper wants something with more caffeine"], 6)
    ['coffee']
    """
    return [p for p in phrases if len(norm(p).split()) <= max_words]


def truncate_tokens(phrases: list[str], tokenizer, max_tokens: int) -> str:
    """Join phrases with ", " while the text fits in `max_tokens` tokens (whole phrases; a first
    phrase longer than the budget is cut at a token boundary)."""
    def n_tokens(s: str) -> int:
        return len(tokenizer(s, add_special_tokens=False)["input_ids"])

    cot = ""
    for p in phrases:
        candidate = f"{cot}, {p}" if cot else p
        if n_tokens(candidate) > max_tokens:
            if not cot:
                cot = tokenizer.decode(tokenizer(p, add_special_tokens=False)["input_ids"][:max_tokens]).strip()
            break
        cot = candidate
    return cot


def postprocess(text: str, query: str, tokenizer, cfg: ConstructConfig, ban=None,
                cut_off: bool = False) -> tuple[str, dict[str, int]]:
    """Step 4: the teacher's list -> the CoT, and how many phrases each rule dropped.

    `cut_off`: the answer hit its token limit, so its last phrase is incomplete and is dropped.
    """
    steps = [("cut_off", lambda ps: ps[:-1] if cut_off else ps), ("duplicate", drop_duplicates), ("in_query", lambda ps: drop_in_query(ps, query)),
             ("banned", lambda ps: drop_banned(ps, cfg.ban if ban is None else ban)),
             ("too_many_words", lambda ps: drop_long(ps, cfg.max_phrase_words))]
    phrases, dropped = split_phrases(text), {}
    for name, rule in steps:
        kept = rule(phrases)
        dropped[name] = len(phrases) - len(kept)
        phrases = kept
    cot = truncate_tokens(phrases, tokenizer, cfg.cot_max_tokens)
    dropped["truncated"] = len(phrases) - len(split_phrases(cot)) if cot else len(phrases)
    return cot, dropped


# ---------------------------------------------------------------- 5. gain set

def cot_query(query: str, cot: str) -> str:
    """The text retrieved for set 2.

    >>> cot_query("mug", "cup, tea cup")
    'mug (cup, tea cup)'
    """
    return f"{query} ({cot})"


def gain_set(set1: list[str], set2: list[str]) -> list[str]:
    """Set 2 minus set 1, in set 2's rank order.

    >>> gain_set(["a", "b", "c"], ["c", "d", "a", "e"])
    ['d', 'e']
    """
    first = set(set1)
    return [i for i in set2 if i not in first]


# ---------------------------------------------------------------- the run

STATS_EVERY_S = 30.0  # stats.json is rewritten at most this often while a run goes on
OUTCOMES, TRIPLETS, CACHE, CONFIG, STATS = ("outcomes.jsonl", "triplets.jsonl", "teacher_cache.jsonl",
                                            "config.json", "stats.json")


def select_queries(ds, cfg: ConstructConfig) -> dict[str, str]:
    """query_id -> text of the split, sampled like `lrem eval` (same ids for the same seed and
    limit, whatever the other settings). Queries without a relevant item are left out unless
    nothing needs labels (keep_all, no gold hint, a judge other than qrels)."""
    from lrem.data import sample_query_ids

    split = ds.split_queries(cfg.split)
    needs_labels = not cfg.keep_all or cfg.hint == "gold" or cfg.judge == "qrels"
    ids = [q for q in split if ds.relevant(q)] if needs_labels else list(split)
    return {q: split[q].text for q in sample_query_ids(ids, cfg.limit, cfg.seed)}


class TripletBuilder:
    """Steps 1-6 for batches of queries; builds retriever, teacher, judge and student tokenizer.

    Args:
        ds: the dataset (catalog titles are what the retriever and the judge see).
        cfg: the pipeline settings.
        cache_path: the teacher's answer cache (JSONL).
    """

    def __init__(self, ds, cfg: ConstructConfig, cache_path, log=print):
        from transformers import AutoTokenizer

        from lrem.search import build_systems
        from lrem.backbones import resolve_backbone
        from lrem.teachers import CachedTeacher, LabelCoTs, parse_judge, parse_teacher

        self.ds, self.cfg = ds, cfg
        kw = dict(batch_size=cfg.teacher_batch_size, threads=cfg.teacher_threads, dtype=cfg.teacher_dtype,
                  concurrency=cfg.teacher_concurrency, timeout=cfg.teacher_timeout,
                  retries=cfg.teacher_retries, backoff=cfg.teacher_backoff)

        def make_teacher(spec: str):
            if spec == "labels":
                return LabelCoTs(ds.qrels, ds.catalog, seed=cfg.seed)
            t = parse_teacher(spec, **kw)
            return t if hasattr(t, "lookup") else CachedTeacher(t, cache_path)

        self.teacher = make_teacher(cfg.teacher)
        self.judge = parse_judge(cfg.judge, ds.qrels, self.teacher, make_teacher, threshold=cfg.judge_threshold)
        self.retriever = build_systems({"retriever": cfg.retriever}, ds, log=log)["retriever"]
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_backbone(cfg.student, log=log))
        self.ban = list(cfg.ban)
        if cfg.ban_file:
            self.ban += [line.strip() for line in Path(cfg.ban_file).read_text(encoding="utf-8").splitlines()
                         if line.strip()]

    def n_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def mine(self, queries: dict[str, str], batch_size: int = 256) -> dict[str, tuple[float | None, list[str], bool]]:
        """Step 1: query_id -> (hitrate@k_mine or None without labels, set 1 = top k_gain ids, difficult)."""
        cfg, qids, out = self.cfg, list(queries), {}
        for s in range(0, len(qids), batch_size):
            batch = qids[s:s + batch_size]
            results = self.retriever.search([queries[q] for q in batch], k=max(cfg.k_mine, cfg.k_gain))
            for qid, res in zip(batch, results):
                ids, rel = res.item_ids, self.ds.relevant(qid)
                hr = len(rel & set(ids[:cfg.k_mine])) / len(rel) if rel else None
                hard = cfg.keep_all or (hr is not None and hr < cfg.mine_max_hitrate)
                out[qid] = (hr, ids[:cfg.k_gain], hard)
        return out

    def _ask(self, rows: list[dict], key: str, chats: list[Chat], max_tokens: int) -> None:
        """Steps 2-3: one teacher call per row; problems are counted, the row fails or goes on."""
        for r, a in zip(rows, generate(self.teacher, chats, max_tokens)):
            r[key] = a.text
            if a.finish in ("malformed", "refused") or not a.text.strip():
                r["problems"].append(f"{key}:{a.finish if a.finish in ('malformed', 'refused') else 'empty'}")
                r["status"] = "teacher_failed"
            elif a.finish == "length":
                r["problems"].append(f"{key}:too_long")  # kept: step 4 truncates anyway

    def process(self, batch: list[tuple[str, str, float | None, list[str]]]) -> list[tuple[dict, list[dict]]]:
        """Steps 2-6 for (query_id, query, hitrate, set 1) tuples -> (outcome row, triplets) each."""
        cfg, t0 = self.cfg, time.perf_counter()
        rows = [{"query_id": q, "query": text, "status": None, "hitrate": hr, "hint": None, "reasoning": None,
                 "extraction": None, "cot": "", "cot_tokens": 0, "dropped": {}, "gain": [], "relevant": [],
                 "problems": []} for q, text, hr, _ in batch]
        set1 = {q: s1 for q, _, _, s1 in batch}
        if cfg.hint == "gold":
            for r in rows:
                item = pick_hint(self.ds.qrels.get(r["query_id"], {}), r["query_id"], cfg.seed)
                r["hint"] = self.ds.catalog[item].title if item else None
        if hasattr(self.teacher, "lookup"):  # precomputed (file:) or label CoTs: no chat
            for r in rows:
                r["extraction"] = self.teacher.lookup(r["query_id"], r["query"])
                if r["extraction"] is None:
                    r["problems"].append("cot:missing")
                    r["status"] = "teacher_failed"
        else:
            cands = {q: [self.ds.catalog[i].title for i in s1[: cfg.candidates]] for q, s1 in set1.items()}
            for r in rows:
                if cfg.candidates:
                    r["candidates"] = set1[r["query_id"]][: cfg.candidates]
            if cfg.teacher_mode == "list":
                self._ask(rows, "extraction", [list_chat(r["query"], r["hint"], cands[r["query_id"]]) for r in rows],
                          cfg.extract_max_tokens)
            else:
                self._ask(rows, "reasoning", [reason_chat(r["query"], r["hint"], cands[r["query_id"]]) for r in rows],
                          cfg.reason_max_tokens)
                live = [r for r in rows if r["status"] is None]
                self._ask(live, "extraction", [extract_chat(r["query"], r["reasoning"], r["hint"], cands[r["query_id"]])
                                               for r in live], cfg.extract_max_tokens)
        for r in (r for r in rows if r["status"] is None):  # 4. post-processing
            r["cot"], r["dropped"] = postprocess(r["extraction"], r["query"], self.tokenizer, cfg, self.ban,
                                                 cut_off="extraction:too_long" in r["problems"])
            r["cot_tokens"] = self.n_tokens(r["cot"]) if r["cot"] else 0
            r["status"] = None if r["cot"] else "empty_cot"
        live = [r for r in rows if r["status"] is None]
        if live:  # 5. gain set
            results = self.retriever.search([cot_query(r["query"], r["cot"]) for r in live], k=cfg.k_gain)
            for r, res in zip(live, results):
                r["gain"] = gain_set(set1[r["query_id"]], res.item_ids[:cfg.k_gain])
                r["status"] = None if r["gain"] else "empty_gain"
        live = [r for r in rows if r["status"] is None]
        pairs = [(r, Pair(r["query_id"], r["query"], i, self.ds.catalog[i].title)) for r in live for i in r["gain"]]
        for (r, pair), verdict in zip(pairs, self.judge([p for _, p in pairs])):  # 6. judge
            if verdict is None:
                r["problems"].append("judge:unparsed")
            elif verdict:
                r["relevant"].append(pair.item_id)
        seconds = (time.perf_counter() - t0) / max(len(rows), 1)
        out = []
        for r in rows:
            if r["status"] is None:
                r["status"] = "ok" if r["relevant"] else "none_relevant"
            r["seconds"] = round(seconds, 4)
            out.append((r, [{"query_id": r["query_id"], "query": r["query"], "cot": r["cot"], "item_id": i,
                             "item_title": self.ds.catalog[i].title} for i in r["relevant"]]))
        return out


def check_config(out: Path, cfg: ConstructConfig) -> None:
    """Refuse to resume a run directory that was started with other (non-runtime) settings."""
    path, new = out / CONFIG, cfg.to_dict()
    if path.exists():
        import json

        old = json.loads(path.read_text(encoding="utf-8"))
        defaults = asdict(ConstructConfig())  # a key newer than the run's config.json had its default
        for key, value in new.items():
            if key not in cfg.RUNTIME and old.get(key, defaults[key]) != value:
                raise ValueError(f"{path}: this run was started with {key}={old.get(key)!r}, now {key}={value!r}; "
                                 "resume with the same settings or use another --out")
    write_json(path, new)


def _repair_triplets(log: JsonlLog, done: dict[str, dict]) -> None:
    """Keep only triplets of queries with an outcome (a crash may fall between the two appends),
    each (query_id, item_id) once; rewrite the file atomically if anything was dropped."""
    rows = log.rows()
    seen, keep = set(), []
    for t in rows:
        key = (t.get("query_id"), t.get("item_id"))
        if key[0] in done and key not in seen:
            seen.add(key)
            keep.append(t)
    if len(keep) != len(rows):
        write_jsonl(log.path, keep)


def construct(data, out, cfg: ConstructConfig | None = None, log=print, show_progress: bool = True) -> dict:
    """Run (or resume) the pipeline into `out`; returns the stats (also written to stats.json).

    Args:
        data: a dataset folder or a loaded `lrem.data.Dataset`.
        out: the run directory; rerunning with the same settings finishes an interrupted run.
    """
    from lrem.data import Dataset, load_dataset

    cfg = cfg or ConstructConfig()
    ds = data if isinstance(data, Dataset) else load_dataset(data)
    out = claim_dir(out)  # marked as lrem's: a rerun resumes it
    check_config(out, cfg)
    queries = select_queries(ds, cfg)
    outcomes, triplets = JsonlLog(out / OUTCOMES), JsonlLog(out / TRIPLETS)
    done: dict[str, dict] = {}
    for r in outcomes.rows():
        done.setdefault(r["query_id"], r)
    _repair_triplets(triplets, done)
    for f in (outcomes, triplets):  # both exist, even empty, however the run ends: `lrem train` reads them
        f.open().close()
    todo = {q: t for q, t in queries.items() if q not in done}
    log(f"{ds.name}/{cfg.split}: {len(queries)} queries, {len(queries) - len(todo)} already done, {len(todo)} to go")
    run = {"seconds": 0.0, "mine_seconds": 0.0, "teacher_calls": 0, "teacher_cache_hits": 0}
    if todo:
        t0 = time.perf_counter()
        builder = TripletBuilder(ds, cfg, out / CACHE, log=log)
        mined = builder.mine(todo)
        run["mine_seconds"] = round(time.perf_counter() - t0, 3)
        bar = tqdm(total=len(queries), initial=len(queries) - len(todo), desc="construct", unit="q",
                   disable=not show_progress)
        try:
            for q, (hr, _, hard) in mined.items():
                if not hard:
                    done[q] = {"query_id": q, "query": todo[q], "status": "easy", "hitrate": hr}
                    outcomes.append(done[q])
                    bar.update(1)
            hard = [(q, todo[q], hr, s1) for q, (hr, s1, h) in mined.items() if h]
            n_triplets = sum(len(r.get("relevant", [])) for r in done.values())
            last_stats = time.perf_counter()
            for s in range(0, len(hard), cfg.batch_size):
                for outcome, rows in builder.process(hard[s:s + cfg.batch_size]):
                    for t in rows:
                        triplets.append(t)
                    outcomes.append(outcome)  # last: the outcome marks the query done
                    done[outcome["query_id"]] = outcome
                    n_triplets += len(rows)
                bar.update(len(hard[s:s + cfg.batch_size]))
                bar.set_postfix(triplets=n_triplets)
                if time.perf_counter() - last_stats > STATS_EVERY_S:  # partial stats for a long run
                    write_json(out / STATS, compute_stats(queries, done, cfg, run))
                    last_stats = time.perf_counter()
        finally:
            bar.close()
            outcomes.close()
            triplets.close()
        run["seconds"] = round(time.perf_counter() - t0, 3)
        run["teacher_calls"] = getattr(builder.teacher, "calls", 0)
        run["teacher_cache_hits"] = getattr(builder.teacher, "hits", 0)
    stats = compute_stats(queries, done, cfg, run)
    write_json(out / STATS, stats)
    return stats


# ---------------------------------------------------------------- stats

def distribution(values: list[int]) -> dict:
    """n, min, mean, median, p90, max and a histogram {value: count} of integers."""
    if not values:
        return {"n": 0}
    s = sorted(values)
    return {"n": len(s), "min": s[0], "mean": round(statistics.fmean(s), 2), "median": statistics.median(s),
            "p90": s[min(len(s) - 1, int(0.9 * len(s)))], "max": s[-1],
            "histogram": {str(v): n for v, n in sorted(Counter(s).items())}}


def compute_stats(queries: dict[str, str], done: dict[str, dict], cfg: ConstructConfig, run: dict) -> dict:
    """The yield after each step, problems, CoT lengths and time, from the outcome rows."""
    rows = [done[q] for q in queries if q in done]
    c = Counter(r["status"] for r in rows)
    mined = len(rows) - c["easy"]
    cots = mined - c["teacher_failed"]
    with_cot = cots - c["empty_cot"]
    dropped: Counter = Counter()
    for r in rows:
        dropped.update(r.get("dropped", {}))
    seconds = [r["seconds"] for r in rows if r["status"] != "easy" and "seconds" in r]
    return {
        "funnel": {"queries_in": len(queries), "done": len(rows), "mined": mined, "cots": cots,
                   "empty_after_postprocess": c["empty_cot"], "with_cot": with_cot, "empty_gain": c["empty_gain"],
                   "with_gain": with_cot - c["empty_gain"], "judged_relevant": c["ok"],
                   "triplets": sum(len(r.get("relevant", [])) for r in rows)},
        "statuses": {s: c[s] for s in STATUSES},
        "gain_items": sum(len(r.get("gain", [])) for r in rows),
        "teacher_problems": dict(sorted(Counter(p for r in rows for p in r.get("problems", [])).items())),
        "postprocess_dropped": dict(dropped),
        "cot_tokens": distribution([r["cot_tokens"] for r in rows if r.get("cot")]),
        "seconds_per_mined_query": round(statistics.fmean(seconds), 3) if seconds else None,
        "this_run": run,
        "config": cfg.to_dict(),
    }


FUNNEL_LABELS = {"queries_in": "queries in", "mined": "mined (difficult)", "cots": "CoTs from the teacher",
                 "empty_after_postprocess": "  empty after post-processing", "with_cot": "non-empty CoTs",
                 "empty_gain": "  empty gain set", "with_gain": "with a gain set",
                 "judged_relevant": "judged relevant (queries)", "triplets": "triplets"}


# how each status reads in `why_empty`, and the funnel count it is a share of
STATUS_WHY = {"easy": ("queries_in", "queries easy for the retriever (not mined)"),
              "teacher_failed": ("mined", "teacher answers failed"),
              "empty_cot": ("cots", "CoTs empty after post-processing"),
              "empty_gain": ("with_cot", "CoTs found no new item (empty gain set)"),
              "none_relevant": ("with_gain", "gain sets without a relevant item")}


def why_empty(stats: dict) -> str | None:
    """One line saying why a run yielded no triplet (None when it yielded some): the statuses
    that stopped its queries, largest first, and the teacher problems.

    >>> why_empty({"funnel": {"queries_in": 12, "done": 12, "mined": 11, "cots": 11, "with_cot": 2,
    ...            "with_gain": 2, "triplets": 0}, "statuses": {"easy": 1, "empty_cot": 9, "none_relevant": 2},
    ...            "teacher_problems": {"extraction:too_long": 2, "reasoning:too_long": 8}})
    '0 triplets: 9 of 11 CoTs empty after post-processing, 2 of 2 gain sets without a relevant item, 1 of 12 queries easy for the retriever (not mined); teacher problems reasoning:too_long 8, extraction:too_long 2'
    """
    f = stats["funnel"]
    if f["triplets"]:
        return None
    if not f["queries_in"]:
        return "0 triplets: no query selected (the split has no query with a relevant item)"
    counts = sorted(((n, s) for s, n in stats["statuses"].items() if n and s in STATUS_WHY), key=lambda x: -x[0])
    parts = [f"{n} of {f[STATUS_WHY[s][0]]} {STATUS_WHY[s][1]}" for n, s in counts]
    if f["done"] < f["queries_in"]:
        parts.append(f"{f['queries_in'] - f['done']} queries not done yet")
    line = "0 triplets: " + ", ".join(parts)
    problems = sorted(stats.get("teacher_problems", {}).items(), key=lambda kv: -kv[1])
    if problems:
        line += "; teacher problems " + ", ".join(f"{k} {v}" for k, v in problems)
    return line


def format_stats(stats: dict) -> str:
    """The printed summary: the funnel, CoT lengths, problems and time (and why, when no triplet)."""
    f, lines = stats["funnel"], []
    if f["done"] < f["queries_in"]:
        lines.append(f"(partial: {f['done']} of {f['queries_in']} queries done)")
    lines += [f"  {label:<32}{f[key]:>7}" for key, label in FUNNEL_LABELS.items()]
    d = stats["cot_tokens"]
    if d["n"]:
        lines.append(f"  CoT tokens: min {d['min']}, median {d['median']}, mean {d['mean']}, p90 {d['p90']}, "
                     f"max {d['max']}")
    if stats["teacher_problems"]:
        lines.append("  problems: " + ", ".join(f"{k} {v}" for k, v in stats["teacher_problems"].items()))
    if stats["seconds_per_mined_query"] is not None:
        lines.append(f"  time: {stats['seconds_per_mined_query']:.2f} s per mined query "
                     f"(this run {stats['this_run']['seconds']:.0f} s, "
                     f"{stats['this_run']['teacher_calls']} teacher calls, "
                     f"{stats['this_run']['teacher_cache_hits']} cached)")
    if why_empty(stats):
        lines.append(why_empty(stats))
    return "\n".join(lines)
