"""The unit of work: one shard -> its part, failures and stats marker.

A Worker holds the model for its whole life and runs `embed_shard(shard)`, a pure function of
(shard, config): running it twice writes the same part, and the part exists only when it is
complete (the stats marker is written last). Every executor (in-process, `--procs`, `--slice`,
`--ray`) schedules this one function; they differ only in where the Worker lives.

Inside a shard, samples are read in the worker's main thread (so `source.read_timeout_s`
applies) and cut into batches; the Schedule says who decodes them: lanes (CPU: threads that
each decode a batch and run the forward on it, side by side), threads (taking turns with the
forward on a CPU, or running ahead of an accelerator), or decode processes (accelerators).
Results are taken back in order, so a shard's rows keep their sample order whatever decodes.
"""
from __future__ import annotations

import logging
import multiprocessing
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from datetime import datetime, timezone
from itertools import islice

import numpy as np
import torch

from imgindex.pipeline.config import EmbedConfig
from imgindex.pipeline.batches import Batch, SampleDecoder, ShardDone, ShardTally
from imgindex.pipeline.model import Backbone, auto_batch_size, load_backbone
from imgindex.pipeline.schedule import Schedule
from imgindex.pipeline.sources import Sample, Shard, read_shard
from imgindex.formats.embeddings_dir import EmbeddingStore
from imgindex.formats.records import ROW_FIELDS, ShardStats, row_columns

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (images embedded, samples failed) since the last call


