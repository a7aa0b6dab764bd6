"""Losses of LREM stage 1 (LREM_SPEC, "Stage 1: cold start"): InfoNCE and SFT on the CoT.

The math lives in two pure functions, tested without a model; `LREMLoss` is a small module that
holds the model, embeds a collated batch (one decoder pass per side) and returns each component:

    from lrem.losses import LREMLoss
    loss_fn = LREMLoss(model, sft_weight=0.1, infonce_weight=1.0, temperature=0.05)
    parts = loss_fn(batch)                     # {"sft": tensor, "infonce": tensor}
    total = sum(loss_fn.weights[k] * v for k, v in parts.items())

The trainer (`lrem.train.sft`) sums the weighted components and logs each one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import emb_hidden

IGNORE = -100  # label of a token that is not trained on (prompt, padding)


def infonce(q: Tensor, d: Tensor, temperature: float = 0.05, exclude: Tensor | None = None) -> Tensor:
    """InfoNCE with in-batch negatives: row i of `q` should pick row i of `d` among all rows of `d`.

    Also known as the multiple-negatives ranking loss (sentence-transformers) or the contrastive
    loss of CLIP / DPR. Scores are cosine similarity / `temperature` (`scale = 1 / temperature`:
    0.05 is a scale of 20); the loss is the mean cross-entropy of the true pair.

    Args:
        q: (B, D) query embeddings, L2-normalised.
        d: (B, D) positive item embeddings, L2-normalised; row i is the positive of q[i] and a
            negative of every other query.
        temperature: softmax temperature (the paper does not give one; 0.05 is the common choice).
        exclude: optional (B, B) bool, True where d[j] must not count as a negative of q[i]
            (the same item, or another positive of the same query); the diagonal is ignored.

    >>> q = torch.eye(2); infonce(q, q, temperature=1.0).item() < infonce(q, q.flip(0), temperature=1.0).item()
    True
    """
    scores = q @ d.T / temperature  # (B, B)
    if exclude is not None:
        off_diag = exclude & ~torch.eye(len(q), dtype=torch.bool, device=q.device)  # (B, B)
        scores = scores.masked_fill(off_diag, float("-inf"))
    labels = torch.arange(len(q), device=q.device)  # (B,)
    return F.cross_entropy(scores, labels)


def sft_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of teacher-forced targets, summed over tokens and averaged over samples.

    `logits[b, t]` is the prediction for `labels[b, t]` (the caller has already shifted by one);
    labels equal to -100 (prompt, padding) are skipped. The average is over the rows that have at
    least one target (a row without a teacher CoT adds nothing), as in LREM_SPEC's L_SFT.

    Args:
        logits: (B, T, V) float.
        labels: (B, T) long, -100 where not trained.

    >>> logits = torch.zeros(2, 3, 4); labels = torch.tensor([[0, 1, -100], [2, -100, -100]])
    >>> round(sft_loss(logits, labels).item(), 4)  # 3 tokens of log(4) over 2 samples
    2.0794
    """
    per_token = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                                reduction="none").view(labels.shape)  # (B, T)
    n_samples = (labels != IGNORE).any(dim=1).sum().clamp(min=1)
    return per_token.sum() / n_samples


class LREMLoss(nn.Module):
    """L = sft_weight * L_SFT + infonce_weight * L_InfoNCE over a batch from `lrem.train.sft.collate`.

    One decoder pass over the query side (prompt + `<think> cot </think><emb>`) gives both the
    `<emb>` hidden state (the query embedding) and, through the LM head, the predictions of the
    CoT and format tokens; the item side (`Item: title` + `<emb>`) is a second pass. With
    `sft_weight=0` (the direct-embedding baseline) the LM head is not run at all.

    Batch columns: `q_ids`, `q_mask` (B, Tq) right-padded query sides; `sft_pos` (B, L) the
    positions whose hidden state predicts `sft_tgt` (B, L) (-100 padded); `d_ids`, `d_mask`
    (B, Td) item sides; `exclude` (B, B) bool, false negatives to mask (see `infonce`).

    Args:
        model: an `lrem.model.LREM`.
        sft_weight: weight of L_SFT (paper 0.1; 0 = InfoNCE only, the direct baseline).
        infonce_weight: weight of L_InfoNCE (paper 1.0).
        temperature: InfoNCE temperature (`scale = 1 / temperature`).
    """

    def __init__(self, model, sft_weight: float = 0.1, infonce_weight: float = 1.0, temperature: float = 0.05):
        super().__init__()
        self.model = model
        self.sft_weight, self.infonce_weight, self.temperature = sft_weight, infonce_weight, temperature

    @property
    def weights(self) -> dict[str, float]:
        w = {"infonce": self.infonce_weight}
        if self.sft_weight > 0:
            w["sft"] = self.sft_weight
        return w

    def get_config_dict(self) -> dict:
        return {"sft_weight": self.sft_weight, "infonce_weight": self.infonce_weight, "temperature": self.temperature}

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        lm, emb_id = self.model.lm, self.model.emb_id
        q_ids, q_mask = batch["q_ids"], batch["q_mask"]  # (B, Tq)
        pos = torch.arange(q_ids.shape[1], device=q_ids.device).expand_as(q_ids)  # right padding: 0..T-1
        h = lm.get_decoder()(input_ids=q_ids, attention_mask=q_mask, position_ids=pos,
                             use_cache=False).last_hidden_state  # (B, Tq, H)
        q = F.normalize(emb_hidden(h, q_ids, emb_id).float(), dim=-1)  # (B, H)
        d = self.model.embed_batch(batch["d_ids"], batch["d_mask"])  # (B, H)
        out = {"infonce": infonce(q, d, self.temperature, batch.get("exclude"))}
        if self.sft_weight > 0:
            sft_pos, sft_tgt = batch["sft_pos"], batch["sft_tgt"]  # (B, L)
            rows = torch.arange(len(h), device=h.device)[:, None]  # (B, 1)
            logits = lm.get_output_embeddings()(h[rows, sft_pos])  # (B, L, V): the labelled span only
            out["sft"] = sft_loss(logits, sft_tgt)
        return out
