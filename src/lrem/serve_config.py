"""Settings of `lrem serve` (`ServeConfig`): a YAML file of these keys (`--config`), then flags.

    ServeConfig.from_yaml("serve.yaml", sets=["max_batch=64"], port=9000)
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ._config import check_finite
from ._io import clashes
from .router import LearnedRouter, Router

ROUTER_KINDS = ("model", "margin")


@dataclass
class ServeConfig:
    """Settings of `lrem serve`; a YAML file of these keys (`--config`) and flags override them."""

    host: str = field(default="127.0.0.1", metadata={"help": "Interface to listen on (0.0.0.0: all)."})
    port: int = field(default=8000, metadata={"help": "TCP port."})
    # Batching
    # 32: at 32 clients, reasoning served 21.1-21.6 queries/s against 16.2-18.7 at 16 (direct 37-40 vs 33-43);
    # fewer forwards per query, where a forward's base cost is ~45 row-tokens on a 2-core CPU
    max_batch: int = field(default=32, metadata={"help": "Most texts run through the model in one call."})
    max_wait_ms: float = field(default=5.0, metadata={
        "help": "How long a batch's first text waits for others (only after a batch of several: under load)."})
    max_queue: int = field(default=1024, metadata={"help": "Pending texts beyond this are refused (503)."})
    # Cache
    cache_size: int = field(default=10_000, metadata={"help": "LRU entries (kind, text) -> (CoT, embedding); 0: off."})
    cache_path: str = field(default="", metadata={"help": ".npz loaded at start, written at shutdown; '': none."})
    # Router (mode=auto)
    router_kind: str = field(default="model", metadata={
        "help": "model: the model folder's learned router (router.json, `lrem router fit`) when it has one, else "
                "the margin router; margin: the margin router (router_margin, router_long_words) always."})
    router_margin: float = field(default=Router.margin, metadata={
        "help": f"Reason when top-1 minus top-{Router.depth} direct score < this."})
    router_share: float = field(default=Router.share, metadata={
        "help": "0: fixed router_margin (or the learned router's threshold). Else a budget: reason on about this "
                "share (0..1) of auto queries, the most ambiguous by margin or the likeliest to gain by the learned "
                "router, tracking that quantile of recent queries (score scales differ between models)."})
    router_long_words: int = field(default=Router.long_query_words, metadata={
        "help": "Also reason for queries of >= this many words; 0: off."})
    # Hybrid search
    hybrid: bool = field(default=False, metadata={
        "help": "Build BM25 over the index's titles at start, so /search requests may ask for hybrid: true "
                "(the dense ranking fused with BM25's by reciprocal rank fusion)."})
    # Query log
    query_log: str = field(default="", metadata={
        "help": "JSONL file each answered /search is appended to (time, query, mode, CoT, item ids and scores, "
                "latency; `lrem search --from-file` replays it); '': off. Queries are logged verbatim."})
    query_log_max_mb: float = field(default=100.0, metadata={"help": "Rotate the query log at this size (MB)."})
    query_log_backups: int = field(default=5, metadata={"help": "Rotated query logs kept (PATH.1 ... PATH.N)."})
    # Limits: breaking one is a 4xx with a message naming the limit
    max_query_chars: int = field(default=512, metadata={"help": "Longest query or input text, in characters."})
    max_item_chars: int = field(default=16_384, metadata={"help": "Longest item text (lrem-item input, rerank "
                                                                "candidate), in characters; the model's token "
                                                                "limit (max_item_tokens) then cuts or refuses it."})
    max_k: int = field(default=100, metadata={"help": "Most items one search returns."})
    max_inputs: int = field(default=64, metadata={"help": "Most texts in one /v1/embeddings call, and candidates in one rerank."})
    max_body_bytes: int = field(default=256 * 1024, metadata={"help": "Largest request body (413 above)."})
    request_timeout_s: float = field(default=30.0, metadata={"help": "Time one request may take (503 after)."})
    # Slow or idle clients: each holds a connection, so bound how long they may take
    header_timeout_s: float = field(default=10.0, metadata={
        "help": "Time a connection may take to send a request's headers (closed after)."})
    body_timeout_s: float = field(default=10.0, metadata={"help": "Time a client may take to send a body (408 after)."})
    max_requests: int = field(default=256, metadata={
        "help": "Requests in progress (counted once their body has arrived) beyond this get a 503 in the error "
                "shape, with Retry-After (/health(z) and /metrics exempt)."})
    max_connections: int = field(default=1024, metadata={
        "help": "Open connections beyond this get uvicorn's own plain-text 503, health checks included (a backstop "
                "above max_requests: a proxy in front should cap connections)."})
    keep_alive_s: int = field(default=5, metadata={"help": "Idle keep-alive connections are closed after this."})
    # Index
    mmap_index: bool = field(default=False, metadata={
        "help": "Memory-map the index file (shared page cache across server processes and a faster start) instead "
                "of reading it into memory. A mapped file overwritten in place (cp, rsync --inplace) crashes the "
                "process, so replace it by rename, as lrem index does."})
    # Access
    api_key: str = field(default="", metadata={
        "help": "Require `Authorization: Bearer KEY` on every endpoint but /health(z); '': the environment "
                "variable LREM_API_KEY, if set, else no key."})

    def __post_init__(self):
        check_finite(self)  # first: NaN passes every range check below (its comparisons are all False)
        for f in fields(self):
            v, want = getattr(self, f.name), type(f.default)
            number = isinstance(v, (int, float)) and not isinstance(v, bool) and (want is float or isinstance(v, int))
            if not (isinstance(v, want) if want in (str, bool) else number):
                raise ValueError(f"{f.name}={v!r}; expected {want.__name__}")
            if want not in (str, bool) and v < 0:
                raise ValueError(f"{f.name}={v}; must be >= 0")
        for name in ("max_batch", "max_query_chars", "max_item_chars", "max_k", "max_inputs", "max_body_bytes",
                     "max_queue", "max_requests", "max_connections", "keep_alive_s",
                     "query_log_backups"):  # 0: Python's rotating handler never rotates, and the log grows unbounded
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; must be >= 1")
        for name in ("request_timeout_s", "header_timeout_s", "body_timeout_s", "query_log_max_mb"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)}; must be > 0")
        if self.port > 65535:
            raise ValueError(f"port={self.port}; must be <= 65535")
        if self.router_kind not in ROUTER_KINDS:
            raise ValueError(f"router_kind={self.router_kind!r}; expected one of {', '.join(ROUTER_KINDS)}")
        self.router()  # checks the router settings

    def check_paths(self, index_dir: str | Path | None = None) -> None:
        """Refuse, before the model loads, files the server would write over something else's:
        `cache_path` or `query_log` inside the served index folder (`index_dir`), either one a
        folder (someone's, not a cache to move aside), or the two the same file. An unreadable
        cache FILE is not refused: a cache is disposable, and it is moved aside at start."""
        named = {"cache_path": self.cache_path, "query_log": self.query_log}
        index = index_dir if index_dir is not None and Path(index_dir).is_dir() else None
        for name, value in named.items():
            if not value:
                continue
            path = Path(value).resolve()
            if any(relation in ("is", "lies inside") for _, relation in clashes(path, [index])):
                raise ValueError(f"{name}={value}: inside the served index folder {index_dir}; writing it would "
                                 "corrupt the index (choose a path outside it)")
            if path.is_dir():
                raise ValueError(f"{name}={value}: is a folder; {name} takes a file path")
        if self.cache_path and self.query_log and Path(self.cache_path).resolve() == Path(self.query_log).resolve():
            raise ValueError(f"cache_path and query_log are the same file ({self.query_log}); give each its own")

    @classmethod
    def from_yaml(cls, path: str | Path | None = None, sets: list[str] = (), **overrides) -> "ServeConfig":
        """Defaults, then the YAML file's keys, then `sets` ("key=value", value read as YAML), then
        `overrides` (None values are skipped).

        >>> ServeConfig.from_yaml(sets=["max_batch=4", "cache_path=/tmp/c.npz"], port=9000).max_batch
        4
        """
        import yaml

        from lrem._config import load_config

        values = {}
        for item in sets:
            key, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"--set {item!r}: expected KEY=VALUE")
            try:
                values[key.strip()] = yaml.safe_load(value) if value.strip() else ""
            except yaml.YAMLError as e:  # also a `!!python/...` tag, which safe_load refuses
                raise ValueError(f"--set {item!r}: not a YAML value ({getattr(e, 'problem', None) or e})") from None
        sources = {k: f"--set {k}=..." for k in values}
        values.update({k: v for k, v in overrides.items() if v is not None})
        sources.update({k: f"--{k}" for k, v in overrides.items() if v is not None})
        return load_config(cls, path, values, sources)

    def router(self, learned: LearnedRouter | None = None) -> Router | LearnedRouter:
        """The router of mode=auto: `learned` (the model's, if any) held to `router_share` when
        router_kind is "model", else the margin router of these settings."""
        if learned is not None and self.router_kind == "model":
            return learned.with_share(self.router_share)
        return Router(margin=self.router_margin, share=self.router_share, long_query_words=self.router_long_words)

    def key(self) -> str:
        """The API key in force: `api_key`, else $LREM_API_KEY, else '' (none). Whitespace around it
        is dropped: a key read from a file (a Kubernetes secret, `--env-file`) often ends in a
        newline, which no client can send in its header, so every request would be refused. A key
        of whitespace only is a ValueError, not "no key": that would open the server.

        >>> ServeConfig(api_key="k3y\\n").key()
        'k3y'
        """
        named, raw = ("api_key", self.api_key) if self.api_key else ("LREM_API_KEY", os.environ.get("LREM_API_KEY", ""))
        if raw and not raw.strip():
            raise ValueError(f"{named} is blank (whitespace only); set a key, or unset it to serve without one")
        return raw.strip()

    def public(self) -> dict:
        """The settings, with the API key hidden (for /info and logs)."""
        return {**asdict(self), "api_key": "(set)" if self.key() else ""}
