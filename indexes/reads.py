"""Reading the embeddings parts for an index build so that the machine is used: several row groups
at once (pyarrow decodes in native threads, without the GIL), in order, a bounded number ahead;
and a training sample that reads only the row groups it draws from, not every vector.
"""
from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from imgindex.formats.embeddings_dir import EmbeddingsDir, Part, normalize_rows

SAMPLE_SPREAD = 8  # a sample draws from row groups holding this many times its size (or every row)


def _threads() -> int:
    try:
        return max(1, min(8, len(os.sched_getaffinity(0))))
    except AttributeError:
        return max(1, min(8, os.cpu_count() or 1))


def row_groups(emb: EmbeddingsDir, parts: list[Part], threads: int | None = None) -> list[tuple[Part, int, int]]:
    """(part, row group, rows) of every row group of the parts, in order (footers read in parallel)."""
    def groups(part: Part) -> list[tuple[Part, int, int]]:
        meta = pq.ParquetFile(part.path, filesystem=emb.fs).metadata
        return [(part, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]

    with ThreadPoolExecutor(threads or _threads()) as pool:
        return [g for found in pool.map(groups, parts) for g in found]


def _read(emb: EmbeddingsDir, part: Part, group: int, columns: list[str]) -> pa.Table:
    return pq.ParquetFile(part.path, filesystem=emb.fs, pre_buffer=False).read_row_group(group, columns=columns)


def _vectors(emb: EmbeddingsDir, table: pa.Table, normalize: bool = True) -> np.ndarray:
    array = table.column("embedding").combine_chunks()
    vectors = array.flatten().to_numpy(zero_copy_only=False).reshape(-1, emb.dim).astype(np.float32, copy=False)
    return normalize_rows(vectors) if normalize and not emb.normalized else vectors


def iter_batches(emb: EmbeddingsDir, parts: list[Part], ahead: int = 2) -> Iterator[tuple[Part, pa.Table, np.ndarray]]:
    """(part, shard+key table, float32 vectors), one row group at a time and in order, with up to
    `ahead` row groups read in the background while the caller works on the current one."""
    if ahead < 1:
        yield from emb.iter_batches(parts)
        return
    todo = deque((part, g) for part in parts for g in range(pq.ParquetFile(part.path, filesystem=emb.fs)
                                                              .metadata.num_row_groups))
    columns = ["shard", "key", "embedding"]
    with ThreadPoolExecutor(ahead) as pool:
        pending = deque()
        while todo or pending:
            while todo and len(pending) < ahead:
                part, group = todo.popleft()
                pending.append((part, pool.submit(_read, emb, part, group, columns)))
            part, future = pending.popleft()
            table = future.result()
            yield part, table.select(["shard", "key"]), _vectors(emb, table)


def sample(emb: EmbeddingsDir, parts: list[Part], count: int, seed: int = 0,
           threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`count` rows drawn without replacement: (global row ids, sorted; vectors). The rows come from
    a seeded random set of row groups holding SAMPLE_SPREAD x `count` rows (every row group when
    the corpus is smaller), read in parallel: at 1B vectors a 1M sample reads ~1% of the parts."""
    groups = row_groups(emb, parts, threads)
    sizes = np.array([rows for _, _, rows in groups], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if len(sizes) else np.zeros(0, np.int64)
    total = int(sizes.sum())
    count = min(count, total)
    rng = np.random.default_rng(seed)
    if total <= SAMPLE_SPREAD * count:
        chosen_groups = np.arange(len(groups))
    else:
        order = rng.permutation(len(groups))
        enough = int(np.searchsorted(np.cumsum(sizes[order]), SAMPLE_SPREAD * count)) + 1
        chosen_groups = np.sort(order[:enough])
    pool_rows = np.concatenate([np.arange(starts[g], starts[g] + sizes[g]) for g in chosen_groups]) \
        if len(chosen_groups) else np.zeros(0, np.int64)
    chosen = np.sort(rng.choice(pool_rows, size=count, replace=False)) if count else np.zeros(0, np.int64)
    ends = starts[chosen_groups] + sizes[chosen_groups]
    wanted = chosen_groups[np.searchsorted(chosen, ends) > np.searchsorted(chosen, starts[chosen_groups])]

    def take(g: int) -> np.ndarray:
        part, group, rows = groups[g]
        lo, hi = np.searchsorted(chosen, [starts[g], starts[g] + rows])
        vectors = _vectors(emb, _read(emb, part, group, ["embedding"]))
        return vectors[chosen[lo:hi] - starts[g]]

    with ThreadPoolExecutor(threads or _threads()) as pool:
        taken = list(pool.map(take, wanted))
    vectors = np.concatenate(taken) if taken else np.zeros((0, emb.dim), np.float32)
    return chosen, np.ascontiguousarray(vectors)
