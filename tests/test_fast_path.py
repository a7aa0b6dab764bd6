"""The fast paths of lrem.model give the plain paths' outputs: greedy decoding over the cached
prompt prefix and a preallocated KV cache (`generate_cots(fast=True)`) emits the same tokens as
`lm.generate`, and the prefix KV kept across calls gives the same embeddings as running it all."""
from __future__ import annotations

import collections
import copy
import shutil

import numpy as np
import pytest
import torch

from lrem.decoding import FOLDED, Fused, Linear, StaticDecoder, block_linears, folded_attention, folded_sdpa, lookup_draft
from lrem.model import LREM

QUERIES = ["a device for pulling corks", "something warm for the feet", "a drink stronger than tea", "La Mer dupe",
           "what does a 1.5-year-old boy wear to a summer wedding", "x", ": starts with a colon", "non-waisted dress"]


@pytest.fixture(scope="module")
def lively(lively_dir):
    """A 2-layer random Llama with large weights: unlike `tiny` (which repeats one token for every
    query), its greedy output differs from query to query, so an off-by-one position or a leaked
    pad would change the tokens."""
    return LREM.from_pretrained(str(lively_dir("llama")), dtype="float32")


def plain_generate(model: LREM, texts: list[str], stop: list[int], max_new: int = 16) -> list[list[int]]:
    """`lm.generate` on the left-padded prompts: the reference the fast path must reproduce."""
    batch = model.tokenize(model.query_prompts(texts))
    pad = model.tokenizer.pad_token_id
    with torch.inference_mode():
        gen = model.lm.generate(**batch, max_new_tokens=max_new, do_sample=False, eos_token_id=stop,
                                pad_token_id=pad)[:, batch["input_ids"].shape[1]:].tolist()
    return [row + [pad] * (max_new - len(row)) for row in gen]


