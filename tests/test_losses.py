"""lrem.losses: the pure InfoNCE / SFT functions, and LREMLoss on the tiny model against references."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lrem.losses import IGNORE, LREMLoss, infonce, sft_loss
from lrem.train.sft import Pair, collate


def _unit(x):
    return F.normalize(x, dim=-1)


def test_infonce_matches_hand_computation():
    torch.manual_seed(0)
    q, d = _unit(torch.randn(4, 8)), _unit(torch.randn(4, 8))
    t = 0.1
    s = q @ d.T / t
    expected = -sum(s[i, i] - torch.logsumexp(s[i], 0) for i in range(4)) / 4
    assert infonce(q, d, t).item() == pytest.approx(expected.item(), rel=1e-5)
    # aligned pairs score better than mismatched ones
    assert infonce(q, q, t) < infonce(q, q.roll(1, 0), t)


def test_infonce_exclude_drops_false_negatives():
    torch.manual_seed(1)
    q, d = _unit(torch.randn(3, 8)), _unit(torch.randn(3, 8))
    exclude = torch.zeros(3, 3, dtype=torch.bool)
    exclude[0, 2] = True  # d[2] is another positive of q[0]: not a negative
    exclude[1, 1] = True  # the diagonal is never excluded
    s = q @ d.T / 0.05
    row0 = -(s[0, 0] - torch.logsumexp(s[0, :2], 0))
    rows12 = [-(s[i, i] - torch.logsumexp(s[i], 0)) for i in (1, 2)]
    expected = (row0 + sum(rows12)) / 3
    assert infonce(q, d, 0.05, exclude).item() == pytest.approx(expected.item(), rel=1e-5)
    assert infonce(q, d, 0.05, exclude).item() != pytest.approx(infonce(q, d, 0.05).item(), rel=1e-5)


def test_sft_loss_sums_tokens_and_averages_samples():
    torch.manual_seed(2)
    logits = torch.randn(3, 4, 5)
    labels = torch.tensor([[1, 2, IGNORE, IGNORE], [IGNORE] * 4, [0, 4, 3, IGNORE]])
    logp = logits.log_softmax(-1)
    total = -(logp[0, 0, 1] + logp[0, 1, 2] + logp[2, 0, 0] + logp[2, 1, 4] + logp[2, 2, 3])
    assert sft_loss(logits, labels).item() == pytest.approx((total / 2).item(), rel=1e-5)  # row 1 has no target
    assert sft_loss(torch.zeros(1, 2, 4), torch.tensor([[0, 1]])).item() == pytest.approx(2 * math.log(4), rel=1e-6)


PAIRS = [
    Pair("q1", "a device for pulling corks", "i1", "corkscrew, bottle screw", "corkscrew, wine opener"),
    Pair("q2", "something to sit on", "i2", "chair", "chair, stool, bench"),
    Pair("q3", "a hot drink", "i3", "coffee, java", None),
]


def test_collate_targets_are_cot_and_format_tokens(tiny):
    batch = collate(tiny, PAIRS)
    tok = tiny.tokenizer
    for row, p in enumerate(PAIRS):
        tgt = [t for t in batch["sft_tgt"][row].tolist() if t != IGNORE]
        if p.cot is None:
            assert tgt == []
            continue
        assert tok.decode(tgt) == f" {p.cot} </think><emb>"
        ids = batch["q_ids"][row]
        pos = batch["sft_pos"][row][: len(tgt)]
        assert ids[pos[0]].item() == tiny.think_id  # the first target is predicted from <think>
        assert ids[pos + 1].tolist() == tgt  # each position predicts the next token
    assert batch["q_mask"][:, 0].all() and not batch["q_mask"].all()  # right padding
    assert batch["exclude"].diagonal().all() and not batch["exclude"][0, 1]


def test_lremloss_matches_full_lm_forward(tiny):
    """One decoder pass + LM head on the CoT span == the plain CausalLM loss; the embedding == embed_batch."""
    loss_fn = LREMLoss(tiny, sft_weight=0.1, infonce_weight=1.0, temperature=0.05)
    batch = collate(tiny, PAIRS)
    with torch.no_grad():
        parts = loss_fn(batch)
        labels = torch.full_like(batch["q_ids"], IGNORE)
        for row in range(len(PAIRS)):
            for p, t in zip(batch["sft_pos"][row].tolist(), batch["sft_tgt"][row].tolist()):
                if t != IGNORE:
                    labels[row, p + 1] = t
        logits = tiny.lm(input_ids=batch["q_ids"], attention_mask=batch["q_mask"]).logits  # (B, T, V)
        ref_sft = sft_loss(logits[:, :-1], labels[:, 1:])
        q = tiny.embed_batch(batch["q_ids"], batch["q_mask"])
        d = tiny.embed_batch(batch["d_ids"], batch["d_mask"])
        ref_nce = infonce(q, d, 0.05, batch["exclude"])
    assert set(parts) == {"sft", "infonce"}
    assert parts["sft"].item() == pytest.approx(ref_sft.item(), rel=1e-4)
    assert parts["infonce"].item() == pytest.approx(ref_nce.item(), rel=1e-4)
    assert loss_fn.weights == {"sft": 0.1, "infonce": 1.0}


def test_lremloss_gradients_and_direct_mode(tiny):
    loss_fn = LREMLoss(tiny, sft_weight=0.0)
    parts = loss_fn(collate(tiny, PAIRS))
    assert set(parts) == {"infonce"}  # no LM head in direct mode
    tiny.lm.zero_grad()
    sum(loss_fn.weights[k] * v for k, v in parts.items()).backward()
    grads = [p.grad for p in tiny.lm.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    tiny.lm.zero_grad(set_to_none=True)


def test_shared_prefix_gives_the_plain_gradients(tiny):
    """Running the batch's common prompt prefix once (training speed) changes neither the loss nor
    any gradient: the broadcast keys/values sum their gradients over the batch."""
    batch = collate(tiny, PAIRS)
    same = (batch["q_ids"] == batch["q_ids"][:1]).all(0).long().cumprod(0).sum().item()
    assert same > 10  # the chat template, system prompt and instruction are shared
    grads, losses = [], []
    for share in (True, False):
        tiny.lm.zero_grad(set_to_none=True)
        loss_fn = LREMLoss(tiny, sft_weight=0.1, share_prefix=share)
        parts = loss_fn(batch)
        total = sum(loss_fn.weights[k] * v for k, v in parts.items())
        total.backward()
        losses.append(total.item())
        grads.append(torch.cat([p.grad.flatten() for p in tiny.lm.parameters() if p.grad is not None]))
    tiny.lm.zero_grad(set_to_none=True)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert grads[0].shape == grads[1].shape and grads[1].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-6), (grads[0] - grads[1]).abs().max()


def test_doctests():
    import doctest

    import lrem.losses
    import lrem.train.sft

    for mod in (lrem.losses, lrem.train.sft):
        result = doctest.testmod(mod)
        assert result.attempted > 0 and result.failed == 0, mod.__name__


def test_loss_defaults_are_the_training_configs(tiny):
    """A loss made without weights takes its stage config's defaults (the paper's constants have
    one owner, the config); given values win."""
    from lrem.losses import GRPOLoss, LREMLoss
    from lrem.train import RLConfig, SFTConfig

    sft, rl = SFTConfig(), RLConfig()
    assert LREMLoss(tiny).get_config_dict() == {"sft_weight": sft.sft_weight, "infonce_weight": sft.infonce_weight,
                                                "temperature": sft.temperature} == {"sft_weight": 0.1,
                                                                                    "infonce_weight": 1.0,
                                                                                    "temperature": 0.05}
    assert LREMLoss(tiny, sft_weight=0.0).weights == {"infonce": 1.0}
    g = GRPOLoss(tiny)
    assert (g.grpo_weight, g.infonce_weight, g.kl_coef, g.temperature, g.clip_eps, g.sampling_temperature) == (
        rl.grpo_weight, rl.infonce_weight, rl.kl_coef, rl.temperature, rl.clip_eps, rl.sampling_temperature)
    assert GRPOLoss(tiny, kl_coef=0.05).weights == {"grpo": rl.grpo_weight, "infonce": rl.infonce_weight, "kl": 0.05}
