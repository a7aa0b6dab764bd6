"""Deltas: a fine-tuned LREM stored as its difference from a built-in backbone, small enough to
commit and ship (a trained 135M model in ~20 MB instead of ~540 MB of weights).

    lrem delta --model runs/cold --out src/lrem/models/lrem-wordnet-135m --rank 32
    LREM.from_pretrained("lrem-wordnet-135m")     # base + delta, materialised once under $LREM_HOME

Each weight matrix's change W - W0 is kept as a rank-r product A @ B, its truncated SVD (the
best rank-r approximation in Frobenius norm; a LoRA-trained model's change is exactly rank r,
so the delta holds it whole); vectors (norms, biases), the new tokens' embedding rows and any
matrix too small to gain from factorising are stored whole. float16 on disk (`delta.safetensors`);
`delta.json` records the base, the rank, the prompt config and how closely the delta reproduces
the full model's embeddings (`fidelity`, measured when it is made).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ._io import atomic_dir, claim_dir, write_json
from .backbones import lrem_home

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


def save_delta(model_path: str, out, base: str | None = None, rank: int = 32, log=print) -> dict:
    """Write the delta folder of the LREM at `model_path` (its base read from its
    lrem_config.json unless given) and return its metadata, fidelity included."""
    from safetensors.torch import save_file

    from .backbones import BUILTINS, resolve_backbone
    from .model import LREM

    folder = Path(resolve_backbone(model_path, log=log))
    if not (folder / "lrem_config.json").is_file():  # before loading anything
        raise ValueError(f"{model_path}: not a trained lrem model (no lrem_config.json); a delta is taken from "
                         "the folder `lrem train` wrote")
    model = LREM.from_pretrained(str(folder), dtype="float32", log=log)
    saved = json.loads((folder / "lrem_config.json").read_text())
    if base is None:
        base = saved.get("base_model") or saved.get("base")
    if base not in BUILTINS:
        raise ValueError(f"{model_path}: its base is {base!r}, not a built-in backbone; pass --base NAME "
                         f"({', '.join(BUILTINS)})")
    ref = LREM.from_pretrained(base, dtype="float32", log=log)
    tensors = make_delta(model, ref, rank)
    apply_delta(ref, tensors)
    ref.config = model.config  # the prompts travel in delta.json: fidelity is measured with them, as loaded
    meta = {"format": FORMAT, "base": base, "rank": rank, "source": str(model_path),
            "prompts": model.config.to_dict(), "training": saved.get("training", []),
            "fidelity": fidelity(model, ref, PROBE_QUERIES, PROBE_TITLES),
            "tensors": len(tensors), "parameters": sum(t.numel() for t in tensors.values())}
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / DELTA_WEIGHTS), metadata={"format": str(FORMAT), "base": base})
        write_json(tmp / DELTA_JSON, meta)
        # the card, and the learned router `lrem router fit --out MODEL` wrote: without it `auto`
        # falls back to the margin router once the delta is loaded
        for name in SHIPPED_FILES:
            if (folder / name).exists():
                (tmp / name).write_text((folder / name).read_text(encoding="utf-8"), encoding="utf-8")
    meta["bytes"] = (Path(out) / DELTA_WEIGHTS).stat().st_size
    return meta


def materialise(name: str, folder: Path | None = None, log=print) -> Path:
    """The full model folder of a shipped delta: base + delta, written once (atomically) under
    `$LREM_HOME/models/NAME@DIGEST` and reused while the delta file is unchanged.

    The folder is named by the delta's content (the first 12 hex digits of its SHA-256): two lrem
    installs that share `$LREM_HOME` but ship different deltas under one name (an upgrade beside
    an older venv, two checkouts) each keep their own model instead of rebuilding over the other's,
    which gave a process the other's weights."""
    import hashlib

    from safetensors.torch import load_file

    from .model import LREM
    from .prompts import PromptConfig

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


SHIPPED_FILES = ("README.md", "router.json")  # shipped beside a delta: its model card and `auto`'s router


def _sync_files(folder: Path, out: Path) -> None:
    """Copy the delta folder's card and learned router (`lrem router fit --out .../router.json`,
    fitted on this very delta's scores) into the built model folder; one removed there goes here."""
    from ._io import atomic_write

    for name in SHIPPED_FILES:
        src, dst = folder / name, out / name
        if src.exists():
            text = src.read_text(encoding="utf-8")
            if not dst.exists() or dst.read_text(encoding="utf-8") != text:
                with atomic_write(dst, "w") as f:
                    f.write(text)
        elif name == "router.json":
            dst.unlink(missing_ok=True)