class Worker:
    """A model, its decoders and an output directory, for the worker's whole life."""

    def __init__(self, out: str, config: EmbedConfig, schedule: Schedule, name: str = "local",
                 backbone: Backbone | None = None):
        self.config, self.schedule, self.name = config, schedule, name
        self.store = EmbeddingStore(out)
        self.caller_threads = torch.get_num_threads()
        torch.set_num_threads(schedule.threads)
        self.backbone = backbone or load_backbone(config, schedule)
        self.batch_size = (auto_batch_size(self.backbone) if schedule.batch_size == "auto"
                           else int(schedule.batch_size))
        self.decoder = SampleDecoder(self.backbone.data_config, config.decode)
        self.model_seconds = 0.0
        self._pool: Executor | None = None  # lanes, decode processes or the decode-ahead thread
        self._threads: ThreadPoolExecutor | None = None  # decode threads inside a chunk

    # -- the unit of work -------------------------------------------------------------------
    def embed_shard(self, shard: Shard, progress: Progress | None = None) -> ShardStats:
        """Embed one shard and write its part, failures and (last) stats marker; its stats."""
        done = ShardDone(shard=shard.name, samples=0)
        model_before = self.model_seconds
        rows = row_columns()
        vectors: list[np.ndarray] = []
        for part, batch, embedded in self._batches(shard):
            done.merge(part)
            if batch is not None:
                for name in ROW_FIELDS:
                    rows[name].extend(batch.rows[name])
                vectors.append(embedded)
            if progress:
                progress(len(batch.images) if batch is not None else 0, len(part.failures))
        embeddings = np.concatenate(vectors) if vectors else np.zeros((0, self.backbone.dim), np.float32)
        stats = shard_stats(done, shard, len(embeddings), self.name, self.batch_size,
                            model_seconds=self.model_seconds - model_before)
        self.store.write_shard(shard.name, rows, embeddings, done.failures, stats)
        return stats

    run = embed_shard  # what a pool's worker runs (executors.handout.TaskWorker)

    # -- inside a shard ---------------------------------------------------------------------
    def _batches(self, shard: Shard) -> Iterator[tuple[ShardDone, Batch | None, np.ndarray | None]]:
        """(tally of a batch's samples, the batch, its vectors), in sample order."""
        samples = read_shard(shard, self.config.source.read_timeout_s, self.config.source.max_file_bytes)
        chunks = iter(lambda: list(islice(samples, self.batch_size)), [])
        mode = self.schedule.decode
        depth = self.schedule.lanes if mode == "lanes" else self.schedule.ahead
        in_flight: deque[Future] = deque()
        try:
            for chunk in chunks:
                in_flight.append(self._submit(shard.name, chunk))
                while len(in_flight) > depth:
                    yield self._finish(in_flight.popleft())
            while in_flight:
                yield self._finish(in_flight.popleft())
        finally:
            # On an error or Ctrl-C: batches not started are dropped, running ones waited for
            # (a lane still inside torch when the interpreter exits aborts it).
            busy = sum(not f.cancel() and not f.done() for f in in_flight)
            if busy:
                log.warning("stopping: letting %d batch(es) in hand finish", busy)
            for future in in_flight:
                if not future.cancelled():
                    future.exception()

    def _submit(self, shard: str, chunk: list[Sample]) -> Future:
        mode = self.schedule.decode
        if mode == "lanes":
            return self._executor().submit(self._decode_and_embed, shard, chunk)
        if mode == "processes":
            return self._executor().submit(decode_in_process, chunk)
        if self.schedule.ahead:  # threads, running ahead of an accelerator
            return self._executor().submit(self._decode_threads, chunk)
        done: Future = Future()  # threads taking turns with the forward on a CPU
        done.set_result(self._decode_threads(chunk))
        return done

    def _finish(self, future: Future) -> tuple[ShardDone, Batch | None, np.ndarray | None]:
        result = future.result()
        if self.schedule.decode == "lanes":
            return result
        tally = ShardTally("")
        for decoded in result:
            tally.add(decoded)
        if not tally.images:
            return tally.done, None, None
        batch = tally.take_batch()
        if self.schedule.pin_memory:
            batch = batch.pin_memory()
        return tally.done, batch, self._forward(batch)

    def _decode_and_embed(self, shard: str, chunk: list[Sample]) -> tuple[ShardDone, Batch | None, np.ndarray | None]:
        """A lane's work: decode a batch and run the forward on it with the lane's threads."""
        tally = ShardTally(shard)
        for sample in chunk:
            tally.add(self.decoder(sample))
        if not tally.images:
            return tally.done, None, None
        batch = tally.take_batch()
        return tally.done, batch, self._forward(batch, share=self.schedule.lanes)

    def _decode_threads(self, chunk: list[Sample]) -> list:
        if self.schedule.threads > 1 and len(chunk) > 1:
            return list(self._thread_pool().map(self.decoder, chunk))
        return [self.decoder(sample) for sample in chunk]

    def _forward(self, batch: Batch, share: int = 1) -> np.ndarray:
        began = time.perf_counter()
        vectors = self.backbone.embed(batch.images)
        self.model_seconds += (time.perf_counter() - began) / share  # lanes overlap: their average
        return vectors

    # -- pools, for the worker's life -------------------------------------------------------
    def _executor(self) -> Executor:
        if self._pool is None:
            mode = self.schedule.decode
            if mode == "lanes":
                width = max(1, self.schedule.threads // self.schedule.lanes)
                self._pool = ThreadPoolExecutor(self.schedule.lanes, thread_name_prefix="lane",
                                                initializer=torch.set_num_threads, initargs=(width,))
            elif mode == "processes":
                self._pool = ProcessPoolExecutor(self.schedule.workers, mp_context=multiprocessing.get_context(
                    "forkserver"), initializer=start_decoder, initargs=(self.decoder,))
            else:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="decode-ahead")
        return self._pool

    def _thread_pool(self) -> ThreadPoolExecutor:
        if self._threads is None:
            self._threads = ThreadPoolExecutor(self.schedule.threads, thread_name_prefix="decode")
        return self._threads

    def close(self) -> None:
        """Stop the worker's pools (joining every lane and decode process) and give the caller
        its torch thread count back."""
        for pool in (self._pool, self._threads):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._pool = self._threads = None
        torch.set_num_threads(self.caller_threads)

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# A decode process's decoder, set once by the process pool's initializer: per-process state is what
# ProcessPoolExecutor's initializer is for, and it spares pickling the decoder with every chunk.
_DECODER: SampleDecoder | None = None


def start_decoder(decoder: SampleDecoder) -> None:
    """A decode process's start: its decoder, and one thread (the processes are the parallelism)."""
    global _DECODER
    torch.set_num_threads(1)
    _DECODER = decoder


def decode_in_process(chunk: list[Sample]) -> list:
    return [_DECODER(sample) for sample in chunk]


def shard_stats(done: ShardDone, source: Shard, rows: int, worker: str, batch_size: int,
                model_seconds: float) -> ShardStats:
    """The stats marker; `seconds` runs from when the shard's reading began to now (its part is
    written next), so images/s is the shard's own rate. Rows + failures must be the samples."""
    seconds = time.time() - done.started
    errors: dict[str, int] = {}
    for failure in done.failures:
        errors[failure["error"]] = errors.get(failure["error"], 0) + 1
    return ShardStats(
        shard=done.shard, kind=source.kind, source=source.url, samples=done.samples, rows=rows,
        failures=len(done.failures), failures_by_error=errors, near_constant=done.near_constant,
        skipped_members=done.skipped, worker=worker, batch_size=batch_size, seconds=round(seconds, 3),
        decode_seconds=round(done.decode_seconds, 3), model_seconds=round(model_seconds, 3),
        images_per_s=round(rows / seconds, 2) if seconds > 0 else None,
        finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        parquet=source.parquet.to_dict() if source.parquet else None)
