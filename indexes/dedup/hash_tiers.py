"""The exact and phash tiers at scale: partition the hashes once, then independent tasks, on
any executor, with the pairs of the one-process tiers.

exact: each row's sha256 (as its 32 bytes) goes to the bucket of its first bytes; all copies of
a file share a bucket, so each bucket's task pairs them as the one-process tier does (each row
with the first MAX_EXACT_PARTNERS others of its bytes, in row order).

phash: two 64-bit hashes within d bits agree exactly on at least one of d + 1 disjoint slices
of their bits (pigeonhole: d differing bits touch at most d slices). Each row goes, once per
slice, to the bucket of (slice, the row's bits there); a pair within d bits therefore shares at
least one bucket, and each bucket's task finds every pair within d bits among its rows exactly
(tiers.phash_pairs: hash tables or a scan, whichever is faster). The union over buckets is the
one-process answer. Each row is written d + 1 times (16 bytes each).

Both run as one partition task per part of the index (its sha256 and phash columns only) and
one task per group of buckets, in the work folder's `hashes` stage. A leakage check (`--against`)
partitions the other corpus's parts the same way, its records marked as queries: each bucket's
task then pairs only queries with the index's rows, as the one-process check does (each query
with the first MAX_EXACT_PARTNERS index rows of its bytes; every index row within d bits), so
neither corpus's hashes are ever held in one process.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from imgindex.errors import ConfigError
from imgindex.indexes.dedup.corpus import hashes
from imgindex.indexes.dedup.partitions import (MIN_TASKS, TASK_BYTES, IndexPart, PartitionTask, Scale, StageWorker,
                                               index_parts, run_tasks)
from imgindex.indexes.dedup.tiers import exact_pairs, phash_pairs
from imgindex.indexes.dedup.workdir import read_group, run_done, save_arrays, write_run

SHA = np.dtype([("row", "<i8"), ("query", "u1"), ("sha", "u1", (32,))])
PHASH = np.dtype([("row", "<i8"), ("query", "u1"), ("phash", "<i8")])
LAYOUT = 2  # the records' layout (in the stage's identity: a work folder of another layout is cleared)
HEX = np.full(256, 255, np.uint8)
HEX[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16)
HEX[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)


def sha_bytes(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Hex sha256 text -> (N x 32 bytes, valid); a value that is not 64 hex digits is an error."""
    valid = np.asarray(pc.is_valid(column).to_numpy(zero_copy_only=False), dtype=bool)
    text = np.asarray(pc.fill_null(column, "0" * 64).to_numpy(zero_copy_only=False), dtype="S64")
    digits = HEX[text.view(np.uint8).reshape(-1, 64)] if len(text) else np.zeros((0, 64), np.uint8)
    if (np.char.str_len(text) != 64).any() or (digits == 255).any():
        raise ConfigError("a sha256 in the embeddings is not 64 hex digits: re-embed the damaged part")
    return (digits[:, 0::2] << 4 | digits[:, 1::2]).astype(np.uint8), valid


def slices(distance: int) -> list[tuple[int, int]]:
    """(shift, bits) of the d + 1 disjoint slices of 64 bits, as equal as can be."""
    count = distance + 1
    widths = [64 // count + (i < 64 % count) for i in range(count)]
    return [(sum(widths[:i]), w) for i, w in enumerate(widths)]


def bucket_of(keys: np.ndarray, buckets: int) -> np.ndarray:
    """A well-mixed bucket of 64-bit keys (splitmix64's finalizer)."""
    x = keys.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x % np.uint64(buckets)).astype(np.int64)


@dataclass(frozen=True)
class HashJoinTask:
    name: str
    kind: str  # exact | phash
    group: int


