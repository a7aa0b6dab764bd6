"""Model cards: the README.md written beside every saved model (`LREM.save_pretrained`, trained
outputs, `lrem export`), so a folder says what it is, where it came from and how to use it."""
from __future__ import annotations

import json
from pathlib import Path

from . import prompts
from .backbones import BUILTINS

_STAGES = {"coldstart": "stage 1, cold start: 0.1 L_SFT (teacher CoT) + 1.0 L_InfoNCE",
           "direct": "direct-embedding baseline: InfoNCE only, no CoT",
           "rl": "stage 2, RL: 1.0 L_GRPO (rank reward) + 0.1 L_InfoNCE"}


SHIPPED_HEADING = "## Shipped with lrem"  # a shipped model's own section (`scripts/ship_card.py`)


def shipped_section(folder: str) -> str:
    """The section of `folder`'s model card that describes a shipped model (its data, the dev table,
    its limits: `SHIPPED_HEADING` to the end), or "" where it has none. An export of the same
    weights carries it over; a model trained further does not (its figures would be another's)."""
    try:
        card = (Path(folder) / "README.md").read_text(encoding="utf-8") if folder else ""
    except OSError:
        return ""
    at = card.find("\n" + SHIPPED_HEADING)
    return card[at + 1 :].rstrip() + "\n" if at >= 0 else ""


def _stage_rows(training: list[dict]) -> list[str]:
    if not training:
        return ["None recorded: these are the backbone's weights plus the three LREM tokens (untrained for "
                "retrieval; expect weak embeddings until `lrem train coldstart` has run)."]
    rows = ["| # | stage | steps | examples | data | batch | learning rate |", "|---|---|---|---|---|---|---|"]
    for i, s in enumerate(training, 1):
        lora = s.get("lora")  # trained as LoRA adapters, merged into these weights
        name = _STAGES.get(s.get("stage"), s.get("stage", "?")) + (f" (LoRA r={lora['r']})" if lora else "")
        rows.append(f"| {i} | {name} | {s.get('steps', '?')} | "
                    f"{s.get('examples', '?')} | {s.get('data') or '?'} | {s.get('batch_size', '?')} | "
                    f"{s.get('learning_rate', '?')} |")
    return rows


def card_facts(model, training: list[dict] | None = None) -> dict:
    """The facts a model card states, as data (`lrem serve` lists them in /v1/models): base model
    (and the hub model a built-in comes from), where the weights were loaded from, dimension,
    training stages (each as lrem_config.json records it) and their total steps, query modes,
    CoT budget, token limits and the prompt config."""
    cfg = model.config
    training = model.stages if training is None else training
    base = model.base or model.source or "unknown"
    builtin = BUILTINS.get(base)
    return {"base_model": base, "base_model_origin": builtin.origin if builtin else base, "source": model.source,
            "dim": model.dim, "training": [dict(s) for s in training],
            "training_steps": sum(s.get("steps") or 0 for s in training), "query_modes": list(prompts.QUERY_MODES),
            "cot_max_tokens": cfg.cot_max_tokens, "max_query_tokens": cfg.max_query_tokens,
            "max_item_tokens": cfg.max_item_tokens, "prompts": cfg.to_dict()}


