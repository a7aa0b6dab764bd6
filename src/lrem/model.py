"""The LREM model: one decoder LLM that reasons about a query, then embeds it at `<emb>`.

    from lrem.model import LREM
    model = LREM.from_pretrained("smollm2-135m-instruct")       # built-in, offline
    q = model.encode_queries(["a device for pulling corks"], mode="reason")
    q.cots          # ['corkscrew, wine opener, ...']
    q.embeddings    # (1, 576) float32, L2-normalised
    items = model.encode_items(["corkscrew, bottle screw"])   # (1, 576)
    model.similarity(q.embeddings, items)                       # (1, 1) cosine
    model.encode_items("corkscrew")                             # one string: (576,), as sentence-transformers

Inputs longer than the model's limits (`max_query_tokens`, `max_item_tokens` in its PromptConfig)
are cut and counted in `model.truncated` by default; `truncate=False` makes them an error.

Query side (LREM_SPEC): chat prompt + `<think>` + CoT + `</think><emb>`; the CoT is generated
greedily (at most `cot_max_tokens` tokens) in `reason` mode, empty in `direct` mode, or given.
Item side: chat prompt + `<emb>`, no reasoning. Embedding = last-layer hidden state at `<emb>`.

Here: the network, loading and saving, the `<emb>` read-out, and which folder a model name means
(`resolve_backbone`: a folder, a built-in backbone, a hub model, or a shipped trained model, built
once by `materialise` from its delta (`lrem.delta`) and its base, loaded here as an LREM); the
templates are `lrem.prompts.TemplateMixin`, and the fast paths (prompt-prefix KV cache, greedy
decoding with drafts, CUDA graphs, vLLM) are `model.engine`, an `lrem.engine.QueryEngine`.
"""
from __future__ import annotations

import collections
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ._defaults import ITEM_BATCH, QUERY_BATCH, ROLLOUT_BATCH
from ._io import atomic_dir, atomic_write, claim_dir, write_json
from ._malloc import keep_freed_memory
from ._text import check_query
from .backbones import BASE_MODEL, BUILTINS, builtin_path, default_dtype, hub_snapshot, load_backbone, lrem_home
from .decoding import kv_cache, shared_prefix_len
from .delta import DELTA_JSON, DELTA_WEIGHTS, FORMAT, SHIPPED_FILES, apply_delta, shipped
from .engine import EngineConfig, QueryEncoding, QueryEngine, check_batch_size
from .prompts import InputTooLong, PromptConfig, TemplateMixin  # noqa: F401  InputTooLong: users catch it from here
from .prompts import QUERY_MODES, item_fields
from .router_learned import load_router  # the router's file only (lrem.router is search's)

LREM_CONFIG = "lrem_config.json"
TRAINED_MODEL = "lrem-wordnet-135m"  # the shipped reasoning model (a delta on BASE_MODEL, lrem.delta)


def default_model() -> str:
    """What a user gets without naming a model: the shipped trained model, or the untrained base
    where a checkout lacks it (an untrained model returns near-identical items for every query)."""
    return TRAINED_MODEL if TRAINED_MODEL in shipped() else BASE_MODEL


def resolve_backbone(name_or_path: str, log=print) -> str:
    """A local folder -> itself; a built-in name -> its converted folder (no hub); a shipped trained
    model (`lrem.delta`) -> its folder, built from its base and delta once; anything else is a
    Hugging Face hub name -> its local snapshot, downloaded when the hub is reachable.

    The hub is asked only for hub names, once, with a short timeout and no retries, so an
    unreachable hub is one clear error (FileNotFoundError) in about a second, not a minute of
    retries and a traceback. A snapshot already in the HF cache loads offline.
    """
    path = Path(name_or_path)
    if path.is_dir() and (path / "delta.json").is_file() and not (path / "config.json").exists():
        # a delta folder (`lrem delta --out`): base + delta, built once
        return str(materialise(path.resolve().name, path, log=log))
    if path.exists():
        return str(name_or_path)
    if name_or_path in BUILTINS:
        return str(builtin_path(name_or_path, log=log))
    if name_or_path in shipped():
        return str(materialise(name_or_path, log=log))
    name = str(name_or_path)
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:  # a path, never a hub name (ORG/NAME)
        raise FileNotFoundError(f"{name!r} is not a folder: no such model folder here")
    return hub_snapshot(name, log=log)


