"""Fitting the ecosystem (issue 17, points 1-5): sentence-transformers' API conventions, the
sentence-transformers export, explicit truncation, item templates with fields, hub names."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from lrem.model import LREM, InputTooLong, similarity
from lrem.prompts import PromptConfig

QUERIES = ["a device for pulling corks", "hot tea", "something to drink wine from", "café au lait", "  x  ",
           "a warm blanket for the sofa", "toy for a 3 year old", "red running shoes size 9", "usb c charger",
           "cheese", "Mama Koala diapers", "a gift for my dad who likes fishing"]
ITEMS = ["corkscrew, bottle screw", "teapot", "wine glass", "Mama Koala One Size Baby Washable Reusable Pocket Cloth "
         "Diapers, 6 Pack with 6 One Size Microfiber Inserts (Jagger)", "émoji ☕ mug", "fleece throw blanket",
         "wooden puzzle", "Nike Air Zoom Pegasus", "65W USB-C GaN charger", "cheddar", "fishing rod", "  spaced  "]


def lrem_cli(*args, env=None, timeout=300, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lrem.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200", **(env or {})}, cwd=cwd)


# ---------------------------------------------------------------- 1. the Python API

def test_one_string_gives_one_vector_and_a_list_a_matrix(tiny):
    d = tiny.dim
    one, many = tiny.encode_items("teapot"), tiny.encode_items(["teapot", "mug"])
    assert one.shape == (d,) and many.shape == (2, d)
    np.testing.assert_allclose(one, many[0], atol=1e-5)
    q = tiny.encode_queries("teapot", mode="direct")
    assert q.embeddings.shape == (d,) and q.cots == ""
    qs = tiny.encode_queries(["teapot", "mug"], mode="direct")
    assert qs.embeddings.shape == (2, d) and qs.cots == ["", ""]
    np.testing.assert_allclose(q.embeddings, qs.embeddings[0], atol=1e-5)
    r = tiny.encode_queries("teapot", mode="reason")
    assert isinstance(r.cots, str) and r.embeddings.shape == (d,)
    given = tiny.encode_queries("teapot", cots="tea kettle")  # a CoT for one query is a string too
    np.testing.assert_allclose(given.embeddings, tiny.encode_queries(["teapot"], cots=["tea kettle"]).embeddings[0],
                               atol=1e-5)
    # sentence-transformers' names
    np.testing.assert_allclose(tiny.encode_query(["teapot", "mug"], mode="direct"), qs.embeddings, atol=1e-6)
    np.testing.assert_allclose(tiny.encode_document("teapot"), one, atol=1e-6)


def test_similarity_is_cosine_like_sentence_transformers(tiny):
    from sentence_transformers.util import cos_sim

    q, items = tiny.encode_query(["teapot", "mug"], mode="direct"), tiny.encode_items(ITEMS[:5])
    sim = tiny.similarity(q, items)
    assert sim.shape == (2, 5)
    np.testing.assert_allclose(sim, cos_sim(q, items).numpy(), atol=1e-5)
    assert similarity(q[0], items).shape == (1, 5)  # a vector is one row
    np.testing.assert_allclose(similarity([3.0, 4.0], [[6.0, 8.0], [-4.0, 3.0]]), [[1.0, 0.0]], atol=1e-6)


# ---------------------------------------------------------------- 2. export and model cards

def test_sentence_transformers_loads_the_export_with_lrem_embeddings(real_model, tmp_path):
    from sentence_transformers import SentenceTransformer

    from lrem.export import export_sentence_transformers, read_export

    export_sentence_transformers(real_model, tmp_path / "st", log=lambda *_: None)
    st = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    items = (st.encode_document(ITEMS) * real_model.encode_items(ITEMS)).sum(1)
    queries = (st.encode_query(QUERIES) * real_model.encode_queries(QUERIES, mode="direct").embeddings).sum(1)
    print(f"export cosine: items min {items.min():.6f}, direct queries min {queries.min():.6f}")
    assert items.min() >= 0.9999 and queries.min() >= 0.9999
    # encode() without a task embeds items (what TEI / vLLM / Infinity serve)
    assert (st.encode(ITEMS[:3]) * real_model.encode_items(ITEMS[:3])).sum(1).min() >= 0.9999
    # prompt_name="query", as MTEB and LangChain ask for queries, embeds queries (it embedded items)
    direct = real_model.encode_queries(QUERIES[:3], mode="direct").embeddings
    assert (st.encode(QUERIES[:3], prompt_name="query") * direct).sum(1).min() >= 0.9999
    assert (st.encode(QUERIES[:3], prompt_name="document") * real_model.encode_items(QUERIES[:3])).sum(1).min() >= 0.9999
    # the classic keys servers read (TEI, older readers): last-token pooling, lrem's cut
    pooling = json.loads((tmp_path / "st" / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_lasttoken"] is True and pooling["pooling_mode_mean_tokens"] is False
    bert = json.loads((tmp_path / "st" / "sentence_bert_config.json").read_text())
    assert bert["max_seq_length"] == st.max_seq_length == read_export(tmp_path / "st")["max_seq_length"]
    # the plain prefix + suffix of lrem_export.json give the same tokens as lrem (for servers without chat templates)
    sides = read_export(tmp_path / "st")
    tok = real_model.tokenizer
    assert tok(sides["item_prefix"] + "teapot" + sides["item_suffix"])["input_ids"] == \
        tok(real_model.item_texts(["teapot"])[0], add_special_tokens=False)["input_ids"]
    card = (tmp_path / "st" / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "lrem serve" in card
    assert "max_item_tokens" in card and "## Intended use" in card


def test_an_export_of_a_shipped_model_keeps_its_shipped_section_and_a_further_trained_one_does_not(tiny, tmp_path):
    """A shipped model's card ends with what it was trained on, its dev table and its limits
    (`scripts/ship_card.py`): an export of the same weights carries that section over (it was
    lost), a model saved after more training does not (its figures would be another model's)."""
    from lrem.card import SHIPPED_HEADING
    from lrem.export import export_sentence_transformers

    tiny.save_pretrained(tmp_path / "m")
    section = f"{SHIPPED_HEADING} as `tiny-shop`\n\nTrained on 3 toy pairs.\n\n| system | hitrate@10 |\n|---|---|\n| x | 0.5 |\n"
    card = tmp_path / "m" / "README.md"
    card.write_text(card.read_text() + "\n" + section)
    shipped = LREM.from_pretrained(str(tmp_path / "m"), dtype="float32")
    export_sentence_transformers(shipped, tmp_path / "st", log=lambda *_: None)
    exported = (tmp_path / "st" / "README.md").read_text()
    assert "sentence-transformers export" in exported and exported.rstrip().endswith(section.rstrip())
    shipped.save_pretrained(tmp_path / "m2", stage={"stage": "rl", "steps": 3})
    assert SHIPPED_HEADING not in (tmp_path / "m2" / "README.md").read_text()


def test_every_saved_model_has_a_model_card(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "m", stage={"stage": "coldstart", "steps": 7, "examples": 42,
                                                "data": "runs/triplets.jsonl", "batch_size": 8,
                                                "learning_rate": 2e-5}, metrics={"hitrate@10": 0.5})
    card = (tmp_path / "m" / "README.md").read_text()
    assert "stage 1, cold start" in card and "| 7 | 42 | runs/triplets.jsonl | 8 | 2e-05 |" in card
    assert "| hitrate@10 | 0.5 |" in card and '"item_template": "Item: {title}"' in card
    back = LREM.from_pretrained(str(tmp_path / "m"), dtype="float32")
    assert back.stages[0]["steps"] == 7  # the history travels: a further stage is added after it
    back.save_pretrained(tmp_path / "m2", stage={"stage": "rl", "steps": 3})
    card2 = (tmp_path / "m2" / "README.md").read_text()
    assert "stage 1, cold start" in card2 and "| 2 | stage 2, RL" in card2


# ---------------------------------------------------------------- 3. truncation

def test_overlong_input_is_an_error_or_cut_and_counted(tiny, tmp_path):
    long = " ".join(f"word{i}" for i in range(60))  # ~ 120 tokens
    longer = long + " and even more words at the end"
    with pytest.raises(InputTooLong, match=r"item 1 has \d+ tokens; the limit is 64 \(max_item_tokens"):
        tiny.encode_items(["mug", long], truncate=False)
    with pytest.raises(InputTooLong, match=r"query 0 has \d+ tokens; the limit is 64 \(max_query_tokens"):
        tiny.encode_queries([long], mode="direct", truncate=False)
    before = tiny.truncated["item"]
    a, b = tiny.encode_items([long, longer])
    assert tiny.truncated["item"] - before == 2
    np.testing.assert_allclose(a, b, atol=1e-6)  # cut at the same limit: the extra words are not seen
    # the limit is a config value saved with the model: raised, the words count
    wide = LREM(tiny.lm, tiny.tokenizer, PromptConfig(max_item_tokens=512, max_query_tokens=512))
    wide.save_pretrained(tmp_path / "wide")
    back = LREM.from_pretrained(str(tmp_path / "wide"), dtype="float32")
    assert back.config.max_item_tokens == 512
    a, b = back.encode_items([long, longer], truncate=False)
    assert float(a @ b) < 0.99999 and back.truncated["item"] == 0


def test_cli_index_reports_truncation_and_refuses_with_no_truncate(tiny_dir, tmp_path):
    from lrem.data import Dataset, Item, Query, save_dataset

    long = " ".join(f"word{i}" for i in range(60))
    ds = Dataset({"a": Item("a", "mug"), "b": Item("b", long)}, {"q": Query("q", "a mug", "c", "dev")}, {"q": {"a": 1}})
    save_dataset(ds, tmp_path / "ds")
    ok = lrem_cli("index", "--data", str(tmp_path / "ds"), "--out", str(tmp_path / "idx"), "--model", str(tiny_dir),
                  "--threads", "1")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "truncated 1 item text(s) to 64 tokens (max_item_tokens)" in ok.stderr
    assert json.loads((tmp_path / "idx" / "meta.json").read_text())["truncated_items"] == 1
    bad = lrem_cli("index", "--data", str(tmp_path / "ds"), "--out", str(tmp_path / "idx2"), "--model", str(tiny_dir),
                   "--threads", "1", "--no-truncate")
    assert bad.returncode != 0 and not (tmp_path / "idx2").exists()
    assert bad.stderr.strip().splitlines()[-1].startswith("error: item 1 has ")
    assert "max_item_tokens" in bad.stderr and "Traceback" not in bad.stderr


def test_embeddings_endpoint_truncate_field_and_metric(tiny):
    import httpx

    from lrem.index import ItemIndex
    from lrem.search import Searcher
    from lrem.serve import ServeConfig, background_server, create_app

    searcher = Searcher(tiny, ItemIndex.build(tiny, {"a": "mug", "b": "teapot"}, show_progress=False))
    long = " ".join(f"word{i}" for i in range(60))
    with background_server(create_app(searcher, ServeConfig(max_wait_ms=1))) as url:
        r = httpx.post(f"{url}/v1/embeddings", json={"input": ["mug", long], "model": "lrem-item"}, timeout=60)
        assert r.status_code == 422 and "input[1] has" in r.json()["detail"]
        assert "the limit is 64 (max_item_tokens)" in r.json()["detail"]
        r = httpx.post(f"{url}/v1/embeddings", json={"input": [long], "model": "lrem-query-direct", "truncate": True},
                       timeout=60)
        assert r.status_code == 200
        np.testing.assert_allclose(r.json()["data"][0]["embedding"],
                                   tiny.encode_queries([long], mode="direct").embeddings[0], atol=1e-4)
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
        assert 'lrem_truncated_inputs_total{side="query"} 1.0' in metrics


# ---------------------------------------------------------------- 4. item templates with fields

def test_item_template_names_catalog_fields_and_is_saved(tiny, tmp_path):
    from lrem.data import Item

    cfg = PromptConfig(item_template="Item: {title} | brand: {brand} | color: {color}")
    m = LREM(tiny.lm, tiny.tokenizer, cfg)
    [text] = m.item_texts([Item("1", "running shoe", brand="Acme", color="red")])
    assert "Item: running shoe | brand: Acme | color: red<|im_end|>" in text
    assert "Item: mug | brand:  | color: <|im_end|>" in m.item_texts(["mug"])[0]  # a missing field is empty
    assert "Item: mug | brand: Zed" in m.item_texts([{"title": "mug", "brand": "Zed"}])[0]
    a, b = m.encode_items([Item("1", "shoe", brand="Acme"), Item("2", "shoe", brand="Zed")])
    assert float(a @ b) < 0.99999  # the brand reaches the embedding
    m.save_pretrained(tmp_path / "m")
    assert LREM.from_pretrained(str(tmp_path / "m"), dtype="float32").config.item_template == cfg.item_template
    # the default stays title-only
    assert tiny.item_texts([Item("1", "shoe", brand="Acme")]) == tiny.item_texts(["shoe"])
    with pytest.raises(ValueError, match=r"item_template=.*unknown: price"):
        PromptConfig(item_template="{title} costs {price}")
    with pytest.raises(ValueError, match=r"must name \{title\}"):
        PromptConfig(item_template="{brand}")


def test_esci_keeps_brand_color_and_bullets(tmp_path):
    import csv

    from lrem.data import convert, load_dataset, save_dataset

    cols = ["query_id", "query", "product_id", "product_locale", "esci_label", "product_title", "product_brand",
            "product_color", "product_bullet_point", "product_description"]
    with open(tmp_path / "esci.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerow(["1", "red shoe", "P1", "us", "E", "Runner 3", "Acme", "Red", "light\nwaterproof", "<b>A shoe</b>"])
    save_dataset(convert(tmp_path / "esci.csv", "esci"), tmp_path / "ds")
    item = load_dataset(tmp_path / "ds").catalog["P1"]
    assert (item.brand, item.color, item.bullets, item.description) == ("Acme", "Red", "light\nwaterproof", "A shoe")


# ---------------------------------------------------------------- 5. hub names

def test_a_hub_name_fails_fast_in_one_line_when_the_hub_is_unreachable(tmp_path):
    env = {"HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}  # the hub is unreachable here: no network
    t0 = time.monotonic()
    p = lrem_cli("export", "--model", "no-such-org/no-such-model", "--out", str(tmp_path / "x"), env=env, timeout=120)
    took = time.monotonic() - t0
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and len(lines) == 1, p.stderr[-2000:]
    assert "no-such-org/no-such-model" in lines[0] and "hub" in lines[0] and "local model folder" in lines[0]
    assert took < 60  # no minute of retries (huggingface_hub's backoff takes ~50 s)
    off = lrem_cli("export", "--model", "no-such-org/no-such-model", "--out", str(tmp_path / "x"),
                   env={**env, "HF_HUB_OFFLINE": "1"})
    assert len(off.stderr.strip().splitlines()) == 1 and "HF_HUB_OFFLINE=1" in off.stderr


def test_a_missing_model_folder_is_named_as_one(tmp_path):
    """A model path that names no folder: a path is never asked of the hub; a relative one whose
    parent exists says so; the built-ins listed include the shipped trained models."""
    from lrem.model import resolve_backbone

    for path in (tmp_path / "gone", "./gone", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="no such model folder"):
            resolve_backbone(str(path))
    (tmp_path / "runs").mkdir()
    p = lrem_cli("export", "--model", "runs/coldstart", "--out", str(tmp_path / "x"), cwd=tmp_path)
    assert p.returncode != 0 and "there is no folder runs/coldstart here (runs/ exists)" in p.stderr, p.stderr[-2000:]
    assert "lrem-wordnet-135m" in p.stderr and "Traceback" not in p.stderr


def test_a_local_folder_loads_without_the_hub(tiny_dir, tmp_path):
    env = {"HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}
    p = lrem_cli("export", "--model", str(tiny_dir), "--out", str(tmp_path / "st"), env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Retrying" not in p.stderr and (tmp_path / "st" / "modules.json").exists()


def test_export_of_a_multi_field_template_takes_the_filled_template(tiny, tmp_path):
    from sentence_transformers import SentenceTransformer

    from lrem.data import Item
    from lrem.export import export_sentence_transformers, read_export
    from lrem.prompts import item_text

    cfg = PromptConfig(item_template="Item: {title} | brand: {brand}")
    m = LREM(tiny.lm, tiny.tokenizer, cfg)
    export_sentence_transformers(m, tmp_path / "st", log=lambda *_: None)
    assert read_export(tmp_path / "st")["item_slot"] == "item_template"
    items = [Item("1", "running shoe", brand="Acme"), Item("2", "teapot", brand="Zed")]
    st = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    got = st.encode_document([item_text(vars(x), cfg) for x in items])
    assert (got * m.encode_items(items)).sum(1).min() >= 0.9999
    assert "pass each item as that template filled in" in (tmp_path / "st" / "README.md").read_text()
    # lrem refuses the export: its chat template would wrap lrem's prompts a second time
    with pytest.raises(ValueError, match="a sentence-transformers export .*load it with SentenceTransformer"):
        LREM.from_pretrained(str(tmp_path / "st"))
    (tmp_path / "catalog.jsonl").write_text('{"item_id": "1", "title": "teapot"}\n')
    cli = lrem_cli("index", "--data", str(tmp_path / "catalog.jsonl"), "--out", str(tmp_path / "idx"), "--model",
                   str(tmp_path / "st"), "--threads", "1")
    assert cli.returncode == 2 and "a sentence-transformers export" in cli.stderr and "Traceback" not in cli.stderr


def test_an_export_names_its_modules_as_vllm_reads_them_and_its_card_says_what_it_does(tiny, tmp_path):
    """vLLM finds an export's pooling and normalisation in modules.json by the classic module names
    (`sentence_transformers.models.Pooling`, `...Normalize`); under sentence-transformers 6's new
    names it found neither. The card of an export states what the folder does, not what lrem does:
    sentence-transformers cuts only at max_seq_length, and `lrem eval` measures the LREM folder."""
    from sentence_transformers import SentenceTransformer

    from lrem.export import export_sentence_transformers, read_export

    export_sentence_transformers(tiny, tmp_path / "st", log=lambda *_: None)
    modules = json.loads((tmp_path / "st" / "modules.json").read_text())
    # the lookup of vLLM's get_pooling_config: exact type names, then the flags set to true
    pooling = [m for m in modules if m["type"] == "sentence_transformers.models.Pooling"]
    assert len(pooling) == 1 and any(m["type"] == "sentence_transformers.models.Normalize" for m in modules)
    flags = json.loads((tmp_path / "st" / pooling[0]["path"] / "config.json").read_text())
    assert [k for k, v in flags.items() if v is True and k.startswith("pooling_mode_")] == ["pooling_mode_lasttoken"]
    st = SentenceTransformer(str(tmp_path / "st"), device="cpu")  # sentence-transformers 6 loads the classic names
    assert [type(m).__name__ for m in st] == ["Transformer", "Pooling", "Normalize"]
    assert (st.encode_document(ITEMS[:3]) * tiny.encode_items(ITEMS[:3])).sum(1).min() >= 0.9999
    # an item over lrem's limit but within max_seq_length: lrem cuts it, sentence-transformers does not
    long = " ".join(f"word{i}" for i in range(30))
    n = len(tiny.tokenizer(tiny.item_texts([long])[0])["input_ids"])
    assert len(tiny.tokenizer(long)["input_ids"]) > tiny.config.max_item_tokens and n < st.max_seq_length
    assert (st.encode_document([long]) * tiny.encode_items([long])).sum() < 0.9999
    card = (tmp_path / "st" / "README.md").read_text()
    assert "sentence-transformers cuts an input only at `max_seq_length`" in card
    assert "or refused, as the caller's `truncate` option says" not in card  # lrem's rule, not the folder's
    assert "measures the LREM folder it was exported from (`source` in `lrem_export.json`)" in card
    assert read_export(tmp_path / "st")["source"] == tiny.source


def test_cli_index_takes_a_bare_catalog(tiny_dir, tmp_path):
    """A production catalog has no queries or qrels: `lrem index --data` takes a folder holding
    only its catalog table, or the catalog file itself, and indexes the same items either way."""
    from lrem.index import ItemIndex

    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "catalog.csv").write_text('item_id,title,brand\na,mug,Acme\nb,"teapot, glass",Zed\n')
    ok = lrem_cli("index", "--data", str(tmp_path / "shop"), "--out", str(tmp_path / "idx"), "--model", str(tiny_dir),
                  "--threads", "1")
    assert ok.returncode == 0, ok.stderr[-2000:]
    one = lrem_cli("index", "--data", str(tmp_path / "shop" / "catalog.csv"), "--out", str(tmp_path / "idx2"),
                   "--model", str(tiny_dir), "--threads", "1")
    assert one.returncode == 0, one.stderr[-2000:]
    a, b = ItemIndex.load(tmp_path / "idx"), ItemIndex.load(tmp_path / "idx2")
    assert a.item_ids == b.item_ids == ["a", "b"] and a.title("b") == "teapot, glass"
    (tmp_path / "bad.csv").write_text("item_id,name\na,mug\n")
    bad = lrem_cli("index", "--data", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "idx3"), "--model", str(tiny_dir))
    assert bad.returncode == 2 and "bad.csv:1: field 'title': missing column" in bad.stderr, bad.stderr[-2000:]
    assert not (tmp_path / "idx3").exists()
