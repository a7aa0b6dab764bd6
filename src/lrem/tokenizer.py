"""A model folder's tokenizer without transformers: `tokenizer.json` through the `tokenizers`
library, the chat template through jinja2 as transformers renders it, and the slice of the
transformers tokenizer interface lrem's inference calls (`__call__`, `decode`,
`convert_tokens_to_ids`, `apply_chat_template`, the special tokens and their ids).

Why: `AutoTokenizer` imports transformers' model configuration modules, which cost most of a
cold `lrem search`'s start. Loaded with the native network (`lrem.network`), for LREM folders
(`lrem.backbones.load_backbone(..., runtime="native")`); the ids equal transformers' (tested on
the built-in backbones' tokenizers).
"""
from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path

import torch

# transformers' named special tokens: each one set is a variable of the chat template
SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# the classes transformers 5 loads tokenizer.json into as it is; others rebuild its pipeline (`_same_pipeline`)
VERBATIM = ("TokenizersBackend", "PreTrainedTokenizer")


def supports(folder: str | Path) -> bool:
    """Whether `folder` has what this tokenizer reads: tokenizer.json, in a tokenizer transformers
    runs as it is (`_same_pipeline`), and one chat template (if any) as text that compiles here
    (transformers' `{% generation %}` extension is not)."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file() or (folder / "chat_templates").is_dir():
        return False
    try:
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(cfg.get("chat_template", ""), str) or not _same_pipeline(folder, cfg):
        return False
    template = _template_text(folder, cfg)
    if template:
        try:
            _compile(template)
        except Exception:  # noqa: BLE001 - jinja2's syntax errors: transformers renders this one
            return False
    return True


def _same_pipeline(folder: Path, cfg: dict) -> bool:
    """Whether the tokenizer transformers loads for `folder` runs tokenizer.json's pipeline as it
    is. Its GPT2 and Qwen2 classes (every qwen2 model's, whatever the class named) rebuild the
    normalizer and pre-tokenizer, with tokenizer_config.json's `add_prefix_space`: the same only
    where tokenizer.json has that pipeline (as transformers saved it); Llama's sentencepiece-style
    class, remote code and others are left to transformers."""
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return False
    if cfg.get("auto_map"):
        return False
    cls = (cfg.get("tokenizer_class") or VERBATIM[0]).removesuffix("Fast")
    if model_type != "qwen2" and cls in VERBATIM:
        return True  # the common case, without reading tokenizer.json's ~2 MB here (~0.2 s of a cold start)
    try:
        tj = json.loads((folder / "tokenizer.json").read_text())
    except (OSError, ValueError):
        return False
    pre = tj.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    byte = [p for p in parts if p.get("type") == "ByteLevel"]
    if model_type == "qwen2":
        cls = "Qwen2Tokenizer"
    elif cls == "LlamaTokenizer" and byte and model_type != "mistral":
        return True  # a ByteLevel tokenizer.json (Llama 3's) loads as TokenizersBackend
    spaced = len(byte) == 1 and byte[0].get("add_prefix_space") == bool(cfg.get("add_prefix_space"))
    if cls == "GPT2Tokenizer":
        return spaced and len(parts) == 1 and byte[0].get("use_regex", True)
    if cls == "Qwen2Tokenizer":
        return (spaced and [p.get("type") for p in parts] == ["Split", "ByteLevel"]
                and (tj.get("normalizer") or {}).get("type") == "NFC")
    return False


def _template_text(folder: Path, cfg: dict) -> str | None:
    f = folder / "chat_template.jinja"
    return f.read_text() if f.is_file() else cfg.get("chat_template")


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    """`template` compiled once (`supports` checks it, then the tokenizer renders with it)."""
    return _environment().from_string(template)


def _environment():
    """The sandboxed jinja2 environment transformers renders chat templates in, with its globals."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: (
        json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys))
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = _namespace_class()
    return env


def _namespace_class():
    """transformers' `namespace`: one that refuses underscore names, so a template storing one
    fails here as it does there rather than rendering."""
    from jinja2.exceptions import SecurityError
    from jinja2.utils import Namespace

    def check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"Chat templates cannot store underscore-prefixed attributes on a namespace, "
                                f"but got {name!r}. Please rename the attribute.")

    class TemplateNamespace(Namespace):
        def __init__(*args, **kwargs):  # Namespace's own signature trick, so namespace(self=...) works
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                check(name)
            Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            check(name)
            Namespace.__setitem__(self, name, value)

    return TemplateNamespace


def _content(tok) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


class Tokenizer:
    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer as Backend

        folder = Path(folder)
        self.backend = Backend.from_file(str(folder / "tokenizer.json"))
        self.backend.no_padding()
        self.backend.no_truncation()
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        # special tokens' text encoded as plain text where the folder asks so, as transformers does
        self.backend.encode_special_tokens = bool(cfg.get("split_special_tokens", False))
        try:  # older folders keep the special tokens here; it wins where both name one, as in transformers
            extra = json.loads((folder / "special_tokens_map.json").read_text())
        except (OSError, ValueError):
            extra = {}
        for name in SPECIAL:
            setattr(self, name, _content(extra.get(name) or cfg.get(name)))
        self.chat_template = _template_text(folder, cfg)
        self.padding_side = cfg.get("padding_side", "right")

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens):
        """Ids of tokens; an unknown token gives the unknown token's id (None without one), as in transformers."""
        if isinstance(tokens, str):
            found = self.backend.token_to_id(tokens)
            return self.unk_token_id if found is None else found
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    bos_token_id = property(lambda self: self._id(self.bos_token))
    eos_token_id = property(lambda self: self._id(self.eos_token))
    unk_token_id = property(lambda self: self._id(self.unk_token))
    pad_token_id = property(lambda self: self._id(self.pad_token))

    def __call__(self, texts, add_special_tokens: bool = True, padding: bool = False, return_tensors=None):
        """{"input_ids", "attention_mask"} of a text or a list of texts, as transformers gives them
        (`padding=True`: to the longest, on `padding_side`; `return_tensors="pt"`: tensors)."""
        single = isinstance(texts, str)
        encs = self.backend.encode_batch([texts] if single else list(texts), add_special_tokens=add_special_tokens)
        ids = [e.ids for e in encs]
        mask = [[1] * len(x) for x in ids]
        if padding:
            width, pad = max(len(x) for x in ids), self.pad_token_id
            left = self.padding_side == "left"
            ids = [([pad] * (width - len(x)) + x) if left else (x + [pad] * (width - len(x))) for x in ids]
            mask = [([0] * (width - len(m)) + m) if left else (m + [0] * (width - len(m))) for m in mask]
        if return_tensors == "pt":
            return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
        if single:
            return {"input_ids": ids[0], "attention_mask": mask[0]}
        return {"input_ids": ids, "attention_mask": mask}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = False):
        """The conversation rendered by the chat template, in the sandboxed jinja2 environment and
        with the globals transformers gives templates."""
        if tokenize:
            raise NotImplementedError("apply_chat_template(tokenize=True): tokenize the rendered text")
        special = {n: getattr(self, n) for n in SPECIAL if getattr(self, n) is not None}
        return _compile(self.chat_template).render(messages=messages, tools=None, documents=None,
                                                   add_generation_prompt=add_generation_prompt, **special)

    def save_pretrained(self, *args, **kwargs):
        raise NotImplementedError("a tokenizer loaded with runtime='native' is for inference; "
                                  "load the model with runtime='transformers' to save it")


def _raise(message):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)
