"""The index build's unit of work, the same on every executor (this process, `--procs`, `--ray`):
one AddTask (a run of consecutive parts) -> one sub-index that shares the trained quantizer, its
rows' (shard, key) and the exact neighbours of the evaluation queries among its vectors.

The driver trains once and writes `IDX/_build/trained.faiss` and the queries; every worker loads
them once and then adds the parts it is handed. A task's files are written whole (temporary name,
then rename; one PUT on object stores) and its marker `<task>.json` last, so a task is done
exactly when its marker exists: a rerun of an interrupted build, or a retry of a task whose
worker died, redoes only tasks without one. Only task descriptions and small records travel
between the driver and the workers; the sub-indexes go through storage every node reaches.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from imgindex.formats.embeddings_dir import EmbeddingsDir, Part
from imgindex.formats.index_dir import IDS_SCHEMA, MERGE_BLOCK, BuildDir, sorted_keys
from imgindex.indexes.reads import iter_batches
from imgindex.indexes.recall import Exact, exact_neighbors

TRAINED = "trained.faiss"
QUERIES = "queries.npz"
PLAN = "plan.json"
TASKS_PER_WORKER = 4  # enough tasks that a slow or lost worker costs a fraction of the build


def mergeable(index: faiss.Index) -> bool:
    """Sub-indexes of this type merge into one: IVF (inverted lists, any codes) and flat codes."""
    return faiss.try_extract_index_ivf(index) is not None or isinstance(faiss.downcast_index(index),
                                                                           faiss.IndexFlatCodes)


@dataclass(frozen=True)
class AddTask:
    """Consecutive parts; `start` is the index row of its first vector."""

    name: str
    parts: tuple[Part, ...]
    start: int

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)

    def to_json(self) -> dict:
        return {"name": self.name, "start": self.start, "parts": [[p.shard, p.path, p.rows] for p in self.parts]}

    @classmethod
    def from_json(cls, data: dict) -> "AddTask":
        return cls(data["name"], tuple(Part(*p) for p in data["parts"]), int(data["start"]))


def split_tasks(parts: list[Part], rows_per_task: int) -> list[AddTask]:
    """Consecutive parts grouped into tasks of at least `rows_per_task` rows (a part is never split)."""
    tasks, group, start, rows = [], [], 0, 0
    for part in parts:
        group.append(part)
        rows += part.rows
        if rows >= rows_per_task:
            tasks.append(AddTask(f"add-{len(tasks):05d}", tuple(group), start))
            start, group, rows = start + rows, [], 0
    if group:
        tasks.append(AddTask(f"add-{len(tasks):05d}", tuple(group), start))
    return tasks


def rows_per_task(count: int, workers: int, max_rows: int) -> int:
    """TASKS_PER_WORKER tasks a worker, none larger than `max_rows` (what a worker holds at once)."""
    return max(1, min(math.ceil(count / (TASKS_PER_WORKER * max(1, workers))), max_rows))


@dataclass(frozen=True)
class AddWorkers:
    """The build's worker factory (picklable, made again in every worker process)."""

    emb_url: str
    build_url: str
    k: int  # exact neighbours kept per query (the driver merges every task's)
    with_ids: bool  # IVF: vectors carry their index row, so sub-indexes merge in any order

    def __call__(self, slot: int, name: str) -> "AddWorker":
        return AddWorker(self, name)


class AddWorker:
    """Holds the trained index and the queries for its life; turns each task into its files."""

    def __init__(self, spec: AddWorkers, name: str):
        self.spec, self.name = spec, name
        self.emb = EmbeddingsDir(spec.emb_url)
        self.build = BuildDir(spec.build_url)
        self.trained = self.build.read_index(TRAINED)
        self.queries = self.build.read_arrays(QUERIES)["vectors"]

    def run(self, task: AddTask, progress: Callable[[int, int], None] | None = None) -> dict:
        started = time.perf_counter()
        index = faiss.clone_index(self.trained)
        tables = []

        def blocks() -> Iterator[np.ndarray]:
            row = task.start
            for _, ids, vectors in iter_batches(self.emb, list(task.parts)):
                if self.spec.with_ids:
                    index.add_with_ids(vectors, np.arange(row, row + len(vectors), dtype=np.int64))
                else:
                    index.add(vectors)
                row += len(vectors)
                tables.append(ids.cast(IDS_SCHEMA))
                if progress:
                    progress(len(vectors), 0)
                yield vectors

        exact = exact_neighbors(self.queries, blocks(), self.spec.k)
        exact = Exact(exact.scores, np.where(exact.ids >= 0, exact.ids + task.start, -1))
        if index.ntotal - self.trained.ntotal != task.rows:  # an --add of a graph index starts from it whole
            raise RuntimeError(f"task {task.name}: read {index.ntotal} vectors, its parts list {task.rows} "
                               "(a part changed during the build?)")
        self.build.write_index(f"{task.name}.faiss", index)
        ids = pa.concat_tables(tables) if tables else IDS_SCHEMA.empty_table()
        self.build.write_table(f"{task.name}.ids.parquet", ids)
        self.build.write_table(f"{task.name}.keys.parquet", sorted_keys(ids, task.start),  # a sorted run, read
                               row_group_size=MERGE_BLOCK)  # back a row group at a time by the merge
        self.build.write_arrays(f"{task.name}.exact.npz", scores=exact.scores, ids=exact.ids)
        record = {"task": task.name, "rows": task.rows, "worker": self.name,
                  "seconds": round(time.perf_counter() - started, 3)}
        self.build.write_json(f"{task.name}.json", record)  # last: the task is done
        return record

    def close(self) -> None:
        self.trained = None


