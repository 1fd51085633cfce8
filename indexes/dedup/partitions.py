"""The embedding tier at scale: partition the vectors once by inverted list, then join each
group of lists as an independent task, on any executor (this process, `--procs`, `--ray`).

Partition (one task per part of the index): the part's vectors are read from the embeddings
directory and each row's `nprobe` lists are chosen by the index's coarse quantizer (as a search
would). The row's vector is written ONCE, in the run of its part, among the members of the list
that holds it (sorted by that list's place in the join order, then row); for every list it
probes only its row id is written (8 bytes), sorted the same way; a third file gives each row's
slot among the members. Join (one task per group of lists consecutive in the join order, a chain
through the centroids, list_order, so most queries of a group are members of it): the group's
members and probing rows from every run; each query's vector once, from the group's members
where it is one, else read from the run of its part at its slot (sorted, memory-mapped: only
those rows' pages); then per list the same blocked matrix products as the one-process join
(ivf_join.list_pairs), self-pairs dropped, each query's `cap` most similar kept (and the queries
that had more noted), written to one pairs file. A pair is examined exactly when a search at the
same `nprobe` would examine it, as in ivf_join, with the same float32 vectors and blocks; the
driver then keeps each query's best `cap` over all tasks, which is the one-process answer.

Temporary disk: one float32 copy of the vectors plus 8 (nprobe + 2) bytes a row (row ids, slots)
and each run's offsets (16 bytes a list), whatever nprobe; the stats say `partition_bytes`,
`vector_bytes` and `storage` (float32: the one copy fits, so no fp16 storage is used). The
folder is workdir.py's; finished runs and tasks are reused by a rerun. Products run in float32
with numpy, or with torch on a GPU (`device="cuda"`, bf16 by default): then every candidate
within the bf16 rounding bound of the threshold is re-scored in float32 and only those at or
above it are kept, so bf16 loses no pair.

`--against` (leakage) uses the same tasks: the other corpus's parts are partitioned as probing
rows only (their vectors stored once, by row), and each join task compares them with its lists'
members, without the self-join (partitioned_join's `against`).
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
from imgindex.indexes.dedup.workdir import WorkDir, save_array, save_arrays
from imgindex.plurals import counted
from imgindex.progress import progress_bar

TASK_BYTES = 256 << 20  # vectors a join task holds, about: sets how many lists a task takes
MIN_TASKS = 16  # at least this many join tasks (at most one per list): work for every worker, steps to resume from
# bf16 keeps 8 significant bits: each coordinate is off by at most 2^-9 of itself, so the dot
# product of two unit vectors by at most 2 * 2^-9 (+ fp32 accumulation): candidates come from
# threshold - BF16_MARGIN, and the float32 re-score decides.
BF16_MARGIN = 2**-7
PRECISIONS = ("auto", "fp32", "bf16")
LAYOUT = 2  # the partitions' file layout (in the stage's identity: a work folder of another layout is cleared)


@dataclass(frozen=True)
class IndexPart:
    """One part of the index, as a partition task reads it."""

    number: int  # the part's place in the index: its run files' name
    embeddings: str  # the embeddings directory that holds the part
    shard: str
    start: int  # the index row of its first vector
    rows: int
    against: bool = False  # a part of the other corpus of a leakage check (--against): probing rows only


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
    against_parts: int = 0  # a leakage check: the other corpus's parts probe the index's lists (no self-join)

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
        order = np.load(stage / "order.npy")  # the lists in join order: nearby lists next to each other
        self.rank = np.empty(len(order), np.int64)
        self.rank[order] = np.arange(len(order))
        self.bounds = np.load(stage / "groups.npy")  # group g holds the lists of ranks bounds[g]..bounds[g+1]-1
        self.starts = np.load(stage / "starts.npy")  # the first row of every part of the index
        if spec.against_parts:
            self.against_starts = np.load(stage / "against_starts.npy")  # the other corpus's parts
        self.runs, self.pairs = stage / "runs", stage / "pairs"
        self.product = torch_product(spec.device, spec.precision) if spec.device != "cpu" or \
            spec.precision == "bf16" else None

    def partition(self, task: IndexPart) -> dict:
        emb = self.embeddings(task.embeddings)
        # a leakage check's index rows are members only: they probe nothing
        nprobe = 0 if self.spec.against_parts and not task.against else self.spec.nprobe
        rows, vectors, probes, read = [], [], [], 0
        for _, _, batch in emb.iter_batches([emb.part(task.shard, task.rows)]):
            rows.append(np.arange(task.start + read, task.start + read + len(batch), dtype=np.int64))
            read += len(batch)
            if read > task.rows:
                break
            vectors.append(np.asarray(batch, dtype=np.float32))
            probes.append(quantizer_probes(self.quantizer, [vectors[-1]], nprobe) if nprobe else
                          np.zeros((len(batch), 0), np.int32))
        if read != task.rows:
            raise ConfigError(f"the part of shard {task.shard} holds {read} rows, the index recorded {task.rows}: "
                              "the embeddings changed since the index was built; rebuild the index")
        dim = self.spec.dim
        rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        vectors = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)
        probes = np.concatenate(probes) if probes else np.zeros((0, nprobe), np.int32)
        if task.against:
            write_probing(self.runs, task.number, rows, vectors, probes, self.rank)
            return {"records": int(len(rows) * nprobe)}
        write_partition(self.runs, task.number, task.start, rows, vectors, probes, self.rank,
                        np.asarray(self.lists[task.start:task.start + task.rows], dtype=np.int32))
        return {"records": int(len(rows) * (nprobe + 1))}

    def join(self, task: JoinTask) -> dict:
        lo, hi = int(self.bounds[task.group]), int(self.bounds[task.group + 1])
        members, member_rank, queries, query_rank = read_ranks(self.runs, self.spec.parts, lo, hi)
        order = np.lexsort((members, member_rank))
        members, member_rank = members[order], member_rank[order]
        member_vectors = read_member_vectors(self.runs, self.spec.parts, lo, hi)[order]
        against = self.spec.against_parts > 0
        if against:  # the other corpus's rows probing these lists, their vectors from its runs
            _, _, queries, query_rank = read_ranks(self.runs, self.spec.against_parts, lo, hi, prefix="q")
        order = np.lexsort((queries, query_rank))
        queries, query_rank = queries[order], query_rank[order]
        # every query's vector once, in `held` after the members: from this group's members where it
        # is one, else read (sorted, memory-mapped) from the partition of the list that holds it,
        # straight into its place (one copy)
        unique, where = np.unique(queries, return_inverse=True)
        local = np.zeros(len(unique), bool)
        place = np.empty(len(unique), np.int64)  # each unique query's row in `held`
        if not against:
            by_row = np.argsort(members, kind="stable")
            at = np.searchsorted(members, unique, sorter=by_row)
            local = at < len(members)
            local[local] = members[by_row[at[local]]] == unique[local]
            place[local] = by_row[at[local]]
        remote = unique[~local]
        held = np.empty((len(members) + len(remote), self.spec.dim), np.float32)
        held[:len(members)] = member_vectors
        del member_vectors
        place[~local] = len(members) + read_rows(self.runs, self.against_starts if against else self.starts,
                                                 remote, held[len(members):], "q" if against else "")
        slot_of = place[where]  # each (query, list) record's row in `held`
        pairs = CappedPairs(self.spec.cap)
        m_edges = np.searchsorted(member_rank, np.arange(lo, hi + 1))
        q_edges = np.searchsorted(query_rank, np.arange(lo, hi + 1))
        for r in range(hi - lo):
            m0, m1, q0, q1 = m_edges[r], m_edges[r + 1], q_edges[r], q_edges[r + 1]
            if m0 == m1 or q0 == q1:
                continue
            slots = slot_of[q0:q1]
            list_pairs(queries[q0:q1], lambda a, b: held[slots[a:b]], members[m0:m1],
                       lambda a, b: held[m0 + a:m0 + b], self.spec.threshold, not against, pairs.add,
                       self.product)
        q, d, s, capped = pairs.final()
        save_arrays(self.pairs / f"{task.group:06d}.npz", q=q, d=d, s=s, capped=capped)
        return {"records": len(members) + len(queries), "pairs": len(q), "queries": len(unique),
                "remote_queries": int((~local).sum())}


# One partition run per part of the index, every file under its final name only once complete
# and the offsets written last (a run with offsets is complete). Members, sorted by (rank of
# their list, row): `rows` (int64) and `vectors` (float32, dim); `where` (int64): the slot of each
# of the part's rows in them (-1: not in the index); `probes` (int64): the row of every (row,
# list probed) record, sorted by (rank of the list, row); `off`: 2 x (nlist + 1), where each
# rank's members and probes start.
RUN_FILES = ("rows", "vectors", "where", "probes")


def write_partition(folder: Path, number: int, start: int, rows: np.ndarray, vectors: np.ndarray,
                    probes: np.ndarray, rank: np.ndarray, own: np.ndarray) -> None:
    nlist = len(rank)
    stored = np.nonzero(own >= 0)[0]
    order = stored[np.lexsort((rows[stored], rank[own[stored]]))]
    where = np.full(len(rows), -1, np.int64)
    where[order] = np.arange(len(order))
    member_offsets = np.searchsorted(rank[own[order]], np.arange(nlist + 1))
    flat = probes.ravel()
    probed = np.nonzero(flat >= 0)[0]
    query_rows = rows[probed // max(probes.shape[1], 1)]
    query_ranks = rank[flat[probed]]
    q_order = np.lexsort((query_rows, query_ranks))
    query_offsets = np.searchsorted(query_ranks[q_order], np.arange(nlist + 1))
    save_array(folder / f"{number:06d}.rows.npy", rows[order])
    save_array(folder / f"{number:06d}.vectors.npy", np.ascontiguousarray(vectors[order], dtype=np.float32))
    save_array(folder / f"{number:06d}.where.npy", where)
    save_array(folder / f"{number:06d}.probes.npy", query_rows[q_order])
    save_array(folder / f"{number:06d}.off.npy", np.stack([member_offsets, query_offsets]).astype(np.int64))


def write_probing(folder: Path, number: int, rows: np.ndarray, vectors: np.ndarray, probes: np.ndarray,
                  rank: np.ndarray) -> None:
    """A part of a leakage check's other corpus: its vectors once, in row order (`where` is then
    the identity), and the row of every (row, list probed), as write_partition; no members."""
    nlist = len(rank)
    flat = probes.ravel()
    probed = np.nonzero(flat >= 0)[0]
    query_rows = rows[probed // max(probes.shape[1], 1)]
    query_ranks = rank[flat[probed]]
    order = np.lexsort((query_rows, query_ranks))
    offsets = np.stack([np.zeros(nlist + 1, np.int64), np.searchsorted(query_ranks[order], np.arange(nlist + 1))])
    save_array(folder / f"q{number:06d}.vectors.npy", np.ascontiguousarray(vectors, dtype=np.float32))
    save_array(folder / f"q{number:06d}.where.npy", np.arange(len(rows), dtype=np.int64))
    save_array(folder / f"q{number:06d}.rows.npy", np.zeros(0, np.int64))
    save_array(folder / f"q{number:06d}.probes.npy", query_rows[order])
    save_array(folder / f"q{number:06d}.off.npy", offsets.astype(np.int64))


def read_ranks(folder: Path, runs: int, lo: int, hi: int, prefix: str = ""):
    """Ranks lo..hi-1's members and probing rows from every run, each with its rank."""
    members, member_rank, queries, query_rank = [], [], [], []
    for number in range(runs):
        off = np.load(folder / f"{prefix}{number:06d}.off.npy")
        for kind, ids, ranks, offsets in (("rows", members, member_rank, off[0]),
                                          ("probes", queries, query_rank, off[1])):
            taken = np.load(folder / f"{prefix}{number:06d}.{kind}.npy", mmap_mode="r")
            ids.append(np.array(taken[offsets[lo]:offsets[hi]]))
            ranks.append(np.repeat(np.arange(lo, hi), np.diff(offsets[lo:hi + 1])))
            del taken
    return tuple(np.concatenate(column) if column else np.zeros(0, np.int64)
                 for column in (members, member_rank, queries, query_rank))


