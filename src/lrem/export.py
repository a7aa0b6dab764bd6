"""Export an LREM model to the embedding ecosystem: `lrem export --to sentence-transformers`.

    from lrem.export import export_sentence_transformers
    export_sentence_transformers(LREM.from_pretrained("runs/coldstart"), "runs/st")
    SentenceTransformer("runs/st").encode_document(["corkscrew"])   # = LREM.encode_items
    SentenceTransformer("runs/st").encode_query(["a cork puller"])  # = LREM.encode_queries(mode="direct")

The folder is a plain sentence-transformers model: Transformer (the decoder without its LM head)
+ last-token pooling + normalisation. The LREM prompts live in its chat template, which renders
exactly lrem's token sequences: the query side (direct mode, `<think></think><emb>`) when
sentence-transformers passes task="query" (`encode_query`), the item side otherwise; the last
token is `<emb>`, where lrem takes the embedding. Reasoning is not part of it (that needs
generation first: `lrem serve`). `lrem_export.json` holds the same prompts as plain prefix and
suffix strings, for servers that do not apply chat templates (TEI, Infinity, vLLM's `input`).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from . import prompts
from ._io import atomic_dir, write_json
from .card import model_card, shipped_section

EXPORT_FILE = "lrem_export.json"
FORMATS = ("sentence-transformers",)
_SLOT = "\x00LREM-TEXT\x00"  # a marker no prompt contains: where the caller's text goes
# the export's "query" prompt: sentence-transformers puts it before the text (`prompt_name="query"`,
# as MTEB and LangChain call it, and `encode_query`), and the chat template strips it and renders
# the query side; an empty prompt would embed such a query as an item
QUERY_MARK = "[lrem query]"


def _split(rendered: str) -> tuple[str, str]:
    prefix, sep, suffix = rendered.partition(_SLOT)
    if not sep or _SLOT in suffix:
        raise ValueError("the chat template does not keep the text exactly once; it cannot be exported")
    return prefix, suffix


def side_templates(model) -> dict[str, str]:
    """The text around a query (direct mode) and around an item, as lrem renders them.

    The item slot is the title when the item template names only {title}; otherwise it is the
    whole filled item template (the caller fills it, `lrem.prompts.item_text`)."""
    cfg, tok = model.config, model.tokenizer
    q_prefix, q_suffix = _split(prompts.query_prompt(tok, _SLOT, cfg) + prompts.close_cot("", cfg))
    title_only = prompts.template_fields(cfg.item_template) == {"title"}
    filled = prompts.item_text({"title": _SLOT}, cfg) if title_only else _SLOT
    i_prefix, i_suffix = _split(prompts.item_prompt(tok, filled, cfg))
    return {"query_prefix": q_prefix, "query_suffix": q_suffix, "item_prefix": i_prefix, "item_suffix": i_suffix,
            "item_slot": "title" if title_only else "item_template"}


def _raw(text: str) -> str:
    if "{% endraw %}" in text:
        raise ValueError("a prompt contains '{% endraw %}'; it cannot be put in a chat template")
    return "{% raw %}" + text + "{% endraw %}"


def chat_template(sides: dict[str, str]) -> str:
    """A Jinja chat template that renders the last user message as an LREM query (task="query",
    sentence-transformers' `encode_query`; a system message `QUERY_MARK`, the export's "query"
    prompt; or a text that starts with `QUERY_MARK` and a space, which is cut) or item (anything
    else), nothing else added."""
    return ("{%- set ns = namespace(text='', query=false) -%}"
            "{%- for m in messages if m['role'] == 'user' -%}"
            "{%- if m['content'] is string -%}{%- set ns.text = m['content'] -%}"
            "{%- else -%}{%- set ns.text = m['content'] | selectattr('type', 'equalto', 'text') "
            "| map(attribute='text') | join('') -%}{%- endif -%}"
            "{%- endfor -%}"
            "{%- set ns.query = task is defined and task == 'query' -%}"
            # sentence-transformers 6 sends a prompt as a system message; other callers prepend it
            "{%- for m in messages if m['role'] == 'system' -%}"
            "{%- set said = m['content'] if m['content'] is string else m['content'] "
            "| selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}"
            "{%- if said | trim == '" + QUERY_MARK + "' -%}{%- set ns.query = true -%}{%- endif -%}"
            "{%- endfor -%}"
            "{%- if ns.text.startswith('" + QUERY_MARK + " ') -%}"
            "{%- set ns.text = ns.text[" + str(len(QUERY_MARK) + 1) + ":] -%}{%- set ns.query = true -%}"
            "{%- endif -%}"
            "{%- if ns.query -%}"
            + _raw(sides["query_prefix"]) + "{{ ns.text }}" + _raw(sides["query_suffix"]) +
            "{%- else -%}"
            + _raw(sides["item_prefix"]) + "{{ ns.text }}" + _raw(sides["item_suffix"]) +
            "{%- endif -%}")


def export_sentence_transformers(model, out, log=print) -> Path:
    """Write `model` (an `lrem.model.LREM`) to `out` as a sentence-transformers folder, atomically."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize

    sides = side_templates(model)
    with tempfile.TemporaryDirectory(prefix="lrem-export-") as tmp:
        model.save_pretrained(Path(tmp) / "lrem")
        # sentence-transformers' default for a causal LM folder: the decoder without the LM head,
        # then last-token pooling; the chat template below puts `<emb>` last
        st = SentenceTransformer(str(Path(tmp) / "lrem"), device="cpu", model_kwargs={"dtype": model.lm.dtype})
    transformer = st[0]
    transformer.tokenizer.chat_template = chat_template(sides)
    if "message" not in transformer.modality_config:
        raise ValueError("sentence-transformers did not load the model with chat messages; cannot export")
    tok = model.tokenizer
    frame = max(len(tok(sides[f"{s}_prefix"] + sides[f"{s}_suffix"], add_special_tokens=False)["input_ids"])
                for s in ("query", "item"))
    # room for the longest input lrem embeds; sentence-transformers cuts longer ones (keeping `<emb>`)
    transformer.max_seq_length = frame + max(model.config.max_query_tokens, model.config.max_item_tokens)
    st.append(Normalize())
    st.similarity_fn_name = "cosine"
    st.prompts = {"query": QUERY_MARK, "document": ""}
    with atomic_dir(out) as folder:
        st.save(str(folder), create_model_card=False)
        classic_keys(folder, transformer.max_seq_length)
        write_json(folder / EXPORT_FILE, {"format": "sentence-transformers", "source": model.source,
                                          "base_model": model.base, "prompts": model.config.to_dict(),
                                          "max_seq_length": transformer.max_seq_length, **sides})
        card, shipped = model_card(model, export="sentence-transformers"), shipped_section(model.folder)
        (folder / "README.md").write_text(card + ("\n" + shipped if shipped else ""), encoding="utf-8")
    log(f"exported {model.source} -> {out} (sentence-transformers: items, and queries in direct mode)")
    return Path(out)


