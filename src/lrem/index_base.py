"""What every item index shares, whichever holds it: an index folder (`lrem.index`), a Milvus
collection (`lrem.vectordb`), and the chunks of `lrem embed` (`lrem.embed`) either is built from.

The items of a catalog (`catalog_items`): their filter fields (`FILTER_FIELDS`, `item_facets`),
titles (`item_title`) and the digests of what the model embeds for them (`item_digest`;
`unchanged_items`: what an update compares); the model that embedded them (`MODEL_KEYS`,
`model_identity`, `model_fingerprint`); the checks every index makes (`check_embeddings`,
`check_filter`); and what FAISS and Milvus indexes agree on (`fill_missing`: rows short of k hits;
`ivf_lists`: IVF lists for a catalog).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

FILTER_FIELDS = ("category", "brand", "color")  # catalog fields kept per item, to filter searches on


def catalog_items(catalog) -> tuple[list[str], list]:
    """(item ids, items) of a catalog: a mapping item_id -> title / Item / dict, or anything with
    `.items()` giving such pairs (a pandas Series indexed by id). A list, whose ids are unknown,
    is a ValueError that says what to pass."""
    pairs = getattr(catalog, "items", None)
    if not callable(pairs):
        raise ValueError(f"catalog: expected a mapping of item id -> title or item, got a {type(catalog).__name__}; "
                         "e.g. dict(zip(ids, titles))")
    ids, items = [], []
    for i, x in pairs():
        ids.append(i)
        items.append(x)
    return ids, items


def item_facets(items) -> dict[str, list]:
    """The FILTER_FIELDS the catalog items carry: field -> value per item (None where one lacks
    it); fields no item has are left out (titles alone give none)."""
    from .prompts import item_fields

    rows = [item_fields(x) for x in items]
    columns = {f: [r.get(f) or None for r in rows] for f in FILTER_FIELDS}
    return {f: column for f, column in columns.items() if any(v is not None for v in column)}


def item_title(item) -> str:
    """A catalog value's title (a string is one; a mapping or an `Item` has one): `item_fields`'s."""
    from .prompts import item_fields

    return item_fields(item)["title"]


def item_digest(model, item) -> str:
    """A short hash of what `model` embeds for a catalog item (its item template, filled): what
    `ItemIndex.updated` compares to find the items that changed."""
    import hashlib

    from .prompts import item_fields, item_text

    return hashlib.sha1(item_text(item_fields(item), model.config).encode("utf-8")).hexdigest()[:16]


def unchanged_items(model, items: list, stored: list) -> tuple[list[str], list[bool]]:
    """(each item's `item_digest`, whether it is unchanged) for `items` against what an index or a
    collection holds: `stored[n]` is (digest or None, title) of the item kept under the same id, or
    None where none is. With no digest kept (an older lrem, chunks), the title decides where it is
    all the item template embeds; else the item counts as changed."""
    from .prompts import template_fields

    digests = [item_digest(model, x) for x in items]
    title_only = template_fields(model.config.item_template) <= {"title"}

    def same(x, d: str, kept) -> bool:
        if kept is None:
            return False
        if kept[0] is not None:
            return kept[0] == d
        return title_only and kept[1] == item_title(x)

    return digests, [same(x, d, k) for x, d, k in zip(items, digests, stored)]


# what names the model that embedded an index's items (meta.json, a chunk manifest, a Milvus collection)
MODEL_KEYS = ("model", "model_fingerprint", "item_template", "dim")


def model_identity(model) -> dict:
    """`MODEL_KEYS` of `model` (its source, weight fingerprint, item template and dim) and its dtype. A local
    folder is recorded as an absolute path: `lrem search`, `serve` and `index --update` load the
    model an index names, and `--model runs/m` named no folder when run from elsewhere."""
    source = getattr(model, "source", "") or ""
    if source and Path(source).exists():  # (what `resolve_backbone` loads first: a built-in name stays a name)
        source = os.path.abspath(source)
    return {"model": source, "model_fingerprint": model_fingerprint(model),
            "item_template": model.config.item_template, "dim": int(model.dim),
            # what the items were embedded in: an --update embeds its items the same way by default
            "dtype": str(next(model.lm.parameters()).dtype).removeprefix("torch.")}


def model_fingerprint(model) -> str:
    """A short hash of the weights that shape `model`'s embeddings: the final norm and the first row
    of every linear layer (a fine-tune, full or LoRA, changes these). Taken over bfloat16 values,
    so a float32 and a bfloat16 load of the same weights agree. The LREM tokens' rows are left
    out: a plain backbone gets them at load time, computed in the load's dtype, so they differ
    between a float32 and a bfloat16 load of the same files.
    Why: an index names its model, and a name can come to mean other weights (a newer shipped
    `lrem-wordnet-135m`, a retrained folder); queries embedded by other weights than the items
    silently rank wrong items."""
    import hashlib

    import torch

    lm, h = model.lm, hashlib.sha1()
    rows = [m.weight[:1] for m in lm.modules() if isinstance(m, torch.nn.Linear)]
    rows += [p for n, p in lm.named_parameters() if n.endswith("norm.weight") and ".layers." not in n]
    for r in rows:
        h.update(r.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def check_embeddings(emb, n: int, dim: int | None = None) -> np.ndarray:
    """Embeddings fit for an index: (n, dim), finite, unit norm; a ValueError says what is wrong.

    A model or batching bug (zero rows, NaNs) must never reach an index, where it would fail
    silently as bad rankings.
    """
    emb = np.asarray(emb)
    if emb.ndim != 2 or emb.shape[0] != n or (dim is not None and emb.shape[1] != dim):
        raise ValueError(f"embeddings of shape {emb.shape}; expected ({n}, {dim if dim is not None else 'dim'})")
    bad = ~np.isfinite(emb).all(axis=1)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} of {n} embeddings are not finite (first: row {int(np.argmax(bad))})")
    norms = np.linalg.norm(emb.astype(np.float64), axis=1)
    off = np.abs(norms - 1.0) > 1e-3
    if off.any():
        j = int(np.argmax(off))
        raise ValueError(f"{int(off.sum())} of {n} embeddings are not unit length (row {j}: norm {norms[j]:.4g})")
    return emb


def check_filter(where: dict, fields) -> None:
    """A ValueError naming the fields an index can filter on, where `where` asks for another, or
    naming a value that is not a string or holds a control character (which no catalog value
    holds: the data rules refuse them, so such a filter would match nothing)."""
    from ._text import control_char

    for name, values in where.items():
        if name not in fields:
            have = ", ".join(sorted(fields)) or "none (its catalog had no " + "/".join(FILTER_FIELDS) + ")"
            raise ValueError(f"filter field {name!r}: this index can filter on {have}")
        if not isinstance(values, (str, list, tuple, set, frozenset)):
            raise ValueError(f"filter field {name!r}: {values!r} is not a string or a list of strings")
        for value in [values] if isinstance(values, str) else values:
            if not isinstance(value, str) or control_char(value):
                raise ValueError(f"filter field {name!r}: value {value!r} is not a string without control characters")


def fill_missing(scores: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """FAISS pads a row with fewer hits than k with -3.4e38: repeat its last real score there
    instead (the router's margins read the k-th score), 0 where a row has none."""
    missing = idx < 0
    if not missing.any():
        return scores
    scores = scores.copy()
    for row in np.flatnonzero(missing.any(axis=1)):
        real = scores[row][~missing[row]]
        scores[row][missing[row]] = real[-1] if len(real) else 0.0
    return scores


def ivf_lists(n_items: int) -> int:
    """IVF lists for a catalog: ~4 sqrt(n), rounded down to a power of two (FAISS's guideline).

    >>> ivf_lists(1_000_000)
    2048
    """
    return 1 << int(np.log2(4 * np.sqrt(max(n_items, 1))))
