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

SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")


def supports(folder: str | Path) -> bool:
    """Whether `folder` has what this tokenizer reads: tokenizer.json, and one chat template (if
    any) as text that compiles here (transformers' `{% generation %}` extension is not)."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file() or (folder / "chat_templates").is_dir():
        return False
    try:
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(cfg.get("chat_template", ""), str):
        return False
    template = _template_text(folder, cfg)
    if template:
        try:
            _compile(template)
        except Exception:  # noqa: BLE001 - jinja2's syntax errors: transformers renders this one
            return False
    return True


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
    return env


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
        try:  # older folders keep the special tokens here; tokenizer_config.json wins where both name one
            extra = json.loads((folder / "special_tokens_map.json").read_text())
        except (OSError, ValueError):
            extra = {}
        for name in SPECIAL:
            setattr(self, name, _content(cfg.get(name) or extra.get(name)))
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
