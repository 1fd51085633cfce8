"""The embedding tier at scale: partition the vectors once by inverted list, then join each
group of lists as an independent task, on any executor (this process, `--procs`, `--ray`).

Partition (one task per part of the index): the part's vectors are read from the embeddings
directory, each row's `nprobe` lists are chosen by the index's coarse quantizer (as a search
would), and the row is written once for every list it probes (role: query) and once for the
list that holds it (role: member; one record with both roles when it probes its own list),
sorted by list, into one run file per part with the offsets of every task's lists. Join (one
task per group of consecutive lists): the group's records from every run file, then per list
the same blocked matrix products as the one-process join (ivf_join.list_pairs), self-pairs
dropped, each query's `cap` most similar kept (and the queries that had more noted), written
to one pairs file. A pair is examined exactly when a search at the same `nprobe` would
examine it, as in ivf_join; the driver then keeps each query's best `cap` over all tasks,
which is the one-process answer.

Temporary disk: about nprobe float32 copies of the vectors (one record per (row, list probed)),
in the work folder (workdir.py); finished runs and tasks are reused by a rerun. Products run
in float32 with numpy, or with torch on a GPU (`device="cuda"`, bf16 by default): then every
candidate within the bf16 rounding bound of the threshold is re-scored in float32 and only
those at or above it are kept, so bf16 loses no pair.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from imgindex.errors import ConfigError
from imgindex.executors.handout import Event, Outcome, hand_out
from imgindex.executors.placement import Executor, Placement, place
from imgindex.formats.embeddings_dir import EmbeddingsDir
from imgindex.indexes.dedup.ivf_join import CappedPairs, list_ids, list_pairs, quantizer_probes
from imgindex.indexes.dedup.workdir import WorkDir, read_group, run_done, save_array, save_arrays, write_run
from imgindex.plurals import counted
from imgindex.progress import progress_bar

MEMBER, QUERY = 1, 2  # a record's roles in its list: stored in it, probes it (or both)
TASK_BYTES = 256 << 20  # vectors a join task holds, about: sets how many lists a task takes
MIN_TASKS = 16  # at least this many join tasks (at most one per list): work for every worker, steps to resume from
# bf16 keeps 8 significant bits: each coordinate is off by at most 2^-9 of itself, so the dot
# product of two unit vectors by at most 2 * 2^-9 (+ fp32 accumulation): candidates come from
# threshold - BF16_MARGIN, and the float32 re-score decides.
BF16_MARGIN = 2**-7
PRECISIONS = ("auto", "fp32", "bf16")


def record_dtype(dim: int) -> np.dtype:
    return np.dtype([("row", "<i8"), ("list", "<i4"), ("role", "u1"), ("vector", "<f4", (dim,))])


@dataclass(frozen=True)
class IndexPart:
    """One part of the index, as a partition task reads it."""

    number: int  # the part's place in the index: its run files' name
    embeddings: str  # the embeddings directory that holds the part
    shard: str
    start: int  # the index row of its first vector
    rows: int


def index_parts(searcher) -> list[IndexPart]:
    """The index's parts in index order, with the row each starts at."""
    parts, start = [], 0
    for number, part in enumerate(searcher.manifest.parts):
        emb = searcher.embeddings_for(part.shard)
        if emb is None:
            raise ConfigError(f"the embeddings of shard {part['shard']} are gone: dedup reads the stored vectors")
        parts.append(IndexPart(number, emb.location, part.shard, start, part.rows))
        start += part.rows
    return parts


@dataclass(frozen=True)
class PartitionTask:
    """One part of the index -> its run file (records sorted by list) and the offsets of each group."""

    name: str
    part: IndexPart


@dataclass(frozen=True)
class JoinTask:
    """One group of consecutive lists -> the pairs above the threshold among its records."""

    name: str
    group: int


@dataclass(frozen=True)
class JoinWorkers:
    """The picklable factory of the tier's workers: each loads the quantizer and the layout once
    from the stage folder (which every worker must reach: local disk, or shared storage on Ray)."""

    stage: str
    dim: int
    nprobe: int
    parts: int
    threshold: float
    cap: int
    device: str = "cpu"  # cpu: numpy float32 products; cuda: torch on the worker's GPU
    precision: str = "fp32"  # of the products (bf16: through torch, on any device), re-scored in float32

    def __call__(self, slot: int, name: str) -> "JoinWorker":
        return JoinWorker(self, name)


