"""The three tiers, one implementation for the self-join and for `--against`:

- exact: the same encoded bytes (stored sha256), every pair of copies;
- phash: stored 64-bit perceptual hashes within a Hamming distance, exactly (hash tables or
  an exhaustive scan, whichever is faster: phash_plan);
- embedding: the index's neighbours above a cosine threshold (bounded by `max_neighbors`; on
  an IVF index a list-by-list join, ivf_join), every candidate re-checked against the stored
  full-precision vectors, so a compressed index never decides alone.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from imgindex.errors import ConfigError
from imgindex.indexes.dedup.corpus import BATCH, Corpus, cosines
from imgindex.indexes.dedup.ivf_join import lists_of, range_join, smallest_nprobe
from imgindex.indexes.factory import knob_values, set_knob
from imgindex.indexes.query import Searcher
from imgindex.indexes.recall import sweep
from imgindex.progress import progress_bar

log = logging.getLogger(__name__)


METHODS = ("exact", "phash", "embedding")


KEEP_POLICIES = ("largest", "first", "smallest-file")


MAX_EXACT_PARTNERS = 100  # byte-identical copies paired with each image (every pair up to 101 copies)


PAIR_SCHEMA = pa.schema([
    ("a_shard", pa.string()), ("a_key", pa.string()), ("b_shard", pa.string()), ("b_key", pa.string()),
    ("similarity", pa.float32()), ("kind", pa.string()), ("phash_distance", pa.int32()),
])


@dataclass
class DedupOptions:
    methods: tuple[str, ...] = METHODS
    threshold: float | str = "auto"  # cosine, embedding tier; auto: calibrated on planted copies (find.py)
    phash_distance: int = 4  # Hamming distance, phash tier
    keep: str = "largest"
    max_neighbors: int = 100  # embedding tier: neighbours examined per image
    target_precision: float = 0.98  # --threshold auto: the precision the chosen threshold reaches
    calibration_sample: int = 100  # --threshold auto: images sampled, four planted copies each
    allow_random_weights: bool = False  # random weights cannot tell images apart: the embedding tier refuses them

    def check(self) -> None:
        unknown = set(self.methods) - set(METHODS)
        if unknown or not self.methods:
            raise ConfigError(f"--method takes a comma list of {', '.join(METHODS)}; got {','.join(self.methods)}")
        if self.keep not in KEEP_POLICIES:
            raise ConfigError(f"--keep must be one of {', '.join(KEEP_POLICIES)}, got {self.keep!r}")
        if self.threshold != "auto" and (isinstance(self.threshold, (str, bool)) or not 0 < self.threshold <= 1):
            raise ConfigError(f"--threshold is a cosine similarity in (0, 1] or auto, got {self.threshold}")
        if not 0 < self.target_precision <= 1:
            raise ConfigError(f"--target-precision is in (0, 1], got {self.target_precision}")
        if not 0 <= self.phash_distance <= 16:
            raise ConfigError(f"--phash-distance must be 0 to 16 bits, got {self.phash_distance}")


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

    A plain IVF index is joined list by list on the stored vectors (dedup.ivf_join: the same
    candidates as a search at its nprobe, at the speed of matrix products; at scale, as tasks:
    dedup.partitions); other index types are searched query by query.
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


def _strictest(a: np.ndarray, b: np.ndarray, kinds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row per (a, b): the strictest tier that found it (exact < phash < embedding)."""
    order = np.lexsort((kinds, b, a))
    a, b, kinds = a[order], b[order], kinds[order]
    first = np.ones(len(a), bool)  # (an empty input has no first row)
    first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    return a[first], b[first], kinds[first]


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
    """The three tiers in this process, the same code for the self-join (queries is db) and for
    `--against` (dedup at scale: find.py, partitions.py and hash_tiers.py)."""
    q_codes, d_codes = sha_codes(queries.sha, db.sha)
    candidates = {}
    if "exact" in options.methods:
        candidates["exact"] = exact_pairs(q_codes, d_codes, self_join)
    if "phash" in options.methods:
        candidates["phash"] = phash_pairs((db.phash, db.phash_valid), options.phash_distance,
                                          queries=None if self_join else (queries.phash, queries.phash_valid),
                                          progress=progress)
    if "embedding" in options.methods:
        stats["search"] = tune_for_threshold(searcher, db, options.threshold, options.max_neighbors + int(self_join))
        q, d, capped = embedding_candidates(searcher.index, queries, db, options.threshold, options.max_neighbors,
                                            self_join, progress, desc="neighbours" if self_join else "against")
        candidates["embedding"] = (q, d)
        note_capped(stats, capped, options.max_neighbors)
    return decide(queries, db, candidates, options, self_join, stats, (q_codes, d_codes))