def read_member_vectors(folder: Path, runs: int, lo: int, hi: int) -> np.ndarray:
    """Ranks lo..hi-1's member vectors from every run, in read_ranks's order."""
    taken = []
    for number in range(runs):
        off = np.load(folder / f"{number:06d}.off.npy")[0]
        vectors = np.load(folder / f"{number:06d}.vectors.npy", mmap_mode="r")
        taken.append(np.array(vectors[off[lo]:off[hi]]))
        del vectors
    return np.concatenate(taken)


def read_rows(folder: Path, starts: np.ndarray, rows: np.ndarray, out: np.ndarray, prefix: str = "") -> np.ndarray:
    """The stored vectors of `rows` (ascending) into `out` (len(rows) x dim, C-contiguous), each
    read from the run of its part at its slot there (memory-mapped, slots sorted: only those rows'
    pages are read, and each is copied once, straight into `out`). Returns where each row went:
    rows[i]'s vector is out[returned[i]] (the rows of a part in the order of their slots)."""
    placed = np.empty(len(rows), np.int64)
    parts = np.searchsorted(starts, rows, side="right") - 1
    edges = np.r_[0, np.nonzero(np.diff(parts))[0] + 1, len(rows)] if len(rows) else [0]
    for lo, hi in zip(edges[:-1], edges[1:]):  # `rows` ascending: each part's rows are consecutive
        number = int(parts[lo])
        slots = np.load(folder / f"{prefix}{number:06d}.where.npy", mmap_mode="r")[rows[lo:hi] - starts[number]]
        order = np.argsort(slots, kind="stable")
        vectors = np.load(folder / f"{prefix}{number:06d}.vectors.npy", mmap_mode="r")
        np.take(vectors, slots[order], axis=0, out=out[lo:hi], mode="clip")  # (clip: no buffered copy)
        placed[lo + order] = np.arange(lo, hi)
        del vectors
    return placed


