"""Sample texts for embedding models: ~16 tokens each with [CLS]/[SEP], all different, so
that nothing can be cached. Shared by the benchmarks, the load tests and the tests that load
inference."""

from __future__ import annotations

import numpy as np

__all__ = [
    "WORDS",
    "texts",
]

WORDS = (
    "fraud",
    "scores",
    "embeddings",
    "gateway",
    "tenants",
    "quotas",
    "batches",
    "tokens",
    "latency",
    "throughput",
    "service",
    "replicas",
    "models",
    "versions",
    "canary",
    "traffic",
    "requests",
    "budgets",
    "deadlines",
    "queues",
)


def texts(count: int, words: int = 12, seed: int = 1) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=words)) for _ in range(count)]