class StageWorker:
    """A worker of a partitioned stage: partition tasks (a part of the index) and join tasks."""

    def __init__(self, name: str):
        self.name = name
        self.dirs: dict[str, EmbeddingsDir] = {}

    def run(self, task, progress=None) -> dict:
        started = time.perf_counter()
        result = self.join(task) if getattr(task, "part", None) is None else self.partition(task.part)
        return {**result, "task": task.name, "worker": self.name, "seconds": time.perf_counter() - started,
                "peak_rss_mb": peak_rss_mb()}

    def partition(self, part: IndexPart) -> dict:
        raise NotImplementedError

    def join(self, task) -> dict:
        raise NotImplementedError

    def embeddings(self, url: str) -> EmbeddingsDir:
        if url not in self.dirs:
            self.dirs[url] = EmbeddingsDir(url)
        return self.dirs[url]

    def close(self) -> None:
        self.dirs.clear()


class JoinWorker(StageWorker):
    def __init__(self, spec: JoinWorkers, name: str):
        super().__init__(name)
        self.spec = spec
        stage = Path(spec.stage)
        self.quantizer = faiss.read_index(str(stage / "quantizer.faiss"))
        self.lists = np.load(stage / "lists.npy", mmap_mode="r")
        self.bounds = np.load(stage / "groups.npy")  # group g holds lists bounds[g]..bounds[g+1]-1
        self.runs, self.pairs = stage / "runs", stage / "pairs"
        self.product = torch_product(spec.device, spec.precision) if spec.device != "cpu" or \
            spec.precision == "bf16" else None

    def partition(self, task: IndexPart) -> dict:
        emb = self.embeddings(task.embeddings)
        nprobe, blocks, read = self.spec.nprobe, [], 0
        for _, _, vectors in emb.iter_batches([emb.part(task.shard, task.rows)]):
            rows = np.arange(task.start + read, task.start + read + len(vectors), dtype=np.int64)
            read += len(vectors)
            if read > task.rows:
                break
            own = np.asarray(self.lists[rows[0]:rows[-1] + 1], dtype=np.int32)
            probes = quantizer_probes(self.quantizer, [vectors], nprobe)
            hit = probes == own[:, None]
            lonely = np.nonzero(~hit.any(axis=1))[0]  # rows that do not probe their own list
            which = np.r_[np.repeat(np.arange(len(rows)), nprobe), lonely]
            block = np.empty(len(which), record_dtype(self.spec.dim))
            block["row"], block["vector"] = rows[which], vectors[which]
            block["list"] = np.r_[probes.ravel(), own[lonely]]
            block["role"] = np.r_[QUERY | np.where(hit.ravel(), MEMBER, 0), np.full(len(lonely), MEMBER)]
            blocks.append(block[block["list"] >= 0])
        if read != task.rows:
            raise ConfigError(f"the part of shard {task.shard} holds {read} rows, the index recorded {task.rows}: "
                              "the embeddings changed since the index was built; rebuild the index")
        records = np.concatenate(blocks) if blocks else np.empty(0, record_dtype(self.spec.dim))
        records = records[np.lexsort((records["row"], records["list"]))]
        write_run(self.runs, task.number, records, np.searchsorted(records["list"], self.bounds))
        return {"records": len(records)}

    def join(self, task: JoinTask) -> dict:
        records = read_group(self.runs, self.spec.parts, task.group)
        records = records[np.lexsort((records["row"], records["list"]))]
        pairs = CappedPairs(self.spec.cap)
        edges = np.r_[0, np.nonzero(np.diff(records["list"]))[0] + 1, len(records)]
        for lo, hi in zip(edges[:-1], edges[1:]):
            rows = records[lo:hi]
            queries, members = (rows["role"] & QUERY) > 0, (rows["role"] & MEMBER) > 0
            if not queries.any() or not members.any():
                continue
            query_rows, member_rows = rows["row"][queries], rows["row"][members]
            query_vectors, member_vectors = rows["vector"][queries], rows["vector"][members]
            list_pairs(query_rows, lambda a, b: query_vectors[a:b], member_rows, lambda a, b: member_vectors[a:b],
                       self.spec.threshold, True, pairs.add, self.product)
        q, d, s, capped = pairs.final()
        save_arrays(self.pairs / f"{task.group:06d}.npz", q=q, d=d, s=s, capped=capped)
        return {"records": len(records), "pairs": len(q)}


