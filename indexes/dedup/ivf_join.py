"""Every pair above a cosine threshold between query vectors and an IVF index, list by list.

Searching one query at a time reads each of its `nprobe` inverted lists from memory once per
query: at a million queries that is terabytes of memory traffic for a few thousand dot
products each. Here the queries are bucketed by the lists they probe (the same coarse
quantizer and `nprobe` as a search), and each list is compared with all of its queries in
one matrix product on the stored full-precision vectors. A pair is a candidate exactly when
a search with the same `nprobe` would have examined it (from either side, in a self-join),
so recall equals a search's, at the speed of matrix products. Only the list ids are read from the index
(its codes are never touched), and memory is O(N * nprobe) ints plus the pairs found.
"""
from __future__ import annotations

import faiss
import numpy as np

from imgindex.progress import progress_bar

QUERY_BLOCK = 2048  # query rows per matrix product
MEMBER_BLOCK = 16384  # list members per matrix product (only huge lists are split)
COMPACT_AT = 8_000_000  # pairs held before the per-query cap is applied


def coarse_probes(ivf: faiss.IndexIVF, blocks, nprobe: int) -> np.ndarray:
    """The `nprobe` lists each query probes, as a search would choose them (N x nprobe int32)."""
    return quantizer_probes(ivf.quantizer, blocks, nprobe)


def quantizer_probes(quantizer: faiss.Index, blocks, nprobe: int) -> np.ndarray:
    """The `nprobe` lists each vector probes, with an IVF index's coarse quantizer (N x nprobe int32)."""
    quantizer = faiss.downcast_index(quantizer)
    if not isinstance(quantizer, faiss.IndexHNSW):
        return np.concatenate([quantizer.search(block, nprobe)[1].astype(np.int32) for block in blocks])
    ef = quantizer.hnsw.efSearch  # an HNSW quantizer must look at least nprobe candidates wide
    quantizer.hnsw.efSearch = max(ef, nprobe)
    try:
        return np.concatenate([quantizer.search(block, nprobe)[1].astype(np.int32) for block in blocks])
    finally:
        quantizer.hnsw.efSearch = ef


def list_ids(ivf: faiss.IndexIVF, number: int) -> np.ndarray:
    size = ivf.invlists.list_size(number)
    if not size:
        return np.zeros(0, np.int64)
    pointer = ivf.invlists.get_ids(number)
    ids = faiss.rev_swig_ptr(pointer, size).copy()
    ivf.invlists.release_ids(number, pointer)
    return ids


def lists_of(ivf: faiss.IndexIVF, rows: np.ndarray) -> np.ndarray:
    """The inverted list of each of `rows` (ascending ids): one pass over the lists' ids, memory
    O(rows + the largest list), not O(ntotal) as list_numbers."""
    lists = np.full(len(rows), -1, np.int32)
    for number in range(ivf.nlist):
        ids = list_ids(ivf, number)
        hit = ids[np.isin(ids, rows)]
        lists[np.searchsorted(rows, hit)] = number
    return lists