def done_tasks(build: BuildDir, tasks: list[AddTask]) -> dict[str, dict]:
    """Task name -> its marker, for the tasks a previous run finished."""
    done = {}
    for task in tasks:
        record = build.read_json(f"{task.name}.json")
        if record is not None and record.get("rows") == task.rows:
            done[task.name] = record
    return done


def merge_exact(parts: list[Exact], k: int) -> Exact:
    """The exact top-k over all tasks from each task's own top-k (ids are already global)."""
    scores = np.concatenate([p.scores for p in parts], axis=1)
    ids = np.concatenate([p.ids for p in parts], axis=1)
    scores = np.where(ids >= 0, scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return Exact(np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1))


def merge_in_memory(build: BuildDir, tasks: list[AddTask]) -> faiss.Index:
    """The tasks' sub-indexes in one index held in RAM, in task order (one sub-index read at a time):
    the first one, with every other one's lists or codes moved into it."""
    index = build.read_index(f"{tasks[0].name}.faiss")
    merge_into(index, build, tasks[1:])
    return index


def merge_into(index: faiss.Index, build: BuildDir, tasks: list[AddTask]) -> None:
    """Every task's sub-index's lists or codes moved into `index` (held in RAM), in task order."""
    ivf = faiss.try_extract_index_ivf(index)
    for task in tasks:
        sub = build.read_index(f"{task.name}.faiss")
        if ivf is not None:
            ivf.merge_from(faiss.extract_index_ivf(sub), 0)
        else:
            faiss.downcast_index(index).merge_from(faiss.downcast_index(sub), 0)
        del sub
    if ivf is not None:
        index.ntotal = ivf.ntotal  # an IndexPreTransform around it counts its own


def concat_ids(build: BuildDir, tasks: list[AddTask], parquet: str | os.PathLike | None,
               mapped: str | os.PathLike) -> None:
    """Every task's (shard, key) rows, in task order, into an Arrow IPC file at `mapped` (and a
    Parquet file at `parquet`), one task's rows held at a time."""
    with contextlib.ExitStack() as stack:
        writer = stack.enter_context(pq.ParquetWriter(parquet, IDS_SCHEMA)) if parquet else None
        sink = stack.enter_context(pa.OSFile(str(mapped), "wb"))
        ipc = stack.enter_context(pa.ipc.new_file(sink, IDS_SCHEMA))
        for task in tasks:
            table = build.read_table(f"{task.name}.ids.parquet").cast(IDS_SCHEMA)
            if writer is not None:
                writer.write_table(table)
            ipc.write_table(table, max_chunksize=1 << 20)


def key_runs(build: BuildDir, tasks: list[AddTask]) -> list[Iterator[pa.RecordBatch]]:
    """Each task's keys sorted on their own (its run), read a block at a time, for merge_sorted_keys."""
    return [pq.ParquetFile(build.path(f"{task.name}.keys.parquet"), filesystem=build.fs)
            .iter_batches(batch_size=MERGE_BLOCK) for task in tasks]


def read_exact(build: BuildDir, tasks: list[AddTask], k: int) -> Exact:
    found = [build.read_arrays(f"{task.name}.exact.npz") for task in tasks]
    return merge_exact([Exact(f["scores"], f["ids"]) for f in found], k)


def save_plan(build: BuildDir, plan: dict) -> None:
    build.write_json(PLAN, json.loads(json.dumps(plan)))
