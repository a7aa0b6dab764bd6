"""A training run's folder: checkpoints, resume and the final model, for both stages.

    OUT/checkpoints/step-0000100/   model/ (or adapter/ with LoRA), trainer.pt, [extra.pt], train_state.json
    OUT/                            at the end: the LREM model folder, train_state.json; checkpoints,
                                    tb/ and the stage's logs moved into it (and a user's files kept)

Every folder is written atomically (`lrem._io.atomic_dir`), so a kill leaves the last complete
checkpoint; `last_checkpoint` finds it and `load_checkpoint` refuses one from another run. OUT's
marker records each entry the run writes there before it is written (`lrem._io.record_files`), so
`--overwrite` refuses a run folder that also holds a user's files.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .._io import (OutputError, atomic_dir, claim_dir, is_unstarted, prepare_output, record_files, unrecorded,
                   write_json)
from .base_config import RESUME_FREE
from .lora import ADAPTER, lora_settings, save_adapter
from .pairs import RL_PAIRS

TRAIN_STATE = "train_state.json"
EXTRA = "extra.pt"  # a checkpoint's trainer state beyond optimizer, scheduler and RNG
# the train state's own keys a resumed run must match, besides its config (`resume_view`); the base
# model ("base") and the LoRA settings are checked before loading (`check_resume`)
RESUME_KEYS = ("world_size", "total_steps", "seed", "batch_size", "examples", "examples_sha256", "precision")


def check_output(out: Path, resume: bool, overwrite: bool, inputs=()) -> Path | None:
    """Before any work: may `out` be written? Returns the checkpoint to resume from, if any.

    A foreign folder is refused (`lrem._io.prepare_output`), and an earlier run unless `resume`
    (continue it) or `overwrite` (start over: `claim_output` deletes it).
    """
    ckpt = last_checkpoint(out)
    if ckpt is not None and not (resume or overwrite):
        raise ValueError(f"{out} already has checkpoints ({ckpt.name}); pass --resume to continue, --overwrite to "
                         "start over, or use a new --out")
    prepare_output(out, inputs, overwrite=overwrite, resume=resume,  # e.g. --model runs/a --out runs/a
                   run_files=("checkpoints",) if resume else ())
    if resume and not overwrite and not is_training_run(out):  # else the final save would replace, say, an index
        raise OutputError(f"--out {out}: --resume continues a training run, and this folder holds none (no "
                          f"checkpoints/, tb/ or {TRAIN_STATE}); use a new --out, or --overwrite to replace it")
    return ckpt if resume else None


def is_training_run(out: Path) -> bool:
    """Whether `out` may be resumed: missing or empty (save the marker), or a training run's folder."""
    out = Path(out)
    return is_unstarted(out) or any((out / name).exists() for name in ("checkpoints", "tb", TRAIN_STATE))


def claim_output(out: Path, resume: bool, overwrite: bool) -> None:
    """Once the inputs are checked, before the first write: make `out` lrem's run folder
    (checkpoints go into it as training goes), deleting an earlier run there for `overwrite`."""
    if overwrite and not resume and out.exists():
        shutil.rmtree(out)
    claim_dir(out, files=())  # the run records each entry before writing it (`record_files`)


def last_checkpoint(out) -> Path | None:
    """The newest complete checkpoint folder under `out/checkpoints`, or None."""
    folder = Path(out) / "checkpoints"
    found = sorted(p for p in folder.glob("step-*") if (p / TRAIN_STATE).exists()) if folder.exists() else []
    return found[-1] if found else None