def classic_keys(folder: Path, max_seq_length: int) -> None:
    """Add the keys of the sentence-transformers layout before 6.0 beside the new ones, which 6.x
    also reads: servers and older readers (TEI among them) take the pooling from the
    `pooling_mode_*` flags and the cut from `max_seq_length`; without them they may pool
    otherwise and cut at the model's 8,192 positions, not where lrem cuts. The modules keep their
    classic names (`sentence_transformers.models.Pooling`, ...), which 6.x still loads: vLLM finds
    the pooling and normalisation by those exact names, and skips both under 6.x's new ones."""
    from sentence_transformers.util import import_from_string

    modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
    for m in modules:
        classic = "sentence_transformers.models." + m["type"].rsplit(".", 1)[-1]
        try:
            same = import_from_string(classic) is import_from_string(m["type"])
        except ImportError:  # a sentence-transformers without that alias: keep the name it wrote
            same = False
        if same:
            m["type"] = classic
    write_json(folder / "modules.json", modules)
    pooling = folder / "1_Pooling" / "config.json"
    cfg = json.loads(pooling.read_text(encoding="utf-8"))
    if cfg.get("pooling_mode") != "lasttoken":
        raise ValueError(f"the export pools by {cfg.get('pooling_mode')!r}, not the last token (`<emb>`)")
    flags = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")
    write_json(pooling, {**cfg, **{f"pooling_mode_{f}": f == "lasttoken" for f in flags}})
    bert = folder / "sentence_bert_config.json"
    write_json(bert, {**json.loads(bert.read_text(encoding="utf-8")), "max_seq_length": max_seq_length})


def export(model, to: str, out: str | os.PathLike, log=print) -> Path:
    if to not in FORMATS:
        raise ValueError(f"--to {to!r}: expected one of {', '.join(FORMATS)}")
    return export_sentence_transformers(model, out, log=log)


def read_export(path) -> dict:
    """The prompts of an exported folder (`lrem_export.json`)."""
    return json.loads((Path(path) / EXPORT_FILE).read_text(encoding="utf-8"))
