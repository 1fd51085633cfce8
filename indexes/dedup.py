"""Duplicates across a corpus, in three tiers, and train/test leakage.

- exact: the same encoded bytes (stored sha256);
- phash: stored 64-bit perceptual hashes within a Hamming distance, found with a FAISS
  multi-index-hashing binary index (sub-quadratic; exact for distance < number of tables);
- embedding: the index's neighbours above a cosine threshold (a range search bounded by
  `max_neighbors`; on an IVF index a list-by-list join, indexes.ivf_join), every candidate
  re-checked against the stored full-precision vectors, so a compressed index never decides alone.

Pairs become groups by connected components; a component whose members are not all
close to its kept member is split around kept members (greedy, in keep order), so a chain
A~B~C never joins A and C unless C is close to A's group's kept image. No step holds more
than O(N) memory besides the index and a disk-backed copy of the vectors.
"""
from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from imgindex.progress import progress_bar
from imgindex.indexes.embeddings import EmbeddingsDir, Part
from imgindex.indexes.factory import knob_values, set_knob
from imgindex.indexes.recall import sweep
from imgindex.indexes.ivf_join import list_numbers, range_join, smallest_nprobe
from imgindex.indexes.query import Searcher
from imgindex.errors import ConfigError
from imgindex.pipeline.writer import identity_changes

log = logging.getLogger(__name__)

METHODS = ("exact", "phash", "embedding")
KEEP_POLICIES = ("largest", "first", "smallest-file")
META_COLUMNS = ["shard", "key", "width", "height", "bytes", "grayscale", "sha256", "phash"]
BATCH = 8192
MAX_EXACT_PARTNERS = 100  # byte-identical copies paired with each image (every pair up to 101 copies)
PAIR_SCHEMA = pa.schema([
    ("a_shard", pa.string()), ("a_key", pa.string()), ("b_shard", pa.string()), ("b_key", pa.string()),
    ("similarity", pa.float32()), ("kind", pa.string()), ("phash_distance", pa.int32()),
])
GROUP_SCHEMA = pa.schema([
    ("shard", pa.string()), ("key", pa.string()), ("group_id", pa.int64()), ("keep", pa.bool_()),
    ("reason", pa.string()), ("group_size", pa.int32()), ("min_similarity", pa.float32()),
    ("similarity", pa.float32()), ("kind", pa.string()), ("phash_distance", pa.int32()),
])


@dataclass
class DedupOptions:
    methods: tuple[str, ...] = METHODS
    threshold: float = 0.95  # cosine, embedding tier
    phash_distance: int = 4  # Hamming distance, phash tier
    keep: str = "largest"
    max_neighbors: int = 100  # embedding tier: neighbours examined per image

    def check(self) -> None:
        unknown = set(self.methods) - set(METHODS)
        if unknown or not self.methods:
            raise ConfigError(f"--method takes a comma list of {', '.join(METHODS)}; got {','.join(self.methods)}")
        if self.keep not in KEEP_POLICIES:
            raise ConfigError(f"--keep must be one of {', '.join(KEEP_POLICIES)}, got {self.keep!r}")
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"--threshold is a cosine similarity in (0, 1], got {self.threshold}")
        if not 0 <= self.phash_distance <= 16:
            raise ConfigError(f"--phash-distance must be 0 to 16 bits, got {self.phash_distance}")


@dataclass
class DedupResult:
    pairs: pa.Table  # PAIR_SCHEMA
    groups: pa.Table  # GROUP_SCHEMA, members of groups of two or more
    stats: dict = field(default_factory=dict)

    @property
    def removed(self) -> int:
        return int(self.groups.num_rows - pc.sum(self.groups["keep"]).as_py()) if self.groups.num_rows else 0