@dataclass(frozen=True)
class HashWorkers:
    """The picklable factory of the hash tiers' workers (the stage folder must reach them all)."""

    stage: str
    parts: int  # runs: the index's parts, then (a leakage check) the other corpus's
    exact_groups: int  # 0: the tier is off
    phash_groups: int
    distance: int
    against: bool = False  # a leakage check: pairs join the other corpus's rows (queries) to the index's

    def __call__(self, slot: int, name: str) -> "HashWorker":
        return HashWorker(self, name)


class HashWorker(StageWorker):
    def __init__(self, spec: HashWorkers, name: str):
        super().__init__(name)
        self.spec, self.stage = spec, Path(spec.stage)

    def partition(self, part: IndexPart) -> dict:
        emb = self.embeddings(part.embeddings)
        meta = emb.read_columns(part.shard, ["sha256", "phash"])
        if meta.num_rows != part.rows and part.against:
            raise ConfigError(f"the part of shard {part.shard} in {part.embeddings} holds {meta.num_rows} rows, "
                              f"its directory said {part.rows}: it changed during the check; run it again")
        if meta.num_rows != part.rows:
            raise ConfigError(f"the part of shard {part.shard} holds {meta.num_rows} rows, the index recorded "
                              f"{part.rows}: the embeddings changed since the index was built; rebuild the index")
        rows = np.arange(part.start, part.start + part.rows, dtype=np.int64)
        written = 0
        if self.spec.exact_groups:
            sha, valid = sha_bytes(meta["sha256"])
            records = np.empty(int(valid.sum()), SHA)
            records["row"], records["query"], records["sha"] = rows[valid], part.against, sha[valid]
            group = (records["sha"][:, 0].astype(np.int64) << 8 | records["sha"][:, 1]) % self.spec.exact_groups
            written += self._write("exact", part.number, records, group, self.spec.exact_groups)
        if self.spec.phash_groups:
            values, valid = hashes(meta["phash"])
            unsigned = values[valid].view(np.uint64)
            taken, groups = [], []
            for number, (shift, bits) in enumerate(slices(self.spec.distance)):
                key = (unsigned >> np.uint64(shift)) & np.uint64((1 << bits) - 1)
                groups.append(bucket_of(key | np.uint64(number << 56), self.spec.phash_groups))
                block = np.empty(len(key), PHASH)
                block["row"], block["query"], block["phash"] = rows[valid], part.against, values[valid]
                taken.append(block)
            written += self._write("phash", part.number, np.concatenate(taken) if taken else np.empty(0, PHASH),
                                   np.concatenate(groups) if groups else np.zeros(0, np.int64),
                                   self.spec.phash_groups)
        return {"records": written}

    def _write(self, kind: str, number: int, records: np.ndarray, group: np.ndarray, groups: int) -> int:
        order = np.lexsort((records["row"], group))
        write_run(self.stage / kind, number, records[order], np.searchsorted(group[order], np.arange(groups + 1)))
        return len(records)

    def join(self, task: HashJoinTask) -> dict:
        records = read_group(self.stage / task.kind, self.spec.parts, task.group)
        records = records[np.lexsort((records["row"], records["query"]))]  # index rows, then queries, by row
        queries = records["query"].astype(bool)
        if task.kind == "exact":
            _, codes = np.unique(records["sha"], axis=0, return_inverse=True) if len(records) else (None, [])
            codes = np.asarray(codes, np.int64).ravel()
            if self.spec.against:
                i, j = exact_pairs(codes[queries], codes[~queries], self_join=False)
            else:
                i, j = exact_pairs(codes, codes, self_join=True)
        elif self.spec.against:
            i, j = phash_pairs((records["phash"][~queries], np.ones(int((~queries).sum()), bool)), self.spec.distance,
                               queries=(records["phash"][queries], np.ones(int(queries.sum()), bool)), progress=False)
        else:
            i, j = phash_pairs((records["phash"], np.ones(len(records), bool)), self.spec.distance, progress=False)
        if self.spec.against:  # (query row, index row): two row spaces, no order between them
            both = np.unique(np.stack([records["row"][queries][i], records["row"][~queries][j]], axis=1), axis=0)
        else:
            a, b = records["row"][i], records["row"][j]
            lo, hi = np.minimum(a, b), np.maximum(a, b)
            both = np.unique(np.stack([lo, hi], axis=1)[lo != hi], axis=0)
        save_arrays(self.stage / f"{task.kind}-pairs" / f"{task.group:06d}.npz", a=both[:, 0], b=both[:, 1])
        return {"records": len(records), "pairs": len(both)}


