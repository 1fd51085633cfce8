"""Pairs -> groups: connected components, split around kept members so that a chain A~B~C
never joins A and C unless C is close to the kept image of A's group; which member to keep.

No step is Python per group: the components are a label propagation over the pairs' rows (two
int64 arrays of them, plus the pairs: ~16 bytes a row in pairs + 16 a pair; the driver holds only
the rows that are in some pair, M of them, not N); the keep order is one sort of every member
by (component, the policy's keys); the split runs in rounds, each round every unfinished
component at once: its first pending member (in keep order) is a centre, every pending member
close to it by an enabled tier joins its group, the rest wait for the next round. The rounds
number the largest component's groups; each is vectorized over the members still pending.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from imgindex.indexes.dedup.corpus import Corpus
from imgindex.indexes.dedup.tiers import DedupOptions, hamming, sha_codes


GROUP_SCHEMA = pa.schema([
    ("shard", pa.string()), ("key", pa.string()), ("group_id", pa.int64()), ("keep", pa.bool_()),
    ("reason", pa.string()), ("group_size", pa.int32()), ("min_similarity", pa.float32()),
    ("similarity", pa.float32()), ("kind", pa.string()), ("phash_distance", pa.int32()),
])

BLOCK = 8192  # rows per vectorized product
MIN_BLOCK = 2048  # groups up to this size have their min_similarity over every pair of members


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


def _keep_order(corpus: Corpus, rows: np.ndarray, component: np.ndarray, policy: str) -> np.ndarray:
    """`rows` sorted by component, then the policy's preference (the first is kept), in one sort."""
    meta = corpus.meta.take(pa.array(rows))
    size = pc.fill_null(meta["bytes"], 0).to_numpy(zero_copy_only=False).astype(np.int64)
    keys = [("component", "ascending")]
    table = {"component": component}
    if policy == "largest":
        width = pc.fill_null(meta["width"], 0).to_numpy(zero_copy_only=False).astype(np.int64)
        height = pc.fill_null(meta["height"], 0).to_numpy(zero_copy_only=False).astype(np.int64)
        gray = pc.fill_null(meta["grayscale"], False).to_numpy(zero_copy_only=False).astype(np.int8)
        table.update(pixels=-width * height, gray=gray, size=-size)
        keys += [("pixels", "ascending"), ("gray", "ascending"), ("size", "ascending")]
    elif policy == "smallest-file":
        table.update(size=np.where(size == 0, 2**62, size))
        keys += [("size", "ascending")]
    if policy in ("largest", "smallest-file"):
        table.update(key=meta["key"], shard=meta["shard"])
        keys += [("key", "ascending"), ("shard", "ascending")]
    table["row"] = rows  # first: corpus (index) order; and the last tie-break of every policy
    keys += [("row", "ascending")]
    return rows[pc.sort_indices(pa.table(table), sort_keys=keys).to_numpy()]


# What each keep policy prefers, said once in the report rather than in every group's reason.
KEEP_RULES = {
    "largest": "largest (most pixels, then colour over grayscale, then most bytes, then smallest key)",
    "smallest-file": "smallest file (fewest bytes)",
    "first": "first in corpus order",
}


def _array(values) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def _text(column) -> pa.Array:
    """A column as text, a null as Python would print it (None)."""
    return pc.fill_null(pc.cast(column, pa.string()), "None")


def _reasons(corpus: Corpus, rows: np.ndarray, policy: str) -> pa.Array:
    """Why each of `rows` (kept members) is kept, in words."""
    meta = corpus.meta.take(pa.array(rows, pa.int64())).combine_chunks()
    if policy == "largest":
        gray = meta["grayscale"]
        colour = pc.if_else(pc.is_null(gray), "colour unknown", pc.if_else(pc.fill_null(gray, False), "grayscale",
                                                                            "colour"))
        return pc.binary_join_element_wise("largest: ", _text(meta["width"]), "x", _text(meta["height"]),
                                           " pixels, ", colour, ", ", _text(meta["bytes"]), " bytes", "")
    if policy == "smallest-file":
        return pc.binary_join_element_wise("smallest file: ", _text(meta["bytes"]), " bytes", "")
    return pa.array(["first in corpus order"] * len(rows), pa.string())


