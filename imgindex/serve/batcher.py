"""The query batcher: queries that arrive together are answered together, one forward pass for
their images and one faiss search per shard filter, and one query's failure is never another's."""
from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from imgindex.errors import SampleError
from imgindex.indexes.query import Searcher

MAX_BATCH = 64  # queries answered by one forward and one search


@dataclass
class Query:
    k: int
    shard: str | None
    image: bytes | None = None  # an uploaded image
    vector: np.ndarray | None = None  # a given or stored vector
    future: asyncio.Future = field(default=None, repr=False)


class QueryBatcher:
    """Queries that wait together are answered together, in a thread of their own, one batch at a
    time (so the model and the index see one caller): one forward for the batch's images, one
    search per shard filter. While a batch runs, the next one gathers. A query that fails (an
    upload no decoder reads, a forward or search that fails on it alone) gets its own exception;
    its batch-mates still get their hits."""

    def __init__(self, searcher: Searcher):
        self.searcher = searcher
        self.queue: asyncio.Queue[Query] | None = None

    async def ask(self, query: Query) -> list[dict]:
        if self.queue is None:
            self.queue = asyncio.Queue()
            asyncio.get_running_loop().create_task(self._serve())
        query.future = asyncio.get_running_loop().create_future()
        await self.queue.put(query)
        return await query.future

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            while len(batch) < MAX_BATCH and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            try:
                answers = await loop.run_in_executor(None, self._answer, batch)
            except Exception as exc:  # a failure no query can be blamed for reaches them all
                for query in batch:
                    if not query.future.done():
                        query.future.set_exception(exc)
                continue
            for query, hits in zip(batch, answers):
                if query.future.done():
                    continue
                if isinstance(hits, Exception):
                    query.future.set_exception(hits)
                else:
                    query.future.set_result(hits)

    def _answer(self, batch: list[Query]) -> list[list[dict] | Exception]:
        """Decode the batch's images here too, in the one thread that runs the forward: decode
        threads beside it would take the cores the forward's threads wait on."""
        answers: list[list[dict] | Exception | None] = [None] * len(batch)
        images = [i for i, q in enumerate(batch) if q.image is not None]
        if images:
            embedder = self.searcher.embedder()
            pixels = {}
            for i in images:
                try:
                    pixels[i] = embedder.pixels(batch[i].image)
                except SampleError as exc:
                    answers[i] = exc
                except Exception as exc:  # whatever a decoder raises on one upload is that upload's failure
                    answers[i] = SampleError("decode_error", f"{type(exc).__name__}: {exc}")
            forward = functools.partial(_forward, embedder, pixels)
            for i, vector in _each(list(pixels), forward, answers).items():
                batch[i].vector = vector
        for shard in dict.fromkeys(q.shard for q in batch):
            members = [i for i, q in enumerate(batch) if q.shard == shard and answers[i] is None]
            search = functools.partial(_search, self.searcher, batch, shard)
            for i, found in _each(members, search, answers).items():
                answers[i] = [h.to_dict() for h in found[:batch[i].k]]
        return answers


def _forward(embedder, pixels: dict[int, np.ndarray], members: list[int]) -> np.ndarray:
    return embedder.embed_pixels([pixels[i] for i in members], MAX_BATCH)


def _search(searcher: Searcher, batch: list[Query], shard: str | None, members: list[int]) -> list:
    k = max(batch[i].k for i in members)
    return searcher.search_vectors(np.stack([batch[i].vector for i in members]), k, shard=shard)


def _each(members: list[int], run: Callable[[list[int]], Any], answers: list) -> dict[int, Any]:
    """run(members) once for all of them; should that fail, once for each, so a failure becomes
    the answer of the one query it belongs to (answers[i]) and the others still get theirs."""
    if not members:
        return {}
    try:
        return dict(zip(members, run(members)))
    except Exception as exc:
        if len(members) == 1:
            answers[members[0]] = exc
            return {}
    results = {}
    for i in members:
        try:
            results[i] = run([i])[0]
        except Exception as exc:
            answers[i] = exc
    return results
