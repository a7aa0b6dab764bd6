"""Teachers that run here (`lrem.teachers`): a local HF model (`HFTeacher`), precomputed CoTs
from a file (`FileCoTs`) and CoTs built from the dataset's labels (`LabelCoTs`)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator

from .teacher_types import Answer, Chat, looks_refused


class HFTeacher:
    """A local HF causal LM with a chat template: batched greedy generation.

    Args:
        name_or_path: a built-in name (e.g. "qwen2.5-coder-1.5b-instruct"), an HF folder or hub name.
        batch_size: chats per batch (sorted by length to pad less).
        dtype: "auto" (see `lrem.backbones.default_dtype`), "float32" or "bfloat16".
        fast: decode with `lrem.decoding.generate` (the prompt prefix all chats share, e.g. the
            system prompt, run once and kept; a preallocated KV cache; on the CPU the compact
            decoder, whose matmuls use every thread even for few rows); False: `lm.generate`.
            Same tokens up to float near-ties.
        threads: torch threads while generating. None: `OMP_NUM_THREADS` when set, else the cores
            other jobs leave free (`lrem._threads.default_threads`), checked again every batch, so
            a long run uses both cores of a quiet 2-core machine and one when another job starts.
    """

    def __init__(self, name_or_path: str, batch_size: int = 16, dtype: str = "auto", device: str = "cpu",
                 fast: bool = True, threads: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from lrem._malloc import keep_freed_memory
        from lrem.backbones import default_dtype
        from lrem.model import resolve_backbone

        if torch.device(device).type == "cpu":
            keep_freed_memory()
        path = resolve_backbone(name_or_path)
        self.name, self.batch_size, self.device = f"hf:{name_or_path}", batch_size, device
        self.fast, self.threads = fast, threads
        self.tok = AutoTokenizer.from_pretrained(path)
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        dt = default_dtype(device) if dtype == "auto" else getattr(torch, dtype)
        self.lm = AutoModelForCausalLM.from_pretrained(path, dtype=dt).to(device).eval()
        eos = self.lm.generation_config.eos_token_id
        self.stop_ids = sorted({*(eos if isinstance(eos, list) else [eos] if eos is not None else []),
                                self.tok.eos_token_id} - {None})
        # kept across batches for these weights (clear both after changing them in place)
        self.prefix_cache: dict = {}  # prompt prefix -> KV (`lrem.decoding.generate`)
        self.linears: dict = {}  # thread count -> the compact decoder's blocked weight views

    def prompt(self, chat: Chat) -> str:
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template(chat.messages(), tokenize=False, add_generation_prompt=True)
        return f"{chat.system}\n\nUser: {chat.user}\nAssistant: "

    def generate_ids(self, texts: list[str], max_tokens: int) -> list[list[int]]:
        """Greedy continuations (token ids, each up to and including its stop id) of prompts."""
        import torch

        from lrem.decoding import block_linears, generate

        if not self.fast:
            batch = self.tok(texts, padding=True, add_special_tokens=False, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                gen = self.lm.generate(**batch, max_new_tokens=max_tokens, do_sample=False,
                                       eos_token_id=self.stop_ids, pad_token_id=self.tok.pad_token_id)
            rows = gen[:, batch["input_ids"].shape[1]:].tolist()  # (B, <= max)
            return [r[: next((i + 1 for i, t in enumerate(r) if t in self.stop_ids), len(r))] for r in rows]
        seqs = self.tok(texts, add_special_tokens=False)["input_ids"]
        linears = None
        if self.device == "cpu":
            n = torch.get_num_threads()
            if n not in self.linears:
                self.linears[n] = block_linears(self.lm, n)
            linears = self.linears[n]
        return generate(self.lm, seqs, max_tokens, self.stop_ids, self.tok.pad_token_id, linears=linears,
                        prefix_cache=self.prefix_cache)

    def stream(self, chats: list[Chat], max_tokens: int) -> Iterator[tuple[int, Answer]]:
        import torch

        if not chats:
            return
        texts = [self.prompt(c) for c in chats]
        lengths = [len(ids) for ids in self.tok(texts, add_special_tokens=False)["input_ids"]]
        order = sorted(range(len(chats)), key=lambda i: lengths[i])
        from lrem._threads import default_threads

        old = torch.get_num_threads()
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            torch.set_num_threads(self.threads or default_threads())  # OMP_NUM_THREADS, else the free cores
            try:
                gen = self.generate_ids([texts[i] for i in idx], max_tokens)
            finally:
                torch.set_num_threads(old)
            for i, row in zip(idx, gen):
                stopped = bool(row) and row[-1] in self.stop_ids
                text = self.tok.decode(row, skip_special_tokens=True).strip()
                finish = "refused" if looks_refused(text) else "stop" if stopped else "length"
                yield i, Answer(text, finish)


class FileCoTs:
    """Precomputed CoTs from a JSONL file: rows {query_id, cot} or {query, cot}.

    Not a chat teacher: `lookup` returns the CoT of a query (by id, else by exact text) or None.
    A bad row raises a ValueError naming file, line and field.
    """

    def __init__(self, path: str | os.PathLike):
        from lrem.data import DataError, read_jsonl

        self.path, self.name = Path(path), f"file:{path}"
        if not self.path.is_file():
            raise FileNotFoundError(f"CoT file {self.path} does not exist")
        self.by_id: dict[str, str] = {}
        self.by_text: dict[str, str] = {}
        for n, row in read_jsonl(self.path):  # its lines named on bad JSON; a byte-order mark and .gz read
            if not isinstance(row.get("cot"), str):
                raise DataError(self.path, n, "cot", "missing or not a string")
            try:  # a byte that was not UTF-8 is kept as a surrogate by the reader, to be named here
                row["cot"].encode("utf-8")
            except UnicodeEncodeError:
                raise DataError(self.path, n, "cot", "not valid UTF-8") from None
            key_field = "query_id" if "query_id" in row else "query" if "query" in row else None
            if key_field is None or not isinstance(row[key_field], str) or not row[key_field]:
                raise DataError(self.path, n, key_field or "query_id", "need a non-empty query_id or query")
            table = self.by_id if key_field == "query_id" else self.by_text
            if row[key_field] in table:
                raise DataError(self.path, n, key_field, f"duplicate {row[key_field]!r}")
            table[row[key_field]] = row["cot"]

    def lookup(self, query_id: str, query: str) -> str | None:
        return self.by_id.get(query_id, self.by_text.get(query))


class LabelCoTs:
    """Label distillation (beyond the paper): each query's CoT is built from the dataset's own
    labels, the titles and categories of its relevant items, so it shows how far a perfectly
    informed teacher gets. Free, and a CoT for every labelled query; the construct pipeline
    post-processes it like any teacher's list and cuts it to `cot_max_tokens` student tokens.

    Phrases, in order: the first name of each relevant item (highest relevance first, ties in
    a seeded hash order), then their other names, then their distinct categories. A title
    "corkscrew, bottle screw" counts as two names (catalog titles list synonyms by comma).

    Not a chat teacher: `lookup` gives the list of a query, or None for an unlabelled one.
    """

    name = "labels"

    def __init__(self, qrels: dict[str, dict[str, int]], catalog: dict, seed: int = 0):
        self.qrels, self.catalog, self.seed = qrels, catalog, seed

    def lookup(self, query_id: str, query: str) -> str | None:
        rel = [(-r, hashlib.sha1(f"{self.seed}:{query_id}:{i}".encode()).hexdigest(), i)
               for i, r in self.qrels.get(query_id, {}).items() if r > 0 and i in self.catalog]
        items = [self.catalog[i] for *_, i in sorted(rel)]
        if not items:
            return None
        names = [[n.strip() for n in item.title.split(",") if n.strip()] for item in items]
        phrases = [n[0] for n in names if n] + [x for n in names for x in n[1:]]
        phrases += list(dict.fromkeys(item.category for item in items if getattr(item, "category", None)))
        return ", ".join(phrases)