class Corpus:
    """Rows of some parts in order: metadata columns and a float32 file of the normalized
    vectors. Blocks are read from the file (`blocks()`), single rows through a read-only
    memory map (`vectors[rows]`), so the process holds O(block) of the vectors, not O(N)."""

    def __init__(self, parts: list[tuple[EmbeddingsDir, Part]], dim: int, workdir: Path,
                 progress: bool | None = None, name: str = "vectors"):
        count = sum(part.rows for _, part in parts)
        self.path, self.dim = workdir / f"{name}.f32", dim
        tables, row = [], 0
        bar = progress_bar(total=count, unit="vec", desc=f"read {name}", progress=progress)
        with open(self.path, "wb") as out:
            for emb, part in parts:
                for _, _, vectors in emb.iter_batches([part]):
                    out.write(np.ascontiguousarray(vectors, dtype=np.float32).tobytes())
                    row += len(vectors)
                    bar.update(len(vectors))
                tables.append(emb.read_columns(part.shard, META_COLUMNS))
        bar.close()
        if row != count:
            raise ConfigError(f"the parts hold {row} rows, not the {count} recorded: rebuild the index")
        pa.default_memory_pool().release_unused()  # Parquet decoding leaves freed pages in the allocator
        self.vectors = np.memmap(self.path, dtype=np.float32, mode="r", shape=(count, dim))
        self.meta = pa.concat_tables(tables).combine_chunks()  # one chunk: fast take and scalar access
        self.phash, self.phash_valid = hashes(self.meta["phash"])
        self.sha = self.meta["sha256"].combine_chunks()

    @classmethod
    def of_index(cls, searcher: Searcher, workdir: Path, progress: bool | None = None) -> "Corpus":
        """The index's rows in index order, checked row by row against ids.parquet."""
        parts = []
        for part in searcher.manifest["parts"]:
            emb = searcher.embeddings_for(part["shard"])
            if emb is None:
                raise ConfigError(f"the embeddings of shard {part['shard']} are gone: dedup reads the stored vectors")
            parts.append((emb, emb.part(part["shard"], part["rows"])))
        corpus = cls(parts, searcher.manifest["dim"], workdir, progress)
        ids = searcher.ids
        if not (corpus.meta["key"].equals(ids["key"]) and corpus.meta["shard"].equals(ids["shard"])):
            raise ConfigError("the embeddings changed since the index was built (rows do not line up with "
                              "ids.parquet): rebuild the index")
        return corpus

    def __len__(self) -> int:
        return len(self.vectors)

    def blocks(self, rows: int = BATCH):
        """The vectors in order, `rows` at a time, read (not mapped) from the file."""
        with open(self.path, "rb") as f:
            while block := f.read(rows * self.dim * 4):
                yield np.frombuffer(block, dtype=np.float32).reshape(-1, self.dim)


def _unique_pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    keep = lo != hi
    both = np.unique(np.stack([lo[keep], hi[keep]], axis=1), axis=0) if keep.any() else np.zeros((0, 2), np.int64)
    return both[:, 0].astype(np.int64), both[:, 1].astype(np.int64)


def sha_codes(*columns: pa.ChunkedArray | pa.Array) -> list[np.ndarray]:
    """One integer code per distinct sha256 across all `columns` (-1 for null), one array each."""
    arrays = [c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c for c in columns]
    codes = pc.dictionary_encode(pa.concat_arrays(arrays)).indices.fill_null(-1).to_numpy(zero_copy_only=False)
    bounds = np.cumsum([0] + [len(a) for a in arrays])
    return [codes[lo:hi].astype(np.int64) for lo, hi in zip(bounds[:-1], bounds[1:])]


def exact_pairs(q_codes: np.ndarray, d_codes: np.ndarray, self_join: bool,
                partners: int = MAX_EXACT_PARTNERS) -> tuple[np.ndarray, np.ndarray]:
    """(query row, db row) of every pair with the same bytes: each query row with up to `partners`
    db rows of its hash (the first ones), so a group of up to `partners` + 1 copies gives every
    pair, and a huge group stays O(rows x partners), not quadratic."""
    d_rows = np.nonzero(d_codes >= 0)[0]
    d_rows = d_rows[np.argsort(d_codes[d_rows], kind="stable")]
    d_sorted = d_codes[d_rows]
    q_rows = np.nonzero(q_codes >= 0)[0]
    lo = np.searchsorted(d_sorted, q_codes[q_rows], side="left")
    hi = np.minimum(np.searchsorted(d_sorted, q_codes[q_rows], side="right"), lo + partners + int(self_join))
    counts = hi - lo
    q = np.repeat(q_rows, counts)
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    d = d_rows[np.repeat(lo, counts) + offsets]
    return q.astype(np.int64), d.astype(np.int64)  # a self-join's (row, row) pairs are dropped by the caller