def note_capped(stats: dict, capped: int, max_neighbors: int) -> None:
    stats["images_with_capped_neighbours"] = capped
    if capped:
        log.warning("%d images have more than %d neighbours above the threshold: only the nearest %d were "
                    "examined (--max-neighbors)", capped, max_neighbors, max_neighbors)


def decide(queries: Corpus, db: Corpus, candidates: dict[str, tuple[np.ndarray, np.ndarray]], options: DedupOptions,
           self_join: bool, stats: dict, codes: tuple[np.ndarray, np.ndarray] | None = None) -> Pairs:
    """Each tier's candidate pairs (query row, db row) -> the pairs: embedding candidates
    re-checked on the stored vectors, each pair once (in a self-join, (a, b) and (b, a) are one)
    with the strictest tier that holds for it, so identical bytes are `exact` whichever tier
    found them first."""
    q_codes, d_codes = codes or sha_codes(queries.sha, db.sha)
    found_a, found_b, found_kind = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for kind in METHODS:
        if kind not in candidates:
            continue
        a, b = candidates[kind]
        if self_join:
            a, b = _unique_pairs(a, b)
        if kind == "embedding":
            confirmed = cosines(queries, a, db, b) >= options.threshold
            stats["embedding_rejected_by_recheck"] = int((~confirmed).sum())
            a, b = a[confirmed], b[confirmed]
        found_a.append(a)
        found_b.append(b)
        found_kind.append(np.full(len(a), METHODS.index(kind)))
        stats[f"{kind}_candidates"] = int(len(a))
    a, b, kinds = _strictest(np.concatenate(found_a), np.concatenate(found_b), np.concatenate(found_kind))
    same_bytes = (q_codes[a] >= 0) & (q_codes[a] == d_codes[b])
    kinds[same_bytes] = METHODS.index("exact")
    for number, kind in enumerate(METHODS):
        if kind in options.methods:
            stats[f"{kind}_pairs"] = int((kinds == number).sum())
    return Pairs(a, b, kinds, cosines(queries, a, db, b), hamming(queries.phash[a], db.phash[b]),
                 queries.phash_valid[a] & db.phash_valid[b])


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
    if searcher.knob is None:
        return {"knob": None, "value": None, "planted_recall": 1.0}
    rows, rng = tuning_rows(len(corpus), sample, seed)
    return tune_on(searcher, rows, np.asarray(corpus.vectors[rows]), rng, threshold, k, target)


def tuning_rows(count: int, sample: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.random.Generator]:
    """The rows tune_for_threshold plants copies of (ascending), and the generator that plants them."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(count, min(sample, count), replace=False)), rng


def tune_on(searcher: Searcher, rows: np.ndarray, originals: np.ndarray, rng: np.random.Generator,
            threshold: float, k: int, target: float = 0.99) -> dict:
    """tune_for_threshold on the sampled rows' vectors (`originals`)."""
    knob = searcher.knob
    if knob is None:
        return {"knob": None, "value": None, "planted_recall": 1.0}
    noise = rng.standard_normal(originals.shape).astype(np.float32)
    noise -= np.einsum("ij,ij->i", noise, originals)[:, None] * originals
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    copies = np.ascontiguousarray(threshold * originals + np.sqrt(1 - threshold**2) * noise, dtype=np.float32)
    ivf = faiss.downcast_index(searcher.index)
    if isinstance(ivf, faiss.IndexIVF):
        value, recall = smallest_nprobe(ivf, copies, lists_of(ivf, rows), knob_values(ivf, knob), target)
        set_knob(searcher.index, knob, value)
        return {"knob": knob, "value": value, "planted_recall": round(recall, 4)}
    def found_originals() -> float:
        _, found = searcher.index.search(copies, k)
        return float(np.mean([row in hits for row, hits in zip(rows, found)]))

    value, recall, _ = sweep(searcher.index, knob, found_originals, target)
    return {"knob": knob, "value": value, "planted_recall": round(recall, 4)}