def hashed_pairs(searcher, scale: Scale, methods: tuple[str, ...], distance: int, progress: bool | None = None,
                 against: list[IndexPart] | None = None) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """kind -> (a, b) of every exact / phash pair the enabled tiers find, as partition and join
    tasks, and the stage's figures: (a < b, index rows), or with `against` (the other corpus's
    parts, partitions.against_parts) (its row, index row), the leakage check's pairs."""
    manifest = searcher.manifest
    parts = index_parts(searcher)
    # the other corpus's runs are numbered after the index's
    parts += [replace(p, number=len(parts) + p.number) for p in against or []]
    count = sum(p.rows for p in parts)
    exact_groups = max(MIN_TASKS, math.ceil(count * SHA.itemsize / TASK_BYTES)) if "exact" in methods else 0
    phash_groups = (max(MIN_TASKS, math.ceil(count * (distance + 1) * PHASH.itemsize / TASK_BYTES))
                    if "phash" in methods else 0)
    identity = {"index": str(Path(searcher.dir.path).resolve()), "count": manifest.count,
                "files": manifest.files, "layout": LAYOUT, "exact_groups": exact_groups,
                "phash_groups": phash_groups, "phash_distance": distance if phash_groups else None,
                "against": [[p.embeddings, p.shard, p.rows] for p in against or []]}
    stage = scale.work.stage("hashes", identity)
    kinds = [k for k in ("exact", "phash") if k in methods]
    for kind in kinds:
        (stage / kind).mkdir(exist_ok=True)
        (stage / f"{kind}-pairs").mkdir(exist_ok=True)
    splits = [PartitionTask(f"hashes-{'against-' if p.against else ''}{p.shard}", p) for p in parts]
    joins = [HashJoinTask(f"{kind}-{g:06d}", kind, g) for kind in kinds
             for g in range(exact_groups if kind == "exact" else phash_groups)]
    todo_splits = [t for t in splits if not all(run_done(stage / k, t.part.number) for k in kinds)]
    todo_joins = [t for t in joins if not (stage / f"{t.kind}-pairs" / f"{t.group:06d}.npz").exists()]
    stats = {"partition_tasks": len(splits), "join_tasks": len(joins),
             "reused_tasks": len(splits) - len(todo_splits) + len(joins) - len(todo_joins)}
    placement = scale.placement()
    factory = HashWorkers(str(stage), len(parts), exact_groups, phash_groups, distance, against=bool(against))
    started = time.perf_counter()
    done = run_tasks(placement, factory, todo_splits, "hash partition", progress)
    done += run_tasks(placement, factory, todo_joins, "hash join", progress)
    stats["worker_peak_rss_mb"] = max((r["peak_rss_mb"] or 0 for r in done), default=None)
    stats["seconds"] = round(time.perf_counter() - started, 2)
    stats["temporary_bytes"] = sum(p.stat().st_size for p in stage.rglob("*") if p.is_file())
    found = {}
    for kind in kinds:
        a, b = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        for task in (t for t in joins if t.kind == kind):
            with np.load(stage / f"{kind}-pairs" / f"{task.group:06d}.npz") as pairs:
                a.append(pairs["a"])
                b.append(pairs["b"])
        both = np.unique(np.stack([np.concatenate(a), np.concatenate(b)], axis=1), axis=0)
        found[kind] = (both[:, 0], both[:, 1])
    return found, stats