def model_card(model, training: list[dict] | None = None, metrics: dict | None = None,
               export: str | None = None) -> str:
    """README.md text for `model` (an `lrem.model.LREM`). `training`: its stages (default the
    model's own); `metrics`: name -> value, when known; `export`: the format of an exported
    folder ("sentence-transformers"), which changes the usage section."""
    cfg = model.config
    facts = card_facts(model, training)
    training, base, hub_base = facts["training"], facts["base_model"], facts["base_model_origin"]
    builtin = BUILTINS.get(base)
    front = ["---", "library_name: " + ("sentence-transformers" if export else "lrem"),
             "pipeline_tag: feature-extraction", "tags: [lrem, reasoning-embedding, product-search, retrieval]"]
    if "/" in hub_base and not hub_base.startswith(("/", ".")):
        front.append(f"base_model: {hub_base}")  # a hub name; local paths mean nothing elsewhere
    front.append("---")
    lines = [*front, "", "# LREM embedding model" + (f" ({export} export)" if export else ""), "",
             "A decoder LLM used as an embedder, after LREM (arXiv 2510.14321): a query's embedding is the "
             "last hidden state at `<emb>`, taken after the model reasons about the query in "
             "`<think> ... </think>` (or directly, with an empty `<think></think>`); an item's embedding "
             "is taken at `<emb>` without reasoning. Scores are cosine similarities.", "",
             "## Base model", "", f"`{base}`, {model.dim}-dimensional hidden states" + (
                 f" (lrem's built-in: `{hub_base}`, from the GGUF `{builtin.gguf_file}`, dequantised)." if builtin
                 else "."), "",
             "## Training", "", *_stage_rows(training), ""]
    lines += ["## Metrics", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in metrics.items())]
    else:
        # lrem refuses an export folder: the measure is taken on the LREM folder it came from
        lines += ["None recorded with this folder; `lrem eval --system NAME=FOLDER:reason ...` measures "
                  + ("the LREM folder it was exported from (`source` in `lrem_export.json`)." if export else "it.")]
    lines += ["", "## Prompts", ""]
    if export:
        lines += ["Saved in `lrem_export.json` (`lrem.prompts.PromptConfig`, and each side's text as a plain "
                  "prefix and suffix); the folder's chat template renders them around the text.",
                  "", "```json", json.dumps(cfg.to_dict(), indent=2, ensure_ascii=False), "```", "",
                  # sentence-transformers cuts the whole rendered prompt, not the text at lrem's limits
                  f"lrem cuts (or refuses) a query over {cfg.max_query_tokens} tokens and an item text over "
                  f"{cfg.max_item_tokens}; this folder does not: sentence-transformers cuts an input only at "
                  "`max_seq_length` (`sentence_bert_config.json`, prompt included; it keeps `<emb>`), so a text "
                  "over lrem's limit embeds otherwise than in lrem unless the caller cuts it first."]
    else:
        lines += ["Saved with the model (`lrem_config.json`, `lrem.prompts.PromptConfig`); the backbone's chat "
                  "template wraps them.", "", "```json", json.dumps(cfg.to_dict(), indent=2, ensure_ascii=False),
                  "```", "",
                  f"A query over {cfg.max_query_tokens} tokens, or an item text over {cfg.max_item_tokens}, is cut "
                  "(and counted) or refused, as the caller's `truncate` option says."]
    lines += [f"The item template may name {', '.join('{' + f + '}' for f in prompts.ITEM_FIELDS)}.", "",
              "## Intended use", "",
              "First-stage dense retrieval for product search: embed the catalog once (items), then each "
              "query, and rank items by cosine similarity (FAISS). Queries that need interpretation "
              "(\"a drink stronger than tea\") gain most from reasoning; `direct` mode costs one forward pass. "
              "Not meant for generation, for languages or domains it was not trained on, or as the only "
              "signal for decisions about people.", "", "## Usage", ""]
    if export:
        lines += ["```python", "from sentence_transformers import SentenceTransformer",
                  "model = SentenceTransformer(\"PATH\")",
                  "items = model.encode_document([\"corkscrew, bottle screw\"])   # = lrem encode_items",
                  "queries = model.encode_query([\"a device for pulling corks\"])  # = lrem direct mode",
                  "# the same: model.encode([...], prompt_name=\"query\") (MTEB, LangChain)",
                  "model.similarity(queries, items)", "```", "",
                  *([] if prompts.template_fields(cfg.item_template) == {"title"} else [
                      "", f"The item template names more than the title ({cfg.item_template!r}): pass each item as "
                      "that template filled in (`lrem.prompts.item_text`), not as its title.", ""]),
                  "sentence-transformers gives the item side and the `direct` query side. Reasoning "
                  "(generating the CoT before `<emb>`) needs `lrem serve` (one pass: `/v1/embeddings` with "
                  "model `lrem-query-reason`) or the `lrem` Python API on the original LREM folder.", "",
                  "Serving items from TEI, vLLM or Infinity: these servers do not apply the task-aware chat "
                  "template; send each item as the full text in `lrem_export.json` (`item_prefix` + item "
                  "text + `item_suffix`), pooling the last token (`1_Pooling`: last token), normalised."]
    else:
        lines += ["```python", "from lrem.model import LREM", "model = LREM.from_pretrained(\"PATH\")",
                  "q = model.encode_queries(\"a device for pulling corks\", mode=\"reason\")  # .embeddings, .cots",
                  "items = model.encode_items([\"corkscrew, bottle screw\"])",
                  "model.similarity(q.embeddings, items)", "```", "",
                  "`lrem export --model PATH --to sentence-transformers --out OUT` writes a folder that "
                  "sentence-transformers (and, for items, TEI / vLLM / Infinity) can load."]
    return "\n".join(lines) + "\n"
