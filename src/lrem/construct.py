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

The parts: `construct_config` (ConstructConfig), `construct_steps` (prompts, post-processing,
gain set) and `construct_stats` (stats.json and its summary); this module runs the pipeline and
re-exports them.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from lrem._io import (JsonlLog, OutputError, claim_dir, is_lrem_output, is_unstarted, record_files, write_json,
                      write_jsonl)
from lrem.construct_config import DEFAULT_BAN, ConstructConfig
from lrem.construct_stats import (FUNNEL_LABELS, STATUS_WHY, STATUSES, compute_stats, distribution, format_stats,
                                  why_empty)
from lrem.construct_steps import (CANDIDATES_BLOCK, EXTRACT_USER, HINT_LINE, LIST_USER, REASON_SYSTEM, REASON_USER,
                                  context_lines, cot_query, drop_banned, drop_duplicates, drop_in_query, drop_long,
                                  extract_chat, gain_set, list_chat, norm, pick_hint, postprocess, reason_chat,
                                  split_phrases, truncate_tokens)
from lrem.data import Pair
from lrem.teachers import Chat, generate

# The names this module had before its parts moved out (`from lrem.construct import ConstructConfig`, ...)
__all__ = ["DEFAULT_BAN", "REASON_SYSTEM", "REASON_USER", "HINT_LINE", "EXTRACT_USER", "LIST_USER", "STATUSES",
           "ConstructConfig", "CANDIDATES_BLOCK", "context_lines", "reason_chat", "extract_chat", "list_chat",
           "pick_hint", "norm", "split_phrases", "drop_duplicates", "drop_in_query", "drop_banned", "drop_long",
           "truncate_tokens", "postprocess", "cot_query", "gain_set", "STATS_EVERY_S", "OUTCOMES", "TRIPLETS", "CACHE",
           "CONFIG", "STATS", "select_queries", "TripletBuilder", "check_config", "construct", "distribution",
           "compute_stats", "FUNNEL_LABELS", "STATUS_WHY", "why_empty", "format_stats"]


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
        from lrem.model import resolve_backbone
        from lrem.teachers import CachedTeacher, LabelCoTs, parse_judge, parse_teacher

        self.ds, self.cfg = ds, cfg
        kw = dict(batch_size=cfg.teacher_batch_size, threads=cfg.teacher_threads, dtype=cfg.teacher_dtype,
                  concurrency=cfg.teacher_concurrency, timeout=cfg.teacher_timeout,
                  retries=cfg.teacher_retries, backoff=cfg.teacher_backoff)

        def make_teacher(spec: str):
            if spec == "labels":
                return LabelCoTs(ds.qrels, ds.catalog, seed=cfg.seed)
            t = parse_teacher(spec, **kw)
            if hasattr(t, "lookup"):
                return t
            record_files(Path(cache_path).parent, Path(cache_path).name)  # the run folder's, before it is written
            return CachedTeacher(t, cache_path)

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


def is_construct_run(out: Path) -> bool:
    """Whether `out` may be resumed by `construct`: missing or empty (but for lrem's marker), or a
    construct run's folder (its outcomes, or its config.json, which a model folder's is not)."""
    import json

    out = Path(out)
    if is_unstarted(out) or (out / OUTCOMES).exists():
        return True
    try:
        return "teacher" in json.loads((out / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def check_config(out: Path, cfg: ConstructConfig) -> None:
    """Refuse to resume a run directory that was started with other (non-runtime) settings. A
    run that has no outcome yet (it failed at the start: a missing teacher file, a bad split)
    takes the new settings: nothing was made with the old ones."""
    path, new = out / CONFIG, cfg.to_dict()
    outcomes = out / OUTCOMES
    if path.exists() and outcomes.exists() and outcomes.stat().st_size:
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
    if is_lrem_output(out) and not is_construct_run(out):  # another command's output (an index, a model)
        raise OutputError(f"{out}: an lrem output, but not a `lrem construct` run; use a new folder")
    # marked as lrem's: a rerun resumes it (a foreign folder is refused); the files it writes are
    # recorded first, so that an --overwrite refuses the folder once it also holds a user's
    out = claim_dir(out, files=(CONFIG, OUTCOMES, TRIPLETS, STATS))
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
    # a resume with a smaller --limit keeps what a larger one wrote (triplets.jsonl has it): the
    # stats count every query of the folder, so they describe the files beside them
    earlier = {q: r.get("query", "") for q, r in done.items() if q not in queries}
    if earlier:
        log(f"{len(earlier)} more queries done earlier (a larger limit) stay in {out} and are counted")
    counted = {**queries, **earlier}
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
            # a step's queries are the requests a teacher has to run at once: never fewer than it may have in flight
            step = max(cfg.batch_size, cfg.teacher_concurrency)
            for s in range(0, len(hard), step):
                for outcome, rows in builder.process(hard[s:s + step]):
                    for t in rows:
                        triplets.append(t)
                    outcomes.append(outcome)  # last: the outcome marks the query done
                    done[outcome["query_id"]] = outcome
                    n_triplets += len(rows)
                bar.update(len(hard[s:s + step]))
                bar.set_postfix(triplets=n_triplets)
                if time.perf_counter() - last_stats > STATS_EVERY_S:  # partial stats for a long run
                    write_json(out / STATS, compute_stats(counted, done, cfg, run))
                    last_stats = time.perf_counter()
        finally:
            bar.close()
            outcomes.close()
            triplets.close()
        run["seconds"] = round(time.perf_counter() - t0, 3)
        run["teacher_calls"] = getattr(builder.teacher, "calls", 0)
        run["teacher_cache_hits"] = getattr(builder.teacher, "hits", 0)
    stats = compute_stats(counted, done, cfg, run)
    write_json(out / STATS, stats)
    return stats