def fast_generate(model: LREM, texts: list[str], stop: list[int], max_new: int = 16) -> list[list[int]]:
    seqs = model.tokenizer(model.query_prompts(texts), add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        return model.engine.greedy(seqs, max_new, stop)


def forward_widths(monkeypatch) -> list[int]:
    """Record the number of tokens of each forward the compact decoder runs (it still runs them)."""
    widths: list[int] = []
    run = StaticDecoder.__call__

    def spy(self, ids, pos, start, rows=None, attend=None):
        widths.append(ids.shape[1])
        return run(self, ids, pos, start, rows, attend)

    monkeypatch.setattr(StaticDecoder, "__call__", spy)
    return widths


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_greedy_ids_are_argmax_ties_included(dtype):
    """`greedy_ids` (max's indices on the CPU, where bfloat16's argmax is slow) picks what argmax
    picks, the first of tied logits too: rounded logits tie often."""
    from lrem.decoding import greedy_ids

    torch.manual_seed(0)
    for rows in (1, 7, 32):
        logits = (torch.randn(rows, 49155) * 2).round().to(dtype)
        assert torch.equal(greedy_ids(logits), logits.float().argmax(-1))
    tied = torch.zeros(2, 10, dtype=dtype)
    tied[:, [3, 7]] = 1
    assert greedy_ids(tied).tolist() == [3, 3]


def test_greedy_matches_generate_token_for_token(lively):
    stop = [lively.think_end_id, lively.emb_id, lively.tokenizer.eos_token_id]
    ref = plain_generate(lively, QUERIES, stop)
    assert len({tuple(r) for r in ref}) == len(QUERIES)  # the outputs really differ per query
    assert fast_generate(lively, QUERIES, stop) == ref
    # rows that stop at different steps (the stop ids are tokens the model emits), then all early
    early = stop + [ref[0][3], ref[1][6]]
    ref_early = plain_generate(lively, QUERIES, early)
    assert ref_early[0][4:] == [lively.tokenizer.pad_token_id] * 12  # row 0 did stop after 4 tokens
    assert fast_generate(lively, QUERIES, early) == ref_early
    all_early = stop + [r[2] for r in ref]
    assert fast_generate(lively, QUERIES, all_early) == plain_generate(lively, QUERIES, all_early)


def test_fast_cots_equal_plain_at_any_batch_size(lively):
    plain = lively.generate_cots(QUERIES, fast=False)
    assert lively.generate_cots(QUERIES) == plain
    assert lively.generate_cots(QUERIES, batch_size=3) == plain
    assert [lively.generate_cots([q])[0] for q in QUERIES[:3]] == plain[:3]


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_other_backbones_keep_cots_and_embeddings(lively_dir, arch):
    """Qwen2 (biases on q, k, v) runs on the compact decoder; Qwen3 (norms on q and k), which it
    does not cover, on transformers' decoder over a static cache: both give the plain outputs."""
    model = LREM.from_pretrained(str(lively_dir(arch)), dtype="float32")
    assert StaticDecoder.supports(model.lm, 128) == (arch == "qwen2")
    plain = model.generate_cots(QUERIES, fast=False)
    assert len(set(plain)) > 4
    assert model.generate_cots(QUERIES, batch_size=3) == plain
    assert [model.generate_cots([q])[0] for q in QUERIES[:3]] == plain[:3]
    enc = model.encode_queries(QUERIES, mode="reason")
    assert enc.cots == plain
    ref = model.engine.embed_texts(model.query_texts(QUERIES, plain), 32, "q", False, prefix_cache=False)
    np.testing.assert_allclose(enc.embeddings, ref, atol=1e-5)


def test_gpu_decoding_path_keeps_cots_and_embeddings_on_the_cpu(lively):
    """The path CUDA takes (transformers' decoder over a `StaticCache`; no graph on the CPU) gives
    the plain outputs and the compact decoder's: the CPU-equivalence check of the GPU path."""
    plain = lively.generate_cots(QUERIES, fast=False)
    compact = lively.encode_queries(QUERIES, mode="reason")
    lively.engine.config.compact_decoder = False
    try:
        assert lively.engine.step(2, 128).compact is None
        assert lively.generate_cots(QUERIES, batch_size=3) == plain
        assert [lively.generate_cots([q])[0] for q in QUERIES[:3]] == plain[:3]
        enc = lively.encode_queries(QUERIES, mode="reason")
    finally:
        lively.engine.config.compact_decoder = True
    assert lively.engine.step(2, 128).compact is not None
    assert enc.cots == compact.cots == plain
    np.testing.assert_allclose(enc.embeddings, compact.embeddings, atol=1e-5)


@pytest.mark.parametrize("widths", [(4, 8, 16, 32, 64), (64,)])
def test_gpu_path_padded_to_graph_widths_keeps_cots_and_embeddings(lively, widths):
    """The GPU path with its several-token forwards padded to the widths a CUDA graph is captured
    for (`EngineConfig.graph_widths`; on the CPU they run eagerly, padded the same): the prompt's
    suffix, the closing tokens in the static cache (not a copy of it: the cache keeps room for
    their padded width), and direct queries. Same CoTs and embeddings as the compact decoder."""
    from transformers import DynamicCache, StaticCache

    plain = lively.generate_cots(QUERIES, fast=False)
    reason = lively.encode_queries(QUERIES, mode="reason")
    direct = lively.encode_queries(QUERIES, mode="direct").embeddings
    seen = []  # (width, cache type, attention) of each forward of the decoder

    def hook(module, args, kwargs, out):
        ids = kwargs.get("input_ids")
        seen.append((ids.shape[1], type(kwargs.get("past_key_values")), lively.lm.config._attn_implementation))

    cfg = lively.engine.config
    handle = lively.lm.get_decoder().register_forward_hook(hook, with_kwargs=True)
    cfg.compact_decoder, cfg.graph_widths = False, widths
    try:
        assert lively.engine.step(3, 128).widths == widths
        assert lively.generate_cots(QUERIES, batch_size=3) == plain
        assert [lively.generate_cots([q])[0] for q in QUERIES[:3]] == plain[:3]
        enc = lively.encode_queries(QUERIES, mode="reason", batch_size=3)
        one = lively.encode_queries(QUERIES[:2], mode="reason", batch_size=1)
        dir_ = lively.encode_queries(QUERIES, mode="direct", batch_size=3).embeddings
    finally:
        cfg.compact_decoder, cfg.graph_widths = True, None
        handle.remove()
    assert enc.cots == reason.cots == plain and one.cots == plain[:2]
    np.testing.assert_allclose(enc.embeddings, reason.embeddings, atol=1e-5)
    np.testing.assert_allclose(one.embeddings, reason.embeddings[:2], atol=1e-5)
    np.testing.assert_allclose(dir_, direct, atol=1e-5)
    wide = [w for w, cache, _ in seen if cache is StaticCache and w > 1]
    assert wide and set(wide) <= set(widths)  # every several-token forward over the step's cache was padded
    assert not [w for w, cache, _ in seen if cache is DynamicCache], seen  # `extend`'s fallback copies the cache
    # the step's forwards attend with grouped heads folded (no keys and values repeated); the model
    # as loaded keeps transformers' SDPA
    assert {a for _, cache, a in seen if cache is StaticCache} == {FOLDED}
    assert lively.lm.config._attn_implementation == "sdpa"


def test_gpu_path_rounds_batches_up_to_captured_sizes(lively):
    """On the GPU path a call runs at one of the batch sizes its graphs are made for
    (`EngineConfig.graph_batches`), its last row repeated: batches of 3 and 5 run as 4 and 8 rows,
    with the same CoTs and embeddings as the compact decoder's, and only the call's own rows come
    back."""
    plain = lively.generate_cots(QUERIES[:5], fast=False)
    reason = lively.encode_queries(QUERIES[:5], mode="reason")
    direct = lively.encode_queries(QUERIES[:5], mode="direct").embeddings
    rows = set()  # rows of each forward of the decoder
    cfg = lively.engine.config
    handle = lively.lm.get_decoder().register_forward_hook(
        lambda module, args, kwargs, out: rows.add(kwargs["input_ids"].shape[0]), with_kwargs=True)
    cfg.compact_decoder, cfg.graph_widths, cfg.graph_batches = False, (4, 8, 16, 32, 64), (1, 4, 8)
    try:
        assert [lively.engine.rows(b) for b in (1, 2, 3, 4, 5, 9)] == [1, 4, 4, 4, 8, 9]
        cots3, cots5 = lively.generate_cots(QUERIES[:3], batch_size=3), lively.generate_cots(QUERIES[:5], batch_size=5)
        enc = lively.encode_queries(QUERIES[:5], mode="reason", batch_size=3)  # batches of 3 and 2
        dir_ = lively.encode_queries(QUERIES[:5], mode="direct", batch_size=3).embeddings
    finally:
        cfg.compact_decoder, cfg.graph_widths, cfg.graph_batches = True, None, None
        handle.remove()
    assert cots3 == plain[:3] and cots5 == plain and enc.cots == plain
    assert rows <= {1, 4, 8} and {4, 8} <= rows, rows  # (1: the prompt prefix, run once)
    np.testing.assert_allclose(enc.embeddings, reason.embeddings, atol=1e-5)
    np.testing.assert_allclose(dir_, direct, atol=1e-5)


@pytest.mark.parametrize("t, mask_rows", [(1, 3), (5, 3), (5, 1)])
def test_folded_attention_matches_transformers_sdpa(lively, t, mask_rows):
    """`folded_sdpa` (grouped query heads folded into the query length) against transformers' own
    SDPA, which repeats the keys and values: the same output for one token and several, padded
    slots masked, and a mask of one row broadcast over the batch."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer = lively.lm.get_decoder().layers[0].self_attn
    cfg = lively.lm.config
    h, hkv, d, slots = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, 12
    assert h // hkv == layer.num_key_value_groups > 1
    g = torch.Generator().manual_seed(t)
    q = torch.randn(3, h, t, d, generator=g)
    k, v = torch.randn(3, hkv, slots, d, generator=g), torch.randn(3, hkv, slots, d, generator=g)
    mask = torch.rand(mask_rows, 1, t, slots, generator=g) > 0.4
    mask[..., 0] = True  # every row attends somewhere
    want, _ = sdpa_attention_forward(layer, q, k, v, mask, scaling=layer.scaling)
    got, _ = folded_sdpa(layer, q, k, v, mask, scaling=layer.scaling)
    assert got.shape == want.shape == (3, t, h, d)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_folded_attention_is_scoped_and_nests(lively):
    """`folded_attention` switches a model from "sdpa" to the folded function only while held
    (nested holders: until the last leaves), and leaves other implementations alone."""
    cfg = lively.lm.config
    with folded_attention(lively.lm):
        assert cfg._attn_implementation == FOLDED
        with folded_attention(lively.lm):
            assert cfg._attn_implementation == FOLDED
        assert cfg._attn_implementation == FOLDED
    assert cfg._attn_implementation == "sdpa"
    cfg._attn_implementation = "eager"
    try:
        with folded_attention(lively.lm):
            assert cfg._attn_implementation == "eager"
    finally:
        cfg._attn_implementation = "sdpa"


def left_padded(model, queries):
    """The queries' prompts left-padded to one width: ids, mask and positions (B, W)."""
    pad = model.tokenizer.pad_token_id
    seqs = model.tokenizer(model.query_prompts(queries), add_special_tokens=False)["input_ids"]
    w = max(len(x) for x in seqs)
    ids = torch.tensor([[pad] * (w - len(x)) + x for x in seqs])
    mask = torch.tensor([[0] * (w - len(x)) + [1] * len(x) for x in seqs])
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def test_compact_decoder_gives_the_hf_decoders_hidden_states(lively):
    """Left-padded prompts in one forward, then one token per row: every unmasked position's
    hidden state equals transformers' (same mask, positions and cache contents), at 1 and 2 threads."""
    lm = lively.lm
    ids, mask, pos = left_padded(lively, QUERIES[:3])
    w = ids.shape[1]
    nxt = torch.tensor([[11], [12], [13]])
    threads = torch.get_num_threads()
    with torch.inference_mode():
        ref = lm.get_decoder()(input_ids=torch.cat([ids, nxt], 1), attention_mask=torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1),
                               position_ids=torch.cat([pos, pos[:, -1:] + 1], 1)).last_hidden_state
        for n in (1, 2):
            torch.set_num_threads(n)
            try:
                dec = StaticDecoder(lm, 3, w + 4)
                dec.mask[:, :w] = mask
                h = dec(ids, pos, 0)
                dec.mask[:, w] = 1
                h1 = dec(nxt, pos[:, -1:] + 1, w)
            finally:
                torch.set_num_threads(threads)
            keep = mask.bool()
            torch.testing.assert_close(h[keep], ref[:, :w][keep], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(h1, ref[:, w:], atol=1e-5, rtol=1e-5)


def test_rows_a_forward_skips_run_again_over_the_slots_it_wrote_for_others(lively):
    """A forward of some rows (`rows`) leaves the other rows' new slots unwritten; when those rows run
    again, their attention reads those (masked) slots: they must not hold the NaN that uninitialised
    memory may. Caches filled with NaN first give the hidden states of caches filled with zeros."""
    lm = lively.lm
    ids, mask, pos = left_padded(lively, QUERIES[:3])
    w = ids.shape[1]
    out = {}
    with torch.inference_mode():
        for name, fill in (("nan", float("nan")), ("zeros", 0.0)):
            dec = StaticDecoder(lm, 3, w + 6)
            for k, v in zip(dec.k, dec.v):
                k.fill_(fill), v.fill_(fill)
            dec.mask[:, :w] = mask
            dec(ids, pos, 0)
            one = torch.tensor([1])  # row 1 alone, two tokens in slots w and w + 1
            dec.mask[1, w : w + 2] = 1
            dec(torch.tensor([[11, 12]]), pos[one, -1:] + torch.tensor([[1, 2]]), w, rows=one)
            dec.mask[:, w + 2] = 1  # then every row, one token in slot w + 2
            nxt = pos[:, -1:] + torch.tensor([[1], [3], [1]])
            out[name] = dec(torch.tensor([[13], [14], [15]]), nxt, w + 2)
    assert torch.isfinite(out["nan"]).all()
    torch.testing.assert_close(out["nan"], out["zeros"], atol=0, rtol=0)


@pytest.mark.parametrize("rows,bias", [(1, False), (5, True), (20, False), (40, True)])
def test_blocked_linear_equals_f_linear(rows, bias):
    """Odd output rows (a vocabulary of 49,155) leave a remainder; up to TRANSPOSED_ROWS the blocks
    multiply x's transpose, up to MAX_ROWS x, above it is F.linear."""
    torch.manual_seed(0)
    mod = torch.nn.Linear(24, 101, bias=bias)
    x = torch.randn(rows, 1, 24)
    for parts in (1, 2, 3):
        torch.testing.assert_close(Linear(mod, parts)(x), mod(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows,bias", [(1, False), (5, True), (32, False), (40, True), (300, False)])
def test_bfloat16_linear_runs_packed_weights_as_f_linear(rows, bias):
    """Bfloat16 CPU weights are also kept in oneDNN's packed layout, used for up to PACKED_ROWS rows
    outside autograd: the same products as F.linear; under autograd F.linear runs (gradients flow)."""
    torch.manual_seed(0)
    mod = torch.nn.Linear(64, 101, bias=bias).to(torch.bfloat16)
    lin = Linear(mod, 2)
    if lin.packed is None:
        pytest.skip("this torch build has no oneDNN linear")
    x = torch.randn(rows, 1, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, mod.weight, mod.bias))
    lin(x).float().sum().backward()
    assert mod.weight.grad is not None and mod.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("rows,bias", [(1, False), (7, True), (40, True), (300, True)])
def test_fused_products_are_each_linears(rows, bias):
    """A layer's q, k and v projections (with Qwen2's biases, or none) run as one packed product
    for up to PACKED_ROWS rows: each output is that `Linear`'s own, bit for bit; above it, and under
    autograd, each runs apart (gradients flow)."""
    torch.manual_seed(0)
    mods = [torch.nn.Linear(64, n, bias=bias).to(torch.bfloat16) for n in (96, 32, 32)]
    fused = Fused([Linear(m, 2, pack=False) for m in mods])
    if fused.packed is None:
        pytest.skip("this torch build has no oneDNN linear")
    x = torch.randn(1, rows, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        for out, m in zip(fused(x), mods):
            assert out.shape == (1, rows, m.out_features)
            assert torch.equal(out, Linear(m, 2)(x))
    sum(out.float().sum() for out in fused(x)).backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in mods)


def test_packed_weights_follow_weight_updates(tiny_dir):
    """The packed copy of bfloat16 weights does not follow in-place updates, so it is made again
    when the weights change (an optimizer step) and the engine rebuilds its caches: a query
    embedded through the compact decoder after the update is the plain path's."""
    model = LREM.from_pretrained(str(tiny_dir), dtype="bfloat16")
    q = QUERIES[:1]
    first = model.encode_queries(q, mode="direct").embeddings
    layers, _ = model.engine.cache["linears"][torch.get_num_threads()]
    if layers[0]["o_proj"].packed is None:
        pytest.skip("this torch build has no oneDNN linear")
    # one packed copy per weight (or fused product), whatever the thread count the views are made for
    one, three = block_linears(model.lm, 1)[0][0], block_linears(model.lm, 3)[0][0]
    assert one["o_proj"].packed is three["o_proj"].packed and one["qkv"].packed is three["qkv"].packed
    assert one["q_proj"].packed is None  # its product runs in the fused one: no second packed copy
    with torch.no_grad():
        for p in model.lm.parameters():
            p.mul_(1.5)
    second = model.encode_queries(q, mode="direct").embeddings
    ref = model.engine.embed_texts(model.query_texts(q, [""]), 8, "q", False, prefix_cache=False)
    np.testing.assert_allclose(second, ref, atol=2e-2)
    assert np.abs(second - first).max() > 0.1  # the update did change the embedding


def test_lookup_draft_takes_the_latest_longest_match():
    import doctest

    import lrem.decoding

    assert doctest.testmod(lrem.decoding).failed == 0
    assert lookup_draft([1, 2, 3, 9, 1, 2, 4, 8, 1, 2], k=3) == [4, 8, 1]  # latest (1, 2)
    assert lookup_draft([7, 1, 2, 3, 5, 1, 2, 6, 2, 3], k=2) == [5, 1]  # (2, 3) beats a later (3,)
    assert lookup_draft([1, 2, 3, 4], k=4) == []  # single tokens never draft
    assert lookup_draft([1, 2, 3, 4, 3], k=4, min_ngram=1) == [4, 3]
    assert lookup_draft([1, 1, 1], k=4) == [1]
    assert lookup_draft([3, 3, 3, 3, 3, 3], k=2) == [3, 3]  # not the latest (3, 3): it has one to follow


def test_single_query_decodes_drafted_tokens_in_fewer_forwards(tiny, lively, monkeypatch):
    """`tiny` repeats one token, so its drafts are taken: fewer forwards than tokens, the same
    tokens as `lm.generate`, also when the repeated token is a stop id; `lively`'s are mostly
    rejected, and its tokens stay the same."""
    q = QUERIES[:1]
    widths = forward_widths(monkeypatch)
    stop = [tiny.think_end_id, tiny.emb_id, tiny.tokenizer.eos_token_id]
    ref = plain_generate(tiny, q, stop)
    assert len(set(ref[0])) == 1
    assert fast_generate(tiny, q, stop) == ref
    assert len(widths) < 10 and max(widths[1:]) == 1 + tiny.engine.config.lookup_tokens  # prompt, then 16 tokens
    assert fast_generate(tiny, q, stop + ref[0][:1]) == plain_generate(tiny, q, stop + ref[0][:1])
    widths.clear()
    tiny.engine.config.lookup_tokens = 0
    try:
        assert fast_generate(tiny, q, stop) == ref
        assert widths == [widths[0]] + [1] * 15
    finally:
        tiny.engine.config.lookup_tokens = 4
    for text in QUERIES:
        assert fast_generate(lively, [text], stop) == plain_generate(lively, [text], stop)


def test_recent_cots_draft_single_queries(lively, monkeypatch):
    """Greedy CoTs (batch or single) are kept as drafts for later single queries: a query seen
    before decodes in a few forwards, the same tokens; a made-up history (wrong drafts) and no
    history change nothing but the forward count."""
    stop = [lively.think_end_id, lively.emb_id, lively.tokenizer.eos_token_id]
    q, keep = QUERIES[4:5], lively.engine.history
    ref = plain_generate(lively, q, stop)
    widths = forward_widths(monkeypatch)
    try:
        lively.engine.history = collections.deque(maxlen=0)
        assert fast_generate(lively, q, stop) == ref
        alone = len(widths)
        assert not lively.engine.history and alone > 8  # `lively`'s own prompt drafts mostly fail
        lively.engine.history = collections.deque(maxlen=32)
        assert fast_generate(lively, QUERIES, stop) == plain_generate(lively, QUERIES, stop)  # batch path keeps them
        assert len(lively.engine.history) == len(QUERIES)
        widths.clear()
        assert fast_generate(lively, q, stop) == ref
        assert len(widths) <= 5 and len(lively.engine.history) == len(QUERIES) + 1
        seq = lively.tokenizer(lively.query_prompts(q), add_special_tokens=False)["input_ids"][0]
        rng = np.random.default_rng(0)
        made_up = [seq[-3:] + ref[0][:1] + rng.integers(0, 1000, 15).tolist() for _ in range(4)]
        lively.engine.history = collections.deque(made_up, maxlen=32)
        widths.clear()
        assert fast_generate(lively, q, stop) == ref
        assert widths[1] == 5  # four made-up tokens drafted after the first, and rejected
    finally:
        lively.engine.history = keep


def test_single_query_embeds_in_the_forward_that_checks_its_closing_tokens(lively, monkeypatch):
    """One query drafts its closing `</think><emb>` after each step's tokens: where the model
    stops right there, the embedding comes from that same forward (prompt, then one forward, no
    third), and it is the plain path's; where it goes on, the closing drafts are dropped and the
    tokens stay greedy."""
    model, q = copy.deepcopy(lively), QUERIES[:1]
    seq = model.tokenizer(model.query_prompts(q), add_special_tokens=False)["input_ids"][0]
    wine = model.tokenizer(" wine", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():  # an untied head that says " wine" after the prompt, then `</think>`
        h0, h1 = model.lm.get_decoder()(input_ids=torch.tensor([seq + [wine]])).last_hidden_state[0, -2:]
        head = torch.nn.Linear(model.dim, model.lm.get_output_embeddings().weight.shape[0], bias=True)
        head.weight.normal_(0, 0.01)
        head.bias.zero_()
        head.bias[wine] = 5.0
        u = h1 - (h1 @ h0) / (h0 @ h0) * h0  # orthogonal to the prompt's last state: no effect there
        head.weight[model.think_end_id] = 50 * u / (u @ u)
    model.lm.set_output_embeddings(head)
    widths = forward_widths(monkeypatch)
    enc = model.encode_queries(q, mode="reason")
    assert enc.cots == ["wine"] == model.generate_cots(q, fast=False)
    tail = model.tokenizer(model.query_texts(q, enc.cots), add_special_tokens=False)["input_ids"][0][len(seq) + 1:]
    assert tail[-2:] == [model.think_end_id, model.emb_id]
    assert widths[1:] == [1 + len(tail)]  # " wine" and the closing tokens, checked in one forward
    plain = model.engine.embed_texts(model.query_texts(q, enc.cots), 8, "q", False, prefix_cache=False)
    np.testing.assert_allclose(enc.embeddings, plain, atol=1e-5)
    for text in QUERIES:  # CoTs that go on: each forward's closing drafts are rejected
        enc = lively.encode_queries(text, mode="reason")
        assert enc.cots == lively.generate_cots([text], fast=False)[0]
        plain = lively.engine.embed_texts(lively.query_texts([text], [enc.cots]), 8, "q", False, prefix_cache=False)
        np.testing.assert_allclose(enc.embeddings, plain[0], atol=1e-5)


def test_single_query_reruns_a_cot_its_text_reads_differently_in_the_same_forward(lively, monkeypatch):
    """A CoT whose first token lacks the space the full text gives it ("wine" where the text has
    " <think> wine </think>"): the text's tokens run as a branch from the prompt in the forward that
    checks the model's " " and `</think>`, so the embedding still needs no third forward and is the
    plain path's."""
    model, q = copy.deepcopy(lively), QUERIES[:1]
    seq = model.tokenizer(model.query_prompts(q), add_special_tokens=False)["input_ids"][0]
    wine, space = (model.tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in ("wine", " "))
    with torch.no_grad():  # an untied head: "wine" after the prompt, then " ", then `</think>`
        h0, h1, h2 = model.lm.get_decoder()(input_ids=torch.tensor([seq + [wine, space]])).last_hidden_state[0, -3:]
        head = torch.nn.Linear(model.dim, model.lm.get_output_embeddings().weight.shape[0], bias=True)
        head.weight.normal_(0, 0.01)
        head.bias.zero_()
        head.bias[wine] = 5.0
        basis = []
        for h, tok, scale in ((h1, space, 50.0), (h2, model.think_end_id, 200.0)):  # each orthogonal to the states before
            u = h.clone()
            for b in [h0, *basis]:
                u -= (u @ b) / (b @ b) * b
            head.weight[tok] = scale * u / (u @ u)
            basis.append(u)
    model.lm.set_output_embeddings(head)
    assert model.generate_cots(q, fast=False) == ["wine"]
    widths = forward_widths(monkeypatch)
    enc = model.encode_queries(q, mode="reason")
    assert enc.cots == ["wine"]
    text = model.tokenizer(model.query_texts(q, enc.cots), add_special_tokens=False)["input_ids"][0][len(seq):]
    assert text[0] != wine and text[-2:] == [model.think_end_id, model.emb_id]  # " wine": read differently
    assert widths[1:] == [2 + len(text)]  # "wine", " ", and the text's CoT and closing tokens, in one forward
    plain = model.engine.embed_texts(model.query_texts(q, enc.cots), 8, "q", False, prefix_cache=False)
    np.testing.assert_allclose(enc.embeddings, plain, atol=1e-5)


def steered(lively, q: str, cot: str):
    """A copy of `lively` with an untied head that writes " cot" after q's prompt,
    then `</think>`: a bias picks the first token; each later one (and `</think>`) gets a head row
    orthogonal to the states before it, so it wins where it should and nowhere earlier."""
    model = copy.deepcopy(lively)
    seq = model.tokenizer(model.query_prompts([q]), add_special_tokens=False)["input_ids"][0]
    ids = model.tokenizer(" " + cot, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        states = model.lm.get_decoder()(input_ids=torch.tensor([seq + ids])).last_hidden_state[0, len(seq) - 1:]
        head = torch.nn.Linear(model.dim, model.lm.get_output_embeddings().weight.shape[0], bias=True)
        head.weight.normal_(0, 0.01)
        head.bias.zero_()
        head.bias[ids[0]] = 5.0
        basis = [states[0]]
        for h, tok in zip(states[1:], ids[1:] + [model.think_end_id]):
            u = h.clone()
            for b in basis:
                u -= (u @ b) / (b @ b) * b
            head.weight[tok] = 200.0 * u / (u @ u)
            basis.append(u)
    model.lm.set_output_embeddings(head)
    return model, seq


def reason_steered(lively, monkeypatch, cot: str, drafts: int, respelled: bool = True):
    """Reason QUERIES[0] on a copy of `lively` steered to write `cot` (`steered`), with `drafts`
    word drafts (and drafts from the query respelled, or not): the CoT and embedding must be the
    plain path's. Returns (model, the widths of the compact decoder's forwards)."""
    q = QUERIES[:1]
    model, _ = steered(lively, q[0], cot)
    model.engine.config.word_drafts = drafts
    model.engine.config.respelled_drafts = respelled
    model.engine.draft_hits.clear()
    assert model.generate_cots(q, fast=False) == [cot]
    widths = forward_widths(monkeypatch)
    enc = model.encode_queries(q, mode="reason")
    assert enc.cots == [cot]
    plain = model.engine.embed_texts(model.query_texts(q, enc.cots), 8, "q", False, prefix_cache=False)
    np.testing.assert_allclose(enc.embeddings, plain, atol=1e-5)
    return model, widths


@pytest.mark.parametrize("cot,forwards", [("device", 2), ("device for pulling corks", 2), ("device for", 2),
                                         ("device pulling", 3)])
def test_single_query_closes_before_after_or_inside_its_drafts(lively, monkeypatch, cot, forwards):
    """The query's own words are drafted after a CoT token that copies one (" device" -> " for
    pulling corks"), with the closing tokens after the drafts and, beside them, the closing tokens
    should the CoT end before any one of the drafts: a CoT that stops before, inside or after
    the drafts embeds from that forward (the chain's end or a branch's); one that leaves them
    (" pulling" after " device") needs one more; each embedding is the plain path's."""
    # "a device for pulling corks"; no word drafts: the drafts after the first CoT token alone
    _, widths = reason_steered(lively, monkeypatch, cot, drafts=0)
    assert len(widths) == forwards


@pytest.mark.parametrize("cot,forwards", [("Device For Pulling", (5, 2)), ("device-for pulling", (5, 3))])
def test_single_query_drafts_its_words_as_the_cot_may_spell_them(lively, monkeypatch, cot, forwards):
    """A CoT that spells the query's words otherwise ("Device For Pulling", "device-for" for "a
    device for pulling corks"): their tokens are drafted from the query respelled (Title Case,
    neighbours hyphenated), so fewer forwards than one a token, and the CoT and embedding stay the
    plain path's either way."""
    got = tuple(len(reason_steered(lively, monkeypatch, cot, drafts=0, respelled=on)[1]) for on in (False, True))
    assert got == forwards


@pytest.mark.parametrize("cot, forwards", [("device for pulling corks", {"none": 7, "chains": 2, "word": 2}),
                                           ("device", {"none": 3, "chains": 3, "word": 1}),
                                           ("corks", {"none": 4, "chains": 2, "word": 2})])
def test_gpu_path_single_query_drafts_in_chains(lively, cot, forwards):
    """On transformers' decoder with captured widths (a GPU's path), one query drafts its CoT's
    tokens from its own words in chains (`chain_decode`), and its likeliest word draft runs after
    the prompt in the prefill's forward (`prefill_chain`): a CoT that copies the query ("device for
    pulling corks": 7 forwards one token at a time, 2 in chains). A CoT that is the drafted word
    ("device", the first content word) is embedded by the prefill alone; chains do not help it, as
    it stops inside the query's words they draft (closing there needs the compact decoder's
    branches). One that is another word ("corks") gains from the chains only. The CoT and
    embedding are the plain path's every way, and no forward copies the cache (rejected drafts'
    slots are written over)."""
    from transformers import DynamicCache, StaticCache

    q = QUERIES[:1]  # "a device for pulling corks"
    model, _ = steered(lively, q[0], cot)
    cfg = model.engine.config
    cfg.compact_decoder, cfg.graph_widths = False, (4, 8, 16, 32, 64)
    caches, out = [], {}
    handle = model.lm.get_decoder().register_forward_hook(
        lambda module, args, kwargs, o: caches.append(type(kwargs.get("past_key_values"))), with_kwargs=True)
    try:
        for name, k, words in (("none", 0, 0), ("chains", 4, 0), ("word", 4, 1)):
            cfg.lookup_tokens, cfg.word_drafts = k, words
            model.engine.history.clear()
            model.engine.draft_hits.clear()
            caches.clear()
            enc = model.encode_queries(q, mode="reason", batch_size=1)
            out[name] = (enc, caches.count(StaticCache))
            assert DynamicCache not in caches
    finally:
        handle.remove()
    plain = model.engine.embed_texts(model.query_texts(q, [cot]), 8, "q", False, prefix_cache=False)
    for enc, _ in out.values():
        assert enc.cots == [cot]
        np.testing.assert_allclose(enc.embeddings, plain, atol=1e-5)
    assert {name: n for name, (_, n) in out.items()} == forwards


def test_respelled_query_tokens(lively):
    """The spellings `respelled` drafts from, each ended by `</think>` (a stop id, where drafts are
    cut): Title Case, short words in capitals, the singular, each pair of neighbouring words
    hyphenated (up to `HYPHEN_WORDS` words); none that equals the query."""
    engine, end = lively.engine, lively.think_end_id

    def spellings(ids: list[int]) -> list[str]:
        assert ids == [] or ids[-1] == end
        return lively.tokenizer.decode(ids).split(lively.tokenizer.decode([end]))[:-1]

    many = " ".join(["w"] * (engine.HYPHEN_WORDS + 1))
    navy, us, number, glass, long = engine.respelled(["us navy signs", "US", "72.5", "glass", many])
    assert spellings(navy) == [" Us Navy Signs", " US navy signs", " us navy sign", " us-navy signs", " us navy-signs"]
    assert spellings(us) == [" Us"] and number == [] and spellings(glass) == [" Glass"]
    assert not any("-" in x for x in spellings(long))
    assert engine.respelled(["72.5"]) == [[]] and engine.respelled([]) == []


def test_single_query_goes_on_from_the_drafted_word_its_cot_begins_with(lively, monkeypatch):
    """A CoT that begins with a word drafted in the prefill but goes on ("device pulling" after the
    drafted "device"): that forward's pick after the draft is the CoT's next token, so decoding
    goes on from there with the draft's keys and values, one forward fewer than without word
    drafts; the CoT and embedding are the plain path's."""
    forwards = {}
    for drafts in (0, 3):
        model, widths = reason_steered(lively, monkeypatch, "device pulling", drafts)
        forwards[drafts] = len(widths)
    assert forwards == {0: 3, 3: 2}
    assert list(model.engine.draft_hits["first"]) == [model.engine.BEGAN]  # not the whole CoT: half a hit


def test_batch_runs_its_unfinished_rows_alone(lively, monkeypatch):
    """Once half a batch has stopped, the other rows decode alone, with `lm.generate`'s tokens;
    closing tails of different lengths run in two forwards (the longer ones alone), and the
    embeddings stay the plain path's."""
    stop0 = [lively.think_end_id, lively.emb_id, lively.tokenizer.eos_token_id]
    ref = plain_generate(lively, QUERIES, stop0)
    stop = stop0 + [r[1] for r in ref[:5]]  # these rows (and any that emit one of them) now stop early
    shapes: list[tuple[int, int]] = []
    run = StaticDecoder.__call__

    def spy(self, ids, pos, start, rows=None, attend=None):
        shapes.append(tuple(ids.shape))
        return run(self, ids, pos, start, rows, attend)

    monkeypatch.setattr(StaticDecoder, "__call__", spy)
    seqs = lively.tokenizer(lively.query_prompts(QUERIES), add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        gen = lively.engine.greedy(seqs, 16, stop)
    assert gen == plain_generate(lively, QUERIES, stop)
    assert min(b for b, t in shapes) < len(QUERIES) and max(len(set(g)) for g in gen) > 2  # rows ran alone
    with torch.inference_mode():  # a `pick` (sampling's way in) gets the running rows' logits only
        assert lively.engine.greedy(seqs, 16, stop, pick=lambda logits: logits.argmax(-1)) == gen
    shapes.clear()
    with torch.inference_mode():
        cots, emb = lively.engine.greedy(seqs, 16, stop, texts=QUERIES)
    assert shapes[-2][0] == len(QUERIES) > shapes[-1][0]  # every tail's first tokens, then the long ones' rest
    plain = lively.engine.embed_texts(lively.query_texts(QUERIES, cots), 8, "q", False, prefix_cache=False)
    np.testing.assert_allclose(emb.numpy(), plain, atol=1e-5)


def test_draft_decode_keeps_lm_generate_tokens_in_fewer_forwards(tiny, monkeypatch):
    """`draft_decode` (greedy rows, each feeding tokens drafted from its prompt and CoT into the same
    new slots and keeping those the model picks) gives `lm.generate`'s tokens; on `tiny`, whose CoTs
    repeat one token, in far fewer forwards than tokens, with the slot of each token fed."""
    from lrem.decoding import GreedyStep, draft_decode, greedy_ids, prefill

    stop, pad = [tiny.think_end_id, tiny.emb_id, tiny.tokenizer.eos_token_id], tiny.tokenizer.pad_token_id
    ref = plain_generate(tiny, QUERIES, stop)
    seqs = tiny.tokenizer(tiny.query_prompts(QUERIES), add_special_tokens=False)["input_ids"]
    n, kv = tiny.engine.shared_prefix(seqs)
    step = GreedyStep(tiny.lm, len(seqs), max(map(len, seqs)) + 100, graph=False, linears=tiny.engine.linears())
    assert step.compact is not None
    widths = forward_widths(monkeypatch)
    with torch.inference_mode():
        logits, last, w = prefill(step, n, kv, seqs, pad)
        gen, at, ends = draft_decode(step, greedy_ids(logits).tolist(), last.tolist(), n + w, 16, stop, pad, seqs, k=4)
    assert [g + [pad] * (16 - len(g)) for g in gen] == ref
    assert max(len(g) for g in gen) == 16 and len(widths) - 1 <= 8 and max(widths[1:]) > 1  # 16 tokens
    assert all(len(a) == len(g) - 1 and a == sorted(a) and a[0] == n + w for a, g in zip(at, gen))
    assert all(int(step.mask[r, s]) == 1 for r, a in enumerate(at) for s in a)  # the taken tokens' slots
    assert int(step.mask.sum()) == sum(len(x) + len(a) for x, a in zip(seqs, at))  # the prompts and those only
    # a cache with room for one token a forward only (and `reserve` kept free): no drafts, the same tokens
    for reserve in (0, 5):
        tight = GreedyStep(tiny.lm, len(seqs), max(map(len, seqs)) + 15 + reserve, graph=False,
                           linears=tiny.engine.linears())
        widths.clear()
        with torch.inference_mode():
            logits, last, w = prefill(tight, n, kv, seqs, pad)
            gen, _, _ = draft_decode(tight, greedy_ids(logits).tolist(), last.tolist(), n + w, 16, stop, pad, seqs, k=4,
                                  reserve=reserve)
        assert [g + [pad] * (16 - len(g)) for g in gen] == ref and set(widths[1:]) == {1}


def test_reason_mode_on_tiny_keeps_cots_and_embeddings(tiny):
    plain_cots = tiny.generate_cots(QUERIES, fast=False)
    enc = tiny.encode_queries(QUERIES, mode="reason")
    assert enc.cots == plain_cots
    # the embeddings the plain path gives: every token run, no prefix cache
    plain = tiny.engine.embed_texts(tiny.query_texts(QUERIES, plain_cots), 32, "q", False, prefix_cache=False)
    np.testing.assert_allclose(enc.embeddings, plain, atol=1e-5)


def test_reason_runs_length_sorted_batches_and_answers_in_input_order(lively, monkeypatch):
    """Queries of mixed lengths reason in length-sorted batches (each batch's prompts no longer
    than the next one's), and come back in input order: the CoTs and embeddings one query at a
    time gives, and the CoTs `generate_cots` gives (sorted too) and plain `generate` (in order)."""
    import doctest

    import lrem.engine

    assert doctest.testmod(lrem.engine).failed == 0  # length_order, split_width
    lengths = []
    real = type(lively.engine).greedy

    def spy(self, seqs, *a, **k):
        lengths.append([len(x) for x in seqs])
        return real(self, seqs, *a, **k)

    monkeypatch.setattr(type(lively.engine), "greedy", spy)
    enc = lively.encode_queries(QUERIES, mode="reason", batch_size=3)
    given = [len(x) for x in lively.tokenizer(lively.query_prompts(QUERIES), add_special_tokens=False)["input_ids"]]
    assert given != sorted(given)  # the queries are not in length order already
    assert len(lengths) == 3 and all(max(a) <= min(b) for a, b in zip(lengths, lengths[1:]))
    one = [lively.encode_queries([q], mode="reason", batch_size=1) for q in QUERIES]
    assert enc.cots == [e.cots[0] for e in one]
    np.testing.assert_allclose(enc.embeddings, np.concatenate([e.embeddings for e in one]), atol=1e-5)
    assert lively.generate_cots(QUERIES, batch_size=3) == enc.cots == lively.generate_cots(QUERIES, batch_size=3,
                                                                                          fast=False)


def test_reason_embeds_from_the_decoding_cache(lively, monkeypatch):
    """Where a CoT retokenizes to the tokens that were generated, their KV is reused and only
    the closing `</think><emb>` runs; the embedding is still the plain path's."""
    model = copy.deepcopy(lively)
    words = [" wine", " red", " glass", " cork"]
    ids = [model.tokenizer.convert_tokens_to_ids(model.tokenizer.tokenize(w))[0] for w in words]
    head = torch.nn.Linear(model.dim, model.lm.get_output_embeddings().weight.shape[0], bias=True)
    with torch.no_grad():  # untied head: four whole words win, which one depends on the state
        head.weight.normal_(0, 0.01)
        head.bias.zero_()
        head.bias[ids] = 5.0
    model.lm.set_output_embeddings(head)
    widths = forward_widths(monkeypatch)
    enc = model.encode_queries(QUERIES[:4], mode="reason")
    assert len(set(enc.cots)) > 1 and all(set(c.split()) <= {w.strip() for w in words} for c in enc.cots)
    assert widths[-1] <= 4  # 15 CoT tokens come from the cache; the 16th, " ", "</think>", "<emb>" run
    assert enc.cots == model.generate_cots(QUERIES[:4], fast=False)
    plain = model.engine.embed_texts(model.query_texts(QUERIES[:4], enc.cots), 8, "q", False, prefix_cache=False)
    np.testing.assert_allclose(enc.embeddings, plain, atol=1e-5)


def test_prefix_cache_serves_single_texts_and_longer_shared_prefixes(lively):
    texts = lively.item_texts(["corkscrew", "teapot with a strainer"])
    plain = lively.engine.embed_texts(texts, 8, "t", False, prefix_cache=False)
    seqs = lively.tokenizer(texts[:1], add_special_tokens=False)["input_ids"]
    n, kv = lively.engine.shared_prefix(seqs)
    assert 10 < n < len(seqs[0]) and kv[0][0].shape[2] == n  # one text still skips its template
    np.testing.assert_allclose(lively.engine.embed_texts(texts[:1], 1, "t", False), plain[:1], atol=1e-5)
    # a batch sharing more than the template (one title twice, GRPO-style) extends the cached KV
    same = lively.item_texts(["teapot with a strainer", "teapot with a strainer and lid"])
    seqs = lively.tokenizer(same, add_special_tokens=False)["input_ids"]
    n_tpl = lively.engine.shared_prefix(seqs[:1])[0]
    assert lively.engine.shared_prefix(seqs)[0] > n_tpl
    np.testing.assert_allclose(lively.engine.embed_texts(same, 2, "t", False),
                               lively.engine.embed_texts(same, 2, "t", False, prefix_cache=False), atol=1e-5)


def test_cached_prefix_follows_weight_updates(tiny_dir):
    model = LREM.from_pretrained(str(tiny_dir), dtype="float32")
    titles = ["corkscrew", "teapot"]
    before = model.encode_items(titles)
    assert model.engine.cache["prefix"]  # the item template's KV is kept for the next call
    with torch.no_grad():  # what an optimizer step does: an in-place update
        for p in model.lm.parameters():
            p.mul_(1.5)
    after = model.encode_items(titles)
    texts = model.item_texts(titles)
    np.testing.assert_allclose(after, model.engine.embed_texts(texts, 8, "t", False, prefix_cache=False), atol=1e-5)
    assert np.abs(after - before).max() > 1e-3  # the update did change the embeddings
    clone = copy.deepcopy(model)  # a reference model for RL: starts with no caches
    assert clone.engine.cache == {} and model.engine.cache["prefix"]
    np.testing.assert_allclose(clone.encode_items(titles), after, atol=1e-6)
    # a weight replaced by a new tensor (as assigning a state dict does): one query runs through the
    # compact decoder, whose views of the weights are kept across calls too
    q = QUERIES[:1]
    first = model.encode_queries(q, mode="direct").embeddings
    assert model.engine.cache["linears"]
    mlp = model.lm.get_decoder().layers[1].mlp
    new = torch.nn.Parameter(mlp.down_proj.weight.detach() * 3)
    with torch.no_grad():
        new.mul_(1.0)  # the same version count as the weight it replaces: only its address differs
    mlp.down_proj.weight = new
    second = model.encode_queries(q, mode="direct").embeddings
    ref = model.engine.embed_texts(model.query_texts(q, [""]), 8, "q", False, prefix_cache=False)
    np.testing.assert_allclose(second, ref, atol=1e-5)
    assert np.abs(second - first).max() > 1e-3


def assert_greedy(lm, seq: list[int], gen: list[int]) -> None:
    """Each generated token is the argmax of the plain forward pass over the tokens before it,
    up to near-ties: batched and single-row sums differ in the last bits (a few bfloat16 steps
    at logits ~30 where the CPU computes bfloat16 natively), and the untrained model has ties
    that flip with them. A wrong position or a leaked pad misses by whole units."""
    tol = 5e-3 if next(lm.parameters()).dtype == torch.float32 else 0.5
    with torch.no_grad():
        logits = lm(torch.tensor([seq + gen])).logits[0, len(seq) - 1 : len(seq) - 1 + len(gen)]  # (G, V)
    picked = logits.gather(-1, torch.tensor(gen)[:, None])[:, 0]
    assert bool((picked >= logits.max(-1).values - tol).all()), (picked, logits.max(-1).values)


@pytest.mark.slow
def test_real_model_fast_path_keeps_cots_and_embeddings(real_model):
    """The real model's CoTs are greedy (checked token by token against the plain forward pass),
    the batch fast path and `decoding.generate` agree, and reason mode embeds after its CoTs as
    the plain path does. (Exact equality with `lm.generate` is tested on `lively` models: the
    real untrained model has near-ties that batched and single runs break differently.)"""
    from lrem.decoding import block_linears, generate

    queries = QUERIES[:6]
    m = real_model
    seqs = m.tokenizer(m.query_prompts(queries), add_special_tokens=False)["input_ids"]
    gen = generate(m.lm, seqs, m.config.cot_max_tokens, m.stop_ids, m.tokenizer.pad_token_id,
                   linears=block_linears(m.lm, torch.get_num_threads()))
    for seq, g in zip(seqs, gen):
        assert g
        assert_greedy(m.lm, seq, g)
    fast = m.generate_cots(queries)
    assert fast == [m.decode_cot(g) for g in gen] and all(fast)
    enc = m.encode_queries(queries, mode="reason")
    assert enc.cots == fast
    plain = m.engine.embed_texts(m.query_texts(queries, fast), 32, "q", False, prefix_cache=False)
    np.testing.assert_allclose(enc.embeddings, plain, atol=1e-4)


def test_generate_prefix_cache_stays_bounded_and_exact(lively):
    """Batches whose rows share more than the template each add a key to `generate`'s prefix
    cache; it keeps at most PREFIX_CACHE_SIZE and every answer equals the uncached one."""
    from lrem.decoding import PREFIX_CACHE_SIZE, generate

    m, cache = lively, {}
    pad, stop = m.tokenizer.pad_token_id, m.stop_ids
    for j in range(PREFIX_CACHE_SIZE + 3):
        lead = f"{['red', 'blue', 'green', 'tall', 'small', 'old', 'new'][j]} {j}"
        seqs = m.tokenizer(m.query_prompts([f"{lead} mug", f"{lead} teapot"]), add_special_tokens=False)["input_ids"]
        assert generate(m.lm, seqs, 4, stop, pad, prefix_cache=cache) == generate(m.lm, seqs, 4, stop, pad)
        assert len(cache) <= PREFIX_CACHE_SIZE
    assert len(cache) == PREFIX_CACHE_SIZE


@pytest.mark.parametrize("cot,where,drafts", [("device", {"first"}, 3), ("corks", {"last"}, 3),
                                              ("pulling corks", {"last two", "second two"}, 4),
                                              ("device pulling", {"first two"}, 5)])
def test_single_query_whose_cot_is_one_of_its_words_reasons_in_its_prefill_forward(lively, monkeypatch, cot, where,
                                                                                   drafts):
    """A single query's prefill forward also runs its words at `WORD_POSITIONS` (up to
    `word_drafts` of them), each followed by the full text's closing tokens, as drafted CoTs
    beside the prompt: where the model writes one of them, the query is reasoned and embedded in
    that one forward (as in direct mode), with the plain path's CoT and embedding; the hit is
    counted for that word's position, a miss for the others drafted."""
    # "a device for pulling corks": first content word "device", then "pulling"; last "corks"
    model, widths = reason_steered(lively, monkeypatch, cot, drafts)
    assert len(widths) == 1
    tries = {k: list(model.engine.draft_hits.get(k, [])) for k in model.engine.WORD_POSITIONS}
    assert {k for k, v in tries.items() if v == [True]} == where  # the positions whose words the CoT is
    # the others drafted: misses, or half hits where the CoT began with them ("device" of "device pulling")
    assert all(v in ([], [0.0], [model.engine.BEGAN]) for k, v in tries.items() if k not in where)
    assert len({k for k, v in tries.items() if v} - where) >= drafts - 1  # the other words drafted: misses


def test_word_drafts_follow_the_environment_switch():
    from lrem.engine import EngineConfig

    assert EngineConfig.from_env({}).word_drafts == EngineConfig().word_drafts > 0
    assert EngineConfig.from_env({"LREM_WORD_DRAFTS": "0"}).word_drafts == 0


def test_word_drafts_that_keep_missing_are_tried_only_to_explore(lively, monkeypatch):
    """Drafts that miss stop being run once the hit rate of their positions (prior 1/2) no longer
    pays for their tokens (a position not yet tried then gets its turn); every `EXPLORE_EVERY`-th
    query tries them all again. The CoTs stay the plain path's."""
    q = QUERIES[:1]
    model, seq = steered(lively, q[0], "opener")  # no word of the query
    engine = model.engine
    engine.draft_hits.clear()
    engine.n_drafted = 0
    widths = forward_widths(monkeypatch)
    drafted = []
    every = engine.EXPLORE_EVERY
    for _ in range(3 * every):
        widths.clear()
        assert model.encode_queries(q, mode="reason").cots == ["opener"]
        drafted.append(widths[0] > len(seq) - len(model.template_prefixes()[0]))
    assert drafted[0] and not any(drafted[2 * every : 3 * every - 1])
    assert all(drafted[k * every - 1] for k in (1, 2, 3))  # exploring
    # each position had its turn (but "whole": five words are too many to draft whole)
    assert all(len(engine.draft_hits[k]) > 0 for k in engine.WORD_POSITIONS if k != "whole")
    assert "whole" not in engine.draft_hits
    assert not any(hit for tries in engine.draft_hits.values() for hit in tries)


SHOP_QUERIES = ["salon chair", "turquoise pillows", "fire pit", "wall decor", "privacy wall", "closet storage",
                "coffee table", "drawer pull", "dinosaur", "welcome rug", "4 light vanity light", "outdoor sofa set",
                "rooster decor", "sunflower rug", "kitchen island with seating", "desk chair with wheels"]


@pytest.fixture(scope="module")
def trained():
    from lrem.model import TRAINED_MODEL

    return LREM.from_pretrained(TRAINED_MODEL, dtype="float32")


def test_batch_runs_its_closing_tokens_while_it_decodes(trained, monkeypatch):
    """The shipped model's CoTs end " </think>": a batch row that stops there runs `</think><emb>`
    beside the rows still decoding, and once most have stopped a row whose last token is " " runs
    them beside its drafts (a branch), so no forward follows the CoTs; the CoTs and embeddings are
    the plain path's, in fewer forwards than with the closing forward after decoding."""
    from lrem import decoding

    model = copy.deepcopy(trained)
    ends, attends = [], []
    real = decoding.draft_decode

    def spy(*a, **k):
        out = real(*a, **k)
        ends.append(len(out[2]))
        return out

    monkeypatch.setattr("lrem.engine.draft_decode", spy)
    shapes = forward_widths(monkeypatch)
    run = decoding.StaticDecoder.__call__

    def branches(self, ids, pos, start, rows=None, attend=None):
        attends.append(attend is not None)
        return run(self, ids, pos, start, rows, attend)

    monkeypatch.setattr(decoding.StaticDecoder, "__call__", branches)
    enc = model.encode_queries(SHOP_QUERIES, mode="reason", batch_size=16)
    with_closing = len(shapes)
    assert ends == [len(SHOP_QUERIES)] and any(attends)  # every row closed while decoding, some in a branch
    assert enc.cots == model.generate_cots(SHOP_QUERIES, fast=False) and all(enc.cots)
    plain = model.engine.embed_texts(model.query_texts(SHOP_QUERIES, enc.cots), 16, "q", False, prefix_cache=False)
    np.testing.assert_allclose(enc.embeddings, plain, atol=1e-4)
    monkeypatch.setattr(type(model.engine), "_ending", lambda *a: None)  # the closing forward after the CoTs
    shapes.clear()
    after = model.encode_queries(SHOP_QUERIES, mode="reason", batch_size=16)
    assert after.cots == enc.cots and len(shapes) > with_closing
    np.testing.assert_allclose(after.embeddings, enc.embeddings, atol=1e-5)


def test_closing_tokens_stay_in_the_cache_they_are_given(trained):
    """`draft_decode` runs closing tokens only where the cache has room: in caches from exactly the
    slots one token a forward needs (nothing kept after) to a few more, the same tokens come back,
    and the rows that close have the same hidden states as in a roomy cache; none write past it."""
    from lrem.decoding import GreedyStep, draft_decode, greedy_ids, prefill

    m = trained
    stop, pad = m.stop_ids, m.tokenizer.pad_token_id
    space = m.tokenizer.convert_tokens_to_ids(m.tokenizer.tokenize(" "))[0]
    seqs = m.tokenizer(m.query_prompts(SHOP_QUERIES), add_special_tokens=False)["input_ids"]
    n, kv = m.engine.shared_prefix(seqs)
    closing = [m.think_end_id, m.emb_id]

    def run(max_new: int, slots: int):
        step = GreedyStep(m.lm, len(seqs), max(map(len, seqs)) + slots, graph=False, linears=m.engine.linears())
        with torch.inference_mode():
            logits, last, w = prefill(step, n, kv, seqs, pad)
            return draft_decode(step, greedy_ids(logits).tolist(), last.tolist(), n + w, max_new, stop, pad, seqs,
                                k=4, ending=lambda r, toks: closing if toks[-1] == space else None)

    gen, _, roomy = run(16, 116)
    longest = max(len(g) for g in gen)  # its stop id ends it: it feeds longest - 1 tokens
    assert longest < 16 and len(roomy) == len(SHOP_QUERIES)
    closed = []
    for slots in range(longest - 1, longest + 8):  # from none spare to more than the closing tokens need
        tight_gen, _, tight = run(longest, slots)
        assert tight_gen == gen
        for r, h in tight.items():  # rows that closed in the room left
            torch.testing.assert_close(h, roomy[r], atol=1e-4, rtol=0)
        closed.append(len(tight))
    assert closed[0] == 0 and max(closed) == len(SHOP_QUERIES)


def hf_step_decoding(lm, stop: list[int], compile: bool = False, lag: int = 0, max_new: int = 8):
    """On transformers' decoder (`GreedyStep` without the compact decoder; widths padded as a
    GPU's): a random prefix's KV, a padded prefill of two prompts, greedy decoding, then three
    closing tokens in place. (tokens per row, (slots filled after decoding, slots the CoTs fill),
    the closing tokens' hidden states, the step, the decoder's forwards)."""
    from lrem.decoding import GreedyStep, decode, prefill

    cfg = lm.config
    g = torch.Generator().manual_seed(3)
    n = 5
    kv = [(torch.randn(1, cfg.num_key_value_heads, n, cfg.head_dim, generator=g),
           torch.randn(1, cfg.num_key_value_heads, n, cfg.head_dim, generator=g)) for _ in range(cfg.num_hidden_layers)]
    seqs = [[1] * n + torch.randint(2, 400, (k,), generator=g).tolist() for k in (4, 9)]
    closing = torch.randint(2, 400, (2, 3), generator=g)
    forwards = []
    handle = lm.get_decoder().register_forward_hook(lambda *a: forwards.append(1))
    try:
        with torch.inference_mode():
            step = GreedyStep(lm, len(seqs), 64, graph=False, widths=(4, 8, 16), compile=compile)
            logits, last, w = prefill(step, n, kv, seqs, pad=0)
            gen = decode(step, logits.argmax(-1), last, n + w, max_new, stop=stop, pad=0, lag=lag)
            used = n + w + max(map(len, gen)) - 1
            filled = step.filled()
            pos = last[:, None] + max_new + 1 + torch.arange(3)
            hidden = step.extend(closing, pos, torch.ones_like(closing), used)
    finally:
        handle.remove()
    return gen, (filled, used), hidden, step, len(forwards)


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="torch.compile on the CPU needs a C compiler")
def test_compiled_decode_step_keeps_tokens(lively):
    """`GreedyStep(compile=True)` (`EngineConfig.compile_decode`, LREM_COMPILE: the decode step's
    forward through torch.compile, on CUDA before its graph is captured) against the same step
    uncompiled, on transformers' decoder in float32: the same greedy tokens after a padded prefill,
    and the same hidden states for closing tokens after them."""
    plain, _, h_plain, _, _ = hf_step_decoding(lively.lm, stop=[0])
    comp, _, h_comp, step, _ = hf_step_decoding(lively.lm, stop=[0], compile=True)
    assert hasattr(step.decoder, "_orig_mod")  # torch.compile's wrapper
    assert comp == plain and len(plain[0]) > 1
    torch.testing.assert_close(h_comp, h_plain, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("lag", [1, 3])
def test_decode_reading_stops_late_forgets_the_extra_steps(lively, lag):
    """`decode(lag=...)` (`EngineConfig.decode_lag`, on CUDA graph steps) reads whether every row
    has stopped `lag` steps late, so it runs steps past the last stop: the tokens are the same, the
    cache is set back to the slots the CoTs filled, and closing tokens run after them in place
    give the same hidden states. The stops: the third token of one row, the fourth of the other."""
    free, _, _, _, _ = hf_step_decoding(lively.lm, stop=[-1])  # no stop: what each row writes
    stop = [free[0][2], free[1][3]]
    want, (filled0, used0), h_want, _, n0 = hf_step_decoding(lively.lm, stop=stop)
    got, (filled, used), h_got, _, n = hf_step_decoding(lively.lm, stop=stop, lag=lag)
    assert got == want and max(map(len, want)) <= 4  # both rows stopped early
    assert n == n0 + lag  # `lag` steps ran past the last stop ...
    assert filled0 == used0 == filled == used  # ... and were forgotten
    torch.testing.assert_close(h_got, h_want)