def materialise(name: str, folder: Path | None = None, log=print) -> Path:
    """The full model folder of a shipped delta: base + delta, written once (atomically) under
    `$LREM_HOME/models/NAME@DIGEST` and reused while the delta file is unchanged.

    The folder is named by the delta's content (the first 12 hex digits of its SHA-256): two lrem
    installs that share `$LREM_HOME` but ship different deltas under one name (an upgrade beside
    an older venv, two checkouts) each keep their own model instead of rebuilding over the other's,
    which gave a process the other's weights."""
    import hashlib

    from safetensors.torch import load_file

    folder = folder or shipped()[name]
    meta = json.loads((folder / DELTA_JSON).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder / DELTA_JSON}: delta format {meta.get('format')!r}, this lrem reads {FORMAT}")
    with open(folder / DELTA_WEIGHTS, "rb") as f:
        stamp = hashlib.file_digest(f, "sha256").hexdigest()  # ~20 ms for a 23 MB delta
    out = lrem_home() / "models" / f"{name}@{stamp[:12]}"
    if (out / "delta_stamp").exists() and (out / "delta_stamp").read_text() == stamp:
        _sync_files(folder, out)
        return out
    log(f"building {name} from {meta['base']} + {folder / DELTA_WEIGHTS} -> {out} (once)")
    model = LREM.from_pretrained(meta["base"], dtype="float32", log=log)
    apply_delta(model, load_file(str(folder / DELTA_WEIGHTS)))
    model.config = PromptConfig.from_dict(meta["prompts"])
    model.source, model.base, model.stages = name, meta["base"], meta.get("training", [])
    if (out / "delta_stamp").exists():
        claim_dir(out, adopt=True)  # our own cache folder, built before lrem marked its folders: replaceable
    model.save_pretrained(out)
    (out / "delta_stamp").write_text(stamp)
    _sync_files(folder, out)
    return out


def _sync_files(folder: Path, out: Path) -> None:
    """Copy the delta folder's card and learned router (`lrem router fit --out .../router.json`,
    fitted on this very delta's scores) into the built model folder; one removed there goes here."""
    for name in SHIPPED_FILES:
        src, dst = folder / name, out / name
        if src.exists():
            text = src.read_text(encoding="utf-8")
            if not dst.exists() or dst.read_text(encoding="utf-8") != text:
                with atomic_write(dst, "w") as f:
                    f.write(text)
        elif name == "router.json":
            dst.unlink(missing_ok=True)


DTYPES = ("auto", "float32", "bfloat16", "float16")


def emb_hidden(hidden: torch.Tensor, input_ids: torch.Tensor, emb_id: int) -> torch.Tensor:
    """Hidden state at the last `<emb>` of each row.  hidden (B, T, D), input_ids (B, T) -> (B, D).

    Raises if a row has no `<emb>` (it was truncated away or never added).

    >>> emb_hidden(torch.arange(6.0).view(1, 3, 2), torch.tensor([[5, 9, 7]]), emb_id=9)
    tensor([[2., 3.]])
    """
    is_emb = input_ids == emb_id  # (B, T)
    if not bool(is_emb.any(dim=1).all()):
        raise ValueError("a sequence has no <emb> token")
    t = torch.arange(input_ids.shape[1], device=input_ids.device)
    pos = torch.where(is_emb, t, -1).max(dim=1).values  # (B,) last <emb> position
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), pos]