def peak_rss_mb() -> float | None:
    """This process's peak resident memory (Linux's VmHWM), in MiB; None elsewhere."""
    try:
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
    return round(int(line.split()[1]) / 1024, 1)


def torch_product(device: str, precision: str):
    """(queries, members, threshold) -> (i, j, float32 score) with torch: the product in
    `precision` on `device`, every candidate within its rounding bound re-scored in float32."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible to this worker")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    margin = BF16_MARGIN if precision == "bf16" else 0.0

    def product(queries: np.ndarray, members: np.ndarray, threshold: float):
        q = torch.from_numpy(np.ascontiguousarray(queries)).to(device)
        m = torch.from_numpy(np.ascontiguousarray(members)).to(device)
        scores = (q.to(dtype) @ m.to(dtype).T).float()
        i, j = torch.nonzero(scores >= threshold - margin, as_tuple=True)
        exact = (q[i] * m[j]).sum(dim=1)  # float32, on the stored vectors
        keep = exact >= threshold
        return i[keep].cpu().numpy(), j[keep].cpu().numpy(), exact[keep].cpu().numpy()

    return product


def group_bounds(sizes: np.ndarray, nprobe: int, dim: int) -> np.ndarray:
    """Consecutive lists in groups of about TASK_BYTES of records (a list's members, times
    nprobe + 1 for the queries that probe it on average), at least MIN_TASKS groups (at most one
    per list): the list boundaries, groups + 1 of them. A list larger than a task is a task."""
    weight = sizes.astype(np.float64) * (nprobe + 1) * (4 * dim + 13)
    count = min(len(sizes), max(MIN_TASKS, math.ceil(weight.sum() / TASK_BYTES)))
    before = np.r_[0, np.cumsum(weight)[:-1]]
    group = np.minimum((before / max(weight.sum(), 1) * count).astype(np.int64), count - 1)
    return np.r_[0, np.nonzero(np.diff(group))[0] + 1, len(sizes)].astype(np.int64)


def _lists_file(ivf: faiss.IndexIVF, path: Path) -> None:
    """The list of every stored row, as an int32 file (memory-mapped: O(1) memory in N)."""
    tmp = path.with_name(path.name + ".tmp")
    lists = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int32, shape=(ivf.ntotal,))
    lists[:] = -1
    for number in range(ivf.nlist):
        lists[list_ids(ivf, number)] = number
    lists.flush()
    del lists
    os.replace(tmp, path)


def _write_layout(ivf: faiss.IndexIVF, stage: Path, nprobe: int, dim: int) -> None:
    if not (stage / "quantizer.faiss").exists():
        faiss.write_index(ivf.quantizer, str(stage / "quantizer.faiss.tmp"))
        os.replace(stage / "quantizer.faiss.tmp", stage / "quantizer.faiss")
    if not (stage / "lists.npy").exists():
        _lists_file(ivf, stage / "lists.npy")
    if not (stage / "groups.npy").exists():
        sizes = np.array([ivf.invlists.list_size(n) for n in range(ivf.nlist)], np.int64)
        save_array(stage / "groups.npy", group_bounds(sizes, nprobe, dim))
    for folder in ("runs", "pairs"):
        (stage / folder).mkdir(exist_ok=True)


@dataclass
class Scale:
    """How a dedup's partitioned tiers run: the work folder, the executor, and (embedding tier)
    the device and precision of the products."""

    work: WorkDir
    executor: Executor = Executor()
    device: str = "cpu"
    precision: str = "auto"

    def check(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"--device for dedup is cpu or cuda, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision is one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    @property
    def product_precision(self) -> str:
        return ("bf16" if self.device == "cuda" else "fp32") if self.precision == "auto" else self.precision

    def placement(self) -> Placement:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        gpus = 0
        if self.device == "cuda":
            import torch

            gpus = torch.cuda.device_count()
            if not gpus and self.executor.kind != "ray":
                raise ConfigError("--device cuda: no CUDA GPU is visible; use --device cpu (the default)")
        return place(self.executor, cores, gpus, self.device == "cuda")


def run_tasks(placement: Placement, factory, tasks: list, desc: str, progress: bool | None) -> list[dict]:
    """Every task on a fresh pool of the placement's workers (retried as `embed` retries shards);
    their results. Raises ConfigError naming the tasks that failed every attempt."""
    if not tasks:
        return []
    executor = placement.executor
    pool = placement.pool(factory, label="Dedup", threads=placement.cores if executor.kind == "procs" else None)
    with progress_bar(total=len(tasks), desc=desc, unit="task", progress=progress) as bar:
        def on_event(event: Event, outcome: Outcome) -> None:
            if event.kind == "done":
                bar.update(1)
            executor.warn(event, outcome, "task")

        outcome = hand_out(pool, tasks, min(placement.workers, len(tasks)), executor.retries, on_event)
    if outcome.failed:
        name, error = sorted(outcome.failed.items())[0]
        raise ConfigError(f"{counted(len(outcome.failed), 'dedup task')} failed {executor.retries + 1} times "
                          f"(first: {name}: {error}); rerun the same command (with --keep-work to keep the "
                          "finished tasks)")
    return outcome.done


def partitioned_join(searcher, scale: Scale, threshold: float, cap: int,
                     progress: bool | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, dict]:
    """The self-join of an IVF index's rows at its nprobe, as partition and join tasks:
    (query row, db row, score, capped queries, stats), the pairs range_join finds."""
    ivf = faiss.extract_index_ivf(searcher.index)
    nprobe = min(ivf.nprobe, ivf.nlist)
    manifest = searcher.manifest
    precision = scale.product_precision
    identity = {"index": str(Path(searcher.dir.path).resolve()), "count": manifest.count,
                "files": manifest.files, "factory": manifest.factory, "nprobe": nprobe,
                "threshold": threshold, "max_neighbors": cap, "precision": precision}
    stage = scale.work.stage("embedding", identity)
    _write_layout(ivf, stage, nprobe, manifest.dim)
    parts = [PartitionTask(f"partition-{p.shard}", p) for p in index_parts(searcher)]
    groups = len(np.load(stage / "groups.npy")) - 1
    joins = [JoinTask(f"join-{g:06d}", g) for g in range(groups)]
    todo_parts = [t for t in parts if not run_done(stage / "runs", t.part.number)]
    todo_joins = [t for t in joins if not (stage / "pairs" / f"{t.group:06d}.npz").exists()]
    stats = {"nprobe": nprobe, "partition_tasks": len(parts), "join_tasks": groups,
             "reused_tasks": len(parts) - len(todo_parts) + groups - len(todo_joins), "precision": precision}
    placement = scale.placement()
    factory = JoinWorkers(str(stage), manifest.dim, nprobe, len(parts), threshold, cap, scale.device, precision)
    started = time.perf_counter()
    done = run_tasks(placement, factory, todo_parts, "partition", progress)
    stats["partition_s"] = round(time.perf_counter() - started, 2)
    stats["records"] = int(sum(np.load(stage / "runs" / f"{t.part.number:06d}.off.npy")[-1] for t in parts))
    started = time.perf_counter()
    done += run_tasks(placement, factory, todo_joins, "join", progress)
    stats["join_s"] = round(time.perf_counter() - started, 2)
    stats["workers"] = placement.workers
    stats["worker_peak_rss_mb"] = max((r["peak_rss_mb"] or 0 for r in done), default=None)
    stats["temporary_bytes"] = sum(p.stat().st_size for p in stage.rglob("*") if p.is_file())
    pairs = CappedPairs(cap)
    for task in joins:
        with np.load(stage / "pairs" / f"{task.group:06d}.npz") as found:
            pairs.add(found["q"], found["d"], found["s"])
            pairs.add_capped(found["capped"])
    q, d, s, capped = pairs.final()
    return q, d, s, len(capped), stats
