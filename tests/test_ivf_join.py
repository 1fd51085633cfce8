"""The list-by-list IVF join finds what brute force finds, and what a search would, capped per query."""
import faiss
import numpy as np
import pytest

import imgindex.indexes.dedup.ivf_join as ivf_join
from imgindex.formats.embeddings_dir import normalize_rows
from imgindex.indexes.dedup.ivf_join import range_join
from synthetic import clustered_vectors


class Rows:
    """The `queries` interface of range_join over an in-memory array."""

    def __init__(self, vectors):
        self.vectors = vectors

    def blocks(self, rows=1000):
        for start in range(0, len(self.vectors), rows):
            yield self.vectors[start:start + rows]


def planted(count=6000, dim=48, copies=300, seed=1, noise=0.25):
    rng = np.random.default_rng(seed)
    base = clustered_vectors(count, dim, clusters=60, spread=1.0, seed=seed)
    origin = rng.choice(count, copies, replace=False)
    near = normalize_rows(base[origin] + rng.standard_normal((copies, dim)).astype(np.float32) * noise / np.sqrt(dim))
    return np.vstack([base, near]).astype(np.float32)


def ivf_of(vectors, nlist=32):
    index = faiss.index_factory(vectors.shape[1], f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    index.add(vectors)
    return index


def brute_force(queries, db, threshold, self_join):
    scores = queries @ db.T
    q, d = np.nonzero(scores >= threshold)
    keep = q != d if self_join else np.ones(len(q), bool)
    return set(zip(q[keep].tolist(), d[keep].tolist()))


def test_probing_every_list_finds_exactly_the_brute_force_pairs():
    vectors = planted()
    index = ivf_of(vectors)
    q, d, s, capped = range_join(index, Rows(vectors), vectors, index.nlist, 0.97, 1000, self_join=True)
    truth = brute_force(vectors, vectors, 0.97, self_join=True)
    assert len(truth) > 300  # the planted copies, from both sides
    assert set(zip(q.tolist(), d.tolist())) == truth
    assert capped == 0
    np.testing.assert_allclose(s, np.einsum("ij,ij->i", vectors[q], vectors[d]), atol=1e-5)


def test_with_few_probes_it_finds_what_a_search_finds():
    vectors = planted(noise=0.5)
    index = ivf_of(vectors, nlist=64)
    index.nprobe = 1
    scores, found = index.search(vectors, 20)
    rows = np.repeat(np.arange(len(vectors)), 20)
    hit = (scores.ravel() >= 0.88) & (found.ravel() != rows)
    searched = set(zip(rows[hit].tolist(), found.ravel()[hit].tolist()))
    q, d, _, _ = range_join(index, Rows(vectors), vectors, 1, 0.88, 1000, self_join=True)
    joined = set(zip(q.tolist(), d.tolist()))
    assert joined == searched
    assert len(joined) < len(brute_force(vectors, vectors, 0.88, self_join=True))  # one probe does miss some


def test_queries_from_another_set_keep_self_matches():
    vectors = planted()
    index = ivf_of(vectors)
    queries = vectors[:500]
    q, d, _, _ = range_join(index, Rows(queries), vectors, index.nlist, 0.97, 1000, self_join=False)
    assert set(zip(q.tolist(), d.tolist())) == brute_force(queries, vectors, 0.97, self_join=False)
    assert {(i, i) for i in range(500)} <= set(zip(q.tolist(), d.tolist()))


@pytest.mark.parametrize("compact_at", [10**9, 50])
def test_each_query_keeps_its_most_similar_neighbours_and_the_capped_are_counted(monkeypatch, compact_at):
    monkeypatch.setattr(ivf_join, "COMPACT_AT", compact_at)  # also while the pairs are being gathered
    rng = np.random.default_rng(0)
    spread = clustered_vectors(2000, 32, clusters=50, spread=1.0, seed=3)
    centre = spread[0]
    crowd = normalize_rows(centre + rng.standard_normal((40, 32)).astype(np.float32) * 0.05 / np.sqrt(32))
    vectors = np.vstack([spread, crowd]).astype(np.float32)
    index = ivf_of(vectors, nlist=16)
    q, d, s, capped = range_join(index, Rows(vectors), vectors, index.nlist, 0.99, 5, self_join=True)
    assert np.bincount(q).max() == 5
    truth = vectors @ vectors.T
    np.fill_diagonal(truth, -1)
    crowded = np.nonzero((truth >= 0.99).sum(axis=1) > 5)[0]
    assert capped == len(crowded) > 30
    for row in crowded[:10]:
        kept = np.sort(s[q == row])[::-1]
        np.testing.assert_allclose(kept, np.sort(truth[row])[::-1][:5], atol=1e-5)


def test_an_hnsw_quantizer_is_searched_wide_enough_and_left_as_it_was():
    vectors = planted()
    index = faiss.index_factory(vectors.shape[1], "IVF32_HNSW8,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    index.add(vectors)
    hnsw = faiss.downcast_index(index.quantizer).hnsw
    before = hnsw.efSearch
    q, d, _, _ = range_join(index, Rows(vectors), vectors, index.nlist, 0.97, 1000, self_join=True)
    assert set(zip(q.tolist(), d.tolist())) == brute_force(vectors, vectors, 0.97, self_join=True)
    assert hnsw.efSearch == before
