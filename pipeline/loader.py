"""Shards -> decode worker processes -> uint8 batches, one shard per worker at a time.

Each worker reads whole shards, so a batch never mixes shards and the main process knows
when a shard is complete: after its batches, the worker sends one `ShardDone` message with
the failures and the sample count. The accounting rows + failures = samples holds per shard.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from imgindex.pipeline.config import DecodeConfig
from imgindex.pipeline.decode import (SampleError, is_grayscale, is_near_constant, open_upright, phash, sha256,
                                      stack_nchw)
from imgindex.pipeline.sources import Sample, Shard, read_shard

# `workers: auto` stops here: 16 decode processes keep up with about 5,000 ImageNet-size
# images/s, more than XCiT-L/8 needs on any one GPU, and each process costs ~300 MB.
MAX_AUTO_WORKERS = 16

ROW_FIELDS = ("key", "key_bytes", "width", "height", "bytes", "grayscale", "sha256", "phash", "caption", "json", "url")


@dataclass
class Batch:
    shard: str
    images: torch.Tensor  # uint8, N x C x H x W
    rows: dict[str, list]  # ROW_FIELDS -> one value per image

    def pin_memory(self) -> "Batch":
        """Called by DataLoader(pin_memory=True): page-locked so the copy to the GPU is async."""
        return Batch(self.shard, self.images.pin_memory(), self.rows)


@dataclass
class ShardDone:
    shard: str
    samples: int
    failures: list[dict] = field(default_factory=list)  # key, member, error, message
    decode_seconds: float = 0.0
    near_constant: int = 0  # embedded images with (almost) one colour: no signal for the model
    skipped: dict[str, int] = field(default_factory=dict)  # tar members that are no sample, by reason
    started: float = field(default_factory=time.time)  # when its reading began (wall clock)


class ShardBatches(IterableDataset):
    """Worker k of n takes shards k, k+n, ...; yields Batch messages then one ShardDone per shard.

    Samples are read in order and decoded `decode_threads` at a time (PIL and numpy release
    the GIL), so one in-process loader can use every core between two forwards.
    """

    def __init__(self, shards: list[Shard], preprocess: Callable, decode: DecodeConfig, batch_size: int,
                 draft_side: int | None = None, decode_threads: int = 1, read_timeout: float | None = None):
        self.shards = shards
        self.preprocess = preprocess
        self.decode = decode
        self.batch_size = batch_size
        self.draft_side = draft_side
        self.decode_threads = decode_threads
        self.read_timeout = read_timeout

    def __iter__(self) -> Iterator[Batch | ShardDone]:
        info = get_worker_info()
        mine = self.shards if info is None else self.shards[info.id::info.num_workers]
        with ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode") as pool:
            for shard in mine:
                yield from self.shard_messages(shard, pool.map if self.decode_threads > 1 else map)

    def decode_sample(self, sample: Sample) -> Decoded | Failed | Skipped:
        """One sample -> its model input and row values, or its failure row."""
        if sample.skipped:
            return Skipped(sample.skipped)
        start = time.perf_counter()
        try:
            if sample.error:
                raise SampleError(*sample.error)
            img, width, height = open_upright(sample.data, self.decode.max_pixels, self.decode.alpha_background,
                                              self.draft_side)
            pixels = self.preprocess(img)
            values = (sample.key, sample.key_bytes, width, height, len(sample.data), is_grayscale(pixels),
                      sha256(sample.data), phash(img), sample.caption, sample.json, sample.url)
            return Decoded(pixels, values, is_near_constant(pixels), time.perf_counter() - start)
        except SampleError as exc:
            failure = {"key": sample.key, "member": sample.member, "error": exc.kind, "message": str(exc)}
        except Exception as exc:  # an unforeseen decoder error is this sample's, not the job's
            failure = {"key": sample.key, "member": sample.member,
                       "error": "decode_error", "message": f"{type(exc).__name__}: {exc}"}
        return Failed(failure, time.perf_counter() - start)

    def shard_messages(self, shard: Shard, map_=map) -> Iterator[Batch | ShardDone]:
        """Full batches in sample order (the last may be short), then the ShardDone."""
        decoded = ShardTally(shard.name)
        samples = read_shard(shard, self.read_timeout)
        # Executor.map submits each sample as soon as it is read, so reading overlaps decoding.
        while results := list(map_(self.decode_sample, islice(samples, self.batch_size - len(decoded.images)))):
            for result in results:
                decoded.add(result)
            if len(decoded.images) == self.batch_size:
                yield decoded.take_batch()
        if decoded.images:
            yield decoded.take_batch()
        yield decoded.done


@dataclass
class Decoded:
    """A sample ready for the model: uint8 CHW pixels and its row values (ROW_FIELDS order)."""

    pixels: np.ndarray
    values: tuple
    near_constant: bool
    seconds: float


@dataclass
class Failed:
    """A sample that cannot be embedded: its failures row."""

    row: dict
    seconds: float


@dataclass
class Skipped:
    """A tar member that is no sample (a directory, a link...), counted in the stats by reason."""

    reason: str
    seconds: float = 0.0


class ShardTally:
    """Decoded samples of one shard, in sample order, until they are taken as a Batch; and the
    tally (samples, failures, near-constant images, decode time) that becomes its ShardDone."""

    def __init__(self, shard: str):
        self.done = ShardDone(shard=shard, samples=0)
        self.images: list[np.ndarray] = []
        self.rows: dict[str, list] = {name: [] for name in ROW_FIELDS}

    def add(self, result: Decoded | Failed | Skipped) -> None:
        if isinstance(result, Skipped):
            self.done.skipped[result.reason] = self.done.skipped.get(result.reason, 0) + 1
            return
        self.done.samples += 1
        self.done.decode_seconds += result.seconds
        if isinstance(result, Failed):
            self.done.failures.append(result.row)
            return
        self.done.near_constant += result.near_constant
        self.images.append(result.pixels)
        for name, value in zip(ROW_FIELDS, result.values):
            self.rows[name].append(value)

    def take_batch(self) -> Batch:
        batch = Batch(shard=self.done.shard, images=stack_nchw(self.images), rows=self.rows)
        self.images, self.rows = [], {name: [] for name in ROW_FIELDS}
        return batch


def own_cores() -> list[int]:
    """The cores this process may run on (its affinity mask, which taskset, cgroups, SLURM and
    `--procs` set); empty where the OS has no affinity API (macOS)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:
        return []


