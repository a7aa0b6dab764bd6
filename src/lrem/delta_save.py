"""`lrem delta`: write the delta folder of a trained LREM (`lrem.delta`'s format) from the model
folder `lrem train` wrote, with its fidelity measured on probe texts, and its card and learned
router beside it.

    lrem delta --model runs/cold --out src/lrem/models/lrem-wordnet-135m --rank 32
    save_delta("runs/cold", "src/lrem/models/lrem-wordnet-135m", rank=32)    # the same, in Python

Kept out of `lrem.delta`, which `lrem.model` imports (to build shipped models: `materialise`),
because it loads models itself (`lrem.model.LREM`).
"""
from __future__ import annotations

import json
from pathlib import Path

from ._io import atomic_dir, write_json
from .backbones import BUILTINS
from .delta import (DELTA_JSON, DELTA_WEIGHTS, FORMAT, PROBE_QUERIES, PROBE_TITLES, SHIPPED_FILES, apply_delta,
                    fidelity, make_delta)
from .model import LREM, resolve_backbone


def save_delta(model_path: str, out, base: str | None = None, rank: int = 32, log=print) -> dict:
    """Write the delta folder of the LREM at `model_path` (its base read from its
    lrem_config.json unless given) and return its metadata, fidelity included."""
    from safetensors.torch import save_file

    from .train.checkpoint import last_checkpoint

    folder = Path(resolve_backbone(model_path, log=log))
    ckpt = None if (folder / "lrem_config.json").is_file() else last_checkpoint(folder)
    if ckpt is not None:  # a run's folder gets its model at the end; a checkpoint holds no whole model
        raise ValueError(f"{model_path}: training has not finished there (checkpoints up to {ckpt.name}, no final "
                         "model yet); let it finish, or resume it with `lrem train ... --resume`, then take the "
                         "delta of that folder")
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
    try:
        tensors = make_delta(model, ref, rank)
    except ValueError as e:  # a tensor's shape differs: name the two models, not only the tensor
        raise ValueError(f"{model_path} against the base {base}: {e}; pass the backbone it was trained from as "
                         "--base") from None
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
