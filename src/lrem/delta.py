"""Deltas: a fine-tuned LREM stored as its difference from a built-in backbone, small enough to
commit and ship (a trained 135M model in ~20 MB instead of ~540 MB of weights).

    lrem delta --model runs/cold --out src/lrem/models/lrem-wordnet-135m --rank 32   # lrem.delta_save
    LREM.from_pretrained("lrem-wordnet-135m")     # base + delta, materialised once under $LREM_HOME

Each weight matrix's change W - W0 is kept as a rank-r product A @ B, its truncated SVD (the
best rank-r approximation in Frobenius norm; a LoRA-trained model's change is exactly rank r,
so the delta holds it whole); vectors (norms, biases), the new tokens' embedding rows and any
matrix too small to gain from factorising are stored whole. float16 on disk (`delta.safetensors`);
`delta.json` records the base, the rank, the prompt config and how closely the delta reproduces
the full model's embeddings (`fidelity`, measured when it is made).

Here: the format (`make_delta`, `apply_delta`) and the shipped deltas (`shipped`); they take and
change models, never load them. Writing a delta folder is `lrem.delta_save.save_delta`; building
a shipped model's folder from its base is `lrem.model.materialise` (`resolve_backbone` calls it).
"""
from __future__ import annotations

from pathlib import Path

import torch

DELTA_JSON, DELTA_WEIGHTS = "delta.json", "delta.safetensors"
FORMAT = 1
# Where the deltas shipped with lrem live (package data): each subfolder is a built-in model name.
SHIPPED = Path(__file__).resolve().parent / "models"


def shipped() -> dict[str, Path]:
    """Built-in trained models: name -> delta folder (those committed under src/lrem/models)."""
    if not SHIPPED.is_dir():
        return {}
    return {p.name: p for p in sorted(SHIPPED.iterdir()) if (p / DELTA_JSON).is_file()}


def _factor(d: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A, B) with A @ B the best rank-`rank` approximation of d, or None when storing d whole
    is as small."""
    m, n = d.shape
    if rank * (m + n) >= m * n:
        return None
    # The top singular pairs from the eigenvectors of the smaller Gram matrix, in float64: the same
    # factors as a full SVD (to float32 precision for the kept pairs) at a fraction of its cost on
    # tall matrices (the 49k x 576 embeddings: 1.7 s against 4.6 s on one thread).
    x = d.double()
    tall = m >= n
    g = x.T @ x if tall else x @ x.T
    _, vecs = torch.linalg.eigh(g)  # ascending
    v = vecs[:, -rank:].flip(-1)  # (small side, rank): right (tall) or left singular vectors
    if tall:
        return (x @ v).float().contiguous(), v.T.float().contiguous()  # (U S) and Vh
    return v.float().contiguous(), (v.T @ x).float().contiguous()


@torch.no_grad()
def make_delta(model, base, rank: int = 32) -> dict[str, torch.Tensor]:
    """The delta of `model` from `base` (two LREMs of the same shape; `base` as loaded from the
    built-in backbone, new tokens included): tensor name -> tensor, float16."""
    base_params = dict(base.lm.named_parameters())
    out: dict[str, torch.Tensor] = {}
    new_ids = [model.think_id, model.think_end_id, model.emb_id]
    for name, p in model.lm.named_parameters():
        b = base_params.get(name)
        if b is None or b.shape != p.shape:
            raise ValueError(f"{name}: shape {tuple(p.shape)} in the model, "
                             f"{None if b is None else tuple(b.shape)} in the base; not a fine-tune of it")
        d = p.detach().float() - b.detach().float()
        if not bool(d.any()):
            continue
        is_emb = p is model.lm.get_input_embeddings().weight
        if is_emb:  # the new tokens' rows are kept exactly, so the low rank goes to the rest
            d[new_ids] = 0
        if bool(d.any()):  # else only the new rows changed (as LoRA trains the embeddings)
            ab = _factor(d, rank) if d.ndim == 2 else None
            if ab is None:
                out[f"{name}::full"] = d.half()
            else:
                out[f"{name}::A"], out[f"{name}::B"] = ab[0].half(), ab[1].half()
        if is_emb:
            out[f"{name}::rows"] = p.detach()[new_ids].half()
            out[f"{name}::row_ids"] = torch.tensor(new_ids)
    return out


@torch.no_grad()
def apply_delta(base, tensors: dict[str, torch.Tensor]) -> None:
    """Add a delta to `base`'s weights in place (an LREM loaded from the delta's backbone)."""
    params = dict(base.lm.named_parameters())
    for key in sorted(tensors):
        name, kind = key.rsplit("::", 1)
        if name not in params:
            raise ValueError(f"delta tensor {key!r} names no parameter of the base model")
        p = params[name]
        if kind == "full":
            p.add_(tensors[key].to(p.dtype))
        elif kind == "A":
            p.add_((tensors[key].float() @ tensors[f"{name}::B"].float()).to(p.dtype))
    for key in tensors:  # exact rows last, over the low-rank approximation
        if key.endswith("::rows"):
            name = key.rsplit("::", 1)[0]
            params[name][tensors[f"{name}::row_ids"]] = tensors[key].to(params[name].dtype)


@torch.no_grad()
def fidelity(model, other, queries: list[str], titles: list[str]) -> dict[str, float]:
    """Lowest and mean cosine between two models' embeddings of the same texts (direct-mode
    queries and items)."""
    out = {}
    for side, enc in (("query", lambda m: m.encode_queries(queries, mode="direct").embeddings),
                      ("item", lambda m: m.encode_items(titles))):
        a, b = torch.from_numpy(enc(model)), torch.from_numpy(enc(other))
        cos = (a * b).sum(-1)
        out[f"{side}_cos_min"], out[f"{side}_cos_mean"] = round(float(cos.min()), 6), round(float(cos.mean()), 6)
    return out


PROBE_QUERIES = ["a device for pulling corks", "something warm for the feet", "a drink stronger than tea",
                 "a small boat propelled by oars", "medical instrument that records brain currents",
                 "a shelter for a dog", "a knife with a folding blade", "a hat worn by a chef"]
PROBE_TITLES = ["corkscrew, bottle screw", "slipper, carpet slipper", "espresso", "rowboat", "electroencephalograph",
                "doghouse, kennel", "jackknife", "chef's hat, toque"]


SHIPPED_FILES = ("README.md", "router.json")  # shipped beside a delta: its model card and `auto`'s router