def partition_done(folder: Path, part: IndexPart) -> bool:
    return (folder / f"{'q' if part.against else ''}{part.number:06d}.off.npy").exists()


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
    """Consecutive lists (`sizes` in join order) in groups of about TASK_BYTES of vectors (a
    list's members, times nprobe + 1 for the queries that probe it on average, at most), at least
    MIN_TASKS groups (at most one per list): the rank boundaries, groups + 1 of them. A list
    larger than a task is a task."""
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


def list_order(quantizer: faiss.Index, nlist: int, width: int = 8) -> np.ndarray:
    """The lists in an order where each is followed, where it can be, by one of its `width`
    nearest lists (by centroid): a chain through the centroids, so that a group of consecutive
    lists holds most of the rows that probe it (their own list is nearby). Python per list,
    once, in the driver: about a second per 100k lists."""
    try:
        centroids = quantizer.reconstruct_n(0, nlist)
    except RuntimeError:  # a quantizer that cannot give its centroids back: index order
        return np.arange(nlist, dtype=np.int64)
    near = quantizer_probes(quantizer, [np.ascontiguousarray(centroids, np.float32)], min(width + 1, nlist))
    seen = np.zeros(nlist, bool)
    order, current, unseen = [], 0, 0
    for _ in range(nlist):
        seen[current] = True
        order.append(current)
        nxt = next((int(c) for c in near[current] if c >= 0 and not seen[c]), -1)
        if nxt < 0:
            while unseen < nlist and seen[unseen]:
                unseen += 1
            if unseen == nlist:
                break
            nxt = unseen
        current = nxt
    return np.asarray(order, np.int64)


