"""Losses of LREM: stage 1 (InfoNCE, SFT on the CoT) and stage 2 (GRPO's clipped objective).

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


def infonce(q: Tensor, d: Tensor, temperature: float = 0.05, exclude: Tensor | None = None,
            labels: Tensor | None = None) -> Tensor:
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
        labels: optional (B,) index of each query's positive in `d` (then `d` may have any number
            of rows: stage 2 scores G rollouts per query against the batch's N items).

    >>> q = torch.eye(2); infonce(q, q, temperature=1.0).item() < infonce(q, q.flip(0), temperature=1.0).item()
    True
    """
    scores = q @ d.T / temperature  # (B, N)
    if labels is None:
        labels = torch.arange(len(q), device=q.device)  # (B,)
    if exclude is not None:
        own = F.one_hot(labels, scores.shape[1]).bool()  # (B, N) the positive is never masked
        scores = scores.masked_fill(exclude & ~own, float("-inf"))
    return F.cross_entropy(scores, labels)


def group_advantages(rewards: Tensor, eps: float = 1e-4) -> Tensor:
    """GRPO advantages: each reward minus its group's mean, over the group's std (+ eps).

    A group whose rollouts all scored the same teaches nothing: its advantages are 0 (not NaN).

    Args:
        rewards: (Q, G), the G rollouts of each of Q queries.

    >>> [[round(a, 3) for a in row] for row in group_advantages(torch.tensor([[1.0, 1.0], [0.0, 2.0]])).tolist()]
    [[0.0, 0.0], [-0.707, 0.707]]
    """
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, unbiased=True) if rewards.shape[1] > 1 else torch.zeros_like(mean)
    # equal rewards: exactly 0 (the mean of equal floats may be off by an ulp, which /eps would blow up)
    return torch.where(std > 1e-6, (rewards - mean) / (std + eps), torch.zeros_like(rewards))


