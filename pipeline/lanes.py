"""CPU lanes: on a CPU device the decode and the forward share the cores, so instead of one
forward over all the threads taking turns with the decode, `lanes` threads each take the
next batch of read samples, decode it and run the forward on it with their own share of the
threads. One lane decodes while another computes, and narrow forwards side by side scale
better than one wide forward (2 cores, XCiT-Nano: two 1-thread forwards run 1.06-1.14x one
2-thread forward; benchmarks/embed_throughput.py).

The samples are read in this thread (so `source.read_timeout_s` applies) and handed out in
order, and the results are taken back in order: a shard's rows keep their sample order and
its ShardDone follows its batches, exactly as the single-lane loader gives them. Each batch
is cut from `batch_size` samples, so a batch with failures in it runs a little short.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from itertools import islice

import numpy as np
import torch

from imgindex.pipeline.loader import Batch, ShardBatches, ShardDone, ShardTally
from imgindex.pipeline.model import Backbone
from imgindex.pipeline.sources import Sample, read_shard

log = logging.getLogger(__name__)

# `lanes: auto` stops here: more lanes would each hold a batch's activations, and their Python
# (the op dispatch, the decode's bookkeeping) contends for the GIL. Past 8 cores the lanes
# get more threads each instead. (Measured on 2 cores only; `--lanes N` overrides.)
MAX_AUTO_LANES = 8


def auto_lanes(threads: int) -> int:
    """One lane per thread of the job's budget, up to MAX_AUTO_LANES lanes of equal width."""
    width = -(-threads // MAX_AUTO_LANES)
    return max(1, threads // width)


def embed_in_lanes(dataset: ShardBatches, backbone: Backbone, lanes: int,
                   threads: int) -> Iterator[tuple[Batch | ShardDone, np.ndarray | None, float]]:
    """(message, its vectors, lane-seconds of forward / lanes) in the single-lane loader's order.

    `threads` (the job's thread budget) is split evenly between the lanes.
    """
    jobs: queue.Queue = queue.Queue()
    width = max(1, threads // lanes)

    def lane() -> None:
        torch.set_num_threads(width)  # this thread's own OpenMP team
        while (job := jobs.get()) is not None:
            future, shard, samples = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(_decode_and_embed(dataset, backbone, shard, samples))
                except BaseException as exc:  # handed to the reader, which re-raises it
                    future.set_exception(exc)

    lane_threads = [threading.Thread(target=lane, name=f"lane-{k}", daemon=True) for k in range(lanes)]
    for thread in lane_threads:
        thread.start()
    ahead: deque[tuple[ShardDone, Future | None]] = deque()  # in order; None: the shard's end
    in_flight = 0
    try:
        for shard in dataset.shards:
            done = ShardDone(shard=shard.name, samples=0)
            samples = read_shard(shard, dataset.read_timeout)
            while chunk := list(islice(samples, dataset.batch_size)):
                future: Future = Future()
                jobs.put((future, shard.name, chunk))
                ahead.append((done, future))
                in_flight += 1
                while in_flight > lanes:  # one batch waits for each lane to be free
                    in_flight -= ahead[0][1] is not None
                    yield from _finish(*ahead.popleft(), lanes)
            ahead.append((done, None))
        while ahead:
            yield from _finish(*ahead.popleft(), lanes)
    finally:
        # On an error or Ctrl-C the batches not started are dropped, and the ones running are
        # waited for: a thread still inside torch when the interpreter exits aborts it.
        busy = sum(future is not None and not future.cancel() and not future.done() for _, future in ahead)
        if busy:
            log.warning("stopping: letting %d lane(s) finish the batch in hand", busy)
        for _ in range(lanes):
            jobs.put(None)
        for thread in lane_threads:
            thread.join()
        torch.set_num_threads(threads)  # the lanes set their own width; the caller keeps its budget


def _decode_and_embed(dataset: ShardBatches, backbone: Backbone, shard: str,
                      samples: list[Sample]) -> tuple[ShardDone, Batch | None, np.ndarray | None, float]:
    decoded = ShardTally(shard)
    for sample in samples:
        decoded.add(dataset.decode_sample(sample))
    if not decoded.images:
        return decoded.done, None, None, 0.0
    batch = decoded.take_batch()
    began = time.perf_counter()
    vectors = backbone.embed(batch.images)
    return decoded.done, batch, vectors, time.perf_counter() - began


def _finish(done: ShardDone, future: Future | None,
            lanes: int) -> Iterator[tuple[Batch | ShardDone, np.ndarray | None, float]]:
    """A batch's result into its shard's tally (and out), or, after them all, the ShardDone."""
    if future is None:
        yield done, None, 0.0
        return
    part, batch, vectors, seconds = future.result()
    done.samples += part.samples
    done.failures.extend(part.failures)
    done.decode_seconds += part.decode_seconds
    done.near_constant += part.near_constant
    for reason, count in part.skipped.items():
        done.skipped[reason] = done.skipped.get(reason, 0) + count
    if batch is not None:
        yield batch, vectors, seconds / lanes