def _write_layout(ivf: faiss.IndexIVF, stage: Path, nprobe: int, dim: int, starts: np.ndarray) -> None:
    if not (stage / "quantizer.faiss").exists():
        faiss.write_index(ivf.quantizer, str(stage / "quantizer.faiss.tmp"))
        os.replace(stage / "quantizer.faiss.tmp", stage / "quantizer.faiss")
    if not (stage / "lists.npy").exists():
        _lists_file(ivf, stage / "lists.npy")
    if not (stage / "order.npy").exists():
        save_array(stage / "order.npy", list_order(ivf.quantizer, ivf.nlist))
    if not (stage / "starts.npy").exists():
        save_array(stage / "starts.npy", starts.astype(np.int64))
    if not (stage / "groups.npy").exists():
        sizes = np.array([ivf.invlists.list_size(n) for n in range(ivf.nlist)], np.int64)
        save_array(stage / "groups.npy", group_bounds(sizes[np.load(stage / "order.npy")], nprobe, dim))
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


def against_parts(emb: EmbeddingsDir, parts: list) -> list[IndexPart]:
    """The parts of a leakage check's other corpus in its row order, with the row each starts at."""
    found, start = [], 0
    for number, part in enumerate(parts):
        found.append(IndexPart(number, emb.location, part.shard, start, part.rows, against=True))
        start += part.rows
    return found


