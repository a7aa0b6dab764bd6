"""Defaults the library and the CLI share, each named once. No imports: the CLI reads them while
building `lrem --help`, which must not load numpy or torch."""

QUERY_BATCH = 32  # queries per model call (search, eval, serve's cache warming, router fit, grounding)
ITEM_BATCH = 64  # items (or item-side texts) per model call: index builds and updates, embed, uploads
ROLLOUT_BATCH = 64  # sampled CoTs (queries x samples) per model call: RL rollouts
FACTORY = "Flat"  # FAISS `index_factory` string of a new index: exact search
UPLOAD_BATCH = 1000  # items per vector-database request
CHUNK_SIZE = 4096  # items per chunk file of `lrem embed` (the most vectors a process holds)
VECTOR_DTYPE = "float32"  # chunk vectors on disk (float16: half the disk)
ROUTER_K = 10  # a learned router's label depth: reasoning wins where it ranks the first relevant item higher in the top k
ROUTER_HOLDOUT = 0.25  # share of a router's queries held out to measure it
ROUTER_L2 = 1.0  # L2 penalty of the router's logistic regression (scikit-learn's 1/C)
ROUTER_THRESHOLD = 0.5  # reason where P(reasoning wins) exceeds it (`LearnedRouter.threshold`)