def similarity(a, b) -> np.ndarray | torch.Tensor:
    """Cosine similarity of every row of `a` with every row of `b`: (n, m); a 1-D vector counts as
    one row. numpy in, float32 numpy out; where either is a tensor, a tensor out, on its device
    and with its gradient (as `SentenceTransformer.similarity`)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        t = a if isinstance(a, torch.Tensor) else b
        a, b = (torch.atleast_2d(torch.as_tensor(x, device=t.device)).float() for x in (a, b))
        return torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T
    a, b = (np.atleast_2d(np.asarray(x, dtype=np.float32)) for x in (a, b))
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def as_batch(texts, name: str = "texts") -> tuple[list, bool]:
    """(`texts` as a list, whether it was one string): the sentence-transformers convention of the
    encoders and `Searcher.search`: one string is one input, whose result comes back unwrapped.

    >>> as_batch("tea"), as_batch(("tea", "mug"))
    ((['tea'], True), (['tea', 'mug'], False))
    """
    if isinstance(texts, str):
        return [texts], True
    if hasattr(texts, "columns") and hasattr(texts, "iterrows"):  # list() of a DataFrame gives its column names
        raise TypeError(f"{name}: expected a list (or one string), got a {type(texts).__name__}; pass one column "
                        f"(df['title']) or, for items with more fields, df.to_dict('records')")
    if isinstance(texts, Mapping):  # list() would give its keys: a catalog {id: title} would embed the ids
        raise TypeError(f"{name}: expected a list (or one string), got a {type(texts).__name__}; for a catalog "
                        f"{{id: item}} pass list(catalog.values())")
    try:
        return list(texts), False
    except TypeError:  # None, a number: say which argument
        raise TypeError(f"{name}: expected a list (or one string), got {type(texts).__name__}") from None


def check_items(items: list) -> None:
    """Each item a usable title (the query rule, `lrem._text.check_query`: what a dataset's titles
    and the server's item texts must be too), or a mapping / `lrem.data.Item` with one."""
    for i, x in enumerate(items):
        if isinstance(x, str):
            check_query(x, f"items[{i}]")
            continue
        title = item_fields(x)["title"]
        if title is None:
            err = ValueError if isinstance(x, Mapping) or hasattr(x, "title") else TypeError
            raise err(f"items[{i}]: {x!r:.80}; expected a title string, or a dict / lrem.data.Item with a 'title'")
        check_query(title, f"items[{i}] title")


PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")  # sentence-transformers' `precision` values


@dataclass(frozen=True)
class STOptions:
    """sentence-transformers' encode keywords, read: show a progress bar, return a torch tensor,
    quantise to `precision`."""
    show_progress: bool
    as_tensor: bool
    precision: str


def st_options(show_progress: bool, show_progress_bar: bool | None, normalize_embeddings: bool,
               convert_to_numpy: bool, convert_to_tensor: bool, precision: str = "float32") -> STOptions:
    """sentence-transformers' encode keywords, for code written against it, checked before any
    embedding runs."""
    if not normalize_embeddings:
        raise ValueError("normalize_embeddings=False: lrem's embeddings are always L2-normalised (the model is "
                         "trained for cosine = inner product); there are no unnormalised ones")
    if precision is None:  # sentence-transformers reads None as no quantisation
        precision = "float32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; one of {', '.join(map(repr, PRECISIONS))}")
    return STOptions(show_progress if show_progress_bar is None else bool(show_progress_bar),
                     bool(convert_to_tensor) or not convert_to_numpy, precision)


def quantized(emb: np.ndarray, precision: str) -> np.ndarray:
    """`emb` (n, dim) at sentence-transformers' `precision`, by its own `quantize_embeddings`:
    int8 / uint8 scale each dimension by the range it has in `emb` (so quantise a whole batch, or
    a catalog, at once), binary / ubinary pack the signs 8 to a byte (dim / 8 columns)."""
    if precision == "float32":
        return emb
    from sentence_transformers.util.quantization import quantize_embeddings
    return quantize_embeddings(emb, precision)


def mode_error(mode: str) -> str:
    """Why the model alone cannot encode queries in `mode`: the other modes are search modes, which
    need an index (`lrem.search.Searcher.search`)."""
    if mode == "auto":
        return ("mode='auto' needs an index: its router reads each query's direct scores over the items to pick "
                "the queries that reason, so the model alone cannot run it; use Searcher(model, index)"
                ".search(queries, mode='auto') (or .search_auto). Here: mode 'reason' or 'direct' (or cots=)")
    return (f"mode={mode!r}; the model encodes in {' or '.join(map(repr, QUERY_MODES))} (or after cots=); "
            f"the search modes (grounded, the *-cot ablations) need an index: Searcher(model, index).search("
            f"queries, mode={mode!r})")