def hashes(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """An int64 column with nulls -> (int64 values, validity); never through float64."""
    valid = np.asarray(pc.is_valid(column).combine_chunks().to_numpy(zero_copy_only=False), dtype=bool)
    values = pc.fill_null(column, 0).combine_chunks().to_numpy(zero_copy_only=False).astype(np.int64)
    return values, valid


def _binary_codes(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values.astype(np.int64)).view(np.uint8).reshape(-1, 8)


# Seconds per unit on the 2-core development machine (benchmarks/phash_scale.py): a bucket
# probed by multi-index hashing, a candidate it compares, a pair the exhaustive scan compares
# (faiss's SIMD popcount). Only their ratios matter: they choose the faster exact method.
PROBE_S, CANDIDATE_S, SCAN_S = 1.1e-8, 5.8e-8, 1.8e-10


def phash_plan(queries: int, db: int, distance: int) -> tuple[int, float]:
    """How to find every pair within `distance` bits fastest, exactly: (tables, estimated s),
    tables 0 meaning the exhaustive scan.

    Multi-index hashing with t tables of 64 // t bits is exact when it probes every bucket
    within distance // t flips (two hashes within `distance` bits differ in at most that many
    bits of one table's substring: pigeonhole). Its cost grows with the buckets probed
    (linear in the queries) and the candidates in them (uniform hashes: t * probes / 2^bits of
    the database per query); the scan compares every pair. Small distances hash, large ones
    (from about 10 bits below a few million hashes) scan.
    """
    best = (0, queries * db * SCAN_S)
    for tables in range(1, 9):
        bits = 64 // tables
        probes = tables * sum(math.comb(bits, i) for i in range(distance // tables + 1))
        cost = queries * probes * PROBE_S + queries * db * probes / 2**bits * CANDIDATE_S
        if cost < best[1]:
            best = (tables, cost)
    return best


def phash_pairs(db: tuple[np.ndarray, np.ndarray], distance: int,
                queries: tuple[np.ndarray, np.ndarray] | None = None,
                progress: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every pair within `distance` bits, exactly: (query row, database row); (values, valid)
    inputs. Null hashes never match. The method (hash tables or an exhaustive scan) is the
    faster one by `phash_plan`; both give the same pairs."""
    queries = queries or db
    db_rows, q_rows = np.nonzero(db[1])[0], np.nonzero(queries[1])[0]
    if not len(db_rows) or not len(q_rows):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    tables, _ = phash_plan(len(q_rows), len(db_rows), distance)
    if tables:
        index = faiss.IndexBinaryMultiHash(64, tables, 64 // tables)
        index.nflip = distance // tables
    else:
        index = faiss.IndexBinaryFlat(64)
    index.add(_binary_codes(db[0][db_rows]))
    found_q, found_db = [], []
    codes = _binary_codes(queries[0][q_rows])
    for start in progress_bar(range(0, len(codes), BATCH), desc="phash", unit="batch", progress=progress):
        lims, _, ids = index.range_search(codes[start:start + BATCH], distance + 1)
        counts = np.diff(lims).astype(np.int64)
        found_q.append(q_rows[start + np.repeat(np.arange(len(counts)), counts)])
        found_db.append(db_rows[ids])
    return np.concatenate(found_q), np.concatenate(found_db)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x = np.bitwise_xor(a.astype(np.int64), b.astype(np.int64)).view(np.uint64)
    return np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1).astype(np.int32)


def embedding_candidates(index: faiss.Index, queries: Corpus, db: Corpus, threshold: float, max_neighbors: int,
                         self_join: bool, progress: bool | None = None, desc: str = "neighbours"):
    """(query row, index row, capped queries): each query's index neighbours at cosine >= threshold,
    at most `max_neighbors` of them (not counting itself in a self-join).

    A plain IVF index is joined list by list on the stored vectors (indexes.ivf_join: the same
    candidates as a search at its nprobe, at the speed of matrix products); other index types
    are searched query by query.
    """
    ivf = faiss.downcast_index(index)
    if isinstance(ivf, faiss.IndexIVF):
        q, d, _, capped = range_join(ivf, queries, db.vectors, ivf.nprobe, threshold, max_neighbors, self_join,
                                     progress, desc)
        return q, d, capped
    found_q, found_db, capped, start = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], 0, 0
    keep = max_neighbors + int(self_join)
    k = min(keep + 1, index.ntotal)  # one more than kept: a hit there means some were left out
    with progress_bar(total=len(queries), desc=desc, unit="vec", progress=progress) as bar:
        for block in queries.blocks():
            scores, rows = index.search(block, k)
            hit = (scores >= threshold) & (rows >= 0)
            if k > keep:
                capped += int(hit[:, keep].sum())
                hit = hit[:, :keep]
            q, j = np.nonzero(hit)
            found_q.append(start + q)
            found_db.append(rows[q, j])
            start += len(block)
            bar.update(len(block))
    return np.concatenate(found_q).astype(np.int64), np.concatenate(found_db).astype(np.int64), capped


def _components(a: np.ndarray, b: np.ndarray, count: int) -> np.ndarray:
    """Connected-component label (smallest row id) of every row; label propagation, O(pairs) memory."""
    label = np.arange(count, dtype=np.int64)
    while True:
        lo = np.minimum(label[a], label[b])
        before = label.copy()
        np.minimum.at(label, a, lo)
        np.minimum.at(label, b, lo)
        label = label[label]
        if np.array_equal(label, before):
            return label


def _strictest(a: np.ndarray, b: np.ndarray, kinds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row per (a, b): the strictest tier that found it (exact < phash < embedding)."""
    order = np.lexsort((kinds, b, a))
    a, b, kinds = a[order], b[order], kinds[order]
    first = np.r_[True, (a[1:] != a[:-1]) | (b[1:] != b[:-1])]
    return a[first], b[first], kinds[first]


def cosines(queries: Corpus, a: np.ndarray, db: Corpus, b: np.ndarray) -> np.ndarray:
    """Cosine of query row a[i] and db row b[i] on the stored full-precision vectors."""
    out = np.empty(len(a), np.float32)
    for start in range(0, len(a), BATCH):
        sl = slice(start, start + BATCH)
        out[sl] = np.einsum("ij,ij->i", queries.vectors[a[sl]], db.vectors[b[sl]])
    return out


@dataclass
class Pairs:
    """Duplicate pairs between query rows `a` and db rows `b`, with the tier that decides each."""

    a: np.ndarray
    b: np.ndarray
    kinds: np.ndarray  # index into METHODS
    similarity: np.ndarray  # cosine on the stored vectors
    distance: np.ndarray  # phash Hamming distance
    distance_valid: np.ndarray


def find_pairs(searcher: Searcher, queries: Corpus, db: Corpus, options: DedupOptions, self_join: bool,
               stats: dict, progress: bool | None = None) -> Pairs:
    """The three tiers, the same code for the self-join (queries is db) and for `--against`.

    Each enabled tier proposes pairs; a pair takes the strictest tier that holds for it, so
    identical bytes are `exact` whichever tier found them first.
    """
    q_codes, d_codes = sha_codes(queries.sha, db.sha)
    found_a, found_b, found_kind = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]

    def found(a: np.ndarray, b: np.ndarray, kind: str) -> None:
        if self_join:
            a, b = _unique_pairs(a, b)
        found_a.append(a)
        found_b.append(b)
        found_kind.append(np.full(len(a), METHODS.index(kind)))
        stats[f"{kind}_candidates"] = int(len(a))

    if "exact" in options.methods:
        found(*exact_pairs(q_codes, d_codes, self_join), "exact")
    if "phash" in options.methods:
        found(*phash_pairs((db.phash, db.phash_valid), options.phash_distance,
                           queries=None if self_join else (queries.phash, queries.phash_valid), progress=progress),
              "phash")
    if "embedding" in options.methods:
        stats["search"] = tune_for_threshold(searcher, db, options.threshold, options.max_neighbors + int(self_join))
        q, d, capped = embedding_candidates(searcher.index, queries, db, options.threshold, options.max_neighbors,
                                            self_join, progress, desc="neighbours" if self_join else "against")
        if self_join:
            q, d = _unique_pairs(q, d)
        confirmed = cosines(queries, q, db, d) >= options.threshold
        stats.update(embedding_rejected_by_recheck=int((~confirmed).sum()), images_with_capped_neighbours=capped)
        if capped:
            log.warning("%d images have more than %d neighbours above the threshold: only the nearest %d were "
                        "examined (--max-neighbors)", capped, options.max_neighbors, options.max_neighbors)
        found(q[confirmed], d[confirmed], "embedding")
    a, b, kinds = _strictest(np.concatenate(found_a), np.concatenate(found_b), np.concatenate(found_kind))
    same_bytes = (q_codes[a] >= 0) & (q_codes[a] == d_codes[b])
    kinds[same_bytes] = METHODS.index("exact")
    for number, kind in enumerate(METHODS):
        if kind in options.methods:
            stats[f"{kind}_pairs"] = int((kinds == number).sum())
    return Pairs(a, b, kinds, cosines(queries, a, db, b), hamming(queries.phash[a], db.phash[b]),
                 queries.phash_valid[a] & db.phash_valid[b])


def _keep_order(corpus: Corpus, rows: np.ndarray, policy: str) -> np.ndarray:
    keys = corpus.meta["key"].take(rows).to_pylist()
    shards = corpus.meta["shard"].take(rows).to_pylist()
    size = [s if s is not None else 0 for s in corpus.meta["bytes"].take(rows).to_pylist()]
    if policy == "largest":
        width = pc.fill_null(corpus.meta["width"].take(rows), 0).to_numpy().astype(np.int64)
        height = pc.fill_null(corpus.meta["height"].take(rows), 0).to_numpy().astype(np.int64)
        gray = [bool(g) for g in corpus.meta["grayscale"].take(rows).to_pylist()]
        order = sorted(range(len(rows)), key=lambda i: (-width[i] * height[i], gray[i], -size[i], keys[i], shards[i]))
    elif policy == "smallest-file":
        order = sorted(range(len(rows)), key=lambda i: (size[i] or 2**62, keys[i], shards[i]))
    else:
        order = list(range(len(rows)))  # rows are in corpus (index) order already
    return rows[np.asarray(order)]


def _reason(corpus: Corpus, row: int, policy: str) -> str:
    if policy == "largest":
        w, h = corpus.meta["width"][row].as_py(), corpus.meta["height"][row].as_py()
        gray = corpus.meta["grayscale"][row].as_py()
        colour = {True: "grayscale", False: "colour", None: "colour unknown"}[gray]
        return (f"largest: {w}x{h} pixels, {colour}, {corpus.meta['bytes'][row].as_py()} bytes "
                "(most pixels, then colour over grayscale, then most bytes, then smallest key)")
    if policy == "smallest-file":
        return f"smallest file: {corpus.meta['bytes'][row].as_py()} bytes"
    return "first in corpus order"


def group_duplicates(corpus: Corpus, a: np.ndarray, b: np.ndarray, options: DedupOptions) -> pa.Table:
    """Components of the pair graph, split so every member is close to its group's kept member."""
    if not len(a):
        return GROUP_SCHEMA.empty_table()
    (codes,) = sha_codes(corpus.sha)
    label = _components(a, b, len(corpus))
    members = np.nonzero(np.bincount(label, minlength=len(corpus))[label] > 1)[0]
    order = members[np.argsort(label[members], kind="stable")]
    bounds = np.nonzero(np.r_[True, label[order][1:] != label[order][:-1], True])[0]
    rows, centres, group_ids, sizes, min_sims, sims = [], [], [], [], [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        pending = _keep_order(corpus, order[lo:hi], options.keep)
        while len(pending) > 1:
            centre = pending[0]
            close = _close_to(corpus, codes, centre, pending, options)
            group, pending = pending[close], pending[~close]
            if len(group) < 2:
                continue
            block = corpus.vectors[group]
            similarity = block @ corpus.vectors[centre]
            rows.append(group)
            centres.append(np.full(len(group), centre))
            group_ids.append(np.full(len(group), len(sizes)))
            sims.append(similarity)
            sizes.append(len(group))
            min_sims.append(float((block @ block.T).min()) if len(group) <= 2048 else float(similarity.min()))
    if not rows:
        return GROUP_SCHEMA.empty_table()
    rows, centres, group_ids = np.concatenate(rows), np.concatenate(centres), np.concatenate(group_ids)
    keep = rows == centres
    distance = hamming(corpus.phash[rows], corpus.phash[centres])
    both = corpus.phash_valid[rows] & corpus.phash_valid[centres]
    kind = np.where((codes[rows] >= 0) & (codes[rows] == codes[centres]), "exact",
                    np.where(both & (distance <= options.phash_distance) & ("phash" in options.methods),
                             "phash", "embedding")).astype(object)
    kind[keep] = None
    reasons = np.array([f"duplicate of {k}" for k in corpus.meta["key"].take(centres).to_pylist()], dtype=object)
    reasons[keep] = [_reason(corpus, row, options.keep) for row in rows[keep]]
    return pa.table({
        "shard": corpus.meta["shard"].take(rows), "key": corpus.meta["key"].take(rows),
        "group_id": group_ids, "keep": keep, "reason": reasons.tolist(),
        "group_size": np.asarray(sizes, np.int32)[group_ids],
        "min_similarity": np.asarray(min_sims, np.float32)[group_ids],
        "similarity": np.concatenate(sims).astype(np.float32),
        "kind": kind.tolist(), "phash_distance": pa.array(distance, pa.int32(), mask=~both),
    }, schema=GROUP_SCHEMA)


def _close_to(corpus: Corpus, codes: np.ndarray, centre: int, rows: np.ndarray, options: DedupOptions) -> np.ndarray:
    """Which rows are duplicates of `centre` by any enabled tier (the centre itself included)."""
    close = rows == centre
    if "exact" in options.methods and codes[centre] >= 0:
        close |= codes[rows] == codes[centre]
    if "phash" in options.methods and corpus.phash_valid[centre]:
        near = hamming(corpus.phash[rows], np.full(len(rows), corpus.phash[centre])) <= options.phash_distance
        close |= near & corpus.phash_valid[rows]
    if "embedding" in options.methods:
        close |= (corpus.vectors[rows] @ corpus.vectors[centre]) >= options.threshold
    return close


def _pairs_table(queries: Corpus, db: Corpus, pairs: Pairs) -> pa.Table:
    return pa.table({
        "a_shard": queries.meta["shard"].take(pairs.a), "a_key": queries.meta["key"].take(pairs.a),
        "b_shard": db.meta["shard"].take(pairs.b), "b_key": db.meta["key"].take(pairs.b),
        "similarity": pairs.similarity, "kind": np.asarray(METHODS)[pairs.kinds],
        "phash_distance": pa.array(pairs.distance, pa.int32(), mask=~pairs.distance_valid),
    }, schema=PAIR_SCHEMA)


def _searcher(index: str | Path | Searcher) -> Searcher:
    return index if isinstance(index, Searcher) else Searcher(index)


def _tiers(options: DedupOptions) -> dict:
    """What the enabled tiers are, as the outputs and the report state them."""
    return {"methods": list(options.methods), "keep": options.keep,
            "threshold": options.threshold if "embedding" in options.methods else None,
            "phash_distance": options.phash_distance if "phash" in options.methods else None}


def find_duplicates(index: str | Path | Searcher, options: DedupOptions | None = None, progress: bool | None = None,
                    workdir: str | None = None) -> DedupResult:
    """Duplicates among the images of an index (a directory or a loaded Searcher): pairs (every
    tier that is on) and kept/removed groups."""
    options = options or DedupOptions()
    options.check()
    started = time.time()
    searcher = _searcher(index)
    stats: dict = {"images": int(searcher.manifest["count"]), **_tiers(options)}
    with tempfile.TemporaryDirectory(dir=workdir, prefix="imgindex-dedup-") as tmp:
        corpus = Corpus.of_index(searcher, Path(tmp), progress)
        found = find_pairs(searcher, corpus, corpus, options, True, stats, progress)
        pairs = _pairs_table(corpus, corpus, found)
        groups = group_duplicates(corpus, found.a, found.b, options)
    stats.update(pairs=pairs.num_rows, groups=len(set(groups["group_id"].to_pylist())),
                 in_groups=groups.num_rows, seconds=round(time.time() - started, 2))
    result = DedupResult(pairs, groups, stats)
    stats["removed"] = result.removed
    return result


def tune_for_threshold(searcher: Searcher, corpus: Corpus, threshold: float, k: int, sample: int = 1000,
                       target: float = 0.99, seed: int = 0) -> dict:
    """The smallest nprobe/efSearch that finds near copies at exactly `threshold`.

    Near duplicates sit much closer than ordinary neighbours, so the setting tuned for
    recall@10 is needlessly slow here. Each sampled vector v gets a planted copy
    t*v + sqrt(1-t^2)*u (u a random unit vector orthogonal to v: cosine exactly t, the
    hardest copy the threshold admits); the setting is the smallest for which `target` of the
    copies find their original: on a plain IVF index, the copy probes the original's list (what
    the list-by-list join needs; the index's codes are never read), otherwise a search for `k`
    neighbours returns it.
    """
    knob = searcher.knob
    if knob is None:
        return {"knob": None, "value": None, "planted_recall": 1.0}
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(corpus), min(sample, len(corpus)), replace=False))
    originals = np.asarray(corpus.vectors[rows])
    noise = rng.standard_normal(originals.shape).astype(np.float32)
    noise -= np.einsum("ij,ij->i", noise, originals)[:, None] * originals
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    copies = np.ascontiguousarray(threshold * originals + np.sqrt(1 - threshold**2) * noise, dtype=np.float32)
    ivf = faiss.downcast_index(searcher.index)
    if isinstance(ivf, faiss.IndexIVF):
        value, recall = smallest_nprobe(ivf, copies, list_numbers(ivf)[rows], knob_values(ivf, knob), target)
        set_knob(searcher.index, knob, value)
        return {"knob": knob, "value": value, "planted_recall": round(recall, 4)}
    def found_originals() -> float:
        _, found = searcher.index.search(copies, k)
        return float(np.mean([row in hits for row, hits in zip(rows, found)]))

    value, recall, _ = sweep(searcher.index, knob, found_originals, target)
    return {"knob": knob, "value": value, "planted_recall": round(recall, 4)}


def find_leaks(index: str | Path | Searcher, against: str, options: DedupOptions | None = None,
               progress: bool | None = None, workdir: str | None = None) -> DedupResult:
    """Which images of the embeddings directory `against` (e.g. a test set) have a duplicate in
    the index (e.g. the training set). Pairs are (a = against image, b = indexed image)."""
    options = options or DedupOptions()
    options.check()
    started = time.time()
    searcher = _searcher(index)
    test = EmbeddingsDir(against)
    changed = identity_changes(test.manifest, searcher.manifest["embeddings"])
    if changed:
        raise ConfigError(f"{against} was embedded differently from the index (changed: {', '.join(changed)}): "
                          "embed it with the same config")
    test_parts = test.parts()
    if not test_parts:
        raise ConfigError(f"{against} has no complete parts: run `imgindex embed` first")
    stats: dict = {"against": against, **_tiers(options)}
    with tempfile.TemporaryDirectory(dir=workdir, prefix="imgindex-leaks-") as tmp:
        train = Corpus.of_index(searcher, Path(tmp), progress)
        queries = Corpus([(test, p) for p in test_parts], test.dim, Path(tmp), progress, name="against")
        found = find_pairs(searcher, queries, train, options, False, stats, progress)
        pairs = _pairs_table(queries, train, found)
        stats.update(images=len(queries), leaked=int(len(np.unique(found.a))), pairs=pairs.num_rows,
                     seconds=round(time.time() - started, 2))
    return DedupResult(pairs, GROUP_SCHEMA.empty_table(), stats)
