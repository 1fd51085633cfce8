"""Synthetic embeddings, a helper of the benchmarks and tests (not part of the package):
clustered unit vectors written as a real embeddings directory (same manifest, parts and stats
as `imgindex embed` writes).

Random-weight backbones give nearly collinear embeddings, so search quality is measured
on these instead, where the true neighbours are known.
"""
from __future__ import annotations

import numpy as np

from imgindex.formats.embeddings_dir import EmbeddingStore, normalize_rows
from imgindex.formats.records import ROW_FIELDS, EmbeddingsManifest, ModelInfo, ShardStats


def clustered_vectors(count: int, dim: int, clusters: int = 1000, spread: float = 0.35,
                      seed: int = 0) -> np.ndarray:
    """Unit vectors around `clusters` random centres; `spread` sets how tight a cluster is."""
    rng = np.random.default_rng(seed)
    centres = normalize_rows(rng.standard_normal((clusters, dim)).astype(np.float32))
    out = np.empty((count, dim), np.float32)
    step = 100_000
    for start in range(0, count, step):
        n = min(step, count - start)
        noise = rng.standard_normal((n, dim)).astype(np.float32) * (spread / np.sqrt(dim))
        out[start:start + n] = centres[rng.integers(0, clusters, n)] + noise
    return normalize_rows(out)


def synthetic_manifest(dim: int) -> EmbeddingsManifest:
    return EmbeddingsManifest(model=ModelInfo(name="synthetic"), weights={"source": "synthetic", "sha256": None},
                              dim=dim, normalized=True, precision="fp32", decode={})


def write_embeddings_dir(out: str, vectors: np.ndarray, shard_size: int = 50_000,
                         prefix: str = "syn", first_shard: int = 0, columns: dict[str, list] | None = None) -> list[str]:
    """Write vectors as parts of `shard_size` rows; keys are f"{prefix}{row}"; `columns`: values of
    other columns for every row (e.g. sha256, phash; default null). Returns shard names."""
    store = EmbeddingStore(out)
    store.check_writable()
    store.prepare(synthetic_manifest(vectors.shape[1]), overwrite=False)
    names = []
    for number, start in enumerate(range(0, len(vectors), shard_size), start=first_shard):
        block = vectors[start:start + shard_size]
        name = f"{prefix}-{number:05d}"
        n = len(block)
        rows = {name: [None] * n for name in ROW_FIELDS}
        rows.update(key=[f"{prefix}{start + i}" for i in range(n)], width=[0] * n, height=[0] * n, bytes=[0] * n)
        rows.update({name: list(values[start:start + shard_size]) for name, values in (columns or {}).items()})
        store.write_shard(name, rows, block, [], ShardStats(shard=name, kind="synthetic", source="synthetic",
                                                            samples=n, rows=n, failures=0))
        names.append(name)
    return names