def save_checkpoint(out, model, optimizer, scheduler, state: dict, keep: int, adapter=None,
                    extra: dict | None = None, weights: dict | None = None) -> Path:
    """Write `out/checkpoints/step-N` (the model, or with LoRA its `adapter`; optimizer, scheduler,
    RNG, train state; `extra`: more trainer state as tensors, e.g. RL's item bank, read back by
    `load_checkpoint_extra`; `weights`: a sharded run's gathered model weights) and delete all but
    the newest `keep`."""
    path = Path(out) / "checkpoints" / f"step-{state['step']:07d}"
    record_files(Path(out), "checkpoints")  # before atomic_dir makes it
    with atomic_dir(path) as tmp:
        if adapter is not None:
            save_adapter(adapter, tmp / ADAPTER)  # the base is the run's own: a few MB instead of the model
        else:
            model.save_pretrained(tmp / "model", state_dict=weights)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state()}, tmp / "trainer.pt")
        if extra:
            torch.save(extra, tmp / EXTRA)
        write_json(tmp / TRAIN_STATE, state)
    for old in sorted((Path(out) / "checkpoints").glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint_extra(ckpt: Path) -> dict:
    """The `extra` trainer state `save_checkpoint` wrote ({} when none)."""
    path = Path(ckpt) / EXTRA
    return torch.load(path, weights_only=True) if path.exists() else {}


def base_identity(base) -> str:
    """What a train state records as the run's base model: a local folder's resolved path (however
    it is spelt), else the name given (a built-in or hub name)."""
    path = Path(base)
    return str(path.resolve()) if path.exists() else str(base)


def check_resume(ckpt: Path | None, cfg, base) -> None:
    """Before loading anything from `ckpt`: it continues only a run with the same LoRA settings
    (a LoRA checkpoint holds an adapter, a full one the model) and the same base model `base`
    (an adapter trained over one base means nothing over another)."""
    if ckpt is None:
        return
    saved = json.loads((ckpt / TRAIN_STATE).read_text())
    prev, now = saved.get("lora"), lora_settings(cfg)
    if prev != now:
        raise ValueError(f"{ckpt}: LoRA {prev or 'off (full fine-tuning)'} in the checkpoint but "
                         f"{now or 'off (lora_r=0)'} now; resume needs the same lora_* settings")
    prev, now = saved.get("base", "<not recorded>"), base_identity(base)
    if prev != now:
        raise ValueError(f"{ckpt}: base model {prev} in the checkpoint but {now} now; resume needs the same base "
                         "(--model / --init)")


def resume_view(state: dict) -> dict:
    """What of a train state a resume must match: `RESUME_KEYS` and every config value but the
    `RESUME_FREE` ones (and `model`, whose resolved path `check_resume` compares as "base")."""
    config = {k: v for k, v in state.get("config", {}).items() if k not in RESUME_FREE and k != "model"}
    return config | {k: state.get(k, "<not recorded>") for k in RESUME_KEYS}


def resume_source(ckpt: Path | None, cfg, base: str) -> str:
    """The folder a run's model loads from: the checkpoint's model when full fine-tuning resumes;
    else `base` (a fresh run, or a LoRA checkpoint, whose adapter goes over the run's own base)."""
    return str(ckpt / "model") if ckpt is not None and cfg.lora_r == 0 else str(base)


def load_checkpoint(ckpt: Path, optimizer, scheduler, state: dict) -> int:
    """Restore optimizer, scheduler and torch RNG from `ckpt`; return the step it ended.

    The run's train `state` must match the checkpoint's (`resume_view`: data, processes, steps and
    every setting but the logging ones): any other value would not continue the same run, or would
    record settings it did not train with. One error names every difference.
    """
    prev_state = json.loads((ckpt / TRAIN_STATE).read_text())
    prev, now = resume_view(prev_state), resume_view(state)
    missing = "<not set>"
    diff = [f"{k}={prev.get(k, missing)} in the checkpoint but {now.get(k, missing)} now"
            for k in sorted(prev.keys() | now.keys()) if prev.get(k, missing) != now.get(k, missing)]
    if diff:
        raise ValueError(f"{ckpt}: {'; '.join(diff)}; resume needs the same data, processes and settings (only "
                         f"{', '.join(RESUME_FREE)} may change)")
    try:  # tensors and plain containers only: a checkpoint file cannot run code when loaded
        saved = torch.load(ckpt / "trainer.pt", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise ValueError(f"{ckpt / 'trainer.pt'}: cannot load the optimizer state ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); delete this checkpoint to resume from an "
                         "earlier one") from None
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    return prev_state["step"]


def training_stage(state: dict) -> dict:
    """What the model card and lrem_config.json record of a finished run (from its train state)."""
    cfg = state.get("config", {})
    name = "rl" if "init" in state else "coldstart" if cfg.get("use_cot", True) else "direct"
    stage = {"stage": name, "steps": state.get("step"), "examples": state.get("examples"),
             "data": state.get("pairs") or state.get("data"), "init": state.get("init") or cfg.get("model"),
             "batch_size": state.get("global_batch_size", state.get("batch_size")),
             "learning_rate": cfg.get("learning_rate"), "seed": state.get("seed")}
    if state.get("lora"):  # trained as LoRA adapters (merged into the saved weights)
        stage["lora"] = state["lora"]
    return stage


def save_final(out: Path, model, state: dict, keep: tuple[str, ...] = ("checkpoints", "tb", RL_PAIRS),
               weights: dict | None = None) -> None:
    """Replace `out` atomically by the model folder; checkpoints, logs and the `keep` files move into it,
    and so do the entries lrem did not write there (a user's notes), which stay unrecorded.
    `weights`: a sharded run's gathered model weights (in place of the main process's shard)."""
    with atomic_dir(out, carry=unrecorded(out)) as tmp:
        model.save_pretrained(tmp, stage=training_stage(state), state_dict=weights)
        write_json(tmp / TRAIN_STATE, state)
        for sub in keep:
            if (out / sub).exists():
                os.replace(out / sub, tmp / sub)