def check_not_export(path) -> None:
    """Refuse a folder `lrem export` wrote: its chat template is the export's, which wraps lrem's
    prompts again, so lrem would embed every text with both (cosine ~0.9 to the model's own)."""
    from .export import EXPORT_FILE, read_export

    if (Path(path) / EXPORT_FILE).is_file():
        source = read_export(path).get("source") or "the model it was exported from"
        raise ValueError(f"{path}: a sentence-transformers export ({EXPORT_FILE}), not an lrem model; load it with "
                         f"SentenceTransformer, or give lrem {source}")


class LREM(TemplateMixin, torch.nn.Module):
    """A causal LM backbone plus the LREM prompts and special tokens.

    Args:
        lm: a transformers causal LM whose vocabulary already has the special tokens.
        tokenizer: its tokenizer.
        config: prompts and budgets (saved as `lrem_config.json`).
        engine_config: how `self.engine` decodes (default: `EngineConfig.from_env()`).
    """

    def __init__(self, lm, tokenizer, config: PromptConfig | None = None, engine_config: EngineConfig | None = None):
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer
        self.config = config or PromptConfig()
        self.tokenizer.padding_side = "left"  # generation appends on the right
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        ids = self.tokenizer.convert_tokens_to_ids([self.config.think_token, self.config.think_end_token,
                                                    self.config.emb_token])
        if self.tokenizer.unk_token_id is not None and self.tokenizer.unk_token_id in ids:
            raise ValueError("the tokenizer lacks the LREM special tokens; use LREM.from_pretrained")
        self.think_id, self.think_end_id, self.emb_id = ids
        self.source = ""  # where it was loaded from (recorded in index metadata)
        self.folder = ""  # the local folder it was loaded from (for a name, the folder it resolved to)
        self.base = ""  # the backbone these weights started from (model card)
        # the training stages behind these weights (lrem_config.json, model card); not `training`,
        # which is nn.Module's train/eval flag (`.train()` would overwrite the list with a bool)
        self.stages: list[dict] = []
        # inputs cut to the token limits so far, per side ("query", "item"): what `lrem index` and
        # `lrem eval` report, and /metrics counts
        self.truncated: collections.Counter = collections.Counter()
        # the learned router of `auto` mode (`lrem.router.LearnedRouter`) when the model folder has a
        # router.json (`lrem router fit`), else None: searchers then use the margin router
        self.router = None
        # the fast paths and what they keep between calls (prefix KV, decode steps, recent CoTs)
        self.engine = QueryEngine(self, engine_config)

    # ---- loading and saving -------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, name_or_path: str | None = None, dtype: str | torch.dtype = "auto", device: str = "cpu", log=print,
        runtime: str = "transformers",
    ) -> "LREM":
        """Load an LREM folder, a plain HF folder or hub name, a built-in backbone name, or a
        shipped trained model (`lrem-wordnet-135m`, the default: see `default_model`).

        A folder with `lrem_config.json` is an LREM model (special tokens already in place); a
        `router.json` beside it (`lrem router fit`) becomes `model.router`, which `auto` mode uses.
        Anything else is a backbone: the three special tokens are added and the embedding
        matrix grows by three rows (initialised to the mean of the others).
        `dtype`: "auto" (bfloat16 where the hardware has it, see `default_dtype`), "bfloat16"
        or "float32".
        `runtime`: "transformers" (the default: training, saving, any backbone), "native" (inference
        without importing transformers, `lrem.network`: a cold `lrem search` starts ~3 s sooner) or
        "auto" (native where it can load the folder, see `lrem.backbones.load_backbone`).
        """
        if isinstance(dtype, str) and dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}; expected one of {', '.join(DTYPES)}")
        if dtype == "auto":
            dtype = default_dtype(device)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if torch.device(device).type == "cpu":
            keep_freed_memory()  # CPU forwards reuse freed memory instead of faulting pages in again
        name_or_path = name_or_path or default_model()  # recorded below: an index must name a loadable model
        path = resolve_backbone(name_or_path, log=log)
        cfg_file = Path(path) / LREM_CONFIG
        check_not_export(path)
        lm, tok = load_backbone(path, name_or_path, dtype, add_special_tokens=not cfg_file.exists(), runtime=runtime,
                                device=device)
        saved = json.loads(cfg_file.read_text()) if cfg_file.exists() else None
        config = PromptConfig.from_dict(saved["prompts"]) if saved is not None else PromptConfig()
        model = cls(lm.to(device).eval(), tok, config)
        model.source = model.base = str(name_or_path)
        model.folder = str(path)
        if saved is not None:
            model.stages = list(saved.get("training", []))
            model.base = saved.get("base_model") or saved.get("base") or model.source
            model.router = load_router(path)
        return model

    def save_pretrained(self, out: str | os.PathLike, stage: dict | None = None, metrics: dict | None = None,
                        state_dict: dict | None = None) -> None:
        """Write backbone, tokenizer, `lrem_config.json` and a model card (README.md) to `out`
        atomically. `stage` (a training stage: name, steps, data, ...) is recorded after the
        stages these weights already went through; `metrics` go into the card; `state_dict`: the
        backbone's weights to write in place of `self.lm`'s own (a sharded run's gathered
        weights, `lrem.train.loop.Run.full_weights`). A learned router
        (`self.router`, from router.json) is not written: it was fitted on the scores of the
        weights it was loaded with, so a saved model gets its own (`lrem router fit`)."""
        from .card import model_card

        training = self.stages + ([stage] if stage else [])
        with atomic_dir(out) as tmp:
            self.lm.save_pretrained(tmp, state_dict=state_dict)
            self.tokenizer.save_pretrained(tmp)
            write_json(tmp / LREM_CONFIG, {"prompts": self.config.to_dict(), "base": self.source,
                                           "base_model": self.base, "training": training})
            (tmp / "README.md").write_text(model_card(self, training=training, metrics=metrics), encoding="utf-8")

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    @property
    def dim(self) -> int:
        return self.lm.config.hidden_size

    # ---- embeddings ---------------------------------------------------------------------
    def embed_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised `<emb>` hidden states, (B, D), with gradients if enabled.

        Runs the decoder without the LM head (the vocabulary projection is not needed here).
        Position ids come from the mask, so left padding does not shift positions.
        """
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        out = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    use_cache=False)
        return self.pool(out.last_hidden_state, input_ids)

    def pool(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The L2-normalised float32 hidden state at each row's last `<emb>`.  (B, T, D), (B, T) -> (B, D)."""
        return F.normalize(emb_hidden(hidden, input_ids, self.emb_id).float(), dim=-1)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      share_prefix: bool = True) -> torch.Tensor:
        """Last hidden states (B, T, H) of right-padded rows, with gradients if enabled.

        With `share_prefix`, the token prefix all rows share (chat template, system prompt and
        instruction: most of a query side) runs once at batch 1 and its keys and values are
        broadcast to the batch. The values equal a plain batched pass, gradients included
        (they sum over the broadcast); the training cost falls by the shared share of tokens.
        """
        b, t = input_ids.shape
        p = shared_prefix_len(input_ids, attention_mask) if share_prefix else 0
        dec = self.lm.get_decoder()
        checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in self.lm.modules())
        if p == 0 or checkpointing:  # activation checkpointing runs without a KV cache
            pos = torch.arange(t, device=input_ids.device).expand(b, -1)
            return dec(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
                       use_cache=False).last_hidden_state
        pre = dec(input_ids=input_ids[:1, :p], position_ids=torch.arange(p, device=input_ids.device)[None],
                  use_cache=True)
        kv = [(layer.keys.expand(b, -1, -1, -1), layer.values.expand(b, -1, -1, -1))
              for layer in pre.past_key_values.layers]
        pos = torch.arange(p, t, device=input_ids.device).expand(b, -1)  # (B, T - P)
        out = dec(input_ids=input_ids[:, p:], attention_mask=attention_mask, position_ids=pos,
                  past_key_values=kv_cache(self.lm, kv), use_cache=True).last_hidden_state
        return torch.cat([pre.last_hidden_state.expand(b, -1, -1), out], dim=1)

    def encode_items(self, items, batch_size: int = ITEM_BATCH, show_progress: bool = False, truncate: bool = True, *,
                     show_progress_bar: bool | None = None, normalize_embeddings: bool = True,
                     convert_to_numpy: bool = True, convert_to_tensor: bool = False, precision: str = "float32",
                     device: str | torch.device | None = None) -> np.ndarray:
        """Item embeddings (n, dim), float32, L2-normalised; items never reason. `items`: titles,
        or mappings / `lrem.data.Item`s whose fields the item template names; one item (a
        string) gives one vector (dim,), no items (0, dim). A title must be a non-empty string
        without control characters (the rule of datasets and the server); else a ValueError /
        TypeError naming `items[i]`. `truncate`: see `fit`.

        sentence-transformers' keywords are accepted: `show_progress_bar` (= `show_progress`),
        `normalize_embeddings=True` (always so; False is an error), `convert_to_numpy=False` or
        `convert_to_tensor=True` (a torch tensor on the model's device), `precision` ("int8",
        "uint8", "binary", "ubinary": its `quantize_embeddings`, see `quantized`) and `device`
        (the model moves there first, and stays, as sentence-transformers' model does)."""
        check_batch_size(batch_size)
        opts = st_options(show_progress, show_progress_bar, normalize_embeddings, convert_to_numpy,
                          convert_to_tensor, precision)
        items, one = as_batch(items, "items")
        check_items(items)
        self._move(device)
        emb = (self.engine.embed_texts(self.item_texts(items, truncate), batch_size, "items", opts.show_progress)
               if items else np.zeros((0, self.dim), dtype=np.float32))
        return self._output(emb, one, opts)

    def _move(self, device) -> None:
        """sentence-transformers' `device=`: run there (the engine rebuilds its caches for moved weights)."""
        if isinstance(device, (list, tuple)):  # sentence-transformers' multi-process pool
            raise ValueError(f"device={device!r}: lrem encodes in this process on one device; pass one (or None)")
        if device is not None and torch.device(device) != self.device:
            self.lm.to(device)

    def _output(self, emb: np.ndarray, one: bool, opts: STOptions):
        """`emb` (n, dim) as the caller asked: quantised to `opts.precision`, one row for one input,
        a numpy array or a torch tensor on the model's device."""
        emb = quantized(emb, opts.precision)
        emb = emb[0] if one else emb
        return torch.from_numpy(emb).to(self.device) if opts.as_tensor else emb

    def get_sentence_embedding_dimension(self) -> int:
        """`dim`, under sentence-transformers' name."""
        return self.dim

    def encode_document(self, items, **kwargs) -> np.ndarray:
        """`encode_items` under sentence-transformers' name."""
        return self.encode_items(items, **kwargs)

    def encode_query(self, texts, mode: str = "reason", **kwargs) -> np.ndarray:
        """Embeddings only, as sentence-transformers' `encode_query`: (dim,) for a string, (n, dim)
        for a list. `encode_queries` also gives the CoTs."""
        return self.encode_queries(texts, mode=mode, **kwargs).embeddings

    similarity = staticmethod(similarity)

    def encode_queries(self, texts: list[str] | str, mode: str = "reason", cots: list[str] | str | None = None,
                       batch_size: int = QUERY_BATCH, show_progress: bool = False, fast: bool = True,
                       truncate: bool = True, candidates: list | None = None, *, show_progress_bar: bool | None = None,
                       normalize_embeddings: bool = True, convert_to_numpy: bool = True,
                       convert_to_tensor: bool = False, precision: str = "float32",
                       device: str | torch.device | None = None) -> QueryEncoding:
        """Query embeddings after reasoning (`reason`), after none (`direct`), or after `cots`;
        `candidates`: per query, first-stage titles shown after it (grounded queries), or None.

        Given `cots` (teacher CoTs, ablations), `mode` is ignored. `auto` and the other search
        modes need an index: `lrem.search.Searcher.search`. In `reason` mode the
        embedding equals the one `encode_queries(texts, cots=result.cots)` gives; `fast`
        (default) embeds each query from the KV cache its reasoning left (`engine.reason`).
        One query as a string gives embeddings (dim,) and its CoT as a string; no queries give
        (0, dim) and []. A query must be a non-empty string without control characters (the rule
        of `lrem search` and the server); else a ValueError naming `texts[i]`. `truncate`:
        queries over `max_query_tokens` are cut and counted (True) or an error (False).
        sentence-transformers' keywords: as `encode_items`.
        """
        check_batch_size(batch_size)
        opts = st_options(show_progress, show_progress_bar, normalize_embeddings, convert_to_numpy,
                          convert_to_tensor, precision)
        if cots is None and mode not in QUERY_MODES:
            raise ValueError(mode_error(mode))
        texts, one = as_batch(texts)
        if one:
            if cots is not None and not isinstance(cots, str):  # one query, one CoT: both strings
                raise ValueError(f"one query (a string) takes one CoT as a string, got {type(cots).__name__}")
            cots = None if cots is None else [cots]
            candidates = None if candidates is None else [candidates]
        elif isinstance(cots, str):
            raise ValueError("cots: a list of strings, one per query (a string is the CoT of one query given as a string)")
        elif cots is not None:  # as the queries: a generator, a Series; a dict {query: cot} would give its keys
            cots = as_batch(cots, "cots")[0]
        for i, t in enumerate(texts):
            check_query(t, "query" if one else f"texts[{i}]")
        if cots is not None and len(cots) != len(texts):
            raise ValueError(f"{len(cots)} cots for {len(texts)} queries")
        for i, c in enumerate(cots or ()):  # "" is a CoT (direct); anything else but a string failed at .strip()
            if not isinstance(c, str):
                raise ValueError(f"cots[{i}] is not a string ({type(c).__name__})")
        for i, titles in enumerate(candidates or ()):  # a string would be shown as its characters, "t; e; a"
            if isinstance(titles, str):
                raise ValueError(f"candidates[{i}]: {titles!r:.60} is a string; give each query a list of titles "
                                 f"(or None)")
        self._move(device)
        if not texts:
            enc = QueryEncoding(np.zeros((0, self.dim), dtype=np.float32), [])
        else:
            enc = self._encode_queries(texts, mode, cots, batch_size, opts.show_progress, fast, truncate, candidates)
        return QueryEncoding(self._output(enc.embeddings, one, opts), enc.cots[0] if one else enc.cots)

    def _encode_queries(self, texts: list[str], mode: str, cots: list[str] | None, batch_size: int,
                        show_progress: bool, fast: bool, truncate: bool, candidates: list | None) -> QueryEncoding:
        """`encode_queries` of a checked, non-empty list."""
        texts = self.fit(texts, "query", truncate)
        if cots is not None:
            cots = [c.strip() for c in cots]
        elif mode == "reason" and fast and self.engine.vllm() is None:
            return self.engine.reason(texts, batch_size, show_progress, candidates)
        elif mode == "reason":
            cots = self.engine.generate_cots(texts, batch_size, show_progress, None, fast, candidates)
        else:
            cots = [""] * len(texts)  # direct
        emb = self.engine.embed_texts(self.query_texts(texts, cots, candidates=candidates), batch_size, "queries",
                                      show_progress)
        return QueryEncoding(emb, cots)

    # ---- reasoning (decoded by `self.engine`) ---------------------------------------------
    def generate_cots(self, texts: list[str], batch_size: int = QUERY_BATCH, show_progress: bool = False,
                      max_new_tokens: int | None = None, fast: bool = True) -> list[str]:
        """Greedy CoTs of at most `cot_max_tokens` tokens, batched.

        Generation stops at `</think>`, `<emb>` or end-of-turn; whatever the model emits, the
        caller closes the CoT with `</think><emb>` itself. `fast` (default) decodes with the
        cached prompt prefix and a preallocated KV cache (`engine.greedy`; vLLM instead when it is
        installed and the model is on CUDA); `fast=False` is plain `lm.generate` on left-padded
        prompts. Both give the same CoTs (up to float rounding on near-ties).
        """
        return self.engine.generate_cots(texts, batch_size, show_progress, max_new_tokens, fast)

    def sample_cots(self, texts: list[str], num_samples: int = 8, temperature: float = 1.0, top_p: float = 1.0,
                    max_new_tokens: int | None = None, generator: torch.Generator | None = None,
                    batch_size: int = ROLLOUT_BATCH) -> list[list[int]]:
        """`num_samples` sampled continuations of each query prompt (RL rollouts), as token ids.

        Returns len(texts) * num_samples rows (query i's samples at rows i*num_samples ...), each
        `max_new_tokens` ids long (default `cot_max_tokens`): the sampled tokens up to and
        including the first stop id (`stop_ids`), then pad. Same cached-prefix decoding as the
        greedy fast path, with top-p sampling at `temperature` in place of argmax.
        """
        return self.engine.sample_cots(texts, num_samples, temperature, top_p, max_new_tokens, generator, batch_size)
