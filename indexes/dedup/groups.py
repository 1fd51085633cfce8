"""Pairs -> groups: connected components, split around kept members so that a chain A~B~C
never joins A and C unless C is close to the kept image of A's group; which member to keep."""
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


# What each keep policy prefers, said once in the report rather than in every group's reason.
KEEP_RULES = {
    "largest": "largest (most pixels, then colour over grayscale, then most bytes, then smallest key)",
    "smallest-file": "smallest file (fewest bytes)",
    "first": "first in corpus order",
}


def _reason(corpus: Corpus, row: int, policy: str) -> str:
    if policy == "largest":
        w, h = corpus.meta["width"][row].as_py(), corpus.meta["height"][row].as_py()
        gray = corpus.meta["grayscale"][row].as_py()
        colour = {True: "grayscale", False: "colour", None: "colour unknown"}[gray]
        return f"largest: {w}x{h} pixels, {colour}, {corpus.meta['bytes'][row].as_py()} bytes"
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