def available_cores() -> int:
    return len(own_cores()) or os.cpu_count() or 1


def auto_workers(device_type: str, cores: int) -> int:
    """`workers: auto`. On a CPU device, 0: decode in this process, in lanes that each decode a
    batch and embed it (pipeline.lanes; the fastest schedule measured there). With an
    accelerator, one decode process per core less one for this process (which feeds the device
    and writes Parquet), at most MAX_AUTO_WORKERS and at least 1: the device must never wait
    for JPEGs."""
    if device_type == "cpu":
        return 0
    return max(1, min(MAX_AUTO_WORKERS, cores - 1))


def make_loader(dataset: ShardBatches, workers: int, pin_memory: bool, run_ahead: bool) -> Iterable[Batch | ShardDone]:
    """Decode worker processes, or with workers=0 this process's decode threads.

    In-process on a CPU device (`run_ahead` false) the decode threads take turns with the
    forward: decoding while the model's threads compute would oversubscribe the cores, and a
    preempted OpenMP thread stalls the whole forward. With an accelerator the host is free
    during the forward, so a thread runs ahead and decodes the next batches meanwhile.
    """
    workers = min(workers, len(dataset.shards))
    # Two batches ahead per worker: enough to ride out a slow image, and the host memory in
    # flight (workers x 2 x batch) stays bounded when the batch size fills a large GPU.
    loader = DataLoader(
        dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
        prefetch_factor=2 if workers else None, persistent_workers=False,
    )
    return _in_thread(loader, depth=2) if run_ahead and not workers else loader


def _in_thread(iterable: Iterable, depth: int) -> Iterator:
    """Iterate `iterable` in a background thread, `depth` items ahead; its errors re-raise here."""
    items: queue.Queue = queue.Queue(depth)
    done = object()

    def run() -> None:
        try:
            for item in iterable:
                items.put(item)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            items.put(exc)
        items.put(done)

    threading.Thread(target=run, name="decode", daemon=True).start()
    while (item := items.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item