def partitioned_join(searcher, scale: Scale, threshold: float, cap: int, progress: bool | None = None,
                     against: list[IndexPart] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, dict]:
    """The self-join of an IVF index's rows at its nprobe, as partition and join tasks:
    (query row, db row, score, capped queries, stats), the pairs range_join finds. With `against`
    (the other corpus's parts, against_parts), the leakage check instead: those rows are the
    queries (rows of that corpus), the index's rows the members, as range_join without self-join."""
    ivf = faiss.extract_index_ivf(searcher.index)
    nprobe = min(ivf.nprobe, ivf.nlist)
    manifest = searcher.manifest
    precision = scale.product_precision
    identity = {"index": str(Path(searcher.dir.path).resolve()), "count": manifest.count,
                "files": manifest.files, "factory": manifest.factory, "nprobe": nprobe,
                "threshold": threshold, "max_neighbors": cap, "precision": precision, "layout": LAYOUT,
                "against": [[p.embeddings, p.shard, p.rows] for p in against or []]}
    stage = scale.work.stage("embedding", identity)
    parts = [PartitionTask(f"partition-{p.shard}", p) for p in index_parts(searcher)]
    _write_layout(ivf, stage, nprobe, manifest.dim, np.array([t.part.start for t in parts], np.int64))
    if against and not (stage / "against_starts.npy").exists():
        save_array(stage / "against_starts.npy", np.array([p.start for p in against], np.int64))
    index_tasks = len(parts)
    parts += [PartitionTask(f"partition-against-{p.shard}", p) for p in against or []]
    groups = len(np.load(stage / "groups.npy")) - 1
    joins = [JoinTask(f"join-{g:06d}", g) for g in range(groups)]
    todo_parts = [t for t in parts if not partition_done(stage / "runs", t.part)]
    todo_joins = [t for t in joins if not (stage / "pairs" / f"{t.group:06d}.npz").exists()]
    stats = {"nprobe": nprobe, "partition_tasks": len(parts), "join_tasks": groups,
             "reused_tasks": len(parts) - len(todo_parts) + groups - len(todo_joins), "precision": precision}
    placement = scale.placement()
    factory = JoinWorkers(str(stage), manifest.dim, nprobe, index_tasks, threshold, cap, scale.device, precision,
                          len(against or []))
    started = time.perf_counter()
    done = run_tasks(placement, factory, todo_parts, "partition", progress)
    stats["partition_s"] = round(time.perf_counter() - started, 2)
    stats["partition_bytes"] = sum(p.stat().st_size for p in (stage / "runs").iterdir() if p.is_file())
    stats["vector_bytes"] = (manifest.count + sum(p.rows for p in against or [])) * 4 * int(manifest.dim)
    stats["storage"] = "float32"  # the members' vectors, stored once; the products' inputs as stored
    started = time.perf_counter()
    done += run_tasks(placement, factory, todo_joins, "join", progress)
    stats["join_s"] = round(time.perf_counter() - started, 2)
    stats["workers"] = placement.workers
    stats["worker_peak_rss_mb"] = max((r["peak_rss_mb"] or 0 for r in done), default=None)
    stats["temporary_bytes"] = sum(p.stat().st_size for p in stage.rglob("*") if p.is_file())
    joined = [r for r in done if "remote_queries" in r]
    if joined:  # this run's join tasks: how many query vectors they read from other groups' partitions
        stats["queries_read_elsewhere"] = round(sum(r["remote_queries"] for r in joined) /
                                                max(1, sum(r["queries"] for r in joined)), 3)
    pairs = CappedPairs(cap)
    for task in joins:
        with np.load(stage / "pairs" / f"{task.group:06d}.npz") as found:
            pairs.add(found["q"], found["d"], found["s"])
            pairs.add_capped(found["capped"])
    q, d, s, capped = pairs.final()
    return q, d, s, len(capped), stats