def smallest_nprobe(ivf: faiss.IndexIVF, queries: np.ndarray, lists: np.ndarray, values: list[int],
                    target: float) -> tuple[int, float]:
    """The smallest of `values` for which `target` of the queries probe their own list in `lists`
    (the list of the vector each should find), and the fraction that do."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    recall = 0.0
    for value in values:
        probes = coarse_probes(ivf, [queries], value)
        recall = float(np.mean((probes == lists[:, None]).any(axis=1)))
        if recall >= target:
            break
    return value, recall


def range_join(ivf: faiss.IndexIVF, queries, db_vectors: np.ndarray, nprobe: int, threshold: float,
               max_neighbors: int, self_join: bool, progress: bool | None = None,
               desc: str = "neighbours") -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(query row, db row, cosine, capped queries) for the pairs at or above `threshold`.

    `queries` has `.blocks()` and `.vectors` (rows, read in order and by row); `db_vectors`
    are the index's vectors by id. Each query keeps its `max_neighbors` most similar hits
    (self-pairs excluded in a self-join); `capped` counts the queries that had more.
    """
    nprobe = min(nprobe, ivf.nlist)
    probes = coarse_probes(ivf, queries.blocks(), nprobe)
    order = np.argsort(probes.ravel(), kind="stable")
    query_of = (order // nprobe).astype(np.int64)  # query rows grouped by list, ascending in each
    bounds = np.r_[0, np.cumsum(np.bincount(probes.ravel(), minlength=ivf.nlist))]
    del probes, order
    pairs = CappedPairs(max_neighbors)
    for number in progress_bar(range(ivf.nlist), desc=desc, unit="list", progress=progress):
        rows = query_of[bounds[number]:bounds[number + 1]]
        members = np.sort(list_ids(ivf, number)) if len(rows) else ()
        if len(members):
            list_pairs(rows, lambda lo, hi: queries.vectors[rows[lo:hi]], members,
                       lambda lo, hi: db_vectors[members[lo:hi]], threshold, self_join, pairs.add)
    return pairs.result()


def list_pairs(rows: np.ndarray, query_vectors, members: np.ndarray, member_vectors, threshold: float,
               self_join: bool, add, product=None) -> None:
    """Every (query row, member row, score) of one inverted list at or above `threshold`, to `add`:
    blocks of QUERY_BLOCK queries x MEMBER_BLOCK members, one matrix product each. `rows` and
    `members` are ascending row ids, `*_vectors(lo, hi)` the vectors of positions lo..hi of them;
    `product(queries, members, threshold)` -> (i, j, score) replaces the float32 numpy product
    (e.g. on a GPU). The blocks are the same wherever a list is joined, so are the scores."""
    for m in range(0, len(members), MEMBER_BLOCK):
        ids = members[m:m + MEMBER_BLOCK]
        block = np.asarray(member_vectors(m, m + len(ids)), dtype=np.float32)
        for q in range(0, len(rows), QUERY_BLOCK):
            chunk = rows[q:q + QUERY_BLOCK]
            vectors = np.asarray(query_vectors(q, q + len(chunk)), dtype=np.float32)
            if product is None:
                scores = vectors @ block.T
                i, j = np.nonzero(scores >= threshold)
                found = scores[i, j]
            else:
                i, j, found = product(vectors, block, threshold)
            if self_join:
                other = chunk[i] != ids[j]
                i, j, found = i[other], j[other], found[other]
            add(chunk[i], ids[j], found)


class CappedPairs:
    """Pairs found so far; past COMPACT_AT of them, each query keeps only its best `cap`."""

    def __init__(self, cap: int):
        self.cap = cap
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.held = 0
        self.capped = np.zeros(0, np.int64)  # queries that had more than `cap` hits

    def add(self, q: np.ndarray, d: np.ndarray, s: np.ndarray) -> None:
        if len(q):
            self.parts.append((q, d, s.astype(np.float32)))
            self.held += len(q)
            if self.held > COMPACT_AT:
                self.parts = [self._compact()]
                self.held = len(self.parts[0][0])

    def _compact(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        q, d, s = (np.concatenate(column) for column in zip(*self.parts))
        counts = np.bincount(q)
        over = np.nonzero(counts > self.cap)[0]
        if not len(over):
            return q, d, s
        self.capped = np.union1d(self.capped, over)
        order = np.lexsort((d, -s, q))  # by query, most similar first (ties: the smaller row)
        q, d, s = q[order], d[order], s[order]
        rank = np.arange(len(q)) - np.r_[0, np.cumsum(counts)[:-1]][q]
        keep = rank < self.cap
        return q[keep], d[keep], s[keep]

    def add_capped(self, queries: np.ndarray) -> None:
        """Queries known to have had more than `cap` hits (e.g. in a task that kept their best `cap`)."""
        self.capped = np.union1d(self.capped, queries)

    def final(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(query, db, score) of every pair kept, and the queries that had more than `cap`."""
        q, d, s = self._compact()
        return q, d, s, self.capped

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        q, d, s, capped = self.final()
        return q, d, s, len(capped)
