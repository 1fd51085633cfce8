"""The vectorized grouping (components, keep order, the anti-chaining split in rounds) gives
today's per-group loop's groups, kept members, reasons and similarities, for every policy."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from imgindex.formats.embeddings_dir import normalize_rows
from imgindex.indexes.dedup.corpus import hashes
from imgindex.indexes.dedup.groups import _components, group_duplicates
from imgindex.indexes.dedup.tiers import DedupOptions, hamming, sha_codes


def per_group_loop(corpus, a, b, options) -> list[tuple[list[int], int, list[float], str]]:
    """The grouping as it was (Python per group, per centre): (rows, kept row, similarities,
    kept reason) of every group in group-id order."""
    (codes,) = sha_codes(corpus.sha)
    label = _components(a, b, len(corpus))
    members = np.nonzero(np.bincount(label, minlength=len(corpus))[label] > 1)[0]
    order = members[np.argsort(label[members], kind="stable")]
    bounds = np.nonzero(np.r_[True, label[order][1:] != label[order][:-1], True])[0]
    meta = {c: corpus.meta[c].to_pylist() for c in corpus.meta.column_names}
    size = [s if s is not None else 0 for s in meta["bytes"]]

    def key(i):
        if options.keep == "largest":
            return (-(meta["width"][i] or 0) * (meta["height"][i] or 0), bool(meta["grayscale"][i]), -size[i],
                    meta["key"][i], meta["shard"][i])
        if options.keep == "smallest-file":
            return (size[i] or 2**62, meta["key"][i], meta["shard"][i])
        return ()

    def reason(i):
        if options.keep == "largest":
            colour = {True: "grayscale", False: "colour", None: "colour unknown"}[meta["grayscale"][i]]
            return f"largest: {meta['width'][i]}x{meta['height'][i]} pixels, {colour}, {meta['bytes'][i]} bytes"
        if options.keep == "smallest-file":
            return f"smallest file: {meta['bytes'][i]} bytes"
        return "first in corpus order"

    groups = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        pending = np.array(sorted(order[lo:hi], key=key))
        while len(pending) > 1:
            centre = pending[0]
            close = pending == centre
            if "exact" in options.methods and codes[centre] >= 0:
                close |= codes[pending] == codes[centre]
            if "phash" in options.methods and corpus.phash_valid[centre]:
                near = hamming(corpus.phash[pending], np.full(len(pending), corpus.phash[centre]))
                close |= (near <= options.phash_distance) & corpus.phash_valid[pending]
            if "embedding" in options.methods:
                close |= corpus.vectors[pending] @ corpus.vectors[centre] >= options.threshold
            group, pending = pending[close], pending[~close]
            if len(group) >= 2:
                block = corpus.vectors[group]
                groups.append((group.tolist(), int(centre), (block @ corpus.vectors[centre]).tolist(),
                               reason(centre), float((block @ block.T).min())))
    return groups


@pytest.fixture(scope="module")
def chained():
    """Chains of near copies (each link above the threshold, the ends below), byte copies, phash
    neighbours, ties and nulls in every keep key."""
    rng = np.random.default_rng(4)
    count, dim = 3000, 16
    base = normalize_rows(rng.standard_normal((count, dim)).astype(np.float32))
    vectors = base.copy()
    for start in range(0, 1200, 12):  # chains of 12: each a small step from the one before
        step = normalize_rows(rng.standard_normal((1, dim)).astype(np.float32))[0]
        for i in range(1, 12):
            vectors[start + i] = normalize_rows((vectors[start + i - 1] + 0.12 * step)[None])[0]
    sha = [rng.bytes(8).hex() for _ in range(count)]
    for row in range(1300, 1600, 3):
        sha[row + 1] = sha[row + 2] = sha[row]
    phash = rng.integers(-2**62, 2**62, count)
    phash[1700:1900] = phash[1500:1700] ^ rng.integers(0, 8, 200)
    meta = pa.table({
        "shard": [f"s{2 - r // 700}" for r in range(count)], "key": [f"k{r % 700:04d}" for r in range(count)],
        "width": [None if r % 17 == 0 else int(rng.choice([100, 200])) for r in range(count)],
        "height": [None if r % 19 == 0 else int(rng.choice([100, 200])) for r in range(count)],
        "bytes": [None if r % 13 == 0 else int(rng.choice([0, 500, 900])) for r in range(count)],
        "grayscale": [None if r % 11 == 0 else bool(r % 2) for r in range(count)],
        "sha256": [None if r % 23 == 0 else s for r, s in enumerate(sha)],
        "phash": [None if r % 29 == 0 else int(p) for r, p in enumerate(phash)],
    })
    ph, valid = hashes(meta["phash"])
    corpus = SimpleNamespace(meta=meta, vectors=vectors, dim=dim, phash=ph, phash_valid=valid,
                             sha=meta["sha256"].combine_chunks(), __len__=None)
    scores = vectors @ vectors.T
    a, b = np.nonzero(np.triu(scores >= 0.97, 1))
    codes = sha_codes(corpus.sha)[0]
    ea, eb = np.nonzero(np.triu((codes[:, None] == codes[None]) & (codes[:, None] >= 0), 1))
    pa_, pb = np.r_[1500:1700], np.r_[1700:1900]
    a, b = np.r_[a, ea, pa_], np.r_[b, eb, pb]
    return corpus, a.astype(np.int64), b.astype(np.int64)


class Sized(SimpleNamespace):
    def __len__(self):
        return len(self.vectors)


@pytest.mark.parametrize("keep", ["largest", "first", "smallest-file"])
def test_vectorized_groups_are_the_per_group_loops(chained, keep, monkeypatch):
    import imgindex.indexes.dedup.groups as groups

    corpus, a, b = chained
    corpus = Sized(**{k: v for k, v in vars(corpus).items() if k != "__len__"})
    options = DedupOptions(threshold=0.97, phash_distance=3, keep=keep)
    expected = per_group_loop(corpus, a, b, options)
    calls, close_to = [], groups._close_to
    monkeypatch.setattr(groups, "_close_to", lambda *args: calls.append(1) or close_to(*args))
    table = group_duplicates(corpus, a, b, options)
    # one vectorized step per round (the most groups cut from one component), not one per centre
    assert 0 < len(calls) <= 12 < len(expected) / 10
    ids = table["group_id"].to_numpy()
    rows = {k: i for i, k in enumerate(zip(corpus.meta["shard"].to_pylist(), corpus.meta["key"].to_pylist()))}
    found_rows = [rows[k] for k in zip(table["shard"].to_pylist(), table["key"].to_pylist())]
    found = []
    for g in range(int(ids.max()) + 1):
        at = np.nonzero(ids == g)[0]
        kept = [found_rows[i] for i in at if table["keep"][i].as_py()]
        found.append(([found_rows[i] for i in at], kept[0], table["similarity"].to_numpy()[at].tolist(),
                      table["reason"][int(at[table["keep"].to_numpy(zero_copy_only=False)[at].argmax()])].as_py(),
                      table["min_similarity"][int(at[0])].as_py()))
    assert len(expected) > 150 and max(len(g[0]) for g in expected) >= 3
    assert len(found) == len(expected)
    for (rows_f, kept_f, sims_f, reason_f, min_f), (rows_e, kept_e, sims_e, reason_e, min_e) in zip(found, expected):
        assert (rows_f, kept_f, reason_f) == (rows_e, kept_e, reason_e)
        np.testing.assert_allclose(sims_f + [min_f], sims_e + [min_e], atol=1e-6)
    # the chains were split: no group holds both ends of a chain
    assert not any(0 in g[0] and 11 in g[0] for g in expected)
