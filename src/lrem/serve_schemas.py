"""The JSON bodies of `lrem serve`: requests, responses and errors (pydantic models, so FastAPI
checks requests and the OpenAPI schema at /openapi.json describes them)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .fusion import LEXICAL_WEIGHT

# /v1/embeddings `model` -> what is embedded; the grounded ones search the served index first (their
# embedding depends on that index's top titles)
EMBEDDING_MODELS = {"lrem-query-reason": "reason", "lrem-query-direct": "direct", "lrem-query-auto": "auto",
                    "lrem-query-grounded": "grounded", "lrem-query-grounded-direct": "grounded-direct",
                    "lrem-item": "item"}


QUERY_MODES = ("auto", "reason", "direct", "grounded", "grounded-direct")  # what /search and rerank accept


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    query: str = Field(description="Search query, at most max_query_chars; normalised before use.",
                       examples=["a drink stronger than tea"])
    k: int = Field(10, ge=1, description="Items to return (offset + k at most max_k).")
    offset: int = Field(0, ge=0, description="Items to skip first, for paging: offset 0, then k, then 2k, ... "
                                             "(the same ranking: page n is items n*k to (n+1)*k of one top list).")
    mode: Literal[QUERY_MODES] = Field(
        "auto", description="reason: generate a CoT, then embed; direct: no CoT; auto: the router decides; grounded: "
                            "a direct search first, then reason with its top titles in the prompt and search again; "
                            "grounded-direct: the same without the CoT.")
    filter: dict[str, str | list[str]] | None = Field(
        None, description="Only items whose fields match: {field: value or [values]}, fields among category, brand "
                          "and color that the index's catalog had (GET /info: filter_fields); every field must match.",
        examples=[{"category": "kitchen", "brand": ["Acme", "Zed"]}])
    hybrid: bool = Field(False, description="Fuse the mode's ranking with BM25 over the titles by reciprocal rank "
                                            "fusion (a server started with hybrid: true); scores are then RRF scores.")
    lexical_weight: float = Field(LEXICAL_WEIGHT, ge=0.0, allow_inf_nan=False, description="With hybrid: the weight of BM25's ranks (the dense "
                                                           "ranks weigh 1).")
    min_score: float | None = Field(None, allow_inf_nan=False, description="Drop items scoring below this (cosine; "
                                    "hybrid: RRF score), so fewer than k may come back; none: keep all k.")


class SearchItem(BaseModel):
    item_id: str
    title: str
    score: float = Field(description="Cosine similarity of query and item embeddings (hybrid: the RRF score).")


class SearchResponse(BaseModel):
    query: str = Field(description="The normalised query that was embedded.")
    cot: str = Field(description="The reasoning the query was embedded after ('' when none).")
    mode_used: Literal["reason", "direct", "grounded", "grounded-direct"]
    cached: bool = Field(description="True when every embedding came from the cache.")
    items: list[SearchItem]
    timings_ms: dict[str, float] = Field(description="direct, reason or grounded (embedding, incl. queueing), index "
                                                     "(the searches), lexical (hybrid's BM25), total.")


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(strict=True)
    input: str | list[str] = Field(description="A text or a list of at most max_inputs texts.")
    model: str = Field(description=f"One of {', '.join(EMBEDDING_MODELS)}.", examples=["lrem-query-reason"])
    encoding_format: Literal["float", "base64"] | None = Field("float", description="base64: little-endian float32; "
                                                               "null (a client's unset field): float.")
    dimensions: int | None = Field(None, description="1 to the model's dimension (GET /info: dim). Below it, the "
                                   "first `dimensions` values, renormalised to unit length (Matryoshka-style; "
                                   "retrieval quality below the full size is untested).")
    truncate: bool = Field(False, description="An input over the model's token limit (max_query_tokens or "
                           "max_item_tokens): false, a 422 naming the limit; true, cut to it (counted in /metrics).")
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _no_token_ids(cls, value):
        # LangChain's OpenAIEmbeddings sends tiktoken ids by default; they are OpenAI's tokens, not
        # this model's, so they are refused with the fix rather than decoded into other words
        if isinstance(value, list) and value and all(
                isinstance(v, int) or (isinstance(v, list) and v and all(isinstance(t, int) for t in v)) for v in value):
            raise ValueError("token ids are not accepted, send the texts (LangChain: OpenAIEmbeddings(..., "
                             "check_embedding_ctx_length=False))")
        return value


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str
    cot: str = Field("", description="lrem extension: the reasoning a query was embedded after.")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class RerankRequest(BaseModel):
    """TEI's /rerank body, plus lrem's `item_ids` (candidates from the served index) and `mode`."""
    model_config = ConfigDict(extra="forbid", strict=True)
    query: str = Field(description="The query, at most max_query_chars; normalised before use.",
                       examples=["a drink stronger than tea"])
    texts: list[str] | None = Field(None, description="Candidates to score, embedded as items (at most max_inputs); "
                                    "or item_ids.", examples=[["green tea", "whisky", "teapot"]])
    item_ids: list[str] | None = Field(None, description="lrem: candidates from the served index, by id (their "
                                       "stored vectors: no embedding); instead of texts.")
    mode: Literal[QUERY_MODES] = Field("auto", description="lrem: how the query is embedded, as in /search.")
    raw_scores: bool = Field(False, description="TEI's; accepted. Scores are cosine similarities either way.")
    return_text: bool = Field(False, description="Return each candidate's text (for item_ids: its title).")
    truncate: bool | None = Field(False, description="A text over max_item_tokens: false (or null), a 422; true, "
                                  "cut to it. The query is cut to max_query_tokens, as in /search.")
    truncation_direction: Literal["Right", "right", "Left", "left"] = Field(
        "Right", description="TEI's; lrem cuts at the end (Right) only: Left is a 422.")


class RerankHit(BaseModel):
    index: int = Field(description="The candidate's position in the request.")
    score: float = Field(description="Cosine similarity of the query and candidate embeddings, in [-1, 1] (raw: "
                                     "no sigmoid, whatever raw_scores says).")
    text: str | None = None


class CohereRerankRequest(BaseModel):
    """The rerank body of Cohere, Jina and vLLM's /v1/rerank (fields those clients add are ignored)."""
    model_config = ConfigDict(strict=True)
    query: str
    documents: list[str | dict[str, Any]] = Field(description="Texts, or objects with a string `text` (other keys "
                                                  "ignored); at most max_inputs.")
    model: str | None = Field(None, description="A query model of /v1/embeddings (lrem-query-auto, -reason, -direct, "
                              "-grounded, -grounded-direct): how the query is embedded; default lrem-query-auto.")
    top_n: int | None = Field(None, ge=0, description="Return the best top_n (0 or none: all).")
    return_documents: bool = Field(True, description="Return each document with its score.")
    truncate: bool = Field(False, description="lrem: a document over max_item_tokens: false, a 422; true, cut to it.")


class CohereRerankResult(BaseModel):
    index: int
    relevance_score: float
    document: dict[str, str] | None = None


class CohereRerankResponse(BaseModel):
    id: str
    model: str
    results: list[CohereRerankResult]
    usage: dict[str, int]
    cot: str = Field("", description="lrem: the reasoning the query was embedded after.")
    mode_used: str = Field(description="lrem: reason, direct, grounded or grounded-direct.")


def error_body(status: int, message: str, **extra) -> dict:
    """Every error's JSON: FastAPI's `detail` plus OpenAI's `error` object (its clients read that)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    code = "invalid_api_key" if status == 401 else status
    return {"detail": message, "error": {"message": message, "type": kind, "param": None, "code": code}, **extra}