def clipped_policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                        clip_eps: float = 0.2) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate on the sampled CoT tokens, averaged per rollout, then over rollouts
    (GRPO's aggregation). Returns (loss, share of tokens whose ratio was clipped).

    Args:
        logp: (R, T) log-probs of the sampled tokens under the policy being trained.
        old_logp: (R, T) the same under the policy that sampled them (no gradient).
        advantages: (R,) one advantage per rollout, shared by its tokens.
        mask: (R, T) 1 on the sampled CoT tokens (and the policy's own closing token), 0 on padding.
        clip_eps: the ratio is clipped to [1 - eps, 1 + eps] (PPO's and TRL's default 0.2).
    """
    ratio = torch.exp(logp - old_logp)  # (R, T)
    a = advantages[:, None]
    per_token = -torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)  # (R, T)
    mask = mask.to(logp.dtype)
    per_rollout = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)  # (R,)
    clipped = ((ratio - 1).abs() > clip_eps).to(logp.dtype)
    return per_rollout.mean(), (clipped * mask).sum() / mask.sum().clamp(min=1)


def kl_to_reference(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
    """Per-token KL(policy || reference), the unbiased non-negative "k3" estimator GRPO and TRL
    use: exp(ref - logp) - (ref - logp) - 1, averaged per rollout then over rollouts."""
    d = ref_logp - logp
    per_token = torch.exp(d) - d - 1
    mask = mask.to(logp.dtype)
    return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


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


def defaults(config: type, **given: float | None) -> dict[str, float]:
    """`given`, each None replaced by the training config's default of that name."""
    return {k: getattr(config, k) if v is None else v for k, v in given.items()}


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
        share_prefix: see `LREM.hidden_states`.
    The weights and temperature left None are `lrem.train.SFTConfig`'s defaults (their one owner).
    """

    def __init__(self, model, sft_weight: float | None = None, infonce_weight: float | None = None,
                 temperature: float | None = None, share_prefix: bool = True):
        from .train.sft_config import SFTConfig  # at call time: lrem.train imports this module

        super().__init__()
        self.model = model
        self.share_prefix = share_prefix  # run the batch's common prompt prefix once (same values, less work)
        self.sft_weight, self.infonce_weight, self.temperature = defaults(
            SFTConfig, sft_weight=sft_weight, infonce_weight=infonce_weight, temperature=temperature).values()

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
        q_ids = batch["q_ids"]  # (B, Tq) right-padded
        h = self.model.hidden_states(q_ids, batch["q_mask"], self.share_prefix)  # (B, Tq, H)
        q = F.normalize(emb_hidden(h, q_ids, emb_id).float(), dim=-1)  # (B, H)
        d_h = self.model.hidden_states(batch["d_ids"], batch["d_mask"], self.share_prefix)  # (B, Td, H)
        d = F.normalize(emb_hidden(d_h, batch["d_ids"], emb_id).float(), dim=-1)  # (B, H)
        out = {"infonce": infonce(q, d, self.temperature, batch.get("exclude"))}
        if self.sft_weight > 0:
            sft_pos, sft_tgt = batch["sft_pos"], batch["sft_tgt"]  # (B, L)
            rows = torch.arange(len(h), device=h.device)[:, None]  # (B, 1)
            logits = lm.get_output_embeddings()(h[rows, sft_pos])  # (B, L, V): the labelled span only
            out["sft"] = sft_loss(logits, sft_tgt)
        return out


class GRPOLoss(nn.Module):
    """L = grpo_weight * L_GRPO + infonce_weight * L_InfoNCE (+ kl_coef * KL) over a batch of
    rollouts from `lrem.train.grpo.collate_rollouts`.

    `forward` is the policy pass (one decoder pass over every rollout's query side, one over the
    items): the log-probs of the sampled CoT tokens and the `<emb>` embeddings. The trainer
    turns the embeddings into rank rewards and advantages, then calls `loss`. Splitting the two
    is why TRL's GRPOTrainer does not fit: LREM's reward needs the policy's own embeddings from
    this very pass, and the same pass feeds InfoNCE.

    Batch columns: `ids`, `mask` (R, T) right-padded rollouts (prompt + sampled CoT +
    `</think><emb>`); `lp_pos`, `lp_tgt` (R, L): positions whose next-token distribution gave
    the sampled token `lp_tgt` (-100 padded); `d_ids`, `d_mask` (N, Td) the batch items;
    `labels` (R,) each rollout's positive item; `exclude` (R, N) other positives.

    Args:
        model: an `lrem.model.LREM` (the policy).
        sampling_temperature: the rollouts' sampling temperature; log-probs are taken at the same
            temperature (as TRL does), so that the ratio compares like with like.
    The weights, temperatures, clip_eps and kl_coef left None are `lrem.train.RLConfig`'s defaults
    (their one owner).
    """

    def __init__(self, model, grpo_weight: float | None = None, infonce_weight: float | None = None,
                 temperature: float | None = None, clip_eps: float | None = None, kl_coef: float | None = None,
                 sampling_temperature: float | None = None):
        from .train.grpo_config import RLConfig  # at call time: lrem.train imports this module

        super().__init__()
        self.model = model
        given = defaults(RLConfig, grpo_weight=grpo_weight, infonce_weight=infonce_weight, kl_coef=kl_coef,
                         temperature=temperature, clip_eps=clip_eps, sampling_temperature=sampling_temperature)
        self.grpo_weight, self.infonce_weight, self.kl_coef = given["grpo_weight"], given["infonce_weight"], given["kl_coef"]
        self.temperature, self.clip_eps = given["temperature"], given["clip_eps"]
        self.sampling_temperature = given["sampling_temperature"]

    @property
    def weights(self) -> dict[str, float]:
        w = {"grpo": self.grpo_weight, "infonce": self.infonce_weight}
        if self.kl_coef > 0:
            w["kl"] = self.kl_coef
        return w

    def forward(self, batch: dict[str, Tensor], items: bool = True) -> dict[str, Tensor]:
        """{"logp": (R, L) sampled-token log-probs (0 on padding), "q": (R, D), "d": (N, D)};
        `items=False` skips the item pass ("d" absent), e.g. for the KL reference's log-probs."""
        model = self.model
        h = model.hidden_states(batch["ids"], batch["mask"])  # (R, T, H)
        q = F.normalize(emb_hidden(h, batch["ids"], model.emb_id).float(), dim=-1)  # (R, D)
        rows = torch.arange(len(h), device=h.device)[:, None]  # (R, 1)
        logits = model.lm.get_output_embeddings()(h[rows, batch["lp_pos"]]).float()  # (R, L, V)
        logp = token_logprobs(logits / self.sampling_temperature, batch["lp_tgt"])  # (R, L)
        if not items:
            return {"logp": logp, "q": q}
        d_h = model.hidden_states(batch["d_ids"], batch["d_mask"])  # (N, Td, H)
        d = F.normalize(emb_hidden(d_h, batch["d_ids"], model.emb_id).float(), dim=-1)  # (N, D)
        return {"logp": logp, "q": q, "d": d}

    def loss(self, out: dict[str, Tensor], batch: dict[str, Tensor], advantages: Tensor, old_logp: Tensor,
             ref_logp: Tensor | None = None) -> tuple[dict[str, Tensor], dict[str, float]]:
        """(weighted-sum components, diagnostics) for one policy pass `out`."""
        mask = batch["lp_tgt"] != IGNORE  # (R, L)
        grpo, clip_frac = clipped_policy_loss(out["logp"], old_logp, advantages, mask, self.clip_eps)
        parts = {"grpo": grpo, "infonce": infonce(out["q"], out["d"], self.temperature, batch["exclude"],
                                                   batch["labels"])}
        info = {"clip_frac": clip_frac.item()}
        if ref_logp is not None:
            kl = kl_to_reference(out["logp"], ref_logp, mask)
            info["kl"] = kl.item()
            if self.kl_coef > 0:
                parts["kl"] = kl
        return parts, info


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log softmax(logits)[target] per position, 0 where target is -100.  (R, L, V), (R, L) -> (R, L).

    TRL's `selective_log_softmax` (memory-light: no (R, L, V) log-softmax kept) does the gather.
    """
    from trl.trainer.utils import selective_log_softmax

    return selective_log_softmax(logits, targets.clamp(min=0)) * (targets != IGNORE)