def _dots(corpus: Corpus, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """vectors[a[i]] . vectors[b[i]] in float32, BLOCK rows at a time."""
    out = np.empty(len(a), np.float32)
    for start in range(0, len(a), BLOCK):
        sl = slice(start, start + BLOCK)
        out[sl] = np.einsum("ij,ij->i", np.asarray(corpus.vectors[a[sl]]), np.asarray(corpus.vectors[b[sl]]))
    return out


def _close_to(corpus: Corpus, codes: np.ndarray, centres: np.ndarray, rows: np.ndarray,
              options: DedupOptions) -> np.ndarray:
    """Which rows are duplicates of their centre by any enabled tier (a centre itself included)."""
    close = rows == centres
    if "exact" in options.methods:
        close |= (codes[centres] >= 0) & (codes[rows] == codes[centres])
    if "phash" in options.methods:
        near = hamming(corpus.phash[rows], corpus.phash[centres]) <= options.phash_distance
        close |= near & corpus.phash_valid[rows] & corpus.phash_valid[centres]
    if "embedding" in options.methods:
        close |= _dots(corpus, rows, centres) >= options.threshold
    return close


def _split(corpus: Corpus, codes: np.ndarray, ordered: np.ndarray, component: np.ndarray,
           options: DedupOptions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The anti-chaining split of every component at once: (rows, their centres, group ids), the
    rows by group id (components in label order, each one's groups in the order they were cut),
    within a group in keep order."""
    position = np.arange(len(ordered))
    rows_out, centres_out, group_out, order_out = [], [], [], []
    pending, rank = ordered, position  # sorted by (component, keep order), as `ordered`
    comp = component
    cut = 0
    while len(pending):
        first = np.r_[True, comp[1:] != comp[:-1]]
        starts = np.nonzero(first)[0]
        counts = np.diff(np.r_[starts, len(pending)])
        alive = np.repeat(counts > 1, counts)  # a component with one pending member is finished
        centres = np.repeat(pending[starts], counts)
        close = np.zeros(len(pending), bool)
        close[alive] = _close_to(corpus, codes, centres[alive], pending[alive], options)
        taken = np.add.reduceat(close.astype(np.int64), starts) if len(starts) else np.zeros(0, np.int64)
        grouped = close & np.repeat(taken >= 2, counts)  # a centre close to no one makes no group
        rows_out.append(pending[grouped])
        centres_out.append(centres[grouped])
        # a group is known by (its component, the round that cut it): ordered as the per-group loop
        group_out.append(comp[grouped] * 0 + cut)
        order_out.append(np.stack([comp[grouped], rank[grouped]]))
        stay = alive & ~close
        pending, rank, comp = pending[stay], rank[stay], comp[stay]
        cut += 1
    rows, centres, cuts = np.concatenate(rows_out), np.concatenate(centres_out), np.concatenate(group_out)
    comps, ranks = np.concatenate(order_out, axis=1) if order_out else (np.zeros(0, np.int64),) * 2
    order = np.lexsort((ranks, cuts, comps))
    rows, centres, comps, cuts = rows[order], centres[order], comps[order], cuts[order]
    new = np.r_[True, (comps[1:] != comps[:-1]) | (cuts[1:] != cuts[:-1])] if len(rows) else np.zeros(0, bool)
    return rows, centres, np.cumsum(new) - 1


def _min_similarity(corpus: Corpus, rows: np.ndarray, group_ids: np.ndarray, similarity: np.ndarray,
                    groups: int) -> np.ndarray:
    """Each group's least similar pair of members (up to MIN_BLOCK members; larger groups: the
    least similar to the kept one), batched by group size."""
    starts = np.r_[0, np.nonzero(np.diff(group_ids))[0] + 1]
    sizes = np.diff(np.r_[starts, len(rows)])
    out = np.minimum.reduceat(similarity, starts).astype(np.float32) if len(rows) else np.zeros(0, np.float32)
    for size in np.unique(sizes[sizes <= MIN_BLOCK]):
        these = starts[sizes == size]
        per = max(1, BLOCK * 4 // int(size) ** 2)  # groups per batch: about 32k products
        for lo in range(0, len(these), per):
            take = (these[lo:lo + per, None] + np.arange(size)).ravel()
            block = np.asarray(corpus.vectors[rows[take]]).reshape(-1, int(size), corpus.dim)
            products = np.einsum("gid,gjd->gij", block, block)
            out[np.searchsorted(starts, these[lo:lo + per])] = products.reshape(len(block), -1).min(axis=1)
    return out[:groups]


def group_duplicates(corpus: Corpus, a: np.ndarray, b: np.ndarray, options: DedupOptions) -> pa.Table:
    """Components of the pair graph, split so every member is close to its group's kept member."""
    if not len(a):
        return GROUP_SCHEMA.empty_table()
    (codes,) = sha_codes(corpus.sha)
    label = _components(a, b, len(corpus))
    members = np.nonzero(np.bincount(label, minlength=len(corpus))[label] > 1)[0]
    ordered = _keep_order(corpus, members, label[members], options.keep)
    rows, centres, group_ids = _split(corpus, codes, ordered, label[ordered], options)
    if not len(rows):
        return GROUP_SCHEMA.empty_table()
    groups = int(group_ids[-1]) + 1
    sizes = np.bincount(group_ids, minlength=groups)
    similarity = _dots(corpus, rows, centres)
    min_sims = _min_similarity(corpus, rows, group_ids, similarity, groups)
    keep = rows == centres
    distance = hamming(corpus.phash[rows], corpus.phash[centres])
    both = corpus.phash_valid[rows] & corpus.phash_valid[centres]
    kind = np.where((codes[rows] >= 0) & (codes[rows] == codes[centres]), "exact",
                    np.where(both & (distance <= options.phash_distance) & ("phash" in options.methods),
                             "phash", "embedding")).astype(object)
    kind[keep] = None
    reasons = pc.binary_join_element_wise("duplicate of ", corpus.meta["key"].take(pa.array(centres)), "")
    reasons = pc.replace_with_mask(reasons.combine_chunks(), pa.array(keep),
                                   _array(pc.cast(_reasons(corpus, rows[keep], options.keep), pa.string())))
    return pa.table({
        "shard": corpus.meta["shard"].take(rows), "key": corpus.meta["key"].take(rows),
        "group_id": group_ids.astype(np.int64), "keep": keep, "reason": reasons,
        "group_size": sizes.astype(np.int32)[group_ids],
        "min_similarity": min_sims[group_ids],
        "similarity": similarity.astype(np.float32),
        "kind": kind.tolist(), "phash_distance": pa.array(distance, pa.int32(), mask=~both),
    }, schema=GROUP_SCHEMA)
