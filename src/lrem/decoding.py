"""Decoding pieces of the fast reasoning path: one decode step over a preallocated KV cache
(graph-captured on CUDA) and nucleus sampling for RL rollouts. `lrem.model.LREM` drives them."""
from __future__ import annotations

import threading
import warnings

import torch


def sample_top_p(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from softmax(logits / temperature), cut to the smallest set of tokens
    whose probability reaches `top_p` (nucleus sampling).  logits (B, V) -> ids (B,)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # tokens after the nucleus is full
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class GreedyStep:
    """One greedy decode step, (B,) ids -> (B,) next ids, over a preallocated `StaticCache`.

    Its inputs live in fixed buffers (ids, positions, the 2-D mask over all cache slots), so on
    CUDA the step is captured once in a CUDA graph and replayed: a 3B model's decode step is
    hundreds of small kernels, and launching them one by one costs more than running them.
    """

    def __init__(self, lm, batch: int, length: int, graph: bool):
        from transformers import StaticCache

        cfg = lm.config.get_text_config()
        p = next(lm.parameters())
        self.lm = lm
        self.cache = StaticCache(config=cfg, max_cache_len=length)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.cache.early_initialization(batch, cfg.num_key_value_heads, head_dim, p.dtype, p.device)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=p.device)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=p.device)
        self.mask = torch.zeros(batch, length, dtype=torch.long, device=p.device)  # 1 = a slot to attend to
        self.graph = None
        self.lock = threading.Lock()
        if graph:
            self._capture()

    def _logits(self) -> torch.Tensor:
        h = self.lm.get_decoder()(input_ids=self.ids, attention_mask=self.mask, position_ids=self.pos,
                                  past_key_values=self.cache, use_cache=True).last_hidden_state[:, -1]
        return self.lm.get_output_embeddings()(h)  # (B, V)

    def _forward(self) -> torch.Tensor:
        return self._logits().argmax(-1)  # (B,)

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (allocations, kernel choice) off the capture
            for _ in range(3):
                self._forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.out = self._forward()
            self.graph = graph
        except RuntimeError as e:  # an op that cannot be captured: decode eagerly, still correct
            warnings.warn(f"CUDA graph capture failed, decoding without it: {e}")
            torch.cuda.synchronize()
        self.reset()

    def reset(self) -> None:
        """Empty the cache (slots are overwritten, and masked until written)."""
        for layer in self.cache.layers:
            layer.cumulative_length.zero_()

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, slot: int, pick=None) -> torch.Tensor:
        """Feed ids (B,) at positions pos (B,) into cache slot `slot`; return the next ids (B,):
        argmax, or `pick(logits)` (eager: sampling is not graph-captured)."""
        self.ids.copy_(ids[:, None])
        self.pos.copy_(pos[:, None])
        self.mask[:, slot] = 1
        if pick is not None:
            return pick(self._logits())
        if self.graph is None:
            return self._forward()
        self.graph.replay()
        return self.out.clone()
