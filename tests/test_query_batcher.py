"""The service's query batcher on its own, with a stand-in model and index: queries that wait
together are answered by one forward and one search per shard filter, each with its own k, and a
query that fails (an upload no decoder reads, a search that fails on it alone) fails alone."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from imgindex.errors import SampleError
from imgindex.serve.batcher import Query, QueryBatcher


class Model:
    """Bytes b"v<x>" are an image whose vector is [x, 1]; anything else is no image."""

    def __init__(self):
        self.forwards: list[int] = []

    def pixels(self, data: bytes) -> np.ndarray:
        if not data.startswith(b"v"):
            raise SampleError("not_an_image", "no image in these bytes")
        return np.asarray([float(data[1:]), 1.0], np.float32)

    def embed_pixels(self, pixels, batch_size=32):
        self.forwards.append(len(pixels))
        return np.stack(pixels)


class Index:
    """Hits are the query's own first number, k times, so each answer shows whose it is."""

    def __init__(self, fail_on: float | None = None):
        self.model, self.fail_on, self.searches = Model(), fail_on, []

    def embedder(self):
        return self.model

    def search_vectors(self, vectors, k, shard=None):
        self.searches.append((len(vectors), k, shard))
        if self.fail_on is not None and (vectors[:, 0] == self.fail_on).any():
            raise RuntimeError("this search fails on one of its queries")
        return [[Hit(float(v[0]), rank, shard) for rank in range(k)] for v in vectors]


class Hit:
    def __init__(self, of: float, rank: int, shard: str | None):
        self.of, self.rank, self.shard = of, rank, shard

    def to_dict(self):
        return {"of": self.of, "rank": self.rank, "shard": self.shard}


def ask_together(batcher: QueryBatcher, queries: list[Query]) -> list:
    """Every query sent before the batcher's loop runs once: they wait together."""
    async def run():
        return await asyncio.gather(*(batcher.ask(q) for q in queries), return_exceptions=True)
    return asyncio.run(run())


def test_queries_that_wait_together_share_one_forward_and_one_search_per_shard():
    index = Index()
    queries = [Query(k=2, shard=None, image=b"v1"), Query(k=3, shard=None, image=b"v2"),
               Query(k=1, shard="s1", vector=np.asarray([7.0, 1.0], np.float32)),
               Query(k=2, shard=None, vector=np.asarray([5.0, 1.0], np.float32))]
    answers = ask_together(QueryBatcher(index), queries)
    assert index.model.forwards == [2]  # the two images, in one forward pass
    assert sorted(index.searches, key=str) == sorted([(3, 3, None), (1, 1, "s1")], key=str)
    assert [[h["of"] for h in a] for a in answers] == [[1.0] * 2, [2.0] * 3, [7.0], [5.0] * 2]  # each its own k
    assert [h["shard"] for h in answers[2]] == ["s1"]


def test_an_upload_that_is_no_image_fails_alone():
    index = Index()
    answers = ask_together(QueryBatcher(index), [Query(k=1, shard=None, image=b"v3"),
                                                 Query(k=1, shard=None, image=b"junk")])
    assert [h["of"] for h in answers[0]] == [3.0]
    assert isinstance(answers[1], SampleError) and answers[1].kind == "not_an_image"
    assert index.model.forwards == [1]


def test_a_search_that_fails_on_one_query_fails_only_that_one():
    index = Index(fail_on=9.0)
    queries = [Query(k=1, shard=None, vector=np.asarray([x, 1.0], np.float32)) for x in (1.0, 9.0, 2.0)]
    answers = ask_together(QueryBatcher(index), queries)
    assert isinstance(answers[1], RuntimeError)
    assert [answers[0][0]["of"], answers[2][0]["of"]] == [1.0, 2.0]
    assert index.searches[0] == (3, 1, None)  # tried together first, then one by one


def test_a_failure_no_query_can_be_blamed_for_reaches_them_all():
    class Broken(Index):
        def embedder(self):
            raise OSError("the model's file vanished")

    answers = ask_together(QueryBatcher(Broken()), [Query(k=1, shard=None, image=b"v1"),
                                                    Query(k=1, shard=None, image=b"v2")])
    assert all(isinstance(a, OSError) for a in answers)


def test_a_later_query_is_still_answered_after_a_failed_batch():
    class BrokenOnce(Index):
        calls = 0

        def embedder(self):
            BrokenOnce.calls += 1
            if BrokenOnce.calls == 1:
                raise OSError("a passing failure")
            return self.model

    batcher = QueryBatcher(BrokenOnce())

    async def run():
        first = await asyncio.gather(batcher.ask(Query(k=1, shard=None, image=b"v1")), return_exceptions=True)
        second = await batcher.ask(Query(k=1, shard=None, image=b"v4"))
        return first, second

    first, second = asyncio.run(run())
    assert isinstance(first[0], OSError) and second[0]["of"] == 4.0


@pytest.mark.parametrize("count", [1, 65, 130])
def test_more_queries_than_a_batch_holds_are_all_answered_in_order(count):
    index = Index()
    queries = [Query(k=1, shard=None, vector=np.asarray([float(i), 1.0], np.float32)) for i in range(count)]
    answers = ask_together(QueryBatcher(index), queries)
    assert [a[0]["of"] for a in answers] == [float(i) for i in range(count)]
    assert max(n for n, _, _ in index.searches) <= 64
